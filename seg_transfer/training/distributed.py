"""Data-parallel training with ``torch.distributed``: joining the process group, collectives, DDP wrapping.

A run is distributed when its launcher says so. ``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; under ``srun`` without torchrun they are derived from SLURM_PROCID,
SLURM_LOCALID, SLURM_STEP_NUM_TASKS and the step's node list (:func:`slurm_environment`). With a
world size of 1 (or none) nothing here talks to another process and every helper returns what a
single process would compute, so single-process runs are unchanged.

Contracts the trainer relies on:

* every rank builds the same model from the same seed, and DDP broadcasts rank 0's parameters and
  buffers whenever it wraps, so all ranks start each stage from identical weights;
* collectives run on every rank in the same order (object collectives go through the default
  group: gloo on CPU, nccl on CUDA);
* an exception on one rank inside :func:`run_on_main` / :func:`run_on_every_rank` is raised on
  every rank, so a user error ends the whole run instead of leaving the other ranks waiting.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seg_transfer.config import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: port base for srun launches without MASTER_PORT; the job id is added so jobs sharing a node differ
SLURM_PORT_BASE = 15000


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run; ``world_size == 1`` is a plain single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's device (distributed runs)
    owns_group: bool = False  # this module initialised the process group and destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and logs at INFO."""
        return self.rank == 0


SINGLE_PROCESS = DistributedContext()


# --------------------------------------------------------------------------- launch environment


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for a task started by ``srun``.

    Empty where torchrun already set RANK, or where this is not an ``srun`` step with several tasks
    (a batch script itself also sees SLURM_PROCID and SLURM_NTASKS, but no SLURM_STEP_NUM_TASKS).
    MASTER_ADDR defaults to the first host of the step's node list, MASTER_PORT to
    ``SLURM_PORT_BASE + job id % 20000``; values already in ``env`` win.
    """
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    world_size = int(env["SLURM_STEP_NUM_TASKS"])
    if world_size <= 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and not nodelist:
        raise RuntimeError("srun launch without MASTER_ADDR or SLURM_STEP_NODELIST: cannot find the rendezvous host")
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,009],cpu1"`` gives ``"gpu003"``.

    Each bracket group of the first entry is replaced by its first value (zero padding kept).
    """
    entry, depth = "", 0
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        entry += char
    return re.sub(r"\[([^\]]*)\]", lambda match: re.split(r"[-,]", match.group(1))[0], entry)


def launch_world_size(env: Mapping[str, str]) -> int:
    """WORLD_SIZE of this launch (1 when not launched by torchrun or srun)."""
    return int(env.get("WORLD_SIZE") or slurm_environment(env).get("WORLD_SIZE", "1"))


# --------------------------------------------------------------------------- process group


def init_distributed(device_spec: str) -> DistributedContext:
    """Join the process group this launch describes (``env://``) and choose this rank's device.

    Returns :data:`SINGLE_PROCESS` when the world size is 1. Otherwise ``device_spec``
    (``training.device``) ``auto``/``cuda`` becomes ``cuda:LOCAL_RANK`` with the nccl backend, and
    ``cpu`` (or ``auto`` without CUDA) uses gloo; an explicit ``cuda:N`` is a :class:`ConfigError`
    because every rank would pick the same GPU. A default group that already exists is reused and
    left open. Ranks other than 0 log at WARNING from here on.
    """
    if dist.is_available() and dist.is_initialized():
        return _context(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size(), device_spec, owns_group=False)
    for key, value in slurm_environment(os.environ).items():
        os.environ.setdefault(key, value)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    context = _context(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size, device_spec, owns_group=True)
    backend = "nccl" if context.device.type == "cuda" else "gloo"
    if context.device.type == "cuda":
        torch.cuda.set_device(context.device)
    dist.init_process_group(backend, init_method="env://", rank=context.rank, world_size=world_size)
    log.info("distributed: rank %d of %d (local %d) on %s, backend %s", context.rank, world_size, context.local_rank,
             context.device, backend)
    return context


def _context(rank: int, local_rank: int, world_size: int, device_spec: str, owns_group: bool) -> DistributedContext:
    if world_size > 1 and rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return DistributedContext(rank, local_rank, world_size, rank_device(device_spec, local_rank), owns_group)


def rank_device(device_spec: str, local_rank: int) -> torch.device:
    """This rank's device for ``training.device``: ``cuda:LOCAL_RANK`` for auto (with CUDA) and cuda, else CPU."""
    spec = device_spec.strip().lower()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", local_rank)
    raise ConfigError(f"training.device={device_spec!r} under a distributed launch: use auto, cuda or cpu "
                      "(each rank takes cuda:LOCAL_RANK)")


def shutdown(context: DistributedContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives


def barrier(context: DistributedContext) -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if context.enabled:
        dist.barrier()


def sum_across_ranks(context: DistributedContext, values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks, in float64; every rank gets the same numbers."""
    if not context.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(context))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def any_rank(context: DistributedContext, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (for decisions all ranks must share, e.g. deadlines)."""
    if not context.enabled:
        return flag
    return sum_across_ranks(context, [float(flag)])[0] > 0


def gather_objects(context: DistributedContext, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects only)."""
    if not context.enabled:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def run_on_main(context: DistributedContext, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; every rank returns its (picklable) result, or raises the error it raised.

    Used for work whose result all ranks need but only one should do: checking the data and writing
    ``splits.json``, so no rank reads a file another is writing.
    """
    if not context.enabled:
        return fn()
    result, error = None, None
    if context.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            error = exc
    shared = [(result, _portable(error))]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    result, shared_error = shared[0]
    if shared_error is not None:
        raise shared_error
    return result


def run_on_every_rank(context: DistributedContext, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; if it failed on any rank, every rank raises (its own error or the first one)."""
    if not context.enabled:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        error = exc
    errors = gather_objects(context, _portable(error))
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return result


def _portable(error: Exception | None) -> Exception | None:
    """``error`` if it pickles (to send it to other ranks), else a RuntimeError with its message."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


def _comm_device(context: DistributedContext) -> torch.device:
    """Where tensors for collectives live: the rank's GPU for nccl, CPU for gloo."""
    return context.device if dist.get_backend() == "nccl" else torch.device("cpu")


# --------------------------------------------------------------------------- models


def shard_items(items: Sequence[T], context: DistributedContext) -> list[T]:
    """Rank ``r``'s share of ``items``: every ``world_size``-th item from position ``r`` (disjoint, covering)."""
    return list(items[context.rank :: context.world_size])


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """``model`` in DistributedDataParallel for the parameters that require grad now (``model`` itself when single).

    DDP's reducer is built from ``requires_grad`` at wrap time, so a stage that freezes or unfreezes
    parameters must wrap again. Wrapping broadcasts rank 0's parameters and buffers.
    """
    if not context.enabled:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def convert_sync_batchnorm(model: nn.Module, context: DistributedContext) -> nn.Module:
    """BatchNorm layers as SyncBatchNorm (see :func:`sync_batchnorm_layers`), for distributed CUDA runs.

    A single process gets ``model`` back unchanged. On CPU this raises :class:`ConfigError`: torch's
    SyncBatchNorm only runs on GPUs (gloo/CPU training fails at the first forward otherwise).
    """
    if not context.enabled:
        log.info("training.sync_batchnorm has no effect in a single-process run")
        return model
    if context.device.type != "cuda":
        raise ConfigError("training.sync_batchnorm needs CUDA: torch's SyncBatchNorm does not run on CPU (gloo); "
                          "set it to false for CPU runs")
    return sync_batchnorm_layers(model)


def sync_batchnorm_layers(module: nn.Module, process_group: Any = None) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a synchronised one that computes the same thing.

    * plain ``BatchNorm1d/2d/3d`` (and subclasses that keep ``_BatchNorm.forward``) become ``nn.SyncBatchNorm``;
    * norm + activation layers, timm's ``BatchNormAct2d`` and the 3D route's
      :class:`~seg_transfer.models.inflate.BatchNormAct3d`, become timm's ``SyncBatchNormAct`` with their
      ``drop`` and ``act`` modules carried over: the converters of torch and timm turn ``BatchNormAct3d``
      (a ``BatchNorm3d`` subclass) into a plain SyncBatchNorm that never calls ``act``, silently
      removing every encoder activation of the 3D network;
    * any other BatchNorm subclass with its own ``forward`` raises ``TypeError`` naming it, rather than
      losing what that ``forward`` adds.

    Parameters and buffers (running statistics, ``num_batches_tracked``) are the original tensors, not
    copies, and each layer keeps its train/eval mode, so state-dict keys and values are unchanged. Without
    a process group (or in eval mode) the converted layers compute exactly what the originals do.
    """
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct

    from seg_transfer.models.inflate import BatchNormAct3d

    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        if isinstance(module, (BatchNormAct2d, BatchNormAct3d)):
            converted = SyncBatchNormAct(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats, process_group=process_group)
            converted.drop, converted.act = module.drop, module.act
        elif type(module).forward is nn.modules.batchnorm._BatchNorm.forward:
            converted = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats, process_group=process_group)
        else:
            raise TypeError(f"cannot convert {type(module).__module__}.{type(module).__qualname__} to SyncBatchNorm: "
                            "it overrides forward, which SyncBatchNorm would drop")
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training  # this layer only: act/drop keep their own mode
    for name, child in module.named_children():
        converted.add_module(name, sync_batchnorm_layers(child, process_group))
    return converted


def sync_buffers(model: nn.Module, context: DistributedContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers before each forward, so after the last step each rank has updated them
    with its own batch; syncing makes every rank validate and save exactly rank 0's model.
    """
    if not context.enabled:
        return
    for buffer in model.buffers():
        tensor = buffer.data if buffer.device == _comm_device(context) else buffer.data.to(_comm_device(context))
        dist.broadcast(tensor, src=0)
        if tensor is not buffer.data:
            buffer.data.copy_(tensor)


def check_ranks_agree(model: nn.Module, context: DistributedContext) -> None:
    """Raise RuntimeError if the parameters differ between ranks (they must stay bitwise identical under DDP).

    Compares a float64 fingerprint (sum and sum of squares of every parameter); cheap enough to run
    after every stage.
    """
    if not context.enabled:
        return
    with torch.no_grad():
        fingerprint = [(float(p.double().sum()), float(p.double().square().sum())) for p in model.parameters()]
    prints = gather_objects(context, fingerprint)
    differing = [rank for rank, other in enumerate(prints) if other != prints[0]]
    if differing:
        raise RuntimeError(f"model parameters of rank(s) {differing} differ from rank 0's: the data-parallel ranks diverged")
