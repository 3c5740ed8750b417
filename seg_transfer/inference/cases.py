"""Input discovery for batch prediction: a file, a folder, a glob or a list file → named cases; sharding.

A case is one volume file or one DICOM series. Nothing is decoded here (DICOM headers are read by
GDCM to split series). Explicitly named inputs that cannot be used (missing, unsupported) become
cases with a ``problem``, so the run records them as failed and goes on; files of unknown type
found while scanning a folder are skipped with a log line.
"""
from __future__ import annotations

import csv
import glob
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from seg_transfer.data.cases import CHANNEL_SUFFIX
from seg_transfer.data.io import (
    SUPPORTED_SUFFIXES,
    dicom_series,
    is_volume_file,
    looks_like_dicom,
    strip_volume_suffix,
)
from seg_transfer.errors import UserError

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".csv", ".lst")
_GLOB_CHARS = "*?["


class InputError(UserError, ValueError):
    """The input cannot be turned into a case list (one-line, user-facing)."""


@dataclass(frozen=True)
class InputCase:
    """One volume to predict. ``files`` is what the loader reads: one file, or a DICOM series' files."""

    name: str
    source: Path
    files: tuple[Path, ...] = ()
    series_uid: str | None = None
    problem: str | None = None

    @property
    def is_dicom(self) -> bool:
        return self.series_uid is not None

    @property
    def loader_input(self) -> str | list[str]:
        """What ``LoadImaged`` gets: a path, or the list of a DICOM series' files."""
        return [str(f) for f in self.files] if self.is_dicom else str(self.files[0])


def discover_cases(input_: str | Path) -> list[InputCase]:
    """Cases from a volume file, a DICOM file or folder, a folder, a glob, or a .txt/.csv list of paths.

    Returns cases sorted by name; raises :class:`InputError` when nothing usable is named or two
    cases would write the same output name.
    """
    text = str(input_)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        cases = cases_from_list(path)
    elif path.exists():
        cases = cases_from_path(path, explicit=True)
    elif any(char in text for char in _GLOB_CHARS):
        matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
        if not matches:
            raise InputError(f"{text}: the pattern matches no file")
        cases = [case for match in matches for case in cases_from_path(Path(match), explicit=True)]
    else:
        raise InputError(f"{text}: no such file or folder")
    if not cases:
        raise InputError(f"{text}: no volumes ({', '.join(SUPPORTED_SUFFIXES)}) or DICOM series found")
    return _unique_sorted(cases)


def cases_from_list(path: Path) -> list[InputCase]:
    """Cases from a text file (one path per line, ``#`` comments) or a CSV (column ``image`` or
    ``path``, else the first). Relative paths are relative to the list file's folder."""
    entries = _csv_entries(path) if path.suffix.lower() == ".csv" else _text_entries(path)
    cases = []
    for entry in entries:
        target = Path(entry).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if not target.exists():
            cases.append(InputCase(_file_case_name(target), target, (target,), problem="file not found"))
        else:
            cases.extend(cases_from_path(target, explicit=True))
    return cases


def cases_from_path(path: Path, explicit: bool = False) -> list[InputCase]:
    """Cases for one file or folder. An explicitly named file of unknown type is a case with a problem."""
    if path.is_dir():
        return cases_from_folder(path)
    if is_volume_file(path):
        return [InputCase(_file_case_name(path), path, (path,))]
    if looks_like_dicom(path):
        return [case for case in dicom_cases(path.parent) if path in case.files][:1] or [
            InputCase(path.stem, path, (path,), problem="DICOM file without a readable series")]
    if explicit:
        return [InputCase(path.name, path, (path,), problem=f"unsupported file type (expected {', '.join(SUPPORTED_SUFFIXES)} or DICOM)")]
    return []


def cases_from_folder(folder: Path) -> list[InputCase]:
    """Volume files directly in ``folder``, plus every DICOM series in it or its subfolders."""
    cases, skipped = [], []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            if is_volume_file(entry):
                cases.append(InputCase(_file_case_name(entry), entry, (entry,)))
            elif not looks_like_dicom(entry):
                skipped.append(entry.name)
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if any(looks_like_dicom(Path(root) / name) for name in files):
            cases.extend(dicom_cases(Path(root)))
    if skipped:
        log.info("%s: skipped %d file(s) of unknown type (e.g. %s)", folder, len(skipped), skipped[0])
    return cases


def dicom_cases(folder: Path) -> list[InputCase]:
    """One case per SeriesInstanceUID in ``folder``: named after the folder, plus the UID when it holds several."""
    series = dicom_series(folder)
    several = len(series) > 1
    return [
        InputCase(f"{folder.name}_{uid}" if several else folder.name, folder, tuple(Path(f) for f in files), uid)
        for uid, files in sorted(series.items())
    ]


def shard(cases: list[InputCase], num_parts: int, part_id: int) -> list[InputCase]:
    """Part ``part_id`` (0-based) of ``num_parts``: every ``num_parts``-th case of the name-sorted list.

    Deterministic, so array jobs given the same input cover every case exactly once.
    """
    if num_parts < 1:
        raise InputError(f"--num-parts must be at least 1 (got {num_parts})")
    if not 0 <= part_id < num_parts:
        raise InputError(f"--part-id must be in 0..{num_parts - 1} (got {part_id})")
    return sorted(cases, key=lambda case: case.name)[part_id::num_parts]


def _file_case_name(path: Path) -> str:
    """File name without its volume suffix and without an nnU-Net channel suffix ("_0000")."""
    try:
        name = strip_volume_suffix(path)
    except ValueError:
        return path.name
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) and len(name) > len(CHANNEL_SUFFIX) else name


def _text_entries(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _csv_entries(path: Path) -> list[str]:
    with open(path, newline="") as stream:
        rows = [row for row in csv.reader(stream) if row and any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    for column in ("image", "path", "input"):
        if column in header:
            index = header.index(column)
            return [row[index].strip() for row in rows[1:] if len(row) > index and row[index].strip()]
    return [row[0].strip() for row in rows]


def _unique_sorted(cases: list[InputCase]) -> list[InputCase]:
    duplicates = [name for name, count in Counter(case.name for case in cases).items() if count > 1]
    if duplicates:
        sources = [str(case.source) for case in cases if case.name == duplicates[0]]
        raise InputError(f"{len(duplicates)} case name(s) occur twice, e.g. '{duplicates[0]}' from {' and '.join(sources[:2])}: "
                         "outputs would overwrite each other; rename the inputs or predict them separately")
    return sorted(cases, key=lambda case: case.name)
