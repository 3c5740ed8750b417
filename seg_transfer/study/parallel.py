"""``compare --processes N``: a study's unfinished runs trained by N spawned worker processes from one queue.

The parent hands out runs in plan order, one at a time, to whichever worker is free, so runs of unequal cost
(a 1920-step arm beside 960-step ones) keep every worker busy, and a study stopped early holds whole
(size, seed) groups of paired runs. A run that needs an earlier arm's run (``pseudo_labels_from``,
``weights_from``) is handed out only once that run is evaluated. Workers are spawned (CUDA-safe; each may start its own data-loading workers) and
log to ``OUTPUT/logs/process_K_of_N.log``.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue as queue_module
from collections.abc import Sequence
from pathlib import Path

from seg_transfer.study.config import StudyConfig, load_study_config
from seg_transfer.study.plan import RunSpec, plan_runs
from seg_transfer.study.runner import (
    complete_run,
    is_evaluated,
    unfinished_prerequisites,
    waits_for_earlier_runs,
    write_test_inputs,
)

log = logging.getLogger(__name__)


def ready_runs(specs: Sequence[RunSpec], waiting: Sequence[int]) -> list[int]:
    """The plan positions of ``waiting`` that may start now, in their order: every run but one that needs an earlier
    run (its teacher, the run it starts from) not evaluated yet (waiting, training, or failed)."""
    return [index for index in waiting if not waits_for_earlier_runs(specs[index])]


def train_in_parallel(study: StudyConfig, study_path: Path, output: Path, processes: int, *, device: str,
                      max_runs: int | None, poll_seconds: float = 30.0) -> list[str]:
    """Train the study's runs not yet evaluated (at most ``max_runs`` of them) in ``processes`` workers and wait
    for them; returns one line per run that failed or could not start (a run it needs failed). Ctrl-C stops every
    worker."""
    specs = plan_runs(study, output)[1]
    waiting = [index for index, spec in enumerate(specs) if not is_evaluated(spec)][:max_runs]
    if not waiting:
        return []
    logs = output / "logs"
    logs.mkdir(exist_ok=True)
    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    count = min(processes, len(waiting))
    log_files = [logs / f"process_{k}_of_{count}.log" for k in range(count)]
    workers = [context.Process(target=_worker, name=f"process {k}/{count}",
                               args=(k, str(study_path), str(output), device, str(log_files[k]), tasks, results))
               for k in range(count)]
    for worker in workers:
        worker.start()
    log.info("training %d unfinished run(s) of %s in %d parallel processes; logs in %s", len(waiting), study_path, count, logs)
    failed: list[str] = []
    try:
        _dispatch(specs, waiting, workers, log_files, tasks, results, failed, poll_seconds)
    finally:
        for worker in workers:
            tasks.put(None)
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return failed


def _dispatch(specs: Sequence[RunSpec], waiting: list[int], workers: list, log_files: list[Path], tasks, results,
              failed: list[str], poll_seconds: float) -> None:
    """Hand out ready runs while workers are free; collect (index, worker, error) results until nothing is left."""
    busy: dict[int, int] = {}  # plan position -> worker number, once that worker has taken it
    handed: set[int] = set()
    reported = None
    while waiting or handed:
        for index in ready_runs(specs, waiting)[:len(workers) - len(handed)]:
            waiting.remove(index)
            handed.add(index)
            tasks.put(index)
        if not handed:  # only runs that need a failed run are left
            failed.extend(f"{specs[i].key}: {', '.join(map(str, unfinished_prerequisites(specs[i])))} did not finish"
                          for i in waiting)
            return
        try:
            kind, index, worker, error = results.get(timeout=poll_seconds)
        except queue_module.Empty:
            _fail_runs_of_dead_workers(specs, workers, log_files, busy, handed, failed)
            if not any(worker.is_alive() for worker in workers):
                failed.extend(f"{specs[i].key}: not trained, every worker process ended (logs {log_files[0].parent})"
                              for i in [*sorted(handed), *waiting])
                return
        else:
            if kind == "start":
                busy[index] = worker
                continue
            handed.discard(index)
            busy.pop(index, None)
            if error is not None:
                failed.append(f"{specs[index].key}: {error} (log {log_files[worker]})")
        state = (sum(map(is_evaluated, specs)), len(handed))
        if state != reported:
            log.info("%d run(s) finished; %d training", *state)
            reported = state


def _fail_runs_of_dead_workers(specs, workers, log_files, busy: dict[int, int], handed: set[int], failed: list[str]) -> None:
    """A worker that died (killed, out of memory) takes its run with it: that run is failed, not waited for."""
    for index, worker in list(busy.items()):
        if not workers[worker].is_alive():
            failed.append(f"{specs[index].key}: its process ended (exit code {workers[worker].exitcode}; log {log_files[worker]})")
            busy.pop(index)
            handed.discard(index)


def _worker(number: int, study_path: str, output: str, device: str, log_file: str, tasks, results) -> None:
    """Body of worker ``number``: train, predict and evaluate each run it is handed (plan positions) until ``None``."""
    logging.basicConfig(filename=log_file, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    study = load_study_config(study_path)
    cases, specs = plan_runs(study, Path(output))
    test_inputs = write_test_inputs(cases, Path(output))
    while (index := tasks.get()) is not None:
        results.put(("start", index, number, None))
        log.info("run %d/%d: %s", index + 1, len(specs), specs[index].key)
        try:
            complete_run(specs[index], *test_inputs, study, device)
        except Exception as exc:  # the log holds the traceback; the parent reports the run in one line
            log.exception("run %s failed", specs[index].key)
            results.put(("done", index, number, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        else:
            results.put(("done", index, number, None))
