"""Batch prediction: exact input geometry for every format, robustness, resumption, shards, TTA, post-processing."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from seg_transfer.checkpoint import Checkpoint
from seg_transfer.cli import main
from seg_transfer.config import DataConfig, config_from_dict
from seg_transfer.data.slices import context_indices
from seg_transfer.inference import batch
from seg_transfer.inference.cases import InputError, discover_cases, shard
from seg_transfer.inference.predictor import LoadedModel, PredictOptions, keep_largest_component, load_model, predict_case
from seg_transfer.routes import base as route_base
from seg_transfer.routes.base import InferenceOptions, trained_mirrorings
from seg_transfer.routes.slicewise import predict_label_map, predict_volume, slice_probabilities
from seg_transfer.inference.writers import atomic_output, sitk_image
from seg_transfer.training.trainer import train
from tests.conftest import tiny_config
from tests.dicom_helpers import write_dicom_series


@pytest.fixture(scope="module")
def checkpoint(phantom_root, tmp_path_factory) -> Path:
    """One tiny trained run (1 stage, 1 epoch): its folder resolves to checkpoints/best.pt."""
    raw = tiny_config(phantom_root)
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 1, "lr": 3e-3}]
    run_dir = tmp_path_factory.mktemp("predict_run") / "run"
    train(config_from_dict(raw), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def loaded(checkpoint) -> LoadedModel:
    return load_model(str(checkpoint), torch.device("cpu"))


@pytest.fixture(scope="module")
def plain(phantom_root):
    """(data, RAS affine, path) of one phantom image (32x32x12, spacing 1x1x1.5)."""
    path = phantom_root / "imagesTr" / "phantom_000.nii.gz"
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine, path


@pytest.fixture(scope="module")
def plain_labels(loaded, plain) -> np.ndarray:
    labels = predict_case(loaded, discover_cases(plain[2])[0], PredictOptions(progress=False)).labels
    assert set(np.unique(labels)) >= {0, 1}, "the tiny model must predict some foreground for these tests to mean anything"
    return labels


def _predict(inputs, out, *extra) -> int:
    return main(["predict", "-m", str(extra[0]), "-i", str(inputs), "-o", str(out), "--device", "cpu", *map(str, extra[1:])])


def _assert_same_grid(output: Path, reference: sitk.Image) -> sitk.Image:
    written = sitk.ReadImage(str(output))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)
    assert written.GetPixelID() == sitk.sitkUInt8
    return written


def _labels_xyz(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def _transposed_flipped(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same physical image stored with x/y swapped and the new first axis reversed."""
    moved = np.flip(np.transpose(data, (1, 0, 2)), axis=0)
    permute = np.eye(4)[[1, 0, 2, 3]].T  # new (i, j, k) -> old (j, i, k)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, moved.shape[0] - 1
    return np.ascontiguousarray(moved), affine @ permute @ flip


def _undo_transposed_flipped(labels: np.ndarray) -> np.ndarray:
    return np.transpose(np.flip(labels, axis=0), (1, 0, 2))


# --------------------------------------------------------------------------- geometry


def test_oblique_anisotropic_nifti_keeps_its_header_and_overlays_the_input(checkpoint, plain, plain_labels, tmp_path):
    data, _, _ = plain
    angle = np.deg2rad(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ tilt @ np.diag([0.7, 1.3, 2.9])
    affine[:3, 3] = [12.5, -40.0, 7.25]
    source = tmp_path / "in" / "oblique.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), source)

    assert _predict(source, tmp_path / "out", checkpoint) == 0
    output = tmp_path / "out" / "oblique.nii.gz"
    _assert_same_grid(output, sitk.ReadImage(str(source)))
    np.testing.assert_allclose(nib.load(output).affine, nib.load(source).affine, atol=1e-6)
    # a small rotation keeps the RAS axis order, so the model saw the same slices: same labels, voxel for voxel
    np.testing.assert_array_equal(_labels_xyz(output), plain_labels)


def test_transposed_input_gets_the_same_labels_at_the_same_physical_voxels(checkpoint, plain, plain_labels, tmp_path):
    moved, affine = _transposed_flipped(plain[0], plain[1])
    source = tmp_path / "in" / "moved.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(moved, affine), source)
    assert _predict(source, tmp_path / "out", checkpoint) == 0
    output = tmp_path / "out" / "moved.nii.gz"
    _assert_same_grid(output, sitk.ReadImage(str(source)))
    np.testing.assert_array_equal(_undo_transposed_flipped(_labels_xyz(output)), plain_labels)


@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_nrrd_and_mha_round_trip_in_their_own_format(checkpoint, plain, plain_labels, tmp_path, fmt):
    moved, affine = _transposed_flipped(plain[0], plain[1])
    source = tmp_path / "in" / f"case.{fmt}"
    source.parent.mkdir()
    sitk.WriteImage(sitk_image(moved.astype(np.float32), affine), str(source))
    assert _predict(source, tmp_path / "out", checkpoint, "--format", fmt) == 0
    output = tmp_path / "out" / f"case.{fmt}"
    _assert_same_grid(output, sitk.ReadImage(str(source)))
    np.testing.assert_array_equal(_undo_transposed_flipped(_labels_xyz(output)), plain_labels)


def test_dicom_folder_with_two_series_gives_two_cases_in_the_series_geometry(checkpoint, plain, tmp_path):
    data, affine, _ = plain
    volume = np.round(data * 100).astype(np.int16)
    folder = tmp_path / "dicom" / "study"
    write_dicom_series(volume, affine, folder, "1.2.826.0.1.3680043.8.498.10", 1, prefix="a")
    write_dicom_series(volume[::-1].copy(), affine, folder, "1.2.826.0.1.3680043.8.498.11", 2, prefix="b")
    reference_nifti = tmp_path / "ref" / "same.nii.gz"
    reference_nifti.parent.mkdir()
    nib.save(nib.Nifti1Image(volume, affine), reference_nifti)

    assert _predict(tmp_path / "dicom", tmp_path / "out", checkpoint) == 0
    outputs = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert [p.name for p in outputs] == ["study_1.2.826.0.1.3680043.8.498.10.nii.gz", "study_1.2.826.0.1.3680043.8.498.11.nii.gz"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), "1.2.826.0.1.3680043.8.498.10"))
    series = reader.Execute()
    _assert_same_grid(outputs[0], series)
    assert _predict(reference_nifti, tmp_path / "out_ref", checkpoint) == 0
    np.testing.assert_array_equal(_labels_xyz(outputs[0]), _labels_xyz(tmp_path / "out_ref" / "same.nii.gz"))


def test_spacing_and_foreground_crop_are_inverted_to_the_input_grid(loaded, plain):
    from dataclasses import replace

    prep = replace(loaded.prep, spacing=(0.8, 0.8, 1.0), crop_foreground=True)
    resampling = loaded.with_preprocessing(prep)
    prediction = predict_case(resampling, discover_cases(plain[2])[0], PredictOptions(progress=False, save_probabilities=True))
    assert prediction.labels.shape == plain[0].shape == prediction.geometry.shape
    assert prediction.labels.dtype == np.uint8 and prediction.labels.max() > 0
    np.testing.assert_allclose(prediction.geometry.affine, plain[1], atol=1e-6)
    assert prediction.probabilities.shape == (3, *plain[0].shape)
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-4)


# --------------------------------------------------------------------------- outputs and summary


def test_summary_and_probabilities(checkpoint, plain, plain_labels, tmp_path):
    assert _predict(plain[2], tmp_path / "out", checkpoint, "--save-probabilities") == 0
    probabilities = nib.load(tmp_path / "out" / "phantom_000_probabilities.nii.gz")
    assert probabilities.shape == (*plain[0].shape, 3)
    np.testing.assert_allclose(probabilities.affine, plain[1], atol=1e-6)
    probs = np.asarray(probabilities.dataobj)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), plain_labels)

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (row,) = summary["cases"]
    assert row["status"] == "ok" and row["output"].endswith("phantom_000.nii.gz") and row["seconds"] > 0
    expected = np.bincount(plain_labels.ravel(), minlength=3)
    assert row["voxels"] == {"background": expected[0], "anterior": expected[1], "posterior": expected[2]}
    assert summary["totals"]["ok"] == 1 and summary["totals"]["failed"] == 0 and summary["totals"]["voxels_per_second"] > 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert rows[0]["status"] == "ok" and int(rows[0]["voxels_anterior"]) == expected[1]


def _perturbed_copy(checkpoint: Path, out: Path) -> Path:
    """The same run's checkpoint with its segmentation head shifted: another member with the same classes."""
    stored = Checkpoint.load(checkpoint)
    generator = torch.Generator().manual_seed(1)
    stored.model = {name: value + 0.5 * torch.randn(value.shape, generator=generator)
                    if name.startswith("segmentation_head") else value for name, value in stored.model.items()}
    return stored.save(out / "checkpoints" / "best.pt").parents[1]


def test_an_ensemble_averages_its_members_probabilities_on_the_input_grid(checkpoint, plain, tmp_path):
    other = _perturbed_copy(checkpoint, tmp_path / "other")
    case = discover_cases(plain[2])[0]
    members = [predict_case(load_model(str(run), torch.device("cpu")), case, PredictOptions(tta=True, save_probabilities=True,
                                                                                              progress=False))
               for run in (checkpoint, other)]
    assert not np.array_equal(members[0].labels, members[1].labels), "the members must disagree somewhere"
    assert main(["predict", "-m", str(checkpoint), "-m", str(other), "-i", str(plain[2]), "-o", str(tmp_path / "out"),
                 "--device", "cpu", "--save-probabilities"]) == 0
    mean = (members[0].probabilities + members[1].probabilities) / 2
    written = np.moveaxis(np.asarray(nib.load(tmp_path / "out" / "phantom_000_probabilities.nii.gz").dataobj), -1, 0)
    np.testing.assert_allclose(written, mean, atol=1e-5)
    np.testing.assert_array_equal(_labels_xyz(tmp_path / "out" / "phantom_000.nii.gz"), mean.argmax(0))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [m["checkpoint"] for m in summary["models"]] == [str(checkpoint), str(other)]


def test_an_ensemble_of_models_with_other_classes_is_refused_in_one_line(checkpoint, phantom_root, plain, tmp_path, capsys):
    from tests.checkpoint_helpers import save_random_checkpoint

    foreign = save_random_checkpoint(phantom_root, tmp_path / "foreign")  # classes head / tail
    assert main(["predict", "-m", str(checkpoint), "-m", str(foreign), "-i", str(plain[2]), "-o", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(foreign) in err and "same classes" in err
    assert not (tmp_path / "out" / "phantom_000.nii.gz").exists()


def test_corrupt_and_unsupported_inputs_fail_alone(checkpoint, phantom_root, tmp_path, capsys):
    inputs = tmp_path / "in"
    shutil.copytree(phantom_root / "imagesTr", inputs)
    corrupt = inputs / "phantom_003.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    (inputs / "notes.txt").write_text("not an image")  # unknown types in a folder are skipped, not failed
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{inputs}\n{tmp_path / 'missing.nii.gz'}\n")

    assert _predict(listing, tmp_path / "out", checkpoint) == 1
    rows = {row["case"]: row for row in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert len(rows) == 7
    assert rows["phantom_003"]["status"] == "failed" and rows["phantom_003"]["reason"]
    assert rows["missing"]["status"] == "failed" and rows["missing"]["reason"] == "file not found"
    assert all(rows[f"phantom_00{i}"]["status"] == "ok" for i in (0, 1, 2, 4, 5))
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".nii.gz"))
    assert written == [f"phantom_00{i}.nii.gz" for i in (0, 1, 2, 4, 5)]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    err = capsys.readouterr().err
    assert "failed: phantom_003:" in err and "Traceback" not in err


def test_an_image_with_a_nan_voxel_fails_instead_of_predicting_background(checkpoint, phantom_root, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = nib.load(str(phantom_root / "imagesTr" / "phantom_000.nii.gz"))
    data = np.asarray(source.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, source.affine), str(inputs / "clean.nii.gz"))
    data[3, 4, 5], data[0, 0, 0] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, source.affine), str(inputs / "holey.nii.gz"))

    assert _predict(inputs, tmp_path / "out", checkpoint) == 1
    rows = {row["case"]: row for row in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert rows["clean"]["status"] == "ok" and int(rows["clean"]["voxels_anterior"]) > 0
    assert rows["holey"]["status"] == "failed"
    assert rows["holey"]["reason"].startswith("NonFiniteImageError: image contains 1 NaN and 1 inf voxel(s)")
    assert not (tmp_path / "out" / "holey.nii.gz").exists()


def test_existing_outputs_need_continue_or_overwrite(checkpoint, plain, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(plain[2], out, checkpoint) == 0
    before = (out / "phantom_000.nii.gz").stat().st_mtime_ns
    assert _predict(plain[2], out, checkpoint) == 2
    assert "--continue" in capsys.readouterr().err
    assert _predict(plain[2], out, checkpoint, "--continue", "--overwrite") == 2
    assert _predict(plain[2], out, checkpoint, "--overwrite") == 0
    assert (out / "phantom_000.nii.gz").stat().st_mtime_ns != before


def test_output_into_the_input_folder_is_refused_even_with_overwrite(checkpoint, plain, tmp_path, capsys):
    """Issue 13: ``-i X -o X --overwrite`` used to replace the scans with label maps; now nothing is written."""
    folder = tmp_path / "scans"
    folder.mkdir()
    scan = folder / "phantom_000.nii.gz"
    shutil.copy(plain[2], scan)
    before = scan.read_bytes()
    for extra in ((), ("--overwrite",), ("--continue",)):
        assert _predict(folder, folder, checkpoint, *extra) == 2
        err = capsys.readouterr().err
        assert "holds input scans" in err and "--overwrite" not in err and "Traceback" not in err
    link = tmp_path / "out"
    link.symlink_to(folder)  # the same folder behind a symlink
    assert _predict(folder, link, checkpoint, "--overwrite") == 2
    assert scan.read_bytes() == before


def test_continue_after_an_interrupted_run(checkpoint, phantom_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = batch.predict_and_write
    calls = []

    def interrupted_after_two(loaded, case, request, target):
        calls.append(case.name)
        if len(calls) == 3:  # Ctrl-C while the third case is being predicted
            raise KeyboardInterrupt
        return original(loaded, case, request, target)

    monkeypatch.setattr(batch, "predict_and_write", interrupted_after_two)
    assert _predict(phantom_root / "imagesTr", out, checkpoint) == 130  # Ctrl-C: "aborted"
    monkeypatch.setattr(batch, "predict_and_write", original)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    interrupted_summary = json.loads((out / "summary.json").read_text())
    assert [r["case"] for r in interrupted_summary["cases"]] == ["phantom_000", "phantom_001"]

    assert _predict(phantom_root / "imagesTr", out, checkpoint, "--continue") == 0
    resumed = json.loads((out / "summary.json").read_text())
    rows = {r["case"]: r for r in resumed["cases"]}
    assert [rows[f"phantom_00{i}"]["status"] for i in range(6)] == ["ok"] * 6
    assert [rows[f"phantom_00{i}"]["carried_over"] for i in range(6)] == [True] * 2 + [False] * 4
    for earlier in interrupted_summary["cases"]:  # the earlier rows, timing and counts, kept
        assert {**earlier, "carried_over": True} == rows[earlier["case"]]
    totals = resumed["totals"]
    assert (totals["ok"], totals["carried_over"], totals["skipped"]) == (6, 2, 0)
    assert totals["predict_seconds"] >= sum(r["seconds"] for r in interrupted_summary["cases"]) > 0
    assert len(list(out.glob("*.nii.gz"))) == 6
    (out / "summary.json").unlink()  # an output no summary row accounts for is skipped, not claimed as predicted
    assert _predict(phantom_root / "imagesTr", out, checkpoint, "--continue") == 0
    assert {r["status"] for r in json.loads((out / "summary.json").read_text())["cases"]} == {"skipped"}


def test_atomic_output_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "case.nii.gz"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as temp:
            assert temp.parent == tmp_path and temp.name.endswith(".nii.gz") and temp.name.startswith(".")
            temp.write_bytes(b"half a mask")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_shards_cover_every_case_exactly_once(checkpoint, phantom_root, tmp_path):
    cases = discover_cases(phantom_root / "imagesTr")
    parts = [shard(cases, 4, k) for k in range(4)]
    names = [case.name for part in parts for case in part]
    assert sorted(names) == sorted(case.name for case in cases) and len(names) == len(set(names)) == 6
    assert [c.name for c in shard(list(reversed(cases)), 4, 1)] == [c.name for c in parts[1]]  # order-independent
    with pytest.raises(InputError):
        shard(cases, 2, 2)

    out = tmp_path / "out"
    for part in (0, 1):
        assert _predict(phantom_root / "imagesTr", out, checkpoint, "--num-parts", 2, "--part-id", part) == 0
    assert len(list(out.glob("*.nii.gz"))) == 6
    covered = [r["case"] for k in (0, 1) for r in json.loads((out / f"summary.part{k}of2.json").read_text())["cases"]]
    assert sorted(covered) == [f"phantom_00{i}" for i in range(6)]


def test_input_forms_list_csv_glob_and_errors(phantom_root, tmp_path):
    images = phantom_root / "imagesTr"
    listing = tmp_path / "list.csv"
    listing.write_text("id,image\na,{}\nb,{}\n".format(images / "phantom_001.nii.gz", images / "phantom_000.nii.gz"))
    assert [c.name for c in discover_cases(listing)] == ["phantom_000", "phantom_001"]
    assert [c.name for c in discover_cases(str(images / "phantom_00[24].nii.gz"))] == ["phantom_002", "phantom_004"]
    odd = tmp_path / "scan.png"
    odd.write_bytes(b"x")
    (case,) = discover_cases(odd)
    assert case.problem.startswith("unsupported file type")
    with pytest.raises(InputError, match="no such file"):
        discover_cases(tmp_path / "nothing_here")
    twice = tmp_path / "twice.txt"
    (tmp_path / "copy").mkdir()
    shutil.copy(images / "phantom_000.nii.gz", tmp_path / "copy")
    twice.write_text(f"{images / 'phantom_000.nii.gz'}\n{tmp_path / 'copy' / 'phantom_000.nii.gz'}\n")
    with pytest.raises(InputError, match="occur twice"):
        discover_cases(twice)


def test_user_errors_are_one_line_exit_2(checkpoint, plain, tmp_path, capsys):
    assert _predict(plain[2], tmp_path / "o1", checkpoint, "--device", "cuda:7") == 2 or torch.cuda.device_count() > 7
    assert _predict(tmp_path / "missing", tmp_path / "o2", checkpoint) == 2
    assert _predict(plain[2], tmp_path / "o3", tmp_path / "no_run") == 2
    assert _predict(plain[2], tmp_path / "o4", checkpoint, "--postprocess", "biggest") == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 4 and "Traceback" not in err


# --------------------------------------------------------------------------- TTA, post-processing, sliding windows


IN_PLANE_FLIPS = ((), (2,), (3,), (2, 3))


def _standardised(plain) -> torch.Tensor:
    volume = torch.from_numpy(plain[0].astype(np.float32))
    return ((volume - volume.mean()) / volume.std())[None]


def test_tta_averages_the_given_in_plane_flips(loaded, plain):
    image = _standardised(plain)
    with_tta = predict_volume(loaded.model, image, 2, 1, flips=IN_PLANE_FLIPS, batch_size=5, multiple=32)
    without = predict_volume(loaded.model, image, 2, 1, batch_size=5, multiple=32)
    slabs = torch.stack([image[0][..., context_indices(k, 12, 1)].permute(2, 0, 1) for k in range(12)])  # (12, 3, 32, 32)
    with torch.no_grad():
        manual = torch.stack([torch.flip(torch.softmax(loaded.model(torch.flip(slabs, d)), 1), d) for d in IN_PLANE_FLIPS]).mean(0)
    np.testing.assert_allclose(with_tta.numpy(), manual.permute(1, 2, 3, 0).numpy(), atol=1e-5)
    assert not torch.allclose(with_tta, without, atol=1e-3)
    labels = predict_label_map(loaded.model, image, 2, 1, flips=IN_PLANE_FLIPS, batch_size=5, multiple=32)
    np.testing.assert_array_equal(labels.numpy(), with_tta.argmax(0).numpy())


def test_tta_uses_only_the_flips_the_network_was_trained_with(loaded, plain, caplog):
    """A flip the network never saw is not label-safe (Hippocampus: anterior and posterior swap), so --tta
    averages only the combinations of ``data.augment.flip_axes``; none trained -> plain inference, said once."""
    image, cpu = _standardised(plain), torch.device("cpu")
    spec = loaded.network.spec
    assert spec.data.augment.flip_axes == []
    plain_probs = loaded.network.inferer(InferenceOptions(batch_size=5)).probabilities(loaded.model, image, cpu)
    route_base._warn_no_label_safe_flip.cache_clear()  # said once per process: maybe already, by an earlier test
    with caplog.at_level(logging.WARNING):
        untrained = loaded.network.inferer(InferenceOptions(batch_size=5, tta=True)).probabilities(loaded.model, image, cpu)
    torch.testing.assert_close(untrained, plain_probs)
    assert "no flip is label-safe" in caplog.text
    augment = spec.data.augment.model_copy(update={"flip_axes": [0]})
    flipped_spec = dataclasses.replace(spec, data=spec.data.model_copy(update={"augment": augment}))
    inferer = loaded.network.route.inferer(flipped_spec, InferenceOptions(batch_size=5, tta=True), loaded.model)
    with_tta = inferer.probabilities(loaded.model, image, cpu)
    expected = predict_volume(loaded.model, image, 2, 1, flips=((), (2,)), batch_size=5, multiple=32)
    torch.testing.assert_close(with_tta, expected)
    assert not torch.allclose(with_tta, plain_probs, atol=1e-3)
    every_flip = predict_volume(loaded.model, image, 2, 1, flips=IN_PLANE_FLIPS, batch_size=5, multiple=32)
    assert not torch.allclose(with_tta, every_flip, atol=1e-3)


def test_cli_predicts_with_the_trained_flips_by_default_and_not_with_no_tta(checkpoint, plain, tmp_path):
    stored = Checkpoint.load(checkpoint)
    stored.config["data"]["augment"]["flip_axes"] = [0]  # as if trained with left-right flips
    flipped = stored.save(tmp_path / "flipped" / "checkpoints" / "best.pt")
    assert _predict(plain[2], tmp_path / "default", flipped) == 0
    assert _predict(plain[2], tmp_path / "plain", flipped, "--no-tta") == 0
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("default", "plain")}
    assert summaries["default"]["models"][0]["tta_flips"] == [[], [2]] and summaries["plain"]["models"][0]["tta_flips"] == [[]]
    loaded, case = load_model(str(flipped), torch.device("cpu")), discover_cases(plain[2])[0]
    for name, tta in (("default", True), ("plain", False)):
        expected = predict_case(loaded, case, PredictOptions(tta=tta, progress=False)).labels
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / name / "phantom_000.nii.gz").dataobj), expected)


@pytest.mark.parametrize("helped", [True, False])
def test_cli_default_follows_the_tta_choice_validated_at_the_end_of_training(checkpoint, plain, tmp_path, helped, caplog):
    """A checkpoint whose validation cases scored lower with TTA is predicted plainly by default (and with TTA
    where they scored higher); --tta and --no-tta override the record."""
    stored = Checkpoint.load(checkpoint)
    stored.config["data"]["augment"]["flip_axes"] = [0]
    stored.inference = {"tta": helped, "val_dice": 0.80, "val_dice_tta": 0.81 if helped else 0.79, "passes": 2}
    run = stored.save(tmp_path / "run" / "checkpoints" / "best.pt")
    flips = {}
    for name, extra in (("default", ()), ("forced", ("--no-tta",) if helped else ("--tta",))):
        with caplog.at_level(logging.INFO, logger="seg_transfer.inference.batch"):
            assert _predict(plain[2], tmp_path / name, run, *extra) == 0
        flips[name] = json.loads((tmp_path / name / "summary.json").read_text())["models"][0]["tta_flips"]
    assert flips == ({"default": [[], [2]], "forced": [[]]} if helped else {"default": [[]], "forced": [[], [2]]})
    said = [r.getMessage() for r in caplog.records if "test-time augmentation" in r.getMessage()]
    assert said == [f"{run}: test-time augmentation {'on' if helped else 'off'} (validation Dice 0.800 plain, "
                    f"{0.81 if helped else 0.79:.3f} with it, at the end of training)"]  # the default run only
    loaded, case = load_model(str(run), torch.device("cpu")), discover_cases(plain[2])[0]
    expected = predict_case(loaded, case, PredictOptions(tta=helped, progress=False)).labels
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "default" / "phantom_000.nii.gz").dataobj), expected)


def test_trained_mirrorings_are_every_combination_of_the_trained_flip_axes():
    three_d = DataConfig.model_validate({"root": ".", "augment": {"enabled": True, "flip_axes": [2, 0]}})
    assert trained_mirrorings(three_d) == ((), (2,), (4,), (2, 4))
    off = three_d.model_copy(update={"augment": three_d.augment.model_copy(update={"enabled": False})})
    assert trained_mirrorings(off) == ((),)


def test_largest_component_keeps_the_biggest_blob_per_class():
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[1:6, 1:6, 1:6] = 1  # 125 voxels: kept
    labels[10:12, 10:12, 1:3] = 1  # 8 voxels: removed
    labels[14:16, 1:3, 5:7] = 2  # only component of class 2: kept
    labels[17, 17, 8] = 2  # smaller: removed
    kept = keep_largest_component(labels, [1, 2])
    assert (kept == 1).sum() == 125 and (kept == 2).sum() == 8
    assert kept[10, 10, 1] == 0 and kept[17, 17, 8] == 0 and kept[14, 1, 5] == 2


def test_postprocess_cli_leaves_one_component_per_class(checkpoint, plain, plain_labels, tmp_path):
    assert _predict(plain[2], tmp_path / "out", checkpoint, "--postprocess", "largest-component") == 0
    cleaned = _labels_xyz(tmp_path / "out" / "phantom_000.nii.gz")
    structure = np.ones((3, 3, 3), bool)
    for value in (1, 2):
        assert ndimage.label(cleaned == value, structure=structure)[1] <= 1
        assert np.all(plain_labels[cleaned == value] == value)  # only removals, never new labels
    removed = ndimage.label(plain_labels == 1, structure=structure)[1] > 1 or ndimage.label(plain_labels == 2, structure=structure)[1] > 1
    assert removed == (not np.array_equal(cleaned, plain_labels))


def test_sliding_window_for_large_slices_blends_to_probabilities(loaded):
    batch_ = torch.randn(2, 3, 96, 64)
    whole = slice_probabilities(loaded.model, batch_)
    windowed = slice_probabilities(loaded.model, batch_, roi_size=32, overlap=0.5)
    assert windowed.shape == whole.shape == (2, 3, 96, 64)
    np.testing.assert_allclose(windowed.sum(1).numpy(), 1.0, atol=1e-5)
    assert not torch.allclose(windowed, whole, atol=1e-4)  # windows see less context than the whole slice
    np.testing.assert_allclose(slice_probabilities(loaded.model, batch_, roi_size=96).numpy(), whole.numpy(), atol=1e-6)


# --------------------------------------------------------------------------- DICOM-SEG


def test_dicom_seg_references_the_series_with_one_segment_per_label(checkpoint, plain, tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom

    data, affine, _ = plain
    volume = np.round(data * 100).astype(np.int16)
    series_uid = "1.2.826.0.1.3680043.8.498.20"
    files = write_dicom_series(volume, affine, tmp_path / "dicom" / "patient", series_uid)
    assert _predict(tmp_path / "dicom" / "patient", tmp_path / "nifti", checkpoint) == 0
    assert _predict(tmp_path / "dicom" / "patient", tmp_path / "seg", checkpoint, "--format", "dicom-seg") == 0

    dataset = pydicom.dcmread(tmp_path / "seg" / "patient.dcm")
    assert dataset.Modality == "SEG"
    assert [s.SegmentLabel for s in dataset.SegmentSequence] == ["anterior", "posterior"]
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert len(dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(files)
    seg = hd.seg.segread(tmp_path / "seg" / "patient.dcm")
    sources = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    label_map = seg.get_pixels_by_source_instance(sources, combine_segments=True)  # (slices, rows, columns)
    np.testing.assert_array_equal(label_map.transpose(2, 1, 0), _labels_xyz(tmp_path / "nifti" / "patient.nii.gz"))


def test_dicom_seg_for_a_nifti_input_fails_that_case(checkpoint, plain, tmp_path):
    pytest.importorskip("highdicom")
    assert _predict(plain[2], tmp_path / "out", checkpoint, "--format", "dicom-seg") == 1
    (row,) = json.loads((tmp_path / "out" / "summary.json").read_text())["cases"]
    assert row["status"] == "failed" and "needs a DICOM series input" in row["reason"]


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"checkpoints": ()}, "--model"),
        ({"fmt": "png"}, "--format"),
        ({"overwrite": True, "resume": True}, "--overwrite and --continue"),
        ({"options": PredictOptions(postprocess="holes")}, "--postprocess"),
        ({"options": PredictOptions(roi_size=0)}, "--roi-size"),
        ({"options": PredictOptions(batch_size=0)}, "--batch-size"),
        ({"options": PredictOptions(overlap=1.0)}, "--overlap"),
    ],
)
def test_contradictory_requests_are_refused_before_any_work_naming_the_option(change, flag, tmp_path):
    """A library caller (not only the CLI) gets the one-line refusal, and the valid request passes."""
    valid = batch.PredictRequest(checkpoints=("run",), input="scans", out_dir=tmp_path)
    batch.check_request(valid)
    with pytest.raises(batch.PredictSetupError, match=flag):
        batch.check_request(dataclasses.replace(valid, **change))
