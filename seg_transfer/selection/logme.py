"""LogME: the log marginal evidence of a Bayesian linear model on fixed features.

You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning"
(ICML 2021). Each target ``y`` (n) is modelled as ``y = F w + e`` with ``w ~ N(0, I/alpha)`` and
``e ~ N(0, I/beta)``; the evidence ``p(y | F, alpha, beta)`` is maximised over (alpha, beta) by
MacKay's fixed-point updates, computed in the SVD basis of ``F``. Higher is better: features from
which the labels are linearly predictable, with a simple weight vector, score higher.

Fewer samples than feature dimensions (n < d): the thin SVD gives k = min(n, d) singular values;
the other d - k eigenvalues of ``F^T F`` are zero. They add nothing to gamma, |m|^2 or the residual,
and ``(d - k) log(alpha)`` to ``log|A|``, which :func:`log_evidence` includes, so the result is the
exact evidence for any n, d (the same as padding ``sigma`` with d - k zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPSILON = 1e-5  # guards the alpha/beta updates against an exact fit (|m|^2 or the residual -> 0)
TOLERANCE = 1e-3  # relative change of alpha/beta at which the fixed point counts as reached
MAX_ITERATIONS = 100


@dataclass(frozen=True)
class Spectrum:
    """The parts of ``F = U S V^T`` that the evidence needs: ``sigma = S^2`` (k values), U, and F's shape."""

    sigma: np.ndarray
    u: np.ndarray
    n: int
    d: int

    @classmethod
    def of(cls, features: np.ndarray) -> Spectrum:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or min(features.shape) == 0:
            raise ValueError(f"features must be a non-empty (n, d) matrix, got shape {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or inf")
        u, s, _ = np.linalg.svd(features, full_matrices=False)
        n, d = features.shape
        return cls(s**2, u, n, d)


@dataclass(frozen=True)
class Projection:
    """One target in the SVD basis: ``x2 = (U^T y)^2`` and the part of ``|y|^2`` outside U's span."""

    x2: np.ndarray
    res_x2: float


def project(spectrum: Spectrum, target: np.ndarray) -> Projection:
    x = spectrum.u.T @ target
    x2 = x**2
    return Projection(x2, max(float(target @ target - x2.sum()), 0.0))


def _posterior_terms(alpha: float, beta: float, spectrum: Spectrum, p: Projection) -> tuple[float, float, float]:
    """(gamma, |m|^2, |y - F m|^2) at (alpha, beta), m the posterior mean of w."""
    denom = alpha + beta * spectrum.sigma
    gamma = float((beta * spectrum.sigma / denom).sum())
    m2 = float((beta**2 * spectrum.sigma * p.x2 / denom**2).sum())
    res2 = float((alpha**2 * p.x2 / denom**2).sum()) + p.res_x2
    return gamma, m2, res2


def log_evidence(alpha: float, beta: float, spectrum: Spectrum, p: Projection) -> float:
    """``log p(y | F, alpha, beta)`` (not divided by n), exact for any n, d."""
    n, d, k = spectrum.n, spectrum.d, len(spectrum.sigma)
    _, m2, res2 = _posterior_terms(alpha, beta, spectrum, p)
    log_det = float(np.log(alpha + beta * spectrum.sigma).sum()) + (d - k) * np.log(alpha)
    return (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * res2 - alpha / 2 * m2 - log_det / 2)


def maximise_evidence(spectrum: Spectrum, p: Projection) -> tuple[float, float, int]:
    """Fixed-point (alpha, beta) from (1, 1), and the iterations used; stops once alpha/beta changes
    by less than :data:`TOLERANCE` (relative) or after :data:`MAX_ITERATIONS`."""
    alpha, beta = 1.0, 1.0
    for iteration in range(1, MAX_ITERATIONS + 1):
        gamma, m2, res2 = _posterior_terms(alpha, beta, spectrum, p)
        new_alpha = gamma / (m2 + EPSILON)
        new_beta = max(spectrum.n - gamma, 0.0) / (res2 + EPSILON)
        new_alpha, new_beta = max(new_alpha, 1e-12), max(new_beta, 1e-12)  # keep the logs finite
        converged = abs((new_alpha / new_beta) / (alpha / beta) - 1) < TOLERANCE
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    return alpha, beta, iteration


def target_matrix(labels: np.ndarray) -> np.ndarray:
    """Targets as an (n, t) float64 matrix: integer class labels (1-D) become one one-hot column per
    class present, in sorted order; a 2-D array is taken as given (one column per regression target)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        classes = np.unique(labels)
        return (labels[:, None] == classes[None, :]).astype(np.float64)
    if labels.ndim == 2:
        return labels.astype(np.float64)
    raise ValueError(f"labels must be 1-D class labels or an (n, t) target matrix, got shape {labels.shape}")


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME score of ``features`` (n, d) for ``labels``: the maximised log evidence per sample,
    averaged over the targets (one-hot columns of the classes present, or the columns given).

    float64 throughout, one SVD of the features shared by every target; deterministic.
    Raises ValueError for mismatched or empty inputs, or non-finite features.
    """
    targets = target_matrix(labels)
    if targets.shape[0] != np.shape(features)[0]:
        raise ValueError(f"{np.shape(features)[0]} feature rows but {targets.shape[0]} labels")
    spectrum = Spectrum.of(features)
    scores = []
    for column in targets.T:
        projection = project(spectrum, column)
        alpha, beta, _ = maximise_evidence(spectrum, projection)
        scores.append(log_evidence(alpha, beta, spectrum, projection) / spectrum.n)
    return float(np.mean(scores))
