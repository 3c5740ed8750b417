"""Slice-wise 2.5D inference over a whole volume: every slice with its neighbours, in batches."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from seg_transfer.data.slices import context_indices, pad_to_multiple


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    axis: int,
    context: int,
    *,
    batch_size: int = 64,
    multiple: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class probabilities ``(classes, X, Y, Z)`` (float32, on CPU) for a ``(1, X, Y, Z)`` volume.

    Each slice along spatial ``axis`` is fed with ``context`` neighbours per side (edges repeat),
    padded to ``multiple``; the padding is cropped from the output. ``model`` must be in eval mode.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    stack = np.moveaxis(array[0].astype(np.float32, copy=False), axis, 0)  # (depth, H, W)
    depth, height, width = stack.shape
    padded = pad_to_multiple(stack, multiple, value=float(stack.min()))
    slabs = torch.from_numpy(np.ascontiguousarray(padded))
    out: torch.Tensor | None = None
    for start in range(0, depth, batch_size):
        indices = [context_indices(i, depth, context) for i in range(start, min(start + batch_size, depth))]
        batch = slabs[torch.from_numpy(np.stack(indices))].to(device)
        probs = torch.softmax(model(batch).float(), dim=1)[..., :height, :width].cpu()
        if out is None:
            out = torch.empty((probs.shape[1], depth, height, width), dtype=torch.float32)
        out[:, start : start + len(indices)] = probs.transpose(0, 1)
    return torch.movedim(out, 1, 1 + axis)
