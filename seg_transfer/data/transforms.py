"""MONAI dictionary transforms that turn a case's files into a normalised, RAS-oriented volume.

The same :class:`Preprocessing` parameters are stored in every checkpoint, so inference applies
exactly what training applied.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from monai import transforms as mt

from seg_transfer.config import DataConfig, Modality, MriScaling
from seg_transfer.data.io import SimpleITKReader, non_finite_counts
from seg_transfer.errors import UserError


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to reproduce the model's input from a raw volume."""

    modality: Modality
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mri_percentiles: tuple[float, float] = (0.5, 99.5)
    mri_scaling: MriScaling = "zscore"  # absent from checkpoints written before it: zscore
    crop_foreground: bool = False
    slice_axis: int = 2
    context_slices: int = 1

    @classmethod
    def from_config(cls, data: DataConfig) -> Preprocessing:
        return cls(
            modality=data.modality,
            spacing=tuple(data.spacing) if data.spacing else None,
            ct_window=tuple(data.ct_window),
            mri_percentiles=tuple(data.mri_percentiles),
            mri_scaling=data.mri_scaling,
            crop_foreground=data.crop_foreground,
            slice_axis=data.slice_axis,
            context_slices=data.context_slices,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        values = dict(values)
        for key in ("spacing", "ct_window", "mri_percentiles"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def is_body(image) -> Any:
    """Foreground for cropping: voxels above the volume's minimum (the background after normalisation)."""
    return image > image.min()


def _mri_zscore(key: str, low: float, high: float) -> list[mt.MapTransform]:
    return [mt.ClipIntensityPercentilesd(keys=key, lower=low, upper=high), mt.NormalizeIntensityd(keys=key)]


def _mri_range(key: str, low: float, high: float) -> list[mt.MapTransform]:
    return [mt.ScaleIntensityRangePercentilesd(keys=key, lower=low, upper=high, b_min=-1.0, b_max=1.0, clip=True)]


#: ``Preprocessing.mri_scaling`` -> transforms (key, lower percentile, upper percentile)
MRI_SCALINGS = {"zscore": _mri_zscore, "range": _mri_range}


def intensity_transforms(prep: Preprocessing, key: str = "image") -> list[mt.MapTransform]:
    """CT: clip to the window and scale to [-1, 1]. MRI: clip to the percentiles, then z-score
    (``mri_scaling: zscore``) or map the percentile range onto [-1, 1] (``range``)."""
    if prep.modality == "ct":
        low, high = prep.ct_window
        return [mt.ScaleIntensityRanged(keys=key, a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True)]
    return MRI_SCALINGS[prep.mri_scaling](key, *prep.mri_percentiles)


def load_transform(keys: list[str]) -> mt.LoadImaged:
    """LoadImaged choosing the reader by suffix: NIfTI via nibabel; NRRD/MHA/MHD and DICOM series
    (a folder, or a series' files as a list) via :class:`~seg_transfer.data.io.SimpleITKReader`.

    The SimpleITK reader is registered (tried first, by ``verify_suffix``) rather than passed as
    ``reader=``, which would make MONAI try every reader on every file and hide read errors.
    """
    with warnings.catch_warnings():  # with pydicom installed, MONAI warns that no GPU DICOM decoder exists
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        load = mt.LoadImaged(keys=keys, image_only=True, ensure_channel_first=True)
    load.register(SimpleITKReader())
    return load


class NonFiniteImageError(UserError, ValueError):
    """An image holds NaN or inf voxels: normalisation would spread them and the network would output
    background everywhere, so the case is refused instead."""


class RequireFinited(mt.MapTransform):
    """Raise :class:`NonFiniteImageError` (counting NaN and inf voxels) if the ``image`` is not all finite;
    the data pass through unchanged."""

    def __init__(self) -> None:
        super().__init__(keys="image")

    def __call__(self, data):
        array = np.asarray(data["image"])
        n_nan, n_inf = non_finite_counts(array)
        if n_nan or n_inf:
            raise NonFiniteImageError(f"image contains {n_nan} NaN and {n_inf} inf voxel(s) of {array.size}; "
                                      "replace them (e.g. by the background value) first")
        return data


def preprocessing_transforms(prep: Preprocessing, with_label: bool = True) -> mt.Compose:
    """Load → channel-first → orientation → optional spacing → intensity → optional foreground crop."""
    keys = ["image", "label"] if with_label else ["image"]
    steps: list[Any] = [
        load_transform(keys),
        mt.EnsureTyped(keys="image", dtype=np.float32, track_meta=True),
        RequireFinited(),
        mt.Orientationd(keys=keys, axcodes=prep.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if prep.spacing:
        modes = ("bilinear", "nearest") if with_label else ("bilinear",)
        steps.append(mt.Spacingd(keys=keys, pixdim=prep.spacing, mode=modes))
    steps += intensity_transforms(prep)
    if prep.crop_foreground:
        steps.append(mt.CropForegroundd(keys=keys, source_key="image", select_fn=is_body, allow_smaller=True))
    if with_label:
        steps.append(mt.EnsureTyped(keys="label", dtype=np.uint8, track_meta=True))
    return mt.Compose(steps)
