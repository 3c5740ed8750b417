"""The runs of a study: fixed test/validation cases, nested training subsets, one run per arm x size x seed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seg_transfer.config import ConfigError, RunConfig
from seg_transfer.data.cases import Case
from seg_transfer.data.checks import find_bad_cases, format_bad_cases
from seg_transfer.data.pipeline import BadDataError, discover_cases
from seg_transfer.data.splits import make_splits, training_subset
from seg_transfer.study.arms import arm_config, check_equal_budgets
from seg_transfer.study.config import StudyConfig


@dataclass(frozen=True)
class StudyCases:
    """Every labelled case by name, the fixed test and validation cases, and the pool training subsets come from."""

    cases: dict[str, Case]
    labels: dict[int, str]
    test: list[str]
    val: list[str]
    pool: list[str]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    arm: str
    size: int
    seed: int
    config: RunConfig
    run_dir: Path
    splits: dict[str, list[str]]
    teacher_dir: Path | None = None  # self-training: the run (same size and seed) that labels the unlabelled scans
    start_dir: Path | None = None  # ``weights_from``: the run (same size and seed) whose network this one starts from
    teacher_tta: bool = False  # the teacher labels the unlabelled scans with test-time augmentation

    @property
    def key(self) -> str:
        return f"{self.arm}/n{self.size:03d}_seed{self.seed}"

    @property
    def prerequisites(self) -> tuple[Path, ...]:
        """Run folders that must be finished (trained and evaluated) before this run may train."""
        return tuple(dict.fromkeys(d for d in (self.teacher_dir, self.start_dir) if d is not None))


#: where a teacher run writes its label maps of the unlabelled scans (``seg-transfer predict`` output): one plain
#: pass, or with test-time augmentation (``ArmConfig.pseudo_labels_tta``)
PSEUDO_LABELS_DIRS = {False: "unlabelled_predictions", True: "unlabelled_predictions_tta"}


def study_cases(study: StudyConfig, config: RunConfig) -> StudyCases:
    """Labelled cases of the base config's dataset, checked, with test/val fixed once by ``study.split``.

    Raises BadDataError listing bad cases (a study never silently drops data).
    """
    cases, dataset_labels = discover_cases(config.data)
    labels = config.data.labels or dataset_labels
    if not labels:
        raise ConfigError(f"{study.base_config}: no label map (set data.labels)")
    bad = find_bad_cases(cases, set(labels))
    if bad:
        raise BadDataError(f"{len({b.name for b in bad})} bad case(s) in the study dataset:\n{format_bad_cases(bad)}")
    split = make_splits([c.name for c in cases], val_fraction=study.split.val_fraction,
                        test_fraction=study.split.test_fraction, seed=study.split.seed)
    return StudyCases({c.name: c for c in cases}, dict(sorted(labels.items())), split["test"], split["val"], split["train"])


def resolve_sizes(study: StudyConfig, pool_size: int) -> list[int]:
    """Training-set sizes as numbers (``all`` = the whole pool), ascending; ConfigError if one is too big."""
    sizes = sorted({pool_size if s == "all" else int(s) for s in study.train_sizes})
    too_big = [s for s in sizes if s > pool_size]
    if too_big:
        raise ConfigError(f"train_sizes {too_big} exceed the {pool_size} cases left for training "
                          f"after the fixed test and validation cases")
    return sizes


def plan_runs(study: StudyConfig, output: Path) -> tuple[StudyCases, list[RunSpec]]:
    """Every run of the study in a fixed order (size, seed, arm), with the splits it must use."""
    first = arm_config(study, study.arms[0], study.seeds[0], "probe")
    cases = study_cases(study, first)
    sizes = resolve_sizes(study, len(cases.pool))
    specs = []
    for size in sizes:
        for seed in study.seeds:
            train = training_subset(cases.pool, size, seed)
            splits = {"train": train, "val": list(cases.val), "test": list(cases.test)}
            run_dirs = {arm.name: Path(output) / "runs" / arm.name / f"n{size:03d}_seed{seed}" for arm in study.arms}
            teachers = {arm.name: run_dirs[arm.pseudo_labels_from] for arm in study.arms if arm.pseudo_labels_from}
            labels = {arm.name: teachers[arm.name] / PSEUDO_LABELS_DIRS[arm.pseudo_labels_tta] for arm in study.arms
                      if arm.name in teachers}
            starts = {arm.name: run_dirs[arm.weights_from] for arm in study.arms if arm.weights_from}
            configs = {arm.name: arm_config(study, arm, seed, f"{arm.name}_n{size}_seed{seed}",
                                            labels.get(arm.name), starts.get(arm.name))
                       for arm in study.arms}
            if not study.allow_unequal_budgets:
                check_equal_budgets(configs)
            for arm in study.arms:
                specs.append(RunSpec(arm.name, size, seed, configs[arm.name], run_dirs[arm.name], splits,
                                     teachers.get(arm.name), starts.get(arm.name), arm.pseudo_labels_tta))
    return cases, specs
