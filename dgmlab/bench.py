"""Benchmarks: speed and quality measured on demand, not in timed tests.

    python -m dgmlab.bench                 # list the benchmarks
    python -m dgmlab.bench baselines       # run one; print and save its table

Each benchmark returns rows (one per model and data set) with the parameter
count, training seconds, held-out NLL in nats and bits/dim, sampling time, and
the quality of the samples in the features of a classifier trained on the same
data (:mod:`dgmlab.quality`), each beside the real-data floor.
The table is printed and written atomically to ``book/results/<name>.md``
(and ``.json``), where the book includes it: the book shows the latest figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_write

__all__ = ["BENCHMARKS", "benchmark", "measure", "Judge", "run", "main", "RESULTS_DIR", "measure_vae",
           "vae_diagnostics", "discrete_diagnostics", "class_accuracy", "mode_and_copy_diagnostics", "Rounded",
           "ais_diagnostics"]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "book" / "results"
BENCHMARKS: dict[str, tuple[Callable[[], list[dict]], str]] = {}
GRID = 16  # samples per model in a benchmark's figure
PANELS_PER_LINE = 6  # a benchmark figure wraps after this many panels (the book's page is ~12 inches of them)
HEADERS = ("data", "model", "parameters", "training (s)", "test NLL (nats)", "bits/dim",
           "FD (real floor)", "precision (floor)", "recall (floor)", "sampling (ms/image)")
# Columns a table adds after HEADERS when some of its rows carry the key (a VAE's diagnostics,
# from :func:`vae_diagnostics`); a row without it shows "–".
EXTRA_COLUMNS = (
    ("iwae_k", "NLL bound", lambda r: f"IWAE, k = {r['iwae_k']}"),
    ("elbo_nats", "−ELBO (nats)", lambda r: f"{r['elbo_nats']:.2f}"),
    ("elbo_bpd", "−ELBO (bits/dim)", lambda r: f"{r['elbo_bpd']:.3f}"),
    ("kl_nats", "KL (nats)", lambda r: f"{r['kl_nats']:.2f}"),
    ("active_units", "active units", lambda r: f"{r['active_units']} / {r['latent_dim']}"),
    # discrete latents (:func:`discrete_diagnostics`, :func:`class_accuracy`)
    ("bound", "NLL bound", lambda r: r["bound"]),
    ("recon_nats", "reconstruction (nats)", lambda r: f"{r['recon_nats']:.2f}"),  # −log p(x | z*)
    ("code_usage", "codes used", lambda r: f"{r['code_usage']:.0%} of {r['num_codes']}"),
    ("perplexity", "code perplexity", lambda r: f"{r['perplexity']:.1f}"),
    ("class_accuracy", "class accuracy (floor)",
     lambda r: f"{r['class_accuracy']:.2f} ({r['class_accuracy_floor']:.2f})"),
    # judged by samples alone (rows with :func:`mode_and_copy_diagnostics`): KID and the two-sample
    # classifier's accuracy (0.5: it cannot tell samples from data) too, beside their floors
    ("histogram_entropy", "KID × 1000 (floor)", lambda r: f"{1000 * r['kid']:.1f} ({1000 * r['kid_floor']:.1f})"),
    ("histogram_entropy", "two-sample classifier accuracy (floor)",
     lambda r: f"{r['c2st_accuracy']:.2f} ({r['c2st_accuracy_floor']:.2f})"),
    # energy-based models (:func:`ais_diagnostics`): AIS's log Z against the exact one
    ("ais_error", "AIS log Z − exact (± s.e.; chains × temperatures, seconds)",
     lambda r: f"{r['ais_error']:+.3f} (± {r['ais_stderr']:.3f}; {r['ais_runs']}, {r['ais_s']:.1f} s)"),
    ("ais_only_stderr", "NLL's AIS s.e. (chains × temperatures; seconds)",
     lambda r: f"± {r['ais_only_stderr']:.2f} ({r['ais_runs']}; {r['ais_s']:.0f} s)"),
    ("histogram_entropy", "class entropy of 1,000 samples (real; max 2.30)",
     lambda r: f"{r['histogram_entropy']:.3f} ({r['histogram_entropy_floor']:.3f})"),
    # diffusion and flow matching (:func:`sampler_rows`): the price of a sample, and FD to two places
    ("nfe", "network evaluations per sample", lambda r: f"{r['nfe']}"),
    ("nfe", "FD ÷ floor", lambda r: f"{r['fd'] / r['fd_floor']:.2f}"),
    ("likelihood", "NLL from", lambda r: r["likelihood"]),
    ("nn_distance_median", "distance to the nearest training image: median, min (held-out real)",
     lambda r: f"{r['nn_distance_median']:.2f}, {r['nn_distance_min']:.2f} "
               f"({r['nn_floor_median']:.2f}, {r['nn_floor_min']:.2f})"),
)


def benchmark(name: str, description: str):
    """Register a function returning benchmark rows under ``name``."""
    def register(fn):
        BENCHMARKS[name] = (fn, description)
        return fn
    return register


@dataclass(frozen=True)
class Judge:
    """What a model's samples are judged against: real test objects, and a second real set
    whose score against them is the floor (as the model produces objects, on ``levels``
    values), in the features of :mod:`dgmlab.quality`'s classifier."""

    levels: int
    heldout: torch.Tensor
    reference: torch.Tensor
    extractor: Callable

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """Objects on ``levels`` values as images in [0, 1]."""
        from .quality import to_unit

        return to_unit(x, self.levels)

    def __call__(self, samples: torch.Tensor) -> dict:
        """Every sample-quality score of ``samples``, each beside its real-data floor."""
        from .quality import evaluate_samples

        unit = [self.unit(x) for x in (samples, self.heldout, self.reference)]
        return evaluate_samples(*unit, self.extractor())


def measure(data_name: str, model_name: str, fit: Callable, test: torch.Tensor, judge: Judge,
            *, samples: int | None = None, nll_kwargs: dict | None = None,
            extra: Callable[[torch.nn.Module, torch.Tensor], dict] | None = None) -> dict:
    """Fit a model (timed), score it on ``test``, draw and judge ``samples`` objects: one row.

    ``fit()`` returns the model, or ``(model, history)`` for a model trained with
    :func:`dgmlab.train.fit` (then seconds per epoch are reported too). ``samples``
    defaults to the size of the test set (the quality scores are biased by n).
    Every row carries the same keys, so that tables can be collected: ``nll_nats``,
    ``nll_is_bound``, ``train_s``, ``sample_ms``, ``fd``, ``fd_floor``, ``fd_ratio``,
    ``kid``, ``precision``, ``recall``, ``class_entropy`` and more; under ``grid``, the
    first :data:`GRID` samples as [0, 1] images, which :func:`run` draws and keeps out
    of the JSON; ``epochs``, the epochs trained, for a model fitted with a history.

    A likelihood-free model (``has_log_prob = False``: a GAN) has ``nll_nats``,
    ``bits_per_dim`` and ``density_ms`` None, shown as "none" in the table.
    ``nll_kwargs`` go to :func:`~dgmlab.metrics.heldout_nll` (``k=1000``: a VAE's NLL is
    its IWAE bound); ``extra(model, test)`` returns more keys for the row (seeded here),
    e.g. :func:`vae_diagnostics`, which :func:`markdown_table` shows as extra columns.
    """
    from .metrics import heldout_nll

    torch.manual_seed(0)  # each row on its own: a model's initialisation does not depend on the rows before
    start = time.perf_counter()
    fitted = fit()
    train_s = time.perf_counter() - start
    model, history = fitted if isinstance(fitted, tuple) else (fitted, None)
    epoch_s = history.seconds[-1] / len(history) if history is not None and len(history) else None
    start = time.perf_counter()
    nll = heldout_nll(model, test, **(nll_kwargs or {})) if getattr(model, "has_log_prob", True) else None
    density_ms = 1000 * (time.perf_counter() - start) / len(test) if nll is not None else None
    torch.manual_seed(0)
    more = {} if extra is None else extra(model, test)
    if history is not None:
        more["epochs"] = len(history)
    n = samples or len(test)
    torch.manual_seed(0)
    start = time.perf_counter()
    drawn = model.sample(n)
    sample_ms = 1000 * (time.perf_counter() - start) / n
    return {"data": data_name, "model": model_name, "parameters": model.num_parameters(),
            "train_s": train_s, "epoch_s": epoch_s, "nll_nats": nll and nll.nats, "bits_per_dim": nll and nll.bpd,
            "nll_is_bound": bool(nll and nll.is_bound), "density_ms": density_ms, "sample_ms": sample_ms, **judge(drawn),
            **more, "grid": judge.unit(drawn[:GRID]).reshape(-1, *judge.heldout.shape[-3:]).cpu()}


def _extra_columns(rows: list[dict]) -> list[tuple]:
    """The :data:`EXTRA_COLUMNS` some row carries, in their fixed order."""
    return [column for column in EXTRA_COLUMNS if any(column[0] in r for r in rows)]


def _format(rows: list[dict]) -> list[list[str]]:
    extras = _extra_columns(rows)
    out = []
    for r in rows:
        rel = "≤ " if r.get("nll_is_bound") else ""
        free = r["nll_nats"] is None  # likelihood-free
        out.append([r["data"], r["model"], f"{r['parameters']:,}", f"{r['train_s']:.2f}",
                    "none" if free else f"{rel}{r['nll_nats']:.2f}", "none" if free else f"{r['bits_per_dim']:.3f}",
                    f"{r['fd']:.1f} ({r['fd_floor']:.1f})", f"{r['precision']:.2f} ({r['precision_floor']:.2f})",
                    f"{r['recall']:.2f} ({r['recall_floor']:.2f})", f"{r['sample_ms']:.3f}"]
                   + [cell(r) if key in r else "–" for key, _, cell in extras])
    return out


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (the form the book includes): the columns of :data:`HEADERS`,
    then those of :data:`EXTRA_COLUMNS` that some row carries."""
    headers = [*HEADERS, *(header for _, header, _ in _extra_columns(rows))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _format(rows)]
    return "\n".join(lines)


def run(name: str, out_dir: Path | None = RESULTS_DIR) -> list[dict]:
    """Run benchmark ``name``, print its table, and save it under ``out_dir`` (None: do not save)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    fn, description = BENCHMARKS[name]
    torch.manual_seed(0)
    rows = fn()
    grids = [row.pop("grid") for row in rows]
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    table = markdown_table(rows)
    print(f"{name}: {description}\n({machine})\n\n{table}")
    if out_dir is not None:
        atomic_write(Path(out_dir) / f"{name}.png", sample_figure(rows, grids))
        note = (f"<!-- written by `python -m dgmlab.bench {name}`; do not edit by hand -->\n"
                f"{table}\n\n*Measured on {machine}.*\n")
        atomic_write(Path(out_dir) / f"{name}.md", note)
        atomic_write(Path(out_dir) / f"{name}.json",
                      json.dumps({"benchmark": name, "machine": machine, "rows": rows}, indent=1) + "\n")
    return rows


def sample_figure(rows: list[dict], grids: list[torch.Tensor], *, max_bytes: int = 100_000) -> bytes:
    """One panel of samples per row, titled with the model (its budget), the data and the test NLL;
    at most :data:`PANELS_PER_LINE` panels side by side, then a new line of panels.

    Returns PNG bytes; the resolution is lowered until the file is at most ``max_bytes``
    (the book stays light).
    """
    import io
    import textwrap

    from matplotlib.figure import Figure

    from .viz import image_grid

    ncols = min(len(rows), PANELS_PER_LINE)
    nrows = -(-len(rows) // ncols)
    fig = Figure(figsize=(1.9 * ncols, 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(rows):]:
        ax.set_axis_off()
    for ax, row, grid in zip(axes, rows, grids):
        nll = (f"{row['data']}: no likelihood" if row["nll_nats"] is None else
               f"{row['data']}: NLL {'≤ ' if row['nll_is_bound'] else ''}{row['nll_nats']:.1f} nats")
        image_grid(grid, nrow=4, ax=ax, vmax=1.0)
        ax.set_title(f"{textwrap.fill(row['model'], 20)}\n{nll}", fontsize=7)
    for dpi in (110, 90, 72, 56):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None}, bbox_inches="tight",
                    pad_inches=0.05)  # "tight": a long title is never clipped
        if buffer.tell() <= max_bytes:
            break
    return buffer.getvalue()


# ---------------------------------------------------------------------------- benchmarks
def digits_judge(variant: str) -> Judge:
    """Judge samples of the digits (``"binary"`` or ``"levels"``) against the test split; the
    floor is the validation split's score (models train on the training split)."""
    from . import embedded
    from .quality import digits_extractor

    test, val = (embedded.digits(s, variant).x for s in ("test", "val"))
    return Judge(2 if variant == "binary" else embedded.DIGITS_LEVELS, test, val, digits_extractor)


def mnist_judge(levels: int = 2) -> Judge:
    """Judge MNIST samples (binarized, or 8-bit with ``levels=256``) against the test set; the
    floor is that of the last 10,000 training images, which the feature classifier and the
    models hold out as their validation set."""
    from .datasets import binarized_mnist, load_mnist
    from .quality import mnist_extractor

    if levels == 2:
        test, val = (binarized_mnist(s, download=False) for s in ("test", "val"))
    else:
        test, val = load_mnist("test", download=False)[0], load_mnist("train", download=False)[0][-10_000:]
    return Judge(levels, test.long() if levels > 2 else test, val.long() if levels > 2 else val,
                 lambda: mnist_extractor(download=False))


MNIST_SAMPLES = 1000  # sample-quality scores on MNIST: 1,000 samples against 1,000 test images


@benchmark("baselines", "the classical baselines every model in the course has to beat")
def _baselines() -> list[dict]:
    from . import baselines as B
    from . import datasets, embedded

    xb, xb_test = (embedded.digits(s, "binary", flatten=True).x for s in ("train", "test"))
    xl, xl_test = (embedded.digits(s, "levels", flatten=True).x for s in ("train", "test"))
    binary, levels = digits_judge("binary"), digits_judge("levels")
    rows = [
        measure("digits, binary", "independent pixels",
                lambda: B.IndependentBernoulli.from_data(xb, alpha=1.0), xb_test, binary),
        measure("digits, binary", "Markov chain (raster order)",
                lambda: B.MarkovChain.from_data(xb, 2, alpha=1.0), xb_test, binary),
        measure("digits, 17 levels", "independent pixels",
                lambda: B.IndependentCategorical.from_data(xl, 17, alpha=0.5), xl_test, levels),
        measure("digits, 17 levels", "Markov chain (raster order)",
                lambda: B.MarkovChain.from_data(xl, 17, alpha=0.5), xl_test, levels),
    ]
    try:  # binarized MNIST, when its canonical files can be found
        train = embedded.bernoulli_binarize(datasets.load_mnist("train", download=False)[0], seed=0)
        test = embedded.bernoulli_binarize(datasets.load_mnist("test", download=False)[0], seed=1)
    except (datasets.DataNotFoundError, datasets.CorruptDataError) as err:
        print(f"(binarized MNIST skipped: {str(err).splitlines()[0]})", file=sys.stderr)
        return rows
    train, test = train.reshape(len(train), -1), test.reshape(len(test), -1)
    judge = mnist_judge()
    rows += [measure("MNIST, binarized", "independent pixels", lambda: B.IndependentBernoulli.from_data(
                 train, alpha=1.0), test, judge, samples=MNIST_SAMPLES),
             measure("MNIST, binarized", "Markov chain (raster order)", lambda: B.MarkovChain.from_data(
                 train, 2, alpha=1.0), test, judge, samples=MNIST_SAMPLES)]
    return rows


DIGITS_BUDGET_S = 60.0  # the CPU training budget of each model on the digits


def _fit_timed(model, train, val, *, epochs: int, budget: float, **settings):
    """Seeded training with a cosine schedule over ``epochs``, stopped after ``budget`` seconds."""
    from .train import cosine, fit

    torch.manual_seed(0)
    history = fit(model, train, val, epochs=epochs, scheduler=cosine(epochs), max_seconds=budget,
                  progress=False, **settings)
    return model, history


@benchmark("autoregressive", "MADE and PixelCNN on the digits, at most 60 s of CPU training each, against the baselines")
def _autoregressive() -> list[dict]:
    from . import autoregressive as A
    from . import baselines as B
    from . import embedded

    xb, xb_val, xb_test = (embedded.digits(s, "binary", flatten=True).x for s in ("train", "val", "test"))
    xl, xl_val, xl_test = (embedded.digits(s, "levels").x for s in ("train", "val", "test"))
    binary, levels = digits_judge("binary"), digits_judge("levels")

    def pixelcnn(model, epochs):
        return _fit_timed(model, xl, xl_val, epochs=epochs, budget=DIGITS_BUDGET_S, **A.DIGITS_PIXELCNN_TRAINING)

    return [
        measure("digits, binary", "independent pixels", lambda: B.IndependentBernoulli.from_data(xb, alpha=1.0),
                xb_test, binary),
        measure("digits, binary", "MADE (500 units, 8 orderings)", lambda: _fit_timed(
            A.MADE(64, **A.DIGITS_MADE), xb, xb_val, epochs=1000, budget=DIGITS_BUDGET_S,
            **A.DIGITS_MADE_TRAINING), xb_test, binary),
        measure("digits, 17 levels", "independent pixels",
                lambda: B.IndependentCategorical.from_data(xl, 17, alpha=0.5), xl_test, levels),
        measure("digits, 17 levels", "PixelCNN (blind spot), categorical", lambda: pixelcnn(
            A.PixelCNN((1, 8, 8), levels=17, channels=48, layers=4, kernel=3, first_kernel=7), 40),
            xl_test, levels),
        measure("digits, 17 levels", "gated PixelCNN, categorical", lambda: pixelcnn(
            A.GatedPixelCNN((1, 8, 8), levels=17, **{**A.DIGITS_PIXELCNN, "output": "categorical"}), 30),
            xl_test, levels),
        measure("digits, 17 levels", "gated PixelCNN, logistic mixture", lambda: pixelcnn(
            A.GatedPixelCNN((1, 8, 8), levels=17, **A.DIGITS_PIXELCNN), 30), xl_test, levels),
    ]


# Full-size models the CPU trains in minutes: the budgets of the MNIST benchmarks
# (sized so that the cosine schedule's epochs fit the budget on 2 cores: ~4.5 and ~1.1 min per epoch)
MNIST_PIXELCNN = dict(levels=2, channels=32, layers=4, kernel=3, first_kernel=5)
MNIST_PIXELCNN_TRAINING = dict(epochs=2, batch_size=128, lr=3e-3, optimizer="adamw", weight_decay=1e-4)
MNIST_FLOW = dict(levels=256, scales=2, steps=4, hidden=64)
MNIST_FLOW_TRAINING = dict(epochs=8, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=1e-5,
                           clip_grad_norm=50.0)
MNIST_BUDGET_S = 600.0


@benchmark("autoregressive-mnist", "MADE (6 min) and a gated PixelCNN (10 min) on binarized MNIST, on the CPU "
           "(needs the MNIST files)")
def _autoregressive_mnist() -> list[dict]:
    from . import autoregressive as A
    from . import baselines as B
    from . import datasets

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    train_x, val_x, test_x = (images[s].reshape(-1, 784) for s in ("train", "val", "test"))
    judge = mnist_judge()
    return [measure("MNIST, binarized", "independent pixels",
                    lambda: B.IndependentBernoulli.from_data(train_x, alpha=1.0), test_x, judge,
                    samples=MNIST_SAMPLES),
            measure("MNIST, binarized", "MADE (1000 units), 6 min", lambda: _fit_timed(
                A.MADE(784, **A.MNIST_MADE), train_x, val_x, budget=360, **A.MNIST_MADE_TRAINING), test_x,
                judge, samples=MNIST_SAMPLES),
            measure("MNIST, binarized", "gated PixelCNN, 10 min", lambda: _fit_timed(
                A.GatedPixelCNN((1, 28, 28), **MNIST_PIXELCNN), images["train"].long(), images["val"].long(), budget=MNIST_BUDGET_S,
                **MNIST_PIXELCNN_TRAINING), images["test"].long(), judge, samples=MNIST_SAMPLES)]


@benchmark("flows", "MAF and RealNVP on the 17-level digits, at most 60 s of CPU training each, two dequantizations")
def _flows() -> list[dict]:
    from . import baselines as B
    from . import embedded
    from . import flows as F

    xl, xl_val, xl_test = (embedded.digits(s).x for s in ("train", "val", "test"))
    flat = [x.reshape(len(x), -1) for x in (xl, xl_val, xl_test)]
    levels = digits_judge("levels")

    def dequantized(flow, variational: bool):
        if not variational:
            return F.UniformDequantization(flow, 17)
        return F.VariationalDequantization(flow, F.dequantization_noise(64, **F.DIGITS_NOISE), 17)

    def maf(variational: bool):
        model = dequantized(F.maf_flow(64, levels=17, **F.DIGITS_MAF), variational)
        return _fit_timed(model, flat[0], flat[1], epochs=80, budget=DIGITS_BUDGET_S, **F.DIGITS_FLOW_TRAINING)

    def realnvp(variational: bool):
        model = dequantized(F.realnvp_image((1, 8, 8), levels=17, **F.DIGITS_REALNVP), variational)
        return _fit_timed(model, xl, xl_val, epochs=60, budget=DIGITS_BUDGET_S, **F.DIGITS_FLOW_TRAINING)

    torch.manual_seed(0)
    return [
        measure("digits, 17 levels", "independent pixels",
                lambda: B.IndependentCategorical.from_data(xl, 17, alpha=0.5), xl_test, levels),
        measure("digits, 17 levels", "MAF, uniform dequantization", lambda: maf(False), flat[2], levels),
        measure("digits, 17 levels", "MAF, variational dequantization", lambda: maf(True), flat[2], levels),
        measure("digits, 17 levels", "RealNVP, uniform dequantization", lambda: realnvp(False), xl_test, levels),
        measure("digits, 17 levels", "RealNVP, variational dequantization", lambda: realnvp(True), xl_test,
                levels),
    ]


@benchmark("flows-mnist", "a multi-scale RealNVP on 8-bit MNIST, 10 minutes of CPU training (needs the MNIST files)")
def _flows_mnist() -> list[dict]:
    from . import datasets
    from . import flows as F

    images = datasets.load_mnist("train", download=False)[0].long()
    train_x, val_x = images[:-10_000], images[-10_000:]
    test_x = datasets.load_mnist("test", download=False)[0].long()

    def realnvp():
        model = F.UniformDequantization(F.realnvp_image((1, 28, 28), **MNIST_FLOW), 256)
        return _fit_timed(model, train_x, val_x, budget=MNIST_BUDGET_S, **MNIST_FLOW_TRAINING)

    return [measure("MNIST, 8-bit", "RealNVP (2 scales), uniform dequantization, 10 min", realnvp, test_x,
                    mnist_judge(256), samples=MNIST_SAMPLES)]


# ------------------------------------------------------------------------------ VAEs
VAE_IWAE_K = 1000  # importance samples of the IWAE bound reported as a VAE's NLL (Burda et al. use 5000)


@torch.no_grad()
def vae_diagnostics(model, test: torch.Tensor, *, draws: int = 10, batch_size: int = 1000) -> dict:
    """A VAE's −ELBO on ``test`` in nats and bits/dim, its rate KL(q(z | x) ‖ p(z)) in nats, and
    its active units (Burda et al. 2015, :func:`dgmlab.vae.active_units`) out of ``latent_dim``.

    The −ELBO and the KL are means over the objects and ``draws`` one-sample estimates each
    (:meth:`dgmlab.vae.VAE.elbo`; the KL is exact for a Gaussian posterior under N(0, I),
    Monte Carlo otherwise), in eval mode (no dropout).
    """
    from .metrics import nats_to_bpd
    from .vae import active_units

    was_training = model.training
    model.eval()
    try:
        elbo, kl = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for _ in range(draws):
            for part in test.split(batch_size):
                terms = model.elbo(part.to(model.device))
                elbo += terms.elbo.double().sum().cpu()
                kl += terms.kl.double().sum().cpu()
    finally:
        model.train(was_training)
    elbo_nats, kl_nats = -elbo.item() / (draws * len(test)), kl.item() / (draws * len(test))
    return {"elbo_nats": elbo_nats, "elbo_bpd": float(nats_to_bpd(elbo_nats, test[0].numel())),
            "kl_nats": kl_nats, "active_units": active_units(model, test), "latent_dim": model.latent_dim}


def measure_vae(data_name: str, model_name: str, fit: Callable, test: torch.Tensor, judge: Judge, *,
                k: int = VAE_IWAE_K, samples: int | None = None,
                extra: Callable[[torch.nn.Module, torch.Tensor], dict] | None = None) -> dict:
    """:func:`measure` for a VAE: its NLL is the IWAE bound with ``k`` samples, and the row carries
    ``iwae_k`` and the keys of :func:`vae_diagnostics` (−ELBO, KL, active units), and ``extra``'s."""
    row = measure(data_name, model_name, fit, test, judge, samples=samples, nll_kwargs={"k": k},
                  extra=lambda model, x: {"iwae_k": k, **vae_diagnostics(model, x),
                                          **(extra(model, x) if extra else {})})
    print(f"({model_name}: {row.get('epochs')} epochs in {row['train_s']:.0f} s, NLL ≤ {row['nll_nats']:.2f}, "
          f"−ELBO {row['elbo_nats']:.2f}, KL {row['kl_nats']:.2f} nats)", file=sys.stderr, flush=True)
    return row


def digits_vae_row(model_name: str, settings: dict, training: dict, *, epochs: int,
                   budget: float = DIGITS_BUDGET_S, k: int = VAE_IWAE_K, train_size: int | None = None) -> dict:
    """One row of the ``vae`` benchmark: a :func:`dgmlab.vae.vae_mlp` with ``settings`` fitted on the
    17-level digits' training split (``train_size`` objects; all by default; validation split for
    the best epoch) for at most ``budget`` seconds (a cosine schedule over ``epochs``), scored on
    the test split with the IWAE bound (``k`` samples)."""
    from . import embedded
    from . import vae as V

    xl, xl_val, xl_test = (embedded.digits(s, "levels").x for s in ("train", "val", "test"))

    def fit():
        torch.manual_seed(0)
        model = V.vae_mlp(embedded.DIGITS_SHAPE, levels=embedded.DIGITS_LEVELS, **settings)
        return _fit_timed(model, xl[:train_size], xl_val, epochs=epochs, budget=budget, **training)

    return measure_vae("digits, 17 levels", model_name, fit, xl_test, digits_judge("levels"), k=k)


VAE_EPOCHS, PIXELVAE_EPOCHS = 300, 30  # the cosine schedules of dgmlab.vae's digits settings


@benchmark("vae", "VAEs on the 17-level digits, at most 60 s of CPU training each: test NLL = IWAE bound "
           "(k = 1000), with the −ELBO, the KL and the active units")
def _vae() -> list[dict]:
    from . import baselines as B
    from . import embedded
    from . import vae as V

    xl, xl_test = (embedded.digits(s, "levels").x for s in ("train", "test"))
    plain, training = V.DIGITS_VAE, V.DIGITS_VAE_TRAINING
    collapsing = {**V.DIGITS_PIXELVAE, "warmup_steps": 0}  # no remedy: the PixelCNN ignores z

    def factorised(name, settings):
        return digits_vae_row(name, settings, training, epochs=VAE_EPOCHS)

    def pixelvae(name, settings):
        return digits_vae_row(name, settings, V.DIGITS_PIXELVAE_TRAINING, epochs=PIXELVAE_EPOCHS)

    return [
        measure("digits, 17 levels", "independent pixels",
                lambda: B.IndependentCategorical.from_data(xl, 17, alpha=0.5), xl_test, digits_judge("levels")),
        factorised("VAE: Gaussian q, N(0, I) prior, factorised decoder", plain),
        factorised("VAE + VampPrior", {**plain, "prior": "vamp"}),
        factorised("VAE + flow prior (MAF)", {**plain, "prior": "flow"}),
        factorised("VAE + IAF posterior", {**plain, "posterior": "iaf"}),
        pixelvae("VAE, PixelCNN decoder, no remedy", collapsing),
        pixelvae("VAE, PixelCNN decoder, free bits (0.25 nats)", {**collapsing, "free_bits": 0.25}),
        pixelvae(f"VAE, PixelCNN decoder, KL annealing ({V.DIGITS_PIXELVAE['warmup_steps']} batches)",
                 V.DIGITS_PIXELVAE),
    ]


# A one-layer VAE on binarized MNIST: Burda et al.'s sizes (2 hidden layers of 200 units, 50 latents),
# with ReLUs where they used tanh, trained for a fixed CPU budget
MNIST_VAE = dict(latent_dim=50, hidden=(200, 200), decoder="bernoulli")
MNIST_VAE_TRAINING = dict(epochs=100, batch_size=100, lr=1e-3)  # with a cosine schedule over the epochs
MNIST_VAE_BUDGET_S = 360.0
MNIST_VAE_IWAE_K = 1000


@benchmark("vae-mnist", "a one-layer VAE on binarized MNIST, 6 minutes of CPU training; test NLL = IWAE bound "
           "(k = 1000) on the 10,000 test images (needs the MNIST files)")
def _vae_mnist() -> list[dict]:
    from . import baselines as B
    from . import datasets
    from . import vae as V

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    judge = mnist_judge()

    def vae():
        torch.manual_seed(0)
        model = V.vae_mlp((1, 28, 28), **MNIST_VAE)
        return _fit_timed(model, images["train"], images["val"], budget=MNIST_VAE_BUDGET_S, **MNIST_VAE_TRAINING)

    minutes = f"{MNIST_VAE_BUDGET_S / 60:g} min"
    return [measure("MNIST, binarized", "independent pixels", lambda: B.IndependentBernoulli.from_data(
                images["train"].reshape(-1, 784), alpha=1.0), images["test"].reshape(-1, 784), judge,
                samples=MNIST_SAMPLES),
            measure_vae("MNIST, binarized", f"VAE (2×200 ReLU, 50 latents), {minutes}", vae, images["test"], judge,
                        k=MNIST_VAE_IWAE_K, samples=MNIST_SAMPLES)]



# ------------------------------------------------------------------------------ discrete latents
def class_accuracy(model, judge: Judge, real: torch.Tensor, labels: torch.Tensor, *, per_class: int = 100) -> dict:
    """How often the judge's classifier names the class a class-conditional model was asked for:
    ``per_class`` samples of each class c = 0..9, drawn with ``context=c``. The floor is the
    classifier's accuracy on the real objects ``real`` with their ``labels``."""
    extractor = judge.extractor()
    asked = torch.arange(10).repeat_interleave(per_class)
    torch.manual_seed(0)
    drawn = model.sample(len(asked), asked)

    def accuracy(x, y):
        with torch.no_grad():
            return (extractor.logits(judge.unit(x)).argmax(1) == y).double().mean().item()

    return {"class_accuracy": accuracy(drawn, asked), "class_accuracy_floor": accuracy(real, labels)}


@torch.no_grad()
def discrete_diagnostics(model, test: torch.Tensor, train: torch.Tensor) -> dict:
    """A VQ-VAE's or dVAE's code usage over the whole training set (the fraction of its K codes
    used and the perplexity of their histogram: an epoch's figures, which unlike a batch's do not
    depend on the batch size) and its test reconstruction term −log p(x | z*) in nats, z* the
    encoder's codes (the nearest codes; the dVAE's most probable ones)."""
    from .discrete import VQVAE, code_usage

    usage = code_usage(model, train)
    model.eval()
    recon = 0.0
    for part in test.split(500):  # in batches: a convolutional encoder's features are large
        codes = model.encode(part)
        z = model.quantizer.lookup(codes) if isinstance(model, VQVAE) else model.codebook(codes).permute(0, 3, 1, 2)
        recon -= model.decoder.log_prob(part, z).double().sum().item()
    return {"code_usage": usage.fraction_used, "perplexity": usage.perplexity, "num_codes": model.num_codes,
            "recon_nats": recon / len(test)}


def fit_code_prior(model, kind: str, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                   *, budget: float = DIGITS_BUDGET_S, settings: dict | None = None, training: dict | None = None,
                   epochs: int | None = None):
    """Stage two: a class-conditional prior over the VQ-VAE's codes (``kind`` "pixelcnn" or
    "transformer"; by default :mod:`dgmlab.discrete`'s digits settings), fitted on the codes of
    ``x`` for at most ``budget`` seconds; the VQ-VAE is left with the prior marginalised over
    the training classes (:class:`dgmlab.discrete.ClassMarginal`). Returns the conditional prior."""
    from . import autoregressive as A
    from . import discrete as D
    from .train import cosine

    grid, codes = model.grid_shape, model.num_codes
    if kind == "pixelcnn":
        prior = A.PixelCNN(grid, levels=codes, num_classes=10, **(settings or D.DIGITS_PIXELCNN_PRIOR))
        epochs = epochs or D.DIGITS_PIXELCNN_PRIOR_EPOCHS
        training = training or D.DIGITS_PIXELCNN_PRIOR_TRAINING
    else:
        prior = A.Transformer(grid, codes, num_classes=10, **(settings or D.DIGITS_TRANSFORMER_PRIOR))
        epochs = epochs or D.DIGITS_TRANSFORMER_PRIOR_EPOCHS
        training = training or D.DIGITS_TRANSFORMER_PRIOR_TRAINING
    torch.manual_seed(0)
    D.fit_prior(model, prior, x, y, val=x_val, val_context=y_val, epochs=epochs, scheduler=cosine(epochs),
                max_seconds=budget, progress=False, **training)
    model.prior = D.ClassMarginal(prior, torch.bincount(y, minlength=10))
    return prior


def discrete_row(data_name: str, model_name: str, fit: Callable, data: dict, judge: Judge, *, k: int = 1,
                 samples: int | None = None) -> dict:
    """:func:`measure` for a VQ-VAE or dVAE. ``fit()`` returns ``(model, history, prior)``:
    ``prior`` the class-conditional prior over the codes (or None), which :func:`fit_code_prior`
    has left marginalised over the classes for the bound and the samples; it draws the class-
    accuracy samples. ``data`` holds the tensors ``x`` (training: the code usage), ``x_test``
    and ``y_test``. The NLL is the model's bound (``k``)."""
    stage_two = {}

    def fitted():
        model, history, stage_two["prior"] = fit()
        return model, history

    def extra(model, test):
        row = {"bound": "reconstruction + prior" if k == 1 else f"IWAE, k = {k}",
               **discrete_diagnostics(model, test, data["x"])}
        if stage_two["prior"] is not None:
            marginal, model.prior = model.prior, stage_two["prior"]
            row.update(class_accuracy(model, judge, data["x_test"], data["y_test"]))
            model.prior = marginal
        return row

    row = measure(data_name, model_name, fitted, data["x_test"], judge, nll_kwargs={"k": k}, extra=extra,
                  samples=samples)
    print(f"({model_name}: {row['train_s']:.0f} s, NLL ≤ {row['nll_nats']:.2f}, codes used {row['code_usage']:.0%}, "
          f"FD {row['fd']:.2f})", file=sys.stderr, flush=True)
    return row


def digits_discrete_row(model_name: str, make: Callable, epochs: int, training: dict, *,
                        prior: str | None = None, k: int = 1) -> dict:
    """One row of the ``discrete`` benchmark: a VQ-VAE or dVAE (``make()``) fitted on the 17-level
    digits for ``epochs`` (at most DIGITS_BUDGET_S), then, for a VQ-VAE, a class-conditional
    ``prior`` fitted on its codes (:func:`fit_code_prior`, at most as long again)."""
    from . import embedded

    (x, y), (x_val, y_val), (x_test, y_test) = (embedded.digits(s, "levels") for s in ("train", "val", "test"))

    def fit():
        model, history = _fit_timed(make(), x, x_val, epochs=epochs, budget=DIGITS_BUDGET_S, **training)
        return model, history, None if prior is None else fit_code_prior(model, prior, x, y, x_val, y_val)

    return discrete_row("digits, 17 levels", model_name, fit, dict(x=x, x_test=x_test, y_test=y_test),
                        digits_judge("levels"), k=k)


DVAE_IWAE_K = 100  # importance samples of the dVAE's bound


@benchmark("discrete", "VQ-VAEs and a dVAE on the 17-level digits, at most 60 s of CPU training per stage (the "
           "autoencoder, then the class-conditional prior over its codes): test NLL = the model's bound; code "
           "usage over the training set; class accuracy of class-conditional samples; beside Chapter 5's VAE")
def _discrete() -> list[dict]:
    from . import baselines as B
    from . import discrete as D
    from . import embedded
    from . import vae as V

    xl, xl_test = (embedded.digits(s, "levels", flatten=True).x for s in ("train", "test"))

    def vqvae(settings):
        return lambda: D.VQVAE(embedded.DIGITS_SHAPE, levels=embedded.DIGITS_LEVELS, **settings)

    def dvae():
        return D.DVAE(embedded.DIGITS_SHAPE, levels=embedded.DIGITS_LEVELS, **D.DIGITS_DVAE)

    vq = dict(epochs=D.DIGITS_VQVAE_EPOCHS, training=D.DIGITS_VQVAE_TRAINING)
    vae = digits_vae_row("VAE (Chapter 5)", V.DIGITS_VAE, V.DIGITS_VAE_TRAINING, epochs=VAE_EPOCHS)
    vae_only = ("iwae_k", "elbo_nats", "elbo_bpd", "kl_nats", "active_units", "latent_dim")
    return [
        measure("digits, 17 levels", "independent pixels",
                lambda: B.IndependentCategorical.from_data(xl, 17, alpha=0.5), xl_test, digits_judge("levels")),
        {**{key: value for key, value in vae.items() if key not in vae_only}, "bound": f"IWAE, k = {VAE_IWAE_K}"},
        digits_discrete_row("VQ-VAE, no collapse fix, PixelCNN prior", vqvae(D.DIGITS_VQVAE_COLLAPSE), **vq,
                            prior="pixelcnn"),
        digits_discrete_row("VQ-VAE (EMA + restarts), PixelCNN prior", vqvae(D.DIGITS_VQVAE), **vq,
                            prior="pixelcnn"),
        digits_discrete_row("VQ-VAE (EMA + restarts), Transformer prior", vqvae(D.DIGITS_VQVAE), **vq,
                            prior="transformer"),
        digits_discrete_row("dVAE (Gumbel-softmax), uniform prior", dvae, D.DIGITS_DVAE_EPOCHS,
                            D.DIGITS_DVAE_TRAINING, k=DVAE_IWAE_K),
    ]


# The VQ-VAE of dgmlab.discrete.MNIST_VQVAE (7 × 7 codes) and a class-conditional Transformer over its
# codes on binarized MNIST, each stage for a CPU budget of minutes.
MNIST_VQ_BUDGET_S, MNIST_VQ_PRIOR_BUDGET_S = 300.0, 180.0
MNIST_VQ_PRIOR = dict(d_model=64, heads=4, layers=2, dropout=0.1)
MNIST_VQ_PRIOR_TRAINING = dict(batch_size=128, lr=1e-3, optimizer="adamw", weight_decay=0.01)
MNIST_VQ_PRIOR_EPOCHS = 20


@benchmark("discrete-mnist", "a VQ-VAE with a class-conditional Transformer prior on binarized MNIST, 5 + 3 "
           "minutes of CPU training; test NLL = reconstruction + prior bound on the 10,000 test images (needs "
           "the MNIST files)")
def _discrete_mnist() -> list[dict]:
    from . import datasets
    from . import discrete as D

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    train_labels = datasets.load_mnist("train", download=False)[1]
    n = len(images["train"])
    labels = {"train": train_labels[:n], "val": train_labels[n:], "test": datasets.load_mnist("test", download=False)[1]}

    def fit():
        torch.manual_seed(0)
        model, history = _fit_timed(D.VQVAE((1, 28, 28), **D.MNIST_VQVAE), images["train"], images["val"],
                                    budget=MNIST_VQ_BUDGET_S, **D.MNIST_VQVAE_TRAINING)
        prior = fit_code_prior(model, "transformer", images["train"], labels["train"], images["val"],
                               labels["val"], budget=MNIST_VQ_PRIOR_BUDGET_S, settings=MNIST_VQ_PRIOR,
                               training=MNIST_VQ_PRIOR_TRAINING, epochs=MNIST_VQ_PRIOR_EPOCHS)
        return model, history, prior

    minutes = f"{MNIST_VQ_BUDGET_S / 60:g} + {MNIST_VQ_PRIOR_BUDGET_S / 60:g} min"
    data = dict(x=images["train"], x_test=images["test"], y_test=labels["test"])
    return [discrete_row("MNIST, binarized", f"VQ-VAE (7×7 codes of {D.MNIST_VQVAE['num_codes']}), Transformer "
                         f"prior, {minutes}", fit, data, mnist_judge(), samples=MNIST_SAMPLES)]


# ------------------------------------------------------------------------------ GANs
HISTOGRAM_SAMPLES = 1000  # samples whose classes measure a model's coverage of the ten digits


class Rounded(torch.nn.Module):
    """A model of images in [0, 1] read on ``levels`` grey levels: its samples rounded to the
    nearest level, so that a GAN of the 17-level digits is judged on the same values as the data
    and the other models (``round(x · (levels − 1))``)."""

    has_log_prob = False

    def __init__(self, model, levels: int):
        super().__init__()
        self.model, self.levels = model, levels

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def sample(self, n: int) -> torch.Tensor:
        return (self.model.sample(n) * (self.levels - 1)).round().long()


def mode_and_copy_diagnostics(model, judge: Judge, train: torch.Tensor) -> dict:
    """Mode coverage and memorisation, for any model with ``sample(n)`` on the judge's levels:
    the class histogram of :data:`HISTOGRAM_SAMPLES` samples in the judge's classifier and its
    entropy (log 10 = 2.30 when all ten digits are equally drawn; floor: the training images'),
    and the pixel distance of n samples to their nearest training images, min and median, beside
    the same for n held-out real images (a copy is at 0; n: 1,000 or the held-out set's size)."""
    from .quality import class_histogram, embed, nearest_neighbours

    extractor = judge.extractor()
    drawn = judge.unit(model.sample(HISTOGRAM_SAMPLES))
    counts, entropy = class_histogram(embed(extractor, drawn)[1].argmax(1))
    train, n = judge.unit(train), min(HISTOGRAM_SAMPLES, len(judge.heldout))  # equal numbers: min and median
    ours = nearest_neighbours(drawn[:n], train).distance
    real = nearest_neighbours(judge.unit(judge.heldout[:n]), train).distance
    return {"histogram_counts": counts, "histogram_entropy": entropy,
            "histogram_entropy_floor": class_histogram(embed(extractor, train)[1].argmax(1))[1],
            "nn_distance_min": float(ours.min()), "nn_distance_median": float(ours.median()),
            "nn_floor_min": float(real.min()), "nn_floor_median": float(real.median())}


def gan_row(data_name: str, model_name: str, make: Callable, x: torch.Tensor, judge: Judge, *,
            budget: float, training: dict, samples: int | None = None) -> dict:
    """One GAN row: ``make()`` fitted on the images ``x`` in [0, 1] for ``budget`` seconds (no
    validation set: a GAN has no held-out loss), its samples rounded to the judge's levels."""
    from .train import fit

    def fitted():
        torch.manual_seed(0)
        model = make()
        history = fit(model, x, epochs=10**6, max_seconds=budget, progress=False, **training)
        return Rounded(model, judge.levels), history

    levels = (x * (judge.levels - 1)).round().long()
    row = measure(data_name, model_name, fitted, judge.heldout, judge, samples=samples,
                  extra=lambda model, _: mode_and_copy_diagnostics(model, judge, levels))
    print(f"({model_name}: {row['epochs']} epochs in {row['train_s']:.0f} s, FD {row['fd']:.2f} "
          f"(floor {row['fd_floor']:.2f}), class entropy {row['histogram_entropy']:.3f})", file=sys.stderr, flush=True)
    return row


@benchmark("gan", "DCGANs on the 17-level digits, 60 s of CPU training each, judged by their samples (FD, KID, "
           "precision, recall beside the real-data floor; the classes of 1,000 samples; the nearest training "
           "image), beside Chapter 5's VAE and Chapter 3's gated PixelCNN (one network pass per pixel)")
def _gan() -> list[dict]:
    from . import autoregressive as A
    from . import embedded
    from . import gan as G
    from . import vae as V

    x, x_val = (embedded.digits(s, "levels").x for s in ("train", "val"))
    judge, unit = digits_judge("levels"), embedded.digits("train", "unit").x

    def diagnostics(model, _):
        return mode_and_copy_diagnostics(model, judge, x)

    def dcgan(name, settings):
        return gan_row("digits, 17 levels", name, lambda: G.dcgan(embedded.DIGITS_SHAPE, **settings), unit, judge,
                       budget=DIGITS_BUDGET_S, training=G.DIGITS_DCGAN_TRAINING)

    return [
        measure_vae("digits, 17 levels", "VAE (Chapter 5)", lambda: _fit_timed(
            V.vae_mlp(embedded.DIGITS_SHAPE, levels=embedded.DIGITS_LEVELS, **V.DIGITS_VAE), x, x_val,
            epochs=VAE_EPOCHS, budget=DIGITS_BUDGET_S, **V.DIGITS_VAE_TRAINING), judge.heldout, judge,
            extra=diagnostics),
        measure("digits, 17 levels", "gated PixelCNN, logistic mixture (Chapter 3)", lambda: _fit_timed(
            A.GatedPixelCNN(embedded.DIGITS_SHAPE, levels=embedded.DIGITS_LEVELS, **A.DIGITS_PIXELCNN), x, x_val,
            epochs=30, budget=DIGITS_BUDGET_S, **A.DIGITS_PIXELCNN_TRAINING), judge.heldout, judge, extra=diagnostics),
        dcgan("DCGAN, no R1", {**G.DIGITS_DCGAN, "r1": 0.0}),
        dcgan("DCGAN + R1 (this chapter's setting)", G.DIGITS_DCGAN),
    ]


MNIST_GAN_BUDGET_S = 300.0  # the CPU budget of the DCGAN on MNIST (the full-size setting wants a GPU)
# At 64 channels a batch takes 0.31 s on 2 cores (2.5 epochs in 5 min); at 32, 0.10 s (8 epochs),
# whose ~3,000 steps want the digits' shorter weight average
MNIST_GAN_CPU = dict(channels=32, average=0.99)


@benchmark("gan-mnist", "a DCGAN (dgmlab.gan.MNIST_DCGAN) on 8-bit MNIST, 5 minutes of CPU training, judged by "
           "1,000 samples in the course's MNIST classifier's features (not Inception: not comparable with "
           "published FIDs) (needs the MNIST files)")
def _gan_mnist() -> list[dict]:
    from . import datasets
    from . import gan as G

    judge = mnist_judge(levels=256)
    images = datasets.load_mnist("train", download=False)[0][:-10_000]  # the last 10,000: the judge's floor
    minutes = f"{MNIST_GAN_BUDGET_S / 60:g} min"
    settings = {**G.MNIST_DCGAN, **MNIST_GAN_CPU}
    name = f"DCGAN + R1 ({settings['channels']} channels), {minutes}"
    return [gan_row("MNIST, 8-bit", name, lambda: G.dcgan((1, 28, 28), **settings),
                    images.float() / 255, judge, budget=MNIST_GAN_BUDGET_S,
                    training={k: v for k, v in G.MNIST_DCGAN_TRAINING.items() if k != "epochs"},
                    samples=MNIST_SAMPLES)]


# ------------------------------------------------------------------------------ energy-based models
# (name, model settings, epochs, training settings): each method's cosine schedule sized to fill the
# 60 s (on 2 cores: CD-1 and PCD-1 take ~0.08 s per epoch, CD-10 ~0.11 s); the exact gradient sums
# over all 2^16 hidden states once per batch whatever its size, so it takes batches of 100, not 20
RBM_METHODS = (("CD-1", dict(training="cd", k=1), 600, {}),
               ("CD-10", dict(training="cd", k=10), 450, {}),
               ("PCD-1", dict(training="pcd", k=1), 600, {}),
               ("exact gradient", dict(training="exact"), 100, dict(batch_size=100)))


def ais_diagnostics(model, x: torch.Tensor, settings: dict) -> dict:
    """AIS's estimate of an RBM's log Z (base rates fitted to ``x``; ``settings`` as
    :data:`dgmlab.ebm.DIGITS_AIS`) beside the exact log Z, and the seconds it took."""
    from . import ebm as E

    with torch.no_grad():
        exact = float(model.log_normalizer())
    start = time.perf_counter()
    estimate = E.ais(model, data=x, **settings)
    return {"exact_log_z": exact, "ais_log_z": estimate.log_z, "ais_stderr": estimate.stderr,
            "ais_error": estimate.log_z - exact, "ais_s": time.perf_counter() - start,
            "ais_runs": f"{settings['chains']} × {settings['temperatures']}"}


@benchmark("rbm", "RBMs on the binary digits small enough for an exact log Z, trained for at most 60 s of "
           "CPU each by CD-1, CD-10, PCD and the exact gradient: exact test NLL, Gibbs sampling time "
           "(ms/image), and AIS's log Z against the exact one")
def _rbm() -> list[dict]:
    from . import baselines as B
    from . import ebm as E
    from . import embedded

    x, x_val, x_test = (embedded.digits(s, "binary").x for s in ("train", "val", "test"))
    judge = digits_judge("binary")

    def rbm(settings, epochs, training):
        model = E.RBM(embedded.DIGITS_SHAPE, **{**E.DIGITS_RBM, **settings}).init_from_data(x)
        return _fit_timed(model, x, x_val, epochs=epochs, budget=DIGITS_BUDGET_S,
                          **{**E.DIGITS_RBM_TRAINING, **training})

    rows = [measure("digits, binary", "independent pixels", lambda: B.IndependentBernoulli.from_data(
        x.reshape(len(x), -1), alpha=1.0), x_test.reshape(len(x_test), -1), judge)]
    for name, settings, epochs, training in RBM_METHODS:
        row = measure("digits, binary", f"RBM ({E.DIGITS_RBM['hidden']} hidden), {name}",
                      lambda args=(settings, epochs, training): rbm(*args), x_test, judge,
                      extra=lambda model, _: ais_diagnostics(model, x, E.DIGITS_AIS))
        print(f"({row['model']}: {row['epochs']} epochs in {row['train_s']:.0f} s, NLL {row['nll_nats']:.2f}, "
              f"AIS error {row['ais_error']:+.3f})", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


MNIST_RBM_BUDGET_S = 300.0  # the CPU budget of the 500-hidden-unit RBM on binarized MNIST
MNIST_RBM_CPU_EPOCHS = 60  # PCD-1 takes ~4 s per epoch on 2 cores: the cosine schedule fits the budget


@benchmark("rbm-mnist", "an RBM with 500 hidden units on binarized MNIST, 5 minutes of CPU training (PCD); "
           "test NLL with log Z estimated by AIS (dgmlab.ebm.MNIST_AIS) on the 10,000 test images, with the "
           "AIS standard error (needs the MNIST files)")
def _rbm_mnist() -> list[dict]:
    from . import datasets
    from . import ebm as E

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    spent = {}

    def fit():
        torch.manual_seed(0)
        model = E.RBM((1, 28, 28), **E.MNIST_RBM).init_from_data(images["train"])
        training = {**E.MNIST_RBM_TRAINING, "epochs": MNIST_RBM_CPU_EPOCHS}
        history = _fit_timed(model, images["train"], None, budget=MNIST_RBM_BUDGET_S, **training)[1]
        start = time.perf_counter()
        model.set_log_normalizer(E.ais(model, data=images["train"], **E.MNIST_AIS))
        spent["ais_s"] = time.perf_counter() - start
        spent["train_s"] = history.seconds[-1]  # the row's training time without AIS's
        return model, history

    def extra(model, _):
        return {"ais_only_stderr": model.log_normalizer_stderr, "ais_log_z": model.log_normalizer_estimate,
                "ais_runs": f"{E.MNIST_AIS['chains']} × {E.MNIST_AIS['temperatures']}", **spent}

    name = (f"RBM (500 hidden, {E.MNIST_RBM['training'].upper()}-{E.MNIST_RBM['k']}), at most "
            f"{MNIST_RBM_CPU_EPOCHS} epochs or {MNIST_RBM_BUDGET_S / 60:g} min")
    return [measure("MNIST, binarized", name, fit, images["test"], mnist_judge(), samples=MNIST_SAMPLES, extra=extra)]


# ------------------------------------------------------------------------------ diffusion, flow matching
# the ODE likelihood of flow matching: one Rademacher probe per image, adaptive steps
FM_NLL = dict(divergence="hutchinson", method="rk45", rtol=1e-5, atol=1e-5)
DIFFUSION_BUDGET_S = 300.0  # the CPU training budget of each diffusion model on the digits (the issue's ≤ 5 min)
# (label, sample keyword arguments, network evaluations per sample) for each row of a model
DDPM_SAMPLERS = (("ancestral, 1000 steps", dict(), 1000),
                 ("DDIM, 100 steps", dict(method="ddim", steps=100), 100),
                 ("DDIM, 20 steps", dict(method="ddim", steps=20), 20),
                 ("ODE (Heun), 50 steps", dict(method="ode", steps=50), 99),
                 ("ODE (Heun), 25 steps", dict(method="ode", steps=25), 49),
                 ("ODE (Heun), 10 steps", dict(method="ode", steps=10), 19),
                 ("DDIM, 5 steps", dict(method="ddim", steps=5), 5))
DDPM_DIAGNOSED = "DDIM, 100 steps"  # the sampler of the DDPM's 1,000 samples for the class histogram
FM_SAMPLERS = (("midpoint, 20 steps", dict(steps=20), 40),
               ("midpoint, 5 steps", dict(steps=5), 10),
               ("midpoint, 2 steps", dict(steps=2), 4),
               ("Euler, 10 steps", dict(steps=10, method="euler"), 10),
               ("Euler, 1 step", dict(steps=1, method="euler"), 1))


def fit_diffusion(model, x: torch.Tensor, settings: dict, budget: float):
    """Seeded training of a diffusion or flow-matching model on ``x`` (with labels: ``(x, y)``) for
    ``budget`` seconds under a cosine schedule sized to end with it; returns (model in eval mode,
    seconds, epochs)."""
    from .train import cosine, fit

    settings = dict(settings)
    epochs = settings.pop("epochs")
    torch.manual_seed(0)
    history = fit(model, x, epochs=epochs, scheduler=cosine(epochs), max_seconds=budget, progress=False, **settings)
    return model.eval(), history.seconds[-1], len(history)


def sampler_rows(name: str, model, samplers, judge: Judge, *, train_s: float, epochs: int, likelihood: str,
                 nll, density_ms: float, diagnostics: Callable | None = None, diagnose: str | None = None,
                 data: str = "digits, 17 levels", samples: int | None = None) -> list[dict]:
    """One row per sampler of a fitted model: ``samples`` objects (default: as many as the judge's
    held-out set) judged (FD beside the floor), the time and the network evaluations (NFE) per sample;
    every row carries the model's held-out ``nll`` (a :class:`~dgmlab.metrics.NLL`); the row of the
    sampler labelled ``diagnose`` also ``diagnostics(sampler)``."""
    rows = []
    for label, kwargs, nfe in samplers:
        sampler = Sampler(model, **kwargs)
        torch.manual_seed(0)
        start = time.perf_counter()
        drawn = sampler.sample(samples or len(judge.heldout))
        sample_ms = 1000 * (time.perf_counter() - start) / len(drawn)
        row = {"data": data, "model": f"{name}: {label}", "parameters": model.num_parameters(),
               "train_s": train_s, "epoch_s": train_s / epochs, "epochs": epochs, "nll_nats": nll.nats,
               "bits_per_dim": nll.bpd, "nll_is_bound": nll.is_bound, "likelihood": likelihood,
               "density_ms": density_ms, "sample_ms": sample_ms, "nfe": nfe, "sampler": label, **judge(drawn)}
        if label == diagnose and diagnostics is not None:
            torch.manual_seed(0)
            row.update(diagnostics(sampler))
        row["grid"] = judge.unit(drawn[:GRID]).reshape(-1, *judge.heldout.shape[-3:]).cpu()
        print(f"({row['model']}: FD {row['fd']:.3f}, floor {row['fd_floor']:.3f}, {nfe} NFE, "
              f"{sample_ms:.2f} ms/sample)", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def timed_nll(model, test: torch.Tensor, **kwargs):
    """The held-out NLL and its time per object (ms)."""
    from .metrics import heldout_nll

    torch.manual_seed(0)
    start = time.perf_counter()
    nll = heldout_nll(model, test, **kwargs)
    return nll, 1000 * (time.perf_counter() - start) / len(test)


@benchmark("diffusion", "a DDPM and flow matching (U-Nets) on the 17-level digits, 5 min of CPU training each: "
           "the DDPM bound and the dequantized ODE likelihood; sample quality (FD beside the floor) against "
           "network evaluations per sample for ancestral, DDIM, probability-flow ODE and flow-matching samplers; "
           "a class-conditional flow matching model under classifier-free guidance")
def _diffusion() -> list[dict]:
    from . import diffusion as D
    from . import embedded

    x, test = embedded.digits("train", "levels").x, embedded.digits("test", "levels")
    judge = digits_judge("levels")

    def diagnostics(model):
        return mode_and_copy_diagnostics(model, judge, x)

    ddpm, ddpm_s, ddpm_epochs = fit_diffusion(D.ddpm_unet(**D.DIGITS_DDPM), x, D.DIGITS_DDPM_TRAINING,
                                              DIFFUSION_BUDGET_S)
    nll, ms = timed_nll(ddpm, test.x)
    rows = sampler_rows("DDPM", ddpm, DDPM_SAMPLERS, judge, train_s=ddpm_s, epochs=ddpm_epochs,
                        likelihood=f"bound, T = {ddpm.T}", nll=nll, density_ms=ms, diagnostics=diagnostics,
                        diagnose=DDPM_DIAGNOSED)
    fm, fm_s, fm_epochs = fit_diffusion(D.flow_matching_unet(**D.DIGITS_FM), x, D.DIGITS_FM_TRAINING,
                                        DIFFUSION_BUDGET_S)
    nll, ms = timed_nll(fm, test.x, **FM_NLL)
    rows += sampler_rows("flow matching", fm, FM_SAMPLERS, judge, train_s=fm_s, epochs=fm_epochs,
                         likelihood="ODE, dequantized (Hutchinson, RK45)", nll=nll, density_ms=ms,
                         diagnostics=diagnostics, diagnose=FM_SAMPLERS[0][0])
    return rows + guidance_rows(x, test, judge)


GUIDANCE_WEIGHTS = (0.0, 1.0, 2.0, 4.0)  # classifier-free guidance: 0 unconditional, 1 conditional
GUIDANCE_BUDGET_S = 120.0


def guidance_rows(x, test, judge: Judge) -> list[dict]:
    """A class-conditional flow-matching model (labels dropped with probability ``label_dropout``),
    sampled with each of :data:`GUIDANCE_WEIGHTS`: class accuracy in the judge's classifier and FD
    (of samples whose labels cycle through the ten classes)."""
    from . import diffusion as D
    from . import embedded

    y = embedded.digits("train", "levels").y
    model, seconds, epochs = fit_diffusion(D.flow_matching_unet(**D.DIGITS_FM, num_classes=10), (x, y),
                                           D.DIGITS_FM_TRAINING, GUIDANCE_BUDGET_S)
    nll, ms = timed_nll(model, test.x, **FM_NLL)  # without labels: the unconditional model (the null label)
    rows = []
    for w in GUIDANCE_WEIGHTS:
        nfe = 10 if w in (0, 1) else 20  # 5 midpoint steps; guidance evaluates the network twice
        row = sampler_rows("class-conditional flow matching", model, [(f"guidance w = {w:g}",
                           dict(steps=5, guidance=w, labels=10), nfe)], judge, train_s=seconds, epochs=epochs,
                           likelihood="ODE, dequantized, no label", nll=nll, density_ms=ms)[0]
        row.update(class_accuracy(Sampler(model, steps=5, guidance=w), judge, test.x, test.y, per_class=30))
        rows.append(row)
    return rows


class Sampler(torch.nn.Module):
    """A fitted model whose ``sample(n, context)`` passes fixed keyword arguments on (a sampler and its
    steps, a guidance weight); with ``labels`` = C, samples without a context get labels 0..C−1 in turn."""

    def __init__(self, model, labels: int | None = None, **kwargs):
        super().__init__()
        self.model, self.labels, self.kwargs = model, labels, kwargs

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def sample(self, n: int, context=None):
        if context is None and self.labels:
            context = torch.arange(n) % self.labels
        return self.model.sample(n, context, **self.kwargs)


MNIST_DIFFUSION_BUDGET_S = 600.0  # the CPU budget on MNIST (the full-size MNIST_UNET wants a GPU)
MNIST_DIFFUSION_CPU = dict(base=32, mults=(1, 2), blocks=1, embed_dim=64)  # 28 → 14; ~0.3 s per batch of 64
MNIST_NLL_IMAGES = 500  # test images for the ODE likelihood (about 100 network evaluations each, with autograd)


@benchmark("diffusion-mnist", "flow matching (a U-Net, dequantized) on 8-bit MNIST, 10 minutes of CPU training: the "
           "dequantized ODE likelihood in bits/dim and sample quality (FD beside the floor) against steps "
           "(needs the MNIST files)")
def _diffusion_mnist() -> list[dict]:
    from . import datasets
    from . import diffusion as D

    judge = mnist_judge(levels=256)
    images = datasets.load_mnist("train", download=False)[0][:-10_000].long()  # the last 10,000: the floor
    test = judge.heldout[:MNIST_NLL_IMAGES]
    model = D.flow_matching_unet((1, 28, 28), 256, unet=MNIST_DIFFUSION_CPU, **D.DIGITS_FM)
    epochs = max(1, round(MNIST_DIFFUSION_BUDGET_S / 256))  # ~256 s per epoch of 50,000 images on 2 cores
    model, seconds, epochs = fit_diffusion(model, images, dict(D.DIGITS_FM_TRAINING, epochs=epochs),
                                           MNIST_DIFFUSION_BUDGET_S)
    nll, ms = timed_nll(model, test, **FM_NLL, batch_size=100)
    minutes = f"{MNIST_DIFFUSION_BUDGET_S / 60:g} min"
    return sampler_rows(f"flow matching, {minutes}", model, FM_SAMPLERS[:3], judge, train_s=seconds,
                        epochs=epochs, likelihood=f"ODE, dequantized, {len(test)} test images", nll=nll,
                        density_ms=ms, data="MNIST, 8-bit", samples=MNIST_SAMPLES)


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
    if args.name not in BENCHMARKS:
        print(f"error: unknown benchmark {args.name!r}; choose one of {sorted(BENCHMARKS)}.", file=sys.stderr)
        return 2
    from .datasets import CorruptDataError, DataNotFoundError

    try:  # missing or corrupt data files get their message; any other error keeps its traceback
        run(args.name, None if args.no_save else Path(args.out))
    except (DataNotFoundError, CorruptDataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
