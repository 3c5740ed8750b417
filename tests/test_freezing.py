"""Freeze API: frozen weights and BatchNorm statistics stay put, unfrozen ones move."""
from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from seg_transfer.config import EncoderFraction, EncoderTop, ModelConfig, StageConfig
from seg_transfer.models.factory import _create, build_model
from seg_transfer.models.freezing import (
    apply_trainable,
    describe_spec,
    encoder_stages,
    set_train_mode,
    trainable_encoder_params,
)
from seg_transfer.training.optim import build_optimizer, lr_factor, parameter_groups, pretrained_anchors


def _model(encoder="tu-tf_efficientnet_lite0", depth=5):
    config = ModelConfig(encoder=encoder, encoder_weights="none", encoder_depth=depth, decoder_channels=[32, 16, 16, 8, 8][:depth])
    model, _ = build_model(config, 3, 3)
    return model, encoder_stages(model.encoder, 3)


def _steps(model, stages, spec, frozen_bn="eval", n=3):
    torch.manual_seed(0)
    apply_trainable(model, stages, spec)
    optimizer = build_optimizer(model, stages, StageConfig(lr=1e-2))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(n):
        set_train_mode(model, frozen_bn)
        image, label = torch.randn(4, 3, 32, 32) * 3 + 1, torch.randint(0, 3, (4, 1, 32, 32))
        optimizer.zero_grad()
        loss_fn(model(image), label).backward()
        optimizer.step()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("encoder", ["tu-tf_efficientnet_lite0", "resnet18"])
def test_stages_cover_every_encoder_parameter_once_shallow_to_deep(encoder):
    model, stages = _model(encoder)
    names = [n for stage in stages for n in stage]
    assert sorted(names) == sorted(n for n, _ in model.encoder.named_parameters())
    assert len(names) == len(set(names)) and len(stages) == 5  # strides 2, 4, 8, 16, 32


@pytest.mark.parametrize("encoder", ["tu-tf_efficientnet_lite0", "resnet18"])
def test_a_shallow_network_drops_the_encoder_layers_its_decoder_does_not_read(encoder):
    """encoder_depth 3 reads strides 2-8: the deeper layers (run by timm, kept by smp) are dropped, the network
    computes what the whole one computes, every encoder parameter left reaches the loss, and `encoder_top: 1`
    opens the stride-8 layers."""
    model, stages = _model(encoder, depth=3)
    config = ModelConfig(encoder=encoder, encoder_weights="none", encoder_depth=3, decoder_channels=[32, 16, 16])
    whole = _create(config, 3, 3, encoder_weights=None)  # the network as smp builds it, nothing dropped
    missing, unexpected = whole.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("encoder.") for k in missing)
    dropped = sum(p.numel() for p in whole.encoder.parameters()) - sum(p.numel() for p in model.encoder.parameters())
    assert dropped > 1e6
    image = torch.randn(2, 3, 32, 32)
    model.eval(), whole.eval()
    with torch.no_grad():
        assert torch.equal(model(image), whole(image))
    assert len(stages) == 3
    model.train()
    model(image).sum().backward()
    assert {n for stage in stages for n in stage} == {n for n, p in model.encoder.named_parameters()} == {
        n for n, p in model.encoder.named_parameters() if p.grad is not None}
    model.zero_grad()
    before = _snapshot(model.encoder)
    _steps(model, stages, 1)
    after = model.encoder.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k]) and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed and changed <= set(stages[-1])


def test_decoder_stage_keeps_encoder_weights_and_bn_statistics():
    model, stages = _model()
    before_encoder, before_decoder = _snapshot(model.encoder), _snapshot(model.decoder)
    _steps(model, stages, "decoder")
    after = model.encoder.state_dict()
    for key, value in before_encoder.items():
        assert torch.equal(value, after[key]), f"frozen {key} changed"
    assert any(not torch.equal(v, model.decoder.state_dict()[k]) for k, v in before_decoder.items())


def test_encoder_top_trains_only_the_deepest_stages():
    model, stages = _model()
    before = _snapshot(model.encoder)
    _steps(model, stages, 2)
    after = model.encoder.state_dict()
    deep = {n for stage in stages[-2:] for n in stage}
    shallow = {n for stage in stages[:-2] for n in stage}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed & deep
    assert not changed & shallow
    # BatchNorm running statistics of frozen stages untouched, of trained stages updated
    shallow_bn = {k for k in before if k.endswith("running_mean") and k.replace("running_mean", "weight") in shallow}
    deep_bn = {k for k in before if k.endswith("running_mean") and k.replace("running_mean", "weight") in deep}
    assert shallow_bn and not changed & shallow_bn
    assert deep_bn <= changed


def test_frozen_bn_train_mode_lets_statistics_adapt():
    model, stages = _model()
    before = _snapshot(model.encoder)
    _steps(model, stages, "decoder", frozen_bn="train")
    after = model.encoder.state_dict()
    stats = [k for k in before if k.endswith("running_mean")]
    assert all(not torch.equal(before[k], after[k]) for k in stats)
    weights = [k for k in before if k.endswith("weight")]
    assert all(torch.equal(before[k], after[k]) for k in weights)


def test_all_trains_everything():
    model, stages = _model()
    assert trainable_encoder_params(stages, "all") == {n for n, _ in model.encoder.named_parameters()}
    with pytest.raises(ValueError, match="6"):
        trainable_encoder_params(stages, 6)


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_parameter_share_trains_the_deepest_whole_layers_reaching_the_share(fraction):
    model, stages = _model()
    before = _snapshot(model.encoder)
    _steps(model, stages, EncoderFraction(encoder_fraction=fraction))
    after = model.encoder.state_dict()
    sizes = dict((n, p.numel()) for n, p in model.encoder.named_parameters())
    moved = {n for n in sizes if not torch.equal(before[n], after[n])}
    order = [n for stage in stages for n in stage]  # shallow to deep
    share = sum(sizes[n] for n in moved) / sum(sizes.values())
    assert share >= fraction and moved == set(order[len(order) - len(moved):])  # a suffix: the deepest layers
    first_moved = order[len(order) - len(moved)]
    last_layer_added = {n for n in moved if n.rsplit(".", 1)[0] == first_moved.rsplit(".", 1)[0]}
    assert share - sum(sizes[n] for n in last_layer_added) / sum(sizes.values()) < fraction  # no layer more than needed
    assert 0 < len(moved) < len(order)
    top1 = trainable_encoder_params(stages, EncoderTop(encoder_top=1))
    assert (moved < top1) if fraction < 0.5 else True  # finer than the top stage (79% of Lite0's encoder)


def test_a_stage_config_takes_a_parameter_share():
    stage = StageConfig.model_validate({"train": {"encoder_fraction": 0.3}, "epochs": 2})
    assert stage.train == EncoderFraction(encoder_fraction=0.3)
    assert describe_spec(stage.train) == "deepest 30% of encoder parameters + decoder"
    with pytest.raises(ValueError, match="encoder_fraction"):
        StageConfig.model_validate({"train": {"encoder_fraction": 1.5}})


def test_layer_decay_and_encoder_multiplier():
    model, stages = _model()
    apply_trainable(model, stages, "all")
    groups = parameter_groups(model, stages, StageConfig(lr=1.0, encoder_lr_mult=0.5, layer_decay=0.5, weight_decay=0.1))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["decoder.blocks.0.conv1.0.weight"])] == 1.0
    assert lr_of[id(params["encoder." + stages[-1][0]])] == 0.5
    assert lr_of[id(params["encoder." + stages[0][0]])] == pytest.approx(0.5 * 0.5**4)
    assert wd_of[id(params["encoder." + stages[0][0]])] == 0.1  # conv kernel
    bias = next(n for n, p in params.items() if p.ndim == 1)
    assert wd_of[id(params[bias])] == 0.0


def test_pretrained_decay_pulls_encoder_weights_toward_their_anchors_by_lr_times_decay():
    """Decoupled L2-SP: with zero gradients AdamW moves nothing, so one step leaves exactly
    w - lr_group * pretrained_decay * (w - w0) on anchored weights (kernels included: no decay toward 0 for
    them), and the decoder (no anchor) only its ordinary weight decay."""
    model, stages = _model()
    apply_trainable(model, stages, "all")
    anchors = {name: value + 0.0 for name, value in pretrained_anchors(model, True).items()}
    assert pretrained_anchors(model, False) == {} and all(name.startswith("encoder.") for name in anchors)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stage = StageConfig(lr=0.1, encoder_lr_mult=0.5, layer_decay=None, weight_decay=0.2, pretrained_decay=2.0)
    optimizer = build_optimizer(model, stages, stage, anchors)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    params = dict(model.named_parameters())
    kernel = "encoder." + stages[0][0]
    assert params[kernel].ndim == 4
    expected = before[kernel] - 0.1 * 0.5 * 2.0 * (before[kernel] - anchors[kernel])  # 0.1 of the way back
    torch.testing.assert_close(params[kernel], expected)
    decoder = "decoder.blocks.0.conv1.0.weight"
    torch.testing.assert_close(params[decoder], before[decoder] * (1 - 0.1 * 0.2))  # AdamW's decay toward 0
    off = build_optimizer(model, stages, StageConfig(lr=0.1, weight_decay=0.2), anchors)  # pretrained_decay 0: plain AdamW
    assert {g["weight_decay"] for g in off.param_groups} == {0.0, 0.2} and not off._optimizer_step_post_hooks


def test_warmup_then_cosine():
    assert lr_factor(0, warmup=4, total=20, schedule="cosine") == pytest.approx(0.2)
    assert lr_factor(3, warmup=4, total=20, schedule="cosine") == pytest.approx(0.8)
    assert lr_factor(4, warmup=4, total=20, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(12, warmup=4, total=20, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(20, warmup=4, total=20, schedule="cosine") == pytest.approx(0.0)
    assert lr_factor(15, warmup=4, total=20, schedule="constant") == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_schedules_run_their_whole_length(schedule):
    from seg_transfer.training.optim import build_scheduler

    model, stages = _model()
    apply_trainable(model, stages, "all")
    stage = StageConfig(lr=1e-2, epochs=2, warmup_epochs=0.5, schedule=schedule)
    optimizer = build_optimizer(model, stages, stage)
    scheduler = build_scheduler(optimizer, stage, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert max(lrs) <= 1e-2 + 1e-12
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1e-2)
    else:
        assert lrs[-1] < 1e-3 and lrs[-1] < max(lrs)
