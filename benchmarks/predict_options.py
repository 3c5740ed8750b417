"""Which prediction options help? Finished study runs re-predicted plainly and with each option.

    python benchmarks/predict_options.py runs/budget_n10 --arms imagenet_1875,scratch_1875 \
        [--options tta,lcc,tta+lcc] [--runs 'n010_seed*'] [--data MSD_ROOT]

Options (``OPTIONS`` below): ``tta`` = ``predict --tta`` (every combination of the flips the run was trained
with, ``routes.base.tta_flips``); ``lcc`` = ``predict --postprocess largest-component`` (per class, only
its largest 26-connected component is kept, as nnU-Net's post-processing does); ``tta+lcc`` = both.
For every run of the given arms (``STUDY/runs/ARM/nNNN_seedS``), its best checkpoint predicts the run's
own **validation** cases (``splits.json``: what a user may choose an option on) and the study's **test**
cases (``STUDY/test_cases``), through the library functions ``seg-transfer predict`` / ``evaluate`` call.
Prints mean Dice per case (classes averaged, then cases) for each seed and the change each option makes;
the decision belongs to the validation columns, the test columns show whether it held. ``test chosen``: the
option's test Dice where it raised the run's validation Dice, else the plain test Dice: a choice per checkpoint
on its own validation cases, as the end of training makes it for ``predict``'s default TTA (which scores the
validation cases in the network's resampled space, these columns in the input grid).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from seg_transfer.evaluation.evaluate import evaluate_folders
from seg_transfer.inference.batch import PredictRequest, run_predict
from seg_transfer.inference.predictor import PredictOptions
from seg_transfer.study.runner import read_test_dice

HIPPOCAMPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Task04_Hippocampus"
OPTIONS = {
    "plain": {"tta": False},
    "tta": {"tta": True},
    "lcc": {"tta": False, "postprocess": "largest-component"},
    "tta+lcc": {"tta": True, "postprocess": "largest-component"},
}
OPTION_NAMES = {"tta": "TTA", "lcc": "LCC", "tta+lcc": "TTA+LCC"}


def mean_case_dice(pred_dir: Path, label_dir: Path, labels: Path, out: Path) -> float:
    evaluate_folders(pred_dir, label_dir, out, labels=labels, n_resamples=200)
    per_case = read_test_dice(out / "metrics.json")
    return float(np.mean([np.mean(list(classes.values())) for classes in per_case.values()]))


def validation_inputs(run_dir: Path, data: Path, folder: Path) -> tuple[Path, Path]:
    """(list file of the run's validation images, folder of links to their labels) under ``folder``."""
    names = json.loads((run_dir / "splits.json").read_text())["val"]
    labels = folder / "val_labels"
    labels.mkdir(parents=True)
    for name in names:
        (labels / f"{name}.nii.gz").symlink_to((data / "labelsTr" / f"{name}.nii.gz").resolve())
    images = folder / "val_images.txt"
    images.write_text("".join(f"{data / 'imagesTr' / name}.nii.gz\n" for name in names))
    return images, labels


def score_run(run_dir: Path, study: Path, data: Path, batch_size: int, options: list[str]) -> dict[tuple[str, str], float]:
    """{('val'|'test', option): mean case Dice} of one run's best checkpoint, for 'plain' and ``options``."""
    labels_json = study / "test_cases" / "labels.json"
    scores = {}
    with tempfile.TemporaryDirectory(prefix="predict_options_") as tmp:
        tmp = Path(tmp)
        sets = {"val": validation_inputs(run_dir, data, tmp),
                "test": (study / "test_cases" / "images.txt", study / "test_cases" / "labels")}
        for subset, (images, labels) in sets.items():
            for option in ["plain", *options]:
                out = tmp / f"{subset}_{option}"
                predict_options = PredictOptions(batch_size=batch_size, progress=False, **OPTIONS[option])
                report = run_predict(PredictRequest((str(run_dir),), str(images), out / "pred", device="cpu", options=predict_options))
                if report.failed:
                    raise SystemExit(f"{run_dir}: {len(report.failed)} case(s) failed, e.g. {report.failed[0].reason}")
                scores[subset, option] = mean_case_dice(out / "pred", labels, labels_json, out / "eval")
    return scores


def table_header(options: list[str]) -> str:
    cells = ["arm", "run"]
    for subset in ("val", "test"):
        cells.append(f"{subset} plain")
        for option in options:
            cells += [f"{subset} {OPTION_NAMES[option]}", f"{subset} change"]
    cells += [f"test {OPTION_NAMES[option]} chosen" for option in options]
    return f"| {' | '.join(cells)} |\n|{'---|' * len(cells)}"


def chosen_on_validation(scores: dict[tuple[str, str], float], option: str) -> float:
    """The test Dice with ``option`` where it raised the validation Dice, else the plain test Dice."""
    return scores["test", option] if scores["val", option] > scores["val", "plain"] else scores["test", "plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished study folder (seg-transfer compare --output)")
    parser.add_argument("--arms", required=True, help="comma-separated arm names")
    parser.add_argument("--options", default="tta", help=f"comma-separated, from {', '.join(o for o in OPTIONS if o != 'plain')}")
    parser.add_argument("--data", type=Path, default=HIPPOCAMPUS, help="MSD folder the study's cases come from")
    parser.add_argument("--runs", default="n*_seed*", help="run folders of each arm to use (glob), e.g. n010_seed*")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    options = args.options.split(",")
    unknown = [o for o in options if o not in OPTIONS or o == "plain"]
    if unknown:
        parser.error(f"unknown option(s) {', '.join(unknown)}; choose from {', '.join(o for o in OPTIONS if o != 'plain')}")
    print(table_header(options))
    for arm in args.arms.split(","):
        changes: dict[tuple[str, str], list[float]] = {}
        for run_dir in sorted((args.study / "runs" / arm).glob(args.runs)):
            s = score_run(run_dir, args.study, args.data, args.batch_size, options)
            cells = [arm, run_dir.name]
            for subset in ("val", "test"):
                cells.append(f"{s[subset, 'plain']:.3f}")
                for option in options:
                    change = s[subset, option] - s[subset, "plain"]
                    changes.setdefault((subset, option), []).append(change)
                    cells += [f"{s[subset, option]:.3f}", f"{change:+.3f}"]
            for option in options:
                chosen = chosen_on_validation(s, option)
                changes.setdefault(("chosen", option), []).append(chosen - s["test", "plain"])
                cells.append(f"{chosen:.3f}")
            print(f"| {' | '.join(cells)} |", flush=True)
        cells = [arm, "mean change"]
        for subset in ("val", "test"):
            cells.append("")
            for option in options:
                cells += ["", f"{np.mean(changes[subset, option]):+.3f}"]
        cells += [f"{np.mean(changes['chosen', option]):+.3f}" for option in options]
        print(f"| {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
