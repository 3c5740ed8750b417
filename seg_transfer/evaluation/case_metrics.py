"""Per-case, per-class segmentation metrics (MONAI, voxel spacing in mm) with an explicit empty-mask policy.

Metrics of one class, prediction P against reference R (binary masks):

- ``dice``: 2|P∩R| / (|P|+|R|), from exact voxel counts (MONAI's ``compute_dice`` gives the same up to float32 rounding).
- ``hd95_mm``: 95th-percentile symmetric Hausdorff distance between the mask surfaces, in mm
  (MONAI ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th percentiles).
- ``assd_mm``: average symmetric surface distance, in mm (MONAI ``compute_average_surface_distance(symmetric=True)``).
- ``nsd``: normalised surface Dice at a tolerance in mm (MONAI ``compute_surface_dice``).
- ``volume_diff_ml``: predicted minus reference volume in ml (positive = over-segmentation).
- ``volume_diff_pct``: 100 * volume_diff_ml / reference volume (undefined if the reference is empty).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_hausdorff_distance,
    compute_surface_dice,
)

BOTH_PRESENT = "both_present"
BOTH_EMPTY = "both_empty"
PRED_EMPTY = "pred_empty"
REF_EMPTY = "ref_empty"

METRICS: tuple[str, ...] = ("dice", "hd95_mm", "assd_mm", "nsd", "volume_diff_ml", "volume_diff_pct")

METRIC_DEFINITIONS: dict[str, str] = {
    "dice": "Dice overlap 2|P∩R|/(|P|+|R|)",
    "hd95_mm": "95th-percentile symmetric Hausdorff distance between surfaces, mm (MONAI, voxel spacing applied)",
    "assd_mm": "average symmetric surface distance, mm (MONAI, voxel spacing applied)",
    "nsd": "normalised surface Dice: fraction of both surfaces within the tolerance of the other (MONAI)",
    "volume_diff_ml": "predicted minus reference volume, ml (positive = over-segmentation)",
    "volume_diff_pct": "100 * (predicted - reference volume) / reference volume, %",
}

# Statuses whose value of a metric is *not counted* in the aggregates (undefined by policy).
# Any other NaN value of a metric is *missing*: counted as n_missing, left out of mean/SD/median/CI.
EXCLUDED_STATUSES: dict[str, tuple[str, ...]] = {
    "dice": (),
    "hd95_mm": (BOTH_EMPTY,),
    "assd_mm": (BOTH_EMPTY,),
    "nsd": (BOTH_EMPTY,),
    "volume_diff_ml": (),
    "volume_diff_pct": (BOTH_EMPTY, REF_EMPTY),
}

EMPTY_MASK_POLICY: dict[str, str] = {
    "both_empty": (
        "class absent from prediction and reference: Dice = 1; HD95, ASSD and NSD are undefined, "
        "recorded as null and not counted in the aggregates; volume difference 0 ml, relative difference not counted"
    ),
    "one_empty": (
        "class absent from exactly one of prediction and reference: Dice = 0; HD95 and ASSD are recorded as "
        "missing (null) and counted in the aggregates as n_missing (mean/SD/median/CI use the non-missing values, "
        "so read them together with n_missing); NSD = 0 (no surface within tolerance) and counted"
    ),
    "relative_volume": "relative volume difference is undefined when the reference is empty: null, not counted",
}


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class in one case; NaN where the policy leaves a value undefined or missing."""

    status: str
    dice: float
    hd95_mm: float
    assd_mm: float
    nsd: float
    ref_volume_ml: float
    pred_volume_ml: float
    volume_diff_ml: float
    volume_diff_pct: float

    def as_dict(self) -> dict:
        return asdict(self)


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """(1, 1, *spatial) float tensor of a boolean mask, MONAI's one-hot batch layout."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def _surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> tuple[float, float, float]:
    """(hd95, assd, nsd) from MONAI for two non-empty masks."""
    p, r = _mask_tensor(pred), _mask_tensor(ref)
    kw = dict(include_background=True, spacing=spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI-internal deprecation notice (get_mask_edges)
        hd95 = compute_hausdorff_distance(p, r, percentile=95, **kw)
        assd = compute_average_surface_distance(p, r, symmetric=True, **kw)
        nsd = compute_surface_dice(p, r, class_thresholds=[tolerance_mm], **kw)
    return float(hd95), float(assd), float(nsd)


def _volume_fields(n_pred: int, n_ref: int, voxel_ml: float) -> dict[str, float]:
    """Reference/predicted volume, their difference (ml) and the relative difference (%, NaN if ref empty)."""
    ref_ml, pred_ml = n_ref * voxel_ml, n_pred * voxel_ml
    diff = pred_ml - ref_ml
    pct = 100.0 * diff / ref_ml if n_ref else math.nan
    return {"ref_volume_ml": ref_ml, "pred_volume_ml": pred_ml, "volume_diff_ml": diff, "volume_diff_pct": pct}


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> ClassMetrics:
    """Metrics of binary masks ``pred`` vs ``ref`` (same shape; ``spacing`` in mm per axis), empty-mask policy applied."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    spacing = tuple(float(s) for s in spacing)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}-D mask")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    volumes = _volume_fields(n_pred, n_ref, float(np.prod(spacing)) / 1000.0)
    nan = math.nan
    if n_pred == 0 and n_ref == 0:
        return ClassMetrics(BOTH_EMPTY, 1.0, nan, nan, nan, **volumes)
    if n_pred == 0 or n_ref == 0:
        return ClassMetrics(PRED_EMPTY if n_pred == 0 else REF_EMPTY, 0.0, nan, nan, 0.0, **volumes)
    dice = 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)
    hd95, assd, nsd = _surface_metrics(pred, ref, spacing, tolerance_mm)
    return ClassMetrics(BOTH_PRESENT, dice, hd95, assd, nsd, **volumes)


def both_empty_metrics() -> ClassMetrics:
    """The policy's record for a class absent from both prediction and reference."""
    return ClassMetrics(BOTH_EMPTY, 1.0, math.nan, math.nan, math.nan, 0.0, 0.0, 0.0, math.nan)


def case_metrics(
    pred_labels: np.ndarray, ref_labels: np.ndarray, spacing: Sequence[float], classes: Sequence[int], tolerance_mm: float
) -> dict[int, ClassMetrics]:
    """{class: metrics} of two integer label maps for every class in ``classes`` (a class absent from both
    gets ``both_empty_metrics()`` without any computation)."""
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}")
    present = set(np.flatnonzero(np.bincount(pred_labels.ravel()))) | set(np.flatnonzero(np.bincount(ref_labels.ravel())))
    out: dict[int, ClassMetrics] = {}
    for c in classes:
        if c in present:
            out[c] = class_metrics(pred_labels == c, ref_labels == c, spacing, tolerance_mm)
        else:
            out[c] = both_empty_metrics()
    return out
