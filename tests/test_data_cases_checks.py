"""Tests for seg_transfer.data.{io,cases,checks}: discovery, reading and bad-data reports."""
from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from seg_transfer.data.cases import (
    Case,
    DatasetError,
    cases_from_csv,
    cases_from_folders,
    cases_from_msd,
)
from seg_transfer.data.checks import BadCase, check_case, find_bad_cases, format_bad_cases
from seg_transfer.data.io import (
    SUPPORTED_SUFFIXES,
    read_volume,
    sitk_affine_ras,
    strip_volume_suffix,
)

LABELS = {0, 1, 2}
SHAPE = (6, 7, 8)


def _hippocampus_root() -> Path | None:
    candidates = [
        os.environ.get("SEG_TRANSFER_HIPPOCAMPUS", ""),
        Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "Task04_Hippocampus",
        "/work/shared/data/Task04_Hippocampus",
    ]
    for c in candidates:
        if c and (Path(c) / "dataset.json").is_file():
            return Path(c)
    return None


# ----------------------------------------------------------------------------- helpers


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic RAS affine with a non-zero origin."""
    t = 0.3
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.25, 2.0])
    aff[:3, 3] = [10.0, -5.5, 3.25]
    return aff


def save_nii(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def save_sitk(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save (x, y, z) ``data`` with RAS ``affine`` through SimpleITK (LPS on disk)."""
    affine = np.eye(4) if affine is None else affine
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.asarray(data).transpose(2, 1, 0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    sitk.WriteImage(img, str(path))
    return path


def image_data(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def label_data() -> np.ndarray:
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[1:3, 1:4, 2:5] = 1
    lab[3:5, 2:6, 3:7] = 2
    return lab


def make_case(tmp: Path, name: str, image=None, label=None, img_aff=None, lab_aff=None) -> Case:
    """A NIfTI case under tmp/name_{img,lab}.nii.gz (good data unless overridden)."""
    img = save_nii(tmp / f"{name}_img.nii.gz", image_data() if image is None else image, img_aff)
    lab = save_nii(tmp / f"{name}_lab.nii.gz", label_data() if label is None else label, lab_aff)
    return Case(name, img, lab)


def problems_of(bad: list[BadCase]) -> str:
    return " | ".join(b.problem for b in bad)


# ----------------------------------------------------------------------------- io


def test_supported_suffixes_and_strip():
    assert set(SUPPORTED_SUFFIXES) == {".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"}
    assert strip_volume_suffix("a/hippocampus_367.nii.gz") == "hippocampus_367"
    assert strip_volume_suffix("x.y.NRRD") == "x.y"
    with pytest.raises(ValueError, match="unsupported"):
        strip_volume_suffix("a.png")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_read_volume_same_for_nifti_and_sitk(tmp_path, suffix):
    data, aff = image_data(), oblique_affine()
    a_nii, aff_nii = read_volume(save_nii(tmp_path / "v.nii.gz", data, aff))
    a_itk, aff_itk = read_volume(save_sitk(tmp_path / f"v{suffix}", data, aff))
    assert a_nii.shape == a_itk.shape == SHAPE
    np.testing.assert_allclose(a_itk, a_nii, atol=1e-5)
    np.testing.assert_allclose(aff_nii, aff, atol=1e-5)
    np.testing.assert_allclose(aff_itk, aff_nii, atol=1e-5)


def test_sitk_affine_ras_flips_lps(tmp_path):
    img = sitk.Image(3, 4, 5, sitk.sitkUInt8)
    img.SetSpacing((2.0, 3.0, 4.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    aff = sitk_affine_ras(img)
    np.testing.assert_allclose(aff, [[-2, 0, 0, -1], [0, -3, 0, -2], [0, 0, 4, 3], [0, 0, 0, 1]])


def test_read_volume_keeps_integer_dtype(tmp_path):
    arr, _ = read_volume(save_nii(tmp_path / "l.nii.gz", label_data()))
    assert arr.dtype == np.uint8 and arr.shape == SHAPE


def test_read_volume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="unsupported"):
        read_volume(tmp_path / "x.png")


# ----------------------------------------------------------------------------- MSD


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_msd(root: Path, n_train=3, n_test=2, labels=None, extra: dict | None = None) -> Path:
    training = []
    for i in range(n_train):
        touch(root / "imagesTr" / f"c_{i}.nii.gz")
        touch(root / "labelsTr" / f"c_{i}.nii.gz")
        training.append({"image": f"./imagesTr/c_{i}.nii.gz", "label": f"./labelsTr/c_{i}.nii.gz"})
    test = []
    for i in range(n_test):
        touch(root / "imagesTs" / f"t_{i}.nii.gz")
        test.append(f"./imagesTs/t_{i}.nii.gz")
    meta = {"labels": labels or {"0": "background", "1": "a", "2": "b"}, "training": training, "test": test}
    meta.update(extra or {})
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_discovery(tmp_path):
    train, test, labels = cases_from_msd(make_msd(tmp_path))
    assert [c.name for c in train] == ["c_0", "c_1", "c_2"]
    assert train[0] == Case("c_0", tmp_path / "imagesTr/c_0.nii.gz", tmp_path / "labelsTr/c_0.nii.gz")
    assert [c.name for c in test] == ["t_0", "t_1"] and all(c.label is None for c in test)
    assert labels == {0: "background", 1: "a", 2: "b"}


def test_msd_without_its_test_images_still_gives_its_training_cases(tmp_path, caplog):
    """A copy of imagesTr/labelsTr alone (as sent to a cluster) trains; the missing test images are named once."""
    root = make_msd(tmp_path)
    (root / "imagesTs" / "t_1.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        train, test, _ = cases_from_msd(root)
    assert len(train) == 3 and [c.name for c in test] == ["t_0"]
    assert "1 of 2 listed test image(s) not found" in caplog.text and "t_1.nii.gz" in caplog.text


def test_msd_nnunet_v2_label_map(tmp_path):
    _, _, labels = cases_from_msd(make_msd(tmp_path, labels={"background": 0, "x": 1}))
    assert labels == {0: "background", 1: "x"}


def test_msd_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json not found"):
        cases_from_msd(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset\.json: malformed JSON"):
        cases_from_msd(tmp_path)

    root = make_msd(tmp_path / "m")
    (root / "labelsTr" / "c_1.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"not found: .*labelsTr[/\\]c_1\.nii\.gz") as e:
        cases_from_msd(root)
    assert "\n" not in str(e.value)

    root = make_msd(tmp_path / "d", extra={"test": ["./imagesTr/c_0.nii.gz"]})
    with pytest.raises(DatasetError, match="duplicate case name.*c_0"):
        cases_from_msd(root)
    with pytest.raises(DatasetError, match="no training cases"):
        cases_from_msd(make_msd(tmp_path / "e", n_train=0))
    with pytest.raises(DatasetError, match="label key 'one'"):
        cases_from_msd(make_msd(tmp_path / "f", labels={"0": "bg", "one": "x"}))


# ----------------------------------------------------------------------------- CSV


def test_csv_discovery(tmp_path):
    a, la = touch(tmp_path / "img" / "a.nii.gz"), touch(tmp_path / "lab" / "a.nii.gz")
    b = touch(tmp_path / "img" / "b.mha")
    absolute = touch(tmp_path / "other" / "c.nrrd")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"image,label,name\nimg/a.nii.gz,lab/a.nii.gz,\nimg/b.mha,,bee\n{absolute},,\n")
    cases = cases_from_csv(csv_path)
    assert cases == [Case("a", a, la), Case("bee", b, None), Case("c", absolute, None)]


def test_csv_errors(tmp_path):
    with pytest.raises(DatasetError, match="CSV file not found"):
        cases_from_csv(tmp_path / "none.csv")
    p = tmp_path / "x.csv"
    p.write_text("image,label\n")
    with pytest.raises(DatasetError, match="no cases"):
        cases_from_csv(p)
    p.write_text("img,label\na.nii.gz,\n")
    with pytest.raises(DatasetError, match="missing 'image' column"):
        cases_from_csv(p)
    p.write_text("image\nmissing.nii.gz\n")
    with pytest.raises(DatasetError, match="missing.nii.gz"):
        cases_from_csv(p)
    touch(tmp_path / "a.nii.gz")
    touch(tmp_path / "sub" / "a.nii.gz")
    p.write_text("image\na.nii.gz\nsub/a.nii.gz\n")
    with pytest.raises(DatasetError, match="duplicate case name.*a"):
        cases_from_csv(p)


# ----------------------------------------------------------------------------- folders


def test_folder_discovery_with_channel_suffix(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    for n in ("b", "a"):
        touch(imgs / f"{n}_0000.nii.gz")
        touch(labs / f"{n}.nii.gz")
    touch(imgs / "._a_0000.nii.gz")  # macOS resource fork: ignored
    touch(imgs / "notes.txt")  # not a volume: ignored
    cases = cases_from_folders(imgs, labs)
    assert cases == [
        Case("a", imgs / "a_0000.nii.gz", labs / "a.nii.gz"),
        Case("b", imgs / "b_0000.nii.gz", labs / "b.nii.gz"),
    ]
    assert [c.label for c in cases_from_folders(imgs, None)] == [None, None]


def test_folder_unpaired_files_are_listed(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    for n in ("a", "b", "c"):
        touch(imgs / f"{n}.nii.gz")
    touch(labs / "a.nii.gz")
    touch(labs / "z.nii.gz")
    with pytest.raises(DatasetError) as e:
        cases_from_folders(imgs, labs)
    msg = str(e.value)
    assert "images without label: b.nii.gz, c.nii.gz" in msg
    assert "labels without image: z.nii.gz" in msg
    assert "\n" not in msg


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        cases_from_folders(tmp_path / "nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        cases_from_folders(tmp_path / "empty", None)
    touch(tmp_path / "i" / "a.nii.gz")
    touch(tmp_path / "i" / "a.nrrd")
    with pytest.raises(DatasetError, match="same case 'a'"):
        cases_from_folders(tmp_path / "i", None)


# ----------------------------------------------------------------------------- checks


def test_good_case_has_no_problems(tmp_path):
    assert check_case(make_case(tmp_path, "good"), LABELS) == []
    assert check_case(Case("img_only", save_nii(tmp_path / "u.nii.gz", image_data())), LABELS) == []


def test_float_label_with_integer_values_and_4d_singleton_are_fine(tmp_path):
    lab = label_data().astype(np.float32)
    img4 = image_data()[..., None]
    case = make_case(tmp_path, "c", image=img4, label=lab)
    assert read_volume(case.image)[0].shape == SHAPE + (1,)
    assert check_case(case, LABELS) == []


def test_sitk_case_is_checked_like_nifti(tmp_path):
    aff = oblique_affine()
    img = save_sitk(tmp_path / "i.nrrd", image_data(), aff)
    lab = save_nii(tmp_path / "l.nii.gz", label_data(), aff)
    assert check_case(Case("mixed", img, lab), LABELS) == []


def _truncated(tmp: Path) -> Path:
    good = save_nii(tmp / "trunc_full.nii.gz", image_data())
    raw = good.read_bytes()
    path = tmp / "trunc.nii.gz"
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    return path


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.nii.gz"
    path.write_bytes(b"this is not an image\x00\xff" * 50)
    return path


def bad_cases(tmp: Path) -> dict[str, tuple[Case, Path, list[str]]]:
    """name -> (case, offending file, key words expected in the problem)."""
    out: dict[str, tuple[Case, Path, list[str]]] = {}

    def add(case: Case, path: Path, words: list[str]) -> None:
        out[case.name] = (case, path, words)

    lab_ok = save_nii(tmp / "lab_ok.nii.gz", label_data())
    trunc = _truncated(tmp)
    add(Case("truncated", trunc, lab_ok), trunc, ["cannot read image"])
    garb = _garbage(tmp)
    add(Case("garbage", garb, lab_ok), garb, ["cannot read image"])
    missing = tmp / "missing.nii.gz"
    add(Case("missing", missing, lab_ok), missing, ["not found"])
    flat = save_nii(tmp / "flat2d.nii.gz", np.ones((6, 7), np.float32) * np.arange(7))
    add(Case("two_d", flat, lab_ok), flat, ["2D", "expected 3D"])
    four = save_nii(tmp / "four_d.nii.gz", np.random.default_rng(1).normal(size=SHAPE + (2,)).astype(np.float32))
    add(Case("four_d", four, lab_ok), four, ["4D", "expected 3D"])
    c = make_case(tmp, "shape", label=np.zeros((6, 7, 9), np.uint8))
    add(c, c.label, ["image shape (6, 7, 8) != label shape (6, 7, 9)"])
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    c = make_case(tmp, "affine", lab_aff=shifted)
    add(c, c.label, ["affine", "0.5"])
    lab5 = label_data()
    lab5[0, 0, 0] = 5
    c = make_case(tmp, "value5", label=lab5)
    add(c, c.label, ["label values {5} not in expected {0, 1, 2}"])
    half = label_data().astype(np.float32)
    half[0, 0, 0] = 0.5
    c = make_case(tmp, "half", label=half)
    add(c, c.label, ["non-integral", "0.5"])
    nan = image_data()
    nan[0, 0, :2] = np.nan
    c = make_case(tmp, "nan", image=nan)
    add(c, c.image, ["2 NaN"])
    inf = image_data()
    inf[1, 1, 1] = np.inf
    c = make_case(tmp, "inf", image=inf)
    add(c, c.image, ["inf"])
    c = make_case(tmp, "constant", image=np.zeros(SHAPE, np.float32))
    add(c, c.image, ["image is constant"])
    return out


@pytest.fixture(scope="module")
def bad_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, bad_cases(tmp)


@pytest.mark.parametrize(
    "name",
    ["truncated", "garbage", "missing", "two_d", "four_d", "shape", "affine", "value5", "half", "nan", "inf", "constant"],
)
def test_each_bad_case_is_reported(bad_setup, name):
    _, cases = bad_setup
    case, path, words = cases[name]
    bad = check_case(case, LABELS)
    assert len(bad) == 1, problems_of(bad)
    assert bad[0].name == name and bad[0].path == path
    for w in words:
        assert w in bad[0].problem, bad[0].problem
    assert "\n" not in bad[0].problem and "Traceback" not in bad[0].problem
    assert len(bad[0].problem) < 250


def test_all_bad_cases_reported_together(bad_setup):
    tmp, cases = bad_setup
    good = make_case(tmp, "good")
    listed = [good] + [c for c, _, _ in cases.values()]
    bad = find_bad_cases(listed, LABELS)
    assert {b.name for b in bad} == set(cases)
    text = format_bad_cases(bad)
    lines = text.splitlines()
    assert len(lines) == len(bad) == len(cases)
    for b, line in zip(bad, lines):
        assert line == f"{b.path}: {b.problem}"
    assert format_bad_cases([]) == ""


def test_several_problems_of_one_case(tmp_path):
    img = image_data()
    img[0, 0, 0] = np.nan
    lab = label_data()
    lab[0, 0, 0] = 7
    case = Case("multi", _garbage(tmp_path), save_nii(tmp_path / "l.nii.gz", lab))
    bad = check_case(case, LABELS)
    assert [b.path for b in bad] == [case.image, case.label]
    assert "cannot read image" in bad[0].problem and "{7}" in bad[1].problem


def test_truncated_label_names_label_file(tmp_path):
    img = save_nii(tmp_path / "i.nii.gz", image_data())
    good = save_nii(tmp_path / "l_full.nii.gz", label_data().astype(np.float32))
    raw = good.read_bytes()
    lab = tmp_path / "l.nii.gz"
    lab.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(Exception):  # sanity: really unreadable
        np.asanyarray(nib.load(str(lab)).dataobj)
    bad = check_case(Case("x", img, lab), LABELS)
    assert [(b.path, "cannot read label" in b.problem) for b in bad] == [(lab, True)]


def test_gzip_garbage_inside(tmp_path):
    path = tmp_path / "g.nii.gz"
    path.write_bytes(gzip.compress(b"\x01" * 500))
    bad = check_case(Case("g", path), LABELS)
    assert len(bad) == 1 and "cannot read image" in bad[0].problem


# ----------------------------------------------------------------------------- Hippocampus


@pytest.mark.hippocampus
def test_hippocampus_discovery_and_checks():
    root = _hippocampus_root()
    if root is None:
        pytest.skip("Task04_Hippocampus not available")
    train, test, labels = cases_from_msd(root)
    assert len(train) == 200 and len(test) == 130
    assert labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert all(c.label is not None for c in train) and all(c.label is None for c in test)
    bad = find_bad_cases(train[:20], set(labels))
    assert bad == [], format_bad_cases(bad)
