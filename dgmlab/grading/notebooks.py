"""Exercise notebooks generated from solution notebooks, with nbgrader metadata.

``solutions/NN_topic.ipynb`` is the single source of a chapter's graded
exercise. The generator turns it into ``exercises/NN_topic.ipynb`` by

* replacing each ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` block with a
  stub that raises ``NotImplementedError`` carrying the ``# Task:`` above it
  (what to compute, never how: hints are the check's ``hint=``, folded, shown
  only after a wrong answer);
* deleting ``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS`` regions and
  cells tagged ``solution-only``;
* clearing outputs, execution counts and timing metadata, and locking check cells.

nbgrader's own preprocessors (ClearSolutions, ClearHiddenTests, ClearOutput,
LockCells) do the clearing and locking; this module adds what they lack: the
tasks in the stubs, folded hints, ``solution-only`` cells, the nbgrader (schema
3) metadata, deterministic cell ids, leak detection, and validation. Malformed
notebooks are refused with an error naming the notebook, cell and line, because
a silently broken exercise is found by students, not by the author.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import nbformat
from nbformat import NotebookNode

from ..files import atomic_write

__all__ = [
    "NotebookError",
    "Question",
    "annotate_solution",
    "execute_in_place",
    "find_leaks",
    "generate",
    "make_exercise",
    "notebook_text",
    "questions",
    "read_notebook",
]

SOLUTION_ONLY_TAG = "solution-only"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}

# A well-formed marker sits alone on its line; anything else that mentions
# one is a typo we refuse rather than silently leak.
_MARKER = re.compile(
    r"^(?P<indent>[ \t]*)###[ \t]*(?P<edge>BEGIN|END) (?P<kind>SOLUTION|HIDDEN TESTS)[ \t]*$"
)
_MARKER_WORDS = re.compile(r"(BEGIN|END)\s+(SOLUTION|HIDDEN\s+TESTS)")
_ID = re.compile(r"[A-Za-z0-9_-]+")
_TASK = re.compile(r"^\s*#\s*Task:\s*", re.IGNORECASE)
_HINT = re.compile(r"^\s*#\s*Hint:", re.IGNORECASE)
_TIMING_KEYS = ("execution", "ExecuteTime")
_TASK_SLOT = "\0"  # where nbgrader's stub gets its task: never in a cell that parses as Python


class NotebookError(ValueError):
    """A solution notebook that breaks the exercise conventions."""


@dataclass(frozen=True)
class Question:
    """One graded question: its id, its points and the index of its check cell."""

    id: str
    points: float
    cell: int


@dataclass(frozen=True)
class _Region:
    kind: str  # "solution" or "hidden"
    begin: int  # 0-based line index of the BEGIN marker
    end: int  # 0-based line index of the END marker
    indent: str
    task: str = ""


@dataclass
class _CellPlan:
    kind: str  # "answer", "test", "plain" or "dropped"
    regions: list[_Region] = field(default_factory=list)
    question: Question | None = None
    function: str | None = None  # qualified name holding the first solution block
    grade_id: str | None = None
    exercise_source: str | None = None


@dataclass(frozen=True)
class _Where:
    """Names a notebook cell in error messages."""

    notebook: str
    index: int
    source: str

    def fail(self, problem: str, line: int | None = None) -> NoReturn:
        first = next((s.strip() for s in self.source.splitlines() if s.strip()), "")
        start = f" (starting {first[:50]!r})" if first else ""
        at = f", line {line}" if line is not None else ""
        raise NotebookError(f"{self.notebook}, cell {self.index + 1}{start}{at}: {problem}")


# --------------------------------------------------------------------------
# Reading and writing notebooks
# --------------------------------------------------------------------------


def read_notebook(path: str | os.PathLike) -> NotebookNode:
    """Read a notebook (as nbformat 4), with an error that names the file."""
    try:
        return nbformat.read(os.fspath(path), as_version=4)
    except Exception as err:  # nbformat raises many kinds; all mean "not a readable notebook"
        raise NotebookError(f"cannot read {path} as a Jupyter notebook: {err}") from err


def notebook_text(nb: NotebookNode) -> str:
    """The notebook as JSON text, exactly as Jupyter would save it (deterministic)."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def _python(source: str) -> str | None:
    """The cell as plain Python (IPython magics translated if needed), or None if it is not."""
    try:
        ast.parse(source)
        return source
    except SyntaxError:
        pass
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        text = TransformerManager().transform_cell(source)
        ast.parse(text)
        return text
    except Exception:
        return None


def _parse(source: str) -> ast.Module | None:
    """The cell's syntax tree; IPython magics are translated first if needed."""
    text = _python(source)
    return None if text is None else ast.parse(text)


def _scan_regions(lines: list[str], where: _Where) -> list[_Region]:
    """The marker regions of a cell, refusing malformed, unbalanced or nested markers."""
    regions: list[_Region] = []
    opened: tuple[str, int, str] | None = None
    for i, line in enumerate(lines):
        m = _MARKER.match(line)
        if m is None:
            if _MARKER_WORDS.search(line):
                where.fail(
                    f"malformed marker {line.strip()!r}: write it alone on its line, exactly "
                    "'### BEGIN SOLUTION', '### END SOLUTION', '### BEGIN HIDDEN TESTS' "
                    "or '### END HIDDEN TESTS'",
                    i + 1,
                )
            continue
        kind = "solution" if m["kind"] == "SOLUTION" else "hidden"
        if m["edge"] == "BEGIN":
            if opened is not None:
                where.fail(
                    f"{line.strip()!r} inside the block opened at line {opened[1] + 1}; "
                    "blocks cannot nest, close the first one before opening another",
                    i + 1,
                )
            opened = (kind, i, m["indent"])
        else:
            if opened is None:
                where.fail(f"{line.strip()!r} has no matching BEGIN marker above it", i + 1)
            if opened[0] != kind:
                where.fail(f"{line.strip()!r} closes the block opened at line {opened[1] + 1}, "
                           "which is of the other kind", i + 1)
            regions.append(_Region(kind, opened[1], i, opened[2]))
            opened = None
    if opened is not None:
        edge = "### END SOLUTION" if opened[0] == "solution" else "### END HIDDEN TESTS"
        where.fail(f"this block is never closed: add {edge!r} after it", opened[1] + 1)
    return regions


def _is_check_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "check") or (
        isinstance(func, ast.Attribute) and func.attr == "check"
    )


def _check_blocks(tree: ast.Module, where: _Where) -> list[tuple[ast.Call, ast.With]]:
    """Every ``with check(...)`` of the cell; a bare ``check(...)`` call is refused."""
    blocks = [
        (item.context_expr, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.With)
        for item in node.items
        if _is_check_call(item.context_expr)
    ]
    in_with = {id(call) for call, _ in blocks}
    for node in ast.walk(tree):
        if _is_check_call(node) and id(node) not in in_with:
            where.fail("use check(...) as a context manager: `with check(\"q1\", points=2):`",
                       node.lineno)
    return sorted(blocks, key=lambda b: b[0].lineno)


def _literal_question(call: ast.Call, index: int, where: _Where) -> Question:
    """Read the question id and points from a ``check("id", points=N)`` call without running it."""
    keywords = {k.arg: k.value for k in call.keywords}
    id_node = call.args[0] if call.args else keywords.get("question")
    points_node = call.args[1] if len(call.args) > 1 else keywords.get("points")
    literally = ("write it literally, e.g. check(\"q1_mle\", points=2): the generator reads "
                 "it without running the cell")
    if not (isinstance(id_node, ast.Constant) and isinstance(id_node.value, str)):
        where.fail(f"the question id of check(...) is not a string literal; {literally}",
                   call.lineno)
    if not _ID.fullmatch(id_node.value):
        where.fail(f"question id {id_node.value!r} may only hold letters, digits, '_' and '-'",
                   call.lineno)
    value = points_node.value if isinstance(points_node, ast.Constant) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        where.fail(f"the points of check({id_node.value!r}) are not a positive number literal; "
                   f"{literally}", call.lineno)
    return Question(id_node.value, value, index)


def _block_end(tree: ast.Module, block: ast.With, n_lines: int) -> int:
    """The last line (1-based) of a ``with`` block, trailing comments included."""
    later = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.stmt)
        and node.lineno > block.end_lineno
        and node.col_offset <= block.col_offset
    ]
    return min(later) - 1 if later else n_lines


def _check_hidden_regions(
    regions: list[_Region], block: ast.With, tree: ast.Module, n_lines: int, where: _Where
) -> None:
    """Hidden tests must sit inside the check's block and leave something visible in it."""
    last = _block_end(tree, block, n_lines)
    for r in regions:
        below_header = r.begin + 1 > block.lineno and len(r.indent) > block.col_offset
        if not (below_header and r.end + 1 <= last):
            where.fail("this hidden-tests region is outside the `with check(...):` block; "
                       "indent it inside the block", r.begin + 1)
    visible = 0
    for stmt in block.body:
        first, final = stmt.lineno - 1, stmt.end_lineno - 1
        hidden = [r for r in regions if r.begin < first and final < r.end]
        crossing = [r for r in regions if first <= r.begin <= final or first <= r.end <= final]
        if crossing:
            where.fail("hidden-tests markers must enclose whole statements of the "
                       "`with check(...):` block, not part of one", crossing[0].begin + 1)
        visible += not hidden
    if not visible:
        where.fail("removing the hidden tests would leave the `with check(...):` block empty; "
                   "keep at least one visible expectation so students see what is checked",
                   regions[0].begin + 1)


def _comments_above(lines: list[str], begin: int) -> list[str]:
    """The comment lines directly above a BEGIN marker."""
    top = begin
    while top > 0 and lines[top - 1].strip().startswith("#") and not _MARKER.match(lines[top - 1]):
        top -= 1
    return lines[top:begin]


def _task_above(lines: list[str], begin: int) -> str:
    """The ``# Task:`` comment line(s) directly above a BEGIN marker, as one sentence."""
    block = _comments_above(lines, begin)
    starts = [i for i, line in enumerate(block) if _TASK.match(line)]
    if not starts:
        return ""
    texts = [_TASK.sub("", line) if _TASK.match(line) else line.strip().lstrip("#")
             for line in block[starts[0]:]]
    return " ".join(" ".join(t.split()) for t in texts if t.strip())


def _enclosing_function(tree: ast.Module, line: int) -> str | None:
    """Qualified name of the innermost function whose body holds ``line``, if any."""
    found: str | None = None

    def visit(node: ast.AST, prefix: str) -> None:
        nonlocal found
        for child in ast.iter_child_nodes(node):
            named = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if named and child.lineno <= line <= child.end_lineno:
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef) and child.body[0].lineno <= line:
                    found = name
                visit(child, name + ".")
            elif not named:
                visit(child, prefix)

    visit(tree, "")
    return found


def _check_solution_region(
    region: _Region, lines: list[str], tree: ast.Module, where: _Where
) -> tuple[_Region, str]:
    """Validate one solution block; return it with its task and its function's name."""
    line = region.begin + 1
    if not region.indent:
        where.fail("this solution block is at indentation 0, so its stub would stop the "
                   "exercise notebook there; put it inside a function body", line)
    code = [i for i in range(region.begin + 1, region.end)
            if lines[i].strip() and not lines[i].strip().startswith("#")]
    if not code:
        where.fail("this solution block is empty", line)
    if any(_HINT.match(c) for c in _comments_above(lines, region.begin)):
        where.fail("a '# Hint:' above a solution block is shown before the student answers; say "
                   "what to compute with '# Task: ...' and put the hint in check(..., hint=...), "
                   "which is shown after a wrong answer", line)
    task = _task_above(lines, region.begin)
    if not task:
        where.fail("this solution block has no task: add a '# Task: ...' comment line directly "
                   "above '### BEGIN SOLUTION' (what to compute; students see it in the stub)", line)
    function = _enclosing_function(tree, code[0] + 1)
    if function is None:
        where.fail("this solution block is not inside a function body, so its stub would stop "
                   "the exercise notebook there; move it into a function", line)
    return _Region(region.kind, region.begin, region.end, region.indent, task), function


def _plan_code_cell(source: str, index: int, where: _Where) -> _CellPlan:
    lines = source.splitlines()
    regions = _scan_regions(lines, where)
    tree = _parse(source)
    if tree is None:
        if regions or "check(" in source:
            where.fail("this cell is not valid Python, so its markers and checks cannot be read")
        return _CellPlan("plain")
    blocks = _check_blocks(tree, where)
    if len(blocks) > 1:
        where.fail("two check(...) blocks in one cell; give each graded question its own cell",
                   blocks[1][0].lineno)
    hidden = [r for r in regions if r.kind == "hidden"]
    solutions = [r for r in regions if r.kind == "solution"]
    if blocks:
        call, block = blocks[0]
        if solutions:
            where.fail("a check cell cannot hold a solution block; move it into an answer cell",
                       solutions[0].begin + 1)
        if hidden:
            _check_hidden_regions(hidden, block, tree, len(lines), where)
        return _CellPlan("test", regions, question=_literal_question(call, index, where))
    if hidden:
        where.fail("this hidden-tests region is outside a `with check(...):` block",
                   hidden[0].begin + 1)
    if not solutions:
        return _CellPlan("plain")
    checked = [_check_solution_region(r, lines, tree, where) for r in solutions]
    return _CellPlan("answer", [r for r, _ in checked], function=checked[0][1])


@functools.cache
def _clearing() -> tuple:
    """nbgrader's preprocessors that clear solution and hidden-test regions, set up once."""
    from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions  # slow: imported on use

    stub = f"# YOUR CODE HERE\nraise NotImplementedError({_TASK_SLOT})"
    return ClearSolutions(code_stub={"python": stub}), ClearHiddenTests()


def _exercise_source(source: str, plan: _CellPlan) -> str:
    """The cell for students, hints not yet folded: nbgrader's stubs in place of the solution
    blocks, each raising with its block's task, and the hidden tests removed."""
    flags = {"solution": plan.kind == "answer", "grade": plan.kind == "test"}
    cell = NotebookNode(cell_type="code", source=source, metadata={"nbgrader": flags})
    for step in _clearing():
        cell, _ = step.preprocess_cell(cell, {"language": "python"}, 0)
    tasks = [json.dumps(f"Replace this line with your code. Task: {r.task}", ensure_ascii=False)
             for r in plan.regions if r.kind == "solution"]  # JSON escapes are valid Python
    head, *rest = cell.source.split(_TASK_SLOT)
    return head + "".join(task + text for task, text in zip(tasks, rest))


def _tags(cell: NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _fold_hints(source: str) -> str:
    """``check(..., hint="text")`` with the text folded: a hint is read after a wrong answer."""
    from .feedback import FOLDED, fold

    lines = source.splitlines(keepends=True)
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check":
            spans += [kw.value for kw in node.keywords if kw.arg == "hint" and isinstance(kw.value, ast.Constant)
                      and isinstance(kw.value.value, str) and not kw.value.value.startswith(FOLDED)]
    for value in sorted(spans, key=lambda v: (v.lineno, v.col_offset), reverse=True):  # from the end
        first, last = lines[value.lineno - 1].encode(), lines[value.end_lineno - 1].encode()
        start, end = first[:value.col_offset].decode(), last[value.end_col_offset:].decode()
        folded = json.dumps(fold(value.value))
        lines[value.lineno - 1: value.end_lineno] = [start + folded + end]
    return "".join(lines)


def _plan(nb: NotebookNode, name: str) -> list[_CellPlan]:
    """Analyse every cell of a solution notebook, refusing anything malformed."""
    plans: list[_CellPlan] = []
    seen: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        where = _Where(name, index, cell.source)
        if SOLUTION_ONLY_TAG in _tags(cell):
            tree = _parse(cell.source) if cell.cell_type == "code" else None
            if tree is not None and _check_blocks(tree, where):
                where.fail(f"a cell tagged {SOLUTION_ONLY_TAG!r} cannot hold a graded check")
            plans.append(_CellPlan("dropped"))
            continue
        if cell.cell_type != "code":
            if _MARKER_WORDS.search(cell.source):
                where.fail("markers only work in code cells; tag a cell "
                           f"{SOLUTION_ONLY_TAG!r} to leave it out of the exercise")
            plans.append(_CellPlan("plain"))
            continue
        plan = _plan_code_cell(cell.source, index, where)
        if plan.regions or plan.kind == "test":
            source = _exercise_source(cell.source, plan)
            if _parse(source) is None:
                where.fail("the exercise version of this cell would not be valid Python")
            plan.exercise_source = _fold_hints(source) if plan.kind == "test" else source
        if plan.kind == "test":
            qid = plan.question.id
            if qid in seen:
                where.fail(f"question id {qid!r} is already used by cell {seen[qid] + 1}")
            seen[qid] = index
            plan.grade_id = qid
        plans.append(plan)
    _assign_answer_ids(plans, set(seen))
    return plans


def _assign_answer_ids(plans: list[_CellPlan], taken: set[str]) -> None:
    """Stable nbgrader ids for answer cells, from the function holding their solution."""
    for plan in plans:
        if plan.kind != "answer":
            continue
        base = "answer_" + re.sub(r"[^A-Za-z0-9_-]", "_", plan.function)
        grade_id, n = base, 1
        while grade_id in taken:
            n += 1
            grade_id = f"{base}_{n}"
        taken.add(grade_id)
        plan.grade_id = grade_id


# --------------------------------------------------------------------------
# Annotating solutions and making exercises
# --------------------------------------------------------------------------


def _nbgrader_metadata(plan: _CellPlan) -> dict | None:
    if plan.kind == "answer":
        return {"grade": False, "grade_id": plan.grade_id, "locked": False,
                "schema_version": 3, "solution": True, "task": False}
    if plan.kind == "test":
        return {"grade": True, "grade_id": plan.grade_id, "locked": True,
                "points": plan.question.points, "schema_version": 3, "solution": False,
                "task": False}
    return None


def _ensure_cell_ids(nb: NotebookNode) -> None:
    """Give id-less cells (nbformat >= 4.5) a deterministic id instead of a random one."""
    if (nb.nbformat, nb.nbformat_minor) < (4, 5):
        return
    taken = {c.get("id") for c in nb.cells}
    for index, cell in enumerate(nb.cells):
        if not cell.get("id"):
            digest = hashlib.sha1(f"{index}\0{cell.source}".encode()).hexdigest()
            new = next(digest[i:i + 8] for i in range(0, 33) if digest[i:i + 8] not in taken)
            cell["id"] = new
            taken.add(new)


def _annotate(nb: NotebookNode, plans: list[_CellPlan]) -> NotebookNode:
    out = copy.deepcopy(nb)
    for cell, plan in zip(out.cells, plans):
        wanted = _nbgrader_metadata(plan)
        if wanted is not None:
            cell.metadata["nbgrader"] = wanted
        else:
            old = cell.metadata.get("nbgrader", {})
            if old.get("grade") or old.get("solution"):  # stale: no longer graded
                del cell.metadata["nbgrader"]
    if out.metadata.get("kernelspec", {}).get("name") != "python3":
        out.metadata["kernelspec"] = dict(KERNELSPEC)
    _ensure_cell_ids(out)
    return out


def annotate_solution(nb: NotebookNode, name: str = "notebook") -> NotebookNode:
    """A copy of the solution notebook with nbgrader metadata on its answer and check cells."""
    return _annotate(nb, _plan(nb, name))


def questions(nb: NotebookNode, name: str = "notebook") -> list[Question]:
    """The graded questions of a solution notebook, in notebook order."""
    return [p.question for p in _plan(nb, name) if p.kind == "test"]


def make_exercise(nb: NotebookNode, name: str = "notebook") -> NotebookNode:
    """The student version of a solution notebook (the input is not modified)."""
    return _exercise(nb, _plan(nb, name))


@functools.cache
def _finishing() -> tuple:
    """nbgrader's preprocessors that clear outputs and run state, and lock the check cells."""
    from nbgrader.preprocessors import ClearOutput, LockCells  # slow: imported on use

    fields = {"collapsed", "scrolled", *_TIMING_KEYS}
    return ClearOutput(remove_metadata_fields=fields), LockCells(lock_solution_cells=False)


def _exercise(nb: NotebookNode, plans: list[_CellPlan]) -> NotebookNode:
    annotated = _annotate(nb, plans)  # a copy: its cells can be changed
    exercise = nbformat.v4.new_notebook()
    exercise.nbformat, exercise.nbformat_minor = annotated.nbformat, annotated.nbformat_minor
    exercise.metadata = _exercise_metadata(annotated.metadata)
    for cell, plan in zip(annotated.cells, plans):
        if plan.kind != "dropped":
            if plan.exercise_source is not None:
                cell.source = plan.exercise_source
            exercise.cells.append(cell)
    for step in _finishing():
        exercise, _ = step.preprocess(exercise, {})
    return exercise


def _exercise_metadata(metadata: NotebookNode) -> NotebookNode:
    """Notebook metadata for students: the plain python3 kernel, no run-specific details."""
    meta = copy.deepcopy(metadata)
    meta.pop("widgets", None)  # saved widget state belongs to a run, not to the exercise
    meta["kernelspec"] = dict(KERNELSPEC)
    # The Python version in language_info would change whenever an author re-runs
    # the solution; keep only what identifies the language.
    meta["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    return meta


# --------------------------------------------------------------------------
# Leak detection
# --------------------------------------------------------------------------

_TRIVIAL = re.compile(
    r"(pass|break|continue|return|else:|try:|finally:|except:|return [A-Za-z_]\w*|[A-Za-z_]\w*|\W*)"
)


def _secret_lines(solution: NotebookNode) -> dict[str, int]:
    """Substantive lines that only occur in solution blocks, hidden tests or dropped cells."""
    secrets: dict[str, int] = {}
    visible: set[str] = set()
    for index, cell in enumerate(solution.cells):
        lines = cell.source.splitlines()
        hidden_lines: set[int] = set()
        if SOLUTION_ONLY_TAG in _tags(cell):
            hidden_lines = set(range(len(lines)))
        elif cell.cell_type == "code":
            for r in _scan_regions(lines, _Where("solution", index, cell.source)):
                hidden_lines.update(range(r.begin + 1, r.end))
        for i, line in enumerate(lines):
            text = line.strip()
            if i in hidden_lines:
                secrets.setdefault(text, index)
            else:
                visible.add(text)
    return {text: index for text, index in secrets.items()
            if text not in visible and not _TRIVIAL.fullmatch(text)}


def find_leaks(solution_nb: NotebookNode, exercise_nb: NotebookNode) -> list[str]:
    """Markers and substantive solution or hidden-test lines found in the exercise.

    Lines that also appear in the visible part of the solution (and trivial
    lines such as ``pass``, ``return x`` or a lone bracket) are not secrets.
    """
    secrets = _secret_lines(solution_nb)
    leaks = []
    for index, cell in enumerate(exercise_nb.cells):
        texts = [cell.source] + [_output_text(o) for o in cell.get("outputs", [])]
        for n, line in enumerate("\n".join(texts).splitlines(), start=1):
            text = line.strip()
            if _MARKER_WORDS.search(text):
                leaks.append(f"exercise cell {index + 1}, line {n}: marker {text!r}")
            elif text in secrets:
                leaks.append(f"exercise cell {index + 1}, line {n}: {text!r} "
                             f"(secret text from solution cell {secrets[text] + 1})")
    return leaks


def _output_text(output: NotebookNode) -> str:
    if "text" in output:
        return output["text"]
    data = output.get("data", {})
    return data.get("text/plain", "") if isinstance(data.get("text/plain", ""), str) else ""


# --------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------


def _metadata_view(nb: NotebookNode) -> list:
    cells = [(c.get("metadata", {}), c.get("id")) for c in nb.cells]
    return [nb.metadata, *cells]


def generate(
    solutions_dir: str | os.PathLike = "solutions",
    exercises_dir: str | os.PathLike = "exercises",
    *,
    check_only: bool = False,
) -> list[Path]:
    """Write ``exercises_dir/X.ipynb`` for every ``solutions_dir/X.ipynb``.

    Solutions whose nbgrader metadata is missing or stale are annotated in
    place (metadata only). Returns the files written -- or, with
    ``check_only=True``, the stale files that would be written (nothing is).
    Every notebook is checked before anything is written.
    """
    solutions_dir, exercises_dir = Path(solutions_dir), Path(exercises_dir)
    if not solutions_dir.is_dir():
        raise NotebookError(f"no solutions folder {solutions_dir}: run from the repository root "
                            "or pass the folder that holds the solution notebooks")
    pending: list[tuple[Path, str]] = []
    for path in sorted(solutions_dir.glob("*.ipynb")):
        nb = read_notebook(path)
        plans = _plan(nb, str(path))
        annotated = _annotate(nb, plans)
        if _metadata_view(annotated) != _metadata_view(nb):
            pending.append((path, notebook_text(annotated)))
        target = exercises_dir / path.name
        text = notebook_text(_exercise(nb, plans))
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            pending.append((target, text))
    if not check_only:
        for path, text in pending:
            atomic_write(path, text)
    return [path for path, _ in pending]


def execute_in_place(path: str | os.PathLike, *, timeout: float = 600) -> None:
    """Run a solution notebook top to bottom in fast mode and save it with its outputs.

    The stored outputs are what strict nbval later compares against, so the
    run uses the notebook's folder as working directory and ``DGMLAB_FULL=0``,
    as the tests do, and any cell error aborts without touching the file.
    """
    from nbclient import NotebookClient

    from ..modes import FULL_ENV  # here, not at the top: dgmlab.modes loads torch

    path = Path(path)
    nb = read_notebook(path)
    try:
        NotebookClient(nb, kernel_name="python3", timeout=timeout, allow_errors=False,
                       resources={"metadata": {"path": str(path.parent)}}
                       ).execute(env={**os.environ, FULL_ENV: "0"})  # the kernel's environment
    except Exception as err:
        raise NotebookError(f"{path} failed to run, so it was left unchanged: {err}") from err
    for cell in nb.cells:
        for key in _TIMING_KEYS:
            cell.metadata.pop(key, None)
    atomic_write(path, notebook_text(nb))
