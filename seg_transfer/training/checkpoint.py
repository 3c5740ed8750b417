"""Atomic, self-describing checkpoints (config, labels, preprocessing, weights provenance inside)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from seg_transfer.atomic import atomic_open

FORMAT = "seg_transfer/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours (one-line message)."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``."""
    with atomic_open(path, "wb") as stream:
        torch.save({"format": FORMAT, **payload}, stream)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load safely (``weights_only=True``); a run directory resolves to its best checkpoint."""
    path = resolve_checkpoint(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes; a full disk or an interrupted copy leaves this), not a checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: contains Python objects other than tensors; not loaded for safety") from None
        raise CheckpointError(f"{path}: cannot load checkpoint ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - one-line user error
        raise CheckpointError(f"{path}: cannot load checkpoint ({first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a seg_transfer checkpoint")
    return payload


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (just the type for an empty message), at most 160 characters."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file, or ``<run>/checkpoints/<which>.pt`` for a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path
