"""Grade a folder of student notebooks against a solution notebook.

Each submission runs in its own sandbox (:mod:`.sandbox`), driven by a judge
process outside it (:mod:`.judge`) that runs the solution's check cells,
hidden tests included, and calls the student's functions across the wall:
verdicts are computed where the student's code cannot reach them. A
submission that crashes, hangs, kills its process or is not a notebook at all
scores zero where it failed, gets a note saying why, and the run goes on.
Each student's result is saved as soon as they are graded (``OUT/results/``,
``OUT/feedback/``, ``OUT/gradebook.csv``, ``OUT/executed/``), so a run that
is stopped keeps what it had, and running it again grades only the rest.
Every process the grader starts dies with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nbformat import NotebookNode

from ..files import atomic_write
from . import sandbox as _sandbox
from .feedback import CheckResult, _score
from .gradebook import NOT_RUN, Gradebook, StudentResult, format_summary, zero_result
from .judge import solution_brief
from .notebooks import NotebookError, Question, notebook_text, questions, read_notebook
from .sandbox import SandboxUnavailable
from .submissions import Prepared, Submission, SubmissionError, find_submissions, load_submission, prepare_submission

__all__ = ["SandboxUnavailable", "format_summary", "grade", "sandbox_available"]


def sandbox_available() -> bool:
    """Whether bubblewrap can isolate submissions on this machine."""
    return _sandbox.available() is None


@dataclass
class _Settings:
    cell_timeout: float
    timeout: float
    threads: int
    sandbox: bool
    memory: int


class _Running:
    """Judges in flight, so that an interrupted run (Ctrl-C) can stop them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()

    def start(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            proc = subprocess.Popen(*args, **kwargs)
            self.procs.add(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        proc.kill()  # the sandbox dies with its judge (bubblewrap --die-with-parent)
        proc.wait()
        with self._lock:
            self.procs.discard(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


def _run_judge(prepared: Prepared, brief: dict, scratch: Path, settings: _Settings,
               running: _Running) -> tuple[list[dict], str]:
    """Run the judge on one prepared submission; return its events and how it ended."""
    atomic_write(scratch / "submission.ipynb", notebook_text(prepared.nb))
    request = {"notebook": str(scratch / "submission.ipynb"),
               "tests": {str(k): v for k, v in prepared.tests.items()}, "events": str(scratch / "events.jsonl"),
               "executed": str(scratch / "executed.ipynb"), "home": str(scratch / "home"),
               "workdir": str(scratch / "judge"), "brief": brief,
               "cell_timeout": settings.cell_timeout, "sandbox": settings.sandbox,
               "threads": settings.threads, "memory": settings.memory}
    atomic_write(scratch / "request.json", json.dumps(request))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "OMP_NUM_THREADS": str(settings.threads), "DGMLAB_FULL": "0", "MPLBACKEND": "Agg"}
    with open(scratch / "judge.log", "wb") as log:
        proc = running.start([sys.executable, "-m", "dgmlab.grading.judge", str(scratch / "request.json")],
                             env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=_sandbox.die_with_parent, start_new_session=True)
    try:
        proc.wait(timeout=settings.timeout)
        ending = "finished" if proc.returncode == 0 else "judge_failed"
    except subprocess.TimeoutExpired:
        ending = "timeout"
    finally:
        running.stop(proc)
    return _read_events(scratch / "events.jsonl"), ending


def _read_events(path: Path) -> list[dict]:
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return events


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
                 judge_log: str) -> _Stop | None:
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
        tail = " / ".join(judge_log.strip().splitlines()[-3:])
        return _Stop(current, "Grading stopped because the grader's judge process failed"
                     + (f": {tail}" if tail else "."), "the grader failed")
    return None


def _results(events: list[dict], prepared: Prepared, qs: list[Question], stop: _Stop | None) -> list[CheckResult]:
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
            out.append(CheckResult(q.id, q.points if passed else 0, q.points,
                                   str(record.get("status")), str(record.get("message", ""))))
        elif q.id in missing:
            error = missing[q.id]
            why = f"{error[0]}: {error[1]}" if error else "no verdict was reported"
            out.append(CheckResult(q.id, 0, q.points, "error", f"{zero} The check cell failed "
                                   f"before it could report a verdict ({why})."))
        else:
            when = ("while this check was running" if stop and stop.cell == cell_of[q.id]
                    else "before this check was reached")
            reason = stop.short if stop else "the notebook stopped"
            out.append(CheckResult(q.id, 0, q.points, NOT_RUN,
                                   f"{zero} Not graded: {reason} {when}."))
    return out


def _grade_one(sub: Submission, brief: dict, solution_nb: NotebookNode, qs: list[Question],
               book: Gradebook, settings: _Settings, running: _Running) -> StudentResult:
    """Grade one submission; never raises for anything the submission does."""
    digest = book.digest(sub)
    try:
        if sub.problem:
            raise SubmissionError(sub.problem)
        prepared = prepare_submission(solution_nb, load_submission(sub.path))
    except (SubmissionError, OSError) as err:
        return zero_result(sub, qs, str(err), digest, settings.sandbox)
    scratch = Path(tempfile.mkdtemp(prefix="dgmlab-grade-"))
    try:
        events, ending = _run_judge(prepared, brief, scratch, settings, running)
        log = (scratch / "judge.log").read_text(encoding="utf-8", errors="replace")
        stop = _stop_reason(ending, events, prepared.nb, settings, log)
        notes = list(sub.notes) + list(prepared.notes)
        notes += [f"{_cell_label(prepared.nb, e['cell'])} ran longer than the "
                  f"{settings.cell_timeout:g} s limit per cell and was interrupted."
                  for e in events if e["event"] == "cell_timeout"]
        notes += [stop.note] if stop else []
        result = StudentResult(sub.student, sub.stem, _results(events, prepared, qs, stop), notes,
                               digest=digest, isolated=settings.sandbox)
        if (scratch / "executed.ipynb").exists():
            result.executed = book.out / "executed" / f"{sub.stem}.ipynb"
            atomic_write(result.executed, (scratch / "executed.ipynb").read_text(encoding="utf-8"))
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _refuse_bad_arguments(submissions: Path, cell_timeout: float, timeout: float, jobs: int, sandbox: bool,
                          memory_gb: float) -> None:
    if not submissions.is_dir():
        raise NotebookError(f"no submissions folder {submissions}: pass the folder that holds "
                            "one notebook (or one folder) per student")
    if min(cell_timeout, timeout, memory_gb) <= 0 or jobs < 1:
        raise ValueError("cell_timeout, timeout and memory_gb must be positive and jobs at least 1, got "
                         f"cell_timeout={cell_timeout}, timeout={timeout}, memory_gb={memory_gb}, jobs={jobs}.")
    if sandbox and (why := _sandbox.available()):
        raise SandboxUnavailable(f"cannot isolate the submissions: {why}. Install it, or grade without "
                                 "isolation with --no-sandbox (the gradebook then records isolated=no).")


def grade(
    solution: str | os.PathLike,
    submissions: str | os.PathLike,
    out: str | os.PathLike = "grades",
    *,
    cell_timeout: float = 60,
    timeout: float = 600,
    jobs: int = 2,
    sandbox: bool = True,
    memory_gb: float = 8,
    on_result: Callable[[StudentResult], None] | None = None,
) -> list[StudentResult]:
    """Grade every submission in ``submissions`` against the ``solution`` notebook.

    Students graded by an earlier run into the same ``out`` (same submission,
    solution and settings) are not graded again. ``sandbox=False`` grades
    without isolation, and the gradebook says so. Returns every student's
    result, sorted by student; ``on_result`` is called as each one finishes.
    """
    solution, submissions, out = Path(solution), Path(submissions), Path(out)
    _refuse_bad_arguments(submissions, cell_timeout, timeout, jobs, sandbox, memory_gb)
    solution_nb = read_notebook(solution)
    qs = questions(solution_nb, str(solution))
    if not qs:
        raise NotebookError(f"{solution} has no graded questions: no `with check(...)` cells")
    settings = _Settings(cell_timeout, timeout, max(1, (os.cpu_count() or 1) // jobs), sandbox,
                         int(memory_gb * 2**30))
    key = hashlib.sha256(solution.read_bytes() + repr((cell_timeout, timeout, sandbox, memory_gb)).encode()).hexdigest()
    brief = solution_brief(solution_nb)
    subs = find_submissions(submissions, solution.name)
    book = Gradebook(out, solution.name, subs, key)
    running = _Running()

    def run(sub: Submission) -> None:
        try:
            result = _grade_one(sub, brief, solution_nb, qs, book, settings, running)
        except Exception as err:  # a grader bug must not cost the other students their grades
            result = zero_result(sub, qs, f"Internal grader error, please tell the instructor: "
                                          f"{type(err).__name__}: {err}", book.digest(sub), sandbox)
        book.record(result)
        if on_result is not None:
            on_result(result)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        list(pool.map(run, [s for s in subs if book.saved(s) is None]))
    except BaseException:  # e.g. Ctrl-C: leave no judge or sandbox behind
        pool.shutdown(wait=False, cancel_futures=True)
        running.stop_all()
        raise
    pool.shutdown()
    return book.results()
