"""Class consistency across cases, and CC-FV: a segmentation transferability score that uses which case
each voxel came from.

Yang et al. (MICCAI 2023, "Pick the best pre-trained model: towards transferability estimation for medical
image segmentation") argue that for segmentation what matters is not only that classes separate but that a
class looks the same in every image: they model each class's features in each image as a Gaussian and
measure the 2-Wasserstein distance between the same class in two images (*class consistency*, smaller is
better), and add the *feature variety* of :mod:`seg_transfer.selection.variety`. This is our reading of
the paper, not its code:

- features are centred over all sampled voxels and scaled to unit length per voxel, as for variety, so
  that distances of encoders with different widths and scales are comparable (each is at most 2);
- a class in a case is a Gaussian with a diagonal covariance (the per-dimension mean and standard
  deviation of its voxels); ``W2^2 = ||mu_a - mu_b||^2 + ||sd_a - sd_b||^2``;
- ``CC = -mean over classes and over pairs of cases holding that class of W2`` (0 when every case's
  class looks the same, more negative the more they differ);
- ``CC-FV = CC + variety`` (weight 1 for both halves).

Classes with fewer than ``MIN_VOXELS`` sampled voxels in a case are left out of that case.
"""
from __future__ import annotations

import itertools

import numpy as np

from seg_transfer.selection.variety import feature_variety, unit_directions

MIN_VOXELS = 5


def _class_moments(directions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Per class, one (mean, standard deviation) pair for every case holding at least MIN_VOXELS of it."""
    moments: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for group in np.unique(groups):
        in_case = groups == group
        for label in np.unique(labels[in_case]):
            rows = directions[in_case & (labels == label)]
            if rows.shape[0] >= MIN_VOXELS:
                moments.setdefault(int(label), []).append((rows.mean(axis=0), rows.std(axis=0)))
    return moments


def wasserstein_diagonal(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """2-Wasserstein distance between two Gaussians given as (mean, per-dimension standard deviation)."""
    return float(np.sqrt(np.sum((a[0] - b[0]) ** 2) + np.sum((a[1] - b[1]) ** 2)))


def class_consistency(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """``-mean W2`` between the same class's feature Gaussians in two different cases (``groups`` names each
    row's case), over every class and every pair of cases; needs some class in at least two cases."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    if features.ndim != 2 or not features.shape[0] == labels.shape[0] == groups.shape[0]:
        raise ValueError(f"features {features.shape}, labels {labels.shape} and cases {groups.shape} do not match")
    distances = [wasserstein_diagonal(a, b)
                 for per_case in _class_moments(unit_directions(features), labels, groups).values()
                 for a, b in itertools.combinations(per_case, 2)]
    if not distances:
        raise ValueError(f"class consistency needs a class with >= {MIN_VOXELS} sampled voxels in at least two cases")
    return -float(np.mean(distances))


def cc_fv(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Class consistency plus feature variety (both on centred, unit-length features)."""
    return class_consistency(features, labels, groups) + feature_variety(features)
