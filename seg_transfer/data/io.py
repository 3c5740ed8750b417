"""Reading 3D volumes (NIfTI via nibabel; NRRD/MHA/MHD via SimpleITK) in one convention.

Every reader returns ``(array, affine)`` where ``array`` is in nibabel axis order
(x, y, z[, ...]) and ``affine`` is a 4x4 voxel-to-world matrix in RAS+ (nibabel's
convention), so the same data gives the same result whatever the file format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

NIBABEL_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
SITK_SUFFIXES: tuple[str, ...] = (".nrrd", ".mha", ".mhd")
SUPPORTED_SUFFIXES: tuple[str, ...] = NIBABEL_SUFFIXES + SITK_SUFFIXES


def volume_suffix(path: str | Path) -> str | None:
    """The supported suffix of ``path`` (lower case, e.g. ".nii.gz"), or None if unsupported."""
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:  # ".nii.gz" is tested before ".nii"
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def is_volume_file(path: str | Path) -> bool:
    """True for a file name with a supported suffix that is not hidden (".x", "._x")."""
    return not Path(path).name.startswith(".") and volume_suffix(path) is not None


def strip_volume_suffix(path: str | Path) -> str:
    """File name of ``path`` without its supported suffix ("a/b_1.nii.gz" -> "b_1").

    Raises ValueError for an unsupported suffix.
    """
    suffix = volume_suffix(path)
    if suffix is None:
        raise ValueError(
            f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        )
    name = Path(path).name
    return name[: len(name) - len(suffix)]


def sitk_affine_ras(img) -> np.ndarray:
    """4x4 RAS voxel-to-world affine of a SimpleITK image (nibabel's convention).

    SimpleITK gives direction/spacing/origin in LPS: world = origin + D @ diag(spacing) @ ijk.
    RAS is LPS with the first two world axes negated. Images with fewer than 3
    dimensions are embedded (unit spacing on the missing axes); extra dimensions
    beyond 3 are ignored.
    """
    dim = img.GetDimension()
    n = min(dim, 3)
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)[:n, :n]
    spacing = np.asarray(img.GetSpacing(), dtype=float)[:n]
    origin = np.asarray(img.GetOrigin(), dtype=float)[:n]
    affine = np.eye(4)
    affine[:n, :n] = direction @ np.diag(spacing)
    affine[:n, 3] = origin
    affine[:2, :] *= -1.0  # LPS -> RAS (also negates the translation of x and y)
    return affine


def _read_nibabel(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    # asanyarray(dataobj) keeps the stored dtype when there is no scaling, and forces a
    # full read, so truncated/corrupt data raise here rather than later.
    data = np.asanyarray(img.dataobj)
    return data, np.asarray(img.affine, dtype=float)


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, components)
    n_spatial = img.GetDimension()
    order = tuple(reversed(range(n_spatial))) + tuple(range(n_spatial, arr.ndim))
    return np.ascontiguousarray(arr.transpose(order)), sitk_affine_ras(img)


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` as (array in x, y, z[, ...] order, 4x4 RAS affine).

    NIfTI (.nii, .nii.gz) is read with nibabel (stored dtype kept unless the header
    scales the data); .nrrd/.mha/.mhd with SimpleITK. Raises FileNotFoundError for
    a missing file, ValueError for an unsupported suffix, and whatever the reader
    raises for a corrupt file.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise ValueError(
            f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if suffix in NIBABEL_SUFFIXES:
        return _read_nibabel(path)
    return _read_sitk(path)
