"""Weight averaging (``training.ema``): the average's arithmetic, what best.pt keeps, and exact resume."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from seg_transfer.checkpoint import Checkpoint
from seg_transfer.config import WeightAverageConfig, config_from_dict
from seg_transfer.training.averaging import start_average, update_average
from seg_transfer.training.trainer import train
from tests.conftest import tiny_config
from tests.test_training import _equal_states, _train_until_epoch


def test_the_average_starts_at_the_first_steps_weights_then_decays():
    layer = torch.nn.Linear(2, 1)
    average = start_average(WeightAverageConfig(decay=0.5, warmup=False), layer)
    for step, value in ((1, 1.0), (2, 3.0), (3, 7.0)):
        layer.weight.data.fill_(value)
        update_average(average, layer, step)
    # step 1 copies (no initial weights kept); then 0.5 x average + 0.5 x weights: 1 -> 2 -> 4.5
    assert torch.allclose(average.module.weight, torch.full((1, 2), 4.5))
    warming = start_average(WeightAverageConfig(decay=0.99), layer)
    assert warming.get_decay(10) == pytest.approx(1 - 10 ** (-2 / 3)) and warming.get_decay(10**6) == 0.99
    assert start_average(None, layer) is None
    with pytest.raises(ValidationError):
        WeightAverageConfig(decay=1.0)


def _averaged_config(root):
    """One stage of two epochs validated only at its end, so the best checkpoint is the last epoch's."""
    raw = tiny_config(root, **{"training.ema": {"decay": 0.8}, "training.val_every": 100})
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 2, "lr": 1e-3}]
    return config_from_dict(raw)


def test_best_keeps_the_average_last_keeps_both_and_resume_continues_both_exactly(phantom_root, tmp_path):
    config = _averaged_config(phantom_root)
    straight = train(config, tmp_path / "straight")
    last = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    best = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "best.pt")
    assert straight.best_epoch == 2 and best.averaged_model is None
    assert _equal_states(best.model, last.averaged_model)  # validated and kept: the average
    kernel = "decoder.blocks.0.conv1.0.weight"
    assert not torch.equal(last.model[kernel], last.averaged_model[kernel])

    interrupted = tmp_path / "interrupted"
    _train_until_epoch(config, interrupted, 1)
    resumed = train(config, interrupted, resume=True)
    again = Checkpoint.load(interrupted / "checkpoints" / "last.pt")
    assert _equal_states(last.model, again.model) and _equal_states(last.averaged_model, again.averaged_model)
    assert resumed.best_dice == pytest.approx(straight.best_dice, abs=1e-7)


def test_resuming_a_last_pt_without_an_average_restarts_it_from_the_weights(phantom_root, tmp_path, caplog):
    config = _averaged_config(phantom_root)
    run_dir = tmp_path / "run"
    _train_until_epoch(config, run_dir, 1)
    path = run_dir / "checkpoints" / "last.pt"
    checkpoint = Checkpoint.load(path)
    checkpoint.averaged_model = None  # as written by a version before averaging
    checkpoint.save(path)
    result = train(config, run_dir, resume=True)
    assert result.epochs == 2 and "holds no weight average; it restarts from the resumed weights" in caplog.text
