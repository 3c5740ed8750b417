"""Atomic file output: nothing is ever half-written (temp file in the same folder, then ``os.replace``)."""
from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from seg_transfer.errors import UserError


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path`` (creating its folder); on a clean exit it replaces ``path``,
    on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as stream:
            yield stream
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as stream:
        stream.write(data)
    return Path(path)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``<path>.lock`` for the block, so that processes
    sharing one file (two ``nnunet_peer.py`` runs on a study) read-modify-write it one at a time."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_json_atomic(path: str | Path, update: Callable[[Any], Any], default: Any) -> Any:
    """Read the JSON at ``path`` (``default`` if absent), replace it with ``update(data)``, atomically and under
    :func:`locked`, so concurrent updaters never drop each other's changes; returns what was written."""
    path = Path(path)
    with locked(path):
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default
        new = update(data)
        write_atomic(path, json.dumps(json_safe(new), indent=2) + "\n")
    return new


def sweep_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files :func:`atomic_open` leaves when a process is killed between write and rename
    (``.<name>.<random>.tmp``) anywhere below ``folder``; returns what was removed."""
    folder = Path(folder)
    stale = [p for p in folder.rglob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def json_safe(value: Any) -> Any:
    """``value`` as strict-JSON data: NaN/inf floats become None, tuples lists, keys and paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class OutputPathError(UserError, ValueError):
    """An output path that cannot be written: a file where a folder is needed (or the reverse), or no write access."""


def check_writable(path: str | Path, *, folder: bool, option: str = "--output") -> Path:
    """``path`` if this process can create or replace it: a folder (``folder=True``) or a file whose folder is
    writable. Nothing is created; raises :class:`OutputPathError` naming ``option`` and the path otherwise."""
    path = Path(path)
    if path.exists():
        if folder != path.is_dir():
            want, got = ("a folder", "an existing file") if folder else ("a file", "an existing folder")
            raise OutputPathError(f"{option} {path}: is {got}, not {want}")
        _check_access(path if folder else path.parent, path, option)
        return path
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: cannot create it, {ancestor} is a file")
    _check_access(ancestor, path, option)
    return path


def _check_access(folder: Path, path: Path, option: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: no permission to write in {folder}")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
