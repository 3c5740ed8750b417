"""Seeding and saving the global RNG streams (Python, NumPy, torch) of a training process, so that a
resumed run continues exactly where it stopped."""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from seg_transfer.checkpoint import Checkpoint
from seg_transfer.training.distributed import DistributedContext

log = logging.getLogger(__name__)


def rank_rng_state(checkpoint: Checkpoint, context: DistributedContext) -> dict[str, Any]:
    """This rank's RNG state in ``checkpoint``: its own if the run had as many ranks, else rank 0's."""
    by_rank = checkpoint.rng_by_rank
    if by_rank is not None and len(by_rank) == context.world_size:
        return by_rank[context.rank]
    if context.enabled or by_rank is not None:
        log.warning("resuming with %d process(es) a run saved with %d: every rank continues from rank 0's RNG state",
                    context.world_size, len(by_rank or [None]))
    return checkpoint.rng


def rng_state() -> dict[str, Any]:
    """The process's torch, NumPy and Python RNG states as checkpointable plain values."""
    return {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_list(), "python": list(random.getstate()[1])}


def _numpy_state_to_list() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def restore_rng(state: dict[str, Any]) -> None:
    """Set the three RNG streams to what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(state["python"]), None))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """After the (shared) model init, give ranks > 0 their own global RNG streams (dropout, loader
    seeds). Rank 0 keeps the single-process stream; augmentation is seeded per sample position."""
    if rank > 0:
        seed_everything(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
