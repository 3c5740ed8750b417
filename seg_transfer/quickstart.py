"""``seg-transfer quickstart``: phantoms, an ImageNet-pretrained staged run and its scratch control, on either
route (``--dims``: the embedded config of that route, :data:`EMBEDDED_CONFIGS`)."""
from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import yaml

from seg_transfer.config import ConfigError, RunConfig, config_from_dict
from seg_transfer.data.phantoms import make_phantom_dataset
from seg_transfer.study.arms import scratch_control
from seg_transfer.training.reuse import train_or_reuse
from seg_transfer.training.trainer import RunResult


#: route (``model.dims``) -> its embedded quickstart config in ``seg_transfer/resources``
EMBEDDED_CONFIGS = {"2.5d": "quickstart.yaml", "3d": "quickstart_3d.yaml"}


def check_dims(dims: str) -> None:
    """ConfigError naming the routes unless ``dims`` has an embedded quickstart config."""
    if dims not in EMBEDDED_CONFIGS:
        raise ConfigError(f"--dims must be one of {', '.join(EMBEDDED_CONFIGS)}, got {dims!r}")


def default_config(dims: str = "2.5d") -> dict:
    """The embedded quickstart config of route ``dims`` as plain data (:func:`check_dims` first)."""
    check_dims(dims)
    return yaml.safe_load(resources.files("seg_transfer.resources").joinpath(EMBEDDED_CONFIGS[dims]).read_text())


def check_epochs_scale(epochs_scale: float) -> None:
    """ConfigError unless ``epochs_scale`` is a positive finite number."""
    if not (math.isfinite(epochs_scale) and epochs_scale > 0):
        raise ConfigError(f"--epochs-scale must be a positive number, got {epochs_scale}")


def quickstart_configs(data_root: Path, epochs_scale: float = 1.0, dims: str = "2.5d") -> tuple[RunConfig, RunConfig]:
    """(pretrained staged, scratch control) configs of route ``dims`` on the phantom dataset at ``data_root``.

    Raises ConfigError for an ``epochs_scale`` that is not a positive finite number or an unknown route."""
    check_epochs_scale(epochs_scale)
    raw = default_config(dims)
    raw["data"]["root"] = str(data_root)
    for stage in raw["training"]["stages"]:
        stage["epochs"] = max(1, int(round(stage["epochs"] * epochs_scale)))
    return config_from_dict(raw, source="quickstart"), config_from_dict(scratch_control(raw), source="quickstart")


def run_quickstart(output: Path, epochs_scale: float = 1.0, dims: str = "2.5d") -> str:
    """Generate phantoms (once; both routes share them), train both arms of route ``dims``, and return a short
    report. The routes' runs have their own folders, so one output folder holds both."""
    output = Path(output)
    data_root = output / "phantoms"
    check_epochs_scale(epochs_scale)  # both before any phantom is written
    check_dims(dims)
    if not (data_root / "dataset.json").is_file():
        make_phantom_dataset(data_root)
    pretrained, scratch = quickstart_configs(data_root, epochs_scale, dims)
    # a folder holding a run of another config (another --epochs-scale) is refused, never silently reused
    results = [train_or_reuse(config, output / config.name, check_config=True) for config in (pretrained, scratch)]
    return format_report(results, ["imagenet", "scratch"])


def format_report(results: list[RunResult], arms: list[str]) -> str:
    """Both arms' best validation Dice (rounded), per class, steps and seconds, then the difference."""
    lines = ["", f"{'arm':10s} {'val Dice':>8s}  {'per class':32s} {'steps':>5s} {'seconds':>7s}  run"]
    for arm, result in zip(arms, results):
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in result.best_per_class.items())
        lines.append(f"{arm:10s} {result.best_dice:8.3f}  {per_class:32s} {result.steps:5d} {result.seconds:7.0f}  {result.run_dir}")
    if len(results) == 2:
        lines.append(f"{arms[0]} - {arms[1]}: {results[0].best_dice - results[1].best_dice:+.3f} val Dice at equal steps "
                     "(one seed on phantoms; the README's study has the seed-aware numbers on real data)")
    return "\n".join(lines)
