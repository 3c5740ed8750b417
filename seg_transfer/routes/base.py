"""What a route is: the registry entry that makes a run 2.5D or 3D.

A :class:`Route` bundles the three things that differ between routes: how the network is built
(:attr:`Route.build_network`), what a training sample is (:attr:`Route.training_samples`) and how a
whole volume is inferred (:attr:`Route.inferer`). Training, validation, ``predict``, export and the
study take them from the route named by ``model.dims``; nothing else branches on the route.
"""
from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from seg_transfer.config import DataConfig, ModelConfig
from seg_transfer.models.weights import WeightsProvenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    """How a volume is inferred; ``None`` means the route's default (``overlap``: 0.25 in 2.5D, 0.5 in 3D)."""

    batch_size: int = 32
    amp: bool = False
    tta: bool | None = False  # average over the flips the network was trained with (:func:`trained_mirrorings`);
    # None: as validated at the end of training (:meth:`seg_transfer.routes.network.LoadedNetwork.inference_options`)
    roi_size: int | None = 512
    overlap: float | None = None
    progress: bool = False
    max_batch_pixels: int | None = 2**21  # 2.5D: 8 slices of 512 x 512 per batch at most (bounds activation memory)


def label_dtype(classes: int) -> torch.dtype:
    """The label-map dtype of every route: uint8 up to 256 classes, else int16."""
    return torch.uint8 if classes <= 256 else torch.int16


def argmax_labels(probabilities: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Arg-max over the class axis of ``(C, ..., Z)`` probabilities as a label map of :func:`label_dtype`,
    ``chunk`` slices of the last axis at a time: no int64 index volume of the whole scan is ever alive."""
    labels = torch.empty(probabilities.shape[1:], dtype=label_dtype(probabilities.shape[0]))
    for start in range(0, probabilities.shape[-1], chunk):
        labels[..., start:start + chunk] = probabilities[..., start:start + chunk].argmax(0)
    return labels


def trained_mirrorings(data: DataConfig, first_dim: int = 2) -> tuple[tuple[int, ...], ...]:
    """The label-safe test-time flips of a network trained with ``data``: every combination of the axes it
    saw flipped in training (``data.augment.flip_axes``; spatial axis ``a`` is batch dim ``a + first_dim``),
    ``()`` (as is) first. A flip the network never saw is not label-safe: on Hippocampus, whose classes are
    the anterior and posterior part, flipping along that axis makes the network swap them."""
    axes = sorted(set(data.augment.flip_axes)) if data.augment.enabled else []
    dims = [axis + first_dim for axis in axes]
    return tuple(combo for size in range(len(dims) + 1) for combo in itertools.combinations(dims, size))


def tta_flips(data: DataConfig, options: InferenceOptions) -> tuple[tuple[int, ...], ...]:
    """The flips an inferer averages: :func:`trained_mirrorings` when ``options.tta``, else only ``()``
    (``tta=None`` must be resolved first: :meth:`~seg_transfer.routes.network.LoadedNetwork.inference_options`)."""
    if options.tta is None:
        raise ValueError("InferenceOptions.tta=None (the checkpoint's validated choice) must be resolved by the "
                         "loaded network before an inferer is built")
    if not options.tta:
        return ((),)
    flips = trained_mirrorings(data)
    if len(flips) == 1:
        _warn_no_label_safe_flip()
    return flips


@functools.cache
def _warn_no_label_safe_flip() -> None:
    """Once per process (an inferer is built for every case)."""
    log.warning("test-time augmentation: the network was trained without flips (data.augment.flip_axes is empty), "
                "so no flip is label-safe; predicting without it")


def flip_average(predict: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                 flips: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """Test-time augmentation: ``predict`` on ``batch`` flipped along each entry of ``flips`` (``()`` = as is),
    each result flipped back, averaged. Sums in place, so one result tensor is alive besides the one being made."""
    total = None
    for dims in flips:
        probs = predict(torch.flip(batch, dims) if dims else batch)
        probs = torch.flip(probs, dims) if dims else probs
        if total is None:
            total = probs
        else:
            total += probs
            del probs
    if len(flips) > 1:
        total /= len(flips)
    return total


class Inferer(Protocol):
    """Infers a preprocessed volume ``(1, X, Y, Z)`` with an eval-mode network; results are on the CPU."""

    def probabilities(self, model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Softmax probabilities ``(C, X, Y, Z)`` float32."""

    def label_map(self, model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Arg-max labels ``(X, Y, Z)`` (uint8, or int16 beyond 256 classes)."""


@dataclass(frozen=True)
class NetworkSpec:
    """What a route needs to rebuild and infer a trained network: its config and the route's own settings
    (the 3D route's patch size), as stored in the checkpoint."""

    model: ModelConfig
    data: DataConfig
    classes: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """A registry entry (see :func:`seg_transfer.routes.get_route`).

    - ``spatial_dims``: 2 (a 2D network on slabs) or 3; ``sample_name``: a training sample in words.
    - ``in_channels(data)``: input channels of the network.
    - ``build_network(model, in_channels, classes, load_pretrained)`` -> ``(network, provenance)``.
    - ``spatial_multiple(network)``: per-axis multiple every network input must have.
    - ``settings(data, volumes, network)``: route settings fixed at training time (stored in checkpoints).
    - ``training_samples(volumes, data, batch_size, settings, network, rank, world_size, pin_memory, labelled)``
      -> ``(dataset with set_epoch, loader)``; an epoch is exactly ``data.slices_per_epoch`` samples; the first
      ``labelled`` volumes are labelled cases, the rest pseudo-labelled scans (``data.pseudo_labelled.share``).
    - ``inferer(spec, options, network)``: the :class:`Inferer` used by validation and ``predict`` alike.
    - ``fixed_input_shapes``: every training and validation forward has one input shape (3D patches and
      windows), so ``training.cudnn_benchmark: auto`` turns cuDNN's autotuner on; a route whose validation
      inputs change shape from case to case (2.5D whole slices) leaves it off (README, "On one GPU").
    - ``ranking_scores`` / ``ranking_strides``: what ``rank-encoders`` scores when not told, chosen by the
      encoder-choice studies (docs/results.md) for this route (the first score orders the ranking).
    - ``restoration_samples(volumes, data, settings, network, corruption, count, seed)`` -> the dataset of
      (corrupted, original) pairs ``seg-transfer pretrain`` learns from: 2.5D slabs or 3D patches, shaped by the
      ``settings`` of its training scans (``count=None``: a held-out set).
    - ``train_channels_last`` / ``predict_channels_last``: device types on which training's ``channels_last: auto``
      and :func:`~seg_transfer.routes.network.load_network` lay activations and the network out channels last,
      where ``benchmarks/memory_format.py`` measured it faster (README, "Channels last on the CPU").
    """

    name: str
    spatial_dims: int
    sample_name: str  # what training samples are, for logs: "slices" or "patches"
    in_channels: Callable[[DataConfig], int]
    build_network: Callable[[ModelConfig, int, int, bool], tuple[nn.Module, WeightsProvenance]]
    spatial_multiple: Callable[[nn.Module], tuple[int, ...]]
    settings: Callable[..., dict[str, Any]]
    training_samples: Callable[..., tuple[Any, Any]]
    inferer: Callable[[NetworkSpec, InferenceOptions, nn.Module], Inferer]
    fixed_input_shapes: bool
    ranking_scores: tuple[str, ...]
    ranking_strides: tuple[int, ...]
    train_channels_last: tuple[str, ...]
    predict_channels_last: tuple[str, ...]
    restoration_samples: Callable[..., Any]
