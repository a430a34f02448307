"""Immediate, friendly feedback for graded exercises.

A check cell wraps its expectations in ``with check("q1_name", points=2):``.
Whatever happens inside -- a wrong value, a missing function, an exception, a
stub that still raises ``NotImplementedError`` -- the student sees one short
plain-text verdict instead of a traceback::

    ✅ q1_bernoulli_mle: 2/2 points.
    ❌ q1_bernoulli_mle: 0/2 points. bernoulli_mle([1, 0, 1, 1]): expected 0.75, got 0.5.
    Hint: Count the ones and divide by the number of tosses.

A hint is for after a wrong answer: in the exercise notebook the generator
folds it (:func:`fold`, base64 behind ``folded:``), so that it is not read
before the question is tried, and :class:`Check` unfolds it when it is shown.

When the grader runs a check (:mod:`.judge`), the student's functions are
called in another process; the exceptions they raise arrive with the
student's frames in ``remote_frames``, and inside hidden tests their messages
are not quoted (``HIDDEN_LINES``), so feedback never repeats what the
student's code said about a hidden test.

This module imports nothing heavy (NumPy is loaded on first use, PyTorch is
only recognised if the notebook already imported it), so check cells and the
grader's kernels start fast.
"""

from __future__ import annotations

import base64
import binascii
import copy
import linecache
import numbers
import os
import re
import site
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "Check",
    "CheckFailed",
    "CheckResult",
    "check",
    "expect_close",
    "expect_equal",
    "expect_function_matches",
    "expect_shape",
    "expect_true",
    "results",
]

HIDDEN_LINES: dict[str, set[int]] = {}  # cell file name -> lines of its hidden tests (set by the judge)
PASSED, FAILED, ERROR = "passed", "failed", "error"
NOT_ATTEMPTED, INTERRUPTED = "not_attempted", "interrupted"

_ICONS = {PASSED: "✅", FAILED: "❌", ERROR: "❌", NOT_ATTEMPTED: "⏳", INTERRUPTED: "⏱"}
_STUB_MESSAGE = "Replace this line with your code."
_RESULTS: dict[str, CheckResult] = {}


# --------------------------------------------------------------------------
# Results and the failure type
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check: points earned out of ``max`` and the message shown."""

    question: str
    points: float
    max: float
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


class CheckFailed(AssertionError):
    """An expectation that did not hold, with what was checked, expected and got.

    ``str()`` gives the sentence shown to the student; pass ``message`` to
    replace the standard "what: expected X, got Y." wording.
    """

    def __init__(
        self,
        what: str | None = None,
        expected: str | None = None,
        got: str | None = None,
        *,
        detail: str | None = None,
        hint: str | None = None,
        message: str | None = None,
    ) -> None:
        self.what, self.expected, self.got = what, expected, got
        self.detail, self.hint = detail, hint
        if message is None:
            message = f"{what}: expected {expected}, got {got}."
            if detail:
                message += " " + _sentence(detail)
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


def results() -> list[CheckResult]:
    """The latest verdict of every question checked in this session, in first-check order."""
    return list(_RESULTS.values())


# --------------------------------------------------------------------------
# The check context manager
# --------------------------------------------------------------------------


FOLDED = "folded:"  # the prefix of a hint as the exercise notebook carries it


def fold(text: str) -> str:
    """A hint as the exercise notebook carries it, unreadable at a glance: ``folded:<base64>``."""
    return FOLDED + base64.b64encode(text.encode("utf-8")).decode("ascii")


def unfold(hint: str | None) -> str | None:
    """The text of a hint, folded (see :func:`fold`) or not."""
    if not isinstance(hint, str) or not hint.startswith(FOLDED):
        return hint
    try:
        return base64.b64decode(hint[len(FOLDED):], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return hint  # not ours after all: show it as it is


def check(question: str, points: float, hint: str | None = None) -> Check:
    """Grade the ``with`` block as one question worth ``points`` (all or nothing).

    Never lets an exception escape, except ``KeyboardInterrupt``/``SystemExit``
    (recorded as interrupted, then re-raised so that timeouts still work).
    """
    return Check(question, points, hint)


class Check:
    """The context manager behind :func:`check`; ``result`` holds the verdict afterwards."""

    def __init__(self, question: str, points: float, hint: str | None = None) -> None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"check() needs a question id such as 'q1_mle', got {question!r}.")
        if isinstance(points, bool) or not isinstance(points, numbers.Real) or points <= 0:
            raise ValueError(
                f"check({question!r}) needs a positive number of points, got {points!r}.")
        self.question, self.points, self.hint = question, points, unfold(hint)
        self.result: CheckResult | None = None
        self._check_code: Any = None

    def __enter__(self) -> Check:
        # Remember the code running the ``with`` block (the check cell) so that
        # errors raised there can be told apart from errors in the student's functions.
        code = sys._getframe(1).f_code
        self._check_code = (code.co_filename, _qualname(code))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            status, text = PASSED, f"{_fmt_points(self.points)}/{_score(self.points)}."
        elif isinstance(exc, (KeyboardInterrupt, SystemExit)):
            status, text = INTERRUPTED, (
                f"interrupted / took too long (0/{_score(self.points)}). "
                "The check was stopped before it finished: look for an endless loop or "
                "a very slow computation, then run this cell again."
            )
        else:
            status, text = self._judge(exc, tb)
        self.result = self._record(status, text)
        # Swallow ordinary exceptions so the notebook keeps running; let
        # interrupts and other BaseExceptions through so timeouts still work.
        return isinstance(exc, Exception) or exc is None

    def _judge(self, exc: BaseException, tb: TracebackType | None) -> tuple[str, str]:
        """The status and explanation for an exception raised inside the block."""
        zero = f"0/{_score(self.points)}."
        frames = frame_records(tb) + list(getattr(exc, "remote_frames", []))
        last = frames[-1] if frames else None
        in_check_cell = last is not None and last[:2] == self._check_code
        if isinstance(exc, NotImplementedError):
            return NOT_ATTEMPTED, _not_attempted_text(exc, last, in_check_cell, self.points)
        if isinstance(exc, CheckFailed):
            return FAILED, f"{zero} {exc.message}" + self._hints(exc.hint)
        if isinstance(exc, AssertionError) and in_check_cell:
            # A plain ``assert`` written in the check cell is an expectation too.
            reason = str(exc) or f"This check failed: {last[3] if last else ''}"
            return FAILED, f"{zero} {_full_stop(reason)}" + self._hints()
        if isinstance(exc, NameError):
            return ERROR, f"{zero} {_name_error_text(exc, last, in_check_cell)}"
        where = _where(last, in_check_cell)
        if hasattr(exc, "remote_frames") and self._in_hidden_test(tb):
            return ERROR, f"{zero} Your code raised {_exc_name(exc)} in a hidden test{where}." + self._hints()
        return ERROR, f"{zero} Your code raised {_exc_text(exc)}{where}." + self._hints()

    def _in_hidden_test(self, tb: TracebackType | None) -> bool:
        return any(n in HIDDEN_LINES.get(f.f_code.co_filename, ()) for f, n in traceback.walk_tb(tb))

    def _hints(self, *extra: str | None) -> str:
        hints = [h.strip() for h in (*extra, self.hint) if h and h.strip()]
        return "\nHint: " + " ".join(_full_stop(h) for h in hints) if hints else ""

    def _record(self, status: str, text: str) -> CheckResult:
        earned = self.points if status == PASSED else 0
        message = f"{_ICONS[status]} {self.question}: {text}"
        result = CheckResult(self.question, earned, self.points, status, message)
        print(message, flush=True)
        _RESULTS[self.question] = result
        return result


# --------------------------------------------------------------------------
# Explaining exceptions: where in the student's code did it happen?
# --------------------------------------------------------------------------


def _library_dirs() -> tuple[str, ...]:
    """Folders whose code is not the student's: dgmlab itself, the stdlib, site-packages."""
    dirs = {str(Path(__file__).resolve().parents[1])}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if path := sysconfig.get_paths().get(key):
            dirs.add(str(Path(path).resolve()))
    try:
        dirs.update(str(Path(p).resolve()) for p in site.getsitepackages())
    except AttributeError:  # some embedded interpreters lack it
        pass
    return tuple(sorted(d.rstrip(os.sep) + os.sep for d in dirs))


_LIBRARY_DIRS = _library_dirs()
_CELL_FILE = re.compile(r"(^<ipython-input-)|([\\/]ipykernel_\d+[\\/])|(^<cell \d+>$)")


def _is_student_file(filename: str) -> bool:
    """True for notebook cells and the student's own files, False for library code."""
    if _CELL_FILE.search(filename):
        return True
    if filename.startswith("<"):
        return False  # <frozen ...>, <string>: not something a student can open
    path = os.path.abspath(filename)
    if "site-packages" in path or "dist-packages" in path:
        return False
    return not path.startswith(_LIBRARY_DIRS)


def _qualname(code: Any) -> str:
    return getattr(code, "co_qualname", code.co_name)


def frame_records(tb: TracebackType | None) -> list[tuple[str, str, int, str]]:
    """(file, function, line, code) of every traceback entry in the student's code, innermost last."""
    return [(f.f_code.co_filename, _qualname(f.f_code), n,
             linecache.getline(f.f_code.co_filename, n, f.f_globals).strip())
            for f, n in traceback.walk_tb(tb) if _is_student_file(f.f_code.co_filename)]


def _where(entry: tuple[str, str, int, str] | None, in_check_cell: bool) -> str:
    """', in f (line 4 of its cell): <code>' -- where an exception happened, or ''."""
    if entry is None:
        return ""
    filename, name, lineno, code = entry
    code = f": {code}" if code else ""
    if in_check_cell:
        return f", at line {lineno} of this check cell{code}"
    if _CELL_FILE.search(filename):
        if name == "<module>":
            return f", at line {lineno} of a cell above{code}"
        return f", in {name} (line {lineno} of its cell){code}"
    return f", in {name} ({os.path.basename(filename)}, line {lineno}){code}"


def _hidden_now() -> bool:
    """Whether the code running now was called from a hidden test (of a check run by the judge)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_lineno in HIDDEN_LINES.get(frame.f_code.co_filename, ()):
            return True
        frame = frame.f_back
    return False


def _exc_name(exc: BaseException) -> str:
    return getattr(exc, "type_name", type(exc).__name__)


def _exc_text(exc: BaseException) -> str:
    message = _brief(str(exc), 200)
    return f"{_exc_name(exc)}: {message}" if message else _exc_name(exc)


def _not_attempted_text(
    exc: BaseException, last: tuple[str, str, int, str] | None, in_check_cell: bool, points: float
) -> str:
    name = last[1] if last is not None and not in_check_cell else "<module>"
    target = "the code marked YOUR CODE HERE" if name == "<module>" else name
    text = (
        f"not attempted yet (0/{_score(points)}). "
        f"Fill in {target} above, run that cell, then run this one again."
    )
    if str(exc) and not str(exc).startswith(_STUB_MESSAGE):
        text += f" ({_exc_text(exc)})"
    return text


def _name_error_text(exc: NameError, last: tuple[str, str, int, str] | None, in_check_cell: bool) -> str:
    match = re.search(r"name '([^']+)' is not defined", str(exc))
    name = getattr(exc, "name", None) or (match.group(1) if match else None)
    subject = f"The name '{name}' is not defined" if name else f"NameError: {exc}"
    if in_check_cell or last is None:
        return (f"{subject}. Run the cells above this one (top to bottom) first, "
                "then run this one again.")
    return (
        f"{subject}{_where(last, False)}. Check its spelling, or run the cell that "
        "defines it first, then run this one again."
    )


# --------------------------------------------------------------------------
# Short, deterministic descriptions of values
# --------------------------------------------------------------------------


def _numpy():
    import numpy

    return numpy


def _is_tensor(x: object) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to look at a value
    return torch is not None and isinstance(x, torch.Tensor)


def _is_ndarray(x: object) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.ndarray)


def _fmt_points(points: float) -> str:
    return str(int(points)) if float(points).is_integer() else f"{points:g}"


def _score(points: float) -> str:
    """'2 points', '1 point': the maximum of a question, in words."""
    return f"{_fmt_points(points)} point{'' if points == 1 else 's'}"


def _fmt_number(x: numbers.Number) -> str:
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return str(bool(x))
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        return f"{float(x):.6g}"
    return f"{complex(x):.6g}"


def _fmt_shape(shape: Iterable[int | None]) -> str:
    parts = ["N" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _brief(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _full_stop(text: str) -> str:
    """End with a full stop, unless the text already ends a sentence (case is left alone:
    an author's message may well start with a variable name)."""
    text = text.strip()
    return text if not text or text[-1] in ".!?" else text + "."


def _sentence(text: str) -> str:
    """One of our own detail phrases as a sentence: capitalised, with a full stop."""
    text = _full_stop(text)
    return text[:1].upper() + text[1:]


def _describe(x: object, brief: bool = False) -> str:
    """A one-line summary of a value: numbers to 6 digits, arrays as shape + a few entries."""
    if x is None or isinstance(x, numbers.Number):
        return "None" if x is None else _fmt_number(x)
    if _is_tensor(x) or _is_ndarray(x):
        return _describe_array(x, brief)
    if isinstance(x, str):
        return repr(_brief(x, 60))
    if isinstance(x, (list, tuple)):
        return _describe_sequence(x, brief)
    # Memory addresses would make stored outputs differ from run to run.
    text = re.sub(r" at 0x[0-9A-Fa-f]+", "", repr(x))
    return _brief(text, 80)


def _describe_array(x: Any, brief: bool) -> str:
    kind = "tensor" if _is_tensor(x) else "array"
    flat = x.detach().cpu().reshape(-1) if kind == "tensor" else x.reshape(-1)
    if x.ndim == 0:
        value = _fmt_number(flat[0].item())
        return f"tensor({value})" if kind == "tensor" else value
    text = f"{kind} of shape {_fmt_shape(x.shape)}"
    if brief:
        return text
    head = [_fmt_number(v) for v in flat[:4].tolist()]
    more = ", ..." if len(flat) > 4 else ""
    return f"{text}: [{', '.join(head)}{more}]"


def _describe_sequence(x: list | tuple, brief: bool) -> str:
    opening, closing = ("[", "]") if isinstance(x, list) else ("(", ")")
    if len(x) <= 6:
        items = [_describe(v, brief=True) for v in x]
        trailing = "," if isinstance(x, tuple) and len(x) == 1 else ""
        return opening + ", ".join(items) + trailing + closing
    head = ", ".join(_describe(v, brief=True) for v in x[:3])
    return f"{type(x).__name__} of {len(x)} items: {opening}{head}, ...{closing}"


# --------------------------------------------------------------------------
# Comparing values
# --------------------------------------------------------------------------


def _as_array(x: object):
    """``x`` as a float (or complex) NumPy array, or None when it is not numeric."""
    np = _numpy()
    if _is_tensor(x):
        t = x.detach().cpu()
        return t.resolve_conj().numpy() if t.is_complex() else t.double().numpy()
    if isinstance(x, (str, bytes)) or x is None:
        return None
    if isinstance(x, (list, tuple)) and any(_is_tensor(v) for v in x):
        parts = [_as_array(v) for v in x]  # e.g. a list of 0-d tensors that require grad
        if any(p is None for p in parts):
            return None
        try:
            return np.stack(parts)
        except ValueError:
            return None
    try:
        arr = np.asarray(x)
        if arr.dtype == object:
            arr = arr.astype(float)
    except (TypeError, ValueError, RuntimeError):
        return None
    if arr.dtype.kind not in "biufc":
        return None
    return arr.astype(complex if arr.dtype.kind == "c" else float)


def _shape_problem(want: tuple, have: tuple) -> str:
    return f"the shapes differ: expected {_fmt_shape(want)}, got {_fmt_shape(have)}"


def _closeness_problem(got: object, expected: object, atol: float, rtol: float) -> str | None:
    """None when ``got`` is close to ``expected``; otherwise what is wrong ('' if obvious)."""
    np = _numpy()
    want = _as_array(expected)
    if want is None:
        raise TypeError(
            f"expect_close compares numbers, but the expected value is {_describe(expected)}; "
            "use expect_equal for other values."
        )
    if got is None:
        return ""
    have = _as_array(got)
    if have is None:
        return f"expected a number or an array of numbers, not a {type(got).__name__}"
    if have.shape != want.shape:
        return _shape_problem(want.shape, have.shape)
    ok = np.isclose(have, want, atol=atol, rtol=rtol, equal_nan=True)
    if ok.all():
        return None
    if want.size == 1:
        g, e = have.reshape(-1)[0], want.reshape(-1)[0]
        if _describe(g.item()) == _describe(e.item()):  # differ beyond 6 digits
            return f"at full precision: expected {float(e)!r}, got {float(g)!r}"
        return ""
    with np.errstate(invalid="ignore"):
        excess = np.abs(have - want) - (atol + rtol * np.abs(want))
    excess = np.where(ok, -np.inf, np.nan_to_num(excess, nan=np.inf))
    worst = np.unravel_index(int(np.argmax(excess)), want.shape)
    index = str(worst[0]) if len(worst) == 1 else "[" + ", ".join(map(str, worst)) + "]"
    return (
        f"{int((~ok).sum())} of {want.size} entries differ; the worst is at index {index}: "
        f"expected {_describe(want[worst].item())}, got {_describe(have[worst].item())}"
    )


def _equality_problem(got: object, expected: object) -> str | None:
    """None when ``got`` equals ``expected`` (arrays: same shape and entries), else a detail."""
    np = _numpy()
    if any(_is_tensor(v) or _is_ndarray(v) for v in (got, expected)):
        have, want = _as_array(got), _as_array(expected)
        if have is None or want is None:
            return "" if have is None else "expected a non-numeric value"
        if have.shape != want.shape:
            return _shape_problem(want.shape, have.shape)
        return None if np.array_equal(have, want, equal_nan=True) else ""
    try:
        return None if bool(got == expected) else ""
    except (TypeError, ValueError, RuntimeError):
        return ""


def _is_numeric(x: object) -> bool:
    if isinstance(x, bool) or x is None:
        return False
    if isinstance(x, numbers.Number) or _is_tensor(x) or _is_ndarray(x):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(v, numbers.Number) and not isinstance(v, bool) for v in x
    )


def _mismatch(got: object, expected: object, atol: float, rtol: float) -> str | None:
    """Compare return values: numbers and arrays up to tolerance, tuples item by item."""
    if isinstance(expected, (list, tuple)) and not _is_numeric(expected):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return ""
        for i, (g, e) in enumerate(zip(got, expected)):
            problem = _mismatch(g, e, atol, rtol)
            if problem is not None:
                detail = problem or f"expected {_describe(e)}, got {_describe(g)}"
                return f"item {i} differs: {detail}"
        return None
    if _is_numeric(expected):
        return _closeness_problem(got, expected, atol, rtol)
    return _equality_problem(got, expected)


# --------------------------------------------------------------------------
# Expectations
# --------------------------------------------------------------------------


def expect_close(
    got: object,
    expected: object,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    what: str = "The result",
) -> None:
    """Expect numbers, sequences, arrays or tensors to match ``expected`` within tolerance."""
    problem = _closeness_problem(got, expected, atol, rtol)
    if problem is not None:
        hint = "Did your function forget to return its result?" if got is None else None
        raise CheckFailed(what, _describe(expected), _describe(got), detail=problem, hint=hint)


def expect_equal(got: object, expected: object, *, what: str = "The result") -> None:
    """Expect ``got == expected`` (arrays and tensors: same shape and entries)."""
    problem = _equality_problem(got, expected)
    if problem is not None:
        raise CheckFailed(what, _describe(expected), _describe(got), detail=problem)


def expect_true(condition: object, message: str) -> None:
    """Expect ``condition`` to hold; ``message`` says what should be true and why."""
    if _is_tensor(condition) or _is_ndarray(condition):
        condition = bool(condition.all())
    if not condition:
        raise CheckFailed(message=_full_stop(message))


def expect_shape(x: object, shape: Sequence[int | None], *, what: str = "The result") -> None:
    """Expect ``x`` to have ``shape``; ``None`` in ``shape`` accepts any size there."""
    want = _fmt_shape(shape)
    actual = getattr(x, "shape", None)
    if actual is None:
        raise CheckFailed(what, f"a tensor of shape {want}", _describe(x))
    actual = tuple(actual)
    ok = len(actual) == len(shape) and all(s is None or s == a for s, a in zip(shape, actual))
    if not ok:
        raise CheckFailed(what, f"shape {want}", f"shape {_fmt_shape(actual)}")


def expect_function_matches(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    cases: Iterable[tuple | dict | Any],
    *,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    what: str | None = None,
) -> None:
    """Expect ``fn`` to return what ``reference`` returns on every case.

    A case is a tuple of positional arguments, a dict of keyword arguments, or
    a single argument. Each function gets its own copy of the arguments, so an
    in-place change by one cannot affect the other.
    """
    name = what or getattr(fn, "__name__", "the function")
    for case in cases:
        args, kwargs = _split_case(case)
        call = f"{name}({_describe_args(args, kwargs)})"
        expected = reference(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        try:
            got = fn(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        except NotImplementedError:
            raise  # still a stub: check() reports "not attempted"
        except Exception as exc:
            last = (frame_records(exc.__traceback__) + list(getattr(exc, "remote_frames", [])) or [None])[-1]
            said = _exc_name(exc) + " in a hidden test" if _hidden_now() else _exc_text(exc)
            message = f"{call} raised {said}{_where(last, False)}."
            raise CheckFailed(message=message) from exc
        problem = _mismatch(got, expected, atol, rtol)
        if problem is not None:
            message = f"{call} returned {_describe(got)}, expected {_describe(expected)}."
            raise CheckFailed(message=message + (" " + _sentence(problem) if problem else ""))


def _split_case(case: object) -> tuple[tuple, dict]:
    if isinstance(case, tuple):
        return case, {}
    if isinstance(case, dict):
        return (), dict(case)
    return (case,), {}


def _describe_args(args: tuple, kwargs: dict) -> str:
    parts = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)
