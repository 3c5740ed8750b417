"""Where a run computed: library versions, CPU kernel path and device, recorded in every run's summary.

Same config and seed give the same data order, augmentation and initialisation, but not bit-identical
weights across machines: PyTorch picks CPU kernels by instruction set (``torch.backends.cpu.
get_cpu_capability``) and thread count, and GPUs differ again. Two runs whose ``environment`` blocks
differ may drift apart by seed-noise amounts over hundreds of steps; :func:`environment_differences`
names what differs so a study can say so instead of leaving it to be guessed.

Wall-clock seconds have the same problem, worse: one CPU model name covers hosts whose speed differs by
2x or more (same code and libraries, a 3D step took 1.1 s in one session and 2.7 s in a later one here).
:func:`host_speed_probe` times a fixed convolution workload so that runs' seconds can be compared, or
flagged as not comparable (:func:`host_speed_spread`).
"""
from __future__ import annotations

import platform
import subprocess
import time
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


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PROBE_SHAPE = (1, 8, 24, 24, 24)  # one 8-channel 24^3 volume through a 3x3x3 Conv3d, forward and backward
# a study flags its runs' seconds when their probes differ by more than this factor (probe noise on an idle
# host is a few percent; two processes on two cores add about 10-20%)
COMPARABLE_SPEED_RATIO = 1.5


def host_speed_probe(repeats: int = 5, shape: tuple[int, ...] = PROBE_SHAPE) -> float:
    """Fastest of ``repeats`` timings of a fixed Conv3d forward + backward on the CPU, torch's current thread count.

    About 0.03 s per repeat on one core of this project's development host (0.2 s in all with the warm-up).
    The fastest repeat estimates what the host can do; other processes on the same cores slow some repeats
    and are left out as far as possible, although they slow a run's training too. Two runs whose probes
    differ a lot took their seconds on different hosts. Leaves torch's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):  # the layer's initialisation draws from the global RNG
        torch.manual_seed(0)
        conv = torch.nn.Conv3d(shape[1], shape[1], 3, padding=1)
        volume = torch.randn(shape, requires_grad=True)
    times = []
    for repeat in range(repeats + 1):  # the first is a warm-up (allocations, kernel selection)
        start = time.perf_counter()
        conv(volume).square().mean().backward()
        if repeat:
            times.append(time.perf_counter() - start)
    return min(times)


def probe_segment(elapsed: float) -> dict[str, float]:
    """One training process's share of a run: this host's probe, taken as the process starts, and the run's
    training seconds so far (a run resumed on another host gets a second segment)."""
    return {"probe_seconds": round(host_speed_probe(), 4), "from_elapsed": round(elapsed, 3)}


def weighted_probe(segments: Sequence[Mapping[str, float]], total_seconds: float) -> float | None:
    """The probe of a run trained in ``segments`` (:func:`probe_segment`, in order), each weighted by the training
    seconds it ran until the next one began (the last until ``total_seconds``); the last probe when no segment
    ran any seconds, None without segments."""
    if not segments:
        return None
    ends = [float(s["from_elapsed"]) for s in segments[1:]] + [float(total_seconds)]
    spans = [max(end - float(s["from_elapsed"]), 0.0) for s, end in zip(segments, ends)]
    if sum(spans) <= 0:
        return float(segments[-1]["probe_seconds"])
    return sum(float(s["probe_seconds"]) * span for s, span in zip(segments, spans)) / sum(spans)


def run_environment(device: torch.device | str = "cpu", probe_seconds: float | None = None) -> dict[str, Any]:
    """Versions, Python, CPU model and the kernel path torch uses on it, threads, the compute device, and
    (on the CPU) the host speed probe's seconds: ``probe_seconds`` when given (a run's :func:`weighted_probe`),
    else measured now."""
    device = torch.device(device)
    if device.type == "cpu" and probe_seconds is None:
        probe_seconds = host_speed_probe()
    return {
        "seg_transfer": _version("seg-transfer"),
        "seg_transfer_revision": source_revision(),  # the version string does not change between commits
        "torch": torch.__version__,  # with its build tag (+cu130, +cpu): CUDA builds differ in kernels
        **{name: _version(name) for name in _LIBRARIES},
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "probe_seconds": round(probe_seconds, 4) if device.type == "cpu" else None,
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


def host_speed_spread(environments: Sequence[Mapping[str, Any] | None]) -> dict[str, float] | None:
    """``{"fastest": s, "slowest": s, "ratio": slowest / fastest}`` of the host speed probes of the given
    environments (those without a probe are left out); None when fewer than two runs have one."""
    probes = [float(env["probe_seconds"]) for env in environments if env and env.get("probe_seconds")]
    if len(probes) < 2:
        return None
    return {"fastest": min(probes), "slowest": max(probes), "ratio": max(probes) / min(probes)}
