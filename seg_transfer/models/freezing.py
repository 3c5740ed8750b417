"""Encoder stages and the freeze API used by staged fine-tuning.

An encoder *stage* is the set of layers whose output lives at one spatial resolution (stride 2, 4,
8, 16, 32) and reaches the features the decoder reads. This definition is found by tracing one forward
and backward pass, so it works for every smp and timm CNN encoder without per-family tables. Layers
that cannot change those features (timm runs every block even when ``encoder_depth`` < 5 reads only
the shallow ones; smp keeps a ResNet's deeper layers) belong to no stage and never train; the model
factory drops them (:func:`drop_unread_layers`).
``encoder_top: N`` trains the deepest N stages the decoder reads; ``encoder_fraction: F`` trains the
deepest such layers holding at least a share F of their parameters.

Frozen layers keep BatchNorm in eval mode (``frozen_bn: eval``, the default): their running mean and
variance stay the ImageNet statistics the frozen weights were trained with. Updating them from small
medical batches would shift every activation the frozen convolutions produce, and the decoder being
trained would chase a moving target. ``frozen_bn: train`` lets them adapt instead, and
``frozen_bn: adapt`` re-estimates them once on the target data (:func:`reestimate_batchnorm`) and
then keeps them fixed while their layers are frozen.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from seg_transfer.config import EncoderFraction, EncoderTop

#: what a stage trains besides the decoder and head; an int is ``EncoderTop(encoder_top=int)``
TrainSpec = Literal["decoder", "all"] | EncoderTop | EncoderFraction | int


def encoder_stages(
    encoder: nn.Module, in_channels: int, probe_size: int = 64, spatial_dims: int = 2
) -> list[list[str]]:
    """Names of the encoder parameters that reach its output features, grouped by resolution, shallow to deep.

    Each such parameter appears exactly once; parameters the returned features do not depend on
    (see :func:`drop_unread_layers`) appear in none. ``spatial_dims=3`` probes an inflated 3D
    encoder with a ``probe_size``-cube; resolution is read along the first spatial axis (X), which every
    stage downsamples (the depth axis Z may keep stride 1). The weights are left as they were.
    """
    strides, used = _probe(encoder, in_channels, probe_size, spatial_dims)
    deepest = max(strides.values(), default=1)
    by_stride: dict[int, list[str]] = {}
    for name, _param in encoder.named_parameters():
        if name in used:
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            by_stride.setdefault(strides.get(module_name, deepest), []).append(name)
    return [by_stride[s] for s in sorted(by_stride)]


def drop_unread_layers(encoder: nn.Module, in_channels: int, spatial_dims: int = 2) -> dict[str, int]:
    """Replace every encoder module whose parameters cannot change the encoder's returned features by
    ``nn.Identity`` (what is left computes exactly the same features); returns ``{module name: parameters}``
    of what was dropped. With ``encoder_depth`` < 5, timm still builds and runs the deeper blocks and smp keeps a
    ResNet's deeper layers; nothing reads them. Call it after the weights are loaded (and, for a 3D
    encoder, after inflation: inflating draws random numbers per layer, so dropping first would change
    every later random initialisation)."""
    _strides, used = _probe(encoder, in_channels, 64, spatial_dims)
    dropped: dict[str, int] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            names = [f"{prefix}{name}.{param_name}" for param_name, _ in child.named_parameters()]
            if not names or all(n in used for n in names):
                continue
            if any(n in used for n in names):
                visit(child, f"{prefix}{name}.")
                continue
            dropped[f"{prefix}{name}"] = sum(p.numel() for p in child.parameters())
            setattr(module, name, nn.Identity())

    visit(encoder, "")
    return dropped


def _probe(encoder: nn.Module, in_channels: int, probe_size: int, spatial_dims: int) -> tuple[dict[str, int], set[str]]:
    """One eval-mode forward and backward of a zero input: each module's output stride, and the names of
    the parameters that the encoder's returned features depend on (those that receive a gradient)."""
    strides: dict[str, int] = {}
    hooks = []
    for name, module in encoder.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            hooks.append(module.register_forward_hook(_record_stride(name, strides, probe_size, spatial_dims)))
    was_training = encoder.training
    params = dict(encoder.named_parameters())
    flags = {name: param.requires_grad for name, param in params.items()}
    saved_grads = {name: param.grad for name, param in params.items()}
    encoder.eval()
    try:
        for param in params.values():
            param.requires_grad_(True)
            param.grad = None
        parameter = next(iter(params.values()), None)
        device = parameter.device if parameter is not None else None
        with torch.enable_grad():
            features = encoder(torch.zeros(1, in_channels, *[probe_size] * spatial_dims, device=device))
            outputs = [f for f in (features if isinstance(features, (list, tuple)) else [features])
                       if isinstance(f, torch.Tensor) and f.requires_grad]
            if outputs:
                torch.autograd.backward([f.sum() for f in outputs])
        used = {name for name, param in params.items() if param.grad is not None}
    finally:
        for hook in hooks:
            hook.remove()
        for name, param in params.items():
            param.requires_grad_(flags[name])
            param.grad = saved_grads[name]
        encoder.train(was_training)
    return strides, used


def _record_stride(name: str, strides: dict[str, int], probe_size: int, spatial_dims: int = 2):
    def hook(_module, _inputs, output):
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(tensor, torch.Tensor) and tensor.ndim == 2 + spatial_dims and tensor.shape[2] > 0:
            strides[name] = max(1, probe_size // tensor.shape[2])

    return hook


def trainable_encoder_params(stages: list[list[str]], spec: TrainSpec, sizes: dict[str, int] | None = None) -> set[str]:
    """Names of encoder parameters that train under ``spec``; ``sizes`` ({name: numel}) is needed by
    :class:`EncoderFraction` only."""
    if spec == "decoder":
        return set()
    if spec == "all":
        return {name for stage in stages for name in stage}
    spec = _normalised(spec)
    return _SELECTORS[type(spec)](stages, spec, sizes or {})


def _normalised(spec: TrainSpec) -> TrainSpec:
    """``spec`` with a bare int written as the :class:`EncoderTop` it stands for."""
    return EncoderTop(encoder_top=spec) if isinstance(spec, int) else spec


def _top_stages(stages: list[list[str]], spec: EncoderTop, sizes: dict[str, int]) -> set[str]:
    if not 1 <= spec.encoder_top <= len(stages):
        raise ValueError(f"encoder_top={spec.encoder_top} but the encoder has {len(stages)} stages")
    return {name for stage in stages[-spec.encoder_top:] for name in stage}


def _deepest_share(stages: list[list[str]], spec: EncoderFraction, sizes: dict[str, int]) -> set[str]:
    """Whole layers (a module's own parameters), deepest first, until their parameters reach the share."""
    layers: dict[str, list[str]] = {}
    for name in (name for stage in stages for name in stage):  # shallow to deep
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    target = spec.encoder_fraction * sum(sizes[name] for names in layers.values() for name in names)
    chosen, count = set(), 0
    for names in reversed(list(layers.values())):
        if count >= target:
            break
        chosen.update(names)
        count += sum(sizes[name] for name in names)
    return chosen


_SELECTORS: dict[type, Callable[[list[list[str]], object, dict[str, int]], set[str]]] = {
    EncoderTop: _top_stages, EncoderFraction: _deepest_share}


def describe_spec(spec: TrainSpec) -> str:
    """What a stage trains, in words."""
    if spec == "decoder":
        return "decoder and head"
    if spec == "all":
        return "everything"
    spec = _normalised(spec)
    if isinstance(spec, EncoderFraction):
        return f"deepest {spec.encoder_fraction:.0%} of encoder parameters + decoder"
    top = spec.encoder_top
    return f"top {top} encoder stage{'s' if top != 1 else ''} + decoder"


def apply_trainable(model: nn.Module, stages: list[list[str]], spec: TrainSpec) -> None:
    """Set ``requires_grad``: decoder and head always train; encoder parameters as ``spec`` says."""
    sizes = {name: param.numel() for name, param in model.encoder.named_parameters()}
    trainable = trainable_encoder_params(stages, spec, sizes)
    for name, param in model.encoder.named_parameters():
        param.requires_grad_(name in trainable)
    for name, param in model.named_parameters():
        if not name.startswith("encoder."):
            param.requires_grad_(True)


def set_train_mode(model: nn.Module, frozen_bn: Literal["eval", "train", "adapt"] = "eval") -> None:
    """``model.train()``, then normalisation layers whose parameters are all frozen go to eval."""
    model.train()
    if frozen_bn == "train":
        return
    for module in model.encoder.modules():
        if isinstance(module, _NormBase):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches, device: torch.device) -> int:
    """Replace the running statistics of every encoder BatchNorm by their average over ``batches``.

    Cumulative averages (``momentum=None``) from a forward pass in train mode without gradients;
    weights are untouched. Returns the number of batches used. The model is left in eval mode.
    """
    norms = [m for m in model.encoder.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.eval()
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
        module.train()
    used = 0
    try:
        for batch in batches:
            model(batch["image"].to(device))
            used += 1
    finally:
        for module, momentum in zip(norms, momenta):
            module.momentum = momentum
        model.eval()
    return used
