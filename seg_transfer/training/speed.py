"""Speed switches of ``training.*``, resolved for the device a run trains on.

``amp``, ``cudnn_benchmark`` and ``pin_memory`` default to ``auto``: on for CUDA, off on CPU.
``channels_last: auto`` is on where the route measured it faster (``Route.train_channels_last``): the CPU for
both routes (1.07-1.23x), CUDA for 2.5D only (3D trained 0.94x on an H200); the same arithmetic in another order,
so CPU runs from before it differ from today's by float rounding only. ``cudnn_benchmark:
auto`` is on only where the route feeds the network one input shape (``Route.fixed_input_shapes``): cuDNN
tunes kernels for every new shape, which cost the 2.5D route about 70 s of a 141 s H100 run and gained
nothing per steady epoch (README, "On one GPU"). ``compile``
(``torch.compile`` of the training forward) is off unless set. Each switch can be forced with
``on``/``off`` (``amp``: ``bf16``/``fp16``/``off``) on any device.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from seg_transfer.config import TrainingConfig
from seg_transfer.routes.base import Route
from seg_transfer.routes.precision import memory_format_for, resolve_amp, resolve_switch


@dataclass(frozen=True)
class SpeedSettings:
    """What the switches became on one device."""

    amp_dtype: torch.dtype | None = None  # autocast dtype; None trains in float32
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    pin_memory: bool = False

    @property
    def needs_grad_scaler(self) -> bool:
        """float16 autocast needs loss scaling (bfloat16 has float32's exponent range and does not)."""
        return self.amp_dtype == torch.float16


#: plain float32, contiguous, eager: what every switch is off
FULL_PRECISION = SpeedSettings()


def resolve_speed(training: TrainingConfig, device: torch.device, route: Route,
                  cuda_bf16_supported: bool | None = None) -> SpeedSettings:
    """All speed switches of ``training`` resolved for ``device`` and the route the run trains on: ``cudnn_benchmark:
    auto`` needs :attr:`~seg_transfer.routes.base.Route.fixed_input_shapes`, ``channels_last: auto`` is on for the
    devices in ``Route.train_channels_last``."""
    return SpeedSettings(
        amp_dtype=resolve_amp(training.amp, device, cuda_bf16_supported),
        channels_last=resolve_switch(training.channels_last, device, route.train_channels_last),
        compile=training.compile,
        cudnn_benchmark=resolve_switch(training.cudnn_benchmark, device)
        and (route.fixed_input_shapes or training.cudnn_benchmark == "on"),
        pin_memory=resolve_switch(training.pin_memory, device),
    )


def describe(settings: SpeedSettings) -> str:
    """One line for the log, e.g. ``amp bf16, channels_last, cudnn_benchmark, pin_memory``."""
    amp = {None: "amp off", torch.bfloat16: "amp bf16", torch.float16: "amp fp16 (GradScaler)"}[settings.amp_dtype]
    flags = [name for name in ("channels_last", "compile", "cudnn_benchmark", "pin_memory") if getattr(settings, name)]
    return ", ".join([amp, *flags])


def autocast(settings: SpeedSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the resolved dtype on ``device``, or a no-op without AMP."""
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=settings.amp_dtype)


def grad_scaler(settings: SpeedSettings, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for float16 autocast, else None."""
    return torch.amp.GradScaler(device.type) if settings.needs_grad_scaler else None


def apply_backend_flags(settings: SpeedSettings, device: torch.device) -> None:
    """Set ``torch.backends.cudnn.benchmark`` for CUDA runs (a CPU run leaves global state alone)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark


@contextlib.contextmanager
def process_settings_restored() -> Iterator[None]:
    """Run a block that may change process-wide torch settings (``cudnn.benchmark``, intra-op threads) and
    put them back afterwards: ``train`` called from a library or notebook leaves the process as it found it
    (a later ``predict`` on images of varying shapes must not inherit the training run's cuDNN benchmark)."""
    benchmark, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.set_num_threads(threads)


def memory_format(settings: SpeedSettings, ndim: int = 4) -> torch.memory_format:
    """``channels_last`` (``channels_last_3d`` for 5-D tensors) when switched on, else ``preserve_format``."""
    return memory_format_for(True, ndim) if settings.channels_last else torch.preserve_format


def reset_peak_gpu_memory(device: torch.device) -> None:
    """Start counting the peak CUDA memory of ``device`` from now (nothing on other devices)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_memory_gb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on CUDA ``device`` since the last reset, in GB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9
