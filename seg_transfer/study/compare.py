"""``seg-transfer compare``: run a study (resumable), analyse the finished runs, write the report."""
from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from seg_transfer.atomic import write_atomic
from seg_transfer.study.analysis import analyse
from seg_transfer.study.config import StudyConfig, load_study_config
from seg_transfer.study.report import write_report, write_results
from seg_transfer.study.plan import RunSpec, plan_runs
from seg_transfer.study.runner import (
    StudyError,
    StudyProgress,
    check_equal_steps,
    is_evaluated,
    run_study,
    spread_pending,
)
from seg_transfer.study.transferability import agreement, rank_subsets, read_scores

log = logging.getLogger(__name__)


@dataclass
class CompareOutcome:
    progress: StudyProgress
    results: dict
    files: dict[str, Path]
    failed_shards: list[str] = field(default_factory=list)  # "shard I/N (exit code; log file)" of parallel shards that failed


def compare(study_path: str | Path, output: str | Path, *, device: str = "auto", max_runs: int | None = None,
            shard: tuple[int, int] = (0, 1), processes: int = 1) -> CompareOutcome:
    """Run (or continue) the study in ``study_path`` into ``output`` and write its report from the finished runs.

    ``processes > 1`` trains the unfinished runs in that many parallel processes on this machine, dealt evenly
    (each logs to ``output/logs/shard_I_of_N.log``; ``max_runs`` applies to each), then reports what finished; shards that
    failed are listed in :attr:`CompareOutcome.failed_shards`, the other shards' runs still count."""
    study = load_study_config(study_path)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "study.json", json.dumps(study.model_dump(mode="json"), indent=2) + "\n")
    failed = []
    if processes > 1:
        if shard != (0, 1):
            raise StudyError("use either --shard or --processes, not both")
        failed = run_shards_in_parallel(study, Path(study_path), output, processes, device=device, max_runs=max_runs)
        max_runs = 0  # the shards trained what they could; this process only collects and reports
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


def run_shards_in_parallel(study: StudyConfig, study_path: Path, output: Path, processes: int, *, device: str,
                           max_runs: int | None) -> list[str]:
    """Train the study's unfinished runs in ``N`` spawned processes (CUDA-safe; each may start its own
    data-loading workers), dealt evenly with a mix of arms each (:func:`spread_pending`), and wait for all; returns the failed
    ones, described. Ctrl-C stops every shard."""
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    specs = plan_runs(study, output)[1]
    shares = spread_pending(specs, processes)
    context = multiprocessing.get_context("spawn")
    workers = []
    for index, runs in enumerate(shares):
        if not runs:
            continue
        log_file = logs / f"shard_{index}_of_{processes}.log"
        worker = context.Process(target=_train_shard, name=f"shard {index}/{processes}",
                                 args=(str(study_path), str(output), device, max_runs, runs, str(log_file)))
        worker.start()
        workers.append((worker, log_file))
    log.info("training %d unfinished run(s) of %s in %d parallel processes; logs in %s",
             sum(map(len, shares)), study_path, len(workers), logs)
    try:
        _wait_reporting_progress([worker for worker, _ in workers], specs)
    finally:
        for worker, _ in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return [f"{worker.name} (exit code {worker.exitcode}; log {log_file})" for worker, log_file in workers if worker.exitcode != 0]


def _wait_reporting_progress(workers: list, specs: Sequence[RunSpec], poll_seconds: float = 30.0) -> None:
    """Wait for every worker; log each time the count of the plan's finished runs (:func:`is_evaluated`) or of
    the live workers changes, so the last line always shows every shard done."""
    reported, running = None, len(workers)
    while running:
        for worker in workers:
            worker.join(timeout=poll_seconds / len(workers))
        running = sum(worker.is_alive() for worker in workers)
        state = (sum(map(is_evaluated, specs)), running)
        if state != reported:
            log.info("%d run(s) finished; %d shard(s) still training", *state)
            reported = state


def _train_shard(study_path: str, output: str, device: str, max_runs: int | None, runs: list[int], log_file: str) -> None:
    """Body of one parallel shard: train its runs (plan positions) and their test evaluations, logging to ``log_file``."""
    logging.basicConfig(filename=log_file, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run_study(load_study_config(study_path), Path(output), device=device, max_runs=max_runs, runs=set(runs))
    except Exception:  # the log holds the traceback; the parent reports the shard in one line
        logging.getLogger(__name__).exception("shard with runs %s failed", [r + 1 for r in runs])
        raise SystemExit(1) from None


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
        "alpha": study.alpha,
    }
