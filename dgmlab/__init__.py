"""dgmlab: the small, tested helper library of the Deep Generative Models course.

Modules, by topic (imported on first use, so ``import dgmlab`` stays fast):

* :mod:`dgmlab.base`      -- the shared model API (``log_prob``, ``sample``, ``loss``)
* :mod:`dgmlab.embedded` -- data that ship with the code: the 8x8 digits, 2-D toy densities
* :mod:`dgmlab.datasets` -- data read from downloaded files: MNIST, Fashion-MNIST, CIFAR-10
* :mod:`dgmlab.train`     -- one training loop for every chapter
* :mod:`dgmlab.metrics`   -- nats, bits per dimension, held-out NLL
* :mod:`dgmlab.viz`       -- image grids, density maps, scatters, curves
* :mod:`dgmlab.interactive` -- interactive figures: live sliders, and working sliders in the book
* :mod:`dgmlab.divergences` -- f-divergences, KL between Gaussians, forward/reverse fits
* :mod:`dgmlab.baselines` -- independent-pixel, Markov-chain and Gaussian baselines
* :mod:`dgmlab.classifiers` -- generative vs discriminative classifiers (Chapter 1)
* :mod:`dgmlab.autoregressive` -- MADE, PixelCNN, gated PixelCNN and a small Transformer
* :mod:`dgmlab.flows`     -- normalizing flows: planar, RealNVP, Glow layers, MAF/IAF, dequantization
* :mod:`dgmlab.latent`    -- latent variable models with exact posteriors: PPCA, Gaussian mixtures and EM
* :mod:`dgmlab.vae`       -- the VAE: encoders, decoders, priors, IAF posteriors, IWAE, diagnostics
* :mod:`dgmlab.discrete`  -- discrete latents: vector quantisation, the VQ-VAE, Gumbel-softmax, the dVAE
* :mod:`dgmlab.gan`       -- GANs: minimax and non-saturating losses, R1, DCGAN, the optimal discriminator
* :mod:`dgmlab.ebm`       -- energy-based models: RBMs, CD-k and PCD, exact log Z and AIS, Langevin
* :mod:`dgmlab.diffusion` -- diffusion: noise schedules, ε/x₀/score, denoisers, the DDPM bound, DDPM/DDIM sampling
* :mod:`dgmlab.quality`   -- sample quality in a digit classifier's features: FD, KID, precision/recall
* :mod:`dgmlab.bench`     -- the benchmarks whose tables appear in the book, one module per family, and the zoo
* :mod:`dgmlab.modes`     -- fast (default) vs full-size runs
* :mod:`dgmlab.grading`   -- graded exercises: checks, generator, grader
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "base", "embedded", "datasets", "train", "metrics", "viz", "modes", "grading",
    "validate", "baselines", "classifiers", "probability", "bench", "divergences", "interactive",
    "autoregressive", "flows", "files", "quality", "latent", "vae", "discrete", "gan", "ebm",
    "diffusion",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'dgmlab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
