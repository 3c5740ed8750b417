"""Study report: PNG plots (matplotlib), Markdown, a self-contained HTML page and ``results.json``."""
from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

from seg_transfer.atomic import atomic_open, json_safe, write_atomic
from seg_transfer.environment import COMPARABLE_SPEED_RATIO
from seg_transfer.selection.scores import score_label

PLOTS = {"learning_curve": "Test Dice against training cases",
         "dice_vs_time": "Test Dice against training wall-clock minutes (our runs and peers)",
         "paired_difference": "Arm minus control, paired by test case",
         "convergence": "Validation Dice against wall-clock seconds and epochs",
         "transferability": "transferability score before fine-tuning against test Dice after it"}
NO_PAIRS = "No paired comparison yet: no arm shares a training-set size and seed with its control."


# ----------------------------------------------------------------------------- tables


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fmt_p(value: Any, digits: int = 4) -> str:
    """A p-value for people: ``0.0123``, or ``< 0.0001`` where it rounds to zero at ``digits``."""
    if isinstance(value, float) and math.isfinite(value) and value < 0.5 * 10 ** -digits:
        return f"< {10 ** -digits:.{digits}f}"
    return fmt(value, digits)


def p_phrase(value: Any, digits: int = 4) -> str:
    """``= 0.0123`` or ``< 0.0001``, to follow a "p" in a sentence."""
    text = fmt_p(value, digits)
    return text if text.startswith("<") else f"= {text}"


def seed_values(values: Sequence[float], seeds: Sequence[int], digits: int = 3, signed: bool = False) -> str:
    """Per-seed numbers side by side: ``s0 0.812 · s1 0.826 · s2 0.803``."""
    form = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return " · ".join(f"s{seed} {form.format(v)}" for seed, v in zip(seeds, values))


def learning_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "training cases", "test Dice (mean)", "95% CI", "per seed", "seed SD", "val Dice", "steps", "train s", "collapsed (warned)"]
    rows = [[r["arm"], str(r["size"]), fmt(r["test_dice"]), f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
             seed_values(r["seed_means"], r["seeds"]), fmt(r["seed_sd"]), fmt(r["val_dice"]),
             "/".join(str(s) for s in r["steps"]), fmt(r["train_seconds"], 0),
             collapse_cell(r)] for r in results["learning_curves"]]
    return header, rows


def collapse_cell(row: dict[str, Any]) -> str:
    """Seeds collapsed at their best epoch, then in brackets those that only raised collapse warnings."""
    collapsed = ", ".join(f"s{seed}" for seed in row["collapsed_seeds"])
    warned = ", ".join(f"s{seed}" for seed in row.get("warned_seeds", []))
    return (collapsed or "-") + (f" ({warned})" if warned else "")


def comparison_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["arm vs control", "training cases", "seeds x test cases", "mean difference", "per seed", "95% CI (seeds, cases)",
              "p (t, seeds + cases)", "df", "verdict"]
    rows = [[f"{r['arm']} vs {r['control']}", str(r["size"]), f"{r['n_seeds']} x {r['n']}", f"{r['mean_difference']:+.3f}",
             seed_values(r["seed_differences"], r["seeds"], signed=True),
             f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", fmt_p(r["p_value"]), fmt(r["degrees_of_freedom"], 1),
             ("**NEGATIVE TRANSFER** " if r["negative_transfer"] else "") + r["verdict"]] for r in results["comparisons"]]
    return header, rows


def target_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["arm", "training cases", "target val Dice", "runs reaching it", "mean seconds", "mean epochs (own)",
              "seconds include"]
    rows = [[r["arm"], str(r["size"]), fmt(r["target"], 2), f"{r['reached']}/{r['runs']}", fmt(r["seconds"], 0), fmt(r["epochs"], 1),
             " + ".join(f"{arm}'s training" for arm in r.get("includes", [])) or "-"]
            for r in results["time_to_target"]]
    return header, rows


def peer_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The peer's rows as trained (one per schedule, size and seed), named by :func:`analysis.peer_label`."""
    header = ["peer schedule", "training cases", "seed", "test Dice", "train min", "threads"]
    rows = [[r["label"], str(r["size"]), str(r["seed"]), fmt(r["test_dice_mean"]), fmt(r["train_seconds"] / 60, 1),
             str(r.get("threads", "n/a"))]
            for r in results.get("peers", [])]
    return header, rows


def arm_minutes(row: dict[str, Any]) -> str:
    """An arm's training minutes against a peer, naming the earlier runs they include (``12.3 with teacher``)."""
    included = row.get("arm_seconds_include") or []
    return fmt(row["arm_seconds"] / 60, 1) + (f" with {' + '.join(included)}" if included else "")


def peer_comparison_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each arm against each peer schedule, paired on the same subsets and test cases, with both sides' minutes."""
    header = ["arm vs peer", "training cases", "seeds x test cases", "train min (arm / peer)", "mean difference", "per seed",
              "95% CI (seeds, cases)", "p (t, seeds + cases)", "verdict"]
    rows = [[f"{r['arm']} vs {r['control']}", str(r["size"]), f"{r['n_seeds']} x {r['n']}",
             f"{arm_minutes(r)} / {fmt(r['peer_seconds'] / 60, 1)}", f"{r['mean_difference']:+.3f}",
             seed_values(r["seed_differences"], r["seeds"], signed=True), f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
             fmt_p(r["p_value"]), r["verdict"]] for r in results.get("peer_comparisons", [])]
    return header, rows


def transferability_table(row: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One size's arms, best score first, with their test Dice rank next to it."""
    label = score_label(row["score"])
    header = ["arm", f"{label} (mean)", f"{label} per seed", "test Dice (mean)", "test Dice per seed", f"rank by {label}", "rank by Dice"]
    by_dice = sorted(row["arms"], key=lambda a: -a["test_dice"])
    dice_rank = {a["arm"]: i for i, a in enumerate(by_dice, 1)}
    rows = [[a["arm"], fmt(a["score"], 4), seed_values(a["seed_scores"], row["seeds"], digits=4), fmt(a["test_dice"]),
             seed_values(a["seed_dice"], row["seeds"]), str(i), str(dice_rank[a["arm"]])] for i, a in enumerate(row["arms"], 1)]
    return header, rows


def transferability_lines(row: dict[str, Any]) -> list[str]:
    """What the ranking got right and wrong at one size, and what it cost."""
    per_seed = " · ".join(f"s{seed} {fmt(tau, 2)}" for seed, tau in zip(row["seeds"], row["seed_kendall_tau"]))
    wrong = "; ".join(row["discordant"]) or "none"
    label = score_label(row["score"])
    return [f"{row['size']} training cases, {len(row['arms'])} encoders, {label} at stride {row['stride']}: Kendall tau "
            f"{fmt(row['kendall_tau'], 2)} (p {p_phrase(row['kendall_p'], 3)}), Spearman rho {fmt(row['spearman_rho'], 2)} "
            f"(p {p_phrase(row['spearman_p'], 3)}) between mean {label} and mean test Dice; tau within each seed: {per_seed}.",
            f"{label} picks {row['best_by_score']}; fine-tuning's best is {row['best_by_dice']}. Pairs the score orders "
            f"wrongly (its pick first): {wrong}.",
            f"Ranking all encoders took {fmt(row['ranking_seconds'], 0)} s, {fmt(100 * row['cost_ratio'], 1) if row['cost_ratio'] else 'n/a'}% "
            f"of one fine-tuning run ({fmt(row['train_seconds'], 0)} s)."]


def primary_rankings(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per training-set size, the agreement row of the study's first score at its first stride."""
    rows: dict[int, dict[str, Any]] = {}
    for row in results.get("transferability", []):
        rows.setdefault(row["size"], row)
    return list(rows.values())


def agreement_table(results: dict[str, Any], size: int) -> tuple[list[str], list[list[str]]]:
    """Agreement with fine-tuning for every score and stride of one size (the first row is the study's choice)."""
    header = ["score", "stride", "Kendall tau", "Spearman rho", "tau per seed", "score's pick", "pairs ordered wrongly"]
    rows = [[score_label(r["score"]), str(r["stride"]), fmt(r["kendall_tau"], 2), fmt(r["spearman_rho"], 2),
             " · ".join(f"s{seed} {fmt(tau, 2)}" for seed, tau in zip(r["seeds"], r["seed_kendall_tau"])),
             r["best_by_score"], f"{len(r['discordant'])} of {len(r['arms']) * (len(r['arms']) - 1) // 2}"]
            for r in results.get("transferability", []) if r["size"] == size]
    return header, rows


def scores_by_arm_table(results: dict[str, Any], size: int, stride: int) -> tuple[list[str], list[list[str]]]:
    """Every declared score's seed-mean value for every arm at one size and stride, its rank among the arms in
    brackets (arms sharing an encoder share a value and a rank), arms in fine-tuned test Dice order (best
    first): where the scores agree and where they part."""
    rows_by_score = [r for r in results.get("transferability", []) if r["size"] == size and r["stride"] == stride]
    if not rows_by_score:
        return [], []
    by_dice = sorted(rows_by_score[0]["arms"], key=lambda a: -a["test_dice"])
    ranks = [{a["arm"]: 1 + sum(b["score"] > a["score"] for b in r["arms"]) for a in r["arms"]} for r in rows_by_score]  # ties share
    values = [{a["arm"]: a["score"] for a in r["arms"]} for r in rows_by_score]
    header = ["arm (best test Dice first)", "test Dice (mean)"] + [f"{score_label(r['score'])} (rank)" for r in rows_by_score]
    rows = [[arm["arm"], fmt(arm["test_dice"])] + [f"{fmt(value[arm['arm']], 4)} ({rank[arm['arm']]})" for value, rank in zip(values, ranks)]
            for arm in by_dice]
    return header, rows


def ranking_sections(results: dict[str, Any]) -> list[tuple[str, list[tuple[list[str], list[list[str]]]], list[str]]]:
    """(title, tables, lines) per training-set size for the encoder-ranking part of the report."""
    sections = []
    for row in primary_rankings(results):
        tables = [transferability_table(row)]
        header, rows = scores_by_arm_table(results, row["size"], row["stride"])
        if len(header) > 3:  # two scores or more: one score is already the table above
            tables.append((header, rows))
        agreements = agreement_table(results, row["size"])
        if len(agreements[1]) > 1:
            tables.append(agreements)
        sections.append((f"Encoder ranking ({score_label(row['score'])}) against fine-tuning, {row['size']} training cases", tables,
                         transferability_lines(row)))
    return sections


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------- plots


def _arm_colors(arms: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def _size_axis(ax, rows: Sequence[dict[str, Any]], ylabel: str, title: str) -> None:
    """Training cases on a log x axis, ticked at the study's sizes; labels, title, grid."""
    sizes = sorted({r["size"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log-axis minor labels crowd a narrow range
    if sizes:
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
    ax.set_xlabel("training cases")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_learning_curve(results: dict[str, Any], path: Path) -> Path:
    rows = results["learning_curves"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = _arm_colors(arms)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        sizes = [r["size"] for r in mine]
        ax.plot(sizes, [r["test_dice"] for r in mine], marker="o", color=colors[arm], label=arm)
        low = [r["ci_low"] if r["ci_low"] is not None else math.nan for r in mine]
        high = [r["ci_high"] if r["ci_high"] is not None else math.nan for r in mine]
        ax.fill_between(sizes, low, high, color=colors[arm], alpha=0.2, linewidth=0)
    _size_axis(ax, rows, "test Dice (mean over classes)", "Learning curves (95% bootstrap CI over seeds and test cases)")
    ax.legend()
    return _save(fig, path)


def plot_paired_difference(results: dict[str, Any], path: Path) -> Path:
    rows = results["comparisons"]
    pairs = list(dict.fromkeys((r["arm"], r["control"]) for r in rows))  # an arm may have several
    colors = _arm_colors([f"{arm} − {control}" for arm, control in pairs])
    fig, ax = plt.subplots(figsize=(6, 4 + 0.2 * len(pairs)))
    for index, (arm, control) in enumerate(pairs):
        mine = [r for r in rows if (r["arm"], r["control"]) == (arm, control)]
        means = [r["mean_difference"] for r in mine]
        errors = [[m - (r["ci_low"] if r["ci_low"] is not None else m) for m, r in zip(means, mine)],
                  [(r["ci_high"] if r["ci_high"] is not None else m) - m for m, r in zip(means, mine)]]
        # comparisons side by side at each size (a small factor on the log axis), so their error bars do not overlap
        shift = 1.0 + 0.04 * (index - (len(pairs) - 1) / 2)
        ax.errorbar([r["size"] * shift for r in mine], means, yerr=errors, marker="o", capsize=4,
                    color=colors[f"{arm} − {control}"], label=f"{arm} − {control}")
    ax.axhline(0.0, color="black", linewidth=1)
    _size_axis(ax, rows, "test Dice difference", "Paired differences as in the legend (95% CI, seeds and cases)")
    if pairs:  # below the axes: inside, it covered the error bars of a single-size study
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, frameon=False)
    return _save(fig, path)


def peer_labels(peers: list[dict[str, Any]]) -> list[tuple[str, tuple[float, float]]]:
    """One label per peer schedule and training-set size ("2 ep, n=140", "x3" when it ran several times),
    placed at its best run's (minutes, test Dice), so repeated runs do not print their labels over each other."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for peer in peers:
        groups.setdefault((peer["schedule"], peer["size"]), []).append(peer)
    labels = []
    for (schedule, size), runs in groups.items():
        best = max(runs, key=lambda r: r["test_dice_mean"])
        times = f" x{len(runs)}" if len(runs) > 1 else ""
        labels.append((f"{schedule}, n={size}{times}", (best["train_seconds"] / 60, best["test_dice_mean"])))
    return labels


def log_tick_label(value: float, _position: Any = None) -> str:
    """Tick label of a log axis: plain numbers on the 1-2-5 steps (2, 5, 10, 20, 50 ...), none between them,
    so that a decade's minor ticks (60 70 80 90) do not print over each other."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
    return f"{value:g}" if leading in (1.0, 2.0, 5.0) else ""


def run_minutes(run: dict[str, Any]) -> float:
    """A run's training minutes with those of the runs it needed first (its own alone in older results.json)."""
    return run.get("seconds_with_earlier", run["seconds"]) / 60


def plot_dice_vs_time(results: dict[str, Any], path: Path) -> Path:
    """One point per run (test Dice against its training minutes, those of the runs it needed first included),
    peers as crosses."""
    runs = results["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    colors = _arm_colors(arms)
    sizes = sorted({r["size"] for r in runs})
    markers = dict(zip(sizes, "osD^v<>ph*"))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run in runs:
        ax.scatter(run_minutes(run), run["test_dice_mean"], color=colors[run["arm"]], marker=markers.get(run["size"], "o"), s=22)
    for peer in results.get("peers", []):
        ax.scatter(peer["train_seconds"] / 60, peer["test_dice_mean"], color="black", marker="x", s=40)
    for text, point in peer_labels(results.get("peers", [])):
        ax.annotate(text, point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    handles = [plt.Line2D([], [], color=colors[a], marker="o", linestyle="", label=a) for a in arms]
    handles += [plt.Line2D([], [], color="black", marker="x", linestyle="", label=name)
                for name in dict.fromkeys(p["name"] for p in results.get("peers", []))]
    handles += [plt.Line2D([], [], color="gray", marker=markers[s], linestyle="", label=f"{s} cases") for s in sizes]
    minutes = [run_minutes(r) for r in runs] + [r["train_seconds"] / 60 for r in results.get("peers", [])]
    if minutes and max(minutes) > 5 * max(min(minutes), 1e-9):  # log axis only where the range is wide
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(log_tick_label))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(log_tick_label))
    ax.margins(x=0.12)  # room for the peers' labels at the right edge
    ax.set_xlabel("training wall-clock minutes (per run, as logged)")
    ax.set_ylabel("test Dice (mean over classes and cases)")
    ax.set_title("Test Dice against training time")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7)
    return _save(fig, path)


def plot_convergence(results: dict[str, Any], path: Path) -> Path:
    runs = results["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    sizes = sorted({r["size"] for r in runs})
    colors = _arm_colors(arms)
    fig, axes = plt.subplots(2, len(sizes), figsize=(3.2 * len(sizes), 5.5), squeeze=False, sharey=True)
    for column, size in enumerate(sizes):
        for run in (r for r in runs if r["size"] == size):
            seconds = [p["elapsed"] for p in run["curve"]]
            epochs = [p["epoch"] for p in run["curve"]]
            dice = [p["val_dice"] for p in run["curve"]]
            axes[0][column].plot(seconds, dice, color=colors[run["arm"]], alpha=0.8, linewidth=1)
            axes[1][column].plot(epochs, dice, color=colors[run["arm"]], alpha=0.8, linewidth=1, marker=".")
        axes[0][column].set_title(f"{size} training cases")
        axes[0][column].set_xlabel("seconds")
        axes[1][column].set_xlabel("epoch")
        for row in (0, 1):
            axes[row][column].grid(alpha=0.3)
    axes[0][0].set_ylabel("val Dice")
    axes[1][0].set_ylabel("val Dice")
    handles = [plt.Line2D([], [], color=colors[arm], label=arm) for arm in arms]
    fig.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(arms), 3))
    fig.suptitle("Convergence (one line per seed)")
    return _save(fig, path)


def plot_transferability(results: dict[str, Any], path: Path) -> Path:
    """Per size, each arm's per-seed (score, test Dice) points and its mean, for the study's first score and stride."""
    rows = primary_rankings(results)
    arms = list(dict.fromkeys(a["arm"] for row in rows for a in row["arms"]))
    colors = _arm_colors(arms)
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.8), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for arm in row["arms"]:
            ax.scatter(arm["seed_scores"], arm["seed_dice"], color=colors[arm["arm"]], s=14, alpha=0.5)
            ax.scatter([arm["score"]], [arm["test_dice"]], color=colors[arm["arm"]], s=50, edgecolor="black", label=arm["arm"])
        ax.set_title(f"{row['size']} training cases: Kendall tau {fmt(row['kendall_tau'], 2)}")
        ax.set_xlabel(f"{score_label(row['score'])} (stride {row['stride']}, before fine-tuning)")
        ax.set_ylabel("test Dice after fine-tuning")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as stream:
            fig.savefig(stream, format="png", dpi=110, bbox_inches="tight")  # keeps a legend below the axes
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------- documents


def _signed_rank(comparison: dict[str, Any]) -> str:
    """The seed-level signed-rank p as a clause, from 6 seeds on (below that it cannot fall under 0.03)."""
    p = comparison.get("p_seeds_signed_rank")
    if comparison["n_seeds"] < 6 or p is None or not math.isfinite(p):
        return ""
    return f"; exact signed-rank p over the {comparison['n_seeds']} seed differences {p_phrase(p)}"


def findings(results: dict[str, Any]) -> list[str]:
    """One plain sentence per comparison (what the numbers say, including where transfer does not help)."""
    lines = []
    for r in results["comparisons"]:
        lines.append(f"{r['arm']} vs {r['control']} with {r['size']} training cases: {r['mean_difference']:+.3f} Dice "
                     f"(per seed {seed_values(r['seed_differences'], r['seeds'], signed=True)}; 95% CI {fmt(r['ci_low'])} to "
                     f"{fmt(r['ci_high'])} by a bootstrap over {r['n_seeds']} seeds and {r['n']} test cases; p {p_phrase(r['p_value'])}, "
                     f"t-test over seeds and cases, {fmt(r['degrees_of_freedom'], 1)} df{_signed_rank(r)}): {r['verdict']}"
                     f"{' (negative transfer)' if r['negative_transfer'] else ''}.")
    for r in results["learning_curves"]:
        if r["collapsed_seeds"]:
            lines.append(f"{r['arm']} with {r['size']} training cases: seed(s) {', '.join(map(str, r['collapsed_seeds']))} "
                         "collapsed (a class below the collapse threshold at the best epoch).")
        if r.get("warned_seeds"):
            lines.append(f"{r['arm']} with {r['size']} training cases: seed(s) {', '.join(map(str, r['warned_seeds']))} "
                         "raised collapse warnings during training (see their summary.json).")
    lines.extend(environment_lines(results))
    return lines


def environment_lines(results: dict[str, Any]) -> list[str]:
    """Warnings when the runs were not all computed with the same libraries, CPU kernels and device, and
    when their hosts' speed differed enough that their seconds do not compare."""
    return _library_lines(results) + _host_speed_lines(results)


def _library_lines(results: dict[str, Any]) -> list[str]:
    differing = results.get("environment_differences") or {}
    if not differing:
        return []
    what = "; ".join(f"{key}: {', '.join(values)}" for key, values in differing.items())
    unknown = results.get("runs_without_environment", 0)
    return [f"The runs were computed in different environments ({what}"
            + (f"; {unknown} run(s) recorded none" if unknown else "")
            + "): the same config and seed can then differ by about seed-noise amounts, so compare arms within one environment "
            "where it matters (each run's summary.json says where it trained)."]


def _host_speed_lines(results: dict[str, Any]) -> list[str]:
    spread = results.get("host_speed")
    if not spread or spread["ratio"] <= COMPARABLE_SPEED_RATIO:
        return []
    return [f"The runs' hosts differed in speed by {spread['ratio']:.1f}x (a fixed Conv3d probe took {spread['fastest']:.3f} to "
            f"{spread['slowest']:.3f} s; environment.probe_seconds in each summary.json): their training seconds, the time to "
            "target and the Dice-against-time plot compare hosts as well as methods."]


def header_lines(results: dict[str, Any]) -> list[str]:
    study = results["study"]
    return [f"Dataset: `{study['dataset']}`; {study['n_test']} fixed test cases (never trained on or used for model "
            f"selection), {study['n_val']} fixed validation cases (model selection), training subsets drawn from "
            f"{study['n_pool']} cases (nested per seed). Arms: {', '.join(study['arms'])}; control: {study['control']}; "
            f"seeds: {study['seeds']}. Test Dice = mean over classes per case, then over seeds and cases; CIs from a two-level "
            "bootstrap (seeds resampled, then cases); p-values from a t-test whose standard error adds seed and case "
            f"variance (Satterthwaite df), so seed-to-seed noise counts and a case is not counted once per seed. {_budget_sentence(study)}",
            f"{study['finished_runs']} of {study['total_runs']} runs finished."]


def _budget_sentence(study: dict[str, Any]) -> str:
    """Whether the runs took equal optimiser steps, and what a continued arm's steps count."""
    steps = study.get("steps", [])
    continued = study.get("continued_arms", {})
    also = "".join(f" {arm} continues {source}'s run of its seed: its steps come on top of that run's." for arm, source
                   in continued.items())
    if len(steps) > 1:
        return (f"Runs take different numbers of optimiser steps on purpose ({steps[0]} to {steps[-1]}, column steps; "
                f"allow_unequal_budgets): compare arms with that in mind.{also}")
    return f"Every run takes the same number of optimiser steps (column steps; the study refuses to report otherwise).{also}"


def markdown_report(results: dict[str, Any]) -> str:
    parts = [f"# Transfer study: {results['study']['name']}", "", *header_lines(results), "",
             "## Learning curves", "", markdown_table(*learning_table(results)), "", "![learning curve](learning_curve.png)", "",
             "## Paired comparison with the control", "", markdown_table(*comparison_table(results)), "",
             "![paired difference](paired_difference.png)" if results["comparisons"] else NO_PAIRS, "",
             *[f"- {line}" for line in findings(results)], "",
             *(["## Peer: nnU-Net v2 on the same cases", "", markdown_table(*peer_table(results)), ""] if results.get("peers") else []),
             *(["### Paired with the peer (same training subsets, same test cases)", "",
                markdown_table(*peer_comparison_table(results)), ""] if results.get("peer_comparisons") else []),
             "## Test Dice against training time", "", "![dice vs time](dice_vs_time.png)", "",
             "## Time to target validation Dice", "", markdown_table(*target_table(results)), "",
             "## Convergence", "", "![convergence](convergence.png)", ""]
    for title, tables, lines in ranking_sections(results):
        parts += [f"## {title}", ""]
        for table in tables:
            parts += [markdown_table(*table), ""]
        parts += [*[f"- {line}" for line in lines], ""]
    if results.get("transferability"):
        parts += ["![transferability](transferability.png)", ""]
    return "\n".join(parts)


def html_report(results: dict[str, Any], images: dict[str, Path]) -> str:
    def image(name: str) -> str:
        data = base64.b64encode(images[name].read_bytes()).decode()
        return f'<figure><img alt="{PLOTS[name]}" src="data:image/png;base64,{data}"><figcaption>{PLOTS[name]}</figcaption></figure>'

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}img{max-width:100%}")
    paragraphs = "".join(f"<p>{html.escape(line.replace('`', ''))}</p>" for line in header_lines(results))
    finding_items = "".join(f"<li>{html.escape(line)}</li>" for line in findings(results))
    title = html.escape(f"Transfer study: {results['study']['name']}")
    ranking = "".join(f"<h2>{html.escape(title)}</h2>" + "".join(html_table(*table) for table in tables)
                      + "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"
                      for title, tables, lines in ranking_sections(results))
    if "transferability" in images:
        ranking += image("transferability")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>"
            f"<h1>{title}</h1>{paragraphs}<h2>Learning curves</h2>{html_table(*learning_table(results))}{image('learning_curve')}"
            f"<h2>Paired comparison with the control</h2>{html_table(*comparison_table(results))}"
            f"{image('paired_difference') if 'paired_difference' in images else f'<p>{html.escape(NO_PAIRS)}</p>'}"
            f"<ul>{finding_items}</ul><h2>Test Dice against training time</h2>{html_table(*peer_table(results))}"
            f"{html_table(*peer_comparison_table(results)) if results.get('peer_comparisons') else ''}{image('dice_vs_time')}"
            f"<h2>Time to target validation Dice</h2>{html_table(*target_table(results))}"
            f"<h2>Convergence</h2>{image('convergence')}{ranking}</body></html>")


def write_results(results: dict[str, Any], output: Path) -> Path:
    """Write ``results.json`` (the study's design under ``"study"``, then the analysis) into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    return write_atomic(output / "results.json", json.dumps(json_safe(results), indent=2) + "\n")


def write_report(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write ``results.json``, the PNGs, ``report.md`` and ``report.html`` into ``output`` (the paired-difference
    figure only once some arm and its control share a training-set size and seed)."""
    output.mkdir(parents=True, exist_ok=True)
    images = {"learning_curve": plot_learning_curve(results, output / "learning_curve.png"),
              "dice_vs_time": plot_dice_vs_time(results, output / "dice_vs_time.png"),
              "convergence": plot_convergence(results, output / "convergence.png")}
    if results["comparisons"]:
        images["paired_difference"] = plot_paired_difference(results, output / "paired_difference.png")
    else:  # no empty axes, and no figure left over from an earlier report of this folder
        (output / "paired_difference.png").unlink(missing_ok=True)
    if results.get("transferability"):
        images["transferability"] = plot_transferability(results, output / "transferability.png")
    return {
        "json": write_results(results, output),
        "markdown": write_atomic(output / "report.md", markdown_report(results)),
        "html": write_atomic(output / "report.html", html_report(results, images)),
        **images,
    }

