"""Replay the collapse rule over finished runs: which healthy runs would it warn about (and stop with
``--stop-on-collapse``), and when does it catch the runs that did collapse?

    python benchmarks/collapse_rule.py runs/ [--fractions 0.4 0.5 0.6 0.7 0.8]

Every run folder below the given folders with ``metrics.jsonl``, ``config.yaml`` and ``summary.json`` is
replayed through the trainer's own rule (seg_transfer/training/collapse.py: :func:`planned_encoder_epochs`, :func:`collapse_check_due`,
:func:`collapsed_classes`) at each
``after_fraction``, with the run's ``min_class_dice`` and ``relative_dice``. A run *collapsed* when its
``summary.json`` lists a class below the rule at its best epoch (the study report's verdict); any other
run that the rule warns about is a false alarm: with ``--stop-on-collapse`` it would have been stopped.
A run copied into a second study (reused runs) counts once: runs are keyed by their metrics.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from seg_transfer.config import StageConfig
from seg_transfer.training.collapse import collapse_check_due, collapsed_classes, planned_encoder_epochs


def load_run(run_dir: Path) -> dict | None:
    """The per-validation class Dice, stage kinds and verdict of one finished run (None if incomplete)."""
    files = [run_dir / name for name in ("metrics.jsonl", "config.yaml", "summary.json")]
    if not all(f.is_file() for f in files):
        return None
    summary = json.loads(files[2].read_text())
    training = yaml.safe_load(files[1].read_text())["training"]
    classes = list(summary.get("best_per_class") or {})
    if not classes:
        return None
    records = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    stages = [StageConfig.model_validate(stage) for stage in training["stages"]]  # the trainer's defaults
    rule = training.get("collapse") or {}
    return {
        "run": run_dir,
        "collapsed": bool(summary.get("collapsed")),
        "epochs": [(stages[r["stage_index"]].train != "decoder",
                    {c: r[f"val_dice_{c}"] for c in classes} if "val_dice" in r else None) for r in records],
        "planned": planned_encoder_epochs(stages),
        "min_class_dice": rule.get("min_class_dice", 0.1),
        "relative_dice": rule.get("relative_dice", 0.3),
    }


def first_warning(run: dict, after_fraction: float) -> int | None:
    """The epoch (1-based) of the first validation the rule would flag, or None."""
    encoder_epochs = 0
    for epoch, (trains_encoder, per_class) in enumerate(run["epochs"], start=1):
        encoder_epochs += trains_encoder
        if not trains_encoder or per_class is None or not collapse_check_due(encoder_epochs, run["planned"], after_fraction):
            continue
        if collapsed_classes(per_class, run["min_class_dice"], run["relative_dice"]):
            return epoch
    return None


def find_runs(folders: list[Path]) -> list[dict]:
    seen, runs = set(), []
    for folder in folders:
        for metrics in sorted(folder.rglob("metrics.jsonl")):
            run = load_run(metrics.parent)
            key = metrics.read_bytes()
            if run is not None and key not in seen:
                seen.add(key)
                runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8])
    args = parser.parse_args()
    runs = find_runs(args.folders)
    collapsed = [r for r in runs if r["collapsed"]]
    healthy = [r for r in runs if not r["collapsed"]]
    print(f"{len(runs)} runs: {len(collapsed)} collapsed at their best epoch, {len(healthy)} not")
    print("| after_fraction | runs not collapsed but warned (would be stopped) | collapsed runs caught | first warning (epoch of run length) |")
    print("|---|---|---|---|")
    for fraction in args.fractions:
        false_alarms = [r for r in healthy if first_warning(r, fraction) is not None]
        caught = [(first_warning(r, fraction), len(r["epochs"])) for r in collapsed]
        when = ", ".join(f"{e}/{n}" if e else f"-/{n}" for e, n in caught)
        print(f"| {fraction} | {len(false_alarms)} of {len(healthy)} | {sum(e is not None for e, _ in caught)} of {len(collapsed)} | {when} |")
        for run in false_alarms:
            print(f"|   | {run['run']} (warned at epoch {first_warning(run, fraction)}) | | |")


if __name__ == "__main__":
    main()
