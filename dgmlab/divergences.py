"""Divergences between distributions (Chapter 2).

An f-divergence compares π with p through the ratio u = π/p. For a convex
generator f with f(1) = 0, with its edge limits f(0⁺) = lim_{u→0⁺} f(u) and
f'(∞) = lim_{u→∞} f(u)/u (either may be +inf),

    D_f(π ‖ p) = ∫_{p>0} p(x) f(π(x) / p(x)) dx + f'(∞) · π({x : p(x) = 0}),

with the integrand read as p · f(0⁺) where π is 0 (and 0 · inf = 0). When π
puts no mass where p = 0 (π ≪ p) this is E_p f(π/p). D_f ≥ 0 with equality
at π = p, and only there when f is strictly convex at 1 (proof in the
lecture, by a line through (1, 0) below f). The generators of the lecture's
table are in :data:`GENERATORS`, each with its closed form written out
independently, so the two can be checked against each other.

Points where one density vanishes get these limits (:func:`_pointwise`), and
so do points where π/p underflows to 0 or overflows float64 (p subnormal), so
that tiny densities behave like zero ones. An infinite limit makes the
divergence ``inf`` (never NaN): KL(π ‖ p) is infinite as soon as π puts mass
where p has none, and for disjoint supports every D_f is f(0⁺) + f'(∞).

Three ways to evaluate D_f: between discrete distributions
(:func:`f_divergence`), between densities on a grid (:func:`f_divergence_grid`)
and by Monte Carlo from samples with their log-densities
(:func:`mc_f_divergence`, :func:`mc_kl`). Closed-form KL between Gaussians:
:func:`kl_gaussians`, :func:`kl_diag_gaussians`. Fitting a Gaussian to a 1-D
target by forward or reverse KL: :func:`fit_gaussian_1d`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .probability import MCEstimate, mc_estimate
from .validate import check_choice, check_positive_int, check_tensor

__all__ = [
    "FGenerator",
    "GENERATORS",
    "f_generator",
    "f_divergence",
    "closed_form",
    "f_divergence_grid",
    "grid_1d",
    "mc_f_divergence",
    "mc_kl",
    "kl_gaussians",
    "kl_diag_gaussians",
    "entropy_gaussian",
    "fit_gaussian_1d",
]

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class FGenerator:
    """The generator f of an f-divergence (not a sampler, nor a GAN's generator), with its edge limits.

    ``f`` maps ratios u > 0 (a float64 tensor) to f(u); ``f0`` is lim_{u→0⁺} f(u)
    and ``slope_at_infinity`` is lim_{u→∞} f(u)/u (either may be ``inf``).
    ``f_latex`` and ``divergence_latex`` are the two columns of the lecture's table.
    ``offset`` is f(1): 0 for a divergence; the GAN generator has f(1) = −log 4.
    """

    name: str
    title: str
    f: Callable[[torch.Tensor], torch.Tensor]
    f0: float
    slope_at_infinity: float
    f_latex: str
    divergence_latex: str
    offset: float = 0.0

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.f(torch.as_tensor(u, dtype=torch.float64))


GENERATORS: dict[str, FGenerator] = {
    g.name: g
    for g in (
        FGenerator("kl", "Kullback–Leibler", lambda u: torch.special.xlogy(u, u), 0.0, math.inf,
                  r"u \log u", r"\int \pi \log \frac{\pi}{p}"),
        FGenerator("reverse_kl", "reverse KL", lambda u: -torch.log(u), math.inf, 0.0,
                  r"-\log u", r"\int p \log \frac{p}{\pi}"),
        FGenerator("pearson", "Pearson χ²", lambda u: (u - 1) ** 2, 1.0, math.inf,
                  r"(u - 1)^2", r"\int \frac{(\pi - p)^2}{p}"),
        FGenerator("hellinger", "squared Hellinger", lambda u: (torch.sqrt(u) - 1) ** 2, 1.0, 1.0,
                  r"(\sqrt{u} - 1)^2", r"\int (\sqrt{\pi} - \sqrt{p})^2"),
        # The ½ makes D_f the Jensen–Shannon divergence itself; without it (as
        # in some tables) the same formula gives 2·JSD.
        FGenerator("js", "Jensen–Shannon",
                  lambda u: 0.5 * (torch.special.xlogy(u, u) - (u + 1) * torch.log((u + 1) / 2)), LOG2 / 2, LOG2 / 2,
                  r"\tfrac12\left[u \log u - (u + 1) \log \tfrac{u + 1}{2}\right]",
                  r"\tfrac12 \int \pi \log \frac{2\pi}{\pi + p} + p \log \frac{2p}{\pi + p}"),
        # u log u − (u + 1) log(u + 1) rewritten as −u log(1 + 1/u) − log(1 + u): the
        # same f, but without the cancellation that ruins it for large u.
        FGenerator("gan", "GAN", lambda u: -torch.special.xlog1py(u, 1 / u) - torch.log1p(u), 0.0, 0.0,
                  r"u \log u - (u + 1) \log (u + 1)",
                  r"\int \pi \log \frac{2\pi}{\pi + p} + p \log \frac{2p}{\pi + p} - \log 4",
                  offset=-2 * LOG2),
    )
}


def f_generator(name: str | FGenerator) -> FGenerator:
    """Look up a generator by name (``"kl"``, ``"reverse_kl"``, ``"pearson"``, ``"hellinger"``, ``"js"``, ``"gan"``)."""
    if isinstance(name, FGenerator):
        return name
    check_choice(name, "generator", tuple(GENERATORS))
    return GENERATORS[name]


# ----------------------------------------------------------------------------- discrete
def _check_pair(pi, p):
    pi = check_tensor(pi, "pi", kind="float", finite=True).double()
    p = check_tensor(p, "p", kind="float", finite=True).double()
    if pi.shape != p.shape:
        raise ValueError(
            f"pi and p should be distributions over the same outcomes; got shapes "
            f"{tuple(pi.shape)} and {tuple(p.shape)}."
        )
    for name, q in (("pi", pi), ("p", p)):
        if (q < 0).any():
            raise ValueError(f"{name} has negative probabilities (smallest {q.min().item():g}).")
        total = q.sum(-1)
        if not torch.allclose(total, torch.ones_like(total), atol=1e-6, rtol=0):
            raise ValueError(
                f"{name} should sum to 1 over its last axis, but sums to "
                f"{total.flatten()[0].item():.6g}. Normalise it first."
            )
    return pi, p


def _pointwise(g: FGenerator, pi: torch.Tensor,
               p: torch.Tensor) -> torch.Tensor:
    """p · f(π/p) at every point, with the limits where π or p vanish (float64)."""
    both = (p > 0) & (pi > 0)
    ratio = torch.where(both, pi / torch.where(both, p, 1.0), 1.0)
    value = g.f(ratio)
    out = torch.where(both, p * value, torch.zeros_like(p))  # π = p = 0: 0
    # π = 0 < p (or π/p underflows to 0): p · f(0⁺)
    vanishes = (p > 0) & ((pi == 0) | (ratio == 0))
    out = torch.where(vanishes, p * g.f0, out)
    # p = 0 < π (or π/p, or f(π/p), overflows): the limit of p · f(π/p)
    # as p → 0, which is π · lim_{u→∞} f(u)/u (inf · π stays inf, never NaN)
    overflow = both & (ratio > 1) & ~torch.isfinite(value)
    outside = ((p == 0) & (pi > 0)) | overflow
    return torch.where(outside, pi * g.slope_at_infinity, out)


def f_divergence(gen: str | FGenerator, pi, p) -> torch.Tensor:
    """D_f(π ‖ p) = Σ_x p(x) f(π(x)/p(x)) for discrete distributions over the last axis.

    Outcomes where π or p is 0 contribute the definition's edge limits:
    p · f(0⁺) where π = 0, and π · f'(∞) where p = 0.

    ``pi`` and ``p`` have the same shape ``(..., K)``; returns shape ``(...)``
    (float64). Infinite where the divergence is infinite.
    """
    g = f_generator(gen)
    pi, p = _check_pair(pi, p)
    return _pointwise(g, pi, p).sum(-1)


def closed_form(gen: str | FGenerator, pi, p) -> torch.Tensor:
    """The table's closed form of each divergence, written directly in π and p (discrete, last axis).

    Implemented without the generator, so that :func:`f_divergence` can be checked against it.
    """
    g = f_generator(gen)
    pi, p = _check_pair(pi, p)
    m = (pi + p) / 2

    def kl(a, b):  # Σ a log(a/b), with 0 log 0 = 0 and a log(a/0) = inf
        terms = torch.where(a > 0, torch.special.xlogy(a, a) - torch.special.xlogy(a, b), torch.zeros_like(a))
        return terms.sum(-1)

    if g.name == "kl":
        return kl(pi, p)
    if g.name == "reverse_kl":
        return kl(p, pi)
    if g.name == "pearson":
        terms = torch.where(p > 0, (pi - p) ** 2 / torch.where(p > 0, p, 1.0),
                            torch.where(pi > 0, math.inf, 0.0))
        return terms.sum(-1)
    if g.name == "hellinger":
        return ((pi.sqrt() - p.sqrt()) ** 2).sum(-1)
    if g.name == "js":
        return 0.5 * kl(pi, m) + 0.5 * kl(p, m)
    if g.name == "gan":
        return kl(pi, m) + kl(p, m) - 2 * LOG2
    raise ValueError(f"no closed form for {g.name!r}")


# ---------------------------------------------------------------------------- densities
def grid_1d(lo: float, hi: float, n: int = 4001) -> tuple[torch.Tensor, float]:
    """An evenly spaced float64 grid on [lo, hi] and its spacing, for numeric integration."""
    check_positive_int(n, "n")
    if not hi > lo:
        raise ValueError(f"the grid needs lo < hi, got [{lo}, {hi}].")
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    return x, (hi - lo) / (n - 1)


def f_divergence_grid(gen: str | FGenerator, log_pi: torch.Tensor, log_p: torch.Tensor,
                      cell: float) -> torch.Tensor:
    """D_f(π ‖ p) by numeric integration: densities given as log-values on a regular grid.

    ``log_pi`` and ``log_p`` hold log π and log p at the same grid points (any
    shape; ``-inf`` where a density is 0); ``cell`` is the volume of a grid
    cell (the spacing in 1-D, its square in 2-D). Riemann sum in float64.
    Finite log-densities below −700 are raised to −700 (a density of about
    1e−304): such points contribute nothing measurable, whereas letting them
    underflow to an exact 0 could make a finite divergence look infinite.
    """
    g = f_generator(gen)
    log_pi = check_tensor(log_pi, "log_pi", kind="float").double()
    log_p = check_tensor(log_p, "log_p", shape=tuple(log_pi.shape), kind="float").double()
    if cell <= 0:
        raise ValueError(f"cell should be the positive volume of a grid cell, got {cell}.")
    for name, lq in (("log_pi", log_pi), ("log_p", log_p)):
        if torch.isnan(lq).any() or (lq == math.inf).any():
            raise ValueError(f"{name} holds NaN or +inf: pass log-densities, with -inf where the density is 0.")
    log_pi, log_p = (torch.where(torch.isfinite(lq), lq.clamp_min(-700.0), lq) for lq in (log_pi, log_p))
    return _pointwise(g, log_pi.exp(), log_p.exp()).sum() * cell


# ---------------------------------------------------------------------------- Monte Carlo
def mc_f_divergence(gen: str | FGenerator, log_pi: torch.Tensor,
                    log_p: torch.Tensor) -> MCEstimate:
    """Monte-Carlo D_f(π ‖ p) = E_p f(π/p) from samples x_i ~ p: pass log π(x_i) and log p(x_i), shape (n,).

    Where π/p underflows to 0, f(π/p) is read as f(0⁺); where it overflows
    (log π − log p above ~709) and f cannot be evaluated there, as lim_{u→∞} f(u):
    ±inf by the sign of ``slope_at_infinity``, and −inf when that slope is 0
    (such a convex f never increases; reverse KL and GAN tend to −inf). Never NaN.
    """
    g = f_generator(gen)
    log_pi = check_tensor(log_pi, "log_pi", ndim=1, kind="float").double()
    log_p = check_tensor(log_p, "log_p", shape=(len(log_pi),),
                         kind="float").double()
    if not torch.isfinite(log_p).all():
        raise ValueError("log_p must be finite: the samples x_i are drawn "
                         "from p, so p(x_i) > 0.")
    ratio = torch.exp(log_pi - log_p)  # u_i = π(x_i) / p(x_i)
    values = torch.where(ratio > 0, g.f(torch.where(ratio > 0, ratio, 1.0)),
                         torch.full_like(ratio, g.f0))  # f(u_i); f(0⁺) at 0
    if g.slope_at_infinity:  # u_i overflowed: f(u_i) is lim_{u→∞} f(u)
        limit = math.copysign(math.inf, g.slope_at_infinity)
    else:
        limit = -math.inf
    values = torch.where((ratio > 1) & torch.isnan(values), limit, values)
    return _mc_estimate(values)  # mean of the f(u_i), and its standard error


def mc_kl(log_pi: torch.Tensor, log_p: torch.Tensor) -> MCEstimate:
    """Monte-Carlo KL(π ‖ p) = E_π[log π − log p] from samples x_i ~ π (the lower-variance form)."""
    log_pi = check_tensor(log_pi, "log_pi", ndim=1, kind="float").double()
    log_p = check_tensor(log_p, "log_p", shape=(len(log_pi),),
                         kind="float").double()
    if not torch.isfinite(log_pi).all():
        raise ValueError("log_pi must be finite: the samples x_i are drawn "
                         "from π, so π(x_i) > 0.")
    # −inf in log_p (p(x_i) = 0) gives an infinite estimate, as it should
    return _mc_estimate(log_pi - log_p)


def _mc_estimate(values: torch.Tensor) -> MCEstimate:
    """:func:`mc_estimate`, with an infinite error bar (not NaN) when the mean is infinite."""
    est = mc_estimate(values)
    return est._replace(stderr=math.inf) if math.isinf(est.mean) else est


# ---------------------------------------------------------------------------- Gaussians
def kl_gaussians(mu1, cov1, mu2, cov2) -> torch.Tensor:
    """KL(N(μ₁, Σ₁) ‖ N(μ₂, Σ₂)) in closed form; μ (..., d), Σ (..., d, d). Returns (...,).

    ½ [tr(Σ₂⁻¹Σ₁) + (μ₂ − μ₁)ᵀ Σ₂⁻¹ (μ₂ − μ₁) − d + log det Σ₂ − log det Σ₁].
    """
    mu1, mu2 = (check_tensor(m, name, kind="float").double() for m, name in ((mu1, "mu1"), (mu2, "mu2")))
    cov1, cov2 = (check_tensor(c, name, kind="float").double() for c, name in ((cov1, "cov1"), (cov2, "cov2")))
    d = mu1.shape[-1]
    if mu2.shape[-1] != d or cov1.shape[-2:] != (d, d) or cov2.shape[-2:] != (d, d):
        raise ValueError(
            f"means (..., d) and covariances (..., d, d) disagree: {tuple(mu1.shape)}, {tuple(cov1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(cov2.shape)}."
        )
    try:
        L1, L2 = torch.linalg.cholesky(cov1), torch.linalg.cholesky(cov2)
    except RuntimeError as err:
        raise ValueError("the covariances must be symmetric positive definite.") from err
    diff = (mu2 - mu1).unsqueeze(-1)
    trace = torch.cholesky_solve(cov1, L2).diagonal(dim1=-2, dim2=-1).sum(-1)
    maha = (diff.transpose(-1, -2) @ torch.cholesky_solve(diff, L2)).squeeze(-1).squeeze(-1)
    logdet1 = 2 * L1.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logdet2 = 2 * L2.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + maha - d + logdet2 - logdet1)


def kl_diag_gaussians(mu1, var1, mu2, var2) -> torch.Tensor:
    """KL between Gaussians with diagonal covariances (variances ``var``), summed over the last axis."""
    mu1, var1, mu2, var2 = (check_tensor(t, n, kind="float").double()
                            for t, n in ((mu1, "mu1"), (var1, "var1"), (mu2, "mu2"), (var2, "var2")))
    if (var1 <= 0).any() or (var2 <= 0).any():
        raise ValueError("variances must be positive.")
    return 0.5 * (var1 / var2 + (mu1 - mu2) ** 2 / var2 - 1 + torch.log(var2 / var1)).sum(-1)


def entropy_gaussian(cov) -> torch.Tensor:
    """Differential entropy of N(μ, Σ) in nats: ½ log det(2πe Σ)."""
    cov = check_tensor(cov, "cov", kind="float").double()
    d = cov.shape[-1]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + torch.logdet(cov))


# ---------------------------------------------------------------------------- fitting
def fit_gaussian_1d(
    log_target: Callable[[torch.Tensor], torch.Tensor],
    direction: str,
    *,
    lo: float = -10.0,
    hi: float = 10.0,
    n: int = 4001,
    starts: tuple[float, ...] | None = None,
) -> tuple[float, float]:
    """The Gaussian N(μ, σ²) closest to a 1-D target π, by forward or reverse KL.

    ``direction="forward"`` minimises KL(π ‖ q): for Gaussians this is moment
    matching (μ, σ² = the target's mean and variance), computed by integration
    on the grid. ``direction="reverse"`` minimises KL(q ‖ π) = E_q[log q − log π]
    numerically (L-BFGS on (μ, log σ), integrals on the grid), from several
    starting means (``starts``, default: the target's main modes and its mean)
    because the reverse objective can have one local minimum per mode; the best
    is returned. ``log_target`` maps a float64 grid (n,) to log π; it need not be
    normalised (it is normalised on the grid, for both directions).
    """
    check_choice(direction, "direction", ("forward", "reverse"))
    x, dx = grid_1d(lo, hi, n)
    log_pi = log_target(x).double()
    log_pi = log_pi - torch.logsumexp(log_pi, 0) - math.log(dx)  # normalise on the grid
    pi = log_pi.exp()
    mean = (pi * x).sum() * dx
    var = (pi * (x - mean) ** 2).sum() * dx
    if direction == "forward":
        return mean.item(), var.sqrt().item()

    if starts is None:  # local maxima of π, biggest first, plus the mean
        peaks = ((log_pi[1:-1] > log_pi[:-2]) & (log_pi[1:-1] >= log_pi[2:])).nonzero().squeeze(1) + 1
        peaks = peaks[log_pi[peaks].argsort(descending=True)][:4]
        starts = tuple(x[peaks].tolist()) + (mean.item(),)
    fits = [_reverse_kl_fit(x, dx, log_pi, float(m0), var.item()) for m0 in starts]
    value, mu, sigma = min(fits, key=lambda fit: fit[0])  # the first of the best
    return (mu, sigma) if value < math.inf else (mean.item(), var.sqrt().item())


def _reverse_kl_fit(x, dx: float, log_pi: torch.Tensor, m0: float,
                    var: float) -> tuple[float, float, float]:
    """Minimise KL(q ‖ π) over q = N(μ, σ²) from μ = m0 by L-BFGS: (KL, μ, σ)."""
    mu = torch.tensor(m0, dtype=torch.float64, requires_grad=True)
    log_sigma = torch.tensor(0.5 * math.log(max(var, 1e-6)) - 0.5,
                             dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([mu, log_sigma], lr=1.0, max_iter=200,
                            line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def reverse_kl():
        log_q = -0.5 * ((x - mu) / log_sigma.exp()) ** 2
        # q normalised on the grid: a q spilling off the grid must not
        # look cheaper
        log_q = log_q - torch.logsumexp(log_q, 0) - math.log(dx)
        # E_q[log q − log π] as a Riemann sum; where π underflows, cap its
        # log so that the gradient stays finite
        integrand = log_q.exp() * (log_q - log_pi.clamp_min(-700.0))
        return integrand.sum() * dx

    def closure():
        opt.zero_grad()
        loss = reverse_kl()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return reverse_kl().item(), mu.item(), log_sigma.exp().item()
