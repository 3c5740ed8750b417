"""The CUDA paths on one GPU: mixed-precision training of both routes, batch prediction, big-volume sliding window.

    python benchmarks/gpu.py --data MSD_ROOT [--out DIR] [--parts train,predict,large] [--routes 2.5d,3d] [--amps bf16,off] [--workers 4]

Everything goes through the library functions the CLI calls (``train``, ``run_predict``):

* **train**: the shipped Hippocampus configs (``configs/hippocampus_2p5d_effnet_lite0.yaml``, 2.5D, and
  ``configs/hippocampus_3d_effnet_lite0.yaml``, 3D; ImageNet weights, their own staged schedules
  (2.5D 600 steps, 3D 960; the README's GPU numbers for 3D were measured at its earlier 240) and validation after every epoch; ``--routes`` picks which) on ``cuda``, once with ``training.amp=bf16`` and once with
  ``training.amp=off`` (float32), same seed (``--amps`` picks which). Prints wall time, optimiser steps per second over the
  whole run (validation included), peak GPU memory and the best validation Dice: bfloat16 must train
  as well as float32.
* **predict**: each bf16-trained checkpoint predicts the dataset's ``imagesTs`` (batch ``predict``,
  NIfTI outputs), with ``--amp`` and without; cases per second and peak GPU memory.
* **large**: a synthetic 512x512x300 volume (and 512x512x600, whose probabilities pass the
  GPU-stitching threshold and are stitched on the CPU) through the 3D network with 128x128x64 windows
  at overlap 0.25, 1 and 4 windows per forward, ``--amp``; seconds and peak GPU memory, which must not
  grow with the volume once stitching moves to the CPU.

Writes ``gpu.json`` to ``--out``. Data parallelism (DDP over NCCL) needs two GPUs: NCCL refuses two
ranks on one device, so a one-GPU machine cannot check it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from seg_transfer.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIGS = {"2.5d": ROOT / "configs" / "hippocampus_2p5d_effnet_lite0.yaml",
           "3d": ROOT / "configs" / "hippocampus_3d_effnet_lite0.yaml"}
GB = 1e9


def _peak_reset() -> None:
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / GB, 3)


def train_runs(configs: dict[str, Path], data: Path, out: Path, workers: int, device: str, extra: list[str],
               amps: list[str], record: Callable[[dict], None]) -> None:
    """``configs`` (route -> shipped config) x ``amps`` (bf16, float32); ``record`` gets one row per run."""
    from seg_transfer.config import load_config
    from seg_transfer.training.trainer import train

    for route, config_path in configs.items():
        for amp in amps:
            overrides = [f"data.root={data}", f"training.device={device}", f"training.amp={amp}",
                         f"data.num_workers={workers}", "training.num_threads=4", *extra]
            config = load_config(config_path, overrides)
            _peak_reset()
            start = time.perf_counter()
            result = train(config, out / f"train_{route}_{amp}")
            seconds = time.perf_counter() - start
            row = {"route": route, "amp": amp, "steps": result.steps, "seconds": round(seconds, 1),
                   "steps_per_s": round(result.steps / seconds, 2), "peak_gpu_gb": _peak_gb(),
                   "best_val_dice": round(result.best_dice, 4),
                   "per_class": {k: round(v, 4) for k, v in result.best_per_class.items()}}
            record(row)


def predict_runs(routes: list[str], data: Path, out: Path, device: str, limit: int | None,
                 record: Callable[[dict], None]) -> None:
    """The bf16-trained checkpoints of ``routes`` on ``imagesTs``, with and without ``--amp``."""
    from seg_transfer.inference.batch import PredictRequest, run_predict
    from seg_transfer.inference.predictor import PredictOptions

    for route in routes:
        checkpoint = out / f"train_{route}_bf16" / "checkpoints" / "best.pt"
        for amp in (True, False):
            _peak_reset()
            options = PredictOptions(batch_size=32, amp=amp, progress=False)
            cases = sorted((data / "imagesTs").glob("*.nii.gz"))[:limit]
            listing = out / "predict_cases.txt"
            listing.write_text("".join(f"{case}\n" for case in cases))
            request = PredictRequest((str(checkpoint),), str(listing), out / f"predict_{route}_{amp}",
                                     device=device, options=options, overwrite=True)
            report = run_predict(request)
            row = {"route": route, "amp": amp, "cases": report.count("ok"), "failed": len(report.failed),
                   "seconds": round(report.wall_seconds, 2),
                   "cases_per_s": round(report.count("ok") / report.wall_seconds, 1), "peak_gpu_gb": _peak_gb()}
            record(row)


def large_runs(out: Path, device: str, depths: list[int], record: Callable[[dict], None]) -> None:
    """Synthetic 512x512xZ volumes through the 3D network's sliding window (random weights)."""
    from predict_3d import random_checkpoint, synthetic_volume

    from seg_transfer.inference.batch import PredictRequest, run_predict
    from seg_transfer.inference.predictor import PredictOptions

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = random_checkpoint(folder / "random_3d.pt", (128, 128, 64))
        for depth in depths:
            volume = synthetic_volume(folder / f"synthetic_{depth}.nii", (512, 512, depth))
            for batch_size in (1, 4):
                _peak_reset()
                options = PredictOptions(batch_size=batch_size, amp=True, overlap=0.25, progress=False)
                report = run_predict(PredictRequest((str(checkpoint),), str(volume), out / f"large_{depth}_{batch_size}",
                                                    device=device, options=options, overwrite=True))
                row = {"shape": [512, 512, depth], "window": [128, 128, 64], "overlap": 0.25,
                       "windows_per_forward": batch_size, "ok": report.count("ok") == 1,
                       "seconds": round(report.wall_seconds, 1), "peak_gpu_gb": _peak_gb()}
                record(row)
            volume.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MSD Task04_Hippocampus folder")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--parts", default="train,predict,large")
    parser.add_argument("--workers", type=int, default=4, help="data.num_workers for training")
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra training override (trials)")
    parser.add_argument("--limit", type=int, default=None, help="predict only the first N test cases (trials)")
    parser.add_argument("--routes", default="2.5d,3d", help="routes to train and predict with")
    parser.add_argument("--amps", default="bf16,off", help="training.amp values to train with (bf16 first: predict uses it)")
    parser.add_argument("--depths", type=int, nargs="+", default=[300, 600])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark checks the GPU paths")
    parts = args.parts.split(",")
    unknown = set(args.routes.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown route(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    configs = {route: CONFIGS[route] for route in args.routes.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    on_cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    report = {"device": torch.cuda.get_device_name(0) if on_cuda else "cpu", "torch": torch.__version__,
              "bf16_supported": on_cuda and torch.cuda.is_bf16_supported()}
    print(json.dumps(report), flush=True)

    def recorder(part: str) -> Callable[[dict], None]:
        def record(row: dict) -> None:  # printed and saved at once: a run cut short keeps what it measured
            print(json.dumps(row), flush=True)
            report.setdefault(part, []).append(row)
            write_atomic(args.out / "gpu.json", json.dumps(report, indent=2) + "\n")
        return record

    data = args.data.resolve()
    if "train" in parts:
        train_runs(configs, data, args.out, args.workers, args.device, args.extra, args.amps.split(","),
                   recorder("train"))
    if "predict" in parts:
        predict_runs(list(configs), data, args.out, args.device, args.limit, recorder("predict"))
    if "large" in parts:
        large_runs(args.out, args.device, args.depths, recorder("large"))

if __name__ == "__main__":
    main()
