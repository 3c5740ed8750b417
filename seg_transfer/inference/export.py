"""Export a checkpoint's network to ONNX, checked against onnxruntime, with its input contract beside it.

Only the network is exported: a batch of 2.5D slabs ``input`` ``(batch, 2k+1, height, width)`` float32
in, raw class scores ``logits`` ``(batch, classes, height, width)`` out (softmax over axis 1, arg-max
gives the label); for the 3D route ``(batch, 1, x, y, z)`` windows in, ``(batch, classes, x, y, z)`` out. Preprocessing, slab building, padding and mapping back to the scan stay with the
caller; the JSON contract written beside the model (``<model>.onnx.json``) says exactly what they are.

Batch, height and width are dynamic axes. Height and width must be multiples of the encoder's output
stride (32 for most encoders): pad the slab at the end of both in-plane axes with the volume's minimum
and crop the logits back, as ``seg-transfer predict`` does. Every export is run through onnxruntime
at two batch sizes and two spatial sizes and compared with torch; if the traced graph does not
generalise over spatial sizes (an architecture with shape-dependent constants), the export falls back
to a fixed spatial size, and the contract says so.

The TorchScript exporter (``dynamo=False``) is used: in torch 2.14 the ``torch.export``-based exporter
did not finish within minutes on these U-Nets with dynamic height and width, while the TorchScript
one takes about a second and matches torch to ~1e-5.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg_transfer import __version__
from seg_transfer.atomic import write_atomic
from seg_transfer.errors import UserError, one_line
from seg_transfer.routes.base import InferenceOptions, trained_mirrorings
from seg_transfer.routes.network import LoadedNetwork, load_network

log = logging.getLogger(__name__)

CONTRACT_FORMAT = "seg_transfer-onnx/1"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20  # TorchScript exporter range in torch 2.x (20 is its maximum)
DEFAULT_TOLERANCE = 1e-3
INSTALL_HINT = 'pip install "seg-transfer[export]"'


class ExportError(UserError, RuntimeError):
    """Export impossible or not faithful (missing packages, bad options, onnxruntime disagrees): one line."""


@dataclass(frozen=True)
class ShapeCheck:
    """One onnxruntime-vs-torch comparison on a random input of ``shape``."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and how closely onnxruntime reproduced torch."""

    model_path: Path
    contract_path: Path
    checks: list[ShapeCheck]
    dynamic_spatial: bool
    contract: dict[str, Any] = field(repr=False)

    @property
    def max_abs_diff(self) -> float:
        return max(check.max_abs_diff for check in self.checks)


def contract_path_for(model_path: str | Path) -> Path:
    """The JSON contract beside an exported model: ``model.onnx`` → ``model.onnx.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)`` modules; :class:`ExportError` naming the extra to install if either is missing."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({exc.name or 'import'} missing): {INSTALL_HINT}") from None
    return onnx, onnxruntime


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    size: int = 256,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> ExportResult:
    """Export ``checkpoint`` (file or run directory) to ONNX at ``output`` and its contract to ``output.json``.

    ``size`` is the square slice side used to trace and check (a multiple of the encoder stride).
    Raises :class:`ExportError` if onnxruntime differs from torch by more than ``tolerance``
    (max absolute difference of the logits); nothing is written then. The model is exported and
    checked in memory; both files are then written atomically (temp file, then rename).
    """
    require_onnx()
    _check_opset(opset)
    network = load_network(checkpoint)
    sample_shape, other_shape = trace_shapes(network, size)
    model_bytes, checks, dynamic_spatial = export_module(network.model, sample_shape, other_shape,
                                                         opset=opset, tolerance=tolerance, seed=seed)
    output = Path(output)
    contract = build_contract(network, output.name, opset, dynamic_spatial, size, checks, tolerance)
    write_atomic(output, model_bytes)
    contract_path = write_atomic(contract_path_for(output), json.dumps(contract, indent=2) + "\n")
    return ExportResult(output, contract_path, checks, dynamic_spatial, contract)


def trace_shapes(network: LoadedNetwork, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Input shapes to trace and to check (the route's :class:`RouteExport`); the second has another batch size
    and grows every spatial axis by a different multiple of the network's stride."""
    return ROUTE_EXPORTS[network.route.name].trace_shapes(network, size)


def export_module(
    model: nn.Module,
    sample_shape: tuple[int, ...],
    other_shape: tuple[int, ...],
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> tuple[bytes, list[ShapeCheck], bool]:
    """Export ``model`` with dynamic batch, height and width; returns ``(onnx bytes, checks, dynamic_spatial)``.

    The graph is checked with onnxruntime at ``sample_shape`` and at ``other_shape`` (another batch
    size and spatial size). If the spatially dynamic graph fails at ``other_shape`` it is exported
    again with only the batch dynamic (``dynamic_spatial`` False) and checked at the sample size and
    another batch size. Raises :class:`ExportError` when a required check exceeds ``tolerance``.
    """
    model = model.cpu().eval()
    model_bytes = _torch_to_onnx(model, sample_shape, opset, spatial=True)
    first = compare_with_torch(model, model_bytes, sample_shape, seed)
    _raise_if_above(first, tolerance)
    try:
        second = compare_with_torch(model, model_bytes, other_shape, seed + 1)
    except Exception as exc:  # noqa: BLE001 - onnxruntime rejects shapes with several exception types
        log.debug("spatially dynamic graph fails at %s: %s", other_shape, exc)
        second = None
    if second is not None and second.max_abs_diff <= tolerance:
        return model_bytes, [first, second], True
    log.warning("the traced graph does not generalise over spatial sizes; exporting with a fixed %s input",
                "x".join(str(n) for n in sample_shape[2:]))
    model_bytes = _torch_to_onnx(model, sample_shape, opset, spatial=False)
    other_batch = 1 if sample_shape[0] != 1 else 2  # the batch axis stays dynamic: check it at another size
    checks = [compare_with_torch(model, model_bytes, shape, seed + i)
              for i, shape in enumerate((sample_shape, (other_batch, *sample_shape[1:])))]
    for check in checks:
        _raise_if_above(check, tolerance)
    return model_bytes, checks, False


def compare_with_torch(model: nn.Module, model_bytes: bytes, shape: tuple[int, ...], seed: int) -> ShapeCheck:
    """Max absolute difference between onnxruntime (CPU) and torch logits on a seeded standard-normal input."""
    _, onnxruntime = require_onnx()
    inputs = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
    with torch.no_grad():
        torch_out = model(torch.from_numpy(inputs)).numpy()
    if onnx_out.shape != torch_out.shape:
        raise ExportError(f"onnxruntime output shape {onnx_out.shape} differs from torch {torch_out.shape} for input {shape}")
    return ShapeCheck(tuple(int(n) for n in shape), float(np.max(np.abs(onnx_out - torch_out))))


def build_contract(
    network: LoadedNetwork,
    model_file: str,
    opset: int,
    dynamic_spatial: bool,
    size: int,
    checks: list[ShapeCheck],
    tolerance: float,
) -> dict[str, Any]:
    """The JSON-ready description of the exported model: input/output contract, preprocessing, labels."""
    classes = len(network.labels)
    spatial = _spatial_names(network.route.spatial_dims) if dynamic_spatial else list(checks[0].shape[2:])
    return {
        "format": CONTRACT_FORMAT,
        "model_file": model_file,
        "opset": opset,
        "source_checkpoint": str(network.path),
        "architecture": network.config.model.arch,
        "encoder": network.config.model.encoder,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", network.in_channels, *spatial],
            "channels": network.in_channels,
            "dynamic_spatial": dynamic_spatial,
            **ROUTE_EXPORTS[network.route.name].layout(network),
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", classes, *spatial],
            "classes": classes,
            "activation": "none: logits; softmax over axis 1 gives probabilities, argmax the label",
            "test_time_flips": network.flips(InferenceOptions(tta=None)),
            "trained_flips": [list(dims) for dims in trained_mirrorings(network.config.data)],
            "test_time_augmentation": ("seg-transfer predict's default: each network input (a batch of 2.5D slabs, or "
                                       "a batch of 3D sliding windows before blending) flipped along each entry of "
                                       "test_time_flips (dims of the input; [] = as is), the softmax of each flipped "
                                       "back, averaged. test_time_flips are trained_flips (the flips the network was "
                                       "trained with; predict --tta) where they raised the validation Dice at the end "
                                       "of training (validated_tta), else [[]] (as is; predict --no-tta)"),
            "validated_tta": network.validated or None,
        },
        "labels": {str(k): v for k, v in network.labels.items()},
        "preprocessing": network.prep.as_dict(),
        "verification": {
            "runtime": "onnxruntime CPUExecutionProvider",
            "tolerance": tolerance,
            "max_abs_diff": max(check.max_abs_diff for check in checks),
            "checks": [{"input_shape": list(check.shape), "max_abs_diff": check.max_abs_diff} for check in checks],
        },
        "exporter": {"seg_transfer": __version__, "torch": torch.__version__, "torch_exporter": "torchscript"},
    }


def _spatial_names(spatial_dims: int) -> list[str]:
    return ["height", "width"] if spatial_dims == 2 else ["x", "y", "z"]


def _slab_shapes(network: LoadedNetwork, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """2.5D: ``size`` x ``size`` slabs (batch 2), then batch 1 grown by one and two strides."""
    multiple = network.multiple
    _check_size(size, multiple[0])
    return (2, network.in_channels, size, size), (1, network.in_channels, size + multiple[0], size + 2 * multiple[1])


def _window_shapes(network: LoadedNetwork, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """3D: the training patch (batch 1; ``size`` unused), then batch 2 grown by one, two, three strides."""
    patch = tuple(int(p) for p in network.spec.settings["patch_size"])
    grown = tuple(p + (i + 1) * m for i, (p, m) in enumerate(zip(patch, network.multiple)))
    return (1, network.in_channels, *patch), (2, network.in_channels, *grown)


def _slab_layout(network: LoadedNetwork) -> dict[str, Any]:
    k = network.prep.context_slices
    return {"route": "2.5d", "context_slices": k, "slice_axis": network.prep.slice_axis,
            "spatial_multiple": network.multiple[0],
            "layout": (f"channel c is slice index-{k}+c along slice_axis of the preprocessed (RAS) volume, edge "
                       "slices repeated; height, width are the other two axes in order, padded at the end with the "
                       "volume minimum to spatial_multiple")}


def _window_layout(network: LoadedNetwork) -> dict[str, Any]:
    from seg_transfer.routes.volume import DEFAULT_OVERLAP, SIGMA_SCALE

    return {"route": "3d", "spatial_multiple": list(network.multiple), "window": list(network.spec.settings["patch_size"]),
            "sliding_window": {"overlap": DEFAULT_OVERLAP, "blend": "gaussian", "sigma_scale": SIGMA_SCALE,
                               "average": "softmax probabilities", "padding": "volume minimum"},
            "layout": ("channel 0 is the preprocessed (RAS) volume (x, y, z); infer windows of `window` voxels with "
                       f"overlap {DEFAULT_OVERLAP} and Gaussian blending of the softmax probabilities (sigma "
                       f"{SIGMA_SCALE} of the window, MONAI sliding_window_inference's sigma_scale), padding with "
                       "the volume minimum")}


@dataclass(frozen=True)
class RouteExport:
    """What export needs per route: ``trace_shapes(network, size)`` and ``layout(network)``, the contract's
    description of how a caller builds the input from the preprocessed volume."""

    trace_shapes: Callable[[LoadedNetwork, int], tuple[tuple[int, ...], tuple[int, ...]]]
    layout: Callable[[LoadedNetwork], dict[str, Any]]


ROUTE_EXPORTS = {"2.5d": RouteExport(_slab_shapes, _slab_layout), "3d": RouteExport(_window_shapes, _window_layout)}


def _torch_to_onnx(model: nn.Module, sample_shape: tuple[int, ...], opset: int, spatial: bool) -> bytes:
    """The checked ONNX model (bytes) of ``model`` traced at ``sample_shape``; batch (and the spatial axes if
    ``spatial``) dynamic."""
    onnx, _ = require_onnx()
    names = _spatial_names(len(sample_shape) - 2)
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(names)}} if spatial else {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy-exporter notices
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                model, (torch.zeros(sample_shape, dtype=torch.float32),), buffer, dynamo=False,
                opset_version=opset, do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            )
        except Exception as exc:  # noqa: BLE001 - unsupported operators etc. become one line
            raise ExportError(f"torch.onnx.export failed ({one_line(exc, limit=200)})") from None
    model_bytes = buffer.getvalue()
    onnx.checker.check_model(model_bytes)
    return model_bytes


def _raise_if_above(check: ShapeCheck, tolerance: float) -> None:
    if not np.isfinite(check.max_abs_diff) or check.max_abs_diff > tolerance:
        raise ExportError(f"onnxruntime differs from torch by {check.max_abs_diff:.3g} (> tolerance {tolerance:g}) "
                          f"for input {list(check.shape)}; model not written")


def _check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: the TorchScript exporter supports opsets {MIN_OPSET} to {MAX_OPSET}")


def _check_size(size: int, stride: int) -> None:
    if size <= 0 or size % stride:
        raise ExportError(f"--size {size}: must be a positive multiple of the encoder output stride {stride}")

