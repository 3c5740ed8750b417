"""benchmarks/nnunet_peer.py: nnU-Net v2 inputs built from a study's cases (fast), and a tiny end-to-end run (slow)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seg_transfer.data.phantoms import make_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "nnunet_peer.py"
_SPEC = importlib.util.spec_from_file_location("nnunet_peer", SCRIPT)
nnunet_peer = importlib.util.module_from_spec(_SPEC)
sys.modules["nnunet_peer"] = nnunet_peer  # dataclasses look their module up while the class is made
_SPEC.loader.exec_module(nnunet_peer)

LABELS = {"0": "background", "1": "anterior", "2": "posterior"}


def fake_files(folder: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """Empty stand-ins for image and label files: {case: (image, label)}."""
    (folder / "img").mkdir(parents=True)
    (folder / "lab").mkdir(parents=True)
    cases = {}
    for name in names:
        image, label = folder / "img" / f"{name}.nii.gz", folder / "lab" / f"{name}.nii.gz"
        image.touch()
        label.touch()
        cases[name] = (image, label)
    return cases


def test_raw_dataset_and_splits(tmp_path):
    train, val = ["case_c", "case_a", "case_d"], ["case_b", "case_e"]
    cases = fake_files(tmp_path / "src", train + val)
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(json.dumps(LABELS))
    folder = nnunet_peer.write_raw_dataset(tmp_path / "raw" / "Dataset501_peer_n3_seed0", cases,
                                           nnunet_peer.nnunet_labels(labels_file), {"0": "MRI"})
    content = json.loads((folder / "dataset.json").read_text())
    assert content["channel_names"] == {"0": "MRI"}
    assert content["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert content["numTraining"] == 5 and content["file_ending"] == ".nii.gz"
    images = sorted((folder / "imagesTr").iterdir())
    assert [p.name for p in images] == [f"case_{c}_0000.nii.gz" for c in "abcde"]
    assert all(p.is_symlink() and p.resolve() == cases[p.name[:-12]][0].resolve() for p in images)
    labels = sorted((folder / "labelsTr").iterdir())
    assert [p.name for p in labels] == [f"case_{c}.nii.gz" for c in "abcde"] and all(p.is_symlink() for p in labels)
    nnunet_peer.write_raw_dataset(folder, cases, nnunet_peer.nnunet_labels(labels_file))  # rerun: same links, fine

    splits = nnunet_peer.write_splits(tmp_path / "pre", train, val)
    assert json.loads(splits.read_text()) == [{"train": ["case_c", "case_a", "case_d"], "val": ["case_b", "case_e"]}]


def test_raw_dataset_refuses_other_cases(tmp_path):
    cases = fake_files(tmp_path / "src", ["a", "b", "c"])
    folder = tmp_path / "raw"
    nnunet_peer.write_raw_dataset(folder, cases, {"background": 0, "x": 1})
    with pytest.raises(nnunet_peer.PeerError, match="other cases"):
        nnunet_peer.write_raw_dataset(folder, {k: cases[k] for k in "ab"}, {"background": 0, "x": 1})


def test_bad_input_exits_2(tmp_path, capsys):
    assert nnunet_peer.main(["--study", str(tmp_path), "--size", "3", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'results.json'}: not found" in err


def fake_study(folder: Path) -> Path:
    """A study folder shaped like `seg-transfer compare` writes it: 3 test, 2 val, 3 training cases (n3, seed 0)."""
    dataset = make_phantom_dataset(folder / "data", n_train=8, n_test=0, shape=(32, 32, 12), seed=1)
    names = [f"phantom_{i:03d}" for i in range(8)]
    test, val, train = names[:3], names[3:5], names[5:]
    study = folder / "study"
    (study / "test_cases" / "labels").mkdir(parents=True)
    (study / "test_cases" / "images.txt").write_text("".join(f"{dataset / 'imagesTr' / n}.nii.gz\n" for n in test))
    for name in test:
        os.symlink(dataset / "labelsTr" / f"{name}.nii.gz", study / "test_cases" / "labels" / f"{name}.nii.gz")
    (study / "test_cases" / "labels.json").write_text(json.dumps(LABELS))
    summary = {"name": "fake", "dataset": str(dataset), "sizes": [3], "seeds": [0], "test_cases": test,
               "val_cases": val, "train_subsets": {"n3_seed0": train}, "config": {"tolerance_mm": 1.0}}
    (study / "results.json").write_text(json.dumps({"study": summary}))
    return study


@pytest.mark.slow
def test_tiny_nnunet_peer_end_to_end(tmp_path):
    pytest.importorskip("nnunetv2")
    study = fake_study(tmp_path)
    command = [sys.executable, str(SCRIPT), "--study", str(study), "--size", "3", "--seeds", "0", "--epochs", "1",
               "--iterations-per-epoch", "5", "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = json.loads((study / "peer_nnunet.json").read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["size"], row["seed"], row["epochs"], row["iterations_per_epoch"]) == (3, 0, 1, 5)
    assert set(row["test_dice"]) == {"phantom_000", "phantom_001", "phantom_002"}
    assert all(set(c) == {"anterior", "posterior"} for c in row["test_dice"].values())
    assert 0.0 <= row["test_dice_mean"] <= 1.0
    assert row["train_seconds"] > 0 and row["preprocess_seconds"] > 0 and row["predict_seconds"] > 0
    assert 0 < row["environment"]["probe_seconds"] < 5  # the host speed probe, for the study's seconds check
    splits = json.loads(next((study / "nnunet_peer" / "nnUNet_preprocessed").glob("Dataset501_*/splits_final.json")).read_text())
    assert splits == [{"train": ["phantom_005", "phantom_006", "phantom_007"], "val": ["phantom_003", "phantom_004"]}]

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert json.loads((study / "peer_nnunet.json").read_text())["rows"] == rows

    mirrored = subprocess.run([*command, "--tta"], capture_output=True, text=True, env=env, timeout=300)
    assert mirrored.returncode == 0, mirrored.stderr[-2000:]
    plain, tta = json.loads((study / "peer_nnunet.json").read_text())["rows"]
    assert plain == row and tta["tta"] is True and tta["peer"] == "nnU-Net v2 + mirror TTA"
    assert tta["train_seconds"] == row["train_seconds"]  # the trained model was reused, only prediction ran
    predicted = list(study.glob("nnunet_peer/runs/*/*/test_set_*/test_predictions_tta/*.nii.gz"))
    assert sorted(p.name for p in predicted) == [f"phantom_00{i}.nii.gz" for i in range(3)]


def test_logged_epoch_seconds_reads_nnunet_logs_later_runs_replacing_earlier(tmp_path):
    """Epoch times come from nnU-Net's own training logs, oldest first; an epoch run again after an
    interruption counts once, with its later time; an epoch cut short (no "Epoch time") counts nothing."""
    first = tmp_path / "training_log_2026_12_4_03_27_08.txt"
    first.write_text("2026-12-04 03:27:08.5: Epoch 0\n2026-12-04 03:27:08.5: Current learning rate: 0.01\n"
                     "2026-12-04 03:50:00.1: Epoch time: 1371.6 s\n2026-12-04 03:50:00.2: Epoch 1\n")
    second = tmp_path / "training_log_2026_12_10_09_00_00.txt"  # sorts before the first by name, not by age
    second.write_text("2026-12-10 09:00:00.0: Epoch 1\n2026-12-10 09:20:00.0: Epoch time: 1200.0 s\n"
                      "2026-12-10 09:20:00.1: Epoch 2\n")
    os.utime(first, (1_000, 1_000))
    os.utime(second, (2_000, 2_000))
    assert nnunet_peer.logged_epoch_seconds(tmp_path) == {0: 1371.6, 1: 1200.0}
    rerun = tmp_path / "training_log_2026_12_11_09_00_00.txt"
    rerun.write_text("x: Epoch 1\nx: Epoch time: 1100.5 s\n")
    os.utime(rerun, (3_000, 3_000))
    assert nnunet_peer.logged_epoch_seconds(tmp_path) == {0: 1371.6, 1: 1100.5}


def test_logged_epoch_seconds_through_best_stops_at_the_epoch_checkpoint_best_holds(tmp_path):
    """Continued from checkpoint_best.pth, the epochs after the last new best are run again: counting their
    earlier times too would count them twice."""
    log = tmp_path / "training_log_2026_12_4_03_27_08.txt"
    log.write_text("x: Epoch 0\nx: Epoch time: 100.0 s\nx: Yayy! New best EMA pseudo Dice: 0.8288\n"
                   "x: Epoch 1\nx: Epoch time: 90.0 s\nx: Yayy! New best EMA pseudo Dice: 0.84\n"
                   "x: Epoch 2\nx: Epoch time: 95.0 s\nx: Epoch 3\n")
    assert nnunet_peer.logged_epoch_seconds(tmp_path) == {0: 100.0, 1: 90.0, 2: 95.0}
    assert nnunet_peer.logged_epoch_seconds(tmp_path, through_best=True) == {0: 100.0, 1: 90.0}
    assert nnunet_peer.logged_epoch_seconds(tmp_path / "none", through_best=True) == {}


def test_resume_checkpoint_prefers_latest_then_best_and_never_a_finished_training(tmp_path):
    assert nnunet_peer.resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint_best.pth").touch()
    assert nnunet_peer.resume_checkpoint(tmp_path) == tmp_path / "checkpoint_best.pth"
    (tmp_path / "checkpoint_latest.pth").touch()
    assert nnunet_peer.resume_checkpoint(tmp_path) == tmp_path / "checkpoint_latest.pth"
    (tmp_path / "checkpoint_final.pth").touch()
    assert nnunet_peer.resume_checkpoint(tmp_path) is None


def test_trainer_choice_keeps_stock_one_epoch_and_finished_stock_models(tmp_path):
    """One epoch: nnU-Net's own trainer. More: a resumable subclass (checkpoint after every epoch), unless a
    model of the stock trainer is already finished, which is reused."""
    pytest.importorskip("nnunetv2")
    assert nnunet_peer.choose_trainer(1, 250, tmp_path) == ("nnUNetTrainer_1epoch", 50)
    name, val_its = nnunet_peer.choose_trainer(5, 250, tmp_path)
    assert (name, val_its) == ("nnUNetTrainer_peer_5epochs_250iters", 50)
    assert "self.save_every = 1" in (tmp_path / "peer_5epochs_250iters.py").read_text()
    assert nnunet_peer.choose_trainer(5, 250, tmp_path, lambda stock: stock == "nnUNetTrainer_5epochs") == ("nnUNetTrainer_5epochs", 50)
    assert nnunet_peer.choose_trainer(2, 25, tmp_path) == ("nnUNetTrainer_peer_2epochs_25iters", 5)


@pytest.mark.slow
def test_an_interrupted_nnunet_training_continues_from_its_last_epoch(tmp_path):
    """Killed once epoch 0's checkpoint is written, the rerun continues at epoch 1 (nnU-Net's own log of the
    second process has no epoch 0) with the learning rates of an uninterrupted training, and its seconds include
    epoch 0's logged time."""
    import signal
    import time

    pytest.importorskip("nnunetv2")
    study = fake_study(tmp_path)
    command = [sys.executable, str(SCRIPT), "--study", str(study), "--size", "3", "--seeds", "0", "--epochs", "3",
               "--iterations-per-epoch", "5", "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    latest = []
    while not latest and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        latest = list((study / "nnunet_peer" / "nnUNet_results").glob("*/*/fold_0/checkpoint_latest.pth"))
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert latest, "no checkpoint_latest.pth appeared before the first process ended"
    fold = latest[0].parent
    done_before = nnunet_peer.logged_epoch_seconds(fold)
    assert 0 in done_before and not (fold / "checkpoint_final.pth").is_file()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "continuing" in second.stdout
    [row] = json.loads((study / "peer_nnunet.json").read_text())["rows"]
    assert row["epochs"] == 3 and (fold / "checkpoint_final.pth").is_file()
    newest = max(fold.glob("training_log_*.txt"), key=lambda path: path.stat().st_mtime)
    epochs_logged = [line.split(": ", 1)[1].strip() for line in newest.read_text().splitlines() if ": Epoch " in line]
    assert [e for e in epochs_logged if not e.startswith("Epoch time")] == ["Epoch 1", "Epoch 2"]
    assert row["train_seconds"] > sum(done_before.values())
    # the continued epochs follow the uninterrupted poly schedule over 3 epochs (0.01 (1 - e / 3) ** 0.9), not one
    # over nnU-Net's default 1000 epochs (0.00999, 0.00998), which a continued training used to get
    rates = [float(line.rsplit(":", 1)[1]) for line in newest.read_text().splitlines() if "Current learning rate" in line]
    assert rates == [round(0.01 * (1 - epoch / 3) ** 0.9, 5) for epoch in (1, 2)]


def _save_rows(path: str, seed: int, count: int) -> None:
    for epochs in range(1, count + 1):
        nnunet_peer.save_row(Path(path), {"configuration": "3d_fullres", "size": 10, "seed": seed, "epochs": epochs,
                                          "tta": False, "test_dice_mean": seed + epochs / 100})


def test_peer_rows_written_side_by_side_keep_each_other(tmp_path):
    """Two `nnunet_peer.py --seeds k` processes on one study each read-modify-write peer_nnunet.json: under the
    lock no row is lost (without it, rows written between another process's read and rename disappear)."""
    import multiprocessing

    path = tmp_path / nnunet_peer.RESULTS_NAME
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_save_rows, args=(str(path), seed, 25)) for seed in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(worker.exitcode == 0 for worker in workers)
    rows = nnunet_peer.load_rows(path)
    assert sorted((r["seed"], r["epochs"]) for r in rows) == [(s, e) for s in range(4) for e in range(1, 26)]
    nnunet_peer.save_row(path, {**rows[0], "test_dice_mean": 0.5})  # same key: replaced, not appended
    rows = nnunet_peer.load_rows(path)
    assert len(rows) == 100 and rows[0]["test_dice_mean"] == 0.5


def test_a_raw_dataset_serves_only_the_split_it_was_built_for(tmp_path):
    folder = tmp_path / "raw" / "Dataset504_peer_n3_seed0"
    nnunet_peer.record_split(folder, ["c", "a", "d"], ["b", "e"])
    assert json.loads((folder / nnunet_peer.SPLIT_NAME).read_text()) == {"train": ["a", "c", "d"], "val": ["b", "e"]}
    nnunet_peer.record_split(folder, ["a", "c", "d"], ["e", "b"])  # another study, same cases: shared
    with pytest.raises(nnunet_peer.PeerError, match="3 training / 2 validation cases other than this study's 3 / 2"):
        nnunet_peer.record_split(folder, ["a", "c", "b"], ["d", "e"])  # same cases, another split
    with pytest.raises(nnunet_peer.PeerError, match="other than this study's 4 / 2"):
        nnunet_peer.record_split(folder, ["a", "c", "d", "f"], ["b", "e"])  # a superset of the training cases


def test_a_raw_dataset_from_before_splits_were_recorded_is_checked_by_its_cases(tmp_path):
    cases = fake_files(tmp_path / "src", ["a", "b", "c"])
    built = nnunet_peer.write_raw_dataset(tmp_path / "old", cases, {"background": 0, "x": 1})
    with pytest.raises(nnunet_peer.PeerError, match="holds 3 cases other than this study's 3 training \\+ 1 validation cases"):
        nnunet_peer.record_split(built, ["a", "b", "d"], ["c"])
    assert not (built / nnunet_peer.SPLIT_NAME).exists()
    nnunet_peer.record_split(built, ["a", "b"], ["c"])
    assert json.loads((built / nnunet_peer.SPLIT_NAME).read_text()) == {"train": ["a", "b"], "val": ["c"]}


def test_each_test_set_gets_its_own_input_folder(tmp_path):
    first = fake_files(tmp_path / "one", ["p", "q"])
    second = fake_files(tmp_path / "two", ["p", "r"])
    one = nnunet_peer.test_set_id([first["q"][0], first["p"][0]])
    assert one == nnunet_peer.test_set_id([first["p"][0], first["q"][0]])  # order does not matter
    two = nnunet_peer.test_set_id([second["p"][0], second["r"][0]])
    assert one != two
    folder = nnunet_peer.link_test_inputs(tmp_path / "test_input" / two, [second["p"][0], second["r"][0]])
    assert sorted(p.name for p in folder.iterdir()) == ["p_0000.nii.gz", "r_0000.nii.gz"]
