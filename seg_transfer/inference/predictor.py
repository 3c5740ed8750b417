"""One case: load the checkpoint's network and preprocessing, preprocess, infer (the route's inferer), map back.

Several checkpoints (an ensemble: seeds, folds, or the 2.5D and 3D routes) each map their probabilities back
to the input grid, where they are averaged before the arg-max, as nnU-Net ensembles folds: two float32
probability volumes of the input's size (the running sum and the current member's) are alive at a time.

The checkpoint's own :class:`~seg_transfer.data.transforms.Preprocessing` is applied with MONAI
transforms that record what they did; the prediction is mapped back to the input's voxel grid with
MONAI's ``Invertd`` (orientation, spacing, foreground crop all undone), so the label map overlays
the input voxel for voxel. Only one batch of probabilities exists at a time unless probabilities
are to be saved (then one float32 probability volume).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from scipy import ndimage
from torch import nn

from seg_transfer.data.io import NIBABEL_SUFFIXES
from seg_transfer.data.transforms import Preprocessing, preprocessing_transforms
from seg_transfer.errors import UserError
from seg_transfer.inference.cases import InputCase
from seg_transfer.inference.writers import InputGeometry
from seg_transfer.routes.base import InferenceOptions, argmax_labels
from seg_transfer.routes.network import LoadedNetwork, load_network

log = logging.getLogger(__name__)

Postprocess = Literal["none", "largest-component"]


class PredictSetupError(UserError, ValueError):
    """A problem with the run as a whole (device, options): one line for the user, nothing predicted."""


@dataclass(frozen=True)
class PredictOptions(InferenceOptions):
    """How each case is inferred (the route's :class:`InferenceOptions`) and what is written; defaults
    reproduce plain inference."""

    postprocess: Postprocess = "none"
    save_probabilities: bool = False
    progress: bool = True


@dataclass
class LoadedModel:
    """A checkpoint ready to predict: its network (eval mode, on its device) and the preprocessing transform."""

    network: LoadedNetwork
    transform: Compose

    @property
    def model(self) -> nn.Module:
        return self.network.model

    @property
    def prep(self) -> Preprocessing:
        return self.network.prep

    @property
    def labels(self) -> dict[int, str]:
        return self.network.labels

    @property
    def device(self) -> torch.device:
        return self.network.device

    def with_preprocessing(self, prep: Preprocessing) -> LoadedModel:
        """The same network behind another preprocessing (its transform rebuilt)."""
        network = LoadedNetwork(**{**self.network.__dict__, "prep": prep})
        return LoadedModel(network, preprocessing_transforms(prep, with_label=False))


@dataclass
class CasePrediction:
    """A case's label map (x, y, z) in the input grid, its geometry, and optionally probabilities (C, x, y, z)."""

    labels: np.ndarray
    geometry: InputGeometry
    probabilities: np.ndarray | None = None


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; raises :class:`PredictSetupError`."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise PredictSetupError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise PredictSetupError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise PredictSetupError(f"--device {spec}: CUDA device not available ({torch.cuda.device_count()} visible)")
    return device


def load_model(checkpoint: str, device: torch.device) -> LoadedModel:
    """The checkpoint's network (:func:`~seg_transfer.routes.network.load_network`) and its preprocessing transform."""
    network = load_network(checkpoint, device)
    return LoadedModel(network, preprocessing_transforms(network.prep, with_label=False))


def load_models(checkpoints: Sequence[str], device: torch.device) -> list[LoadedModel]:
    """Every checkpoint of an ensemble; :class:`PredictSetupError` unless they all segment the same labels."""
    models = [load_model(checkpoint, device) for checkpoint in checkpoints]
    for checkpoint, loaded in zip(checkpoints[1:], models[1:]):
        if loaded.labels != models[0].labels:
            raise PredictSetupError(f"--model {checkpoint}: labels {loaded.labels} differ from --model "
                                    f"{checkpoints[0]}'s {models[0].labels}; an ensemble needs the same classes")
    return models


def preprocess(loaded: LoadedModel, case: InputCase) -> MetaTensor:
    """The model-space image ``(1, X', Y', Z')`` of ``case``, carrying the operations to invert."""
    image = loaded.transform({"image": case.loader_input})["image"]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a single-channel 3D volume, got shape {tuple(image.shape)}")
    return image


def input_geometry(case: InputCase, image: MetaTensor) -> InputGeometry:
    """The input's voxel grid as read (from the loader's metadata), plus a NIfTI input's header."""
    shape = tuple(int(n) for n in np.asarray(image.meta["spatial_shape"]).ravel()[:3])
    affine = np.asarray(image.meta["original_affine"], dtype=float)
    header = None
    if not case.is_dicom and str(case.files[0]).lower().endswith(NIBABEL_SUFFIXES):
        import nibabel as nib

        header = nib.load(str(case.files[0])).header
    return InputGeometry(shape, affine, header)


def infer(loaded: LoadedModel, image: MetaTensor, options: PredictOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model-space labels ``(X', Y', Z')`` and, if ``options.save_probabilities``, probabilities ``(C, X', Y', Z')``.

    The route's inferer does the work: the same one training validation uses.
    """
    if options.save_probabilities:
        probs = model_probabilities(loaded, image, options)
        return argmax_labels(probs), probs
    return loaded.network.inferer(options).label_map(loaded.model, image.as_tensor(), loaded.device), None


def model_probabilities(loaded: LoadedModel, image: MetaTensor, options: InferenceOptions) -> torch.Tensor:
    """Model-space probabilities ``(C, X', Y', Z')`` from the route's inferer."""
    return loaded.network.inferer(options).probabilities(loaded.model, image.as_tensor(), loaded.device)


def invert_to_input(loaded: LoadedModel, image: MetaTensor, array: torch.Tensor, nearest: bool) -> torch.Tensor:
    """Map a model-space array ``(C, X', Y', Z')`` back to the input grid with MONAI's ``Invertd``.

    ``nearest`` for label maps; linear interpolation otherwise (probabilities).
    """
    inverter = Invertd(keys="pred", transform=loaded.transform, orig_keys="image", nearest_interp=nearest)
    data = inverter({"image": image, "pred": MetaTensor(array, affine=image.affine)})
    return data["pred"].as_tensor()


def keep_largest_component(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Per class in ``classes``: keep its largest 26-connected component, set the rest to background (0)."""
    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for value in classes:
        components, count = ndimage.label(labels == value, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[(components > 0) & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def predict_case(loaded: LoadedModel, case: InputCase, options: PredictOptions) -> CasePrediction:
    """Preprocess → infer → invert (→ post-process) one case; the label map has the input's exact grid."""
    image = preprocess(loaded, case)
    geometry = input_geometry(case, image)
    labels, probs = infer(loaded, image, options)
    restored = invert_to_input(loaded, image, labels[None], nearest=True)[0]
    labels_np = np.rint(restored.numpy()).astype(labels.numpy().dtype)
    _check_grid(labels_np.shape, geometry)
    labels_np = postprocess(labels_np, loaded.labels, options)
    probabilities = None
    if probs is not None:
        del labels
        probabilities = _input_grid_probabilities(loaded, image, probs)
    return CasePrediction(labels_np, geometry, probabilities)


def predict_ensemble_case(models: Sequence[LoadedModel], case: InputCase, options: PredictOptions) -> CasePrediction:
    """The mean of every model's probabilities on the input grid, its arg-max (→ post-process); one model is
    :func:`predict_case`. Each model applies its own preprocessing and route, so members may differ in both."""
    if len(models) == 1:
        return predict_case(models[0], case, options)
    total, geometry = None, None
    for loaded in models:
        image = preprocess(loaded, case)
        if geometry is None:  # the input's grid (and NIfTI header): the same whichever member reads it
            geometry = input_geometry(case, image)
        probs = _input_grid_probabilities(loaded, image, model_probabilities(loaded, image, options))
        _check_grid(probs.shape[1:], geometry)
        total = probs if total is None else np.add(total, probs, out=total)
    mean = total / len(models)
    labels = postprocess(argmax_labels(torch.from_numpy(mean)).numpy(), models[0].labels, options)
    return CasePrediction(labels, geometry, mean if options.save_probabilities else None)


def postprocess(labels: np.ndarray, names: dict[int, str], options: PredictOptions) -> np.ndarray:
    """``labels`` after ``options.postprocess`` (largest component of every foreground class, or unchanged)."""
    if options.postprocess == "largest-component":
        return keep_largest_component(labels, [k for k in names if k != 0])
    return labels


def _input_grid_probabilities(loaded: LoadedModel, image: MetaTensor, probs: torch.Tensor) -> np.ndarray:
    """Model-space probabilities ``(C, X', Y', Z')`` on the input grid (linear interpolation), summing to 1."""
    probabilities = invert_to_input(loaded, image, probs, nearest=False).numpy()
    probabilities[0] += np.clip(1.0 - probabilities.sum(0), 0.0, None)  # padded (cropped-away) voxels: background
    return probabilities


def _check_grid(shape: tuple[int, ...], geometry: InputGeometry) -> None:
    if tuple(shape) != tuple(geometry.shape):
        raise RuntimeError(f"inverted prediction has shape {tuple(shape)}, input has {geometry.shape}")
