"""Writing predictions in the input's exact geometry, atomically (temp name in the same folder, then rename).

NIfTI outputs of NIfTI inputs reuse the input's header (qform, sform, codes, pixdim), so any reader
sees the input's geometry; other outputs take shape, spacing, origin and direction from the
input's RAS affine (as read) and are written with SimpleITK.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS: dict[str, str] = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".dcm"}


@dataclass(frozen=True)
class InputGeometry:
    """The voxel grid of an input as read: shape (x, y, z), RAS affine, and a NIfTI input's own header."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    nifti_header: object | None = None


def output_path(out_dir: Path, name: str, fmt: str, kind: str = "") -> Path:
    """``OUT/<name>[_<kind>]<suffix>`` for ``fmt`` in :data:`FORMATS` (probabilities never go to DICOM)."""
    suffix = FORMATS[fmt] if not (kind and fmt == "dicom-seg") else ".nii.gz"
    return Path(out_dir) / f"{name}{'_' + kind if kind else ''}{suffix}"


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a hidden temp path next to ``path`` (same suffix, so writers pick the format); on success
    it replaces ``path`` in one rename, on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    name = path.name
    suffix = next((s for s in FORMATS.values() if name.endswith(s)), path.suffix)
    temp = path.with_name(f".{name[: len(name) - len(suffix)]}.tmp{os.getpid()}{suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def label_dtype(max_label: int) -> type[np.integer]:
    """uint8 up to 255 labels, else uint16."""
    return np.uint8 if max_label <= 255 else np.uint16


def write_label_map(labels: np.ndarray, geometry: InputGeometry, path: Path) -> Path:
    """Write an (x, y, z) label map (uint8/uint16) with ``geometry`` to ``path`` atomically."""
    labels = np.asarray(labels)
    if tuple(labels.shape) != tuple(geometry.shape):
        raise ValueError(f"label map shape {labels.shape} differs from the input's {geometry.shape}")
    labels = labels.astype(label_dtype(int(labels.max(initial=0))), copy=False)
    return _write(labels, geometry, path)


def write_probabilities(probabilities: np.ndarray, geometry: InputGeometry, path: Path) -> Path:
    """Write (classes, x, y, z) float32 probabilities as one multi-component image (x, y, z, classes)."""
    return _write(np.moveaxis(np.asarray(probabilities, dtype=np.float32), 0, -1), geometry, path)


def _write(array: np.ndarray, geometry: InputGeometry, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temp:
        if path.name.endswith((".nii.gz", ".nii")):
            _write_nifti(array, geometry, temp)
        else:
            import SimpleITK as sitk

            sitk.WriteImage(sitk_image(array, geometry.affine), str(temp), useCompression=True)
    return path


def _write_nifti(array: np.ndarray, geometry: InputGeometry, path: Path) -> None:
    import nibabel as nib

    if geometry.nifti_header is None:
        image = nib.Nifti1Image(array, geometry.affine)
    else:
        header = geometry.nifti_header.copy()
        header.set_data_dtype(array.dtype)
        image = nib.Nifti1Image(array, None, header=header)  # qform/sform kept exactly as in the input
        image.header.set_slope_inter(1.0, 0.0)
        image.header["cal_min"], image.header["cal_max"] = 0, 0
    image.header.set_intent("none")
    nib.save(image, str(path))


def sitk_image(array: np.ndarray, affine: np.ndarray):
    """SimpleITK image of an (x, y, z[, components]) array placed by a RAS voxel-to-world ``affine``."""
    import SimpleITK as sitk

    vector = array.ndim == 4
    order = (2, 1, 0, 3) if vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(order)), isVector=vector)
    spacing, origin, direction = lps_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def lps_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, row-major direction) in SimpleITK's LPS convention from a RAS 4x4 affine."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=float)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:, 3].tolist()), tuple(direction.ravel().tolist())
