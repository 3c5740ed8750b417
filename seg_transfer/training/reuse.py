"""Idempotent training: a finished run is reused, an interrupted one resumed, a different one refused."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from seg_transfer.config import RunConfig, dump_config
from seg_transfer.training.trainer import RunDirError, RunResult, train

SUMMARY_FIELDS = ("best_dice", "best_per_class", "best_epoch", "epochs", "seconds")
OPTIONAL_FIELDS = ("steps", "collapsed", "collapse_warnings", "stopped", "peak_gpu_gb", "environment")  # absent from summaries of older versions


def finished_result(run_dir: Path) -> RunResult | None:
    """The result recorded in ``run_dir/summary.json`` (written when a run ends), else None."""
    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        return None
    values = json.loads(summary.read_text())
    optional = {name: values[name] for name in OPTIONAL_FIELDS if name in values}
    return RunResult(run_dir=Path(run_dir), **{name: values[name] for name in SUMMARY_FIELDS}, **optional)


def check_same_config(config: RunConfig, run_dir: Path) -> None:
    """RunDirError when ``run_dir`` holds a run of another config (reusing it would mix experiments)."""
    stored_path = Path(run_dir) / "config.yaml"
    if not stored_path.is_file():
        return
    stored = yaml.safe_load(stored_path.read_text())
    try:  # fields added since the run started take their defaults; renamed or removed ones make it differ
        stored = dump_config(RunConfig.model_validate(stored))
    except ValidationError:
        pass
    stored, current = _what_trains(stored), _what_trains(dump_config(config))
    if stored != current:
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise RunDirError(f"{run_dir}: holds a run with another config (differs in {', '.join(changed)}); "
                          "use a new output folder")


LABELS = ("name", "output_dir")  # what a run is called and where it goes by default, not what it trains
NOT_TRAINING = ("pretraining",)  # settings of ``seg-transfer pretrain`` only


def _what_trains(dumped: dict) -> dict:
    """A dumped config without the settings that cannot change the trained weights: the run's name and
    default output folder (a study arm renamed, or a run copied in from another study under another arm
    name, is the same run), the ``pretraining`` section (read by ``seg-transfer pretrain`` only) and collapse detection that only warns (``training.collapse`` with ``stop:
    false``). A run made under other warning thresholds is the same run; one that may have been stopped
    early is not."""
    dumped = {k: v for k, v in dumped.items() if k not in LABELS + NOT_TRAINING}
    collapse = dumped.get("training", {}).get("collapse")
    if not isinstance(collapse, dict) or collapse.get("stop"):
        return dumped
    return {**dumped, "training": {k: v for k, v in dumped["training"].items() if k != "collapse"}}


def train_or_reuse(config: RunConfig, run_dir: Path, check_config: bool = False) -> RunResult:
    """Train ``config`` into ``run_dir``; reuse a finished run there and resume an interrupted one.

    With ``check_config`` an existing run must have been started from the same config.
    """
    run_dir = Path(run_dir)
    if check_config:
        check_same_config(config, run_dir)
    result = finished_result(run_dir)
    if result is not None:
        return result
    return train(config, run_dir, resume=(run_dir / "checkpoints" / "last.pt").is_file())
