"""Case-level, deterministic train/val/test splits, saved as JSON.

Splits depend only on the set of case names and the arguments (never on input
order). The test cases depend only on (names, test_fraction, seed), so a study can
fix them once and vary ``folds``/``fold``/``val_fraction`` freely.
"""
from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from seg_transfer.atomic import write_atomic

SPLIT_KEYS: tuple[str, ...] = ("train", "val", "test")


def _check_fraction(name: str, value: float) -> float:
    """``value`` as a float in [0, 1); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_int(name: str, value: object) -> int:
    """``value`` as an int (bools rejected); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_names(case_names: Iterable[str]) -> list[str]:
    """Sorted list of unique, non-empty string names; ValueError otherwise."""
    if isinstance(case_names, (str, bytes)):
        raise ValueError("case_names must be a collection of names, not a single string")
    names = list(case_names)
    if not names:
        raise ValueError("case_names is empty")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"case names must be non-empty strings, got {bad[0]!r}")
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate case names: {', '.join(dups[:10])}")
    return sorted(names)


def _shuffled(names: list[str], seed: int) -> list[str]:
    """``names`` (already sorted) permuted by ``np.random.default_rng(seed)``."""
    perm = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in perm]


def _kfold_val(rest: list[str], folds: int, fold: int) -> list[str]:
    """Fold ``fold`` of ``rest`` dealt round-robin into ``folds`` folds."""
    if len(rest) < folds:
        raise ValueError(f"{folds} folds need at least {folds} non-test cases, got {len(rest)}")
    return rest[fold::folds]


def _holdout_val(rest: list[str], n: int, val_fraction: float) -> list[str]:
    """The first round(val_fraction * n) of ``rest`` (at least 1 if val_fraction > 0 and n >= 2)."""
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    return rest[:n_val]


def make_splits(
    case_names: Iterable[str],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, list[str]]:
    """{'train': [...], 'val': [...], 'test': [...]} of case names, each list sorted.

    Names are sorted, then permuted with ``np.random.default_rng(seed)``. The first
    round(test_fraction * n) are test (independent of folds/fold/val_fraction).
    With ``folds=k`` the rest are dealt into k folds and fold ``fold`` is val
    (``val_fraction`` is ignored); otherwise round(val_fraction * n) of the rest go
    to val (n = all cases; at least 1 when val_fraction > 0 and n >= 2). The three
    lists are disjoint and cover all names. Raises ValueError for bad arguments or
    when train would be empty.
    """
    names = _check_names(case_names)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    seed = _check_int("seed", seed)
    if folds is not None:
        folds = _check_int("folds", folds)
        if folds < 2:
            raise ValueError(f"folds must be >= 2 (or None for a single split), got {folds}")
        fold = _check_int("fold", fold)
        if not 0 <= fold < folds:
            raise ValueError(f"fold must be in [0, {folds}), got {fold}")

    n = len(names)
    order = _shuffled(names, seed)
    n_test = round(test_fraction * n)
    test, rest = order[:n_test], order[n_test:]
    val = _kfold_val(rest, folds, fold) if folds is not None else _holdout_val(rest, n, val_fraction)
    val_set = set(val)
    train = [x for x in rest if x not in val_set]
    if not train:
        raise ValueError(
            f"no training cases left: {n} cases, {len(test)} test, {len(val)} val "
            f"(lower test_fraction/val_fraction or add cases)"
        )
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def _validate_splits(splits: object, where: str) -> dict[str, list[str]]:
    """A clean {'train','val','test': [str]} copy; ValueError if malformed or overlapping."""
    if not isinstance(splits, dict):
        raise ValueError(f"{where}: splits must be a mapping with keys {', '.join(SPLIT_KEYS)}")
    missing = [k for k in SPLIT_KEYS if k not in splits]
    if missing:
        raise ValueError(f"{where}: splits lack key(s) {', '.join(missing)}")
    out: dict[str, list[str]] = {}
    for key in SPLIT_KEYS:
        values = splits[key]
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}: splits['{key}'] must be a list of case names")
        out[key] = list(values)
    seen: dict[str, str] = {}
    for key in SPLIT_KEYS:
        for name in out[key]:
            if name in seen:
                raise ValueError(f"{where}: case {name!r} is in both '{seen[name]}' and '{key}'")
            seen[name] = key
    return out


def save_splits(splits: dict[str, list[str]], path: str | Path) -> None:
    """Write ``splits`` as JSON to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    clean = _validate_splits(splits, str(path))
    write_atomic(path, json.dumps(clean, indent=2) + "\n")


def load_splits(path: str | Path) -> dict[str, list[str]]:
    """Read splits written by :func:`save_splits`; ValueError if the file is malformed."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return _validate_splits(data, str(path))


def training_subset(pool: Iterable[str], size: int, seed: int) -> list[str]:
    """``size`` cases of ``pool`` drawn with ``seed``, sorted; nested: for one seed, a smaller subset is
    always contained in a larger one (learning curves add cases, they do not swap them).

    ValueError when ``size`` is not in [1, len(pool)].
    """
    names = _check_names(pool)
    size = _check_int("size", size)
    if not 1 <= size <= len(names):
        raise ValueError(f"training subset size must be in [1, {len(names)}], got {size}")
    return sorted(_shuffled(names, _check_int("seed", seed))[:size])
