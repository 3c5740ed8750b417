"""benchmarks/ensemble.py: which runs form an ensemble, the refusal of unfair ones, and the scoring of one."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from seg_transfer.checkpoint import Checkpoint
from tests.checkpoint_helpers import LABELS, save_random_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ensemble.py"
_SPEC = importlib.util.spec_from_file_location("ensemble_benchmark", SCRIPT)
ensemble = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ensemble)


def _run(arm: Path, name: str, train: list[str], seed: int = 0) -> Path:
    """A finished-looking run folder: splits.json and summary.json (training seconds)."""
    run = arm / name
    run.mkdir(parents=True)
    (run / "splits.json").write_text(json.dumps({"train": train, "val": ["v0"]}))
    (run / "summary.json").write_text(json.dumps({"seconds": 60.0 * (seed + 1)}))
    return run


def test_across_arms_pairs_only_run_names_present_in_every_arm(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed in (0, 1, 2):
        _run(a, f"n010_seed{seed}", ["c1", "c2"], seed)
    for seed in (1, 2):
        _run(b, f"n010_seed{seed}", ["c1", "c2"], seed)
    _run(b, "n020_seed1", ["c1", "c2"])  # outside the glob

    groups = ensemble.ensembles([a, b], "n010_seed*", across_seeds=False)

    assert groups == {"n010_seed1": [a / "n010_seed1", b / "n010_seed1"],
                      "n010_seed2": [a / "n010_seed2", b / "n010_seed2"]}
    assert ensemble.training_minutes(a / "n010_seed2") == pytest.approx(3.0)


def test_across_seeds_is_one_ensemble_of_the_first_arm(tmp_path):
    a = tmp_path / "imagenet"
    runs = [_run(a, f"n140_seed{seed}", ["c1"], seed) for seed in (0, 1, 2)]
    groups = ensemble.ensembles([a], "n140_seed*", across_seeds=True)
    assert groups == {"imagenet x 3 seeds": runs}
    assert ensemble.ensembles([a], "n010_seed*", across_seeds=True) == {}


def test_members_trained_on_other_cases_are_refused(tmp_path):
    same = [_run(tmp_path / "a", "n010_seed0", ["c1", "c2"]), _run(tmp_path / "b", "n010_seed0", ["c2", "c1"])]
    ensemble.check_same_training_cases(same)  # order does not matter
    other = _run(tmp_path / "c", "n010_seed0", ["c1", "c3"])
    with pytest.raises(SystemExit, match="trained on different cases"):
        ensemble.check_same_training_cases([same[0], other])


def test_report_gives_the_ensemble_minus_member_per_seed(capsys):
    cases = {"x": 0.5, "y": 0.7}
    rows = [(f"n010_seed{s}", {f"a/n010_seed{s}": cases, f"b/n010_seed{s}": {"x": 0.6, "y": 0.8}},
             {"x": 0.6 + 0.1 * s, "y": 0.8 + 0.1 * s}, 2.0) for s in (0, 1)]
    ensemble.report(rows)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| a |", "| b |"))]
    assert len(lines) == 2
    cells_a = [c.strip() for c in lines[0].split("|")]
    cells_b = [c.strip() for c in lines[1].split("|")]
    # against arm a: +0.1 on seed 0 and +0.2 on seed 1 (mean +0.15); against arm b: +0.0 and +0.1
    assert cells_a[1:5] == ["a", "2", "0.600", "0.750"]
    assert cells_a[5] == "n010_seed0 +0.100 · n010_seed1 +0.200"
    assert cells_a[6] == "+0.150"
    assert cells_b[6] == "+0.050"


def test_an_ensemble_of_one_network_twice_scores_as_that_network(phantom_root, tmp_path, one_thread):
    """Averaging two identical members' probabilities changes nothing; a perturbed member changes the ensemble."""
    images = sorted((phantom_root / "imagesTr").glob("*.nii.gz"))[:2]
    study = tmp_path / "study"
    labels = study / "test_cases" / "labels"
    labels.mkdir(parents=True)
    (study / "test_cases" / "images.txt").write_text("".join(f"{p}\n" for p in images))
    for image in images:
        os.symlink(phantom_root / "labelsTr" / image.name, labels / image.name)
    (study / "test_cases" / "labels.json").write_text(json.dumps({str(k): v for k, v in LABELS.items()}))
    first = save_random_checkpoint(phantom_root, tmp_path / "a" / "n010_seed0")
    twin = save_random_checkpoint(phantom_root, tmp_path / "b" / "n010_seed0")
    other = save_random_checkpoint(phantom_root, tmp_path / "c" / "n010_seed0")
    path = other / "checkpoints" / "best.pt"
    checkpoint = Checkpoint.load(path)
    torch.manual_seed(1)
    checkpoint.model = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() and v.ndim == 4 else v
                        for k, v in checkpoint.model.items()}
    checkpoint.save(path)

    alone = ensemble.predict_and_score([first], study, tmp_path / "out_alone", tta=False)
    twice = ensemble.predict_and_score([first, twin], study, tmp_path / "out_twice", tta=False)
    mixed = ensemble.predict_and_score([first, other], study, tmp_path / "out_mixed", tta=False)

    assert sorted(alone) == sorted(p.name.removesuffix(".nii.gz") for p in images)
    np.testing.assert_allclose([twice[c] for c in alone], [alone[c] for c in alone], atol=1e-6)
    assert any(abs(mixed[c] - alone[c]) > 1e-4 for c in alone)
