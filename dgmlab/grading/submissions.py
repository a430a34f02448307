"""Finding, naming, reading and preparing the students' submissions.

A submissions folder holds one entry per student: ``NAME.ipynb``, or a folder
``NAME/`` holding the notebook. Entries that share a name are one student (the
notebook is graded, the rest ignored with a note). Every student gets a
collision-free stem for their output files. :func:`load_submission` refuses
anything that is not a notebook with a reason for the student, and returns a
clean notebook; :func:`prepare_submission` puts the solution's
check cells in place of the student's, matching them by ``grade_id`` and cell id.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from .notebooks import KERNELSPEC, annotate_solution, questions

__all__ = ["MAX_BYTES", "Prepared", "Submission", "SubmissionError", "digest", "find_submissions",
           "load_submission", "prepare_submission", "stems_for"]

MAX_BYTES = 64 * 2**20  # the largest notebook read (64 MB)
MAX_DEPTH = 100  # the deepest JSON nesting accepted; real notebooks need about 10
_STEM_CHARS, _STEM_BYTES = 80, 200
_UNSAFE = set('/\\:*?"<>|')
_CELL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # nbformat 4.5's cell id
_MAKERS = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell,
           "raw": nbformat.v4.new_raw_cell}
_DAMAGED = ("so it could not be graded. The file is damaged or was edited outside Jupyter; "
            "open it in Jupyter to check, then submit it again.")


class SubmissionError(ValueError):
    """A submitted file that is not a usable notebook (the message is for the student)."""


@dataclass(frozen=True)
class Submission:
    """One student's entry; ``problem`` says why it cannot be graded, ``notes`` warn."""

    student: str  # the name as handed in (file stem or folder name)
    path: Path  # the notebook to grade (or the file/folder that is not one)
    stem: str  # collision-free, filesystem-safe stem for this student's output files
    problem: str | None = None
    notes: tuple[str, ...] = ()


def find_submissions(folder: str | os.PathLike, assignment: str) -> list[Submission]:
    """One submission per student name in ``folder`` (hidden entries skipped), sorted by name."""
    groups: dict[str, list[Path]] = {}
    for entry in sorted(Path(folder).iterdir()):
        if not entry.name.startswith(".") and (entry.is_file() or entry.is_dir()):
            groups.setdefault(entry.stem if entry.is_file() else entry.name, []).append(entry)
    stems = stems_for(list(groups))
    return [_submission(name, groups[name], stems[name], assignment) for name in sorted(groups)]


def _submission(student: str, entries: list[Path], stem: str, assignment: str) -> Submission:
    """One student's submission from all entries of that name: NAME.ipynb, else a folder
    holding the notebook, else the first entry (with its problem); the others noted."""
    options = [Submission(student, e, stem, _file_problem(e)) if e.is_file()
               else _folder_submission(student, e, stem, assignment) for e in entries]
    # order: a notebook file, a folder with a notebook, a folder without, another file
    ranked = sorted(zip(entries, options),
                    key=lambda eo: (bool(eo[1].problem), eo[0].is_file() == bool(eo[1].problem)))
    (entry, chosen), others = ranked[0], [e for e, _ in ranked[1:]]
    shown = chosen.path.relative_to(entry.parent).as_posix()
    notes = tuple(f"{other.name}{'/' if other.is_dir() else ''} was ignored: only one submission "
                  f"per student is graded, {shown}." for other in others)
    return Submission(student, chosen.path, stem, chosen.problem, notes)


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".ipynb":
        return None
    kind = f"a {path.suffix} file" if path.suffix else "a file without extension"
    return (f"{path.name} is {kind}, not a Jupyter notebook (.ipynb), so it could not be graded. "
            "Submit the .ipynb file itself.")


def _folder_submission(student: str, folder: Path, stem: str, assignment: str) -> Submission:
    named = folder / assignment
    if named.is_file():
        return Submission(student, named, stem)
    notebooks = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix == ".ipynb" and not p.name.startswith("."))
    if len(notebooks) == 1:
        return Submission(student, notebooks[0], stem)
    listing = ", ".join(p.name for p in notebooks) or "none"
    return Submission(student, folder, stem, f"the folder {folder.name}/ holds no notebook named "
                      f"{assignment} and not exactly one other notebook (found: {listing}).")


def safe_stem(name: str) -> str:
    """``name`` with characters unsafe in file names replaced by ``_``, cut to 80 characters."""
    chars = ["_" if c in _UNSAFE or unicodedata.category(c) in ("Cc", "Cs") else c for c in name]
    if chars and chars[0] in ".-":
        chars[0] = "_"
    stem = "".join(chars[:_STEM_CHARS]) or "_"
    while len(stem.encode("utf-8")) > _STEM_BYTES:  # file systems count bytes, not characters
        stem = stem[:-1]
    return stem


def stems_for(names: list[str]) -> dict[str, str]:
    """A stem per name, distinct even ignoring case, that depends only on the set of names.

    A name whose safe stem differs from it, or clashes with another ignoring case,
    gets ``-`` and the first 8 hex digits of its SHA-1 appended (more if still clashing).
    """
    safe = {name: safe_stem(name) for name in names}
    stems = {name: stem if stem == name else _hashed(name, stem, 8) for name, stem in safe.items()}
    for length in (8, 16, 40):
        seen: dict[str, list[str]] = {}
        for name, stem in stems.items():
            seen.setdefault(stem.casefold(), []).append(name)
        clashing = [name for group in seen.values() if len(group) > 1 for name in group]
        if not clashing:
            break
        for name in clashing:
            stems[name] = _hashed(name, safe[name], length)
    return stems


def _hashed(name: str, stem: str, length: int) -> str:
    return f"{stem}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:length]}"


def digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, or of every file under a folder, in name order."""
    path = Path(path)
    sha = hashlib.sha256()
    if path.is_dir():
        files = sorted(Path(root, f) for root, _, names in os.walk(path) for f in names)
        for file in files:
            sha.update(file.relative_to(path).as_posix().encode("utf-8", "surrogateescape") + b"\0")
            sha.update(_file_digest(file).encode() + b"\0")
    else:
        with open(path, "rb") as f:
            while chunk := f.read(2**20):
                sha.update(chunk)
    return sha.hexdigest()


def _file_digest(path: Path) -> str:
    if path.is_symlink():
        return "symlink:" + os.readlink(path)
    return digest(path) if path.is_file() else "not a regular file"  # a FIFO would block


def load_submission(path: str | os.PathLike) -> NotebookNode:
    """A clean copy of a submitted notebook; :class:`SubmissionError` says why there is none.

    The copy is nbformat 4.5 with the cells' valid ids, or 4.4 without ids if the
    file predates ids (older formats are converted).
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        size = -(-max(path.stat().st_size, len(data)) // 2**20)  # rounded up
        raise SubmissionError(f"{path.name} is {size} MB; the limit is {MAX_BYTES // 2**20} MB, so "
                              "it could not be graded. Clear the outputs (Edit > Clear Outputs of "
                              "All Cells in Jupyter), save, and submit it again.")
    if data.startswith(b"%PDF"):
        raise SubmissionError(f"{path.name} is a PDF, not a Jupyter notebook, so it could not be "
                              "graded. Submit the .ipynb file itself.")
    raw = _parse(data, path.name)
    try:
        cells, keep_ids = _cells(raw)
    except _Shape as err:
        raise SubmissionError(f"{path.name} is JSON but not a Jupyter notebook ({err}), so it "
                              "could not be graded.") from None
    return _rebuild(cells, keep_ids)


def _parse(data: bytes, name: str) -> object:
    """The JSON value in ``data``, refused if not UTF-8, not JSON or nested too deeply."""
    deep = False
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SubmissionError(f"{name} is not a text file, so it is not a Jupyter notebook "
                              "and could not be graded.") from None
    except json.JSONDecodeError as err:
        raise SubmissionError(f"{name} is not valid notebook JSON ({err.msg} at line {err.lineno}, "
                              f"column {err.colno}), {_DAMAGED}") from None
    except RecursionError:
        deep = True
    if deep or _too_deep(raw):
        raise SubmissionError(f"{name} is not valid notebook JSON (nested too deeply: more than "
                              f"{MAX_DEPTH} levels), {_DAMAGED}")
    return raw


def _too_deep(value: object) -> bool:
    """Whether ``value`` nests lists and objects more than MAX_DEPTH levels (no recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class _Shape(ValueError):
    """JSON that is not shaped like a notebook (the message says where)."""


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "true or false",
             type(None): "null", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _cells(raw: object) -> tuple[list, bool]:
    """The cells of a parsed notebook (older formats converted) and whether their ids count."""
    if not isinstance(raw, dict):
        raise _Shape(f"the file holds {_kind(raw)}, not a notebook object")
    version = raw.get("nbformat")
    if version in (1, 2, 3):
        try:
            raw = nbformat.reads(json.dumps(raw), as_version=4, capture_validation_error={})
        except Exception as err:  # nbformat raises many kinds; all mean "not a notebook"
            raise _Shape(f"an nbformat {version} notebook that cannot be read: {err}") from None
        return _check_cells(raw.get("cells")), False  # ids made up by the conversion
    if version != 4:
        got = "none" if version is None else repr(version)
        raise _Shape(f'its "nbformat" version should be 4, got {got}')
    minor = raw.get("nbformat_minor")
    return _check_cells(raw.get("cells")), isinstance(minor, int) and minor >= 5


def _check_cells(cells: object) -> list:
    if not isinstance(cells, list):
        raise _Shape(f'its "cells" should be a list, got {_kind(cells)}')
    for number, cell in enumerate(cells, 1):
        if not isinstance(cell, dict):
            raise _Shape(f"cell {number} should be an object, got {_kind(cell)}")
        if not isinstance(cell.get("cell_type"), str) or cell["cell_type"] not in _MAKERS:
            raise _Shape(f"cell {number} has cell_type {cell.get('cell_type')!r}; "
                         "expected 'code', 'markdown' or 'raw'")
        source = cell.get("source", "")
        if not (isinstance(source, str)
                or isinstance(source, list) and all(isinstance(s, str) for s in source)):
            raise _Shape(f"the source of cell {number} should be text, got {_kind(source)}")
        if not isinstance(cell.get("metadata", {}), dict):
            raise _Shape(f"the metadata of cell {number} should be an object, got "
                         f"{_kind(cell.get('metadata'))}")
    return cells


def _rebuild(cells: list, keep_ids: bool) -> NotebookNode:
    """A clean notebook of the cells' type, source, metadata and (valid, if ``keep_ids``) id.

    Without ids (a notebook older than nbformat 4.5) the result is an nbformat-4.4 notebook.
    """
    clean = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC)})
    clean.nbformat_minor = 5 if keep_ids else 4
    for cell in cells:
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else source
        metadata = copy.deepcopy(cell.get("metadata", {}))
        made = _MAKERS[cell["cell_type"]](source=source, metadata=metadata)
        cell_id = cell.get("id")
        if keep_ids and isinstance(cell_id, str) and _CELL_ID.fullmatch(cell_id):
            made["id"] = cell_id
        else:
            del made["id"]
        clean.cells.append(made)
    return clean


@dataclass
class Prepared:
    """A submission ready to run: the notebook, its genuine check cells, notes for the student."""

    nb: NotebookNode  # the submission with the genuine check cells in place
    tests: dict[int, str]  # cell index in nb -> question id
    notes: list[str]


def _claim(cell: NotebookNode) -> str | None:
    """The grade_id a cell claims, if any."""
    metadata = cell.get("metadata")
    nbgrader = metadata.get("nbgrader") if isinstance(metadata, dict) else None
    grade_id = nbgrader.get("grade_id") if isinstance(nbgrader, dict) else None
    return grade_id if isinstance(grade_id, str) else None


def prepare_submission(solution: NotebookNode, submission: NotebookNode) -> Prepared:
    """The submission with each genuine check cell replaced by the solution's full one.

    A check cell is genuine if its ``grade_id`` and its cell id are the solution's
    (the grade_id alone where the solution or the submission has no cell ids);
    of several, the last one. Every other cell claiming a check's grade_id is
    removed, and a check with no genuine cell is added at the end.
    """
    annotated = annotate_solution(solution, "the solution")
    genuine = {q.id: annotated.cells[q.cell] for q in questions(solution, "the solution")}
    legacy = not any(cell.get("id") for cell in submission.cells)  # e.g. an nbformat 3 notebook

    def matches(cell: NotebookNode, qid: str) -> bool:
        wanted = genuine[qid].get("id")
        return legacy or wanted is None or cell.get("id") == wanted

    last = {qid: index for index, cell in enumerate(submission.cells)
            if (qid := _claim(cell)) in genuine and matches(cell, qid)}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC)})
    tests: dict[int, str] = {}
    notes: list[str] = []

    def add_check(qid: str) -> None:
        tests[len(nb.cells)] = qid
        nb.cells.append(_check_cell(genuine[qid]))

    for index, cell in enumerate(submission.cells):
        qid = _claim(cell)
        if qid not in genuine:
            nb.cells.append(copy.deepcopy(cell))
        elif last.get(qid) == index:
            add_check(qid)
        elif matches(cell, qid):
            notes.append(f"A second copy of the check cell for {qid} was removed before grading.")
        else:
            notes.append(f"Cell {index + 1} claimed to be the check cell for {qid} but is not the "
                         "exercise's own (its cell id differs: a copy or an edited cell); it was "
                         "removed before grading.")
    for qid in genuine:
        if qid not in last:
            notes.append(f"The check cell for {qid} was missing from the notebook; it was added "
                         "back at the end and run there.")
            add_check(qid)
    _unique_ids(nb, tests)
    return Prepared(nb, tests, notes)


def _check_cell(solution_cell: NotebookNode) -> NotebookNode:
    """The solution's check cell without its outputs: source, metadata and id."""
    cell = nbformat.v4.new_code_cell(source=solution_cell.source,
                                     metadata=copy.deepcopy(solution_cell.metadata))
    if solution_cell.get("id"):
        cell["id"] = solution_cell["id"]
    else:
        del cell["id"]  # given a deterministic one by _unique_ids
    return cell


def _unique_ids(nb: NotebookNode, tests: dict[int, str]) -> None:
    """Give every cell a valid id, unique in ``nb``; the check cells keep the solution's."""
    taken = {nb.cells[i].get("id") for i in tests} - {None}
    for index, cell in enumerate(nb.cells):
        cell_id = cell.get("id")
        if index in tests and cell_id:
            continue
        if not cell_id or cell_id in taken:
            text = f"{index}\0{cell.source}".encode("utf-8", "surrogateescape")
            base = hashlib.sha1(text).hexdigest()[:8]
            cell_id = next(f"{base}-{n}" for n in itertools.count() if f"{base}-{n}" not in taken)
        cell["id"] = cell_id
        taken.add(cell_id)
