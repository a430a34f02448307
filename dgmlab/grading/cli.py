"""Command line: ``dgmlab-grade`` / ``python -m dgmlab.grading``.

::

    python -m dgmlab.grading execute solutions/NN_topic.ipynb [...]
    python -m dgmlab.grading generate [--solutions D] [--exercises D] [--check]
    python -m dgmlab.grading grade SOLUTION.ipynb SUBMISSIONS_DIR [--out grades]
                                   [--cell-timeout 60] [--timeout 600] [--jobs 2]
                                   [--memory-gb 8] [--no-sandbox]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgmlab-grade",
        description="Generate exercise notebooks from solutions, and grade student notebooks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    exe = commands.add_parser("execute", help="re-run solution notebooks and save their outputs",
                              description="Run each notebook top to bottom in fast mode and store "
                                          "its outputs (what strict nbval compares against).")
    exe.add_argument("notebooks", nargs="+", help="solution notebooks to run in place")
    exe.add_argument("--timeout", type=float, default=600,
                     help="seconds a cell may run (default: %(default)s)")

    gen = commands.add_parser("generate", help="write exercises/ from solutions/",
                              description="Write each exercise notebook from its solution "
                                          "notebook and annotate the solutions' nbgrader metadata.")
    gen.add_argument("--solutions", default="solutions",
                     help="folder of solution notebooks (default: %(default)s)")
    gen.add_argument("--exercises", default="exercises",
                     help="folder of exercise notebooks (default: %(default)s)")
    gen.add_argument("--check", action="store_true",
                     help="write nothing; list stale files and exit with status 1 if there are any")

    grd = commands.add_parser("grade", help="grade a folder of student notebooks",
                              description="Run every submission against the solution's full "
                                          "checks and write a gradebook and feedback.")
    grd.add_argument("solution", help="the solution notebook, e.g. solutions/01_coins.ipynb")
    grd.add_argument("submissions", help="folder with one notebook (or one folder) per student")
    grd.add_argument("--out", default="grades", help="output folder (default: %(default)s)")
    grd.add_argument("--cell-timeout", type=float, default=60,
                     help="seconds a cell may run before it is interrupted (default: %(default)s)")
    grd.add_argument("--timeout", type=float, default=600,
                     help="seconds a whole notebook may run before it is killed "
                          "(default: %(default)s)")
    grd.add_argument("--jobs", type=int, default=2,
                     help="notebooks graded in parallel (default: %(default)s)")
    grd.add_argument("--memory-gb", type=float, default=8,
                     help="memory a submission may use, in GiB (default: %(default)s)")
    grd.add_argument("--no-sandbox", action="store_true",
                     help="grade without isolating the submissions (when bubblewrap cannot run here); "
                          "the students' code then runs as you, and the gradebook records isolated=no")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from .notebooks import generate

    paths = generate(args.solutions, args.exercises, check_only=args.check)
    if args.check:
        for path in paths:
            print(f"stale: {path}")
        if paths:
            print("Run `python -m dgmlab.grading generate` and commit the result.", file=sys.stderr)
            return 1
        print("All exercise notebooks are up to date.")
        return 0
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        print("Nothing to do: all exercise notebooks are up to date.")
    return 0


def _execute(args: argparse.Namespace) -> int:
    from .notebooks import execute_in_place

    for path in args.notebooks:
        execute_in_place(path, timeout=args.timeout)
        print(f"ran and saved {path}")
    return 0


def _grade(args: argparse.Namespace) -> int:
    from .grader import format_summary, grade

    def progress(result) -> None:
        print(f"graded {result.student}", file=sys.stderr, flush=True)

    results = grade(args.solution, args.submissions, args.out, cell_timeout=args.cell_timeout,
                    timeout=args.timeout, jobs=args.jobs, sandbox=not args.no_sandbox,
                    memory_gb=args.memory_gb, on_result=progress)
    print(format_summary(results))
    print(f"\n{len(results)} submissions graded; "
          f"see {args.out}/gradebook.csv and {args.out}/feedback/.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    from .notebooks import NotebookError
    from .sandbox import SandboxUnavailable

    try:
        commands = {"execute": _execute, "generate": _generate, "grade": _grade}
        return commands[args.command](args)
    except (NotebookError, SandboxUnavailable, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
