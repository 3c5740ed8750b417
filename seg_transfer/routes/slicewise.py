"""Slice-wise 2.5D inference over a whole volume: every slice with its neighbours, in batches.

MONAI's ``SliceInferer`` cannot feed neighbour slices as channels, so slabs are built here and the
2D model call of each batch is wrapped: in-plane flips for test-time augmentation, CUDA autocast,
and MONAI's ``sliding_window_inference`` (Gaussian blending) for slices larger than ``roi_size``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm.auto import tqdm

from seg_transfer.data.slices import context_indices, pad_to_multiple
from seg_transfer.routes.base import flip_average, label_dtype
from seg_transfer.routes.precision import autocast

#: volumes with at least this many voxels get a progress bar over their slices
PROGRESS_MIN_VOXELS = 2**24


@torch.no_grad()
def slice_probabilities(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    amp: bool = False,
    flips: Sequence[tuple[int, ...]] = ((),),
    roi_size: int | None = None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Softmax probabilities ``(B, C, H, W)`` float32 for a batch of slabs ``(B, 2k+1, H, W)``.

    The probabilities are averaged over ``flips`` (in-plane dims 2, 3 of the batch; each flipped back; test-time
    augmentation, see :func:`~seg_transfer.routes.base.trained_mirrorings`). Slices with a
    side larger than ``roi_size`` go through ``sliding_window_inference`` (roi x roi windows,
    ``overlap``, Gaussian blending); ``amp`` enables autocast on CUDA only (bfloat16 where supported, else float16).
    """
    def predict(flipped: torch.Tensor) -> torch.Tensor:
        return torch.softmax(_logits(model, flipped, amp, roi_size, overlap).float(), dim=1)

    return flip_average(predict, batch, flips)


def _logits(model: nn.Module, batch: torch.Tensor, amp: bool, roi_size: int | None, overlap: float) -> torch.Tensor:
    with autocast(batch.device, amp):
        if roi_size is not None and max(batch.shape[-2:]) > roi_size:
            return sliding_window_inference(batch, (roi_size, roi_size), batch.shape[0], model,
                                            overlap=overlap, mode="gaussian")
        return model(batch)


def iter_slice_probabilities(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    axis: int,
    context: int,
    *,
    batch_size: int = 64,
    multiple: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = False,
    max_batch_pixels: int | None = None,
    **forward: object,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first slice index, probabilities (B, C, H, W) on CPU)`` for consecutive batches of slices.

    Slices are taken along spatial ``axis`` of a ``(1, X, Y, Z)`` volume, each with ``context``
    neighbours per side (edges repeat), padded to ``multiple`` (cropped again). ``forward`` goes to
    :func:`slice_probabilities`. ``progress`` shows a bar over slices for large volumes.
    ``max_batch_pixels`` caps ``batch_size`` so that slices x padded slice area stays below it
    (at least one slice): activations of big slices then stay bounded.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    stack = np.moveaxis(array[0].astype(np.float32, copy=False), axis, 0)  # (depth, H, W)
    depth, height, width = stack.shape
    slabs = torch.from_numpy(np.ascontiguousarray(pad_to_multiple(stack, multiple, value=float(stack.min()))))
    if max_batch_pixels is not None:
        batch_size = max(1, min(batch_size, max_batch_pixels // (slabs.shape[-2] * slabs.shape[-1])))
    show = progress and stack.size >= PROGRESS_MIN_VOXELS and sys.stderr.isatty()
    with tqdm(total=depth, desc="slices", unit="slice", leave=False, disable=not show) as bar:
        for start in range(0, depth, batch_size):
            indices = [context_indices(i, depth, context) for i in range(start, min(start + batch_size, depth))]
            batch = slabs[torch.from_numpy(np.stack(indices))].to(device)
            probs = slice_probabilities(model, batch, **forward)[..., :height, :width]
            yield start, probs.cpu()
            bar.update(len(indices))


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    axis: int,
    context: int,
    **options: object,
) -> torch.Tensor:
    """Class probabilities ``(classes, X, Y, Z)`` (float32, on CPU) for a ``(1, X, Y, Z)`` volume.

    Each slice along spatial ``axis`` is fed with ``context`` neighbours per side (edges repeat),
    padded to ``multiple`` (default 32); the padding is cropped from the output. ``model`` must be in
    eval mode. ``options`` (``batch_size``, ``multiple``, ``device``, ``amp``, ``flips``, ``roi_size``,
    ``overlap``, ``progress``, ``max_batch_pixels``) as in :func:`iter_slice_probabilities`; the defaults
    reproduce plain inference.
    """
    batches = iter_slice_probabilities(model, image, axis, context, **options)
    out = _write_slices(batches, _depth(image, axis), lambda probs: probs.float(), slice_dim=1)
    return torch.movedim(out, 1, 1 + axis)


@torch.no_grad()
def predict_label_map(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    axis: int,
    context: int,
    **options: object,
) -> torch.Tensor:
    """Arg-max labels ``(X, Y, Z)`` (uint8, or int16 beyond 256 classes) of a ``(1, X, Y, Z)`` volume.

    Same inputs as :func:`predict_volume`, but only one batch of probabilities exists at a time.
    """
    batches = iter_slice_probabilities(model, image, axis, context, **options)
    out = _write_slices(batches, _depth(image, axis), lambda probs: probs.argmax(1).to(label_dtype(probs.shape[1])),
                        slice_dim=0)
    return torch.movedim(out, 0, axis)


def _depth(image: torch.Tensor | np.ndarray, axis: int) -> int:
    return (image.shape[1:] if image.ndim == 4 else image.shape)[axis]


def _write_slices(batches: Iterator[tuple[int, torch.Tensor]], depth: int,
                  per_batch: Callable[[torch.Tensor], torch.Tensor], slice_dim: int) -> torch.Tensor:
    """One preallocated tensor holding ``per_batch(probs)`` (``(B, ...)``) of every slice batch, its
    slices along ``slice_dim`` (``depth`` of them, the other dims in their order)."""
    out: torch.Tensor | None = None
    for start, probs in batches:
        part = torch.movedim(per_batch(probs), 0, slice_dim)
        if out is None:
            shape = list(part.shape)
            shape[slice_dim] = depth
            out = torch.empty(shape, dtype=part.dtype)
        out.narrow(slice_dim, start, part.shape[slice_dim]).copy_(part)
    assert out is not None, "a volume has at least one slice"
    return out
