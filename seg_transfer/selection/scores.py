"""The transferability scores ``rank-encoders`` can compute, by name: ``score(features n x d, labels n) -> float``,
higher meaning the candidate should fine-tune better. The first score asked for orders the ranking."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from seg_transfer.config import ConfigError
from seg_transfer.selection.gbc import gbc
from seg_transfer.selection.logme import logme
from seg_transfer.selection.variety import feature_variety


@dataclass(frozen=True)
class TransferabilityScore:
    name: str
    label: str  # how tables and plots name it
    reference: str
    compute: Callable[[np.ndarray, np.ndarray], float]


SCORES: dict[str, TransferabilityScore] = {
    "logme": TransferabilityScore("logme", "LogME", "You et al., ICML 2021: evidence of a Bayesian linear model", logme),
    "gbc": TransferabilityScore("gbc", "GBC", "Pándey et al., CVPR 2022: Gaussian Bhattacharyya class separability, 64 PCA dims", gbc),
    "variety": TransferabilityScore("variety", "Variety", "Wang & Isola, ICML 2020 uniformity as feature variety "
                                    "(Yang et al., MICCAI 2023 CC-FV): how evenly features spread, label-free", feature_variety),
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
