"""Cached frozen-encoder features: a decoder-only stage and ``rank-encoders`` run the frozen encoder once.

**Where it sits.** A cache entry needs a training sample's identity (case, slice, augmentation
variant: :mod:`seg_transfer.data`) and the frozen encoder (:mod:`seg_transfer.models`); those two
packages do not know each other, while training (and ``rank-encoders``, at the same level) use both.
So the cache lives here, next to the trainer, for both routes; what a row is per route (a 2.5D slab,
a 3D patch) is :mod:`seg_transfer.training.cached_samples`.

**What a store holds.** For every (case, slot, row) the encoder's outputs at every level but the
first, computed in eval mode without gradients in float32 and stored as float16, plus the row's
label (int16). Level 0 is the input itself, which smp's U-Net decoder reads only for its shape (a
zero-channel tensor of that shape stands in for it) and the 3D U-Net does not read; a decoder that
reads it is refused (checked once per model by :func:`check_decoder_reads_features_only`). 2.5D: a
group is every slab of a case; slot 0 is the plain slab (no augmentation), what ``rank-encoders``
scores and all that training uses with augmentation off (``data.augment`` off, or a stage's ``augment: false``:
the spec follows what the dataset serves in the current stage); slots 1..V are V fixed pre-augmented
variants (``training.feature_cache_variants``). 3D: a group is one patch, slots 1..V are V patches
per case, cropped (and, with augmentation on, augmented) by the run's own patch sampler. Variants are
made with a seed from (run seed, case name, row, slot); each training sample takes slot
``1 + default_rng(sample seed).integers(V)``. So a cached stage sees V variants per slice (or V
patches per case) instead of a fresh draw per sample: another draw, so its result differs from the
recomputing stage's by about seed noise. On the same samples the two steps agree: 2.5D without
augmentation bit for bit with float32 rows, 3D to float tolerance on the same patches (see
``tests/test_feature_cache.py``).

**Why variants and not feature-space flips.** A flip applied to the features equals the features of
the flipped input only for a flip-equivariant encoder. CNNs are not, and not because of padding:
learned kernels are not mirror-symmetric. Measured on 64x64 inputs, ``|E(flip x) - flip E(x)| / |E(x)|``
is 0.5-1.3 at every level of ImageNet EfficientNet-Lite0 and of a random ResNet-18 (0 only at level 0,
the input). Flips are therefore part of the variants, like every other augmentation.

**Keys and invalidation.** A store is named by sha256 over: the encoder's checksum (its ``repr``,
i.e. its layer settings, and every parameter and buffer: names, dtypes, shapes and bytes, so a
changed weight or BatchNorm running statistic is a different store), the preprocessing, the slab
geometry (2.5D: slice axis, context slices, padding multiple; 3D: patch size and foreground share),
V, and where samples are random (2.5D with augmentation, 3D always) the run seed and the augmentation
config. Rows are keyed by (case name, slot, row) in its index.
Features are computed a whole (case, slot) group at a time, in fixed chunks of at most
:data:`FILL_BATCH` slices, so what a row holds never depends on which samples asked for it first (CNN
outputs are not bit-identical across batch sizes, even on CPU): a resumed run refills a memory cache
with the same bits. The price: a 2.5D stage encodes every slice of every case it touches V times, so
the cache pays off once a stage draws more samples than ~V x the training slices; a 3D stage encodes at
most V patches per case, so it pays off once it draws more than ~V x the training cases (see the benchmark).

**Memory or disk.** ``memory`` keeps float16 arrays for the session (zero-filled on allocation, so
untouched rows cost no RAM). ``disk`` keeps float16 ``numpy.memmap`` files under
``data.cache_dir/features/<key>/`` (default ``~/.cache/seg_transfer/features``): one file per
feature level (per padded input shape), created sparse as a temp file linked into place, and an
``index.json`` written atomically after the rows it lists are flushed (every few seconds of a fill and at its
end), so an interrupted fill leaves rows the index does not list (recomputed on next use). Cases are known by name and a fingerprint of
their preprocessed volumes, so changed data under an old name is a miss too. A later process, or
``rank-encoders`` (with ``training.feature_cache: disk``; it reads slot 0 of the same store when its
candidate's encoder checksum equals the run's), reloads without running the encoder. A store is
rebuilt when the case list it was made for does not contain the requested cases. One writer per
store at a time.

**Batches.** Slices of one dataset usually pad to one size. Where they do not, a batch of cached
features is padded at the end (bottom, right) with zeros per level, labels with background; the
recomputing path pads the input symmetrically instead, so the two differ at those borders.

**BatchNorm and the trainer.** Cached features are eval-mode features. With ``model.frozen_bn``
``eval`` or ``adapt`` the frozen encoder's BatchNorm is in eval mode during a decoder-only stage
anyway, so the cached step computes what the recomputing step computes (for encoders without
dropout or stochastic depth in their feature path, which smp's and timm's defaults have off). With
``frozen_bn: train`` the features depend on each batch's statistics and the running statistics move:
:func:`open_decoder_cache` refuses with a one-line ConfigError (so does the shipped 3D config, whose
``frozen_bn: train`` was chosen by measurement: the cache serves 3D configs with ``eval`` or ``adapt``).
It also refuses distributed runs (the cached step bypasses DistributedDataParallel). The cached step
uses the bare model (no ``torch.compile``, no channels-last). Validation always runs the whole network.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg_transfer.atomic import write_atomic
from seg_transfer.config import ConfigError, RunConfig
from seg_transfer.training import speed
from seg_transfer.training.cached_samples import (
    LABEL_DTYPE,
    PLAIN_SLOT,
    SAMPLE_ROWS,
    CacheSpec,
    CaseLayout,
    SampleRows,
    case_layouts,
    group_samples,
    slice_spec,
)
from seg_transfer.training.loss import as_float
from seg_transfer.training.optim import backward_and_step
from seg_transfer.training.speed import FULL_PRECISION, SpeedSettings

log = logging.getLogger(__name__)

FORMAT = 2  # 2: n-D rows and per-axis strides (3D patches); format-1 stores are misses and are rebuilt
#: rows per encoder forward when filling a group: fixed, so a row's bits never depend on the batch it came in
FILL_BATCH = 32
COMMIT_SECONDS = 5.0  # a disk fill flushes and re-indexes at most this often
FEATURE_DTYPE = np.float16


# --------------------------------------------------------------------------- keys


def encoder_checksum(encoder: nn.Module) -> str:
    """sha256 of the encoder's ``repr`` and every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(repr(encoder).encode())
    for name, tensor in encoder.state_dict().items():
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def store_key(spec: CacheSpec, checksum: str) -> str:
    """The store name: 24 hex digits of sha256 over the format, the encoder ``checksum`` and ``spec``."""
    text = json.dumps({"format": FORMAT, "encoder": checksum, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def feature_cache_dir(config: RunConfig) -> Path:
    """Where disk stores live: ``data.cache_dir/features`` or ``~/.cache/seg_transfer/features``."""
    base = config.data.cache_dir or Path.home() / ".cache" / "seg_transfer"
    return Path(base) / "features"


# --------------------------------------------------------------------------- the store


Level = tuple[int, tuple[int, ...]]  # (channels, stride per spatial axis) of one encoder output level


class FeatureStore:
    """Rows of (case, slot, row) features and labels, in memory or memory-mapped files.

    Rows are grouped by padded input shape (a bucket: ``(H, W)`` slabs or ``(X, Y, Z)`` patches), each case
    a contiguous block of ``slots x rows`` rows (slot-major), so a (case, slot) group is one contiguous
    write. ``levels`` lists (channels, per-axis stride) of levels 1.. of the encoder output.
    """

    def __init__(self, key: str, cases: Sequence[CaseLayout], levels: Sequence[Level], slots: int,
                 folder: Path | None = None, filled: set[tuple[str, int]] | None = None, meta: dict | None = None):
        self.key, self.cases, self.slots, self.folder = key, list(cases), slots, folder
        self.levels: list[Level] = [(int(channels), tuple(int(s) for s in strides)) for channels, strides in levels]
        self.meta = meta or {}
        self.filled: set[tuple[str, int]] = set(filled or ())
        self._uncommitted: set[tuple[int, ...]] = set()  # buckets written since the last commit
        self.case_index = {case.name: i for i, case in enumerate(self.cases)}
        self.bucket_of: list[tuple[int, ...]] = [c.shape for c in self.cases]
        self.offset: list[int] = []
        rows: dict[tuple[int, ...], int] = {}
        for case, bucket in zip(self.cases, self.bucket_of):
            self.offset.append(rows.get(bucket, 0))
            rows[bucket] = self.offset[-1] + slots * case.rows
        self.arrays = {bucket: self._open(bucket, count) for bucket, count in rows.items()}

    # ----- layout

    def _level_shape(self, shape: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
        return tuple(size // stride for size, stride in zip(shape, strides))

    def _shapes(self, bucket: tuple[int, ...], rows: int) -> list[tuple[str, tuple[int, ...], Any]]:
        shapes = [(f"level{k + 1}", (rows, channels, *self._level_shape(bucket, strides)), FEATURE_DTYPE)
                  for k, (channels, strides) in enumerate(self.levels)]
        return [*shapes, ("label", (rows, *bucket), LABEL_DTYPE)]

    def _open(self, bucket: tuple[int, ...], rows: int) -> list[np.ndarray]:
        arrays = []
        for name, shape, dtype in self._shapes(bucket, rows):
            if self.folder is None:
                arrays.append(np.zeros(shape, dtype))
                continue
            path = self.folder / f"{'x'.join(str(s) for s in bucket)}.{name}.bin"
            _create_sparse(path, int(np.prod(shape)) * np.dtype(dtype).itemsize)
            arrays.append(np.memmap(path, dtype=dtype, mode="r+", shape=shape))
        return arrays

    def rows(self, case: int, slot: int, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        return self.offset[case] + slot * self.cases[case].rows + np.asarray(indices, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays (allocated; rows never written take no RAM or disk)."""
        return sum(array.nbytes for arrays in self.arrays.values() for array in arrays)

    @property
    def filled_bytes(self) -> int:
        """Bytes of the rows written so far."""
        total = 0
        for name, slot in self.filled:
            case = self.cases[self.case_index[name]]
            total += sum(a[0].nbytes for a in self.arrays[case.shape]) * case.rows
        return total

    # ----- writing and reading

    def write(self, case: int, slot: int, features: Sequence[np.ndarray], labels: np.ndarray) -> None:
        """Store a whole group: ``features[k]`` (rows, C, *level shape) for level k+1 and ``labels`` (rows, *shape).
        A disk store's index lists the group only after the next :meth:`commit`."""
        start = int(self.rows(case, slot, [0])[0])
        block = slice(start, start + self.cases[case].rows)
        arrays = self.arrays[self.bucket_of[case]]
        for array, values in zip(arrays, [*features, labels]):
            array[block] = values
        self.filled.add((self.cases[case].name, slot))
        self._uncommitted.add(self.bucket_of[case])

    def commit(self) -> None:
        """Disk: flush the files written since the last commit, then write the index listing their groups, so
        the index never lists rows that are not on disk. One ``msync`` per file per commit, not per group:
        with per-group flushes a disk fill took 33.9 s against 2.6 s in memory on the H100 machine (README)."""
        if self.folder is not None and self._uncommitted:
            for bucket in sorted(self._uncommitted):
                for array in self.arrays[bucket]:
                    array.flush()
            self._write_index()
        self._uncommitted.clear()

    def read(self, entries: Sequence[tuple[int, int, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Features (levels 1.., float32 ``(B, C, *level shape)``) and labels ``(B, 1, *shape)`` int64 of
        ``(case, slot, row)`` entries; mixed shapes are zero-padded at the end of each axis to the largest."""
        shape = tuple(int(s) for s in np.max([self.bucket_of[c] for c, _, _ in entries], axis=0))
        features = [np.zeros((len(entries), channels, *self._level_shape(shape, strides)), np.float32)
                    for channels, strides in self.levels]
        labels = np.zeros((len(entries), 1, *shape), np.int64)
        by_bucket: dict[tuple[int, ...], list[int]] = {}
        for position, (case, _, _) in enumerate(entries):
            by_bucket.setdefault(self.bucket_of[case], []).append(position)
        for bucket, positions in by_bucket.items():
            rows = np.array([self.rows(entries[p][0], entries[p][1], [entries[p][2]])[0] for p in positions])
            arrays = self.arrays[bucket]
            for out, array, (_, strides) in zip(features, arrays, self.levels):
                out[(positions, slice(None), *(slice(0, n) for n in self._level_shape(bucket, strides)))] = array[rows]
            labels[(positions, 0, *(slice(0, n) for n in bucket))] = arrays[-1][rows]
        return [torch.from_numpy(f) for f in features], torch.from_numpy(labels)

    # ----- the index (disk)

    def index(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "meta": self.meta, "slots": self.slots,
                "levels": [[channels, list(strides)] for channels, strides in self.levels],
                "cases": [case.as_row() for case in self.cases],
                "filled": sorted([name, slot] for name, slot in self.filled)}

    def _write_index(self) -> None:
        path = self.folder / "index.json"
        on_disk = _read_index(path)
        if on_disk is not None and _same_layout(on_disk, self.index()):  # another process filled groups too
            self.filled |= {(name, int(slot)) for name, slot in on_disk["filled"]}
        write_atomic(path, json.dumps(self.index()) + "\n")


def _create_sparse(path: Path, size: int) -> None:
    """Make ``path`` a zero file of ``size`` bytes (sparse: unwritten rows take no disk space) unless it already
    is one: a temp file, hard-linked into place (never replacing a file another process has just made) or,
    over a file of the wrong size, renamed into place."""
    if path.is_file() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as stream:
        stream.truncate(size)
    try:
        os.link(temp, path)
    except FileExistsError:
        if path.stat().st_size != size:
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _read_index(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _same_layout(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("format", "key", "slots", "levels", "cases"))


def open_store(key: str, cases: Sequence[CaseLayout], levels: Callable[[], Sequence[Level]], slots: int,
               folder: Path | None = None, meta: dict | None = None) -> FeatureStore:
    """A memory store (``folder`` None), or the disk store in ``folder/key``: reloaded when its index has the
    same key and slots and lists every requested case with the same layout, else made anew. ``levels``
    (e.g. :func:`probe_levels`) is called only for a new store: a reload runs no encoder at all."""
    if folder is None:
        return FeatureStore(key, cases, levels(), slots, meta=meta)
    where = Path(folder) / key
    stored = _read_index(where / "index.json")
    if stored is not None and stored.get("format") == FORMAT and stored.get("key") == key and stored.get("slots") == slots:
        layouts = [CaseLayout.from_row(row) for row in stored["cases"]]
        if set(cases) <= set(layouts):
            filled = {(name, int(slot)) for name, slot in stored["filled"]}
            return FeatureStore(key, layouts, stored["levels"], slots, where, filled, stored.get("meta"))
        log.info("feature cache %s: rebuilt for another case list", where)
    store = FeatureStore(key, cases, levels(), slots, where, meta=meta)
    write_atomic(where / "index.json", json.dumps(store.index()) + "\n")
    return store


# --------------------------------------------------------------------------- computing features


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block; every submodule's own mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def probe_levels(encoder: nn.Module, in_channels: int, size: Sequence[int], device: torch.device) -> list[Level]:
    """(channels, per-axis stride) of encoder output levels 1.. for an input of spatial ``size`` (one zero
    sample, eval mode)."""
    with eval_mode(encoder), torch.no_grad():
        outputs = encoder(torch.zeros(1, in_channels, *size, device=device))
    levels = []
    for output in outputs[1:]:
        shape = tuple(int(n) for n in output.shape[2:])
        if any(size_ % n for size_, n in zip(size, shape)):
            raise ConfigError(f"feature cache: an encoder level of {shape} does not divide the input size {tuple(size)}")
        levels.append((int(output.shape[1]), tuple(size_ // n for size_, n in zip(size, shape))))
    return levels


def encode(encoder: nn.Module, images: np.ndarray, device: torch.device) -> list[np.ndarray]:
    """Levels 1.. of ``encoder`` (eval mode, no gradients, float32) on ``images`` in equal chunks of at most
    :data:`FILL_BATCH` (38 slices: 19 + 19, not 32 + 6), as float16 arrays."""
    parts: list[list[np.ndarray]] = []
    with eval_mode(encoder), torch.no_grad():
        for chunk in np.array_split(images, -(-len(images) // FILL_BATCH)):
            outputs = encoder(torch.from_numpy(np.ascontiguousarray(chunk)).to(device))
            parts.append([o.float().cpu().numpy().astype(FEATURE_DTYPE) for o in outputs[1:]])
    return [np.concatenate(level) for level in zip(*parts)]


#: ``make_group(case, slot) -> (inputs (rows, C, *shape), labels (rows, *shape))`` of one group
GroupMaker = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def fill(store: FeatureStore, groups: Sequence[tuple[int, int]], encoder: nn.Module, make_group: GroupMaker,
         device: torch.device, store_case: Sequence[int], commit_seconds: float = COMMIT_SECONDS) -> int:
    """Compute and store every ``(case, slot)`` group not yet in ``store`` (``store_case`` maps the caller's
    cases to the store's), committing at most every ``commit_seconds`` and at the end: an interrupted fill
    loses at most that much work. Returns the rows computed."""
    computed, last_commit = 0, time.monotonic()
    for case, slot in sorted(set(groups)):
        if (store.cases[store_case[case]].name, slot) in store.filled:
            continue
        images, labels = make_group(case, slot)
        store.write(store_case[case], slot, encode(encoder, images, device), labels)
        computed += len(images)
        if time.monotonic() - last_commit >= commit_seconds:
            store.commit()
            last_commit = time.monotonic()
    store.commit()
    return computed


# --------------------------------------------------------------------------- the trainer's side


def check_decoder_reads_features_only(model: nn.Module, rows: SampleRows, in_channels: int, device: torch.device) -> None:
    """ConfigError unless ``rows.decode`` on encoder levels 1.. gives the network's own output (eval mode):
    a decoder that reads the input image itself cannot run on cached features."""
    size = rows.check_size(model)
    image = torch.randn(2, in_channels, *size, generator=torch.Generator().manual_seed(0)).to(device)
    with eval_mode(model), torch.no_grad():
        real = model(image)
        try:
            cached = rows.decode(model, model.encoder(image)[1:], tuple(size))
        except RuntimeError:
            cached = None
    if cached is None or cached.shape != real.shape or not torch.allclose(real, cached, rtol=1e-4, atol=1e-5):
        raise ConfigError(f"training.feature_cache: the {type(model).__name__} decoder reads the input image itself; "
                          "the cache supports decoders that read only encoder features (smp Unet, UnetPlusPlus, "
                          "FPN, Linknet, MAnet, DeepLabV3Plus; the 3D route's U-Net)")


class CachedEpoch:
    """One epoch of a decoder-only stage as cached batches ``{"features", "label", "size"}``; iterating first
    fills the groups the epoch needs. Its length is the sample loader's (same batches, same drop_last)."""

    def __init__(self, cache: DecoderStageCache, model: nn.Module, dataset, batch_size: int, drop_last: bool,
                 device: torch.device):
        self.cache, self.model, self.dataset, self.batch_size, self.drop_last, self.device = (
            cache, model, dataset, batch_size, drop_last, device)

    def __len__(self) -> int:
        count = len(self.dataset)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        entries = self.cache.epoch_entries(self.dataset)
        store = self.cache.prepare(self.model.encoder, self.dataset, entries, self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = entries[start:start + self.batch_size]
            features, labels = store.read(batch)
            yield {"features": features, "label": labels, "size": tuple(labels.shape[2:])}


class DecoderStageCache:
    """The trainer's feature cache (``training.feature_cache``): per epoch of a decoder-only stage,
    :meth:`epoch` gives cached batches for :meth:`step`. ``rows`` is the route's kind of row
    (:data:`~seg_transfer.training.cached_samples.SAMPLE_ROWS`)."""

    def __init__(self, config: RunConfig, folder: Path | None):
        self.config, self.folder = config, folder
        self.rows: SampleRows = SAMPLE_ROWS[config.model.dims]
        self.store: FeatureStore | None = None
        self._layouts: tuple[int, list[CaseLayout]] | None = None
        self.seconds_filling, self.slices_computed = 0.0, 0

    def epoch(self, model: nn.Module, dataset, loader, device: torch.device) -> CachedEpoch:
        return CachedEpoch(self, model, dataset, loader.batch_size, loader.drop_last, device)

    def epoch_entries(self, dataset) -> list[tuple[int, int, int]]:
        """(case, slot, row) of every sample of the dataset's current epoch, in order (cases index its volumes)."""
        return self.rows.entries(dataset, self._spec(dataset).variants)

    def prepare(self, encoder: nn.Module, dataset, entries: list[tuple[int, int, int]], device: torch.device) -> _Remapped:
        """The store for the encoder as it is now, with every group ``entries`` need filled."""
        spec = self._spec(dataset)
        key = store_key(spec, encoder_checksum(encoder))
        layouts = self._case_layouts(dataset)
        if self.store is None or self.store.key != key:
            probe = lambda: probe_levels(encoder, self.rows.in_channels(spec), layouts[0].shape, device)  # noqa: E731
            self.store = open_store(key, layouts, probe, spec.slots, self.folder, {"spec": asdict(spec)})
        store_case = [self.store.case_index[layout.name] for layout in layouts]
        started = time.perf_counter()
        computed = fill(self.store, [(case, slot) for case, slot, _ in entries], encoder,
                        lambda case, slot: self.rows.group(dataset, case, layouts[case], slot, spec), device, store_case)
        if computed:
            self.seconds_filling += time.perf_counter() - started
            self.slices_computed += computed
            log.info("feature cache: encoded %d samples in %.1f s (%.0f MB of float16 features and labels cached)",
                     computed, time.perf_counter() - started, self.store.filled_bytes / 1e6)
        return _Remapped(self.store, store_case)

    def step(self, model: nn.Module, loss_fn: nn.Module, optimizer, batch: dict, device: torch.device,
             grad_clip: float | None, *, settings: SpeedSettings = FULL_PRECISION, scaler=None) -> float:
        """:func:`decoder_step` with this route's decoding."""
        return decoder_step(model, loss_fn, optimizer, batch, device, grad_clip, settings=settings, scaler=scaler,
                            decode=self.rows.decode)

    def _spec(self, dataset) -> CacheSpec:
        """The spec of the samples ``dataset`` serves now: augmented (variants) or plain, as the stage set it
        (``stages[].augment``, else ``data.augment.enabled``)."""
        augment = self.config.data.augment.model_copy(update={"enabled": dataset.augment is not None})
        config = self.config.model_copy(update={"data": self.config.data.model_copy(update={"augment": augment})})
        return self.rows.spec(config, dataset)

    def _case_layouts(self, dataset) -> list[CaseLayout]:
        if self._layouts is None or self._layouts[0] != id(dataset):
            self._layouts = (id(dataset), self.rows.layouts(dataset))
        return self._layouts[1]


@dataclass(frozen=True)
class _Remapped:
    """A store read through the dataset's case numbering."""

    store: FeatureStore
    store_case: list[int]

    def read(self, entries: Sequence[tuple[int, int, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.store.read([(self.store_case[case], slot, index) for case, slot, index in entries])


def open_decoder_cache(config: RunConfig, model: nn.Module, in_channels: int, world_size: int = 1) -> DecoderStageCache | None:
    """The cache ``training.feature_cache`` asks for (None when ``off`` or no stage trains the decoder only).

    One-line ConfigError for what it cannot serve: ``model.frozen_bn: train``, a distributed run, a
    decoder that reads the input image.
    """
    mode = config.training.feature_cache
    if mode == "off":
        return None
    if not any(stage.train == "decoder" for stage in config.training.stages):
        log.info("training.feature_cache=%s: no decoder-only stage, nothing to cache", mode)
        return None
    if config.model.frozen_bn == "train":
        raise ConfigError("training.feature_cache needs model.frozen_bn eval or adapt: with train, frozen BatchNorm "
                          "normalises each batch by its own statistics, so features depend on the batch and cannot be cached")
    if world_size > 1:
        raise ConfigError("training.feature_cache needs a single-process run (the cached decoder step bypasses "
                          "DistributedDataParallel)")
    device = next(model.parameters()).device
    check_decoder_reads_features_only(model, SAMPLE_ROWS[config.model.dims], in_channels, device)
    return DecoderStageCache(config, feature_cache_dir(config) if mode == "disk" else None)


def decoder_step(model: nn.Module, loss_fn: nn.Module, optimizer, batch: dict, device: torch.device,
                 grad_clip: float | None, *, decode: Callable[..., torch.Tensor], settings: SpeedSettings = FULL_PRECISION,
                 scaler=None) -> float:
    """One optimisation step on a cached batch: decoder + head only (``decode``: the route's, from levels
    1..); otherwise as :func:`seg_transfer.training.trainer.train_step` (autocast, float32 loss, scaler, clipping)."""
    features = [f.to(device, non_blocking=True) for f in batch["features"]]
    label = batch["label"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with speed.autocast(settings, device):
        logits = decode(model, features, batch["size"])
    loss = loss_fn(as_float(logits), label)
    return backward_and_step(loss, model, optimizer, grad_clip, scaler)


# --------------------------------------------------------------------------- rank-encoders' side


def open_plain_store(config: RunConfig, encoder: nn.Module, multiple: int, volumes, device: torch.device) -> FeatureStore:
    """The 2.5D disk store ``config``'s training would use for ``encoder`` (same key), with slot 0 (plain slabs)
    filled for every case of ``volumes``; the cases' store indices are ``store.case_index[name]``."""
    spec = slice_spec(config, multiple)
    layouts = case_layouts(volumes, spec.geometry["axis"], multiple)
    store = open_store(store_key(spec, encoder_checksum(encoder)), layouts,
                       lambda: probe_levels(encoder, SAMPLE_ROWS["2.5d"].in_channels(spec), layouts[0].shape, device),
                       spec.slots, feature_cache_dir(config), {"spec": asdict(spec)})
    store_case = [store.case_index[layout.name] for layout in layouts]
    missing = sum((layout.name, PLAIN_SLOT) not in store.filled for layout in layouts)
    fill(store, [(case, PLAIN_SLOT) for case in range(len(layouts))], encoder,
         lambda case, slot: group_samples(volumes[case], layouts[case], slot, spec, None), device, store_case)
    log.info("feature cache %s: %d of %d cases read from the cache", store.folder, len(layouts) - missing, len(layouts))
    return store
