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
from seg_transfer.config import ConfigError, ModelConfig, RestorationConfig, config_from_dict
from seg_transfer.data.cases import DatasetError, cases_from_msd
from seg_transfer.data.restoration import HELD_OUT_PATCHES_PER_SCAN, Corruption, RestorationPatches
from seg_transfer.data.phantoms import make_phantom_dataset
from seg_transfer.data.pipeline import unlabelled_scans
from seg_transfer.models.factory import build_model
from seg_transfer.models.unet3d import build_unet3d
from seg_transfer.models.weights import WeightsError
from seg_transfer.training.restoration import pretrain, split_scans
from seg_transfer.training.reuse import check_same_config
from seg_transfer.training.trainer import RunDirError
from tests.conftest import tiny_config
from tests.test_route_3d import tiny_3d


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
    corruption, slab = Corruption(RestorationConfig()), _slab()
    kept = slab.copy()
    first, again, other = corruption(slab, 11), corruption(slab, 11), corruption(slab, 12)
    assert np.array_equal(slab, kept)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32 and first.shape == slab.shape


def test_no_corruption_when_every_probability_is_zero():
    corruption = Corruption(RestorationConfig(intensity_prob=0, shuffle_prob=0, paint_prob=0))
    assert np.array_equal(corruption(_slab(), 3), _slab())


def test_outpainting_changes_more_of_the_slab_than_inpainting():
    """Out-painting keeps a few boxes and paints the rest; in-painting paints only inside its boxes."""
    only_paint = dict(intensity_prob=0, shuffle_prob=0, paint_prob=1)
    out = Corruption(RestorationConfig(**only_paint, outpaint_share=1.0))
    inside = Corruption(RestorationConfig(**only_paint, outpaint_share=0.0))
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


# ----------------------------------------------------------------------------- decoders and the 3D route


def _with_weights(raw: dict, weights: Path, **model) -> dict:
    return {**raw, "model": {**raw["model"], "encoder_weights": str(weights), **model}}


def _equal_parts(module: torch.nn.Module, saved: dict, prefix: str) -> bool:
    state = module.state_dict()
    return len(state) > 0 and all(torch.equal(value, saved[f"{prefix}{key}"]) for key, value in state.items())


def test_decoder_from_weights_loads_the_pretrained_decoder_exactly(pretrained, unlabelled_root):
    saved = torch.load(pretrained.weights, weights_only=True)["state_dict"]
    raw = tiny_config(unlabelled_root)
    with_decoder = build_model(config_from_dict(_with_weights(raw, pretrained.weights, decoder_from_weights=True)).model, 3, 3)[0]
    encoder_only = build_model(config_from_dict(_with_weights(raw, pretrained.weights)).model, 3, 3)[0]
    assert _equal_parts(with_decoder.decoder, saved, "decoder.") and _equal_parts(with_decoder.encoder, saved, "encoder.")
    assert not _equal_parts(encoder_only.decoder, saved, "decoder.")
    assert with_decoder.segmentation_head[0].weight.shape[0] == 3  # the head is the target task's (3 classes, not 3 channels)


def test_a_decoder_of_another_width_is_a_one_line_error(pretrained, unlabelled_root):
    raw = _with_weights(tiny_config(unlabelled_root), pretrained.weights, decoder_from_weights=True,
                        decoder_channels=[32, 16, 16, 8, 4])
    with pytest.raises(WeightsError, match="decoder does not fit this network's decoder: .*of another shape") as error:
        build_model(config_from_dict(raw).model, 3, 3)
    assert "\n" not in str(error.value) and str(pretrained.weights) in str(error.value)


def test_decoder_from_weights_needs_a_file():
    with pytest.raises(ValueError, match="decoder_from_weights needs encoder_weights to be a whole-network file"):
        ModelConfig(encoder_weights="imagenet", decoder_from_weights=True)


def test_the_pretraining_section_does_not_make_a_finished_run_another_run(unlabelled_root, tmp_path):
    """pretraining.* is read by `seg-transfer pretrain` only: a study must still reuse a run after it changes."""
    config = config_from_dict(tiny_config(unlabelled_root))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    check_same_config(config.model_copy(update={"pretraining": RestorationConfig(batch_size=4, steps=9)}), tmp_path)
    changed = config_from_dict(tiny_config(unlabelled_root, **{"model.frozen_bn": "train"}))
    with pytest.raises(RunDirError, match="model"):
        check_same_config(changed, tmp_path)


def test_patches_are_seeded_crops_of_the_patch_size_padded_where_the_volume_is_smaller():
    volumes = [{"image": np.random.default_rng(i).normal(size=(1, 20, 12, 9)).astype(np.float32)} for i in range(3)]
    corruption = Corruption(RestorationConfig())
    patches = RestorationPatches(volumes, (16, 16, 8), corruption, 7, seed=2)
    again = RestorationPatches(volumes, (16, 16, 8), corruption, 7, seed=2)
    assert len(patches) == 7 and sorted(np.bincount(patches.order)) == [2, 2, 3]
    first = patches[0]
    assert first["image"].shape == first["target"].shape == (1, 16, 16, 8)
    assert torch.equal(first["image"], again[0]["image"]) and not torch.equal(first["image"], first["target"])
    volume = volumes[int(patches.order[0])]["image"]
    assert float(first["target"].min()) == pytest.approx(float(volume.min()))  # the 12-voxel axis was padded with it
    assert len(RestorationPatches(volumes, (16, 16, 8), corruption, None, seed=2)) == 3 * HELD_OUT_PATCHES_PER_SCAN


@pytest.fixture(scope="module")
def pretrained_3d(unlabelled_root, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = tiny_3d(unlabelled_root)
        raw["pretraining"] = {"steps": 30, "lr": 3e-3, "warmup_steps": 2, "val_fraction": 0.4}
        config = config_from_dict(raw)
        return pretrain(config, unlabelled_scans(config.data), tmp_path_factory.mktemp("pretrained3d"))
    finally:
        torch.set_num_threads(threads)


def test_3d_pretraining_restores_patches_and_fine_tuning_reads_its_3d_network(pretrained_3d, unlabelled_root):
    summary = pretrained_3d.summary
    assert summary["route"] == "3d" and summary["batch_size"] == 2 and summary["samples"] == 60
    assert summary["held_out_after"]["network_mse"] < 0.5 * summary["held_out_before"]["network_mse"]
    saved = torch.load(pretrained_3d.weights, weights_only=True)["state_dict"]
    assert saved["segmentation_head.weight"].shape[:2] == (1, 8)  # one output: the restored patch
    config = config_from_dict(_with_weights(tiny_3d(unlabelled_root), pretrained_3d.weights, decoder_from_weights=True))
    network, provenance = build_unet3d(config.model, 3)
    assert provenance.source == "file" and provenance.sha256 == summary["weights_sha256"]
    assert _equal_parts(network.encoder, saved, "encoder.") and _equal_parts(network.decoder, saved, "decoder.")
    other_inflation = config.model.model_copy(update={"inflation": "acs"})
    with pytest.raises(WeightsError, match="3D encoder does not fit"):
        build_unet3d(other_inflation, 3)


# ----------------------------------------------------------------------------- continuing and reusing


def test_an_interrupted_pretraining_continues_to_the_uninterrupted_result(unlabelled_root, tmp_path, monkeypatch, one_thread):
    from seg_transfer.training import restoration

    config = _config(unlabelled_root, steps=20, batch_size=4, val_fraction=0.4)
    scans = unlabelled_scans(config.data)
    whole = pretrain(config, scans, tmp_path / "whole")
    monkeypatch.setattr(restoration, "STATE_EVERY", 5)
    real_step, calls = restoration.backward_and_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(restoration, "backward_and_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config, scans, tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / restoration.STATE_NAME, weights_only=True)["step"] == 10
    assert not (tmp_path / "cut" / "pretrained.pt").exists()
    monkeypatch.setattr(restoration, "backward_and_step", real_step)
    continued = pretrain(config, scans, tmp_path / "cut")
    assert continued.summary["weights_sha256"] == whole.summary["weights_sha256"]
    assert continued.summary["loss_curve"] == whole.summary["loss_curve"]
    assert continued.summary["held_out_after"] == whole.summary["held_out_after"]
    assert not (tmp_path / "cut" / restoration.STATE_NAME).exists()


def test_a_finished_pretraining_is_reused_and_other_settings_are_refused(unlabelled_root, tmp_path, one_thread):
    config = _config(unlabelled_root, steps=3, batch_size=4, val_fraction=0.0)
    scans = unlabelled_scans(config.data)
    first = pretrain(config, scans, tmp_path)
    written = first.weights.stat().st_mtime_ns
    again = pretrain(config, scans, tmp_path)
    assert again.summary == json.loads((tmp_path / "pretraining.json").read_text())
    assert first.weights.stat().st_mtime_ns == written
    with pytest.raises(ConfigError, match=r"\(differs in pretraining\); use a new --output folder"):
        pretrain(_config(unlabelled_root, steps=4, batch_size=4, val_fraction=0.0), scans, tmp_path)
