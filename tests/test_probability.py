"""Claim C5: the course's tricks of probability, each checked by Monte Carlo."""

import itertools
import math

import pytest
import torch

from dgmlab import probability as P


def test_c5_lotus():
    """E_{p(y)}[y²] for y = exp(x), x ~ N(0, 1): by samples of y, by samples of x, and exactly (e²)."""
    g = torch.Generator().manual_seed(0)
    n = 400_000
    y = torch.exp(torch.randn(n, generator=g, dtype=torch.float64))  # y ~ LogNormal(0, 1)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    via_y = P.mc_estimate(y**2)
    via_x = P.mc_estimate(torch.exp(x) ** 2)  # g(f(x)): never needs p(y)
    exact = math.exp(2.0)
    assert abs(via_y.mean - exact) < 4 * via_y.stderr
    assert abs(via_x.mean - exact) < 4 * via_x.stderr


def test_c5_monte_carlo_error_shrinks_like_one_over_root_n():
    sizes = [10, 30, 100, 300, 1000, 3000]
    _, rmse, slope = P.mc_error_curve(lambda n, g: torch.rand(n, generator=g), lambda u: u**2,
                                      1 / 3, sizes, repeats=300, seed=1)
    assert slope == pytest.approx(-0.5, abs=0.06)
    assert (rmse[1:] < rmse[:-1]).all()
    # the error bar is honest: std(u²) = sqrt(1/5 - 1/9) for u ~ U(0, 1)
    sigma = math.sqrt(1 / 5 - 1 / 9)
    assert rmse[-1].item() == pytest.approx(sigma / math.sqrt(3000), rel=0.15)


def test_c5_jensen_inequality():
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        x = torch.randn(100, generator=g) * 2 + 1
        assert P.jensen_gap(torch.exp, x) >= 0  # convex
        assert P.jensen_gap(lambda v: v**2, x) >= 0
        assert P.jensen_gap(lambda v: -torch.log1p(v.abs()), x.abs()) >= -1e-12  # convex on [0, ∞)
        assert P.jensen_gap(lambda v: 3 * v - 1, x) == pytest.approx(0.0, abs=1e-9)  # affine: equality
    u = torch.rand(1000, generator=g) + 0.1
    assert P.jensen_gap(torch.log, u) < 0  # concave: the inequality flips
    # E[x²] − (E x)² is the variance
    x = torch.randn(10_000, generator=g)
    assert P.jensen_gap(lambda v: v**2, x) == pytest.approx(x.double().var(unbiased=False).item(), rel=1e-6)


def test_c5_log_derivative_trick_matches_the_exact_gradient():
    # Gaussian mean: ∇_μ E[‖x‖²] = 2μ
    mu = torch.tensor([0.5, -1.0, 0.2])
    est, err = P.score_function_gradient(lambda m: torch.distributions.Normal(m, 1.0),
                                         lambda x: (x**2).sum(1), mu, 40_000, seed=3)
    assert ((est - 2 * mu).abs() < 4 * err).all()
    assert (err < 0.1).all()
    # Bernoulli logits with a non-differentiable f: compare with autograd through exact enumeration
    logits = torch.tensor([0.3, -0.8])
    configs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)))

    def f(x):
        return (x.sum(-1) == 1).double() * 3.0 + x[..., 0].double()  # a step function of x

    lt = logits.clone().requires_grad_(True)
    dist = torch.distributions.Bernoulli(logits=lt)
    exact_value = (dist.log_prob(configs).sum(1).exp() * f(configs).float()).sum()
    (exact,) = torch.autograd.grad(exact_value, lt)
    est, err = P.score_function_gradient(lambda t: torch.distributions.Bernoulli(logits=t), f, logits, 60_000, seed=4)
    assert ((est - exact).abs() < 4 * err).all()


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_c5_chain_rule_in_every_order(order):
    g = torch.Generator().manual_seed(5)
    joint = torch.rand(2, 3, 4, generator=g, dtype=torch.float64)
    joint /= joint.sum()
    factors = P.chain_rule_factors(joint, order)
    for f in factors:  # each factor is a conditional distribution over its last axis
        assert torch.allclose(f.sum(-1), torch.ones_like(f.sum(-1)))
    assert torch.allclose(P.joint_from_factors(factors, order), joint)
    # Monte Carlo: sampling the conditionals one after another reproduces the joint
    n = 60_000
    draws = [torch.multinomial(factors[0], n, replacement=True, generator=g)]
    for f in factors[1:]:
        probs = f[tuple(draws)]  # (n, k): each sample's conditional given its own prefix
        draws.append(torch.multinomial(probs, 1, generator=g).squeeze(1))
    sample = torch.stack(draws, 1)[:, torch.tensor(order).argsort()]  # back to the original axes
    freq = torch.zeros_like(joint)
    freq.index_put_(tuple(sample.T), torch.ones(n, dtype=torch.float64), accumulate=True)
    freq /= n
    assert (freq - joint).abs().max() < 5 * math.sqrt(joint.max() / n)


def test_tricks_refuse_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        P.chain_rule_factors(torch.ones(2, 2))
    with pytest.raises(ValueError, match="permutation"):
        P.chain_rule_factors(torch.full((2, 2), 0.25), order=[0, 0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        P.mc_estimate(torch.ones(1))
    with pytest.raises(ValueError, match="one value per sample"):
        P.score_function_gradient(lambda t: torch.distributions.Normal(t, 1.0), lambda x: x.repeat(1, 2),
                                  torch.zeros(2), 200)
