"""Feature variety: how evenly a candidate's features spread, a label-free transferability score.

Wang & Isola (ICML 2020) measure the *uniformity* of features on the unit sphere as
``U = log mean_{i<j} exp(-t ||z_i - z_j||^2)`` (t = 2); Yang et al. (MICCAI 2023, CC-FV) use such feature
variety as one half of a transferability score for medical image segmentation, on the argument that
pixel-level linear separability (LogME, GBC) rewards features that merely keep the local intensity,
which a random encoder does as well as a pretrained one. Here the features are centred (per dimension,
over the sampled voxels) and each row is scaled to unit length before ``U`` is taken; the score is
``-U``: 0 when every voxel has the same feature direction, larger the more the directions spread (about
``2 t`` = 4 for directions spread at random in many dimensions). Labels are not used.
"""
from __future__ import annotations

import numpy as np

TEMPERATURE = 2.0
MAX_ROWS = 4096  # pairs grow with the square of the rows: more are subsampled, with a fixed seed


def unit_directions(features: np.ndarray) -> np.ndarray:
    """``features`` (n x d) centred per dimension and each row scaled to unit length (zero rows stay zero)."""
    centred = features - features.mean(axis=0)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.where(norms > 0, norms, 1.0)


def feature_variety(features: np.ndarray, labels: np.ndarray | None = None, temperature: float = TEMPERATURE,
                    max_rows: int = MAX_ROWS, seed: int = 0) -> float:
    """``-log mean_{i<j} exp(-temperature ||z_i - z_j||^2)`` of the centred, unit-length rows ``z`` of ``features``
    (n x d, float64; at most ``max_rows`` rows, drawn with ``seed``). ``labels`` are ignored (the scores'
    common signature)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature variety needs an n x d array with n >= 2, got shape {features.shape}")
    if features.shape[0] > max_rows:
        features = features[np.random.default_rng(seed).choice(features.shape[0], max_rows, replace=False)]
    directions = unit_directions(features)
    squared = np.clip(2.0 - 2.0 * directions @ directions.T, 0.0, 4.0)  # ||a - b||^2 of unit vectors
    upper = squared[np.triu_indices(squared.shape[0], k=1)]
    exponent = -temperature * upper
    peak = exponent.max()
    return float(-(peak + np.log(np.mean(np.exp(exponent - peak)))))
