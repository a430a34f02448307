"""Benchmarks: MAF and RealNVP (Chapter 4)."""

from __future__ import annotations

import torch

from .core import (DIGITS_BUDGET_S, MNIST_BUDGET_S, MNIST_SAMPLES, benchmark, digits_judge, fit_timed, measure,
                   mnist_judge)

MNIST_FLOW = dict(levels=256, scales=2, steps=4, hidden=64)
MNIST_FLOW_TRAINING = dict(epochs=8, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=1e-5,
                           clip_grad_norm=50.0)


@benchmark("flows", "MAF and RealNVP on the 17-level digits, at most 60 s of CPU training each, two dequantizations")
def _flows() -> list[dict]:
    from .. import baselines as B
    from .. import embedded
    from .. import flows as F

    xl, xl_val, xl_test = (embedded.digits(s).x for s in ("train", "val", "test"))
    flat = [x.reshape(len(x), -1) for x in (xl, xl_val, xl_test)]
    levels = digits_judge("levels")

    def dequantized(flow, variational: bool):
        if not variational:
            return F.UniformDequantization(flow, 17)
        return F.VariationalDequantization(flow, F.dequantization_noise(64, **F.DIGITS_NOISE), 17)

    def maf(variational: bool):
        model = dequantized(F.maf_flow(64, levels=17, **F.DIGITS_MAF), variational)
        return fit_timed(model, flat[0], flat[1], epochs=80, budget=DIGITS_BUDGET_S, **F.DIGITS_FLOW_TRAINING)

    def realnvp(variational: bool):
        model = dequantized(F.realnvp_image((1, 8, 8), levels=17, **F.DIGITS_REALNVP), variational)
        return fit_timed(model, xl, xl_val, epochs=60, budget=DIGITS_BUDGET_S, **F.DIGITS_FLOW_TRAINING)

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
    from .. import datasets
    from .. import flows as F

    images = datasets.load_mnist("train", download=False)[0].long()
    train_x, val_x = images[:-10_000], images[-10_000:]
    test_x = datasets.load_mnist("test", download=False)[0].long()

    def realnvp():
        model = F.UniformDequantization(F.realnvp_image((1, 28, 28), **MNIST_FLOW), 256)
        return fit_timed(model, train_x, val_x, budget=MNIST_BUDGET_S, **MNIST_FLOW_TRAINING)

    return [measure("MNIST, 8-bit", "RealNVP (2 scales), uniform dequantization, 10 min", realnvp, test_x,
                    mnist_judge(256), samples=MNIST_SAMPLES)]
