"""The SimpleITK-backed MONAI reader: NRRD, MHA and DICOM series load like NIfTI does (x, y, z order, RAS affine)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from seg_transfer.data.io import SimpleITKReader, dicom_series, read_volume
from seg_transfer.data.transforms import load_transform
from seg_transfer.inference.writers import sitk_image
from tests.dicom_helpers import write_dicom_series


def _volume_and_affine():
    data = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
    affine = np.array([[0.0, -0.9, 0.0, 10.0], [1.2, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    return data, affine


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_every_format_loads_to_the_same_array_and_affine(tmp_path, suffix):
    data, affine = _volume_and_affine()
    path = tmp_path / f"v{suffix}"
    sitk.WriteImage(sitk_image(data, affine), str(path))
    loaded = load_transform(["image"])({"image": str(path)})["image"]
    assert loaded.shape == (1, 7, 6, 5)
    np.testing.assert_array_equal(loaded[0].numpy(), data)
    np.testing.assert_allclose(loaded.meta["original_affine"], affine, atol=1e-6)
    reference, reference_affine = read_volume(path)
    np.testing.assert_array_equal(loaded[0].numpy(), reference)
    np.testing.assert_allclose(loaded.affine.numpy(), reference_affine, atol=1e-6)


def test_reader_claims_sitk_formats_and_dicom_but_not_nifti(tmp_path):
    reader = SimpleITKReader()
    assert reader.verify_suffix("a.nrrd") and reader.verify_suffix("a.MHA") and reader.verify_suffix(str(tmp_path))
    assert not reader.verify_suffix("a.nii.gz") and not reader.verify_suffix("a.png")


def test_dicom_series_split_by_uid_and_read_from_file_lists(tmp_path):
    data, affine = _volume_and_affine()
    volume = np.round(data * 100).astype(np.int16)
    write_dicom_series(volume, affine, tmp_path, "1.2.826.0.1.3680043.8.498.31", 1, prefix="a")
    write_dicom_series(volume[::-1].copy(), affine, tmp_path, "1.2.826.0.1.3680043.8.498.32", 2, prefix="b")
    series = dicom_series(tmp_path)
    assert sorted(series) == ["1.2.826.0.1.3680043.8.498.31", "1.2.826.0.1.3680043.8.498.32"]
    assert all(len(files) == 5 for files in series.values())
    first = load_transform(["image"])({"image": list(series["1.2.826.0.1.3680043.8.498.31"])})["image"]
    second = load_transform(["image"])({"image": list(series["1.2.826.0.1.3680043.8.498.32"])})["image"]
    np.testing.assert_array_equal(first[0].numpy(), volume)
    np.testing.assert_array_equal(second[0].numpy(), volume[::-1])
    np.testing.assert_allclose(first.meta["original_affine"], affine, atol=1e-4)
    with pytest.raises(Exception, match="expected one DICOM series, found 2"):
        load_transform(["image"])({"image": str(tmp_path)})


def test_vector_images_are_refused(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(Exception) as error:
        load_transform(["image"])({"image": str(path)})
    cause = error.value.__cause__ or error.value
    assert "expected a scalar image" in str(cause)
