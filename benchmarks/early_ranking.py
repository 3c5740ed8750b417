"""Could a short fine-tuning rank the encoders? Agreement of early validation Dice with the final test Dice.

    python benchmarks/early_ranking.py runs/encoder_choice_n10 [--size 10]

Reads a finished study (``results.json``: every run's validation curve and test Dice). For each epoch
``e``, every arm is scored by its best validation Dice up to ``e`` (what a fine-tuning stopped after ``e``
epochs would report, on validation cases only), and the arms' order is compared with the order of their
final mean test Dice: Kendall's tau over the seed means and within each seed. The cost column is the
share of one run's optimiser steps spent per candidate, to set against ``rank-encoders``' goal (all
candidates ranked for at most 10% of one fine-tuning run).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from seg_transfer.study.transferability import kendall_spearman


def best_so_far(curve: list[dict], epoch: int) -> float:
    return max((point["val_dice"] for point in curve if point["epoch"] <= epoch), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--size", type=int, default=None, help="training-set size (default: the smallest)")
    args = parser.parse_args()
    runs = json.loads((args.study / "results.json").read_text())["runs"]
    size = args.size or min(run["size"] for run in runs)
    runs = [run for run in runs if run["size"] == size]
    arms = sorted({run["arm"] for run in runs})
    seeds = sorted({run["seed"] for run in runs})
    by_key = {(run["arm"], run["seed"]): run for run in runs}
    final = [np.mean([by_key[arm, seed]["test_dice_mean"] for seed in seeds]) for arm in arms]
    epochs = max(run["epochs"] for run in runs)
    print(f"{args.study.name}: {len(arms)} arms ({', '.join(arms)}), {len(seeds)} seeds, {size} training cases")
    print("final mean test Dice: " + ", ".join(f"{arm} {dice:.3f}" for arm, dice in zip(arms, final)))
    print("| epochs fine-tuned | share of a run | Kendall tau (seed means) | tau per seed | arms by early val Dice |")
    print("|---|---|---|---|---|")
    for epoch in range(1, epochs + 1):
        early = {(arm, seed): best_so_far(by_key[arm, seed]["curve"], epoch) for arm in arms for seed in seeds}
        means = [np.mean([early[arm, seed] for seed in seeds]) for arm in arms]
        tau = kendall_spearman(means, final)["kendall_tau"]
        per_seed = [kendall_spearman([early[arm, seed] for arm in arms],
                                     [by_key[arm, seed]["test_dice_mean"] for arm in arms])["kendall_tau"] for seed in seeds]
        order = " > ".join(arm for _, arm in sorted(zip(means, arms), reverse=True))
        print(f"| {epoch} | {epoch / epochs:.0%} | {tau:+.2f} | {' · '.join(f's{s} {t:+.2f}' for s, t in zip(seeds, per_seed))} | {order} |")


if __name__ == "__main__":
    main()
