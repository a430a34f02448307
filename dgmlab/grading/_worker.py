"""Run one prepared submission in a fresh kernel (internal; started by the grader).

Usage: ``python -m dgmlab.grading._worker REQUEST.json``. The request names the
notebook, the check cells and where to report. Progress goes to an events file
as JSON lines, written as it happens, so that the grader still knows how far
the notebook got when it has to kill this process.

Verdicts are read from the kernel's ``DGMLAB_GRADING_LOG`` after each cell and
only the one for the check cell just run is kept: a ``check(...)`` call a
student writes elsewhere cannot earn points. Before each check cell the
request's ``guard`` code (:func:`notebooks.guard_code`) runs silently -- no
output, no execution count, the cell's own source and line numbers untouched --
so that ``check``, ``expect_*`` and the setup cell's imports are the real ones
again, whatever a student's cell bound to those names. A student who changes
the dgmlab modules themselves (``feedback.expect_close = ...``) is not stopped.

The kernel talks to the worker over Unix sockets in the submission's own
scratch folder where it can (:mod:`.kernels` says why), and a kernel that
fails to start is started again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from ..files import atomic_write
from .feedback import LOG_ENV
from .kernels import START_ATTEMPTS, use_unix_sockets
from .notebooks import notebook_text


class _Events:
    """Append-only JSON-lines progress report, one line per event, unbuffered."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8", buffering=1)

    def emit(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, **fields}, ensure_ascii=False) + "\n")
        self._file.flush()


class _Log:
    """Reads the verdicts the kernel appends to the grading log since the last read."""

    def __init__(self, path: str) -> None:
        self._path, self._offset = path, 0

    def new_records(self) -> list[dict]:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        records = []
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in records if isinstance(r, dict)]


def _error_of(cell: nbformat.NotebookNode) -> tuple[str, str] | None:
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    return (errors[-1].get("ename", ""), errors[-1].get("evalue", "")) if errors else None


def _run_silently(client: NotebookClient, code: str) -> None:
    """Run ``code`` in the kernel without adding outputs or an execution count to the notebook."""
    msg_id = client.kc.execute(code, silent=True, store_history=False, allow_stdin=False)
    client.wait_for_reply(msg_id)  # interrupts after the cell time limit; raises if the kernel died


def _run_cells(client: NotebookClient, nb, request: dict, events: _Events, log: _Log) -> None:
    tests = {int(k): v for k, v in request["tests"].items()}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        events.emit("start", cell=index)
        try:
            if index in tests and request.get("guard"):
                _run_silently(client, request["guard"])  # the real check, expect_*, imports
            log.new_records()  # anything logged before this cell belongs to other cells
            started = time.monotonic()
            client.execute_cell(cell, index)
        except DeadKernelError:
            events.emit("dead", cell=index)
            return
        error = _error_of(cell)
        overran = time.monotonic() - started >= request["cell_timeout"]
        if overran and error and error[0] == "KeyboardInterrupt":
            events.emit("cell_timeout", cell=index)
        if index in tests:
            # The check writes its verdict last, after any student code in the cell ran.
            mine = [r for r in log.new_records() if r.get("question") == tests[index]]
            if mine:
                events.emit("result", cell=index, record=mine[-1])
            else:
                events.emit("noresult", cell=index, question=tests[index], error=error)
        events.emit("done", cell=index)
        atomic_write(request["executed"], notebook_text(nb))


def start_kernel(client: NotebookClient, events: _Events, sockets: Path | None = None,
                 attempts: int = START_ATTEMPTS) -> None:
    """Start a kernel (over Unix sockets in ``sockets`` if given) and its client, retrying if it dies at start.

    Every kernel's pid is reported before anything can hang, so that the grader
    can always kill it.
    """
    for attempt in range(1, attempts + 1):
        client.km = client.create_kernel_manager()
        if sockets is not None:
            use_unix_sockets(client.km, sockets)
        try:
            client.start_new_kernel()
            events.emit("kernel", pid=getattr(client.km.provisioner, "pid", None))
            client.start_new_kernel_client()
            return
        except Exception as err:
            if attempt == attempts:
                raise
            events.emit("restart", attempt=attempt, error=f"{type(err).__name__}: {err}")
            try:
                client._cleanup_kernel()
            except Exception:
                pass  # the grader kills every reported kernel's process group anyway


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    events = _Events(request["events"])
    nb = nbformat.read(request["notebook"], as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=request["cell_timeout"],
        interrupt_on_timeout=True,
        allow_errors=True,
        startup_timeout=request["startup_timeout"],
        shutdown_kernel="immediate",
        record_timing=False,
        resources={"metadata": {"path": request["workdir"]}},
    )
    try:
        start_kernel(client, events, sockets=Path(request["sockets"]))
        _run_cells(client, nb, request, events, _Log(os.environ[LOG_ENV]))
    except Exception as err:  # report, never hide: the grader turns this into a note
        events.emit("crash", error=f"{type(err).__name__}: {err}")
    finally:
        try:
            client._cleanup_kernel()
        except Exception:
            pass  # the grader kills the kernel's process group anyway
    events.emit("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
