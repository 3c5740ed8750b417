"""SyncBatchNorm conversion keeps what each BatchNorm layer computes (activation included), on CPU.

torch's and timm's converters turn the 3D route's ``BatchNormAct3d`` (a ``BatchNorm3d`` subclass that
applies ``drop`` and ``act`` after normalising) into a plain ``nn.SyncBatchNorm``, which never calls
``act``: every encoder activation of the inflated network would vanish under
``training.sync_batchnorm``. These tests build the converted modules without a process group: there
SyncBatchNorm normalises with the local batch (train mode) or the running statistics (eval mode),
exactly as BatchNorm does, so the converted network must reproduce the original bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct
from torch import nn

from seg_transfer.config import config_from_dict
from seg_transfer.models.factory import build_model
from seg_transfer.models.inflate import BatchNormAct3d
from seg_transfer.routes import get_route
from seg_transfer.training import distributed
from seg_transfer.training.distributed import DistributedContext, sync_batchnorm_layers
from tests.conftest import tiny_config
from tests.test_route_3d import tiny_3d


def _randomise_statistics(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics, so copying them (or not) shows in the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.num_batches_tracked.fill_(7)


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_batchnormact3d_becomes_sync_batchnorm_act_with_its_activation_weights_and_statistics():
    layer = BatchNormAct3d(6, eps=1e-3, momentum=0.05, act=nn.SiLU(), drop=nn.Dropout(0.3))
    _randomise_statistics(layer)
    layer.eval()
    x = torch.randn(2, 6, 5, 4, 3, generator=torch.Generator().manual_seed(1))
    expected = layer(x)

    synced = sync_batchnorm_layers(layer)

    assert type(synced) is SyncBatchNormAct
    assert synced.act is layer.act and isinstance(synced.act, nn.SiLU)
    assert synced.drop is layer.drop
    assert (synced.num_features, synced.eps, synced.momentum) == (6, 1e-3, 0.05)
    assert synced.affine and synced.track_running_stats and not synced.training
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(synced, key) is getattr(layer, key), f"{key} is the original tensor"
    assert list(synced.state_dict()) == list(layer.state_dict())
    assert torch.equal(synced(x), expected)
    # the check is sensitive to a dropped activation: normalising alone gives something else
    plain = nn.BatchNorm3d(6, eps=1e-3).eval()
    plain.load_state_dict(layer.state_dict())
    assert not torch.allclose(plain(x), expected, atol=1e-3)


def test_inflated_3d_network_converts_every_norm_act_layer_and_predicts_the_same(phantom_root):
    config = config_from_dict(tiny_3d(phantom_root))
    torch.manual_seed(0)
    model, _ = get_route("3d").build_network(config.model, 1, 3, False)
    _randomise_statistics(model)
    original = copy.deepcopy(model)
    before = {name: type(m) for name, m in _batchnorms(model)}
    assert BatchNormAct3d in before.values(), "the 3D U-Net uses BatchNormAct3d (the case the fix is about)"

    synced = sync_batchnorm_layers(model)

    after = {name: type(m) for name, m in _batchnorms(synced)}
    assert after.keys() == before.keys()
    for name, cls in before.items():
        want = SyncBatchNormAct if cls in (BatchNormAct3d, BatchNormAct2d) else nn.SyncBatchNorm
        assert after[name] is want, f"{name}: {cls.__name__} became {after[name].__name__}"
        if want is SyncBatchNormAct:
            assert type(synced.get_submodule(name).act) is type(original.get_submodule(name).act)
    reference = original.state_dict()
    state = synced.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)

    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(synced.eval()(x), original.eval()(x))
        # train mode without a process group: batch statistics and running-statistic updates as BatchNorm
        synced.train(), original.train()
        assert torch.allclose(synced(x), original(x), atol=1e-6, rtol=0)
    for name, module in _batchnorms(original):
        converted = synced.get_submodule(name)
        assert torch.allclose(converted.running_mean, module.running_mean, atol=1e-7)
        assert torch.equal(converted.num_batches_tracked, module.num_batches_tracked)


def test_2p5d_network_keeps_timm_batchnormact2d_activations(phantom_root):
    model, _ = build_model(config_from_dict(tiny_config(phantom_root)).model, 3, 3, load_pretrained=False)
    _randomise_statistics(model)
    model.eval()
    original = copy.deepcopy(model)
    synced = sync_batchnorm_layers(model)
    assert any(isinstance(m, BatchNormAct2d) for m in original.modules())
    assert not any(type(m) in (BatchNormAct2d, nn.BatchNorm2d) for m in synced.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(synced(x), original(x))


def test_distributed_cuda_context_converts_without_touching_a_gpu(phantom_root):
    """``convert_sync_batchnorm`` only looks at the context's device type; building needs neither CUDA nor a group."""
    model, _ = get_route("3d").build_network(config_from_dict(tiny_3d(phantom_root)).model, 1, 3, False)
    context = DistributedContext(rank=0, world_size=2, device=torch.device("cuda", 0))
    synced = distributed.convert_sync_batchnorm(model, context)
    kinds = {type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {SyncBatchNormAct}


class _PlainSubclass(nn.BatchNorm3d):
    pass


class _ScaledNorm(nn.BatchNorm3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_subclasses_convert_only_when_nothing_would_be_lost():
    assert type(sync_batchnorm_layers(nn.Sequential(_PlainSubclass(4)))[0]) is nn.SyncBatchNorm
    with pytest.raises(TypeError, match="_ScaledNorm to SyncBatchNorm: it overrides forward"):
        sync_batchnorm_layers(nn.Sequential(nn.Conv3d(1, 4, 1), _ScaledNorm(4)))
