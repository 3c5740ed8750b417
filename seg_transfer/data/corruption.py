"""Corruptions that restoration pretraining teaches a network to undo (Models Genesis, Zhou et al. 2019).

A 2.5D slab (channel-first, ``(C, H, W)``) is corrupted by, each with its own probability: a random monotone
intensity curve (MONAI ``RandHistogramShift``), pixels shuffled inside small random boxes
(``RandCoarseShuffle``), and painting with random values (``RandCoarseDropout``): either inside a few boxes
(in-painting) or everywhere outside them (out-painting). Box sizes scale with the slab's shorter side, so
the same config suits 35 px and 512 px slices. A sample's corruption depends only on its seed.
"""
from __future__ import annotations

import numpy as np
from monai.transforms import RandCoarseDropout, RandCoarseShuffle, RandHistogramShift, Transform

from seg_transfer.config import RestorationConfig


def _side_fraction(side: int, fraction: float) -> int:
    return max(1, int(round(side * fraction)))


def _shuffle(side: int) -> RandCoarseShuffle:
    return RandCoarseShuffle(holes=8, max_holes=16, spatial_size=_side_fraction(side, 1 / 12),
                             max_spatial_size=_side_fraction(side, 1 / 6), prob=1.0)


def _inpaint(side: int) -> RandCoarseDropout:
    return RandCoarseDropout(holes=3, max_holes=6, spatial_size=_side_fraction(side, 1 / 8),
                             max_spatial_size=_side_fraction(side, 1 / 3), dropout_holes=True, prob=1.0)


def _outpaint(side: int) -> RandCoarseDropout:
    """Keeps one to three boxes of 3/7 to 4/7 of the side (Models Genesis' sizes) and paints the rest (~3/4 of the slab)."""
    return RandCoarseDropout(holes=1, max_holes=3, spatial_size=_side_fraction(side, 3 / 7),
                             max_spatial_size=_side_fraction(side, 4 / 7), dropout_holes=False, prob=1.0)


class SlabCorruption:
    """``corruption(slab, seed)`` -> a corrupted float32 copy of ``slab`` (``(C, H, W)``), the same for the same seed."""

    def __init__(self, config: RestorationConfig):
        self.config = config

    def _chosen(self, side: int, rng: np.random.Generator) -> list[Transform]:
        config, chosen = self.config, []
        if rng.random() < config.intensity_prob:
            chosen.append(RandHistogramShift(num_control_points=(5, 10), prob=1.0))
        if rng.random() < config.shuffle_prob:
            chosen.append(_shuffle(side))
        if rng.random() < config.paint_prob:
            chosen.append(_outpaint(side) if rng.random() < config.outpaint_share else _inpaint(side))
        return chosen

    def __call__(self, slab: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.array(slab, dtype=np.float32, copy=True)
        for transform in self._chosen(min(out.shape[1:]), rng):
            transform.set_random_state(seed=int(rng.integers(2**31)))
            out = np.asarray(transform(out), dtype=np.float32)
        return out
