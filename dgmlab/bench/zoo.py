"""Benchmarks: the model zoo (Chapter 10), every family of the course side by side.

``zoo`` collects each family's digits benchmark when its saved table is fresh (written by the
current sources of that benchmark: :func:`~dgmlab.bench.core.sources_digest`) and runs it
otherwise, then writes one table of every model on the digits' test split. ``zoo-mnist`` trains
one model of each family on binarized MNIST for the same CPU budget and measures them the same way.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

from .core import (MNIST_SAMPLES, RESULTS_DIR, benchmark, decode_grid, fit_timed, measure, mnist_judge, run,
                   sources_digest)

# (benchmark, family, place in the taxonomy, chapter), in the course's order
FAMILIES = (("baselines", "classical baselines", "explicit, tractable", 1),
            ("autoregressive", "autoregressive", "explicit, tractable", 3),
            ("flows", "normalizing flows", "explicit, tractable", 4),
            ("vae", "VAEs", "explicit, approximate", 5),
            ("discrete", "discrete latents", "explicit, approximate", 6),
            ("gan", "GANs", "implicit", 7),
            ("rbm", "energy-based (RBMs)", "explicit, approximate", 8),
            ("diffusion", "diffusion, flow matching", "explicit, approximate", 9))
REFERENCE = re.compile(r"\(Chapter \d+\)$")  # a row that re-measures another chapter's model beside a family's
RERUN = False  # ``python -m dgmlab.bench zoo --rerun``: run every family's benchmark, fresh or not
HEADERS = ("family", "data", "model", "parameters", "training (s)", "NLL (nats)", "bits/dim", "NLL is",
           "FD (real floor)", "FD ÷ floor", "KID × 1000 (floor)", "precision (floor)", "recall (floor)",
           "class entropy (real; max 2.30)", "sampling (ms/image)", "network passes per sample")


def family_rows(name: str, *, rerun: bool = False, results: Path | None = None) -> tuple[list[dict], str, str]:
    """The rows of benchmark ``name``, how they were had ("collected" from its saved table in
    ``results`` (default: the book's) when that is fresh, "ran" otherwise) and the digest of the
    sources that wrote them."""
    results = Path(results or RESULTS_DIR)
    path = results / f"{name}.json"
    digest = sources_digest(name)
    if not rerun and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("sources") == digest:
            return saved["rows"], "collected", digest
    print(f"(zoo: running `python -m dgmlab.bench {name}`: its saved table is missing or stale)",
          file=sys.stderr, flush=True)
    return run(name, results), "ran", digest


def nll_kind(row: dict) -> tuple[str, float | None]:
    """What a row's NLL is: "exact", a "bound" (a VAE's IWAE, a dequantized or diffusion bound), an
    "estimate" with its standard error (an RBM's log Z by AIS), or "none" (likelihood-free)."""
    if row["nll_nats"] is None:
        return "none", None
    if "ais_only_stderr" in row:
        return "estimate", row["ais_only_stderr"]
    return ("bound" if row["nll_is_bound"] else "exact"), None


def zoo_row(row: dict, name: str, family: str, taxonomy: str, chapter: int, how: str, digest: str) -> dict:
    """A family's row with its place in the zoo, and its sample grid for the gallery."""
    kind, error = nll_kind(row)
    return {**row, "family": family, "taxonomy": taxonomy, "chapter": chapter, "benchmark": name,
            "benchmark_sources": digest, "collected": how == "collected", "nll_kind": kind, "nll_error": error,
            "grid": row["grid"] if "grid" in row else decode_grid(row["samples"])}


def mark_gallery(rows: list[dict]) -> list[dict]:
    """``in_figure``: each family's row with the lowest FD ÷ floor (one sample grid per family)."""
    best = {}
    for i, row in enumerate(rows):
        if row["family"] not in best or row["fd_ratio"] < rows[best[row["family"]]]["fd_ratio"]:
            best[row["family"]] = i
    for i, row in enumerate(rows):
        row["in_figure"] = i in best.values()
    return rows


@benchmark("zoo", "every family of the course on the digits' test split, side by side: each family's benchmark "
           "collected when its saved table is fresh, run otherwise (--rerun: run them all); the gallery shows "
           "each family's model with the lowest FD ÷ floor", table=lambda rows: zoo_table(rows))
def _zoo() -> list[dict]:
    rows, seen = [], set()
    for name, family, taxonomy, chapter in FAMILIES:
        found, how, digest = family_rows(name, rerun=RERUN)
        for row in found:
            key = (row["data"], row["model"])
            if not row["data"].startswith("digits") or REFERENCE.search(row["model"]) or key in seen:
                continue  # MNIST rows, another chapter's model, or a baseline met in an earlier table
            seen.add(key)
            rows.append(zoo_row(row, name, family, taxonomy, chapter, how, digest))
    return mark_gallery(rows)


def _nll_cells(r: dict) -> list[str]:
    if r["nll_kind"] == "none":
        return ["none", "none", "none (likelihood-free)"]
    prefix = "≤ " if r["nll_kind"] == "bound" else ""
    error = f" ± {r['nll_error']:.2f}" if r["nll_error"] is not None else ""
    return [f"{prefix}{r['nll_nats']:.2f}{error}", f"{r['bits_per_dim']:.3f}", r["nll_kind"]]


def zoo_table(rows: list[dict], notes: tuple[str, ...] = ()) -> str:
    """The zoo's Markdown table (:data:`HEADERS`), and under it where each family's rows came from."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        cells = [r["family"], r["data"], r["model"], f"{r['parameters']:,}", f"{r['train_s']:.0f}", *_nll_cells(r),
                 f"{r['fd']:.2f} ({r['fd_floor']:.2f})", f"{r['fd_ratio']:.2f}",
                 f"{1000 * r['kid']:.1f} ({1000 * r['kid_floor']:.1f})",
                 f"{r['precision']:.2f} ({r['precision_floor']:.2f})", f"{r['recall']:.2f} ({r['recall_floor']:.2f})",
                 f"{r['class_entropy']:.3f} ({r['class_entropy_floor']:.3f})", f"{r['sample_ms']:.3f}", f"{r['nfe']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    sources = {}
    for r in rows:
        sources.setdefault(r["benchmark"], (r["benchmark_sources"], r["collected"]))
    if sources:
        lines += ["", "Rows from: " + "; ".join(
            f"`python -m dgmlab.bench {name}` ({'collected' if collected else 'run'}, sources {digest[:12]})"
            for name, (digest, collected) in sources.items()) + "."]
    lines += [f"\n{note}" for note in notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- binarized MNIST
ZOO_MNIST_BUDGET_S = 180.0  # CPU training seconds per model (a VQ-VAE: 2/3 autoencoder, 1/3 prior)
ZOO_MNIST_NLL_IMAGES = 1000  # the first test images, for every NLL but the ODE's
ZOO_MNIST_ODE_IMAGES = 100  # flow matching's ODE likelihood takes ~1.3 s per image
# each model's cosine schedule, sized to end near the budget from the seconds per epoch that the
# longer MNIST benchmarks measured on 2 cores (MADE 7.7, PixelCNN 277, RealNVP 63, VAE 2.8, VQ-VAE
# ~300, its prior ~9, RBM 3.7, flow matching 246)
ZOO_MNIST_EPOCHS = dict(made=23, pixelcnn=1, realnvp=3, vae=64, vqvae=1, prior=6, rbm=48, fm=1)
ZOO_MNIST_NOTES = (
    "Not in this table: the DDPM. Its bound takes T = 1,000 network passes per test image and its ancestral "
    "sampler 1,000 per sample, so on 2 CPU cores the budget of the diffusion family goes to flow matching; "
    "Chapter 9's digits table measures both.",)


def _mnist_data() -> dict:
    from .. import datasets

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    labels = datasets.load_mnist("train", download=False)[1]
    n = len(images["train"])
    return {**images, "y": labels[:n], "y_val": labels[n:], "y_test": datasets.load_mnist("test", download=False)[1],
            "flat": {s: x.reshape(len(x), -1) for s, x in images.items()}}


def _likelihood_rows(data: dict, judge, budget: float, minutes: str) -> list[dict]:
    """Independent pixels, MADE, a gated PixelCNN, a RealNVP and a VAE on binarized MNIST."""
    from .. import autoregressive as A
    from .. import baselines as B
    from .. import flows as F
    from .. import vae as V
    from .autoregressive import MNIST_PIXELCNN, MNIST_PIXELCNN_TRAINING
    from .flows import MNIST_FLOW, MNIST_FLOW_TRAINING
    from .vae import MNIST_VAE, MNIST_VAE_TRAINING, measure_vae

    flat, test = data["flat"], data["test"][:ZOO_MNIST_NLL_IMAGES]
    epochs, ints = ZOO_MNIST_EPOCHS, {s: data[s].long() for s in ("train", "val")}
    settings = dict(judge=judge, samples=MNIST_SAMPLES)

    def realnvp():
        return F.UniformDequantization(F.realnvp_image((1, 28, 28), **{**MNIST_FLOW, "levels": 2}), 2)

    return [
        measure("MNIST, binarized", "independent pixels", lambda: B.IndependentBernoulli.from_data(
            flat["train"], alpha=1.0), flat["test"][:ZOO_MNIST_NLL_IMAGES], **settings),
        measure("MNIST, binarized", f"MADE (1000 units), {minutes}", lambda: fit_timed(
            A.MADE(784, **A.MNIST_MADE), flat["train"], flat["val"], budget=budget,
            **{**A.MNIST_MADE_TRAINING, "epochs": epochs["made"]}), flat["test"][:ZOO_MNIST_NLL_IMAGES], **settings),
        measure("MNIST, binarized", f"gated PixelCNN, {minutes}", lambda: fit_timed(
            A.GatedPixelCNN((1, 28, 28), **MNIST_PIXELCNN), ints["train"], ints["val"], budget=budget,
            **{**MNIST_PIXELCNN_TRAINING, "epochs": epochs["pixelcnn"]}), test.long(), **settings),
        measure("MNIST, binarized", f"RealNVP (2 scales), uniform dequantization, {minutes}", lambda: fit_timed(
            realnvp(), ints["train"], ints["val"], budget=budget,
            **{**MNIST_FLOW_TRAINING, "epochs": epochs["realnvp"]}),
            test.long(), **settings),
        measure_vae("MNIST, binarized", f"VAE (2×200 ReLU, 50 latents), {minutes}", lambda: fit_timed(
            V.vae_mlp((1, 28, 28), **MNIST_VAE), data["train"], data["val"], budget=budget,
            **{**MNIST_VAE_TRAINING, "epochs": epochs["vae"]}), test, judge, samples=MNIST_SAMPLES),
    ]


def _vqvae_row(data: dict, judge, budget: float) -> dict:
    """A VQ-VAE (2/3 of the budget) and its class-conditional Transformer prior (1/3)."""
    from .. import discrete as Q
    from .discrete import MNIST_VQ_PRIOR, MNIST_VQ_PRIOR_TRAINING, discrete_row, fit_code_prior

    def fit():
        torch.manual_seed(0)
        model, history = fit_timed(Q.VQVAE((1, 28, 28), **Q.MNIST_VQVAE), data["train"], data["val"],
                                   budget=2 * budget / 3,
                                   **{**Q.MNIST_VQVAE_TRAINING, "epochs": ZOO_MNIST_EPOCHS["vqvae"]})
        prior = fit_code_prior(model, "transformer", data["train"], data["y"], data["val"], data["y_val"],
                               budget=budget / 3, settings=MNIST_VQ_PRIOR, training=MNIST_VQ_PRIOR_TRAINING,
                               epochs=ZOO_MNIST_EPOCHS["prior"])
        return model, history, prior

    n = ZOO_MNIST_NLL_IMAGES
    split = dict(x=data["train"], x_test=data["test"][:n], y_test=data["y_test"][:n])
    name = f"VQ-VAE (7×7 codes of {Q.MNIST_VQVAE['num_codes']}), Transformer prior, {budget / 60:g} min"
    return discrete_row("MNIST, binarized", name, fit, split, judge, samples=MNIST_SAMPLES)


def _rbm_row(data: dict, judge, budget: float, minutes: str) -> dict:
    """An RBM with 500 hidden units (PCD-1), its log Z estimated by AIS after training."""
    from .. import ebm as E

    spent = {}

    def fit():
        torch.manual_seed(0)
        model = E.RBM((1, 28, 28), **E.MNIST_RBM).init_from_data(data["train"])
        history = fit_timed(model, data["train"], None, budget=budget,
                            **{**E.MNIST_RBM_TRAINING, "epochs": ZOO_MNIST_EPOCHS["rbm"]})[1]
        start = time.perf_counter()
        model.set_log_normalizer(E.ais(model, data=data["train"], **E.MNIST_AIS))
        spent["ais_s"], spent["train_s"] = time.perf_counter() - start, history.seconds[-1]
        return model, history

    def extra(model, _):
        return {"ais_only_stderr": model.log_normalizer_stderr, "ais_log_z": model.log_normalizer_estimate,
                "ais_runs": f"{E.MNIST_AIS['chains']} × {E.MNIST_AIS['temperatures']}", **spent}

    name = f"RBM (500 hidden, PCD-1), {minutes}"
    return measure("MNIST, binarized", name, fit, data["test"][:ZOO_MNIST_NLL_IMAGES], judge,
                   samples=MNIST_SAMPLES, extra=extra)


def _flow_matching_row(data: dict, judge, budget: float, minutes: str) -> dict:
    """Flow matching (a small U-Net) on the dequantized binary images; its ODE likelihood bound."""
    from .. import diffusion as D
    from .diffusion import FM_NLL, FM_SAMPLERS, MNIST_DIFFUSION_CPU, fit_diffusion, sampler_rows, timed_nll

    model = D.flow_matching_unet((1, 28, 28), 2, unet=MNIST_DIFFUSION_CPU, **D.DIGITS_FM)
    model, seconds, epochs = fit_diffusion(model, data["train"].long(),
                                           dict(D.DIGITS_FM_TRAINING, epochs=ZOO_MNIST_EPOCHS["fm"]), budget)
    test = data["test"][:ZOO_MNIST_ODE_IMAGES].long()
    nll, ms = timed_nll(model, test, **FM_NLL, batch_size=100)
    midpoint = [s for s in FM_SAMPLERS if s[0] == "midpoint, 5 steps"]
    return sampler_rows(f"flow matching, {minutes}", model, midpoint, judge, train_s=seconds, epochs=epochs,
                        likelihood=f"ODE, dequantized, {len(test)} test images", nll=nll, density_ms=ms,
                        data="MNIST, binarized", samples=MNIST_SAMPLES)[0]


@benchmark("zoo-mnist", "one model of every family on binarized MNIST, 3 minutes of CPU training each (a VQ-VAE: "
           "2 + 1), NLL on the first 1,000 test images (flow matching's ODE bound: 100), 1,000 samples judged "
           "beside the real-data floor (needs the MNIST files)",
           table=lambda rows: zoo_table(rows, ZOO_MNIST_NOTES))
def _zoo_mnist() -> list[dict]:
    from .. import gan as G
    from .gan import MNIST_GAN_CPU, gan_row

    data, judge, budget = _mnist_data(), mnist_judge(), ZOO_MNIST_BUDGET_S
    minutes = f"{budget / 60:g} min"
    gan = {**G.MNIST_DCGAN, **MNIST_GAN_CPU}
    rows = _likelihood_rows(data, judge, budget, minutes)
    measured = {"baselines": rows[:1], "autoregressive": rows[1:3], "flows": rows[3:4], "vae": rows[4:5],
                "discrete": [_vqvae_row(data, judge, budget)],
                "gan": [gan_row("MNIST, binarized", f"DCGAN + R1 ({gan['channels']} channels), {minutes}",
                                lambda: G.dcgan((1, 28, 28), **gan), data["train"].float(), judge, budget=budget,
                                training={k: v for k, v in G.MNIST_DCGAN_TRAINING.items() if k != "epochs"},
                                samples=MNIST_SAMPLES)],
                "rbm": [_rbm_row(data, judge, budget, minutes)],
                "diffusion": [_flow_matching_row(data, judge, budget, minutes)]}
    digest = sources_digest("zoo-mnist")
    rows = [zoo_row(row, "zoo-mnist", family, taxonomy, chapter, "ran", digest)
            for name, family, taxonomy, chapter in FAMILIES for row in measured[name]]
    return mark_gallery(rows)
