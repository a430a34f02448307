"""Benchmarks: speed and quality measured on demand, not in timed tests.

    python -m dgmlab.bench                 # list the benchmarks
    python -m dgmlab.bench baselines       # run one; print and save its table

Each benchmark returns rows (one per model and data set) with the parameter
count, training seconds, held-out NLL in nats and bits/dim, and sampling time.
The table is printed and written atomically to ``book/results/<name>.md``
(and ``.json``), where the book includes it: the book shows the latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["BENCHMARKS", "benchmark", "measure", "run", "main", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "book" / "results"
BENCHMARKS: dict[str, tuple[Callable[[], list[dict]], str]] = {}
COLUMNS = ("data", "model", "parameters", "train_s", "nll_nats", "bits_per_dim", "sample_ms")
HEADERS = ("data", "model", "parameters", "training (s)", "test NLL (nats)", "bits/dim",
           "sampling (ms/image)")


def benchmark(name: str, description: str):
    """Register a function returning benchmark rows under ``name``."""
    def register(fn):
        BENCHMARKS[name] = (fn, description)
        return fn
    return register


def measure(data_name: str, model_name: str, fit: Callable[[], torch.nn.Module], test: torch.Tensor,
            *, scale: float = 1.0, samples: int = 100) -> dict:
    """Fit a model (timed), score it on ``test`` and time ``sample``: one row of a table."""
    from .metrics import heldout_nll

    start = time.perf_counter()
    model = fit()
    train_s = time.perf_counter() - start
    nll = heldout_nll(model, test, scale=scale)
    start = time.perf_counter()
    with torch.no_grad():
        model.sample(samples)
    sample_ms = 1000 * (time.perf_counter() - start) / samples
    return {"data": data_name, "model": model_name, "parameters": model.num_parameters(),
            "train_s": train_s, "nll_nats": nll.nats, "bits_per_dim": nll.bpd, "sample_ms": sample_ms,
            "nll_is_bound": nll.is_bound}


def _format(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        rel = "≤ " if r.get("nll_is_bound") else ""
        out.append([r["data"], r["model"], f"{r['parameters']:,}", f"{r['train_s']:.2f}",
                    f"{rel}{r['nll_nats']:.2f}", f"{r['bits_per_dim']:.3f}", f"{r['sample_ms']:.3f}"])
    return out


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the form the book includes)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _format(rows)]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(name: str, out_dir: Path | None = RESULTS_DIR) -> list[dict]:
    """Run benchmark ``name``, print its table, and save it under ``out_dir`` (None: do not save)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    fn, description = BENCHMARKS[name]
    torch.manual_seed(0)
    rows = fn()
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    table = markdown_table(rows)
    print(f"{name}: {description}\n({machine})\n\n{table}")
    if out_dir is not None:
        note = (f"<!-- written by `python -m dgmlab.bench {name}`; do not edit by hand -->\n"
                f"{table}\n\n*Measured on {machine}.*\n")
        _write_atomic(Path(out_dir) / f"{name}.md", note)
        _write_atomic(Path(out_dir) / f"{name}.json",
                      json.dumps({"benchmark": name, "machine": machine, "rows": rows}, indent=1) + "\n")
    return rows


# ---------------------------------------------------------------------------- benchmarks
@benchmark("baselines", "the classical baselines every model in the course has to beat")
def _baselines() -> list[dict]:
    from . import baselines as B
    from . import data, datasets

    rows = []
    xb, xb_test = (data.digits(s, "binary", flatten=True).x for s in ("train", "test"))
    xl, xl_test = (data.digits(s, "levels", flatten=True).x for s in ("train", "test"))
    rows.append(measure("digits, binary", "independent pixels",
                        lambda: B.IndependentBernoulli.from_data(xb, alpha=1.0), xb_test))
    rows.append(measure("digits, binary", "Markov chain (raster order)",
                        lambda: B.MarkovChain.from_data(xb, 2, alpha=1.0), xb_test))
    rows.append(measure("digits, 17 levels", "independent pixels",
                        lambda: B.IndependentCategorical.from_data(xl, 17, alpha=0.5), xl_test))
    rows.append(measure("digits, 17 levels", "Markov chain (raster order)",
                        lambda: B.MarkovChain.from_data(xl, 17, alpha=0.5), xl_test))
    try:  # binarized MNIST, when its canonical files can be found
        train = data.bernoulli_binarize(datasets.load_mnist("train", download=False)[0], seed=0)
        test = data.bernoulli_binarize(datasets.load_mnist("test", download=False)[0], seed=1)
    except (datasets.DataNotFoundError, datasets.CorruptDataError) as err:
        print(f"(binarized MNIST skipped: {str(err).splitlines()[0]})", file=sys.stderr)
        return rows
    train, test = train.reshape(len(train), -1), test.reshape(len(test), -1)
    rows.append(measure("MNIST, binarized", "independent pixels",
                        lambda: B.IndependentBernoulli.from_data(train, alpha=1.0), test))
    rows.append(measure("MNIST, binarized", "Markov chain (raster order)",
                        lambda: B.MarkovChain.from_data(train, 2, alpha=1.0), test))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dgmlab.bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="the benchmark to run (omit to list them)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the results (default: book/results)")
    parser.add_argument("--no-save", action="store_true", help="print only; write nothing")
    args = parser.parse_args(argv)
    if not args.name:
        for name, (_, description) in BENCHMARKS.items():
            print(f"{name:<12} {description}")
        return 0
    try:
        run(args.name, None if args.no_save else Path(args.out))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
