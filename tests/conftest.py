"""Shared fixtures: a tiny phantom dataset and tiny run configs (random encoder, 32 px slices)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from seg_transfer.data.phantoms import make_phantom_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Six labelled 32x32x12 phantoms (+1 test image) in MSD layout."""
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_train=6, n_test=1, shape=(32, 32, 12), seed=3)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards: matches each DDP rank's numerics, and keeps
    reduced-precision CPU kernels from stalling on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(root: Path, **overrides) -> dict:
    """A run config as plain data that trains in seconds on CPU."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "data": {
            "root": str(root),
            "modality": "mri",
            "slice_axis": 2,
            "context_slices": 1,
            "slices_per_epoch": 24,
            "split": {"val_fraction": 0.34, "seed": 0},
            "augment": {"enabled": True},
        },
        "model": {"arch": "Unet", "encoder": "tu-tf_efficientnet_lite0", "encoder_weights": "none",
                  "decoder_channels": [32, 16, 16, 8, 8]},
        "training": {
            "batch_size": 8,
            "val_batch_size": 16,
            "stages": [
                {"name": "decoder", "train": "decoder", "epochs": 1, "lr": 3e-3},
                {"name": "top", "train": {"encoder_top": 2}, "epochs": 1, "lr": 1e-3, "encoder_lr_mult": 0.5},
                {"name": "all", "train": "all", "epochs": 1, "lr": 1e-3, "layer_decay": 0.8},
            ],
        },
    }
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return raw


def optimiser_steps(config) -> int:
    """Steps a run config takes: every stage's epochs x slices per epoch / batch."""
    return sum(stage.epochs for stage in config.training.stages) * config.data.slices_per_epoch // config.training.batch_size
