"""Staged fine-tuning: the training loop, validation on whole volumes, checkpoints and resume.

A run walks through ``config.training.stages`` in order. Each stage sets what trains (freeze API),
builds a fresh optimiser and schedule, and runs epochs until its epoch, step or time budget or its
early stopping ends it. After every epoch the whole validation volumes are predicted slice-wise and
scored with 3D Dice; the best mean Dice is kept as ``checkpoints/best.pt``, and ``checkpoints/last.pt``
holds everything ``--resume`` needs to continue to the same result. After the last epoch the best checkpoint
is scored on the validation cases once more with test-time augmentation (the flips it was trained with), and
whether that helped is stored in ``best.pt`` for ``predict``'s default. With ``training.ema`` validation scores, and
``best.pt`` keeps, the moving average of the weights (:mod:`seg_transfer.training.averaging`).

Launched by ``torchrun`` or ``srun`` with several processes, the run is data-parallel
(:mod:`seg_transfer.training.distributed`): each rank trains on a disjoint shard of every epoch's
slice order with ``batch_size / world_size`` slices per step (the global batch stays
``training.batch_size``), the model is wrapped in DistributedDataParallel anew at every stage (the
reducer must match what the stage trains), validation volumes are shared out and the per-class Dice
sums all-reduced, so every rank takes the same best/early-stopping decisions. Only rank 0 writes
files; checkpoints hold the unwrapped model, loadable by ``seg-transfer predict`` as before.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from seg_transfer.atomic import json_safe, sweep_temp_files, write_atomic
from seg_transfer.checkpoint import Checkpoint, CheckpointError
from seg_transfer.config import ConfigError, RunConfig, StageConfig, dump_config
from seg_transfer.data.pipeline import PreparedData, prepare_data, volume_dataset
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.environment import probe_segment, run_environment, weighted_probe
from seg_transfer.errors import UserError
from seg_transfer.evaluation.metrics import dice_per_class
from seg_transfer.models.factory import count_parameters
from seg_transfer.models.freezing import (
    apply_trainable,
    describe_spec,
    encoder_stages,
    reestimate_batchnorm,
    set_train_mode,
)
from seg_transfer.models.weights import WeightsProvenance
from seg_transfer.routes import get_route
from seg_transfer.routes.base import InferenceOptions, Inferer, Route, trained_mirrorings
from seg_transfer.routes.network import load_weights, network_spec
from seg_transfer.routes.precision import lay_out_weights, run_device
from seg_transfer.training import distributed, speed
from seg_transfer.training.averaging import evaluated_network, restore_average, start_average, update_average
from seg_transfer.training.collapse import (
    collapse_check_due,
    collapsed_classes,
    planned_encoder_epochs,
)
from seg_transfer.training.distributed import SINGLE_PROCESS, DistributedContext
from seg_transfer.training.feature_cache import (
    DecoderStageCache,
    open_decoder_cache,
)
from seg_transfer.training.loss import as_float, build_loss
from seg_transfer.training.metrics_log import Heartbeat, MetricsLog, duration, rounded
from seg_transfer.training.optim import (
    backward_and_step,
    build_optimizer,
    build_scheduler,
    pretrained_anchors,
)
from seg_transfer.training.rng import (
    rank_rng_state,
    restore_rng,
    rng_state,
    seed_everything,
    seed_rank_streams,
)
from seg_transfer.training.speed import FULL_PRECISION, SpeedSettings

log = logging.getLogger(__name__)


class RunDirError(UserError, RuntimeError):
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
    encoder_epochs: int = 0  # epochs completed in stages that train the encoder
    collapse_warnings: list[dict] = field(default_factory=list)  # see :func:`collapsed_classes`
    stopped: str | None = None  # why the run ended before its budget ("collapse"), else None
    host_probes: list[dict] = field(default_factory=list)  # one :func:`probe_segment` per training process (CPU)


@dataclass
class RunResult:
    run_dir: Path
    best_dice: float
    best_per_class: dict[str, float]
    best_epoch: int
    epochs: int
    seconds: float
    steps: int = 0  # optimiser steps taken (the budget a fair comparison equalises)
    collapsed: list[str] = field(default_factory=list)  # classes below the collapse threshold at the best epoch
    collapse_warnings: list[dict] = field(default_factory=list)
    stopped: str | None = None
    peak_gpu_gb: float | None = None  # peak CUDA memory of this process's tensors during the run; None off CUDA
    environment: dict[str, Any] | None = None  # versions, CPU kernel path, device (seg_transfer.environment)


@dataclass
class _Session:
    """Objects shared by the epochs of one run.

    ``model`` is the bare network (what checkpoints, freezing and validation use); ``train_model``
    is what the training forward calls: ``model`` itself, or it wrapped in DDP and/or compiled for
    the current stage. ``metrics`` exists on rank 0 only.
    """

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
    metrics: MetricsLog | None
    dist: DistributedContext = SINGLE_PROCESS
    speed: SpeedSettings = FULL_PRECISION
    scaler: Any = None  # torch.amp.GradScaler for float16 autocast
    train_model: nn.Module | None = None
    route: Route | None = None
    route_settings: dict = field(default_factory=dict)  # fixed at training time, stored in checkpoints
    inferer: Inferer | None = None  # validation's inferer: the one ``predict`` builds from the checkpoint
    feature_cache: DecoderStageCache | None = None  # training.feature_cache: decoder-only stages read cached features
    anchors: dict = field(default_factory=dict)  # pretrained encoder weights by name, for stages with pretrained_decay
    average: Any = None  # training.ema: the weight average (timm ModelEmaV3) that validation and best.pt use


def train(config: RunConfig, run_dir: Path | None = None, *, resume: bool = False, skip_bad_cases: bool = False) -> RunResult:
    """Train ``config`` into ``run_dir`` (default ``output_dir/name``); ``resume`` continues from ``last.pt``.

    Under ``torchrun``/``srun`` with WORLD_SIZE > 1 this process is one rank of a data-parallel run
    (every rank calls ``train`` with the same arguments and gets the same result; only rank 0
    writes). Otherwise it is the single-process run it always was.
    """
    run_dir = Path(run_dir or config.output_dir / config.name)
    context = distributed.init_distributed(config.training.device)
    try:
        with speed.process_settings_restored():
            return _train(config, run_dir, context, resume, skip_bad_cases)
    finally:
        distributed.shutdown(context)


def _train(config: RunConfig, run_dir: Path, context: DistributedContext, resume: bool, skip_bad_cases: bool) -> RunResult:
    last_path = run_dir / "checkpoints" / "last.pt"
    checkpoint = distributed.run_on_every_rank(context, lambda: _prepare_run_dir(run_dir, last_path, resume, context.is_main))
    if checkpoint is not None:
        stored = checkpoint.run_config(last_path)
        if dump_config(stored) != dump_config(config) and context.is_main:
            log.warning("--resume continues with the config stored in %s; the given config/overrides are ignored", last_path)
        config = stored
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    seed_everything(config.seed)
    session = _open_session(config, run_dir, skip_bad_cases, context)
    progress = Progress()
    if checkpoint is not None:
        progress = Progress(**checkpoint.progress)
        load_weights(session.model, checkpoint.model, last_path)
        restore_average(session.average, checkpoint.averaged_model, session.model, str(last_path))
        restore_rng(rank_rng_state(checkpoint, context))
        if session.scaler is not None and checkpoint.grad_scaler is not None:
            session.scaler.load_state_dict(checkpoint.grad_scaler)
        if session.metrics is not None:
            session.metrics.truncate_after(progress.epoch)
        log.info("resuming %s after epoch %d (stage %d)", run_dir, progress.epoch, progress.stage)
    if session.device.type == "cpu":  # this host's speed, taken before training (a resumed run may be on another)
        progress.host_probes.append(probe_segment(progress.elapsed))
    try:
        _run_stages(session, progress, checkpoint)
    finally:
        if session.metrics is not None:
            session.metrics.close()
    return _finish(session, progress, _choose_tta(session, progress))


def _prepare_run_dir(run_dir: Path, last_path: Path, resume: bool, create: bool = True) -> Checkpoint | None:
    """``last.pt`` to resume from (None for a new run); ``create`` makes the folder of a new run."""
    if resume:
        if not last_path.is_file():
            raise RunDirError(f"{run_dir}: nothing to resume (no checkpoints/last.pt)")
        if create:
            for stale in sweep_temp_files(run_dir):
                log.info("removed %s (left by an interrupted write)", stale)
        return Checkpoint.load(last_path)
    if last_path.is_file():
        raise RunDirError(f"{run_dir}: already holds a run; use --resume to continue it or choose another --output")
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _open_session(config: RunConfig, run_dir: Path, skip_bad_cases: bool, context: DistributedContext = SINGLE_PROCESS) -> _Session:
    """Data, model, loaders and loss of a run; in a distributed run rank 0 checks the data and splits it."""
    training = config.training
    if training.batch_size % context.world_size:
        raise ConfigError(f"training.batch_size={training.batch_size} is the global batch and must be a multiple "
                          f"of the {context.world_size} processes of this launch")
    data = distributed.run_on_main(context, lambda: prepare_data(config.data, run_dir, skip_bad_cases))
    if context.is_main:
        _write_run_files(config, run_dir, data)
    labels = data.labels
    prep = Preprocessing.from_config(config.data)
    route = get_route(config.model.dims)
    in_channels = route.in_channels(config.data)
    model, provenance = route.build_network(config.model, in_channels, len(labels), True)
    seed_rank_streams(config.seed, context.rank)
    device = context.device if context.enabled else run_device(training.device)
    settings = speed.resolve_speed(training, device, route)
    stages = encoder_stages(model.encoder, in_channels, spatial_dims=route.spatial_dims)  # traced on CPU, before the model moves
    model.to(device)
    speed.reset_peak_gpu_memory(device)
    if training.sync_batchnorm:
        model = distributed.convert_sync_batchnorm(model, context)
    if settings.channels_last:
        lay_out_weights(model, speed.memory_format(settings, route.spatial_dims + 2))
    speed.apply_backend_flags(settings, device)
    anchors = _anchors(config, model)
    log.info("device %s%s; %s", device, f", {context.world_size} processes" if context.enabled else "",
             speed.describe(settings))
    if data.pseudo_labelled:
        share = config.data.pseudo_labelled_share
        log.info("training on %d labelled and %d pseudo-labelled cases (%s); %s", len(data.splits["train"]),
                 len(data.pseudo_labelled), config.data.pseudo_labelled.labels_dir,
                 "every case alike" if share is None else f"{share:.0%} of the samples from pseudo-labelled scans")
    train_volumes = volume_dataset(data.training_cases(), prep, config.data)
    val_volumes = volume_dataset(distributed.shard_items(data.subset("val"), context), prep, config.data)
    labelled = len(data.splits["train"])  # the first training volumes; pseudo-labelled scans follow
    route_settings = route.settings(config.data, Subset(train_volumes, range(labelled)), model)  # scans do not change the plan
    train_set, train_loader = route.training_samples(train_volumes, config.data, training.batch_size, route_settings, model,
                                                     rank=context.rank, world_size=context.world_size,
                                                     pin_memory=settings.pin_memory, labelled=labelled)
    inferer = validation_inferer(config, len(labels), route, route_settings, model)
    loss = build_loss(config.training.loss, config.model.supervised_outputs, device)
    metrics = MetricsLog(run_dir) if context.is_main else None
    return _Session(config, run_dir, data, prep, model, provenance, stages, device, loss, train_set, train_loader,
                    val_volumes, metrics, context, settings, speed.grad_scaler(settings, device),
                    route=route, route_settings=route_settings, inferer=inferer,
                    feature_cache=open_decoder_cache(config, model, in_channels, context.world_size), anchors=anchors,
                    average=start_average(training.ema, model))


def _anchors(config: RunConfig, model: nn.Module) -> dict:
    """The pretrained encoder weights that stages with ``pretrained_decay`` pull toward (empty when none does)."""
    if not any(stage.pretrained_decay > 0 for stage in config.training.stages):
        return {}
    if not config.model.pretrained:
        log.warning("pretrained_decay has no pretrained weights to pull toward (encoder_weights: none): it has no effect")
    return pretrained_anchors(model, config.model.pretrained)


def _write_run_files(config: RunConfig, run_dir: Path, data: PreparedData) -> None:
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(dump_config(config), sort_keys=False))
    if data.skipped:
        skipped = [{"name": b.name, "path": str(b.path), "problem": b.problem} for b in data.skipped]
        write_atomic(run_dir / "skipped_cases.json", json.dumps(skipped, indent=2) + "\n")


# --------------------------------------------------------------------------- stages and epochs


def _run_stages(session: _Session, progress: Progress, checkpoint: Checkpoint | None) -> None:
    stages = session.config.training.stages
    if session.config.model.frozen_bn == "adapt" and progress.step == 0 and progress.stage == 0 and progress.stage_epoch == 0:
        _adapt_batchnorm(session, progress)
    if progress.stopped:
        return
    if progress.stage_done:
        _next_stage(progress)
        checkpoint = None  # a finished stage's optimiser is not continued
    while progress.stage < len(stages):
        stage = stages[progress.stage]
        optimizer, scheduler = _begin_stage(session, stage, progress)
        if checkpoint is not None and progress.stage_epoch > 0:
            _continue_optimiser(session, optimizer, checkpoint)
            scheduler.load_state_dict(checkpoint.scheduler)
        checkpoint = None
        _run_stage(session, stage, progress, optimizer, scheduler)
        distributed.check_ranks_agree(session.model, session.dist)
        if progress.stopped:
            return
        _next_stage(progress)


def _adapt_batchnorm(session: _Session, progress: Progress) -> None:
    """``frozen_bn: adapt``: one pass over the first epoch's training slices re-estimates the encoder's
    BatchNorm statistics before any weight changes (no optimiser step is spent)."""
    _set_epoch(session, progress)
    used = reestimate_batchnorm(session.model, session.train_loader, session.device)
    distributed.sync_buffers(session.model, session.dist)
    log.info("frozen_bn adapt: encoder BatchNorm statistics re-estimated on %d training batches", used)


def _next_stage(progress: Progress) -> None:
    fresh = Progress()
    progress.stage += 1
    for name in ("stage_epoch", "stage_done", "stage_steps", "stage_seconds", "stage_best", "stage_bad_epochs"):
        setattr(progress, name, getattr(fresh, name))


def _continue_optimiser(session: _Session, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Load the interrupted stage's optimiser state; a one-line CheckpointError when it holds other parameters."""
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
    except ValueError as exc:
        raise CheckpointError(
            f"{session.run_dir}: cannot continue the interrupted stage: its saved optimiser holds other parameters "
            f"than this stage trains ({exc}); a run interrupted under a version that still trained encoder layers "
            "the decoder does not read must start again in a new folder") from None


def _begin_stage(session: _Session, stage: StageConfig, progress: Progress):
    spec = stage.train
    apply_trainable(session.model, session.stages, spec)
    session.train_model = None  # drop the previous stage's DDP reducer before building this stage's
    session.train_model = _training_module(session)
    optimizer = build_optimizer(session.model, session.stages, stage, session.anchors)
    _set_epoch(session, progress)  # the loader's length is the epoch's, as the schedule needs
    scheduler = build_scheduler(optimizer, stage, max(len(session.train_loader), 1))
    trainable = count_parameters(session.model, trainable_only=True)
    total = count_parameters(session.model)
    log.info("stage %s: %s trainable, %d epoch%s of %d steps%s; %.2f of %.2f M parameters (%.0f%%) train",
             stage.label(progress.stage), describe_spec(spec), stage.epochs, "" if stage.epochs == 1 else "s",
             len(session.train_loader), "" if stage.augments(session.config.data.augment) else " without augmentation",
             trainable / 1e6, total / 1e6, 100 * trainable / max(total, 1))
    return optimizer, scheduler


def _training_module(session: _Session) -> nn.Module:
    """What the training forward calls this stage: the model, wrapped in DDP for the current
    ``requires_grad`` pattern (distributed runs) and compiled if ``training.compile``."""
    module = distributed.wrap_model(session.model, session.dist)
    return torch.compile(module) if session.speed.compile else module


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
        progress.encoder_epochs += stage.train != "decoder"
        out_of_budget = (budget is not None and steps >= budget) or _past(deadline, session.dist)
        last_epoch = progress.stage_epoch >= stage.epochs or out_of_budget
        record = {"stage": stage.label(progress.stage), "stage_index": progress.stage, "epoch": progress.epoch,
                  "stage_epoch": progress.stage_epoch, "step": progress.step, "lr": optimizer.param_groups[0]["lr"],
                  "train_loss": train_loss}
        if progress.epoch % session.config.training.val_every == 0 or last_epoch:
            validation_start = time.monotonic()
            record.update(_validate_and_keep_best(session, progress))
            record["val_seconds"] = time.monotonic() - validation_start
            collapse = _check_collapse(session, stage, progress, record)
            if collapse and session.config.training.collapse.stop:
                progress.stopped, last_epoch = "collapse", True
        progress.elapsed += time.monotonic() - epoch_start
        progress.stage_seconds += time.monotonic() - epoch_start
        record.update(seconds=time.monotonic() - epoch_start, elapsed=progress.elapsed)
        stop = last_epoch or _early_stop(stage, progress, record.get("val_dice"))
        progress.stage_done = stop
        if session.metrics is not None:
            session.metrics.append(record)
        _save(session, progress, optimizer, scheduler, "last")
        remaining = sum(s.epochs for s in session.config.training.stages[progress.stage + 1:]) + stage.epochs - progress.stage_epoch
        val_seconds = record.get("val_seconds", 0.0)
        rate = steps * session.config.training.batch_size / max(record["seconds"] - val_seconds, 1e-9)
        log.info("epoch %d/%d (%s, step %d): loss %.3f%s; %.*f %s/s training, %.0f s%s, ETA %s", progress.epoch,
                 progress.epoch + remaining, record["stage"], progress.step, train_loss,
                 f", val Dice {record['val_dice']:.3f}" if "val_dice" in record else "",
                 0 if rate >= 10 else 1, rate, session.route.sample_name, record["seconds"],
                 f" (validation {val_seconds:.0f} s)" if "val_seconds" in record else "",
                 duration(remaining * progress.elapsed / max(progress.epoch, 1)))
        if stop:
            return


def _check_collapse(session: _Session, stage: StageConfig, progress: Progress, record: dict) -> list[str]:
    """Classes that look collapsed at this validation (logged and kept in ``progress``), see :func:`collapsed_classes`."""
    rule = session.config.training.collapse
    planned = planned_encoder_epochs(session.config.training.stages)
    if stage.train == "decoder" or not collapse_check_due(progress.encoder_epochs, planned, rule.after_fraction):
        return []
    names = list(session.data.labels.values())[1:]
    per_class = {name: record[f"val_dice_{name}"] for name in names}
    low = collapsed_classes(per_class, rule.min_class_dice, rule.relative_dice)
    if low:
        progress.collapse_warnings.append({"stage": stage.label(progress.stage), "epoch": progress.epoch, "step": progress.step,
                                           "classes": {name: round(per_class[name], 4) for name in low}})
        if session.dist.is_main:
            log.warning("possible collapse: %s after %d of %d encoder-training epochs (stage %s)%s",
                        ", ".join(f"class {n} val Dice {per_class[n]:.3f}" for n in low), progress.encoder_epochs, planned,
                        stage.label(progress.stage), "; stopping (training.collapse.stop)" if rule.stop else "")
    return low


def _set_epoch(session: _Session, progress: Progress) -> None:
    """The epoch's samples: order and seeds, augmented as the current stage says (``stages[].augment``)."""
    data = session.config.data
    session.train_set.set_augmentation(session.config.training.stages[progress.stage].augments(data.augment))
    session.train_set.set_epoch(session.config.seed, progress.epoch, data.slices_per_epoch, data.foreground_fraction)


def _remaining_steps(stage: StageConfig, taken: int) -> int | None:
    return None if stage.max_steps is None else max(stage.max_steps - taken, 0)


def _past(deadline: float | None, context: DistributedContext) -> bool:
    """Whether ``deadline`` has passed; in a distributed run, whether it has on any rank (all ranks agree,
    so all take the same number of steps: DDP would wait forever for a rank that stopped early)."""
    if deadline is None:
        return False
    return distributed.any_rank(context, time.monotonic() >= deadline)


def _epoch_steps(loader, budget: int | None) -> int | None:
    """Steps this epoch will take: the loader's length, cut to the stage's remaining ``budget``; None if unknown."""
    try:
        steps = len(loader)
    except TypeError:
        return budget
    return min(steps, budget) if budget is not None else steps


def _train_epoch(session: _Session, optimizer, scheduler, progress: Progress, budget: int | None, deadline: float | None):
    """Train one epoch (this rank's shard of it); returns the mean loss over all ranks and the steps taken."""
    config = session.config
    _set_epoch(session, progress)
    session.train_model.train()
    set_train_mode(session.model, config.model.frozen_bn)  # on the bare model: frozen BatchNorm back to eval
    total, steps = 0.0, 0
    show = sys.stderr.isatty() and session.dist.is_main
    cache = session.feature_cache if config.training.stages[progress.stage].train == "decoder" else None
    batches = session.train_loader if cache is None else cache.epoch(session.model, session.train_set, session.train_loader,
                                                                     session.device)
    bar = tqdm(batches, desc=f"epoch {progress.epoch + 1}", leave=False, disable=not show)
    beat = Heartbeat(log, f"epoch {progress.epoch + 1}", _epoch_steps(session.train_loader, budget),
                     disable=show or not session.dist.is_main)
    for batch in bar:
        if (budget is not None and steps >= budget) or _past(deadline, session.dist):
            break
        step = train_step if cache is None else cache.step  # cached: decoder + head on the bare model
        loss = step(session.train_model if cache is None else session.model, session.loss, optimizer, batch,
                    session.device, config.training.grad_clip, settings=session.speed, scaler=session.scaler)
        scheduler.step()
        total += loss
        steps += 1
        update_average(session.average, session.model, progress.step + steps)
        bar.set_postfix(loss=f"{loss:.4f}")
        beat.tick(steps, loss)
    distributed.sync_buffers(session.model, session.dist)
    if session.dist.enabled:
        total_all, steps_all = distributed.sum_across_ranks(session.dist, [total, steps])
        return total_all / max(steps_all, 1), steps
    return total / max(steps, 1), steps


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer, batch: dict, device: torch.device, grad_clip: float | None,
               *, settings: SpeedSettings = FULL_PRECISION, scaler=None) -> float:
    """One optimisation step on a batch of 2.5D slabs or 3D patches; returns the loss value.

    ``settings`` (resolved speed switches) set autocast, with the loss computed in float32 from
    the logits, and the input's memory format; ``scaler`` (float16 autocast) scales the loss,
    unscales before clipping, and skips steps whose gradients overflowed. The defaults are plain
    float32 training. ``model`` may be wrapped (DDP, compiled); its gradients are then averaged.
    """
    image = batch["image"].to(device, non_blocking=True, memory_format=speed.memory_format(settings, batch["image"].ndim))
    label = batch["label"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with speed.autocast(settings, device):
        logits = model(image)
    loss = loss_fn(as_float(logits), label)
    return backward_and_step(loss, model, optimizer, grad_clip, scaler)


def _early_stop(stage: StageConfig, progress: Progress, val_dice: float | None) -> bool:
    if stage.early_stopping is None or val_dice is None:
        return False
    if val_dice > progress.stage_best + stage.early_stopping.min_delta:
        progress.stage_best, progress.stage_bad_epochs = val_dice, 0
        return False
    progress.stage_bad_epochs += 1
    return progress.stage_bad_epochs >= stage.early_stopping.patience


# --------------------------------------------------------------------------- validation


def validation_inferer(config: RunConfig, classes: int, route: Route, route_settings: dict, model: nn.Module,
                       tta: bool = False) -> Inferer:
    """The route's inferer on whole validation volumes (the one ``predict`` builds from the checkpoint);
    ``tta``: averaged over the flips the network was trained with."""
    options = InferenceOptions(batch_size=config.training.val_batch_size, roi_size=None, max_batch_pixels=None, tta=tta)
    return route.inferer(network_spec(config, classes, route_settings), options, model)


def validation_scores(model: nn.Module, volumes, inferer: Inferer, num_classes: int, device: torch.device,
                      progress: bool = True) -> list[list[float]]:
    """3D Dice per foreground class of each validation volume (whole volumes, the route's inferer), in order."""
    model.eval()
    scores = []
    show = progress and sys.stderr.isatty()
    for item in tqdm(volumes, desc="validation", leave=False, disable=not show):
        predicted = inferer.label_map(model, item["image"], device)
        scores.append(dice_per_class(predicted.long(), torch.as_tensor(np.asarray(item["label"]))[0], num_classes))
    return scores


def mean_over_ranks(scores: list[list[float]], num_foreground: int, context: DistributedContext) -> list[float]:
    """Per-class mean of the per-volume ``scores`` of all ranks together.

    A single process takes ``np.mean`` as before; ranks all-reduce their per-class sums and volume
    counts (float64), and all-reduce hands every rank the same bits, so all see the same mean.
    """
    if not context.enabled:
        return np.mean(scores, axis=0).tolist()
    sums = np.sum(scores, axis=0) if scores else np.zeros(num_foreground)
    reduced = distributed.sum_across_ranks(context, [*sums.tolist(), float(len(scores))])
    return [value / reduced[-1] for value in reduced[:-1]]


def _validation_per_class(session: _Session, inferer: Inferer, network: nn.Module) -> list[float]:
    """Per-class mean validation Dice of ``network`` as it is now, over every rank's validation volumes."""
    labels = session.data.labels
    with speed.autocast(session.speed, session.device):
        scores = validation_scores(network, session.val_volumes, inferer, len(labels), session.device,
                                   progress=session.dist.is_main)
    return mean_over_ranks(scores, len(labels) - 1, session.dist)


def _validate_and_keep_best(session: _Session, progress: Progress) -> dict[str, float]:
    labels = session.data.labels
    per_class = _validation_per_class(session, session.inferer, evaluated_network(session.average, session.model))
    mean = float(np.mean(per_class))
    record = {"val_dice": mean, **{f"val_dice_{name}": v for name, v in zip(list(labels.values())[1:], per_class)}}
    if mean > progress.best_dice:
        progress.best_dice, progress.best_epoch, progress.best_per_class = mean, progress.epoch, per_class
        _save(session, progress, None, None, "best")
    return record


def _choose_tta(session: _Session, progress: Progress) -> dict[str, Any] | None:
    """After the last epoch: the best checkpoint scored once more on the validation cases, averaged over the flips
    it was trained with; ``tta`` is whether that scored higher than its plain validation Dice. Stored in ``best.pt``
    (``Checkpoint.inference``), where ``predict`` follows it unless told ``--tta``/``--no-tta``. None (nothing
    stored) when training used no flips or kept no checkpoint. Leaves the best weights in ``session.model``."""
    flips = trained_mirrorings(session.config.data)
    if len(flips) < 2 or progress.best_epoch < 0:
        return None
    distributed.barrier(session.dist)  # rank 0 wrote best.pt; every rank reads it
    path = session.run_dir / "checkpoints" / "best.pt"
    best = Checkpoint.load(path)
    load_weights(session.model, best.model, path)
    inferer = validation_inferer(session.config, len(session.data.labels), session.route, session.route_settings,
                                 session.model, tta=True)
    with_tta = float(np.mean(_validation_per_class(session, inferer, session.model)))
    record = {"tta": with_tta > progress.best_dice, "val_dice": progress.best_dice, "val_dice_tta": with_tta,
              "passes": len(flips)}
    if session.dist.is_main:
        log.info("test-time augmentation (%d passes) on the validation cases: val Dice %.3f -> %.3f; predict %s by "
                 "default", len(flips), progress.best_dice, with_tta, "uses it" if record["tta"] else "leaves it out")
        best.inference = record
        best.save(path)
    return record


# --------------------------------------------------------------------------- checkpoints


def _save(session: _Session, progress: Progress, optimizer, scheduler, which: str) -> None:
    """Write ``checkpoints/<which>.pt`` (rank 0); ``last`` also gathers every rank's RNG state (collective).

    ``best`` holds the network validation scored (the weight average with ``training.ema``); ``last`` the
    trained weights, and the average beside them."""
    rng_states = distributed.gather_objects(session.dist, rng_state()) if which == "last" else None
    if not session.dist.is_main:
        return
    checkpoint = Checkpoint(
        config=dump_config(session.config),
        labels=dict(session.data.labels),
        preprocessing=session.prep.as_dict(),
        weights_provenance=session.provenance.as_dict(),
        model=(session.model if which == "last" else evaluated_network(session.average, session.model)).state_dict(),
        progress=asdict(progress),
        route=session.route.name,
        route_settings=session.route_settings,
    )
    if which == "last":
        checkpoint.optimizer, checkpoint.scheduler, checkpoint.rng = optimizer.state_dict(), scheduler.state_dict(), rng_states[0]
        if session.dist.enabled:
            checkpoint.rng_by_rank = rng_states
        if session.scaler is not None:
            checkpoint.grad_scaler = session.scaler.state_dict()
        if session.average is not None:
            checkpoint.averaged_model = session.average.module.state_dict()
    checkpoint.save(session.run_dir / "checkpoints" / f"{which}.pt")


def _environment(session: _Session, progress: Progress) -> dict:
    """:func:`run_environment` with the run's probe weighted over its training processes (``probe_segments``
    lists them when it was resumed)."""
    environment = run_environment(session.device, weighted_probe(progress.host_probes, progress.elapsed))
    if len(progress.host_probes) > 1:
        environment["probe_segments"] = progress.host_probes
    return environment


def _finish(session: _Session, progress: Progress, validated_tta: dict[str, Any] | None) -> RunResult:
    names = list(session.data.labels.values())[1:]
    result = RunResult(
        run_dir=session.run_dir,
        best_dice=progress.best_dice,
        best_per_class=dict(zip(names, progress.best_per_class)),
        best_epoch=progress.best_epoch,
        epochs=progress.epoch,
        seconds=progress.elapsed,
        steps=progress.step,
        collapsed=collapsed_classes(dict(zip(names, progress.best_per_class)), session.config.training.collapse.min_class_dice,
                                    session.config.training.collapse.relative_dice),
        collapse_warnings=progress.collapse_warnings,
        stopped=progress.stopped,
        peak_gpu_gb=speed.peak_gpu_memory_gb(session.device),
        environment=_environment(session, progress),
    )
    summary = {**asdict(result), "run_dir": str(result.run_dir), "weights": session.provenance.as_dict(),
               "arch": session.config.model.arch, "encoder": session.config.model.encoder,
               "training_cases": len(session.data.splits["train"]),
               "pseudo_labelled_cases": len(session.data.pseudo_labelled),
               "pseudo_labelled_share": session.config.data.pseudo_labelled_share, "validated_tta": validated_tta}
    if session.dist.is_main:
        write_atomic(session.run_dir / "summary.json", json.dumps(json_safe(rounded(summary)), indent=2) + "\n")
    distributed.barrier(session.dist)  # every rank returns once rank 0's files are complete
    return result
