"""Tests for the synthetic phantom dataset (seg_transfer.data.phantoms, data_scripts/make_phantoms.py)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from seg_transfer.data.phantoms import make_phantom_dataset, make_phantom_volume

SHAPE = (48, 48, 32)
SPACING = (1.0, 1.0, 1.5)
N_TRAIN, N_TEST = 6, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_dataset(out, n_train=N_TRAIN, n_test=N_TEST, shape=SHAPE, spacing=SPACING, seed=3)


@pytest.fixture(scope="module")
def volumes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [make_phantom_volume(np.random.default_rng([7, i]), SHAPE) for i in range(8)]


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


# ----------------------------------------------------------------------------- volumes
def test_volume_types_shapes_and_values(volumes):
    for image, label in volumes:
        assert image.shape == SHAPE and label.shape == SHAPE
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        assert np.isfinite(image).all() and image.min() >= 0.0
        assert 100.0 < image.max() < 5000.0  # MRI-like arbitrary positive scale


def test_same_seed_identical_different_seed_different():
    a_img, a_lab = make_phantom_volume(np.random.default_rng(11), SHAPE)
    b_img, b_lab = make_phantom_volume(np.random.default_rng(11), SHAPE)
    c_img, c_lab = make_phantom_volume(np.random.default_rng(12), SHAPE)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab)
    assert np.abs(a_img - c_img).mean() > 10.0


def test_labels_are_adjacent_6_neighbours(volumes):
    for _, label in volumes:
        one, two = label == 1, label == 2
        grown = ndimage.binary_dilation(two, structure=ndimage.generate_binary_structure(3, 1))
        assert (one & grown).sum() > 0, "label 1 and label 2 do not touch"


def test_each_structure_is_one_component_spanning_several_voxels(volumes):
    for _, label in volumes:
        for k in (1, 2):
            mask = label == k
            _, n_comp = ndimage.label(mask)
            assert n_comp == 1
            extent = [int(np.ptp(ix)) + 1 for ix in np.nonzero(mask)]
            assert min(extent) >= 4, extent
            assert mask.sum() >= 150


def test_foreground_slice_fraction_in_sane_range(volumes):
    fractions = [float((label > 0).any(axis=(0, 1)).mean()) for _, label in volumes]
    assert all(0.25 <= f <= 0.75 for f in fractions), fractions
    assert 0.3 <= float(np.mean(fractions)) <= 0.6, fractions
    voxel_fractions = [float((label > 0).mean()) for _, label in volumes]
    assert all(0.005 <= f <= 0.08 for f in voxel_fractions), voxel_fractions


def test_pose_and_size_vary(volumes):
    centroids = np.array([ndimage.center_of_mass(label > 0) for _, label in volumes])
    sizes = np.array([(label > 0).sum() for _, label in volumes])
    assert centroids.std(axis=0).max() > 1.0
    assert sizes.std() / sizes.mean() > 0.05


def test_structures_brighter_but_not_thresholdable(volumes):
    for image, label in volumes:
        fg = label > 0
        brain = ndimage.gaussian_filter(image, 2) > 0.5 * np.median(image[label == 0])
        assert image[fg].mean() > 1.2 * image[brain & ~fg].mean()
        best = 0.0
        for t in np.percentile(image, np.linspace(50, 99.9, 120)):
            pred = image > t
            best = max(best, 2 * (pred & fg).sum() / (pred.sum() + fg.sum()))
        assert best < 0.95, "a global threshold segments the structures almost perfectly"


def test_bias_field_present():
    half_ratios = []
    for i in range(4):
        biased, label = make_phantom_volume(np.random.default_rng([5, i]), SHAPE)
        flat, label0 = make_phantom_volume(np.random.default_rng([5, i]), SHAPE, bias_strength=0.0)
        np.testing.assert_array_equal(label, label0)  # same anatomy, only the bias differs
        brain = ndimage.gaussian_filter(flat, 2) > 0.5 * np.median(flat[label == 0])
        ratio = ndimage.gaussian_filter(biased, 2) / ndimage.gaussian_filter(flat, 2)
        lo, hi = np.percentile(ratio[brain], [5, 95])
        assert hi / lo > 1.25, (lo, hi)
        background = brain & (label == 0)
        logs = []
        for axis in range(3):
            idx = np.indices(SHAPE)[axis]
            first = biased[background & (idx < SHAPE[axis] // 2)].mean()
            second = biased[background & (idx >= SHAPE[axis] // 2)].mean()
            logs.append(abs(np.log(first / second)))
        half_ratios.append(max(logs))
    assert max(half_ratios) > 0.1, half_ratios


# ----------------------------------------------------------------------------- dataset files
def test_dataset_json_msd_format(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert meta["numTraining"] == N_TRAIN == len(meta["training"])
    assert meta["numTest"] == N_TEST == len(meta["test"])
    assert isinstance(meta["name"], str) and isinstance(meta["description"], str)
    for case in meta["training"]:
        assert set(case) == {"image", "label"}
        assert case["image"].startswith("./imagesTr/phantom_") and case["image"].endswith(".nii.gz")
        assert case["label"] == case["image"].replace("./imagesTr/", "./labelsTr/")
        assert (dataset / case["image"]).is_file() and (dataset / case["label"]).is_file()
    for rel in meta["test"]:
        assert isinstance(rel, str) and rel.startswith("./imagesTs/")
        assert (dataset / rel).is_file()
    names = [c["image"].split("/")[-1] for c in meta["training"]] + [t.split("/")[-1] for t in meta["test"]]
    assert len(set(names)) == len(names)
    assert names[0] == "phantom_000.nii.gz"


def test_no_stray_files(dataset):
    files = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * N_TRAIN + N_TEST
    assert not [f for f in files if ".tmp" in f or "/." in f]


def test_nifti_headers_match(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    expected = np.diag([*SPACING, 1.0])
    for case in meta["training"]:
        img, lab = _load(dataset / case["image"]), _load(dataset / case["label"])
        assert img.shape == lab.shape == SHAPE
        np.testing.assert_allclose(img.affine, lab.affine)
        np.testing.assert_allclose(img.affine[:3, :3], expected[:3, :3])
        np.testing.assert_allclose(img.header.get_zooms(), SPACING)
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        labels = np.asarray(lab.dataobj)
        assert set(np.unique(labels).tolist()) == {0, 1, 2}
        assert (labels == 1).any() and (labels == 2).any()
    for rel in meta["test"]:
        img = _load(dataset / rel)
        assert img.shape == SHAPE and img.get_data_dtype() == np.float32


def test_dataset_files_match_volume_function(dataset):
    """Training case i is generated from default_rng([seed, 0, i]), independent of the counts."""
    image, label = make_phantom_volume(np.random.default_rng([3, 0, 1]), SHAPE, spacing=SPACING)
    np.testing.assert_array_equal(np.asarray(_load(dataset / "imagesTr/phantom_001.nii.gz").dataobj), image)
    np.testing.assert_array_equal(np.asarray(_load(dataset / "labelsTr/phantom_001.nii.gz").dataobj), label)


def test_dataset_deterministic_bytes_and_seed_sensitive(tmp_path):
    a = make_phantom_dataset(tmp_path / "a", n_train=1, n_test=1, seed=1)
    b = make_phantom_dataset(tmp_path / "b", n_train=1, n_test=1, seed=1)
    c = make_phantom_dataset(tmp_path / "c", n_train=1, n_test=1, seed=2)
    for rel in ("dataset.json", "imagesTr/phantom_000.nii.gz", "labelsTr/phantom_000.nii.gz",
                "imagesTs/phantom_001.nii.gz"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "imagesTr/phantom_000.nii.gz").read_bytes() != (c / "imagesTr/phantom_000.nii.gz").read_bytes()


def test_script_cli_and_reexport(tmp_path, capsys):
    from data_scripts.make_phantoms import main
    from data_scripts.make_phantoms import make_phantom_dataset as reexported

    assert reexported is make_phantom_dataset
    assert main([str(tmp_path / "cli"), "--n-train", "2", "--n-test", "1", "--seed", "4",
                 "--shape", "32", "32", "24"]) == 0
    meta = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert _load(tmp_path / "cli" / "imagesTr" / "phantom_000.nii.gz").shape == (32, 32, 24)
    capsys.readouterr()
    assert main([str(tmp_path / "bad"), "--n-train", "-1"]) == 2
    assert "counts must be >= 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_small_2d_unet_learns_phantoms():
    """A small 2D U-Net on axial slices reaches mean Dice > 0.5 within a few epochs (CPU, ~30 s)."""
    torch = pytest.importorskip("torch")
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # avoid oversubscription on small shared CPUs
    try:
        dice = _train_small_unet(torch, UNet, DiceCELoss)
    finally:
        torch.set_num_threads(threads)
    assert np.mean(dice) > 0.5, dice


def _train_small_unet(torch, UNet, DiceCELoss) -> list[float]:
    """Train 8 epochs on 24 phantoms' axial slices; return validation Dice for labels 1 and 2."""
    torch.manual_seed(0)

    def slices(stream: int, n: int):
        xs, ys = [], []
        for i in range(n):
            image, label = make_phantom_volume(np.random.default_rng([0, stream, i]))
            image = (image - image.mean()) / image.std()
            xs.append(np.moveaxis(image, 2, 0))
            ys.append(np.moveaxis(label, 2, 0))
        return torch.tensor(np.concatenate(xs))[:, None], torch.tensor(np.concatenate(ys)).long()[:, None]

    x_train, y_train = slices(0, 24)
    x_val, y_val = slices(2, 6)
    net = UNet(2, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(8):
        for idx in torch.randperm(len(x_train)).split(32):
            opt.zero_grad()
            loss_fn(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(x_val).argmax(1, keepdim=True)
    return [float(2 * ((pred == k) & (y_val == k)).sum() / ((pred == k).sum() + (y_val == k).sum())) for k in (1, 2)]


def test_generating_phantoms_says_so_in_the_log(tmp_path, caplog):
    import logging

    from seg_transfer.data.phantoms import make_phantom_dataset

    with caplog.at_level(logging.INFO, logger="seg_transfer.data.phantoms"):
        make_phantom_dataset(tmp_path / "p", n_train=1, n_test=0, shape=(16, 16, 8))
    assert f"writing 1 training + 0 test phantom cases (16x16x8 voxels) to {tmp_path / 'p'}" in caplog.text
