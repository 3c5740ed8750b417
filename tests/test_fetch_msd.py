"""Offline tests for data_scripts/fetch_msd.py against a local HTTP server with Range support."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_scripts import fetch_msd
from data_scripts.fetch_msd import FetchError, download, extract, main

TASK = "Task04_Hippocampus"
TIMEOUT = 5.0


def _make_archive(top: str = TASK, extra: dict[str, bytes] | None = None, with_json: bool = True) -> bytes:
    """A small MSD-like tar: TOP/dataset.json, an image file, and a macOS '._' junk file."""
    files = {
        f"{top}/imagesTr/case_001.nii.gz": bytes(range(256)) * 300,
        f"{top}/imagesTr/._case_001.nii.gz": b"\x00\x05\x16\x07AppleDouble",
    }
    if with_json:
        files[f"{top}/dataset.json"] = json.dumps({"name": "Fake", "numTraining": 1}).encode()
    files.update(extra or {})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Server:
    """Serves `data` at /archive.tar; records Range headers; modes: normal, ignore-range, truncate."""

    def __init__(self, data: bytes):
        self.data = data
        self.ranges: list[str | None] = []
        self.mode = "normal"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                outer.ranges.append(self.headers.get("Range"))
                data, start = outer.data, 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and outer.mode != "ignore-range":
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.mode == "truncate":
                    body = body[: len(body) // 3]  # promise more than we send, then hang up
                self.wfile.write(body)
                self.wfile.flush()
                if outer.mode == "truncate":
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/archive.tar"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def archive_bytes() -> bytes:
    return _make_archive()


@pytest.fixture()
def server(archive_bytes):
    with _Server(archive_bytes) as srv:
        yield srv


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _free_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/archive.tar"  # nothing listens here once the socket is closed


def _run(tmp_path: Path, *args: str) -> int:
    return main([TASK, "--dest", str(tmp_path), "--quiet", "--timeout", str(TIMEOUT), *args])


# ----------------------------------------------------------------------------- table
def test_known_tasks_come_from_monai():
    from monai.apps import DecathlonDataset

    tasks = fetch_msd.known_tasks()
    assert set(tasks) == set(DecathlonDataset.resource)
    url, md5 = tasks[TASK]
    assert url == DecathlonDataset.resource[TASK] and url.endswith(f"{TASK}.tar")
    assert md5 == DecathlonDataset.md5[TASK] and re.fullmatch(r"[0-9a-f]{32}", md5)


# ----------------------------------------------------------------------------- (a) full download
def test_full_download_verify_and_extract(tmp_path, server, archive_bytes, capsys):
    assert _run(tmp_path, "--url", server.url, "--md5", _md5(archive_bytes)) == 0
    task_dir = tmp_path / TASK
    assert json.loads((task_dir / "dataset.json").read_text())["name"] == "Fake"
    assert (task_dir / "imagesTr" / "case_001.nii.gz").read_bytes() == bytes(range(256)) * 300
    assert not (task_dir / "imagesTr" / "._case_001.nii.gz").exists()  # macOS junk dropped
    assert (tmp_path / f"{TASK}.tar").read_bytes() == archive_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [TASK, f"{TASK}.tar"]  # no .part, no temp dirs
    assert server.ranges == [None]
    assert "ready at" in capsys.readouterr().out


def test_download_function_returns_archive(tmp_path, server, archive_bytes):
    dest = tmp_path / "sub" / "x.tar"
    assert download(server.url, dest, _md5(archive_bytes), timeout=TIMEOUT, progress=False) == dest
    assert dest.read_bytes() == archive_bytes
    # A verified archive already in place is reused without touching the network.
    assert download(server.url, dest, _md5(archive_bytes), timeout=TIMEOUT, progress=False) == dest
    assert len(server.ranges) == 1


# ----------------------------------------------------------------------------- (b) resume
def test_resume_uses_range_request(tmp_path, server, archive_bytes):
    half = len(archive_bytes) // 2
    (tmp_path / f"{TASK}.tar.part").write_bytes(archive_bytes[:half])
    assert _run(tmp_path, "--url", server.url, "--md5", _md5(archive_bytes)) == 0
    assert server.ranges == [f"bytes={half}-"]
    assert (tmp_path / f"{TASK}.tar").read_bytes() == archive_bytes
    assert (tmp_path / TASK / "dataset.json").is_file()


def test_interrupted_download_keeps_part_then_resumes(tmp_path, server, archive_bytes, capsys):
    server.mode = "truncate"
    assert _run(tmp_path, "--url", server.url, "--md5", _md5(archive_bytes)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "resume" in err
    part = tmp_path / f"{TASK}.tar.part"
    kept = part.stat().st_size
    assert 0 < kept < len(archive_bytes) and part.read_bytes() == archive_bytes[:kept]
    assert not (tmp_path / TASK).exists()

    server.mode = "normal"
    assert _run(tmp_path, "--url", server.url, "--md5", _md5(archive_bytes)) == 0
    assert server.ranges[-1] == f"bytes={kept}-"
    assert (tmp_path / f"{TASK}.tar").read_bytes() == archive_bytes


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, archive_bytes):
    server.mode = "ignore-range"
    part = tmp_path / "x.tar.part"
    part.write_bytes(b"garbage that must not be kept")
    dest = download(server.url, tmp_path / "x.tar", _md5(archive_bytes), timeout=TIMEOUT, progress=False)
    assert server.ranges == ["bytes=29-"]
    assert dest.read_bytes() == archive_bytes and not part.exists()


def test_complete_part_file_is_accepted_on_416(tmp_path, server, archive_bytes):
    (tmp_path / "x.tar.part").write_bytes(archive_bytes)
    dest = download(server.url, tmp_path / "x.tar", _md5(archive_bytes), timeout=TIMEOUT, progress=False)
    assert server.ranges == [f"bytes={len(archive_bytes)}-"]
    assert dest.read_bytes() == archive_bytes


# ----------------------------------------------------------------------------- (c) wrong md5
def test_wrong_md5_fails_and_removes_part(tmp_path, server, capsys):
    assert _run(tmp_path, "--url", server.url, "--md5", "0" * 32) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "checksum mismatch" in err and "Traceback" not in err
    assert not (tmp_path / f"{TASK}.tar.part").exists()
    assert not (tmp_path / f"{TASK}.tar").exists() and not (tmp_path / TASK).exists()


def test_wrong_md5_raises_in_library(tmp_path, server):
    with pytest.raises(FetchError, match="checksum mismatch"):
        download(server.url, tmp_path / "x.tar", "f" * 32, timeout=TIMEOUT, progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- (d) unknown task
def test_unknown_task_exit_code_2(tmp_path, capsys):
    assert main(["Task99_Nonsense", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown task 'Task99_Nonsense'" in err and TASK in err and "Task09_Spleen" in err
    assert list(tmp_path.iterdir()) == []


def test_malformed_md5_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, "--url", "http://127.0.0.1:9/x", "--md5", "xyz")
    assert exc.value.code == 2
    assert "argument --md5: not an md5 hex digest: 'xyz'" in capsys.readouterr().err


def test_path_like_task_name_rejected(tmp_path, capsys):
    assert main(["../escape", "--dest", str(tmp_path), "--url", "http://127.0.0.1:9/x"]) == 2
    assert "invalid task name '../escape'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- (e) already present
def test_present_task_is_skipped(tmp_path, server, capsys):
    (tmp_path / TASK).mkdir()
    (tmp_path / TASK / "dataset.json").write_text("{}")
    assert _run(tmp_path, "--url", server.url) == 0
    assert "already present" in capsys.readouterr().out
    assert server.ranges == []  # no network access at all
    assert (tmp_path / TASK / "dataset.json").read_text() == "{}"


def test_force_replaces_present_task(tmp_path, server, archive_bytes):
    (tmp_path / TASK).mkdir()
    (tmp_path / TASK / "dataset.json").write_text("{}")
    (tmp_path / TASK / "stale.txt").write_text("old")
    assert _run(tmp_path, "--url", server.url, "--md5", _md5(archive_bytes), "--force", "--remove-archive") == 0
    assert json.loads((tmp_path / TASK / "dataset.json").read_text())["name"] == "Fake"
    assert not (tmp_path / TASK / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [TASK]


# ----------------------------------------------------------------------------- network failure
def test_connection_refused_is_one_line_and_keeps_part(tmp_path, capsys):
    part = tmp_path / f"{TASK}.tar.part"
    part.write_bytes(b"first bytes")
    assert _run(tmp_path, "--url", _free_port_url()) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fetch_msd: error: cannot reach") and "Traceback" not in err
    assert part.read_bytes() == b"first bytes"


# ----------------------------------------------------------------------------- extract
def test_extract_rejects_path_traversal(tmp_path):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(_make_archive(extra={"../evil.txt": b"x"}))
    dest = tmp_path / "out"
    with pytest.raises(FetchError, match="cannot extract"):
        extract(archive, dest, TASK)
    assert not (tmp_path / "evil.txt").exists()
    assert list(dest.iterdir()) == []  # no half-extracted task, no temp directory left


def test_extract_requires_dataset_json_and_existing_target(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(_make_archive(top="Other", with_json=False))
    with pytest.raises(FetchError, match="not a Decathlon task archive"):
        extract(bad, tmp_path / "out", TASK)
    assert list((tmp_path / "out").iterdir()) == []

    good = tmp_path / f"{TASK}.tar"
    good.write_bytes(_make_archive())
    assert extract(good, tmp_path / "out") == tmp_path / "out" / TASK
    with pytest.raises(FetchError, match="already exists"):
        extract(good, tmp_path / "out")
