"""Where a run computed: library versions, CPU kernel path and device, recorded in every run's summary.

Same config and seed give the same data order, augmentation and initialisation, but not bit-identical
weights across machines: PyTorch picks CPU kernels by instruction set (``torch.backends.cpu.
get_cpu_capability``) and thread count, and GPUs differ again. Two runs whose ``environment`` blocks
differ may drift apart by seed-noise amounts over hundreds of steps; :func:`environment_differences`
names what differs so a study can say so instead of leaving it to be guessed.
"""
from __future__ import annotations

import platform
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_LIBRARIES = ("monai", "timm", "segmentation-models-pytorch", "numpy")
# keys that change floating-point results; the CPU model is informative only (same ISA, same kernels)
NUMERIC_KEYS = ("torch", *_LIBRARIES, "cpu_capability", "device_name", "threads")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def source_revision(package_dir: Path = Path(__file__).resolve().parent) -> str | None:
    """The git commit of the seg_transfer source in use, with ``+dirty`` when its package files have
    uncommitted changes; None when the package does not sit at the top of a git checkout (an installed wheel)."""
    root = package_dir.parent
    if not ((root / ".git").exists() and (root / "pyproject.toml").is_file()):
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", package_dir.name)
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, Python, CPU model and the kernel path torch uses on it, threads, and the compute device."""
    device = torch.device(device)
    return {
        "seg_transfer": _version("seg-transfer"),
        "seg_transfer_revision": source_revision(),  # the version string does not change between commits
        "torch": torch.__version__,  # with its build tag (+cu130, +cpu): CUDA builds differ in kernels
        **{name: _version(name) for name in _LIBRARIES},
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def environment_differences(environments: Sequence[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """``{key: sorted distinct values}`` for every numerically relevant key on which the given
    environments disagree; runs without a recorded environment (older summaries) are left out."""
    known = [env for env in environments if env]
    differing = {}
    for key in NUMERIC_KEYS:
        values = {str(env.get(key)) for env in known}
        if len(values) > 1:
            differing[key] = sorted(values)
    return differing
