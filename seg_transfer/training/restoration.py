"""``seg-transfer pretrain``: self-supervised restoration pretraining on unlabelled scans (both routes).

Domain-adaptive pretraining: the run config's network (encoder with ``model.encoder_weights``, e.g.
ImageNet, inflated to 3D on the 3D route) gets a head with one output per input channel and learns, by mean
squared error, to give back samples of unlabelled scans (the route's: 2.5D slabs or 3D patches of the
training patch size) from copies corrupted by :class:`~seg_transfer.data.restoration.Corruption`.
Every layer trains (BatchNorm in train mode), AdamW with linear warm-up and cosine decay over
``pretraining.steps`` optimiser steps. Scans are preprocessed exactly as fine-tuning will preprocess them
(``data``: spacing, intensity scaling, slice axis, context slices). A share of the scans
(``pretraining.val_fraction``) is held out: the summary reports their restoration error before and after,
next to the error of returning the corrupted input unchanged.

Output folder: ``pretrained.pt`` (the whole network's state dict; fine-tuning reads its ``encoder.*``
part through ``model.encoder_weights: OUT/pretrained.pt``, 3D encoders as they are, and with
``model.decoder_from_weights: true`` its decoder too) and ``pretraining.json`` (settings, scans, loss curve,
held-out errors, seconds, the file's sha256, where it ran), both written atomically.
"""
from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from seg_transfer.atomic import json_safe, write_atomic
from seg_transfer.config import ConfigError, RunConfig
from seg_transfer.environment import run_environment
from seg_transfer.data.cases import Case
from seg_transfer.data.checks import find_bad_cases, format_bad_cases
from seg_transfer.data.restoration import Corruption
from seg_transfer.data.pipeline import discover_cases, padded_batch, volume_dataset
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.models.weights import sha256_file
from seg_transfer.routes import get_route
from seg_transfer.routes.precision import run_device
from seg_transfer.training.metrics_log import Heartbeat
from seg_transfer.training.optim import backward_and_step, lr_factor

log = logging.getLogger(__name__)

#: the loss curve in ``pretraining.json`` is the mean loss over windows of this many steps
CURVE_WINDOW = 25
WEIGHTS_NAME = "pretrained.pt"
SUMMARY_NAME = "pretraining.json"


@dataclass(frozen=True)
class PretrainResult:
    weights: Path
    summary: dict


def split_scans(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(pretraining scans, held-out scans): a seeded share ``val_fraction`` held out, at least one when > 0
    and at least one scan left to train on."""
    order = np.random.default_rng([seed, 7]).permutation(len(cases))
    held = min(max(1, int(round(val_fraction * len(cases)))), len(cases) - 1) if val_fraction > 0 else 0
    return [cases[i] for i in sorted(order[held:])], [cases[i] for i in sorted(order[:held])]


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out[0] if isinstance(out, (list, tuple)) else out


@torch.no_grad()
def restoration_errors(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Mean squared error over ``loader``'s slabs of the network's restoration and of the corrupted input itself."""
    was_training = model.training
    model.eval()
    network = identity = count = 0.0
    for batch in loader:
        image, target = batch["image"].to(device), batch["target"].to(device)
        network += float(((_outputs(model, image) - target) ** 2).mean()) * len(image)
        identity += float(((image - target) ** 2).mean()) * len(image)
        count += len(image)
    model.train(was_training)
    return {"network_mse": network / max(count, 1), "corrupted_input_mse": identity / max(count, 1)}


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=padded_batch, drop_last=False)


def _warn_labelled_overlap(config: RunConfig, scans: Sequence[Case]) -> None:
    """Scans that are the run config's labelled cases may include a study's test cases: say so."""
    labelled = {c.image.resolve() for c in discover_cases(config.data)[0]}
    shared = [s.name for s in scans if s.image.resolve() in labelled]
    if shared:
        log.warning("%d pretraining scan(s) are labelled cases of the run config's data (e.g. %s): a study whose "
                    "test cases are among them no longer scores unseen images", len(shared), shared[0])


def readable_scans(scans: Sequence[Case]) -> list[Case]:
    """``scans`` without the unreadable or unusable ones (:func:`~seg_transfer.data.checks.find_bad_cases`),
    each left out with a warning line naming the file and the problem."""
    bad = find_bad_cases(scans, set())
    if bad:
        log.warning("%d unlabelled scan(s) left out:\n%s", len({b.name for b in bad}), format_bad_cases(bad))
    left_out = {b.name for b in bad}
    return [scan for scan in scans if scan.name not in left_out]


def pretrain(config: RunConfig, scans: Sequence[Case], output: Path) -> PretrainResult:
    """Restoration-pretrain ``config``'s network on ``scans`` (images only; bad ones are left out) and write
    ``output``'s two files."""
    route = get_route(config.model.dims)
    settings = config.pretraining
    batch_size = settings.batch_size or config.training.batch_size
    scans = readable_scans(scans)
    if len(scans) < 2 and settings.val_fraction > 0:
        raise ConfigError(f"seg-transfer pretrain: {len(scans)} usable scan(s); at least 2 are needed to hold one out "
                          "(or set pretraining.val_fraction=0)")
    _warn_labelled_overlap(config, scans)
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    torch.manual_seed(config.seed)
    in_channels = route.in_channels(config.data)
    model, provenance = route.build_network(config.model, in_channels, in_channels, True)
    device = run_device(config.training.device)
    model.to(device)
    corruption = Corruption(settings)
    train_scans, held_out = split_scans(scans, settings.val_fraction, config.seed)
    prep = Preprocessing.from_config(config.data)
    log.info("restoration pretraining (%s): %d scans (%d held out), %d steps of %d %s on %s", route.name, len(scans),
             len(held_out), settings.steps, batch_size, route.sample_name, device)
    train_set = route.restoration_samples(volume_dataset(train_scans, prep, config.data, with_label=False), config.data,
                                          model, corruption, settings.steps * batch_size, config.seed)
    val_loader = None
    if held_out:
        held_out_set = route.restoration_samples(volume_dataset(held_out, prep, config.data, with_label=False),
                                                 config.data, model, corruption, None, config.seed + 1)
        val_loader = _loader(held_out_set, config.training.val_batch_size, config.data.num_workers)
    before = restoration_errors(model, val_loader, device) if val_loader else None
    start = time.monotonic()
    curve = _train(model, _loader(train_set, batch_size, config.data.num_workers), settings, device)
    seconds = time.monotonic() - start
    after = restoration_errors(model, val_loader, device) if val_loader else None
    weights = _save_weights(model, output / WEIGHTS_NAME)
    summary = {
        "encoder": config.model.encoder, "start_weights": provenance.source, "start_weights_path": provenance.path,
        "route": route.name, "scans": len(train_scans), "held_out_scans": [c.name for c in held_out],
        "samples": len(train_set), "steps": settings.steps, "batch_size": batch_size, "seconds": round(seconds, 1),
        "held_out_before": _rounded(before), "held_out_after": _rounded(after), "loss_curve": curve,
        "weights": WEIGHTS_NAME, "weights_sha256": sha256_file(weights),
        "settings": settings.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
        "environment": run_environment(device),
    }
    write_atomic(output / SUMMARY_NAME, json.dumps(json_safe(summary), indent=2) + "\n")
    return PretrainResult(weights, summary)


def _train(model: nn.Module, loader: DataLoader, settings, device: torch.device) -> list[dict]:
    """The optimisation loop; returns the loss curve as ``[{"step": s, "loss": mean of the window ending at s}]``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = min(settings.warmup_steps, settings.steps - 1)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, warmup, settings.steps, "cosine"))
    model.train()
    show = sys.stderr.isatty()
    beat = Heartbeat(log, "pretraining", settings.steps, disable=show)
    curve, window = [], []
    bar = tqdm(loader, desc="pretraining", leave=False, disable=not show)
    for step, batch in enumerate(bar, start=1):
        loss = nn.functional.mse_loss(_outputs(model, batch["image"].to(device)), batch["target"].to(device))
        optimizer.zero_grad(set_to_none=True)
        window.append(backward_and_step(loss, model, optimizer, grad_clip=1.0))
        scheduler.step()
        bar.set_postfix(loss=f"{window[-1]:.4f}")
        beat.tick(step, window[-1])
        if len(window) == CURVE_WINDOW or step == len(loader):
            curve.append({"step": step, "loss": round(float(np.mean(window)), 4)})
            window = []
    return curve


def _save_weights(model: nn.Module, path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, buffer)
    return write_atomic(path, buffer.getvalue())


def _rounded(errors: dict[str, float] | None) -> dict[str, float] | None:
    return None if errors is None else {k: round(v, 4) for k, v in errors.items()}
