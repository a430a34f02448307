"""Grade a folder of student notebooks against a solution notebook.

Every submission gets the solution's full check cells (hidden tests included)
in place of its own, and before each of them the names the checks use
(``check``, ``expect_*``, the setup cell's imports) are silently bound again to
the real ones. It runs in a fresh ``python3`` kernel inside its own
worker process, in a scratch folder, with a per-cell and a whole-notebook time
limit. Whatever a submission does -- crash, hang, kill its kernel, not be a
notebook at all -- it scores zero where it failed, gets a note saying why, and
the run goes on. Results land in ``OUT/gradebook.csv``, ``OUT/feedback/`` and
``OUT/executed/``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from ..files import atomic_write
from .feedback import LOG_ENV, _fmt_points, _score
from .notebooks import (
    KERNELSPEC,
    NotebookError,
    Question,
    annotate_solution,
    guard_code,
    notebook_text,
    questions,
    read_notebook,
)

__all__ = [
    "QuestionResult",
    "StudentResult",
    "PreparedSubmission",
    "Submission",
    "SubmissionError",
    "find_submissions",
    "format_summary",
    "grade",
    "load_submission",
    "prepare_submission",
]

NOT_RUN = "not_run"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding ``dgmlab``


@dataclass(frozen=True)
class QuestionResult:
    """One question of one student: points earned, the maximum, status and message."""

    question: str
    points: float
    max: float
    status: str
    message: str


@dataclass
class StudentResult:
    """Everything graded for one student."""

    student: str
    source: Path
    questions: list[QuestionResult]
    notes: list[str] = field(default_factory=list)
    executed: Path | None = None

    @property
    def total(self) -> float:
        return sum(q.points for q in self.questions)

    @property
    def max_total(self) -> float:
        return sum(q.max for q in self.questions)


@dataclass(frozen=True)
class Submission:
    """A student's entry in the submissions folder; ``problem`` says why it cannot run."""

    student: str
    path: Path
    problem: str | None = None


class SubmissionError(ValueError):
    """A submitted file that is not a usable notebook (the message is for the student)."""


# --------------------------------------------------------------------------
# Finding and reading submissions
# --------------------------------------------------------------------------


def find_submissions(folder: str | os.PathLike, assignment: str) -> list[Submission]:
    """One submission per visible entry of ``folder``: a file, or a folder holding the notebook."""
    entries = sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))
    entries = [p for p in entries if p.is_file() or p.is_dir()]
    stems = [p.stem if p.is_file() else p.name for p in entries]
    found = []
    for entry, stem in zip(entries, stems):
        student = stem if stems.count(stem) == 1 else entry.name  # alice.ipynb and alice/
        if entry.is_file():
            found.append(Submission(student, entry, _file_problem(entry)))
        else:
            found.append(_folder_submission(student, entry, assignment))
    return found


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".ipynb":
        return None
    kind = f"a {path.suffix} file" if path.suffix else "a file without extension"
    return (f"{path.name} is {kind}, not a Jupyter notebook (.ipynb), so it could not be graded. "
            "Submit the .ipynb file itself.")


def _folder_submission(student: str, folder: Path, assignment: str) -> Submission:
    notebooks = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix == ".ipynb" and not p.name.startswith("."))
    named = folder / assignment
    if named.is_file():
        return Submission(student, named)
    if len(notebooks) == 1:
        return Submission(student, notebooks[0])
    listing = ", ".join(p.name for p in notebooks) or "none"
    return Submission(student, folder, f"the folder {folder.name}/ holds no notebook named "
                      f"{assignment} and not exactly one other notebook (found: {listing}).")


def load_submission(path: str | os.PathLike) -> NotebookNode:
    """Read a submitted notebook, raising :class:`SubmissionError` with a clear reason."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"%PDF"):
        raise SubmissionError(f"{path.name} is a PDF, not a Jupyter notebook, so it could not be "
                              "graded. Submit the .ipynb file itself.")
    try:
        text = data.decode("utf-8")
        json.loads(text)
    except UnicodeDecodeError:
        raise SubmissionError(f"{path.name} is not a text file, so it is not a Jupyter notebook "
                              "and could not be graded.") from None
    except json.JSONDecodeError as err:
        raise SubmissionError(
            f"{path.name} is not valid notebook JSON ({err.msg} at line {err.lineno}, column "
            f"{err.colno}), so it could not be graded. The file is damaged or was edited outside "
            "Jupyter; open it in Jupyter to check, then submit it again.") from None
    try:
        nb = nbformat.reads(text, as_version=4, capture_validation_error={})
        return _rebuild(nb)
    except Exception as err:
        raise SubmissionError(f"{path.name} is JSON but not a Jupyter notebook ({err}), so it "
                              "could not be graded.") from None


def _rebuild(nb: NotebookNode) -> NotebookNode:
    """A clean nbformat-4.5 copy of a submission: its cells' type, source and metadata only."""
    clean = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC)})
    makers = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell,
              "raw": nbformat.v4.new_raw_cell}
    for cell in nb["cells"]:
        if cell.get("cell_type") in makers:
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else str(source)
            metadata = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
            clean.cells.append(makers[cell["cell_type"]](source=source, metadata=metadata))
    return clean


@dataclass
class PreparedSubmission:
    """A submission ready to run: the notebook, its genuine check cells, notes for the student,
    and the code re-run silently before each check cell (see :func:`notebooks.guard_code`)."""

    nb: NotebookNode
    tests: dict[int, str]  # cell index -> question id
    notes: list[str]
    guard: str = ""


def prepare_submission(solution: NotebookNode, submission: NotebookNode) -> PreparedSubmission:
    """The submission with its check cells replaced by the solution's full ones.

    Check cells are matched by ``nbgrader.grade_id``; a missing one is added at
    the end, a duplicate is dropped, so students cannot weaken or skip checks.
    Names the checks use are bound again before each check runs (``guard``),
    so rebinding ``check`` or ``expect_close`` in an answer cell earns nothing.
    Not prevented: changing the dgmlab (or torch) modules themselves, e.g.
    ``dgmlab.grading.feedback.expect_close = ...``, or the notebook's own
    variables that a check reads.
    """
    annotated = annotate_solution(solution, "the solution")
    genuine = {q.id: annotated.cells[q.cell] for q in questions(solution, "the solution")}
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC)})
    tests: dict[int, str] = {}
    notes: list[str] = []

    def add_check(qid: str) -> None:
        cell = nbformat.v4.new_code_cell(source=genuine[qid].source,
                                         metadata=dict(genuine[qid].metadata))
        tests[len(nb.cells)] = qid
        nb.cells.append(cell)

    for cell in submission.cells:
        nbgrader = cell.metadata.get("nbgrader")
        qid = nbgrader.get("grade_id") if isinstance(nbgrader, dict) else None
        if qid not in genuine:
            nb.cells.append(copy.deepcopy(cell))
        elif qid in tests.values():
            notes.append(f"A second copy of the check cell for {qid} was removed before grading.")
        else:
            add_check(qid)
    for qid in genuine:
        if qid not in tests.values():
            notes.append(f"The check cell for {qid} was missing from the notebook; it was added "
                         "back at the end and run there.")
            add_check(qid)
    return PreparedSubmission(nb, tests, notes, guard_code(solution, "the solution"))


# --------------------------------------------------------------------------
# Running one submission in a worker process
# --------------------------------------------------------------------------


@dataclass
class _Settings:
    cell_timeout: float
    timeout: float
    threads: int


def _worker_env(scratch: Path, settings: _Settings) -> dict[str, str]:
    from ..modes import FULL_ENV  # here, not at the top: dgmlab.modes loads torch

    env = dict(os.environ)
    env[LOG_ENV] = str(scratch / "grading-log.jsonl")
    # Connection files and anything the kernel writes to its temp folder go into
    # scratch, which is deleted afterwards -- also when the kernel had to be killed.
    env["JUPYTER_RUNTIME_DIR"] = str(scratch / "runtime")
    (scratch / "tmp").mkdir(exist_ok=True)
    for var in ("TMPDIR", "TEMP", "TMP"):
        env[var] = str(scratch / "tmp")
    if str(_PACKAGE_ROOT) not in site.getsitepackages():
        # A source checkout: workers and kernels must import this very dgmlab.
        paths = [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault(FULL_ENV, "0")  # grade the fast, CPU-sized version
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # parallel jobs share the cores
        env.setdefault(var, str(settings.threads))
    return env


def _read_events(path: Path) -> list[dict]:
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return events


def _kill_group(pgid: int | None) -> None:
    if pgid is None or not hasattr(os, "killpg"):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid: int | None, limit: float = 5.0) -> None:
    """Wait until ``pid`` has exited (or is a zombie awaiting its new parent)."""
    if pid is None:
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat")
            if stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                return
        except (ProcessLookupError, FileNotFoundError):
            return
        except PermissionError:
            return  # the pid now belongs to someone else
        time.sleep(0.05)


def _kernel_pids(events: list[dict]) -> list[int]:
    """Every kernel the worker started (more than one if a start had to be retried)."""
    return [e["pid"] for e in events if e["event"] == "kernel" and e.get("pid") is not None]


def _stop_worker(proc: subprocess.Popen, events_path: Path) -> None:
    """Kill a worker's process group, then its kernels', and wait until all are gone."""
    _kill_group(proc.pid)
    if not hasattr(os, "killpg"):
        proc.kill()
    proc.wait()
    kernels = _kernel_pids(_read_events(events_path))
    for kernel in kernels:
        _kill_group(kernel)
    for kernel in kernels:
        _wait_gone(kernel)


class _Running:
    """Workers in flight, so that an interrupted run (Ctrl-C) can stop them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[subprocess.Popen, Path] = {}

    def add(self, proc: subprocess.Popen, events_path: Path) -> None:
        with self._lock:
            self._workers[proc] = events_path

    def discard(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._workers.pop(proc, None)

    def stop_all(self) -> None:
        with self._lock:
            workers = list(self._workers.items())
        for proc, events_path in workers:
            _stop_worker(proc, events_path)


def _run_worker(
    prepared: PreparedSubmission, scratch: Path, settings: _Settings, running: _Running
) -> tuple[list[dict], str]:
    """Execute the notebook in a worker; return its events and how it ended.

    The worker runs in its own session, the kernel (started by jupyter_client)
    in another; on overrun both process groups are killed, so nothing is left.
    """
    work = scratch / "work"
    work.mkdir()
    events_path = scratch / "events.jsonl"
    atomic_write(scratch / "submission.ipynb", notebook_text(prepared.nb))
    request = {
        "notebook": str(scratch / "submission.ipynb"), "events": str(events_path),
        "executed": str(scratch / "executed.ipynb"), "workdir": str(work),
        "sockets": str(scratch / "sockets"),
        "cell_timeout": settings.cell_timeout, "startup_timeout": min(60, settings.timeout),
        "tests": {str(k): v for k, v in prepared.tests.items()}, "guard": prepared.guard,
    }
    atomic_write(scratch / "request.json", json.dumps(request))
    with open(scratch / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dgmlab.grading._worker", str(scratch / "request.json")],
            cwd=work, env=_worker_env(scratch, settings), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    running.add(proc, events_path)
    try:
        proc.wait(timeout=settings.timeout)
        ending = "finished" if proc.returncode == 0 else "worker_failed"
    except subprocess.TimeoutExpired:
        ending = "timeout"
    finally:
        # Also on success: this reaps whatever the student's code left in the kernel's group.
        _stop_worker(proc, events_path)
        running.discard(proc)
    return _read_events(events_path), ending


# --------------------------------------------------------------------------
# Turning events into results and notes
# --------------------------------------------------------------------------


def _cell_label(nb: NotebookNode, index: int) -> str:
    first = next((s.strip() for s in nb.cells[index].source.splitlines() if s.strip()), "")
    return f"cell {index + 1} ({first[:60]!r})" if first else f"cell {index + 1}"


@dataclass(frozen=True)
class _Stop:
    """Where execution stopped early (cell index, if known), the note, and a short reason."""

    cell: int | None
    note: str
    short: str


def _stop_reason(ending: str, events: list[dict], nb: NotebookNode, settings: _Settings,
                 worker_log: str) -> _Stop | None:
    """Why execution stopped before the end of the notebook, or None if it did not."""
    started = [e["cell"] for e in events if e["event"] == "start"]
    current = started[-1] if started else None
    at = f" while running {_cell_label(nb, current)}" if current is not None else " while starting"
    if ending == "timeout":
        return _Stop(current, f"The notebook was stopped after the {settings.timeout:g} s limit "
                     f"for the whole notebook{at}; the checks from there on were not run.",
                     f"the notebook ran out of time ({settings.timeout:g} s in total)")
    dead = next((e for e in events if e["event"] == "dead"), None)
    if dead is not None:
        return _Stop(dead["cell"], f"The Python kernel died{at} (the code crashed Python, e.g. by "
                     "calling os._exit or running out of memory); the checks from there on were "
                     "not run.", "the Python kernel died")
    crash = next((e for e in events if e["event"] == "crash"), None)
    if crash is not None:
        return _Stop(current, f"Grading stopped{at} because of an error in the grader: "
                     f"{crash['error']}.", "the grader failed")
    if ending != "finished" or not any(e["event"] == "finished" for e in events):
        tail = " / ".join(worker_log.strip().splitlines()[-3:])
        return _Stop(current, "Grading stopped because the grading worker failed"
                     + (f": {tail}" if tail else "."), "the grader failed")
    return None


def _results(events: list[dict], prepared: PreparedSubmission, qs: list[Question],
             stop: _Stop | None) -> list[QuestionResult]:
    """One result per question, trusting only verdicts logged by the genuine check cells."""
    cell_of = {qid: index for index, qid in prepared.tests.items()}
    logged = {e["record"].get("question"): e["record"] for e in events if e["event"] == "result"}
    missing = {e["question"]: e.get("error") for e in events if e["event"] == "noresult"}
    out = []
    for q in qs:
        zero = f"❌ {q.id}: 0/{_score(q.points)}."
        record = logged.get(q.id)
        if record is not None:
            passed = record.get("status") == "passed"
            out.append(QuestionResult(q.id, q.points if passed else 0, q.points,
                                      str(record.get("status")), str(record.get("message", ""))))
        elif q.id in missing:
            error = missing[q.id]
            why = f"{error[0]}: {error[1]}" if error else "no verdict was reported"
            out.append(QuestionResult(q.id, 0, q.points, "error", f"{zero} The check cell failed "
                                      f"before it could report a verdict ({why})."))
        else:
            when = ("while this check was running" if stop and stop.cell == cell_of[q.id]
                    else "before this check was reached")
            reason = stop.short if stop else "the notebook stopped"
            out.append(QuestionResult(q.id, 0, q.points, NOT_RUN,
                                      f"{zero} Not graded: {reason} {when}."))
    return out


def _grade_one(sub: Submission, solution: NotebookNode, qs: list[Question], out: Path,
               settings: _Settings, running: _Running) -> StudentResult:
    """Grade one submission; never raises for anything the submission does."""
    executed = out / "executed" / f"{_safe(sub.student)}.ipynb"
    executed.unlink(missing_ok=True)  # a stale copy from an earlier run would mislead
    try:
        if sub.problem:
            raise SubmissionError(sub.problem)
        prepared = prepare_submission(solution, load_submission(sub.path))
    except (SubmissionError, OSError) as err:
        return _zero(sub, qs, str(err))
    scratch = Path(tempfile.mkdtemp(prefix="dgmlab-grade-"))
    try:
        events, ending = _run_worker(prepared, scratch, settings, running)
        worker_log = (scratch / "worker.log").read_text(encoding="utf-8", errors="replace")
        stop = _stop_reason(ending, events, prepared.nb, settings, worker_log)
        notes = list(prepared.notes)
        notes += [f"{_cell_label(prepared.nb, e['cell'])} ran longer than the "
                  f"{settings.cell_timeout:g} s limit per cell and was interrupted."
                  for e in events if e["event"] == "cell_timeout"]
        notes += [stop.note] if stop else []
        result = StudentResult(sub.student, sub.path, _results(events, prepared, qs, stop), notes)
        if (scratch / "executed.ipynb").exists():
            atomic_write(executed, (scratch / "executed.ipynb").read_text(encoding="utf-8"))
            result.executed = executed
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _zero(sub: Submission, qs: list[Question], note: str) -> StudentResult:
    results = [QuestionResult(q.id, 0, q.points, NOT_RUN,
                              f"❌ {q.id}: 0/{_score(q.points)}. Not graded (see the notes).")
               for q in qs]
    return StudentResult(sub.student, sub.path, results, [note])


# --------------------------------------------------------------------------
# Writing the results
# --------------------------------------------------------------------------


def _safe(name: str) -> str:
    return "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in name) or "_"


def _gradebook_text(results: list[StudentResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", "question", "points", "max"])
    for r in results:
        for q in r.questions:
            writer.writerow([r.student, q.question, _fmt_points(q.points), _fmt_points(q.max)])
    return buffer.getvalue()


def _feedback_text(result: StudentResult, assignment: str) -> str:
    lines = [f"# Feedback for {result.student}", "",
             f"Assignment: {assignment}  ",
             f"Total: **{_fmt_points(result.total)} / {_fmt_points(result.max_total)} points**", "",
             "| Question | Points | Result |", "|---|---:|---|"]
    lines += [f"| {q.question} | {_fmt_points(q.points)} / {_fmt_points(q.max)} | "
              f"{q.status.replace('_', ' ')} |" for q in result.questions]
    lines += ["", "## Details", ""]
    for q in result.questions:
        lines += [f"### {q.question}: {_fmt_points(q.points)} / {_fmt_points(q.max)}", "",
                  "```text", q.message.replace("```", "'''"), "```", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in result.notes] + [""]
    return "\n".join(lines)


def format_summary(results: list[StudentResult]) -> str:
    """A short plain-text table: one line per student with points and the first note."""
    width = max([len("student")] + [len(r.student) for r in results])
    rows = [f"{'student':<{width}}  {'points':>9}  notes"]
    for r in results:
        score = f"{_fmt_points(r.total)}/{_fmt_points(r.max_total)}"
        note = r.notes[0] if r.notes else ""
        note = note if len(note) <= 70 else note[:67] + "..."
        rows.append(f"{r.student:<{width}}  {score:>9}  {note}".rstrip())
    return "\n".join(rows)


# --------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------


def grade(
    solution: str | os.PathLike,
    submissions: str | os.PathLike,
    out: str | os.PathLike = "grades",
    *,
    cell_timeout: float = 60,
    timeout: float = 600,
    jobs: int = 2,
    on_result: Callable[[StudentResult], None] | None = None,
) -> list[StudentResult]:
    """Grade every submission in ``submissions`` against the ``solution`` notebook.

    Writes ``out/gradebook.csv``, ``out/feedback/<student>.md`` and
    ``out/executed/<student>.ipynb``; returns the results sorted by student.
    ``on_result`` is called as each student finishes (e.g. to show progress).
    """
    solution, submissions, out = Path(solution), Path(submissions), Path(out)
    if not submissions.is_dir():
        raise NotebookError(f"no submissions folder {submissions}: pass the folder that holds "
                            "one notebook (or one folder) per student")
    if min(cell_timeout, timeout) <= 0 or jobs < 1:
        raise ValueError("cell_timeout and timeout must be positive and jobs at least 1, got "
                         f"cell_timeout={cell_timeout}, timeout={timeout}, jobs={jobs}.")
    solution_nb = read_notebook(solution)
    qs = questions(solution_nb, str(solution))
    if not qs:
        raise NotebookError(f"{solution} has no graded questions: no `with check(...)` cells")
    settings = _Settings(cell_timeout, timeout, max(1, (os.cpu_count() or 1) // jobs))
    running = _Running()

    def run(sub: Submission) -> StudentResult:
        try:
            result = _grade_one(sub, solution_nb, qs, out, settings, running)
        except Exception as err:  # a grader bug must not cost the other students their grades
            result = _zero(sub, qs, f"Internal grader error, please tell the instructor: "
                                    f"{type(err).__name__}: {err}")
        atomic_write(out / "feedback" / f"{_safe(sub.student)}.md",
                          _feedback_text(result, solution.name))
        if on_result is not None:
            on_result(result)
        return result

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        results = list(pool.map(run, find_submissions(submissions, solution.name)))
    except BaseException:  # e.g. Ctrl-C: leave no worker or kernel behind
        pool.shutdown(wait=False, cancel_futures=True)
        running.stop_all()
        raise
    pool.shutdown()
    results.sort(key=lambda r: r.student)
    atomic_write(out / "gradebook.csv", _gradebook_text(results))
    return results
