"""Tests of dgmlab.datasets: canonical-file readers, verification, downloads, safety.

No test touches the network: downloads go to a local http.server in a thread or
to a closed local port. The real MNIST files are used when ../shared/data/mnist
exists beside the repository.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import struct
import tarfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from dgmlab import datasets
from dgmlab.datasets import (
    DATASETS,
    CorruptDataError,
    DataNotFoundError,
    DatasetSpec,
    DownloadError,
)

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """No md5s remembered from another test, and no DGMLAB_DATA from the caller."""
    datasets._MD5_CACHE.clear()
    monkeypatch.delenv(datasets.DATA_ENV, raising=False)
    yield
    datasets._MD5_CACHE.clear()


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def parse_idx_by_hand(path: Path) -> np.ndarray:
    """An independent IDX reader (uint8 only), so round trips are not circular."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def closed_port() -> int:
    """A local port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- root


def test_data_root_prefers_argument_then_env_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.data_root() == tmp_path / "home" / ".cache" / "dgmlab"
    monkeypatch.setenv("DGMLAB_DATA", str(tmp_path / "env"))
    assert datasets.data_root() == tmp_path / "env"
    assert datasets.data_root(tmp_path / "arg") == tmp_path / "arg"
    assert datasets.data_root("~/x") == tmp_path / "home" / "x"


# --------------------------------------------------------------------------- round trips


def test_fake_mnist_round_trip_exact(tmp_path):
    spec = datasets.write_fake_mnist(tmp_path, n_train=50, n_test=20, seed=3)
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout
    assert sorted(p.name for p in raw.iterdir()) == sorted(DATASETS["mnist"].files)
    assert spec.mirrors == () and spec.folders == DATASETS["mnist"].folders
    for name, md5 in spec.files.items():
        assert md5_of((raw / name).read_bytes()) == md5

    for split, prefix, n in (("train", "train", 50), ("test", "t10k", 20)):
        x, y = datasets.load(spec, split, root=tmp_path, download=False)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        want_x = parse_idx_by_hand(raw / f"{prefix}-images-idx3-ubyte.gz")
        want_y = parse_idx_by_hand(raw / f"{prefix}-labels-idx1-ubyte.gz")
        assert np.array_equal(x[:, 0].numpy(), want_x)
        assert np.array_equal(y.numpy(), want_y.astype(np.int64))
        assert set(y.tolist()) == set(range(10))  # every class present
        assert x.max() > 200 and x.min() == 0  # real pixel range, not all zeros


def test_fake_mnist_is_deterministic_and_seeded(tmp_path):
    a = datasets.write_fake_mnist(tmp_path / "a", n_train=30, n_test=10, seed=1)
    b = datasets.write_fake_mnist(tmp_path / "b", n_train=30, n_test=10, seed=1)
    c = datasets.write_fake_mnist(tmp_path / "c", n_train=30, n_test=10, seed=2)
    assert a.files == b.files
    assert a.files["train-images-idx3-ubyte.gz"] != c.files["train-images-idx3-ubyte.gz"]


def test_fake_mnist_is_learnable(tmp_path):
    # The fakes stand in for MNIST in CI, so a class-conditional model must have
    # something to learn: nearest class mean should classify held-out images.
    spec = datasets.write_fake_mnist(tmp_path, n_train=300, n_test=100)
    x, y = datasets.load(spec, "train", root=tmp_path)
    xt, yt = datasets.load(spec, "test", root=tmp_path)
    means = torch.stack([x[y == k].float().mean(0).flatten() for k in range(10)])
    pred = torch.cdist(xt.float().flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_fake_fashion_mnist_round_trip(tmp_path, monkeypatch):
    spec = datasets.write_fake_mnist(tmp_path, n_train=40, n_test=10, name="fashion-mnist")
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    assert not (tmp_path / "MNIST").exists()
    # The wrapper looks the spec up at call time, so the fake can stand in for the real one.
    monkeypatch.setitem(DATASETS, "fashion-mnist", spec)
    x, y = datasets.load_fashion_mnist("test", root=tmp_path, download=False)
    assert x.shape == (10, 1, 28, 28) and y.dtype == torch.int64
    want = parse_idx_by_hand(tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(x[:, 0].numpy(), want)


def _members_of(archive: Path) -> dict[str, dict]:
    """Unpickle the fake archive's members with plain pickle (we wrote them)."""
    out = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            out[Path(m.name).name] = pickle.loads(tar.extractfile(m).read())
    return out


def test_fake_cifar10_round_trip_exact(tmp_path, monkeypatch):
    spec = datasets.write_fake_cifar10(tmp_path, n_per_batch=12, seed=5)
    archive = tmp_path / "cifar-10-python.tar.gz"
    assert md5_of(archive.read_bytes()) == spec.files["cifar-10-python.tar.gz"]
    members = _members_of(archive)
    assert set(members) == set(DATASETS["cifar10"].members)
    assert set(members["data_batch_1"]) >= {b"data", b"labels"}  # canonical byte keys
    assert len(members["batches.meta"][b"label_names"]) == 10

    monkeypatch.setitem(DATASETS, "cifar10", spec)
    x, y = datasets.load_cifar10("train", root=tmp_path, download=False)
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (60,) and y.dtype == torch.int64
    batches = [members[f"data_batch_{i}"] for i in range(1, 6)]
    want_x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    want_y = np.concatenate([b[b"labels"] for b in batches])
    assert np.array_equal(x.numpy(), want_x) and np.array_equal(y.numpy(), want_y)

    xt, yt = datasets.load_cifar10("test", root=tmp_path, download=False)
    assert np.array_equal(xt.numpy(), members["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    assert yt.tolist() == members["test_batch"][b"labels"]
    # Extracted beside the archive, with nothing temporary left over.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar10_extracted_folder_alone_is_enough(tmp_path):
    spec = datasets.write_fake_cifar10(tmp_path, n_per_batch=5)
    x1, y1 = datasets.load(spec, "test", root=tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    x2, y2 = datasets.load(spec, "test", root=tmp_path, download=False)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("folder", ["MNIST/raw", "mnist", "MNIST", "."])
def test_mnist_found_in_every_accepted_folder(tmp_path, folder):
    spec = datasets.write_fake_mnist(tmp_path / "gen", n_train=20, n_test=10)
    target = tmp_path / "root" / folder
    shutil.copytree(tmp_path / "gen" / "MNIST" / "raw", target, dirs_exist_ok=True)
    x, y = datasets.load(spec, "train", root=tmp_path / "root", download=False)
    assert x.shape == (20, 1, 28, 28)
    assert np.array_equal(x[:, 0].numpy(), parse_idx_by_hand(target / "train-images-idx3-ubyte.gz"))


@pytest.mark.parametrize("folder", ["fashion-mnist", "FashionMNIST"])
def test_fashion_found_in_alternative_folders(tmp_path, folder):
    spec = datasets.write_fake_mnist(tmp_path / "gen", n_train=20, n_test=10, name="fashion-mnist")
    shutil.copytree(tmp_path / "gen" / "FashionMNIST" / "raw", tmp_path / "root" / folder)
    x, _ = datasets.load(spec, "test", root=tmp_path / "root", download=False)
    assert x.shape == (10, 1, 28, 28)


def test_good_copy_wins_over_a_corrupt_one(tmp_path):
    spec = datasets.write_fake_mnist(tmp_path, n_train=20, n_test=10)
    shutil.copytree(tmp_path / "MNIST" / "raw", tmp_path / "mnist")
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(b"junk")
    _, y = datasets.load(spec, "train", root=tmp_path, download=False)
    assert np.array_equal(y.numpy(), parse_idx_by_hand(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"))


def test_dgmlab_data_env_is_the_default_root(tmp_path, monkeypatch):
    spec = datasets.write_fake_mnist(tmp_path, n_train=20, n_test=10)
    monkeypatch.setitem(DATASETS, "mnist", spec)
    monkeypatch.setenv("DGMLAB_DATA", str(tmp_path))
    x, _ = datasets.load_mnist("train", download=False)
    assert x.shape == (20, 1, 28, 28)
    monkeypatch.setenv("DGMLAB_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DataNotFoundError, match="elsewhere"):
        datasets.load_mnist("train", download=False)


# --------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def real_root() -> Path:
    if not all((REAL_MNIST / n).is_file() for n in DATASETS["mnist"].files):
        pytest.skip(f"the real MNIST files are not in {REAL_MNIST}")
    return REAL_MNIST.parent  # found through ROOT/mnist/, as the course ships them


def test_registry_md5s_match_shipped_md5sums(real_root):
    listed = dict(line.split()[::-1] for line in (REAL_MNIST / "MD5SUMS").read_text().splitlines())
    assert listed == DATASETS["mnist"].files


def test_real_mnist(real_root):
    start = time.perf_counter()
    x, y = datasets.load_mnist("train", root=real_root, download=False)
    elapsed = time.perf_counter() - start
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert x.float().mean().item() == pytest.approx(33.318, abs=0.01)
    assert elapsed < 4.0, f"loading MNIST took {elapsed:.1f} s"

    xt, yt = datasets.load("mnist", "test", root=real_root, download=False)
    assert xt.shape == (10000, 1, 28, 28)
    assert yt.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert xt.float().mean().item() == pytest.approx(33.791, abs=0.01)


def test_real_mnist_is_not_fashion(real_root, tmp_path):
    # MNIST files where Fashion-MNIST is looked for are refused by md5, not parsed.
    shutil.copytree(REAL_MNIST, tmp_path / "FashionMNIST" / "raw")
    with pytest.raises(CorruptDataError, match="8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        datasets.load_fashion_mnist("train", root=tmp_path, download=False)


# --------------------------------------------------------------------------- md5


def test_corrupt_file_is_refused_with_path_and_md5s(tmp_path):
    spec = datasets.write_fake_mnist(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    for download in (False, True):  # a corrupt file is never silently replaced
        with pytest.raises(CorruptDataError) as err:
            datasets.load(spec, "train", root=tmp_path, download=download)
        msg = str(err.value)
        assert str(path) in msg
        assert spec.files["train-images-idx3-ubyte.gz"] in msg
        assert md5_of(bytes(data)) in msg
        assert "Delete it" in msg
    assert isinstance(err.value, ValueError)
    assert path.read_bytes() == bytes(data)


def test_registry_corrupt_message_names_the_mirror(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"not mnist")
    with pytest.raises(CorruptDataError, match="ossci-datasets.s3.amazonaws.com/mnist/t10k-images"):
        datasets.load_mnist("test", root=tmp_path, download=False)


def test_verified_md5s_are_cached(tmp_path, monkeypatch):
    spec = datasets.write_fake_mnist(tmp_path, n_train=20, n_test=10)
    calls = []
    real_md5sum = datasets.md5sum
    monkeypatch.setattr(datasets, "md5sum", lambda p, *a: calls.append(p) or real_md5sum(p, *a))
    datasets.load(spec, "train", root=tmp_path)
    assert len(calls) == 2
    datasets.load(spec, "train", root=tmp_path)
    assert len(calls) == 2  # nothing re-hashed
    # A rewritten file is hashed again (and here refused).
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptDataError):
        datasets.load(spec, "train", root=tmp_path)
    assert len(calls) == 3


def test_verify_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    assert datasets.md5sum(path) == md5_of(b"hello")
    assert datasets.verify_file(path, md5_of(b"hello")) == path
    with pytest.raises(CorruptDataError, match=md5_of(b"bye")):
        datasets.verify_file(path, md5_of(b"bye"))
    with pytest.raises(FileNotFoundError):
        datasets.verify_file(tmp_path / "missing", md5_of(b"x"))


def test_file_rewritten_in_place_with_its_mtime_restored_is_hashed_again(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    old = path.stat()
    datasets.verify_file(path, md5_of(b"hello"))  # now cached
    path.write_bytes(b"jello")  # same inode, same size...
    for _ in range(200):  # ...and, once ctime has moved on (a coarse clock may need a tick),
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # the same mtime
        if path.stat().st_ctime_ns != old.st_ctime_ns:
            break
        time.sleep(0.01)
    new = path.stat()
    assert (new.st_ino, new.st_size, new.st_mtime_ns) == (old.st_ino, old.st_size, old.st_mtime_ns)
    assert new.st_ctime_ns != old.st_ctime_ns
    with pytest.raises(CorruptDataError, match=md5_of(b"jello")):
        datasets.verify_file(path, md5_of(b"hello"))


# --------------------------------------------------------------------------- IDX parser


def _spec_for(tmp_path: Path, files: dict[str, bytes]) -> DatasetSpec:
    """Write ``files`` into MNIST/raw and return a spec whose md5s match them,
    so that the parser (not the md5 check) is what sees the damage."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (raw / name).write_bytes(data)
    return dataclasses.replace(
        DATASETS["mnist"], files={n: md5_of(d) for n, d in files.items()}, mirrors=()
    )


def _good_test_split(tmp_path: Path) -> dict[str, bytes]:
    datasets.write_fake_mnist(tmp_path / "gen", n_train=10, n_test=10)
    raw = tmp_path / "gen" / "MNIST" / "raw"
    return {n: (raw / n).read_bytes() for n in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def test_truncated_idx_payload_is_refused(tmp_path):
    files = _good_test_split(tmp_path)
    payload = gzip.decompress(files["t10k-images-idx3-ubyte.gz"])
    files["t10k-images-idx3-ubyte.gz"] = gzip.compress(payload[:-100])  # valid gzip, short IDX
    spec = _spec_for(tmp_path, files)
    with pytest.raises(CorruptDataError, match="truncated") as err:
        datasets.load(spec, "test", root=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value) and "(10, 28, 28)" in str(err.value)


def test_truncated_gzip_is_refused_clearly(tmp_path):
    files = _good_test_split(tmp_path)
    files["t10k-images-idx3-ubyte.gz"] = files["t10k-images-idx3-ubyte.gz"][:-50]
    spec = _spec_for(tmp_path, files)
    with pytest.raises(CorruptDataError, match="gzip") as err:
        datasets.load(spec, "test", root=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)
    assert not isinstance(err.value, EOFError)


def test_wrong_magic_is_refused(tmp_path):
    files = _good_test_split(tmp_path)
    payload = bytearray(gzip.decompress(files["t10k-labels-idx1-ubyte.gz"]))
    payload[0:2] = b"\x12\x34"
    files["t10k-labels-idx1-ubyte.gz"] = gzip.compress(bytes(payload))
    spec = _spec_for(tmp_path, files)
    with pytest.raises(CorruptDataError, match="0x12340801") as err:
        datasets.load(spec, "test", root=tmp_path)
    assert "magic number" in str(err.value)


def test_images_and_labels_must_agree(tmp_path):
    files = _good_test_split(tmp_path)
    datasets.write_idx(tmp_path / "l.gz", np.zeros(7, np.uint8))
    files["t10k-labels-idx1-ubyte.gz"] = (tmp_path / "l.gz").read_bytes()
    with pytest.raises(CorruptDataError, match="one label per image"):
        datasets.load(_spec_for(tmp_path, files), "test", root=tmp_path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_write_read_idx_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    path = datasets.write_idx(tmp_path / f"a.idx{suffix}", array)
    back = datasets.read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    assert np.array_equal(back, array)
    assert back.flags.writeable


def test_read_idx_raw_header_bytes(tmp_path):
    # The documented header of an MNIST label file, written by hand.
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 2, 1]))
    assert datasets.read_idx(path).tolist() == [7, 2, 1]
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(CorruptDataError, match="too short"):
        datasets.read_idx(path)


# --------------------------------------------------------------------------- offline


def test_missing_files_offline_message(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        datasets.load_mnist("train", root=tmp_path, download=False)
    msg = str(err.value)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        assert name in msg and DATASETS["mnist"].files[name] in msg
        assert f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and str(tmp_path / "mnist") in msg
    assert "DGMLAB_DATA" in msg
    assert isinstance(err.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_cifar_missing_offline_message(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        datasets.load_cifar10("test", root=tmp_path, download=False)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "c58f30108f718f92721af3b95e74349a" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "cifar-10-batches-py" in msg and "DGMLAB_DATA" in msg


def test_unreachable_mirrors_fail_fast_and_informatively(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/mnist/"
    spec = dataclasses.replace(DATASETS["mnist"], mirrors=(url,))
    start = time.perf_counter()
    with pytest.raises(DataNotFoundError) as err:
        datasets.load(spec, "test", root=tmp_path, download=True)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert url + "t10k-images-idx3-ubyte.gz" in msg
    assert "Downloading failed" in msg and "refused" in msg.lower()
    assert "9fb629c4189551a2d022fa330f9573f3" in msg and "DGMLAB_DATA" in msg
    assert all_files(tmp_path) == ["MNIST", "MNIST/raw"]  # no partial files


# --------------------------------------------------------------------------- downloads


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, mode)``; mode "drop" sends half the body."""

    def do_GET(self):
        body, mode = self.server.routes.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.routes
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_good_file(tmp_path, server):
    base, routes = server
    routes["/f.bin"] = (b"abc" * 1000, "ok")
    dest = datasets.download(f"{base}/f.bin", tmp_path / "d" / "f.bin", md5_of(b"abc" * 1000))
    assert dest.read_bytes() == b"abc" * 1000
    assert all_files(tmp_path / "d") == ["f.bin"]


def test_download_dropped_connection_leaves_nothing(tmp_path, server):
    base, routes = server
    body = os.urandom(200_000)
    routes["/f.bin"] = (body, "drop")
    with pytest.raises(DownloadError, match="f.bin"):
        datasets.download(f"{base}/f.bin", tmp_path / "f.bin", md5_of(body))
    assert all_files(tmp_path) == []


def test_download_wrong_md5_is_rejected_and_removed(tmp_path, server):
    base, routes = server
    routes["/f.bin"] = (b"evil bytes", "ok")
    with pytest.raises(CorruptDataError, match=md5_of(b"evil bytes")):
        datasets.download(f"{base}/f.bin", tmp_path / "f.bin", md5_of(b"good bytes"))
    assert all_files(tmp_path) == []


def test_download_http_error(tmp_path, server):
    base, _ = server
    with pytest.raises(DownloadError, match="404"):
        datasets.download(f"{base}/nothing", tmp_path / "f.bin", md5_of(b""))
    assert all_files(tmp_path) == []


def test_download_interrupted_by_ctrl_c_leaves_nothing(tmp_path, monkeypatch):
    class Response:
        headers = {"Content-Length": "1000"}
        reads = 0

        def read(self, n):
            Response.reads += 1
            if Response.reads == 1:
                return b"x" * 100
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(datasets, "_open_url", lambda url, timeout: Response())
    with pytest.raises(KeyboardInterrupt):
        datasets.download("http://example.invalid/f", tmp_path / "f", md5_of(b"x"))
    assert Response.reads == 2 and all_files(tmp_path) == []


def test_load_downloads_into_torchvision_layout_trying_each_mirror(tmp_path, server):
    base, routes = server
    spec = datasets.write_fake_mnist(tmp_path / "src", n_train=20, n_test=10)
    for name in spec.files:
        routes[f"/mnist/{name}"] = ((tmp_path / "src" / "MNIST" / "raw" / name).read_bytes(), "ok")
    dead = f"http://127.0.0.1:{closed_port()}/"
    spec = dataclasses.replace(spec, mirrors=(dead, f"{base}/mnist/"))
    x, y = datasets.load(spec, "test", root=tmp_path / "dst", download=True)
    got = tmp_path / "dst" / "MNIST" / "raw"
    assert all_files(got) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert np.array_equal(x[:, 0].numpy(), parse_idx_by_hand(got / "t10k-images-idx3-ubyte.gz"))
    assert x.shape == (10, 1, 28, 28) and y.shape == (10,)


def test_load_with_a_mirror_serving_bad_data(tmp_path, server):
    base, routes = server
    spec = datasets.write_fake_mnist(tmp_path / "src", n_train=20, n_test=10)
    for name in spec.files:
        routes[f"/m/{name}"] = (b"wrong", "ok")
    spec = dataclasses.replace(spec, mirrors=(f"{base}/m/",))
    with pytest.raises(DataNotFoundError, match=md5_of(b"wrong")):
        datasets.load(spec, "train", root=tmp_path / "dst")
    assert all_files(tmp_path / "dst") == ["MNIST", "MNIST/raw"]


def test_cifar_downloaded_then_extracted(tmp_path, server):
    base, routes = server
    spec = datasets.write_fake_cifar10(tmp_path / "src", n_per_batch=4)
    routes["/kriz/cifar-10-python.tar.gz"] = ((tmp_path / "src" / "cifar-10-python.tar.gz").read_bytes(), "ok")
    spec = dataclasses.replace(spec, mirrors=(f"{base}/kriz/",))
    x, y = datasets.load(spec, "train", root=tmp_path / "dst")
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    assert (tmp_path / "dst" / "cifar-10-python.tar.gz").is_file()
    assert (tmp_path / "dst" / "cifar-10-batches-py" / "batches.meta").is_file()


# --------------------------------------------------------------------------- tar safety


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (_info("../evil"), "'..'"),
        (_info("ok/../../evil"), "'..'"),
        (_info("/tmp/dgmlab-evil-absolute"), "absolute"),
        (_info("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (_info("link", tarfile.SYMTYPE, "../../outside"), "symbolic link"),
        (_info("hard", tarfile.LNKTYPE, "../outside"), "hard link"),
        (_info("dev", tarfile.CHRTYPE), "character device"),
        (_info("fifo", tarfile.FIFOTYPE), "FIFO"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-abs", "symlink-up", "hardlink", "chardev", "fifo"],
)
def test_safe_extract_refuses_escaping_members(tmp_path, member, why):
    archive = _tar_with(tmp_path / "a.tar.gz", (_info("fine.txt"), b"fine"), (member, b"evil"))
    dest = tmp_path / "box" / "out"
    with pytest.raises(CorruptDataError, match=why) as err:
        datasets.safe_extract(archive, dest)
    assert str(archive) in str(err.value)
    assert all_files(dest) == []  # checked before anything is written
    assert not (tmp_path / "box" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/dgmlab-evil-absolute").exists()


NO_LINKS = "the canonical archives hold no links; this archive is not the official file"
ONLY_FILES = "the canonical archives hold only files and folders; this archive is not the official file"


@pytest.mark.parametrize(
    "members, culprit, why",
    [
        # Each link looks harmless against the still-empty folder, but once
        # 'x' -> '.' exists, 'x/y' -> '..' is the folder's parent, and
        # 'x/y/evil' would be written there.
        (
            [_info("x", tarfile.SYMTYPE, "."), _info("x/y", tarfile.SYMTYPE, ".."), _info("x/y/evil")],
            "x",
            f"symbolic link to '.'.*{NO_LINKS}",
        ),
        (
            [_info("up", tarfile.SYMTYPE, "../.."), _info("up/evil")],
            "up",
            f"symbolic link to '../..'.*{NO_LINKS}",
        ),
        (
            [_info("d/alias", tarfile.SYMTYPE, "../fine.txt")],
            "d/alias",
            f"symbolic link to '../fine.txt'.*{NO_LINKS}",
        ),
        (
            [_info("hard", tarfile.LNKTYPE, "fine.txt")],
            "hard",
            f"hard link to 'fine.txt'.*{NO_LINKS}",
        ),
        ([_info("dev", tarfile.CHRTYPE)], "dev", f"character device.*{ONLY_FILES}"),
        ([_info("disk", tarfile.BLKTYPE)], "disk", f"block device.*{ONLY_FILES}"),
        ([_info("pipe", tarfile.FIFOTYPE)], "pipe", f"FIFO.*{ONLY_FILES}"),
        ([_info("../evil")], "../evil", "contains '..'"),
        ([_info("d/../../evil")], "d/../../evil", "contains '..'"),
    ],
    ids=["symlink-chain", "symlink-out-then-file", "symlink-inside", "hardlink-inside",
         "chardev", "blockdev", "fifo", "dotdot", "nested-dotdot"],
)
def test_safe_extract_refuses_every_link_and_special_member_before_writing(
    tmp_path, members, culprit, why
):
    archive = _tar_with(
        tmp_path / "a.tar.gz", (_info("fine.txt"), b"fine"), *[(m, b"evil") for m in members]
    )
    dest = tmp_path / "box" / "out"
    with pytest.raises(CorruptDataError, match=why) as err:
        datasets.safe_extract(archive, dest)
    message = str(err.value)
    assert str(archive) in message and f"member {culprit!r}" in message
    assert "truncated" not in message
    assert all_files(dest) == []  # refused before anything is written
    assert all_files(tmp_path / "box") == ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "box"]


def test_safe_extract_truncated_archive(tmp_path):
    spec = datasets.write_fake_cifar10(tmp_path, n_per_batch=3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(CorruptDataError, match="truncated or damaged"):
        datasets.safe_extract(archive, tmp_path / "out")
    del spec


def test_load_refuses_malicious_cifar_archive(tmp_path):
    archive = _tar_with(
        tmp_path / "cifar-10-python.tar.gz",
        (_info("cifar-10-batches-py/test_batch"), b"x"),
        (_info("../../pwned"), b"x"),
    )
    spec = dataclasses.replace(
        DATASETS["cifar10"], files={"cifar-10-python.tar.gz": md5_of(archive.read_bytes())}, mirrors=()
    )
    with pytest.raises(CorruptDataError, match="unsafe"):
        datasets.load(spec, "test", root=tmp_path)
    assert all_files(tmp_path) == ["cifar-10-python.tar.gz"]  # no folder, no temp dir
    assert not (tmp_path.parent / "pwned").exists()


def test_half_extracted_cifar_folder_is_rebuilt_from_archive(tmp_path):
    spec = datasets.write_fake_cifar10(tmp_path, n_per_batch=6)
    want_x, want_y = datasets.load(spec, "train", root=tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    # What an interrupted extraction leaves: one batch cut short, one missing.
    (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:500])
    (folder / "data_batch_5").unlink()
    x, y = datasets.load(spec, "train", root=tmp_path, download=False)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert md5_of((folder / "data_batch_2").read_bytes()) == spec.members["data_batch_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_half_extracted_cifar_folder_without_archive_is_refused(tmp_path):
    spec = datasets.write_fake_cifar10(tmp_path, n_per_batch=6)
    datasets.load(spec, "test", root=tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(CorruptDataError) as err:
        datasets.load(spec, "test", root=tmp_path, download=False)
    assert str(batch) in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)
    batch.unlink()
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        datasets.load(spec, "test", root=tmp_path, download=False)


# --------------------------------------------------------------------------- pickles


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=4))
    with pytest.raises(CorruptDataError, match=r"refusing to load (posix|nt|os)\.system") as err:
        datasets.read_cifar_batch(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_malicious_pickle_in_archive_is_refused_by_load(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(marker), b"labels": [0]})
    good = datasets.write_fake_cifar10(tmp_path / "gen", n_per_batch=2)
    members = {n: b"" for n in good.members}
    members["test_batch"] = evil
    for n in good.members:
        if n != "test_batch":
            members[n] = _members_bytes(tmp_path / "gen" / "cifar-10-python.tar.gz", n)
    archive = _tar_with(
        tmp_path / "cifar-10-python.tar.gz",
        *((_info(f"cifar-10-batches-py/{n}"), d) for n, d in members.items()),
    )
    spec = dataclasses.replace(
        good,
        files={"cifar-10-python.tar.gz": md5_of(archive.read_bytes())},
        members={n: md5_of(d) for n, d in members.items()},
    )
    with pytest.raises(CorruptDataError, match="refusing"):
        datasets.load(spec, "test", root=tmp_path)
    assert not marker.exists()


def _members_bytes(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(f"cifar-10-batches-py/{name}").read()


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 8-bit strings, like the canonical CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_str8(self, obj):
        obj = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8


def test_python2_style_batch_with_numpy_core_name(tmp_path):
    # Byte-for-byte the structure of the real batches: protocol 2, 8-bit string
    # keys and data, and NumPy 1's module name numpy.core.multiarray.
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump({"batch_label": "b1", "labels": [3, 1, 4, 1], "data": data})
    raw = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DeprecationWarning from touching numpy.core
        x, y = datasets.read_cifar_batch(path)
    assert np.array_equal(x, data) and y.tolist() == [3, 1, 4, 1] and y.dtype == np.int64


def test_cifar_batch_shape_and_label_checks(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(CorruptDataError, match=r"\(n, 3072\)"):
        datasets.read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(CorruptDataError, match=r"0\.\.9"):
        datasets.read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(CorruptDataError, match="2 integers"):
        datasets.read_cifar_batch(path)


# --------------------------------------------------------------------------- arguments


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mnist"):
        datasets.load("imagenet", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        datasets.load("mnist", "validation", root=tmp_path)
    with pytest.raises(ValueError, match="md5"):
        dataclasses.replace(DATASETS["mnist"], files={"a.gz": "nothex"})
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(DATASETS["mnist"], kind="png")
    with pytest.raises(TypeError, match="uint8"):
        datasets.write_idx(tmp_path / "x", np.zeros(3, np.int64))


def test_spec_is_frozen_and_copies_its_inputs():
    files = {"train-images-idx3-ubyte.gz": "0" * 32}
    spec = DatasetSpec("x", files, ["http://m/"], ["."], "idx")
    files["other"] = "1" * 32
    assert list(spec.files) == ["train-images-idx3-ubyte.gz"]
    assert spec.mirrors == ("http://m/",) and spec.folders == (".",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "y"


def test_binarized_mnist_is_a_fixed_bernoulli_draw_with_a_validation_split(tmp_path, monkeypatch):
    spec = datasets.write_fake_mnist(tmp_path, n_train=120, n_test=40)
    monkeypatch.setitem(datasets.DATASETS, "mnist", spec)
    train = datasets.binarized_mnist("train", tmp_path, validation=20)
    val = datasets.binarized_mnist("val", tmp_path, validation=20)
    test = datasets.binarized_mnist("test", tmp_path)
    assert train.shape == (100, 1, 28, 28) and val.shape == (20, 1, 28, 28) and test.shape == (40, 1, 28, 28)
    assert set(torch.cat([train, val, test]).unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(train, datasets.binarized_mnist("train", tmp_path, validation=20))  # same seed, same data
    # each pixel is on with probability intensity / 255
    images = datasets.load_mnist("train", tmp_path)[0][:100].double() / 255
    assert abs(train.double().mean().item() - images.mean().item()) < 0.01
    with pytest.raises(ValueError, match="split should be"):
        datasets.binarized_mnist("validation", tmp_path)


@pytest.mark.parametrize("split, validation, message", [
    ("validation", 10, "split should be one of 'train'"),
    ("test", 0, "validation should be positive"),
    ("train", -5, "validation should be positive"),
])
def test_binarized_mnist_checks_its_arguments_before_loading(tmp_path, split, validation, message):
    # no files under tmp_path and no download: a DataNotFoundError if it got that far
    with pytest.raises(ValueError, match=message):
        datasets.binarized_mnist(split, tmp_path, download=False, validation=validation)
    assert list(tmp_path.iterdir()) == []
