"""Benchmarks: VQ-VAEs and the dVAE (Chapter 6)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from .core import (DIGITS_BUDGET_S, MNIST_SAMPLES, Judge, benchmark, class_accuracy, digits_judge, fit_timed, measure,
                   mnist_judge)
from .vae import VAE_EPOCHS, VAE_IWAE_K, digits_vae_row


@torch.no_grad()
def discrete_diagnostics(model, test: torch.Tensor, train: torch.Tensor) -> dict:
    """A VQ-VAE's or dVAE's code usage over the whole training set (the fraction of its K codes
    used and the perplexity of their histogram: an epoch's figures, which unlike a batch's do not
    depend on the batch size) and its test reconstruction term −log p(x | z*) in nats, z* the
    encoder's codes (the nearest codes; the dVAE's most probable ones)."""
    from ..discrete import VQVAE, code_usage

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
    from .. import autoregressive as A
    from .. import discrete as D
    from ..train import cosine

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
    from .. import embedded

    (x, y), (x_val, y_val), (x_test, y_test) = (embedded.digits(s, "levels") for s in ("train", "val", "test"))

    def fit():
        model, history = fit_timed(make(), x, x_val, epochs=epochs, budget=DIGITS_BUDGET_S, **training)
        return model, history, None if prior is None else fit_code_prior(model, prior, x, y, x_val, y_val)

    return discrete_row("digits, 17 levels", model_name, fit, dict(x=x, x_test=x_test, y_test=y_test),
                        digits_judge("levels"), k=k)


DVAE_IWAE_K = 100  # importance samples of the dVAE's bound


@benchmark("discrete", "VQ-VAEs and a dVAE on the 17-level digits, at most 60 s of CPU training per stage (the "
           "autoencoder, then the class-conditional prior over its codes): test NLL = the model's bound; code "
           "usage over the training set; class accuracy of class-conditional samples; beside Chapter 5's VAE")
def _discrete() -> list[dict]:
    from .. import baselines as B
    from .. import discrete as D
    from .. import embedded
    from .. import vae as V

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
    from .. import datasets
    from .. import discrete as D

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    train_labels = datasets.load_mnist("train", download=False)[1]
    n = len(images["train"])
    labels = {"train": train_labels[:n], "val": train_labels[n:], "test": datasets.load_mnist("test", download=False)[1]}

    def fit():
        torch.manual_seed(0)
        model, history = fit_timed(D.VQVAE((1, 28, 28), **D.MNIST_VQVAE), images["train"], images["val"],
                                    budget=MNIST_VQ_BUDGET_S, **D.MNIST_VQVAE_TRAINING)
        prior = fit_code_prior(model, "transformer", images["train"], labels["train"], images["val"],
                               labels["val"], budget=MNIST_VQ_PRIOR_BUDGET_S, settings=MNIST_VQ_PRIOR,
                               training=MNIST_VQ_PRIOR_TRAINING, epochs=MNIST_VQ_PRIOR_EPOCHS)
        return model, history, prior

    minutes = f"{MNIST_VQ_BUDGET_S / 60:g} + {MNIST_VQ_PRIOR_BUDGET_S / 60:g} min"
    data = dict(x=images["train"], x_test=images["test"], y_test=labels["test"])
    return [discrete_row("MNIST, binarized", f"VQ-VAE (7×7 codes of {D.MNIST_VQVAE['num_codes']}), Transformer "
                         f"prior, {minutes}", fit, data, mnist_judge(), samples=MNIST_SAMPLES)]
