"""ONNX export: onnxruntime reproduces torch at other batch and spatial sizes, the JSON contract, the CLI;
the 3D route's windows, and its sliding-window inference through onnxruntime against ``predict``."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from seg_transfer.cli import main
from seg_transfer.inference.export import (
    CONTRACT_FORMAT,
    ExportError,
    contract_path_for,
    export_checkpoint,
    export_module,
    load_network,
)
from seg_transfer.routes.slicewise import predict_volume
from seg_transfer.checkpoint import Checkpoint
from tests.checkpoint_helpers import save_random_checkpoint
from tests.test_route_3d import tiny_3d

onnxruntime = pytest.importorskip("onnxruntime")

#: float32 conv nets through two runtimes: tiny models differ by ~1e-6, so 1e-4 leaves room but catches real errors
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def run_dir(phantom_root, tmp_path_factory) -> Path:
    """A seeded random tiny U-Net checkpoint (3 channels in, 3 classes, stride 32)."""
    return save_random_checkpoint(phantom_root, tmp_path_factory.mktemp("export_run") / "run")


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The run exported at a 64 px trace size."""
    return export_checkpoint(run_dir, tmp_path_factory.mktemp("export") / "model.onnx", size=64)


def _torch_logits(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).numpy()


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (5, 3, 96, 64)])
def test_onnxruntime_matches_torch_at_other_batch_and_spatial_sizes(run_dir, exported, shape):
    session = onnxruntime.InferenceSession(str(exported.model_path), providers=["CPUExecutionProvider"])
    inputs = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    (onnx_out,) = session.run(["logits"], {"input": inputs})
    torch_out = _torch_logits(load_network(run_dir).model, inputs)
    assert onnx_out.shape == (shape[0], 3, *shape[2:])
    assert np.max(np.abs(onnx_out - torch_out)) < TOLERANCE
    assert np.abs(torch_out).max() > 1e-2, "outputs must not be trivially zero for the comparison to mean anything"


def test_export_reports_checks_at_two_shapes_within_tolerance(exported):
    assert exported.dynamic_spatial
    assert [check.shape for check in exported.checks] == [(2, 3, 64, 64), (1, 3, 96, 128)]
    assert 0 <= exported.max_abs_diff < TOLERANCE


def test_graph_has_named_dynamic_batch_and_spatial_axes(exported):
    session = onnxruntime.InferenceSession(str(exported.model_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == ("input", ["batch", 3, "height", "width"])
    assert (out.name, out.shape) == ("logits", ["batch", 3, "height", "width"])


def test_contract_beside_the_model_describes_input_preprocessing_and_labels(run_dir, exported):
    contract_path = exported.model_path.with_name("model.onnx.json")
    assert exported.contract_path == contract_path == contract_path_for(exported.model_path)
    contract = json.loads(contract_path.read_text())
    payload = Checkpoint.load(run_dir)
    assert contract["format"] == CONTRACT_FORMAT
    assert contract["model_file"] == "model.onnx" and contract["opset"] == 17
    assert contract["architecture"] == "Unet" and contract["encoder"] == "tu-tf_efficientnet_lite0"
    assert contract["input"]["channels"] == 2 * payload.preprocessing["context_slices"] + 1 == 3
    assert contract["input"]["slice_axis"] == 2 and contract["input"]["spatial_multiple"] == 32
    assert contract["input"]["shape"] == ["batch", 3, "height", "width"] and contract["input"]["dynamic_spatial"]
    assert contract["output"]["name"] == "logits" and contract["output"]["classes"] == 3
    assert contract["labels"] == {str(k): v for k, v in payload.labels.items()}
    assert contract["preprocessing"] == payload.preprocessing
    assert contract["verification"]["max_abs_diff"] == pytest.approx(exported.max_abs_diff)
    leftovers = [p.name for p in exported.model_path.parent.iterdir() if p.name not in ("model.onnx", "model.onnx.json")]
    assert leftovers == [], "atomic writes leave no temp files behind"


class _OnnxModel:
    """An exported model called like the torch network (torch tensors in and out) for slice-wise inference."""

    def __init__(self, path: Path):
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["logits"], {"input": batch.numpy()})[0])


def test_slice_wise_inference_through_onnxruntime_equals_torch(run_dir, exported, phantom_root):
    """The contract's slab layout and padding, as ``predict`` builds them, give the same probabilities and labels."""
    network = load_network(run_dir)
    volume = np.asarray(nib.load(phantom_root / "imagesTr" / "phantom_000.nii.gz").dataobj, dtype=np.float32)[None]
    volume = (volume - volume.mean()) / volume.std()
    kwargs = dict(axis=2, context=1, batch_size=5, multiple=32)
    from_torch = predict_volume(network.model, volume, **kwargs)
    from_onnx = predict_volume(_OnnxModel(exported.model_path), volume, **kwargs)
    assert from_torch.shape == (3, 32, 32, 12)
    assert torch.max(torch.abs(from_torch - from_onnx)) < TOLERANCE
    top2 = torch.topk(from_torch, 2, dim=0).values
    decided = top2[0] - top2[1] > 10 * TOLERANCE  # labels where no runtime noise can flip the arg-max
    assert decided.float().mean() > 0.9
    assert torch.equal(from_torch.argmax(0)[decided], from_onnx.argmax(0)[decided])


class _ShapeBaked(nn.Module):
    """Scales by the input width as a Python number: tracing bakes it in, so only the traced size is exact."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * float(x.shape[-1])


def test_graph_not_generalising_over_sizes_falls_back_to_fixed_spatial_size():
    torch.manual_seed(0)
    model_bytes, checks, dynamic_spatial = export_module(_ShapeBaked().eval(), (2, 3, 32, 32), (1, 3, 64, 96))
    assert not dynamic_spatial
    assert [check.shape for check in checks] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]


class _CountsCalls(nn.Module):
    """Adds how often it was called: state ONNX cannot capture, so onnxruntime must disagree with torch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x) + float(self.calls)


def test_disagreement_beyond_tolerance_is_a_one_line_error():
    with pytest.raises(ExportError, match=r"onnxruntime differs from torch by \d+ \(> tolerance 0.001\) for input \[2, 3, 32, 32\]"):
        export_module(_CountsCalls().eval(), (2, 3, 32, 32), (1, 3, 64, 96), tolerance=1e-3)


def test_cli_export_prints_the_max_difference(run_dir, tmp_path, capsys):
    output = tmp_path / "cli" / "net.onnx"
    assert main(["export", "-m", str(run_dir), "--format", "onnx", "-o", str(output), "--size", "32"]) == 0
    out = capsys.readouterr().out
    difference = float(re.search(r"max abs difference (\S+) \(tolerance 0.001\)", out).group(1))
    assert 0 <= difference < TOLERANCE
    assert output.is_file() and json.loads((tmp_path / "cli" / "net.onnx.json").read_text())["model_file"] == "net.onnx"


@pytest.mark.parametrize("args, message", [
    (["-m", "{missing}"], "checkpoint not found"),
    (["-m", "{run}", "--size", "48"], "multiple of the encoder output stride 32"),
    (["-m", "{run}", "--format", "tflite"], "only onnx is supported"),
    (["-m", "{run}", "--opset", "9"], "supports opsets 11 to 20"),
])
def test_cli_user_errors_are_one_line_exit_2(run_dir, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "no_run", run=run_dir) for a in args]
    assert main(["export", *args, "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnxruntime_names_the_extra_to_install(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError, as when not installed
    assert main(["export", "-m", str(run_dir), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "seg-transfer[export]"' in err


# --------------------------------------------------------------------------- 3D route


@pytest.fixture(scope="module")
def run_3d(phantom_root, tmp_path_factory) -> Path:
    """A tiny trained 3D run (tests.test_route_3d.tiny_3d: 16^3 patches, multiple 8, 3 classes; seconds on CPU)."""
    from seg_transfer.config import config_from_dict
    from seg_transfer.training.trainer import train

    run_dir = tmp_path_factory.mktemp("export_run3d") / "run"
    train(config_from_dict(tiny_3d(phantom_root)), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def exported_3d(run_3d, tmp_path_factory):
    """The 3D run exported (traced at its 16^3 training patch)."""
    return export_checkpoint(run_3d, tmp_path_factory.mktemp("export3d") / "model3d.onnx")


def test_3d_export_contract_gives_window_multiple_per_axis_and_dynamic_xyz(run_3d, exported_3d):
    contract = json.loads(exported_3d.contract_path.read_text())
    network = load_network(run_3d)
    assert exported_3d.dynamic_spatial
    # traced at the patch, checked at another batch size and a grown window (16 + 8, 16 + 16, 16 + 24)
    assert [check.shape for check in exported_3d.checks] == [(1, 1, 16, 16, 16), (2, 1, 24, 32, 40)]
    assert 0 <= exported_3d.max_abs_diff < TOLERANCE
    inp, out = contract["input"], contract["output"]
    assert inp["route"] == "3d" and inp["channels"] == 1 and inp["dynamic_spatial"]
    assert inp["shape"] == ["batch", 1, "x", "y", "z"] and out["shape"] == ["batch", 3, "x", "y", "z"]
    assert inp["window"] == Checkpoint.load(run_3d).route_settings["patch_size"] == [16, 16, 16]
    assert inp["spatial_multiple"] == list(network.multiple) == [8, 8, 8]
    assert inp["sliding_window"] == {"overlap": 0.5, "blend": "gaussian", "sigma_scale": 0.125,
                                     "average": "softmax probabilities", "padding": "volume minimum"}
    assert "slice_axis" not in inp and "context_slices" not in inp
    assert contract["labels"] == {str(k): v for k, v in Checkpoint.load(run_3d).labels.items()}
    assert contract["preprocessing"] == Checkpoint.load(run_3d).preprocessing
    session = onnxruntime.InferenceSession(str(exported_3d.model_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 1, "x", "y", "z"]
    assert session.get_outputs()[0].shape == ["batch", 3, "x", "y", "z"]


def _preprocessed_3d(run_dir: Path, image: Path):
    from seg_transfer.inference.cases import discover_cases
    from seg_transfer.inference.predictor import load_model, preprocess

    loaded = load_model(str(run_dir), torch.device("cpu"))
    (case,) = discover_cases(str(image))
    return loaded, preprocess(loaded, case)


def test_3d_onnx_logits_match_torch_on_preprocessed_phantom_windows(run_3d, exported_3d, phantom_root):
    loaded, image = _preprocessed_3d(run_3d, phantom_root / "imagesTs" / "phantom_006.nii.gz")  # the unseen test phantom
    volume = image.as_tensor().numpy()[0]
    assert volume.shape == (32, 32, 12)
    # the contract's padding: the volume minimum at the end of z up to the 16-voxel window
    padded = np.pad(volume, [(0, 0), (0, 0), (0, 4)], constant_values=float(volume.min()))
    windows = np.stack([padded[None, :16, :16, :16], padded[None, 8:24, 16:32, :16]]).astype(np.float32)
    session = onnxruntime.InferenceSession(str(exported_3d.model_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["logits"], {"input": windows})
    torch_out = _torch_logits(loaded.model, windows)
    assert onnx_out.shape == torch_out.shape == (2, 3, 16, 16, 16)
    assert np.max(np.abs(onnx_out - torch_out)) < TOLERANCE
    assert np.abs(torch_out).max() > 1e-1 and len(np.unique(torch_out.argmax(1))) > 1, "a trained, non-trivial output"


def test_3d_sliding_window_through_onnxruntime_matches_predict(run_3d, exported_3d, phantom_root, tmp_path):
    """MONAI's sliding window over the ONNX model, set up from the contract alone (test-time flips included),
    gives predict's label map."""
    from monai.inferers import sliding_window_inference

    from seg_transfer.inference.predictor import invert_to_input

    source = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    assert main(["predict", "-m", str(run_3d), "-i", str(source), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    expected = np.asarray(nib.load(tmp_path / "out" / "phantom_000.nii.gz").dataobj)

    contract = json.loads(exported_3d.contract_path.read_text())
    window, sliding = contract["input"]["window"], contract["input"]["sliding_window"]
    session = onnxruntime.InferenceSession(str(exported_3d.model_path), providers=["CPUExecutionProvider"])

    flips, validated = contract["output"]["test_time_flips"], contract["output"]["validated_tta"]
    trained = contract["output"]["trained_flips"]
    assert trained[0] == [] and len(trained) > 1, "the tiny 3D run is trained with flips"
    assert validated["tta"] == (validated["val_dice_tta"] > validated["val_dice"])
    assert flips == (trained if validated["tta"] else [[]]), "predict's default: the flips where they helped validation"

    def probabilities(batch: torch.Tensor) -> torch.Tensor:  # every window batch flipped, run, flipped back, averaged
        total = 0
        for dims in flips:
            (logits,) = session.run([contract["output"]["name"]], {contract["input"]["name"]: torch.flip(batch, dims).numpy()})
            total = total + torch.flip(torch.softmax(torch.from_numpy(logits), dim=1), dims)
        return total / len(flips)

    loaded, image = _preprocessed_3d(run_3d, source)
    volume = image.as_tensor().float()[None]

    def window_average(batch: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(batch, window, 4, probabilities, overlap=sliding["overlap"], mode=sliding["blend"],
                                        sigma_scale=sliding["sigma_scale"], cval=float(volume.min()))

    probs = window_average(volume)[0]
    labels = probs.argmax(0).to(torch.uint8)
    from_onnx = invert_to_input(loaded, image, labels[None], nearest=True)[0].numpy().round().astype(expected.dtype)

    assert from_onnx.shape == expected.shape == tuple(nib.load(source).shape)
    assert np.mean(from_onnx == expected) >= 0.999
    assert len(np.unique(expected)) == 3, "all three classes predicted: the agreement is not that of an empty map"


def test_3d_cli_export_prints_the_max_difference(run_3d, tmp_path, capsys):
    output = tmp_path / "net3d.onnx"
    assert main(["export", "-m", str(run_3d), "--format", "onnx", "-o", str(output)]) == 0
    difference = float(re.search(r"max abs difference (\S+) \(tolerance 0.001\)", capsys.readouterr().out).group(1))
    assert 0 <= difference < TOLERANCE
    assert json.loads((tmp_path / "net3d.onnx.json").read_text())["input"]["window"] == [16, 16, 16]


class _ShapeBaked3d(nn.Module):
    """3D counterpart of :class:`_ShapeBaked`: the traced depth is baked in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * float(x.shape[-1])


def test_3d_graph_not_generalising_falls_back_to_the_fixed_window_and_checks_another_batch():
    torch.manual_seed(0)
    model_bytes, checks, dynamic_spatial = export_module(_ShapeBaked3d().eval(), (1, 1, 8, 8, 16), (2, 1, 16, 24, 32))
    assert not dynamic_spatial
    assert [check.shape for check in checks] == [(1, 1, 8, 8, 16), (2, 1, 8, 8, 16)]
    assert all(check.max_abs_diff < TOLERANCE for check in checks)
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 1, 8, 8, 16]
