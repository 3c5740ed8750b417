"""Issue 10: equal step budgets, collapse detection, BatchNorm re-estimation, seed-aware statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seg_transfer.cli import main
from seg_transfer.config import CollapseConfig, ModelConfig, config_from_dict
from seg_transfer.evaluation.stats import hierarchical_bootstrap, wilcoxon_p
from seg_transfer.models.factory import build_model
from seg_transfer.models.freezing import reestimate_batchnorm
from seg_transfer.study.analysis import NEGATIVE, NEUTRAL, paired_comparisons
from seg_transfer.study.runner import RunRecord, StudyError, check_equal_steps
from seg_transfer.training.collapse import collapse_check_due, collapsed_classes
from seg_transfer.training.trainer import train
from tests.conftest import tiny_config


def _record(arm: str, seed: int, scores, steps: int = 100) -> RunRecord:
    test = {f"case{i:02d}": {"a": float(s)} for i, s in enumerate(scores)}
    return RunRecord(arm, 10, seed, None, 0.5, 2, 10.0, test, [], steps)


# ----------------------------------------------------------------------------- budgets in steps


@pytest.mark.parametrize("n_train", [2, 4])
def test_runs_take_the_same_steps_whatever_the_training_set_size(phantom_root, tmp_path, n_train):
    """24 slices per epoch / batch 8 = 3 steps per epoch even when 2 cases hold fewer than 24 slices."""
    raw = tiny_config(phantom_root, **{"data.slices_per_epoch": 48})
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 2, "lr": 1e-3}]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (phantom_root / "labelsTr").glob("*.nii.gz"))
    (run_dir / "splits.json").write_text(json.dumps({"train": cases[:n_train], "val": cases[-1:], "test": []}))
    result = train(config_from_dict(raw), run_dir)
    assert result.steps == 2 * 48 // 8
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12
    # where it computed, so that two runs of one seed that differ can be told apart (README, default budget)
    environment = summary["environment"]
    assert (environment["torch"], environment["cpu_capability"]) == (torch.__version__, torch.backends.cpu.get_cpu_capability())
    assert environment["device"] == "cpu" and environment["device_name"] is None
    assert 0 < environment["probe_seconds"] < 5  # the host speed probe (seconds of a fixed Conv3d step)


def test_study_refuses_runs_with_unequal_steps():
    records = [_record("scratch", 0, [0.5] * 3, steps=120), _record("imagenet", 0, [0.6] * 3, steps=66)]
    with pytest.raises(StudyError, match="different numbers of optimiser steps"):
        check_equal_steps(records)
    assert check_equal_steps(records, allow_unequal=True) == {"scratch/n010_seed0": 120, "imagenet/n010_seed0": 66}


# ----------------------------------------------------------------------------- collapse


def test_collapse_is_reported_and_can_stop_the_run(phantom_root, tmp_path, capsys):
    """A threshold no class reaches makes every class 'collapsed' once the encoder trains (checked from the
    first encoder-training epoch: 0.1 x 2 planned epochs rounds up to 1)."""
    raw = tiny_config(phantom_root)
    raw["training"]["collapse"] = {"min_class_dice": 0.99, "after_fraction": 0.1}
    result = train(config_from_dict(raw), tmp_path / "warn")
    summary = json.loads((tmp_path / "warn" / "summary.json").read_text())
    assert result.stopped is None and result.epochs == 3  # reported, not stopped
    assert [w["stage"] for w in summary["collapse_warnings"]] == ["top", "all"]  # never the decoder-only stage
    assert sorted(summary["collapsed"]) == ["anterior", "posterior"]

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(raw))
    code = main(["train", "--config", str(config), "--output", str(tmp_path / "stop"), "--stop-on-collapse"])
    assert code == 3
    stopped = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert stopped["stopped"] == "collapse" and stopped["epochs"] == 2  # decoder epoch + first encoder epoch
    assert "stopped early" in capsys.readouterr().err


def test_collapse_rule_absolute_and_relative():
    assert collapsed_classes({"a": 0.05, "b": 0.8}, 0.1) == ["a"]
    assert collapsed_classes({"a": 0.14, "b": 0.57}, 0.1, 0.3) == ["a"]  # the collapsed seed
    assert collapsed_classes({"a": 0.78, "b": 0.81}, 0.1, 0.3) == []
    assert collapsed_classes({"a": float("nan"), "b": 0.8}, 0.1) == ["a"]


def _first_warning(anterior: list[float], posterior: list[float], rule: CollapseConfig) -> int | None:
    """Epoch of the first warning for a one-stage (all encoder) run with these per-epoch validation Dice."""
    for epoch, per_class in enumerate(zip(anterior, posterior), start=1):
        low = collapsed_classes(dict(zip("ap", per_class)), rule.min_class_dice, rule.relative_dice)
        if collapse_check_due(epoch, len(anterior), rule.after_fraction) and low:
            return epoch
    return None


def test_default_rule_spares_a_late_learner_and_still_catches_a_collapse():
    """Per-epoch class Dice of two real 12-epoch Hippocampus runs (runs/study_hippocampus, unstaged arm,
    seed 0): at 50 cases Anterior appears at epoch 7 and the run ends at 0.81; at 10 cases it never does."""
    late = ([0.0, 0.0, 0.0, 0.0, 0.0, 0.01, 0.70, 0.80, 0.81, 0.81, 0.81, 0.82],
            [0.0, 0.0, 0.03, 0.11, 0.22, 0.52, 0.78, 0.80, 0.78, 0.80, 0.81, 0.81])
    collapsed = ([0.0] * 12, [0.0, 0.0, 0.01, 0.03, 0.14, 0.32, 0.74, 0.76, 0.77, 0.78, 0.78, 0.78])
    default = CollapseConfig()
    assert _first_warning(*late, default) is None
    assert _first_warning(*collapsed, default) == 8
    assert _first_warning(*late, CollapseConfig(after_fraction=0.4)) == 5  # the old default's false alarm


def test_healthy_run_reports_no_collapse(phantom_root, tmp_path):
    raw = tiny_config(phantom_root)
    raw["training"]["collapse"] = {"min_class_dice": 0.0, "relative_dice": 0.0, "after_fraction": 0.1}
    result = train(config_from_dict(raw), tmp_path / "run")
    assert result.collapse_warnings == [] and result.collapsed == []


# ----------------------------------------------------------------------------- BatchNorm re-estimation


def test_reestimate_batchnorm_replaces_statistics_with_target_averages():
    model, _ = build_model(ModelConfig(encoder_weights="none", decoder_channels=[32, 16, 16, 8, 8]), 3, 3)
    first_bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    torch.manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 32, 32) * 5 + 3} for _ in range(2)]
    assert reestimate_batchnorm(model, batches, torch.device("cpu")) == 2
    with torch.no_grad():
        expected = torch.stack([first_conv(b["image"]).mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(first_bn.running_mean, expected, atol=1e-4)  # cumulative average, not momentum 0.1
    assert first_bn.momentum == 0.1 and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # no weight moved


# ----------------------------------------------------------------------------- seed-aware statistics


def test_seed_disagreement_is_not_hidden_by_many_cases():
    """Two seeds +0.06, one seed -0.06 on 40 cases: averaging seeds per case and testing over cases (the old
    study) calls +0.02 significant; the two-level bootstrap sees that one seed in three went the other way."""
    rng = np.random.default_rng(0)
    grid = np.stack([0.06 + rng.normal(0, 0.01, 40), 0.06 + rng.normal(0, 0.01, 40), -0.06 + rng.normal(0, 0.01, 40)])
    _, case_p = wilcoxon_p(grid.mean(axis=0))
    result = hierarchical_bootstrap(grid)
    assert case_p < 1e-6
    assert result.mean_difference == pytest.approx(0.02, abs=0.005)
    assert result.p_value > 0.1 and result.ci_low < 0 < result.ci_high
    assert result.seed_differences == pytest.approx([0.06, 0.06, -0.06], abs=0.005) and result.consistent_sign == 0


def test_constant_difference_has_a_degenerate_interval_and_zero_p():
    result = hierarchical_bootstrap(np.full((3, 10), 0.04), n_resamples=2000)
    assert (result.mean_difference, result.ci_low, result.ci_high) == pytest.approx((0.04, 0.04, 0.04))
    assert result.p_value == 0.0 and result.p_bootstrap == pytest.approx(1 / 2000) and result.consistent_sign == 1


def test_one_wild_seed_sinks_the_t_test_but_not_the_seed_signed_rank_test():
    """The 3D robustness study's shape: 8 seeds all gaining +0.015 to +0.03, one control seed collapsed
    (+0.35). The crossed t-test's seed variance explodes (p > 0.05); the exact signed-rank test over the
    8 seed differences, all positive, gives 2 / 2^8."""
    gains = np.array([0.022, 0.015, 0.032, 0.024, 0.352, 0.109, 0.015, 0.027])
    grid = gains[:, None] + np.random.default_rng(4).normal(0, 0.03, (8, 40))
    grid -= grid.mean(axis=1, keepdims=True) - gains[:, None]
    result = hierarchical_bootstrap(grid, n_resamples=2000)
    assert result.p_value > 0.05 and result.consistent_sign == 1
    assert result.p_seeds_signed_rank == pytest.approx(2 / 256)
    assert hierarchical_bootstrap(grid[:3], n_resamples=2000).p_seeds_signed_rank == pytest.approx(0.25)


def test_three_agreeing_seeds_are_not_enough_for_p_below_001():
    """Per-seed gains +0.038, +0.029, +0.070 (the ablation's staged-bn-eval): every bootstrap resample is
    positive (p at its floor), but three seeds with this spread support p ~ 0.04, not 1e-4."""
    rng = np.random.default_rng(1)
    grid = np.array([[0.038], [0.029], [0.070]]) + rng.normal(0, 0.04, (3, 40))
    grid -= grid.mean(axis=1, keepdims=True) - np.array([[0.038], [0.029], [0.070]])
    result = hierarchical_bootstrap(grid)
    assert result.p_bootstrap <= 1e-3
    assert 0.01 < result.p_value < 0.1 and 2 < result.degrees_of_freedom < 6
    from scipy import stats as sps

    seed_only = sps.ttest_1samp([0.038, 0.029, 0.070], 0).pvalue
    assert result.p_value == pytest.approx(seed_only, rel=0.5)  # close to the seed-level t-test (df 2)


def test_negative_transfer_needs_every_seed():
    control = [_record("scratch", s, np.linspace(0.6, 0.9, 30)) for s in range(3)]
    all_worse = [_record("imagenet", s, np.linspace(0.6, 0.9, 30) - 0.08) for s in range(3)]
    one_collapse = [_record("imagenet", s, np.linspace(0.6, 0.9, 30) + d) for s, d in enumerate([0.01, 0.01, -0.40])]
    (worse,) = paired_comparisons(control + all_worse, "scratch", alpha=0.01)
    (mixed,) = paired_comparisons(control + one_collapse, "scratch", alpha=0.01)
    assert worse["verdict"] == NEGATIVE and worse["negative_transfer"]
    assert mixed["mean_difference"] == pytest.approx(-0.127, abs=0.001)
    assert mixed["verdict"] == NEUTRAL and not mixed["negative_transfer"]


def test_reuse_accepts_runs_from_before_a_field_was_added(phantom_root, tmp_path):
    """A field added later (with its default) does not make an older run 'another config'; a changed value does."""
    import yaml

    from seg_transfer.config import dump_config
    from seg_transfer.training.reuse import check_same_config
    from seg_transfer.training.trainer import RunDirError

    config = config_from_dict(tiny_config(phantom_root))
    older = dump_config(config)
    del older["training"]["collapse"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    check_same_config(config, tmp_path)
    older["training"]["stages"][0]["lr"] = 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(RunDirError, match="another config"):
        check_same_config(config, tmp_path)


def test_reuse_ignores_collapse_thresholds_that_only_warn(phantom_root, tmp_path):
    """Raising the collapse default (0.4 -> 0.6) must not orphan finished studies: warning thresholds do not
    change the trained weights. A run that may have stopped early on collapse is another run."""
    import yaml

    from seg_transfer.config import dump_config
    from seg_transfer.training.reuse import check_same_config
    from seg_transfer.training.trainer import RunDirError

    config = config_from_dict(tiny_config(phantom_root))
    older = dump_config(config)
    older["training"]["collapse"]["after_fraction"] = 0.4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    check_same_config(config, tmp_path)
    older["training"]["collapse"]["stop"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(RunDirError, match=r"differs in training"):
        check_same_config(config, tmp_path)


def test_reuse_ignores_the_runs_name_but_not_its_seed(phantom_root, tmp_path):
    """A run copied in from another study under another arm name trains the same weights: its name and
    default output folder are labels. The seed is not."""
    import yaml

    from seg_transfer.config import dump_config
    from seg_transfer.training.reuse import check_same_config
    from seg_transfer.training.trainer import RunDirError

    config = config_from_dict(tiny_config(phantom_root))
    older = dump_config(config)
    older["name"], older["output_dir"] = "imagenet_n5_seed0", "elsewhere"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    check_same_config(config, tmp_path)
    older["seed"] = config.seed + 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    with pytest.raises(RunDirError, match=r"differs in seed"):
        check_same_config(config, tmp_path)



def test_a_reused_run_keeps_its_recorded_fields_including_peak_gpu_memory(tmp_path):
    """A finished run read back from summary.json carries every recorded field; summaries of older versions
    (without steps or peak GPU memory) still load, with the defaults (0 steps, no GPU memory)."""
    from seg_transfer.training.reuse import finished_result

    summary = {"best_dice": 0.81, "best_per_class": {"1": 0.8, "2": 0.82}, "best_epoch": 11, "epochs": 12,
               "seconds": 300.0, "steps": 2400, "peak_gpu_gb": 1.25, "environment": {"torch": "2.9.0", "cpu_capability": "AVX512"}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    result = finished_result(tmp_path)
    assert (result.steps, result.peak_gpu_gb, result.best_dice) == (2400, 1.25, 0.81)
    assert result.environment == {"torch": "2.9.0", "cpu_capability": "AVX512"}
    older = ("steps", "peak_gpu_gb", "environment")
    (tmp_path / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k not in older}))
    older_result = finished_result(tmp_path)
    assert (older_result.steps, older_result.peak_gpu_gb, older_result.environment) == (0, None, None)


def test_the_report_warns_when_runs_computed_in_different_environments():
    """Runs on another torch version or CPU kernel path are named; the CPU's model name alone, and runs
    recorded before environments existed, do not raise the warning."""
    from seg_transfer.environment import environment_differences
    from seg_transfer.study.report import environment_lines

    here = {"torch": "2.9.0", "cpu_capability": "AVX2", "threads": 1, "cpu": "AMD EPYC"}
    same_kernels = {**here, "cpu": "Intel Xeon"}
    assert environment_differences([here, same_kernels, None]) == {}
    differing = environment_differences([here, {**here, "torch": "2.10.0", "cpu_capability": "AVX512"}, None])
    assert differing == {"torch": ["2.10.0", "2.9.0"], "cpu_capability": ["AVX2", "AVX512"]}
    [line] = environment_lines({"environment_differences": differing, "runs_without_environment": 1})
    assert "torch: 2.10.0, 2.9.0; cpu_capability: AVX2, AVX512; 1 run(s) recorded none" in line
    assert environment_lines({"environment_differences": {}, "runs_without_environment": 3}) == []


def test_a_resumed_runs_probe_weighs_each_hosts_probe_by_the_seconds_trained_there():
    from seg_transfer.environment import weighted_probe

    fast_then_slow = [{"probe_seconds": 0.03, "from_elapsed": 0.0}, {"probe_seconds": 0.09, "from_elapsed": 100.0}]
    assert weighted_probe(fast_then_slow, 400.0) == pytest.approx((0.03 * 100 + 0.09 * 300) / 400)
    assert weighted_probe(fast_then_slow[:1], 400.0) == pytest.approx(0.03)
    assert weighted_probe(fast_then_slow, 100.0) == pytest.approx(0.03)  # resumed after its last epoch: no seconds there
    assert weighted_probe([{"probe_seconds": 0.05, "from_elapsed": 7.0}], 7.0) == pytest.approx(0.05)
    assert weighted_probe([], 10.0) is None


def test_host_speed_probe_times_its_workload_and_leaves_the_global_rng_alone():
    """Eight times the voxels take longer; torch's global RNG draws the same numbers with or without a probe."""
    from seg_transfer.environment import PROBE_SHAPE, host_speed_probe

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    small = host_speed_probe(repeats=3)
    assert torch.equal(torch.rand(3), expected)
    large = host_speed_probe(repeats=3, shape=(*PROBE_SHAPE[:2], *(2 * n for n in PROBE_SHAPE[2:])))
    assert 0 < small < large


def test_the_report_warns_when_hosts_differ_in_speed():
    """Probes 1.5x apart or less (noise, a second process) pass; 2.5x apart (another host) is named with
    its range; runs without a probe (older summaries, GPU runs) are left out."""
    from seg_transfer.environment import host_speed_spread
    from seg_transfer.study.report import environment_lines

    def env(probe):
        return {"torch": "2.9.0", "probe_seconds": probe}

    assert host_speed_spread([env(0.04), None, env(None)]) is None
    close = host_speed_spread([env(0.04), env(0.05), None])
    assert close == pytest.approx({"fastest": 0.04, "slowest": 0.05, "ratio": 1.25})
    assert environment_lines({"host_speed": close}) == []
    apart = host_speed_spread([env(0.016), env(0.04), env(0.03)])
    assert apart["ratio"] == pytest.approx(2.5)
    [line] = environment_lines({"host_speed": apart})
    assert "differed in speed by 2.5x" in line and "0.016 to 0.040 s" in line


def test_runs_record_the_source_commit_and_whether_it_had_uncommitted_changes(tmp_path):
    """The version string stays 0.1.0 between commits, so a run names the commit of the code it ran:
    HEAD of the checkout, ``+dirty`` once a package file changes, None for a package outside a checkout."""
    import subprocess

    from seg_transfer.environment import source_revision

    package = tmp_path / "repo" / "seg_transfer"
    package.mkdir(parents=True)
    (package.parent / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (package / "module.py").write_text("A = 1\n")
    git = ["git", "-C", str(package.parent), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert source_revision(package) == head
    (package / "module.py").write_text("A = 2\n")
    assert source_revision(package) == head + "+dirty"
    installed = tmp_path / "site-packages" / "seg_transfer"
    installed.mkdir(parents=True)
    assert source_revision(installed) is None

# ----------------------------------------------------------------------------- checkpoint errors (issue 13.3, 13.5)


def test_empty_and_unsafe_checkpoints_are_one_line_errors(phantom_root, tmp_path, capsys):
    scan = str(phantom_root / "imagesTr" / "phantom_000.nii.gz")
    empty = tmp_path / "run" / "checkpoints" / "best.pt"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    assert main(["predict", "-m", str(tmp_path / "run"), "-i", scan, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "empty file (0 bytes" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "seg_transfer/1", "thing": np.random.default_rng(0)}, unsafe)
    assert main(["predict", "-m", str(unsafe), "-i", scan, "-o", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "contains Python objects other than tensors; not loaded for safety" in err and "weights_only=False" not in err


@pytest.mark.parametrize("argv, message", [
    (["quickstart", "--epochs-scale", "nan"], "--epochs-scale must be a positive number, got nan"),
    (["quickstart", "--epochs-scale", "-5"], "--epochs-scale must be a positive number, got -5.0"),
    (["quickstart", "--dims", "2d"], "--dims must be one of 2.5d, 3d, got '2d'"),
    (["compare", "--config", "x.yaml", "--output", "o", "--max-runs", "-1"], "--max-runs"),
])
def test_meaningless_numbers_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("override, message", [
    ("seed.foo=1", "--set seed.foo: 'seed' is a value, not a section"),
    ("training.batch_size=[1,", "--set training.batch_size: value '[1,' is not valid YAML"),
])
def test_bad_overrides_are_one_line_errors(phantom_root, tmp_path, capsys, override, message):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(tiny_config(phantom_root)))
    assert main(["train", "--config", str(config), "--set", override, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_and_continue_sweep_temp_files_of_a_killed_write(phantom_root, tmp_path):
    """Issue 13.6: a kill between write and rename leaves ``.<name>.<random>.tmp``; --resume / --continue remove it."""
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 1, "lr": 1e-3}]
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(raw))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--output", str(run)]) == 0
    leftover = run / "checkpoints" / ".last.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert main(["train", "--config", str(config), "--output", str(run), "--resume"]) == 0
    assert not leftover.exists() and (run / "checkpoints" / "last.pt").is_file()

    scan = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    out = tmp_path / "pred"
    assert main(["predict", "-m", str(run), "-i", str(scan), "-o", str(out), "--device", "cpu"]) == 0
    half = out / ".phantom_001.nii.gz.xyz.tmp"
    half.write_bytes(b"x")
    assert main(["predict", "-m", str(run), "-i", str(scan), "-o", str(out), "--device", "cpu", "--continue"]) == 0
    assert not half.exists() and (out / "phantom_000.nii.gz").is_file()


def test_report_marks_collapsed_and_warned_seeds():
    from seg_transfer.study.analysis import learning_curves
    from seg_transfer.study.report import collapse_cell

    runs = [_record("imagenet", s, [0.8] * 3) for s in range(3)]
    runs[0].collapsed, runs[2].collapse_warnings = ["Anterior"], 2
    (row,) = learning_curves(runs)
    assert collapse_cell(row) == "s0 (s2)"


def test_one_seed_gets_no_verdict():
    from seg_transfer.study.analysis import ONE_SEED

    records = [_record("scratch", 0, np.linspace(0.6, 0.9, 30)), _record("imagenet", 0, np.linspace(0.6, 0.9, 30) - 0.3)]
    (row,) = paired_comparisons(records, "scratch", alpha=0.01)
    assert row["verdict"] == ONE_SEED and not row["negative_transfer"]
