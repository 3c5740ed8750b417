"""The one checkpoint type: a versioned, atomic, safely loaded record of a run's network and state.

Every reader and writer goes through :class:`Checkpoint` (training resume, predict, export, the
study); :func:`seg_transfer.routes.load_network` is the one place that turns a checkpoint into a
network. Files hold plain data only (tensors, numbers, strings, lists, dicts) and are loaded with
``weights_only=True``. Format ``seg_transfer/2`` adds the route (``2.5d`` or ``3d``); files of
format ``seg_transfer/1`` (2.5D only) are migrated on load.
"""
from __future__ import annotations

import pickle
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from seg_transfer.atomic import atomic_open
from seg_transfer.errors import UserError, one_line

FORMAT = "seg_transfer/2"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, not one of ours, or inconsistent (one-line message)."""


@dataclass
class Checkpoint:
    """A run's network and, in ``last.pt``, everything ``--resume`` needs.

    ``config`` is the dumped :class:`~seg_transfer.config.RunConfig`; ``labels`` maps label values to
    class names; ``preprocessing`` is :meth:`Preprocessing.as_dict`; ``model`` the bare network's
    state dict (in ``best.pt`` of a run with ``training.ema``, the weight average it validated). The
    optimiser/scheduler/RNG/scaler states and the average (``averaged_model``) exist only in ``last.pt``. ``inference``: what the end
    of training measured on the validation cases for ``predict``'s defaults (``{"tta": bool, "val_dice": ...,
    "val_dice_tta": ..., "passes": n}``; empty in checkpoints written before, or without trained flips).
    """

    config: dict[str, Any]
    labels: dict[int, str]
    preprocessing: dict[str, Any]
    weights_provenance: dict[str, Any]
    model: dict[str, torch.Tensor]
    progress: dict[str, Any]
    route: str = "2.5d"
    route_settings: dict[str, Any] = field(default_factory=dict)  # fixed at training time (3D: patch_size)
    inference: dict[str, Any] = field(default_factory=dict)  # best.pt: choices validated at the end of training (tta)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    rng_by_rank: list[dict[str, Any]] | None = None
    grad_scaler: dict[str, Any] | None = None
    averaged_model: dict[str, torch.Tensor] | None = None  # last.pt with training.ema: the weight average, for --resume

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, then ``os.replace``."""
        payload = {"format": FORMAT, **asdict(self)}
        payload["labels"] = {str(k): v for k, v in self.labels.items()}
        with atomic_open(path, "wb") as stream:
            torch.save(payload, stream)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Load safely (``weights_only=True``); a run directory resolves to its best checkpoint.

        Raises :class:`CheckpointError` (one line naming the file) for a missing, empty, unsafe,
        foreign or incomplete file.
        """
        path = resolve_checkpoint(path)
        payload = _read(path)
        if not isinstance(payload, dict) or payload.get("format") not in MIGRATIONS:
            raise CheckpointError(f"{path}: not a seg_transfer checkpoint")
        payload = MIGRATIONS[payload.pop("format")](payload)
        missing = [f.name for f in fields(cls) if f.name not in payload and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise CheckpointError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
        known = {f.name for f in fields(cls)}
        checkpoint = cls(**{k: v for k, v in payload.items() if k in known})
        checkpoint.labels = dict(sorted((int(k), v) for k, v in checkpoint.labels.items()))
        return checkpoint

    def run_config(self, source: str | Path = "checkpoint"):
        """The stored :class:`RunConfig`, validated by today's schema; :class:`CheckpointError` if it is not valid."""
        from pydantic import ValidationError

        from seg_transfer.config import RunConfig

        try:
            return RunConfig.model_validate(self.config)
        except ValidationError as exc:
            raise CheckpointError(f"{source}: stored config is not valid ({one_line(exc)})") from None


def _migrate_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """``seg_transfer/1``: the same keys, 2.5D only."""
    return {**payload, "route": "2.5d"}


def _current(payload: dict[str, Any]) -> dict[str, Any]:
    return payload


#: format tag -> function turning such a payload into today's keys
MIGRATIONS = {"seg_transfer/1": _migrate_v1, FORMAT: _current}


def _read(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes; a full disk or an interrupted copy leaves this), not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: contains Python objects other than tensors; not loaded for safety") from None
        raise CheckpointError(f"{path}: cannot load checkpoint ({one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - one-line user error
        raise CheckpointError(f"{path}: cannot load checkpoint ({one_line(exc)})") from None


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file, or ``<run>/checkpoints/<which>.pt`` for a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path
