"""The training loss: Dice + CE over one output, or over a deeply supervised network's outputs."""
from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from seg_transfer.config import LossConfig
from seg_transfer.training.loss import build_loss, deep_supervision_weights


def test_weights_halve_per_level_and_sum_to_one():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_one_output_is_monai_dice_ce_as_configured():
    torch.manual_seed(0)
    logits, label = torch.randn(2, 3, 8, 8, 4), torch.randint(0, 3, (2, 1, 8, 8, 4))
    config = LossConfig(batch_dice=True, ce_weight=0.5, class_weights=[0.2, 1.0, 1.0])
    reference = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, lambda_ce=0.5,
                           weight=torch.tensor([0.2, 1.0, 1.0]))
    assert build_loss(config, 1, torch.device("cpu"))(logits, label) == pytest.approx(float(reference(logits, label)))


def test_coarser_outputs_are_scored_against_the_label_sampled_at_their_grid():
    torch.manual_seed(1)
    label = torch.randint(0, 3, (2, 1, 8, 8, 4))
    full, half = torch.randn(2, 3, 8, 8, 4), torch.randn(2, 3, 4, 4, 4)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    # nearest-exact halving samples voxel 2i + 1 along the halved axes
    expected = 2 / 3 * dice_ce(full, label) + 1 / 3 * dice_ce(half, label[:, :, 1::2, 1::2, :])
    loss = build_loss(LossConfig(), 2, torch.device("cpu"))([full, half], label)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
