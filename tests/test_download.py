"""Downloading MNIST, against a real HTTP server on 127.0.0.1 started by each test.

The server serves small IDX files written by the tests (tests/idx_files.py)
under paths that behave like mirrors: good, missing (404), corrupted (wrong
content, valid gzip), cut mid-file (the connection closes early), and stalled
(no answer at all, or half the file and then nothing, until the test ends).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from idx_files import fake_mnist, idx_bytes, sha256_of

from backprop_xp.data import (
    FILES,
    ChecksumError,
    DataFormatError,
    DownloadError,
    download_file,
    fetch_mnist,
    load_mnist,
)
from backprop_xp.data import download as data


class Mirror(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with per-prefix misbehaviour; records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.release = threading.Event()  # set when the test ends: stalled handlers stop waiting
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{prefix}/"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        server: Mirror = self.server
        server.requests.append(self.path)
        body = server.files.get(self.path.split("/", 2)[-1])
        prefix = self.path.split("/")[1]
        if body is None or prefix == "missing":
            self.send_error(404)
            return
        if prefix == "stall":  # accepts the connection, never answers
            self.server.release.wait(120)
            return
        if prefix == "corrupt":  # valid gzip of the wrong content: only the hash can tell
            body = gzip.compress(gzip.decompress(body)[:-1] + b"\x07", mtime=0)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if prefix == "cut":  # half the promised bytes, then the connection drops
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if prefix == "stallmid":  # half the file, then silence with the connection open
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.server.release.wait(120)
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def mirror():
    server = Mirror()
    arrays = fake_mnist(n_train=40, n_test=15, rows=28, cols=28)
    server.files = {f"{FILES[key]}.gz": gzip.compress(idx_bytes(a), mtime=0) for key, a in arrays.items()}
    server.arrays = arrays
    server.sha256 = {FILES[key]: sha256_of(a) for key, a in arrays.items()}
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _assert_loads(folder: Path, arrays) -> None:
    x_train, y_train, x_test, y_test = load_mnist(folder, download=False)
    np.testing.assert_array_equal(np.rint(x_train * 255).astype(np.uint8), arrays["train_images"].reshape(40, -1))
    np.testing.assert_array_equal(y_test, arrays["test_labels"])


def test_good_mirror(mirror, tmp_path):
    cache = tmp_path / "cache"
    assert fetch_mnist(cache, mirrors=[mirror.url("good")], sha256=mirror.sha256, progress=False, timeout=5) == cache
    assert _files_in(cache) == sorted(f"{name}.gz" for name in FILES.values())  # no temporary files left
    _assert_loads(cache, mirror.arrays)
    assert len(mirror.requests) == 4
    fetch_mnist(cache, mirrors=[mirror.url("good")], sha256=mirror.sha256, progress=False)
    assert len(mirror.requests) == 4  # present files are not fetched again


def test_404_then_good_mirror(mirror, tmp_path, capsys):
    cache = tmp_path / "cache"
    fetch_mnist(cache, mirrors=[mirror.url("missing"), mirror.url("good")], sha256=mirror.sha256, progress=False)
    _assert_loads(cache, mirror.arrays)
    assert [r.split("/")[1] for r in mirror.requests] == ["missing", "good"] * 4
    assert "404" in capsys.readouterr().err  # each failure is reported before the next mirror is tried


def test_corrupted_file_is_deleted_and_names_both_hashes(mirror, tmp_path):
    cache = tmp_path / "cache"
    name = FILES["train_images"]
    with pytest.raises(ChecksumError) as info:
        fetch_mnist(cache, mirrors=[mirror.url("corrupt")], sha256=mirror.sha256, progress=False)
    message = str(info.value)
    assert name in message and mirror.sha256[name] in message
    wrong = hashlib.sha256(gzip.decompress(mirror.files[f"{name}.gz"])[:-1] + b"\x07").hexdigest()
    assert wrong in message
    assert isinstance(info.value, DataFormatError) and isinstance(info.value, ValueError)
    assert _files_in(cache) == []  # the download is gone, no temporary file either


def test_corrupted_then_good_mirror(mirror, tmp_path):
    cache = tmp_path / "cache"
    fetch_mnist(cache, mirrors=[mirror.url("corrupt"), mirror.url("good")], sha256=mirror.sha256, progress=False)
    _assert_loads(cache, mirror.arrays)


def test_connection_cut_mid_file_leaves_nothing(mirror, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        fetch_mnist(cache, mirrors=[mirror.url("cut")], sha256=mirror.sha256, progress=False, timeout=5)
    assert FILES["train_images"] in str(info.value) and mirror.url("cut") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert _files_in(cache) == []


def test_cut_then_good_mirror(mirror, tmp_path):
    cache = tmp_path / "cache"
    fetch_mnist(cache, mirrors=[mirror.url("cut"), mirror.url("good")], sha256=mirror.sha256, progress=False)
    _assert_loads(cache, mirror.arrays)


def test_a_file_that_is_not_gzip_is_rejected(mirror, tmp_path):
    # The server answers 200 with a complete body that is not gzip (an HTML error page, say).
    name = FILES["test_labels"]
    mirror.files[f"{name}.gz"] = b"<html>moved</html>"
    with pytest.raises(DataFormatError, match="not a complete gzip file"):
        download_file(mirror.url("good") + f"{name}.gz", tmp_path / f"{name}.gz", mirror.sha256[name])
    assert _files_in(tmp_path) == []


def test_download_replaces_nothing_on_failure(mirror, tmp_path):
    name = FILES["test_labels"]
    dest = tmp_path / f"{name}.gz"
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        download_file(mirror.url("corrupt") + f"{name}.gz", dest, mirror.sha256[name], progress=False)
    assert dest.read_bytes() == b"old" and _files_in(tmp_path) == [dest.name]
    download_file(mirror.url("good") + f"{name}.gz", dest, mirror.sha256[name], progress=True)  # with a bar
    assert dest.read_bytes() == mirror.files[f"{name}.gz"]


def test_unreachable_mirror(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(urllib.error.URLError):
        download_file(f"http://127.0.0.1:{port}/x.gz", tmp_path / "x.gz", timeout=5)
    with pytest.raises(DownloadError, match="from any mirror"):
        fetch_mnist(tmp_path / "c", mirrors=[f"http://127.0.0.1:{port}/"], progress=False, timeout=5)
    with pytest.raises(DownloadError, match="empty"):
        fetch_mnist(tmp_path / "c", mirrors=[])


def test_load_mnist_downloads_into_the_cache(mirror, tmp_path, monkeypatch):
    monkeypatch.delenv("BACKPROP_XP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "MIRRORS", [mirror.url("missing"), mirror.url("good")])
    monkeypatch.setattr(data, "SHA256", mirror.sha256)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist(download=False)
    assert mirror.requests == []  # download=False asks nobody
    x_train, y_train, x_test, y_test = load_mnist()
    assert x_train.shape == (40, 784) and x_test.shape == (15, 784) and y_train.dtype == np.int64
    assert _files_in(data.cache_dir()) == sorted(f"{name}.gz" for name in FILES.values())
    n = len(mirror.requests)
    load_mnist()  # cached now: no more requests
    assert len(mirror.requests) == n


@pytest.mark.parametrize("stall", ["stall", "stallmid"])
def test_a_stalled_mirror_times_out_and_the_next_one_is_tried(mirror, tmp_path, capsys, stall):
    cache = tmp_path / "cache"
    outcome = []

    def fetch():
        try:
            outcome.append(fetch_mnist(cache, mirrors=[mirror.url(stall), mirror.url("good")], sha256=mirror.sha256,
                                       progress=False, timeout=0.3))  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 (reported below)
            outcome.append(exc)

    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(timeout=60)  # the stalled server waits 120 s: only the client's timeout ends each wait
    assert not worker.is_alive(), "the download never timed out"
    assert outcome == [cache], outcome
    _assert_loads(cache, mirror.arrays)
    assert _files_in(cache) == sorted(f"{name}.gz" for name in FILES.values())  # no partial download left
    assert [r.split("/")[1] for r in mirror.requests] == [stall, "good"] * 4
    err = capsys.readouterr().err
    assert err.count("timed out") == 4 and err.count("trying the next mirror") == 4, err


def test_a_folder_with_some_of_the_files_gets_only_the_others(mirror, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    # One file already there compressed, one uncompressed (find_file accepts both); two missing.
    have = {FILES["train_images"] + ".gz": mirror.files[FILES["train_images"] + ".gz"],
            FILES["test_labels"]: idx_bytes(mirror.arrays["test_labels"])}  # fmt: skip
    for name, content in have.items():
        (cache / name).write_bytes(content)
    stamps = {name: (cache / name).stat().st_mtime_ns for name in have}
    fetch_mnist(cache, mirrors=[mirror.url("good")], sha256=mirror.sha256, progress=False, timeout=5)
    assert sorted(mirror.requests) == sorted(f"/good/{FILES[k]}.gz" for k in ("train_labels", "test_images"))
    for name, content in have.items():  # the files already there are not touched
        assert (cache / name).read_bytes() == content and (cache / name).stat().st_mtime_ns == stamps[name]
    assert _files_in(cache) == sorted([*have, FILES["train_labels"] + ".gz", FILES["test_images"] + ".gz"])
    _assert_loads(cache, mirror.arrays)


def test_real_mnist_through_a_local_mirror(mnist_dir, tmp_path):
    # The published hashes (data.SHA256) accept the real files when downloaded.
    server = Mirror()
    try:
        for name in FILES.values():
            path = data.find_file(mnist_dir, name)
            raw = path.read_bytes()
            server.files[f"{name}.gz"] = raw if path.name.endswith(".gz") else gzip.compress(raw, compresslevel=1)
        cache = fetch_mnist(tmp_path / "cache", mirrors=[server.url("good")], progress=False)
        assert len(load_mnist(cache, download=False)[1]) == 60000
    finally:
        server.shutdown()
        server.server_close()


# Debian's dataset-fashion-mnist package holds the four original Fashion-MNIST files: a local mirror.
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_mirror():
    if not all((FASHION_DIR / f"{name}.gz").is_file() for name in FILES.values()):
        pytest.skip(f"Fashion-MNIST not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    return FASHION_DIR.as_uri() + "/"


def test_fashion_mnist_is_downloaded_checked_and_cached_like_mnist(fashion_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("BACKPROP_XP_FASHION_DATA", raising=False)
    monkeypatch.setattr(data, "FASHION_MIRRORS", [fashion_mirror])
    x_train, y_train, x_test, y_test = load_mnist(dataset="fashion-mnist")  # downloads into the cache
    cache = tmp_path / "backprop_xp" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{name}.gz" for name in FILES.values())
    assert x_train.shape == (60_000, 784) and x_test.shape == (10_000, 784)
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    # the hashes checked are Fashion-MNIST's own: MNIST's table refuses these files
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):
        fetch_mnist(tmp_path / "wrong", mirrors=[fashion_mirror], sha256=data.SHA256)
    assert not (tmp_path / "backprop_xp" / "mnist").exists()  # the two data sets never share a folder
