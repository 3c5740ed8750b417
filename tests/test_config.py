"""Config errors are reported before any work, naming the key and the closest valid one."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from seg_transfer.config import ConfigError, ModelConfig, config_from_dict, load_config
from tests.conftest import optimiser_steps, tiny_config


def _write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_valid_config_and_overrides(tmp_path, phantom_root):
    config = load_config(_write(tmp_path, tiny_config(phantom_root)), ["training.batch_size=4", "training.stages.1.lr=0.5"])
    assert config.training.batch_size == 4
    assert config.training.stages[1].lr == 0.5
    assert config.training.stages[1].train.encoder_top == 2
    assert config.data.in_channels == 3


def test_unknown_key_names_closest(tmp_path, phantom_root):
    raw = tiny_config(phantom_root)
    raw["training"]["stages"][0]["learning_rate"] = 1
    with pytest.raises(ConfigError, match=r"unknown key 'training.stages.0.learning_rate'.*did you mean 'training.stages.0.lr'"):
        load_config(_write(tmp_path, raw))
    raw = tiny_config(phantom_root)
    raw["data"]["slice_axes"] = 1
    with pytest.raises(ConfigError, match=r"did you mean 'data.slice_axis'"):
        load_config(_write(tmp_path, raw))


def test_wrong_type_and_value(phantom_root):
    with pytest.raises(ConfigError, match="training.batch_size"):
        config_from_dict(tiny_config(phantom_root, **{"training.batch_size": "many"}))
    with pytest.raises(ConfigError, match="encoder_top"):
        config_from_dict(tiny_config(phantom_root), ["training.stages.1.train.encoder_top=0"])
    with pytest.raises(ConfigError, match="slice_axis"):
        config_from_dict(tiny_config(phantom_root, **{"data.slice_axis": 3}))


def test_missing_paths(tmp_path, phantom_root):
    with pytest.raises(ConfigError, match="'data.root' path does not exist"):
        config_from_dict(tiny_config(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="encoder_weights"):
        config_from_dict(tiny_config(phantom_root, **{"model.encoder_weights": str(tmp_path / "w.pth")}))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_bad_yaml_and_bad_override(tmp_path, phantom_root):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="key.path=value"):
        config_from_dict(tiny_config(phantom_root), ["training.batch_size"])


def test_pretrained_and_scratch_differ_in_one_field(phantom_root):
    from seg_transfer.quickstart import default_config
    from seg_transfer.study.arms import scratch_control

    pretrained = default_config()
    scratch = scratch_control(pretrained)
    assert scratch["model"] == {**pretrained["model"], "encoder_weights": "none"}
    assert scratch["data"] == pretrained["data"]
    assert [s["train"] for s in scratch["training"]["stages"]] == ["all"]
    assert scratch["training"]["stages"][0]["epochs"] == sum(s["epochs"] for s in pretrained["training"]["stages"])


def test_the_3d_quickstart_is_the_3d_default_recipe_at_240_steps_and_its_control_differs_in_the_weights(tmp_path):
    """``quickstart --dims 3d``: the embedded 3D config trains the 3D Hippocampus default's recipe (same network and
    stages, patch size derived) for 240 steps; its scratch control differs in the encoder weights and one `all` stage
    of as many steps, and the two routes' runs have their own folders."""
    from seg_transfer.quickstart import quickstart_configs

    pretrained, scratch = quickstart_configs(tmp_path, dims="3d")
    raw = yaml.safe_load((Path(__file__).parent.parent / "configs" / "hippocampus_3d_effnet_lite0.yaml").read_text())
    shipped = config_from_dict({**raw, "data": {**raw["data"], "root": str(tmp_path)}})
    assert pretrained.model == shipped.model and pretrained.training.stages == shipped.training.stages
    assert (pretrained.training.loss, pretrained.data.patch_size) == (shipped.training.loss, None)
    assert optimiser_steps(pretrained) == optimiser_steps(scratch) == 240
    assert scratch.model == pretrained.model.model_copy(update={"encoder_weights": "none"})
    assert [stage.train for stage in scratch.training.stages] == ["all"]
    assert len({config.name for config in (pretrained, scratch, *quickstart_configs(tmp_path))}) == 4


def test_depth_stride_one_stages_is_refused_outside_the_3d_route():
    with pytest.raises(ValidationError, match="3D route only"):
        ModelConfig(dims="2.5d", depth_stride_one_stages=1)
    assert ModelConfig(dims="3d", depth_stride_one_stages=1).depth_stride_one_stages == 1
