"""2.5D samples: a slice with ``k`` neighbours on each side stacked as channels.

At the volume's edges the missing neighbours repeat the edge slice (replicate), so every sample
has ``2k + 1`` channels. In-plane sizes are padded to a multiple of the encoder's output stride.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


def context_indices(index: int, depth: int, context: int) -> np.ndarray:
    """Slice indices ``index-k .. index+k`` clipped to ``[0, depth-1]`` (edge slices repeat)."""
    return np.clip(np.arange(index - context, index + context + 1), 0, depth - 1)


def slab(volume: torch.Tensor | np.ndarray, axis: int, index: int, context: int) -> np.ndarray:
    """The 2.5D input at ``index`` along spatial ``axis`` of a channel-first volume ``(1, X, Y, Z)``.

    Returns ``(2k+1, H, W)``, with H, W the two remaining spatial axes in order.
    """
    array = _numpy(volume)[0]
    picked = np.take(array, context_indices(index, array.shape[axis], context), axis=axis)
    return np.moveaxis(picked, axis, 0)


def label_slice(label: torch.Tensor | np.ndarray, axis: int, index: int) -> np.ndarray:
    """The ``(H, W)`` label slice at ``index`` along spatial ``axis`` of ``(1, X, Y, Z)``."""
    return np.take(_numpy(label)[0], index, axis=axis)


def pad_to_multiple(array: np.ndarray, multiple: int, value: float = 0.0) -> np.ndarray:
    """Pad the last two axes at the end to a multiple of ``multiple`` (cropping back is ``[..., :H, :W]``)."""
    height, width = array.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not pad_h and not pad_w:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, widths, mode="constant", constant_values=value)


def foreground_slices(label: torch.Tensor | np.ndarray, axis: int) -> np.ndarray:
    """Indices of slices along ``axis`` that contain any label > 0."""
    array = _numpy(label)[0]
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(array.any(axis=other))


def _numpy(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    return volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)


def shard_positions(total: int, rank: int, world_size: int, global_batch: int, drop_last: bool) -> np.ndarray:
    """Positions ``0..total-1`` of an epoch order that rank ``rank`` of ``world_size`` trains on, in order.

    DistributedSampler on an already shuffled order: rank ``r`` takes every ``world_size``-th
    position from ``r``, so the per-rank batches of ``global_batch // world_size`` slices together
    hold exactly the single-process batch of ``global_batch``. ``drop_last`` first drops the last
    incomplete global batch (as the single-process loader does); otherwise positions wrap around to
    the start until every rank has the same count. Every rank thus takes the same number of steps.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if drop_last:
        positions = np.arange(total // global_batch * global_batch)
    else:
        positions = np.arange(-(-total // world_size) * world_size) % max(total, 1)
    return positions[rank::world_size]


def cycled_order(rng: np.random.Generator, total: int, size: int) -> np.ndarray:
    """``size`` indices of ``range(total)`` as whole shuffled passes (cycled when ``size > total``, cut otherwise)."""
    if total == 0 or size == 0:
        return np.empty(0, np.int64)
    passes = -(-size // total)
    return np.concatenate([rng.permutation(total) for _ in range(passes)])[:size]


class SliceIndex:
    """All (case, slice) pairs of a set of volumes, with their foreground slices."""

    def __init__(self, depths: Sequence[int], foreground: Sequence[np.ndarray]):
        self.pairs = np.array([(c, s) for c, depth in enumerate(depths) for s in range(depth)], dtype=np.int64)
        fg = {(c, int(s)) for c, slices in enumerate(foreground) for s in slices}
        mask = np.array([(int(c), int(s)) in fg for c, s in self.pairs], dtype=bool)
        self.foreground = np.flatnonzero(mask)

    def __len__(self) -> int:
        return len(self.pairs)

    def epoch_order(self, seed: int, epoch: int, size: int | None, foreground_fraction: float | None) -> np.ndarray:
        """Indices into ``pairs`` for one epoch, deterministic in (seed, epoch); exactly ``size`` of them.

        ``size=None`` means one pass over all slices (0: an empty epoch). ``foreground_fraction=None``: uniform over slices,
        drawn as whole shuffled passes (a pool smaller than ``size`` is cycled, so every slice is seen
        equally often, and a larger pool is cut). Otherwise that share of ``size`` is drawn from slices
        with labels, the rest from all slices. The length never depends on the pool, so a budget of
        epochs x ``size`` slices is the same number of optimiser steps whatever the training-set size.
        """
        rng = np.random.default_rng([seed, epoch])
        total = len(self.pairs)
        size = total if size is None else size
        if foreground_fraction is None:
            return cycled_order(rng, total, size)
        n_fg = int(round(foreground_fraction * size)) if len(self.foreground) else 0
        picks = np.concatenate([
            rng.choice(self.foreground, size=n_fg, replace=n_fg > len(self.foreground)) if n_fg else np.empty(0, np.int64),
            rng.choice(total, size=size - n_fg, replace=size - n_fg > total),
        ])
        return rng.permutation(picks)


class EpochDataset(Dataset):
    """What 2.5D slices and 3D patches share: an epoch order fixed by :meth:`set_epoch` (subclasses say
    how) and, after :meth:`shard`, the positions of that order one rank serves (see :func:`shard_positions`).

    ``epoch_seed + position`` seeds a sample's augmentation, so a sample does not depend on worker count,
    resumption, or how many ranks share the epoch.
    """

    def _init_epochs(self, pool: int) -> None:
        self.order = np.arange(pool)
        self.epoch_seed = 0
        self.rank, self.world_size, self.global_batch, self.drop_last = 0, 1, 1, False
        self.positions: np.ndarray | None = None  # this rank's positions in ``order``; None: all of them

    def _start_epoch(self, order: np.ndarray, seed: int, epoch: int) -> None:
        self.order = order
        self.epoch_seed = int(np.random.default_rng([seed, epoch, 1]).integers(2**31))
        self._update_positions()

    def shard(self, rank: int, world_size: int, global_batch: int, drop_last: bool) -> None:
        """From now on serve only rank ``rank``'s share of each epoch order (see :func:`shard_positions`)."""
        self.rank, self.world_size, self.global_batch, self.drop_last = rank, world_size, global_batch, drop_last
        self._update_positions()

    def _update_positions(self) -> None:
        self.positions = None if self.world_size == 1 else shard_positions(
            len(self.order), self.rank, self.world_size, self.global_batch, self.drop_last)

    def __len__(self) -> int:
        return len(self.order) if self.positions is None else len(self.positions)

    def _position(self, item: int) -> int:
        """The position in this epoch's order of the loader's ``item``."""
        return item if self.positions is None else int(self.positions[item])


#: added to the seed of the second pool's epoch orders in :class:`MixedEpochs`, so both pools draw independently
SECOND_POOL_SEED_OFFSET = 1_000_003


class MixedEpochs(EpochDataset):
    """Samples of two pools in a fixed proportion (self-training: labelled cases and pseudo-labelled scans).

    An epoch of ``size`` samples holds ``round(share * size)`` samples of ``second`` and the rest of ``first``,
    shuffled together, deterministic in (seed, epoch). Each pool keeps its own sampling (whole passes, foreground
    share) and its own augmentation seeds; a pool smaller than its part is cycled. Both pools must be unsharded:
    :meth:`shard` shards the mixed order.
    """

    def __init__(self, first: EpochDataset, second: EpochDataset, share: float):
        if not 0 < share < 1:
            raise ValueError(f"share {share} must lie strictly between 0 and 1")
        self.first, self.second, self.share = first, second, share
        self.pool_size = first.pool_size + second.pool_size
        self.split = 0  # positions below ``split`` in this epoch's order are ``first``'s samples
        self._init_epochs(self.pool_size)

    def parts(self, size: int | None) -> tuple[int, int]:
        """How many samples of an epoch of ``size`` (None: one pass over both pools) each pool gives."""
        size = size or self.pool_size
        second = int(round(self.share * size))
        return size - second, second

    def set_epoch(self, seed: int, epoch: int, size: int | None, foreground_fraction: float | None) -> None:
        first, second = self.parts(size)
        self.first.set_epoch(seed, epoch, first, foreground_fraction)
        self.second.set_epoch(seed + SECOND_POOL_SEED_OFFSET, epoch, second, foreground_fraction)
        self.split = first
        self._start_epoch(np.random.default_rng([seed, epoch, 2]).permutation(first + second), seed, epoch)

    def set_augmentation(self, enabled: bool) -> None:
        self.first.set_augmentation(enabled)
        self.second.set_augmentation(enabled)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        code = int(self.order[self._position(item)])
        return self.first[code] if code < self.split else self.second[code - self.split]


def mixed_pools(build: Callable[[Sequence], EpochDataset], volumes: Sequence, labelled: int | None,
                share: float | None) -> EpochDataset:
    """``build(volumes)``, or with a ``share``, :class:`MixedEpochs` of the first ``labelled`` volumes (the labelled
    cases) and the rest (pseudo-labelled scans), the rest giving ``share`` of every epoch."""
    if share is None or labelled is None or labelled >= len(volumes):
        return build(volumes)
    return MixedEpochs(build(Subset(volumes, range(labelled))), build(Subset(volumes, range(labelled, len(volumes)))),
                       share)


class SliceDataset(EpochDataset):
    """2.5D training samples from cached, preprocessed volumes.

    ``volumes[i]`` must return ``{"image": (1,X,Y,Z), "label": (1,X,Y,Z)}``. Items are
    ``{"image": float32 (2k+1,H,W), "label": int64 (1,H,W)}`` padded to ``multiple``; ``augment``
    (if given) maps (image CHW, label HW, seed) to augmented arrays; the seed depends only on the
    epoch and the sample's position in the epoch order, so results do not depend on worker count,
    resumption, or (after :meth:`shard`) on how many ranks share the epoch.
    """

    def __init__(
        self,
        volumes: Sequence[dict],
        axis: int,
        context: int,
        multiple: int = 32,
        augment: Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        self.volumes, self.axis, self.context, self.multiple = volumes, axis, context, multiple
        self.augmenter, self.augment = augment, augment  # ``augment``: the augmenter while augmentation is on, else None
        depths, foreground = [], []
        for item in volumes:
            depths.append(item["image"].shape[1 + axis])
            foreground.append(foreground_slices(item["label"], axis))
        self.index = SliceIndex(depths, foreground)
        self.pool_size = len(self.index)
        self._init_epochs(self.pool_size)

    def set_epoch(self, seed: int, epoch: int, size: int | None, foreground_fraction: float | None) -> None:
        self._start_epoch(self.index.epoch_order(seed, epoch, size, foreground_fraction), seed, epoch)

    def set_augmentation(self, enabled: bool) -> None:
        """Augment from now on (with the augmenter given at construction; none: never) or not."""
        self.augment = self.augmenter if enabled else None

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        position = self._position(item)
        case, index = self.index.pairs[self.order[position]]
        item = self.volumes[int(case)]
        image = slab(item["image"], self.axis, int(index), self.context).astype(np.float32, copy=False)
        label = label_slice(item["label"], self.axis, int(index))
        if self.augment is not None:
            image, label = self.augment(image, label, (self.epoch_seed + position) % 2**32)
        image = pad_to_multiple(image, self.multiple, value=float(image.min()))
        label = pad_to_multiple(label, self.multiple)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "label": torch.from_numpy(label.astype(np.int64))[None]}
