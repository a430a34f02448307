"""The course's tricks of probability, each one checkable by Monte Carlo (claim C5).

* Monte-Carlo estimation: E_p f(x) ≈ (1/n) Σ f(x_i), with an error that shrinks
  like 1/√n (:func:`mc_estimate`, :func:`mc_error_curve`).
* LOTUS: E_{p(y)} g(y) = E_{p(x)} g(f(x)) for y = f(x) — no need for p(y).
* Jensen: E f(x) ≥ f(E x) for convex f (:func:`jensen_gap`).
* The log-derivative (score-function) trick: ∇_θ E_{p_θ} f(x) = E_{p_θ}[f(x) ∇_θ log p_θ(x)]
  (:func:`score_function_gradient`).
* The chain rule: p(x₁, …, x_m) = Π_j p(x_j | x_<j), for any order of the
  variables (:func:`chain_rule_factors`, :func:`joint_from_factors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .validate import check_positive_int, check_probabilities, check_tensor

__all__ = [
    "MCEstimate",
    "mc_estimate",
    "mc_error_curve",
    "jensen_gap",
    "score_function_gradient",
    "chain_rule_factors",
    "joint_from_factors",
]


class MCEstimate(NamedTuple):
    """A Monte-Carlo mean with its standard error s/√n."""

    mean: float
    stderr: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.stderr:.4f} (n = {self.n:,})"


def mc_estimate(values: torch.Tensor) -> MCEstimate:
    """Mean of the samples ``values`` (n,) of f(x_i), x_i ~ p, and its standard error."""
    values = check_tensor(values, "values", ndim=1, kind="float")
    n = values.numel()
    if n < 2:
        raise ValueError("a Monte-Carlo estimate with an error bar needs at least 2 samples.")
    v = values.double()
    return MCEstimate(v.mean().item(), (v.std(unbiased=True) / math.sqrt(n)).item(), n)


def mc_error_curve(
    sampler: Callable[[int, torch.Generator], torch.Tensor],
    f: Callable[[torch.Tensor], torch.Tensor],
    true_value: float,
    sizes: Sequence[int],
    *,
    repeats: int = 200,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Root-mean-square error of the MC estimate for each sample size, and the fitted log-log slope.

    ``sampler(n, generator)`` draws n points; the estimate of E f(x) is repeated
    ``repeats`` times per size. Returns ``(sizes, rmse, slope)``: the slope of
    log rmse against log n, which is −1/2 for an estimator with finite variance.
    """
    check_positive_int(repeats, "repeats")
    g = torch.Generator().manual_seed(seed)
    ns = torch.tensor([check_positive_int(int(n), "size") for n in sizes], dtype=torch.float64)
    rmse = []
    for n in ns.long().tolist():
        values = f(sampler(n * repeats, g)).double()  # f(x_i), one value per draw
        estimates = values.reshape(repeats, n).mean(1)
        rmse.append(((estimates - true_value) ** 2).mean().sqrt())
    rmse = torch.stack(rmse)
    design = torch.stack([torch.ones_like(ns), ns.log()], dim=1)
    coef = torch.linalg.lstsq(design, rmse.log()[:, None]).solution
    return ns, rmse, coef[1, 0].item()


def jensen_gap(f: Callable[[torch.Tensor], torch.Tensor], samples: torch.Tensor) -> float:
    """E f(x) − f(E x) estimated from scalar ``samples`` (n,): ≥ 0 for convex f (Jensen).

    ``f`` acts elementwise. On the empirical distribution the inequality holds
    exactly, so the estimate is never negative for a convex f.
    """
    samples = check_tensor(samples, "samples", ndim=1, kind="float").double()
    return (f(samples).mean() - f(samples.mean())).item()


def score_function_gradient(
    dist_fn: Callable[[torch.Tensor], torch.distributions.Distribution],
    f: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    n: int,
    *,
    batches: int = 50,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-function estimate of ∇_θ E_{p_θ} f(x) and its standard error (both shaped like θ).

    Uses ∇_θ p_θ = p_θ ∇_θ log p_θ (the log-derivative trick): the gradient is
    the average of f(x_i) ∇_θ log p_θ(x_i) over samples x_i ~ p_θ, so neither f
    nor the sampler needs to be differentiable. ``dist_fn(theta)`` builds p_θ;
    ``f`` maps a batch of samples to one value each. The error bar comes from
    the spread of ``batches`` independent batch means.
    """
    check_positive_int(n, "n")
    check_positive_int(batches, "batches")
    if n < 2 * batches:
        raise ValueError(f"n = {n} is too small for {batches} batches; use n ≥ {2 * batches}.")
    theta = theta.detach().clone().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        x = dist_fn(theta).sample((n,))
        fx = f(x).double()
    if fx.shape != (n,):
        raise ValueError(f"f should return one value per sample, shape ({n},), got {tuple(fx.shape)}.")
    perm = torch.randperm(n, generator=g)
    means = []
    for idx in perm.chunk(batches):
        log_p = dist_fn(theta).log_prob(x[idx]).reshape(len(idx), -1).sum(1)
        # ∇_θ of mean_i f(x_i) log p_θ(x_i), with f(x_i) held fixed: the batch's estimate
        surrogate = (fx[idx].to(log_p.dtype) * log_p).mean()
        means.append(torch.autograd.grad(surrogate, theta)[0].double())
    means = torch.stack(means)
    est = means.mean(0)
    err = means.std(0, unbiased=True) / math.sqrt(batches)
    return est.float(), err.float()


def _check_joint(joint: torch.Tensor) -> torch.Tensor:
    joint = check_tensor(joint, "joint", kind="float")
    if joint.dim() < 1:
        raise ValueError("joint should be a table with one axis per variable.")
    check_probabilities(joint.reshape(-1), "joint (all entries)", atol=1e-6)
    return joint.double()


def chain_rule_factors(joint: torch.Tensor, order: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Split a joint table p(x₁..x_m) (one axis per variable) into conditionals along ``order``.

    Factor j has one axis per variable among ``order[:j+1]`` (in that order) and
    holds p(x_{order[j]} | x_{order[:j]}); it sums to 1 over its last axis. Rows
    whose conditioning event has probability 0 are left uniform.
    """
    joint = _check_joint(joint)
    m = joint.dim()
    order = list(range(m)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(m)):
        raise ValueError(f"order should be a permutation of 0..{m - 1}, got {order}.")
    p = joint.permute(order)  # axes now follow the chosen order
    factors = []
    for j in range(m):
        # marginal of the first j+1 variables (in the chosen order)
        marg = p.sum(dim=tuple(range(j + 1, m))) if j + 1 < m else p
        prefix = marg.sum(dim=-1, keepdim=True)
        k = marg.shape[-1]
        factors.append(torch.where(prefix > 0, marg / prefix.clamp_min(1e-300), 1.0 / k))
    return factors


def joint_from_factors(factors: Sequence[torch.Tensor], order: Sequence[int] | None = None) -> torch.Tensor:
    """Multiply conditionals back into the joint table (inverse of :func:`chain_rule_factors`)."""
    m = len(factors)
    order = list(range(m)) if order is None else [int(i) for i in order]
    joint = factors[0]
    for j in range(1, m):
        joint = joint[..., None] * factors[j]  # p(x_<j) · p(x_j | x_<j)
    return joint.permute(torch.tensor(order).argsort().tolist())
