"""Study statistics: learning curves, seed-aware paired comparisons, negative transfer, time to target.

A run's score on a test case is its mean Dice over classes. An arm at one training-set size is a
seeds x cases grid of such scores; the control's grid shares both axes (seed ``s`` of every arm trains
on the same subset; every run is scored on the same test cases). Comparisons use the grid of paired
differences with a two-level bootstrap (seeds, then cases), so seeds are the unit of training noise
and a case seen under three seeds is not three independent samples.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seg_transfer.environment import environment_differences, host_speed_spread
from seg_transfer.evaluation.stats import hierarchical_bootstrap
from seg_transfer.study.config import StudyConfig
from seg_transfer.study.runner import RunRecord

NEGATIVE, POSITIVE, NEUTRAL = "worse than control", "better than control", "no significant difference"
ONE_SEED = "one seed: no verdict (seed noise unmeasured)"
AHEAD, BEHIND = "ahead of the peer", "behind the peer"


def select(records: Sequence[RunRecord], arm: str, size: int) -> list[RunRecord]:
    return sorted((r for r in records if r.arm == arm and r.size == size), key=lambda r: r.seed)


def score_grid(records: Sequence[RunRecord], seeds: Sequence[int], cases: Sequence[str]) -> np.ndarray:
    """``(len(seeds), len(cases))`` class-mean Dice of the run of each seed on each case (NaN if missing)."""
    by_seed = {r.seed: r.case_mean_dice() for r in records}
    return np.array([[by_seed.get(s, {}).get(c, np.nan) for c in cases] for s in seeds], dtype=float)


def shared_axes(*groups: Sequence[RunRecord]) -> tuple[list[int], list[str]]:
    """Seeds present in every group, and test cases scored by every run of them."""
    seeds = sorted(set.intersection(*({r.seed for r in g} for g in groups)))
    runs = [r for g in groups for r in g if r.seed in seeds]
    cases = sorted(set.intersection(*(set(r.test_dice) for r in runs))) if runs else []
    return seeds, cases


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


def run_mean(record: RunRecord) -> float:
    return float(np.mean(list(record.case_mean_dice().values())))


def learning_curves(records: Sequence[RunRecord], confidence: float = 0.95) -> list[dict[str, Any]]:
    """Per arm and size: test Dice (mean over seeds and cases) with a two-level bootstrap CI, the per-seed
    means and their SD, and the runs that collapsed."""
    rows = []
    for arm, size, runs in groups(records):
        seeds, cases = shared_axes(runs)
        ci = hierarchical_bootstrap(score_grid(runs, seeds, cases), confidence=confidence)
        seed_means = [run_mean(r) for r in runs]
        rows.append({"arm": arm, "size": size, "n_seeds": len(runs), "test_dice": ci.mean_difference, "ci_low": ci.ci_low,
                     "ci_high": ci.ci_high, "n_cases": ci.n_cases, "seeds": [r.seed for r in runs], "seed_means": seed_means,
                     "seed_sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
                     "seed_min": float(min(seed_means)),
                     "val_dice": float(np.mean([r.best_val_dice for r in runs])),
                     "train_seconds": float(np.mean([r.seconds for r in runs])),
                     "steps": sorted({r.steps for r in runs}),
                     "collapsed_seeds": [r.seed for r in runs if r.collapsed],
                     "warned_seeds": [r.seed for r in runs if r.collapse_warnings and not r.collapsed]})
    return rows


def verdict(comparison: dict[str, Any], alpha: float) -> str:
    """Better or worse only with at least two seeds, the seed-aware p < alpha, the CI excluding 0 and every
    seed agreeing in sign; one seed gets no verdict."""
    p, low, high, sign = comparison["p_value"], comparison["ci_low"], comparison["ci_high"], comparison["consistent_sign"]
    if comparison.get("n_seeds", 2) < 2:
        return ONE_SEED
    if p is None or not np.isfinite(p) or p >= alpha:
        return NEUTRAL
    if np.isfinite(high) and high < 0 and sign < 0:
        return NEGATIVE
    if np.isfinite(low) and low > 0 and sign > 0:
        return POSITIVE
    return NEUTRAL


def _pairs(arms: Sequence[str], control: str | Mapping[str, str] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(arm, control) pairs in the order of ``arms`` (records' order), whichever form ``control`` takes."""
    if isinstance(control, str):
        return [(arm, control) for arm in arms if arm != control]
    pairs = list(control.items()) if isinstance(control, Mapping) else [tuple(pair) for pair in control]
    return sorted(pairs, key=lambda pair: arms.index(pair[0]) if pair[0] in arms else len(arms))


def paired_comparisons(records: Sequence[RunRecord], control: str | Mapping[str, str] | Sequence[tuple[str, str]],
                       alpha: float, confidence: float = 0.95, scratch_arms: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Each arm against its control at each size on their shared seeds and test cases: mean difference
    (arm - control), per-seed differences, two-level bootstrap CI and p, verdict, negative-transfer flag.
    ``control``: one control arm for all others, ``{arm: its control}``, or (arm, control) pairs, where an arm
    may appear more than once (arms not named are not compared). Negative transfer is a worse verdict against
    a from-scratch arm (``scratch_arms``; None: every control counts as one); worse than another pretrained
    arm is only worse."""
    arms, sizes = arms_and_sizes(records)
    rows = []
    for arm, its_control in _pairs(arms, control):
        for size in sizes:
            mine, theirs = select(records, arm, size), select(records, its_control, size)
            if not mine or not theirs:
                continue
            seeds, cases = shared_axes(mine, theirs)
            if not seeds or not cases:
                continue
            grid = score_grid(mine, seeds, cases) - score_grid(theirs, seeds, cases)
            result = hierarchical_bootstrap(grid, confidence=confidence).as_dict()
            row = {"arm": arm, "control": its_control, "size": size, "seeds": seeds, "n": result["n_cases"], **result}
            row["verdict"] = verdict(row, alpha)
            row["negative_transfer"] = row["verdict"] == NEGATIVE and (scratch_arms is None or its_control in scratch_arms)
            rows.append(row)
    return rows


def peer_name(peer: Mapping[str, Any]) -> str:
    """The peer method (``nnU-Net v2 3d_fullres``)."""
    return f"{peer.get('peer', 'peer')} {peer.get('configuration', '')}".strip()


def peer_schedule(peer: Mapping[str, Any]) -> str:
    """The peer's schedule (``5 ep``, ``+ TTA`` when it mirrored)."""
    return f"{peer['epochs']} ep" + (" + TTA" if peer.get("tta") else "")


def peer_label(peer: Mapping[str, Any]) -> str:
    """Name of a peer schedule (``nnU-Net v2 3d_fullres 5 ep``)."""
    return f"{peer_name(peer)} {peer_schedule(peer)}"


def peer_records(peers: Sequence[Mapping[str, Any]]) -> list[RunRecord]:
    """Peer rows that carry per-case Dice, as runs of one pseudo-arm per schedule (:func:`peer_label`); a peer's
    seed is the study subset it trained on, so it pairs with our runs of that seed."""
    return [RunRecord(arm=peer_label(p), size=int(p["size"]), seed=int(p["seed"]), run_dir=Path(str(p.get("model", ""))),
                      best_val_dice=float("nan"), epochs=int(p["epochs"]), seconds=float(p["train_seconds"]),
                      test_dice=p["test_dice"], curve=[]) for p in peers if p.get("test_dice")]


def peer_comparisons(records: Sequence[RunRecord], peers: Sequence[Mapping[str, Any]], alpha: float,
                     confidence: float = 0.95, needs: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Every arm against every peer schedule at each size, paired on the seeds both have (same training subsets)
    and the shared test cases, with the same two-level bootstrap and t-test as :func:`paired_comparisons`; the
    verdict says ahead of / behind the peer, and each row carries both sides' mean training seconds on those seeds.
    An arm's seconds include the runs it needed first (``needs``, as in :func:`time_to_target`: a student is timed
    with its teacher), named in ``arm_seconds_include``."""
    theirs = peer_records(peers)
    both = [*records, *theirs]
    earlier = earlier_by_run(records, needs or {})
    pairs = [(arm, label) for arm in arms_and_sizes(records)[0] for label in dict.fromkeys(r.arm for r in theirs)]
    rows = paired_comparisons(both, pairs, alpha, confidence)
    for row in rows:
        row["verdict"] = {POSITIVE: AHEAD, NEGATIVE: BEHIND}.get(row["verdict"], row["verdict"])
        row["negative_transfer"] = False
        ours = [r for r in select(records, row["arm"], row["size"]) if r.seed in row["seeds"]]
        peer_runs = [r for r in select(theirs, row["control"], row["size"]) if r.seed in row["seeds"]]
        row["arm_seconds"] = float(np.mean([r.seconds + seconds_before(r, earlier) for r in ours]))
        row["arm_seconds_include"] = arms_before(ours, earlier)
        row["peer_seconds"] = float(np.mean([r.seconds for r in peer_runs]))
    return rows


def first_reaching(curve: Sequence[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first validated epoch whose Dice reaches ``target`` (its epoch and elapsed seconds), else None."""
    return next((point for point in curve if point["val_dice"] >= target), None)


RunKey = tuple[str, int, int]  # (arm, size, seed)


def run_key(record: RunRecord) -> RunKey:
    return record.arm, record.size, record.seed


def earlier_runs(record: RunRecord, by_key: Mapping[RunKey, RunRecord],
                 needs: Mapping[str, Sequence[str]]) -> list[RunRecord]:
    """Every finished run ``record`` needed before it could train (its teacher, the run it continues, theirs in
    turn; same size and seed), each once."""
    found: dict[str, RunRecord] = {}
    todo = list(needs.get(record.arm, ()))
    while todo:
        arm = todo.pop()
        run = by_key.get((arm, record.size, record.seed))
        if arm not in found and run is not None:
            found[arm] = run
            todo += needs.get(arm, ())
    return list(found.values())


def earlier_by_run(records: Sequence[RunRecord], needs: Mapping[str, Sequence[str]]) -> dict[RunKey, list[RunRecord]]:
    """:func:`earlier_runs` of every run, keyed by :func:`run_key`."""
    by_key = {run_key(r): r for r in records}
    return {key: earlier_runs(r, by_key, needs) for key, r in by_key.items()}


def seconds_before(record: RunRecord, earlier: Mapping[RunKey, Sequence[RunRecord]]) -> float:
    """Training seconds of the runs ``record`` needed first (``earlier``: :func:`earlier_by_run`)."""
    return sum(e.seconds for e in earlier[run_key(record)])


def arms_before(runs: Sequence[RunRecord], earlier: Mapping[RunKey, Sequence[RunRecord]]) -> list[str]:
    """The arms whose runs ``runs`` needed first, each once, in order."""
    return list(dict.fromkeys(e.arm for r in runs for e in earlier[run_key(r)]))


def time_to_target(records: Sequence[RunRecord], target: float,
                   needs: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Per arm and size: how many seeds reached the target validation Dice, their mean seconds and own epochs.

    ``needs`` maps an arm to the arms whose run of the same size and seed it needs first (``weights_from``,
    ``pseudo_labels_from``): a run's seconds to target then include those runs' whole training time, so an arm
    that continues a finished network is not timed as if it had started from nothing."""
    earlier = earlier_by_run(records, needs or {})
    rows = []
    for arm, size, runs in groups(records):
        reached = [(point, seconds_before(r, earlier)) for r in runs
                   if (point := first_reaching(r.curve, target)) is not None]
        rows.append({"arm": arm, "size": size, "target": target, "reached": len(reached), "runs": len(runs),
                     "seconds": float(np.mean([p["elapsed"] + before for p, before in reached])) if reached else None,
                     "epochs": float(np.mean([p["epoch"] for p, _ in reached])) if reached else None,
                     "includes": arms_before(runs, earlier)})
    return rows


def analyse(records: Sequence[RunRecord], study: StudyConfig, peers: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data; ``peers`` (nnU-Net rows) count in the host speed check.
    A run's ``seconds_with_earlier`` adds the training seconds of the runs it needed first (:func:`earlier_runs`)."""
    needs = study.prerequisite_arms()
    earlier = earlier_by_run(records, needs)
    return {
        "learning_curves": learning_curves(records),
        "comparisons": paired_comparisons(records, study.comparisons(), study.alpha,
                                          scratch_arms={arm.name for arm in study.arms if arm.scratch_control}),
        "time_to_target": time_to_target(records, study.target_dice, needs),
        "environment_differences": environment_differences([r.environment for r in records]),
        "runs_without_environment": sum(r.environment is None for r in records),
        "host_speed": host_speed_spread([r.environment for r in records] + [peer.get("environment") for peer in peers]),
        "peers": [{**peer, "label": peer_label(peer), "name": peer_name(peer), "schedule": peer_schedule(peer)} for peer in peers],
        "peer_comparisons": peer_comparisons(records, peers, study.alpha, needs=needs),
        "runs": [{"arm": r.arm, "size": r.size, "seed": r.seed, "run_dir": str(r.run_dir), "best_val_dice": r.best_val_dice,
                  "epochs": r.epochs, "steps": r.steps, "seconds": r.seconds,
                  "seconds_with_earlier": r.seconds + seconds_before(r, earlier),
                  "test_dice_mean": run_mean(r),
                  "collapsed": r.collapsed, "collapse_warnings": r.collapse_warnings, "stopped": r.stopped,
                  "environment": r.environment, "curve": r.curve} for r in records],
    }
