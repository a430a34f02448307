"""pytest set-up for the whole repository (the README's test command relies on it).

* nbval runs the notebooks in **fast mode**, whatever the machine: the outputs
  stored in ``solutions/`` were made in fast mode.
* ``solutions/`` is validated strictly (every stored output must be reproduced),
  ``book/`` in nbval's *lax* mode: its notebooks must run without error, but
  their outputs are regenerated when the book is built and are not stored.
  nbval's ``--nbval-lax`` is a global switch, so the per-folder choice is made
  here, exactly as ``--nbval-lax`` would: a cell keeps output checking only if
  it is marked ``# NBVAL_CHECK_OUTPUT``.
"""

import os
from pathlib import Path

os.environ["DGMLAB_FULL"] = "0"  # inherited by every notebook kernel pytest starts

LAX_FOLDERS = (Path(__file__).parent / "book",)


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
