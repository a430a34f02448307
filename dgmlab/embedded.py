"""The course's embedded data: handwritten digits and 2-D toy densities.

**Digits.** scikit-learn ships 1,797 real handwritten digits (8×8 pixels, 17
grey levels 0..16) inside its package, so nothing is downloaded. The split is
fixed and needs no random numbers: image ``i`` goes to

* ``test``  when ``i % 6 == 5``  (299 images),
* ``val``   when ``i % 6 == 4``  (299 images),
* ``train`` otherwise            (1,199 images).

The file cycles through the classes 0..9, so each split holds every class in
nearly equal numbers. Three variants of the same pixels:

=============  ==========================================  ===============
``variant``    values                                      dtype
=============  ==========================================  ===============
``"levels"``   the 17 grey levels 0..16                    ``torch.int64``
``"binary"``   1 where the level is ≥ 8 (half ink), else 0 ``torch.float32``
``"unit"``     level / 16, in [0, 1]                       ``torch.float32``
=============  ==========================================  ===============

**Toy densities.** Two-dimensional targets made in code, each with a sampler
and, where one exists, its exact log-density (so a model's fit can be scored
against the truth).

**Energies.** Unnormalised 2-D targets exp(−U) for reverse-KL fitting. Only
the ring is normalisable as published; the waves need ``envelope=s`` (see the
comment above :data:`ENERGIES`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, NamedTuple

import numpy as np
import torch

from .validate import check_choice, check_positive_int, check_tensor

__all__ = [
    "DIGITS_SHAPE",
    "DIGITS_LEVELS",
    "SPLIT_SIZES",
    "Split",
    "digits",
    "binarize",
    "bernoulli_binarize",
    "ToyDensity",
    "TOY_DENSITIES",
    "toy_density",
    "ENERGIES",
    "NORMALISABLE",
    "energy",
    "log_normalizer",
]

DIGITS_SHAPE = (1, 8, 8)
DIGITS_LEVELS = 17
DIGITS_BINARY_THRESHOLD = 8
SPLITS = ("train", "val", "test")
VARIANTS = ("levels", "binary", "unit")
SPLIT_SIZES = {"train": 1199, "val": 299, "test": 299}


class Split(NamedTuple):
    """Images ``x`` and labels ``y`` of one split; unpacks as ``x, y = ...``."""

    x: torch.Tensor
    y: torch.Tensor


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    levels = bunch.data.astype(np.int64)  # (1797, 64), values 0..16
    labels = bunch.target.astype(np.int64)
    if levels.shape != (1797, 64) or levels.min() < 0 or levels.max() > 16:
        raise RuntimeError(
            "scikit-learn's digits are not the expected 1797 images of 8x8 levels in 0..16; "
            "reinstall scikit-learn."
        )
    levels.setflags(write=False)
    labels.setflags(write=False)
    return levels, labels


def _split_index(split: str, n: int) -> np.ndarray:
    i = np.arange(n)
    r = i % 6
    mask = {"test": r == 5, "val": r == 4, "train": r < 4}[split]
    return i[mask]


def digits(split: str = "train", variant: str = "levels", *, flatten: bool = False) -> Split:
    """The embedded digits: ``x`` of shape ``(N, 1, 8, 8)`` (``(N, 64)`` if flattened), ``y`` ``(N,)``.

    ``split`` is ``"train"``, ``"val"``, ``"test"`` or ``"all"``; ``variant`` is
    ``"levels"``, ``"binary"`` or ``"unit"`` (see the module docstring).
    """
    check_choice(split, "split", SPLITS + ("all",))
    check_choice(variant, "variant", VARIANTS)
    levels, labels = _digits_arrays()
    idx = np.arange(len(levels)) if split == "all" else _split_index(split, len(levels))
    x = torch.from_numpy(levels[idx].copy())
    y = torch.from_numpy(labels[idx].copy())
    if variant == "binary":
        x = binarize(x)
    elif variant == "unit":
        x = x.float() / (DIGITS_LEVELS - 1)
    if not flatten:
        x = x.reshape(-1, *DIGITS_SHAPE)
    return Split(x, y)


def binarize(levels: torch.Tensor, threshold: int = DIGITS_BINARY_THRESHOLD) -> torch.Tensor:
    """Pixels at or above ``threshold`` become 1.0, the rest 0.0 (float32, same shape)."""
    levels = check_tensor(levels, "levels", kind="numeric")
    return (levels >= threshold).float()


def bernoulli_binarize(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Binarise 8-bit images the way binarized MNIST is usually made: pixel ~ Bernoulli(value / 255).

    A fixed ``seed`` gives the same binary data set every time (float32 0/1, same shape).
    """
    images = check_tensor(images, "images", kind="integer", min=0, max=255)
    g = torch.Generator().manual_seed(int(seed))
    return (torch.rand(images.shape, generator=g) < images.double() / 255).float()


# ---------------------------------------------------------------------------
# 2-D toy densities
# ---------------------------------------------------------------------------

LOG_2PI = math.log(2 * math.pi)


def _generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _normal_logpdf(x: torch.Tensor, mean: torch.Tensor | float, std: float) -> torch.Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * LOG_2PI


class ToyDensity:
    """A 2-D target distribution π(x): a sampler and, where known, log π(x).

    ``sample(n, seed)`` returns ``(n, 2)`` float32 points; ``log_prob(x)`` maps
    ``(N, 2)`` points to ``(N,)`` log-densities in nats. ``exact`` says whether
    ``log_prob`` is the exact density of the sampler (False: not available).
    ``extent`` is a square ``(lo, hi)`` that holds essentially all the mass,
    handy for plotting and numeric integration.
    """

    def __init__(
        self,
        name: str,
        sampler: Callable[[int, torch.Generator | None], torch.Tensor],
        log_prob: Callable[[torch.Tensor], torch.Tensor] | None,
        extent: tuple[float, float],
        description: str,
    ):
        self.name = name
        self._sampler = sampler
        self._log_prob = log_prob
        self.extent = extent
        self.description = description

    @property
    def exact(self) -> bool:
        return self._log_prob is not None

    def sample(self, n: int, seed: int | torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` points, shape ``(n, 2)``; a fixed ``seed`` gives the same points."""
        check_positive_int(n, "n")
        return self._sampler(n, _generator(seed)).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log π(x) for ``x`` of shape ``(N, 2)``, in nats."""
        if self._log_prob is None:
            raise NotImplementedError(
                f"The {self.name!r} toy density has a sampler but no closed-form density."
            )
        x = check_tensor(x, "x", shape=(None, 2), kind="float")
        return self._log_prob(x)

    def __repr__(self) -> str:
        return f"ToyDensity({self.name!r}: {self.description})"


def _gaussian_mixture(means: torch.Tensor, std: float, name: str, description: str, extent):
    means = means.float()
    k = len(means)

    def sampler(n, g):
        comp = torch.randint(k, (n,), generator=g)
        return means[comp] + std * torch.randn(n, 2, generator=g)

    def log_prob(x):
        d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)  # (N, k)
        log_comp = -0.5 * d2 / std**2 - 2 * math.log(std) - LOG_2PI
        return torch.logsumexp(log_comp, dim=1) - math.log(k)

    return ToyDensity(name, sampler, log_prob, extent, description)


def _eight_gaussians() -> ToyDensity:
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return _gaussian_mixture(
        means, 0.2, "eight_gaussians", "8 equal Gaussians (std 0.2) on a circle of radius 2", (-3.2, 3.2)
    )


def _two_gaussians() -> ToyDensity:
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])
    return _gaussian_mixture(
        means, 0.5, "two_gaussians", "2 equal Gaussians (std 0.5) at (±1.5, 0)", (-3.5, 3.5)
    )


def _rings() -> ToyDensity:
    # Choose a ring, an angle uniformly, and a radius |r| with r ~ N(R, σ²).
    # Folding the radius keeps the density exact: p(ρ) = N(ρ; R, σ) + N(-ρ; R, σ)
    # for ρ ≥ 0, and the polar-to-Cartesian Jacobian contributes 1 / (2πρ).
    radii = torch.tensor([1.0, 2.0, 3.0])
    std = 0.12

    def sampler(n, g):
        ring = torch.randint(len(radii), (n,), generator=g)
        theta = 2 * math.pi * torch.rand(n, generator=g)
        rho = (radii[ring] + std * torch.randn(n, generator=g)).abs()
        return torch.stack([rho * torch.cos(theta), rho * torch.sin(theta)], dim=1)

    def log_prob(x):
        rho = x.norm(dim=1).clamp_min(1e-12)[:, None]
        log_radial = torch.logaddexp(
            _normal_logpdf(rho, radii, std), _normal_logpdf(-rho, radii, std)
        )  # (N, rings)
        log_radial = torch.logsumexp(log_radial, dim=1) - math.log(len(radii))
        return log_radial - torch.log(2 * math.pi * rho[:, 0])

    return ToyDensity(
        "rings", sampler, log_prob, (-3.7, 3.7), "3 concentric rings (radii 1, 2, 3; radial std 0.12)"
    )


def _checkerboard() -> ToyDensity:
    # Uniform on the 8 dark squares of a 4×4 board over [-2, 2]²: density 1/8.
    def sampler(n, g):
        col = torch.randint(4, (n,), generator=g)
        row = 2 * torch.randint(2, (n,), generator=g) + (1 - col % 2)  # (row + col) odd
        u = torch.rand(n, 2, generator=g)
        return torch.stack([col + u[:, 0], row + u[:, 1]], dim=1) - 2.0

    def log_prob(x):
        inside = (x.abs() < 2).all(dim=1)
        cell = torch.floor(x + 2.0).long()
        dark = ((cell[:, 0] + cell[:, 1]) % 2 == 1) & inside
        out = torch.full((len(x),), -math.inf, dtype=x.dtype)
        out[dark] = -math.log(8.0)
        return out

    return ToyDensity(
        "checkerboard", sampler, log_prob, (-2.2, 2.2), "uniform on the dark squares of a 4×4 board"
    )


def _two_moons(std: float = 0.1, nodes: int = 96) -> ToyDensity:
    # Each moon is a half circle of radius 1 blurred by isotropic N(0, σ²) noise:
    # π(x) = ½ Σ_moons ∫_0^π N(x; c(t), σ²I) dt/π, computed by Gauss-Legendre
    # quadrature: 96 nodes put the error below 1e-12 in log π wherever log π > −30
    # (checked against 256 nodes), far below float32 precision.
    t_nodes, t_weights = np.polynomial.legendre.leggauss(nodes)
    t = torch.tensor((t_nodes + 1) * math.pi / 2, dtype=torch.float64)  # nodes on [0, π]
    w = torch.tensor(t_weights / 2, dtype=torch.float64)  # weights of the uniform average
    upper = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    shift = torch.tensor([-0.5, -0.25], dtype=torch.float64)  # centre the pair near 0
    curves = torch.stack([upper + shift, lower + shift])  # (2 moons, nodes, 2)

    def sampler(n, g):
        moon = torch.randint(2, (n,), generator=g)
        s = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
        up = torch.stack([torch.cos(s), torch.sin(s)], dim=1)
        low = torch.stack([1 - torch.cos(s), 0.5 - torch.sin(s)], dim=1)
        centre = torch.where(moon[:, None] == 0, up, low) + shift
        return centre + std * torch.randn(n, 2, generator=g, dtype=torch.float64)

    def log_prob(x):
        x64 = x.double()
        d2 = ((x64[:, None, None, :] - curves[None]) ** 2).sum(-1)  # (N, 2, nodes)
        log_k = -0.5 * d2 / std**2 - 2 * math.log(std) - LOG_2PI
        log_moon = torch.logsumexp(log_k + torch.log(w), dim=2)  # (N, 2)
        return (torch.logsumexp(log_moon, dim=1) - math.log(2)).to(x.dtype)

    return ToyDensity(
        "two_moons", sampler, log_prob, (-2.2, 2.2), "two interleaved half circles blurred by N(0, 0.1²)"
    )


def _spirals() -> ToyDensity:
    def sampler(n, g):
        arm = torch.randint(2, (n,), generator=g)
        s = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
        sign = 1 - 2 * arm.float()
        pts = sign[:, None] * torch.stack([s * torch.cos(s), s * torch.sin(s)], dim=1) / 3
        return pts + 0.1 * torch.randn(n, 2, generator=g)

    return ToyDensity(
        "spirals", sampler, None, (-3.5, 3.5), "two interleaved spirals (sampler only)"
    )


TOY_DENSITIES: dict[str, Callable[[], ToyDensity]] = {
    "eight_gaussians": _eight_gaussians,
    "two_gaussians": _two_gaussians,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "two_moons": _two_moons,
    "spirals": _spirals,
}


def toy_density(name: str) -> ToyDensity:
    """One of the 2-D toy targets by name (see ``TOY_DENSITIES``)."""
    check_choice(name, "name", tuple(TOY_DENSITIES))
    return TOY_DENSITIES[name]()


# ---------------------------------------------------------------------------
# 2-D unnormalised targets (energies), for fitting flows by reverse KL
# ---------------------------------------------------------------------------
#
# An energy U defines a distribution π(z) = exp(−U(z)) / Z only if
# Z = ∫ exp(−U(z)) dz over the plane is finite.
#
# * "ring" is normalisable as published: the radial term confines |z| and the
#   second term grows like z₁² far from the two bumps.
# * "wave", "two_waves" and "step_wave" are not: they are periodic in z₁ and
#   nothing confines z₁. Each is a sum of Gaussian ridges in z₂ (one or two per
#   z₁), so its integral over z₂ is the same constant c at every z₁, and the
#   integral over a box grows in proportion to the box's width: Z = ∞.
#   Plotted on a box they look like densities; they are not.
#
# ``energy(name, envelope=s)`` adds z₁²/(2s²) to U, i.e. multiplies exp(−U) by
# a Gaussian envelope along z₁. Every energy is then normalisable, and for the
# waves the z₁-marginal of π is exactly N(0, s²), with Z = c·√(2π)·s in closed
# form (``log_normalizer``).

_RIDGE_MASS = {  # ∫ exp(−U) dz₂ at any z₁: the ridges' √(2π)·σ, summed
    "wave": 0.4 * math.sqrt(2 * math.pi),
    "two_waves": 2 * 0.35 * math.sqrt(2 * math.pi),
    "step_wave": (0.4 + 0.35) * math.sqrt(2 * math.pi),
}


def _u_ring(z):
    r = z.norm(dim=1)
    return 0.5 * ((r - 2) / 0.4) ** 2 - torch.logaddexp(-0.5 * ((z[:, 0] - 2) / 0.6) ** 2,
                                                        -0.5 * ((z[:, 0] + 2) / 0.6) ** 2)


def _w1(z):
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def _u_wave(z):
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2


def _u_two_waves(z):
    w2 = 3 * torch.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)
    return -torch.logaddexp(-0.5 * ((z[:, 1] - _w1(z)) / 0.35) ** 2,
                            -0.5 * ((z[:, 1] - _w1(z) + w2) / 0.35) ** 2)


def _u_step_wave(z):
    w3 = 3 * torch.sigmoid((z[:, 0] - 1) / 0.3)
    return -torch.logaddexp(-0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2,
                            -0.5 * ((z[:, 1] - _w1(z) + w3) / 0.35) ** 2)


ENERGIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ring": _u_ring,
    "wave": _u_wave,
    "two_waves": _u_two_waves,
    "step_wave": _u_step_wave,
}

NORMALISABLE = frozenset({"ring"})  # the energies whose exp(−U) integrates to a finite Z as published


def _check_envelope(envelope: float | None) -> float | None:
    if envelope is None:
        return None
    if not isinstance(envelope, (int, float)) or not math.isfinite(envelope) or envelope <= 0:
        raise ValueError(f"envelope should be a positive width (or None), got {envelope!r}.")
    return float(envelope)


def energy(name: str, *, envelope: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One of the four 2-D energies U of Rezende & Mohamed (2015): π(z) ∝ exp(−U(z)).

    Returns a function mapping points (N, 2) to energies (N,). The targets are
    known only up to their normalising constant, the setting of reverse-KL
    fitting, where samples of π are not available.

    Only ``"ring"`` is normalisable as published (``NORMALISABLE``); the three
    waves are periodic in z₁ and ∫ exp(−U) over the plane is infinite, so they
    define no distribution and KL(q ‖ π) is undefined for them. ``envelope=s``
    returns U(z) + z₁²/(2s²) instead: a Gaussian envelope of width s along z₁
    that makes every energy normalisable (see :func:`log_normalizer`).
    """
    check_choice(name, "name", tuple(ENERGIES))
    envelope = _check_envelope(envelope)
    fn = ENERGIES[name]

    def u(z: torch.Tensor) -> torch.Tensor:
        z = check_tensor(z, "z", shape=(None, 2), kind="float")
        if envelope is None:
            return fn(z)
        return fn(z) + 0.5 * (z[:, 0] / envelope) ** 2

    return u


def log_normalizer(name: str, *, envelope: float | None = None) -> float:
    """log Z = log ∫ exp(−U(z)) dz of ``energy(name, envelope=envelope)``, in closed form.

    Known exactly for the waves with an envelope of width s: their integral
    over z₂ is a constant c at every z₁, so Z = c·√(2π)·s. Raises ValueError
    for an energy that is not normalisable (Z = ∞), and NotImplementedError for
    the ring, whose Z has no closed form (integrate it numerically).
    """
    check_choice(name, "name", tuple(ENERGIES))
    envelope = _check_envelope(envelope)
    if name == "ring":
        raise NotImplementedError("the ring's normalising constant has no closed form: integrate exp(−U) "
                                  "numerically on a box that holds its mass (|z| ≲ 4).")
    if envelope is None:
        raise ValueError(f"the {name!r} energy is not normalisable (∫ exp(−U) = ∞, it is periodic in z₁): "
                         "pass envelope=s to confine z₁.")
    return math.log(_RIDGE_MASS[name] * math.sqrt(2 * math.pi) * envelope)
