"""Download, verify and unpack a Medical Segmentation Decathlon task.

Usage: python data_scripts/fetch_msd.py TASK [--dest DIR] [--url URL] [--md5 HEX] [--force]

Task URLs and checksums come from MONAI's table (``monai.apps.DecathlonDataset.resource`` /
``.md5``). The archive is downloaded to ``DEST/TASK.tar.part`` (resumed with an HTTP Range
request when that file exists), its md5 verified, renamed to ``DEST/TASK.tar`` and extracted
into a temporary directory inside DEST that is renamed to ``DEST/TASK`` only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

__all__ = ["FetchError", "UnknownTaskError", "known_tasks", "md5sum", "download", "extract", "fetch", "main"]

_CHUNK = 1 << 20
_USER_AGENT = "seg-transfer-fetch-msd/1.0"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FetchError(Exception):
    """A download, verification or extraction failure; str(err) is a one-line message."""


class UnknownTaskError(FetchError):
    """The task name is not in the known-task table."""


def known_tasks() -> dict[str, tuple[str, str]]:
    """Map task name -> (url, md5) from MONAI's Decathlon table."""
    try:
        from monai.apps import DecathlonDataset
    except ImportError as err:  # pragma: no cover - monai is a dependency
        raise FetchError(f"cannot import monai.apps.DecathlonDataset: {err}") from err
    resource, md5 = getattr(DecathlonDataset, "resource", None), getattr(DecathlonDataset, "md5", None)
    if not isinstance(resource, dict) or not isinstance(md5, dict):
        raise FetchError("monai.apps.DecathlonDataset has no resource/md5 tables in this MONAI version")
    return {task: (url, md5[task]) for task, url in sorted(resource.items()) if task in md5}


def md5sum(path: str | Path, chunk_size: int = _CHUNK) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- download
def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _open(url: str, offset: int, timeout: float):
    """urlopen with a Range header when offset > 0; HTTP errors propagate as HTTPError."""
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _range_start(content_range: str | None) -> int | None:
    """Start byte of a 'bytes START-END/TOTAL' Content-Range header, or None."""
    match = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _complete_size(err: urllib.error.HTTPError) -> int | None:
    """Total size from the 'bytes */TOTAL' Content-Range of a 416 reply, or None."""
    match = re.match(r"\s*bytes\s+\*/(\d+)", (err.headers or {}).get("Content-Range", "") or "")
    return int(match.group(1)) if match else None


def _fetch_to_part(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Bring `part` to the full content of `url`, appending to existing bytes when the server allows.

    Raises FetchError on network/HTTP failures; the part file is kept for resuming.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            if _complete_size(err) == offset:
                return  # the part file already holds everything
            part.unlink()  # unusable partial file: start again
            return _fetch_to_part(url, part, timeout, progress)
        raise FetchError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise FetchError(f"cannot reach {url}: {reason}{_kept(part)}") from err
    with resp:
        if offset and resp.status == 206 and _range_start(resp.headers.get("Content-Range")) != offset:
            part.unlink()  # server answered a different range than asked: restart cleanly
            resp.close()
            return _fetch_to_part(url, part, timeout, progress)
        if resp.status != 206:
            offset = 0  # server ignored Range (200): restart from zero
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        _stream(resp, part, offset, total, progress, url)
    size = part.stat().st_size
    if total is not None and size != total:
        raise FetchError(f"download of {url} incomplete: {size} of {total} bytes{_kept(part)}")


def _stream(resp, part: Path, offset: int, total: int | None, progress: bool, url: str) -> None:
    """Copy the response body into `part` (append from offset, or truncate when offset == 0)."""
    try:
        with open(part, "ab" if offset else "wb") as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not progress, leave=False,
        ) as bar:
            while block := resp.read(_CHUNK):
                fh.write(block)
                bar.update(len(block))
    except (OSError, http.client.HTTPException) as err:
        raise FetchError(f"download of {url} interrupted ({type(err).__name__}: {err}){_kept(part)}") from err


def _kept(part: Path) -> str:
    if part.exists() and part.stat().st_size:
        return f"; partial download kept at {part} ({part.stat().st_size} bytes), rerun to resume"
    return ""


def download(url: str, dest: str | Path, expected_md5: str | None, *, timeout: float = 30.0,
             progress: bool = True) -> Path:
    """Download `url` to `dest` (the final archive path) and return it.

    Works in ``dest + '.part'``, resuming it with a Range request if present; verifies the md5
    (skipped when expected_md5 is None); on mismatch deletes the part file and raises FetchError.
    An existing `dest` whose md5 matches is reused without network access.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    if dest.exists():
        if expected_md5 is None or md5sum(dest) == expected_md5.lower():
            return dest
        dest.unlink()  # stale or corrupt archive from an earlier run
    _fetch_to_part(url, part, timeout, progress)
    if expected_md5 is not None:
        actual = md5sum(part)
        if actual != expected_md5.lower():
            part.unlink()
            raise FetchError(f"checksum mismatch for {url}: md5 {actual}, expected {expected_md5.lower()} "
                             "(partial file deleted)")
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------- extract
def _task_root(content: Path, name: str) -> Path:
    """The directory holding the task inside an extracted archive."""
    if (content / name).is_dir():
        return content / name
    entries = [p for p in content.iterdir() if not p.name.startswith("._")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return content


def _drop_appledouble(root: Path) -> int:
    """Delete macOS '._*' resource-fork files (present in the MSD archives); return how many."""
    junk = [p for p in root.rglob("._*") if p.is_file()]
    for path in junk:
        path.unlink()
    return len(junk)


def extract(archive: str | Path, dest: str | Path, name: str | None = None, *, replace: bool = False) -> Path:
    """Unpack a task archive so that ``dest/name/dataset.json`` exists; return ``dest/name``.

    Extraction uses tarfile's "data" filter into a temporary directory inside `dest`, which is
    renamed into place only when complete. `name` defaults to the archive name before its first
    dot. An existing ``dest/name`` raises FetchError unless `replace` is true.
    """
    archive, dest = Path(archive), Path(dest)
    name = name or archive.name.split(".", 1)[0]
    target = dest / name
    if target.exists() and not replace:
        raise FetchError(f"{target} already exists")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=dest))
    try:
        content = tmp / "content"
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(content, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise FetchError(f"cannot extract {archive}: {err}") from err
        root = _task_root(content, name)
        _drop_appledouble(root)
        if not (root / "dataset.json").is_file():
            raise FetchError(f"{archive} is not a Decathlon task archive (no dataset.json for {name})")
        if target.exists():
            os.replace(target, tmp / "previous")  # removed with tmp below
        os.replace(root, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- CLI
def resolve_task(task: str, url: str | None = None, md5: str | None = None) -> tuple[str, str | None]:
    """(url, md5) for `task`; explicit url/md5 override the table. Unknown task without url -> UnknownTaskError."""
    if not _SAFE_NAME.match(task):
        raise UnknownTaskError(f"invalid task name {task!r}")
    table = known_tasks()
    if task not in table and url is None:
        raise UnknownTaskError(f"unknown task {task!r}; valid tasks: {', '.join(table)}")
    table_url, table_md5 = table.get(task, (None, None))
    return url or table_url, md5 if md5 is not None else table_md5


def fetch(task: str, dest: str | Path, url: str | None = None, md5: str | None = None, *,
          force: bool = False, keep_archive: bool = True, timeout: float = 30.0,
          progress: bool = True) -> Path:
    """Download (if needed) and extract `task` into ``dest/task``; return that directory.

    Does nothing and returns early if ``dest/task/dataset.json`` exists and not `force`.
    With `force`, an archive already at ``dest/task.tar`` is reused when its md5 matches.
    """
    dest = Path(dest)
    target = dest / task
    if (target / "dataset.json").is_file() and not force:
        return target
    url, md5 = resolve_task(task, url, md5)
    archive = download(url, dest / f"{task}.tar", md5, timeout=timeout, progress=progress)
    extract(archive, dest, task, replace=True)
    if not keep_archive:
        archive.unlink()
    return target


def _md5_arg(text: str) -> str:
    """argparse type: a 32-digit hex md5, lower-cased."""
    if not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise argparse.ArgumentTypeError(f"not an md5 hex digest: {text!r}")
    return text.lower()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download and unpack a Medical Segmentation Decathlon task.")
    p.add_argument("task", help="task name, e.g. Task04_Hippocampus")
    p.add_argument("--dest", type=Path, default=Path("data"), help="destination directory (default: ./data)")
    p.add_argument("--url", help="archive URL (default: MONAI's URL for the task)")
    p.add_argument("--md5", type=_md5_arg, help="expected md5 of the archive (default: MONAI's checksum for the task)")
    p.add_argument("--force", action="store_true", help="re-extract even if DEST/TASK/dataset.json exists")
    p.add_argument("--remove-archive", action="store_true", help="delete DEST/TASK.tar after extraction")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds (default 30)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 1 on a fetch failure, 2 on an unknown task, 130 if interrupted."""
    args = _parser().parse_args(argv)
    target = args.dest / args.task
    if (target / "dataset.json").is_file() and not args.force:
        print(f"{args.task} already present at {target}; nothing to do (use --force to re-extract)")
        return 0
    try:
        if args.md5 is None and args.url is not None and args.task not in known_tasks():
            print(f"fetch_msd: warning: no checksum known for {args.task}; not verifying", file=sys.stderr)
        path = fetch(args.task, args.dest, args.url, args.md5, force=args.force,
                     keep_archive=not args.remove_archive, timeout=args.timeout, progress=not args.quiet)
    except UnknownTaskError as err:
        print(f"fetch_msd: error: {err}", file=sys.stderr)
        return 2
    except FetchError as err:
        print(f"fetch_msd: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch_msd: interrupted; rerun to resume the download", file=sys.stderr)
        return 130
    print(f"{args.task} ready at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
