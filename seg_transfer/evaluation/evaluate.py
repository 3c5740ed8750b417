"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Cases are matched by file name without its volume suffix (``strip_volume_suffix``), so
``case_001.nii.gz`` in one folder matches ``case_001.nrrd`` in the other. Every reference
needs a prediction; predictions without a reference are reported and ignored. The pair must
share a grid (shape, spacing, origin, direction within ``GEOMETRY_ATOL``). Outputs, written
atomically: ``metrics.csv`` (one row per case and class), ``metrics.json`` (inputs, policy,
per-class aggregates, per-case values) and ``summary.md``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from seg_transfer.atomic import json_safe, write_atomic
from seg_transfer.data.io import (
    SUPPORTED_SUFFIXES,
    is_volume_file,
    read_volume,
    strip_volume_suffix,
)
from seg_transfer.errors import UserError
from seg_transfer.evaluation.case_metrics import (
    BOTH_EMPTY,
    BOTH_PRESENT,
    EMPTY_MASK_POLICY,
    EXCLUDED_STATUSES,
    METRIC_DEFINITIONS,
    METRICS,
    PRED_EMPTY,
    REF_EMPTY,
    ClassMetrics,
    both_empty_metrics,
    case_metrics,
)
from seg_transfer.evaluation.stats import bootstrap_ci

log = logging.getLogger(__name__)

FORMAT = "seg_transfer/evaluation/1"
DEFAULT_TOLERANCE_MM = 2.0
GEOMETRY_ATOL = 1e-3  # mm for spacing and origin; also the tolerance on direction cosines
CSV_NAME, JSON_NAME, MARKDOWN_NAME = "metrics.csv", "metrics.json", "summary.md"
CSV_FIELDS = ("case", "class_index", "class_name", "status", *METRICS, "ref_volume_ml", "pred_volume_ml")


class EvaluationError(UserError, ValueError):
    """Inputs that cannot be evaluated (missing prediction, geometry mismatch, bad labels...): one-line message."""


@dataclass(frozen=True)
class CasePair:
    """A case name and its prediction and reference files."""

    name: str
    pred: Path
    ref: Path


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a volume: shape, spacing (mm), origin (mm) and direction cosines (RAS)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # 3x3, row-major

    @classmethod
    def from_affine(cls, shape: Sequence[int], affine: np.ndarray) -> Geometry:
        """Geometry of a volume of ``shape`` with the 4x4 voxel-to-world ``affine``."""
        linear = np.asarray(affine, dtype=float)[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        direction = linear / np.where(spacing > 0, spacing, 1.0)
        return cls(tuple(int(s) for s in shape), tuple(spacing.tolist()),
                   tuple(np.asarray(affine, dtype=float)[:3, 3].tolist()), tuple(direction.ravel().tolist()))


@dataclass
class CaseResult:
    """Metrics of one case: {class index: ClassMetrics}, with the grid they were computed on."""

    name: str
    geometry: Geometry
    metrics: dict[int, ClassMetrics]


@dataclass
class EvaluationResult:
    """What ``evaluate_folders`` computed and where it wrote it."""

    classes: dict[int, str]
    cases: list[CaseResult]
    aggregates: list[dict[str, Any]]
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    #: (case, one-line reason) of the cases ``skip_bad_cases`` left out
    failed: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs


def volume_files(folder: str | Path, role: str) -> dict[str, Path]:
    """{case name: path} of the volume files directly in ``folder``; EvaluationError if the folder is
    missing, has no volumes, or holds two files with the same case name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{role} folder {folder} not found")
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_volume_file(p)):
        name = strip_volume_suffix(path)
        if name in found:
            raise EvaluationError(f"case {name}: two {role} files ({found[name].name}, {path.name}) in {folder}")
        found[name] = path
    if not found:
        raise EvaluationError(f"{role} folder {folder} has no volumes ({', '.join(SUPPORTED_SUFFIXES)})")
    return found


def match_cases(pred_dir: str | Path, label_dir: str | Path) -> tuple[list[CasePair], list[str]]:
    """(pairs sorted by case name, names of predictions without a reference).

    EvaluationError naming the case(s) when a reference has no prediction.
    """
    preds, refs = volume_files(pred_dir, "prediction"), volume_files(label_dir, "reference")
    missing = sorted(set(refs) - set(preds))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise EvaluationError(f"no prediction in {pred_dir} for case(s) {shown}")
    pairs = [CasePair(name, preds[name], refs[name]) for name in sorted(refs)]
    return pairs, sorted(set(preds) - set(refs))


def load_class_names(path: str | Path) -> dict[int, str]:
    """{class index: name} of the foreground classes in a dataset.json ("labels" as MSD {"1": "x"} or
    nnU-Net v2 {"x": 1}) or in a bare JSON label map of either form."""
    from seg_transfer.data.cases import DatasetError, _msd_label_map

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{path}: cannot read labels JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a JSON object")
    try:
        label_map = _msd_label_map(data if "labels" in data else {"labels": data}, path)
    except DatasetError as exc:
        raise EvaluationError(str(exc)) from None
    classes = {k: v for k, v in label_map.items() if k > 0}
    if not classes:
        raise EvaluationError(f"{path}: no foreground classes (labels > 0)")
    if len(set(classes.values())) != len(classes):
        raise EvaluationError(f"{path}: class names are not unique")
    return classes


def default_class_names(pred_dir: Path, label_dir: Path, present: set[int]) -> dict[int, str]:
    """Class names when ``--labels`` is not given: from the prediction's sidecar (``summary*.json`` that
    ``predict`` writes), else from ``dataset.json`` beside an MSD ``labels*`` folder, if either names every
    label in ``present``; else ``class_<value>`` for each present label value (never values no mask holds),
    with a warning saying how to name them."""
    candidates = [*sorted(Path(pred_dir).glob("summary*.json"))]
    if Path(label_dir).name.startswith("labels"):
        candidates.append(Path(label_dir).parent / "dataset.json")
    for path in candidates:
        names = _class_names_in(path)
        if names and present <= set(names):
            log.info("class names from %s", path)
            return names
    log.warning("class names unknown (no summary.json from predict in %s, no dataset.json beside %s): reporting "
                "%s; pass --labels dataset.json (or a JSON map {\"1\": \"name\"}) to name them",
                pred_dir, label_dir, ", ".join(f"class_{i}" for i in sorted(present)))
    return {i: f"class_{i}" for i in sorted(present)}


def _class_names_in(path: Path) -> dict[int, str] | None:
    """The foreground class names of a JSON file with a ``labels`` map, or None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("labels"), dict)):
        return None
    try:
        return load_class_names(path)
    except EvaluationError:
        return None


def read_label_map(path: Path, case: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(non-negative integer 3-D array, affine) of a label file; EvaluationError naming the case otherwise.

    Trailing singleton axes (x, y, z, 1) are dropped.
    """
    try:
        data, affine = read_volume(path)
    except Exception as exc:  # noqa: BLE001 - corrupt files become one-line user errors
        raise EvaluationError(f"case {case}: cannot read {role} {path} ({type(exc).__name__}: {str(exc)[:160]})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise EvaluationError(f"case {case}: {role} {path} is not a 3-D label map (shape {data.shape})")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise EvaluationError(f"case {case}: {role} {path} has non-integer values; expected a label map")
        data = data.astype(np.int64)
    if data.size and data.min() < 0:
        raise EvaluationError(f"case {case}: {role} {path} has negative labels")
    if data.dtype in (np.uint64,):
        data = data.astype(np.int64)
    return data, affine


def check_geometry(case: str, pred: Geometry, ref: Geometry, atol: float = GEOMETRY_ATOL) -> None:
    """EvaluationError naming the case unless both volumes share shape, spacing, origin and direction."""
    if pred.shape != ref.shape:
        raise EvaluationError(f"case {case}: prediction shape {pred.shape} differs from reference shape {ref.shape}")
    for what in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(pred, what)), np.asarray(getattr(ref, what))
        if not np.allclose(a, b, rtol=0.0, atol=atol):
            fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
            raise EvaluationError(f"case {case}: prediction {what} {fmt(a)} differs from reference {what} {fmt(b)}")


def _labels_present(labels: np.ndarray) -> set[int]:
    """Label values present in an integer array (bincount: linear time)."""
    return {int(v) for v in np.flatnonzero(np.bincount(labels.ravel()))}


# ----------------------------------------------------------------------------- per case


def evaluate_case(
    pair: CasePair, tolerance_mm: float, classes: dict[int, str] | None = None, atol: float = GEOMETRY_ATOL
) -> CaseResult:
    """Metrics of one case for ``classes`` (None: the label values present in either mask).

    EvaluationError naming the case for a geometry mismatch or a label not in ``classes``.
    """
    pred, pred_affine = read_label_map(pair.pred, pair.name, "prediction")
    ref, ref_affine = read_label_map(pair.ref, pair.name, "reference")
    pred_geometry, ref_geometry = Geometry.from_affine(pred.shape, pred_affine), Geometry.from_affine(ref.shape, ref_affine)
    check_geometry(pair.name, pred_geometry, ref_geometry, atol)
    present = (_labels_present(pred) | _labels_present(ref)) - {0}
    if classes is None:
        wanted = sorted(present)
    else:
        unknown = sorted(present - set(classes))
        if unknown:
            raise EvaluationError(f"case {pair.name}: label value(s) {unknown} are not in the class list {sorted(classes)}")
        wanted = sorted(classes)
    metrics = case_metrics(pred, ref, ref_geometry.spacing, wanted, tolerance_mm)
    return CaseResult(pair.name, ref_geometry, metrics)


# ----------------------------------------------------------------------------- aggregates


def summarize_metric(
    metric: str, rows: Sequence[ClassMetrics], n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """n (counted), n_missing, n_excluded, mean, sd, median, ci_low, ci_high of ``metric`` over ``rows``.

    Rows whose status the policy excludes for this metric are not counted; NaN values of counted rows
    are missing: in ``n`` and ``n_missing`` but not in the statistics.
    """
    counted = [getattr(r, metric) for r in rows if r.status not in EXCLUDED_STATUSES[metric]]
    valid = np.array([v for v in counted if not math.isnan(v)], dtype=float)
    ci = bootstrap_ci(valid, np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "n": len(counted),
        "n_missing": len(counted) - int(valid.size),
        "n_excluded": len(rows) - len(counted),
        "mean": ci.estimate,
        "sd": float(np.std(valid, ddof=1)) if valid.size >= 2 else math.nan,
        "median": float(np.median(valid)) if valid.size else math.nan,
        "ci_low": ci.low,
        "ci_high": ci.high,
    }


def aggregate(
    cases: Sequence[CaseResult], classes: dict[int, str], n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> list[dict[str, Any]]:
    """Per class: status counts and ``summarize_metric`` of every metric over the cases."""
    out = []
    for index, name in classes.items():
        rows = [case.metrics[index] for case in cases]
        statuses = {s: sum(r.status == s for r in rows) for s in (BOTH_PRESENT, PRED_EMPTY, REF_EMPTY, BOTH_EMPTY)}
        metrics = {m: summarize_metric(m, rows, n_resamples, confidence, seed) for m in METRICS}
        out.append({"class_index": index, "class_name": name, "status_counts": statuses, "metrics": metrics})
    return out


# ----------------------------------------------------------------------------- outputs


def _csv_value(value: Any) -> str:
    """CSV cell: empty for NaN (undefined or missing; the status column says which), floats to 10 digits."""
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, ".10g")
    return str(value)


def csv_text(cases: Sequence[CaseResult], classes: dict[int, str]) -> str:
    """One row per case and class, columns ``CSV_FIELDS``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for case in cases:
        for index, name in classes.items():
            row = case.metrics[index].as_dict()
            row.update(case=case.name, class_index=index, class_name=name)
            writer.writerow([_csv_value(row[f]) for f in CSV_FIELDS])
    return buffer.getvalue()


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown_text(report: dict[str, Any]) -> str:
    """Human-readable summary of a report: inputs, empty-mask policy, one table per class."""
    boot = report["bootstrap"]
    lines = [
        "# Segmentation evaluation",
        "",
        f"- Predictions: `{report['pred_dir']}`",
        f"- References: `{report['label_dir']}`",
        f"- Cases: {report['n_cases']}"
        + (f" (predictions without a reference, ignored: {len(report['unmatched_predictions'])})" if report["unmatched_predictions"] else ""),
        *(f"- **Not evaluated** (left out by --skip-bad-cases): {item['case']}: {item['reason']}"
          for item in report.get("failed_cases", [])),
        f"- NSD tolerance: {report['tolerance_mm']:g} mm",
        f"- CI: {boot['confidence']:.0%} bootstrap of the mean ({boot['method']}, {boot['n_resamples']} resamples, seed {boot['seed']})",
        "",
        "## Empty-mask policy",
        "",
        *(f"- **{key.replace('_', ' ')}**: {text}" for key, text in report["policy"].items()),
        "",
    ]
    for entry in report["aggregates"]:
        counts = entry["status_counts"]
        lines += [
            f"## {entry['class_name']} (label {entry['class_index']})",
            "",
            f"Cases: both present {counts[BOTH_PRESENT]}, prediction empty {counts[PRED_EMPTY]}, "
            f"reference empty {counts[REF_EMPTY]}, both empty {counts[BOTH_EMPTY]}.",
            "",
            "| Metric | n | missing | not counted | mean ± SD | median | 95% CI |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for metric, s in entry["metrics"].items():
            lines.append(
                f"| {metric} | {s['n']} | {s['n_missing']} | {s['n_excluded']} | {_fmt(s['mean'])} ± {_fmt(s['sd'])} "
                f"| {_fmt(s['median'])} | [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}] |"
            )
        lines.append("")
    lines += [f"Per-case values: `{CSV_NAME}`; everything: `{JSON_NAME}`.", ""]
    return "\n".join(lines)


def build_report(
    pred_dir: Path, label_dir: Path, tolerance_mm: float, classes: dict[int, str], cases: Sequence[CaseResult],
    aggregates: list[dict[str, Any]], unmatched: list[str], bootstrap: dict[str, Any],
    failed: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The JSON document: inputs, definitions, policy, aggregates and per-case values (NaN -> null)."""
    return json_safe({
        "format": FORMAT,
        "pred_dir": str(pred_dir),
        "label_dir": str(label_dir),
        "tolerance_mm": tolerance_mm,
        "classes": {str(k): v for k, v in classes.items()},
        "n_cases": len(cases),
        "unmatched_predictions": unmatched,
        "failed_cases": [{"case": name, "reason": reason} for name, reason in failed],
        "definitions": METRIC_DEFINITIONS,
        "policy": EMPTY_MASK_POLICY,
        "bootstrap": bootstrap,
        "aggregates": aggregates,
        "cases": [
            {
                "case": c.name,
                "shape": c.geometry.shape,
                "spacing_mm": c.geometry.spacing,
                "classes": {classes[i]: {"class_index": i, **m.as_dict()} for i, m in c.metrics.items()},
            }
            for c in cases
        ],
    })


# ----------------------------------------------------------------------------- entry point


def evaluate_folders(
    pred_dir: str | Path,
    label_dir: str | Path,
    output_dir: str | Path | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    labels: str | Path | None = None,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
    skip_bad_cases: bool = False,
) -> EvaluationResult:
    """Evaluate every reference in ``label_dir`` against its prediction in ``pred_dir``; write
    ``metrics.csv``, ``metrics.json`` and ``summary.md`` to ``output_dir`` (default ``pred_dir/evaluation``).

    Classes come from ``labels`` (dataset.json or JSON label map), else from the names ``predict`` wrote
    beside the predictions or the dataset.json beside the references (:func:`default_class_names`).
    A case that cannot be scored (unreadable, not a label map, geometry or class mismatch) stops the
    evaluation with one EvaluationError listing every such case; with ``skip_bad_cases`` the others are
    scored and the bad ones are listed in the report and in ``EvaluationResult.failed``.
    EvaluationError for user-facing problems.
    """
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise EvaluationError(f"tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    pairs, unmatched = match_cases(pred_dir, label_dir)
    if unmatched:
        log.warning("%d prediction(s) without a reference are ignored: %s", len(unmatched), ", ".join(unmatched[:10]))
    classes = load_class_names(labels) if labels is not None else None
    cases, failed = _evaluate_cases(pairs, tolerance_mm, classes)
    if failed and not skip_bad_cases:
        raise EvaluationError(_failed_cases_message(failed, len(pairs)))
    if not cases:
        raise EvaluationError(f"none of the {len(pairs)} case(s) could be evaluated: {_failed_cases_message(failed, len(pairs))}")
    for _, reason in failed:
        log.warning("left out: %s", reason)
    if classes is None:
        present = set().union(*(case.metrics for case in cases))
        if not present:
            raise EvaluationError(f"no foreground label in any prediction or reference ({label_dir}); nothing to evaluate")
        classes = default_class_names(pred_dir, label_dir, present)
        for case in cases:  # a class missing from this case is absent from both of its masks
            case.metrics = {i: case.metrics.get(i) or both_empty_metrics() for i in classes}
    aggregates = aggregate(cases, classes, n_resamples, confidence, seed)
    bootstrap = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed, "method": "BCa (percentile where BCa is undefined)",
                 "statistic": "mean"}
    report = build_report(pred_dir, label_dir, tolerance_mm, classes, cases, aggregates, unmatched, bootstrap, failed)
    out = Path(output_dir) if output_dir is not None else pred_dir / "evaluation"
    files = {
        "csv": write_atomic(out / CSV_NAME, csv_text(cases, classes)),
        "json": write_atomic(out / JSON_NAME, json.dumps(report, indent=2) + "\n"),
        "markdown": write_atomic(out / MARKDOWN_NAME, markdown_text(report)),
    }
    return EvaluationResult(classes, cases, aggregates, report, files, failed)


def _evaluate_cases(pairs: Sequence[CasePair], tolerance_mm: float, classes: dict[int, str] | None,
                    ) -> tuple[list[CaseResult], list[tuple[str, str]]]:
    """Every pair scored; the ones that raise EvaluationError come back as (case, message) instead."""
    cases, failed = [], []
    for pair in tqdm(pairs, desc="evaluate", leave=False, disable=not sys.stderr.isatty()):
        try:
            cases.append(evaluate_case(pair, tolerance_mm, classes))
        except EvaluationError as exc:
            failed.append((pair.name, str(exc)))
            continue
        log.debug("%s: %s", pair.name, {c: round(m.dice, 4) for c, m in cases[-1].metrics.items()})
    return cases, failed


def _failed_cases_message(failed: Sequence[tuple[str, str]], total: int, shown: int = 3) -> str:
    """One line: how many cases failed, the first ``shown`` reasons, and the way out."""
    reasons = "; ".join(reason for _, reason in failed[:shown])
    more = f"; and {len(failed) - shown} more" if len(failed) > shown else ""
    return (f"{len(failed)} of {total} case(s) cannot be evaluated: {reasons}{more} "
            "(fix them, or --skip-bad-cases to score the others and list these)")
