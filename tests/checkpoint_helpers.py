"""A tiny seeded random checkpoint saved as the trainer saves it (for export and inference plumbing tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from seg_transfer.config import config_from_dict, dump_config
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.models.factory import build_model
from seg_transfer.checkpoint import Checkpoint
from tests.conftest import tiny_config

LABELS = {0: "background", 1: "head", 2: "tail"}


def save_random_checkpoint(data_root: Path, run_dir: Path) -> Path:
    """``run_dir`` whose ``checkpoints/best.pt`` holds a seeded random tiny U-Net (3 channels in, 3 classes).

    Config from :func:`tests.conftest.tiny_config` (random encoder, decoder 32..8); training is not
    needed where only the plumbing around the network is tested.
    """
    config = config_from_dict(tiny_config(data_root))
    torch.manual_seed(0)
    model, _ = build_model(config.model, config.data.in_channels, len(LABELS), load_pretrained=False)
    Checkpoint(config=dump_config(config), labels=LABELS, preprocessing=Preprocessing.from_config(config.data).as_dict(),
               weights_provenance={"source": "none"}, model=model.eval().state_dict(), progress={}
               ).save(run_dir / "checkpoints" / "best.pt")
    return run_dir
