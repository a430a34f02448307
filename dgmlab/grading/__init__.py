"""Graded exercises: feedback for students, exercise generation and grading.

Students only need the checks, which load instantly::

    from dgmlab.grading import check, expect_close

Instructors use the generator (:mod:`dgmlab.grading.notebooks`) and the grader
(:mod:`dgmlab.grading.grader`), loaded on first use, or the command line::

    python -m dgmlab.grading generate [--check]
    python -m dgmlab.grading grade solutions/01_x.ipynb submissions/ --out grades
"""

from __future__ import annotations

import importlib

from . import feedback as _feedback
from .feedback import *  # noqa: F403 -- the checks, listed in feedback.__all__

# Instructor tools pull in nbformat/nbclient, so they are imported lazily to
# keep ``from dgmlab.grading import check`` fast in every student kernel.
_LAZY = {
    "NotebookError": "notebooks",
    "Question": "notebooks",
    "annotate_solution": "notebooks",
    "find_leaks": "notebooks",
    "generate": "notebooks",
    "make_exercise": "notebooks",
    "questions": "notebooks",
    "StudentResult": "gradebook",
    "grade": "grader",
}

__all__ = list(_feedback.__all__)  # ``from dgmlab.grading import *`` gives the checks only


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
