"""Inflate a 2D CNN encoder (smp or timm ``tu-``) into a 3D one that keeps its ImageNet weights.

Depth convention: 3D tensors are ``(B, C, X, Y, Z)``. A 2D kernel's ``(kh, kw)`` act on ``(X, Y)``; the
inflated *depth* axis is the last one, ``Z`` (slices of a volume are ``volume[..., z]``).

Every module of the encoder is looked up by its exact class (subclasses may override ``forward``):

* :data:`CONVERTERS` replace a 2D layer by its 3D version: ``Conv2d`` / timm ``Conv2dSame`` (through the
  inflation mode), ``BatchNorm2d`` / timm ``BatchNormAct2d`` (weights and running statistics copied),
  2D pooling, ``Dropout2d`` and timm's EfficientNet ``SqueezeExcite`` (its squeeze is ``mean((2, 3))``);
* :data:`AGNOSTIC_MODULES` are kept as they are because their ``forward`` works on 5D tensors
  (containers, activations, the smp/timm/torchvision blocks whose ``forward`` only chains children);
* anything else fails the build with :class:`InflationError`, as does a probe forward on a small 5D input
  (naming the module that raised) or a 2D state-dict tensor without a 3D counterpart. Nothing is skipped.

Inflation modes (:data:`INFLATION_MODES`), for a 2D kernel ``(kh, kw)``, depth ``kd = kh``:

* ``centre``: the 2D kernel in the centre depth slice, zeros elsewhere. On a volume that is constant
  along Z the 3D encoder gives, on every Z slice of every feature map, the 2D encoder's features (whenever
  each strided layer's centre tap falls inside the input: odd kernels with symmetric padding or 'SAME').
* ``mean`` (I3D): the 2D kernel repeated ``kd`` times along depth, divided by ``kd``. On a Z-constant
  volume the features equal the 2D ones on the Z slices whose receptive field lies inside the volume;
  slices that see the zero padding along Z differ.
* ``acs`` (ACS convolutions, Yang et al. 2021): output channels split into three groups whose 2D kernels act
  on the axial ``(X, Y)``, coronal ``(X, Z)`` and sagittal ``(Y, Z)`` planes (:class:`ACSConv`); weights
  keep their 2D shapes.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import timm.layers.activations as timm_activations
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
from segmentation_models_pytorch.encoders.timm_universal import TimmUniversalEncoder
from timm.layers import BatchNormAct2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding
from timm.models._efficientnet_blocks import (
    ConvBnAct,
    DepthwiseSeparableConv,
    EdgeResidual,
    InvertedResidual,
    SqueezeExcite,
)
from timm.models.efficientnet import EfficientNetFeatures
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.models.resnet import BasicBlock, Bottleneck

from seg_transfer.errors import UserError

__all__ = [
    "AGNOSTIC_MODULES",
    "CONVERTERS",
    "INFLATION_MODES",
    "ACSConv",
    "BatchNormAct3d",
    "Conv3dSame",
    "InflationError",
    "SqueezeExcite3d",
    "inflate_encoder",
    "register_agnostic",
    "register_converter",
    "register_mode",
]

PROBE_2D = 64  # side of the 2D probe that finds the order of the downsamplings


class InflationError(UserError, RuntimeError):
    """A 2D encoder could not be inflated completely; the one-line message names what did not land."""


# --------------------------------------------------------------------------------------- registries

#: a mode turns one 2D convolution into a 3D module, given the stride it keeps along Z
InflateConv = Callable[[nn.Conv2d, int], nn.Module]
#: a converter turns one 2D module into its 3D version; children of the result are inflated afterwards
Converter = Callable[[nn.Module, "_Context", str], nn.Module]
#: returns why a module's forward is not dimension-agnostic after all (None: it is)
AgnosticCheck = Callable[[nn.Module], "str | None"]

INFLATION_MODES: dict[str, InflateConv] = {}
CONVERTERS: dict[type[nn.Module], Converter] = {}
AGNOSTIC_MODULES: dict[type[nn.Module], AgnosticCheck] = {}


def register_mode(name: str) -> Callable[[InflateConv], InflateConv]:
    """Decorator: make ``fn(conv2d, depth_stride) -> module`` available as inflation mode ``name``."""

    def add(fn: InflateConv) -> InflateConv:
        INFLATION_MODES[name] = fn
        return fn

    return add


def register_converter(*classes: type[nn.Module]) -> Callable[[Converter], Converter]:
    """Decorator: convert modules of exactly these classes with ``fn(module, context, name)``."""

    def add(fn: Converter) -> Converter:
        for cls in classes:
            CONVERTERS[cls] = fn
        return fn

    return add


def register_agnostic(cls: type[nn.Module], check: AgnosticCheck | None = None) -> None:
    """Keep modules of exactly ``cls`` (their children are still inflated): their forward works on 5D."""
    AGNOSTIC_MODULES[cls] = check or (lambda _module: None)


@dataclass
class _Context:
    inflate_conv: InflateConv
    keep_depth: set[str]  # names of strided layers that keep stride 1 along Z
    failures: list[str] = field(default_factory=list)

    def depth_stride(self, name: str, stride: int) -> int:
        return 1 if name in self.keep_depth else stride


# ------------------------------------------------------------------------------------ convolutions


def pad_same_3d(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """TensorFlow 'SAME' zero padding of a 5D tensor, per axis as timm's ``pad_same`` (extra pixel at the end)."""
    pads: list[int] = []
    for size, k, s, d in reversed(list(zip(x.shape[2:], kernel, stride, dilation))):
        total = get_same_padding(int(size), k, s, d)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Conv3dSame(nn.Conv3d):
    """``nn.Conv3d`` with TensorFlow 'SAME' padding computed from the input size (timm's ``Conv2dSame`` in 3D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same_3d(x, self.kernel_size, self.stride, self.dilation)
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _centre_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    kernel = weight.new_zeros(*weight.shape, depth)
    kernel[..., depth // 2] = weight
    return kernel


def _mean_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    return weight.unsqueeze(-1).expand(*weight.shape, depth) / depth


def _dense_conv3d(conv: nn.Conv2d, depth_stride: int, kernel_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> nn.Conv3d:
    """A Conv3d of kernel ``(kh, kw, kh)``; Z takes the X axis' padding and dilation."""
    kh, kw = conv.kernel_size
    same = type(conv) is Conv2dSame
    padding = conv.padding if isinstance(conv.padding, str) else (*conv.padding, conv.padding[0])
    new = (Conv3dSame if same else nn.Conv3d)(
        conv.in_channels,
        conv.out_channels,
        (kh, kw, kh),
        stride=(*conv.stride, depth_stride),
        padding=0 if same else padding,
        dilation=(*conv.dilation, conv.dilation[0]),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(kernel_fn(conv.weight, kh))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


@register_mode("centre")
def _inflate_centre(conv: nn.Conv2d, depth_stride: int) -> nn.Module:
    return _dense_conv3d(conv, depth_stride, _centre_kernel)


@register_mode("mean")
def _inflate_mean(conv: nn.Conv2d, depth_stride: int) -> nn.Module:
    return _dense_conv3d(conv, depth_stride, _mean_kernel)


@register_mode("acs")
def _inflate_acs(conv: nn.Conv2d, depth_stride: int) -> nn.Module:
    return ACSConv(conv, depth_stride)


#: plane -> the spatial axis (0=X, 1=Y, 2=Z) its kernels do not extend along
ACS_PLANES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}


@dataclass(frozen=True)
class _ACSGroup:
    plane: str
    out: slice
    inp: slice
    groups: int


def acs_groups(out_channels: int, in_channels: int, groups: int) -> list[_ACSGroup]:
    """Output channels of each plane: sizes ``(n - 2*(n//3), n//3, n//3)`` in units of output channels,
    or of whole convolution groups for a grouped conv (so each output channel keeps its input channels)."""
    units = out_channels if groups == 1 else groups
    per_out, per_in = (1, in_channels) if groups == 1 else (out_channels // groups, in_channels // groups)
    third = units // 3
    result, start = [], 0
    for plane, size in zip(ACS_PLANES, (units - 2 * third, third, third)):
        if size == 0:
            continue
        stop = start + size
        inp = slice(None) if groups == 1 else slice(start * per_in, stop * per_in)
        result.append(_ACSGroup(plane, slice(start * per_out, stop * per_out), inp, 1 if groups == 1 else size))
        start = stop
    return result


class ACSConv(nn.Module):
    """ACS convolution built from a 2D convolution: the 2D kernels of the axial, coronal and sagittal output
    channel groups (:func:`acs_groups`) act on the ``(X, Y)``, ``(X, Z)`` and ``(Y, Z)`` planes.

    ``weight`` and ``bias`` keep the 2D names and shapes; for each group ``(kh, kw)`` map onto the plane's
    two axes in ``(X, Y, Z)`` order, kernel 1 along the third. Stride along Z is ``depth_stride``.
    """

    def __init__(self, conv: nn.Conv2d, depth_stride: int) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise InflationError(f"ACS inflation supports zero padding only, not padding_mode={conv.padding_mode!r}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=conv.weight.requires_grad)
        bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), conv.bias.requires_grad)
        self.register_parameter("bias", bias)
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size_2d, self.dilation_2d = tuple(conv.kernel_size), tuple(conv.dilation)
        self.padding_2d = conv.padding  # (ph, pw) or 'same' / 'valid'
        self.same = type(conv) is Conv2dSame
        self.stride = (*conv.stride, depth_stride)
        self.acs = acs_groups(conv.out_channels, conv.in_channels, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._plane(x, group) for group in self.acs], dim=1)

    def _plane(self, x: torch.Tensor, group: _ACSGroup) -> torch.Tensor:
        normal = ACS_PLANES[group.plane]
        weight = self.weight[group.out].unsqueeze(2 + normal)
        bias = None if self.bias is None else self.bias[group.out]
        dilation = _insert(self.dilation_2d, normal, 1)
        x = x[:, group.inp]
        if self.same:
            x, padding = pad_same_3d(x, tuple(weight.shape[2:]), self.stride, dilation), 0
        else:
            padding = self.padding_2d if isinstance(self.padding_2d, str) else _insert(self.padding_2d, normal, 0)
        return F.conv3d(x, weight, bias, self.stride, padding, dilation, group.groups)

    def extra_repr(self) -> str:
        planes = ", ".join(f"{g.plane}={g.out.stop - g.out.start}" for g in self.acs)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size_2d}, stride={self.stride}, "
                f"groups={self.groups}, same={self.same}, {planes}")


def _insert(pair: tuple[int, ...], index: int, value: int) -> tuple[int, ...]:
    values = list(pair)
    values.insert(index, value)
    return tuple(values)


@register_converter(nn.Conv2d, Conv2dSame)
def _convert_conv(conv: nn.Conv2d, context: _Context, name: str) -> nn.Module:
    return context.inflate_conv(conv, context.depth_stride(name, conv.stride[0]))


# ------------------------------------------------------------------------------ norms, pools, others


class BatchNormAct3d(nn.BatchNorm3d):
    """timm's ``BatchNormAct2d`` in 3D: BatchNorm3d, then ``drop`` and ``act`` (the same state-dict keys).

    SyncBatchNorm converters (torch's, timm's) do not know this class and would drop ``act``: convert it
    to timm's ``SyncBatchNormAct`` with ``act`` and ``drop`` carried over.
    """

    def __init__(self, *args, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _batchnorm3d(bn: nn.BatchNorm2d, cls: type[nn.BatchNorm3d] = nn.BatchNorm3d, **extra) -> nn.BatchNorm3d:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device=_device(bn), dtype=_dtype(bn), **extra)
    new.load_state_dict(bn.state_dict())  # weight, bias, running_mean/var, num_batches_tracked: copied exactly
    return new


@register_converter(nn.BatchNorm2d)
def _convert_bn(bn: nn.BatchNorm2d, _context: _Context, _name: str) -> nn.Module:
    return _batchnorm3d(bn)


@register_converter(BatchNormAct2d)
def _convert_bn_act(bn: BatchNormAct2d, _context: _Context, _name: str) -> nn.Module:
    return _batchnorm3d(bn, BatchNormAct3d, drop=bn.drop, act=bn.act)


def _depth_triple(value, depth: int | None = None) -> tuple:
    """2D ``(x, y)`` argument to 3D ``(x, y, depth)``; ``depth`` defaults to the X value."""
    x, y = _pair(value)
    return (x, y, x if depth is None else depth)


@register_converter(nn.MaxPool2d)
def _convert_maxpool(pool: nn.MaxPool2d, context: _Context, name: str) -> nn.Module:
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return nn.MaxPool3d(_depth_triple(pool.kernel_size), _depth_triple(stride, context.depth_stride(name, stride[0])),
                        _depth_triple(pool.padding), _depth_triple(pool.dilation), pool.return_indices, pool.ceil_mode)


@register_converter(nn.AvgPool2d)
def _convert_avgpool(pool: nn.AvgPool2d, context: _Context, name: str) -> nn.Module:
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return nn.AvgPool3d(_depth_triple(pool.kernel_size), _depth_triple(stride, context.depth_stride(name, stride[0])),
                        _depth_triple(pool.padding), pool.ceil_mode, pool.count_include_pad, pool.divisor_override)


@register_converter(nn.AdaptiveAvgPool2d)
def _convert_adaptive_avg(pool: nn.AdaptiveAvgPool2d, _context: _Context, _name: str) -> nn.Module:
    return nn.AdaptiveAvgPool3d(_depth_triple(pool.output_size))


@register_converter(nn.AdaptiveMaxPool2d)
def _convert_adaptive_max(pool: nn.AdaptiveMaxPool2d, _context: _Context, _name: str) -> nn.Module:
    return nn.AdaptiveMaxPool3d(_depth_triple(pool.output_size), pool.return_indices)


@register_converter(nn.Dropout2d)
def _convert_dropout(drop: nn.Dropout2d, _context: _Context, _name: str) -> nn.Module:
    return nn.Dropout3d(drop.p, drop.inplace)


class SqueezeExcite3d(nn.Module):
    """timm's EfficientNet ``SqueezeExcite`` squeezing over all three spatial axes (same children, same keys)."""

    def __init__(self, se: SqueezeExcite) -> None:
        super().__init__()
        self.conv_reduce, self.act1, self.conv_expand, self.gate = se.conv_reduce, se.act1, se.conv_expand, se.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3, 4), keepdim=True))))
        return x * self.gate(scale)


@register_converter(SqueezeExcite)
def _convert_se(se: SqueezeExcite, _context: _Context, _name: str) -> nn.Module:
    return SqueezeExcite3d(se)


def _timm_universal_check(encoder: TimmUniversalEncoder) -> str | None:
    if encoder._is_channel_last or encoder._is_transformer_style:
        return "channel-last / transformer-style feature handling is 4D-only"
    return None


def _register_defaults() -> None:
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Dropout, nn.AlphaDropout)
    activations = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                   nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus)
    timm_acts = tuple(cls for cls in vars(timm_activations).values()
                      if inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == timm_activations.__name__)
    blocks = (BasicBlock, Bottleneck, ResNetEncoder, EfficientNetFeatures, DepthwiseSeparableConv,
              InvertedResidual, ConvBnAct, EdgeResidual)
    for cls in (*containers, *activations, *timm_acts, *blocks):
        register_agnostic(cls)
    register_agnostic(TimmUniversalEncoder, _timm_universal_check)
    try:
        from timm.layers import (
            DropPath,  # per-sample mask of shape (B, 1, ..., 1): any number of dims
        )
    except ImportError:  # pragma: no cover - timm always has it
        return
    register_agnostic(DropPath)


_register_defaults()


# ----------------------------------------------------------------------------------------- the walk


def _inflate_tree(module: nn.Module, name: str, context: _Context) -> nn.Module:
    """``module`` in 3D (converted, or kept with its children inflated); failures go to ``context``."""
    kind = type(module)
    label = name or "<encoder>"
    if kind in CONVERTERS:
        try:
            new = CONVERTERS[kind](module, context, name)
        except InflationError as exc:
            context.failures.append(f"{label} ({kind.__name__}: {exc})")
            return module
        _carry_flags(module, new)
        module = new
    elif kind in AGNOSTIC_MODULES:
        reason = AGNOSTIC_MODULES[kind](module)
        if reason:
            context.failures.append(f"{label} ({kind.__module__}.{kind.__qualname__}: {reason})")
            return module
    else:
        has_params = any(True for _ in module.parameters(recurse=False))
        what = "unknown module with parameters" if has_params else "unknown module, forward may be 2D-only"
        context.failures.append(f"{label} ({kind.__module__}.{kind.__qualname__}: {what})")
        return module
    for child_name, child in list(module.named_children()):
        setattr(module, child_name, _inflate_tree(child, f"{name}.{child_name}" if name else child_name, context))
    return module


def _carry_flags(old: nn.Module, new: nn.Module) -> None:
    """Train/eval mode and ``requires_grad`` of same-named parameters go with the conversion."""
    new.training = old.training
    for key, param in new.named_parameters(recurse=False):
        source = getattr(old, key, None)
        if isinstance(source, torch.Tensor):
            param.requires_grad_(source.requires_grad)


def _device(module: nn.Module) -> torch.device | None:
    tensor = next(iter(module.state_dict().values()), None)
    return None if tensor is None else tensor.device


def _dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters()), None)


def _input_channels(encoder: nn.Module) -> int:
    channels = getattr(encoder, "out_channels", None)
    if channels:
        return int(channels[0])  # smp convention: the first "feature" is the input
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise InflationError(f"{type(encoder).__name__} has no Conv2d: cannot tell its input channels")
    return conv.in_channels


def _spatial_stride(module: nn.Module) -> int:
    """Stride along X of a layer the walk converts (1 for all others)."""
    if isinstance(module, nn.Conv2d):
        return module.stride[0]
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pair(module.stride if module.stride is not None else module.kernel_size)[0]
    return 1


def depth_stride_one_layers(encoder_2d: nn.Module, stages: int) -> set[str]:
    """Names of the strided layers of the first ``stages`` downsamplings, in forward order.

    A downsampling is the set of strided layers that read the same resolution (a ResNet block's conv and
    its shortcut are one downsampling). Found by a 2D probe forward in eval mode; the module is unchanged.
    """
    if stages <= 0:
        return set()
    input_stride: dict[str, int] = {}
    hooks = [
        module.register_forward_pre_hook(_record_input_stride(name, input_stride))
        for name, module in encoder_2d.named_modules()
        if _spatial_stride(module) > 1
    ]
    channels = _input_channels(encoder_2d)
    with _eval(encoder_2d), torch.no_grad():
        try:
            encoder_2d(torch.zeros(1, channels, PROBE_2D, PROBE_2D, device=_device(encoder_2d), dtype=_dtype(encoder_2d)))
        finally:
            for hook in hooks:
                hook.remove()
    steps = sorted(set(input_stride.values()))
    if stages > len(steps):
        raise InflationError(f"depth_stride_one_stages={stages} but the encoder downsamples {len(steps)} times")
    kept = set(steps[:stages])
    return {name for name, stride in input_stride.items() if stride in kept}


def _record_input_stride(name: str, input_stride: dict[str, int]):
    def hook(_module, inputs):
        input_stride.setdefault(name, max(1, PROBE_2D // int(inputs[0].shape[-1])))

    return hook


class _eval:
    """Context manager: ``module`` in eval mode, every submodule's own mode restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes = [(m, m.training) for m in module.modules()]

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *_exc) -> None:
        for module, training in self.modes:
            module.training = training


# ------------------------------------------------------------------------------------------- checks


def _check_landed(state_2d: dict[str, torch.Tensor], state_3d: dict[str, torch.Tensor]) -> None:
    """Every 2D tensor has a 3D tensor of the same name, of the same shape or that shape plus a depth axis."""
    problems = [f"{key} missing" for key in state_2d if key not in state_3d]
    for key, value in state_2d.items():
        if key in state_3d:
            shape_2d, shape_3d = tuple(value.shape), tuple(state_3d[key].shape)
            if shape_3d != shape_2d and shape_3d[:-1] != shape_2d:
                problems.append(f"{key} {shape_2d} -> {shape_3d}")
    problems += [f"{key} unexpected" for key in state_3d if key not in state_2d]
    if problems:
        raise InflationError(f"{len(problems)} tensor(s) did not land in the 3D encoder: {'; '.join(problems)}")


def _probe_3d(encoder: nn.Module, channels: int, size: int) -> list[torch.Tensor]:
    """Run ``encoder`` on a ``size``^3 zero volume; a module that raises or returns a non-5D tensor is named."""
    stack: list[str] = []
    not_5d: list[str] = []
    hooks = []
    for name, module in encoder.named_modules():
        label = f"{name or '<encoder>'} ({type(module).__name__})"
        hooks.append(module.register_forward_pre_hook(lambda _m, _i, label=label: stack.append(label)))
        hooks.append(module.register_forward_hook(_check_5d(label, stack, not_5d)))
    probe = torch.zeros(1, channels, size, size, size, device=_device(encoder), dtype=_dtype(encoder))
    try:
        with _eval(encoder), torch.no_grad():
            output = encoder(probe)
    except Exception as exc:
        culprit = stack[-1] if stack else "<encoder>"
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InflationError(f"the 3D probe forward failed in {culprit}: {type(exc).__name__}: {message}") from exc
    finally:
        for hook in hooks:
            hook.remove()
    if not_5d:
        raise InflationError(f"module(s) returned non-5D tensors in the 3D probe: {'; '.join(not_5d)}")
    return [output] if isinstance(output, torch.Tensor) else list(output)


def _check_5d(label: str, stack: list[str], not_5d: list[str]):
    def hook(_module, _inputs, output):
        stack.pop()
        tensors = [output] if isinstance(output, torch.Tensor) else output if isinstance(output, (list, tuple)) else []
        if any(isinstance(t, torch.Tensor) and t.ndim != 5 for t in tensors):
            not_5d.append(label)

    return hook


# --------------------------------------------------------------------------------------------- API


def inflate_encoder(encoder_2d: nn.Module, mode: str = "centre", depth_stride_one_stages: int = 0) -> nn.Module:
    """A 3D copy of ``encoder_2d`` (left untouched) with every 2D layer inflated by ``mode``.

    The copy keeps the encoder's interface (smp: ``forward(x) -> [x, f1, f2, ...]``, ``out_channels``,
    ``output_stride``) on ``(B, C, X, Y, Z)`` tensors and gains ``feature_strides``: per output feature the
    ``(X, Y, Z)`` stride, from a probe forward. ``depth_stride_one_stages=N``: the first N downsamplings
    (forward order) keep stride 1 along Z. Raises :class:`InflationError` when anything does not inflate.
    """
    if mode not in INFLATION_MODES:
        raise ValueError(f"unknown inflation mode {mode!r}; valid: {', '.join(sorted(INFLATION_MODES))}")
    encoder = copy.deepcopy(encoder_2d)
    channels = _input_channels(encoder)
    context = _Context(INFLATION_MODES[mode], depth_stride_one_layers(encoder, depth_stride_one_stages))
    encoder = _inflate_tree(encoder, "", context)
    if context.failures:
        raise InflationError(
            f"cannot inflate {len(context.failures)} module(s) to 3D: {'; '.join(context.failures)} "
            "(add a 3D version with register_converter, or register_agnostic if its forward works on 5D tensors)"
        )
    _check_landed(encoder_2d.state_dict(), encoder.state_dict())
    size = int(getattr(encoder, "output_stride", 32) or 32)
    features = _probe_3d(encoder, channels, size)
    encoder.feature_strides = tuple(
        tuple(max(1, size // int(n)) for n in feature.shape[2:]) for feature in features
    )
    encoder.inflation = mode
    return encoder
