"""Study statistics: learning curves, paired arm-vs-control comparisons, negative transfer, time to target.

Per test case, an arm's score is its mean Dice over classes averaged over seeds, so every comparison is
paired by case (same test cases, same training subsets per seed) and seeds reduce noise instead of
counting as extra samples.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from seg_transfer.evaluation.stats import bootstrap_ci, paired_comparison
from seg_transfer.study.config import StudyConfig
from seg_transfer.study.runner import RunRecord

NEGATIVE, POSITIVE, NEUTRAL = "worse than control (negative transfer)", "better than control", "no significant difference"


def select(records: Sequence[RunRecord], arm: str, size: int) -> list[RunRecord]:
    return [r for r in records if r.arm == arm and r.size == size]


def case_scores(records: Sequence[RunRecord]) -> dict[str, float]:
    """{test case: mean over the runs (seeds) of the case's class-mean Dice}."""
    per_run = [r.case_mean_dice() for r in records]
    cases = sorted(set().union(*per_run)) if per_run else []
    return {case: float(np.mean([scores[case] for scores in per_run if case in scores])) for case in cases}


def arms_and_sizes(records: Sequence[RunRecord]) -> tuple[list[str], list[int]]:
    """Arms in first-seen order and sizes ascending."""
    return list(dict.fromkeys(r.arm for r in records)), sorted({r.size for r in records})


def groups(records: Sequence[RunRecord]) -> Iterator[tuple[str, int, list[RunRecord]]]:
    """(arm, size, its runs over seeds) for every arm and size that has finished runs."""
    arms, sizes = arms_and_sizes(records)
    for arm in arms:
        for size in sizes:
            runs = select(records, arm, size)
            if runs:
                yield arm, size, runs


def learning_curves(records: Sequence[RunRecord], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per arm and size: test Dice (mean over cases of the seed-averaged case scores) with a bootstrap CI
    over cases, the per-seed run means and their SD."""
    rows = []
    for arm, size, runs in groups(records):
        ci = bootstrap_ci(list(case_scores(runs).values()), confidence=confidence)
        seed_means = [float(np.mean(list(r.case_mean_dice().values()))) for r in runs]
        rows.append({"arm": arm, "size": size, "n_seeds": len(runs), "test_dice": ci.estimate, "ci_low": ci.low,
                     "ci_high": ci.high, "n_cases": ci.n, "seed_means": seed_means,
                     "seed_sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
                     "val_dice": float(np.mean([r.best_val_dice for r in runs])),
                     "train_seconds": float(np.mean([r.seconds for r in runs]))})
    return rows


def verdict(comparison: dict[str, Any], alpha: float) -> str:
    """Significant (Wilcoxon p < alpha and the CI excludes 0) better, worse, or no difference."""
    p, low, high = comparison["p_value"], comparison["ci_low"], comparison["ci_high"]
    if p is None or not np.isfinite(p) or p >= alpha:
        return NEUTRAL
    if np.isfinite(high) and high < 0:
        return NEGATIVE
    if np.isfinite(low) and low > 0:
        return POSITIVE
    return NEUTRAL


def paired_comparisons(records: Sequence[RunRecord], control: str, alpha: float, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Each arm against the control at each size, paired by test case: mean difference (arm - control),
    bootstrap CI, Wilcoxon signed-rank p, verdict and the negative-transfer flag."""
    arms, sizes = arms_and_sizes(records)
    rows = []
    for arm in (a for a in arms if a != control):
        for size in sizes:
            mine, theirs = case_scores(select(records, arm, size)), case_scores(select(records, control, size))
            shared = sorted(set(mine) & set(theirs))
            if not shared:
                continue
            result = paired_comparison([mine[c] for c in shared], [theirs[c] for c in shared], confidence=confidence).as_dict()
            row = {"arm": arm, "control": control, "size": size, **result}
            row["verdict"] = verdict(row, alpha)
            row["negative_transfer"] = row["verdict"] == NEGATIVE
            rows.append(row)
    return rows


def first_reaching(curve: Sequence[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first validated epoch whose Dice reaches ``target`` (its epoch and elapsed seconds), else None."""
    return next((point for point in curve if point["val_dice"] >= target), None)


def time_to_target(records: Sequence[RunRecord], target: float) -> list[dict[str, Any]]:
    """Per arm and size: how many seeds reached the target validation Dice, and their mean seconds and epochs."""
    rows = []
    for arm, size, runs in groups(records):
        reached = [point for r in runs if (point := first_reaching(r.curve, target)) is not None]
        rows.append({"arm": arm, "size": size, "target": target, "reached": len(reached), "runs": len(runs),
                     "seconds": float(np.mean([p["elapsed"] for p in reached])) if reached else None,
                     "epochs": float(np.mean([p["epoch"] for p in reached])) if reached else None})
    return rows


def analyse(records: Sequence[RunRecord], study: StudyConfig) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data."""
    return {
        "learning_curves": learning_curves(records),
        "comparisons": paired_comparisons(records, study.control, study.alpha),
        "time_to_target": time_to_target(records, study.target_dice),
        "runs": [{"arm": r.arm, "size": r.size, "seed": r.seed, "run_dir": str(r.run_dir), "best_val_dice": r.best_val_dice,
                  "epochs": r.epochs, "seconds": r.seconds, "test_dice_mean": float(np.mean(list(r.case_mean_dice().values()))),
                  "curve": r.curve} for r in records],
    }
