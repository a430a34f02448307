"""Benchmarks: RBMs with an exact or AIS-estimated log Z (Chapter 8)."""

from __future__ import annotations

import sys
import time

import torch

from .core import DIGITS_BUDGET_S, MNIST_SAMPLES, benchmark, digits_judge, fit_timed, measure, mnist_judge

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
    from .. import ebm as E

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
    from .. import baselines as B
    from .. import ebm as E
    from .. import embedded

    x, x_val, x_test = (embedded.digits(s, "binary").x for s in ("train", "val", "test"))
    judge = digits_judge("binary")

    def rbm(settings, epochs, training):
        model = E.RBM(embedded.DIGITS_SHAPE, **{**E.DIGITS_RBM, **settings}).init_from_data(x)
        return fit_timed(model, x, x_val, epochs=epochs, budget=DIGITS_BUDGET_S,
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
    from .. import datasets
    from .. import ebm as E

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    spent = {}

    def fit():
        torch.manual_seed(0)
        model = E.RBM((1, 28, 28), **E.MNIST_RBM).init_from_data(images["train"])
        training = {**E.MNIST_RBM_TRAINING, "epochs": MNIST_RBM_CPU_EPOCHS}
        history = fit_timed(model, images["train"], None, budget=MNIST_RBM_BUDGET_S, **training)[1]
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
