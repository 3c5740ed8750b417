"""3D Dice per class with MONAI metrics."""
from __future__ import annotations

import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot


def dice_per_class(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of classes ``1..num_classes-1`` between two ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) label maps.

    A class absent from both counts as 1.0, absent from the label only as 0.0 (MONAI ``ignore_empty=False``).
    """
    pred = one_hot(prediction.reshape(1, 1, *prediction.shape[-3:]).long(), num_classes)
    true = one_hot(label.reshape(1, 1, *label.shape[-3:]).long(), num_classes)
    scores = compute_dice(pred, true, include_background=False, ignore_empty=False)
    return [float(v) for v in scores[0]]
