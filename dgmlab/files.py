"""Writing files so that nothing is ever half-written.

Every file ``dgmlab`` writes (checkpoints, downloads, notebooks, benchmark
results, pages) goes through :func:`atomic_open`: the bytes go to a temporary
file in the same folder, are flushed to disk, and the file is renamed over the
target in one step, so a reader sees the old file or the new one, never a
fragment, even if the writer is killed half way. A writer killed half way
leaves its temporary file behind (nothing can run after SIGKILL); its name
carries the writer's process id, so :func:`remove_stale_temporaries` can tell
it from a write still in progress and delete it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write", "remove_stale_temporaries"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, private: bool = False,
                suffix: str = ".tmp") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically.

    Any exception in the ``with`` block (Ctrl-C included) deletes the temporary
    file and leaves an existing ``path`` untouched. The new file gets the usual
    permissions (``0666`` minus the umask), or ``0600`` with ``private=True``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode should be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path, os.getpid()), suffix=suffix)
    try:
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, private: bool = False) -> Path:
    """Write ``data`` (bytes or text) to ``path`` atomically; return the path."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb", private=private) as f:
        f.write(data)
    return Path(path)


def _temporary_prefix(path: Path, pid: int) -> str:
    return f".{path.name}.pid{pid}."


def remove_stale_temporaries(path: str | os.PathLike, suffix: str = ".tmp") -> list[Path]:
    """Delete the temporary files that killed writers of ``path`` left behind; return them.

    A temporary file whose writer process is still running is left alone.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.pid*{suffix}"):
        pid = tmp.name[len(f".{path.name}.pid"):].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
