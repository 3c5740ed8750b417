"""Does mirror test-time augmentation help? Finished study runs re-predicted with and without ``--tta``.

    python benchmarks/tta.py runs/budget_n10 --arms imagenet_1875,scratch_1875 [--runs 'n010_seed*'] [--data MSD_ROOT]

For every run of the given arms (``STUDY/runs/ARM/nNNN_seedS``), its best checkpoint predicts the run's
own **validation** cases (``splits.json``: what a user may choose the option on) and the study's
**test** cases (``STUDY/test_cases``), once plainly and once with ``tta`` (every combination of the flips
the run was trained with, ``routes.base.tta_flips``), through the library functions ``seg-transfer
predict`` / ``evaluate`` call.
Prints mean Dice per case (classes averaged, then cases) for each seed and the change TTA makes;
the decision belongs to the validation columns, the test columns show whether it held.
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


def score_run(run_dir: Path, study: Path, data: Path, batch_size: int) -> dict[str, float]:
    """{'val'|'test' + ' plain'|' tta': mean case Dice} of one run's best checkpoint."""
    labels_json = study / "test_cases" / "labels.json"
    scores = {}
    with tempfile.TemporaryDirectory(prefix="tta_") as tmp:
        tmp = Path(tmp)
        sets = {"val": validation_inputs(run_dir, data, tmp),
                "test": (study / "test_cases" / "images.txt", study / "test_cases" / "labels")}
        for subset, (images, labels) in sets.items():
            for tta in (False, True):
                out = tmp / f"{subset}_{tta}"
                options = PredictOptions(batch_size=batch_size, tta=tta, progress=False)
                report = run_predict(PredictRequest(str(run_dir), str(images), out / "pred", device="cpu", options=options))
                if report.failed:
                    raise SystemExit(f"{run_dir}: {len(report.failed)} case(s) failed, e.g. {report.failed[0].reason}")
                scores[f"{subset} {'tta' if tta else 'plain'}"] = mean_case_dice(out / "pred", labels, labels_json, out / "eval")
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished study folder (seg-transfer compare --output)")
    parser.add_argument("--arms", required=True, help="comma-separated arm names")
    parser.add_argument("--data", type=Path, default=HIPPOCAMPUS, help="MSD folder the study's cases come from")
    parser.add_argument("--runs", default="n*_seed*", help="run folders of each arm to use (glob), e.g. n010_seed*")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print("| arm | run | val plain | val TTA | val change | test plain | test TTA | test change |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in args.arms.split(","):
        changes = {"val": [], "test": []}
        for run_dir in sorted((args.study / "runs" / arm).glob(args.runs)):
            s = score_run(run_dir, args.study, args.data, args.batch_size)
            for subset in changes:
                changes[subset].append(s[f"{subset} tta"] - s[f"{subset} plain"])
            print(f"| {arm} | {run_dir.name} | {s['val plain']:.3f} | {s['val tta']:.3f} | {changes['val'][-1]:+.3f} "
                  f"| {s['test plain']:.3f} | {s['test tta']:.3f} | {changes['test'][-1]:+.3f} |", flush=True)
        print(f"| {arm} | mean change | | | {np.mean(changes['val']):+.3f} | | | {np.mean(changes['test']):+.3f} |", flush=True)


if __name__ == "__main__":
    main()
