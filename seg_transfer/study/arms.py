"""Run configs of a study's arms: base config + study overrides + the arm's own fields, nothing else."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from seg_transfer.config import (
    ConfigError,
    RunConfig,
    absolute_config_paths,
    config_from_dict,
    read_yaml_mapping,
)
from seg_transfer.study.config import ArmConfig, StudyConfig


def scratch_control(raw: dict) -> dict:
    """The same run from scratch: ``encoder_weights: none`` (no pretrained decoder either) and one ``all`` stage
    with the same epoch budget.

    The stage keeps the first stage's learning rate, warm-up, schedule and weight decay (no encoder
    multiplier, layer decay or pretrained_decay: a random encoder has nothing to protect) and the summed
    step/time budgets; nothing else changes.
    """
    raw = yaml.safe_load(yaml.safe_dump(raw))
    stages = raw["training"]["stages"]
    kept = ("lr", "warmup_epochs", "schedule", "weight_decay")
    single = {"name": "all", "train": "all", "epochs": sum(stage.get("epochs", 1) for stage in stages),
              **{k: stages[0][k] for k in kept if k in stages[0]}}
    for budget in ("max_steps", "max_seconds"):
        if all(stage.get(budget) is not None for stage in stages):
            single[budget] = sum(stage[budget] for stage in stages)
    raw["training"]["stages"] = [single]
    raw["model"]["encoder_weights"] = "none"
    raw["model"].pop("decoder_from_weights", None)  # the defaults: a new decoder and heads
    raw["model"].pop("head_from_weights", None)
    raw["name"] = str(raw.get("name", "run")).replace("imagenet_staged", "scratch")
    return raw


def as_overrides(settings: dict[str, Any]) -> list[str]:
    """``{dotted.key: value}`` as ``--set`` strings (JSON is valid YAML, so values round-trip exactly)."""
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def base_raw(study: StudyConfig) -> dict:
    """The base run config as plain data, its relative data paths resolved against its folder."""
    raw = read_yaml_mapping(study.base_config, "base config")
    return absolute_config_paths(raw, study.base_config.parent, str(study.base_config))


def arm_config(study: StudyConfig, arm: ArmConfig, seed: int, name: str, pseudo_labels: Path | None = None,
               start_from: Path | None = None) -> RunConfig:
    """The validated run config of ``arm`` for ``seed`` (model init and slice sampling use ``seed``);
    ``pseudo_labels``: for a self-training arm, the folder its teacher run writes the unlabelled scans' labels to;
    ``start_from``: for a ``weights_from`` arm, the run folder whose whole network it starts from (which may not
    be trained yet)."""
    source = f"{study.base_config} (study arm {arm.name})"
    teacher = {"data.pseudo_labelled.labels_dir": str(pseudo_labels)} if pseudo_labels is not None else {}
    start = {"model.encoder_weights": str(start_from), "model.decoder_from_weights": True,
             "model.head_from_weights": True} if start_from is not None else {}
    overrides = as_overrides({**study.set, **arm.set, **teacher, **start, "seed": seed, "name": name})
    later = start_from is not None
    raw = config_from_dict(base_raw(study), overrides, source=source, weights_written_later=later).model_dump(mode="json")
    if arm.scratch_control:
        raw = scratch_control(raw)
        raw["name"] = name
    return config_from_dict(raw, source=source, weights_written_later=later)


def training_budget(config: RunConfig) -> dict[str, Any]:
    """What a run may spend: total epochs, optimiser steps per epoch and any step/time caps."""
    stages = config.training.stages
    return {
        "epochs": sum(stage.epochs for stage in stages),
        "steps_per_epoch": steps_per_epoch(config),
        "max_steps": sum(s.max_steps for s in stages) if all(s.max_steps for s in stages) else None,
        "max_seconds": sum(s.max_seconds for s in stages) if all(s.max_seconds for s in stages) else None,
    }


def steps_per_epoch(config: RunConfig) -> int | str:
    """Optimiser steps of one epoch: ``slices_per_epoch // batch_size`` (the loader drops the last partial
    batch); an epoch of one pass over the data has no fixed count, so it is described instead. Arms of
    different routes (2.5D slices, 3D patches) are compared at equal steps, whatever a sample is."""
    samples, batch = config.data.slices_per_epoch, config.training.batch_size
    if samples is None:
        return f"one pass over the training set in batches of {batch}"
    return samples // batch if samples > batch else 1


def check_equal_budgets(configs: dict[str, RunConfig]) -> None:
    """ConfigError when arms would train with different budgets (the comparison would not be fair)."""
    budgets = {arm: training_budget(config) for arm, config in configs.items()}
    first_arm, first = next(iter(budgets.items()))
    for arm, budget in budgets.items():
        if budget != first:
            diff = {k: (first[k], budget[k]) for k in first if first[k] != budget[k]}
            raise ConfigError(f"arms {first_arm!r} and {arm!r} have different training budgets {diff}; "
                              "make them equal or set allow_unequal_budgets: true")
