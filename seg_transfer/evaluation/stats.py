"""Small, reusable statistics for evaluation and study comparison: bootstrap CIs and paired tests.

NaN values are treated as missing and dropped (pairs with a NaN on either side in
``paired_comparison``); every result reports the ``n`` it was computed from.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

_MAX_BATCH_ELEMENTS = 2_000_000  # resamples x n held in memory at once by scipy's bootstrap


@dataclass(frozen=True)
class BootstrapCI:
    """``statistic`` of the sample and its bootstrap confidence interval [low, high]."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """Mean of the paired differences a - b, its bootstrap CI, and the Wilcoxon signed-rank test."""

    n: int
    mean_difference: float
    ci_low: float
    ci_high: float
    wilcoxon_statistic: float
    p_value: float
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


def _finite_sample(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-D float array of ``values`` without NaNs; ValueError for a non-1-D input."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sample, got shape {arr.shape}")
    return arr[~np.isnan(arr)]


def _scipy_interval(
    sample: np.ndarray, statistic: Callable, n_resamples: int, confidence: float, seed: int, method: str
) -> tuple[float, float]:
    """(low, high) from ``scipy.stats.bootstrap``; NaNs when scipy finds the data degenerate."""
    batch = max(1, min(n_resamples, _MAX_BATCH_ELEMENTS // max(1, sample.size)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning -> NaN interval, handled by the caller
        result = sps.bootstrap(
            (sample,), statistic, n_resamples=n_resamples, confidence_level=confidence,
            method=method, batch=batch, rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable = np.mean,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """Bootstrap CI of ``statistic`` (BCa via ``scipy.stats.bootstrap``; percentile if BCa is undefined).

    NaNs are dropped. n == 0: everything NaN. n == 1: the estimate, with a NaN interval
    (one value gives no spread). A constant sample: the interval is [c, c]. Deterministic
    for a given ``seed``. ``statistic`` must accept an ``axis`` keyword (np.mean, np.median, ...).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sample = _finite_sample(values)
    n = int(sample.size)
    if n == 0:
        return BootstrapCI(float("nan"), float("nan"), float("nan"), 0, confidence)
    estimate = float(statistic(sample))
    if n == 1:
        return BootstrapCI(estimate, float("nan"), float("nan"), 1, confidence)
    if np.all(sample == sample[0]):
        return BootstrapCI(estimate, estimate, estimate, n, confidence)
    low, high = _scipy_interval(sample, statistic, n_resamples, confidence, seed, "BCa")
    if not (np.isfinite(low) and np.isfinite(high)):
        low, high = _scipy_interval(sample, statistic, n_resamples, confidence, seed, "percentile")
    return BootstrapCI(estimate, low, high, n, confidence)


def wilcoxon_p(differences: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(statistic, two-sided p) of the Wilcoxon signed-rank test on paired differences.

    All-zero differences give (0.0, 1.0); no differences give (NaN, NaN).
    """
    d = _finite_sample(differences)
    if d.size == 0:
        return float("nan"), float("nan")
    if np.all(d == 0):
        return 0.0, 1.0
    result = sps.wilcoxon(d)
    return float(result.statistic), float(result.pvalue)


def paired_comparison(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    seed: int = 0,
    n_resamples: int = 10000,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare paired samples ``a`` and ``b`` (same cases, same order): mean of a - b with a
    bootstrap CI, and the Wilcoxon signed-rank p-value.

    Pairs with a NaN on either side are dropped; ValueError if the lengths differ.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {a_arr.shape} and {b_arr.shape}")
    diff = a_arr - b_arr  # NaN where either side is missing
    ci = bootstrap_ci(diff, np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed)
    statistic, p_value = wilcoxon_p(diff)
    return PairedComparison(ci.n, ci.estimate, ci.low, ci.high, statistic, p_value, confidence)


@dataclass(frozen=True)
class SeedAwareComparison:
    """Paired difference a - b over a seeds x cases grid, with both sources of variation respected.

    ``mean_difference``: mean over seeds and cases. ``ci_low``/``ci_high``: two-level bootstrap (seeds
    resampled, then cases), so a case seen under several seeds is not counted as several independent
    samples. ``p_value``: :func:`crossed_t_test` (seed and case variance, Satterthwaite degrees of
    freedom); the bootstrap's own p (``p_bootstrap``) is reported too but is anti-conservative with
    few seeds (three seeds that agree in sign give its floor, whatever their spread).
    ``seed_differences``: the per-seed mean differences. ``p_seeds_signed_rank``: exact Wilcoxon
    signed-rank p over those seed differences alone, robust to one wild seed (which inflates the t-test's
    seed variance) but coarse with few seeds (3 seeds: never below 0.25; 8 agreeing seeds: 2/256).
    """

    n_seeds: int
    n_cases: int
    mean_difference: float
    ci_low: float
    ci_high: float
    p_value: float
    seed_differences: list[float]
    confidence: float
    p_bootstrap: float = float("nan")
    t_statistic: float = float("nan")
    degrees_of_freedom: float = float("nan")
    p_seeds_signed_rank: float = float("nan")

    @property
    def consistent_sign(self) -> int:
        """+1 if every seed's mean difference is > 0, -1 if every one is < 0, else 0."""
        if self.seed_differences and all(d > 0 for d in self.seed_differences):
            return 1
        if self.seed_differences and all(d < 0 for d in self.seed_differences):
            return -1
        return 0

    def as_dict(self) -> dict:
        return {**asdict(self), "consistent_sign": self.consistent_sign}


def hierarchical_bootstrap(
    differences: Sequence[Sequence[float]] | np.ndarray,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SeedAwareComparison:
    """Two-level bootstrap of the mean of a ``(seeds, cases)`` grid of paired differences.

    Each resample draws seeds with replacement and, independently, cases with replacement (seeds and
    cases are crossed: every seed is scored on the same test cases) and takes the mean of the drawn
    cells. CI: percentile interval. ``p_value`` comes from :func:`crossed_t_test`; the bootstrap's own
    two-sided p, ``2 * min(P(mean* <= 0), P(mean* >= 0))`` floored at ``1 / n_resamples``, is kept as
    ``p_bootstrap``. Cases with a NaN under any seed are dropped.
    With one seed only the case level varies (say so when reporting: seed noise is then unmeasured).
    """
    grid = np.asarray(differences, dtype=float)
    if grid.ndim != 2:
        raise ValueError(f"expected a (seeds, cases) grid, got shape {grid.shape}")
    grid = grid[:, ~np.isnan(grid).any(axis=0)]
    n_seeds, n_cases = grid.shape
    nan = float("nan")
    if n_seeds == 0 or n_cases == 0:
        return SeedAwareComparison(n_seeds, n_cases, nan, nan, nan, nan, [], confidence)
    rng = np.random.default_rng(seed)
    seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_resamples) / n_seeds
    case_weights = rng.multinomial(n_cases, np.full(n_cases, 1 / n_cases), size=n_resamples) / n_cases
    means = np.einsum("bs,sc,bc->b", seed_weights, grid, case_weights)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    p_boot = min(1.0, max(2 * min(np.mean(means <= 0), np.mean(means >= 0)), 1 / n_resamples))
    t, df, p = crossed_t_test(grid)
    seed_means = grid.mean(axis=1)
    p_seeds = wilcoxon_p(seed_means)[1] if n_seeds > 1 else float("nan")
    return SeedAwareComparison(n_seeds, n_cases, float(grid.mean()), float(low), float(high), p,
                               seed_means.tolist(), confidence, float(p_boot), t, df, p_seeds)


def crossed_t_test(grid: np.ndarray) -> tuple[float, float, float]:
    """(t, degrees of freedom, two-sided p) for "the mean of a (seeds, cases) grid is 0".

    The standard error adds the seed part (variance of the seed means / seeds) and the case part
    (variance of the case means / cases), as for a crossed design; degrees of freedom by
    Welch-Satterthwaite, so with few seeds and seed noise dominating the test has about seeds - 1
    degrees of freedom. One seed: the seed part cannot be estimated and is left out (seed noise is then
    unmeasured). No spread at all: p is 0 for a non-zero mean, 1 for a zero mean.
    """
    n_seeds, n_cases = grid.shape
    mean = float(grid.mean())
    seed_part = np.var(grid.mean(axis=1), ddof=1) / n_seeds if n_seeds > 1 else 0.0
    case_part = np.var(grid.mean(axis=0), ddof=1) / n_cases if n_cases > 1 else 0.0
    se2 = seed_part + case_part
    if se2 <= 1e-24:  # no spread beyond rounding
        return (float(np.sign(mean)) * float("inf") if mean else 0.0), float("nan"), (0.0 if mean else 1.0)
    terms = [(seed_part, n_seeds - 1), (case_part, n_cases - 1)]
    df = se2**2 / sum(part**2 / dof for part, dof in terms if dof > 0 and part > 0)
    t = mean / np.sqrt(se2)
    return float(t), float(df), float(2 * sps.t.sf(abs(t), df))
