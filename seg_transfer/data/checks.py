"""Bad-data detection before training: read every file once and report all problems.

Nothing here raises for bad data: each problem becomes a :class:`BadCase` naming
the offending file with a one-line description, so a user can fix everything in
one go.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg_transfer.data.cases import Case
from seg_transfer.data.io import non_finite_counts, read_volume
from seg_transfer.errors import one_line

AFFINE_RTOL = 1e-3
AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class BadCase:
    """One problem of one case: the offending file and a one-line description."""

    name: str
    path: Path
    problem: str


def _fmt_shape(shape: tuple[int, ...]) -> str:
    """'(35, 50, 36)' (plain ints, also for 1-tuples)."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _fmt_values(values: Iterable[object], limit: int = 10) -> str:
    """'{0, 1, 2}' listing at most ``limit`` values."""
    values = list(values)
    text = ", ".join(str(v) for v in values[:limit])
    if len(values) > limit:
        text += f", ... ({len(values)} values)"
    return "{" + text + "}"


def _as_3d(data: np.ndarray) -> np.ndarray:
    """Drop trailing singleton dimensions beyond the third ((x, y, z, 1) -> (x, y, z))."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _read(path: Path, kind: str) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(array squeezed to 3D where possible, affine, problem); data None when unreadable."""
    if not path.exists():
        return None, None, f"{kind} file not found"
    try:
        data, affine = read_volume(path)
    except Exception as e:  # noqa: BLE001 - every read failure becomes a report line
        return None, None, f"cannot read {kind} ({one_line(e, path=path)})"
    if data.dtype.fields is not None or (data.dtype != bool and not np.issubdtype(data.dtype, np.number)):
        return None, None, f"{kind} has unsupported data type {data.dtype}"
    data = _as_3d(data)
    if data.ndim != 3:
        return None, None, f"{kind} is {data.ndim}D with shape {_fmt_shape(data.shape)}, expected 3D"
    return data, affine, None


def _image_problems(data: np.ndarray) -> list[str]:
    """NaN/inf voxels and constant images."""
    problems = []
    finite = data
    n_nan, n_inf = non_finite_counts(data)
    if n_nan:
        problems.append(f"image contains {n_nan} NaN voxel(s)")
    if n_inf:
        problems.append(f"image contains {n_inf} inf voxel(s)")
    if n_nan or n_inf:
        finite = data[np.isfinite(data)]
    if finite.size == 0:
        problems.append("image has no finite voxels")
    elif finite.min() == finite.max():
        problems.append(f"image is constant (all voxels {finite.flat[0]})")
    return problems


def _label_problems(data: np.ndarray, label_values: set[int]) -> list[str]:
    """Non-integral (or non-finite) label values and values outside ``label_values``."""
    values = np.unique(data)
    if np.issubdtype(values.dtype, np.inexact):
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            return [f"label has non-integral values {_fmt_values(bad.tolist())}"]
    ints = sorted({int(v) for v in values.tolist()})
    unexpected = [v for v in ints if v not in label_values]
    if unexpected:
        return [
            f"label values {_fmt_values(unexpected)} not in expected {_fmt_values(sorted(label_values))}"
        ]
    return []


def _pair_problems(image: np.ndarray, img_aff: np.ndarray, label: np.ndarray, lab_aff: np.ndarray) -> list[str]:
    """Shape and affine agreement of an image and its label."""
    if image.shape != label.shape:
        return [f"image shape {_fmt_shape(image.shape)} != label shape {_fmt_shape(label.shape)}"]
    if not np.allclose(img_aff, lab_aff, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        diff = float(np.abs(np.asarray(img_aff) - np.asarray(lab_aff)).max())
        return [f"image affine != label affine (max difference {diff:.4g})"]
    return []


def _guarded(fn, *args) -> list[str]:
    """``fn(*args)``, or a one-line 'check failed' problem if it raises."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return [f"check failed ({one_line(e)})"]


def check_case(case: Case, label_values: set[int]) -> list[BadCase]:
    """All problems of one case (empty list if fine); never raises for bad data.

    Checks the image (readable, 3D or (x, y, z, 1), finite, not constant) and, when
    the case has a label, the label (readable, 3D, integral values within
    ``label_values``; float labels holding integers are fine) and that image and
    label agree in shape and affine (tolerance 1e-3 relative/absolute). Label
    problems carry the label's path; everything else the image's.
    """
    label_values = {int(v) for v in label_values}
    bad: list[BadCase] = []
    image, img_aff, problem = _read(Path(case.image), "image")
    if problem:
        bad.append(BadCase(case.name, Path(case.image), problem))
    else:
        bad += [BadCase(case.name, Path(case.image), p) for p in _guarded(_image_problems, image)]
    if case.label is None:
        return bad
    label, lab_aff, problem = _read(Path(case.label), "label")
    if problem:
        bad.append(BadCase(case.name, Path(case.label), problem))
        return bad
    bad += [BadCase(case.name, Path(case.label), p) for p in _guarded(_label_problems, label, label_values)]
    if image is not None:
        bad += [
            BadCase(case.name, Path(case.label), p)
            for p in _guarded(_pair_problems, image, img_aff, label, lab_aff)
        ]
    return bad


def find_bad_cases(cases: Iterable[Case], label_values: set[int]) -> list[BadCase]:
    """All problems of all cases, in case order (never stops at the first)."""
    bad: list[BadCase] = []
    for case in cases:
        bad.extend(check_case(case, label_values))
    return bad


def format_bad_cases(bad: list[BadCase]) -> str:
    """One line per problem: '<path>: <problem>' (empty string for no problems)."""
    return "\n".join(f"{b.path}: {b.problem}" for b in bad)
