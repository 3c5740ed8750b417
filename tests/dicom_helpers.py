"""Write small DICOM series with SimpleITK (no pydicom needed) for reader and prediction tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from seg_transfer.inference.writers import lps_geometry

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
FRAME_UID = "1.2.826.0.1.3680043.8.498.2"


def write_dicom_series(volume: np.ndarray, affine: np.ndarray, folder: Path, series_uid: str,
                       series_number: int = 1, prefix: str = "") -> list[Path]:
    """Write an (x, y, z) int16 ``volume`` placed by RAS ``affine`` as one MR slice file per z into ``folder``."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.astype(np.int16).transpose(2, 1, 0)))
    spacing, origin, direction = lps_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    common = {
        "0010|0010": "Phantom^Test", "0010|0020": "PHANTOM1", "0010|0030": "19700101", "0010|0040": "O",
        "0020|000d": STUDY_UID, "0020|0010": "1", "0008|0020": "20240101", "0008|0030": "120000",
        "0008|0050": "ACC1", "0008|0090": "", "0020|000e": series_uid, "0020|0011": str(series_number),
        "0020|0052": FRAME_UID, "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
        "0008|0021": "20240101", "0008|0031": "120000", "0008|103e": f"series {series_number}",
        "0008|0070": "seg_transfer tests", "0018|0050": str(spacing[2]),
        "0020|0037": "\\".join(f"{v:.10f}" for v in (*direction[0::3], *direction[1::3])),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in common.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        path = folder / f"{prefix}{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        paths.append(path)
    return paths
