"""Where a 3D training step's time goes: encoder forward against decoder + head, per decoder variant, one run.

Builds the 3D network of a run config (ImageNet weights, the config's inflation and geometry) and times, on
random patches of the default 40x56x36 shape, batch 2 (the shipped 3D config):
- a full training step (forward, Dice + CE over every supervised output, backward, SGD step), all trainable;
- the encoder's forward alone (no gradients): what a frozen encoder or the feature cache saves per step;
- the decoder + head alone on fixed encoder features (forward, backward, step): what remains with a cache.
Variants are decoder channel lists (``--decoders 64,32,16 64,32,8``), each with and without deep supervision
when ``--deep-supervision`` is given. The first variant is the reference of the ``vs first`` column.

    python benchmarks/step_profile_3d.py [--config configs/hippocampus_3d_effnet_lite0.yaml]
        [--decoders 64,32,16 64,32,8] [--deep-supervision] [--steps 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from seg_transfer.config import LossConfig, ModelConfig
from seg_transfer.models.unet3d import build_unet3d
from seg_transfer.training.loss import build_loss
from seg_transfer.training.trainer import train_step

CPU = torch.device("cpu")


def model_config(path: Path, channels: list[int], deep_supervision: bool) -> ModelConfig:
    raw = yaml.safe_load(path.read_text())["model"]
    return ModelConfig(**{**raw, "decoder_channels": channels, "deep_supervision": deep_supervision})


def seconds_per_call(fn, steps: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitives)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def profile(config: ModelConfig, patch: tuple[int, int, int], batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model, _ = build_unet3d(config, classes=3)
    model.train()
    image = torch.randn(batch, 1, *patch)
    label = torch.randint(0, 3, (batch, 1, *patch))
    loss_fn = build_loss(LossConfig(batch_dice=True), config.supervised_outputs, CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    full = seconds_per_call(lambda: train_step(model, loss_fn, optimizer, {"image": image, "label": label}, CPU, None),
                            steps)
    with torch.no_grad():
        encoder = seconds_per_call(lambda: model.encoder(image), steps)
        features = [f.detach() for f in model.encoder(image)[1:]]

    def decoder_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model.decode(features), label).backward()
        optimizer.step()

    decoder = seconds_per_call(decoder_step, steps)
    return {"full": full, "encoder": encoder, "decoder": decoder,
            "params": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/hippocampus_3d_effnet_lite0.yaml"))
    parser.add_argument("--decoders", nargs="+", default=["64,32,16", "64,32,8"])
    parser.add_argument("--deep-supervision", action="store_true", help="also time each variant with deep supervision")
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 56, 36])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [(list(map(int, d.split(","))), ds) for d in args.decoders
                for ds in ((False, True) if args.deep_supervision else (False,))]
    print(f"3D step profile: {args.config.name}, patch {'x'.join(map(str, args.patch))}, batch {args.batch}, "
          f"{args.threads} thread(s), mean of {args.steps} steps")
    print("| decoder channels | deep supervision | params (M) | full step (s) | encoder forward (s) | "
          "decoder + head step (s) | decoder share | vs first |")
    print("|---|---|---|---|---|---|---|---|")
    reference = None
    for channels, ds in variants:
        result = profile(model_config(args.config, channels, ds), tuple(args.patch), args.batch, args.steps)
        reference = reference or result["full"]
        print(f"| {channels} | {'yes' if ds else 'no'} | {result['params']:.2f} | {result['full']:.2f} | "
              f"{result['encoder']:.2f} | {result['decoder']:.2f} | {result['decoder'] / result['full']:.0%} | "
              f"{result['full'] / reference:.2f}x |")


if __name__ == "__main__":
    main()
