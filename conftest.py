"""pytest set-up for the whole repository (the README's test command relies on it).

* nbval runs the notebooks in **fast mode**, whatever the machine: the outputs
  stored in ``solutions/`` were made in fast mode.
* Parallel workers get a fair share of the CPU threads each.
* ``solutions/`` is validated strictly (every stored output must be reproduced),
  ``book/`` in nbval's *lax* mode: its notebooks must run without error, but
  their outputs are regenerated when the book is built and are not stored.
  nbval's ``--nbval-lax`` is a global switch, so the per-folder choice is made
  here, exactly as ``--nbval-lax`` would: a cell keeps output checking only if
  it is marked ``# NBVAL_CHECK_OUTPUT``.
* No notebook cell may show an object's repr (``<torch._C.Generator object at
  0x…>``, the value of ``torch.manual_seed``): every nbval cell, in ``book/`` and
  ``solutions/`` alike, fails if its output holds one.
* Every kernel the tests start (nbval's, and nbclient's) talks over Unix
  sockets, and nbval's is started again if it dies at start: with two workers
  starting kernels side by side, TCP ports can collide (see
  ``tests/kernels.py``).
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

os.environ["DGMLAB_FULL"] = "0"  # inherited by every notebook kernel pytest starts

# pytest-xdist workers share the machine's cores. Each torch process would
# start one thread per core, and several of them then fight over every core
# (a 10x slowdown on 2 cores): give each worker, and the kernels it starts,
# its share of the cores instead.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

LAX_FOLDERS = (Path(__file__).parent / "book",)


def _kernels_over_unix_sockets() -> None:
    import nbclient
    import nbval.kernel

    sys.path.insert(0, str(Path(__file__).parent / "tests"))
    try:
        import kernels
    except ImportError:  # conftest.py copied on its own (tests/test_notebooks.py does, to test a hook)
        return

    nbval.kernel.KernelManager = kernels.over_unix_sockets(nbval.kernel.KernelManager)
    nbval.kernel.start_new_kernel = kernels.retried(nbval.kernel.start_new_kernel)
    create = nbclient.NotebookClient.create_kernel_manager

    def create_kernel_manager(self):
        km = create(self)
        kernels.use_unix_sockets(km, kernels.socket_folder())
        return km

    nbclient.NotebookClient.create_kernel_manager = create_kernel_manager


_kernels_over_unix_sockets()


def pytest_collection_modifyitems(config, items):
    for item in items:
        options = getattr(item, "options", None)
        cell = getattr(item, "cell", None)
        if options is None or cell is None:  # not an nbval cell
            continue
        path = Path(str(item.fspath)).resolve()
        if any(folder.resolve() in path.parents for folder in LAX_FOLDERS):
            marked = "NBVAL_CHECK_OUTPUT" in cell.source or "nbval-check-output" in cell.metadata.get("tags", [])
            options["check"] = bool(marked)


OBJECT_REPR = re.compile(r"<[\w.]+ (?:object )?at 0x[0-9a-fA-F]+>|object at 0x[0-9a-fA-F]+")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail an nbval cell whose output shows an object repr, whatever nbval compares."""
    outcome = yield
    report = outcome.get_result()
    outputs = getattr(item, "test_outputs", None)
    if call.when != "call" or not report.passed or not outputs:
        return
    found = OBJECT_REPR.search(json.dumps(outputs))
    if found:
        report.outcome = "failed"
        report.longrepr = (f"{item.name}: the output shows an object repr, {found.group(0)!r}. End the "
                           "line with ';' or assign the value (_ = torch.manual_seed(0)).")
