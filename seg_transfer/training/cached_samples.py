"""What a row of the feature cache is, per route: a 2.5D slab of a case, or one pre-drawn 3D patch.

A *group* is every row of one (case, slot), written and read as one block: all slices of a case (2.5D)
or its one patch (3D). Slot 0 is the plain sample, a case's un-augmented slabs (2.5D only; what
``rank-encoders`` reads). Slots 1..V are V fixed variants made by the run's own sampler with a seed from
(run seed, case name, row, slot) (:func:`variant_seed`), the same in every process and epoch:

- 2.5D: the slab through the run's slice augmentation; without augmentation a sample is its plain slab
  and there are no variants (V = 0).
- 3D: a patch cropped by the run's own ``RandCropByPosNegLabeld`` (foreground share included) and, with
  augmentation on, flipped / rotated / scaled by it. Crops are random even without augmentation, so a
  3D cache always has V variants per case: a cached 3D stage sees V patches per case in all, where the
  recomputing stage draws a fresh crop per sample (another draw, equal only in distribution).

Each training sample reads slot ``1 + default_rng(sample seed).integers(V)`` of its case (and slice),
the sample seed being the one its dataset gives its augmentation. The route kinds are entries of
:data:`SAMPLE_ROWS`, keyed by ``model.dims``.
"""
from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from seg_transfer.config import RunConfig
from seg_transfer.data.slices import label_slice, pad_to_multiple, slab
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.training.loss import Logits

PLAIN_SLOT = 0
LABEL_DTYPE = np.int16


@dataclass(frozen=True)
class CaseLayout:
    """A case in a store: its name, rows per slot (slices along the slice axis in 2.5D, 1 in 3D), the
    padded spatial shape of a row's input, and a fingerprint of its preprocessed image and label (another
    volume under the same name is another case)."""

    name: str
    rows: int
    shape: tuple[int, ...]
    fingerprint: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> CaseLayout:
        """From its index entry (JSON turns the shape into a list)."""
        name, rows, shape, fingerprint = row
        return cls(str(name), int(rows), tuple(int(s) for s in shape), str(fingerprint))

    def as_row(self) -> list[Any]:
        return [self.name, self.rows, list(self.shape), self.fingerprint]


@dataclass(frozen=True)
class CacheSpec:
    """Everything besides the encoder that decides what a slot holds (part of the store key)."""

    preprocessing: dict[str, Any]
    geometry: dict[str, Any]  # 2.5D: slice axis, context slices, padding multiple; 3D: patch size, foreground share
    variants: int  # slots 1..variants; 0: the plain slot only (2.5D without augmentation)
    augment: dict[str, Any] | None  # the augmentation config, None when off
    seed: int  # the run seed (0 when there are no variants)

    @property
    def slots(self) -> int:
        return 1 + self.variants


def variant_seed(seed: int, case: str, index: int, slot: int) -> int:
    """The sampler's seed for (case, row ``index``, ``slot``): the same in every process and epoch."""
    return int(np.random.SeedSequence([seed, zlib.crc32(case.encode()), index, slot]).generate_state(1)[0])


def draw_slot(sample_seed: int, variants: int) -> int:
    """The slot a training sample reads: 1..variants drawn from its seed, or the plain slot 0 without variants."""
    return PLAIN_SLOT if variants == 0 else 1 + int(np.random.default_rng(sample_seed).integers(variants))


def volume_fingerprint(image, label, samples: int = 2**20) -> str:
    """sha256 (16 hex digits) of the shapes and of at most ``samples`` evenly strided voxels of image and label."""
    digest = hashlib.sha256()
    for volume in (image, label):
        array = np.ascontiguousarray(volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume))
        flat = array.reshape(-1)
        digest.update(f"{array.shape}|{array.dtype}|".encode())
        digest.update(np.ascontiguousarray(flat[::max(1, flat.size // samples)]).tobytes())
    return digest.hexdigest()[:16]


def epoch_entries(dataset, variants: int, locate: Callable[[int], tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(case, slot, row) of every item of an :class:`~seg_transfer.data.slices.EpochDataset`'s current epoch (this
    rank's share), in order: ``locate`` maps an entry of its epoch order to (case, row); the slot is drawn from the
    sample's seed (``epoch_seed + position``, the seed its augmentation gets)."""
    entries = []
    for item in range(len(dataset)):
        position = dataset._position(item)
        case, row = locate(int(dataset.order[position]))
        entries.append((int(case), draw_slot((dataset.epoch_seed + position) % 2**32, variants), int(row)))
    return entries


class SampleRows(Protocol):
    """A route's rows: how its training dataset maps to cache groups, and how cached levels are decoded."""

    def spec(self, config: RunConfig, dataset) -> CacheSpec: ...

    def in_channels(self, spec: CacheSpec) -> int: ...

    def layouts(self, dataset) -> list[CaseLayout]: ...

    def group(self, dataset, case: int, layout: CaseLayout, slot: int, spec: CacheSpec) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ``(rows, C, *shape)`` float32 and labels ``(rows, *shape)`` of one (case, slot)."""
        ...

    def entries(self, dataset, variants: int) -> list[tuple[int, int, int]]:
        """(case, slot, row) of every sample of the dataset's current epoch (this rank's share), in order."""
        ...

    def check_size(self, model: nn.Module) -> tuple[int, ...]:
        """A small input size the network accepts (to check that its decoder reads encoder features only)."""
        ...

    def decode(self, model: nn.Module, features: Sequence[torch.Tensor], size: tuple[int, ...]) -> Logits:
        """Logits of decoder + head from encoder levels 1.. (``size``: the input's spatial size; a list, finest
        first, from a deeply supervised network in training mode)."""
        ...


# --------------------------------------------------------------------------- 2.5D: slabs


def slice_spec(config: RunConfig, multiple: int) -> CacheSpec:
    """The 2.5D spec of ``config`` for slabs padded to ``multiple`` (variants only with augmentation)."""
    augment = config.data.augment
    variants = config.training.feature_cache_variants if augment.enabled else 0
    geometry = {"axis": config.data.slice_axis, "context": config.data.context_slices, "multiple": multiple}
    return CacheSpec(Preprocessing.from_config(config.data).as_dict(), geometry, variants,
                     augment.model_dump(mode="json") if variants else None, config.seed if variants else 0)


def case_layouts(volumes, axis: int, multiple: int) -> list[CaseLayout]:
    """The 2.5D layout of each ``{"image": (1,X,Y,Z), "label": ..., "name": ...}`` in ``volumes``, in order."""
    layouts = []
    for index in range(len(volumes)):
        item = volumes[index]
        shape = tuple(item["image"].shape[1:])
        padded = tuple(-(-shape[a] // multiple) * multiple for a in range(3) if a != axis)
        layouts.append(CaseLayout(str(item.get("name", index)), shape[axis], padded,
                                  volume_fingerprint(item["image"], item["label"])))
    return layouts


def group_samples(volume: dict, case: CaseLayout, slot: int, spec: CacheSpec, augment) -> tuple[np.ndarray, np.ndarray]:
    """All slices of one case as one slot: slabs ``(depth, 2k+1, H, W)`` float32 and labels ``(depth, H, W)``,
    made exactly as :class:`~seg_transfer.data.slices.SliceDataset` makes a sample (augmentation seeded by
    :func:`variant_seed` for slots > 0), padded to the case's padded size."""
    axis, context, multiple = (spec.geometry[k] for k in ("axis", "context", "multiple"))
    images, labels = [], []
    for index in range(case.rows):
        image = slab(volume["image"], axis, index, context).astype(np.float32, copy=False)
        label = label_slice(volume["label"], axis, index)
        if slot != PLAIN_SLOT:
            image, label = augment(image, label, variant_seed(spec.seed, case.name, index, slot))
        images.append(pad_to_multiple(image, multiple, value=float(image.min())))
        labels.append(pad_to_multiple(np.asarray(label), multiple))
    return np.stack(images), np.stack(labels).astype(LABEL_DTYPE)


def decode_slices(model: nn.Module, features: Sequence[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
    """smp decoders take the input as level 0 and read only its shape: a zero-channel tensor stands in for it."""
    stand_in = features[0].new_zeros((features[0].shape[0], 0, *size))
    return model.segmentation_head(model.decoder([stand_in, *features]))


class SliceRows:
    """2.5D: a row is one slab of a case; a group is every slab of the case in one slot."""

    def spec(self, config: RunConfig, dataset) -> CacheSpec:
        return slice_spec(config, dataset.multiple)

    def in_channels(self, spec: CacheSpec) -> int:
        return 2 * spec.geometry["context"] + 1

    def layouts(self, dataset) -> list[CaseLayout]:
        return case_layouts(dataset.volumes, dataset.axis, dataset.multiple)

    def group(self, dataset, case: int, layout: CaseLayout, slot: int, spec: CacheSpec) -> tuple[np.ndarray, np.ndarray]:
        return group_samples(dataset.volumes[case], layout, slot, spec, dataset.augment)

    def entries(self, dataset, variants: int) -> list[tuple[int, int, int]]:
        return epoch_entries(dataset, variants, lambda sample: dataset.index.pairs[sample])

    def check_size(self, model: nn.Module) -> tuple[int, ...]:
        multiple = int(getattr(model.encoder, "output_stride", 32))
        return (2 * multiple, 2 * multiple)

    decode = staticmethod(decode_slices)


# --------------------------------------------------------------------------- 3D: patches


class PatchRows:
    """3D: a group is one patch of a case (one row), cropped and augmented by the run's patch sampler."""

    def spec(self, config: RunConfig, dataset) -> CacheSpec:
        augment = config.data.augment
        geometry = {"patch_size": list(dataset.patch_size), "foreground_fraction": float(dataset.fraction)}
        return CacheSpec(Preprocessing.from_config(config.data).as_dict(), geometry, config.training.feature_cache_variants,
                         augment.model_dump(mode="json") if augment.enabled else None, config.seed)

    def in_channels(self, spec: CacheSpec) -> int:
        return 1

    def layouts(self, dataset) -> list[CaseLayout]:
        return [CaseLayout(name, 1, tuple(dataset.patch_size), volume_fingerprint(image, label))
                for name, image, label in zip(dataset.names, dataset.images, dataset.labels)]

    def group(self, dataset, case: int, layout: CaseLayout, slot: int, spec: CacheSpec) -> tuple[np.ndarray, np.ndarray]:
        sample = dataset.sample(case, variant_seed(spec.seed, layout.name, 0, slot))
        return sample["image"].numpy()[None], sample["label"].numpy().astype(LABEL_DTYPE)

    def entries(self, dataset, variants: int) -> list[tuple[int, int, int]]:
        return epoch_entries(dataset, variants, lambda case: (case, 0))

    def check_size(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(2 * int(m) for m in model.spatial_multiple())

    def decode(self, model: nn.Module, features: Sequence[torch.Tensor], size: tuple[int, ...]) -> Logits:
        return model.decode(list(features))


#: the rows of each route (``model.dims``)
SAMPLE_ROWS: dict[str, SampleRows] = {"2.5d": SliceRows(), "3d": PatchRows()}
