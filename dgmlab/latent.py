"""Latent variable models whose posterior is exact (Chapter 5).

A latent variable model draws a hidden z, then the object x given z:

    p(x) = ∫ p(x | z) p(z) dz.

For any distribution q(z | x), Jensen's inequality gives the evidence lower bound

    ELBO(q) = E_q[log p(x, z) − log q(z | x)] ≤ log p(x),

and the gap is exactly a KL divergence to the true posterior (claim C20):

    log p(x) = ELBO(q) + KL(q(z | x) ‖ p(z | x)).

The models here have a tractable posterior, so every term can be computed exactly:

* :class:`LinearGaussian` -- probabilistic PCA (Tipping & Bishop 1999): a Gaussian
  marginal, a Gaussian posterior, and maximum likelihood in closed form.
* :class:`GaussianMixture` -- K diagonal Gaussians, the latent is the component;
  EM is coordinate ascent on the ELBO (:meth:`GaussianMixture.fit_em`).
* :func:`grid_posterior` -- log p(x) and p(z | x) by quadrature for any model with a
  1- or 2-D latent: the ground truth for models whose posterior has no closed form.
* :class:`BimodalToy` -- z ~ N(0, 1), x | z ~ N(z², s²): a posterior with two modes, which
  the best single Gaussian (:func:`fit_gaussian_posterior`) cannot fit.

Latents are batched like the data: z of shape (..., N, d) goes with x of shape (N, D),
leading axes (Monte-Carlo samples, grid points) broadcasting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from .base import GenerativeModel
from .validate import as_tensor, check_positive_int, check_probabilities, check_tensor

__all__ = [
    "LinearGaussian", "GaussianMixture", "EMHistory", "VAR_FLOOR",
    "GridPosterior", "grid_posterior", "log_marginal_by_quadrature",
    "BimodalToy", "fit_gaussian_posterior",
]

LOG_2PI = math.log(2 * math.pi)
VAR_FLOOR = 1e-6  # the smallest variance EM gives a mixture component (a component on one point has σ² = 0)


def _std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last axis."""
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def _check_latent(z, n: int, d: int) -> torch.Tensor:
    z = as_tensor(z, "z")
    if z.dim() < 2 or z.shape[-1] != d or z.shape[-2] not in (1, n):
        raise ValueError(f"z should have shape (..., N, {d}) with N = {n} objects (or (..., 1, {d}) "
                         f"for one z shared by all of them), got {tuple(z.shape)}.")
    return z


def _gaussian_moments(q: Distribution, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (N, d) and covariance (N, d, d) of a Gaussian q(z | x), one per object."""
    base = q.base_dist if isinstance(q, Independent) and q.reinterpreted_batch_ndims == 1 else q
    if isinstance(base, MultivariateNormal):
        m, S = base.loc, base.covariance_matrix
    elif isinstance(base, Normal):
        m, S = base.loc, torch.diag_embed(base.scale**2)
    else:
        raise TypeError("q should be a torch.distributions MultivariateNormal with batch shape (N,), or a "
                        f"Normal (or Independent(Normal, 1)) with loc of shape (N, d); got {type(q).__name__}.")
    if m.shape[-1] != d or m.shape[:-1] not in ((n,), (1,), ()):
        raise ValueError(f"q should describe N = {n} latents of size d = {d}: its mean has shape {tuple(m.shape)}.")
    return m.expand(n, d), S.expand(n, d, d)


def _log_q(q: Distribution, z: torch.Tensor) -> torch.Tensor:
    """log q(z | x) summed over the latent's coordinates: (..., N, d) → (..., N)."""
    log_q = q.log_prob(z)
    return log_q.sum(-1) if isinstance(q, Normal) else log_q


# ================================================================= probabilistic PCA
class LinearGaussian(GenerativeModel):
    """Probabilistic PCA: z ~ N(0, I_d), x | z ~ N(W z + μ, σ² I_D).

    Integrating z out gives the marginal p(x) = N(x; μ, C) with C = W Wᵀ + σ² I_D, and
    Bayes' rule the posterior p(z | x) = N(M⁻¹ Wᵀ (x − μ), σ² M⁻¹) with M = Wᵀ W + σ² I_d.
    Parameters: W (D, d), μ (D,) and log σ; :meth:`fit` sets them to the maximum-likelihood
    values in closed form. W starts random (``seed``): W = 0 is a saddle of the likelihood.
    Everything is computed in the model's dtype (``.double()`` for exact comparisons).
    """

    has_rsample = True

    def __init__(self, dim: int, latent_dim: int, *, seed: int = 0):
        super().__init__(check_positive_int(dim, "dim"))
        self.dim, self.latent_dim = dim, check_positive_int(latent_dim, "latent_dim")
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(dim, latent_dim, generator=g) / math.sqrt(latent_dim))
        self.mu = nn.Parameter(torch.zeros(dim))
        self.log_sigma = nn.Parameter(torch.zeros(()))

    @property
    def sigma2(self) -> torch.Tensor:
        """The noise variance σ²."""
        return (2 * self.log_sigma).exp()

    @property
    def covariance(self) -> torch.Tensor:
        """The marginal covariance C = W Wᵀ + σ² I_D."""
        return self.W @ self.W.T + self.sigma2 * torch.eye(self.dim, dtype=self.W.dtype, device=self.W.device)

    def _cholesky_M(self) -> torch.Tensor:
        """Cholesky factor L (L Lᵀ = M) of the d×d matrix M = Wᵀ W + σ² I_d."""
        eye = torch.eye(self.latent_dim, dtype=self.W.dtype, device=self.W.device)
        return torch.linalg.cholesky(self.W.T @ self.W + self.sigma2 * eye)

    def _x(self, x, context=None) -> torch.Tensor:
        return self.check_input(x, context)[0].to(self.W.dtype)

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Exact log N(x; μ, C), through the d×d matrix M instead of the D×D matrix C:

        C⁻¹ = (I − W M⁻¹ Wᵀ) / σ²  (Woodbury),   log det C = (D − d) log σ² + log det M.
        """
        r = self._x(x, context) - self.mu
        L = self._cholesky_M()
        u = torch.linalg.solve_triangular(L, (r @ self.W).T, upper=False).T  # ‖u‖² = rᵀ W M⁻¹ Wᵀ r
        mahalanobis = ((r**2).sum(1) - (u**2).sum(1)) / self.sigma2  # rᵀ C⁻¹ r
        log_det_C = (self.dim - self.latent_dim) * self.sigma2.log() + 2 * L.diagonal().log().sum()
        return -0.5 * (self.dim * LOG_2PI + log_det_C + mahalanobis)

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """The exact posterior p(z | x) = N(M⁻¹ Wᵀ (x − μ), σ² M⁻¹): batch shape (N,)."""
        r = self._x(x) - self.mu
        M_inv = torch.cholesky_inverse(self._cholesky_M())
        mean = r @ self.W @ M_inv  # row n is (M⁻¹ Wᵀ r_n)ᵀ, M⁻¹ being symmetric
        return MultivariateNormal(mean, covariance_matrix=(self.sigma2 * M_inv).expand(len(r), -1, -1))

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log N(x; W z + μ, σ² I) + log N(z; 0, I): z (..., N, d) → (..., N)."""
        x = self._x(x)
        z = _check_latent(z, len(x), self.latent_dim).to(self.W.dtype)
        r = x - z @ self.W.T - self.mu
        log_likelihood = -0.5 * ((r**2).sum(-1) / self.sigma2 + self.dim * (LOG_2PI + self.sigma2.log()))
        return log_likelihood + _std_normal_log_prob(z)

    def elbo(self, x: torch.Tensor, q: Distribution) -> torch.Tensor:
        """The exact ELBO of any Gaussian q(z | x) = N(m, S), one per object: shape (N,).

        ELBO = E_q[log p(x | z)] − KL(q ‖ p(z)), both in closed form since log p(x | z) is
        quadratic in z:
        E_q[log p(x | z)] = −D/2 log(2πσ²) − (‖x − W m − μ‖² + tr(Wᵀ W S)) / (2σ²),
        KL(q ‖ N(0, I)) = ½ (tr S + ‖m‖² − d − log det S).
        ``q`` is a MultivariateNormal with batch (N,), or a Normal with loc (N, d).
        """
        x = self._x(x)
        m, S = _gaussian_moments(q, len(x), self.latent_dim)
        r = x - m @ self.W.T - self.mu
        trace_WtWS = (self.W.T @ self.W * S).sum((-2, -1))  # tr(AS) = Σ A_ij S_ij for symmetric S
        reconstruction = -0.5 * (self.dim * (LOG_2PI + self.sigma2.log())
                                 + ((r**2).sum(-1) + trace_WtWS) / self.sigma2)
        kl = 0.5 * (S.diagonal(dim1=-2, dim2=-1).sum(-1) + (m**2).sum(-1) - self.latent_dim - torch.logdet(S))
        return reconstruction - kl

    def elbo_mc(self, x: torch.Tensor, q: Distribution, samples: int = 1) -> torch.Tensor:
        """Unbiased Monte-Carlo ELBO, (1/S) Σ_s [log p(x, z_s) − log q(z_s | x)] with z_s ~ q
        reparameterised (differentiable in q's parameters): shape (N,). Uses the global RNG."""
        z = q.rsample((check_positive_int(samples, "samples"),))
        return (self.log_joint(x, z) - _log_q(q, z)).mean(0)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "LinearGaussian":
        """Maximum likelihood in closed form (Tipping & Bishop 1999), computed in float64.

        μ = the data mean; with the (divide-by-N) sample covariance S = U Λ Uᵀ, eigenvalues
        λ₁ ≥ … ≥ λ_D: σ² = the mean of the D − d smallest (the variance PCA throws away)
        and W = U_d (Λ_d − σ² I)^½. Any W R with R orthogonal is as good: p(x) sees only W Wᵀ.
        """
        x = check_tensor(x, "x", shape=(None, self.dim), kind="float", finite=True).double()
        if self.latent_dim >= self.dim or len(x) < 2:
            raise ValueError(f"fit needs latent_dim < dim and at least 2 points (got d = {self.latent_dim}, "
                             f"D = {self.dim}, N = {len(x)}): with d ≥ D the noise variance σ² would be 0.")
        mu = x.mean(0)
        S = (x - mu).T @ (x - mu) / len(x)
        lam, U = torch.linalg.eigh(S)
        lam, U = lam.flip(0), U.flip(1)  # largest eigenvalue first
        sigma2 = lam[self.latent_dim:].mean()
        if sigma2 <= 1e-12 * lam[0]:
            raise ValueError(f"the data lie in a {self.latent_dim}-dimensional subspace, so σ² = 0 and the "
                             "likelihood is unbounded: add noise to x or lower latent_dim.")
        self.W.copy_(U[:, :self.latent_dim] * (lam[:self.latent_dim] - sigma2).clamp_min(0).sqrt())
        self.mu.copy_(mu)
        self.log_sigma.copy_(0.5 * sigma2.log())
        return self

    def rsample(self, n: int, context=None) -> torch.Tensor:
        """x = W z + μ + σ ε with z ~ N(0, I_d), ε ~ N(0, I_D): differentiable in W, μ and σ."""
        self.check_sample_args(n, context)
        z = torch.randn(n, self.latent_dim, dtype=self.W.dtype, device=self.W.device)
        eps = torch.randn(n, self.dim, dtype=self.W.dtype, device=self.W.device)
        return z @ self.W.T + self.mu + self.log_sigma.exp() * eps


# ================================================================= a mixture fitted by EM
class EMHistory(NamedTuple):
    """What each EM step did, in nats per object (means over the data), for T steps:

    ``log_likelihood`` (T + 1,): log p(x | θ_t) before step t, and after the last one;
    ``elbo_after_e`` (T,): ELBO(r_t, θ_t) with r_t the exact posterior: equals log p(x | θ_t);
    ``elbo_after_m`` (T,): ELBO(r_t, θ_{t+1}), between log p(x | θ_t) and log p(x | θ_{t+1}).
    """

    log_likelihood: torch.Tensor
    elbo_after_e: torch.Tensor
    elbo_after_m: torch.Tensor


class GaussianMixture(GenerativeModel):
    """p(x) = Σ_k π_k N(x; μ_k, diag σ_k²); the latent z ∈ {0, …, K − 1} picks the component.

    The posterior is the table of responsibilities r_nk = p(z = k | x_n) = π_k N(x_n; μ_k, σ_k²) / p(x_n).
    Parameters: the logits of π (K,), the means μ (K, D) and log σ (K, D).
    """

    def __init__(self, dim: int, components: int, *, seed: int = 0):
        super().__init__(check_positive_int(dim, "dim"))
        self.dim, self.components = dim, check_positive_int(components, "components")
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.randn(components, dim, generator=g))
        self.log_std = nn.Parameter(torch.zeros(components, dim))

    @property
    def log_weights(self) -> torch.Tensor:
        """log π_k, shape (K,)."""
        return torch.log_softmax(self.logits, 0)

    def _log_joint(self, x: torch.Tensor) -> torch.Tensor:
        z = (x[:, None, :] - self.means) / self.log_std.exp()
        log_normal = -0.5 * (z**2).sum(-1) - self.log_std.sum(-1) - 0.5 * self.dim * LOG_2PI
        return self.log_weights + log_normal

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z = k) = log π_k + log N(x; μ_k, diag σ_k²) for every k: shape (N, K)."""
        return self._log_joint(self.check_input(x)[0])

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Exact log p(x) = log Σ_k p(x, z = k) (a logsumexp): shape (N,)."""
        return torch.logsumexp(self._log_joint(self.check_input(x, context)[0]), 1)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """The responsibilities p(z = k | x) (N, K) by Bayes' rule: rows sum to 1."""
        return torch.softmax(self.log_joint(x), 1)

    def elbo(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The ELBO of any responsibilities r (N, K), rows on the simplex: shape (N,).

        ELBO(r) = Σ_k r_k [log π_k + log N(x; μ_k, σ_k²)] + H(r),   H(r) = −Σ_k r_k log r_k.
        """
        log_joint = self.log_joint(x)
        r = check_probabilities(check_tensor(r, "r", shape=tuple(log_joint.shape), kind="float"), "r", dim=1)
        entropy = -torch.special.xlogy(r, r).sum(1)  # 0 log 0 = 0
        return (r * log_joint).sum(1) + entropy

    # -- EM: coordinate ascent on the ELBO ---------------------------------------------
    @torch.no_grad()
    def e_step(self, x: torch.Tensor) -> torch.Tensor:
        """r = p(z | x, θ): the q that makes the bound touch log p(x | θ) (the KL gap is 0)."""
        return self.posterior(x)

    @torch.no_grad()
    def m_step(self, x: torch.Tensor, r: torch.Tensor, *, var_floor: float = VAR_FLOOR) -> None:
        """θ ← argmax_θ ELBO(r, θ), r held fixed, subject to σ² ≥ ``var_floor``:

        N_k = Σ_n r_nk,  π_k = N_k / N,  μ_k = Σ_n r_nk x_n / N_k,  σ_k² = Σ_n r_nk (x_n − μ_k)² / N_k.
        N_k gets 10 machine epsilons (as in scikit-learn), so an empty component stays finite.
        """
        x = self.check_input(x)[0]
        r = check_tensor(r, "r", shape=(len(x), self.components), kind="float")
        Nk = r.sum(0) + 10 * torch.finfo(r.dtype).eps
        mu = r.T @ x / Nk[:, None]
        var = (r[:, :, None] * (x[:, None, :] - mu) ** 2).sum(0) / Nk[:, None]
        self.logits.copy_((Nk / Nk.sum()).log())
        self.means.copy_(mu)
        self.log_std.copy_(0.5 * var.clamp_min(var_floor).log())

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, *, seed: int = 0, var_floor: float = VAR_FLOOR) -> "GaussianMixture":
        """k-means++ seeding (``seed``): the first mean a random data point, each next one a point drawn
        with probability ∝ its squared distance to the nearest mean so far; equal weights, and every
        component the variance of the whole data set."""
        x = self.check_input(x)[0]
        if len(x) < self.components:
            raise ValueError(f"{self.components} components need at least as many points, got {len(x)}.")
        g = torch.Generator().manual_seed(seed)
        centres = [x[torch.randint(len(x), (1,), generator=g)]]
        for _ in range(self.components - 1):
            d2 = torch.cdist(x, torch.cat(centres)).min(1).values ** 2
            if not d2.sum() > 0:
                raise ValueError(f"x has fewer distinct points than the {self.components} components.")
            centres.append(x[torch.multinomial(d2.cpu().double(), 1, generator=g)])
        self.logits.zero_()
        self.means.copy_(torch.cat(centres))
        self.log_std.copy_(0.5 * x.var(0, unbiased=False).clamp_min(var_floor).log().expand(self.components, -1))
        return self

    @torch.no_grad()
    def fit_em(self, x: torch.Tensor, steps: int = 50, *, seed: int = 0, var_floor: float = VAR_FLOOR,
               initialise: bool = True) -> EMHistory:
        """Run ``steps`` EM steps (after k-means++ seeding unless ``initialise=False``).

        Each step is coordinate ascent on the ELBO: the E-step closes the gap (ELBO = log p(x | θ_t)),
        the M-step raises the bound, and log p(x | θ_{t+1}) ≥ that raised bound. So the
        log-likelihood never falls: the staircase recorded in the returned :class:`EMHistory`.
        """
        check_positive_int(steps, "steps")
        if initialise:
            self.initialise(x, seed=seed, var_floor=var_floor)
        log_likelihood, after_e, after_m = [], [], []
        for _ in range(steps):
            log_likelihood.append(self.log_prob(x).mean())
            r = self.e_step(x)
            after_e.append(self.elbo(x, r).mean())
            self.m_step(x, r, var_floor=var_floor)
            after_m.append(self.elbo(x, r).mean())
        log_likelihood.append(self.log_prob(x).mean())
        return EMHistory(*(torch.stack(t) for t in (log_likelihood, after_e, after_m)))

    @torch.no_grad()
    def sample(self, n: int, context=None, *, return_latent: bool = False):
        """Draw z ~ Cat(π), then x ~ N(μ_z, σ_z²): x (n, D), and z (n,) if ``return_latent``."""
        self.check_sample_args(n, context)
        z = torch.multinomial(self.log_weights.exp(), n, replacement=True)
        x = self.means[z] + self.log_std[z].exp() * torch.randn(n, self.dim, dtype=self.means.dtype,
                                                                 device=self.means.device)
        return (x, z) if return_latent else x


# ================================================================= posteriors by quadrature
class GridPosterior(NamedTuple):
    """p(z | x) on a regular grid, for N objects x at once.

    ``z`` (G, d) the grid points; ``log_density`` (N, G) log p(z | x) there; ``log_marginal`` (N,)
    log p(x); ``cell`` the volume of one grid cell; ``axes`` the d coordinate axes (each (n,)):
    a 2-D posterior reshapes to (N, n, n), first axis z₁.
    """

    z: torch.Tensor
    log_density: torch.Tensor
    log_marginal: torch.Tensor
    cell: float
    axes: tuple[torch.Tensor, ...]

    @property
    def probabilities(self) -> torch.Tensor:
        """The posterior mass of each grid cell, p(z | x)·cell (N, G): rows sum to 1."""
        return self.log_density.exp() * self.cell

    def kl_from(self, q: Distribution) -> torch.Tensor:
        """KL(q(z | x) ‖ p(z | x)) by quadrature on the grid, shape (N,); q as in
        :meth:`LinearGaussian.elbo`, and well inside the grid."""
        log_q = _log_q(q, self.z[:, None, :].to(self.log_density.dtype)).T  # (N, G)
        q_mass = log_q.exp() * self.cell
        return torch.where(q_mass > 0, q_mass * (log_q - self.log_density), 0.0).sum(1)  # Σ_g q (log q − log p)


def grid_posterior(log_joint: Callable, x: torch.Tensor, *, dim: int = 1, lo: float = -6.0, hi: float = 6.0,
                   n: int | None = None, chunk: int = 4096) -> GridPosterior:
    """log p(x) and the posterior p(z | x) of a model with a 1- or 2-D latent, by quadrature.

    ``log_joint(x, z)`` returns log p(x, z) for z of shape (G, 1, d), shape (G, N) (the methods
    ``log_joint`` of this module fit). On the grid of n points per axis on [lo, hi]^d, spacing h:

        log p(x) ≈ log Σ_g p(x, z_g) + d log h,     p(z_g | x) = p(x, z_g) / p(x).

    The error is the posterior mass outside the box, plus a discretisation error that, for a
    smooth posterior vanishing at the edges, falls faster than any power of h (the trapezoid
    rule): with the box a few posterior standard deviations wide and h well below the
    posterior's width, log p(x) is exact to ~1e-10. Defaults n = 2001 (d = 1), 401 (d = 2).
    The grid takes x's dtype; ``chunk`` grid points are evaluated at a time.
    """
    if dim not in (1, 2):
        raise ValueError(f"quadrature is for a latent of dimension 1 or 2, got dim = {dim}.")
    if not hi > lo:
        raise ValueError(f"the grid needs lo < hi, got [{lo}, {hi}].")
    x = check_tensor(x, "x", kind="float")
    n = check_positive_int(n if n is not None else (2001 if dim == 1 else 401), "n")
    axis = torch.linspace(lo, hi, n, dtype=x.dtype, device=x.device)
    z = torch.cartesian_prod(axis, axis) if dim == 2 else axis[:, None]
    lj = torch.cat([log_joint(x, zc[:, None, :]) for zc in z.split(chunk)]).T  # (N, G)
    log_cell = dim * math.log((hi - lo) / (n - 1))
    log_marginal = torch.logsumexp(lj, 1) + log_cell
    return GridPosterior(z, lj - log_marginal[:, None], log_marginal, math.exp(log_cell), (axis,) * dim)


def log_marginal_by_quadrature(log_joint: Callable, x: torch.Tensor, **grid) -> torch.Tensor:
    """log p(x) = log ∫ p(x, z) dz by quadrature, shape (N,): :func:`grid_posterior`'s log_marginal."""
    return grid_posterior(log_joint, x, **grid).log_marginal


# ================================================================= a bimodal posterior
class BimodalToy:
    """z ~ N(0, 1), x | z ~ N(z², s²): the sign of z is lost, so for x well above s the posterior
    p(z | x) has two symmetric modes near ±√x, and no single Gaussian q(z | x) can match it.

    x has shape (N, 1) and z (..., N, 1). ``noise_std`` is s.
    """

    def __init__(self, noise_std: float = 0.5):
        if not noise_std > 0:
            raise ValueError(f"noise_std should be positive, got {noise_std}.")
        self.s = float(noise_std)

    def _x(self, x) -> torch.Tensor:
        return check_tensor(x, "x", shape=(None, 1), kind="float")

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log N(x; z², s²) + log N(z; 0, 1): shape (..., N)."""
        x = self._x(x)
        z = _check_latent(z, len(x), 1)
        return Normal(z**2, self.s).log_prob(x).sum(-1) + _std_normal_log_prob(z)

    def sample(self, n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs (x, z), each of shape (n, 1), from a generator seeded with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(check_positive_int(n, "n"), 1, generator=g)
        return z**2 + self.s * torch.randn(n, 1, generator=g), z

    def posterior(self, x: torch.Tensor, *, lo: float = -5.0, hi: float = 5.0, n: int = 4001) -> GridPosterior:
        """The exact posterior and log p(x), by quadrature (:func:`grid_posterior`)."""
        return grid_posterior(self.log_joint, self._x(x), lo=lo, hi=hi, n=n)

    def elbo(self, x: torch.Tensor, q: Normal) -> torch.Tensor:
        """The exact ELBO of a Gaussian q = N(m, v) with loc (N, 1), from its moments
        E z² = m² + v and E z⁴ = m⁴ + 6 m² v + 3 v²:

        ELBO = −½ log(2πs²) − (x² − 2x E z² + E z⁴)/(2s²) − ½ log 2π − ½ E z² + ½ log(2πe v).
        """
        x = self._x(x)
        m, S = _gaussian_moments(q, len(x), 1)
        m, v, x = m[:, 0], S[:, 0, 0], x[:, 0]
        z2, z4 = m**2 + v, m**4 + 6 * m**2 * v + 3 * v**2
        expected_log_likelihood = -0.5 * LOG_2PI - math.log(self.s) - (x**2 - 2 * x * z2 + z4) / (2 * self.s**2)
        expected_log_prior = -0.5 * LOG_2PI - 0.5 * z2
        entropy = 0.5 * torch.log(2 * math.pi * math.e * v)
        return expected_log_likelihood + expected_log_prior + entropy

    def unimodal_gap(self, x: torch.Tensor, **fit) -> tuple[Normal, torch.Tensor]:
        """The best Gaussian q(z | x) (:func:`fit_gaussian_posterior`, keywords ``fit``) and its gap
        log p(x) − ELBO(q) = KL(q ‖ p(z | x)) > 0, shape (N,): log p by quadrature, the ELBO exact."""
        x = self._x(x)
        q = fit_gaussian_posterior(self.log_joint, x, **fit)
        return q, self.posterior(x).log_marginal - self.elbo(x, q)


def fit_gaussian_posterior(log_joint: Callable, x: torch.Tensor, *, dim: int = 1, steps: int = 500,
                           lr: float = 0.05, samples: int = 64, seed: int = 0) -> Normal:
    """The diagonal Gaussian q(z | x) = N(m, diag s²) that maximises the ELBO, one per object.

    Maximising ELBO(q) = log p(x) − KL(q ‖ p(z | x)) is fitting q by reverse KL, which seeks one
    mode. Adam on the reparameterised estimate (1/S) Σ_s [log p(x, m + s ε_s) − log q(m + s ε_s)],
    ε_s ~ N(0, I), ``samples`` draws per step, the last fifth of the steps at a tenth of ``lr``
    to settle the noise; the start m ~ N(0, I), s = 1 and the noise come from ``seed``.
    ``log_joint(x, z)`` takes z of shape (S, N, d). Returns a Normal with loc (N, d), detached.
    """
    x = check_tensor(x, "x", kind="float")
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(len(x), dim, generator=g, dtype=x.dtype).requires_grad_()
    log_s = torch.zeros(len(x), dim, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=lr)
    for step in range(check_positive_int(steps, "steps")):
        if step == steps - steps // 5:
            opt.param_groups[0]["lr"] = lr / 10
        z = m + log_s.exp() * torch.randn(samples, len(x), dim, generator=g, dtype=x.dtype)
        elbo = (log_joint(x, z) - Normal(m, log_s.exp()).log_prob(z).sum(-1)).mean(0)
        opt.zero_grad()
        (-elbo.sum()).backward()
        opt.step()
    return Normal(m.detach(), log_s.exp().detach())
