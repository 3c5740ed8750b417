"""Self-supervised restoration pretraining (``seg-transfer pretrain``): corruptions, unlabelled scans, the
pretraining loop and the reuse of its encoder by fine-tuning."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seg_transfer.cli import main
from seg_transfer.config import RestorationConfig, config_from_dict
from seg_transfer.data.cases import DatasetError, cases_from_msd
from seg_transfer.data.corruption import SlabCorruption
from seg_transfer.data.phantoms import make_phantom_dataset
from seg_transfer.data.pipeline import unlabelled_scans
from seg_transfer.models.factory import build_model
from seg_transfer.training.restoration import pretrain, split_scans
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def unlabelled_root(tmp_path_factory) -> Path:
    """Four labelled and five unlabelled (imagesTs) 32x32x12 phantoms."""
    return make_phantom_dataset(tmp_path_factory.mktemp("restore"), n_train=4, n_test=5, shape=(32, 32, 12), seed=5)


def _config(root: Path, **pretraining):
    raw = tiny_config(root)
    raw["pretraining"] = {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, **pretraining}
    return config_from_dict(raw)


def _slab(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, 48, 64)).astype(np.float32)


# ----------------------------------------------------------------------------- corruptions


def test_corruption_is_fixed_by_its_seed_and_leaves_the_input_alone():
    corruption, slab = SlabCorruption(RestorationConfig()), _slab()
    kept = slab.copy()
    first, again, other = corruption(slab, 11), corruption(slab, 11), corruption(slab, 12)
    assert np.array_equal(slab, kept)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32 and first.shape == slab.shape


def test_no_corruption_when_every_probability_is_zero():
    corruption = SlabCorruption(RestorationConfig(intensity_prob=0, shuffle_prob=0, paint_prob=0))
    assert np.array_equal(corruption(_slab(), 3), _slab())


def test_outpainting_changes_more_of_the_slab_than_inpainting():
    """Out-painting keeps a few boxes and paints the rest; in-painting paints only inside its boxes."""
    only_paint = dict(intensity_prob=0, shuffle_prob=0, paint_prob=1)
    out = SlabCorruption(RestorationConfig(**only_paint, outpaint_share=1.0))
    inside = SlabCorruption(RestorationConfig(**only_paint, outpaint_share=0.0))
    slab = _slab()
    out_changed = np.mean([(out(slab, s) != slab).mean() for s in range(10)])
    in_changed = np.mean([(inside(slab, s) != slab).mean() for s in range(10)])
    assert 0.0 < in_changed < 0.5 < out_changed < 1.0


def test_held_out_scans_are_a_seeded_share_with_one_left_to_train(unlabelled_root):
    scans = unlabelled_scans(config_from_dict(tiny_config(unlabelled_root)).data)
    train, held = split_scans(scans, 0.4, seed=0)
    assert len(held) == 2 and len(train) == 3 and not {c.name for c in train} & {c.name for c in held}
    assert split_scans(scans, 0.4, seed=0) == (train, held)
    assert len(split_scans(scans[:2], 0.9, seed=0)[0]) == 1


# ----------------------------------------------------------------------------- unlabelled scans


def test_default_scans_are_the_msd_test_images(unlabelled_root):
    scans = unlabelled_scans(config_from_dict(tiny_config(unlabelled_root)).data)
    assert [c.image for c in scans] == [c.image for c in cases_from_msd(unlabelled_root)[1]]
    assert len(scans) == 5 and all(c.label is None for c in scans)


def test_scans_from_folders_refuse_one_name_twice(unlabelled_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(unlabelled_root / "imagesTs", copy)
    data = config_from_dict(tiny_config(unlabelled_root)).data
    assert len(unlabelled_scans(data, [copy])) == 5
    with pytest.raises(DatasetError, match="more than one folder"):
        unlabelled_scans(data, [unlabelled_root / "imagesTs", copy])


# ----------------------------------------------------------------------------- pretraining and reuse


@pytest.fixture(scope="module")
def pretrained(unlabelled_root, tmp_path_factory):
    """One pretraining run on one thread; the thread count is restored after it (later tests compare numerics
    across processes and must run on the count they expect)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = _config(unlabelled_root, val_fraction=0.4)
        return pretrain(config, unlabelled_scans(config.data), tmp_path_factory.mktemp("pretrained"))
    finally:
        torch.set_num_threads(threads)


def test_pretraining_learns_to_restore_held_out_scans(pretrained):
    summary = pretrained.summary
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert len(summary["held_out_scans"]) == 2 and summary["scans"] == 3
    assert after["network_mse"] < 0.5 * before["network_mse"]
    assert summary["loss_curve"][-1]["step"] == 40 and summary["loss_curve"][-1]["loss"] < summary["loss_curve"][0]["loss"]
    written = json.loads((pretrained.weights.parent / "pretraining.json").read_text())
    assert written["weights_sha256"] == summary["weights_sha256"]


def test_fine_tuning_reads_the_pretrained_encoder(pretrained, unlabelled_root):
    saved = torch.load(pretrained.weights, weights_only=True)["state_dict"]
    config = config_from_dict({**tiny_config(unlabelled_root),
                               "model": {**tiny_config(unlabelled_root)["model"], "encoder_weights": str(pretrained.weights)}})
    model, provenance = build_model(config.model, 3, 3)
    assert provenance.source == "file" and provenance.path == str(pretrained.weights)
    encoder = model.encoder.state_dict()
    compared = [key for key in encoder if f"encoder.{key}" in saved]
    assert len(compared) == len(encoder)
    assert all(torch.equal(encoder[key], saved[f"encoder.{key}"]) for key in compared)
    fresh = build_model(config_from_dict(tiny_config(unlabelled_root)).model, 3, 3)[0].encoder.state_dict()
    assert any(not torch.equal(fresh[key], encoder[key]) for key in compared if encoder[key].is_floating_point())


def test_labelled_cases_among_the_scans_are_warned_about(unlabelled_root, tmp_path, caplog):
    config = _config(unlabelled_root, steps=1, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="seg_transfer.training.restoration"):
        pretrain(config, unlabelled_scans(config.data, [unlabelled_root / "imagesTr"]), tmp_path)
    assert "4 pretraining scan(s) are labelled cases" in caplog.text


def test_a_bad_scan_is_left_out_with_its_file_named(unlabelled_root, tmp_path, caplog):
    folder = tmp_path / "scans"
    shutil.copytree(unlabelled_root / "imagesTs", folder)
    (folder / "junk_0000.nii.gz").write_bytes(b"not a volume")
    config = _config(unlabelled_root, steps=1, val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="seg_transfer.training.restoration"):
        result = pretrain(config, unlabelled_scans(config.data, [folder]), tmp_path / "out")
    assert "1 unlabelled scan(s) left out" in caplog.text and "junk_0000.nii.gz" in caplog.text
    assert result.summary["scans"] == 5


def test_too_few_usable_scans_is_a_one_line_error(unlabelled_root, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    first = sorted((unlabelled_root / "imagesTs").iterdir())[0]
    shutil.copy(first, folder / first.name)
    (folder / "junk_0000.nii.gz").write_bytes(b"not a volume")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(unlabelled_root)))
    assert main(["pretrain", "--config", str(path), "--images", str(folder), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "1 usable scan(s)" in err


def test_pretrain_cli_refuses_the_3d_route_in_one_line(unlabelled_root, tmp_path, capsys):
    raw = tiny_config(unlabelled_root)
    raw["model"]["dims"] = "3d"
    path = tmp_path / "run3d.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["pretrain", "--config", str(path), "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "2.5D route only" in err
    assert not (tmp_path / "out" / "pretrained.pt").exists()
