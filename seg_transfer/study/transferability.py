"""Encoder ranking inside a study: transferability scores (LogME, GBC) of every arm's encoder on each training
subset, and whether each score's ranking agrees with the arms' fine-tuned test Dice.

Before fine-tuning, ``seg-transfer rank-encoders`` runs once per (training-set size, seed) on exactly the
training cases that seed's runs train on, with every distinct (encoder, weights) of the arms as a
candidate (for 3D arms also the inflation mode); its files go to ``output/rank_encoders/n010_seed0/``.
Arms that share an encoder and weights (e.g. staged and unstaged ImageNet) share a score. Only arms of the
first arm's route and data settings are ranked (one ranking sees one kind of input).

After fine-tuning, agreement is measured per size, score and stride over the arms: Kendall's tau and
Spearman's rho between the arm's score and its test Dice, both averaged over seeds, plus tau within each seed; the pairs the
score orders wrongly are listed; the ranking's cost is its seconds over one fine-tuning run's seconds.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from seg_transfer.routes import get_route
from seg_transfer.study.config import RankEncodersConfig
from seg_transfer.study.plan import RunSpec
from seg_transfer.study.runner import RunRecord

log = logging.getLogger(__name__)

FOLDER = "rank_encoders"


def subset_folder(output: Path, size: int, seed: int) -> Path:
    return Path(output) / FOLDER / f"n{size:03d}_seed{seed}"


def rankable(group: Sequence[RunSpec]) -> list[RunSpec]:
    """The runs of one (size, seed) whose route and data settings equal the first run's."""
    first = group[0].config
    return [spec for spec in group if spec.config.model.dims == first.model.dims and spec.config.data == first.data]


def candidate_key(spec: RunSpec) -> tuple[str, str, str | None]:
    """What the ranking scores of a run: its encoder, weights and (3D) inflation mode."""
    model = spec.config.model
    inflated = get_route(model.dims).spatial_dims == 3  # only a 3D network inflates its 2D encoder
    return model.encoder, model.encoder_weights, model.inflation if inflated else None


def rank_subsets(specs: Sequence[RunSpec], output: Path, settings: RankEncodersConfig, device: str = "auto") -> None:
    """Rank the arms' encoders on every (size, seed) training subset that has no ranking with these settings yet."""
    from seg_transfer.selection.rank import Candidate, RankOptions, rank_encoders

    asked = RankOptions(pixels=settings.pixels, strides=None if settings.strides is None else tuple(settings.strides),
                        seed=settings.seed, device=device, scores=None if settings.scores is None else tuple(settings.scores))
    for (size, seed), group in _by_subset(specs).items():
        folder = subset_folder(output, size, seed)
        runs = rankable(group)
        if len(runs) < 2:
            continue
        options = asked.for_route(get_route(runs[0].config.model.dims))
        keys = dict.fromkeys(candidate_key(spec) for spec in runs)
        names = {key: ", ".join(spec.arm for spec in runs if candidate_key(spec) == key) for key in keys}
        candidates = [Candidate(names[key], *key) for key in keys]
        if ranking_is_current(folder / "ranking.json", options, [c.text for c in candidates]):
            continue
        log.info("ranking %d encoders by %s on the %d training cases of n=%d seed %d", len(candidates),
                 "/".join(options.scores), size, size, seed)
        rank_encoders(runs[0].config, candidates, folder, options, splits=runs[0].splits)


def ranking_is_current(path: Path, options, candidates: Sequence[str]) -> bool:
    """Whether ``path`` holds a ranking of exactly these candidates (arm names as shown) made with these pixels,
    strides, seed and scores; else it is redone (an arm added to a study after its first ranking gets a score)."""
    if not path.is_file():
        return False
    made = json.loads(path.read_text())
    options_made = made.get("options", {})
    return ((options_made.get("pixels"), options_made.get("strides"), options_made.get("seed"),
             options_made.get("scores", ["logme"])) == (options.pixels, list(options.strides), options.seed, list(options.scores))
            and sorted({row["candidate"] for row in made.get("ranking", [])}) == sorted(candidates))


def _by_subset(specs: Sequence[RunSpec]) -> dict[tuple[int, int], list[RunSpec]]:
    grouped: dict[tuple[int, int], list[RunSpec]] = {}
    for spec in specs:
        grouped.setdefault((spec.size, spec.seed), []).append(spec)
    return grouped


def read_scores(output: Path, records: Sequence[RunRecord]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """{(arm, size, seed): {"values": {(score name, stride): value}, "seconds": the whole ranking, "strides": in
    ranking order, "scores": names in ranking order}} for every finished run whose subset was ranked with its
    encoder among the candidates (a ranking.json from before scores were named holds LogME alone)."""
    scores: dict[tuple[str, int, int], dict[str, Any]] = {}
    rankings: dict[tuple[int, int], dict | None] = {}  # each subset's ranking.json, read once
    for record in records:
        subset = (record.size, record.seed)
        if subset not in rankings:
            path = subset_folder(output, *subset) / "ranking.json"
            rankings[subset] = json.loads(path.read_text()) if path.is_file() else None
        ranking = rankings[subset]
        if ranking is None:
            continue
        for row in ranking["ranking"]:
            if record.arm in [name.strip() for name in row["candidate"].split(",")]:  # arm names hold no commas
                entry = scores.setdefault((record.arm, record.size, record.seed),
                                          {"values": {}, "seconds": ranking["seconds"], "strides": ranking["options"]["strides"],
                                           "scores": ranking["options"].get("scores", ["logme"])})
                for name, value in row.get("values", {"logme": row.get("logme")}).items():
                    entry["values"][(name, int(row["stride"]))] = value
    return scores


def kendall_spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | None]:
    """Kendall's tau-b and Spearman's rho (scipy) with their p-values; None below three points."""
    from scipy.stats import kendalltau, spearmanr

    if len(x) < 3:
        return {"kendall_tau": None, "kendall_p": None, "spearman_rho": None, "spearman_p": None}
    tau, tau_p = kendalltau(x, y)
    rho, rho_p = spearmanr(x, y)
    return {"kendall_tau": float(tau), "kendall_p": float(tau_p), "spearman_rho": float(rho), "spearman_p": float(rho_p)}


def discordant_pairs(arms: Sequence[str], score: Sequence[float], dice: Sequence[float]) -> list[str]:
    """``"a over b"`` for every pair the score orders one way and the test Dice the other (a: the score's pick)."""
    wrong = []
    for i, j in combinations(range(len(arms)), 2):
        if (score[i] - score[j]) * (dice[i] - dice[j]) < 0:
            first, second = (i, j) if score[i] > score[j] else (j, i)
            wrong.append(f"{arms[first]} over {arms[second]}")
    return wrong


def agreement(records: Sequence[RunRecord], scores: dict[tuple[str, int, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per training-set size, score and stride (the study's first score and stride first): each ranked arm's
    mean score and test Dice over its seeds, tau/rho between them, tau within each seed, the discordant pairs, and
    the ranking's cost relative to fine-tuning."""
    rows = []
    for size in sorted({r.size for r in records}):
        runs = [r for r in records if r.size == size and (r.arm, r.size, r.seed) in scores]
        arms = list(dict.fromkeys(r.arm for r in runs))
        seeds = sorted(set.intersection(*({r.seed for r in runs if r.arm == arm} for arm in arms))) if arms else []
        if len(arms) < 2 or not seeds:
            continue
        chosen = [r for r in runs if r.seed in seeds]
        first = scores[(arms[0], size, seeds[0])]
        for name in first["scores"]:
            for stride in first["strides"]:
                rows.append(_agreement_at(size, name, stride, arms, seeds, chosen, scores))
    return rows


def _agreement_at(size: int, name: str, stride: int, arms: list[str], seeds: list[int], runs: list[RunRecord],
                  scores: dict[tuple[str, int, int], dict[str, Any]]) -> dict[str, Any]:
    from seg_transfer.study.analysis import run_mean

    dice_of = {(r.arm, r.seed): run_mean(r) for r in runs}
    per_arm = [{"arm": arm,
                "score": float(np.mean([scores[(arm, size, s)]["values"][(name, stride)] for s in seeds])),
                "seed_scores": [scores[(arm, size, s)]["values"][(name, stride)] for s in seeds],
                "test_dice": float(np.mean([dice_of[(arm, s)] for s in seeds])),
                "seed_dice": [dice_of[(arm, s)] for s in seeds]}
               for arm in arms]
    per_arm.sort(key=lambda row: -row["score"])
    names, score, dice = ([row[k] for row in per_arm] for k in ("arm", "score", "test_dice"))
    per_seed = [kendall_spearman([row["seed_scores"][i] for row in per_arm], [row["seed_dice"][i] for row in per_arm])["kendall_tau"]
                for i in range(len(seeds))]
    ranking_seconds = float(np.mean([scores[(arms[0], size, s)]["seconds"] for s in seeds]))
    train_seconds = float(np.mean([r.seconds for r in runs]))
    return {"size": size, "score": name, "stride": stride, "seeds": seeds, "arms": per_arm, **kendall_spearman(score, dice),
            "seed_kendall_tau": per_seed, "discordant": discordant_pairs(names, score, dice),
            "best_by_score": names[0], "best_by_dice": names[int(np.argmax(dice))],
            "ranking_seconds": ranking_seconds, "train_seconds": train_seconds,
            "cost_ratio": ranking_seconds / train_seconds if train_seconds else None}
