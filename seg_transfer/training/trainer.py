"""Staged fine-tuning: the training loop, validation on whole volumes, checkpoints and resume.

A run walks through ``config.training.stages`` in order. Each stage sets what trains (freeze API),
builds a fresh optimiser and schedule, and runs epochs until its epoch, step or time budget or its
early stopping ends it. After every epoch the whole validation volumes are predicted slice-wise and
scored with 3D Dice; the best mean Dice is kept as ``checkpoints/best.pt``, and ``checkpoints/last.pt``
holds everything ``--resume`` needs to continue to the same result.
"""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.losses import DiceCELoss
from torch import nn
from tqdm.auto import tqdm

from seg_transfer.config import RunConfig, StageConfig, dump_config
from seg_transfer.data.pipeline import PreparedData, prepare_data, slice_loader, volume_dataset
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.evaluation.metrics import dice_per_class
from seg_transfer.inference.slicewise import predict_volume
from seg_transfer.models.factory import build_model, count_parameters, encoder_output_stride
from seg_transfer.models.freezing import apply_trainable, encoder_stages, set_train_mode
from seg_transfer.models.weights import WeightsProvenance
from seg_transfer.training.checkpoint import load_checkpoint, save_checkpoint
from seg_transfer.training.metrics_log import MetricsLog
from seg_transfer.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The output folder holds another run (one-line message)."""


@dataclass
class Progress:
    """Where a run stands; saved in ``last.pt`` so a resumed run continues exactly here."""

    stage: int = 0
    stage_epoch: int = 0  # epochs completed in the current stage
    stage_done: bool = False
    stage_steps: int = 0  # optimisation steps taken in the current stage
    stage_seconds: float = 0.0
    epoch: int = 0  # epochs completed in the whole run
    step: int = 0
    elapsed: float = 0.0
    best_dice: float = -1.0
    best_epoch: int = -1
    best_per_class: list[float] = field(default_factory=list)
    stage_best: float = -1.0
    stage_bad_epochs: int = 0


@dataclass
class RunResult:
    run_dir: Path
    best_dice: float
    best_per_class: dict[str, float]
    best_epoch: int
    epochs: int
    seconds: float


@dataclass
class _Session:
    """Objects shared by the epochs of one run."""

    config: RunConfig
    run_dir: Path
    data: PreparedData
    prep: Preprocessing
    model: nn.Module
    provenance: WeightsProvenance
    stages: list[list[str]]
    device: torch.device
    loss: nn.Module
    train_set: Any
    train_loader: Any
    val_volumes: Any
    metrics: MetricsLog


def train(config: RunConfig, run_dir: Path | None = None, *, resume: bool = False, skip_bad_cases: bool = False) -> RunResult:
    """Train ``config`` into ``run_dir`` (default ``output_dir/name``); ``resume`` continues from ``last.pt``."""
    run_dir = Path(run_dir or config.output_dir / config.name)
    last_path = run_dir / "checkpoints" / "last.pt"
    checkpoint = _prepare_run_dir(run_dir, last_path, resume)
    if checkpoint is not None:
        stored = RunConfig.model_validate(checkpoint["config"])
        if dump_config(stored) != dump_config(config):
            log.warning("--resume continues with the config stored in %s; the given config/overrides are ignored", last_path)
        config = stored
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    _seed_everything(config.seed)
    session = _open_session(config, run_dir, skip_bad_cases)
    progress = Progress()
    if checkpoint is not None:
        progress = Progress(**checkpoint["progress"])
        session.model.load_state_dict(checkpoint["model"])
        _restore_rng(checkpoint["rng"])
        session.metrics.truncate_after(progress.epoch)
        log.info("resuming %s after epoch %d (stage %d)", run_dir, progress.epoch, progress.stage)
    try:
        _run_stages(session, progress, checkpoint)
    finally:
        session.metrics.close()
    return _finish(session, progress)


def _prepare_run_dir(run_dir: Path, last_path: Path, resume: bool) -> dict | None:
    if resume:
        if not last_path.is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no checkpoints/last.pt)")
        return load_checkpoint(last_path)
    if last_path.is_file():
        raise RunDirError(f"{run_dir}: already holds a run; use --resume to continue it or choose another --output")
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _open_session(config: RunConfig, run_dir: Path, skip_bad_cases: bool) -> _Session:
    data = prepare_data(config.data, run_dir, skip_bad_cases)
    _write_run_files(config, run_dir, data)
    labels = data.labels
    prep = Preprocessing.from_config(config.data)
    in_channels = config.data.in_channels
    model, provenance = build_model(config.model, in_channels, len(labels))
    device = _device(config.training.device)
    model.to(device)
    stages = encoder_stages(model.encoder, in_channels)
    multiple = encoder_output_stride(model)
    train_volumes = volume_dataset(data.subset("train"), prep, config.data)
    val_volumes = volume_dataset(data.subset("val"), prep, config.data)
    train_set, train_loader = slice_loader(train_volumes, config.data, config.training.batch_size, multiple, train=True)
    weights = config.training.loss.class_weights
    loss = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        lambda_dice=config.training.loss.dice_weight,
        lambda_ce=config.training.loss.ce_weight,
        batch=config.training.loss.batch_dice,
        weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
    )
    return _Session(config, run_dir, data, prep, model, provenance, stages, device, loss, train_set, train_loader, val_volumes, MetricsLog(run_dir))


def _write_run_files(config: RunConfig, run_dir: Path, data: PreparedData) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    if data.skipped:
        skipped = [{"name": b.name, "path": str(b.path), "problem": b.problem} for b in data.skipped]
        (run_dir / "skipped_cases.json").write_text(json.dumps(skipped, indent=2))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- stages and epochs


def _run_stages(session: _Session, progress: Progress, checkpoint: dict | None) -> None:
    stages = session.config.training.stages
    if progress.stage_done:
        _next_stage(progress)
        checkpoint = None  # a finished stage's optimiser is not continued
    while progress.stage < len(stages):
        stage = stages[progress.stage]
        optimizer, scheduler = _begin_stage(session, stage, progress)
        if checkpoint is not None and progress.stage_epoch > 0:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        checkpoint = None
        _run_stage(session, stage, progress, optimizer, scheduler)
        _next_stage(progress)


def _next_stage(progress: Progress) -> None:
    fresh = Progress()
    progress.stage += 1
    for name in ("stage_epoch", "stage_done", "stage_steps", "stage_seconds", "stage_best", "stage_bad_epochs"):
        setattr(progress, name, getattr(fresh, name))


def _begin_stage(session: _Session, stage: StageConfig, progress: Progress):
    spec = stage.train if isinstance(stage.train, str) else stage.train.encoder_top
    apply_trainable(session.model, session.stages, spec)
    optimizer = build_optimizer(session.model, session.stages, stage)
    _set_epoch(session, progress)  # the loader's length is the epoch's, as the schedule needs
    scheduler = build_scheduler(optimizer, stage, max(len(session.train_loader), 1))
    trainable = count_parameters(session.model, trainable_only=True)
    log.info("stage %s: train=%s, %d epochs, %d of %d parameters trainable", stage.label(progress.stage), spec,
             stage.epochs, trainable, count_parameters(session.model))
    return optimizer, scheduler


def _run_stage(session: _Session, stage: StageConfig, progress: Progress, optimizer, scheduler) -> None:
    while progress.stage_epoch < stage.epochs:
        epoch_start = time.monotonic()
        budget = _remaining_steps(stage, progress.stage_steps)
        deadline = epoch_start - progress.stage_seconds + stage.max_seconds if stage.max_seconds else None
        train_loss, steps = _train_epoch(session, optimizer, scheduler, progress, budget, deadline)
        progress.step += steps
        progress.stage_steps += steps
        progress.stage_epoch += 1
        progress.epoch += 1
        out_of_budget = (budget is not None and steps >= budget) or (deadline is not None and time.monotonic() >= deadline)
        last_epoch = progress.stage_epoch >= stage.epochs or out_of_budget
        record = {"stage": stage.label(progress.stage), "stage_index": progress.stage, "epoch": progress.epoch,
                  "stage_epoch": progress.stage_epoch, "step": progress.step, "lr": optimizer.param_groups[0]["lr"],
                  "train_loss": train_loss}
        if progress.epoch % session.config.training.val_every == 0 or last_epoch:
            record.update(_validate_and_keep_best(session, progress))
        progress.elapsed += time.monotonic() - epoch_start
        progress.stage_seconds += time.monotonic() - epoch_start
        record.update(seconds=time.monotonic() - epoch_start, elapsed=progress.elapsed)
        stop = last_epoch or _early_stop(stage, progress, record.get("val_dice"))
        progress.stage_done = stop
        session.metrics.append(record)
        _save(session, progress, optimizer, scheduler, "last")
        log.info("epoch %d (%s): loss %.4f, val dice %s", progress.epoch, record["stage"], train_loss, record.get("val_dice"))
        if stop:
            return


def _set_epoch(session: _Session, progress: Progress) -> None:
    data = session.config.data
    session.train_set.set_epoch(session.config.seed, progress.epoch, data.slices_per_epoch, data.foreground_fraction)


def _remaining_steps(stage: StageConfig, taken: int) -> int | None:
    return None if stage.max_steps is None else max(stage.max_steps - taken, 0)


def _train_epoch(session: _Session, optimizer, scheduler, progress: Progress, budget: int | None, deadline: float | None):
    config = session.config
    _set_epoch(session, progress)
    set_train_mode(session.model, config.model.frozen_bn)
    total, steps = 0.0, 0
    bar = tqdm(session.train_loader, desc=f"epoch {progress.epoch + 1}", leave=False, disable=not sys.stderr.isatty())
    for batch in bar:
        if (budget is not None and steps >= budget) or (deadline is not None and time.monotonic() >= deadline):
            break
        loss = train_step(session.model, session.loss, optimizer, batch, session.device, config.training.grad_clip)
        scheduler.step()
        total += loss
        steps += 1
        bar.set_postfix(loss=f"{loss:.4f}")
    return total / max(steps, 1), steps


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer, batch: dict, device: torch.device, grad_clip: float | None) -> float:
    """One optimisation step on a 2.5D batch; returns the loss value."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(image), label)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return float(loss.detach())


def _early_stop(stage: StageConfig, progress: Progress, val_dice: float | None) -> bool:
    if stage.early_stopping is None or val_dice is None:
        return False
    if val_dice > progress.stage_best + stage.early_stopping.min_delta:
        progress.stage_best, progress.stage_bad_epochs = val_dice, 0
        return False
    progress.stage_bad_epochs += 1
    return progress.stage_bad_epochs >= stage.early_stopping.patience


# --------------------------------------------------------------------------- validation


def validate(model: nn.Module, volumes, prep: Preprocessing, num_classes: int, device: torch.device, batch_size: int, multiple: int) -> list[float]:
    """Mean 3D Dice per foreground class over whole validation volumes (all slices predicted)."""
    model.eval()
    scores = []
    for item in tqdm(volumes, desc="validation", leave=False, disable=not sys.stderr.isatty()):
        probs = predict_volume(model, item["image"], prep.slice_axis, prep.context_slices,
                               batch_size=batch_size, multiple=multiple, device=device)
        scores.append(dice_per_class(probs.argmax(0), torch.as_tensor(np.asarray(item["label"]))[0], num_classes))
    return np.mean(scores, axis=0).tolist()


def _validate_and_keep_best(session: _Session, progress: Progress) -> dict[str, float]:
    labels = session.data.labels
    per_class = validate(session.model, session.val_volumes, session.prep, len(labels), session.device,
                         session.config.training.val_batch_size, encoder_output_stride(session.model))
    mean = float(np.mean(per_class))
    record = {"val_dice": mean, **{f"val_dice_{name}": v for name, v in zip(list(labels.values())[1:], per_class)}}
    if mean > progress.best_dice:
        progress.best_dice, progress.best_epoch, progress.best_per_class = mean, progress.epoch, per_class
        _save(session, progress, None, None, "best")
    return record


# --------------------------------------------------------------------------- checkpoints


def _save(session: _Session, progress: Progress, optimizer, scheduler, which: str) -> None:
    payload = {
        "config": dump_config(session.config),
        "labels": {str(k): v for k, v in session.data.labels.items()},
        "preprocessing": session.prep.as_dict(),
        "weights_provenance": session.provenance.as_dict(),
        "model": session.model.state_dict(),
        "progress": asdict(progress),
    }
    if which == "last":
        payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=_rng_state())
    save_checkpoint(payload, session.run_dir / "checkpoints" / f"{which}.pt")


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_list(), "python": list(random.getstate()[1])}


def _numpy_state_to_list() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(state["python"]), None))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _finish(session: _Session, progress: Progress) -> RunResult:
    names = list(session.data.labels.values())[1:]
    result = RunResult(
        run_dir=session.run_dir,
        best_dice=progress.best_dice,
        best_per_class=dict(zip(names, progress.best_per_class)),
        best_epoch=progress.best_epoch,
        epochs=progress.epoch,
        seconds=progress.elapsed,
    )
    summary = {**asdict(result), "run_dir": str(result.run_dir), "weights": session.provenance.as_dict(),
               "arch": session.config.model.arch, "encoder": session.config.model.encoder}
    (session.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return result
