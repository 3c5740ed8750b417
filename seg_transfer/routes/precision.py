"""The one mixed-precision rule and the one memory-format rule, shared by training and inference.

``auto`` autocasts to bfloat16 on CUDA GPUs that support it, else float16, and not at all on CPU;
training's ``training.amp`` and ``predict --amp`` both resolve through :func:`resolve_amp`.
Every on/off/auto switch resolves through :func:`resolve_switch`, ``auto`` meaning "on for these device types".
Channels last is such a switch whose devices each route declares where ``benchmarks/memory_format.py`` measured
it faster (``Route.train_channels_last`` for ``training.channels_last: auto``, ``Route.predict_channels_last`` for
``predict``): the same arithmetic in another order, so only speed differs.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch


def run_device(name: str) -> torch.device:
    """The device of a training run's ``training.device``: ``auto`` is CUDA where available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(setting: Literal["auto", "off", "bf16", "fp16"], device: torch.device,
                cuda_bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for ``setting`` on ``device`` (None: no autocast).

    ``auto``: bfloat16 on CUDA where the GPU supports it, else float16; off on CPU. ``bf16``/``fp16``
    force that dtype on any device (CPU autocast supports both). ``cuda_bf16_supported`` overrides
    the query of the current GPU (tests).
    """
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if device.type != "cuda":
        return None
    if cuda_bf16_supported is None:
        cuda_bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16_supported else torch.float16


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Inference autocast: ``enabled`` follows the ``auto`` rule of :func:`resolve_amp` (CUDA only)."""
    dtype = resolve_amp("auto" if enabled else "off", torch.device(device))
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def resolve_switch(setting: Literal["auto", "on", "off"], device: torch.device,
                   auto_devices: tuple[str, ...] = ("cuda",)) -> bool:
    """An on/off/auto switch on ``device``: ``auto`` is on for the device types in ``auto_devices``."""
    if setting == "auto":
        return torch.device(device).type in auto_devices
    return setting == "on"


def lay_out_weights(model: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """Lay out ``model``'s parameters in ``memory_format`` where their rank takes it (``channels_last``: 4-D,
    ``channels_last_3d``: 5-D, contiguous: both) and leave the rest as they are; ``model.to(memory_format=...)``
    instead fails on a 3-D network holding 4-D weights (ACS convolutions keep their 2-D kernels). Returns ``model``."""
    ranks = {torch.channels_last: (4,), torch.channels_last_3d: (5,)}.get(memory_format, (4, 5))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() in ranks:
                param.data = param.data.contiguous(memory_format=memory_format)
    return model


def memory_format_for(channels_last: bool, ndim: int = 4) -> torch.memory_format:
    """The memory format of ``ndim``-D activations: channels last (``channels_last_3d`` for 5-D) or contiguous."""
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last
