"""Prediction throughput: `seg-transfer predict` end to end against the model's forward time alone,
against a naive one-slice-at-a-time loop, and peak memory on a big synthetic scan. Ratios from one run.

    python benchmarks/predict_throughput.py [--model RUN_OR_CKPT] [--data IMAGES_DIR] [--device auto]
                                            [--batch-size 32] [--limit N] [--rss [--rss-shape 512 512 300]]

* end to end: read → preprocess → infer → invert → write (+ summary) for every image of ``--data``
  (default: the 130 ``imagesTs`` of ../shared/data/Task04_Hippocampus), batched slices;
* forward only: the same model on the same slabs (pre-built, untimed), forward + softmax only;
* naive: the same pipeline feeding one slice per forward pass (``--batch-size 1``).

Prints ``end_to_end / forward`` (goal <= 1.3) and ``naive / end_to_end`` (goal >= 3). Without
``--model`` a randomly initialised model with the hippocampus config's architecture is used (timing
does not depend on the weights). ``--rss`` predicts a synthetic volume (default 512x512x300, 3 classes)
in a child process and prints its peak RSS (goal < 3 GB).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from seg_transfer.config import dump_config, load_config
from seg_transfer.data.slices import context_indices, pad_to_multiple
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.inference.batch import PredictRequest, run_predict
from seg_transfer.inference.cases import discover_cases
from seg_transfer.inference.predictor import LoadedModel, PredictOptions, load_model, preprocess, resolve_device
from seg_transfer.models.factory import build_model
from seg_transfer.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "Task04_Hippocampus" / "imagesTs"
CONFIG = ROOT / "configs" / "hippocampus_2p5d_effnet_lite0.yaml"
LABELS = {0: "background", 1: "anterior", 2: "posterior"}


def random_checkpoint(folder: Path) -> Path:
    """A checkpoint of the hippocampus architecture with random weights (no download, no training)."""
    config = load_config(CONFIG, ["model.encoder_weights=none", f"data.root={DEFAULT_DATA.parent}"])
    torch.manual_seed(0)
    model, _ = build_model(config.model, config.data.in_channels, len(LABELS), load_pretrained=False)
    checkpoint = Checkpoint(config=dump_config(config), labels=LABELS, preprocessing=Preprocessing.from_config(config.data).as_dict(),
                            weights_provenance={"source": "none"}, model=model.state_dict(), progress={})
    return checkpoint.save(folder / "random.pt")


def slab_batches(loaded: LoadedModel, cases, batch_size: int) -> list[torch.Tensor]:
    """Every case's preprocessed slabs, batched as `predict` batches them (built before timing)."""
    prep, batches = loaded.prep, []
    for case in cases:
        array = preprocess(loaded, case).as_tensor().numpy()[0]
        stack = np.moveaxis(array, prep.slice_axis, 0)
        depth = stack.shape[0]
        slabs = torch.from_numpy(np.ascontiguousarray(pad_to_multiple(stack, loaded.network.multiple[0], float(stack.min()))))
        for start in range(0, depth, batch_size):
            idx = np.stack([context_indices(i, depth, prep.context_slices) for i in range(start, min(start + batch_size, depth))])
            batches.append(slabs[torch.from_numpy(idx)].to(loaded.device))
    return batches


@torch.no_grad()
def forward_seconds(loaded: LoadedModel, batches: list[torch.Tensor]) -> float:
    """Model forward + softmax over pre-built batches only."""
    torch.softmax(loaded.model(batches[0]), 1)  # warm-up
    _sync(loaded.device)
    start = time.perf_counter()
    for batch in batches:
        torch.softmax(loaded.model(batch).float(), 1)
    _sync(loaded.device)
    return time.perf_counter() - start


def end_to_end_seconds(checkpoint: Path, data: str, device: str, batch_size: int, out: Path) -> float:
    """Wall time of the whole `predict` pipeline (read → preprocess → infer → invert → write)."""
    options = PredictOptions(batch_size=batch_size, progress=False)
    start = time.perf_counter()
    report = run_predict(PredictRequest((str(checkpoint),), data, out, device=device, options=options, overwrite=True))
    seconds = time.perf_counter() - start
    if report.failed:
        raise SystemExit(f"{len(report.failed)} case(s) failed, e.g. {report.failed[0].case}: {report.failed[0].reason}")
    return seconds


def peak_rss_gb(checkpoint: Path, shape: tuple[int, int, int], device: str, batch_size: int, work: Path) -> float:
    """Peak RSS (GB) of a child `seg-transfer predict` on a synthetic float32 volume of ``shape``."""
    rng = np.random.default_rng(0)
    volume = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    path = work / "big.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 1.5, 1.0])), path)
    del volume
    command = [sys.executable, "-m", "seg_transfer", "predict", "-m", str(checkpoint), "-i", str(path),
               "-o", str(work / "big_out"), "--device", device, "--batch-size", str(batch_size), "--overwrite"]
    subprocess.run(command, check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint or run folder (default: random weights)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, help="only the first N cases (also for the naive loop)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS on a big synthetic volume")
    parser.add_argument("--rss-shape", type=int, nargs=3, default=(512, 512, 300))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = args.model or random_checkpoint(work)
        data = args.data
        if args.limit:
            listing = work / "cases.txt"
            listing.write_text("\n".join(str(c.source) for c in discover_cases(args.data)[: args.limit]))
            data = str(listing)
        cases = discover_cases(data)
        device = str(resolve_device(args.device))
        loaded = load_model(str(checkpoint), torch.device(device))
        slices = sum(preprocess(loaded, c).shape[1 + loaded.prep.slice_axis] for c in cases)
        print(f"{len(cases)} cases, {slices} slices, device {device}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

        forward = forward_seconds(loaded, slab_batches(loaded, cases, args.batch_size))
        pipeline = end_to_end_seconds(checkpoint, data, device, args.batch_size, work / "out")
        print(f"forward only:  {forward:8.2f} s  ({slices / forward:8.1f} slices/s)")
        print(f"end to end:    {pipeline:8.2f} s  ({slices / pipeline:8.1f} slices/s, {len(cases) / pipeline:.2f} cases/s)")
        print(f"end_to_end / forward = {pipeline / forward:.2f}  (goal <= 1.3)")
        if not args.skip_naive:
            naive = end_to_end_seconds(checkpoint, data, device, 1, work / "naive")
            print(f"naive (1 slice per forward): {naive:8.2f} s")
            print(f"naive / end_to_end = {naive / pipeline:.2f}  (goal >= 3)")
        if args.rss:
            shape = tuple(args.rss_shape)
            print(f"peak RSS predicting {'x'.join(map(str, shape))} (3 classes): "
                  f"{peak_rss_gb(checkpoint, shape, device, args.batch_size, work):.2f} GB  (goal < 3)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
