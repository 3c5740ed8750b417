"""The baseline users would pick instead: nnU-Net v2 from scratch, trained on exactly the cases of a
``seg-transfer compare`` study and scored with our own evaluator, so the report can put it next to the arms.

    python benchmarks/nnunet_peer.py --study runs/study_hippocampus --size 10 --seeds 0 1 2 --epochs 1 5
        [--configuration 3d_fullres] [--work DIR] [--device cpu] [--threads N] [--iterations-per-epoch 250] [--tta]

For each (size, seed) the study's training subset plus its validation cases become an nnU-Net raw dataset
(symlinks only, id 501 + the subset's position in ``results.json``) under ``--work`` (default
``<study>/nnunet_peer``); it is planned and preprocessed once (``nnUNetv2_plan_and_preprocess -d ID -c CONFIG
--verify_dataset_integrity -np 1 -npfp 1``), and ``splits_final.json`` holds one fold: train = the subset,
val = the study's validation cases. For each epoch count fold 0 is trained as ``nnUNetv2_train ID CONFIG 0
-tr TRAINER`` would (``nnunetv2.run.run_training.run_training``, final validation included), the test cases
are predicted as ``nnUNetv2_predict -f 0 --disable_tta -npp 0 -nps 0`` would (``nnUNetPredictor``; with ``--tta``
nnU-Net's own mirroring, its default, in a row of its own), and scored
with ``seg_transfer.evaluation.evaluate_folders``. Training and prediction go through nnU-Net's Python API
in a child process only so that torch uses ``--threads`` threads (the nnU-Net CLIs take every core on CPU).

TRAINER is nnU-Net's own ``nnUNetTrainer_1epoch`` for one epoch of 250 iterations (50 validation iterations).
For more epochs or another ``--iterations-per-epoch`` a small subclass ``nnUNetTrainer_peer_<E>epochs_<I>iters``
is written under ``<work>/trainers`` and found through nnU-Net's ``nnUNet_extTrainer`` (recent nnunetv2, e.g.
2.8; nothing is written into site-packages); it runs ``round(50 * I / 250)`` (>= 1) validation iterations per
epoch and saves ``checkpoint_latest.pth`` after every epoch, so a training stopped part-way (a session's end,
Ctrl-C) continues from its last finished epoch on rerun (nnU-Net's ``--c``; from its best epoch when only
``checkpoint_best.pth`` exists, as with trainers written before this). Its seconds are then the epochs
finished before (from nnU-Net's training logs) plus the last process's wall clock; the minutes of an epoch
cut short are lost, not counted. A model trained earlier with nnU-Net's stock ``nnUNetTrainer_<E>epochs`` is
reused as it is.

Wall-clock seconds (``time.monotonic`` around each child process) of preprocessing, training and prediction
go into one row per (configuration, size, seed, epochs) of ``<study>/peer_nnunet.json``; a finished row is
skipped on rerun, a finished preprocessing or training is reused. Data-augmentation workers:
``nnUNet_n_proc_DA`` if set, else threads - 1 (0 = nnU-Net's single-threaded augmenter).

Another study with the same training subsets and validation cases (every Hippocampus study: a subset depends
on size and seed only) can pair the same nnU-Net trainings with its own arms: ``--study OTHER --work
<study>/nnunet_peer`` reuses preprocessing and training (their recorded seconds) and only predicts and scores
``OTHER``'s test cases (inputs and predictions are kept per test set). Each raw dataset records the cases it
was built for (``seg_transfer_split.json``); a study whose subset or validation cases differ is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

PEER = "nnU-Net v2"
FORMAT = "seg_transfer/nnunet_peer/1"
RESULTS_NAME = "peer_nnunet.json"
DATASET_ID_BASE = 500
DEFAULT_ITERATIONS, DEFAULT_VAL_ITERATIONS = 250, 50
FILE_ENDING = ".nii.gz"
PLANS = "nnUNetPlans"
SPLIT_NAME = "seg_transfer_split.json"  # in a raw dataset folder: the training / validation cases it was built for

TRAIN_CODE = """\
import json, sys, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from nnunetv2.run.run_training import run_training
run_training(str(a["dataset_id"]), a["configuration"], 0, trainer_class_name=a["trainer"], device=torch.device(a["device"]),
             continue_training=a["continue"])
"""

PREDICT_CODE = """\
import json, sys, torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
p = nnUNetPredictor(use_mirroring=a["tta"], perform_everything_on_device=a["device"] != "cpu",
                    device=torch.device(a["device"]), allow_tqdm=False)
p.initialize_from_trained_model_folder(a["model"], use_folds=(0,), checkpoint_name="checkpoint_final.pth")
p.predict_from_files_sequential(a["input"], a["output"], save_probabilities=False, overwrite=True)
"""

PREPROCESS_CODE = """\
import sys
from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry
sys.argv[0] = "nnUNetv2_plan_and_preprocess"
plan_and_preprocess_entry()
"""

TRAINER_TEMPLATE = '''\
"""Written by benchmarks/nnunet_peer.py: nnU-Net's default trainer with a set training length, saving
checkpoint_latest.pth after every epoch so that an interrupted training continues (nnU-Net's --c)."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    def initialize(self):
        # here, not in on_train_start: a continued training (--c) builds the optimiser and its poly LR schedule
        # over num_epochs in load_checkpoint -> initialize, before on_train_start runs
        self.num_epochs, self.num_iterations_per_epoch = {epochs}, {iterations}
        self.num_val_iterations_per_epoch = {val_iterations}
        self.save_every = 1
        super().initialize()
'''


class PeerError(Exception):
    """Bad input: one line for the user, exit status 2."""


class StepFailed(Exception):
    """An nnU-Net step failed: one line for the user (pointing at its log), exit status 1."""


@dataclass(frozen=True)
class Study:
    """What the peer needs from a study folder's ``results.json`` and ``test_cases/``."""

    folder: Path
    dataset: Path
    subsets: dict[str, list[str]]
    val: list[str]
    test_images: list[Path]
    test_labels: Path
    labels_file: Path
    tolerance_mm: float


@dataclass(frozen=True)
class Job:
    """One row to produce: where nnU-Net works, and with what."""

    work: Path
    configuration: str
    size: int
    seed: int
    epochs: int
    iterations: int
    device: str
    threads: int
    tta: bool = False  # predict with nnU-Net's mirroring (its default; off unless --tta)

    @property
    def key(self) -> tuple:
        return (self.configuration, self.size, self.seed, self.epochs, self.tta)


# ----------------------------------------------------------------------------- study inputs


def load_study(folder: Path) -> Study:
    """Read ``results.json`` and ``test_cases/`` of a study folder; PeerError if something is missing."""
    results = folder / "results.json"
    try:
        summary = json.loads(results.read_text())["study"]
        subsets, val, dataset = summary["train_subsets"], summary["val_cases"], summary["dataset"]
    except FileNotFoundError:
        raise PeerError(f"{results}: not found (run `seg-transfer compare` first)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PeerError(f"{results}: not a study results file ({type(exc).__name__}: {exc})") from None
    tests = folder / "test_cases"
    for path in (tests / "images.txt", tests / "labels", tests / "labels.json"):
        if not path.exists():
            raise PeerError(f"{path}: not found (the study writes it before its first run)")
    images = [Path(line.strip()) for line in (tests / "images.txt").read_text().splitlines() if line.strip()]
    tolerance = (summary.get("config") or {}).get("tolerance_mm", 1.0)
    return Study(folder, Path(dataset), subsets, list(val), images, tests / "labels", tests / "labels.json", float(tolerance))


def subset_key(size: int, seed: int) -> str:
    """Key of a training subset in ``results.json`` (``n10_seed0``)."""
    return f"n{size}_seed{seed}"


def check_request(study: Study, sizes: list[int], seeds: list[int]) -> None:
    """PeerError naming the first requested size or seed the study has no training subset for."""
    for size in sizes:
        for seed in seeds:
            if subset_key(size, seed) not in study.subsets:
                have = ", ".join(study.subsets) or "none"
                raise PeerError(f"{study.folder}: no training subset for size {size}, seed {seed} (study has: {have})")


def dataset_id(study: Study, size: int, seed: int) -> int:
    """nnU-Net dataset id of a subset: 501 + its position among the study's subsets."""
    number = DATASET_ID_BASE + 1 + list(study.subsets).index(subset_key(size, seed))
    if number > 999:
        raise PeerError(f"too many training subsets for nnU-Net dataset ids ({number} > 999)")
    return number


def source_cases(dataset: Path) -> dict[str, tuple[Path, Path]]:
    """{case: (image, label)} of the study's MSD-layout dataset."""
    from seg_transfer.data.cases import DatasetError, cases_from_msd

    try:
        train, _, _ = cases_from_msd(dataset)
    except DatasetError as exc:
        raise PeerError(str(exc)) from None
    return {case.name: (case.image, case.label) for case in train}


def nnunet_labels(labels_file: Path) -> dict[str, int]:
    """nnU-Net v2 label map {name: value} (0 named "background") from the study's JSON label map."""
    raw = json.loads(labels_file.read_text())
    values = {int(k): str(v) for k, v in raw.items()}
    values[0] = "background"
    if len(set(values.values())) != len(values):
        raise PeerError(f"{labels_file}: class names are not unique")
    return {name: value for value, name in sorted(values.items())}


# ----------------------------------------------------------------------------- nnU-Net inputs (pure)


def dataset_json(labels: dict[str, int], n_training: int, channel_names: dict[str, str] | None = None,
                 name: str = "peer") -> dict:
    """Contents of an nnU-Net v2 ``dataset.json``."""
    return {"name": name, "channel_names": channel_names or {"0": "MRI"}, "labels": labels,
            "numTraining": n_training, "file_ending": FILE_ENDING}


def splits_final(train: list[str], val: list[str]) -> list[dict[str, list[str]]]:
    """Contents of ``splits_final.json``: one fold, the study's training subset and validation cases."""
    return [{"train": list(train), "val": list(val)}]


def link(target: Path, path: Path) -> None:
    """Symlink ``path`` -> ``target`` (absolute); PeerError if ``path`` exists pointing elsewhere."""
    target = Path(target).resolve()
    if path.is_symlink() or path.exists():
        if path.resolve() != target:
            raise PeerError(f"{path}: already exists and is not a link to {target}; use a new --work")
        return
    path.symlink_to(target)


def check_ending(path: Path) -> None:
    """PeerError unless ``path`` is a NIfTI ``.nii.gz`` file (the one file ending the peer datasets use)."""
    if not str(path).endswith(FILE_ENDING):
        raise PeerError(f"{path}: nnU-Net peer expects {FILE_ENDING} files")


def write_raw_dataset(folder: Path, cases: dict[str, tuple[Path, Path]], labels: dict[str, int],
                      channel_names: dict[str, str] | None = None) -> Path:
    """An nnU-Net raw dataset in ``folder``: ``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz``
    links to ``cases`` ({case: (image, label)}) and ``dataset.json``; returns ``folder``."""
    from seg_transfer.atomic import write_atomic

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case, (image, label) in cases.items():
        check_ending(image)
        check_ending(label)
        link(image, folder / "imagesTr" / f"{case}_0000{FILE_ENDING}")
        link(label, folder / "labelsTr" / f"{case}{FILE_ENDING}")
    extra = sorted({p.name for p in (folder / "labelsTr").iterdir()} - {f"{c}{FILE_ENDING}" for c in cases})
    if extra:
        raise PeerError(f"{folder}: holds other cases ({', '.join(extra[:3])}, ...); use a new --work")
    content = dataset_json(labels, len(cases), channel_names, folder.name)
    write_atomic(folder / "dataset.json", json.dumps(content, indent=2) + "\n")
    return folder


def write_splits(preprocessed: Path, train: list[str], val: list[str]) -> Path:
    """Write ``splits_final.json`` (one fold) into an nnU-Net preprocessed dataset folder."""
    from seg_transfer.atomic import write_atomic

    return write_atomic(preprocessed / "splits_final.json", json.dumps(splits_final(train, val), indent=2) + "\n")


def record_split(folder: Path, train: list[str], val: list[str]) -> None:
    """Record in raw dataset ``folder`` the training and validation cases it is built for; PeerError if it was
    built for others (its preprocessing, splits and trained models would belong to them), so that studies with
    the same subsets can share one ``--work`` and reuse its trainings, and studies with other subsets cannot.
    A folder built before splits were recorded is accepted when it holds exactly these cases."""
    from seg_transfer.atomic import write_atomic

    split = {"train": sorted(train), "val": sorted(val)}
    path = folder / SPLIT_NAME
    if path.is_file():
        held = json.loads(path.read_text())
        if held != split:
            raise PeerError(f"{folder}: was built for {len(held['train'])} training / {len(held['val'])} validation cases "
                            f"other than this study's {len(train)} / {len(val)}; use a new --work")
        return
    if (folder / "labelsTr").is_dir():
        cases = sorted(p.name.removesuffix(FILE_ENDING) for p in (folder / "labelsTr").iterdir())
        if cases != sorted(train + val):
            raise PeerError(f"{folder}: holds {len(cases)} cases other than this study's {len(train)} training + "
                            f"{len(val)} validation cases; use a new --work")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(split, indent=2) + "\n")


def test_set_id(images: list[Path]) -> str:
    """Short stable name of a set of test images (their resolved paths, order ignored)."""
    text = "\n".join(sorted(str(Path(image).resolve()) for image in images))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def link_test_inputs(folder: Path, images: list[Path]) -> Path:
    """``folder/<case>_0000.nii.gz`` links to the study's test images; returns ``folder`` (one folder per test
    set, :func:`test_set_id`: nnU-Net predicts every image in it)."""
    from seg_transfer.data.io import strip_volume_suffix

    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        check_ending(image)
        link(image, folder / f"{strip_volume_suffix(image)}_0000{FILE_ENDING}")
    return folder


# ----------------------------------------------------------------------------- trainers


def stock_trainer(epochs: int) -> str:
    """Name of nnU-Net's own trainer class for ``epochs`` epochs."""
    return "nnUNetTrainer_1epoch" if epochs == 1 else f"nnUNetTrainer_{epochs}epochs"


def has_stock_trainer(name: str) -> bool:
    """Whether the installed nnU-Net ships trainer class ``name`` (training_length variants)."""
    module = importlib.import_module("nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs")
    return hasattr(module, name)


def val_iterations(iterations: int) -> int:
    """Validation iterations per epoch, scaled like nnU-Net's 50 per 250 training iterations."""
    return max(1, round(DEFAULT_VAL_ITERATIONS * iterations / DEFAULT_ITERATIONS))


def choose_trainer(epochs: int, iterations: int, folder: Path, trained=lambda trainer: False) -> tuple[str, int]:
    """(trainer class name, validation iterations per epoch): nnU-Net's own for one epoch (nothing to resume)
    or when ``trained(its name)`` says a model of it is finished, else a resumable subclass written into
    ``folder`` (found via ``nnUNet_extTrainer``)."""
    stock = stock_trainer(epochs)
    if iterations == DEFAULT_ITERATIONS and has_stock_trainer(stock) and (epochs == 1 or trained(stock)):
        return stock, DEFAULT_VAL_ITERATIONS
    if not hasattr(importlib.import_module("nnunetv2.paths"), "nnUNet_extTrainer"):
        raise PeerError(f"this nnunetv2 ({version('nnunetv2')}) cannot load external trainers (nnUNet_extTrainer); "
                        f"use --iterations-per-epoch {DEFAULT_ITERATIONS} and epochs nnU-Net ships trainers for")
    name = f"nnUNetTrainer_peer_{epochs}epochs_{iterations}iters"
    code = TRAINER_TEMPLATE.format(name=name, epochs=epochs, iterations=iterations, val_iterations=val_iterations(iterations))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"peer_{epochs}epochs_{iterations}iters.py"
    if not path.is_file() or path.read_text() != code:
        path.write_text(code)
    return name, val_iterations(iterations)


# ----------------------------------------------------------------------------- running nnU-Net


def nnunet_env(work: Path, threads: int) -> dict[str, str]:
    """Environment of the nnU-Net child processes: its folders under ``work``, ``threads`` threads."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(work / name)
    env["nnUNet_extTrainer"] = str(work / "trainers")
    env.setdefault("nnUNet_n_proc_DA", str(max(0, threads - 1)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "nnUNet_def_n_proc"):
        env[name] = str(threads)
    return env


def timed(command: list[str], env: dict[str, str], log: Path, what: str) -> float:
    """Run ``command`` with its output in ``log``; wall-clock seconds. StepFailed if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stream:
        start = time.monotonic()
        code = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - start
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise StepFailed(f"nnU-Net {what} failed (exit {code}): {lines[-1] if lines else 'no output'} (log: {log})")
    return seconds


def python_step(code: str, args: dict | None = None) -> list[str]:
    """Command line running ``code`` in a fresh interpreter of this environment, ``args`` as JSON."""
    return [sys.executable, "-c", code] + ([json.dumps(args)] if args is not None else [])


def load_steps(work: Path) -> dict:
    """Seconds of the finished preprocessing/training steps (reused on rerun)."""
    path = work / "steps.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_step(work: Path, key: str, seconds: float) -> None:
    """Record that step ``key`` finished in ``seconds``."""
    from seg_transfer.atomic import update_json_atomic

    update_json_atomic(work / "steps.json", lambda steps: {**steps, key: seconds}, {})


def preprocess(job: Job, number: int, name: str, env: dict[str, str]) -> float:
    """Plan and preprocess dataset ``number`` for the configuration once; its seconds."""
    key = f"{name}/{job.configuration}/preprocess"
    plans = job.work / "nnUNet_preprocessed" / name / f"{PLANS}.json"
    if key in load_steps(job.work) and plans.is_file():
        return load_steps(job.work)[key]
    args = ["-d", str(number), "-c", job.configuration, "--verify_dataset_integrity", "-np", "1", "-npfp", "1"]
    env = {**env, "nnUNet_n_proc_DA": str(job.threads)}  # the planner passes it to torch.set_num_threads (0 fails)
    seconds = timed(python_step(PREPROCESS_CODE) + args, env, job.work / "logs" / f"{name}__preprocess.log", "planning/preprocessing")
    save_step(job.work, key, seconds)
    return seconds


def model_folder(job: Job, name: str, trainer: str) -> Path:
    """nnU-Net's training output folder of the job (fold 0 lies inside)."""
    return job.work / "nnUNet_results" / name / f"{trainer}__{PLANS}__{job.configuration}"


def logged_epoch_seconds(fold: Path, through_best: bool = False) -> dict[int, float]:
    """{epoch: seconds} of the epochs nnU-Net's training logs in ``fold`` say finished (a later log's
    value of an epoch replaces an earlier one's: that epoch was run again). ``through_best``: only the
    epochs up to the last one that logged a new best EMA pseudo Dice (what ``checkpoint_best.pth`` holds;
    a training continued from it runs the later ones again)."""
    seconds, epoch, best = {}, None, None
    for log in sorted(fold.glob("training_log_*.txt"), key=lambda path: path.stat().st_mtime):
        for line in log.read_text(errors="replace").splitlines():
            text = line.split(": ", 1)[-1].strip()
            if text.startswith("Epoch time:"):
                if epoch is not None:
                    seconds[epoch] = float(text.removeprefix("Epoch time:").removesuffix("s").strip())
            elif text.startswith("Epoch ") and text.removeprefix("Epoch ").isdigit():
                epoch = int(text.removeprefix("Epoch "))
            elif text.startswith("Yayy! New best EMA pseudo Dice") and epoch is not None:
                best = epoch
    if through_best:
        return {e: t for e, t in seconds.items() if best is not None and e <= best}
    return seconds


def resume_checkpoint(fold: Path) -> Path | None:
    """The checkpoint nnU-Net's ``--c`` continues an unfinished training from: ``checkpoint_latest.pth``
    (our trainers write it every epoch), else ``checkpoint_best.pth`` (written whenever the EMA pseudo Dice
    improves, also by trainers that save ``latest`` rarely: their later epochs are then run again and
    counted once, by the rerun); None for a finished or never started training."""
    if (fold / "checkpoint_final.pth").is_file():
        return None
    return next((fold / name for name in ("checkpoint_latest.pth", "checkpoint_best.pth") if (fold / name).is_file()), None)


def train(job: Job, number: int, name: str, trainer: str, env: dict[str, str]) -> float:
    """Train fold 0 (reused if finished, continued from :func:`resume_checkpoint` if stopped part-way); its
    seconds, final validation included (a continued training: the logged seconds of the epochs its checkpoint
    holds + this run's)."""
    key = f"{name}/{trainer}/{job.configuration}/train"
    fold = model_folder(job, name, trainer) / "fold_0"
    if key in load_steps(job.work) and (fold / "checkpoint_final.pth").is_file():
        return load_steps(job.work)[key]
    resume = resume_checkpoint(fold)
    earlier = logged_epoch_seconds(fold, through_best=resume.name == "checkpoint_best.pth") if resume else {}
    if resume:
        print(f"  continuing {name} {trainer} from {resume.name} ({len(earlier)} epoch(s), "
              f"{sum(earlier.values()) / 60:.1f} min logged)", flush=True)
    args = {"dataset_id": number, "configuration": job.configuration, "trainer": trainer, "device": job.device,
            "threads": job.threads, "continue": resume is not None}
    log = job.work / "logs" / f"{name}__{trainer}__{job.configuration}__train{'_continued' if resume else ''}.log"
    seconds = sum(earlier.values()) + timed(python_step(TRAIN_CODE, args), env, log, "training")
    save_step(job.work, key, seconds)
    return seconds


def predict(job: Job, name: str, trainer: str, test_input: Path, output: Path, env: dict[str, str]) -> float:
    """Predict the test cases with fold 0 into ``output``; its seconds."""
    output.mkdir(parents=True, exist_ok=True)  # nnU-Net's sequential predictor does not make it
    args = {"model": str(model_folder(job, name, trainer)), "input": str(test_input), "output": str(output),
            "device": job.device, "threads": job.threads, "tta": job.tta}
    return timed(python_step(PREDICT_CODE, args), env, job.work / "logs" / f"{name}__{trainer}__{job.configuration}__predict.log", "prediction")


def score(study: Study, predictions: Path, out_dir: Path) -> dict[str, dict[str, float]]:
    """{case: {class: Dice}} of the predictions, from our own evaluator."""
    from seg_transfer.evaluation.evaluate import JSON_NAME, evaluate_folders
    from seg_transfer.study.runner import read_test_dice

    evaluate_folders(predictions, study.test_labels, out_dir, tolerance_mm=study.tolerance_mm, labels=study.labels_file)
    return read_test_dice(out_dir / JSON_NAME)


def mean_dice(test_dice: dict[str, dict[str, float]]) -> float | None:
    """Mean over cases of the per-case mean Dice over classes (classes without a Dice left out)."""
    per_case = [sum(v) / len(v) for v in ([d for d in c.values() if d is not None] for c in test_dice.values()) if v]
    return sum(per_case) / len(per_case) if per_case else None


# ----------------------------------------------------------------------------- rows


def load_rows(path: Path) -> list[dict]:
    """Rows of ``peer_nnunet.json`` ([] if absent)."""
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def row_key(row: dict) -> tuple:
    """(configuration, size, seed, epochs, tta) of a row (rows written before --tta existed had none)."""
    return (row["configuration"], row["size"], row["seed"], row["epochs"], row.get("tta", False))


def finished_row(path: Path, job: Job) -> dict | None:
    """The row already written for the job (same iterations per epoch), or None."""
    for row in load_rows(path):
        if row_key(row) == job.key and row.get("iterations_per_epoch") == job.iterations:
            return row
    return None


def save_row(path: Path, row: dict) -> None:
    """Append ``row`` to ``peer_nnunet.json``, replacing a row with the same key; atomic, and under a lock so that
    two processes on one study (``--seeds 1`` and ``--seeds 2`` side by side) keep each other's rows."""
    from seg_transfer.atomic import update_json_atomic

    def add(data: dict) -> dict:
        rows = [r for r in data["rows"] if row_key(r) != row_key(row)] + [row]
        return {"format": FORMAT, "rows": sorted(rows, key=row_key)}

    update_json_atomic(path, add, {"rows": []})


def describe(row: dict) -> str:
    """One human-readable line for a finished row."""
    dice = row["test_dice_mean"]
    return (f"{row['peer']} {row['configuration']} n{row['size']} seed{row['seed']} {row['epochs']} ep "
            f"x {row['iterations_per_epoch']} it: test Dice {'n/a' if dice is None else f'{dice:.3f}'} | train "
            f"{row['train_seconds']:.0f} s, preprocess {row['preprocess_seconds']:.0f} s, predict "
            f"{row['predict_seconds']:.0f} s, {row['threads']} thread(s), {row['device']}")


# ----------------------------------------------------------------------------- one row


def prepare_dataset(study: Study, job: Job, sources: dict[str, tuple[Path, Path]]) -> tuple[int, str, list[str]]:
    """(dataset id, dataset name, training cases) of the job's subset, its raw dataset written."""
    number = dataset_id(study, job.size, job.seed)
    name = f"Dataset{number:03d}_peer_n{job.size}_seed{job.seed}"
    train = list(study.subsets[subset_key(job.size, job.seed)])
    missing = [c for c in train + study.val if c not in sources]
    if missing:
        raise PeerError(f"{study.dataset}: no case(s) {', '.join(missing[:5])} of the study")
    cases = {c: sources[c] for c in train + study.val}
    record_split(job.work / "nnUNet_raw" / name, train, study.val)
    write_raw_dataset(job.work / "nnUNet_raw" / name, cases, nnunet_labels(study.labels_file), channel_names(study.dataset))
    return number, name, train


def channel_names(dataset: Path) -> dict[str, str]:
    """Input channel names of the study dataset ("channel_names" or MSD "modality"; default MRI)."""
    data = json.loads((dataset / "dataset.json").read_text())
    return {str(k): str(v) for k, v in (data.get("channel_names") or data.get("modality") or {"0": "MRI"}).items()}


def run_job(study: Study, job: Job, sources: dict[str, tuple[Path, Path]]) -> dict:
    """Preprocess (once), train, predict and score one (size, seed, epochs); the row."""
    number, name, train_cases = prepare_dataset(study, job, sources)
    env = nnunet_env(job.work, job.threads)
    trainer, val_its = choose_trainer(job.epochs, job.iterations, job.work / "trainers",
                                      lambda stock: (model_folder(job, name, stock) / "fold_0" / "checkpoint_final.pth").is_file())
    print(f"  {name} {trainer} {job.configuration}: preprocess, train, predict (logs: {job.work / 'logs'})", flush=True)
    preprocess_seconds = preprocess(job, number, name, env)
    write_splits(job.work / "nnUNet_preprocessed" / name, train_cases, study.val)
    train_seconds = train(job, number, name, trainer, env)
    test_set = test_set_id(study.test_images)
    run_dir = job.work / "runs" / name / f"{trainer}__{job.configuration}" / f"test_set_{test_set}"
    test_input = link_test_inputs(job.work / "test_input" / test_set, study.test_images)
    suffix = "_tta" if job.tta else ""
    predict_seconds = predict(job, name, trainer, test_input, run_dir / f"test_predictions{suffix}", env)
    test_dice = score(study, run_dir / f"test_predictions{suffix}", run_dir / f"test_evaluation{suffix}")
    import torch
    from seg_transfer.environment import cpu_model, host_speed_probe

    torch.set_num_threads(job.threads)  # the probe times the host with nnU-Net's thread count
    probe = host_speed_probe()
    return {"peer": PEER + (" + mirror TTA" if job.tta else ""), "tta": job.tta, "configuration": job.configuration, "trainer": trainer, "size": job.size, "seed": job.seed,
            "epochs": job.epochs, "iterations_per_epoch": job.iterations, "val_iterations_per_epoch": val_its,
            "train_seconds": train_seconds, "preprocess_seconds": preprocess_seconds, "predict_seconds": predict_seconds,
            "threads": job.threads, "da_workers": int(env["nnUNet_n_proc_DA"]), "device": job.device,
            "nnunetv2": version("nnunetv2"), "dataset_id": number, "n_train": len(train_cases), "n_val": len(study.val),
            "environment": {"probe_seconds": round(probe, 4), "cpu": cpu_model()},
            "test_dice": test_dice, "test_dice_mean": mean_dice(test_dice)}


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="study folder written by `seg-transfer compare`")
    parser.add_argument("--size", type=int, nargs="+", required=True, help="training-set size(s) of the study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, nargs="+", required=True, help="nnU-Net epoch count(s)")
    parser.add_argument("--configuration", default="3d_fullres", help="nnU-Net configuration (2d, 3d_fullres, ...)")
    parser.add_argument("--work", type=Path, default=None, help="nnU-Net folders (default <study>/nnunet_peer)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1),
                        help="torch threads of nnU-Net (default $OMP_NUM_THREADS, else every core)")
    parser.add_argument("--iterations-per-epoch", type=int, default=DEFAULT_ITERATIONS,
                        help=f"training iterations per epoch (nnU-Net's default {DEFAULT_ITERATIONS})")
    parser.add_argument("--tta", action="store_true", help="predict with nnU-Net's mirroring test-time augmentation "
                        "(its default; a separate row; a finished training is reused)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """PeerError for impossible numbers."""
    if min(args.epochs) < 1 or args.iterations_per_epoch < 1 or args.threads < 1:
        raise PeerError("--epochs, --iterations-per-epoch and --threads must be >= 1")


def check_nnunet_installed() -> None:
    """PeerError naming the extra when nnunetv2 is missing (checked after the inputs, which need no nnU-Net)."""
    if importlib.util.find_spec("nnunetv2") is None:
        raise PeerError("nnunetv2 is not installed (pip install 'seg-transfer[nnunet]')")


def run(args: argparse.Namespace) -> list[dict]:
    """Every requested row not yet finished; returns all requested rows."""
    check_args(args)
    study = load_study(args.study)
    check_request(study, args.size, args.seeds)
    check_nnunet_installed()
    work = (args.work or args.study / "nnunet_peer").resolve()
    for name, value in nnunet_env(work, args.threads).items():  # so nnU-Net imported here finds its folders
        os.environ.setdefault(name, value)
    results, sources, rows = args.study / RESULTS_NAME, None, []
    for size in args.size:
        for seed in args.seeds:
            for epochs in args.epochs:
                job = Job(work, args.configuration, size, seed, epochs, args.iterations_per_epoch, args.device, args.threads,
                          args.tta)
                row = finished_row(results, job)
                if row is None:
                    sources = sources or source_cases(study.dataset)
                    row = run_job(study, job, sources)
                    save_row(results, row)
                else:
                    print("  finished earlier, skipped:", end=" ")
                print(describe(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 for bad input, 1 when an nnU-Net step or the evaluation fails."""
    args = parse_args(argv)
    try:
        run(args)
    except PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # EvaluationError and other one-line input problems from seg_transfer
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
