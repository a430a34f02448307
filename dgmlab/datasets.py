"""MNIST, Fashion-MNIST and CIFAR-10, read from their canonical files.

torchvision does not work with every torch build the course supports, so
``dgmlab`` reads the original files itself:

* (Fashion-)MNIST: four gzipped IDX files, e.g. ``train-images-idx3-ubyte.gz``;
* CIFAR-10: ``cifar-10-python.tar.gz``, holding pickled batches of 10 000 images.

Files are looked for in the folder layout torchvision uses, so existing
downloads are reused, and every file is checked against its published md5
before it is parsed. Downloads are atomic: a half-written file never carries
the final name. Typical use::

    from dgmlab import datasets
    x, y = datasets.load_mnist("train")       # (60000, 1, 28, 28) uint8, (60000,) int64

The data folder is ``root`` if given, else ``$DGMLAB_DATA``, else
``~/.cache/dgmlab``. For tests and CI, :func:`write_fake_mnist` and
:func:`write_fake_cifar10` write tiny files in the same canonical formats and
return a :class:`DatasetSpec` that :func:`load` accepts in place of a name.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .files import atomic_open, atomic_write

from .validate import check_choice, check_positive_int

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "DATA_ENV",
    "CorruptDataError",
    "DataNotFoundError",
    "DownloadError",
    "data_root",
    "load",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "md5sum",
    "verify_file",
    "download",
    "safe_extract",
    "read_idx",
    "read_cifar_batch",
    "write_idx",
    "write_fake_mnist",
    "write_fake_cifar10",
    "binarized_mnist",
]

DATA_ENV = "DGMLAB_DATA"
DEFAULT_ROOT = Path("~/.cache/dgmlab")
# Per socket operation, not per file: enough for a slow mirror to answer, short
# enough that an offline machine gives up within seconds.
DEFAULT_TIMEOUT = 5.0
_KINDS = ("idx", "cifar10")
_SPLITS = ("train", "test")


# --------------------------------------------------------------------------- errors


class CorruptDataError(ValueError):
    """A data file exists but its content is wrong (md5 mismatch, truncated, unsafe)."""


class DataNotFoundError(FileNotFoundError):
    """The files a dataset needs are not on disk and could not be downloaded."""


class DownloadError(OSError):
    """Fetching a URL failed (unreachable, HTTP error, connection dropped)."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files live, what they are called and their md5s.

    ``files`` maps each file name to its md5; ``mirrors`` are base URLs tried in
    turn (``mirror + name``); ``folders`` are sub-folders of the data root to
    search, the first being where downloads go. ``kind`` is ``"idx"``
    ((Fashion-)MNIST) or ``"cifar10"``. A ``cifar10`` spec's single file is the
    archive; ``extracted`` names the folder it unpacks to and ``members`` the
    md5 of each file in that folder.
    """

    name: str
    files: Mapping[str, str]
    mirrors: tuple[str, ...]
    folders: tuple[str, ...]
    kind: str
    extracted: str = ""
    members: Mapping[str, str] = field(default_factory=dict)
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", _KINDS)
        # Plain copies, so that a caller's later edits of its own dicts do not
        # change a spec, and tuples stay tuples when lists are passed.
        object.__setattr__(self, "files", dict(self.files))
        object.__setattr__(self, "members", dict(self.members))
        object.__setattr__(self, "mirrors", tuple(self.mirrors))
        object.__setattr__(self, "folders", tuple(self.folders))
        if not self.files:
            raise ValueError(f"DatasetSpec {self.name!r} lists no files.")
        if not self.folders:
            raise ValueError(
                f"DatasetSpec {self.name!r} has no folders; use ('.',) for the data root itself."
            )
        for fname, md5 in {**self.files, **self.members}.items():
            is_hex = isinstance(md5, str) and all(c in "0123456789abcdef" for c in md5)
            if not (is_hex and len(md5) == 32):
                raise ValueError(
                    f"DatasetSpec {self.name!r}: the md5 of {fname} should be 32 lowercase "
                    f"hex digits, got {md5!r}."
                )
        if self.kind == "cifar10" and (len(self.files) != 1 or not self.extracted or not self.members):
            raise ValueError(
                f"DatasetSpec {self.name!r}: a 'cifar10' spec needs exactly one file (the "
                "archive), the name of the folder it extracts to and the md5s of its members."
            )


_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
_CIFAR10_MEMBERS = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

# The md5s are the published ones (also torchvision's). The first folder of each
# spec is torchvision's, so a torchvision download is found and ours goes there.
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="MNIST",
        files=_MNIST_FILES,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        folders=("MNIST/raw", "mnist", "MNIST", "."),
        kind="idx",
    ),
    "fashion-mnist": DatasetSpec(
        name="Fashion-MNIST",
        files=_FASHION_FILES,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        folders=("FashionMNIST/raw", "fashion-mnist", "FashionMNIST", "."),
        kind="idx",
    ),
    "cifar10": DatasetSpec(
        name="CIFAR-10",
        files={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        folders=(".", "cifar10"),
        kind="cifar10",
        extracted="cifar-10-batches-py",
        members=_CIFAR10_MEMBERS,
    ),
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$DGMLAB_DATA``, else ``~/.cache/dgmlab``."""
    if root is None:
        root = os.environ.get(DATA_ENV) or DEFAULT_ROOT
    return Path(root).expanduser().absolute()


# --------------------------------------------------------------------------- md5


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The md5 of a file as 32 hex digits, read in chunks so big files fit in memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# md5s already computed, keyed by what changes when a file is rewritten, so that
# loading the same dataset twice in a notebook does not hash it twice.
# ctime is in the key because mtime alone can be set back (os.utime, touch -d,
# rsync -t) after a same-size rewrite; ctime changes on any write or metadata
# change and cannot be set by a user.
_MD5_CACHE: dict[tuple[str, int, int, int, int], str] = {}


def _cache_key(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _cached_md5(path: Path) -> str:
    key = _cache_key(path)
    if key not in _MD5_CACHE:
        _MD5_CACHE[key] = md5sum(path)
    return _MD5_CACHE[key]


def verify_file(path: str | os.PathLike, md5: str, *, hint: str = "") -> Path:
    """Check that ``path`` exists and has md5 ``md5``; return it as a Path.

    Raises :class:`FileNotFoundError` if it is missing and
    :class:`CorruptDataError` (naming the file and both md5s) if it differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a file with md5 {md5}).")
    found = _cached_md5(path)
    if found != md5.lower():
        todo = hint or (
            "Delete it and download it again (e.g. with load(..., download=True)), "
            "or fetch it again from its mirror."
        )
        raise CorruptDataError(
            f"{path} is corrupt or not the expected file: its md5 is {found}, but it should be "
            f"{md5}. It may be an interrupted download or another dataset's file. {todo}"
        )
    return path


# --------------------------------------------------------------------------- download


def _open_url(url: str, timeout: float):
    """Open ``url`` for reading (a seam the tests replace to simulate failures)."""
    request = urllib.request.Request(url, headers={"User-Agent": "dgmlab"})
    return urllib.request.urlopen(request, timeout=timeout)


def download(
    url: str,
    dest: str | os.PathLike,
    md5: str,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically and check its md5; return ``dest``.

    The bytes go to a temporary file beside ``dest`` that is renamed only once
    the md5 matches; on any failure, Ctrl-C included, it is deleted, so a file
    named ``dest`` is always complete. A network failure raises
    :class:`DownloadError`, a wrong md5 :class:`CorruptDataError`.
    """
    dest = Path(dest)
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    # atomic_open deletes the partial file on any failure, Ctrl-C included
    with atomic_open(dest, "wb", suffix=".part") as out:
        try:
            response = _open_url(url, timeout)
        except Exception as err:  # URLError, timeouts, refused connections...
            raise DownloadError(f"could not open {url}: {err}") from err
        with response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress_bar(progress, total, f"Downloading {url}")
            try:
                while True:
                    try:
                        chunk = response.read(1 << 16)
                    except Exception as err:  # IncompleteRead, reset, timeout
                        raise DownloadError(
                            f"the connection to {url} failed after {received} bytes: {err}"
                        ) from err
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        if total is not None and received != total:
            raise DownloadError(
                f"the connection to {url} closed after {received} of {total} bytes."
            )
        found = digest.hexdigest()
        if found != md5.lower():
            raise CorruptDataError(
                f"{url} sent a file with md5 {found}, but {dest.name} should have md5 {md5}; "
                "it was discarded. The mirror may be serving a different or damaged file: "
                "try another mirror or download it by hand."
            )
    _MD5_CACHE[_cache_key(dest)] = md5.lower()  # just hashed while streaming
    return dest


def _progress_bar(enabled: bool, total: int | None, desc: str):
    if not enabled:
        return None
    from tqdm.std import tqdm  # the text bar, as in train.py; imported lazily

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def _url(mirror: str, filename: str) -> str:
    return mirror.rstrip("/") + "/" + filename


# --------------------------------------------------------------------------- tar


def _is_within(base: Path, target: Path) -> bool:
    base, target = base.resolve(), target.resolve()
    return target == base or base in target.parents


def safe_extract(tar_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a tar archive of plain files and folders into ``dest``.

    Every member is checked before anything is written: an absolute path, a
    ``..``, any link (symbolic or hard, wherever it points) or a device or FIFO
    makes the whole archive be refused with :class:`CorruptDataError`. The
    canonical archives hold none of these, and refusing every link means no
    member can be written through one (a chain of links that each look harmless
    against the still-empty folder can otherwise reach outside it).
    """
    tar_path, dest = Path(tar_path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, dest, tar_path)
            # Python's own 'data' filter as a second line of defence, where available.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(dest, members=members)
    except CorruptDataError:
        raise
    except _TAR_FILTER_ERRORS as err:  # pragma: no cover - _check_member refuses these first
        raise CorruptDataError(
            f"{tar_path} is unsafe and was not fully extracted ({type(err).__name__}: {err}). "
            "Delete it and download it again from the official mirror."
        ) from err
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise CorruptDataError(
            f"{tar_path} could not be extracted ({type(err).__name__}: {err}). The archive is "
            "probably truncated or damaged: delete it and download it again."
        ) from err
    return dest


# Raised by Python's 'data' filter (3.11.4+); an empty tuple catches nothing.
_TAR_FILTER_ERRORS = getattr(tarfile, "FilterError", ())

_NOT_OFFICIAL = "this archive is not the official file"
_SPECIAL_KINDS = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO (named pipe)",
}


def _check_member(m: tarfile.TarInfo, dest: Path, tar_path: Path) -> None:
    def refuse(why: str) -> None:
        raise CorruptDataError(
            f"{tar_path} is unsafe and was not extracted: member {m.name!r} {why}. "
            "Delete the file and download it again from the official mirror."
        )

    name = m.name
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        refuse("has an absolute path")
    if ".." in Path(name.replace("\\", "/")).parts:
        refuse("contains '..'")
    if not _is_within(dest, dest / name):
        refuse("would be written outside the target folder")
    if m.issym() or m.islnk():
        kind = "symbolic" if m.issym() else "hard"
        refuse(f"is a {kind} link to {m.linkname!r}: the canonical archives hold no links; "
               f"{_NOT_OFFICIAL}")
    if not (m.isfile() or m.isdir()):
        kind = _SPECIAL_KINDS.get(m.type, f"of tar type {m.type!r}")
        refuse(f"is {kind}: the canonical archives hold only files and folders; {_NOT_OFFICIAL}")


# --------------------------------------------------------------------------- parsers

# IDX type codes (third byte of the magic number) -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":  # gzip's magic bytes; the IDX files also exist uncompressed
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise CorruptDataError(
            f"{path} is not a valid gzip file ({type(err).__name__}: {err}). It is probably "
            "truncated by an interrupted download: delete it and download it again."
        ) from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw), e.g. MNIST images ``(N, 28, 28)`` uint8.

    The header is checked against the payload, so a truncated or foreign file
    gives a :class:`CorruptDataError` naming it rather than garbage.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    todo = "Delete it and download it again."
    if len(data) < 4:
        raise CorruptDataError(f"{path} is too short ({len(data)} bytes) to be an IDX file. {todo}")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        magic = struct.unpack(">I", data[:4])[0]
        raise CorruptDataError(
            f"{path} is not an IDX file: its magic number is 0x{magic:08X}, but IDX files start "
            "with two zero bytes, a type code (0x08 for uint8 ... 0x0E for float64) and the number "
            f"of dimensions, e.g. 0x00000803 for MNIST images. Is it the right file? {todo}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(
            f"{path} is truncated: its header announces {ndim} dimensions but the file ends "
            f"after {len(data)} bytes. {todo}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        what = "truncated" if payload < expected else "longer than its header says"
        raise CorruptDataError(
            f"{path} is {what}: its header announces shape {shape} of {dtype.name} "
            f"({expected} bytes) but {payload} bytes follow. {todo}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # A writable, native-endian copy: torch.from_numpy refuses read-only buffers.
    return array.astype(dtype.newbyteorder("="), copy=True)


def _numpy_reconstruct():
    # NumPy 2 moved numpy.core to numpy._core; importing the old name warns.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild NumPy arrays and nothing else.

    A pickle can name any importable callable (``os.system`` ...) and have it
    called; the canonical CIFAR batches only need these three.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str):
        getter = self._ALLOWED.get((module, name))
        if getter is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch only contains NumPy arrays, "
                "lists and strings"
            )
        return getter()


def _load_pickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            # 'bytes' keeps the Python 2 strings of the canonical files as bytes,
            # which is what NumPy needs to rebuild the arrays.
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise CorruptDataError(
            f"{path} was refused: {err}. The file may be malicious or is not a CIFAR batch; "
            "delete it and download the archive again from the official mirror."
        ) from err
    except Exception as err:  # EOFError, ValueError, ... from a damaged pickle
        raise CorruptDataError(
            f"{path} could not be unpickled ({type(err).__name__}: {err}). It is probably "
            "truncated or damaged: delete it and extract or download the archive again."
        ) from err


def _key(d: dict, key: str):
    """``d[key]`` whether the pickle stored the key as bytes (Python 2) or str."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar_batch(
    path: str | os.PathLike, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR batch: data ``(n, 3072)`` uint8 and labels ``(n,)`` int64.

    Uses a restricted unpickler, so a malicious file cannot run code.
    """
    path = Path(path)
    batch = _load_pickle(path)
    todo = "Delete it and extract or download the archive again."
    if not isinstance(batch, dict):
        raise CorruptDataError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict. {todo}")
    data, labels = _key(batch, "data"), _key(batch, "labels")
    is_array = isinstance(data, np.ndarray)
    if not (is_array and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        desc = f"{data.dtype} array of shape {data.shape}" if is_array else repr(type(data))
        raise CorruptDataError(
            f"{path}: b'data' should be a uint8 array of shape (n, 3072) (n 32x32 RGB images), "
            f"got {desc}. {todo}"
        )
    if labels is None:
        raise CorruptDataError(f"{path} has no b'labels' entry. {todo}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDataError(
            f"{path}: b'labels' should hold {data.shape[0]} integers (one per image), "
            f"got shape {labels.shape} of {labels.dtype}. {todo}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataError(
            f"{path}: labels should lie in 0..{num_classes - 1}, "
            f"got {labels.min()}..{labels.max()}. {todo}"
        )
    return data, labels.astype(np.int64)


# --------------------------------------------------------------------------- loading


def _resolve_spec(name_or_spec: str | DatasetSpec) -> DatasetSpec:
    if isinstance(name_or_spec, DatasetSpec):
        return name_or_spec
    if not isinstance(name_or_spec, str):
        raise TypeError(
            f"name_or_spec should be a dataset name or a DatasetSpec, got {type(name_or_spec).__name__}."
        )
    key = name_or_spec.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASETS:  # looked up now, so a test can swap in a fake spec
        raise ValueError(
            f"Unknown dataset {name_or_spec!r}; choose one of {', '.join(sorted(DATASETS))} "
            "or pass a DatasetSpec."
        )
    return DATASETS[key]


def _locate(spec: DatasetSpec, filename: str, base: Path) -> Path | None:
    """The first verified copy of ``filename`` in the spec's folders, or None if absent.

    A copy with the wrong md5 is skipped in favour of a good one elsewhere; if
    only bad copies exist, the first is reported as corrupt.
    """
    md5 = spec.files[filename]
    hint = "Delete it and load again with download=True" + (
        f", or fetch it again from {_url(spec.mirrors[0], filename)}." if spec.mirrors else "."
    )
    first_error: CorruptDataError | None = None
    for folder in spec.folders:
        path = base / folder / filename
        if not path.is_file():
            continue
        try:
            return verify_file(path, md5, hint=hint)
        except CorruptDataError as err:
            first_error = first_error or err
    if first_error is not None:
        raise first_error
    return None


def _missing_message(
    spec: DatasetSpec, missing: list[str], base: Path, split: str, errors: list[str]
) -> str:
    folders = [base / f for f in spec.folders]
    lines = [
        f"{spec.name} ({split} split): {len(missing)} file(s) not found under {base}:",
        *(f"  {name}  (md5 {spec.files[name]})" for name in missing),
    ]
    if spec.kind == "cifar10":
        lines.append(
            f"  (an already extracted '{spec.extracted}/' folder beside it is accepted instead)"
        )
    lines.append("Looked in these folders (downloads go to the first):")
    lines += [f"  {f}" for f in folders]
    if spec.mirrors:
        lines.append(f"Download them into {folders[0]} from one of these mirrors:")
        lines += [f"  {_url(m, name)}" for name in missing for m in spec.mirrors]
        lines.append("and check them with `md5sum`, or call load(..., download=True) with internet access.")
    else:
        lines.append("This dataset has no download mirror: write or copy the files there yourself.")
    current = os.environ.get(DATA_ENV)
    lines.append(
        f"To use another data folder, pass root=... or set the environment variable {DATA_ENV} "
        f"({'currently ' + repr(current) if current is not None else 'currently unset'})."
    )
    if errors:
        lines.append("Downloading failed:")
        lines += [f"  {e}" for e in errors]
    return "\n".join(lines)


def _fetch(
    spec: DatasetSpec, names: list[str], base: Path, download_ok: bool, split: str
) -> dict[str, Path]:
    """Verified paths of ``names``, downloading the missing ones if allowed."""
    found: dict[str, Path] = {}
    missing = []
    for name in names:
        path = _locate(spec, name, base)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if not missing:
        return found
    if not download_ok or not spec.mirrors:
        raise DataNotFoundError(_missing_message(spec, missing, base, split, []))
    target = base / spec.folders[0]
    for name in missing:
        errors = []
        for mirror in spec.mirrors:
            url = _url(mirror, name)
            try:
                found[name] = download(url, target / name, spec.files[name])
                break
            except (DownloadError, CorruptDataError) as err:
                errors.append(str(err))  # each message names its URL
        else:
            # Stop at the first file no mirror could deliver: on an offline
            # machine the others would fail the same way, only slower.
            still_missing = [n for n in missing if n not in found]
            raise DataNotFoundError(_missing_message(spec, still_missing, base, split, errors))
    return found


def _idx_names(spec: DatasetSpec, split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    def pick(part: str) -> str:
        names = [n for n in spec.files if n.startswith(f"{prefix}-{part}")]
        if len(names) != 1:
            raise ValueError(
                f"DatasetSpec {spec.name!r} should list exactly one file starting with "
                f"'{prefix}-{part}' for the {split} split, got {names}."
            )
        return names[0]
    return pick("images"), pick("labels")


def _load_idx(
    spec: DatasetSpec, split: str, base: Path, download_ok: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images_name, labels_name = _idx_names(spec, split)
    paths = _fetch(spec, [images_name, labels_name], base, download_ok, split)
    images, labels = read_idx(paths[images_name]), read_idx(paths[labels_name])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise CorruptDataError(
            f"{paths[images_name]} should hold uint8 images of shape (N, H, W), "
            f"got {images.dtype} of shape {images.shape}."
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise CorruptDataError(
            f"{paths[labels_name]} should hold one label per image ({images.shape[0]}), "
            f"got shape {labels.shape}; are the images and labels from the same split?"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise CorruptDataError(
            f"{paths[labels_name]}: labels should lie in 0..{spec.num_classes - 1}, "
            f"got {labels.min()}..{labels.max()}."
        )
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _cifar_members(spec: DatasetSpec, split: str) -> list[str]:
    if split == "train":
        return sorted(n for n in spec.members if n.startswith("data_batch"))
    return [n for n in spec.members if n.startswith("test_batch")]




def _extract_cifar(spec: DatasetSpec, archive: Path) -> Path:
    """Extract ``archive`` beside itself so that a partial result is never visible.

    Extraction goes to a temporary folder; only once every member's md5 matches
    is the folder renamed into place (or, if an incomplete one already exists,
    its files replaced one by one, each atomically).
    """
    target = archive.parent / spec.extracted
    tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=f".{spec.extracted}.", suffix=".tmp"))
    try:
        safe_extract(archive, tmp)
        extracted = tmp / spec.extracted
        for name, md5 in spec.members.items():
            path = extracted / name
            if not path.is_file():
                raise CorruptDataError(
                    f"{archive} does not contain {spec.extracted}/{name}; it is not the expected "
                    "archive. Delete it and download it again."
                )
            damaged = f"The archive {archive} is damaged: delete it and download it again."
            verify_file(path, md5, hint=damaged)
        if not target.exists():
            try:
                os.replace(extracted, target)
                return target
            except OSError:
                pass  # another process got there first: fall through to per-file
        target.mkdir(parents=True, exist_ok=True)
        for name in spec.members:
            os.replace(extracted / name, target / name)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cifar(
    spec: DatasetSpec, split: str, base: Path, download_ok: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    needed = _cifar_members(spec, split)
    if not needed:
        raise ValueError(f"DatasetSpec {spec.name!r} lists no member files for the {split} split.")
    # An extracted folder is used only if complete and verified; otherwise it is
    # (re)built from the archive, so a half-extracted folder is never trusted.
    folder, corrupt = None, None
    for sub in spec.folders:
        candidate = base / sub / spec.extracted
        if not all((candidate / n).is_file() for n in needed):
            continue
        try:
            for n in needed:
                verify_file(candidate / n, spec.members[n])
            folder = candidate
            break
        except CorruptDataError as err:
            corrupt = corrupt or err
    if folder is None:
        (archive_name,) = spec.files
        try:
            archive = _fetch(spec, [archive_name], base, download_ok, split)[archive_name]
        except DataNotFoundError as err:
            if corrupt is None:
                raise
            raise CorruptDataError(
                f"{corrupt}\nThere is no archive to extract it again from:\n{err}"
            ) from err
        folder = _extract_cifar(spec, archive)
    parts = [read_cifar_batch(folder / n, spec.num_classes) for n in needed]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    # Each row stores the red, green and blue 32x32 planes in turn: channel-first.
    images = data.reshape(-1, 3, 32, 32)
    return torch.from_numpy(images), torch.from_numpy(labels)


def load(
    name_or_spec: str | DatasetSpec,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as ``(images, labels)``: uint8 ``(N, C, H, W)`` and int64 ``(N,)``.

    ``name_or_spec`` is ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or a
    :class:`DatasetSpec`. Files are verified by md5 before parsing; missing ones
    are downloaded when ``download`` is true, else :class:`DataNotFoundError`
    says where to put them.
    """
    spec = _resolve_spec(name_or_spec)
    check_choice(split, "split", _SPLITS)
    base = data_root(root)
    if spec.kind == "idx":
        return _load_idx(spec, split, base, download)
    return _load_cifar(spec, split, base, download)


def load_mnist(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits: ``(N, 1, 28, 28)`` uint8 and ``(N,)`` int64; N = 60000 / 10000."""
    return load("mnist", split, root, download)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST clothes: ``(N, 1, 28, 28)`` uint8 and ``(N,)`` int64; N = 60000 / 10000."""
    return load("fashion-mnist", split, root, download)


def load_cifar10(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 photos: ``(N, 3, 32, 32)`` uint8 RGB and ``(N,)`` int64; N = 50000 / 10000."""
    return load("cifar10", split, root, download)


# --------------------------------------------------------------------------- fake files


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped if ``path`` ends in ``.gz``), atomically."""
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise TypeError(
            f"IDX files hold uint8, int8, int16, int32, float32 or float64, got {array.dtype}; "
            "convert the array first (e.g. array.astype(np.uint8))."
        )
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX files hold arrays of 1 to 255 dimensions, got {array.ndim}.")
    code = _IDX_CODES[native]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        # mtime=0 keeps the bytes, hence the md5, the same from run to run.
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    atomic_write(path, payload)
    return path


def _fake_images(
    labels: np.ndarray, rng: np.random.Generator, size: int, colour: bool
) -> np.ndarray:
    """Noisy class-dependent blobs, ``(n, C, size, size)`` uint8.

    Class k is a bright blob at the k-th of 10 positions around the centre (and,
    in colour, of the k-th hue), so that a classifier or a class-conditional
    model has something to learn.
    """
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = 2 * np.pi * labels / 10
    radius = size * 0.25
    cy = size / 2 + radius * np.sin(angle) + rng.normal(0, 1, n)
    cx = size / 2 + radius * np.cos(angle) + rng.normal(0, 1, n)
    dist2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    blob = np.exp(-dist2 / (2 * (size / 9) ** 2))  # (n, size, size), peak 1
    if colour:
        hue = np.stack([np.cos(angle), np.cos(angle - 2.1), np.cos(angle + 2.1)], 1) * 0.4 + 0.6
        img = blob[:, None] * hue[:, :, None, None] * 230
    else:
        img = blob[:, None] * 255
    img = img + rng.normal(0, 12, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % 10).astype(np.uint8)


def write_fake_mnist(
    root: str | os.PathLike,
    n_train: int = 600,
    n_test: int = 100,
    seed: int = 0,
    name: str = "mnist",
) -> DatasetSpec:
    """Write small, learnable MNIST-format files under ``root`` (torchvision layout).

    Images are class-dependent blobs (see :func:`_fake_images`). Returns a spec
    of the same dataset with the fake files' md5s and no mirrors, for :func:`load`.
    ``name`` is ``"mnist"`` or ``"fashion-mnist"``.
    """
    n_train = check_positive_int(n_train, "n_train")
    n_test = check_positive_int(n_test, "n_test")
    real = _resolve_spec(name)
    if real.kind != "idx":
        raise ValueError(f"write_fake_mnist writes IDX datasets; {name!r} is a {real.kind} dataset.")
    rng = np.random.default_rng(seed)
    folder = data_root(root) / real.folders[0]
    md5s = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _balanced_labels(n, rng)
        images = _fake_images(labels, rng, 28, colour=False)[:, 0]
        images_name, labels_name = _idx_names(real, split)
        md5s[images_name] = md5sum(write_idx(folder / images_name, images))
        md5s[labels_name] = md5sum(write_idx(folder / labels_name, labels))
    name = f"{real.name.removesuffix(' (fake)')} (fake)"
    return dataclasses.replace(real, name=name, files=md5s, mirrors=())


def _pickle_batch(obj: dict) -> bytes:
    # Protocol 4 stores bytes natively; arrays pickle through numpy's
    # _reconstruct, which the restricted unpickler allows.
    return pickle.dumps(obj, protocol=4)


def write_fake_cifar10(
    root: str | os.PathLike, n_per_batch: int = 100, seed: int = 0
) -> DatasetSpec:
    """Write a small ``cifar-10-python.tar.gz`` in the canonical format under ``root``.

    Five training batches and a test batch of ``n_per_batch`` images each
    (pickled dicts with ``b"data"`` ``(n, 3072)`` uint8 and ``b"labels"``), plus
    ``batches.meta``. Returns a spec with the fake md5s and no mirrors.
    """
    n = check_positive_int(n_per_batch, "n_per_batch")
    real = _resolve_spec("cifar10")
    rng = np.random.default_rng(seed)
    label_names = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
    members: dict[str, bytes] = {}
    for i, member in enumerate(_cifar_members(real, "train") + _cifar_members(real, "test")):
        labels = _balanced_labels(n, rng).astype(np.int64)
        images = _fake_images(labels, rng, 32, colour=True)
        members[member] = _pickle_batch({
            b"batch_label": f"fake batch {i + 1}".encode(),
            b"labels": labels.tolist(),
            b"data": images.reshape(n, 3072),
            b"filenames": [f"fake_{i}_{j}.png".encode() for j in range(n)],
        })
    members["batches.meta"] = _pickle_batch({
        b"num_cases_per_batch": n,
        b"label_names": [s.encode() for s in label_names],
        b"num_vis": 3072,
    })
    buffer = io.BytesIO()
    # Fixed gzip and tar timestamps keep the archive's md5 reproducible.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, payload in members.items():
                info = tarfile.TarInfo(f"{real.extracted}/{name}")
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
    (archive_name,) = real.files
    archive = data_root(root) / real.folders[0] / archive_name
    atomic_write(archive, buffer.getvalue())
    return dataclasses.replace(
        real,
        name=f"{real.name.removesuffix(' (fake)')} (fake)",
        files={archive_name: md5sum(archive)},
        members={
            name: hashlib.md5(p, usedforsecurity=False).hexdigest() for name, p in members.items()
        },
        mirrors=(),
    )



def binarized_mnist(split: str = "train", root: str | os.PathLike | None = None, *, download: bool = True,
                    validation: int = 10_000) -> torch.Tensor:
    """Binarized MNIST, the usual way: each pixel ~ Bernoulli(intensity / 255), with a fixed seed.

    ``split``: ``"train"`` (the first 60,000 − ``validation`` training images),
    ``"val"`` (the last ``validation`` ones) or ``"test"``. The seeds (0 for
    the training file, 1 for the test file) make the binary data identical on
    every machine. Returns float32 0/1 images (N, 1, 28, 28).
    """
    from .embedded import bernoulli_binarize

    check_choice(split, "split", ("train", "val", "test"))
    validation = check_positive_int(validation, "validation")  # checked for "test" too
    images, _ = load_mnist("test" if split == "test" else "train", root=root, download=download)
    binary = bernoulli_binarize(images, seed=1 if split == "test" else 0)
    if split == "test":
        return binary
    if not 0 < validation < len(binary):
        raise ValueError(f"validation should be between 1 and {len(binary) - 1}, got {validation}.")
    return binary[: len(binary) - validation] if split == "train" else binary[len(binary) - validation:]
