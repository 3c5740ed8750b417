"""Speed switches: what ``auto`` becomes on CPU and CUDA, YAML on/off, and AMP train steps on CPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from seg_transfer.config import ConfigError, ModelConfig, TrainingConfig, config_from_dict, load_config
from seg_transfer.models.factory import build_model
from seg_transfer.routes import get_route
from seg_transfer.training.speed import (
    FULL_PRECISION,
    SpeedSettings,
    apply_backend_flags,
    grad_scaler,
    process_settings_restored,
    resolve_amp,
    resolve_speed,
)
from seg_transfer.training.trainer import train, train_step
from tests.conftest import tiny_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
SLAB, VOLUME = get_route("2.5d"), get_route("3d")


def _training(**switches) -> TrainingConfig:
    return TrainingConfig(stages=[{"train": "all"}], **switches)


def test_auto_on_cpu_is_float32_eager_and_channels_last():
    """Channels last trains 1.1-1.2x faster on the CPU for both routes (benchmarks/memory_format.py); the rest stays
    off there."""
    for route in (SLAB, VOLUME):
        assert resolve_speed(_training(), CPU, route) == SpeedSettings(channels_last=True)
        assert resolve_speed(_training(channels_last="off"), CPU, route) == FULL_PRECISION


def test_auto_on_cuda_is_bf16_where_supported_else_fp16_with_scaler():
    modern = resolve_speed(_training(), CUDA, VOLUME, cuda_bf16_supported=True)
    assert modern == SpeedSettings(amp_dtype=torch.bfloat16, channels_last=False, compile=False,
                                   cudnn_benchmark=True, pin_memory=True)
    assert not modern.needs_grad_scaler
    older = resolve_speed(_training(), CUDA, SLAB, cuda_bf16_supported=False)
    assert older.amp_dtype == torch.float16 and older.needs_grad_scaler


def test_forced_switches_win_over_the_device():
    assert resolve_amp("bf16", CPU) == torch.bfloat16
    assert resolve_amp("fp16", CPU) == torch.float16
    assert resolve_amp("off", CUDA, cuda_bf16_supported=True) is None
    forced = resolve_speed(_training(channels_last="on", cudnn_benchmark="off", pin_memory="off", compile=True), CPU, SLAB)
    assert forced.channels_last and forced.compile and not forced.cudnn_benchmark and not forced.pin_memory
    on_cuda = resolve_speed(_training(channels_last="off", amp="off"), CUDA, VOLUME, cuda_bf16_supported=True)
    assert not on_cuda.channels_last and on_cuda.amp_dtype is None and on_cuda.cudnn_benchmark
    assert resolve_speed(_training(channels_last="on"), CUDA, VOLUME, True).channels_last
    assert not resolve_speed(_training(channels_last="off"), CPU, SLAB).channels_last


def test_cudnn_benchmark_auto_follows_the_routes_input_shapes():
    """Measured on an H100 (README, "On one GPU"): the autotuner cost the 2.5D route, whose validation slices
    change shape from case to case, about 70 s of a 141 s run; 3D patches and windows have one shape."""
    assert VOLUME.fixed_input_shapes and not SLAB.fixed_input_shapes
    varying = resolve_speed(_training(), CUDA, SLAB, cuda_bf16_supported=True)
    assert not varying.cudnn_benchmark and varying.channels_last and varying.amp_dtype == torch.bfloat16
    assert resolve_speed(_training(cudnn_benchmark="on"), CUDA, SLAB, True).cudnn_benchmark
    assert resolve_speed(_training(), CUDA, VOLUME, True).cudnn_benchmark
    assert not resolve_speed(_training(), CPU, VOLUME).cudnn_benchmark


def test_channels_last_auto_follows_the_route_measured_devices():
    """benchmarks/memory_format.py: channels last trained faster on the CPU for both routes and on an H200 for the
    2.5D route only (3D 0.94x there); ``on``/``off`` win on any device, ``auto`` is off on devices not measured."""
    from seg_transfer.routes.precision import resolve_switch

    for device, slab_on, volume_on in ((CPU, True, True), (CUDA, True, False)):
        for route, expected in ((SLAB, slab_on), (VOLUME, volume_on)):
            assert resolve_speed(_training(), device, route, True).channels_last == expected, (route.name, device)
    assert "cuda" in SLAB.predict_channels_last and "cuda" not in VOLUME.predict_channels_last
    mps = torch.device("mps")
    assert not resolve_switch("auto", mps, ("cuda", "cpu")) and resolve_switch("on", mps, ()) and not resolve_switch("off", CPU, ("cpu",))


def test_grad_scaler_only_for_fp16():
    assert grad_scaler(SpeedSettings(amp_dtype=torch.bfloat16), CPU) is None
    assert isinstance(grad_scaler(SpeedSettings(amp_dtype=torch.float16), CPU), torch.amp.GradScaler)


def test_yaml_on_off_are_switch_names(phantom_root, tmp_path):
    raw = tiny_config(phantom_root)
    text = yaml.safe_dump(raw).replace("training:\n", "training:\n  amp: off\n  channels_last: on\n  pin_memory: off\n")
    (tmp_path / "c.yaml").write_text(text)
    training = load_config(tmp_path / "c.yaml").training
    assert (training.amp, training.channels_last, training.pin_memory, training.cudnn_benchmark) == ("off", "on", "off", "auto")
    with pytest.raises(ConfigError, match="training.amp"):
        config_from_dict(raw, ["training.amp=on"])  # amp names its dtype: auto, bf16, fp16 or off


def _tiny_model():
    """The tests' tiny U-Net (random encoder, 3 input channels, 3 classes)."""
    return build_model(ModelConfig(**tiny_config(Path("unused"))["model"]), 3, 3)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_train_step_on_cpu_runs_in_reduced_precision(dtype, one_thread):
    torch.manual_seed(0)
    model = _tiny_model().train()
    seen = []
    model.decoder.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.randint(0, 3, (4, 1, 32, 32))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = SpeedSettings(amp_dtype=dtype, channels_last=True)
    loss = train_step(model, loss_fn, optimizer, batch, CPU, grad_clip=1.0, settings=settings, scaler=grad_scaler(settings, CPU))
    assert math.isfinite(loss) and loss > 0
    assert seen == [dtype]  # the forward really ran under autocast
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("decoder.") for k in changed) and any(k.startswith("encoder.") for k in changed)


def test_bf16_channels_last_run_on_cpu_trains_and_validates(phantom_root, tmp_path, one_thread):
    raw = tiny_config(phantom_root, **{"data.slices_per_epoch": 8})
    raw["training"].update(amp="bf16", channels_last="on", stages=[{"train": "all", "epochs": 1}])
    result = train(config_from_dict(raw), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert math.isfinite(record["train_loss"]) and 0.0 <= result.best_dice <= 1.0
    assert set(result.best_per_class) == {"anterior", "posterior"}


def test_cudnn_benchmark_set_for_a_cuda_run_is_put_back_afterwards():
    """Seen on an H200: a ``predict`` after ``train`` in one process inherited ``cudnn.benchmark`` and
    re-tuned kernels for every new slice shape. Setting the flag needs no GPU, so this runs anywhere."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with process_settings_restored():
            apply_backend_flags(SpeedSettings(cudnn_benchmark=True), CUDA)
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_train_leaves_the_process_thread_count_as_it_found_it(phantom_root, tmp_path, one_thread):
    raw = tiny_config(phantom_root, **{"data.slices_per_epoch": 8})
    raw["training"].update(num_threads=2, stages=[{"train": "all", "epochs": 1}])
    train(config_from_dict(raw), tmp_path / "run")
    assert torch.get_num_threads() == 1
