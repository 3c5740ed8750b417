"""The collapse rule: when a run counts as not learning a class (README, "Collapse detection").

Pure functions of a run's stages and per-class validation Dice, shared by the trainer and
``benchmarks/collapse_rule.py`` (which replays finished studies through them).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from seg_transfer.config import StageConfig


def planned_encoder_epochs(stages: Sequence[StageConfig]) -> int:
    """Epochs of the stages that train (part of) the encoder, i.e. every stage but decoder-only ones."""
    return sum(stage.epochs for stage in stages if stage.train != "decoder")


def collapse_check_due(encoder_epochs: int, planned_encoder_epochs: int, after_fraction: float) -> bool:
    """Whether validations are checked for collapse yet: once the encoder has trained for ``after_fraction``
    of the run's planned encoder-training epochs (at least one)."""
    return encoder_epochs >= max(1, math.ceil(after_fraction * planned_encoder_epochs))


def collapsed_classes(per_class: dict[str, float], min_class_dice: float, relative_dice: float = 0.0) -> list[str]:
    """Classes the network is not learning: Dice below ``min_class_dice``, or below ``relative_dice`` x the best
    class's Dice (NaN counts as collapsed)."""
    best = max((v for v in per_class.values() if v == v), default=0.0)
    floor = max(min_class_dice, relative_dice * best)
    return [name for name, value in per_class.items() if not value >= floor]
