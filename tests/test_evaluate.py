"""Evaluation: metric values on constructed masks, the empty-mask policy, statistics, and the CLI."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg_transfer.cli import main
from seg_transfer.evaluation.case_metrics import (
    BOTH_EMPTY,
    PRED_EMPTY,
    REF_EMPTY,
    case_metrics,
    class_metrics,
)
from seg_transfer.evaluation.evaluate import EvaluationError, evaluate_folders, summarize_metric
from seg_transfer.evaluation.stats import bootstrap_ci, paired_comparison, wilcoxon_p

SHAPE = (20, 20, 20)
SPACING = (1.0, 1.0, 3.0)
# Surface voxels of a 10^3 cube: 10^3 - 8^3 = 488. Shifted one voxel along z (3 mm), in each direction
# the 100 voxels of the leading face are 3 mm from the other surface, and the 8x8 interior of the
# trailing face is min(3 mm, in-plane distance to the side wall) away: 28x1 + 20x2 + 16x3 = 116 mm.
CUBE_SURFACE = 488
Z_SHIFT_DISTANCE_SUM = 100 * 3.0 + 116.0  # per direction
Z_SHIFT_BEYOND_1MM = 100 + 20 + 16  # per direction


def cube(shift=(0, 0, 0), size=(10, 10, 10), start=5, label=1) -> np.ndarray:
    """uint8 label map with a box of ``label`` starting at ``start + shift``."""
    out = np.zeros(SHAPE, dtype=np.uint8)
    out[tuple(slice(start + d, start + d + n) for d, n in zip(shift, size))] = label
    return out


# ----------------------------------------------------------------------------- metric values


def test_cube_shifted_along_z_with_anisotropic_spacing():
    m = class_metrics(cube((0, 0, 1)) > 0, cube() > 0, SPACING, tolerance_mm=1.0)
    assert m.dice == pytest.approx(0.9, abs=1e-12)  # overlap 10*10*9 of two 1000-voxel cubes
    assert m.hd95_mm == pytest.approx(3.0)  # one slice = 3 mm
    assert m.assd_mm == pytest.approx(2 * Z_SHIFT_DISTANCE_SUM / (2 * CUBE_SURFACE), rel=1e-6)
    assert m.nsd == pytest.approx((CUBE_SURFACE - Z_SHIFT_BEYOND_1MM) / CUBE_SURFACE, rel=1e-6)
    assert class_metrics(cube((0, 0, 1)) > 0, cube() > 0, SPACING, tolerance_mm=3.0).nsd == pytest.approx(1.0)
    assert (m.ref_volume_ml, m.volume_diff_ml, m.volume_diff_pct) == (pytest.approx(3.0), 0.0, 0.0)


def test_cube_shifted_along_x_is_one_mm():
    m = class_metrics(cube((1, 0, 0)) > 0, cube() > 0, SPACING, tolerance_mm=1.0)
    assert m.dice == pytest.approx(0.9, abs=1e-6)
    assert m.hd95_mm == pytest.approx(1.0)
    assert m.nsd == pytest.approx(1.0)


def test_identical_masks_and_volume_difference():
    same = class_metrics(cube() > 0, cube() > 0, SPACING, 1.0)
    assert (same.dice, same.hd95_mm, same.assd_mm, same.nsd) == (pytest.approx(1.0), 0.0, 0.0, pytest.approx(1.0))
    bigger = class_metrics(cube(size=(10, 10, 11)) > 0, cube() > 0, SPACING, 1.0)  # one extra 0.3 ml slice
    assert bigger.pred_volume_ml == pytest.approx(3.3)
    assert bigger.volume_diff_ml == pytest.approx(0.3)
    assert bigger.volume_diff_pct == pytest.approx(10.0)


# ----------------------------------------------------------------------------- empty-mask policy


def test_both_empty_policy():
    metrics = case_metrics(cube(), cube(), SPACING, classes=[1, 2], tolerance_mm=1.0)
    m = metrics[2]
    assert m.status == BOTH_EMPTY and m.dice == 1.0
    assert all(math.isnan(v) for v in (m.hd95_mm, m.assd_mm, m.nsd, m.volume_diff_pct))
    assert m.volume_diff_ml == 0.0
    rows = [metrics[2], metrics[1]]
    hd = summarize_metric("hd95_mm", rows, n_resamples=200)
    assert (hd["n"], hd["n_missing"], hd["n_excluded"], hd["mean"]) == (1, 0, 1, 0.0)  # not counted
    dice = summarize_metric("dice", rows, n_resamples=200)
    assert (dice["n"], dice["mean"]) == (2, pytest.approx(1.0))  # both-empty Dice 1 is counted


def test_one_empty_policy():
    empty = np.zeros(SHAPE, dtype=bool)
    missed = class_metrics(empty, cube() > 0, SPACING, 1.0)
    assert missed.status == PRED_EMPTY and missed.dice == 0.0 and missed.nsd == 0.0
    assert math.isnan(missed.hd95_mm) and math.isnan(missed.assd_mm)
    assert missed.volume_diff_pct == pytest.approx(-100.0)
    spurious = class_metrics(cube() > 0, empty, SPACING, 1.0)
    assert spurious.status == REF_EMPTY and spurious.dice == 0.0
    assert math.isnan(spurious.hd95_mm) and math.isnan(spurious.volume_diff_pct)
    good = class_metrics(cube((0, 0, 1)) > 0, cube() > 0, SPACING, 1.0)
    hd = summarize_metric("hd95_mm", [good, missed, spurious], n_resamples=200)
    assert (hd["n"], hd["n_missing"], hd["n_excluded"]) == (3, 2, 0)  # missing, and counted
    assert hd["mean"] == pytest.approx(3.0)
    dice = summarize_metric("dice", [good, missed, spurious], n_resamples=200)
    assert dice["mean"] == pytest.approx(0.3, abs=1e-6)


# ----------------------------------------------------------------------------- statistics


def test_bootstrap_ci_constant_known_and_small_samples():
    const = bootstrap_ci([0.7] * 12)
    assert const.n == 12 and const.estimate == pytest.approx(0.7) and const.low == const.high == const.estimate
    sample = np.random.default_rng(1).normal(5.0, 1.0, size=40)
    ci = bootstrap_ci(sample, n_resamples=2000)
    assert ci.low < sample.mean() < ci.high and ci.high - ci.low < 1.5
    assert bootstrap_ci(sample, n_resamples=2000) == ci  # same seed, same interval
    median = bootstrap_ci(sample, statistic=np.median, n_resamples=2000)
    assert median.estimate == pytest.approx(np.median(sample)) and median.low <= median.estimate <= median.high
    one = bootstrap_ci([2.0, float("nan")])  # NaN dropped
    assert one.n == 1 and one.estimate == 2.0 and math.isnan(one.low)
    assert bootstrap_ci([]).n == 0 and math.isnan(bootstrap_ci([]).estimate)


def test_wilcoxon_and_paired_comparison():
    # All ten differences positive: exact two-sided p = 2 / 2^10.
    assert wilcoxon_p(np.arange(1.0, 11.0))[1] == pytest.approx(2 / 1024)
    b = np.linspace(0.6, 0.9, 12)
    shifted = paired_comparison(b + np.linspace(0.01, 0.05, 12), b, seed=0)
    assert shifted.n == 12 and shifted.p_value < 0.05
    assert shifted.mean_difference == pytest.approx(0.03)
    assert shifted.ci_low <= 0.03 <= shifted.ci_high
    same = paired_comparison(b, b)
    assert same.p_value == 1.0 and same.mean_difference == 0.0
    with_nan = paired_comparison([1.0, float("nan"), 3.0], [0.5, 1.0, 2.0])
    assert with_nan.n == 2 and with_nan.mean_difference == pytest.approx(0.75)
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- folders and CLI


def save(path: Path, labels: np.ndarray, spacing=SPACING) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, np.diag([*spacing, 1.0])), str(path))


@pytest.fixture()
def folders(tmp_path):
    """Two cases: 'a' (class 1 shifted along z, class 2 exact) and 'b' (class 1 exact, class 2 missed)."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    a_ref = cube()
    a_ref[0:3, 0:3, 0:3] = 2
    a_pred = cube((0, 0, 1))
    a_pred[0:3, 0:3, 0:3] = 2
    b_ref = cube()
    b_ref[0:3, 0:3, 0:3] = 2
    save(ref / "a.nii.gz", a_ref), save(pred / "a.nii.gz", a_pred)
    save(ref / "b.nii.gz", b_ref), save(pred / "b.nii", cube())  # suffixes may differ
    save(pred / "extra.nii.gz", cube())  # no reference: reported, ignored
    return pred, ref


def test_cli_end_to_end(folders, tmp_path, capsys):
    pred, ref = folders
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(pred), "--label", str(ref), "--output", str(out), "--tolerance-mm", "1"])
    assert code == 0, capsys.readouterr().err
    assert "class_1: Dice 0.9500" in capsys.readouterr().out

    rows = {(r["case"], r["class_name"]): r for r in csv.DictReader((out / "metrics.csv").open())}
    assert set(rows) == {("a", "class_1"), ("a", "class_2"), ("b", "class_1"), ("b", "class_2")}
    assert float(rows["a", "class_1"]["dice"]) == pytest.approx(0.9, abs=1e-6)
    assert float(rows["a", "class_1"]["hd95_mm"]) == pytest.approx(3.0)
    assert rows["b", "class_2"]["status"] == PRED_EMPTY and rows["b", "class_2"]["hd95_mm"] == ""
    assert float(rows["b", "class_2"]["dice"]) == 0.0

    report = json.loads((out / "metrics.json").read_text())
    assert set(report["policy"]) >= {"both_empty", "one_empty"} and report["tolerance_mm"] == 1.0
    assert report["unmatched_predictions"] == ["extra"] and report["n_cases"] == 2
    by_class = {e["class_name"]: e["metrics"] for e in report["aggregates"]}
    assert by_class["class_1"]["hd95_mm"]["mean"] == pytest.approx(1.5)  # (3 + 0) / 2
    assert by_class["class_2"]["hd95_mm"]["n_missing"] == 1
    assert by_class["class_2"]["dice"]["mean"] == pytest.approx(0.5)
    assert report["cases"][1]["classes"]["class_2"]["hd95_mm"] is None
    assert report["cases"][0]["spacing_mm"] == pytest.approx(list(SPACING))
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "Empty-mask policy" in summary and "## class_2 (label 2)" in summary


def test_class_names_from_labels_json(folders, tmp_path):
    pred, ref = folders
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour", "3": "vessel"}}))
    result = evaluate_folders(pred, ref, tmp_path / "eval", tolerance_mm=1.0, labels=labels, n_resamples=200)
    assert result.classes == {1: "liver", 2: "tumour", 3: "vessel"}
    vessel = result.aggregates[2]
    assert vessel["status_counts"][BOTH_EMPTY] == 2 and vessel["metrics"]["hd95_mm"]["n"] == 0
    labels.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    with pytest.raises(EvaluationError, match=r"case a: label value\(s\) \[2\]"):
        evaluate_folders(pred, ref, tmp_path / "eval", labels=labels, n_resamples=200)


def test_unnamed_classes_are_the_label_values_present_not_every_value_below_the_largest(tmp_path):
    """A stray label 5 in one prediction used to add classes 3 and 4, empty in every mask, each with Dice 1."""
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    stray = cube()
    stray[0, 0, 0] = 5
    save(ref / "a.nii.gz", cube()), save(pred / "a.nii.gz", stray)
    both = cube()
    both[0:3, 0:3, 0:3] = 2
    save(ref / "b.nii.gz", both), save(pred / "b.nii.gz", both)
    result = evaluate_folders(pred, ref, tmp_path / "eval", tolerance_mm=1.0, n_resamples=200)
    assert result.classes == {1: "class_1", 2: "class_2", 5: "class_5"}
    fives = [case.metrics[5] for case in result.cases]
    assert [m.dice for m in fives] == [0.0, 1.0]  # a: predicted only; b: absent from both masks


def test_cli_missing_prediction_names_the_case(folders, capsys):
    pred, ref = folders
    save(ref / "c.nii.gz", cube())
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "case(s) c" in err and len(err.strip().splitlines()) == 1


def test_cli_geometry_mismatch_names_the_case(folders, capsys):
    pred, ref = folders
    save(pred / "a.nii.gz", cube(), spacing=(1.0, 1.0, 2.5))
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "case a: prediction spacing" in err
    save(pred / "a.nii.gz", np.zeros((20, 20, 19), dtype=np.uint8))
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref)]) == 2
    assert "case a: prediction shape" in capsys.readouterr().err


def test_bad_cases_are_all_listed_and_skip_bad_cases_scores_the_others(folders, tmp_path, capsys):
    pred, ref = folders
    save(pred / "a.nii.gz", cube(), spacing=(1.0, 1.0, 2.5))
    save(ref / "c.nii.gz", cube()), save(pred / "c.nii.gz", np.zeros((20, 20, 19), dtype=np.uint8))
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 2 of 3 case(s) cannot be evaluated: case a: prediction spacing")
    assert "case c: prediction shape" in err and "--skip-bad-cases" in err
    assert not (pred / "evaluation").exists()  # nothing half-written

    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--label", str(ref), "-o", str(out), "--skip-bad-cases"]) == 1
    assert "1 cases; 2 left out" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in report["cases"]] == ["b"]
    assert [f["case"] for f in report["failed_cases"]] == ["a", "c"]
    assert "prediction spacing" in report["failed_cases"][0]["reason"]
    assert report["aggregates"][0]["metrics"]["dice"]["mean"] == pytest.approx(1.0)  # b's class 1 is exact
    assert "Not evaluated" in (out / "summary.md").read_text() and "case c: prediction shape" in (out / "summary.md").read_text()
