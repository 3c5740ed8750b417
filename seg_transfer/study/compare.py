"""``seg-transfer compare``: run a study (resumable), analyse the finished runs, write the report."""
from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from seg_transfer.atomic import write_atomic
from seg_transfer.study.analysis import analyse
from seg_transfer.study.config import StudyConfig, load_study_config
from seg_transfer.study.report import write_report, write_results
from seg_transfer.study.parallel import train_in_parallel
from seg_transfer.study.runner import StudyError, StudyProgress, check_equal_steps, run_study
from seg_transfer.study.transferability import agreement, rank_subsets, read_scores

log = logging.getLogger(__name__)


@dataclass
class CompareOutcome:
    progress: StudyProgress
    results: dict
    files: dict[str, Path]
    failed_runs: list[str] = field(default_factory=list)  # "arm/nNNN_seedS: reason (log file)" of parallel runs that failed


def compare(study_path: str | Path, output: str | Path, *, device: str = "auto", max_runs: int | None = None,
            shard: tuple[int, int] = (0, 1), processes: int = 1) -> CompareOutcome:
    """Run (or continue) the study in ``study_path`` into ``output`` and write its report from the finished runs.

    ``processes > 1`` trains the unfinished runs (at most ``max_runs``) in that many worker processes on this machine,
    each taking the next run of the plan when it is free (:mod:`seg_transfer.study.parallel`; logs in
    ``output/logs/process_K_of_N.log``), then reports what finished; runs that failed are listed in
    :attr:`CompareOutcome.failed_runs`, the others still count."""
    study = load_study_config(study_path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "study.json", json.dumps(study.model_dump(mode="json"), indent=2) + "\n")
    failed = []
    if processes > 1:
        if shard != (0, 1):
            raise StudyError("use either --shard or --processes, not both")
        failed = train_in_parallel(study, Path(study_path), output, processes, device=device, max_runs=max_runs)
        max_runs = 0  # the workers trained what they could; this process only collects and reports
    progress = run_study(study, output, device=device, max_runs=max_runs, shard=shard)
    if study.rank_encoders is not None and shard[0] == 0:
        rank_subsets(progress.specs, output, study.rank_encoders, device)
    check_equal_steps(progress.records, study.allow_unequal_budgets)
    peers = read_peer_rows(output, {spec.size for spec in progress.specs})
    results = {"study": study_summary(study, output, progress), **analyse(progress.records, study, peers),
               "transferability": agreement(progress.records, read_scores(output, progress.records))}
    # before any run has finished, results.json still holds the design (cases, subsets), so a peer
    # (benchmarks/nnunet_peer.py) can train on the study's cases first
    files = write_report(results, output) if progress.records else {"json": write_results(results, output)}
    return CompareOutcome(progress, results, files, failed)


PEER_FILE = "peer_nnunet.json"  # written by benchmarks/nnunet_peer.py on the same cases


def read_peer_rows(output: Path, sizes: Collection[int] | None = None) -> list[dict]:
    """Peer rows (nnU-Net trained on the study's cases, scored with our evaluator), if any were written;
    with ``sizes``, only rows at those training-set sizes (a peer file shared between studies of the same
    cases may hold sizes this study does not train)."""
    path = Path(output) / PEER_FILE
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    rows = rows.get("rows", []) if isinstance(rows, dict) else rows
    return [row for row in rows if sizes is None or row.get("size") in sizes]


def study_summary(study: StudyConfig, output: Path, progress: StudyProgress) -> dict:
    """The study's design as it ran: arms, sizes, seeds, the fixed cases and each size's training subsets."""
    cases, specs = progress.cases, progress.specs
    subsets = {f"n{s.size}_seed{s.seed}": s.splits["train"] for s in specs if s.arm == study.control}
    return {
        "name": study.name, "config": study.model_dump(mode="json"), "dataset": str(next(iter(cases.cases.values())).image.parent.parent),
        "arms": [arm.name for arm in study.arms], "control": study.control, "seeds": study.seeds,
        "sizes": sorted({s.size for s in specs}), "n_test": len(cases.test), "n_val": len(cases.val), "n_pool": len(cases.pool),
        "test_cases": cases.test, "val_cases": cases.val, "train_subsets": subsets,
        "finished_runs": len(progress.records), "total_runs": progress.total_runs, "target_dice": study.target_dice,
        "alpha": study.alpha, "steps": sorted({record.steps for record in progress.records}),
        "continued_arms": {arm.name: arm.weights_from for arm in study.arms if arm.weights_from},
    }
