"""The 3D route end to end on tiny phantoms: staged training, resume, predict geometry, the scratch control."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from seg_transfer.checkpoint import Checkpoint
from seg_transfer.cli import main
from seg_transfer.config import config_from_dict
from seg_transfer.training.trainer import train
from tests.conftest import tiny_config
from tests.test_training import _equal_states, _train_until_epoch


def tiny_3d(root: Path, **overrides) -> dict:
    """A 3D run that trains in seconds: lite0 inflated (random init), 3 encoder stages, 16^3 patches."""
    return tiny_config(root, **{"model.dims": "3d", "model.encoder_depth": 3, "model.decoder_channels": [16, 8, 8],
                                "data.patch_size": [16, 16, 16], "data.slices_per_epoch": 4,
                                "data.augment.flip_axes": [0, 1, 2], "training.batch_size": 2,
                                "training.val_batch_size": 2, **overrides})


@pytest.fixture(scope="module")
def run_3d(phantom_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run3d") / "run"
    train(config_from_dict(tiny_3d(phantom_root)), run_dir)
    return run_dir


def test_staged_3d_training_writes_a_3d_checkpoint_and_trains_what_each_stage_says(run_3d, phantom_root):
    best = Checkpoint.load(run_3d / "checkpoints" / "last.pt")
    assert best.route == "3d" and best.route_settings == {"patch_size": [16, 16, 16]}
    assert best.config["model"]["dims"] == "3d"
    conv = [k for k, v in best.model.items() if k.startswith("encoder.") and v.ndim == 5]
    assert conv, "the encoder's convolutions are 3D"
    assert best.progress["step"] == 3 * 2  # 3 stages x (4 patches / batch 2)


def test_decoder_stage_of_3d_leaves_the_inflated_encoder_untouched(phantom_root, tmp_path):
    from seg_transfer.routes import get_route

    raw = tiny_3d(phantom_root)
    raw["training"]["stages"] = [{"name": "decoder", "train": "decoder", "epochs": 1, "lr": 3e-3}]
    config = config_from_dict(raw)
    torch.manual_seed(config.seed)
    initial = get_route("3d").build_network(config.model, 1, 3, True)[0].state_dict()
    train(config, tmp_path / "run")
    trained = Checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt").model
    encoder = [k for k in initial if k.startswith("encoder.") and not k.endswith("num_batches_tracked")]
    decoder = [k for k in initial if k.startswith("decoder.") and k.endswith("weight")]
    assert encoder and decoder
    moved = [k for k in encoder if not torch.equal(initial[k], trained[k])]
    # frozen_bn: eval (the schema default): weights and running statistics stay exactly as built
    assert moved == []
    assert all(not torch.equal(initial[k], trained[k]) for k in decoder)


def test_3d_resume_continues_to_the_same_result(phantom_root, tmp_path):
    raw = tiny_3d(phantom_root)
    raw["training"]["stages"] = [{"name": "decoder", "train": "decoder", "epochs": 1, "lr": 3e-3},
                                 {"name": "all", "train": "all", "epochs": 2, "lr": 1e-3}]
    config = config_from_dict(raw)
    straight = train(config, tmp_path / "straight")
    _train_until_epoch(config, tmp_path / "interrupted", 2)
    resumed = train(config, tmp_path / "interrupted", resume=True)
    a = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = Checkpoint.load(tmp_path / "interrupted" / "checkpoints" / "last.pt")
    assert _equal_states(a.model, b.model)
    assert resumed.best_dice == pytest.approx(straight.best_dice, abs=1e-7)


def test_3d_predict_writes_label_maps_on_the_input_grid(run_3d, phantom_root, tmp_path):
    source = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    out = tmp_path / "out"
    assert main(["predict", "-m", str(run_3d), "-i", str(source), "-o", str(out), "--device", "cpu", "--tta"]) == 0
    written = nib.load(out / "phantom_000.nii.gz")
    original = nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}


def test_a_2p5d_and_a_3d_model_ensemble_on_the_input_grid(run_3d, phantom_root, tmp_path):
    """Members of different routes and preprocessing (the 2.5D one resampled to 0.8 mm in-plane) are averaged
    after each is mapped back to the input grid."""
    from seg_transfer.inference.cases import discover_cases
    from seg_transfer.inference.predictor import PredictOptions, load_model, predict_case

    raw = tiny_config(phantom_root, **{"data.spacing": [0.8, 0.8, 1.5]})
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 1, "lr": 3e-3}]
    run_2p5d = tmp_path / "run2p5d"
    train(config_from_dict(raw), run_2p5d)
    source = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    case, options = discover_cases(source)[0], PredictOptions(tta=True, save_probabilities=True, progress=False)
    members = [predict_case(load_model(str(run), torch.device("cpu")), case, options) for run in (run_2p5d, run_3d)]
    out = tmp_path / "out"
    assert main(["predict", "-m", str(run_2p5d), "-m", str(run_3d), "-i", str(source), "-o", str(out), "--device", "cpu",
                 "--save-probabilities", "--tta"]) == 0
    mean = (members[0].probabilities + members[1].probabilities) / 2
    written = nib.load(out / "phantom_000_probabilities.nii.gz")
    assert written.shape == (*nib.load(source).shape, 3)
    np.testing.assert_allclose(np.moveaxis(np.asarray(written.dataobj), -1, 0), mean, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "phantom_000.nii.gz").dataobj), mean.argmax(0))


def test_3d_scratch_control_keeps_the_route_and_drops_weights_and_stages(phantom_root):
    from seg_transfer.study.arms import scratch_control

    pretrained = config_from_dict(tiny_3d(phantom_root, **{"model.encoder_weights": "imagenet"}))
    control = config_from_dict(scratch_control(pretrained.model_dump(mode="json")))
    assert control.model.dims == "3d" and control.model.inflation == pretrained.model.inflation
    assert control.model.encoder_weights == "none" and control.data.patch_size == (16, 16, 16)
    assert [s.train for s in control.training.stages] == ["all"] and control.training.stages[0].epochs == 3


def test_deep_supervision_trains_the_auxiliary_heads_and_predict_reads_the_full_resolution_head(phantom_root, tmp_path):
    raw = tiny_3d(phantom_root, **{"model.deep_supervision": True})
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 2, "lr": 3e-3}]
    config = config_from_dict(raw)
    _train_until_epoch(config, tmp_path / "one_epoch", 1)
    train(config, tmp_path / "run")
    first = Checkpoint.load(tmp_path / "one_epoch" / "checkpoints" / "last.pt")
    last = Checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    aux = {k: v for k, v in last.model.items() if k.startswith("aux_heads.")}
    assert sorted(aux) == ["aux_heads.0.bias", "aux_heads.0.weight", "aux_heads.1.bias", "aux_heads.1.weight"]
    assert aux["aux_heads.0.weight"].shape == (3, 8, 1, 1, 1) and aux["aux_heads.1.weight"].shape == (3, 16, 1, 1, 1)
    for key in aux:  # the second epoch moved every auxiliary head: their losses reach the optimiser
        assert not torch.equal(first.model[key], aux[key]), key

    source = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    assert main(["predict", "-m", str(tmp_path / "run"), "-i", str(source), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert nib.load(tmp_path / "out" / "phantom_000.nii.gz").shape == nib.load(source).shape
