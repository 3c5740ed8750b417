"""Starting a network from a finished run: ``model.head_from_weights`` (with ``decoder_from_weights``) continues the
whole network of a run's ``best.pt``, and a study arm's ``weights_from`` starts each run from an earlier arm's run of
the same size and seed (e.g. a self-training student that continues from its teacher)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seg_transfer.checkpoint import Checkpoint
from seg_transfer.cli import main
from seg_transfer.config import ConfigError, ModelConfig, config_from_dict
from seg_transfer.data.phantoms import make_phantom_dataset
from seg_transfer.models.factory import build_model
from seg_transfer.models.unet3d import build_unet3d
from seg_transfer.models.weights import WeightsError, sha256_file
from seg_transfer.study.config import load_study_config
from seg_transfer.study.parallel import ready_runs
from seg_transfer.study.plan import plan_runs
from seg_transfer.training.trainer import train
from tests.conftest import tiny_config
from tests.test_self_training import write_study

TINY_3D = {"dims": "3d", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("start_from"), n_train=8, n_test=0, shape=(32, 32, 12), seed=4)


@pytest.fixture(scope="module")
def finished_run(root, tmp_path_factory) -> Path:
    """A tiny 2.5D run trained for one epoch (its folder)."""
    folder = tmp_path_factory.mktemp("run")
    raw = tiny_config(root, **{"data.cache_dir": str(folder / "cache")})
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 1, "lr": 3e-3}]
    train(config_from_dict(raw), folder / "run")
    return folder / "run"


def continued(root: Path, weights: Path, **model) -> dict:
    return tiny_config(root, **{"model.encoder_weights": str(weights), **{f"model.{k}": v for k, v in model.items()}})


def test_a_run_folder_names_its_weights_in_a_config(root, finished_run, tmp_path):
    """The loader resolves a run folder to its best.pt; the config check now lets it through."""
    config = config_from_dict(continued(root, finished_run))
    assert Path(config.model.encoder_weights) == finished_run
    with pytest.raises(ConfigError, match="nor an existing file or run folder: .*no_such_run"):
        config_from_dict(continued(root, tmp_path / "no_such_run"))


def test_decoder_and_head_from_weights_continue_the_whole_network(root, finished_run):
    best = Checkpoint.load(finished_run / "checkpoints" / "best.pt").model
    config = config_from_dict(continued(root, finished_run, decoder_from_weights=True, head_from_weights=True))
    whole = build_model(config.model, 3, 3)[0].state_dict()
    assert set(whole) == set(best) and all(torch.equal(whole[key], best[key]) for key in best)
    decoder_only = config_from_dict(continued(root, finished_run, decoder_from_weights=True))
    new_head = build_model(decoder_only.model, 3, 3)[0].state_dict()
    assert torch.equal(new_head["decoder.blocks.0.conv1.0.weight"], best["decoder.blocks.0.conv1.0.weight"])
    assert not torch.equal(new_head["segmentation_head.0.weight"], best["segmentation_head.0.weight"])


def test_a_head_of_other_classes_is_refused_naming_the_file(root, finished_run):
    config = config_from_dict(continued(root, finished_run, decoder_from_weights=True, head_from_weights=True))
    with pytest.raises(WeightsError, match=r"best\.pt: its segmentation_head does not fit .* 2 of another shape"):
        build_model(config.model, 3, 4)


def test_head_from_weights_needs_decoder_from_weights():
    with pytest.raises(ValueError, match="head_from_weights needs decoder_from_weights: true"):
        ModelConfig(encoder_weights="some.pt", head_from_weights=True)


def test_a_3d_network_continues_exactly_and_refuses_missing_deep_supervision_heads(tmp_path):
    source = build_unet3d(ModelConfig(encoder_weights="none", **TINY_3D), 3)[0].state_dict()
    torch.save(source, tmp_path / "network.pt")
    config = ModelConfig(encoder_weights=str(tmp_path / "network.pt"), decoder_from_weights=True,
                         head_from_weights=True, **TINY_3D)
    loaded = build_unet3d(config, 3)[0].state_dict()
    assert set(loaded) == set(source) and all(torch.equal(loaded[key], source[key]) for key in source)
    with pytest.raises(WeightsError, match=r"network\.pt: holds no aux_heads .* and deep supervision"):
        build_unet3d(config.model_copy(update={"deep_supervision": True}), 3)


def test_weights_from_must_name_an_earlier_arm_and_not_a_scratch_control(root, tmp_path):
    path = write_study(tmp_path, root, [{"name": "a", "weights_from": "b"}, {"name": "b"}])
    with pytest.raises(ConfigError, match="'weights_from': 'b' is not an arm listed before it"):
        load_study_config(path)
    path = write_study(tmp_path, root, [{"name": "a"}, {"name": "b", "weights_from": "a", "scratch_control": True}])
    with pytest.raises(ConfigError, match="'weights_from' and 'scratch_control' contradict each other"):
        load_study_config(path)


def test_an_arm_starting_from_a_run_waits_for_it(root, tmp_path):
    path = write_study(tmp_path, root, [{"name": "first"}, {"name": "continued", "weights_from": "first"}])
    _, specs = plan_runs(load_study_config(path), tmp_path / "study")  # the first run's best.pt does not exist yet
    assert specs[1].prerequisites == (specs[0].run_dir,) and Path(specs[1].config.model.encoder_weights) == specs[0].run_dir
    assert ready_runs(specs, [0, 1]) == [0]
    evaluation = specs[0].run_dir / "test_evaluation" / "metrics.json"
    evaluation.parent.mkdir(parents=True)
    evaluation.write_text("{}")
    assert ready_runs(specs, [1]) == [1]


def test_a_study_arm_starts_from_the_earlier_arms_run_of_its_seed(root, tmp_path, one_thread):
    path = write_study(tmp_path, root, [{"name": "first"}, {"name": "continued", "weights_from": "first"}])
    out = tmp_path / "study"
    assert main(["compare", "--config", str(path), "--output", str(out), "--device", "cpu"]) == 0
    first, later = out / "runs" / "first" / "n002_seed0", out / "runs" / "continued" / "n002_seed0"
    weights = json.loads((later / "summary.json").read_text())["weights"]
    assert weights["sha256"] == sha256_file(first / "checkpoints" / "best.pt")  # the first run's finished network
    assert json.loads((first / "summary.json").read_text())["weights"]["source"] == "none"
    models = [Checkpoint.load(run / "checkpoints" / "last.pt").model for run in (first, later)]
    assert any(not torch.equal(models[0][key], models[1][key]) for key in models[0])  # and it trained on


def test_a_run_whose_starting_run_failed_is_reported_not_waited_for(root, tmp_path, capsys):
    path = write_study(tmp_path, root, [{"name": "first"}, {"name": "continued", "weights_from": "first"}])
    out = tmp_path / "study"
    _, specs = plan_runs(load_study_config(path), out)
    broken = specs[0].run_dir / "splits.json"  # the first run finds other splits in its folder and fails
    broken.parent.mkdir(parents=True)
    broken.write_text(json.dumps({"train": ["x"], "val": ["y"], "test": ["z"]}))
    assert main(["compare", "--config", str(path), "--output", str(out), "--processes", "2"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "holds other splits" in lines[0]
    assert lines[1].startswith(f"error: run {specs[1].key}: {specs[0].run_dir} did not finish; ")
