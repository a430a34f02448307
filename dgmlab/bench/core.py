"""The benchmarks' plumbing: measuring a model, and writing the table the book includes.

Each benchmark returns rows (one per model and data set) with the parameter
count, training seconds, held-out NLL in nats and bits/dim, sampling time, and
the quality of the samples in the features of a classifier trained on the same
data (:mod:`dgmlab.quality`), each beside the real-data floor.
The table is printed and written atomically to ``book/results/<name>.md`` (and
``.json`` with the rows, the sample grids and the digest of the benchmark's sources;
``.png``), where the book includes it: the book shows the latest figures.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import atomic_write

__all__ = ["BENCHMARKS", "benchmark", "measure", "Judge", "run", "RESULTS_DIR", "HEADERS", "EXTRA_COLUMNS",
           "GRID", "PANELS_PER_LINE", "markdown_table", "sample_figure", "digits_judge", "mnist_judge",
           "MNIST_SAMPLES", "MNIST_BUDGET_S", "DIGITS_BUDGET_S", "fit_timed", "class_accuracy",
           "HISTOGRAM_SAMPLES", "Rounded", "mode_and_copy_diagnostics", "network_evaluations", "sources_digest",
           "save", "encode_grid", "decode_grid", "TABLES", "render", "note"]


RESULTS_DIR = Path(__file__).resolve().parents[2] / "book" / "results"
BENCHMARKS: dict[str, tuple[Callable[[], list[dict]], str]] = {}
TABLES: dict[str, Callable[[list[dict]], str]] = {}  # a benchmark's own table (default: markdown_table)
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


def benchmark(name: str, description: str, *, table: Callable[[list[dict]], str] | None = None):
    """Register a function returning benchmark rows under ``name`` (and the function writing its
    Markdown table, if not :func:`markdown_table`)."""
    def register(fn):
        BENCHMARKS[name] = (fn, description)
        if table is not None:
            TABLES[name] = table
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
        from ..quality import to_unit

        return to_unit(x, self.levels)

    def __call__(self, samples: torch.Tensor) -> dict:
        """Every sample-quality score of ``samples``, each beside its real-data floor."""
        from ..quality import evaluate_samples

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
    first :data:`GRID` samples as [0, 1] images, which :func:`run` draws and saves in the
    JSON as 8-bit pixels (:func:`encode_grid`); ``nfe``, the network passes per sample
    (:func:`network_evaluations`, unless ``extra`` gives it); ``epochs``, the epochs
    trained, for a model fitted with a history.

    A likelihood-free model (``has_log_prob = False``: a GAN) has ``nll_nats``,
    ``bits_per_dim`` and ``density_ms`` None, shown as "none" in the table.
    ``nll_kwargs`` go to :func:`~dgmlab.metrics.heldout_nll` (``k=1000``: a VAE's NLL is
    its IWAE bound); ``extra(model, test)`` returns more keys for the row (seeded here),
    e.g. :func:`vae_diagnostics`, which :func:`markdown_table` shows as extra columns.
    """
    from ..metrics import heldout_nll

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
    more.setdefault("nfe", network_evaluations(model))
    return {"data": data_name, "model": model_name, "parameters": model.num_parameters(),
            "train_s": train_s, "epoch_s": epoch_s, "nll_nats": nll and nll.nats, "bits_per_dim": nll and nll.bpd,
            "nll_is_bound": bool(nll and nll.is_bound), "density_ms": density_ms, "sample_ms": sample_ms, **judge(drawn),
            **more, "grid": judge.unit(drawn[:GRID]).reshape(-1, *judge.heldout.shape[-3:]).cpu()}


def network_evaluations(model) -> int:
    """The passes through a model's networks to draw one sample, counted while it draws one:
    the most calls any one of its modules receives from outside the others (a PixelCNN: one per
    pixel, though each pass calls its layers one by one; a flow: one, whatever its number of
    layers; the decoder's single pass after a prior's many is not added). A model whose sampler
    uses its weights without calling a module says so by ``sampling_passes()`` (an RBM: one pass
    per Gibbs round); a table of counts (the baselines) makes none."""
    if hasattr(model, "sampling_passes"):
        return int(model.sampling_passes())
    depth, calls = [0], {}

    def enter(module, args):
        if depth[0] == 0:
            calls[module] = calls.get(module, 0) + 1
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1

    handles = [hook for m in model.modules()
               for hook in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True))]
    was_training = model.training
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            model.eval().sample(1)  # eval: a batch norm's statistics do not need a batch
    finally:
        model.train(was_training)
        for hook in handles:
            hook.remove()
    return max(calls.values(), default=0)


def sources_digest(name: str) -> str:
    """The SHA-256 of benchmark ``name``'s sources: the module that defines it and the library
    module of the same name (``bench/flows.py`` and ``flows.py``). A saved table is *fresh* while
    its recorded digest equals this one; a change to the shared plumbing (this module,
    :mod:`dgmlab.quality`, :mod:`dgmlab.train`) is not tracked: re-run the tables after one."""
    import hashlib

    defined_in = Path(sys.modules[BENCHMARKS[name][0].__module__].__file__).resolve()
    library = defined_in.parents[1] / defined_in.name
    digest = hashlib.sha256()
    for path in (defined_in, library):
        if path.is_file():
            digest.update(f"{path.parent.name}/{path.name}\n".encode())
            digest.update(path.read_text(encoding="utf-8").replace("\r\n", "\n").encode())
    return digest.hexdigest()


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
    sources = sources_digest(name)  # of the code that runs, read before it runs
    torch.manual_seed(0)
    rows = fn()
    grids = [row.pop("grid") for row in rows]
    for row, grid in zip(rows, grids):
        row["samples"] = encode_grid(grid)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    table = TABLES.get(name, markdown_table)(rows)
    print(f"{name}: {description}\n({machine})\n\n{table}\n\n(written by `python -m dgmlab.bench {name}`)")
    if out_dir is not None:
        shown = [i for i, row in enumerate(rows) if row.get("in_figure", True)]
        figure = sample_figure([rows[i] for i in shown], [grids[i] for i in shown])
        save(name, description, rows, machine, out_dir, figure=figure, sources=sources, table=table)
    return rows


def render(name: str, out_dir: Path = RESULTS_DIR) -> str:
    """Rewrite benchmark ``name``'s Markdown table from its saved rows (after a change to how tables
    are drawn; nothing is re-measured). Returns the table."""
    saved = json.loads((Path(out_dir) / f"{name}.json").read_text(encoding="utf-8"))
    table = TABLES.get(name, markdown_table)(saved["rows"])
    atomic_write(Path(out_dir) / f"{name}.md", note(name, table, saved["machine"], saved.get("sources")))
    return table


def note(name: str, table: str, machine: str, sources: str | None) -> str:
    """A saved table: the table, and under it the machine and the command that measured it."""
    command = f"python -m dgmlab.bench {name}"
    written = f"sources {sources[:12]}" if sources else "sources not recorded"
    return (f"<!-- written by `{command}`; do not edit by hand -->\n{table}\n\n"
            f"*Measured on {machine} by `{command}` ({written}).*\n")


def encode_grid(grid: torch.Tensor) -> dict:
    """A benchmark's sample grid (images in [0, 1]) as JSON: 8-bit pixels, base64."""
    import base64

    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return {"shape": list(pixels.shape), "uint8": base64.b64encode(pixels.numpy().tobytes()).decode()}


def decode_grid(saved: dict) -> torch.Tensor:
    """The images of :func:`encode_grid`, in [0, 1]."""
    import base64

    pixels = torch.frombuffer(bytearray(base64.b64decode(saved["uint8"])), dtype=torch.uint8)
    return pixels.reshape(saved["shape"]).float() / 255


def save(name: str, description: str, rows: list[dict], machine: str, out_dir: Path, *, figure: bytes,
         sources: str | None = None, table: str | None = None):
    """Write benchmark ``name``'s table (``.md``, with the command that wrote it under it), its rows
    with the digest of its sources (``.json``) and its ``figure`` (``.png``), each atomically."""
    sources = sources or sources_digest(name)
    atomic_write(Path(out_dir) / f"{name}.png", figure)
    atomic_write(Path(out_dir) / f"{name}.md", note(name, table or markdown_table(rows), machine, sources))
    record = {"benchmark": name, "description": description, "command": f"python -m dgmlab.bench {name}",
              "machine": machine, "sources": sources, "rows": rows}
    atomic_write(Path(out_dir) / f"{name}.json", json.dumps(record, indent=1) + "\n")


def sample_figure(rows: list[dict], grids: list[torch.Tensor], *, max_bytes: int = 100_000) -> bytes:
    """One panel of samples per row, titled with the model (its budget), the data and the test NLL;
    at most :data:`PANELS_PER_LINE` panels side by side, then a new line of panels.

    Returns PNG bytes; the resolution is lowered until the file is at most ``max_bytes``
    (the book stays light).
    """
    import io
    import textwrap

    from matplotlib.figure import Figure

    from ..viz import image_grid

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


# ---------------------------------------------------------------------------- judges and budgets
def digits_judge(variant: str) -> Judge:
    """Judge samples of the digits (``"binary"`` or ``"levels"``) against the test split; the
    floor is the validation split's score (models train on the training split)."""
    from .. import embedded
    from ..quality import digits_extractor

    test, val = (embedded.digits(s, variant).x for s in ("test", "val"))
    return Judge(2 if variant == "binary" else embedded.DIGITS_LEVELS, test, val, digits_extractor)


def mnist_judge(levels: int = 2) -> Judge:
    """Judge MNIST samples (binarized, or 8-bit with ``levels=256``) against the test set; the
    floor is that of the last 10,000 training images, which the feature classifier and the
    models hold out as their validation set."""
    from ..datasets import binarized_mnist, load_mnist
    from ..quality import mnist_extractor

    if levels == 2:
        test, val = (binarized_mnist(s, download=False) for s in ("test", "val"))
    else:
        test, val = load_mnist("test", download=False)[0], load_mnist("train", download=False)[0][-10_000:]
    return Judge(levels, test.long() if levels > 2 else test, val.long() if levels > 2 else val,
                 lambda: mnist_extractor(download=False))


MNIST_SAMPLES = 1000  # sample-quality scores on MNIST: 1,000 samples against 1,000 test images

MNIST_BUDGET_S = 600.0  # the CPU budget of the longer MNIST runs
DIGITS_BUDGET_S = 60.0  # the CPU training budget of each model on the digits


def fit_timed(model, train, val, *, epochs: int, budget: float, **settings):
    """Seeded training with a cosine schedule over ``epochs``, stopped after ``budget`` seconds."""
    from ..train import cosine, fit

    torch.manual_seed(0)
    history = fit(model, train, val, epochs=epochs, scheduler=cosine(epochs), max_seconds=budget,
                  progress=False, **settings)
    return model, history


# ---------------------------------------------------------------------------- diagnostics shared by families
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
    from ..quality import class_histogram, embed, nearest_neighbours

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
