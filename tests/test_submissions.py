"""Tests of dgmlab.grading.submissions and dgmlab.grading.gradebook (fast: no kernels).

Finding and naming submissions, reading hostile or damaged files, matching
check cells by grade_id and cell id, and the gradebook written as each
student finishes (CSV injection, resuming a run, concurrent writers).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from dgmlab.grading import gradebook
from dgmlab.grading import notebooks as nbs
from dgmlab.grading.feedback import CheckResult
from dgmlab.grading.gradebook import (
    Gradebook,
    StudentResult,
    feedback_text,
    format_summary,
    zero_result,
)
from dgmlab.grading.submissions import (
    Submission,
    SubmissionError,
    digest,
    find_submissions,
    load_submission,
    prepare_submission,
    stems_for,
)

# --------------------------------------------------------------------------
# A tiny solution and its exercise
# --------------------------------------------------------------------------

ADD = '''def add(a, b):
    # Task: use the + operator.
    ### BEGIN SOLUTION
    return a + b
    ### END SOLUTION'''
CHECK_ADD = '''with check("q1_add", points=2):
    expect_equal(add(1, 2), 3, what="add(1, 2)")
    ### BEGIN HIDDEN TESTS
    expect_equal(add(-5, 5), 0, what="add(-5, 5)")
    ### END HIDDEN TESTS'''
SQUARE = '''def square(x):
    # Task: multiply x by itself.
    ### BEGIN SOLUTION
    return x * x
    ### END SOLUTION'''
CHECK_SQUARE = '''with check("q2_square", points=1):
    expect_equal(square(3), 9, what="square(3)")'''
# cell indices in both the solution and the exercise
SETUP, ANSWER1, TEST1, ANSWER2, TEST2 = range(5)


@pytest.fixture(scope="module")
def solution() -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_code_cell(c) for c in
                             ["from dgmlab.grading import check, expect_equal",
                              ADD, CHECK_ADD, SQUARE, CHECK_SQUARE]])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


@pytest.fixture
def exercise(solution) -> nbformat.NotebookNode:
    """The student's copy as Jupyter saves it, read back like a submission."""
    return nbformat.reads(nbs.notebook_text(nbs.make_exercise(solution)), as_version=4)


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def loaded(tmp_path: Path, nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``nb`` written as plain JSON (nbformat.writes would repair duplicate ids) and loaded."""
    return load_submission(write_json(tmp_path / "student.ipynb", nb))


SECOND_COPY = "A second copy of the check cell for q1_add was removed before grading."


def sha1_8(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------
# Finding submissions and naming their files
# --------------------------------------------------------------------------


def test_unsafe_and_case_colliding_names_get_distinct_deterministic_stems(tmp_path):
    names = ["a:b", "a_b", "Bob", "bob", "plain", "-rf", "x\ty", "é" * 100, f"a_b-{sha1_8('a:b')}"]
    for name in names:
        (tmp_path / f"{name}.ipynb").write_text("{}", encoding="utf-8")
    subs = find_submissions(tmp_path, "assignment.ipynb")
    stems = {s.student: s.stem for s in subs}
    assert sorted(stems) == sorted(names) and [s.student for s in subs] == sorted(names)
    assert stems["a:b"] == f"a_b-{sha1_8('a:b')}" and stems["plain"] == "plain"
    assert stems["Bob"] == f"Bob-{sha1_8('Bob')}" and stems["bob"] == f"bob-{sha1_8('bob')}"
    assert stems["-rf"] == f"_rf-{sha1_8('-rf')}"
    assert stems["x\ty"] == f"x_y-{sha1_8('x' + chr(9) + 'y')}"
    assert stems["é" * 100] == "é" * 80 + f"-{sha1_8('é' * 100)}"
    # a name chosen to equal another's hashed stem does not take it over
    assert stems[f"a_b-{sha1_8('a:b')}"] != stems["a:b"]
    assert len({s.casefold() for s in stems.values()}) == len(names)
    assert all(not set(s) & set('/\\:*?"<>|\t') and not s.startswith((".", "-"))
               for s in stems.values())
    assert stems_for(list(reversed(names))) == stems  # does not depend on order


def test_a_name_is_hashed_only_when_it_changed_or_clashes():
    assert stems_for(["alice", "bob_2", "Ünïcode name"]) == {
        "alice": "alice", "bob_2": "bob_2", "Ünïcode name": "Ünïcode name"}


def test_a_notebook_a_pdf_and_a_folder_of_one_name_are_one_student(tmp_path):
    (tmp_path / "alice.ipynb").write_text("{}", encoding="utf-8")
    (tmp_path / "alice.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "assignment.ipynb").write_text("{}", encoding="utf-8")
    (tmp_path / "bea").mkdir()  # only a folder with the notebook, and a PDF
    (tmp_path / "bea" / "assignment.ipynb").write_text("{}", encoding="utf-8")
    (tmp_path / "bea" / "data.csv").write_text("1", encoding="utf-8")
    (tmp_path / "bea.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "hal.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".alice.ipynb").write_text("{}", encoding="utf-8")
    alice, bea, hal = find_submissions(tmp_path, "assignment.ipynb")
    assert (alice.student, alice.path, alice.problem) == ("alice", tmp_path / "alice.ipynb", None)
    assert alice.notes == (
        "alice/ was ignored: only one submission per student is graded, alice.ipynb.",
        "alice.pdf was ignored: only one submission per student is graded, alice.ipynb.")
    assert (bea.path, bea.problem) == (tmp_path / "bea" / "assignment.ipynb", None)
    assert bea.notes == ("bea.pdf was ignored: only one submission per student is graded, "
                         "bea/assignment.ipynb.",)
    assert hal == Submission("hal", tmp_path / "hal.pdf", "hal",
                             "hal.pdf is a .pdf file, not a Jupyter notebook (.ipynb), so it could "
                             "not be graded. Submit the .ipynb file itself.")


def test_a_folder_without_a_clear_notebook_is_a_problem(tmp_path):
    (tmp_path / "cy").mkdir()
    for name in ("a.ipynb", "b.ipynb"):
        (tmp_path / "cy" / name).write_text("{}", encoding="utf-8")
    (tmp_path / "dee").mkdir()
    (tmp_path / "dee" / "mine.ipynb").write_text("{}", encoding="utf-8")
    cy, dee = find_submissions(tmp_path, "assignment.ipynb")
    assert cy.path == tmp_path / "cy" and cy.problem == (
        "the folder cy/ holds no notebook named assignment.ipynb and not exactly one other "
        "notebook (found: a.ipynb, b.ipynb).")
    assert dee.path == tmp_path / "dee" / "mine.ipynb" and dee.problem is None


def test_digest_of_a_file_and_of_a_folder(tmp_path):
    file = tmp_path / "a.ipynb"
    file.write_bytes(b"abc")
    assert digest(file) == hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.ipynb").write_bytes(b"1")
    (tmp_path / "f" / "y.csv").write_bytes(b"2")
    before = digest(tmp_path / "f")
    (tmp_path / "f" / "y.csv").write_bytes(b"3")
    assert digest(tmp_path / "f") != before
    (tmp_path / "f" / "y.csv").write_bytes(b"2")
    assert digest(tmp_path / "f") == before
    (tmp_path / "f" / "y.csv").rename(tmp_path / "f" / "z.csv")  # same bytes, other name
    assert digest(tmp_path / "f") != before


# --------------------------------------------------------------------------
# Reading a submission
# --------------------------------------------------------------------------


def test_deep_json_is_invalid_notebook_json_not_an_internal_error(tmp_path):
    deep = tmp_path / "deep.ipynb"
    deep.write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    with pytest.raises(SubmissionError, match=r"^deep\.ipynb is not valid notebook JSON "
                                              r"\(nested too deeply"):
        load_submission(deep)
    # below the parser's limit but deeper than any notebook: refused before nbformat sees it
    nested: dict = {}
    for _ in range(300):
        nested = {"x": nested}
    cell = new_code_cell("x = 1", metadata={"deep": nested})
    write_json(deep, {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [cell]})
    with pytest.raises(SubmissionError, match="nested too deeply"):
        load_submission(deep)


ODD_SHAPES = {
    "list": ([], "the file holds a list, not a notebook object"),
    "string": ("notebook", "the file holds a string"),
    "number": (4, "the file holds a number"),
    "null": (None, "the file holds null"),
    "no version": ({"cells": []}, 'its "nbformat" version should be 4, got none'),
    "version 5": ({"nbformat": 5, "cells": []}, 'its "nbformat" version should be 4, got 5'),
    "cells an object": ({"nbformat": 4, "cells": {}},
                        'its "cells" should be a list, got an object'),
    "no cells": ({"nbformat": 4}, 'its "cells" should be a list, got null'),
    "cell a number": ({"nbformat": 4, "cells": [1]}, "cell 1 should be an object, got a number"),
    "cell type a list": ({"nbformat": 4, "cells": [{"cell_type": ["code"]}]},
                         "cell 1 has cell_type ['code']"),
    "unknown cell type": ({"nbformat": 4, "cells": [{"cell_type": "code"}, {"cell_type": "x"}]},
                          "cell 2 has cell_type 'x'"),
    "source a number": ({"nbformat": 4, "cells": [{"cell_type": "code", "source": 5}]},
                        "the source of cell 1 should be text, got a number"),
    "source lines not text": ({"nbformat": 4, "cells": [{"cell_type": "code", "source": ["a", 1]}]},
                              "the source of cell 1 should be text, got a list"),
    "metadata a list": ({"nbformat": 4, "cells": [{"cell_type": "raw", "metadata": []}]},
                        "the metadata of cell 1 should be an object, got a list"),
}


@pytest.mark.parametrize("value, reason", list(ODD_SHAPES.values()), ids=list(ODD_SHAPES))
def test_json_of_another_shape_is_refused_with_its_reason(tmp_path, value, reason):
    path = write_json(tmp_path / "odd.ipynb", value)
    with pytest.raises(SubmissionError) as info:
        load_submission(path)
    assert str(info.value).startswith("odd.ipynb is JSON but not a Jupyter notebook (")
    assert reason in str(info.value)


def test_damaged_files_keep_todays_messages(tmp_path):
    (tmp_path / "gus.ipynb").write_text('{"cells": [', encoding="utf-8")
    with pytest.raises(SubmissionError, match=r"^gus\.ipynb is not valid notebook JSON \(Expecting "
                                              r"value at line 1, column 12\), so it could not be "
                                              r"graded\."):
        load_submission(tmp_path / "gus.ipynb")
    (tmp_path / "bin.ipynb").write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(SubmissionError, match=r"^bin\.ipynb is not a text file"):
        load_submission(tmp_path / "bin.ipynb")
    (tmp_path / "pdf.ipynb").write_bytes(b"%PDF-1.4\n")
    with pytest.raises(SubmissionError, match=r"^pdf\.ipynb is a PDF, not a Jupyter notebook"):
        load_submission(tmp_path / "pdf.ipynb")


def test_a_file_over_64_mb_is_refused_with_its_size(tmp_path):
    big = tmp_path / "big.ipynb"
    with open(big, "wb") as f:
        f.truncate(65 * 2**20)  # sparse: costs no disk
    with pytest.raises(SubmissionError, match=r"^big\.ipynb is 65 MB; the limit is 64 MB"):
        load_submission(big)


def test_a_clean_notebook_keeps_valid_cell_ids_only(tmp_path):
    cells = [new_code_cell("a = 1", id="keep-me_1"), new_code_cell("b = 2"),
             new_markdown_cell("# hi"), new_code_cell("c = 3")]
    nb = new_notebook(cells=cells)
    cells[2]["id"] = "not valid!"
    cells[3]["id"] = "x" * 65
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="junk")]
    path = write_json(tmp_path / "s.ipynb", nb)
    clean = load_submission(path)
    assert (clean.nbformat, clean.nbformat_minor) == (4, 5)
    assert [c.get("id") for c in clean.cells] == ["keep-me_1", cells[1].id, None, None]
    assert clean.cells[0].outputs == [] and clean.cells[0].source == "a = 1"


def test_an_nbformat_3_notebook_is_read_and_matched_by_grade_id(tmp_path, solution, exercise):
    v3 = nbformat.v4.downgrade(copy.deepcopy(exercise))
    path = tmp_path / "old.ipynb"
    path.write_text(nbformat.writes(v3, version=3), encoding="utf-8")
    nb = load_submission(path)
    assert (nb.nbformat, nb.nbformat_minor) == (4, 4)  # no ids: the conversion made them up
    assert [c.source for c in nb.cells] == [c.source for c in exercise.cells]
    assert all("id" not in c for c in nb.cells)
    prepared = prepare_submission(solution, nb)
    assert prepared.tests == {TEST1: "q1_add", TEST2: "q2_square"} and prepared.notes == []
    nbformat.validate(prepared.nb)


# --------------------------------------------------------------------------
# Putting the genuine check cells in place
# --------------------------------------------------------------------------


def test_an_untouched_exercise_gets_the_full_checks_in_place(tmp_path, solution, exercise):
    prepared = prepare_submission(solution, loaded(tmp_path, exercise))
    assert prepared.tests == {TEST1: "q1_add", TEST2: "q2_square"} and prepared.notes == []
    full = nbs.annotate_solution(solution)
    for index in (TEST1, TEST2):
        cell = prepared.nb.cells[index]
        assert cell.source == full.cells[index].source
        assert cell.id == full.cells[index].id == exercise.cells[index].id
        assert cell.metadata == full.cells[index].metadata
    assert "HIDDEN TESTS" in prepared.nb.cells[TEST1].source
    assert prepared.nb.cells[ANSWER1].source == exercise.cells[ANSWER1].source


def test_a_pasted_duplicate_above_the_answer_with_a_new_id_is_removed(tmp_path, solution, exercise):
    paste = new_code_cell('with check("q1_add", points=2):\n    pass',
                          metadata=copy.deepcopy(exercise.cells[TEST1].metadata))
    exercise.cells.insert(ANSWER1, paste)
    prepared = prepare_submission(solution, loaded(tmp_path, exercise))
    assert prepared.tests == {TEST1: "q1_add", TEST2: "q2_square"}  # the real one, in its place
    assert prepared.nb.cells[ANSWER1].source == exercise.cells[ANSWER1 + 1].source
    assert prepared.notes == [
        f"Cell {ANSWER1 + 1} claimed to be the check cell for q1_add but is not the exercise's own "
        "(its cell id differs: a copy or an edited cell); it was removed before grading."]


def test_of_two_copies_with_the_real_id_the_last_one_counts(tmp_path, solution, exercise):
    exercise.cells.insert(ANSWER1, copy.deepcopy(exercise.cells[TEST1]))  # same id, above answer
    exercise.cells[ANSWER1].source = "pass"
    prepared = prepare_submission(solution, loaded(tmp_path, exercise))
    assert prepared.tests == {TEST1: "q1_add", TEST2: "q2_square"}
    assert [c.source for c in prepared.nb.cells].count(prepared.nb.cells[TEST1].source) == 1
    assert prepared.notes == [SECOND_COPY]
    ids = [c.id for c in prepared.nb.cells]
    assert len(set(ids)) == len(ids)
    nbformat.validate(prepared.nb)


def test_a_cell_with_the_grade_id_but_another_id_is_not_the_check(tmp_path, solution, exercise):
    real_id = exercise.cells[TEST1].id
    exercise.cells[TEST1].id = "tampered"
    exercise.cells[TEST1].source = "pass"
    prepared = prepare_submission(solution, loaded(tmp_path, exercise))
    assert "pass" not in [c.source for c in prepared.nb.cells]
    last = len(prepared.nb.cells) - 1
    assert prepared.tests == {TEST2 - 1: "q2_square", last: "q1_add"}  # run at the end instead
    assert prepared.nb.cells[last].id == real_id
    assert prepared.nb.cells[last].source == nbs.annotate_solution(solution).cells[TEST1].source
    assert prepared.notes == [
        f"Cell {TEST1 + 1} claimed to be the check cell for q1_add but is not the exercise's own "
        "(its cell id differs: a copy or an edited cell); it was removed before grading.",
        "The check cell for q1_add was missing from the notebook; it was added back at the end "
        "and run there."]


def test_a_missing_check_is_added_at_the_end_in_solution_order(tmp_path, solution, exercise):
    del exercise.cells[TEST2]
    del exercise.cells[TEST1]
    exercise.cells.append(new_code_cell("print('mine')"))
    prepared = prepare_submission(solution, loaded(tmp_path, exercise))
    n = len(prepared.nb.cells)
    assert prepared.tests == {n - 2: "q1_add", n - 1: "q2_square"}
    assert prepared.nb.cells[n - 3].source == "print('mine')"
    assert prepared.notes == [
        f"The check cell for {q} was missing from the notebook; it was added back at the end "
        "and run there." for q in ("q1_add", "q2_square")]


def test_a_cell_with_the_checks_id_but_no_grade_id_keeps_its_code_under_a_new_id(
        tmp_path, solution, exercise):
    del exercise.cells[TEST1].metadata["nbgrader"]
    exercise.cells[TEST1].source = "print('not a check')"
    prepared = prepare_submission(solution, loaded(tmp_path, exercise))
    assert prepared.nb.cells[TEST1].source == "print('not a check')"
    assert list(prepared.tests.values()) == ["q2_square", "q1_add"]
    ids = [c.id for c in prepared.nb.cells]
    assert len(set(ids)) == len(ids) and ids[-1] == exercise.cells[TEST1].id
    nbformat.validate(prepared.nb)


def test_without_ids_in_the_solution_checks_match_by_grade_id(tmp_path, solution, exercise):
    old = copy.deepcopy(solution)
    old.nbformat_minor = 4
    for cell in old.cells:
        del cell["id"]
    exercise.cells.insert(0, copy.deepcopy(exercise.cells[TEST1]))
    exercise.cells[0].id = "pasted"
    prepared = prepare_submission(old, loaded(tmp_path, exercise))
    assert prepared.tests == {TEST1: "q1_add", TEST2: "q2_square"}  # the copy at 0 is gone
    assert prepared.notes == [SECOND_COPY]
    nbformat.validate(prepared.nb)


# --------------------------------------------------------------------------
# The gradebook
# --------------------------------------------------------------------------


def make_class(folder: Path, names: list[str]) -> list[Submission]:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.ipynb").write_text(f'{{"who": {json.dumps(name)}}}', encoding="utf-8")
    return find_submissions(folder, "assignment.ipynb")


def result_for(sub: Submission, book: Gradebook, points=(2, 0.5), isolated=True) -> StudentResult:
    qs = [CheckResult("q1_add", points[0], 2, "passed", f"✅ q1_add: {points[0]}/2 points."),
          CheckResult("q2_square", points[1], 1, "failed", "❌ q2_square: square(3): expected 9.")]
    return StudentResult(sub.student, sub.stem, qs, ["a note"], book.digest(sub), isolated,
                         Path("executed") / f"{sub.stem}.ipynb")


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_csv_cells_cannot_run_as_formulas_but_points_stay_numbers(tmp_path):
    names = ["=HYPERLINK(\"http:x\")", "+1", "@SUM(A1)", "-cmd", "\tx", "ok-name"]
    subs = make_class(tmp_path / "subs", names)
    book = Gradebook(tmp_path / "out", "assignment.ipynb", subs, "key")
    for sub in subs:
        result = result_for(sub, book)
        result.questions[1] = CheckResult("-q2", 0.5, 1, "failed", "x")
        book.record(result)
    rows = read_csv(tmp_path / "out" / "gradebook.csv")
    assert rows[0] == ["student", "question", "points", "max", "isolated"]
    students = {row[0] for row in rows[1:]}
    assert students == {"'" + n for n in names if n != "ok-name"} | {"ok-name"}
    assert {row[1] for row in rows[1:]} == {"q1_add", "'-q2"}
    assert {tuple(row[2:]) for row in rows[1:]} == {("2", "2", "yes"), ("0.5", "1", "yes")}


def test_the_gradebook_is_rewritten_after_each_student_in_order(tmp_path):
    subs = make_class(tmp_path / "subs", ["bo", "al"])
    book = Gradebook(tmp_path / "out", "assignment.ipynb", subs, "key")
    book.record(result_for(subs[1], book, isolated=False))  # bo first
    assert read_csv(tmp_path / "out" / "gradebook.csv")[1:] == [
        ["bo", "q1_add", "2", "2", "no"], ["bo", "q2_square", "0.5", "1", "no"]]
    assert (tmp_path / "out" / "feedback" / "bo.md").exists()
    book.record(result_for(subs[0], book, points=(0, 1)))
    assert [row[:3] for row in read_csv(tmp_path / "out" / "gradebook.csv")[1:]] == [
        ["al", "q1_add", "0"], ["al", "q2_square", "1"],
        ["bo", "q1_add", "2"], ["bo", "q2_square", "0.5"]]
    assert [r.student for r in book.results()] == ["al", "bo"]


def test_a_rerun_reuses_saved_results_only_for_the_same_bytes_and_key(tmp_path):
    subs = make_class(tmp_path / "subs", ["al", "bo"])
    out = tmp_path / "out"
    book = Gradebook(out, "assignment.ipynb", subs, "key")
    recorded = [result_for(sub, book) for sub in subs]
    for result in recorded:
        book.record(result)
    json.loads((out / "results" / "al.json").read_text(encoding="utf-8"))  # plain JSON
    again = Gradebook(out, "assignment.ipynb", subs, "key")
    assert [again.saved(sub) for sub in subs] == recorded
    assert again.results() == recorded
    assert all(Gradebook(out, "assignment.ipynb", subs, "other key").saved(s) is None for s in subs)
    subs[0].path.write_text('{"who": "al, changed"}', encoding="utf-8")
    changed = Gradebook(out, "assignment.ipynb", subs, "key")
    assert changed.saved(subs[0]) is None and changed.saved(subs[1]) == recorded[1]
    assert changed.results() == [recorded[1]]
    (out / "results" / "bo.json").write_text('{"format": 1, "student": ', encoding="utf-8")
    assert Gradebook(out, "assignment.ipynb", subs, "key").saved(subs[1]) is None
    (out / "results" / "bo.json").write_text('{"format": 1, "student": 3}', encoding="utf-8")
    assert Gradebook(out, "assignment.ipynb", subs, "key").saved(subs[1]) is None


def test_a_new_extra_file_of_a_student_invalidates_the_saved_result(tmp_path):
    subs = make_class(tmp_path / "subs", ["al"])
    book = Gradebook(tmp_path / "out", "assignment.ipynb", subs, "key")
    book.record(result_for(subs[0], book))
    (tmp_path / "subs" / "al.pdf").write_bytes(b"%PDF")  # the result would lack the note
    (now,) = find_submissions(tmp_path / "subs", "assignment.ipynb")
    assert now.notes
    assert Gradebook(tmp_path / "out", "assignment.ipynb", [now], "key").saved(now) is None


def test_a_file_name_that_is_not_utf8_is_graded_and_written(tmp_path):
    folder = tmp_path / "subs"
    folder.mkdir()
    os.close(os.open(os.fsencode(folder) + b"/r\xe9my.ipynb", os.O_CREAT | os.O_WRONLY))
    (sub,) = find_submissions(folder, "assignment.ipynb")
    assert sub.student == "r\udce9my"
    assert sub.stem == "r_my-" + hashlib.sha1(b"r\xe9my").hexdigest()[:8]
    book = Gradebook(tmp_path / "out", "assignment.ipynb", [sub], "key")
    book.record(result_for(sub, book))
    assert read_csv(tmp_path / "out" / "gradebook.csv")[1][0] == "r\ufffdmy"
    feedback = (tmp_path / "out" / "feedback" / f"{sub.stem}.md").read_text(encoding="utf-8")
    assert feedback.startswith("# Feedback for r\ufffdmy\n")
    assert Gradebook(tmp_path / "out", "assignment.ipynb", [sub], "key").saved(sub) is not None


def test_a_saved_result_with_wrong_types_or_for_another_student_is_not_reused(tmp_path):
    subs = make_class(tmp_path / "subs", ["al", "bo"])
    out = tmp_path / "out"
    book = Gradebook(out, "assignment.ipynb", subs, "key")
    book.record(result_for(subs[0], book))
    data = json.loads((out / "results" / "al.json").read_text(encoding="utf-8"))
    data["questions"][0]["points"] = "2"
    (out / "results" / "al.json").write_text(json.dumps(data), encoding="utf-8")
    assert Gradebook(out, "assignment.ipynb", subs, "key").saved(subs[0]) is None
    book.record(result_for(subs[0], book))
    (out / "results" / "al.json").replace(out / "results" / "bo.json")  # al's result, bo's name
    assert Gradebook(out, "assignment.ipynb", subs, "key").saved(subs[1]) is None


def test_students_no_longer_handed_in_leave_the_gradebook(tmp_path):
    subs = make_class(tmp_path / "subs", ["al", "bo"])
    out = tmp_path / "out"
    book = Gradebook(out, "assignment.ipynb", subs, "key")
    for sub in subs:
        book.record(result_for(sub, book))
    subs[1].path.unlink()
    fewer = find_submissions(tmp_path / "subs", "assignment.ipynb")
    book = Gradebook(out, "assignment.ipynb", fewer, "key")
    assert [r.student for r in book.results()] == ["al"]
    book.record(result_for(fewer[0], book, points=(1, 1)))
    assert {row[0] for row in read_csv(out / "gradebook.csv")[1:]} == {"al"}
    with pytest.raises(ValueError, match="no current submission of 'bo'"):
        book.record(result_for(subs[1], book))


def test_recording_from_eight_threads_keeps_every_row(tmp_path, monkeypatch):
    subs = make_class(tmp_path / "subs", [f"s{i:02d}" for i in range(24)])
    book = Gradebook(tmp_path / "out", "assignment.ipynb", subs, "key")
    write, writing, overlaps = gradebook.atomic_write, threading.Semaphore(1), []

    def slow_write(path, data):
        """A write that notes whether another one is under way (they must take turns)."""
        if not writing.acquire(blocking=False):
            overlaps.append(path.name)
            return write(path, data)
        try:
            time.sleep(0.002)
            return write(path, data)
        finally:
            writing.release()

    monkeypatch.setattr(gradebook, "atomic_write", slow_write)
    results = [result_for(sub, book) for sub in subs]
    barrier = threading.Barrier(8)
    errors = []

    def work(part: list[StudentResult]) -> None:
        try:
            barrier.wait()
            for result in part:
                book.record(result)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(results[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and overlaps == []
    rows = read_csv(tmp_path / "out" / "gradebook.csv")[1:]
    assert [row[0] for row in rows] == [s.student for s in subs for _ in range(2)]
    assert len(list((tmp_path / "out" / "results").iterdir())) == 24
    assert not [p for p in (tmp_path / "out").rglob(".*")]  # no temporary files left


def test_zero_result_marks_every_question_not_graded(tmp_path):
    sub = Submission("gus", tmp_path / "gus.ipynb", "gus", None, ("gus.pdf was ignored: ...",))
    qs = nbs.questions(new_notebook(cells=[new_code_cell(CHECK_ADD), new_code_cell(CHECK_SQUARE)]))
    result = zero_result(sub, qs, "gus.ipynb is not valid notebook JSON", digest="d",
                         isolated=False)
    assert [(q.question, q.points, q.max, q.status) for q in result.questions] == [
        ("q1_add", 0, 2, "not_run"), ("q2_square", 0, 1, "not_run")]
    assert result.questions[1].message == "❌ q2_square: 0/1 point. Not graded (see the notes)."
    assert result.notes == ["gus.pdf was ignored: ...", "gus.ipynb is not valid notebook JSON"]
    assert (result.total, result.max_total, result.digest, result.isolated) == (0, 3, "d", False)


def test_feedback_keeps_names_and_messages_inside_their_markdown(tmp_path):
    qs = [CheckResult("q1_add", 0, 2, "failed", "❌ q1_add: got ```\n# Full marks\n``` x"),
          CheckResult("q2_square", 1, 1, "passed", "✅ q2_square: 1/1 point.")]
    result = StudentResult("*bold* `x`\n# h1 [a](b)", "st", qs, ["note\nwith ``` fence"],
                           isolated=False)
    text = feedback_text(result, "assignment.ipynb")
    heading = text.splitlines()[0]
    assert heading == r"# Feedback for \*bold\* \`x\` \# h1 \[a\](b)"
    assert text.count("```") == 4  # two fences open and close, nothing else
    assert "Total: **1 / 3 points**" in text and "| q1_add | 0 / 2 | failed |" in text
    assert "not isolated" in text
    assert "- note with ''' fence" in text
    assert "not isolated" not in feedback_text(StudentResult("a", "a", qs), "assignment.ipynb")


def test_summary_shows_points_and_first_note_without_control_characters():
    qs = [CheckResult("q1_add", 2, 2, "passed", "")]
    rows = format_summary([StudentResult("al\x1b[2J", "al", qs, ["first\nnote", "second"]),
                           StudentResult("bo", "bo", qs)]).splitlines()
    assert rows[0].split() == ["student", "points", "notes"]
    assert rows[1].split() == ["al?[2J", "2/2", "first", "note"]
    assert rows[2].split() == ["bo", "2/2"]
