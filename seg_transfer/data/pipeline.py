"""From a data config to checked, split, cached volumes and 2.5D loaders."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset, pad_list_data_collate
from torch.utils.data import DataLoader

from seg_transfer.config import DataConfig
from seg_transfer.data.augment import SliceAugmenter
from seg_transfer.data.cases import (
    Case,
    DatasetError,
    cases_from_csv,
    cases_from_folders,
    cases_from_msd,
    volume_files,
)
from seg_transfer.data.checks import BadCase, find_bad_cases, format_bad_cases
from seg_transfer.data.slices import MixedEpochs, SliceDataset, mixed_pools
from seg_transfer.data.splits import load_splits, make_splits, save_splits
from seg_transfer.data.transforms import Preprocessing, preprocessing_transforms

log = logging.getLogger(__name__)


class BadDataError(DatasetError):
    """Bad cases were found before training; the message lists all of them."""


@dataclass
class PreparedData:
    """Checked cases split by case, with their label map; volumes are loaded lazily by :func:`volume_dataset`."""

    cases: dict[str, Case]
    labels: dict[int, str]
    splits: dict[str, list[str]]
    skipped: list[BadCase] = field(default_factory=list)
    #: cases whose labels a trained run predicted (``data.pseudo_labelled``): training only, never in ``splits``
    pseudo_labelled: list[str] = field(default_factory=list)

    def subset(self, part: str) -> list[Case]:
        return [self.cases[name] for name in self.splits[part]]

    def training_cases(self) -> list[Case]:
        """What the network trains on: the split's training cases, then the pseudo-labelled scans."""
        return self.subset("train") + [self.cases[name] for name in self.pseudo_labelled]


def discover_cases(data: DataConfig) -> tuple[list[Case], dict[int, str] | None]:
    """Labelled training cases and the dataset's own label map (None where the layout has none)."""
    if data.root is not None:
        training, _test, labels = cases_from_msd(data.root)
        return training, labels
    cases = cases_from_csv(data.csv) if data.csv is not None else cases_from_folders(data.images_dir, data.labels_dir)
    return cases, None


def unlabelled_scans(data: DataConfig, folders: Sequence[str | Path] = ()) -> list[Case]:
    """Image-only cases for self-supervised pretraining: every volume of ``folders``, or, without folders,
    the unlabelled test images of the MSD dataset at ``data.root`` (``imagesTs``). One-line
    :class:`DatasetError` when there are none or two folders hold the same case name."""
    if folders:
        scans = [case for folder in folders for case in cases_from_folders(folder, None)]
    elif data.root is not None:
        scans = cases_from_msd(data.root)[1]
    else:
        raise DatasetError("no unlabelled scans: give folders of images (--images), or a data.root in MSD layout "
                           "whose imagesTs holds them")
    if not scans:
        raise DatasetError(f"{data.root}: dataset.json lists no test images (imagesTs) to pretrain on; give --images")
    names = [c.name for c in scans]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DatasetError(f"unlabelled scans: case name(s) {', '.join(twice[:3])} found in more than one folder")
    return scans


def pseudo_labelled_scans(data: DataConfig) -> list[Case]:
    """The image-only scans ``data.pseudo_labelled`` is about: its ``images_dir``, or the MSD dataset's ``imagesTs``."""
    images_dir = data.pseudo_labelled.images_dir
    return unlabelled_scans(data, [images_dir] if images_dir is not None else [])


def pseudo_labelled_cases(data: DataConfig) -> list[Case]:
    """The scans of ``data.pseudo_labelled`` (:func:`pseudo_labelled_scans`), each with the label map of the same
    case name in its ``labels_dir``; one-line :class:`DatasetError` naming the scans that have none (a
    self-trained run never trains on a scan its teacher did not label)."""
    config = data.pseudo_labelled
    scans = pseudo_labelled_scans(data)
    predicted = volume_files(config.labels_dir)
    missing = [case.name for case in scans if case.name not in predicted]
    if missing:
        raise DatasetError(f"{config.labels_dir}: no predicted label map for {len(missing)} of {len(scans)} "
                           f"unlabelled scans, e.g. {', '.join(missing[:3])} (seg-transfer predict writes them)")
    return [Case(case.name, case.image, predicted[case.name]) for case in scans]


def prepare_data(data: DataConfig, run_dir: Path, skip_bad_cases: bool = False) -> PreparedData:
    """Discover and check cases, then split them by case (reusing ``run_dir/splits.json`` if present).

    Raises :class:`BadDataError` listing every bad case unless ``skip_bad_cases``; skipped cases are
    returned so the run records them.
    """
    cases, dataset_labels = discover_cases(data)
    labels = data.labels or dataset_labels
    if not labels:
        raise DatasetError("no label map: set data.labels (e.g. {0: background, 1: organ}) for CSV/folder datasets")
    if sorted(labels) != list(range(len(labels))):
        raise DatasetError(f"label map keys must be 0..{len(labels) - 1} (got {sorted(labels)}); remap the label values")
    unlabelled = [case.name for case in cases if case.label is None]
    if unlabelled:
        raise DatasetError(f"training cases without a label file: {', '.join(unlabelled[:5])}")
    pseudo = pseudo_labelled_cases(data) if data.pseudo_labelled is not None else []
    both = sorted({case.name for case in cases} & {case.name for case in pseudo})
    if both:
        raise DatasetError(f"{data.pseudo_labelled.labels_dir}: case name(s) {', '.join(both[:3])} are labelled cases "
                           "too; pseudo-labelled scans must be other scans")
    bad = find_bad_cases([*cases, *pseudo], set(labels))
    if bad and not skip_bad_cases:
        raise BadDataError(f"{len({b.name for b in bad})} bad case(s) found before training (use --skip-bad-cases to train on the rest):\n{format_bad_cases(bad)}")
    bad_names = {b.name for b in bad}
    good = [case for case in cases if case.name not in bad_names]
    pseudo = [case for case in pseudo if case.name not in bad_names]
    if len(good) < 2:
        raise DatasetError(f"{len(good)} usable case(s): at least 2 are needed (train and validation)")
    splits_path = run_dir / "splits.json"
    if splits_path.is_file():
        splits = load_splits(splits_path)
    else:
        split = data.split
        splits = make_splits(
            [case.name for case in good],
            val_fraction=split.val_fraction,
            test_fraction=split.test_fraction,
            seed=split.seed,
            folds=split.folds,
            fold=split.fold,
        )
        save_splits(splits, splits_path)
    return PreparedData({case.name: case for case in [*good, *pseudo]}, dict(sorted(labels.items())), splits, bad,
                        [case.name for case in pseudo])


def volume_dataset(cases: Sequence[Case], prep: Preprocessing, data: DataConfig, with_label: bool = True):
    """Preprocessed volumes, decoded once: in memory (CacheDataset), on disk (PersistentDataset) or not cached."""
    items = [{"image": str(c.image), **({"label": str(c.label)} if with_label else {}), "name": c.name} for c in cases]
    transform = preprocessing_transforms(prep, with_label=with_label)
    if data.cache == "memory":
        return CacheDataset(items, transform, num_workers=max(1, data.num_workers), progress=False, copy_cache=False)
    if data.cache == "disk":
        return PersistentDataset(items, transform, cache_dir=disk_cache_dir(data, prep, with_label))
    return Dataset(items, transform)


def disk_cache_dir(data: DataConfig, prep: Preprocessing, with_label: bool) -> Path:
    """Per-preprocessing cache folder: PersistentDataset keys entries by file path only, so volumes
    preprocessed differently (another spacing, window, crop) must never share a folder."""
    base = data.cache_dir or Path.home() / ".cache" / "seg_transfer" / "volumes"
    key = json.dumps({**prep.as_dict(), "with_label": with_label}, sort_keys=True)
    return Path(base) / hashlib.sha256(key.encode()).hexdigest()[:16]


def padded_batch(items: Sequence[dict]) -> dict:
    """MONAI's ``pad_list_data_collate`` (samples of different sizes padded to the largest), returning plain
    tensors: where it pads it returns MetaTensors, whose per-operation bookkeeping slowed a 2.5D training step
    by about 8% on the CPU (``benchmarks/train_throughput.py``); on Hippocampus at 0.5 mm slabs
    pad to four sizes, so nearly every batch was one."""
    batch = pad_list_data_collate(list(items))
    return {key: value.as_tensor() if isinstance(value, MetaTensor) else value for key, value in batch.items()}


def slice_loader(
    volumes, data: DataConfig, batch_size: int, multiple: int, train: bool, seed: int = 0,
    *, rank: int = 0, world_size: int = 1, pin_memory: bool = False, labelled: int | None = None,
) -> tuple[SliceDataset | MixedEpochs, DataLoader]:
    """2.5D samples and their loader; augmentation only for training, on as ``data.augment.enabled`` says
    until :meth:`SliceDataset.set_augmentation` switches it.

    ``batch_size`` is the global batch. With ``world_size`` > 1 the dataset serves rank ``rank``'s
    shard of each epoch order and the loader takes ``batch_size // world_size`` slices per step
    (``batch_size`` must be a multiple of ``world_size``), so the ranks' batches together are the
    single-process batch. ``labelled``: the first ``labelled`` volumes are labelled cases and the rest
    pseudo-labelled scans, which give ``data.pseudo_labelled.share`` of every epoch when it is set
    (:class:`MixedEpochs`); otherwise every sample counts alike.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the world size {world_size}")
    augmenter = SliceAugmenter(data.augment) if train else None
    dataset = mixed_pools(lambda pool: SliceDataset(pool, data.slice_axis, data.context_slices, multiple, augmenter),
                          volumes, labelled, data.pseudo_labelled_share)
    dataset.set_augmentation(train and data.augment.enabled)  # a stage may switch it (stages[].augment)
    drop_last = train and (data.slices_per_epoch or len(dataset)) > batch_size
    if world_size > 1:
        dataset.shard(rank, world_size, batch_size, drop_last)
    loader = DataLoader(
        dataset,
        batch_size=batch_size // world_size,
        shuffle=False,  # the epoch order is set by SliceDataset.set_epoch (seeded, resumable)
        num_workers=data.num_workers,
        collate_fn=padded_batch,
        pin_memory=pin_memory,
        persistent_workers=False,
        drop_last=drop_last,
    )
    return dataset, loader
