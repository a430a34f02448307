"""The results of a grading run on disk, written as each student finishes.

``OUT/results/<stem>.json`` holds one student's result, ``OUT/feedback/<stem>.md``
their feedback and ``OUT/gradebook.csv`` the points of every student graded so
far; each is rewritten atomically after every student, so a run that dies keeps
what it had. A result is saved with the digest of what was graded (the solution
and settings, ``key``, and the submitted bytes); a later run with the same
digest reuses it instead of grading that student again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import atomic_write
from .feedback import CheckResult, _fmt_points, _score
from .notebooks import Question
from .submissions import Submission, digest

__all__ = ["Gradebook", "StudentResult", "feedback_text", "format_summary", "gradebook_text",
           "zero_result"]

NOT_RUN = "not_run"
# What a spreadsheet may run as a formula (OWASP's CSV injection list, plus full-width forms)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "＝", "＋", "－", "＠")


@dataclass
class StudentResult:
    """Everything graded for one student."""

    student: str
    stem: str
    questions: list[CheckResult]
    notes: list[str] = field(default_factory=list)
    digest: str = ""  # what was graded (see Gradebook); a saved result is reused only if it matches
    isolated: bool = True  # graded in the sandbox?
    executed: Path | None = None

    @property
    def total(self) -> float:
        return sum(q.points for q in self.questions)

    @property
    def max_total(self) -> float:
        return sum(q.max for q in self.questions)


def zero_result(sub: Submission, questions: list[Question], note: str, digest: str = "",
                isolated: bool = True) -> StudentResult:
    """Every question 0 and not run, with ``note`` after the submission's own notes."""
    results = [CheckResult(q.id, 0, q.points, NOT_RUN,
                           f"❌ {q.id}: 0/{_score(q.points)}. Not graded (see the notes).")
               for q in questions]
    return StudentResult(sub.student, sub.stem, results, [*sub.notes, note], digest, isolated)


def _to_json(result: StudentResult) -> str:
    data = asdict(result)
    data["executed"] = None if result.executed is None else str(result.executed)
    return json.dumps({"format": 1, **data}, indent=1) + "\n"


def _from_json(text: str) -> StudentResult:
    """The result saved in ``text``; ValueError, KeyError or TypeError if it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.pop("format", None) != 1:
        raise ValueError("not a saved result")
    questions = [CheckResult(**q) for q in data.pop("questions")]
    result = StudentResult(questions=questions, **data)
    texts = [result.student, result.stem, result.digest, *result.notes]
    texts += [t for q in questions for t in (q.question, q.status, q.message)]
    numbers = [x for q in questions for x in (q.points, q.max)]
    if not (all(isinstance(t, str) for t in texts) and isinstance(result.notes, list)
            and all(type(x) in (int, float) for x in numbers)
            and isinstance(result.isolated, bool)
            and (result.executed is None or isinstance(result.executed, str))):
        raise ValueError("a saved result with fields of the wrong type")
    result.executed = None if result.executed is None else Path(result.executed)
    return result


class Gradebook:
    """The results of the current ``submissions`` under ``out``, saved as each one is recorded.

    ``key`` identifies the solution and the settings; a saved result counts only
    while both it and the submitted bytes are unchanged.
    """

    def __init__(self, out: str | Path, assignment: str, submissions: list[Submission],
                 key: str) -> None:
        self.out, self.assignment, self.key = Path(out), assignment, key
        self._subs = {sub.stem: sub for sub in submissions}
        self._lock = threading.RLock()
        self._results = {sub.stem: r for sub in submissions if (r := self.saved(sub)) is not None}

    def digest(self, sub: Submission) -> str:
        """SHA-256 of what a result of ``sub`` is valid for: the key, the submitted bytes
        now, the name and the notes ("" if the submission cannot be read)."""
        try:
            files = digest(sub.path)
        except OSError:
            return ""
        what = json.dumps([self.key, files, sub.student, sub.stem, sub.problem, list(sub.notes)])
        return hashlib.sha256(what.encode()).hexdigest()

    def saved(self, sub: Submission) -> StudentResult | None:
        """The result an earlier run recorded for exactly this submission, else None."""
        try:
            text = (self.out / "results" / f"{sub.stem}.json").read_text(encoding="utf-8")
            result = _from_json(text)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None  # none, or unreadable: grade again
        wanted = self.digest(sub)
        same = (result.student, result.stem, result.digest) == (sub.student, sub.stem, wanted)
        return result if wanted and same else None

    def record(self, result: StudentResult) -> None:
        """Save ``result`` and its feedback, then rewrite the gradebook (thread-safe, atomic)."""
        sub = self._subs.get(result.stem)
        if sub is None or sub.student != result.student:
            raise ValueError(f"no current submission of {result.student!r} with stem "
                             f"{result.stem!r}: record only results of the gradebook's submissions")
        with self._lock:  # the results file last: a student counts as graded once it exists
            atomic_write(self.out / "feedback" / f"{result.stem}.md",
                         feedback_text(result, self.assignment))
            self._results[result.stem] = result
            atomic_write(self.out / "gradebook.csv", gradebook_text(self.results()))
            atomic_write(self.out / "results" / f"{result.stem}.json", _to_json(result))

    def results(self) -> list[StudentResult]:
        """The saved results of the current submissions, sorted by student."""
        with self._lock:
            return sorted(self._results.values(), key=lambda r: r.student)


def _utf8(text: str) -> str:
    """``text`` writable as UTF-8: undecodable bytes of a file name become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula."""
    text = _utf8(text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def gradebook_text(results: list[StudentResult]) -> str:
    """The CSV: one row per student and question, in the order given."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", "question", "points", "max", "isolated"])
    for r in results:
        for q in r.questions:
            writer.writerow([_cell(r.student), _cell(q.question), _fmt_points(q.points),
                             _fmt_points(q.max), "yes" if r.isolated else "no"])
    return buffer.getvalue()


def _one_line(text: str) -> str:
    """``text`` with control characters as spaces and no code fence."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in _utf8(text))
    return text.replace("```", "'''")


def _plain(text: str) -> str:
    """``text`` shown literally by Markdown in running text (one line, markup escaped)."""
    return "".join("\\" + c if c in "\\`*_[]<>!&|~#" else c for c in _one_line(text))


def feedback_text(result: StudentResult, assignment: str) -> str:
    """The Markdown feedback for one student."""
    pts = _fmt_points
    lines = [f"# Feedback for {_plain(result.student)}", "",
             f"Assignment: {_one_line(assignment)}  ",
             f"Total: **{pts(result.total)} / {pts(result.max_total)} points**", ""]
    if not result.isolated:
        lines += ["This notebook was graded without the sandbox: the run was not isolated.", ""]
    lines += ["| Question | Points | Result |", "|---|---:|---|"]
    lines += [f"| {q.question} | {pts(q.points)} / {pts(q.max)} | {q.status.replace('_', ' ')} |"
              for q in result.questions]
    lines += ["", "## Details", ""]
    for q in result.questions:
        lines += [f"### {q.question}: {pts(q.points)} / {pts(q.max)}", "",
                  "```text", _utf8(q.message).replace("```", "'''"), "```", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {_one_line(note)}" for note in result.notes] + [""]
    return "\n".join(lines)


def format_summary(results: list[StudentResult]) -> str:
    """A short plain-text table: one line per student with points and the first note."""
    names = ["".join("?" if unicodedata.category(c) == "Cc" else c for c in _utf8(r.student))
             for r in results]
    width = max([len("student")] + [len(name) for name in names])
    rows = [f"{'student':<{width}}  {'points':>9}  notes"]
    for name, r in zip(names, results):
        score = f"{_fmt_points(r.total)}/{_fmt_points(r.max_total)}"
        note = _one_line(r.notes[0]) if r.notes else ""
        note = note if len(note) <= 70 else note[:67] + "..."
        rows.append(f"{name:<{width}}  {score:>9}  {note}".rstrip())
    return "\n".join(rows)
