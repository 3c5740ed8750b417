"""The training loss: MONAI's Dice + cross-entropy, over every output of a deeply supervised network.

A network with deep supervision (``model.deep_supervision``, 3D route) returns in training mode a list
of logits, full resolution first, then coarser decoder levels; in eval mode only the full-resolution
logits. :class:`DeepSupervisedLoss` (MONAI's ``DeepSupervisionLoss``) scores each output against the
label map brought to its grid by nearest-neighbour sampling and sums them with weights halving per level,
normalised to sum 1 (nnU-Net v2's weighting, without dropping the coarsest level). A single tensor is
scored as it is, so the same loss object serves networks with and without deep supervision.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceCELoss

from seg_transfer.config import LossConfig

Logits = torch.Tensor | Sequence[torch.Tensor]


def deep_supervision_weights(levels: int) -> list[float]:
    """``levels`` weights halving per level, summing to 1 (full resolution first)."""
    raw = [0.5**level for level in range(levels)]
    return [w / sum(raw) for w in raw]


class DeepSupervisedLoss(DeepSupervisionLoss):
    """MONAI's ``DeepSupervisionLoss`` with integer label maps: a coarser output's target is the label map
    sampled at that output's grid (``nearest-exact``, which PyTorch implements for floating tensors only)."""

    def __init__(self, loss: torch.nn.Module, levels: int) -> None:
        super().__init__(loss, weights=deep_supervision_weights(levels))

    def get_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (MONAI's name)
        if input.shape[2:] != target.shape[2:]:
            target = F.interpolate(target.float(), size=input.shape[2:], mode=self.interp_mode).round().long()
        return self.loss(input, target)


def build_loss(config: LossConfig, levels: int, device: torch.device) -> DeepSupervisedLoss:
    """Dice + CE as ``config`` says (per-sample or batch Dice, weights, class weights) over ``levels`` outputs."""
    weights = config.class_weights
    dice_ce = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        lambda_dice=config.dice_weight,
        lambda_ce=config.ce_weight,
        batch=config.batch_dice,
        weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
    )
    return DeepSupervisedLoss(dice_ce, levels)


def as_float(logits: Logits) -> Logits:
    """Logits (one tensor or a deep-supervision list) in float32, for a loss computed outside autocast."""
    if isinstance(logits, torch.Tensor):
        return logits.float()
    return [level.float() for level in logits]
