"""`seg-transfer compare`: study config checks, paired statistics on known inputs, a tiny two-arm study end to
end on phantoms, and resuming a half-finished study."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from seg_transfer.cli import main
from seg_transfer.config import ConfigError
from seg_transfer.data.phantoms import make_phantom_dataset
from seg_transfer.data.splits import load_splits, training_subset
from seg_transfer.study.analysis import (AHEAD, BEHIND, NEGATIVE, NEUTRAL, POSITIVE, learning_curves, paired_comparisons,
                                         peer_comparisons, time_to_target)
from seg_transfer.study.config import load_study_config
from seg_transfer.study.plan import plan_runs
from seg_transfer.study.report import (NO_PAIRS, log_tick_label, peer_comparison_table, peer_labels, target_table,
                                       write_report)
from seg_transfer.study.parallel import _dispatch
from seg_transfer.study.runner import RunRecord
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    """Ten labelled 32x32x12 phantoms: 3 test, 2 validation, 5 in the training pool."""
    return make_phantom_dataset(tmp_path_factory.mktemp("study_phantoms"), n_train=10, n_test=0, shape=(32, 32, 12), seed=5)


def write_study(folder: Path, root: Path, **changes) -> Path:
    base = tiny_config(root, **{"data.slices_per_epoch": 16})
    base["training"]["stages"] = [{"name": "decoder", "train": "decoder", "epochs": 1, "lr": 3e-3},
                                  {"name": "all", "train": "all", "epochs": 1, "lr": 1e-3}]
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"name": "tiny", "base_config": "base.yaml",
             "arms": [{"name": "staged"}, {"name": "scratch", "scratch_control": True}],
             "train_sizes": [2, "all"], "seeds": [0], "target_dice": 0.01,
             "split": {"test_fraction": 0.3, "val_fraction": 0.2, "seed": 0}, **changes}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def record(arm: str, size: int, seed: int, scores: list[float], curve=None) -> RunRecord:
    test = {f"case{i:02d}": {"a": s, "b": s} for i, s in enumerate(scores)}
    return RunRecord(arm, size, seed, Path("."), 0.5, 2, 10.0, test, curve or [])


# ----------------------------------------------------------------------------- statistics on known inputs


def test_consistently_worse_arm_is_flagged_as_negative_transfer():
    rng = np.random.default_rng(0)
    control = rng.uniform(0.6, 0.9, 15)
    records = [record(arm, 10, seed, list(control - shift - (rng.uniform(0, 0.01, 15) if shift else 0)))
               for seed in (0, 1) for arm, shift in (("scratch", 0.0), ("imagenet", 0.05))]
    (row,) = paired_comparisons(records, "scratch", alpha=0.05)
    assert row["n"] == 15 and row["mean_difference"] == pytest.approx(-0.055, abs=0.006)
    assert row["ci_high"] < 0 and row["p_value"] < 0.001  # all 15 differences negative: exact p = 2 / 2**15
    assert row["verdict"] == NEGATIVE and row["negative_transfer"]


def test_worse_than_another_pretrained_arm_is_not_negative_transfer():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, 15)
    records = [record(arm, 10, seed, list(base - shift)) for seed in (0, 1, 2)
               for arm, shift in (("scratch", 0.05), ("imagenet", 0.0), ("imagenet_mean", 0.01))]
    rows = paired_comparisons(records, [("imagenet", "scratch"), ("imagenet_mean", "scratch"), ("imagenet_mean", "imagenet")],
                              alpha=0.05, scratch_arms={"scratch"})
    worse = rows[-1]
    assert worse["verdict"] == NEGATIVE and not worse["negative_transfer"]  # worse than ImageNet, still ahead of scratch
    assert [r["verdict"] for r in rows[:2]] == [POSITIVE, POSITIVE]


def test_better_and_indistinguishable_arms():
    rng = np.random.default_rng(1)
    control = rng.uniform(0.6, 0.9, 15)
    noise = rng.normal(0, 0.02, 15)
    records = [r for seed in (0, 1) for r in (
        record("scratch", 5, seed, list(control)), record("imagenet", 5, seed, list(control + 0.04)),
        record("scratch", 20, seed, list(control)), record("imagenet", 20, seed, list(control + noise - noise.mean())))]
    rows = {r["size"]: r for r in paired_comparisons(records, "scratch", alpha=0.05)}
    assert rows[5]["verdict"] == POSITIVE and rows[5]["mean_difference"] == pytest.approx(0.04)
    assert rows[20]["verdict"] == NEUTRAL and not rows[20]["negative_transfer"]
    assert rows[20]["mean_difference"] == pytest.approx(0.0, abs=1e-12)


def test_seeds_are_averaged_per_case_before_pairing():
    records = [record("scratch", 5, 0, [0.5, 0.7]), record("scratch", 5, 1, [0.7, 0.9]),
               record("imagenet", 5, 0, [0.8, 0.8]), record("imagenet", 5, 1, [0.8, 0.8])]
    (curve_scratch,) = [r for r in learning_curves(records) if r["arm"] == "scratch"]
    assert curve_scratch["n_cases"] == 2 and curve_scratch["test_dice"] == pytest.approx(0.7)
    assert curve_scratch["seed_means"] == pytest.approx([0.6, 0.8])
    (row,) = paired_comparisons(records, "scratch", alpha=0.05)
    assert row["n"] == 2 and row["mean_difference"] == pytest.approx(0.1)  # (0.8-0.6 + 0.8-0.8) / 2


def test_an_arm_can_name_its_own_control():
    """Two geometries, each against its own scratch network: every pair is compared with its own control,
    the study's control still with the study's; a mapping leaves out arms it does not name."""
    base = [0.6, 0.7, 0.8]
    records = [record(arm, 10, seed, [b + shift for b in base]) for seed in (0, 1)
               for arm, shift in (("scratch", 0.0), ("imagenet", 0.01), ("scratch_z1", 0.05), ("imagenet_z1", 0.08))]
    rows = {r["arm"]: r for r in paired_comparisons(records, {"imagenet": "scratch", "imagenet_z1": "scratch_z1",
                                                              "scratch_z1": "scratch"}, alpha=0.05)}
    assert {arm: (r["control"], round(r["mean_difference"], 3)) for arm, r in rows.items()} == {
        "imagenet": ("scratch", 0.01), "imagenet_z1": ("scratch_z1", 0.03), "scratch_z1": ("scratch", 0.05)}
    assert {r["arm"] for r in paired_comparisons(records, {"imagenet": "scratch"}, alpha=0.05)} == {"imagenet"}


def test_every_arm_is_paired_with_every_peer_schedule_on_the_seeds_both_have():
    """nnU-Net rows (one per subset seed and epoch count, with per-case Dice) become one pseudo-arm per schedule:
    each of our arms is compared with it on the shared seeds and cases, ahead / behind instead of transfer verdicts,
    with both sides' mean minutes; rows without per-case Dice (older files) are left out."""
    rng = np.random.default_rng(2)
    base = rng.uniform(0.6, 0.9, 12)
    records = [record(arm, 10, seed, list(base + shift + rng.uniform(0, 0.004, 12))) for seed in (0, 1, 2)
               for arm, shift in (("imagenet", 0.03), ("scratch", -0.04))]

    def peer(seed, epochs, seconds):
        return {"peer": "nnU-Net v2", "configuration": "3d_fullres", "size": 10, "seed": seed, "epochs": epochs,
                "train_seconds": seconds, "test_dice": {f"case{i:02d}": {"a": b, "b": b} for i, b in enumerate(base)}}

    peers = [peer(s, 5, 2400.0 + 60 * s) for s in (0, 1, 2)] + [peer(1, 2, 900.0), peer(2, 2, 960.0)]
    peers.append({**peer(0, 2, 880.0), "test_dice": {}})  # an old row without per-case Dice: not paired
    rows = {(r["arm"], r["control"]): r for r in peer_comparisons(records, peers, alpha=0.01)}
    assert sorted(rows) == [("imagenet", "nnU-Net v2 3d_fullres 2 ep"), ("imagenet", "nnU-Net v2 3d_fullres 5 ep"),
                            ("scratch", "nnU-Net v2 3d_fullres 2 ep"), ("scratch", "nnU-Net v2 3d_fullres 5 ep")]
    ahead, behind = rows["imagenet", "nnU-Net v2 3d_fullres 5 ep"], rows["scratch", "nnU-Net v2 3d_fullres 5 ep"]
    assert ahead["seeds"] == [0, 1, 2] and ahead["mean_difference"] == pytest.approx(0.032, abs=0.003)
    assert ahead["verdict"] == AHEAD and behind["verdict"] == BEHIND and not behind["negative_transfer"]
    assert ahead["arm_seconds"] == 10.0 and ahead["peer_seconds"] == pytest.approx(2460.0)
    assert rows["imagenet", "nnU-Net v2 3d_fullres 2 ep"]["seeds"] == [1, 2]
    assert rows["imagenet", "nnU-Net v2 3d_fullres 2 ep"]["peer_seconds"] == pytest.approx(930.0)
    (cells,) = peer_comparison_table({"peer_comparisons": [ahead]})[1]
    assert cells[:4] == ["imagenet vs nnU-Net v2 3d_fullres 5 ep", "10", "3 x 12", "0.2 / 41.0"] and cells[-1] == AHEAD


def test_a_continued_arm_is_timed_against_the_peer_with_the_runs_it_needed_first():
    """A student (continues its teacher, learns from its labels) is compared with nnU-Net at its own minutes plus
    its teacher's, as the time to target counts them; the teacher alone at its own; the table names what is added."""
    base = [0.7, 0.8, 0.75]
    records = [replace(record(arm, 5, seed, [b + shift for b in base]), seconds=seconds) for seed in (3, 4)
               for arm, shift, seconds in (("teacher", 0.0, 600.0 + seed), ("student", 0.01, 540.0))]
    peers = [{"peer": "nnU-Net v2", "configuration": "3d_fullres", "size": 5, "seed": seed, "epochs": 2,
              "train_seconds": 1200.0, "test_dice": {f"case{i:02d}": {"a": b, "b": b} for i, b in enumerate(base)}}
             for seed in (3, 4)]
    rows = {r["arm"]: r for r in peer_comparisons(records, peers, alpha=0.01, needs={"student": ["teacher"]})}
    assert rows["student"]["arm_seconds"] == pytest.approx(540.0 + 603.5) and rows["student"]["arm_seconds_include"] == ["teacher"]
    assert rows["teacher"]["arm_seconds"] == pytest.approx(603.5) and rows["teacher"]["arm_seconds_include"] == []
    assert peer_comparisons(records, peers, alpha=0.01)[1]["arm_seconds"] == pytest.approx(540.0)  # no needs: own seconds
    cells = {r[0]: r[3] for r in peer_comparison_table({"peer_comparisons": list(rows.values())})[1]}
    assert cells == {"teacher vs nnU-Net v2 3d_fullres 2 ep": "10.1 / 20.0",
                     "student vs nnU-Net v2 3d_fullres 2 ep": "19.1 with teacher / 20.0"}


def test_an_arm_is_also_compared_with_the_arms_it_names_beside_its_control(tmp_path, study_root):
    """``also_against``: imagenet_x3 against its own scratch network (its control) and against the default
    (the decision a scale ablation needs); each pair gets its own row, in the arms' order, without repeats."""
    arms = [{"name": "imagenet"}, {"name": "scratch", "scratch_control": True},
            {"name": "imagenet_x3", "control": "scratch_x3", "also_against": ["imagenet", "scratch_x3"]},
            {"name": "scratch_x3", "scratch_control": True, "also_against": ["scratch"]}]
    study = load_study_config(write_study(tmp_path, study_root, arms=arms))
    assert study.comparisons() == [("imagenet", "scratch"), ("imagenet_x3", "scratch_x3"), ("scratch_x3", "scratch"),
                                   ("imagenet_x3", "imagenet")]
    base = [0.6, 0.7, 0.8]
    records = [record(arm, 10, seed, [b + shift for b in base]) for seed in (0, 1)
               for arm, shift in (("imagenet", 0.05), ("scratch", 0.0), ("imagenet_x3", 0.07), ("scratch_x3", 0.04))]
    rows = paired_comparisons(records, study.comparisons(), alpha=0.05)
    assert [(r["arm"], r["control"], round(r["mean_difference"], 3)) for r in rows] == [
        ("imagenet", "scratch", 0.05), ("imagenet_x3", "scratch_x3", 0.03), ("imagenet_x3", "imagenet", 0.02),
        ("scratch_x3", "scratch", 0.04)]


def test_time_to_target_uses_the_first_epoch_reaching_it():
    fast = [{"epoch": 1, "elapsed": 10.0, "val_dice": 0.5}, {"epoch": 2, "elapsed": 20.0, "val_dice": 0.85}]
    slow = [{"epoch": 1, "elapsed": 12.0, "val_dice": 0.2}, {"epoch": 2, "elapsed": 24.0, "val_dice": 0.7}]
    records = [record("imagenet", 5, 0, [0.8], fast), record("imagenet", 5, 1, [0.8], slow), record("scratch", 5, 0, [0.8], slow)]
    rows = {r["arm"]: r for r in time_to_target(records, 0.8)}
    assert rows["imagenet"]["reached"] == 1 and rows["imagenet"]["runs"] == 2 and rows["imagenet"]["seconds"] == 20.0
    assert rows["scratch"]["reached"] == 0 and rows["scratch"]["seconds"] is None


def test_time_to_target_of_a_continued_run_includes_the_runs_it_needed(tmp_path, study_root):
    """A student that continues its teacher (``weights_from`` and ``pseudo_labels_from`` the same arm) counts the
    teacher's training once; a run continuing the student counts both; the report says whose time is included."""
    arms = [{"name": "teacher"}, {"name": "student", "pseudo_labels_from": "teacher", "weights_from": "teacher"},
            {"name": "again", "weights_from": "student"}]
    study = load_study_config(write_study(tmp_path, study_root, arms=arms, control="teacher"))
    assert study.prerequisite_arms() == {"student": ["teacher"], "again": ["student"]}
    reach = [{"epoch": 1, "elapsed": 5.0, "val_dice": 0.5}, {"epoch": 2, "elapsed": 8.0, "val_dice": 0.9}]
    records = [replace(record(arm, 10, 0, [0.8], reach), seconds=seconds)
               for arm, seconds in (("teacher", 100.0), ("student", 40.0), ("again", 30.0))]
    records.append(replace(record("teacher", 10, 1, [0.8], reach), seconds=70.0))  # no student of seed 1
    rows = {r["arm"]: r for r in time_to_target(records, 0.8, study.prerequisite_arms())}
    assert rows["teacher"]["seconds"] == 8.0 and rows["teacher"]["includes"] == []
    assert rows["student"]["seconds"] == 108.0 and rows["student"]["includes"] == ["teacher"]
    assert rows["again"]["seconds"] == 148.0 and set(rows["again"]["includes"]) == {"student", "teacher"}
    assert rows["again"]["epochs"] == 2.0  # its own epochs
    assert time_to_target(records, 0.8)[2]["seconds"] == 8.0  # without the chain: its own clock
    (cells,) = [row for row in target_table({"time_to_target": list(rows.values())})[1] if row[0] == "student"]
    assert cells[4] == "108" and cells[-1] == "teacher's training"


def test_training_subsets_are_nested_and_seeded():
    pool = [f"c{i}" for i in range(20)]
    small, large = training_subset(pool, 5, seed=3), training_subset(pool, 12, seed=3)
    assert set(small) <= set(large) and len(large) == 12
    assert training_subset(pool, 5, seed=3) == small != training_subset(pool, 5, seed=4)
    with pytest.raises(ValueError, match="size"):
        training_subset(pool, 21, seed=0)


# ----------------------------------------------------------------------------- study config


def test_study_plan_fixes_test_and_val_and_shares_subsets_across_arms(tmp_path, study_root):
    study = load_study_config(write_study(tmp_path, study_root, seeds=[0, 1]))
    cases, specs = plan_runs(study, tmp_path / "out")
    assert len(specs) == 2 * 2 * 2 and {s.size for s in specs} == {2, 5}
    assert len(cases.test) == 3 and len(cases.val) == 2 and len(cases.pool) == 5
    for spec in specs:
        assert spec.splits["test"] == cases.test and spec.splits["val"] == cases.val
        assert not set(spec.splits["train"]) & (set(cases.test) | set(cases.val))
    by_key = {(s.arm, s.size, s.seed): s for s in specs}
    for size in (2, 5):
        for seed in (0, 1):
            assert by_key["staged", size, seed].splits == by_key["scratch", size, seed].splits
    staged, scratch = by_key["staged", 5, 0].config, by_key["scratch", 5, 0].config
    assert staged.model.encoder_weights == "none" and len(staged.training.stages) == 2
    assert len(scratch.training.stages) == 1 and scratch.training.stages[0].epochs == 2
    assert staged.data == scratch.data and staged.seed == scratch.seed == 0


@pytest.mark.parametrize("changes, message", [
    ({"control": "imagenet"}, "'control': 'imagenet' is not an arm; the arms are staged, scratch"),
    ({"train_sizes": [2, 50]}, r"train_sizes \[50\] exceed the 5 cases"),
    ({"arms": [{"name": "staged"}, {"name": "scratch", "set": {"training.stages.0.epochs": 3}}]}, "different training budgets"),
    ({"arms": [{"name": "staged"}, {"name": "scratch", "set": {"training.stages.0.lr": "fast"}}]}, "training.stages.0.lr"),
    ({"seeds": [0, 0]}, "seeds has duplicates"),
    ({"arms": [{"name": "staged", "control": "nope"}, {"name": "scratch"}]}, "arm 'staged': 'control': 'nope' is not another arm"),
    ({"arms": [{"name": "staged", "also_against": ["staged"]}, {"name": "scratch"}]},
     "arm 'staged': 'also_against': 'staged' is not another arm"),
])
def test_study_config_errors_are_one_line(tmp_path, study_root, changes, message):
    path = write_study(tmp_path, study_root, **changes)
    with pytest.raises(ConfigError, match=message) as info:
        plan_runs(load_study_config(path), tmp_path / "out")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- end to end and resume


def test_tiny_study_end_to_end_and_resume(tmp_path, study_root, capsys):
    study_path, out = write_study(tmp_path, study_root), tmp_path / "study"
    assert main(["compare", "--config", str(study_path), "--output", str(out), "--max-runs", "2"]) == 0
    assert "2 of 4 runs finished" in capsys.readouterr().out
    first_two = sorted(out.glob("runs/*/*/checkpoints/best.pt"))
    assert len(first_two) == 2
    stamps = {p: p.stat().st_mtime_ns for p in first_two}
    half = json.loads((out / "results.json").read_text())
    assert half["study"]["finished_runs"] == 2 and half["study"]["total_runs"] == 4

    peer = {"peer": "nnU-Net v2", "configuration": "3d_fullres", "size": 5, "seed": 0, "epochs": 1, "train_seconds": 390.0,
            "threads": 2, "test_dice_mean": 0.7004, "test_dice": {}}
    other_size = {**peer, "size": 140, "test_dice_mean": 0.9}  # a peer file shared with a study of other sizes
    (out / "peer_nnunet.json").write_text(json.dumps({"rows": [peer, other_size]}))
    assert main(["compare", "--config", str(study_path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 runs finished" in printed
    assert {p: p.stat().st_mtime_ns for p in first_two} == stamps  # finished runs were not trained again
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["finished_runs"] == 4
    test_cases = set(results["study"]["test_cases"])
    for run in results["runs"]:
        splits = load_splits(Path(run["run_dir"]) / "splits.json")
        assert set(splits["test"]) == test_cases and not test_cases & set(splits["train"] + splits["val"])
        assert 0.0 <= run["test_dice_mean"] <= 1.0 and run["curve"] and run["epochs"] == 2
        evaluation = json.loads((Path(run["run_dir"]) / "test_evaluation" / "metrics.json").read_text())
        assert {c["case"] for c in evaluation["cases"]} == test_cases
    assert {(r["arm"], r["size"]) for r in results["learning_curves"]} == {(a, n) for a in ("staged", "scratch") for n in (2, 5)}
    comparisons = results["comparisons"]
    assert [(c["arm"], c["control"], c["size"], c["n"]) for c in comparisons] == [("staged", "scratch", 2, 3), ("staged", "scratch", 5, 3)]
    for comparison in comparisons:
        assert comparison["verdict"] in printed
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "Paired comparison" in html
    assert "| staged vs scratch | 5 | 1 x 3 |" in (out / "report.md").read_text(encoding="utf-8")
    assert "| nnU-Net v2 3d_fullres 1 ep | 5 | 0 | 0.700 | 6.5 | 2 |" in (out / "report.md").read_text(encoding="utf-8")
    assert [row["size"] for row in results["peers"]] == [5]  # only the sizes this study trains
    assert {run["steps"] for run in results["runs"]} == {2 * 16 // 8}  # same steps at 2 and 5 training cases
    for name in ("learning_curve.png", "paired_difference.png", "convergence.png", "dice_vs_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a report without any arm-control pair draws no empty axes and removes the figure an earlier report left
    write_report({**results, "comparisons": []}, out)
    assert not (out / "paired_difference.png").exists()
    assert NO_PAIRS in (out / "report.md").read_text(encoding="utf-8")
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3


def test_a_study_before_its_first_run_already_names_its_cases_for_the_nnunet_peer(tmp_path, study_root, capsys):
    """``--max-runs 0`` on a new study trains nothing but writes results.json with the design, which is what
    benchmarks/nnunet_peer.py reads to train nnU-Net on the same cases before (or instead of) the arms."""
    from tests.test_nnunet_peer import nnunet_peer

    study_path, out = write_study(tmp_path, study_root), tmp_path / "study"
    assert main(["compare", "--config", str(study_path), "--output", str(out), "--max-runs", "0"]) == 0
    printed = capsys.readouterr().out
    assert "0 of 4 runs finished" in printed and "no run finished yet" in printed
    assert not list(out.glob("runs/*/*/checkpoints/*.pt")) and not (out / "report.md").exists()
    peer_view = nnunet_peer.load_study(out)
    design = json.loads((out / "results.json").read_text())["study"]
    assert design["finished_runs"] == 0 and sorted(peer_view.subsets) == ["n2_seed0", "n5_seed0"]
    assert len(peer_view.subsets["n2_seed0"]) == 2 and set(peer_view.subsets["n2_seed0"]) < set(peer_view.subsets["n5_seed0"])
    assert len(peer_view.test_images) == 3 and len(peer_view.val) == 2
    assert not set(peer_view.val) & set(peer_view.subsets["n5_seed0"])


def test_study_refuses_a_changed_config_for_existing_runs(tmp_path, study_root, capsys):
    study_path, out = write_study(tmp_path, study_root, train_sizes=[2]), tmp_path / "study"
    assert main(["compare", "--config", str(study_path), "--output", str(out), "--max-runs", "1"]) == 0
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["training"]["stages"][1]["lr"] = 5e-4
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    capsys.readouterr()
    assert main(["compare", "--config", str(study_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "n002_seed0: holds a run with another config (differs in training)" in err and len(err.splitlines()) == 1


def test_parallel_processes_train_the_same_runs_as_one_process(tmp_path, study_root, capsys, caplog):
    """--processes 2 trains the runs in two spawned workers and reports them: same runs, same test Dice."""
    study_path = write_study(tmp_path, study_root, train_sizes=[2])
    assert main(["compare", "--config", str(study_path), "--output", str(tmp_path / "serial")]) == 0
    with caplog.at_level(logging.INFO, logger="seg_transfer.study.parallel"):
        assert main(["compare", "--config", str(study_path), "--output", str(tmp_path / "parallel"), "--processes", "2"]) == 0
    assert "2 of 2 runs finished" in capsys.readouterr().out
    assert "2 run(s) finished; 0 training" in caplog.text  # progress while the workers train
    serial, parallel = (json.loads((tmp_path / name / "results.json").read_text())["runs"] for name in ("serial", "parallel"))
    assert [(r["arm"], r["seed"]) for r in parallel] == [(r["arm"], r["seed"]) for r in serial]
    for ours, theirs in zip(parallel, serial):
        assert ours["test_dice_mean"] == pytest.approx(theirs["test_dice_mean"], abs=1e-4)
    logs = {path.name: path.read_text() for path in (tmp_path / "parallel" / "logs").iterdir()}
    assert sorted(logs) == ["process_0_of_2.log", "process_1_of_2.log"]
    assert all(f"{arm}/n002_seed0" in "".join(logs.values()) for arm in ("staged", "scratch"))


def test_a_run_another_shard_finishes_meanwhile_is_in_this_shards_report(tmp_path, study_root, monkeypatch):
    """Shard 1/2 trains plan run 2 while shard 0/2 finishes plan run 1: shard 1's report holds both runs
    (it used to look at run 1 before training its own and leave it out)."""
    from seg_transfer.study import runner

    study = load_study_config(write_study(tmp_path, study_root, train_sizes=[2]))
    out = tmp_path / "study"
    _, specs = plan_runs(study, out)
    real_complete_run = runner.complete_run

    def other_shard_finishes_first_run_meanwhile(spec, *args):
        if spec.key == specs[1].key and not runner.is_evaluated(specs[0]):
            real_complete_run(specs[0], *args)  # what shard 0/2 does in its own process at the same time
        return real_complete_run(spec, *args)

    monkeypatch.setattr(runner, "complete_run", other_shard_finishes_first_run_meanwhile)
    progress = runner.run_study(study, out, device="cpu", shard=(1, 2))
    assert [(r.arm, r.seed) for r in progress.records] == [(s.arm, s.seed) for s in specs]


def test_a_free_worker_takes_the_next_run_so_runs_of_unequal_cost_keep_every_worker_busy(tmp_path, study_root):
    """Four runs, the first eight times as long as the others, two workers: one trains the long run while the
    other trains the three short ones (dealing two runs to each would leave a worker idle most of the time);
    runs already evaluated are never handed out. Workers are threads here, spawned processes in compare."""
    _, specs = plan_runs(load_study_config(write_study(tmp_path, study_root)), tmp_path / "study")
    assert len(specs) == 4
    seconds = {0: 0.8, 1: 0.1, 2: 0.1, 3: 0.1}
    tasks, results, taken = queue.Queue(), queue.Queue(), {0: [], 1: []}

    def worker(number: int) -> None:
        while (index := tasks.get()) is not None:
            results.put(("start", index, number, None))
            time.sleep(seconds[index])
            taken[number].append(index)
            results.put(("done", index, number, None if index != 3 else "it broke"))

    workers = [threading.Thread(target=worker, args=(number,)) for number in (0, 1)]
    for thread in workers:
        thread.start()
    failed = []
    _dispatch(specs, [0, 1, 2, 3], workers, [Path("a.log"), Path("b.log")], tasks, results, failed, poll_seconds=0.05)
    for thread in workers:
        tasks.put(None)
    for thread in workers:
        thread.join()
    assert sorted(taken.values()) == [[0], [1, 2, 3]]
    assert failed == [f"{specs[3].key}: it broke (log {'b.log' if 3 in taken[1] else 'a.log'})"]


def test_shard_and_processes_together_are_refused_in_one_line(tmp_path, study_root, capsys):
    study_path, out = write_study(tmp_path, study_root, train_sizes=[2]), tmp_path / "study"
    assert main(["compare", "--config", str(study_path), "--output", str(out), "--shard", "1/2", "--processes", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "use either --shard or --processes, not both" in line
    assert not list(out.glob("runs/*/*/checkpoints"))  # refused before any training


def test_a_failed_parallel_run_is_reported_in_one_line_and_the_rest_still_counts(tmp_path, study_root, capsys):
    study_path, out = write_study(tmp_path, study_root, train_sizes=[2]), tmp_path / "study"
    _, specs = plan_runs(load_study_config(study_path), out)
    broken = specs[1].run_dir / "splits.json"  # this run finds other splits in its folder
    broken.parent.mkdir(parents=True)
    broken.write_text(json.dumps({"train": ["x"], "val": ["y"], "test": ["z"]}))
    assert main(["compare", "--config", str(study_path), "--output", str(out), "--processes", "2"]) == 1
    captured = capsys.readouterr()
    assert "1 of 2 runs finished" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"error: run {specs[1].key}: ") and "holds other splits" in line and "process_" in line
    log_file = line.split("(log ")[1].split(")")[0]
    assert "holds other splits" in Path(log_file).read_text()
    assert json.loads((out / "results.json").read_text())["study"]["finished_runs"] == 1


# ----------------------------------------------------------------------------- encoder ranking as study arms


def test_ranking_agreement_on_known_scores():
    """tau +1 when a score orders the arms as their test Dice does; a swapped pair is named and lowers tau;
    every (score, stride) gets its row, the first score's strides first."""
    from seg_transfer.study.transferability import agreement

    dice = {"a": 0.80, "b": 0.75, "c": 0.70, "d": 0.60}
    records = [record(arm, 10, seed, [value + 0.01 * seed] * 4) for arm, value in dice.items() for seed in (0, 1, 2)]
    for record_ in records:
        record_.seconds = 200.0
    logme = {"a": 1.0, "b": 0.9, "c": 0.5, "d": 0.1}
    scores = {(r.arm, 10, r.seed): {"values": {("logme", 8): logme[r.arm], ("logme", 4): -logme[r.arm], ("gbc", 8): -logme[r.arm],
                                               ("gbc", 4): logme[r.arm]},
                                    "seconds": 10.0, "strides": [8, 4], "scores": ["logme", "gbc"]}
              for r in records}
    row, reversed_row, gbc_8, gbc_4 = agreement(records, scores)
    assert row["stride"] == 8 and reversed_row["stride"] == 4 and reversed_row["kendall_tau"] == pytest.approx(-1.0)
    assert (gbc_8["score"], gbc_8["stride"], gbc_4["stride"]) == ("gbc", 8, 4)
    assert gbc_8["kendall_tau"] == pytest.approx(-1.0) and gbc_4["kendall_tau"] == pytest.approx(1.0)
    assert row["kendall_tau"] == pytest.approx(1.0) and row["discordant"] == [] and row["seed_kendall_tau"] == [1.0] * 3
    assert row["best_by_score"] == row["best_by_dice"] == "a" and row["cost_ratio"] == pytest.approx(0.05)
    for seed in (0, 1, 2):
        scores[("d", 10, seed)]["values"][("logme", 8)] = 2.0  # d looks best, is worst
    row, *_ = agreement(records, scores)
    assert row["kendall_tau"] == pytest.approx(0.0) and row["best_by_score"] == "d"
    assert row["discordant"] == ["d over a", "d over b", "d over c"]


def test_ranking_candidates_share_a_score_by_encoder_and_weights_and_in_3d_by_inflation(tmp_path):
    """Arms with the same encoder and weights are one candidate; a 2.5D arm's (ignored) inflation setting does
    not split it, while 3D arms that inflate differently are different candidates."""
    from seg_transfer.config import config_from_dict
    from seg_transfer.study.plan import RunSpec
    from seg_transfer.study.transferability import candidate_key

    def spec(arm: str, **model) -> RunSpec:
        raw = tiny_config(tmp_path)
        raw["model"].update(model)
        return RunSpec(arm, 10, 0, config_from_dict(raw), tmp_path / arm, {})

    staged, unstaged = spec("staged", inflation="centre"), spec("unstaged", inflation="mean")
    assert candidate_key(staged) == candidate_key(unstaged) == ("tu-tf_efficientnet_lite0", "none", None)
    centre, mean = spec("centre", dims="3d", inflation="centre"), spec("mean", dims="3d", inflation="mean")
    assert (candidate_key(centre)[2], candidate_key(mean)[2]) == ("centre", "mean")


def test_report_lists_every_score_of_every_arm_at_the_study_stride():
    """The per-arm table shows all declared scores (not only the first) with each arm's rank under each,
    arms in test Dice order: a score that reverses fine-tuning's order shows ranks 4..1."""
    from seg_transfer.study.report import scores_by_arm_table
    from seg_transfer.study.transferability import agreement

    dice = {"a": 0.80, "b": 0.75, "c": 0.70, "d": 0.60}
    records = [record(arm, 10, seed, [value] * 4) for arm, value in dice.items() for seed in (0, 1)]
    for record_ in records:
        record_.seconds = 100.0
    logme = {"a": 1.0, "b": 0.9, "c": 0.5, "d": 0.1}
    scores = {(r.arm, 10, r.seed): {"values": {("logme", 8): logme[r.arm], ("gbc", 8): -logme[r.arm], ("logme", 4): 0.0,
                                               ("gbc", 4): 0.0},
                                    "seconds": 1.0, "strides": [8, 4], "scores": ["logme", "gbc"]} for r in records}
    header, rows = scores_by_arm_table({"transferability": agreement(records, scores)}, size=10, stride=8)
    assert header == ["arm (best test Dice first)", "test Dice (mean)", "LogME (rank)", "GBC (rank)"]
    assert [row[0] for row in rows] == ["a", "b", "c", "d"]
    assert [row[2] for row in rows] == ["1.0000 (1)", "0.9000 (2)", "0.5000 (3)", "0.1000 (4)"]
    assert [row[3] for row in rows] == ["-1.0000 (4)", "-0.9000 (3)", "-0.5000 (2)", "-0.1000 (1)"]
    assert scores_by_arm_table({"transferability": []}, size=10, stride=8) == ([], [])


def test_unknown_study_score_is_refused_before_any_training(tmp_path, study_root, capsys):
    study_path = write_study(tmp_path, study_root, train_sizes=[2], seeds=[0], rank_encoders={"scores": ["logme", "hscore"]})
    assert main(["compare", "--config", str(study_path), "--output", str(tmp_path / "study")]) == 2
    assert "'rank_encoders.scores': unknown transferability score 'hscore'; choose from logme, gbc, variety, cc, ccfv" in capsys.readouterr().err
    assert not (tmp_path / "study" / "runs").exists()


def test_study_ranks_the_arms_encoders_on_each_training_subset(tmp_path, study_root):
    arms = [{"name": "imagenet", "set": {"model.encoder_weights": "imagenet"}}, {"name": "staged"},
            {"name": "scratch", "scratch_control": True}]
    study_path = write_study(tmp_path, study_root, train_sizes=[2], seeds=[0, 1], arms=arms,
                             rank_encoders={"pixels": 60, "strides": [8]})
    out = tmp_path / "study"
    assert main(["compare", "--config", str(study_path), "--output", str(out)]) == 0
    logme = {}
    for seed in (0, 1):
        ranking = json.loads((out / "rank_encoders" / f"n002_seed{seed}" / "ranking.json").read_text())
        splits = load_splits(out / "runs" / "staged" / f"n002_seed{seed}" / "splits.json")
        assert sorted(ranking["cases"]) == sorted(splits["train"])  # the runs' own training cases, nothing else
        assert sorted(row["candidate"] for row in ranking["ranking"]) == ["imagenet", "staged, scratch"]  # one score per encoder
        logme[seed] = {row["candidate"]: row["values"]["logme"] for row in ranking["ranking"]}
    (row,) = json.loads((out / "results.json").read_text())["transferability"]  # one size, one stride
    by_arm = {arm["arm"]: arm for arm in row["arms"]}
    assert by_arm["imagenet"]["seed_scores"] == [logme[0]["imagenet"], logme[1]["imagenet"]]
    assert by_arm["staged"]["seed_scores"] == by_arm["scratch"]["seed_scores"] == [logme[0]["staged, scratch"], logme[1]["staged, scratch"]]
    assert "## Encoder ranking (LogME) against fine-tuning, 2 training cases" in (out / "report.md").read_text(encoding="utf-8")
    assert (out / "transferability.png").read_bytes()[:4] == b"\x89PNG"

    # an arm added after the first ranking is ranked too (the subsets are re-ranked, not left without its score)
    write_study(tmp_path, study_root, train_sizes=[2], seeds=[0, 1], rank_encoders={"pixels": 60, "strides": [8]},
                arms=[*arms, {"name": "imagenet_again", "set": {"model.encoder_weights": "imagenet"}}])
    assert main(["compare", "--config", str(study_path), "--output", str(out), "--max-runs", "0"]) == 0
    ranking = json.loads((out / "rank_encoders" / "n002_seed0" / "ranking.json").read_text())
    assert sorted(row["candidate"] for row in ranking["ranking"]) == ["imagenet, imagenet_again", "staged, scratch"]


def test_report_p_values_never_print_as_zero():
    from seg_transfer.study.report import fmt_p, p_phrase

    assert fmt_p(3e-6) == "< 0.0001" and p_phrase(3e-6) == "< 0.0001"
    assert fmt_p(0.00005) == "0.0001" and fmt_p(0.01234) == "0.0123" and p_phrase(0.2) == "= 0.2000"
    assert p_phrase(0.0004, 3) == "< 0.001" and fmt_p(None) == "n/a"


def test_repeated_peer_runs_get_one_label_at_their_best_run():
    peers = [{"schedule": "2 ep", "size": 140, "train_seconds": 3270, "test_dice_mean": 0.843},
             {"schedule": "2 ep", "size": 140, "train_seconds": 3300, "test_dice_mean": 0.840},
             {"schedule": "2 ep", "size": 10, "train_seconds": 1800, "test_dice_mean": 0.814},
             {"schedule": "1 ep", "size": 140, "train_seconds": 1770, "test_dice_mean": 0.334}]
    assert peer_labels(peers) == [("2 ep, n=140 x2", (54.5, 0.843)), ("2 ep, n=10", (30.0, 0.814)),
                                  ("1 ep, n=140", (29.5, 0.334))]


def test_log_axis_labels_only_the_one_two_five_steps():
    labels = {v: log_tick_label(v) for v in (0.5, 2, 3, 10, 20, 30, 50, 80, 90, 100, 200, 300, 500)}
    assert labels == {0.5: "0.5", 2: "2", 3: "", 10: "10", 20: "20", 30: "", 50: "50", 80: "", 90: "",
                      100: "100", 200: "200", 300: "", 500: "500"}


def test_the_report_header_says_when_runs_took_unequal_steps_and_which_arms_continue_a_run():
    from seg_transfer.study.report import header_lines

    study = {"dataset": "d", "n_test": 4, "n_val": 2, "n_pool": 10, "arms": ["a", "b"], "control": "a", "seeds": [0],
             "finished_runs": 2, "total_runs": 2, "steps": [960], "continued_arms": {}}
    assert "Every run takes the same number of optimiser steps" in header_lines({"study": study})[0]
    unequal = {**study, "steps": [960, 1920], "continued_arms": {"b": "a"}}
    header = header_lines({"study": unequal})[0]
    assert "same number" not in header and "different numbers of optimiser steps on purpose (960 to 1920" in header
    assert header.endswith("b continues a's run of its seed: its steps come on top of that run's.")


def test_a_pair_listed_the_other_way_round_is_compared_once(tmp_path, study_root):
    """The control naming an arm in ``also_against`` that is compared with it anyway gives one row, not both signs."""
    arms = [{"name": "teacher"}, {"name": "continued", "also_against": ["teacher"]}]
    study = load_study_config(write_study(tmp_path, study_root, arms=arms, control="continued"))
    assert study.comparisons() == [("teacher", "continued")]
