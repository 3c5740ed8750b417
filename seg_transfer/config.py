"""Run configuration: pydantic models (``extra="forbid"``), YAML loading and ``--set`` overrides.

Everything a run does is config data. Pretrained and from-scratch runs differ only in
``model.encoder_weights`` (and, for the control, a single ``all`` stage).
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from seg_transfer.errors import UserError, one_line


#: image kinds and MRI intensity scalings: named once, used by the config and by the checkpoint's preprocessing
Modality = Literal["mri", "ct"]
MriScaling = Literal["zscore", "range"]

#: ``model.encoder_weights`` values that name weights rather than a file
NAMED_WEIGHTS = frozenset({"imagenet", "none"})


class ConfigError(UserError, ValueError):
    """A configuration problem, reported in one line before any work starts."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Strict):
    """Case-level split: a fixed test share, then a validation share or k folds."""

    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _fold_in_range(self) -> SplitConfig:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is out of range for folds={self.folds}")
        return self


class AugmentConfig(_Strict):
    """2D augmentation (albumentations), applied identically to image and mask; training only."""

    enabled: bool = True
    affine_probability: float = Field(0.5, ge=0, le=1)
    rotate_degrees: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate_fraction: float = 0.05
    elastic_probability: float = Field(0.1, ge=0, le=1)
    intensity_probability: float = Field(0.3, ge=0, le=1)
    gamma_probability: float = Field(0.3, ge=0, le=1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    flip_axes: list[Literal[0, 1, 2]] = Field(default_factory=list)  # 2.5D: in-plane axes 0, 1; 3D: spatial axes 0-2


class PseudoLabelledConfig(_Strict):
    """Unlabelled scans with label maps predicted by a trained run (``seg-transfer predict``), added to the
    training cases only (self-training; never validation or test). Label files are matched to images by
    case name, as for ``data.images_dir`` + ``data.labels_dir``."""

    #: the scans; ``null``: the MSD dataset's unlabelled images (``imagesTs`` under ``data.root``)
    images_dir: Path | None = None
    labels_dir: Path
    #: share of every epoch's training samples drawn from these scans (the rest from the labelled cases);
    #: ``null``: every case alike, so the scans give their share of the pool (130 of 140 cases: 93%)
    share: float | None = Field(None, gt=0, lt=1)


class DataConfig(_Strict):
    """Where the cases are and how volumes become 2.5D training samples."""

    root: Path | None = None
    csv: Path | None = None
    images_dir: Path | None = None
    labels_dir: Path | None = None
    labels: dict[int, str] | None = None
    modality: Modality = "mri"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mri_percentiles: tuple[float, float] = (0.5, 99.5)
    #: MRI intensities after clipping to ``mri_percentiles``: ``zscore`` (mean 0, SD 1 over the volume) or
    #: ``range`` (the percentile range mapped linearly onto [-1, 1], the input range of the TF
    #: EfficientNet-Lite stems: ImageNet mean 0.5 and SD 0.5 on [0, 1] pixels)
    mri_scaling: MriScaling = "zscore"
    spacing: tuple[float, float, float] | None = None
    crop_foreground: bool = False
    slice_axis: Literal[0, 1, 2] = 2
    context_slices: int = Field(1, ge=0)
    foreground_fraction: float | None = Field(None, ge=0, le=1)
    slices_per_epoch: int | None = Field(None, ge=1)  # samples per epoch: 2.5D slices, or 3D patches
    #: 3D route: training patch and sliding-window size (X, Y, Z); default: the training volumes' median
    #: shape rounded up to the network's multiple
    patch_size: tuple[int, int, int] | None = None
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dir: Path | None = None
    num_workers: int = Field(0, ge=0)
    split: SplitConfig = Field(default_factory=SplitConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    #: self-training: predicted label maps of unlabelled scans join the training cases (see PseudoLabelledConfig)
    pseudo_labelled: PseudoLabelledConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        sources = [self.root is not None, self.csv is not None, self.images_dir is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of data.root (MSD layout), data.csv, or data.images_dir + data.labels_dir")
        if (self.images_dir is None) != (self.labels_dir is None):
            raise ValueError("data.images_dir and data.labels_dir go together")
        if self.pseudo_labelled is not None and self.pseudo_labelled.images_dir is None and self.root is None:
            raise ValueError("data.pseudo_labelled.images_dir is needed unless data.root (MSD layout) holds the "
                             "unlabelled scans in imagesTs")
        return self

    @property
    def pseudo_labelled_share(self) -> float | None:
        """``pseudo_labelled.share``; None without pseudo-labelled scans or without a share (every case alike)."""
        return self.pseudo_labelled.share if self.pseudo_labelled is not None else None

    @property
    def in_channels(self) -> int:
        """Channels of one 2.5D sample: the slice and ``context_slices`` neighbours on each side."""
        return 2 * self.context_slices + 1


class ModelConfig(_Strict):
    """A segmentation-models-pytorch architecture with an smp or timm (``tu-``) encoder."""

    arch: str = "Unet"
    encoder: str = "tu-tf_efficientnet_lite0"
    encoder_weights: str = "imagenet"
    decoder_channels: list[int] | None = None
    #: BatchNorm of frozen encoder layers: ``eval`` keeps the ImageNet statistics, ``train`` updates them
    #: from every training batch, ``adapt`` re-estimates them once on the target data before training
    #: (then keeps them while frozen). Chosen by the ablation in docs/results.md.
    frozen_bn: Literal["eval", "train", "adapt"] = "eval"
    #: the route: ``2.5d`` (a 2D network on a slice and its neighbours) or ``3d`` (the 2D encoder inflated
    #: to 3D in a 3D U-Net, trained on patches, sliding-window inference); see :mod:`seg_transfer.routes`
    dims: Literal["2.5d", "3d"] = "2.5d"
    #: 3D route: how 2D kernels become 3D (see :mod:`seg_transfer.models.inflate`): ``centre`` (the 2D kernel
    #: in the centre depth slice: at initialisation the 3D net is the 2D net applied slice by slice), ``mean``
    #: (I3D: repeated along depth and divided by depth) or ``acs`` (output channels split into axial,
    #: coronal and sagittal 2D kernels)
    inflation: Literal["centre", "mean", "acs"] = "centre"
    #: encoder stages used by the U-Net (3 to 5; each halves the resolution)
    encoder_depth: int = Field(5, ge=3, le=5)
    #: 3D route: the first N downsamplings keep stride 1 along the depth (last spatial) axis, for thin volumes
    depth_stride_one_stages: int = Field(0, ge=0, le=5)
    #: 3D route: 1x1x1 heads on the coarser decoder levels add their losses in training (weights halving per
    #: level, summing to 1); inference reads the full-resolution output only
    deep_supervision: bool = False
    #: also initialise the decoder (not the segmentation heads) from the whole-network file ``encoder_weights``
    #: names (``seg-transfer pretrain``'s ``pretrained.pt`` or a run's ``best.pt``): Models Genesis reuses both
    decoder_from_weights: bool = False
    #: with ``decoder_from_weights``, also initialise the segmentation head(s) from that file, so the whole
    #: network continues from it (a run's ``best.pt`` with this run's classes: e.g. a self-training student
    #: started from its teacher, or a finished run trained further on more cases)
    head_from_weights: bool = False

    @field_validator("encoder_weights")
    @classmethod
    def _normalise_weights(cls, value: str) -> str:
        lowered = value.strip().lower()
        return lowered if lowered in NAMED_WEIGHTS else value

    @model_validator(mode="after")
    def _depth_stride_is_3d_only(self) -> ModelConfig:
        if self.depth_stride_one_stages and self.dims != "3d":
            raise ValueError("depth_stride_one_stages applies to the 3D route only (model.dims: 3d); "
                             "set it to 0 for model.dims: 2.5d")
        if self.deep_supervision and self.dims != "3d":
            raise ValueError("deep_supervision applies to the 3D route only (model.dims: 3d)")
        if self.decoder_from_weights and self.encoder_weights in NAMED_WEIGHTS:
            raise ValueError(f"decoder_from_weights needs encoder_weights to be a whole-network file (e.g. "
                             f"seg-transfer pretrain's pretrained.pt), not '{self.encoder_weights}'")
        if self.head_from_weights and not self.decoder_from_weights:
            raise ValueError("head_from_weights needs decoder_from_weights: true (a head on a new decoder would "
                             "read features it was not trained on)")
        return self

    @property
    def supervised_outputs(self) -> int:
        """Outputs the loss scores in training: one per decoder level with deep supervision, else one."""
        return self.encoder_depth if self.deep_supervision else 1

    @property
    def pretrained(self) -> bool:
        return self.encoder_weights != "none"


class EncoderTop(_Strict):
    """Unfreeze the deepest ``encoder_top`` encoder stages (plus the decoder and head)."""

    encoder_top: int = Field(ge=1)


class EncoderFraction(_Strict):
    """Unfreeze the deepest encoder layers (whole layers, deepest first) until at least ``encoder_fraction`` of
    the encoder's parameters train (plus the decoder and head): unfreezing by parameter share, finer than
    stages (EfficientNet-Lite0's top stage alone holds 79% of its encoder parameters)."""

    encoder_fraction: float = Field(gt=0, le=1)


class EarlyStopping(_Strict):
    patience: int = Field(ge=1)
    min_delta: float = Field(0.0, ge=0)


class CollapseConfig(_Strict):
    """Collapse detection. Once the encoder has trained for ``after_fraction`` of the run's encoder-training
    epochs, a class is flagged at every validation where its Dice is below ``min_class_dice`` or below
    ``relative_dice`` x the best class's Dice (a class the network is not learning while others are).
    Flags go to the log and ``summary.json``; with ``stop`` the run ends at the first one."""

    min_class_dice: float = Field(0.1, ge=0, lt=1)
    relative_dice: float = Field(0.3, ge=0, le=1)
    after_fraction: float = Field(0.6, gt=0, le=1)  # README: 0.4 warned 18 of 150 runs that did not collapse, 0.6 two
    stop: bool = False


class StageConfig(_Strict):
    """One fine-tuning stage: what trains, for how long, at which learning rates."""

    name: str | None = None
    train: Literal["decoder", "all"] | EncoderTop | EncoderFraction = "all"
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0)
    lr: float = Field(1e-3, gt=0)
    encoder_lr_mult: float = Field(1.0, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    weight_decay: float = Field(1e-4, ge=0)
    #: L2-SP, decoupled: each step pulls every trainable pretrained encoder weight toward its pretrained value,
    #: ``w -= lr * pretrained_decay * (w - w_pretrained)``, in place of its decay toward 0 (0: off; no effect
    #: with ``encoder_weights: none``, which has nothing to pull toward)
    pretrained_decay: float = Field(0.0, ge=0)
    early_stopping: EarlyStopping | None = None
    #: training augmentation in this stage: None follows ``data.augment.enabled``; false trains on plain samples
    #: (e.g. a cached decoder-only stage, whose cache then holds exactly what the encoder computes); true
    #: augments with ``data.augment``'s settings
    augment: bool | None = None

    def label(self, index: int) -> str:
        return self.name or f"stage{index}"

    def augments(self, data_augment: AugmentConfig) -> bool:
        """Whether this stage's training samples are augmented."""
        return data_augment.enabled if self.augment is None else self.augment


class LossConfig(_Strict):
    """Dice + cross-entropy (MONAI ``DiceCELoss``)."""

    dice_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    class_weights: list[float] | None = None
    batch_dice: bool = False  # Dice over the whole batch (nnU-Net style) instead of per slice


class WeightAverageConfig(_Strict):
    """An exponential moving average of the network's weights and BatchNorm statistics (timm's ``ModelEmaV3``),
    updated after every optimiser step; validation, ``best.pt`` and so ``predict`` use the average, ``last.pt``
    holds both. ``warmup``: the decay starts at 0 and rises as ``1 - (1 + step) ** -2/3`` toward ``decay`` (about
    0.986 after 600 steps), so early averages do not hold the initial weights."""

    decay: float = Field(0.99, gt=0, lt=1)
    warmup: bool = True


#: a speed switch: ``auto`` is on for CUDA and off on CPU
Switch = Literal["auto", "on", "off"]


class TrainingConfig(_Strict):
    """How to train: batch, loss, stages, device and speed switches.

    ``batch_size`` is the global batch: under ``torchrun``/``srun`` with N processes each one takes
    ``batch_size / N`` slices per step (it must divide), so a run means the same at any scale.
    The speed switches (``amp``, ``cudnn_benchmark``, ``pin_memory``: ``auto`` = on for CUDA, off on CPU;
    ``channels_last``: ``auto`` = on where the route measured it faster, ``Route.train_channels_last``;
    ``compile`` off unless set) are resolved by
    :mod:`seg_transfer.training.speed`.
    """

    batch_size: int = Field(16, ge=1)
    val_batch_size: int = Field(64, ge=1)
    loss: LossConfig = Field(default_factory=LossConfig)
    stages: list[StageConfig] = Field(min_length=1)
    grad_clip: float | None = Field(None, gt=0)
    num_threads: int | None = Field(None, ge=1)
    device: str = "auto"
    val_every: int = Field(1, ge=1)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA where supported, else fp16 + GradScaler; off on CPU
    channels_last: Switch = "auto"
    compile: bool = False  # torch.compile the training forward
    cudnn_benchmark: Switch = "auto"
    pin_memory: Switch = "auto"
    sync_batchnorm: bool = False  # distributed CUDA runs only: BatchNorm statistics over the global batch
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    #: decoder-only stages read the frozen encoder's features from a cache instead of recomputing them:
    #: ``memory`` or ``disk`` (float16 memory maps under ``data.cache_dir``/features), with
    #: ``feature_cache_variants`` variants per slice (2.5D) or patches per case (3D); see :mod:`seg_transfer.training.feature_cache`
    feature_cache: Literal["off", "memory", "disk"] = "off"
    feature_cache_variants: int = Field(4, ge=1)
    #: average the weights over the steps (see :class:`WeightAverageConfig`); None trains and keeps the plain weights
    ema: WeightAverageConfig | None = None

    @field_validator("amp", "channels_last", "cudnn_benchmark", "pin_memory", "feature_cache", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        """YAML reads a bare ``on``/``off`` as true/false; map them back to the switch names."""
        if value is False:
            return "off"
        if value is True:
            return "on"
        return value


class RestorationConfig(_Strict):
    """In-domain self-supervised pretraining (``seg-transfer pretrain``): the whole U-Net learns to restore
    2.5D slabs or 3D patches (the route's samples) of unlabelled scans from corrupted copies (Models Genesis, Zhou et al. 2019: a non-linear
    intensity curve, local pixel shuffling, in- or out-painting; MONAI's random transforms), starting from
    ``model.encoder_weights``; its encoder then seeds fine-tuning. Probabilities are Models Genesis' defaults."""

    steps: int = Field(600, ge=1)
    batch_size: int | None = Field(None, ge=1)  # samples per step; None: the run's training.batch_size
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # unlabelled scans held out to score restoration
    intensity_prob: float = Field(0.9, ge=0.0, le=1.0)  # random monotone intensity curve (RandHistogramShift)
    shuffle_prob: float = Field(0.5, ge=0.0, le=1.0)  # pixels shuffled inside small random boxes (RandCoarseShuffle)
    paint_prob: float = Field(0.9, ge=0.0, le=1.0)  # in- or out-painting with random values (RandCoarseDropout)
    outpaint_share: float = Field(0.8, ge=0.0, le=1.0)  # of the painted slabs, those out-painted (the rest in-painted)


class RunConfig(_Strict):
    """A whole training run."""

    name: str = "run"
    seed: int = 0
    output_dir: Path = Path("runs")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig
    pretraining: RestorationConfig = Field(default_factory=RestorationConfig)  # used by ``seg-transfer pretrain`` only

    @model_validator(mode="after")
    def _class_weights_match(self) -> RunConfig:
        weights = self.training.loss.class_weights
        if weights is not None and self.data.labels is not None and len(weights) != len(self.data.labels):
            raise ValueError(
                f"training.loss.class_weights has {len(weights)} values but data.labels has {len(self.data.labels)} classes"
            )
        return self

    @model_validator(mode="after")
    def _share_without_feature_cache(self) -> RunConfig:
        if self.data.pseudo_labelled_share is not None and self.training.feature_cache != "off":
            raise ValueError("data.pseudo_labelled.share and training.feature_cache cannot be combined (the cache "
                             "follows one pool's epoch order); drop one of them")
        return self

    def resolve_paths(self, base: Path) -> RunConfig:
        """Return a copy with relative data paths made absolute against ``base`` (the config file's folder)."""
        data = self.data.model_copy()
        for field in ("root", "csv", "images_dir", "labels_dir", "cache_dir"):
            value = getattr(data, field)
            if value is not None and not Path(value).is_absolute():
                setattr(data, field, (base / value).resolve())
        return self.model_copy(update={"data": data})


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply ``key.path=value`` overrides, validate, resolve data paths.

    Relative data paths written in the file (``data.root``, ``csv``, ``images_dir``, ``labels_dir``,
    ``cache_dir``) resolve against the file's folder, so a config works from any working directory (as a
    study's ``base_config`` does); a path that exists only relative to the working directory is still
    accepted, with a warning. Paths given by ``--set`` resolve against the working directory, as users
    type them; ``output_dir`` stays relative to the working directory.
    Raises :class:`ConfigError` with a one-line message naming the file and the offending key.
    """
    raw = absolute_config_paths(read_yaml_mapping(path, "config file"), Path(path).parent, str(path))
    return config_from_dict(raw, overrides, source=str(path))


#: data keys holding paths (resolved against the file that names them)
DATA_PATH_KEYS = ("root", "csv", "images_dir", "labels_dir", "cache_dir",
                  "pseudo_labelled.images_dir", "pseudo_labelled.labels_dir")
#: Every config key that may hold a path, dotted (a weights file for ``model.encoder_weights``).
PATH_KEYS = (*(f"data.{key}" for key in DATA_PATH_KEYS), "model.encoder_weights")

def is_relative_path(key: str, value: Any) -> bool:
    """Whether ``value`` of the dotted ``key`` is a relative path to resolve against a config's folder."""
    if key not in PATH_KEYS or not isinstance(value, str) or not value or Path(value).is_absolute():
        return False
    return not (key == "model.encoder_weights" and value.lower() in NAMED_WEIGHTS)


def absolute_config_paths(raw: dict[str, Any], base: Path, source: str = "config") -> dict[str, Any]:
    """``raw`` with its relative paths (``data`` paths, an ``encoder_weights`` file) made absolute against
    ``base`` (a config file's folder).

    A path missing there but present relative to the working directory (configs written before paths
    were file-relative) is kept relative to the working directory, with a warning."""
    raw = dict(raw)
    for dotted in PATH_KEYS:
        *sections, key = dotted.split(".")
        parents, block = [], raw
        for section in sections:
            parents.append(block)
            block = block.get(section) if isinstance(block, dict) else None
        if isinstance(block, dict) and is_relative_path(dotted, block.get(key)):
            block = {**block, key: str(_resolve_from(base, block[key], f"{source}: '{dotted}'"))}
            for parent, section in zip(reversed(parents), reversed(sections)):  # copies: ``raw``'s blocks stay as they were
                block = {**parent, section: block}
            raw = block
    return raw


def _resolve_from(base: Path, value: str, what: str) -> Path:
    beside = (base / value).resolve()
    if beside.exists() or not Path(value).exists() or base.resolve() == Path.cwd().resolve():
        return beside
    legacy = Path(value).resolve()
    logging.getLogger(__name__).warning(
        "%s %s is resolved against the working directory; relative paths in a config are relative to its folder "
        "(%s does not exist): write %s", what, value, beside, os.path.relpath(Path(value).absolute(), base.absolute()))
    return legacy


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The YAML mapping in ``path`` (``yaml.safe_load``; an empty file is ``{}``).

    Raises :class:`ConfigError` naming the file when it is missing, not YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config", *,
                     weights_written_later: bool = False) -> RunConfig:
    """Validate a config mapping (after ``--set`` overrides) into a :class:`RunConfig`; its data paths and
    ``model.encoder_weights`` must exist, the latter unless ``weights_written_later`` (a study arm that
    starts from an earlier arm's run, not trained yet)."""
    raw = _apply_overrides(raw, overrides or [], source)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe_validation_error(exc)}") from None
    config = config.resolve_paths(Path.cwd())
    _check_paths_exist(config, source, check_weights=not weights_written_later)
    return config


def dump_config(config: RunConfig) -> dict[str, Any]:
    """JSON/YAML-safe dict of the resolved config (what checkpoints and run folders carry)."""
    return config.model_dump(mode="json")


def _apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: --set expects key.path=value, got {item!r}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            part_key = _index_or_key(node, part)
            if isinstance(node, list):
                node = node[part_key]
            else:
                node = node.setdefault(part_key, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{source}: --set {key}: '{'.'.join(parts[:depth + 1])}' is a value, not a section")
        last = _index_or_key(node, parts[-1])
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: --set {key}: value {value!r} is not valid YAML ({one_line(exc)})") from None
    return raw


def _index_or_key(node: Any, part: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set: {part!r} is not an index of a list of length {len(node)}")
        return int(part)
    return part


#: common names users type for a field, mapped to the field
SYNONYMS = {"learning_rate": "lr", "backbone": "encoder", "architecture": "arch", "weights": "encoder_weights",
            "pretrained": "encoder_weights", "epoch": "epochs", "axis": "slice_axis"}


def missing_keys(exc: ValidationError) -> str | None:
    """``missing required keys: a, b.c`` when every error of ``exc`` is a missing key, else None."""
    errors = exc.errors()
    if not errors or any(e["type"] != "missing" for e in errors):
        return None
    keys = [".".join(str(part) for part in e["loc"]) for e in errors]
    return f"missing required key{'s' if len(keys) > 1 else ''}: {', '.join(keys)}"


def _describe_validation_error(exc: ValidationError) -> str:
    if (missing := missing_keys(exc)) is not None:
        return missing
    # the deepest location is the most specific (a union reports every member; the nested one matters)
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    location = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("function-", "literal[")))
    if error["type"] == "extra_forbidden":
        hint = _closest_key(error["loc"])
        return f"unknown key '{location}'" + (f" (did you mean '{hint}'?)" if hint else "")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    where = f"'{location}': " if location else ""
    return f"{where}{error['msg']}{more}"


def _closest_key(loc: tuple[Any, ...]) -> str | None:
    """Closest valid key for an unknown key at ``loc``, as a dotted path."""
    model: type[BaseModel] = RunConfig
    prefix: list[str] = []
    for part in loc[:-1]:
        if isinstance(part, int):
            prefix.append(str(part))
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        prefix.append(str(part))
        nested = _nested_model(field.annotation)
        if nested is None:
            return None
        model = nested
    fields = list(model.model_fields)
    match = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.5)
    if not match and SYNONYMS.get(str(loc[-1])) in fields:
        match = [SYNONYMS[str(loc[-1])]]
    return ".".join([*prefix, match[0]]) if match else None


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        for inner in [candidate, *getattr(candidate, "__args__", ())]:
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _check_paths_exist(config: RunConfig, source: str, *, check_weights: bool = True) -> None:
    data = config.data
    for key in ("root", "csv", "images_dir", "labels_dir"):
        value = getattr(data, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{source}: 'data.{key}' path does not exist: {value}")
    weights = config.model.encoder_weights
    if check_weights and weights not in NAMED_WEIGHTS and not Path(weights).expanduser().exists():
        raise ConfigError(f"{source}: 'model.encoder_weights' is neither imagenet, none, nor an existing file or "
                          f"run folder: {weights}")
