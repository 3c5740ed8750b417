"""Study configuration: a base run config, arms that override their own fields, sizes, seeds, fixed test cases."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from seg_transfer.config import (
    ConfigError,
    is_relative_path,
    missing_keys,
    read_yaml_mapping,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArmConfig(_Strict):
    """One arm: the base config plus its own overrides.

    ``set`` maps dotted config keys to values (``model.encoder_weights: none``). ``scratch_control: true``
    derives the from-scratch control from the (overridden) base: ``encoder_weights: none`` and one ``all``
    stage with the same total epochs, learning rate and schedule as the first stage. ``control``: the arm
    this one is compared with, where that is not the study's ``control`` (e.g. each architecture against
    its own scratch network). ``also_against``: further arms it is compared with in the report, beside its
    control (e.g. the default at another input scale, where the control is the scratch network of its own scale).
    ``pseudo_labels_from``: self-training; an earlier arm whose run of the same size and seed, once finished,
    labels the dataset's unlabelled scans (``data.pseudo_labelled``), and this arm trains on them too;
    ``pseudo_labels_tta``: that teacher labels them with ``predict``'s test-time augmentation (the flips it was
    trained with) instead of one plain pass (their own folder in the teacher run, so both kinds can be compared).
    ``weights_from``: an earlier arm whose run of the same size and seed, once finished, is this arm's starting
    network: encoder, decoder and heads (``model.encoder_weights`` = that run, ``decoder_from_weights`` and
    ``head_from_weights``), e.g. a self-training student that continues from its teacher.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    set: dict[str, Any] = Field(default_factory=dict)
    scratch_control: bool = False
    control: str | None = None
    also_against: list[str] = Field(default_factory=list)
    pseudo_labels_from: str | None = None
    pseudo_labels_tta: bool = False
    weights_from: str | None = None

    @model_validator(mode="after")
    def _weights_or_scratch(self) -> ArmConfig:
        if self.pseudo_labels_tta and self.pseudo_labels_from is None:
            raise ValueError(f"arm {self.name!r}: 'pseudo_labels_tta' needs 'pseudo_labels_from' (the teacher arm "
                             "whose run labels the unlabelled scans)")
        if self.weights_from is not None and self.scratch_control:
            raise ValueError(f"arm {self.name!r}: 'weights_from' and 'scratch_control' contradict each other (a "
                             "scratch control starts from random weights)")
        return self


class StudySplit(_Strict):
    """Fixed test and validation cases (drawn once with ``seed``); training subsets come from the rest."""

    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 0


class RankEncodersConfig(_Strict):
    """Transferability scores of every arm's encoder on each training subset before fine-tuning
    (``seg-transfer rank-encoders`` with these options); the report says how well each score's ranking
    agrees with the fine-tuned test Dice."""

    pixels: int = Field(1000, ge=10)
    strides: list[int] | None = Field(None, min_length=1)  # None: the route's measured default (Route.ranking_strides)
    seed: int = 0
    scores: list[str] | None = Field(None, min_length=1)  # selection/scores.py names; None: Route.ranking_scores

    @field_validator("scores")
    @classmethod
    def _known_scores(cls, names: list[str] | None) -> list[str] | None:
        from seg_transfer.selection.scores import get_scores

        if names is not None:
            get_scores(names)
        return names


class StudyConfig(_Strict):
    """A transfer study: every run is an ordinary ``train`` run of ``base_config`` + study ``set`` + arm ``set``."""

    name: str = "study"
    base_config: Path
    set: dict[str, Any] = Field(default_factory=dict)
    arms: list[ArmConfig] = Field(min_length=2)
    control: str = "scratch"
    train_sizes: list[int | Literal["all"]] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)  # one seed proves nothing
    split: StudySplit = Field(default_factory=StudySplit)
    target_dice: float = Field(0.8, gt=0.0, le=1.0)
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    tolerance_mm: float = Field(1.0, ge=0.0)
    allow_unequal_budgets: bool = False
    predict_batch_size: int = Field(64, ge=1)
    rank_encoders: RankEncodersConfig | None = None

    @field_validator("train_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int | str]) -> list[int | str]:
        if any(isinstance(s, int) and s < 1 for s in sizes):
            raise ValueError("train_sizes must be positive integers or 'all'")
        if len(set(sizes)) != len(sizes):
            raise ValueError("train_sizes has duplicates")
        return sizes

    @model_validator(mode="after")
    def _arms_and_control(self) -> StudyConfig:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if self.control not in names:
            raise ValueError(f"'control': {self.control!r} is not an arm; the arms are {', '.join(names)}")
        for position, arm in enumerate(self.arms):
            for key, other in [("control", arm.control)] + [("also_against", name) for name in arm.also_against]:
                if other is not None and (other not in names or other == arm.name):
                    raise ValueError(f"arm {arm.name!r}: {key!r}: {other!r} is not another arm; "
                                     f"the arms are {', '.join(names)}")
            for key, source in (("pseudo_labels_from", arm.pseudo_labels_from), ("weights_from", arm.weights_from)):
                if source is not None and source not in names[:position]:
                    raise ValueError(f"arm {arm.name!r}: {key!r}: {source!r} is not an arm listed before it (its run "
                                     f"trains first); earlier arms: {', '.join(names[:position]) or 'none'}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds has duplicates")
        return self

    def arm(self, name: str) -> ArmConfig:
        return next(arm for arm in self.arms if arm.name == name)

    def controls(self) -> dict[str, str]:
        """{arm: the arm it is compared with} for every arm but the study's control."""
        return {arm.name: arm.control or self.control for arm in self.arms if arm.name != self.control}

    def comparisons(self) -> list[tuple[str, str]]:
        """(arm, the arm it is compared with) pairs: every arm against its control (:meth:`controls`), then each
        arm's ``also_against`` arms, without repeats (a pair listed already the other way round is one), in the order
        of the arms."""
        pairs = list(self.controls().items())
        for arm in self.arms:
            pairs += [(arm.name, other) for other in arm.also_against
                      if (arm.name, other) not in pairs and (other, arm.name) not in pairs]
        return pairs

    def prerequisite_arms(self) -> dict[str, list[str]]:
        """Arm -> the earlier arms whose run of the same size and seed it needs first (its teacher, the run it
        continues); arms that need none are left out."""
        return {arm.name: needs for arm in self.arms
                if (needs := list(dict.fromkeys(a for a in (arm.pseudo_labels_from, arm.weights_from) if a)))}


def load_study_config(path: str | Path) -> StudyConfig:
    """Load and validate a study YAML; ``base_config`` is resolved against the study file's folder.

    Raises :class:`ConfigError` with one line naming the file and the key.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "study config")
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from None
    base = study.base_config if study.base_config.is_absolute() else (path.parent / study.base_config).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: 'base_config' file not found: {base}")
    arms = [arm.model_copy(update={"set": _absolute_set_paths(arm.set, path.parent)}) for arm in study.arms]
    return study.model_copy(update={"base_config": base, "set": _absolute_set_paths(study.set, path.parent), "arms": arms})


def _describe(exc: ValidationError) -> str:
    """One line for a study validation error: every missing key, else the first error and its key."""
    if (missing := missing_keys(exc)) is not None:
        return missing
    error = exc.errors()[0]
    location = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"'{location}': {message}" if location else message


def _absolute_set_paths(settings: dict[str, Any], base: Path) -> dict[str, Any]:
    """``set`` entries with relative paths (``data.root: ../x``, a weights file) made absolute against ``base``."""
    return {key: str((base / value).resolve()) if is_relative_path(key, value) else value
            for key, value in settings.items()}
