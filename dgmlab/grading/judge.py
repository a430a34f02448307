"""Grade one submission: the judge, outside the sandbox (internal; started by the grader).

``python -m dgmlab.grading.judge REQUEST.json``. The submission's own cells
run in the runner inside the sandbox (:mod:`.runner`). The judge runs the
solution's setup and plain cells itself, and at each check cell binds the
names the student's answer cells define to :class:`~.link.Remote` stand-ins
for the student's objects, then runs the solution's check cell, hidden tests
included, here. The student's functions are called in the sandbox and only
their results come back, as plain data; every comparison and every verdict
happens in this process, out of the student's reach, and no hidden test or
expected value ever enters the sandbox. Progress goes to an events file, one
JSON line per event as it happens, so the grader knows how far the notebook
got if it has to stop this process.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import linecache
import os
import subprocess
import sys
import threading
import time
import types
from collections import deque
from dataclasses import asdict
from pathlib import Path

import nbformat

from ..files import atomic_write
from . import feedback, sandbox
from .link import KernelDied, Link
from .notebooks import _plan, _python, notebook_text


class _Events:
    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8", buffering=1)

    def emit(self, event: str, **fields) -> None:
        self._file.write(json.dumps({"event": event, **fields}, ensure_ascii=False) + "\n")
        self._file.flush()


def solution_brief(solution: nbformat.NotebookNode) -> dict:
    """What the judge needs of the solution, worked out once per run by the grader: each code cell's
    role, source, hidden-test lines and exercise version, and the names its answer cells bind."""
    plans = _plan(solution, "the solution")
    cells = [{"kind": p.kind if c.cell_type == "code" else "text", "source": c.source,
              "question": p.question.id if p.question else None, "exercise": p.exercise_source,
              "hidden": sorted({n + 1 for r in p.regions if r.kind == "hidden" for n in range(r.begin, r.end + 1)})}
             for c, p in zip(solution.cells, plans)]
    return {"cells": cells, "answer_names": answer_names(solution, plans)}


def answer_names(solution: nbformat.NotebookNode, plans: list) -> list[str]:
    """The names the solution's answer cells bind at top level: what the checks take from the student."""
    names: dict[str, None] = {}
    for cell, plan in zip(solution.cells, plans):
        if plan.kind != "answer":
            continue
        for node in ast.parse(_python(cell.source) or "").body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[node.name] = None
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                for leaf in ast.walk(target) if target is not None else ():
                    if isinstance(leaf, ast.Name):
                        names[leaf.id] = None
    return list(names)


def visible_names(source: str, hidden: set[int]) -> list[str]:
    """Names a cell binds at top level (also inside ``with``/``for``/``if``) in its visible part only:
    a name a hidden test also binds is left out, since its value may now be the hidden one."""
    seen: dict[bool, dict[str, None]] = {True: {}, False: {}}
    stack = [(node, False) for node in ast.parse(_python(source) or "").body]
    while stack:
        node, inside = stack.pop(0)
        secret = inside or bool(set(range(node.lineno, node.end_lineno + 1)) & hidden)
        if secret and isinstance(node, (ast.With, ast.For, ast.If, ast.Try)) and node.lineno not in hidden:
            stack += [(n, node.lineno in hidden) for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            seen[secret][node.name] = None
            continue
        for leaf in ast.walk(node):
            if isinstance(leaf, ast.Name) and isinstance(leaf.ctx, ast.Store):
                seen[secret][leaf.id] = None
    return [n for n in seen[False] if n not in seen[True]]


def start_runner(request: dict) -> tuple[subprocess.Popen, deque]:
    """The runner in its sandbox (or, when the instructor chose so, in a plain subprocess)."""
    home = Path(request["home"])
    home.mkdir(parents=True, exist_ok=True)
    program = [sys.executable, "-m", "dgmlab.grading.runner", str(home)]  # the path names it in ps
    if request["sandbox"]:
        cmd, env, cwd = sandbox.command(home, request["threads"]) + program, None, None
    else:
        cmd, env, cwd = program, sandbox.environment(str(home), request["threads"]), home
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd, preexec_fn=sandbox.die_with_parent, start_new_session=True)
    tail: deque = deque(maxlen=50)  # the runner's last stderr lines, for a note if it fails

    def drain() -> None:
        for line in proc.stderr:
            tail.append(line.decode("utf-8", "replace")[:500])

    threading.Thread(target=drain, daemon=True).start()
    return proc, tail


def _text(value, limit: int = 100_000) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"\n[output truncated: {len(text) - limit:,} more characters]\n"


def _outputs(outputs, limit: int = 2_000_000) -> list:
    """The outputs the runner reported (the student's process: it may have lifted its own caps), rebuilt
    from their text only, each text cut to 100,000 characters and all of them to ``limit``."""
    kept, size = [], 0
    for o in outputs if isinstance(outputs, list) else []:
        kind = o.get("output_type") if isinstance(o, dict) else None
        if kind == "stream":
            new = nbformat.v4.new_output("stream", name=str(o.get("name"))[:10], text=_text(o.get("text")))
        elif kind == "error":
            new = nbformat.v4.new_output("error", ename=_text(o.get("ename"), 200), evalue=_text(o.get("evalue")),
                                         traceback=[_text(t, 5000) for t in o.get("traceback", [])][:50])
        elif kind in ("display_data", "execute_result") and isinstance(o.get("data"), dict):
            data = {str(k)[:100]: str(v) for k, v in o["data"].items() if len(str(v)) <= limit}
            new = nbformat.v4.new_output(kind, data=data, **({"execution_count": None} if kind == "execute_result" else {}))
        else:
            continue
        size += len(json.dumps(new))
        if size > limit:
            kept.append(nbformat.v4.new_output("stream", name="stderr", text="[more output, not kept by the grader]\n"))
            break
        kept.append(new)
    return kept


class Judge:
    def __init__(self, request: dict, events: _Events) -> None:
        self.request, self.events = request, events
        self.cells = request["brief"]["cells"]
        self.nb = nbformat.read(request["notebook"], as_version=4)
        self.tests = {int(k): v for k, v in request["tests"].items()}
        self.check_cell = {c["question"]: i for i, c in enumerate(self.cells) if c["kind"] == "test"}
        self.names = request["brief"]["answer_names"]
        self.module = types.ModuleType("__main__")  # the solution's namespace, as a notebook's
        sys.modules["__main__"] = self.module
        self.next_cell = 0  # the next solution cell the judge runs itself
        self.current: int | None = None  # the submission's cell running now
        self.link: Link | None = None

    def connect(self, proc: subprocess.Popen, stderr: deque) -> None:
        self.proc, self.stderr = proc, stderr
        self.link = Link(self.proc.stdin.fileno(), self.proc.stdout.fileno())
        self.link.send({"memory": self.request.get("memory")})
        if self.link.receive().get("op") != "ready":
            raise KernelDied("the runner did not start")
        self.events.emit("kernel")

    def run(self) -> None:
        for index, cell in enumerate(self.nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            self.current = index
            self.events.emit("start", cell=index)
            if index in self.tests:
                self.run_check(index, cell)
            else:
                self.run_student_cell(index, cell)
            self.events.emit("done", cell=index)
            atomic_write(self.request["executed"], notebook_text(self.nb))

    def run_student_cell(self, index: int, cell) -> None:
        reply = self.link.request({"op": "run", "source": cell.source, "timeout": self.request["cell_timeout"]})
        if reply.get("op") != "ran":
            raise KernelDied("the runner answered a cell with something else")
        cell.outputs = _outputs(reply.get("outputs"))
        cell.execution_count = reply.get("count") if isinstance(reply.get("count"), int) else None
        if reply.get("status") == "timeout":
            self.events.emit("cell_timeout", cell=index)

    def catch_up(self, until: int) -> None:
        """Run the solution's own cells (setup, plain) before the check cell at ``until``."""
        for i in range(self.next_cell, until):
            if self.cells[i]["kind"] == "plain":  # not "dropped": solution-only cells may use the answers
                self.execute(self.cells[i]["source"], i, io.StringIO())
        self.next_cell = max(self.next_cell, until + 1)

    def execute(self, source: str, index: int, out: io.StringIO) -> None:
        filename = f"<cell {index + 1}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            exec(compile(_python(source) or source, filename, "exec"), self.module.__dict__)
        import matplotlib.pyplot as plt

        plt.close("all")

    def share_visible_names(self, at: int) -> None:
        """Give the student's process what the visible part of check cell ``at`` defined (later answers may use it)."""
        hidden = feedback.HIDDEN_LINES[f"<cell {at + 1}>"]
        names = [n for n in visible_names(self.cells[at]["source"], hidden) if n in self.module.__dict__]
        if names:
            values = {n: self.module.__dict__[n] for n in names}
            self.link.request({"op": "define", "values": self.link.dumps(values, [], [])})

    def bind_student_names(self) -> None:
        reply = self.link.request({"op": "names", "names": self.names})
        if reply.get("op") != "names":
            raise KernelDied("the runner answered with something else")
        found = self.link.value(reply)[0]
        found = found if isinstance(found, dict) else {}
        for name in self.names:
            if name in found:
                self.module.__dict__[name] = found[name]
            else:
                self.module.__dict__.pop(name, None)

    def run_check(self, index: int, cell) -> None:
        qid = self.tests[index]
        at = self.check_cell[qid]
        self.catch_up(at)
        self.bind_student_names()
        feedback.HIDDEN_LINES[f"<cell {at + 1}>"] = set(self.cells[at]["hidden"])
        feedback._RESULTS.pop(qid, None)
        out, error = io.StringIO(), None
        self.link.deadline = time.monotonic() + self.request["cell_timeout"]
        try:
            self.execute(self.cells[at]["source"], at, out)
        except KeyboardInterrupt:
            error = ("KeyboardInterrupt", "")
            self.events.emit("cell_timeout", cell=index)
        except Exception as exc:
            error = (type(exc).__name__, feedback._brief(str(exc), 300))
        finally:
            self.link.deadline = float("inf")
        cell.source = self.cells[at]["exercise"] or cell.source  # the executed copy shows no hidden test
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=out.getvalue()[:100_000])]
        self.share_visible_names(at)
        result = feedback._RESULTS.pop(qid, None)
        if result is not None:
            self.events.emit("result", cell=index, record=asdict(result))
        else:
            self.events.emit("noresult", cell=index, question=qid, error=error)


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    events = _Events(request["events"])
    os.makedirs(request["workdir"], exist_ok=True)
    os.chdir(request["workdir"])  # a scratch folder: the solution's cells write nothing beside it
    runner = start_runner(request)  # first: it starts (imports torch) while the judge does the same
    judge = Judge(request, events)
    try:
        judge.connect(*runner)
        judge.run()
    except KernelDied as err:
        events.emit("dead", cell=judge.current, error=str(err), stderr="".join(getattr(judge, "stderr", [])))
    except Exception as err:  # report, never hide: the grader turns this into a note
        events.emit("crash", error=f"{type(err).__name__}: {err}")
    finally:
        if judge.link is not None:
            with contextlib.suppress(BaseException):
                judge.link.send({"op": "stop"})
    events.emit("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
