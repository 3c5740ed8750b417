"""Tests for seg_transfer.data.splits: deterministic, case-level train/val/test splits."""
from __future__ import annotations

import json

import pytest

from seg_transfer.data.splits import load_splits, make_splits, save_splits

NAMES = [f"case_{i:03d}" for i in range(50)]


def _all(s: dict[str, list[str]]) -> list[str]:
    return s["train"] + s["val"] + s["test"]


def test_deterministic_and_order_invariant():
    a = make_splits(NAMES, seed=3, test_fraction=0.1)
    assert a == make_splits(list(reversed(NAMES)), seed=3, test_fraction=0.1)
    assert a == make_splits(set(NAMES), seed=3, test_fraction=0.1)
    assert a != make_splits(NAMES, seed=4, test_fraction=0.1)


def test_disjoint_complete_and_sizes():
    s = make_splits(NAMES, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert sorted(_all(s)) == sorted(NAMES) and len(set(_all(s))) == len(NAMES)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (35, 10, 5)
    assert all(v == sorted(v) for v in s.values())
    s = make_splits(NAMES, val_fraction=0.0)
    assert (len(s["train"]), s["val"], s["test"]) == (50, [], [])


def test_small_datasets():
    s = make_splits(["a", "b"], val_fraction=0.01)  # round(0.02) == 0, but val gets at least 1
    assert (len(s["train"]), len(s["val"]), s["test"]) == (1, 1, [])
    assert make_splits(["a"]) == {"train": ["a"], "val": [], "test": []}
    with pytest.raises(ValueError, match="no training cases"):
        make_splits(["a", "b"], val_fraction=0.5, test_fraction=0.5)


def test_kfold_partitions_non_test_cases():
    k = 5
    splits = [make_splits(NAMES, test_fraction=0.2, folds=k, fold=f, seed=1) for f in range(k)]
    test = splits[0]["test"]
    non_test = sorted(set(NAMES) - set(test))
    vals = [s["val"] for s in splits]
    assert sorted(v for val in vals for v in val) == non_test  # partition: no overlap, no gap
    assert all(len(v) == 8 for v in vals)
    for s in splits:
        assert sorted(_all(s)) == sorted(NAMES) and s["test"] == test


def test_test_set_fixed_across_folds_and_val_fractions():
    ref = make_splits(NAMES, test_fraction=0.2, seed=7)["test"]
    assert len(ref) == 10
    for vf in (0.0, 0.1, 0.3):
        assert make_splits(NAMES, test_fraction=0.2, val_fraction=vf, seed=7)["test"] == ref
    for folds in (2, 3, 5):
        for fold in range(folds):
            assert make_splits(NAMES, test_fraction=0.2, folds=folds, fold=fold, seed=7)["test"] == ref


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": "0.2"}, "val_fraction"),
        ({"seed": 1.5}, "seed"),
        ({"folds": 1}, "folds"),
        ({"folds": 3, "fold": 3}, "fold"),
        ({"folds": 3, "fold": -1}, "fold"),
        ({"folds": True}, "folds"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_splits(NAMES, **kwargs)


def test_name_validation():
    with pytest.raises(ValueError, match="empty"):
        make_splits([])
    with pytest.raises(ValueError, match="duplicate"):
        make_splits(["a", "b", "a"])
    with pytest.raises(ValueError, match="single string"):
        make_splits("abc")
    with pytest.raises(ValueError, match="at least 4"):
        make_splits(["a", "b", "c"], folds=4)


def test_save_load_roundtrip_atomic(tmp_path):
    s = make_splits(NAMES, test_fraction=0.1)
    path = tmp_path / "sub" / "splits.json"
    save_splits(s, path)
    assert load_splits(path) == s
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temp file left
    save_splits(make_splits(NAMES, seed=9), path)  # overwrite
    assert load_splits(path) == make_splits(NAMES, seed=9)


def test_save_load_reject_malformed(tmp_path):
    path = tmp_path / "s.json"
    with pytest.raises(ValueError, match="both"):
        save_splits({"train": ["a"], "val": ["a"], "test": []}, path)
    assert not path.exists()
    path.write_text(json.dumps({"train": ["a"], "val": []}))
    with pytest.raises(ValueError, match="test"):
        load_splits(path)
    path.write_text("{oops")
    with pytest.raises(ValueError, match="malformed JSON"):
        load_splits(path)
