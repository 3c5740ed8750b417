"""DICOM Segmentation output (highdicom, optional extra ``dicom``) for DICOM series inputs.

One segment per foreground label (named as in the checkpoint), binary, referencing the source series
instance by instance. Frame ``k`` of the label map (x, y, z) is the source file ``case.files[k]``:
both follow GDCM's slice order, which is how the series was read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from seg_transfer.inference.cases import InputCase
from seg_transfer.inference.predictor import PredictSetupError
from seg_transfer.inference.writers import atomic_output

SOFTWARE = "seg_transfer"


def require_highdicom() -> None:
    """Raise :class:`PredictSetupError` with the install command when highdicom is missing."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise PredictSetupError("--format dicom-seg needs highdicom: pip install 'seg-transfer[dicom]'") from None


def write_dicom_seg(labels: np.ndarray, case: InputCase, class_names: dict[int, str], path: Path) -> Path:
    """Write a label map (x, y, z) of a DICOM series ``case`` as a DICOM SEG at ``path`` (atomically)."""
    import highdicom as hd
    import pydicom

    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in case.files]
    frames = np.ascontiguousarray(np.asarray(labels).transpose(2, 1, 0))  # (slices, rows, columns)
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(f"label map {labels.shape} does not match the series ({len(sources)} x {sources[0].Rows} x {sources[0].Columns})")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8 if frames.max(initial=0) < 256 else np.uint16),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names),
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=SOFTWARE,
        software_versions=_version(),
        device_serial_number="0",
        content_label="SEGMENTATION",
        omit_empty_frames=False,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temp:
        seg.save_as(str(temp))
    return path


def segment_descriptions(class_names: dict[int, str]) -> list:
    """One automatic-algorithm segment per foreground label, numbered by label value, labelled by name."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name=SOFTWARE, family=codes.cid7162.ArtificialIntelligence,
                                                   version=_version())
    return [
        hd.seg.SegmentDescription(
            segment_number=value,
            segment_label=name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for value, name in sorted(class_names.items()) if value != 0
    ]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("seg-transfer")
    except PackageNotFoundError:
        return "0"
