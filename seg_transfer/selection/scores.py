"""The transferability scores ``rank-encoders`` can compute, by name: ``score(features n x d, labels n, cases n)
-> float`` (``cases``: which training case each row was sampled from), higher meaning the candidate should
fine-tune better. The first score asked for orders the ranking."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from seg_transfer.config import ConfigError
from seg_transfer.selection.consistency import cc_fv, class_consistency
from seg_transfer.selection.gbc import gbc
from seg_transfer.selection.logme import logme
from seg_transfer.selection.variety import feature_variety


@dataclass(frozen=True)
class TransferabilityScore:
    name: str
    label: str  # how tables and plots name it
    reference: str
    compute: Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def _per_voxel(score: Callable[[np.ndarray, np.ndarray], float]) -> Callable[[np.ndarray, np.ndarray, np.ndarray], float]:
    """A score that does not use which case a voxel came from, in the registry's signature."""
    return lambda features, labels, cases: score(features, labels)


SCORES: dict[str, TransferabilityScore] = {
    "logme": TransferabilityScore("logme", "LogME", "You et al., ICML 2021: evidence of a Bayesian linear model", _per_voxel(logme)),
    "gbc": TransferabilityScore("gbc", "GBC", "Pándey et al., CVPR 2022: Gaussian Bhattacharyya class separability, 64 PCA dims", _per_voxel(gbc)),
    "variety": TransferabilityScore("variety", "Variety", "Wang & Isola, ICML 2020 uniformity as feature variety "
                                    "(Yang et al., MICCAI 2023 CC-FV): how evenly features spread, label-free", _per_voxel(feature_variety)),
    "cc": TransferabilityScore("cc", "CC", "Yang et al., MICCAI 2023 class consistency: -mean Wasserstein distance "
                               "between a class's feature Gaussians in two cases", class_consistency),
    "ccfv": TransferabilityScore("ccfv", "CC-FV", "Yang et al., MICCAI 2023: class consistency + feature variety", cc_fv),
}


def get_scores(names: Sequence[str]) -> list[TransferabilityScore]:
    """The registered scores ``names``, in order; a ConfigError naming the unknown one and the choices."""
    unknown = [name for name in names if name not in SCORES]
    if unknown:
        raise ConfigError(f"unknown transferability score {unknown[0]!r}; choose from {', '.join(SCORES)}")
    if not names:
        raise ConfigError(f"no transferability score given; choose from {', '.join(SCORES)}")
    return [SCORES[name] for name in names]


def score_label(name: str) -> str:
    """A score's display name (its registry name if it is not registered, e.g. from an older file)."""
    return SCORES[name].label if name in SCORES else name
