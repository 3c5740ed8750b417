"""Restoration pretraining's samples: corruptions a network learns to undo (Models Genesis, Zhou et al. 2019)
and the (corrupted, original) pairs of each route (2.5D slabs, 3D patches).

A channel-first sample (a 2.5D slab ``(C, H, W)`` or a 3D patch ``(1, X, Y, Z)``) is corrupted by, each with
its own probability: a random monotone intensity curve (MONAI ``RandHistogramShift``), voxels shuffled inside
small random boxes (``RandCoarseShuffle``), and painting with random values (``RandCoarseDropout``): either
inside a few boxes (in-painting) or everywhere outside them (out-painting). Box sizes scale with the sample's
shortest side, so the same config suits 35 px and 512 px slices and 3D patches (cubes there). A sample's
corruption depends only on its seed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import RandCoarseDropout, RandCoarseShuffle, RandHistogramShift, Transform
from torch.utils.data import Dataset

from seg_transfer.config import RestorationConfig
from seg_transfer.data.patches import padding_to
from seg_transfer.data.slices import SliceIndex, pad_to_multiple, slab


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


class Corruption:
    """``corruption(sample, seed)`` -> a corrupted float32 copy of a channel-first ``sample`` (2D or 3D), the same
    for the same seed."""

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

    def __call__(self, sample: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.array(sample, dtype=np.float32, copy=True)
        for transform in self._chosen(min(out.shape[1:]), rng):
            transform.set_random_state(seed=int(rng.integers(2**31)))
            out = np.asarray(transform(out), dtype=np.float32)
        return out


#: held-out samples scored before and after pretraining, at most (fixed by the seed)
HELD_OUT_SAMPLES = 256
#: 3D held-out patches per scan (a 2.5D held-out set draws its slabs from every slice)
HELD_OUT_PATCHES_PER_SCAN = 4


class RestorationSlabs(Dataset):
    """``count`` (corrupted, original) 2.5D slab pairs of image-only ``volumes``, slices drawn uniformly by
    ``seed`` (whole shuffled passes, as training draws them); item ``i`` is the same every time:
    ``{"image": corrupted (C,H,W), "target": original (C,H,W)}``, both padded to ``multiple``.
    ``count=None``: a held-out set, :data:`HELD_OUT_SAMPLES` slabs at most."""

    def __init__(self, volumes, axis: int, context: int, multiple: int, corruption: Corruption, count: int | None,
                 seed: int):
        self.volumes, self.axis, self.context, self.multiple, self.corruption = volumes, axis, context, multiple, corruption
        depths = [item["image"].shape[1 + axis] for item in volumes]
        index = SliceIndex(depths, [np.empty(0, np.int64)] * len(depths))
        self.pairs = index.pairs
        count = min(HELD_OUT_SAMPLES, sum(depths)) if count is None else count
        self.order = index.epoch_order(seed, 0, count, None)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        case, index = self.pairs[self.order[item]]
        original = slab(self.volumes[int(case)]["image"], self.axis, int(index), self.context).astype(np.float32, copy=False)
        return _pair(original, self.corruption, self.seed, item, lambda a, fill: pad_to_multiple(a, self.multiple, value=fill))


class RestorationPatches(Dataset):
    """``count`` (corrupted, original) 3D patch pairs of image-only ``volumes``: item ``i`` is a ``patch_size``
    crop of volume ``i mod len(volumes)`` (volumes in a fresh seeded order every pass), at a position drawn
    from ``(seed, i)``, the volume first padded with its minimum where it is smaller than the patch;
    ``{"image": corrupted (1,X,Y,Z), "target": original (1,X,Y,Z)}``. ``count=None``: a held-out set,
    :data:`HELD_OUT_PATCHES_PER_SCAN` patches per volume (at most :data:`HELD_OUT_SAMPLES`)."""

    def __init__(self, volumes, patch_size: Sequence[int], corruption: Corruption, count: int | None, seed: int):
        self.volumes, self.patch_size, self.corruption, self.seed = volumes, tuple(int(s) for s in patch_size), corruption, seed
        count = min(HELD_OUT_SAMPLES, HELD_OUT_PATCHES_PER_SCAN * len(volumes)) if count is None else count
        passes = -(-count // len(volumes))
        rng = np.random.default_rng([seed, 11])
        self.order = np.concatenate([rng.permutation(len(volumes)) for _ in range(passes)])[:count]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        image = np.asarray(self.volumes[int(self.order[item])]["image"], dtype=np.float32)
        original = random_crop(image, self.patch_size, np.random.default_rng([self.seed, item, 3]))
        return _pair(original, self.corruption, self.seed, item, lambda a, fill: a)


def random_crop(image: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A ``size`` crop of a channel-first ``image`` at a position drawn by ``rng``; axes shorter than ``size``
    are first padded (evenly on both sides) with the image's minimum."""
    widths = padding_to(image.shape, size)
    if any(w != (0, 0) for w in widths):
        image = np.pad(image, widths, constant_values=float(image.min()))
    starts = [int(rng.integers(s - p + 1)) for s, p in zip(image.shape[1:], size)]
    window = (slice(None),) + tuple(slice(b, b + p) for b, p in zip(starts, size))
    return np.ascontiguousarray(image[window])


def _pair(original: np.ndarray, corruption: Corruption, seed: int, item: int, pad) -> dict[str, torch.Tensor]:
    corrupted = corruption(original, int(np.random.default_rng([seed, item]).integers(2**31)))
    fill = float(original.min())
    return {"image": torch.from_numpy(pad(corrupted, fill)), "target": torch.from_numpy(pad(original, fill))}
