"""The real exercise notebooks: generated, leak-free, consistent and runnable.

One set of tests per ``solutions/*.ipynb``; with no solution notebooks yet,
pytest reports the parametrized tests as skipped ("empty parameter set").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nbclient import NotebookClient

from dgmlab.grading import notebooks as nbs

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"
NOTEBOOKS = sorted(SOLUTIONS.glob("*.ipynb"))

per_notebook = pytest.mark.parametrize("solution", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


@pytest.fixture(scope="module")
def stale() -> set[Path]:
    """Files the generator would rewrite (computed once for all notebooks)."""
    return set(nbs.generate(SOLUTIONS, EXERCISES, check_only=True)) if NOTEBOOKS else set()


def exercise_of(solution: Path) -> Path:
    return EXERCISES / solution.name


def test_every_exercise_has_a_solution():
    orphans = [p.name for p in EXERCISES.glob("*.ipynb") if not (SOLUTIONS / p.name).exists()]
    assert orphans == [], "exercises without a solution notebook (delete or add the solution)"


@per_notebook
def test_exercise_exists(solution):
    assert exercise_of(solution).is_file(), "run `python -m dgmlab.grading generate`"


@per_notebook
def test_exercise_is_what_the_generator_produces(solution, stale):
    assert exercise_of(solution) not in stale, "stale: run `python -m dgmlab.grading generate`"


@per_notebook
def test_solution_nbgrader_metadata_is_up_to_date(solution, stale):
    assert solution not in stale, "stale metadata: run `python -m dgmlab.grading generate`"
    nb = nbs.read_notebook(solution)
    questions = nbs.questions(nb, str(solution))
    assert questions, "a graded notebook needs at least one `with check(...)` cell"
    for q in questions:
        meta = nb.cells[q.cell].metadata.get("nbgrader", {})
        assert (meta.get("grade"), meta.get("grade_id"), meta.get("points")) == (True, q.id, q.points)
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "nbgrader grade ids must be unique"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@per_notebook
def test_score_cell_states_the_notebooks_points_and_questions(solution):
    nb = nbs.read_notebook(solution)
    questions = nbs.questions(nb, str(solution))
    score = [c.source for c in nb.cells if c.cell_type == "code"
             and re.search(r"of [\d.]+ points; ", c.source) and "questions" in c.source]
    assert len(score) == 1, "expected one score cell printing 'N of P points; ... of the Q questions'"
    points = float(re.search(r"of ([\d.]+) points; ", score[0]).group(1))
    count = int(re.search(r"of the (\d+) questions", score[0]).group(1))
    assert (points, count) == (sum(q.points for q in questions), len(questions)), (
        "the score cell's totals disagree with the check(...) cells: update the numbers it prints")


@per_notebook
def test_exercise_leaks_no_solution(solution):
    leaks = nbs.find_leaks(nbs.read_notebook(solution), nbs.read_notebook(exercise_of(solution)))
    assert leaks == []


@per_notebook
def test_exercise_runs_and_every_question_is_not_attempted(solution, monkeypatch):
    monkeypatch.setenv("DGMLAB_FULL", "0")  # the kernel inherits it: fast mode, as students get
    questions = nbs.questions(nbs.read_notebook(solution), str(solution))
    nb = nbs.read_notebook(exercise_of(solution))
    NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=True,
                   resources={"metadata": {"path": str(EXERCISES)}}).execute()
    errors = [(i + 1, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells)
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == [], "the exercise notebook must run to its end without errors"
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    for q in questions:
        assert f"⏳ {q.id}: not attempted yet" in printed


# --------------------------------------------------------------------------
# Grading a class: one real chapter, end to end (the synthetic assignments in
# test_grading.py cover every failure mode; this proves the real notebooks work).
# --------------------------------------------------------------------------
def _answer_cells(nb) -> dict[str, int]:
    return {c.metadata["nbgrader"]["grade_id"]: i for i, c in enumerate(nb.cells)
            if c.metadata.get("nbgrader", {}).get("solution")}


def _student_with(exercise, solution, override: dict[int, str] | None = None):
    """The exercise with every answer filled in from the solution; ``override`` appends code to answer k."""
    import ast
    import copy

    nb = copy.deepcopy(exercise)
    sol_cells = _answer_cells(solution)
    for k, (grade_id, i) in enumerate(_answer_cells(nb).items()):
        src = solution.cells[sol_cells[grade_id]].source
        if override and k in override:
            name = next(n.name for n in ast.parse(src).body if isinstance(n, ast.FunctionDef))
            src += f"\n\n\ndef {name}(*args, **kwargs):\n" + override[k]
        nb.cells[i].source = src
    return nb


def _question_after(nb, cell: int, qs) -> str:
    """The question whose check cell is the first one after ``cell``."""
    return min((q for q in qs if q.cell > cell), key=lambda q: q.cell).id


@pytest.mark.skipif(not NOTEBOOKS, reason="no solution notebooks yet")
def test_grading_a_class_of_real_submissions(tmp_path):
    import time

    import nbformat

    from dgmlab.grading import grader

    solution_path = NOTEBOOKS[0]
    solution = nbs.read_notebook(solution_path)
    exercise = nbs.read_notebook(exercise_of(solution_path))
    qs = nbs.questions(solution, str(solution_path))
    full = {q.id: q.points for q in qs}
    answers = list(_answer_cells(exercise).values())
    raising_q = _question_after(exercise, answers[0], qs)
    looping_q = _question_after(exercise, answers[1], qs)

    subs = tmp_path / "submissions"
    subs.mkdir()
    nbformat.write(_student_with(exercise, solution), subs / "ada.ipynb")
    nbformat.write(exercise, subs / "bob.ipynb")  # handed in untouched
    nbformat.write(_student_with(exercise, solution, {0: "    raise ValueError('an honest bug')\n"}),
                   subs / "cyd.ipynb")
    nbformat.write(_student_with(exercise, solution, {1: "    while True:\n        pass\n"}), subs / "dee.ipynb")
    (subs / "eve.pdf").write_bytes(b"%PDF-1.4\n% my answers, printed\n")

    start = time.monotonic()
    results = {r.student: r for r in grader.grade(solution_path, subs, tmp_path / "grades",
                                                    cell_timeout=40, timeout=300, jobs=2)}
    elapsed = time.monotonic() - start

    points = {name: {q.question: q.points for q in r.questions} for name, r in results.items()}
    notes = {name: r.notes for name, r in results.items()}  # shown when an assertion fails
    assert points["ada"] == full, notes["ada"]
    assert points["bob"] == {q: 0 for q in full}, notes["bob"]
    assert all(q.status == "not_attempted" for q in results["bob"].questions), \
        [(q.question, q.status, q.message) for q in results["bob"].questions]
    assert points["cyd"] == {**full, raising_q: 0}, notes["cyd"]
    assert points["dee"] == {**full, looping_q: 0}, notes["dee"]
    assert points["eve"] == {q: 0 for q in full} and "not a Jupyter notebook" in " ".join(results["eve"].notes)
    assert elapsed < 200, f"grading took {elapsed:.0f} s"

    rows = (tmp_path / "grades" / "gradebook.csv").read_text().splitlines()
    assert rows[0] == "student,question,points,max,isolated" and len(rows) == 1 + 5 * len(full)
    feedback = (tmp_path / "grades" / "feedback" / "cyd.md").read_text()
    assert "ValueError" in feedback and "an honest bug" in feedback
