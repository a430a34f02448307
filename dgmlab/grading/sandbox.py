"""The sandbox a submission runs in: bubblewrap, or (only when asked) none.

Inside, the student's code sees a read-only system and Python, the dgmlab
package and the course's published results; a private home folder and
``/tmp``; no network; its own PID namespace (it cannot see or signal the
grader, and every process it starts dies with the sandbox); an environment
with a handful of harmless variables. Nothing of the instructor's: not the
solution, the hidden tests, other submissions or the output folder.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding ``dgmlab``
HOME = "/home/student"


class SandboxUnavailable(RuntimeError):
    """The submissions cannot be isolated here, and the instructor did not agree to grade without."""


def _read_only_paths() -> list[str]:
    paths = ["/usr", "/etc/ld.so.cache", "/etc/fonts", sys.base_prefix, sys.prefix, str(_PACKAGE_ROOT / "dgmlab"),
             str(_PACKAGE_ROOT / "book" / "results")]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def command(home: Path, threads: int = 1) -> list[str]:
    """The bubblewrap command line (to be followed by the program to run)."""
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--uid", "1000", "--gid", "1000",
           "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL"]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # first: binds below may lie under /tmp
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{link}"):
            cmd += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
    for path in _read_only_paths():
        cmd += ["--ro-bind", path, path]
    cmd += ["--bind", str(home), HOME, "--chdir", HOME]
    for name, value in environment(HOME, threads).items():
        cmd += ["--setenv", name, value]
    return cmd


def environment(home: str, threads: int = 1) -> dict[str, str]:
    """The whole environment of the student's process: nothing inherited from the instructor's."""
    env = {"HOME": home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
           "MPLCONFIGDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "DGMLAB_FULL": "0",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if not {"site-packages", "dist-packages"} & set(_PACKAGE_ROOT.parts):
        env["PYTHONPATH"] = str(_PACKAGE_ROOT)  # a source checkout: import this very dgmlab
    return env


@functools.lru_cache(maxsize=1)
def available() -> str | None:
    """None when bubblewrap works here, else why not (a sentence for the instructor)."""
    if os.name != "posix" or shutil.which("bwrap") is None:
        return ("bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
                "bubblewrap)")
    with tempfile.TemporaryDirectory() as home:
        probe = subprocess.run(command(Path(home)) + [sys.executable, "-c", "pass"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return f"bubblewrap does not work here ({reason[0]}); user namespaces may be disabled"
    return None


def die_with_parent() -> None:
    """For ``preexec_fn``: the child is killed (SIGKILL) when the process that started it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
