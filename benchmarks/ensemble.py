"""Do ensembles of finished study runs beat their members? ``seg-transfer predict -m A -m B`` on the test cases.

    python benchmarks/ensemble.py --study runs/study_3d_default_budget \
        --arms runs/study_default_budget/runs/imagenet runs/study_3d_default_budget/runs/imagenet_3d \
        --runs 'n010_seed*' [--tta] [--out DIR]
    python benchmarks/ensemble.py --study runs/study_default_budget \
        --arms runs/study_default_budget/runs/imagenet --runs 'n140_seed*' --across-seeds

Two kinds of ensemble:

* **across arms** (default): for each run name (``nNNN_seedS``: same training cases in every Hippocampus
  study, since a subset depends on size and seed only) the runs of every ``--arms`` folder predict as one
  ensemble, e.g. the 2.5D and the 3D default trained on the same 10 cases. Compared, seed by seed, with each
  member alone: the members trained on nothing the ensemble did not.
* ``--across-seeds``: the matched runs of one arm form one ensemble (only fair where they share their
  training cases: the all-cases runs); one ensemble, so seed noise of the ensemble is not measured.

Members are scored on the study's test cases (``STUDY/test_cases``) from their own ``test_evaluation``
(``predict`` without TTA, as the study scores them) or, with ``--tta``, re-predicted with it; the ensemble
the same way. Training cost is the members' summed training minutes (each member's ``summary.json``).
Prints per-seed mean test Dice (classes averaged, then cases) and the seed-aware paired difference of the
ensemble against each member arm (two-level bootstrap CI, crossed t-test), as ``compare`` reports arms.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from seg_transfer.evaluation.evaluate import evaluate_folders
from seg_transfer.evaluation.stats import hierarchical_bootstrap
from seg_transfer.inference.batch import PredictRequest, run_predict
from seg_transfer.inference.predictor import PredictOptions
from seg_transfer.study.runner import read_test_dice


def case_dice(metrics_json: Path) -> dict[str, float]:
    """{case: Dice averaged over classes} from an ``evaluate`` metrics.json."""
    return {case: float(np.mean(list(classes.values()))) for case, classes in read_test_dice(metrics_json).items()}


def predict_and_score(runs: list[Path], study: Path, out: Path, tta: bool) -> dict[str, float]:
    """Per-case Dice of ``runs`` predicting the study's test cases as one model (one run) or one ensemble."""
    report = run_predict(PredictRequest(tuple(str(r) for r in runs), str(study / "test_cases" / "images.txt"),
                                        out / "pred", device="cpu", options=PredictOptions(tta=tta, progress=False)))
    if report.failed:
        raise SystemExit(f"error: {report.failed[0].case}: {report.failed[0].reason}")
    evaluate_folders(out / "pred", study / "test_cases" / "labels", out / "eval",
                     labels=study / "test_cases" / "labels.json", n_resamples=200)
    return case_dice(out / "eval" / "metrics.json")


def member_dice(run: Path, study: Path, out: Path, tta: bool) -> dict[str, float]:
    """A member's per-case test Dice: the study's own scoring, or re-predicted with TTA."""
    stored = run / "test_evaluation" / "metrics.json"
    if not tta and stored.is_file():
        return case_dice(stored)
    return predict_and_score([run], study, out, tta)


def training_minutes(run: Path) -> float:
    return json.loads((run / "summary.json").read_text()).get("seconds", float("nan")) / 60


def check_same_training_cases(runs: list[Path]) -> None:
    """SystemExit unless every run trained on the same cases (``splits.json``)."""
    splits = [json.loads((r / "splits.json").read_text())["train"] for r in runs]
    if any(sorted(s) != sorted(splits[0]) for s in splits[1:]):
        raise SystemExit(f"error: {', '.join(map(str, runs))}: trained on different cases; not a fair ensemble")


def ensembles(arms: list[Path], pattern: str, across_seeds: bool) -> dict[str, list[Path]]:
    """{ensemble name: member runs}: one per run name across arms, or one of all matched runs of the arm."""
    if across_seeds:
        runs = sorted(arms[0].glob(pattern))
        return {f"{arms[0].name} x {len(runs)} seeds": runs} if runs else {}
    names = sorted({p.name for p in arms[0].glob(pattern)}.intersection(*({p.name for p in a.glob(pattern)} for a in arms[1:])))
    return {name: [arm / name for arm in arms] for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a study folder with test_cases/ (its labels score everything)")
    parser.add_argument("--arms", type=Path, nargs="+", required=True, help="arm folders holding nNNN_seedS runs")
    parser.add_argument("--runs", default="n010_seed*", help="glob of run names inside each arm folder")
    parser.add_argument("--across-seeds", action="store_true", help="one ensemble of the matched runs of the first arm")
    parser.add_argument("--tta", action="store_true", help="predict members and ensembles with test-time flips")
    parser.add_argument("--out", type=Path, default=None, help="keep predictions here (default: a temporary folder)")
    args = parser.parse_args()
    groups = ensembles(args.arms, args.runs, args.across_seeds)
    if not groups:
        raise SystemExit(f"error: no run matching {args.runs!r} in every one of {', '.join(map(str, args.arms))}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = []
        for name, runs in groups.items():
            check_same_training_cases(runs)
            members = {f"{run.parent.name}/{run.name}": member_dice(run, args.study, out / name / run.parent.name, args.tta)
                       for run in runs}
            together = predict_and_score(runs, args.study, out / name / "ensemble", args.tta)
            rows.append((name, members, together, sum(training_minutes(r) for r in runs)))
            print(f"{name}: " + " · ".join(f"{m} {np.mean(list(d.values())):.3f}" for m, d in members.items())
                  + f" -> ensemble {np.mean(list(together.values())):.3f} ({rows[-1][3]:.0f} training min in all)", flush=True)
    report(rows)


def report(rows: list[tuple[str, dict[str, dict[str, float]], dict[str, float], float]]) -> None:
    """The ensemble against each member position (arm), seeds x cases, seed-aware."""
    cases = sorted(rows[0][2])
    print("\n| against | ensembles | member (mean) | ensemble (mean) | per ensemble (ensemble - member) | mean difference | 95% CI | p (t) |")
    print("|---|---|---|---|---|---|---|---|")
    for position in range(len(rows[0][1])):
        member = [list(members.values())[position] for _, members, _, _ in rows]
        grid = np.array([[together[c] - m[c] for c in cases] for (_, _, together, _), m in zip(rows, member)])
        stats = hierarchical_bootstrap(grid)
        name = list(rows[0][1])[position]
        label = name if len(rows) == 1 else name.split("/")[0]  # one ensemble: its members are seeds of one arm
        per = " · ".join(f"{ensemble} {d:+.3f}" for (ensemble, *_), d in zip(rows, stats.seed_differences))
        member_mean = np.mean([np.mean([m[c] for c in cases]) for m in member])
        ensemble_mean = np.mean([np.mean([t[c] for c in cases]) for _, _, t, _ in rows])
        print(f"| {label} | {len(rows)} | {member_mean:.3f} | {ensemble_mean:.3f} | {per} | {stats.mean_difference:+.3f} "
              f"| [{stats.ci_low:.3f}, {stats.ci_high:.3f}] | {stats.p_value:.4f} |")


if __name__ == "__main__":
    main()
