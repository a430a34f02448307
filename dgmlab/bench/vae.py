"""Benchmarks: VAEs and their priors, posteriors and decoders (Chapter 5)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from .core import DIGITS_BUDGET_S, MNIST_SAMPLES, Judge, benchmark, digits_judge, fit_timed, measure, mnist_judge

VAE_IWAE_K = 1000  # importance samples of the IWAE bound reported as a VAE's NLL (Burda et al. use 5000)


@torch.no_grad()
def vae_diagnostics(model, test: torch.Tensor, *, draws: int = 10, batch_size: int = 1000) -> dict:
    """A VAE's −ELBO on ``test`` in nats and bits/dim, its rate KL(q(z | x) ‖ p(z)) in nats, and
    its active units (Burda et al. 2015, :func:`dgmlab.vae.active_units`) out of ``latent_dim``.

    The −ELBO and the KL are means over the objects and ``draws`` one-sample estimates each
    (:meth:`dgmlab.vae.VAE.elbo`; the KL is exact for a Gaussian posterior under N(0, I),
    Monte Carlo otherwise), in eval mode (no dropout).
    """
    from ..metrics import nats_to_bpd
    from ..vae import active_units

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
    from .. import embedded
    from .. import vae as V

    xl, xl_val, xl_test = (embedded.digits(s, "levels").x for s in ("train", "val", "test"))

    def fit():
        torch.manual_seed(0)
        model = V.vae_mlp(embedded.DIGITS_SHAPE, levels=embedded.DIGITS_LEVELS, **settings)
        return fit_timed(model, xl[:train_size], xl_val, epochs=epochs, budget=budget, **training)

    return measure_vae("digits, 17 levels", model_name, fit, xl_test, digits_judge("levels"), k=k)


VAE_EPOCHS, PIXELVAE_EPOCHS = 300, 30  # the cosine schedules of dgmlab.vae's digits settings


@benchmark("vae", "VAEs on the 17-level digits, at most 60 s of CPU training each: test NLL = IWAE bound "
           "(k = 1000), with the −ELBO, the KL and the active units")
def _vae() -> list[dict]:
    from .. import baselines as B
    from .. import embedded
    from .. import vae as V

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
    from .. import baselines as B
    from .. import datasets
    from .. import vae as V

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    judge = mnist_judge()

    def vae():
        torch.manual_seed(0)
        model = V.vae_mlp((1, 28, 28), **MNIST_VAE)
        return fit_timed(model, images["train"], images["val"], budget=MNIST_VAE_BUDGET_S, **MNIST_VAE_TRAINING)

    minutes = f"{MNIST_VAE_BUDGET_S / 60:g} min"
    return [measure("MNIST, binarized", "independent pixels", lambda: B.IndependentBernoulli.from_data(
                images["train"].reshape(-1, 784), alpha=1.0), images["test"].reshape(-1, 784), judge,
                samples=MNIST_SAMPLES),
            measure_vae("MNIST, binarized", f"VAE (2×200 ReLU, 50 latents), {minutes}", vae, images["test"], judge,
                        k=MNIST_VAE_IWAE_K, samples=MNIST_SAMPLES)]
