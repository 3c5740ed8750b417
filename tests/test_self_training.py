"""Self-training: unlabelled scans labelled by a trained run join the training cases only (``data.pseudo_labelled``),
and a study arm (``pseudo_labels_from``) has its teacher run label them before it trains."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from seg_transfer.cli import main
from seg_transfer.config import ConfigError, config_from_dict
from seg_transfer.data.cases import DatasetError
from seg_transfer.data.phantoms import make_phantom_dataset
from seg_transfer.data.patches import PatchDataset
from seg_transfer.data.pipeline import prepare_data, slice_loader, volume_dataset
from seg_transfer.data.slices import MixedEpochs, SliceDataset
from seg_transfer.data.transforms import Preprocessing
from seg_transfer.study.config import load_study_config
from seg_transfer.study.plan import plan_runs
from seg_transfer.study.parallel import ready_runs
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Eight labelled and three unlabelled (imagesTs) 32x32x12 phantoms."""
    return make_phantom_dataset(tmp_path_factory.mktemp("self_training"), n_train=8, n_test=3, shape=(32, 32, 12), seed=3)


def write_labels(root: Path, folder: Path, skip: int | None = None) -> Path:
    """A label map (a centred box of class 1) in the grid of every unlabelled scan, named as the scan."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(sorted((root / "imagesTs").glob("*.nii.gz"))):
        if index == skip:
            continue
        scan = nib.load(image)
        label = np.zeros(scan.shape, np.uint8)
        label[8:24, 8:24, 3:9] = 1
        nib.save(nib.Nifti1Image(label, scan.affine), folder / image.name)
    return folder


def config(root: Path, **changes):
    return config_from_dict(tiny_config(root, **changes))


def test_pseudo_labelled_scans_join_the_training_cases_only(root, tmp_path):
    labels = write_labels(root, tmp_path / "predicted")
    data = prepare_data(config(root, **{"data.pseudo_labelled": {"labels_dir": str(labels)}}).data, tmp_path)
    plain = prepare_data(config(root).data, tmp_path / "plain")
    assert data.splits == plain.splits  # the split of the labelled cases is unchanged
    names = [case.name for case in data.training_cases()]
    assert names == plain.splits["train"] + ["phantom_008", "phantom_009", "phantom_010"]
    assert {case.name for case in data.training_cases()[-3:]} == set(data.pseudo_labelled)
    assert all(case.label.parent == labels for case in data.training_cases()[-3:])
    assert not set(data.pseudo_labelled) & {*data.splits["val"], *data.splits["test"]}


def test_a_scan_without_a_predicted_label_is_one_line_naming_the_folder(root, tmp_path):
    labels = write_labels(root, tmp_path / "predicted", skip=1)
    with pytest.raises(DatasetError, match=r"predicted: no predicted label map for 1 of 3 unlabelled scans, "
                                           r"e.g. phantom_009 \(seg-transfer predict writes them\)$"):
        prepare_data(config(root, **{"data.pseudo_labelled": {"labels_dir": str(labels)}}).data, tmp_path)


def test_an_empty_label_folder_says_which_scans_lack_a_label_map(root, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no predicted label map for 3 of 3 unlabelled scans, "
                                           r"e.g. phantom_008, phantom_009, phantom_010"):
        prepare_data(config(root, **{"data.pseudo_labelled": {"labels_dir": str(tmp_path / "empty")}}).data, tmp_path)


def test_pseudo_labels_need_scans_outside_an_msd_root(root, tmp_path):
    folders = {"data.root": None, "data.images_dir": str(root / "imagesTr"), "data.labels_dir": str(root / "labelsTr"),
               "data.labels": {0: "background", 1: "a", 2: "b"}}
    with pytest.raises(ConfigError, match="data.pseudo_labelled.images_dir is needed"):
        config(root, **folders, **{"data.pseudo_labelled": {"labels_dir": str(tmp_path)}})
    # a scan that is a labelled case as well is refused: the same case would be trained on twice
    labels = tmp_path / "labels"
    shutil.copytree(root / "labelsTr", labels)
    with pytest.raises(DatasetError, match="are labelled cases too"):
        prepare_data(config(root, **folders, **{"data.pseudo_labelled": {"images_dir": str(root / "imagesTr"),
                                                                         "labels_dir": str(labels)}}).data, tmp_path)


def write_study(folder: Path, root: Path, arms: list[dict], **changes) -> Path:
    base = tiny_config(root, **{"data.slices_per_epoch": 16, **changes})
    base["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 2, "lr": 3e-3}]
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"name": "self_training", "base_config": "base.yaml", "arms": arms, "control": arms[0]["name"],
             "train_sizes": [2], "seeds": [0], "split": {"test_fraction": 0.25, "val_fraction": 0.25, "seed": 0}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_a_teacher_must_be_an_earlier_arm(root, tmp_path):
    path = write_study(tmp_path, root, [{"name": "student", "pseudo_labels_from": "teacher"}, {"name": "teacher"}])
    with pytest.raises(ConfigError, match="'pseudo_labels_from': 'teacher' is not an arm listed before it"):
        load_study_config(path)
    path = write_study(tmp_path, root, [{"name": "teacher"}, {"name": "student", "pseudo_labels_tta": True}])
    with pytest.raises(ConfigError, match="arm 'student': 'pseudo_labels_tta' needs 'pseudo_labels_from'"):
        load_study_config(path)


def constant_volumes(values, depth: int = 4) -> list[dict]:
    """One (1, 8, 8, depth) volume per value, filled with it (so a sample tells which volume it came from)."""
    return [{"image": np.full((1, 8, 8, depth), value, np.float32), "label": np.zeros((1, 8, 8, depth), np.int64)}
            for value in values]


def sources(dataset) -> list[float]:
    """The volume value of every sample of the dataset's current epoch, in order."""
    return [float(dataset[i]["image"].flatten()[0]) for i in range(len(dataset))]


@pytest.mark.parametrize("build", [lambda v: SliceDataset(v, axis=2, context=0, multiple=8),
                                   lambda v: PatchDataset(v, (8, 8, 4))], ids=["slices", "patches"])
def test_mixed_epochs_draw_the_declared_share_from_the_second_pool(build):
    mixed = MixedEpochs(build(constant_volumes([0, 1])), build(constant_volumes([10, 11, 12])), share=0.25)
    mixed.set_epoch(seed=5, epoch=0, size=40, foreground_fraction=None)
    drawn = sources(mixed)
    assert len(drawn) == 40 and sum(v >= 10 for v in drawn) == 10  # 25% of 40, although the second pool is larger
    assert {v for v in drawn if v < 10} == {0, 1} and {v for v in drawn if v >= 10} == {10, 11, 12}
    second = [i for i, v in enumerate(drawn) if v >= 10]
    assert second != list(range(second[0], second[0] + 10))  # shuffled together, not one pool then the other
    mixed.set_epoch(seed=5, epoch=0, size=40, foreground_fraction=None)
    assert sources(mixed) == drawn  # deterministic in (seed, epoch)
    mixed.set_epoch(seed=5, epoch=1, size=40, foreground_fraction=None)
    assert sources(mixed) != drawn
    mixed.set_epoch(seed=5, epoch=2, size=1, foreground_fraction=None)  # 25% of one sample rounds to none
    assert mixed.parts(1) == (1, 0) and len(sources(mixed)) == 1 and sources(mixed)[0] < 10


def test_mixed_epochs_shard_like_one_dataset():
    """Two ranks together serve exactly the single-process epoch (every sample once, the same samples)."""
    def mixed():
        return MixedEpochs(SliceDataset(constant_volumes([0, 1, 2]), 2, 0, 8),
                           SliceDataset(constant_volumes([10, 11]), 2, 0, 8), share=0.5)
    whole = mixed()
    whole.set_epoch(1, 0, 32, None)
    ranks = []
    for rank in range(2):
        part = mixed()
        part.shard(rank, 2, global_batch=8, drop_last=True)
        part.set_epoch(1, 0, 32, None)
        ranks.append(sources(part))
    assert sorted(ranks[0] + ranks[1]) == sorted(sources(whole)) and len(ranks[0]) == len(ranks[1]) == 16


def test_mixed_epochs_need_a_share_strictly_between_0_and_1():
    pool = SliceDataset(constant_volumes([0]), 2, 0, 8)
    with pytest.raises(ValueError, match="share 1.0 must lie strictly between 0 and 1"):
        MixedEpochs(pool, pool, 1.0)


def test_the_loader_takes_the_share_of_pseudo_labelled_scans_from_the_config(root, tmp_path):
    labels = write_labels(root, tmp_path / "labels")
    run = config(root, **{"data.pseudo_labelled": {"labels_dir": str(labels), "share": 0.75},
                          "data.cache_dir": str(tmp_path / "cache")})
    data = prepare_data(run.data, tmp_path / "run")
    volumes = volume_dataset(data.training_cases(), Preprocessing.from_config(run.data), run.data)
    labelled = len(data.splits["train"])
    dataset, _ = slice_loader(volumes, run.data, 8, 32, train=True, labelled=labelled)
    assert (dataset.first.pool_size, dataset.second.pool_size) == (12 * labelled, 12 * 3)  # 12 slices per phantom
    dataset.set_epoch(0, 0, 24, None)
    assert int((dataset.order >= dataset.split).sum()) == 18  # 75% of 24 from the 3 scans
    unshared = slice_loader(volumes, run.data.model_copy(update={"pseudo_labelled": None}), 8, 32, train=True,
                            labelled=labelled)[0]
    assert isinstance(unshared, SliceDataset) and unshared.pool_size == 12 * (labelled + 3)


def test_pseudo_labelled_scans_do_not_change_the_derived_3d_patch_size(root, tmp_path, one_thread):
    """The labelled cases (32x32x12) plan the patch; six larger scans (64x64x24), a majority of the training cases,
    would otherwise move the median shape."""
    from seg_transfer.checkpoint import Checkpoint
    from seg_transfer.training.trainer import train
    from tests.test_route_3d import tiny_3d

    scans, labels = tmp_path / "scans", tmp_path / "labels"
    scans.mkdir(), labels.mkdir()
    for copy in range(2):
        for path in sorted((root / "imagesTs").glob("*.nii.gz")):
            scan = nib.load(path)
            image = np.pad(np.asarray(scan.dataobj, np.float32), [(16, 16), (16, 16), (6, 6)])
            name = f"big{copy}_{path.name}"
            nib.save(nib.Nifti1Image(image, scan.affine), scans / name)
            nib.save(nib.Nifti1Image((image > image.mean()).astype(np.uint8), scan.affine), labels / name)
    run = config_from_dict(tiny_3d(root, **{"data.patch_size": None, "data.cache_dir": str(tmp_path / "cache"),
                                            "data.pseudo_labelled": {"images_dir": str(scans), "labels_dir": str(labels)}}))
    train(run, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pseudo_labelled_cases"] == 6 > summary["training_cases"]
    assert Checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt").route_settings["patch_size"][:2] == [32, 32]


def test_a_run_with_a_share_resumes_to_the_same_weights(root, tmp_path, one_thread):
    """Both pools' epoch orders and augmentation seeds follow (seed, epoch): an interrupted 3D run continues exactly."""
    from seg_transfer.checkpoint import Checkpoint
    from seg_transfer.training.trainer import train
    from tests.test_route_3d import tiny_3d
    from tests.test_training import _equal_states, _train_until_epoch

    raw = tiny_3d(root, **{"data.cache_dir": str(tmp_path / "cache"), "data.slices_per_epoch": 8,
                           "data.pseudo_labelled": {"labels_dir": str(write_labels(root, tmp_path / "labels")),
                                                    "share": 0.5}})
    raw["training"]["stages"] = [{"name": "all", "train": "all", "epochs": 3, "lr": 1e-3}]
    run = config_from_dict(raw)
    train(run, tmp_path / "straight")
    _train_until_epoch(run, tmp_path / "interrupted", 1)
    train(run, tmp_path / "interrupted", resume=True)
    states = [Checkpoint.load(tmp_path / name / "checkpoints" / "last.pt").model for name in ("straight", "interrupted")]
    assert _equal_states(*states)


@pytest.mark.parametrize("share", [0, 1, 1.5])
def test_a_share_outside_0_to_1_is_a_config_error_naming_it(root, tmp_path, share):
    with pytest.raises(ConfigError, match=r"data\.pseudo_labelled\.share"):
        config(root, **{"data.pseudo_labelled": {"labels_dir": str(tmp_path), "share": share}})


def test_a_share_cannot_be_combined_with_the_feature_cache(root, tmp_path):
    with pytest.raises(ConfigError, match="data.pseudo_labelled.share and training.feature_cache cannot be combined"):
        config(root, **{"data.pseudo_labelled": {"labels_dir": str(tmp_path), "share": 0.5},
                        "training.feature_cache": "memory"})


def test_a_study_arm_trains_on_the_scans_its_teacher_run_labelled(root, tmp_path, one_thread):
    path = write_study(tmp_path, root, [{"name": "teacher"}, {"name": "student", "pseudo_labels_from": "teacher"},
                                        {"name": "student_half", "pseudo_labels_from": "teacher",
                                         "set": {"data.pseudo_labelled.share": 0.5}},
                                        {"name": "student_tta", "pseudo_labels_from": "teacher",
                                         "pseudo_labels_tta": True}],
                       **{"data.augment.flip_axes": [0]})  # test-time augmentation flips axis 0
    out = tmp_path / "study"
    assert main(["compare", "--config", str(path), "--output", str(out), "--device", "cpu"]) == 0
    teacher, student = out / "runs" / "teacher" / "n002_seed0", out / "runs" / "student" / "n002_seed0"
    predicted = sorted((teacher / "unlabelled_predictions").glob("*.nii.gz"))
    assert [p.name for p in predicted] == sorted(p.name for p in (root / "imagesTs").glob("*.nii.gz"))
    for label in predicted:  # each in its scan's grid
        scan = nib.load(root / "imagesTs" / label.name)
        assert nib.load(label).shape == scan.shape and np.allclose(nib.load(label).affine, scan.affine)
    summary = json.loads((student / "summary.json").read_text())
    assert (summary["training_cases"], summary["pseudo_labelled_cases"]) == (2, 3)
    assert json.loads((teacher / "summary.json").read_text())["pseudo_labelled_cases"] == 0
    saved = yaml.safe_load((student / "config.yaml").read_text())
    assert Path(saved["data"]["pseudo_labelled"]["labels_dir"]) == teacher / "unlabelled_predictions"
    # both runs start from the same seed and take the same steps: only the extra cases differ, and they change the weights
    teacher_weights = (teacher / "checkpoints" / "best.pt").read_bytes()
    assert teacher_weights != (student / "checkpoints" / "best.pt").read_bytes()
    # the same cases drawn half and half instead of alike: other samples, other weights
    half = out / "runs" / "student_half" / "n002_seed0"
    half_summary = json.loads((half / "summary.json").read_text())
    assert (half_summary["pseudo_labelled_share"], summary["pseudo_labelled_share"]) == (0.5, None)
    assert half_summary["steps"] == summary["steps"] and half_summary["pseudo_labelled_cases"] == 3
    from seg_transfer.checkpoint import Checkpoint

    weights = [Checkpoint.load(run / "checkpoints" / "last.pt").model for run in (half, student)]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    # the teacher labelled the scans once more with test-time augmentation, into their own folder: what
    # `seg-transfer predict --tta` writes, while the plain labels are what it writes with --no-tta
    with_tta = out / "runs" / "student_tta" / "n002_seed0"
    saved = yaml.safe_load((with_tta / "config.yaml").read_text())
    assert Path(saved["data"]["pseudo_labelled"]["labels_dir"]) == teacher / "unlabelled_predictions_tta"
    for flag, folder in (("--tta", "unlabelled_predictions_tta"), ("--no-tta", "unlabelled_predictions")):
        again = tmp_path / f"predict{flag}"
        assert main(["predict", "-m", str(teacher), "-i", str(root / "imagesTs"), "-o", str(again), "--device", "cpu",
                     flag]) == 0
        for label in (teacher / folder).glob("*.nii.gz"):
            assert np.array_equal(nib.load(label).get_fdata(), nib.load(again / label.name).get_fdata())
    plain, flipped = ([np.asarray(nib.load(p).dataobj) for p in sorted((teacher / folder).glob("*.nii.gz"))]
                      for folder in ("unlabelled_predictions", "unlabelled_predictions_tta"))
    assert any(not np.array_equal(a, b) for a, b in zip(plain, flipped))  # the flips changed some voxels


def test_a_student_is_handed_out_only_once_its_teacher_is_evaluated(root, tmp_path):
    path = write_study(tmp_path, root, [{"name": "teacher"}, {"name": "other"},
                                        {"name": "student", "pseudo_labels_from": "teacher"}])
    _, specs = plan_runs(load_study_config(path), tmp_path / "study")
    assert [spec.arm for spec in specs] == ["teacher", "other", "student"]
    assert ready_runs(specs, [0, 1, 2]) == [0, 1]
    evaluation = specs[0].run_dir / "test_evaluation" / "metrics.json"
    evaluation.parent.mkdir(parents=True)
    evaluation.write_text("{}")
    assert ready_runs(specs, [1, 2]) == [1, 2]
