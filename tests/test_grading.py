"""Tests of dgmlab.grading: student feedback, exercise generation and the grader.

The end-to-end test grades a small synthetic assignment (only light imports,
so kernels start fast) with submissions that crash, hang, kill their kernel or
are not notebooks at all, with short time limits.
"""

from __future__ import annotations

import copy
import csv
import itertools
import linecache
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from dgmlab.grading import (
    CheckFailed,
    check,
    expect_close,
    expect_equal,
    expect_function_matches,
    expect_shape,
    expect_true,
    results,
)
from dgmlab.grading import notebooks as nbs
from dgmlab.grading.cli import main as cli_main
from dgmlab.grading.grader import grade, sandbox_available
from dgmlab.grading.feedback import fold, unfold

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

_cells = itertools.count()


def run_cell(source: str, namespace: dict) -> None:
    """Execute ``source`` the way ipykernel runs a notebook cell (same kind of file name)."""
    filename = f"/tmp/ipykernel_4242/{next(_cells)}.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)


def verdict(capsys, source: str, answer: str = "", **names) -> str:
    """Define ``answer`` in one cell, run the check cell ``source`` in another; return stdout."""
    namespace = {"check": check, "expect_close": expect_close, "expect_equal": expect_equal,
                 "expect_function_matches": expect_function_matches, **names}
    if answer:
        run_cell(answer, namespace)
    capsys.readouterr()
    run_cell(source, namespace)
    return capsys.readouterr().out


def expect_failure(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckFailed) as info:
        fn(*args, **kwargs)
    return str(info.value)


STUB = ('def mle(x):\n    # YOUR CODE HERE\n'
        '    raise NotImplementedError("Replace this line with your code. Hint: h")\n')


# --------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------


def test_passed_verdict(capsys):
    out = verdict(capsys, 'with check("q1_mle", points=2):\n    expect_close(mle([1, 0, 1, 1]), 0.75)\n',
                  "def mle(x):\n    return sum(x) / len(x)\n")
    assert out == "✅ q1_mle: 2/2 points.\n"
    assert results()[-1].passed and results()[-1].points == 2


def test_not_attempted_verdict_names_the_function_to_fill_in(capsys):
    out = verdict(capsys, 'with check("q1_mle", points=2, hint="ignored"):\n    mle([1])\n', STUB)
    assert out == ("⏳ q1_mle: not attempted yet (0/2 points). Fill in mle above, run that cell, "
                   "then run this one again.\n")


def test_failed_verdict_says_what_expected_got_and_hint(capsys):
    out = verdict(capsys, 'with check("q1_mle", points=2, hint="Count the ones and divide by the '
                  'number of tosses."):\n    expect_close(mle([1, 0, 1, 1]), 0.75, '
                  'what="mle([1, 0, 1, 1])")\n', "def mle(x):\n    return 0.5\n")
    assert out == ("❌ q1_mle: 0/2 points. mle([1, 0, 1, 1]): expected 0.75, got 0.5.\n"
                   "Hint: Count the ones and divide by the number of tosses.\n")
    assert results()[-1].status == "failed"


def test_name_error_in_check_cell_says_to_run_the_cells_above(capsys):
    out = verdict(capsys, 'with check("q2", points=1):\n    expect_close(not_defined_yet(1), 1)\n')
    assert out == ("❌ q2: 0/1 point. The name 'not_defined_yet' is not defined. Run the cells "
                   "above this one (top to bottom) first, then run this one again.\n")


def test_name_error_inside_student_function_points_at_it(capsys):
    out = verdict(capsys, 'with check("q2", points=1):\n    mle([1])\n',
                  "def mle(x):\n    return torhc.mean(x)\n")
    assert "The name 'torhc' is not defined, in mle (line 2 of its cell): return torhc.mean(x)." in out


def test_other_exception_points_at_the_students_line_not_the_library(capsys):
    answer = "import json\n\ndef parse(text):\n    data = json.loads(text)\n    return data\n"
    out = verdict(capsys, 'with check("q3", points=1, hint="Check the input."):\n    parse("{")\n',
                  answer)
    assert out.startswith("❌ q3: 0/1 point. Your code raised JSONDecodeError: ")
    assert "in parse (line 4 of its cell): data = json.loads(text)." in out
    assert out.endswith("\nHint: Check the input.\n")
    assert "Traceback" not in out and "decoder.py" not in out


def test_exception_in_the_check_cell_itself(capsys):
    out = verdict(capsys, 'with check("q3", points=1):\n    x = 1\n    y = x / 0\n')
    assert out == ("❌ q3: 0/1 point. Your code raised ZeroDivisionError: division by zero, "
                   "at line 3 of this check cell: y = x / 0.\n")


def test_plain_assert_in_check_cell_is_a_failed_expectation(capsys):
    out = verdict(capsys, 'with check("q4", points=1):\n    assert 1 + 1 == 3, "Arithmetic is broken"\n')
    assert out == "❌ q4: 0/1 point. Arithmetic is broken.\n"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupt_is_recorded_then_reraised(capsys, exc):
    with pytest.raises(exc):
        with check("q5_slow", points=3):
            raise exc()
    assert capsys.readouterr().out == (
        "⏱ q5_slow: interrupted / took too long (0/3 points). The check was stopped before it "
        "finished: look for an endless loop or a very slow computation, then run this cell again.\n")
    assert results()[-1].status == "interrupted"


def test_a_students_exception_from_the_sandbox_names_their_line_and_is_withheld_in_hidden_tests(capsys):
    from dgmlab.grading import feedback
    from dgmlab.grading.link import student_exception

    reply = {"type": "ZeroDivisionError", "message": "secret 4242",
             "frames": [["<ipython-input-3-abc>", "add", 2, "return a / 0"]]}

    def add(*args):
        raise student_exception(reply)

    cell = 'with check("q1", points=1):\n    add(1, 2)\nwith check("q2", points=1):\n    add(3, 4)\n'
    feedback.HIDDEN_LINES["<cell 99>"] = {4}  # the second call is a hidden test
    try:
        exec(compile(cell, "<cell 99>", "exec"), {"check": check, "add": add})
    finally:
        del feedback.HIDDEN_LINES["<cell 99>"]
    visible, hidden = capsys.readouterr().out.splitlines()
    assert visible == ("❌ q1: 0/1 point. Your code raised ZeroDivisionError: secret 4242, in add "
                       "(line 2 of its cell): return a / 0.")
    assert hidden == "❌ q2: 0/1 point. Your code raised ZeroDivisionError in a hidden test, in add (line 2 of its cell): return a / 0."


def test_check_refuses_bad_arguments():
    with pytest.raises(ValueError, match="question id"):
        check("", points=1)
    with pytest.raises(ValueError, match="positive number of points"):
        check("q1", points=0)


# --------------------------------------------------------------------------
# Expectation messages
# --------------------------------------------------------------------------


def test_expect_close_accepts_close_values_of_any_kind():
    expect_close(torch.tensor(0.75), 0.75)
    expect_close(np.array([1.0, 2.0]), [1.0, 2.0 + 1e-9])
    expect_close([1, 2], torch.tensor([1.0, 2.0]))
    expect_close(float("nan"), float("nan"))
    expect_close([torch.tensor(1.0, requires_grad=True), torch.tensor(2.0)], [1.0, 2.0])


def test_expect_close_messages():
    assert expect_failure(expect_close, torch.tensor(0.675), 0.75, what="mle(x)") == (
        "mle(x): expected 0.75, got tensor(0.675).")
    assert expect_failure(expect_close, torch.zeros(3), torch.zeros(3, 1)) == (
        "The result: expected tensor of shape (3, 1): [0, 0, 0], got tensor of shape (3,): "
        "[0, 0, 0]. The shapes differ: expected (3, 1), got (3,).")
    got = torch.arange(6.0).reshape(2, 3)
    want = got.clone()
    want[1, 2] = 9.0
    want[0, 0] = 0.5
    assert expect_failure(expect_close, got, want, what="f(x)") == (
        "f(x): expected tensor of shape (2, 3): [0.5, 1, 2, 3, ...], got tensor of shape (2, 3): "
        "[0, 1, 2, 3, ...]. 2 of 6 entries differ; the worst is at index [1, 2]: expected 9, got 5.")
    assert expect_failure(expect_close, "abc", 1.0) == (
        "The result: expected 1, got 'abc'. Expected a number or an array of numbers, not a str.")
    assert expect_failure(expect_close, 1 / 3, 0.333333333, atol=0, rtol=0) == (
        "The result: expected 0.333333, got 0.333333. At full precision: expected 0.333333333, "
        "got 0.3333333333333333.")


def test_expect_close_hints_at_a_missing_return():
    with pytest.raises(CheckFailed) as info:
        expect_close(None, 0.5, what="f(1)")
    assert str(info.value) == "f(1): expected 0.5, got None."
    assert info.value.hint == "Did your function forget to return its result?"
    assert (info.value.what, info.value.expected, info.value.got) == ("f(1)", "0.5", "None")


def test_expect_equal_messages():
    expect_equal(torch.tensor([1, 2]), [1, 2])
    assert expect_failure(expect_equal, [1, 2], (1, 2), what="pair") == (
        "pair: expected (1, 2), got [1, 2].")
    assert expect_failure(expect_equal, np.ones((2, 2)), np.ones(4)) == (
        "The result: expected array of shape (4,): [1, 1, 1, 1], got array of shape (2, 2): "
        "[1, 1, 1, 1]. The shapes differ: expected (4,), got (2, 2).")
    # Values are summarised without memory addresses, so stored outputs stay stable.
    assert expect_failure(expect_equal, object(), 3) == "The result: expected 3, got <object object>."
    assert expect_failure(expect_equal, list(range(10)), []) == (
        "The result: expected [], got list of 10 items: [0, 1, 2, ...].")


def test_expect_true_and_expect_shape_messages():
    expect_true(torch.tensor([True, True]), "unused")
    assert expect_failure(expect_true, False, "x_hat should be binary") == "x_hat should be binary."
    expect_shape(torch.zeros(5, 3), (None, 3))
    assert expect_failure(expect_shape, torch.zeros(3), (None, 3), what="encode(x)") == (
        "encode(x): expected shape (N, 3), got shape (3,).")
    assert expect_failure(expect_shape, 0.5, (2,)) == (
        "The result: expected a tensor of shape (2,), got 0.5.")


def test_expect_function_matches_reports_the_first_differing_case():
    def double(x, factor=2):
        return x * factor

    expect_function_matches(double, lambda x, factor=2: x * factor, [(1,), {"x": 2, "factor": 3}, 4])
    assert expect_failure(expect_function_matches, double, lambda x, factor=2: x + factor,
                          [(2,), {"x": 3, "factor": 3}], what="double") == (
        "double(x=3, factor=3) returned 9, expected 6.")
    message = expect_failure(expect_function_matches, lambda: (torch.ones(2), 3),
                             lambda: (torch.ones(2) * 2, 3), [()], what="enc")
    assert message == ("enc() returned (tensor of shape (2,), 3), expected (tensor of shape (2,), 3). "
                       "Item 0 differs: 2 of 2 entries differ; the worst is at index 0: expected 2, "
                       "got 1.")


def test_expect_function_matches_reports_an_exception_with_its_case(capsys):
    answer = "def inverse(x):\n    return 1 / x\n"
    out = verdict(capsys, 'with check("q6", points=1):\n'
                  '    expect_function_matches(inverse, lambda x: x, [(1.0,), (0.0,)])\n', answer)
    assert out == ("❌ q6: 0/1 point. inverse(0) raised ZeroDivisionError: float division by zero, "
                   "in inverse (line 2 of its cell): return 1 / x.\n")


def test_expect_function_matches_lets_stubs_count_as_not_attempted(capsys):
    out = verdict(capsys, 'with check("q7", points=1):\n'
                  '    expect_function_matches(mle, lambda x: x, [(1,)])\n', STUB)
    assert out.startswith("⏳ q7: not attempted yet (0/1 point). Fill in mle above")


def test_expect_function_matches_gives_each_function_its_own_arguments():
    def mutating(xs):
        xs.append(0)
        return len(xs)

    expect_function_matches(mutating, mutating, [([1, 2],)])


# --------------------------------------------------------------------------
# Exercise generation
# --------------------------------------------------------------------------

ANSWER = '''def bernoulli_mle(x):
    """Return the MLE of a Bernoulli parameter."""
    # Task: return the maximum-likelihood estimate of a Bernoulli parameter from the tosses x.
    ### BEGIN SOLUTION
    heads = sum(x)
    return heads / len(x)
    ### END SOLUTION'''

TEST = '''with check("q1_bernoulli_mle", points=2, hint="Count the ones."):
    expect_close(bernoulli_mle([1, 0, 1, 1]), 0.75, what="bernoulli_mle([1, 0, 1, 1])")
    ### BEGIN HIDDEN TESTS
    expect_close(bernoulli_mle([1] * 10), 1.0, what="bernoulli_mle of ten heads")
    ### END HIDDEN TESTS'''


def solution_nb(*cells) -> nbformat.NotebookNode:
    """A solution notebook: strings become code cells."""
    nb = new_notebook(cells=[new_code_cell(c) if isinstance(c, str) else c for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def coin_solution() -> nbformat.NotebookNode:
    answer = new_code_cell(ANSWER, execution_count=3, outputs=[new_output("stream", text="hi\n")],
                           metadata={"execution": {"iopub.execute_input": "2024-01-01T00:00:00Z"}})
    return solution_nb(new_markdown_cell("# Coins"),
                       "from dgmlab.grading import check, expect_close", answer, TEST,
                       new_code_cell("print(bernoulli_mle([1, 1]))",
                                     metadata={"tags": ["solution-only"]}))


def test_exercise_replaces_solutions_with_stubs_that_state_the_task():
    exercise = nbs.make_exercise(coin_solution(), "coins.ipynb")
    assert exercise.cells[2].source == (
        'def bernoulli_mle(x):\n    """Return the MLE of a Bernoulli parameter."""\n'
        "    # Task: return the maximum-likelihood estimate of a Bernoulli parameter from the tosses x.\n"
        "    # YOUR CODE HERE\n"
        '    raise NotImplementedError("Replace this line with your code. Task: return the '
        'maximum-likelihood estimate of a Bernoulli parameter from the tosses x.")')


def test_multi_line_task_is_joined():
    answer = ("def f(x):\n    # Some context.\n    # Task: first part,\n    #   second part.\n"
              "    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION")
    exercise = nbs.make_exercise(solution_nb(answer))
    assert "Task: first part, second part.\")" in exercise.cells[0].source


def test_each_solution_block_of_a_cell_gets_its_own_task_in_its_stub():
    tasks = ['say "hi" \\ {twice}', "ü ≤ 2, then 'x'"]
    answer = (f"def f(x):\n    # Task: {tasks[0]}\n    ### BEGIN SOLUTION\n    y = 1\n    ### END SOLUTION\n"
              f"    if x:\n        # Task: {tasks[1]}\n        ### BEGIN SOLUTION\n        y = 2\n"
              "        ### END SOLUTION\n    return y\n")
    source = nbs.make_exercise(solution_nb(answer)).cells[0].source
    lines = source.splitlines()
    assert lines[0] == "def f(x):" and source.endswith("    return y\n")  # the rest kept as it was
    stubs = [line for line in lines if "YOUR CODE HERE" in line or "NotImplementedError" in line]
    assert [line[:len(line) - len(line.lstrip())] for line in stubs] == [" " * 4] * 2 + [" " * 8] * 2
    texts = [eval(line.strip().removeprefix("raise NotImplementedError")) for line in stubs[1::2]]
    assert texts == [f"Replace this line with your code. Task: {t}" for t in tasks]
    assert "ü ≤ 2" in stubs[3]  # readable in the notebook, not \u-escaped


def test_a_hint_above_a_solution_is_refused_because_students_would_see_it_first():
    answer = "def f(x):\n    # Hint: add one.\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION"
    with pytest.raises(nbs.NotebookError, match=r"shown before the student answers.*check\(\.\.\., hint=\.\.\.\)"):
        nbs.make_exercise(solution_nb(answer))


def test_exercise_drops_hidden_tests_solution_only_cells_and_run_state():
    solution = coin_solution()
    exercise = nbs.make_exercise(solution, "coins.ipynb")
    assert len(exercise.cells) == 4  # the solution-only cell is gone
    visible = TEST.split("\n    ### BEGIN")[0]  # the hidden tests gone, the hint folded
    assert exercise.cells[3].source == visible.replace('"Count the ones."', f'"{fold("Count the ones.")}"')
    answer = exercise.cells[2]
    assert answer.outputs == [] and answer.execution_count is None
    assert "execution" not in answer.metadata
    solution.cells[2].metadata.update(ExecuteTime={"end_time": "2024-01-01"}, scrolled=True)
    assert not {"ExecuteTime", "scrolled"} & set(nbs.make_exercise(solution).cells[2].metadata)
    assert exercise.metadata["kernelspec"]["name"] == "python3"
    assert solution.cells[2].outputs  # the input is left alone


def test_nbgrader_metadata_on_both_versions():
    annotated = nbs.annotate_solution(coin_solution(), "coins.ipynb")
    exercise = nbs.make_exercise(coin_solution(), "coins.ipynb")
    answer_meta = {"grade": False, "grade_id": "answer_bernoulli_mle", "locked": False,
                   "schema_version": 3, "solution": True, "task": False}
    test_meta = {"grade": True, "grade_id": "q1_bernoulli_mle", "locked": True, "points": 2,
                 "schema_version": 3, "solution": False, "task": False}
    for nb in (annotated, exercise):
        assert nb.cells[2].metadata["nbgrader"] == answer_meta
        assert nb.cells[3].metadata["nbgrader"] == test_meta
        assert "nbgrader" not in nb.cells[1].metadata
    assert exercise.cells[3].metadata["editable"] is False
    assert exercise.cells[3].metadata["deletable"] is False
    assert not {"editable", "deletable"} & set(exercise.cells[2].metadata)  # answers stay free
    assert nbs.questions(coin_solution()) == [nbs.Question("q1_bernoulli_mle", 2, 3)]


def test_method_solutions_get_qualified_answer_ids():
    cls = ("class Model:\n    def forward(self, x):\n        # Task: double it.\n"
           "        ### BEGIN SOLUTION\n        return 2 * x\n        ### END SOLUTION")
    annotated = nbs.annotate_solution(solution_nb(cls, cls))
    ids = [c.metadata["nbgrader"]["grade_id"] for c in annotated.cells]
    assert ids == ["answer_Model_forward", "answer_Model_forward_2"]


def hidden(body: str) -> str:
    return f'with check("q1", points=1):\n{body}'


REFUSALS = {
    "no task": ("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION",
                "line 2: this solution block has no task"),
    "indentation 0": ("# Task: h\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION",
                      "line 2: this solution block is at indentation 0"),
    "outside a function": ("if True:\n    # Task: h\n    ### BEGIN SOLUTION\n    x = 1\n"
                           "    ### END SOLUTION", "line 3: this solution block is not inside a function"),
    "never closed": ("def f(x):\n    # Task: h\n    ### BEGIN SOLUTION\n    return x",
                     "line 3: this block is never closed"),
    "END without BEGIN": ("def f(x):\n    return x\n    ### END SOLUTION",
                          "line 3: '### END SOLUTION' has no matching BEGIN"),
    "nested": ("def f(x):\n    # Task: h\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n"
               "    return x\n    ### END SOLUTION\n    ### END SOLUTION",
               "line 4: '### BEGIN SOLUTION' inside"),
    "malformed marker": ("def f(x):\n    # Task: h\n    ## BEGIN SOLUTION\n    return x",
                         "line 3: malformed marker"),
    "hidden tests outside check": ("x = 1\n### BEGIN HIDDEN TESTS\nx = 2\n### END HIDDEN TESTS",
                                   "line 2: this hidden-tests region is outside"),
    "hidden tests after the block": (hidden("    expect_true(True, 'ok')\n### BEGIN HIDDEN TESTS\n"
                                            "expect_true(True, 'ok')\n### END HIDDEN TESTS"),
                                     "line 3: this hidden-tests region is outside"),
    "hidden tests leave it empty": (hidden("    ### BEGIN HIDDEN TESTS\n    expect_true(True, 'ok')\n"
                                           "    ### END HIDDEN TESTS"),
                                    "line 2: removing the hidden tests would leave"),
    "non-literal id": ('qid = "q1"\nwith check(qid, points=1):\n    pass',
                       "line 2: the question id of check(...) is not a string literal"),
    "non-literal points": ('n = 2\nwith check("q1", points=n):\n    pass',
                           "line 2: the points of check('q1') are not a positive number literal"),
    "two checks in one cell": ('with check("q1", points=1):\n    pass\n'
                               'with check("q2", points=1):\n    pass',
                               "line 3: two check(...) blocks in one cell"),
    "bare check call": ('c = check("q1", points=1)', "line 1: use check(...) as a context manager"),
    "stub off the body's indentation": ("def f(x):\n    y = 1\n        # Task: h\n        ### BEGIN SOLUTION\n"
                                        "    return x\n        ### END SOLUTION",
                                        "the exercise version of this cell would not be valid Python"),
}


@pytest.mark.parametrize("source, message", list(REFUSALS.values()), ids=list(REFUSALS))
def test_generator_refuses_malformed_cells(source, message):
    nb = solution_nb("import math", source)
    with pytest.raises(nbs.NotebookError) as info:
        nbs.make_exercise(nb, "bad.ipynb")
    assert str(info.value).startswith("bad.ipynb, cell 2 (starting ")
    assert message in str(info.value)


def test_generator_refuses_duplicate_question_ids():
    nb = solution_nb('with check("q1", points=1):\n    pass', 'with check("q1", points=2):\n    pass')
    with pytest.raises(nbs.NotebookError, match=r"cell 2 .*question id 'q1' is already used by cell 1"):
        nbs.make_exercise(nb, "dup.ipynb")


def test_generator_refuses_markers_in_markdown():
    nb = solution_nb(new_markdown_cell("### BEGIN SOLUTION\nThe answer is 42.\n### END SOLUTION"))
    with pytest.raises(nbs.NotebookError, match="markers only work in code cells"):
        nbs.make_exercise(nb)


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nbs.notebook_text(nb), encoding="utf-8")


def test_generate_is_deterministic_and_check_only_writes_nothing(tmp_path):
    write(coin_solution(), tmp_path / "solutions" / "01_coins.ipynb")
    solutions, exercises = tmp_path / "solutions", tmp_path / "exercises"
    before = (solutions / "01_coins.ipynb").read_text(encoding="utf-8")

    stale = nbs.generate(solutions, exercises, check_only=True)
    assert stale == [solutions / "01_coins.ipynb", exercises / "01_coins.ipynb"]
    assert not exercises.exists()
    assert (solutions / "01_coins.ipynb").read_text(encoding="utf-8") == before

    assert nbs.generate(solutions, exercises) == stale
    first = (exercises / "01_coins.ipynb").read_bytes()
    assert nbs.generate(solutions, exercises) == []
    assert nbs.generate(solutions, exercises, check_only=True) == []
    (exercises / "01_coins.ipynb").unlink()
    nbs.generate(solutions, exercises)
    assert (exercises / "01_coins.ipynb").read_bytes() == first
    assert sorted(p.name for p in exercises.iterdir()) == ["01_coins.ipynb"]  # no temp files

    # The solution gained metadata only: sources and outputs are untouched.
    old, new = nbformat.reads(before, 4), nbs.read_notebook(solutions / "01_coins.ipynb")
    assert [c.source for c in new.cells] == [c.source for c in old.cells]
    assert [c.get("outputs") for c in new.cells] == [c.get("outputs") for c in old.cells]
    assert new.cells[3].metadata["nbgrader"]["points"] == 2


def test_generate_reports_a_hand_edited_exercise_as_stale(tmp_path):
    write(coin_solution(), tmp_path / "s" / "a.ipynb")
    nbs.generate(tmp_path / "s", tmp_path / "e")
    edited = tmp_path / "e" / "a.ipynb"
    edited.write_text(edited.read_text(encoding="utf-8").replace("Coins", "Dice"), encoding="utf-8")
    assert nbs.generate(tmp_path / "s", tmp_path / "e", check_only=True) == [edited]


def test_find_leaks_is_clean_for_a_generated_exercise():
    assert nbs.find_leaks(coin_solution(), nbs.make_exercise(coin_solution())) == []


def test_find_leaks_catches_planted_solution_hidden_test_and_marker():
    solution = coin_solution()
    exercise = nbs.make_exercise(solution)
    exercise.cells[1].source += "\n    heads = sum(x)"
    exercise.cells[3].source += ('\n    expect_close(bernoulli_mle([1] * 10), 1.0, '
                                 'what="bernoulli_mle of ten heads")')
    exercise.cells[0].source += "\n### END SOLUTION"
    leaks = nbs.find_leaks(solution, exercise)
    assert leaks == [
        "exercise cell 1, line 2: marker '### END SOLUTION'",
        "exercise cell 2, line 2: 'heads = sum(x)' (secret text from solution cell 3)",
        "exercise cell 4, line 3: 'expect_close(bernoulli_mle([1] * 10), 1.0, what=\"bernoulli_mle "
        "of ten heads\")' (secret text from solution cell 4)",
    ]


def test_find_leaks_ignores_trivial_and_visible_lines():
    answer = ("def f(x):\n    # Task: h\n    ### BEGIN SOLUTION\n    y = helper(x)\n    return y\n"
              "    ### END SOLUTION")
    solution = solution_nb("def helper(x):\n    y = helper(x)\n    return x", answer)
    exercise = nbs.make_exercise(solution)
    exercise.cells[1].source += "\n    return y\n    )\n    pass"
    assert nbs.find_leaks(solution, exercise) == []


# --------------------------------------------------------------------------
# End-to-end grading of a synthetic assignment
# --------------------------------------------------------------------------

ASSIGNMENT = [
    new_markdown_cell("# A synthetic assignment"),
    "from dgmlab.grading import check, expect_close, expect_equal, expect_function_matches",
    '''def add(a, b):
    """Return a + b."""
    # Task: use the + operator.
    ### BEGIN SOLUTION
    return a + b
    ### END SOLUTION''',
    '''with check("q1_add", points=2, hint="Add the two numbers."):
    expect_equal(add(1, 2), 3, what="add(1, 2)")
    ### BEGIN HIDDEN TESTS
    expect_equal(add(-5, 5), 0, what="add(-5, 5)")
    ### END HIDDEN TESTS''',
    '''def mean(xs):
    """Return the average of a non-empty list of numbers."""
    # Task: divide the sum by the number of items.
    ### BEGIN SOLUTION
    total = sum(xs)
    return total / len(xs)
    ### END SOLUTION''',
    '''with check("q2_mean", points=3):
    expect_close(mean([1, 2, 3, 4]), 2.5, what="mean([1, 2, 3, 4])")
    ### BEGIN HIDDEN TESTS
    expect_close(mean([7.0]), 7.0, what="mean([7.0])")
    ### END HIDDEN TESTS''',
    '''def square(x):
    # Task: multiply x by itself.
    ### BEGIN SOLUTION
    return x * x
    ### END SOLUTION''',
    '''with check("q3_square", points=1):
    expect_equal(square(3), 9, what="square(3)")
    ### BEGIN HIDDEN TESTS
    expect_function_matches(square, lambda x: x * x, [(-2,), (0.5,)])
    ### END HIDDEN TESTS''',
    new_code_cell('print("solution demo:", mean([1, 2]))', metadata={"tags": ["solution-only"]}),
]

RIGHT = {"add": "def add(a, b):\n    return a + b",
         "mean": "def mean(xs):\n    return sum(xs) / len(xs)",
         "square": "def square(x):\n    return x ** 2"}
LOOP = "def mean(xs):\n    while True:\n        pass"
# Wrong answers whose cells rebind what the check cells use, to fake a pass.
FAKE_CHECK = """

import contextlib, json, os

@contextlib.contextmanager
def check(question, points, hint=None):
    with open(os.environ["DGMLAB_GRADING_LOG"], "a") as log:
        log.write(json.dumps({"question": question, "points": points, "max": points,
                              "status": "passed", "message": "faked"}) + "\\n")
    try:
        yield
    except Exception:
        pass
"""
CHEAT = {"add": "def add(a, b):\n    return 3\n\nexpect_equal = lambda *a, **k: None",
         "mean": "def mean(xs):\n    return 0" + FAKE_CHECK + "\nexpect_close = lambda *a, **k: None",
         "square": "def square(x):\n    return 9\n\nexpect_function_matches = expect_equal = print"}
DEAF = ("import signal\n\ndef mean(xs):\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "    while True:\n        pass")

# student -> (answers replacing the stubs, expected points per question, note fragments)
EXPECTED = {
    "ada": (RIGHT, [2, 3, 1], []),
    "ben": ({}, [0, 0, 0], []),
    "cy": ({"add": "def add(a, b):\n    return a / 0", "mean": RIGHT["mean"]}, [0, 3, 0], []),
    "dee": ({**RIGHT, "mean": LOOP}, [2, 0, 1], ["ran longer than the 3 s limit per cell"]),
    "eve": ({**RIGHT, "mean": DEAF}, [2, 0, 0], ["stopped after the 12 s limit for the whole notebook"]),
    "fay": ({**RIGHT, "mean": "import os\n\ndef mean(xs):\n    os._exit(3)"}, [2, 0, 0],
            ["The Python kernel died while running cell 6"]),
    "gus": (None, [0, 0, 0], ["gus.ipynb is not valid notebook JSON"]),
    "hal": (None, [0, 0, 0], ["hal.pdf is a .pdf file, not a Jupyter notebook"]),
    "ian": ({**RIGHT, "add": "def add(a, b):\n    return 3"}, [0, 3, 1],
            ["The check cell for q3_square was missing"]),
    "jo": (CHEAT, [0, 0, 0], []),
}


def student_notebook(exercise: nbformat.NotebookNode, answers: dict) -> nbformat.NotebookNode:
    nb = copy.deepcopy(exercise)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        if grade_id.startswith("answer_") and grade_id[7:] in answers:
            cell.source = answers[grade_id[7:]]
    return nb


def make_submissions(folder: Path, exercise: nbformat.NotebookNode) -> None:
    for student, (answers, _, _) in EXPECTED.items():
        if answers is not None:
            write(student_notebook(exercise, answers), folder / f"{student}.ipynb")
    # dee hands in a folder; gus a truncated file; hal a PDF.
    (folder / "dee").mkdir()
    (folder / "dee.ipynb").rename(folder / "dee" / "assignment.ipynb")
    (folder / "gus.ipynb").write_text('{"cells": [', encoding="utf-8")
    (folder / "hal.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    # ian weakens check q1 (keeping its metadata), deletes check q3 and fakes a verdict.
    ian = nbs.read_notebook(folder / "ian.ipynb")
    ian.cells[3].source = "pass"
    del ian.cells[7]
    ian.cells.insert(3, new_code_cell('with check("q1_add", points=2):\n    pass'))
    write(ian, folder / "ian.ipynb")


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line or environment mentions ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes():
                state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
                if state != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the synthetic submissions once; every test below inspects the outcome."""
    root = tmp_path_factory.mktemp("grading")
    solution = solution_nb(*ASSIGNMENT)
    write(solution, root / "assignment.ipynb")
    make_submissions(root / "submissions", nbs.make_exercise(solution))
    scratch = root / "scratch"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(scratch))  # the grader's scratch folders go here
        started = time.monotonic()
        results = grade(root / "assignment.ipynb", root / "submissions", root / "out",
                        cell_timeout=3, timeout=12, jobs=2, sandbox=sandbox_available())
        elapsed = time.monotonic() - started
    return {"root": root, "results": results, "elapsed": elapsed, "scratch": scratch}


def test_gradebook_has_the_exact_points_of_every_student(graded):
    with open(graded["root"] / "out" / "gradebook.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["student", "question", "points", "max", "isolated"]
    isolated = "yes" if sandbox_available() else "no"
    expected = [[student, q, str(p), str(m), isolated]
                for student, (_, points, _) in sorted(EXPECTED.items())
                for q, p, m in zip(["q1_add", "q2_mean", "q3_square"], points, [2, 3, 1])]
    assert rows[1:] == expected


def test_feedback_explains_every_outcome(graded):
    feedback = graded["root"] / "out" / "feedback"
    assert sorted(p.name for p in feedback.iterdir()) == sorted(f"{s}.md" for s in EXPECTED)
    for student, (_, points, notes) in EXPECTED.items():
        text = (feedback / f"{student}.md").read_text(encoding="utf-8")
        assert f"Total: **{sum(points)} / 6 points**" in text
        for note in notes:
            assert note in text, (student, note)
    ben = (feedback / "ben.md").read_text(encoding="utf-8")
    assert ben.count("not attempted yet") == 3
    cy = (feedback / "cy.md").read_text(encoding="utf-8")
    assert "Your code raised ZeroDivisionError: division by zero, in add (line 2 of its cell)" in cy
    dee = (feedback / "dee.md").read_text(encoding="utf-8")
    assert "⏱ q2_mean: interrupted / took too long" in dee
    fay = (feedback / "fay.md").read_text(encoding="utf-8")
    assert "Not graded: the Python kernel died while this check was running." in fay
    eve = (feedback / "eve.md").read_text(encoding="utf-8")
    assert "Not graded: the notebook ran out of time (12 s in total) before this check was reached." in eve
    assert "❌ q3_square: 0/1 point. Not graded: the notebook ran out of time" in eve  # "point", as checks say
    gus = (feedback / "gus.md").read_text(encoding="utf-8")
    assert "❌ q3_square: 0/1 point. Not graded (see the notes)." in gus
    ian = (feedback / "ian.md").read_text(encoding="utf-8")
    assert "add(-5, 5): expected 0, got 3." in ian  # the hidden test ran
    jo = (feedback / "jo.md").read_text(encoding="utf-8")  # the real checks, not jo's own
    assert "add(-5, 5): expected 0, got 3." in jo
    assert "mean([1, 2, 3, 4]): expected 2.5, got 0." in jo and "faked" not in jo
    assert "square(-2) returned 9, expected 4." in jo


def test_executed_notebooks_are_kept_when_execution_happened(graded):
    executed = graded["root"] / "out" / "executed"
    assert sorted(p.stem for p in executed.iterdir()) == ["ada", "ben", "cy", "dee", "eve", "fay", "ian",
                                                          "jo"]
    ada = nbs.read_notebook(executed / "ada.ipynb")
    assert "✅ q3_square: 1/1 point." in ada.cells[7].outputs[0]["text"]
    # The student's cells are numbered as they ran in the sandbox; the checks ran in the judge.
    code = [c for c in ada.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, None, 3, None, 4, None]
    assert [len(c.outputs) for c in code] == [0, 0, 1, 0, 1, 0, 1]


def test_grading_is_bounded_in_time_and_leaves_no_processes(graded):
    assert graded["elapsed"] < 45
    assert processes_with(str(graded["scratch"])) == []
    assert list(graded["scratch"].iterdir()) == []


def test_kernels_in_this_test_suite_use_unix_sockets():
    # conftest.py makes nbval's and nbclient's kernel managers use sockets, and
    # nbval start a kernel again if it dies at start (parallel workers, TCP race).
    import nbval.kernel
    from nbclient import NotebookClient

    assert NotebookClient(new_notebook(), kernel_name="python3").create_kernel_manager().transport == "ipc"
    km, kc = nbval.kernel.start_new_kernel(kernel_name=nbval.kernel.CURRENT_ENV_KERNEL_NAME)
    try:
        reply = kc.execute_interactive("x = 6 * 7", timeout=30)
        assert reply["content"]["status"] == "ok"
        assert km.transport == "ipc" and Path(km.ip).parent.name.startswith("dgk-")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_kernel_start_is_retried_only_as_often_as_asked():
    import kernels

    calls = []

    def dies_twice(name):
        calls.append(name)
        if len(calls) <= 2:
            raise RuntimeError("Kernel died before replying to kernel_info")
        return "kernel " + name

    assert kernels.retried(dies_twice, attempts=3)("python3") == "kernel python3"
    assert calls == ["python3"] * 3
    calls.clear()
    with pytest.raises(RuntimeError, match="Kernel died"):
        kernels.retried(dies_twice, attempts=2)("python3")
    assert len(calls) == 2


def test_a_kernel_falls_back_to_tcp_when_a_socket_path_would_be_too_long(tmp_path):
    from jupyter_client import KernelManager

    import kernels

    km = KernelManager(kernel_name="python3")
    assert not kernels.use_unix_sockets(km, tmp_path / ("x" * 100))
    assert km.transport == "tcp"


def test_cli_grades_and_generates(tmp_path, capsys):
    solution = solution_nb(*ASSIGNMENT)
    write(solution, tmp_path / "solutions" / "assignment.ipynb")
    write(student_notebook(nbs.make_exercise(solution), RIGHT), tmp_path / "subs" / "ada.ipynb")
    args = ["generate", "--solutions", str(tmp_path / "solutions"), "--exercises", str(tmp_path / "ex")]
    assert cli_main([*args, "--check"]) == 1
    assert cli_main(args) == 0
    assert cli_main([*args, "--check"]) == 0
    code = cli_main(["grade", str(tmp_path / "solutions" / "assignment.ipynb"), str(tmp_path / "subs"),
                     "--out", str(tmp_path / "grades"), "--cell-timeout", "10", "--timeout", "60",
                     *([] if sandbox_available() else ["--no-sandbox"])])
    assert code == 0
    assert re.search(r"^ada +6/6$", capsys.readouterr().out, re.M)
    assert cli_main(["grade", str(tmp_path / "nope.ipynb"), str(tmp_path / "subs")]) == 2
    assert "error: cannot read" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "dgmlab.grading", "grade", "--help"],
                         capture_output=True, text=True, check=True, env={**os.environ}).stdout
    assert "--cell-timeout" in out and "--jobs" in out


def test_execute_in_place_stores_outputs_and_refuses_a_broken_notebook(tmp_path):
    import nbformat

    from dgmlab.grading.notebooks import NotebookError, execute_in_place

    good = tmp_path / "good.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nprint(6 * 7, os.environ['DGMLAB_FULL'])")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, good)
    execute_in_place(good)
    cell = nbformat.read(good, as_version=4).cells[0]
    assert cell.outputs[0]["text"] == "42 0\n"  # run in fast mode
    assert "execution" not in cell.metadata and cell.execution_count == 1

    bad = tmp_path / "bad.ipynb"
    nb.cells[0].source = "1 / 0"
    nbformat.write(nb, bad)
    before = bad.read_bytes()
    with pytest.raises(NotebookError, match="left unchanged"):
        execute_in_place(bad)
    assert bad.read_bytes() == before


def test_exercise_folds_hints_so_they_are_read_after_a_wrong_answer(capsys):
    check_cell = ('with check("q1_mle", points=2, hint="Count the ones, then divide."):\n'
                  '    expect_close(mle([1, 0, 1, 1]), 0.75)\n    ### BEGIN HIDDEN TESTS\n'
                  '    expect_close(mle([1] * 4), 1.0)\n    ### END HIDDEN TESTS')
    answer = "def mle(x):\n    # Task: the MLE.\n    ### BEGIN SOLUTION\n    return sum(x) / len(x)\n    ### END SOLUTION"
    exercise = nbs.make_exercise(solution_nb(answer, check_cell))
    shown = exercise.cells[1].source
    assert "Count the ones" not in shown and 'hint="folded:' in shown
    out = verdict(capsys, shown, "def mle(x):\n    return 0.5\n")
    assert out.endswith("\nHint: Count the ones, then divide.\n")  # unfolded once it is needed
    assert unfold("plain text") == "plain text" and unfold(fold("ü ≤ 2")) == "ü ≤ 2"


# --------------------------------------------------------------------------
# The sandbox wall: what crosses it, and how
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wall(tmp_path_factory):
    """A runner (the student's side, unsandboxed here) holding a few functions, and the judge's link to it."""
    from dgmlab.grading import judge
    from dgmlab.grading.link import Link

    proc, _ = judge.start_runner({"home": str(tmp_path_factory.mktemp("home")), "sandbox": False, "threads": 1})
    link = Link(proc.stdin.fileno(), proc.stdout.fileno())
    link.send({"memory": None})
    assert link.receive()["op"] == "ready"
    cell = ("import torch\n"
            "def affine(x, w):\n    return torch.tanh(x @ w).sum(-1), x.argmax(-1)\n"
            "def through(f, x):\n    return f(x * 2) ** 2\n"
            "def draw():\n    return torch.rand(3)\n"
            "class Liar:\n    def __eq__(self, other):\n        return True\n"
            "def liar():\n    return Liar()\n")
    assert link.request({"op": "run", "source": cell, "timeout": 30})["status"] == "ok"
    found = link.value(link.request({"op": "names", "names": ["affine", "through", "draw", "liar"]}))[0]
    yield link, found
    link.send({"op": "stop"})
    proc.wait(timeout=10)


def test_gradients_cross_the_wall_as_if_the_students_function_were_local(wall):
    link, f = wall
    link.deadline = time.monotonic() + 30
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    out, index = f["affine"](x, w)
    local = torch.tanh(x @ w).sum(-1)
    assert torch.equal(out.detach(), local.detach()) and not index.requires_grad
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad(out.sum(), [x, w]),
                                                    torch.autograd.grad(local.sum(), [x, w])))
    # and through one of the judge's own functions, called back from the student's code
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    y = f["through"](lambda v: v * scale, x)
    assert torch.allclose(y, (x * 2 * scale) ** 2)
    got = torch.autograd.grad(y.sum(), [x, scale])
    want = torch.autograd.grad(((x * 2 * scale) ** 2).sum(), [x, scale])
    assert all(torch.allclose(a, b) for a, b in zip(got, want))


def test_the_random_streams_are_shared_and_only_plain_data_comes_back(wall):
    link, f = wall
    link.deadline = time.monotonic() + 30
    torch.manual_seed(7)
    remote = f["draw"]()
    after = torch.rand(2)
    torch.manual_seed(7)
    assert torch.equal(remote, torch.rand(3)) and torch.equal(after, torch.rand(2))
    liar = f["liar"]()  # an object of the student's class stays in the sandbox, as a stand-in
    assert type(liar).__name__ == "Remote" and liar != 1 and not (liar == liar._key)


def test_the_judge_refuses_anything_but_plain_data():
    import io
    import pickle as pkl

    from dgmlab.grading import wire

    assert wire.unpack(wire.pack({"a": [1, (2.5, "x")], "t": torch.arange(3)}))["a"] == [1, (2.5, "x")]
    tensors: list = []  # NumPy values keep their shape (0-d too) and strides do not matter
    data = wire.plain({"a": np.array(2.5), "b": np.float32(1.5), "c": np.arange(6).reshape(2, 3)[:, ::2]},
                      id, tensors)
    back = wire.rebuild(wire.unpack(wire.pack(data)), wire.unpack(wire.pack(tensors)), None)
    assert back["a"].shape == () and back["b"] == 1.5 and back["c"].tolist() == [[0, 2], [3, 5]]
    with pytest.raises(wire.WireError):
        wire.unpack(pkl.dumps(os.system))  # a pickle that would call something
    buffer = io.BytesIO()
    torch.save({"f": print}, buffer)
    with pytest.raises(wire.WireError):
        wire.unpack(buffer.getvalue())
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(wire.WireError, match="nested"):
        wire.unpack(wire.pack(deep))


def test_only_what_the_visible_part_of_a_check_binds_is_shared_with_the_students_process():
    from dgmlab.grading.judge import visible_names

    cell = ('def helper(v):\n    return v\n\nwith check("q1", points=1):\n    cases = [1, 2]\n    got = f(cases)\n'
            '    for k in cases:\n        seen = k\n    ### BEGIN HIDDEN TESTS\n    cases = [3, 4]\n'
            '    expected = 42\n    ### END HIDDEN TESTS\n')
    hidden = set(range(9, 13))
    # cases is rebound by the hidden test (its value may be hidden now); expected exists only there
    assert sorted(visible_names(cell, hidden)) == ["got", "helper", "k", "seen"]
    assert sorted(visible_names(cell, set())) == ["cases", "expected", "got", "helper", "k", "seen"]


def test_a_submission_that_asks_for_too_much_memory_gets_a_memory_error_and_the_rest_is_graded(tmp_path):
    solution = solution_nb(*ASSIGNMENT)
    write(solution, tmp_path / "assignment.ipynb")
    greedy = {**RIGHT, "add": "def add(a, b):\n    hog = bytearray(6 * 2**30)  # 6 GiB, over the 3 GiB allowed\n"
                              "    return a + b"}
    write(student_notebook(nbs.make_exercise(solution), greedy), tmp_path / "subs" / "greedy.ipynb")
    (result,) = grade(tmp_path / "assignment.ipynb", tmp_path / "subs", tmp_path / "out", cell_timeout=20,
                      timeout=90, jobs=1, sandbox=sandbox_available(), memory_gb=3)
    assert [q.points for q in result.questions] == [0, 3, 1]
    assert "Your code raised MemoryError, in add (line 2 of its cell)" in result.questions[0].message
