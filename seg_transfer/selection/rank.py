"""Rank candidate source encoders for a run config by a transferability score (see
:mod:`seg_transfer.selection.scores`; by default the run's route's measured choice: LogME at stride 16 in
2.5D, feature variety at stride 8 in 3D) on the run's training pixels, before any fine-tuning.

For every training case (as training preprocesses it, no augmentation) a class-balanced set of voxels
is drawn once, from ``np.random.default_rng([seed, case_index])``. Each candidate encoder (built by the
project's factory with the run's architecture, eval mode) sees the 2.5D slabs of the slices holding
those voxels, padded as in training. The feature map at each chosen stride is bilinearly upsampled
(``align_corners=False``) to the padded slice size, and the feature vector at every sampled voxel is
read. Each asked-for score of the stacked features (n x d) against the voxel labels scores the
candidate; the first orders the ranking.

With ``training.feature_cache: disk`` in the run config, a candidate's features come from the disk
store its training would use (:mod:`seg_transfer.training.feature_cache`, slot 0: plain slabs, same
key: encoder checksum, preprocessing, slab geometry, augmentation settings). Slices missing from it
are encoded once and stored, so a second ranking, or training after it, does not run the encoder
again for them. Cached features are float16: LogME then moves by a few 1e-5 (phantoms), far less than
the gaps between candidates.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from seg_transfer.atomic import json_safe, write_atomic
from seg_transfer.config import NAMED_WEIGHTS, ConfigError, ModelConfig, RunConfig
from seg_transfer.data.cases import DatasetError
from seg_transfer.data.slices import pad_to_multiple, slab
from seg_transfer.selection.scores import get_scores, score_label

log = logging.getLogger(__name__)

CANDIDATE_EXAMPLE = "tu-tf_efficientnet_lite0:imagenet"


# --------------------------------------------------------------------------- candidates and options


@dataclass(frozen=True)
class Candidate:
    """``encoder:weights[:inflation]`` with weights ``imagenet``, ``none``, a weights file or a run folder (its
    ``checkpoints/best.pt``), and for a 3D run config the inflation mode (default: the config's); ``text`` is
    how the candidate is shown."""

    text: str
    encoder: str
    weights: str
    inflation: str | None = None

    @property
    def key(self) -> tuple[str, str, str | None]:
        return self.encoder, self.weights, self.inflation

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """``base`` (the run's model settings: route, architecture, depth) with this candidate's encoder."""
        update = {"encoder": self.encoder, "encoder_weights": self.weights}
        return base.model_copy(update=update if self.inflation is None else {**update, "inflation": self.inflation})


def parse_candidate(text: str) -> Candidate:
    """Parse ``encoder:weights[:inflation]``; raises a one-line :class:`ConfigError` naming ``text`` for any
    other form, a weights file that does not exist, an unknown inflation mode, or an encoder name the
    factory does not know."""
    from seg_transfer.models.factory import ModelConfigError, validate_names
    from seg_transfer.models.inflate import INFLATION_MODES
    from seg_transfer.models.weights import WeightsError, weights_file

    parts = [part.strip() for part in text.strip().split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"candidate {text!r}: expected encoder:weights[:inflation], e.g. {CANDIDATE_EXAMPLE}")
    encoder, weights, inflation = parts[0], parts[1], (parts[2] if len(parts) == 3 else None)
    if weights.lower() in NAMED_WEIGHTS:
        weights = weights.lower()
    else:
        try:
            weights = str(weights_file(weights))
        except WeightsError as exc:
            raise ConfigError(f"candidate {text!r}: weights must be imagenet, none, a weights file or a run folder "
                              f"({exc})") from None
    if inflation is not None and inflation not in INFLATION_MODES:
        raise ConfigError(f"candidate {text!r}: inflation must be one of {', '.join(INFLATION_MODES)}")
    try:
        validate_names(ModelConfig(encoder=encoder, encoder_weights=weights))
    except ModelConfigError as exc:
        raise ConfigError(f"candidate {text!r}: {exc}") from None
    return Candidate(text.strip(), encoder, weights, inflation)


def parse_candidates(text: str) -> list[Candidate]:
    """Comma-separated candidates, at least one, no duplicates."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--candidates is empty; give encoder:weights items, e.g. {CANDIDATE_EXAMPLE}")
    candidates = [parse_candidate(item) for item in items]
    seen: set[tuple[str, str, str | None]] = set()
    for candidate in candidates:
        if candidate.key in seen:
            raise ConfigError(f"candidate {candidate.text!r} is given twice")
        seen.add(candidate.key)
    return candidates


def parse_strides(text: str) -> tuple[int, ...]:
    """``"4,8,16"`` as (4, 8, 16); raises :class:`ConfigError` unless all are positive integers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--strides {text!r}: expected comma-separated positive integers, e.g. 4,8,16")
    return tuple(dict.fromkeys(int(p) for p in parts))


@dataclass(frozen=True)
class RankOptions:
    """What to rank with; ``strides`` and ``scores`` left None take the route's defaults (:meth:`for_route`)."""

    pixels: int = 1000
    strides: tuple[int, ...] | None = None
    seed: int = 0
    device: str = "cpu"
    max_cases: int | None = None
    skip_bad_cases: bool = False
    batch_size: int = 16  # slices per encoder forward pass
    scores: tuple[str, ...] | None = None  # registry names (selection/scores.py); the first orders the ranking

    def for_route(self, route) -> RankOptions:
        """These options with unset (None) strides and scores taken from ``route.ranking_strides`` / ``ranking_scores``;
        an empty tuple stays empty and is refused later like any other bad value."""
        return replace(self, strides=route.ranking_strides if self.strides is None else self.strides,
                       scores=route.ranking_scores if self.scores is None else self.scores)


# --------------------------------------------------------------------------- pixel sampling


@dataclass(frozen=True)
class PixelSample:
    """Sampled voxels of one case: flat indices into its (X, Y, Z) label array (ascending) and their labels."""

    flat: np.ndarray
    labels: np.ndarray


def sample_pixels(label: np.ndarray, pixels: int, rng: np.random.Generator) -> PixelSample:
    """Class-balanced voxels of ``label``: the same count for every class present (background included),
    ``pixels // classes`` (at least 1) capped at the rarest class's voxel count, drawn without
    replacement. Deterministic in ``rng``'s state."""
    flat_label = np.asarray(label).reshape(-1)
    classes, counts = np.unique(flat_label, return_counts=True)
    per_class = min(max(1, pixels // len(classes)), int(counts.min()))
    picks = [rng.choice(np.flatnonzero(flat_label == c), size=per_class, replace=False) for c in classes]
    flat = np.sort(np.concatenate(picks))
    return PixelSample(flat, flat_label[flat].astype(np.int64))


def _array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# --------------------------------------------------------------------------- features


def pick_feature_map(features: Sequence[torch.Tensor], padded_hw: tuple[int, int], stride: int) -> torch.Tensor:
    """The encoder output whose grid is the padded slice size / ``stride``; ConfigError if there is none."""
    height, width = padded_hw
    wanted = (height // stride, width // stride)
    if height % stride == 0 and width % stride == 0:
        for feature in features:
            if tuple(feature.shape[-2:]) == wanted:
                return feature
    available = sorted({height // f.shape[-2] for f in features if f.shape[-2]})
    raise ConfigError(f"stride {stride}: the encoder has no such feature map (strides: {', '.join(map(str, available))})")


def case_features(
    encoder: torch.nn.Module, image, sample: PixelSample, axis: int, context: int, multiple: int,
    strides: Sequence[int], device: torch.device, batch_size: int,
    cached: Callable[[np.ndarray], list[torch.Tensor]] | None = None,
) -> dict[int, np.ndarray]:
    """Per stride, the (m, C) float64 features at ``sample``'s voxels of one case's image (1, X, Y, Z).

    ``cached`` (slice indices -> encoder levels 1.. of those slices) replaces running ``encoder``."""
    volume = _array(image)
    coords = np.unravel_index(sample.flat, volume.shape[1:])
    slice_of = coords[axis]
    rows, cols = (coords[a] for a in range(3) if a != axis)
    slices = np.unique(slice_of)
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(slices), batch_size):
        batch = slices[start:start + batch_size]
        slabs = [slab(volume, axis, int(s), context).astype(np.float32, copy=False) for s in batch]
        height, width = slabs[0].shape[-2:]
        padded = np.stack([pad_to_multiple(x, multiple, value=float(x.min())) for x in slabs])
        inputs = torch.from_numpy(padded)
        features = encoder(inputs.to(device)) if cached is None else [inputs, *cached(batch)]
        members = np.flatnonzero(np.isin(slice_of, batch))
        index = tuple(torch.as_tensor(a) for a in (np.searchsorted(batch, slice_of[members]), rows[members], cols[members]))
        for stride in strides:
            fmap = pick_feature_map(features, padded.shape[-2:], stride)
            fmap = nnf.interpolate(fmap.float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)
            picked = fmap[..., :height, :width][index[0], :, index[1], index[2]]  # (members, C)
            out.setdefault(stride, np.zeros((len(sample.flat), picked.shape[1])))[members] = picked.double().cpu().numpy()
    return out


# --------------------------------------------------------------------------- ranking


@dataclass
class Score:
    """One (candidate, stride) row of the ranking; ``seconds`` is the candidate's whole time
    (model build, features for every stride, every score); ``values`` maps score names to values."""

    candidate: str
    encoder: str
    weights: str
    stride: int
    values: dict[str, float]
    seconds: float = 0.0
    n_pixels: int = 0
    feature_dim: int = 0
    rank: int = 0


@dataclass
class Ranking:
    scores: list[Score]
    cases: list[str]
    labels: dict[int, str]
    class_counts: dict[int, int]
    options: RankOptions
    seconds: float = 0.0  # loading the training cases, pixel sampling and every candidate
    files: dict[str, Path] = field(default_factory=dict)


def training_cases(config: RunConfig, options: RankOptions, splits: dict[str, list[str]] | None = None):
    """The run's training cases (split as a fresh training run splits them, or by ``splits``), the first
    ``max_cases``, and the label map."""
    from seg_transfer.data.pipeline import prepare_data
    from seg_transfer.data.splits import save_splits

    with tempfile.TemporaryDirectory(prefix="rank_encoders_") as run_dir:
        if splits is not None:
            save_splits(splits, Path(run_dir) / "splits.json")
        data = prepare_data(config.data, Path(run_dir), options.skip_bad_cases)
    cases = data.subset("train")[:options.max_cases]
    if not cases:
        raise DatasetError("no training cases to sample pixels from")
    return cases, data.labels


def sample_cases(volumes, pixels: int, seed: int) -> list[PixelSample]:
    """One :class:`PixelSample` per volume, from ``np.random.default_rng([seed, case_index])``."""
    return [sample_pixels(_array(item["label"])[0], pixels, np.random.default_rng([seed, index]))
            for index, item in enumerate(volumes)]


def volume_features(encoder: torch.nn.Module, image, sample: PixelSample, multiple: Sequence[int],
                    strides: Sequence[int], device: torch.device) -> dict[int, np.ndarray]:
    """3D route: per stride, the (m, C) float64 features at ``sample``'s voxels of one case's image
    (1, X, Y, Z), read from the whole volume's feature map (padded at the end to the network's per-axis
    ``multiple`` with the image minimum) by trilinear interpolation at the voxel centres, which is what
    upsampling the map (``align_corners=False``) and reading the voxel gives."""
    volume = _array(image).astype(np.float32, copy=False)
    padded = [-(-size // m) * m for size, m in zip(volume.shape[1:], multiple)]
    inputs = np.full((1, 1, *padded), float(volume.min()), dtype=np.float32)
    inputs[0, :, :volume.shape[1], :volume.shape[2], :volume.shape[3]] = volume
    features = encoder(torch.from_numpy(inputs).to(device))
    coords = np.unravel_index(sample.flat, volume.shape[1:])
    # grid_sample's last axis is (W, H, D) = (Z, Y, X) here, in [-1, 1] at voxel centres
    grid = np.stack([(2 * coords[axis] + 1) / padded[axis] - 1 for axis in (2, 1, 0)], axis=-1)
    grid_tensor = torch.from_numpy(grid).float().to(device).view(1, -1, 1, 1, 3)
    out = {}
    for stride in strides:
        levels = [f for f, s in zip(features, encoder.feature_strides) if int(s[0]) == stride]
        if not levels:
            raise ConfigError(f"stride {stride}: the encoder has no such feature map (strides: "
                              f"{', '.join(str(int(s[0])) for s in encoder.feature_strides)})")
        picked = nnf.grid_sample(levels[0].float(), grid_tensor, mode="bilinear", padding_mode="border", align_corners=False)
        out[stride] = picked.view(picked.shape[1], -1).T.double().cpu().numpy()
    return out


def score_candidate(candidate: Candidate, config: RunConfig, volumes, samples: list[PixelSample],
                    num_classes: int, options: RankOptions, device: torch.device) -> list[Score]:
    """Build ``candidate``'s encoder as the run's route builds it (2.5D, or inflated to 3D), extract features
    at every stride, and compute every asked-for score at each."""
    from seg_transfer.routes import get_route

    started = time.perf_counter()
    torch.manual_seed(options.seed)  # a randomly initialised encoder is the same on every call
    route = get_route(config.model.dims)
    model, _ = route.build_network(candidate.model_config(config.model), route.in_channels(config.data), num_classes, True)
    encoder = model.encoder.eval().to(device)
    parts: dict[int, list[np.ndarray]] = {stride: [] for stride in options.strides}
    show = sys.stderr.isatty()
    with torch.inference_mode():
        read = FEATURE_READERS[route.name](config, encoder, route.spatial_multiple(model), volumes, samples, options, device)
        for index in tqdm(range(len(samples)), desc=candidate.text, unit="case", disable=not show):
            for stride, values in read(index).items():
                parts[stride].append(values)
    labels = np.concatenate([s.labels for s in samples])
    case_of_row = np.concatenate([np.full(len(s.labels), index) for index, s in enumerate(samples)])
    scores = []
    for stride in options.strides:
        matrix = np.concatenate(parts[stride])
        values = {score.name: score.compute(matrix, labels, case_of_row) for score in get_scores(options.scores)}
        scores.append(Score(candidate.text, candidate.encoder, candidate.weights, stride, values,
                            n_pixels=matrix.shape[0], feature_dim=matrix.shape[1]))
    seconds = time.perf_counter() - started
    for score in scores:
        score.seconds = seconds
    return scores


CaseReader = Callable[[int], dict[int, np.ndarray]]


def _volume_reader(config: RunConfig, encoder: torch.nn.Module, multiple: Sequence[int], volumes,
                   samples: list[PixelSample], options: RankOptions, device: torch.device) -> CaseReader:
    """3D route: case index -> its sampled voxels' features per stride, from the whole volume."""
    return lambda index: volume_features(encoder, volumes[index]["image"], samples[index], multiple, options.strides, device)


def _slab_reader(config: RunConfig, encoder: torch.nn.Module, multiple: Sequence[int], volumes,
                 samples: list[PixelSample], options: RankOptions, device: torch.device) -> CaseReader:
    """2.5D route: case index -> its sampled pixels' features per stride, from the slabs holding them
    (read from the disk feature store when the run config has one)."""
    readers = _cached_readers(config, encoder, multiple[0], volumes, device)
    return lambda index: case_features(encoder, volumes[index]["image"], samples[index], config.data.slice_axis,
                                       config.data.context_slices, multiple[0], options.strides, device,
                                       options.batch_size, cached=readers[index] if readers else None)


FEATURE_READERS: dict[str, Callable[..., CaseReader]] = {"2.5d": _slab_reader, "3d": _volume_reader}
"""Per route name: how a candidate's features at the sampled pixels are read (signature of :func:`_slab_reader`)."""


def _cached_readers(config: RunConfig, encoder: torch.nn.Module, multiple: int, volumes,
                    device: torch.device) -> list[Callable[[np.ndarray], list[torch.Tensor]]] | None:
    """Per case, a reader of its cached plain-slab features (``training.feature_cache: disk``), else None."""
    if config.training.feature_cache != "disk":
        return None
    from seg_transfer.training.cached_samples import PLAIN_SLOT
    from seg_transfer.training.feature_cache import open_plain_store

    store = open_plain_store(config, encoder, multiple, volumes, device)

    def reader(case: int) -> Callable[[np.ndarray], list[torch.Tensor]]:
        return lambda slices: store.read([(case, PLAIN_SLOT, int(s)) for s in slices])[0]

    return [reader(store.case_index[str(volumes[i].get("name", i))]) for i in range(len(volumes))]


def rank_encoders(config: RunConfig, candidates: Sequence[Candidate], output: Path,
                  options: RankOptions = RankOptions(), splits: dict[str, list[str]] | None = None) -> Ranking:
    """Score every candidate (see the module docstring) on the training cases of ``config`` (or of
    ``splits``, as a study fixes them), rank by the first of ``options.scores`` (highest first), and write ``ranking.json`` and
    ``ranking.md`` to ``output`` atomically. ``Ranking.seconds`` covers loading and preprocessing the training
    cases, sampling and every candidate; not finding and checking the dataset (a training run's clock
    starts after that too). Process-wide torch settings (thread count) are as before when it returns."""
    from seg_transfer.inference.predictor import resolve_device

    from seg_transfer.training.speed import process_settings_restored

    from seg_transfer.routes import get_route

    options = options.for_route(get_route(config.model.dims))
    get_scores(options.scores)  # an unknown name fails before any work
    device = resolve_device(options.device)
    with process_settings_restored():  # the thread count below is the run's, not the caller's afterwards
        if config.training.num_threads:
            torch.set_num_threads(config.training.num_threads)  # the run's CPU threads, as its training uses
        return _rank_and_write(config, candidates, Path(output), options, splits, device)


def _rank_and_write(config: RunConfig, candidates: Sequence[Candidate], output: Path, options: RankOptions,
                    splits: dict[str, list[str]] | None, device: torch.device) -> Ranking:
    from seg_transfer.data.pipeline import volume_dataset
    from seg_transfer.data.transforms import Preprocessing

    cases, labels = training_cases(config, options, splits)
    started = time.perf_counter()  # after finding and checking the dataset, which training does before its clock too
    volumes = volume_dataset(cases, Preprocessing.from_config(config.data), config.data)
    samples = sample_cases(volumes, options.pixels, options.seed)
    log.info("%d training cases, %d sampled pixels", len(cases), sum(len(s.flat) for s in samples))
    scores = [row for c in candidates for row in score_candidate(c, config, volumes, samples, len(labels), options, device)]
    primary = options.scores[0]
    scores.sort(key=lambda s: -s.values[primary] if np.isfinite(s.values[primary]) else np.inf)
    for rank, score in enumerate(scores, start=1):
        score.rank = rank
    values, counts = np.unique(np.concatenate([s.labels for s in samples]), return_counts=True)
    ranking = Ranking(scores, [c.name for c in cases], labels, dict(zip(values.tolist(), counts.tolist())), options,
                      seconds=time.perf_counter() - started)
    ranking.files = write_ranking(ranking, output)
    return ranking


# --------------------------------------------------------------------------- output

def columns(ranking: Ranking) -> list[str]:
    return ["rank", "candidate", *(score_label(name) for name in ranking.options.scores), "seconds", "stride", "n pixels",
            "feature dim"]


def table_rows(ranking: Ranking) -> list[list[str]]:
    return [[str(s.rank), s.candidate, *(f"{s.values[name]:.4f}" for name in ranking.options.scores), f"{s.seconds:.1f}",
             str(s.stride), str(s.n_pixels), str(s.feature_dim)] for s in ranking.scores]


def format_table(ranking: Ranking) -> str:
    """The ranking as an aligned plain-text table (for the terminal)."""
    rows = [columns(ranking), *table_rows(ranking)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def _method(options: RankOptions) -> str:
    scores = get_scores(options.scores)
    return ("; ".join(f"{s.label} ({s.reference})" for s in scores) + " on class-balanced training pixels; higher is "
            f"better; ranked by {scores[0].label}")


def ranking_payload(ranking: Ranking) -> dict:
    return json_safe({
        "method": _method(ranking.options),
        "options": asdict(ranking.options),
        "cases": ranking.cases,
        "labels": ranking.labels,
        "sampled_pixels_per_class": ranking.class_counts,
        "seconds": ranking.seconds,
        "ranking": [asdict(score) for score in ranking.scores],
    })


def ranking_markdown(ranking: Ranking) -> str:
    options = ranking.options
    primary = score_label(options.scores[0])
    lines = [
        f"# Encoder ranking ({primary})",
        "",
        f"{len(ranking.cases)} training cases, up to {options.pixels} class-balanced pixels per case (seed {options.seed}); "
        f"features bilinearly upsampled from the stride's feature map. {_method(options)}. Seconds is each "
        "candidate's whole time (build, features, scores).",
        "",
        f"Whole ranking: {ranking.seconds:.1f} s (loading and preprocessing the training cases included).",
        "",
        "| " + " | ".join(columns(ranking)) + " |",
        "|" + "---|" * len(columns(ranking)),
        *("| " + " | ".join(row) + " |" for row in table_rows(ranking)),
    ]
    return "\n".join(lines) + "\n"


def write_ranking(ranking: Ranking, output: Path) -> dict[str, Path]:
    return {
        "json": write_atomic(output / "ranking.json", json.dumps(ranking_payload(ranking), indent=2) + "\n"),
        "markdown": write_atomic(output / "ranking.md", ranking_markdown(ranking)),
    }
