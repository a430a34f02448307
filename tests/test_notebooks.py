"""The lecture notebooks: conventions, and their full-size cells run on tiny data.

Full-size cells (tag ``full-size``) only run in full mode, on MNIST or
CIFAR-10. Here they run for real through the same code path, on tiny fake
files in the canonical formats (see :func:`dgmlab.datasets.write_fake_mnist`),
with ``DGMLAB_FULL=1`` on the CPU.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import matplotlib
import nbformat
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
BOOK = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
FULL_TAG = "full-size"


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_every_chapter_has_its_three_notebooks_and_a_toc_entry():
    toc = (ROOT / "_toc.yml").read_text()
    assert BOOK, "no chapters in book/"
    for path in BOOK:
        assert (ROOT / "exercises" / path.name).is_file(), f"exercises/{path.name} is missing"
        assert (ROOT / "solutions" / path.name).is_file(), f"solutions/{path.name} is missing"
        assert f"book/{path.stem}" in toc, f"{path.stem} is not in _toc.yml"
    listed = [line.split("book/")[1].strip() for line in toc.splitlines() if "file: book/" in line]
    assert all((ROOT / "book" / f"{stem}.ipynb").is_file() for stem in listed), "_toc.yml lists a missing chapter"


@pytest.mark.parametrize("path", BOOK, ids=[p.name for p in BOOK])
def test_book_notebooks_are_clean(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "start with the title"
    assert sum(c.source.startswith("## ") for c in nb.cells if c.cell_type == "markdown") >= 3, "use section headings"
    # outputs are made when the book is built; stored ones would only go stale
    assert all(not c.outputs and c.execution_count is None for c in code_cells(path))


WITH_FULL_SIZE = [p for p in BOOK if any(FULL_TAG in c.metadata.get("tags", []) for c in code_cells(p))]


@pytest.mark.parametrize("path", WITH_FULL_SIZE, ids=[p.name for p in WITH_FULL_SIZE])
def test_full_size_cells_run_on_tiny_data(path, tmp_path, monkeypatch):
    from dgmlab import datasets

    cells = code_cells(path)
    full = [c for c in cells if FULL_TAG in c.metadata.get("tags", [])]
    monkeypatch.setenv("DGMLAB_FULL", "1")
    monkeypatch.setenv("DGMLAB_SMOKE", "1")  # the cells' tiny settings (modes.config)
    monkeypatch.setenv("DGMLAB_DEVICE", "cpu")
    monkeypatch.setenv("DGMLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setitem(datasets.DATASETS, "mnist",
                        datasets.write_fake_mnist(tmp_path / "data", n_train=300, n_test=60))
    monkeypatch.setitem(datasets.DATASETS, "cifar10", datasets.write_fake_cifar10(tmp_path / "data", n_per_batch=12))
    monkeypatch.chdir(tmp_path)  # checkpoints and other files land here

    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(cells[0].source, f"{path.name}:setup", "exec"), namespace)  # the imports cell
        for cell in full:
            exec(compile(cell.source, f"{path.name}:full-size", "exec"), namespace)
    printed = out.getvalue()
    assert printed.count("Full mode") == len(full) and "Fast mode" not in printed
    reported = [line for line in printed.splitlines()
                if line.strip() and not line.startswith(("Full mode", "Expected result"))]
    assert reported, "a full-size cell should report what it measured"


@pytest.mark.parametrize("path", [*BOOK, *sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_display_maths_stands_in_its_own_paragraph(path):
    """MyST renders $$ … $$ as display maths only with a blank line before and after; otherwise stray $ show."""
    bad = []
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type != "markdown":
            continue
        lines, inside = cell.source.splitlines(), False
        for j, line in enumerate(lines):
            if line.strip() != "$$":
                continue
            neighbour = lines[j + 1] if inside and j + 1 < len(lines) else (lines[j - 1] if not inside and j else "")
            if neighbour.strip():
                bad.append((i, j, neighbour[:40]))
            inside = not inside
    assert bad == [], f"$$ needs a blank line beside it (cell, line, neighbour): {bad[:3]}"


@pytest.mark.parametrize("path", BOOK, ids=[p.name for p in BOOK])
def test_book_code_fits_the_page(path):
    """The book's code column shows about 80 characters; longer lines scroll sideways."""
    long = [(i, line) for i, c in enumerate(code_cells(path)) for line in c.source.splitlines() if len(line) > 80]
    assert long == [], f"code lines over 80 characters (cell, line): {long[:3]}"


def test_a_cell_whose_output_shows_an_object_repr_fails(tmp_path):
    """conftest.py fails any nbval cell that prints a repr such as <torch._C.Generator at 0x…>."""
    import shutil
    import subprocess
    import sys

    from nbformat.v4 import new_code_cell, new_notebook

    shutil.copy(ROOT / "conftest.py", tmp_path)  # the hook under test, beside a probe notebook
    nb = new_notebook(cells=[new_code_cell("import torch\ntorch.manual_seed(0)"),
                             new_code_cell("_ = torch.manual_seed(0)\nprint('seeded')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "probe.ipynb")
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", "/dev/null", "--rootdir", str(tmp_path),
                          "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env", "-rf",
                          str(tmp_path / "probe.ipynb")], capture_output=True, text=True, timeout=180)
    assert "1 failed, 1 passed" in run.stdout, run.stdout[-2000:]
    assert "object repr" in run.stdout and "torch._C.Generator" in run.stdout
