"""Carry out a study: train every run (resumably), predict the fixed test cases, evaluate them.

Every run is an ordinary ``train`` run; the study only writes its ``splits.json`` first, so arms share
their training subsets, validation cases (model selection) and test cases (never seen in training or
selection). A finished step is never repeated: a killed study continues where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg_transfer.atomic import write_atomic
from seg_transfer.data.io import volume_suffix
from seg_transfer.data.pipeline import pseudo_labelled_scans
from seg_transfer.data.splits import load_splits, save_splits
from seg_transfer.errors import UserError
from seg_transfer.evaluation.evaluate import JSON_NAME, evaluate_folders
from seg_transfer.inference.batch import PredictRequest, run_predict
from seg_transfer.inference.predictor import PredictOptions
from seg_transfer.study.config import StudyConfig
from seg_transfer.study.plan import RunSpec, StudyCases, plan_runs
from seg_transfer.training.metrics_log import MetricsLog
from seg_transfer.training.reuse import finished_result, train_or_reuse

log = logging.getLogger(__name__)


class StudyError(UserError, RuntimeError):
    """The study cannot go on as configured (one line for the user)."""


def check_equal_steps(records: list[RunRecord], allow_unequal: bool = False) -> dict[str, int]:
    """{run key: optimiser steps}; StudyError when the finished runs took different numbers of steps
    (a comparison at unequal budgets is not valid) unless ``allow_unequal`` (the report then shows them)."""
    steps = {f"{r.arm}/n{r.size:03d}_seed{r.seed}": r.steps for r in records}
    if len(set(steps.values())) > 1 and not allow_unequal:
        listing = ", ".join(f"{k}: {v}" for k, v in sorted(steps.items(), key=lambda kv: kv[1])[:4])
        raise StudyError(f"runs took different numbers of optimiser steps ({min(steps.values())} to "
                         f"{max(steps.values())}; {listing}, ...); the study refuses to compare them "
                         "(set allow_unequal_budgets: true to report anyway)")
    return steps


@dataclass
class RunRecord:
    """What one finished run contributes to the analysis."""

    arm: str
    size: int
    seed: int
    run_dir: Path
    best_val_dice: float
    epochs: int
    seconds: float
    test_dice: dict[str, dict[str, float]]  # case -> class name -> Dice
    curve: list[dict[str, float]]  # per validated epoch: epoch, elapsed, val_dice
    steps: int = 0  # optimiser steps the run took
    collapsed: list[str] = field(default_factory=list)  # classes below the collapse threshold at the best epoch
    collapse_warnings: int = 0  # validations that flagged a possible collapse
    stopped: str | None = None
    environment: dict[str, Any] | None = None  # where it trained (None: its summary predates the environment field)

    def case_mean_dice(self) -> dict[str, float]:
        """Mean Dice over the classes, per test case."""
        return {case: sum(values.values()) / len(values) for case, values in self.test_dice.items()}


@dataclass
class StudyProgress:
    """The study's plan (fixed cases, every run) and the runs of it that are finished."""

    cases: StudyCases
    specs: list[RunSpec]
    records: list[RunRecord]

    @property
    def total_runs(self) -> int:
        return len(self.specs)

    @property
    def complete(self) -> bool:
        return len(self.records) == self.total_runs


def run_study(study: StudyConfig, output: Path, *, device: str = "auto", max_runs: int | None = None,
              shard: tuple[int, int] = (0, 1)) -> StudyProgress:
    """Train, predict and evaluate every run not yet finished; ``max_runs`` caps how many new runs train now
    (a study can be spread over several time-limited jobs). ``shard=(i, n)``: this process trains only
    runs ``i, i+n, i+2n, ...`` of the plan, so ``n`` processes (or jobs) share a study folder. Runs of other
    processes count once their test evaluation is written. Returns the finished runs."""
    output = Path(output)
    cases, specs = plan_runs(study, output)
    test_images, test_labels, labels_file = write_test_inputs(cases, output)
    mine, shards = shard
    own = [i for i in range(len(specs)) if i % shards == mine]
    finished, trained = {}, 0
    for index in own:
        spec = specs[index]
        is_new = finished_result(spec.run_dir) is None
        if is_new and max_runs is not None and trained >= max_runs:
            continue  # past --max-runs: later runs that are already finished still count
        if waits_for_earlier_runs(spec) and not is_evaluated(spec):
            log.warning("run %d/%d: %s waits for %s, not finished yet (another shard's?)",
                        index + 1, len(specs), spec.key, ", ".join(map(str, unfinished_prerequisites(spec))))
            continue
        log.info("run %d/%d: %s%s", index + 1, len(specs), spec.key, "" if is_new else " (finished, reused)")
        finished[index] = complete_run(spec, test_images, test_labels, labels_file, study, device)
        trained += is_new
    # other processes' runs are looked at only now, so one that finished while this process trained counts
    records = [finished[i] if i in finished else complete_run(spec, test_images, test_labels, labels_file, study, device)
               for i, spec in enumerate(specs) if i in finished or (i not in own and is_evaluated(spec))]
    if max_runs is not None and len(records) < len(specs):
        log.info("%d new run(s) trained (--max-runs %d); %d of %d runs finished", trained, max_runs, len(records), len(specs))
    return StudyProgress(cases, specs, records)


def is_evaluated(spec: RunSpec) -> bool:
    """Whether the run is finished for the study: trained, and its test cases predicted and evaluated."""
    return is_evaluated_dir(spec.run_dir)


def is_evaluated_dir(run_dir: Path) -> bool:
    return (run_dir / "test_evaluation" / JSON_NAME).is_file()


def unfinished_prerequisites(spec: RunSpec) -> list[Path]:
    """The runs ``spec`` needs (its teacher, the run it starts from) that are not evaluated yet."""
    return [run_dir for run_dir in spec.prerequisites if not is_evaluated_dir(run_dir)]


def waits_for_earlier_runs(spec: RunSpec) -> bool:
    """Whether ``spec`` cannot train yet: a run it needs (its teacher, the run it starts from) is not evaluated."""
    return bool(unfinished_prerequisites(spec))


def complete_run(spec: RunSpec, test_images: Path, test_labels: Path, labels_file: Path, study: StudyConfig, device: str) -> RunRecord:
    """Train (or reuse) one run, then predict and evaluate the test cases with its best checkpoint; a
    self-training run first has its teacher run label the unlabelled scans."""
    write_run_splits(spec)
    if spec.teacher_dir is not None and finished_result(spec.run_dir) is None:  # a trained student needs no labels
        label_unlabelled_scans(spec, study.predict_batch_size, device)
    result = train_or_reuse(spec.config, spec.run_dir, check_config=True)
    evaluation = spec.run_dir / "test_evaluation" / JSON_NAME
    if not is_evaluated(spec):
        predictions = predict_with_run(spec.run_dir, test_images, spec.run_dir / "test_predictions",
                                       study.predict_batch_size, device, "test case")
        evaluate_folders(predictions, test_labels, evaluation.parent, tolerance_mm=study.tolerance_mm, labels=labels_file)
    return RunRecord(spec.arm, spec.size, spec.seed, spec.run_dir, result.best_dice, result.epochs, result.seconds,
                     read_test_dice(evaluation), read_curve(spec.run_dir), result.steps, result.collapsed,
                     len(result.collapse_warnings), result.stopped, result.environment)


def write_run_splits(spec: RunSpec) -> None:
    """Put the study's splits into the run folder before training (the trainer uses them as they are);
    StudyError if the folder already holds different splits."""
    path = spec.run_dir / "splits.json"
    if path.is_file():
        if load_splits(path) != spec.splits:
            raise StudyError(f"{path}: holds other splits than this study assigns to {spec.key}; use a new --output")
        return
    save_splits(spec.splits, path)


def write_test_inputs(cases: StudyCases, output: Path) -> tuple[Path, Path, Path]:
    """(list file of test images, folder of links to test labels, JSON label map) under ``output/test_cases``."""
    folder = output / "test_cases"
    labels_dir = folder / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    images = folder / "images.txt"
    images.write_text("".join(f"{cases.cases[name].image}\n" for name in cases.test))
    for name in cases.test:
        label = Path(cases.cases[name].label)
        link = labels_dir / f"{name}{volume_suffix(label)}"
        if not link.exists():
            try:
                os.symlink(label.resolve(), link)
            except FileExistsError:  # another shard of the study made it meanwhile
                pass
    labels_file = folder / "labels.json"
    labels_file.write_text(json.dumps({str(k): v for k, v in cases.labels.items()}, indent=2))
    return images, labels_dir, labels_file


def predict_with_run(run_dir: Path, images: Path, out: Path, batch_size: int, device: str, what: str,
                     tta: bool = False) -> Path:
    """Label maps of the images listed in ``images`` from the run's best checkpoint into ``out`` (cases already
    there are kept: a killed study continues), plain or with test-time augmentation (``tta``); StudyError naming a
    ``what`` that failed."""
    options = PredictOptions(batch_size=batch_size, tta=tta, progress=False)
    report = run_predict(PredictRequest((str(run_dir),), str(images), out, device=device, options=options, resume=True))
    if report.failed:
        first = report.failed[0]
        raise StudyError(f"{run_dir}: prediction failed for {len(report.failed)} {what}(s), e.g. {first.case}: {first.reason}")
    return out


def label_unlabelled_scans(spec: RunSpec, batch_size: int, device: str) -> Path:
    """The teacher run's label maps of the unlabelled scans, where ``spec.config.data.pseudo_labelled`` reads
    them (predicted once; every self-training run of that teacher shares them)."""
    pseudo = spec.config.data.pseudo_labelled
    scans = pseudo_labelled_scans(spec.config.data)
    listing = spec.teacher_dir / "unlabelled_images.txt"
    write_atomic(listing, "".join(f"{case.image}\n" for case in scans))
    log.info("%s: its teacher %s labels %d unlabelled scans%s", spec.key, spec.teacher_dir, len(scans),
             " with test-time augmentation" if spec.teacher_tta else "")
    return predict_with_run(spec.teacher_dir, listing, Path(pseudo.labels_dir), batch_size, device, "unlabelled scan",
                            tta=spec.teacher_tta)


def read_test_dice(evaluation_json: Path) -> dict[str, dict[str, float]]:
    """{case: {class name: Dice}} from an ``evaluate`` metrics.json."""
    report = json.loads(evaluation_json.read_text())
    return {case["case"]: {name: values["dice"] for name, values in case["classes"].items()} for case in report["cases"]}


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    """Validation Dice of each validated epoch with its epoch number and cumulative seconds."""
    records = MetricsLog(run_dir, tensorboard=False).records()
    return [{"epoch": r["epoch"], "elapsed": r["elapsed"], "val_dice": r["val_dice"]} for r in records if "val_dice" in r]

