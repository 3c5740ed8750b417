"""Dataset discovery: turn an MSD folder, a CSV file or two folders into a list of cases.

Every function checks that the listed files exist and that case names are unique,
and raises :class:`DatasetError` (a one-line message naming the file) otherwise.
File contents are not read here; see :mod:`seg_transfer.data.checks` for that.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from seg_transfer.data.io import SUPPORTED_SUFFIXES, is_volume_file, strip_volume_suffix
from seg_transfer.errors import UserError

CHANNEL_SUFFIX = "_0000"  # nnU-Net/MSD-converted single-channel image suffix
_MAX_LISTED = 10

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One image (and optionally its label); ``name`` is unique within a dataset."""

    name: str
    image: Path
    label: Path | None = None


class DatasetError(UserError, ValueError):
    """One-line, user-facing message naming the file and the problem."""


# ----------------------------------------------------------------------------- helpers


def _short_list(items: Iterable[object]) -> str:
    """'a, b, c' listing at most _MAX_LISTED items, then '(and N more)'."""
    items = [str(i) for i in items]
    text = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        text += f" (and {len(items) - _MAX_LISTED} more)"
    return text


def _case_name(path: Path, source: Path) -> str:
    """Case name of an image file; DatasetError (naming ``source``) for an unsupported suffix."""
    try:
        return strip_volume_suffix(path)
    except ValueError:
        raise DatasetError(
            f"{source}: {path}: unsupported file type "
            f"(expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        ) from None


def _check_files_exist(cases: list[Case], source: Path) -> None:
    """DatasetError listing every image/label of ``cases`` that is not an existing file."""
    missing = [
        p for c in cases for p in (c.image, c.label) if p is not None and not p.is_file()
    ]
    if missing:
        raise DatasetError(f"{source}: {len(missing)} listed file(s) not found: {_short_list(missing)}")


def _check_unique_names(cases: list[Case], source: Path) -> None:
    """DatasetError listing case names that occur more than once."""
    dups = sorted(n for n, k in Counter(c.name for c in cases).items() if k > 1)
    if dups:
        raise DatasetError(f"{source}: duplicate case name(s): {_short_list(dups)}")


def _validate(cases: list[Case], source: Path, what: str = "cases") -> list[Case]:
    """Non-empty, unique names, all files present; returns ``cases``."""
    if not cases:
        raise DatasetError(f"{source}: no {what} found")
    _check_unique_names(cases, source)
    _check_files_exist(cases, source)
    return cases


# ----------------------------------------------------------------------------- MSD


def _load_json(path: Path) -> dict:
    """Parsed JSON object of ``path``; DatasetError if missing, malformed or not an object."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    return data


def _msd_label_map(data: dict, source: Path) -> dict[int, str]:
    """{int: name} from dataset.json "labels" ({"0": "background"}, or nnU-Net v2 {"background": 0})."""
    labels = data.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{source}: missing or empty 'labels' mapping")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        labels = {str(v): k for k, v in labels.items()}  # nnU-Net v2: name -> value
    out: dict[int, str] = {}
    for key, name in labels.items():
        try:
            value = int(str(key).strip())
        except ValueError:
            raise DatasetError(f"{source}: label key {key!r} is not an integer") from None
        if value in out:
            raise DatasetError(f"{source}: label value {value} is listed twice")
        out[value] = str(name)
    return dict(sorted(out.items()))


def _msd_path(root: Path, entry: object, source: Path, where: str) -> Path:
    """``root / entry`` for a non-empty string entry (absolute paths kept)."""
    if not isinstance(entry, str) or not entry.strip():
        raise DatasetError(f"{source}: {where}: expected a file path, got {entry!r}")
    return root / entry.strip()


def _msd_case(root: Path, entry: object, source: Path, where: str, labelled: bool) -> Case:
    """A Case from a training entry {"image", "label"} or a test entry ("path" or {"image"})."""
    if isinstance(entry, dict):
        image = _msd_path(root, entry.get("image"), source, f"{where} 'image'")
        label = None
        if labelled or entry.get("label") is not None:
            label = _msd_path(root, entry.get("label"), source, f"{where} 'label'")
    elif not labelled:
        image, label = _msd_path(root, entry, source, where), None
    else:
        raise DatasetError(f"{source}: {where}: expected an object with 'image' and 'label'")
    return Case(_case_name(image, source), image, label)


def _msd_entries(data: dict, key: str, source: Path, required: bool) -> list:
    """The list under ``key`` ([] if absent and not required)."""
    entries = data.get(key)
    if entries is None and not required:
        return []
    if not isinstance(entries, list):
        raise DatasetError(f"{source}: missing or invalid '{key}' list")
    return entries


def cases_from_msd(root: str | Path) -> tuple[list[Case], list[Case], dict[int, str]]:
    """Read an MSD-layout dataset (dataset.json, imagesTr/, labelsTr/, imagesTs/).

    Returns (training cases, test cases, label map {int: name}), cases in dataset.json
    order. Paths in dataset.json are relative to ``root``. Training must be non-empty
    and labelled, every file present; test may be absent or empty, and listed test images
    that are missing (a copy of imagesTr/labelsTr alone, as on a cluster) are left out
    with a warning: nothing that uses these cases needs them. Case names must be unique across both.
    """
    root = Path(root)
    source = root / "dataset.json"
    data = _load_json(source)
    labels = _msd_label_map(data, source)
    train = [
        _msd_case(root, e, source, f"training[{i}]", labelled=True)
        for i, e in enumerate(_msd_entries(data, "training", source, required=True))
    ]
    test = [
        _msd_case(root, e, source, f"test[{i}]", labelled=False)
        for i, e in enumerate(_msd_entries(data, "test", source, required=False))
    ]
    _validate(train, source, "training cases")
    _check_unique_names(train + test, source)
    missing = [c for c in test if not c.image.is_file()]
    if missing:
        log.warning("%s: %d of %d listed test image(s) not found, left out (e.g. %s)", source, len(missing),
                    len(test), missing[0].image)
    return train, [c for c in test if c not in missing], labels


# ----------------------------------------------------------------------------- CSV


def _csv_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with lower-cased stripped keys and stripped values) for each data row."""
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: CSV file not found")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            if "image" not in fields:
                raise DatasetError(f"{csv_path}: missing 'image' column (header: {', '.join(fields) or 'none'})")
            rows = []
            for row in reader:
                clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                if any(clean.values()):  # skip blank lines
                    rows.append((reader.line_num, clean))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{csv_path}: cannot read CSV ({type(e).__name__}: {e})") from None
    return rows


def cases_from_csv(csv_path: str | Path) -> list[Case]:
    """Cases from a CSV with columns image[,label][,name] (header required, any order).

    Relative paths are relative to the CSV's folder; an empty label cell means no
    label; an empty or absent name is the image file name without its suffix.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    cases = []
    for line, row in _csv_rows(csv_path):
        if not row.get("image"):
            raise DatasetError(f"{csv_path}: line {line}: empty 'image' cell")
        image = base / row["image"]
        label = base / row["label"] if row.get("label") else None
        name = row.get("name") or _case_name(image, csv_path)
        cases.append(Case(name, image, label))
    return _validate(cases, csv_path)


# ----------------------------------------------------------------------------- folders


def _volumes_by_key(folder: Path, strip_channel: bool) -> dict[str, Path]:
    """{case key: file} for the volume files of ``folder``; DatasetError on missing folder or clashes."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    out: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_volume_file(p)):
        key = strip_volume_suffix(path)
        if strip_channel and key.endswith(CHANNEL_SUFFIX):
            key = key[: -len(CHANNEL_SUFFIX)]
        if key in out:
            raise DatasetError(f"{folder}: {out[key].name} and {path.name} are the same case '{key}'")
        out[key] = path
    return out


def volume_files(folder: str | Path) -> dict[str, Path]:
    """{case name: file} for the volume files of ``folder`` (empty if it holds none); DatasetError if it is missing
    or two files are the same case."""
    return _volumes_by_key(Path(folder), strip_channel=False)


def cases_from_folders(images_dir: str | Path, labels_dir: str | Path | None) -> list[Case]:
    """Cases pairing images and labels by file name, sorted by name.

    Image names may carry the MSD/nnU-Net channel suffix "_0000" (dropped from the
    case name). Hidden files and non-volume files are ignored. Any image without a
    label or label without an image raises DatasetError listing them. With
    ``labels_dir=None`` all images are returned unlabelled.
    """
    images_dir = Path(images_dir)
    images = _volumes_by_key(images_dir, strip_channel=True)
    if not images:
        raise DatasetError(f"{images_dir}: no image files found ({', '.join(SUPPORTED_SUFFIXES)})")
    if labels_dir is None:
        return [Case(k, images[k]) for k in sorted(images)]
    labels_dir = Path(labels_dir)
    labels = _volumes_by_key(labels_dir, strip_channel=False)
    no_label = sorted(images.keys() - labels.keys())
    no_image = sorted(labels.keys() - images.keys())
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"images without label: {_short_list(images[k].name for k in no_label)}")
        if no_image:
            parts.append(f"labels without image: {_short_list(labels[k].name for k in no_image)}")
        raise DatasetError(f"{images_dir} / {labels_dir}: unpaired files; {'; '.join(parts)}")
    return [Case(k, images[k], labels[k]) for k in sorted(images)]
