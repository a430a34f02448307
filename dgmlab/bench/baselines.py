"""Benchmark: the classical baselines (Chapter 1)."""

from __future__ import annotations

import sys

from .core import MNIST_SAMPLES, benchmark, digits_judge, measure, mnist_judge


@benchmark("baselines", "the classical baselines every model in the course has to beat")
def _baselines() -> list[dict]:
    from .. import baselines as B
    from .. import datasets, embedded

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
