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

Idempotent like training: every :data:`STATE_EVERY` steps the loop's state (network, optimiser, schedule, loss
curve) is written to ``pretraining_state.pt``; the same command on the same folder continues from it (samples are
fixed by their index, so a continued run equals an uninterrupted one), a finished folder of the same settings is
reused, and a folder of other settings is refused.

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
from torch.utils.data import DataLoader, Dataset, Subset
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
STATE_NAME = "pretraining_state.pt"
#: optimiser steps between two saved loop states
STATE_EVERY = 100
#: config sections that decide what pretraining computes (a folder made with others is another pretraining)
DECIDING = ("seed", "data", "model", "pretraining")


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
    ``output``'s two files; continues an interrupted pretraining of the same settings in ``output``, returns a
    finished one as it is, refuses one of other settings (ConfigError)."""
    route = get_route(config.model.dims)
    settings = config.pretraining
    finished = _finished(config, output)
    if finished is not None:
        log.info("%s: a finished pretraining of these settings; reused", output)
        return finished
    resume = _saved_state(config, output)
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
    train_scans, held_out = split_scans(scans, settings.val_fraction, config.seed)
    log.info("restoration pretraining (%s): %d scans (%d held out), %d steps of %d %s on %s", route.name, len(scans),
             len(held_out), settings.steps, batch_size, route.sample_name, device)
    train_set, val_loader = _restoration_sets(config, route, model, train_scans, held_out, settings.steps * batch_size)
    before = resume["held_out_before"] if resume else (restoration_errors(model, val_loader, device) if val_loader else None)
    loop = _Loop(model, settings, _identity(config), output / STATE_NAME, resume, before)
    loader = _loader(Subset(train_set, range(loop.step * batch_size, len(train_set))), batch_size, config.data.num_workers)
    curve, seconds = loop.run(loader, device)
    after = restoration_errors(model, val_loader, device) if val_loader else None
    weights = _save_weights(model, output / WEIGHTS_NAME)
    summary = {
        "encoder": config.model.encoder, "start_weights": provenance.source, "start_weights_path": provenance.path,
        "route": route.name, "scans": len(train_scans), "held_out_scans": [c.name for c in held_out],
        "samples": len(train_set), "steps": settings.steps, "batch_size": batch_size, "seconds": round(seconds, 1),
        "held_out_before": _rounded(before), "held_out_after": _rounded(after), "loss_curve": curve,
        "weights": WEIGHTS_NAME, "weights_sha256": sha256_file(weights),
        "settings": settings.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
        "environment": run_environment(device), "config": _identity(config),
    }
    write_atomic(output / SUMMARY_NAME, json.dumps(json_safe(summary), indent=2) + "\n")
    (output / STATE_NAME).unlink(missing_ok=True)
    return PretrainResult(weights, summary)


def _restoration_sets(config: RunConfig, route, model: nn.Module, train_scans: Sequence[Case],
                      held_out: Sequence[Case], count: int) -> tuple[Dataset, DataLoader | None]:
    """The route's ``count`` training pairs (seed) and a loader of its held-out pairs (seed + 1; None without
    held-out scans), both preprocessed as fine-tuning will preprocess them and shaped by the route settings of
    the training scans (one 3D patch size for both)."""
    prep, corruption = Preprocessing.from_config(config.data), Corruption(config.pretraining)
    train_volumes = volume_dataset(train_scans, prep, config.data, with_label=False)
    settings = route.settings(config.data, train_volumes, model)
    train_set = route.restoration_samples(train_volumes, config.data, settings, model, corruption, count, config.seed)
    if not held_out:
        return train_set, None
    held_out_volumes = volume_dataset(held_out, prep, config.data, with_label=False)
    held_out_set = route.restoration_samples(held_out_volumes, config.data, settings, model, corruption, None,
                                             config.seed + 1)
    return train_set, _loader(held_out_set, config.training.val_batch_size, config.data.num_workers)


def _identity(config: RunConfig) -> dict:
    """What decides the pretraining's result: :data:`DECIDING` of the config, as JSON data."""
    dumped = json_safe(config.model_dump(mode="json"))
    return {key: dumped[key] for key in DECIDING}


def _finished(config: RunConfig, output: Path) -> PretrainResult | None:
    """The result in ``output`` when a pretraining of the same settings finished there; ConfigError when
    ``output`` holds one of other settings."""
    summary_path, weights = output / SUMMARY_NAME, output / WEIGHTS_NAME
    if not summary_path.is_file() or not weights.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    _check_same(summary.get("config"), config, summary_path)
    return PretrainResult(weights, summary)


def _saved_state(config: RunConfig, output: Path) -> dict | None:
    """The loop state an interrupted pretraining of the same settings left in ``output`` (ConfigError for other
    settings, or a file that cannot be read)."""
    path = output / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ConfigError(f"{path}: cannot read the saved pretraining state ({type(exc).__name__}); delete it to "
                          "start again") from None
    _check_same(json.loads(state["config"]), config, path)
    log.info("%s: continuing an interrupted pretraining from step %d", output, state["step"])
    return state


def _check_same(stored: dict | None, config: RunConfig, path: Path) -> None:
    if stored is None:
        raise ConfigError(f"{path}: a pretraining that did not record its settings (an older version); use a new "
                          "--output folder")
    current = _identity(config)
    if stored != current:
        changed = sorted(k for k in DECIDING if stored.get(k) != current[k])
        raise ConfigError(f"{path}: a pretraining with other settings (differs in {', '.join(changed)}); use a new "
                          "--output folder")


class _Loop:
    """The optimisation loop, resumable: AdamW with linear warm-up and cosine decay over ``settings.steps``; its
    state is saved every :data:`STATE_EVERY` steps to ``state_path`` (atomically) and restored from ``resume``."""

    def __init__(self, model: nn.Module, settings, identity: dict, state_path: Path, resume: dict | None,
                 held_out_before: dict | None):
        self.model, self.settings, self.identity, self.state_path = model, settings, identity, state_path
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        warmup = min(settings.warmup_steps, settings.steps - 1)
        self.scheduler = LambdaLR(self.optimizer, lambda step: lr_factor(step, warmup, settings.steps, "cosine"))
        self.step, self.curve, self.window, self.seconds = 0, [], [], 0.0
        self.held_out_before = held_out_before  # saved with the state: a continued run reports the first error
        if resume:
            model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            self.step, self.curve, self.window, self.seconds = (resume["step"], list(resume["curve"]),
                                                                list(resume["window"]), float(resume["seconds"]))

    def run(self, loader: DataLoader, device: torch.device) -> tuple[list[dict], float]:
        """Train over ``loader`` (the steps left); returns the loss curve (``[{"step": s, "loss": mean of the
        window ending at s}]``) and the seconds spent, both over the whole pretraining."""
        self.model.train()
        show = sys.stderr.isatty()
        beat = Heartbeat(log, "pretraining", self.settings.steps - self.step, disable=show)
        start = time.monotonic()
        bar = tqdm(loader, desc="pretraining", initial=self.step, total=self.settings.steps, leave=False, disable=not show)
        for done, batch in enumerate(bar, start=1):
            loss = nn.functional.mse_loss(_outputs(self.model, batch["image"].to(device)), batch["target"].to(device))
            self.optimizer.zero_grad(set_to_none=True)
            self.window.append(backward_and_step(loss, self.model, self.optimizer, grad_clip=1.0))
            self.scheduler.step()
            self.step += 1
            bar.set_postfix(loss=f"{self.window[-1]:.4f}")
            beat.tick(done, self.window[-1])
            if len(self.window) == CURVE_WINDOW or self.step == self.settings.steps:
                self.curve.append({"step": self.step, "loss": round(float(np.mean(self.window)), 4)})
                self.window = []
            if self.step % STATE_EVERY == 0 and self.step < self.settings.steps:
                self._save(self.seconds + time.monotonic() - start)
        self.seconds += time.monotonic() - start
        return self.curve, self.seconds

    def _save(self, seconds: float) -> None:
        state = {"step": self.step, "model": _cpu(self.model.state_dict()), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "curve": self.curve, "window": self.window,
                 "seconds": seconds, "config": json.dumps(self.identity), "held_out_before": self.held_out_before}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.state_path, buffer.getvalue())


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def _save_weights(model: nn.Module, path: Path) -> Path:
    buffer = io.BytesIO()
    torch.save({"state_dict": _cpu(model.state_dict())}, buffer)
    return write_atomic(path, buffer.getvalue())


def _rounded(errors: dict[str, float] | None) -> dict[str, float] | None:
    return None if errors is None else {k: round(v, 4) for k, v in errors.items()}
