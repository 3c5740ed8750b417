"""Channels-last memory format on the CPU (or a GPU): training and `predict` time with and without it, one run, one ratio.

For each route's shipped Hippocampus config (2.5D and 3D), the same short training (one ``all`` stage of
``--steps`` optimiser steps from the ImageNet weights, ``--train-cases`` training and ``--val-cases`` validation
cases, one thread) runs with ``training.channels_last: off`` and ``on``, alternating, ``--repeats`` times each;
then the last run's checkpoint predicts ``--predict-cases`` of ``imagesTs`` (the route's own inferer, no TTA) with
its network in each memory format, alternating. Prints the fastest seconds of each, their ratio, and the largest
difference between the two formats' validation Dice (the same arithmetic in another order: equal to float noise).

    python benchmarks/memory_format.py [--data ../shared/data/Task04_Hippocampus] [--routes 2.5d 3d]
        [--steps 12] [--repeats 2] [--train-cases 10] [--val-cases 2] [--predict-cases 6] [--threads 1] [--device cpu]

With ``--device cuda`` training runs with ``training.device=cuda`` and the config's ``amp: auto`` (bf16 where
supported); ``predict`` runs in float32 on the GPU. The first run of each route also pays CUDA's start-up and
cuDNN's autotuner, hence the fastest of the repeats.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from seg_transfer.config import load_config
from seg_transfer.data.cases import cases_from_msd
from seg_transfer.inference.cases import InputCase
from seg_transfer.inference.predictor import PredictOptions, load_model, predict_case
from seg_transfer.routes.precision import lay_out_weights, memory_format_for
from seg_transfer.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"2.5d": ROOT / "configs" / "hippocampus_2p5d_effnet_lite0.yaml", "3d": ROOT / "configs" / "hippocampus_3d_effnet_lite0.yaml"}
FORMATS = ("off", "on")


def short_run(route: str, data: Path, steps: int, threads: int, channels_last: str, device: str = "cpu"):
    """The route's shipped config cut to one ``all`` stage of ``steps`` steps, with ``channels_last`` set."""
    stage = "[{name: all, train: all, epochs: 1, lr: 1.0e-3}]"
    config = load_config(CONFIGS[route], [f"data.root={data}", f"training.num_threads={threads}", f"training.stages={stage}",
                                          f"training.channels_last={channels_last}", "data.cache=memory",
                                          f"training.device={device}"])
    epoch = steps * config.training.batch_size  # one epoch of exactly `steps` steps
    return config.model_copy(update={"data": config.data.model_copy(update={"slices_per_epoch": epoch})})


def time_training(route: str, data: Path, cases: list[str], val: list[str], args, work: Path) -> tuple[dict, Path]:
    """``{format: [seconds, ...]}`` and ``{format: [best val Dice, ...]}`` of alternating runs; the last run's folder."""
    seconds, dice, last = {f: [] for f in FORMATS}, {f: [] for f in FORMATS}, None
    for repeat in range(args.repeats):
        for setting in FORMATS:
            run_dir = work / f"{route}_{setting}_{repeat}"
            run_dir.mkdir(parents=True)
            (run_dir / "splits.json").write_text(json.dumps({"train": cases, "val": val, "test": []}))
            result = train(short_run(route, args.data, args.steps, args.threads, setting, args.device), run_dir)
            seconds[setting].append(result.seconds)
            dice[setting].append(result.best_dice)
            last = run_dir
    return {"seconds": seconds, "dice": dice}, last


def time_prediction(run_dir: Path, images: list[Path], repeats: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds to predict ``images`` with the run's best checkpoint in each memory format, alternating."""
    loaded = load_model(str(run_dir), torch.device(device))
    ndim = loaded.network.route.spatial_dims + 2
    options = PredictOptions(tta=False, progress=False)
    seconds = {f: [] for f in FORMATS}
    for _ in range(repeats):
        for setting in FORMATS:
            lay_out_weights(loaded.model, memory_format_for(setting == "on", ndim))
            start = time.perf_counter()
            for image in images:
                predict_case(loaded, InputCase(image.name.removesuffix(".nii.gz"), image, (image,)), options)
            seconds[setting].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "Task04_Hippocampus")
    parser.add_argument("--routes", nargs="+", default=["2.5d", "3d"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-cases", type=int, default=10)
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--predict-cases", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    args.data = args.data.resolve()
    torch.set_num_threads(args.threads)
    names = sorted(case.name for case in cases_from_msd(args.data)[0])
    cases, val = names[:args.train_cases], names[args.train_cases:args.train_cases + args.val_cases]
    images = sorted((args.data / "imagesTs").glob("*.nii.gz"))[:args.predict_cases]
    print(f"channels_last on {args.device}: {args.steps} training steps, {len(cases)} training / {len(val)} validation cases, "
          f"{len(images)} imagesTs predicted, {args.threads} thread(s), fastest of {args.repeats} alternating repeats")
    print("| route | what | contiguous (s) | channels_last (s) | speed-up | largest val Dice difference |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for route in args.routes:
            training, last = time_training(route, args.data, cases, val, args, Path(tmp))
            off, on = min(training["seconds"]["off"]), min(training["seconds"]["on"])
            gap = max(abs(a - b) for a in training["dice"]["off"] for b in training["dice"]["on"])
            print(f"| {route} | training ({args.steps} steps + validation) | {off:.1f} | {on:.1f} | {off / on:.2f}x | {gap:.4f} |",
                  flush=True)
            predicting = time_prediction(last, images, args.repeats, args.device)
            off, on = min(predicting["off"]), min(predicting["on"])
            print(f"| {route} | predict {len(images)} cases | {off:.1f} | {on:.1f} | {off / on:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()
