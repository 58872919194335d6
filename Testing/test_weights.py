"""Weights registry, cache and downloader, against a real HTTP server on 127.0.0.1 (urllib is not mocked)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional

import pytest

from RobustMedSAMLib import weights, weights_digest, weights_download
from RobustMedSAMLib.weights import (ChecksumError, DownloadCancelled, DownloadError, UnknownWeightsError,
                                     WeightsNotAvailableError)

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = os.urandom(3 * 1024 * 1024 + 12345)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
N = len(PAYLOAD)
CHUNK = 128 * 1024


# ------------------------------------------------------------------------------------------ the server
class FileServer:
    """State of the test server: what it serves and what it saw."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.cut_after: Optional[int] = None  # close the connection at this file offset (once)
        self.corrupt = False                  # flip one byte in the middle
        self.ignore_range = False             # answer Range requests with 200 and the whole file
        self.status: Optional[int] = None     # answer every request with this error status
        self.content_type = "application/octet-stream"
        self.requests: List[dict] = []
        self.bytes_sent = 0
        self.lock = threading.Lock()
        self.url = ""

    def data(self) -> bytes:
        if not self.corrupt:
            return self.payload
        mid = len(self.payload) // 2
        return self.payload[:mid] + bytes([self.payload[mid] ^ 0xFF]) + self.payload[mid + 1:]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict, limit: Optional[int] = None) -> None:
        st: FileServer = self.server.state
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        out = body if limit is None else body[:limit]
        try:
            for i in range(0, len(out), 65536):
                piece = out[i:i + 65536]
                self.wfile.write(piece)
                with st.lock:
                    st.bytes_sent += len(piece)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if limit is not None:
            self.close_connection = True

    def do_GET(self):
        st: FileServer = self.server.state
        rng = self.headers.get("Range")
        record = {"path": self.path, "range": rng}
        with st.lock:
            st.requests.append(record)
            cut, st.cut_after = st.cut_after, None
        if st.status is not None:
            record["status"] = st.status
            return self._send(st.status, b"error page", {"Content-Type": "text/plain"})
        data = st.data()
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        start = 0
        if m and not st.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                record["status"] = 416
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        else:
            status, headers = 200, {}
        headers["Content-Type"] = st.content_type
        record["status"] = status
        limit = cut - start if cut is not None and cut > start else None
        self._send(status, data[start:], headers, limit)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, client_address: None
    httpd.state = FileServer(PAYLOAD)
    httpd.state.url = f"http://127.0.0.1:{httpd.server_address[1]}/files/model.pth"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/model.pth"


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(weights_download, "RETRY_BACKOFF", 0.0)


def _tree_artifacts():
    found = set()
    for p in REPO.rglob("*"):
        if ".git" in p.parts or "venv" in p.parts:
            continue
        if p.name.endswith((".part", ".sha256", ".pth")) or p.name in {"model.pth", "out.bin"}:
            found.add(p)
    return found


@pytest.fixture(scope="module", autouse=True)
def _nothing_in_source_tree():
    before = _tree_artifacts()
    yield
    assert _tree_artifacts() - before == set(), "the tests left weights files in the source tree"


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total):
        self.calls.append((done, total))


def _monotone(calls):
    return all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


# ------------------------------------------------------------------------------------------- download
def test_full_download_verifies_and_reports_progress(server, tmp_path):
    rec = Recorder()
    dest = tmp_path / "sub" / "out.bin"
    got = weights.download(server.url, dest, sha256=PAYLOAD_SHA, expected_size=N, progress=rec, chunk_size=CHUNK)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "out.bin.part").exists()
    assert len(rec.calls) >= N // CHUNK and _monotone(rec.calls)
    assert rec.calls[0] == (0, N) and rec.calls[-1] == (N, N)
    assert [r["range"] for r in server.requests] == [None]


def test_cut_connection_raises_keeps_part_and_next_call_resumes(server, tmp_path):
    dest = tmp_path / "out.bin"
    cut = 1_000_000
    server.cut_after = cut
    with pytest.raises(DownloadError) as info:
        weights.download(server.url, dest, sha256=PAYLOAD_SHA, retries=0, chunk_size=CHUNK)
    part = tmp_path / "out.bin.part"
    assert not dest.exists() and part.stat().st_size == cut
    assert server.url in str(info.value) and str(dest) in str(info.value) and str(part) in str(info.value)

    rec = Recorder()
    weights.download(server.url, dest, sha256=PAYLOAD_SHA, retries=0, progress=rec, chunk_size=CHUNK)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert [(r["range"], r["status"]) for r in server.requests] == [(None, 200), (f"bytes={cut}-", 206)]
    assert server.bytes_sent == N  # nothing transferred twice
    assert rec.calls[0] == (cut, N) and rec.calls[-1] == (N, N)


def test_cut_connection_is_resumed_automatically(server, tmp_path):
    server.cut_after = 777_777
    rec = Recorder()
    dest = weights.download(server.url, tmp_path / "out.bin", sha256=PAYLOAD_SHA, expected_size=N,
                            retries=2, backoff=0, progress=rec, chunk_size=CHUNK)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.requests] == [None, "bytes=777777-"]
    assert server.bytes_sent == N
    assert _monotone(rec.calls) and rec.calls[-1] == (N, N)


def test_corrupted_payload_raises_checksum_error_and_leaves_nothing(server, tmp_path):
    server.corrupt = True
    dest = tmp_path / "out.bin"
    with pytest.raises(ChecksumError) as info:
        weights.download(server.url, dest, sha256=PAYLOAD_SHA, expected_size=N, chunk_size=CHUNK)
    message = str(info.value)
    assert "out.bin" in message and PAYLOAD_SHA in message
    assert hashlib.sha256(server.data()).hexdigest() in message
    assert not dest.exists() and not (tmp_path / "out.bin.part").exists()


def test_wrong_size_is_detected_before_downloading(server, tmp_path):
    dest = tmp_path / "out.bin"
    rec = Recorder()
    with pytest.raises(ChecksumError) as info:
        weights.download(server.url, dest, expected_size=N + 1, progress=rec)
    assert str(N + 1) in str(info.value) and str(N) in str(info.value)
    assert not dest.exists() and not (tmp_path / "out.bin.part").exists()
    assert rec.calls == []  # stopped at the headers, before reading any data


def test_server_down_raises_download_error_with_url_and_destination(closed_port_url, tmp_path):
    dest = tmp_path / "out.bin"
    with pytest.raises(DownloadError) as info:
        weights.download(closed_port_url, dest, timeout=2)
    message = str(info.value)
    assert closed_port_url in message and str(dest) in message
    assert "refused" in message.lower() or "unreachable" in message.lower()
    assert not dest.exists()


def test_timeout_raises_download_error(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)  # accepts connections in the kernel but never answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/model.pth"
    try:
        with pytest.raises(DownloadError) as info:
            weights.download(url, tmp_path / "out.bin", timeout=0.3)
    finally:
        listener.close()
    assert url in str(info.value) and "timed out" in str(info.value)


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_raises_download_error(server, tmp_path, status):
    server.status = status
    dest = tmp_path / "out.bin"
    with pytest.raises(DownloadError) as info:
        weights.download(server.url, dest)
    message = str(info.value)
    assert server.url in message and str(dest) in message and str(status) in message
    assert not dest.exists() and not (tmp_path / "out.bin.part").exists()
    assert len(server.requests) == 1  # HTTP errors are not retried


def test_html_page_instead_of_file_is_rejected(server, tmp_path):
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(DownloadError, match="web page"):
        weights.download(server.url, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_cancel_keeps_part_and_next_call_resumes(server, tmp_path):
    dest = tmp_path / "out.bin"
    rec = Recorder()
    with pytest.raises(DownloadCancelled) as info:
        weights.download(server.url, dest, progress=rec, chunk_size=CHUNK,
                         cancel=lambda: bool(rec.calls) and rec.calls[-1][0] >= 512 * 1024)
    part = tmp_path / "out.bin.part"
    kept = part.stat().st_size
    assert 512 * 1024 <= kept < N and not dest.exists()
    assert info.value.part == part and info.value.done == kept
    assert PAYLOAD.startswith(part.read_bytes())

    weights.download(server.url, dest, sha256=PAYLOAD_SHA, chunk_size=CHUNK)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.requests[-1]["range"] == f"bytes={kept}-" and server.requests[-1]["status"] == 206


def test_cancel_before_start_makes_no_request(server, tmp_path):
    with pytest.raises(DownloadCancelled):
        weights.download(server.url, tmp_path / "out.bin", cancel=lambda: True)
    assert server.requests == []


def test_server_ignoring_range_still_gives_correct_file(server, tmp_path):
    dest = tmp_path / "out.bin"
    server.cut_after = 600_000
    with pytest.raises(DownloadError):
        weights.download(server.url, dest, retries=0)
    server.ignore_range = True
    rec = Recorder()
    weights.download(server.url, dest, sha256=PAYLOAD_SHA, expected_size=N, retries=0, progress=rec)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "out.bin.part").exists()
    assert server.requests[-1] == {"path": "/files/model.pth", "range": "bytes=600000-", "status": 200}
    assert server.bytes_sent == 600_000 + N
    assert rec.calls[-1] == (N, N)


def test_complete_part_is_finished_after_416(server, tmp_path):
    dest = tmp_path / "out.bin"
    (tmp_path / "out.bin.part").write_bytes(PAYLOAD)  # e.g. interrupted just before the rename
    weights.download(server.url, dest, sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert [(r["range"], r["status"]) for r in server.requests] == [(f"bytes={N}-", 416)]
    assert server.bytes_sent == 0


def test_complete_part_of_known_size_needs_no_request(server, tmp_path):
    (tmp_path / "out.bin.part").write_bytes(PAYLOAD)
    weights.download(server.url, tmp_path / "out.bin", sha256=PAYLOAD_SHA, expected_size=N)
    assert (tmp_path / "out.bin").read_bytes() == PAYLOAD and server.requests == []


def test_invalid_part_is_restarted_after_416(server, tmp_path):
    dest = tmp_path / "out.bin"
    (tmp_path / "out.bin.part").write_bytes(os.urandom(N + 100))  # longer than the file: garbage
    weights.download(server.url, dest, sha256=PAYLOAD_SHA)
    assert dest.read_bytes() == PAYLOAD
    assert [(r["range"], r["status"]) for r in server.requests] == [(f"bytes={N + 100}-", 416), (None, 200)]


def test_download_without_expected_digest_still_succeeds(server, tmp_path):
    path, digest = weights_download.download_with_digest(server.url, tmp_path / "out.bin")
    assert digest == PAYLOAD_SHA and path.read_bytes() == PAYLOAD


# ------------------------------------------------------------------------------------- ensure_weights
@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(weights.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def local_entry(server, monkeypatch):
    entry = dataclasses.replace(weights.REGISTRY["robustmedsam"], url=server.url, sha256=PAYLOAD_SHA, size=N)
    monkeypatch.setitem(weights.REGISTRY, "robustmedsam", entry)
    return entry


def test_ensure_weights_downloads_into_cache_then_reuses_it(server, cache, local_entry, monkeypatch):
    rec = Recorder()
    path = weights.ensure_weights("robustmedsam", progress=rec)
    assert path == cache / "robustmedsam_best.pth" and path.read_bytes() == PAYLOAD
    assert rec.calls[-1] == (N, N)
    sidecar = json.loads((cache / "robustmedsam_best.pth.sha256").read_text())
    assert sidecar["sha256"] == PAYLOAD_SHA and sidecar["size"] == N

    def no_hashing(*args, **kwargs):
        raise AssertionError("the verified digest should come from the sidecar")

    monkeypatch.setattr(weights_digest, "sha256_file", no_hashing)
    assert weights.ensure_weights("robustmedsam", allow_download=False) == path
    assert len(server.requests) == 1


def test_ensure_weights_replaces_a_corrupted_cached_file(server, cache, local_entry):
    path = weights.cached_path("robustmedsam")
    cache.mkdir()
    path.write_bytes(b"\0" * N)  # right size, wrong content
    with pytest.raises(WeightsNotAvailableError, match="SHA-256"):
        weights.ensure_weights("robustmedsam", allow_download=False)
    assert server.requests == []
    assert weights.ensure_weights("robustmedsam") == path
    assert path.read_bytes() == PAYLOAD and len(server.requests) == 1


def test_ensure_weights_offline_explains_what_to_do(server, cache, local_entry):
    with pytest.raises(WeightsNotAvailableError) as info:
        weights.ensure_weights("robustmedsam", allow_download=False)
    message = str(info.value)
    path = cache / "robustmedsam_best.pth"
    assert server.url in message and str(path) in message
    assert weights.CACHE_ENV in message and "--checkpoint FILE" in message
    assert message.count("\n") >= 3 and info.value.path == path
    assert server.requests == [] and not path.exists()


def test_ensure_weights_when_server_is_down(cache, closed_port_url, monkeypatch):
    entry = dataclasses.replace(weights.REGISTRY["sam-vit-b"], url=closed_port_url)
    monkeypatch.setitem(weights.REGISTRY, "sam-vit-b", entry)
    with pytest.raises(WeightsNotAvailableError) as info:
        weights.ensure_weights("sam-vit-b")
    message = str(info.value)
    assert closed_port_url in message and str(cache / "sam_vit_b_01ec64.pth") in message
    assert isinstance(info.value.__cause__, DownloadError)


def test_medsam_needs_a_manual_download(cache):
    with pytest.raises(WeightsNotAvailableError) as info:
        weights.ensure_weights("medsam")
    message = str(info.value)
    path = cache / "medsam_vit_b.pth"
    assert "https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN" in message
    assert "medsam_vit_b.pth" in message and str(path) in message and str(cache) in message
    cache.mkdir()
    path.write_bytes(b"placed by hand")
    assert weights.ensure_weights("medsam", allow_download=False) == path


def test_ensure_weights_cancel_propagates(server, cache, local_entry):
    with pytest.raises(DownloadCancelled):
        weights.ensure_weights("robustmedsam", cancel=lambda: True)
    assert not weights.cached_path("robustmedsam").exists()


# --------------------------------------------------------------------------------- registry and cache
def test_registry_entries():
    assert weights.names() == ["robustmedsam", "robustsam-vit-b", "sam-vit-b", "medsam"]
    assert weights.get("robustmedsam").url.endswith("/v1.0.0/robustmedsam_best.pth")
    assert weights.get("ROBUSTSAM_VIT_B").filename == "robustsam_checkpoint_b.pth"
    sam = weights.get("sam-vit-b")
    assert sam.size == 375042383 and sam.sha256.startswith("ec2df627") and sam.sha256.endswith("c912")
    medsam = weights.get("medsam")
    assert medsam.url is None and "drive.google.com" in medsam.manual_url and medsam.license == "Apache-2.0"
    for entry in weights.REGISTRY.values():
        assert entry.url is None or entry.url.startswith("https://")
        assert entry.url is None or entry.url.endswith("/" + entry.filename)
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sam.url = "x"


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as info:
        weights.get("vit-h")
    assert isinstance(info.value, UnknownWeightsError)
    assert str(info.value) == "unknown weights 'vit-h'; known weights: robustmedsam, robustsam-vit-b, sam-vit-b, medsam"


def test_cache_dir_honours_env_var_and_is_created_on_demand(tmp_path, monkeypatch):
    folder = tmp_path / "a" / "b"
    monkeypatch.setenv(weights.CACHE_ENV, str(folder))
    assert weights.cached_path("sam-vit-b") == folder / "sam_vit_b_01ec64.pth"
    assert not folder.exists()
    assert weights.cache_dir() == folder and folder.is_dir()


def test_default_cache_dir_per_platform(tmp_path):
    home = tmp_path / "home"
    assert weights.default_cache_dir("linux", {}, home) == home / ".cache" / "robustmedsam"
    xdg = str(tmp_path / "xdg")
    assert weights.default_cache_dir("linux", {"XDG_CACHE_HOME": xdg}, home) == Path(xdg) / "robustmedsam"
    assert weights.default_cache_dir("linux", {"XDG_CACHE_HOME": "rel"}, home) == home / ".cache" / "robustmedsam"
    assert weights.default_cache_dir("darwin", {}, home) == home / "Library" / "Caches" / "robustmedsam"
    local = str(tmp_path / "Local")
    assert weights.default_cache_dir("win32", {"LOCALAPPDATA": local}, home) == Path(local) / "robustmedsam" / "Cache"
    assert weights.default_cache_dir("win32", {}, home) == home / "AppData" / "Local" / "robustmedsam" / "Cache"


def test_default_cache_is_outside_the_source_tree(tmp_path, monkeypatch, server):
    monkeypatch.delenv(weights.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    monkeypatch.chdir(REPO)
    folder = weights.cache_dir(create=False)
    assert folder.is_absolute() and tmp_path in folder.parents
    assert REPO not in folder.parents and Path(weights.__file__).parent not in folder.parents
    entry = dataclasses.replace(weights.REGISTRY["robustsam-vit-b"], url=server.url)
    monkeypatch.setitem(weights.REGISTRY, "robustsam-vit-b", entry)
    path = weights.ensure_weights("robustsam-vit-b")
    assert path.parent == folder and path.read_bytes() == PAYLOAD


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import RobustMedSAMLib.weights as w\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]; print(w.names())")
    done = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "robustmedsam" in done.stdout


# --------------------------------------------------------------------------------------------- helpers
def test_sha256_file_with_progress(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(PAYLOAD)
    rec = Recorder()
    assert weights.sha256_file(f, rec, chunk_size=1 << 20) == PAYLOAD_SHA
    assert rec.calls[-1] == (N, N) and len(rec.calls) == 4


def test_format_bytes():
    assert [weights.format_bytes(v) for v in (None, 0, 999, 1000, 1_234_567, 375042383, 612_734_312_000)] == [
        "?", "0 B", "999 B", "1.0 kB", "1.2 MB", "375.0 MB", "612.7 GB"]
    assert weights.format_bytes(999_960) == "1.0 MB"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_text_progress_bar_on_a_terminal():
    out = _Tty()
    bar = weights.TextProgressBar("sam", stream=out, width=10, min_interval=0)
    bar(0, 1000)
    bar(500, 1000)
    bar(1000, 1000)
    bar.close()
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    last = text.split("\r")[-1]
    assert last.startswith("sam: [##########] 100.0%") and "1.0 kB / 1.0 kB" in last


def test_text_progress_bar_in_a_log_and_unknown_total():
    out = io.StringIO()
    with weights.TextProgressBar("dl", stream=out, log_interval=3600) as bar:
        for done in range(0, 5_000_001, 1_000_000):
            bar(done, None)
    lines = out.getvalue().splitlines()
    assert lines == ["dl: 0 B"]  # throttled: one line per log_interval, no carriage returns
    assert "\r" not in out.getvalue()
    assert bar.render(2_000_000, None, 2.0) == "dl: 2.0 MB 1.0 MB/s"
    assert weights.TextProgressBar(stream=out).render(0, 10, 0.0) == "[------------------------------]   0.0% 0 B / 10 B"
