"""Benchmarks: speed and quality measured on demand, not in timed tests.

    python -m dgmlab.bench                 # list the benchmarks
    python -m dgmlab.bench baselines       # run one; print and save its table
    python -m dgmlab.bench zoo             # every family on the digits, side by side
    python -m dgmlab.bench zoo --rerun     # ... re-running every family's benchmark
    python -m dgmlab.bench gan --render    # redraw a saved table from its rows (no measuring)

Each benchmark returns rows (one per model and data set) with the parameter
count, training seconds, held-out NLL in nats and bits/dim, sampling time and
network evaluations per sample, and the quality of the samples in the features
of a classifier trained on the same data (:mod:`dgmlab.quality`), each beside
the real-data floor. The table is printed and written atomically to
``book/results/<name>.md`` (and ``.json``, ``.png``), where the book includes it.

The plumbing is :mod:`dgmlab.bench.core`; each family's benchmarks live in the
module named like the library module they measure (:mod:`dgmlab.bench.flows`
measures :mod:`dgmlab.flows`), and :mod:`dgmlab.bench.zoo` sets them side by side.
"""

import argparse
import sys
from pathlib import Path

from . import autoregressive, baselines, diffusion, discrete, ebm, flows, gan, vae, zoo
from .core import *  # noqa: F403
from .core import BENCHMARKS, RESULTS_DIR, render, run
from .core import __all__ as _core_all
# the families' helpers, readable as bench.<name> (to change one in a test, patch its module)
from .diffusion import DDPM_SAMPLERS, DIFFUSION_BUDGET_S, FM_SAMPLERS
from .discrete import digits_discrete_row, discrete_diagnostics
from .ebm import ais_diagnostics
from .gan import gan_row
from .vae import digits_vae_row, measure_vae, vae_diagnostics

FAMILIES = (baselines, autoregressive, flows, vae, discrete, gan, ebm, diffusion)  # in the course's order

__all__ = [*_core_all, "FAMILIES", "main", "DDPM_SAMPLERS", "DIFFUSION_BUDGET_S", "FM_SAMPLERS", "digits_discrete_row",
           "discrete_diagnostics", "ais_diagnostics", "gan_row", "digits_vae_row", "measure_vae",
           "vae_diagnostics", *(m.__name__.rsplit(".", 1)[1] for m in (*FAMILIES, zoo))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgmlab.bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="the benchmark to run (omit to list them)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the results (default: book/results)")
    parser.add_argument("--no-save", action="store_true", help="print only; write nothing")
    parser.add_argument("--rerun", action="store_true", help="zoo: run every family's benchmark, fresh or not")
    parser.add_argument("--render", action="store_true", help="redraw the saved table from its rows; measure nothing")
    args = parser.parse_args(argv)
    if not args.name:
        order = [m.__name__ for m in (*FAMILIES, zoo)]  # in the course's order
        for name, (_, description) in sorted(BENCHMARKS.items(), key=lambda kv: order.index(kv[1][0].__module__)):
            print(f"{name:<20} {description}")
        return 0
    if args.name not in BENCHMARKS:
        print(f"error: unknown benchmark {args.name!r}; choose one of {sorted(BENCHMARKS)}.", file=sys.stderr)
        return 2
    from ..datasets import CorruptDataError, DataNotFoundError

    zoo.RERUN = args.rerun
    try:  # missing or corrupt data files get their message; any other error keeps its traceback
        if args.render:
            print(render(args.name, Path(args.out)))
        else:
            run(args.name, None if args.no_save else Path(args.out))
    except (DataNotFoundError, CorruptDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err.filename} is missing: run `python -m dgmlab.bench {args.name}` first.", file=sys.stderr)
        return 2
    return 0
