"""Batch prediction over many cases: independent cases, atomic outputs, ``--continue``, shards, summary.

Each case either succeeds (outputs renamed into place), is carried over (``--continue``, its label map exists
and the earlier summary says it was predicted: its row, timing included, is kept), is skipped (``--continue``
and a label map no summary row accounts for: outputs only ever appear complete), or fails with a one-line
reason while the others go on.
The summary is rewritten after every case, so an interrupted run still leaves an accurate one.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from seg_transfer.atomic import sweep_temp_files
from seg_transfer.errors import one_line
from seg_transfer.inference.cases import InputCase, discover_cases, shard
from seg_transfer.inference.predictor import (
    LoadedModel,
    PredictOptions,
    PredictSetupError,
    load_models,
    predict_ensemble_case,
    resolve_device,
)
from seg_transfer.inference.summary import (
    CaseResult,
    previous_results,
    summary_stem,
    write_summary,
)
from seg_transfer.inference.writers import (
    FORMATS,
    output_path,
    write_label_map,
    write_probabilities,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictRequest:
    """Everything ``seg-transfer predict`` was asked to do; several checkpoints predict as one ensemble."""

    checkpoints: tuple[str, ...]  # checkpoint files or run folders
    input: str
    out_dir: Path
    fmt: str = "nii.gz"
    device: str = "auto"
    options: PredictOptions = field(default_factory=PredictOptions)
    overwrite: bool = False
    resume: bool = False
    num_parts: int = 1
    part_id: int = 0


@dataclass
class PredictReport:
    """Per-case results, the summary files and their totals."""

    results: list[CaseResult]
    csv_path: Path
    json_path: Path
    wall_seconds: float

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def check_request(request: PredictRequest) -> None:
    """Reject contradictory options before any work (raises :class:`PredictSetupError`)."""
    if request.fmt not in FORMATS:
        raise PredictSetupError(f"--format {request.fmt!r}: expected one of {', '.join(FORMATS)}")
    if request.overwrite and request.resume:
        raise PredictSetupError("--overwrite and --continue exclude each other")
    if request.options.postprocess not in ("none", "largest-component"):
        raise PredictSetupError(f"--postprocess {request.options.postprocess!r}: expected none or largest-component")
    if request.options.roi_size is not None and request.options.roi_size < 1:
        raise PredictSetupError("--roi-size must be at least 1")
    if not request.checkpoints:
        raise PredictSetupError("--model: give at least one checkpoint or run folder")
    if request.options.batch_size < 1:
        raise PredictSetupError("--batch-size must be at least 1")
    if request.options.overlap is not None and not 0.0 <= request.options.overlap < 1.0:
        raise PredictSetupError("--overlap must be in [0, 1)")
    if request.fmt == "dicom-seg":
        from seg_transfer.inference.dicom_seg import require_highdicom

        require_highdicom()


def check_outputs_spare_inputs(cases: list[InputCase], request: PredictRequest) -> None:
    """PredictSetupError when the output folder is an input's folder or an output path resolves (symlinks
    included) to an input file: predictions must never replace the scans. No flag overrides this."""
    out_dir = Path(request.out_dir).resolve()
    inputs = {f.resolve() for c in cases for f in c.files}
    if any(f.parent == out_dir for f in inputs):
        raise PredictSetupError(f"{request.out_dir}: the output folder holds input scans; choose another -o "
                                "(predictions are never written next to the inputs they would replace)")
    for case in cases:
        target = output_path(request.out_dir, case.name, request.fmt)
        if target.resolve() in inputs:
            raise PredictSetupError(f"{target}: would replace the input {target.resolve()}; choose another -o")


def plan_cases(request: PredictRequest) -> list[InputCase]:
    """This shard's cases; refuses to overwrite existing outputs unless ``overwrite`` or ``resume``."""
    cases = shard(discover_cases(request.input), request.num_parts, request.part_id)
    check_outputs_spare_inputs(cases, request)
    if not (request.overwrite or request.resume):
        existing = [p for c in cases if (p := output_path(request.out_dir, c.name, request.fmt)).exists()]
        if existing:
            raise PredictSetupError(f"{len(existing)} output(s) already exist in {request.out_dir} (e.g. {existing[0].name}): "
                                    "pass --continue to skip finished cases or --overwrite to replace them")
    return cases


def log_tta_choice(checkpoint: str, validated: dict) -> None:
    """Say which test-time augmentation a model gets by default, and why (its validated record)."""
    if validated:
        log.info("%s: test-time augmentation %s (validation Dice %.3f plain, %.3f with it, at the end of training)",
                 checkpoint, "on" if validated["tta"] else "off", validated["val_dice"], validated["val_dice_tta"])


def run_predict(request: PredictRequest) -> PredictReport:
    """Predict every case of this shard into ``request.out_dir`` and write the summary."""
    check_request(request)
    cases = plan_cases(request)
    models = load_models(request.checkpoints, resolve_device(request.device))
    if request.options.tta is None:
        for checkpoint, loaded in zip(request.checkpoints, models):
            log_tta_choice(checkpoint, loaded.network.validated)
    names = list(models[0].labels.values())
    stem = summary_stem(request.num_parts, request.part_id)
    earlier = previous_results(request.out_dir / f"{stem}.json") if request.resume else {}
    if request.resume:
        for stale in sweep_temp_files(request.out_dir):
            log.info("removed %s (left by an interrupted write)", stale)
    extra = {"models": [{"checkpoint": str(checkpoint), "tta_flips": loaded.network.flips(request.options)}
                        for checkpoint, loaded in zip(request.checkpoints, models)],
             "format": request.fmt, "device": str(models[0].device),
             "labels": {str(k): v for k, v in models[0].labels.items()}, "part": [request.part_id, request.num_parts]}
    results: list[CaseResult] = []
    start = time.perf_counter()
    show = request.options.progress and sys.stderr.isatty()
    for case in tqdm(cases, desc="cases", unit="case", disable=not show):
        results.append(_process(models, case, request, earlier.get(case.name)))
        csv_path, json_path = write_summary(results, names, request.out_dir, stem, time.perf_counter() - start, extra)
    wall = time.perf_counter() - start
    csv_path, json_path = write_summary(results, names, request.out_dir, stem, wall, extra)
    return PredictReport(results, csv_path, json_path, wall)


def _process(models: list[LoadedModel], case: InputCase, request: PredictRequest, earlier: CaseResult | None) -> CaseResult:
    """Skip, fail or predict one case; never raises for a problem with the case itself."""
    target = output_path(request.out_dir, case.name, request.fmt)
    if request.resume and target.exists():
        if earlier is not None and earlier.status == "ok" and earlier.output == str(target):
            return replace(earlier, input=str(case.source), carried_over=True)
        return CaseResult(case.name, str(case.source), str(target), "skipped",
                          "output exists (--continue) but no earlier summary row says it was predicted")
    if case.problem:
        return CaseResult(case.name, str(case.source), "", "failed", case.problem)
    started = time.perf_counter()
    try:
        voxels, input_voxels = predict_and_write(models, case, request, target)
    except Exception as exc:
        log.warning("%s failed: %s", case.name, one_line(exc, root_cause=True, limit=300))
        log.debug("%s traceback", case.name, exc_info=True)
        return CaseResult(case.name, str(case.source), "", "failed", one_line(exc, root_cause=True, limit=300), time.perf_counter() - started)
    return CaseResult(case.name, str(case.source), str(target), "ok", "", time.perf_counter() - started, voxels, input_voxels)


def predict_and_write(models: list[LoadedModel], case: InputCase, request: PredictRequest, target: Path) -> tuple[dict[str, int], int]:
    """Predict ``case`` with one model or an ensemble and write its outputs (probabilities first, the label map
    last, each atomically).

    Returns voxels per class name and the number of input voxels.
    """
    if request.fmt == "dicom-seg" and not case.is_dicom:
        raise ValueError("--format dicom-seg needs a DICOM series input")
    prediction = predict_ensemble_case(models, case, request.options)
    labels = models[0].labels
    if prediction.probabilities is not None:
        write_probabilities(prediction.probabilities, prediction.geometry,
                            output_path(request.out_dir, case.name, request.fmt, kind="probabilities"))
    if request.fmt == "dicom-seg":
        from seg_transfer.inference.dicom_seg import write_dicom_seg

        write_dicom_seg(prediction.labels, case, labels, target)
    else:
        write_label_map(prediction.labels, prediction.geometry, target)
    counts = np.bincount(prediction.labels.ravel(), minlength=len(labels))
    return {name: int(counts[k]) for k, name in labels.items()}, int(prediction.labels.size)
