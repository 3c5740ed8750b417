"""3D training patches: MONAI crops around precomputed foreground/background voxels, 3D augmentation.

Volumes come preprocessed and cached (:func:`seg_transfer.data.pipeline.volume_dataset`); each is
padded once to at least the patch size and its foreground/background voxel indices are computed once,
so a crop costs an index draw. Every sample's transforms are seeded from (seed, epoch, position in the
epoch order), like the 2.5D slices: results do not depend on worker count, resumption or ranks.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.transforms.utils import map_binary_to_indices
from torch.utils.data import DataLoader

from seg_transfer.config import AugmentConfig, DataConfig
from seg_transfer.data.slices import EpochDataset, MixedEpochs, cycled_order, mixed_pools

#: share of patches centred on foreground when ``data.foreground_fraction`` is unset (nnU-Net's 0.33)
DEFAULT_FOREGROUND_FRACTION = 1 / 3


def median_patch_size(shapes: Sequence[Sequence[int]], multiple: Sequence[int], cap: int = 160) -> tuple[int, int, int]:
    """The median of ``shapes`` (X, Y, Z) rounded up to ``multiple`` per axis, at most ``cap`` (rounded down)."""
    median = np.median(np.asarray(shapes, dtype=float), axis=0)
    sizes = []
    for size, step in zip(median, multiple):
        rounded = int(-(-int(np.ceil(size)) // step) * step)
        sizes.append(max(step, min(rounded, cap // step * step)))
    return tuple(sizes)


def patch_augmentation(config: AugmentConfig | None) -> list[mt.Transform]:
    """3D augmentation on ``image``/``label``: flips on ``flip_axes``, small rotation and scaling, intensity and gamma."""
    if config is None or not config.enabled:
        return []
    keys = ["image", "label"]
    radians = float(np.deg2rad(config.rotate_degrees))
    low, high = config.scale
    return [
        *[mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in config.flip_axes],
        mt.RandAffined(keys, prob=config.affine_probability, rotate_range=(radians,) * 3,
                       scale_range=(low - 1.0, high - 1.0), mode=("bilinear", "nearest"), padding_mode="border"),
        mt.RandScaleIntensityd("image", factors=0.1, prob=config.intensity_probability),
        mt.RandShiftIntensityd("image", offsets=0.1, prob=config.intensity_probability),
        mt.RandAdjustContrastd("image", gamma=config.gamma_range, prob=config.gamma_probability),
    ]


class PatchDataset(EpochDataset):
    """3D training patches ``{"image": float32 (1, px, py, pz), "label": int64 (1, px, py, pz)}``.

    ``volumes[i]`` must return ``{"image": (1,X,Y,Z), "label": (1,X,Y,Z)}``. An epoch (see
    :meth:`set_epoch`) is exactly ``size`` patches: cases in whole shuffled passes; each patch is
    centred on a foreground voxel with probability ``foreground_fraction``, else on a background voxel.
    """

    def __init__(self, volumes: Sequence[dict], patch_size: Sequence[int], augment: AugmentConfig | None = None):
        self.patch_size = tuple(int(s) for s in patch_size)
        self.images, self.labels, self.foreground, self.background = [], [], [], []
        self.names: list[str] = []
        for index, item in enumerate(volumes):
            self.names.append(str(item.get("name", index)))
            image, label = _padded(item["image"], item["label"], self.patch_size)
            fg, bg = map_binary_to_indices(torch.from_numpy(label[0] > 0)[None])
            self.images.append(image)
            self.labels.append(label)
            self.foreground.append(fg)
            self.background.append(bg)
        self.augment_config, self.augment = augment, augment  # ``augment``: the settings while augmentation is on
        self.fraction = DEFAULT_FOREGROUND_FRACTION
        self.pool_size = len(self.images)
        self._init_epochs(self.pool_size)
        self._transform = self._build_transform(self.fraction)

    def _build_transform(self, fraction: float) -> mt.Compose:
        crop = mt.RandCropByPosNegLabeld(["image", "label"], label_key="label", spatial_size=self.patch_size,
                                         pos=fraction, neg=1.0 - fraction, num_samples=1,
                                         fg_indices_key="fg", bg_indices_key="bg")
        return mt.Compose([crop, *patch_augmentation(self.augment)], lazy=False)

    def set_epoch(self, seed: int, epoch: int, size: int | None, foreground_fraction: float | None) -> None:
        """Fix this epoch's case order and per-sample seeds (deterministic in ``seed``, ``epoch``)."""
        fraction = DEFAULT_FOREGROUND_FRACTION if foreground_fraction is None else foreground_fraction
        if fraction != self.fraction:
            self.fraction, self._transform = fraction, self._build_transform(fraction)
        order = cycled_order(np.random.default_rng([seed, epoch]), len(self.images),
                             len(self.images) if size is None else size)
        self._start_epoch(order, seed, epoch)

    def set_augmentation(self, enabled: bool) -> None:
        """Augment from now on (with the settings given at construction; none: never) or not."""
        augment = self.augment_config if enabled else None
        if augment is not self.augment:
            self.augment = augment
            self._transform = self._build_transform(self.fraction)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        position = self._position(item)
        return self.sample(int(self.order[position]), (self.epoch_seed + position) % 2**32)

    def sample(self, case: int, seed: int) -> dict[str, torch.Tensor]:
        """Case ``case``'s patch for transform seed ``seed`` (crop and augmentation): the same every time."""
        self._transform.set_random_state(seed=seed)
        data = {"image": torch.from_numpy(self.images[case]), "label": torch.from_numpy(self.labels[case]),
                "fg": self.foreground[case], "bg": self.background[case]}
        sample = self._transform(data)
        sample = sample[0] if isinstance(sample, list) else sample
        return {"image": _plain(sample["image"]).float().contiguous(), "label": torch.round(_plain(sample["label"]).float()).long()}


def _plain(array) -> torch.Tensor:
    """A plain tensor (MONAI returns MetaTensors that carry their transform history)."""
    return array.as_tensor() if hasattr(array, "as_tensor") else torch.as_tensor(array)


def _padded(image, label, patch_size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(1, X, Y, Z)`` arrays padded symmetrically to at least ``patch_size`` (image with its minimum, label 0)."""
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label).astype(np.int16)
    widths = padding_to(image.shape, patch_size)
    if any(w != (0, 0) for w in widths):
        image = np.pad(image, widths, constant_values=float(image.min()))
        label = np.pad(label, widths)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def padding_to(shape: Sequence[int], size: Sequence[int]) -> list[tuple[int, int]]:
    """``np.pad`` widths that bring the spatial axes of a channel-first ``shape`` to at least ``size``, split
    evenly between both sides (the extra voxel at the end)."""
    return [(0, 0)] + [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(shape[1:], size)]


def patch_loader(volumes, data: DataConfig, batch_size: int, patch_size: Sequence[int], *, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False,
                 labelled: int | None = None) -> tuple[PatchDataset | MixedEpochs, DataLoader]:
    """Training patches and their loader; ``batch_size`` is the global batch, ``labelled`` the number of labelled
    cases before the pseudo-labelled ones in ``volumes`` (see :func:`seg_transfer.data.pipeline.slice_loader`)."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the world size {world_size}")
    dataset = mixed_pools(lambda pool: PatchDataset(pool, patch_size, data.augment), volumes, labelled,
                          data.pseudo_labelled_share)
    dataset.set_augmentation(data.augment.enabled)  # a stage may switch it (stages[].augment)
    drop_last = (data.slices_per_epoch or len(dataset)) > batch_size
    if world_size > 1:
        dataset.shard(rank, world_size, batch_size, drop_last)
    loader = DataLoader(dataset, batch_size=batch_size // world_size, shuffle=False, num_workers=data.num_workers,
                        pin_memory=pin_memory, persistent_workers=False, drop_last=drop_last)
    return dataset, loader
