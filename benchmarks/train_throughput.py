"""Training throughput: the project's training loop against a bare PyTorch loop, one run, one ratio.

Both loops train the same model (EfficientNet-Lite0 U-Net, random init) with the same loss, optimiser,
batch size and slices. The project loop goes through everything `seg-transfer train` uses per step:
SliceDataset (2.5D slab extraction, padding), DataLoader with MONAI's pad collate, freeze-aware train
mode, `train_step`, the LR scheduler. The bare loop iterates over the same batches pre-built as
tensors. Augmentation is off in both (it is work, not overhead). Repeats alternate between the two.
A third loop runs the bare loop on the same batches as MONAI MetaTensors, the type MONAI's pad collate
returns when a batch's slabs differ in size (the project's collate now returns plain tensors): what that
type costs per step.

    python benchmarks/train_throughput.py [--data PHANTOMS|MSD_ROOT] [--steps 20] [--repeats 3]

Prints slices/s for each and ``overhead = project_time / bare_time`` (goal <= 1.10), and the MetaTensor /
plain time ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss

from seg_transfer.config import config_from_dict
from seg_transfer.data.phantoms import make_phantom_dataset
from seg_transfer.data.pipeline import prepare_data, slice_loader, volume_dataset
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.models.factory import build_model, encoder_output_stride
from seg_transfer.models.freezing import apply_trainable, encoder_stages, set_train_mode
from seg_transfer.training.optim import build_optimizer, build_scheduler
from seg_transfer.training.trainer import train_step


def build(data_root: Path, batch_size: int, run_dir: Path):
    raw = {
        "data": {"root": str(data_root), "slices_per_epoch": None, "augment": {"enabled": False}},
        "model": {"encoder": "tu-tf_efficientnet_lite0", "encoder_weights": "none", "decoder_channels": [128, 64, 32, 16, 16]},
        "training": {"batch_size": batch_size, "stages": [{"train": "all", "epochs": 1, "lr": 1e-3}]},
    }
    config = config_from_dict(raw, source="benchmark")
    data = prepare_data(config.data, run_dir)
    volumes = volume_dataset(data.subset("train"), Preprocessing.from_config(config.data), config.data)
    model, _ = build_model(config.model, config.data.in_channels, len(data.labels))
    dataset, loader = slice_loader(volumes, config.data, batch_size, encoder_output_stride(model), train=True)
    return config, model, dataset, loader


def project_loop(config, model, dataset, loader, steps: int) -> float:
    stages = encoder_stages(model.encoder, config.data.in_channels)
    apply_trainable(model, stages, "all")
    stage = config.training.stages[0]
    optimizer = build_optimizer(model, stages, stage)
    dataset.set_epoch(0, 0, None, None)
    scheduler = build_scheduler(optimizer, stage, len(loader))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    set_train_mode(model, config.model.frozen_bn)
    start = time.perf_counter()
    for index, batch in enumerate(loader):
        if index == steps:
            break
        train_step(model, loss_fn, optimizer, batch, torch.device("cpu"), None)
        scheduler.step()
    return time.perf_counter() - start


def bare_loop(model, batches, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    start = time.perf_counter()
    for image, label in batches[:steps]:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(image), label).backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="MSD-layout dataset (default: generated phantoms)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_phantom_dataset(Path(tmp) / "phantoms", n_train=24, n_test=0)
        config, model, dataset, loader = build(root, args.batch_size, Path(tmp) / "run")
        dataset.set_epoch(0, 0, None, None)
        batches = [(b["image"], b["label"]) for _, b in zip(range(args.steps), loader)]
        steps = len(batches)
        project_loop(config, model, dataset, loader, 2)  # warm-up (allocator, oneDNN kernels)
        bare_loop(model, batches, 2)
        meta_batches = [(MetaTensor(image), MetaTensor(label)) for image, label in batches]
        project, bare, meta = [], [], []
        for _ in range(args.repeats):
            project.append(project_loop(config, model, dataset, loader, steps))
            bare.append(bare_loop(model, batches, steps))
            meta.append(bare_loop(model, meta_batches, steps))
    slices = steps * args.batch_size
    best_project, best_bare = min(project), min(bare)
    print(f"data: {root if args.data else 'phantoms (24 cases, 48x48x32)'}; batch {args.batch_size}; {steps} steps x {args.repeats} repeats; {args.threads} threads")
    print(f"project loop: {slices / best_project:8.1f} slices/s  (best of {args.repeats}: {best_project:.2f} s)")
    print(f"bare PyTorch: {slices / best_bare:8.1f} slices/s  (best of {args.repeats}: {best_bare:.2f} s)")
    print(f"overhead (project / bare time): {best_project / best_bare:.3f}x  (goal <= 1.10)")
    print(f"MetaTensor batches: {slices / min(meta):8.1f} slices/s  (MetaTensor / plain time {min(meta) / best_bare:.3f}x)")


if __name__ == "__main__":
    main()
