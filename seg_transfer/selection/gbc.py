"""GBC: Gaussian Bhattacharyya coefficient, a class-separability score of fixed features.

Pándey, Rebuffi, Cuturi, Zisserman, "Transferability Estimation using Bhattacharyya Class Separability"
(CVPR 2022), proposed for classification and semantic segmentation. Features are projected onto their
top principal components (``dims``, 64 in the paper); each class is modelled as a Gaussian with a
diagonal covariance; for every pair of classes the Bhattacharyya coefficient
``BC = exp(-D_B)`` measures their overlap, with

    D_B = 1/8 (mu_i - mu_j)^T S^-1 (mu_i - mu_j) + 1/2 ln(det S / sqrt(det S_i det S_j)),  S = (S_i + S_j) / 2.

``GBC = -sum over ordered pairs i != j of BC``: 0 for perfectly separated classes, more negative the
more they overlap. Higher is better, as for LogME.
"""
from __future__ import annotations

import numpy as np

VARIANCE_FLOOR = 1e-6  # added to every per-class variance: a constant feature must not divide by zero


def principal_components(features: np.ndarray, dims: int) -> np.ndarray:
    """``features`` (n x d) centred and projected onto their top ``min(dims, d, n)`` principal directions."""
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[: min(dims, vt.shape[0])].T


def bhattacharyya_coefficient(mean_a: np.ndarray, var_a: np.ndarray, mean_b: np.ndarray, var_b: np.ndarray) -> float:
    """Overlap ``exp(-D_B)`` of two Gaussians with diagonal covariances (1 for identical ones)."""
    var = (var_a + var_b) / 2
    distance = 0.125 * np.sum((mean_a - mean_b) ** 2 / var) + 0.5 * np.sum(np.log(var) - 0.5 * (np.log(var_a) + np.log(var_b)))
    return float(np.exp(-distance))


def gbc(features: np.ndarray, labels: np.ndarray, dims: int = 64) -> float:
    """GBC of ``features`` (n x d) for integer ``labels`` (n,), float64 throughout; needs two classes."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError("GBC needs at least two classes among the sampled pixels")
    projected = principal_components(features, dims)
    moments = [(projected[labels == c].mean(axis=0), projected[labels == c].var(axis=0) + VARIANCE_FLOOR) for c in classes]
    total = 0.0
    for i, (mean_a, var_a) in enumerate(moments):
        for mean_b, var_b in moments[i + 1:]:
            total += 2.0 * bhattacharyya_coefficient(mean_a, var_a, mean_b, var_b)  # BC is symmetric: both orders
    return -total
