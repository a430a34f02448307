"""Benchmarks: DCGANs, judged by their samples alone (Chapter 7)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from .core import (DIGITS_BUDGET_S, MNIST_SAMPLES, Judge, Rounded, benchmark, digits_judge, fit_timed, measure,
                   mnist_judge, mode_and_copy_diagnostics)
from .vae import VAE_EPOCHS, measure_vae


def gan_row(data_name: str, model_name: str, make: Callable, x: torch.Tensor, judge: Judge, *,
            budget: float, training: dict, samples: int | None = None) -> dict:
    """One GAN row: ``make()`` fitted on the images ``x`` in [0, 1] for ``budget`` seconds (no
    validation set: a GAN has no held-out loss), its samples rounded to the judge's levels."""
    from ..train import fit

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
    from .. import autoregressive as A
    from .. import embedded
    from .. import gan as G
    from .. import vae as V

    x, x_val = (embedded.digits(s, "levels").x for s in ("train", "val"))
    judge, unit = digits_judge("levels"), embedded.digits("train", "unit").x

    def diagnostics(model, _):
        return mode_and_copy_diagnostics(model, judge, x)

    def dcgan(name, settings):
        return gan_row("digits, 17 levels", name, lambda: G.dcgan(embedded.DIGITS_SHAPE, **settings), unit, judge,
                       budget=DIGITS_BUDGET_S, training=G.DIGITS_DCGAN_TRAINING)

    return [
        measure_vae("digits, 17 levels", "VAE (Chapter 5)", lambda: fit_timed(
            V.vae_mlp(embedded.DIGITS_SHAPE, levels=embedded.DIGITS_LEVELS, **V.DIGITS_VAE), x, x_val,
            epochs=VAE_EPOCHS, budget=DIGITS_BUDGET_S, **V.DIGITS_VAE_TRAINING), judge.heldout, judge,
            extra=diagnostics),
        measure("digits, 17 levels", "gated PixelCNN, logistic mixture (Chapter 3)", lambda: fit_timed(
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
    from .. import datasets
    from .. import gan as G

    judge = mnist_judge(levels=256)
    images = datasets.load_mnist("train", download=False)[0][:-10_000]  # the last 10,000: the judge's floor
    minutes = f"{MNIST_GAN_BUDGET_S / 60:g} min"
    settings = {**G.MNIST_DCGAN, **MNIST_GAN_CPU}
    name = f"DCGAN + R1 ({settings['channels']} channels), {minutes}"
    return [gan_row("MNIST, 8-bit", name, lambda: G.dcgan((1, 28, 28), **settings),
                    images.float() / 255, judge, budget=MNIST_GAN_BUDGET_S,
                    training={k: v for k, v in G.MNIST_DCGAN_TRAINING.items() if k != "epochs"},
                    samples=MNIST_SAMPLES)]
