"""Benchmarks: DDPMs and flow matching (Chapter 9)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from .core import (GRID, MNIST_SAMPLES, Judge, benchmark, class_accuracy, digits_judge, mnist_judge,
                   mode_and_copy_diagnostics)

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
    from ..train import cosine, fit

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
    from ..metrics import heldout_nll

    torch.manual_seed(0)
    start = time.perf_counter()
    nll = heldout_nll(model, test, **kwargs)
    return nll, 1000 * (time.perf_counter() - start) / len(test)


@benchmark("diffusion", "a DDPM and flow matching (U-Nets) on the 17-level digits, 5 min of CPU training each: "
           "the DDPM bound and the dequantized ODE likelihood; sample quality (FD beside the floor) against "
           "network evaluations per sample for ancestral, DDIM, probability-flow ODE and flow-matching samplers; "
           "a class-conditional flow matching model under classifier-free guidance")
def _diffusion() -> list[dict]:
    from .. import diffusion as D
    from .. import embedded

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
    from .. import diffusion as D
    from .. import embedded

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
    from .. import datasets
    from .. import diffusion as D

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
