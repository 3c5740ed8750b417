"""Reading 3D volumes (NIfTI via nibabel; NRRD/MHA/MHD via SimpleITK) in one convention.

Every reader returns ``(array, affine)`` where ``array`` is in nibabel axis order
(x, y, z[, ...]) and ``affine`` is a 4x4 voxel-to-world matrix in RAS+ (nibabel's
convention), so the same data gives the same result whatever the file format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

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


# --------------------------------------------------------------------------- DICOM series


def looks_like_dicom(path: str | Path) -> bool:
    """True for a ``.dcm`` file or a file with the DICOM preamble ("DICM" at byte 128)."""
    path = Path(path)
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    if path.suffix:  # only extension-less files are sniffed
        return False
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def dicom_series(folder: str | Path) -> dict[str, tuple[str, ...]]:
    """The DICOM series directly inside ``folder``: SeriesInstanceUID -> its files in slice order (GDCM)."""
    import SimpleITK as sitk

    folder = str(folder)
    return {uid: tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)}


def read_sitk_image(source: str | Path | tuple[str, ...] | list[str]):
    """A SimpleITK image from a file, a folder holding one DICOM series, or a DICOM series' files.

    A folder with several series raises ValueError (split it with :func:`dicom_series`).
    """
    import SimpleITK as sitk

    files = [str(s) for s in source] if isinstance(source, (tuple, list)) else [str(source)]
    if len(files) == 1 and Path(files[0]).is_dir():
        series = dicom_series(files[0])
        if len(series) != 1:
            raise ValueError(f"{files[0]}: expected one DICOM series, found {len(series)}")
        files = list(next(iter(series.values())))
    if len(files) == 1 and not looks_like_dicom(files[0]):
        return sitk.ReadImage(files[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` for NRRD, MHA/MHD and DICOM series (a folder or a series' files), via SimpleITK.

    ``get_data`` returns the array in (x, y, z) order (nibabel's, so MONAI treats every format
    alike) and meta with ``affine``/``original_affine`` (RAS), ``spatial_shape`` and
    ``original_channel_dim="no_channel"``. Vector and non-3D images raise ValueError.
    """

    def verify_suffix(self, filename) -> bool:
        names = _names(filename)
        if len(names) == 1 and (Path(names[0]).is_dir() or volume_suffix(names[0]) in SITK_SUFFIXES):
            return True
        return all(looks_like_dicom(name) for name in names)

    def read(self, data, **kwargs):
        return read_sitk_image(_names(data))

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
        if img.GetDimension() != 3:
            raise ValueError(f"expected a 3D volume, got a {img.GetDimension()}D image")
        array = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))
        affine = sitk_affine_ras(img)
        meta = {
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
            MetaKeys.SPACE: SpaceKeys.RAS,
        }
        return array, meta


def _names(data) -> list[str]:
    return [str(data)] if isinstance(data, (str, Path)) else [str(item) for item in data]


def non_finite_counts(array: np.ndarray) -> tuple[int, int]:
    """``(NaN voxels, inf voxels)`` of an image (0, 0 for integer images)."""
    if not np.issubdtype(array.dtype, np.inexact):
        return 0, 0
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())
