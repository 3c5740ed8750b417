"""Optimiser parameter groups and learning-rate schedules for one fine-tuning stage."""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from seg_transfer.config import StageConfig


def parameter_groups(model: nn.Module, stages: list[list[str]], stage: StageConfig,
                     anchored: Collection[str] = ()) -> list[dict]:
    """Trainable parameters grouped by learning rate and weight decay.

    Decoder and head: ``lr``. Encoder stage at depth ``d`` from the top (0 = deepest):
    ``lr * encoder_lr_mult * layer_decay**d``. Biases and norm weights (1-D) get no weight decay, nor do the
    ``anchored`` parameters (names) when the stage pulls them toward their pretrained values instead.
    """
    depth_of = {name: len(stages) - 1 - i for i, names in enumerate(stages) for name in names}
    anchored = set(anchored) if stage.pretrained_decay > 0 else set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = stage.lr
        if name.startswith("encoder."):
            lr *= stage.encoder_lr_mult
            if stage.layer_decay is not None:
                lr *= stage.layer_decay ** depth_of.get(name.removeprefix("encoder."), 0)
        decay = 0.0 if param.ndim <= 1 or name in anchored else stage.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def pretrained_anchors(model: nn.Module, pretrained: bool) -> dict[str, torch.Tensor]:
    """Copies of the encoder's weights as built (its pretrained values), by parameter name; empty for a
    randomly initialised encoder (``ModelConfig.pretrained`` false). Take them before a resumed run loads its weights."""
    if not pretrained:
        return {}
    return {name: param.detach().clone() for name, param in model.named_parameters() if name.startswith("encoder.")}


def build_optimizer(model: nn.Module, stages: list[list[str]], stage: StageConfig,
                    anchors: Mapping[str, torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`; with ``stage.pretrained_decay`` and ``anchors``, every step is
    followed by the pull of each trainable anchored weight toward its anchor (decoupled L2-SP)."""
    anchors = anchors or {}
    optimizer = torch.optim.AdamW(parameter_groups(model, stages, stage, anchored=anchors))
    if stage.pretrained_decay > 0 and anchors:
        pairs = _anchor_pairs(model, optimizer, anchors)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: _pull_toward(pairs, opt, stage.pretrained_decay))
    return optimizer


def _anchor_pairs(model: nn.Module, optimizer: torch.optim.Optimizer,
                  anchors: Mapping[str, torch.Tensor]) -> list[tuple[int, nn.Parameter, torch.Tensor]]:
    """(param group index, parameter, its anchor) for every anchored parameter the optimiser steps."""
    group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    return [(group_of[id(param)], param, anchors[name]) for name, param in model.named_parameters()
            if name in anchors and id(param) in group_of]


@torch.no_grad()
def _pull_toward(pairs, optimizer: torch.optim.Optimizer, decay: float) -> None:
    for index, param, anchor in pairs:
        param.sub_(param - anchor, alpha=optimizer.param_groups[index]["lr"] * decay)


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig, steps_per_epoch: int) -> LRScheduler:
    """Per-step schedule: linear warm-up, then cosine decay, one-cycle, or constant."""
    total = stage.epochs * steps_per_epoch
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)
    total = max(total, 1)
    warmup = min(int(round(stage.warmup_epochs * steps_per_epoch)), total - 1)
    if stage.schedule == "onecycle":
        return OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total + 1,
            pct_start=max(warmup / total, 0.05),
        )
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, stage.schedule))


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def backward_and_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None,
                      scaler=None) -> float:
    """Backward, optional gradient clipping of the trainable parameters, optimiser step; returns the loss value.

    With a float16 ``scaler`` the loss is scaled, gradients are unscaled before clipping, and a step whose
    gradients overflowed is skipped."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())
