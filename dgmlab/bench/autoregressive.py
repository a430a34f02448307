"""Benchmarks: MADE and PixelCNNs (Chapter 3)."""

from __future__ import annotations

from .core import (DIGITS_BUDGET_S, MNIST_BUDGET_S, MNIST_SAMPLES, benchmark, digits_judge, fit_timed, measure,
                   mnist_judge)


@benchmark("autoregressive", "MADE and PixelCNN on the digits, at most 60 s of CPU training each, against the baselines")
def _autoregressive() -> list[dict]:
    from .. import autoregressive as A
    from .. import baselines as B
    from .. import embedded

    xb, xb_val, xb_test = (embedded.digits(s, "binary", flatten=True).x for s in ("train", "val", "test"))
    xl, xl_val, xl_test = (embedded.digits(s, "levels").x for s in ("train", "val", "test"))
    binary, levels = digits_judge("binary"), digits_judge("levels")

    def pixelcnn(model, epochs):
        return fit_timed(model, xl, xl_val, epochs=epochs, budget=DIGITS_BUDGET_S, **A.DIGITS_PIXELCNN_TRAINING)

    return [
        measure("digits, binary", "independent pixels", lambda: B.IndependentBernoulli.from_data(xb, alpha=1.0),
                xb_test, binary),
        measure("digits, binary", "MADE (500 units, 8 orderings)", lambda: fit_timed(
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


@benchmark("autoregressive-mnist", "MADE (6 min) and a gated PixelCNN (10 min) on binarized MNIST, on the CPU "
           "(needs the MNIST files)")
def _autoregressive_mnist() -> list[dict]:
    from .. import autoregressive as A
    from .. import baselines as B
    from .. import datasets

    images = {s: datasets.binarized_mnist(s, download=False) for s in ("train", "val", "test")}
    train_x, val_x, test_x = (images[s].reshape(-1, 784) for s in ("train", "val", "test"))
    judge = mnist_judge()
    return [measure("MNIST, binarized", "independent pixels",
                    lambda: B.IndependentBernoulli.from_data(train_x, alpha=1.0), test_x, judge,
                    samples=MNIST_SAMPLES),
            measure("MNIST, binarized", "MADE (1000 units), 6 min", lambda: fit_timed(
                A.MADE(784, **A.MNIST_MADE), train_x, val_x, budget=360, **A.MNIST_MADE_TRAINING), test_x,
                judge, samples=MNIST_SAMPLES),
            measure("MNIST, binarized", "gated PixelCNN, 10 min", lambda: fit_timed(
                A.GatedPixelCNN((1, 28, 28), **MNIST_PIXELCNN), images["train"].long(), images["val"].long(), budget=MNIST_BUDGET_S,
                **MNIST_PIXELCNN_TRAINING), images["test"].long(), judge, samples=MNIST_SAMPLES)]
