"""The typed checkpoint, the route registry, 3D patches and the 3D sliding-window inferer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from seg_transfer.checkpoint import FORMAT, Checkpoint, CheckpointError
from seg_transfer.config import AugmentConfig, DataConfig, config_from_dict, dump_config
from seg_transfer.data.patches import PatchDataset, median_patch_size
from seg_transfer.data.slices import cycled_order
from seg_transfer.routes import get_route, route_names
from seg_transfer.routes.base import InferenceOptions, trained_mirrorings
from seg_transfer.routes.network import load_network
from seg_transfer.routes.volume import SlidingWindowInferer3d
from tests.checkpoint_helpers import save_random_checkpoint
from tests.conftest import tiny_config

# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip_keeps_route_settings_and_integer_labels(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    saved = Checkpoint(config={"a": 1}, labels={0: "bg", 1: "organ"}, preprocessing={"p": 1}, weights_provenance={},
                       model=state, progress={"epoch": 3}, route="3d", route_settings={"patch_size": [48, 64, 48]})
    saved.save(tmp_path / "c.pt")
    loaded = Checkpoint.load(tmp_path / "c.pt")
    assert loaded.route == "3d" and loaded.route_settings == {"patch_size": [48, 64, 48]}
    assert loaded.labels == {0: "bg", 1: "organ"} and loaded.progress == {"epoch": 3}
    assert torch.equal(loaded.model["w"], state["w"]) and loaded.optimizer is None
    assert torch.load(tmp_path / "c.pt", weights_only=True)["format"] == FORMAT


def test_format_1_checkpoints_migrate_to_the_2p5d_route(tmp_path, phantom_root):
    run = save_random_checkpoint(phantom_root, tmp_path / "run")
    current = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    legacy = {k: v for k, v in current.items() if k not in ("route", "route_settings", "optimizer", "scheduler", "rng",
                                                             "rng_by_rank", "grad_scaler")}
    legacy["format"] = "seg_transfer/1"
    torch.save(legacy, tmp_path / "old.pt")
    old = Checkpoint.load(tmp_path / "old.pt")
    assert old.route == "2.5d" and old.route_settings == {}
    network = load_network(tmp_path / "old.pt")
    assert network.route.name == "2.5d" and network.in_channels == 3


def test_incomplete_checkpoint_names_what_is_missing(tmp_path):
    torch.save({"format": FORMAT, "config": {}, "labels": {}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt: incomplete checkpoint \(missing preprocessing, weights_provenance, model, progress\)"):
        Checkpoint.load(tmp_path / "c.pt")


def test_weights_that_do_not_fit_the_stored_config_are_a_one_line_error(tmp_path, phantom_root):
    run = save_random_checkpoint(phantom_root, tmp_path / "run")
    checkpoint = Checkpoint.load(run)
    checkpoint.config["model"]["decoder_channels"] = [64, 16, 16, 8, 8]  # the weights are of [32, 16, 16, 8, 8]
    checkpoint.save(tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt: the weights do not fit the network its config describes: .*another shape"):
        load_network(tmp_path / "edited.pt")


def test_a_checkpoint_holding_unread_encoder_layers_loads_and_predicts_as_before(tmp_path, phantom_root):
    """Checkpoints of earlier versions hold the encoder layers an encoder_depth-3 network does not read (the
    network is now built without them): those tensors are left out, the prediction is unchanged."""
    from seg_transfer.models.factory import _create

    checkpoint = Checkpoint.load(save_random_checkpoint(phantom_root, tmp_path / "run"))
    checkpoint.config["model"].update(encoder_depth=3, decoder_channels=[32, 16, 16])
    stored = config_from_dict(checkpoint.config)
    torch.manual_seed(0)
    whole = _create(stored.model, 3, len(checkpoint.labels), encoder_weights=None).eval()
    checkpoint.model = whole.state_dict()
    checkpoint.save(tmp_path / "old.pt")
    network = load_network(tmp_path / "old.pt")
    assert len(network.model.state_dict()) < len(checkpoint.model)
    whole.to(memory_format=torch.channels_last)  # the loaded network's CPU layout: the same arithmetic, bit for bit
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(network.model(image), whole(image))


def test_a_loaded_network_is_channels_last_on_the_cpu_and_predicts_as_the_contiguous_one(tmp_path, phantom_root):
    """The 2.5D route predicts channels last on the CPU (README, "Channels last on the CPU"): another layout, the
    same probabilities to float rounding."""
    network = load_network(save_random_checkpoint(phantom_root, tmp_path / "run"))
    convs = [m.weight for m in network.model.modules() if isinstance(m, nn.Conv2d) and min(m.weight.shape[1:]) > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    contiguous = load_network(tmp_path / "run").model.to(memory_format=torch.contiguous_format)
    assert not any(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in contiguous.modules() if isinstance(m, nn.Conv2d) and min(m.weight.shape[1:]) > 1)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(network.model(image).softmax(1), contiguous(image).softmax(1), rtol=0, atol=1e-5)


def test_route_and_config_must_agree(tmp_path, phantom_root):
    run = save_random_checkpoint(phantom_root, tmp_path / "run")
    checkpoint = Checkpoint.load(run)
    checkpoint.route = "3d"
    checkpoint.save(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"route '3d' but its config says model.dims='2.5d'"):
        load_network(tmp_path / "c.pt")


def test_unknown_route_lists_the_valid_ones():
    assert route_names() == ["2.5d", "3d"]
    with pytest.raises(ValueError, match="valid: 2.5d, 3d"):
        get_route("4d")


# --------------------------------------------------------------------------- 3D patches


def _volume(shape=(20, 24, 16), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    label = np.zeros((1, *shape), dtype=np.int64)
    label[0, 4:8, 5:9, 3:6] = 1
    label[0, 12:15, 10:14, 9:12] = 2
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}


def test_median_patch_size_rounds_up_to_the_network_multiple_and_caps():
    assert median_patch_size([(36, 50, 35), (34, 52, 37), (40, 48, 30)], (16, 16, 16)) == (48, 64, 48)
    assert median_patch_size([(300, 300, 40)], (32, 32, 8), cap=160) == (160, 160, 40)


def test_cycled_order_is_whole_passes_of_the_pool():
    order = cycled_order(np.random.default_rng(0), 3, 8)
    assert len(order) == 8 and sorted(order[:3]) == [0, 1, 2] and sorted(order[3:6]) == [0, 1, 2]


def test_patch_epochs_are_exactly_sized_deterministic_and_foreground_centred():
    volumes = [_volume(seed=0), _volume((12, 30, 10), seed=1)]
    dataset = PatchDataset(volumes, (16, 16, 16), AugmentConfig(flip_axes=[0, 1, 2]))
    dataset.set_epoch(seed=5, epoch=2, size=7, foreground_fraction=1.0)
    first = [dataset[i] for i in range(len(dataset))]
    assert len(dataset) == 7
    assert all(s["image"].shape == (1, 16, 16, 16) and s["label"].dtype == torch.int64 for s in first)
    assert all(s["label"].max() > 0 for s in first)  # fraction 1.0: every patch holds foreground
    again = PatchDataset(volumes, (16, 16, 16), AugmentConfig(flip_axes=[0, 1, 2]))
    again.set_epoch(seed=5, epoch=2, size=7, foreground_fraction=1.0)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) for a, b in zip(first, (again[i] for i in range(7))))
    again.set_epoch(seed=6, epoch=2, size=7, foreground_fraction=1.0)
    assert not all(torch.equal(a["image"], again[i]["image"]) for i, a in enumerate(first))


def test_patches_of_a_volume_smaller_than_the_patch_are_padded_with_its_minimum():
    volume = _volume((12, 30, 10))
    dataset = PatchDataset([volume], (16, 32, 16), None)
    dataset.set_epoch(0, 0, 2, 0.0)
    sample = dataset[0]
    assert sample["image"].shape == (1, 16, 32, 16)
    assert float(sample["image"].min()) == pytest.approx(float(volume["image"].min()))
    assert int((sample["label"] > 0).sum()) == int((volume["label"] > 0).sum())  # the whole volume is inside


# --------------------------------------------------------------------------- 3D sliding window


class _Pointwise(nn.Module):
    """A 1x1x1 convolution: translation-equivariant, so sliding windows must reproduce one full forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_windows_and_mirror_tta_reproduce_a_full_forward():
    model = _Pointwise().eval()
    image = torch.randn(1, 40, 36, 28)
    expected = torch.softmax(model(image[None]), 1)[0]
    every_mirroring = trained_mirrorings(DataConfig.model_validate({"root": ".", "augment": {"enabled": True, "flip_axes": [0, 1, 2]}}))
    assert len(every_mirroring) == 8
    for mirrors in (((),), every_mirroring):  # a pointwise network is mirror-equivariant: TTA changes nothing
        inferer = SlidingWindowInferer3d((16, 16, 16), InferenceOptions(batch_size=3), classes=3, flips=mirrors)
        probs = inferer.probabilities(model, image, torch.device("cpu"))
        assert probs.shape == (3, 40, 36, 28)
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    labels = inferer.label_map(model, image, torch.device("cpu"))
    assert labels.dtype == torch.uint8 and torch.equal(labels, expected.argmax(0).to(torch.uint8))


def test_mirror_tta_flips_each_window_batch_and_stitches_one_probability_volume():
    """With one window covering the volume, per-window mirroring equals flipping the whole volume: the mean of the
    softmax of the network on the volume and, flipped back, on its mirror; a direction-sensitive network makes
    it differ from the plain prediction."""
    torch.manual_seed(1)
    model = nn.Conv3d(1, 3, 3, padding=1).eval()
    image = torch.randn(1, 16, 16, 16)
    inferer = SlidingWindowInferer3d((16, 16, 16), InferenceOptions(batch_size=1), classes=3, flips=((), (2,)))
    probs = inferer.probabilities(model, image, torch.device("cpu"))
    with torch.no_grad():
        plain = torch.softmax(model(image[None]), 1)[0]
        mirrored = torch.flip(torch.softmax(model(torch.flip(image[None], (2,))), 1), (2,))[0]
    torch.testing.assert_close(probs, (plain + mirrored) / 2, atol=1e-5, rtol=1e-5)
    assert (probs - plain).abs().max() > 1e-3


def test_chunked_argmax_gives_the_whole_volume_argmax_in_the_label_dtype():
    from seg_transfer.routes.base import argmax_labels

    probs = torch.softmax(torch.randn(3, 5, 4, 19), 0)  # 19 slices: chunks of 8, 8, 3
    labels = argmax_labels(probs)
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), probs.argmax(0))
    assert argmax_labels(torch.softmax(torch.randn(300, 2, 2, 3), 0)).dtype == torch.int16


def test_a_volume_smaller_than_the_window_is_padded_and_cropped_back():
    model = _Pointwise().eval()
    image = torch.randn(1, 10, 12, 9)
    inferer = SlidingWindowInferer3d((16, 16, 16), InferenceOptions(batch_size=1), classes=3)
    probs = inferer.probabilities(model, image, torch.device("cpu"))
    torch.testing.assert_close(probs, torch.softmax(model(image[None]), 1)[0], atol=1e-5, rtol=1e-5)


def test_three_d_config_validates_and_names_its_route(phantom_root):
    config = config_from_dict(tiny_config(phantom_root, **{"model.dims": "3d", "data.patch_size": [16, 16, 16]}))
    assert config.model.dims == "3d" and get_route(config.model.dims).spatial_dims == 3
    assert dump_config(config)["data"]["patch_size"] == [16, 16, 16]


def test_windows_per_forward_are_capped_by_voxels():
    big = SlidingWindowInferer3d((128, 128, 64), InferenceOptions(batch_size=32, max_batch_pixels=2**21), classes=3)
    assert big.windows_per_forward() == 2  # 2 x 1 M voxels
    small = SlidingWindowInferer3d((40, 56, 40), InferenceOptions(batch_size=4, max_batch_pixels=2**21), classes=3)
    assert small.windows_per_forward() == 4
    uncapped = SlidingWindowInferer3d((128, 128, 64), InferenceOptions(batch_size=32, max_batch_pixels=None), classes=3)
    assert uncapped.windows_per_forward() == 32
