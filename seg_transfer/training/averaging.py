"""Weight averaging (``training.ema``): an exponential moving average of the network, kept beside it.

The average is timm's ``ModelEmaV3`` (parameters and floating-point buffers, so BatchNorm statistics too;
integer buffers are copied). It is updated after every optimiser step with the run's global step, so a
resumed run continues the same decay schedule; frozen layers average to themselves. The trainer validates
the average, saves it as ``best.pt``'s network (what ``predict`` and ``export`` load) and stores it in
``last.pt`` beside the plain weights for ``--resume``.
"""
from __future__ import annotations

import logging

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from seg_transfer.config import WeightAverageConfig
from seg_transfer.routes.network import load_weights

log = logging.getLogger(__name__)


def start_average(settings: WeightAverageConfig | None, model: nn.Module) -> ModelEmaV3 | None:
    """A copy of ``model`` (same device and memory layout) to average into; None when ``settings`` is None."""
    if settings is None:
        return None
    return ModelEmaV3(model, decay=settings.decay, use_warmup=settings.warmup)


def update_average(average: ModelEmaV3 | None, model: nn.Module, step: int) -> None:
    """Fold ``model``'s weights after optimiser step ``step`` (1-based, over the whole run) into ``average``."""
    if average is not None:
        average.update(model, step=step)


def restore_average(average: ModelEmaV3 | None, state: dict[str, torch.Tensor] | None, model: nn.Module,
                    source: str) -> None:
    """Load a resumed run's average from ``last.pt`` (a one-line CheckpointError naming ``source`` when it does
    not fit); a file without one (written by a version before averaging) restarts it from ``model``, with a warning."""
    if average is None:
        return
    if state is None:
        log.warning("%s holds no weight average; it restarts from the resumed weights", source)
        state = model.state_dict()
    load_weights(average.module, state, source)


def evaluated_network(average: ModelEmaV3 | None, model: nn.Module) -> nn.Module:
    """What validation scores and ``best.pt`` keeps: the average when there is one, else ``model`` itself."""
    return model if average is None else average.module
