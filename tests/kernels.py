"""Starting Jupyter kernels that do not collide with each other.

jupyter_client picks a kernel's TCP ports by binding them, releasing them and
letting the kernel bind them again; a kernel started at the same moment
elsewhere (parallel grading, nbval in another pytest worker) can take a port
in between, and one kernel dies at start ("Address already in use"; measured
here: 1 start in 64 with eight processes starting kernels side by side).
Unix sockets in a folder of their own cannot collide, so the grader, and the
kernels the test suite starts (see ``conftest.py``), use them where the
platform allows, and try again if a kernel still fails to start.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

START_ATTEMPTS = 3
_MAX_SOCKET_PATH = 90  # AF_UNIX paths hold about 104-108 bytes, and "-NNNNN" is appended


def use_unix_sockets(km: Any, folder: str | os.PathLike) -> bool:
    """Point a (not yet started) kernel manager at Unix sockets in ``folder``; False if it cannot."""
    prefix = Path(folder) / "kernel"
    if os.name != "posix" or len(str(prefix)) > _MAX_SOCKET_PATH:
        return False
    prefix.parent.mkdir(parents=True, exist_ok=True)
    km.transport, km.ip = "ipc", str(prefix)
    return True


def socket_folder() -> str:
    """A fresh, short-named folder for one kernel's sockets, removed when Python exits."""
    folder = tempfile.mkdtemp(prefix="dgk-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def over_unix_sockets(manager_class: Callable[..., Any]) -> Callable[..., Any]:
    """A drop-in for a kernel manager class whose managers use Unix sockets in a fresh folder."""

    @functools.wraps(manager_class)
    def make(*args: Any, **kwargs: Any) -> Any:
        km = manager_class(*args, **kwargs)
        use_unix_sockets(km, socket_folder())
        return km

    return make


def retried(start: Callable[..., Any], attempts: int = START_ATTEMPTS) -> Callable[..., Any]:
    """``start`` (a kernel-starting function that raises RuntimeError on failure), tried up to ``attempts`` times."""

    @functools.wraps(start)
    def start_again_if_it_dies(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return start(*args, **kwargs)
            except RuntimeError:
                if attempt == attempts:
                    raise

    return start_again_if_it_dies
