"""Tests of dgmlab.diffusion (Chapter 9): claims C33–C35, the schedules, shapes and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from dgmlab import diffusion as D

MIX_MEANS = [[-1.0, 0.5], [1.2, -0.3], [0.2, 1.4]]
MIX_STDS = [0.3, 0.5, 0.2]
MIX_WEIGHTS = [0.5, 0.3, 0.2]


def noised_mixture(schedule, t: int) -> MixtureSameFamily:
    """q_t for the mixture, built from torch.distributions: components N(√ᾱ_t m_k, ᾱ_t s_k² + 1 − ᾱ_t)."""
    ab = schedule.alpha_bar[t]
    means, stds = torch.tensor(MIX_MEANS, dtype=torch.float64), torch.tensor(MIX_STDS, dtype=torch.float64)
    scale = (ab * stds**2 + 1 - ab).sqrt()[:, None].expand_as(means)
    return MixtureSameFamily(Categorical(torch.tensor(MIX_WEIGHTS, dtype=torch.float64)),
                             Independent(Normal(ab.sqrt() * means, scale), 1))


def true_score(dist, x):
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(dist.log_prob(x).sum(), x)[0]


# ============================================================================ schedules
@pytest.mark.parametrize("make", [D.linear_schedule, D.cosine_schedule])
def test_schedules_tables_and_properties(make):
    s = make(100)
    assert s.T == 100 and s.beta.dtype == torch.float64 and s.beta.shape == (101,)
    assert s.beta[0] == 0 and s.alpha_bar[0] == 1
    assert torch.allclose(s.alpha, 1 - s.beta)
    assert torch.allclose(s.alpha_bar, torch.cumprod(1 - s.beta, 0))
    assert bool((s.beta[1:] > 0).all() and (s.beta[1:] < 1).all())
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all()), "ᾱ_t should fall with t"
    assert s.alpha_bar[-1] < 1e-3, "q(x_T) should be close to N(0, I)"


def test_linear_and_cosine_schedules_match_their_definitions():
    lin = D.linear_schedule(1000)
    assert torch.allclose(lin.beta[[1, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    cos = D.cosine_schedule(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 250, 500, 900):
        assert cos.alpha_bar[t].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert lin.alpha_bar[500] < cos.alpha_bar[500], "the cosine schedule destroys information more slowly"


def test_schedule_bad_input():
    with pytest.raises(ValueError, match=r"every β_t in \(0, 1\)"):
        D.NoiseSchedule([0.1, 1.2])
    s = D.linear_schedule(10)
    with pytest.raises(ValueError, match=r"t should lie in \[0, 10\]"):
        s.q_sample(torch.zeros(2, 2), 11)
    with pytest.raises(ValueError, match=r"t should lie in \[1, 10\]"):
        s.q_step(torch.zeros(2, 2), 0)
    with pytest.raises(TypeError, match="integer steps"):
        s.q_sample(torch.zeros(2, 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="one step per object"):
        s.q_sample(torch.zeros(2, 2), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="schedule"):
        D.ddpm_mlp(2, schedule="quadratic")


# ============================================================================ C33
@pytest.mark.parametrize("make", [D.linear_schedule, D.cosine_schedule])
def test_c33_chain_of_steps_matches_closed_form_marginal(make):
    """T steps of q(x_t | x_{t−1}) from a fixed x_0 give N(√ᾱ_t x_0, (1 − ᾱ_t) I): mean, variance, KS."""
    s = make(40)
    n = 20000
    x0 = torch.tensor([1.5, -0.7], dtype=torch.float64).repeat(n, 1)
    chain = s.q_chain(x0, s.T, generator=torch.Generator().manual_seed(0))
    assert chain.shape == (s.T + 1, n, 2) and torch.equal(chain[0], x0)
    for t in (1, 5, 20, 40):
        mean, var = s.marginal(x0[:1], t)
        xt = chain[t]
        se = (var / n).sqrt()
        assert (xt.mean(0) - mean[0]).abs().max() < 4 * se.max(), f"t = {t}: mean"
        assert ((xt.var(0) / var[0, 0] - 1).abs() < 4 * math.sqrt(2 / n)).all(), f"t = {t}: variance"
        for d in range(2):
            p = stats.kstest(xt[:, d].numpy(), "norm", args=(mean[0, d].item(), var[0, 0].sqrt().item())).pvalue
            assert p > 1e-3, f"t = {t}, dim {d}: KS p = {p:.2g}"
        closed = s.q_sample(x0, t, torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        assert stats.ks_2samp(closed[:, 0].numpy(), xt[:, 0].numpy()).pvalue > 1e-3
    # q(x_T | x_0) ≈ N(0, I) whatever x_0 in [−1, 1]: KL(q(x_T|x_0) ‖ N(0, I)) tiny
    model = D.ddpm_mlp(2, timesteps=s.T)
    model.schedule = s
    assert model.prior_term(torch.tensor([[1.0, -1.0]])).item() < 2e-3


# ============================================================================ C34
def mixture_model(T=50):
    s = D.linear_schedule(T)
    den = D.GaussianMixtureDenoiser(MIX_MEANS, MIX_STDS, MIX_WEIGHTS, s)
    return D.DDPM(den, (2,), s).double()


def test_c34_conversions_and_optimal_denoiser_give_true_noised_score():
    """On a Gaussian mixture, the optimal denoiser E[ε | x_t] is −σ_t ∇ log q_t(x_t) (∇ from
    torch.distributions), and the ε, x₀ and score parameterisations convert consistently."""
    model = mixture_model()
    s = model.schedule
    torch.manual_seed(0)
    for t in (1, 5, 25, 50):
        q_t = noised_mixture(s, t)
        xt = torch.cat([q_t.sample((400,)), 3 * torch.randn(100, 2, dtype=torch.float64)])  # and the tails
        tt = torch.full((500,), t)
        ab = s.at("alpha_bar", tt, xt)
        score = true_score(q_t, xt)
        eps = model.eps(xt, tt)
        x0 = model.denoiser.x0(xt, tt)
        assert torch.allclose(model.score(xt, tt), score, rtol=1e-6, atol=1e-8), f"t = {t}: Tweedie"
        assert torch.allclose(D.eps_to_score(eps, ab), score, rtol=1e-6, atol=1e-8)
        assert torch.allclose(D.score_to_eps(score, ab), eps, rtol=1e-6, atol=1e-8)
        assert torch.allclose(D.x0_to_score(xt, x0, ab), score, rtol=1e-6, atol=1e-8)
        assert torch.allclose(D.score_to_x0(xt, score, ab), x0, rtol=1e-6, atol=1e-8)
        assert torch.allclose(D.eps_to_x0(xt, eps, ab), x0, rtol=1e-6, atol=1e-8)
        assert torch.allclose(D.x0_to_eps(xt, x0, ab), eps, rtol=1e-6, atol=1e-8)
        assert torch.allclose(model.predict_x0(xt, tt), x0, rtol=1e-6, atol=1e-8)


class Perturbed(torch.nn.Module):
    def __init__(self, denoiser, scale=1.0, shift=0.0):
        super().__init__()
        self.denoiser, self.scale, self.shift = denoiser, scale, shift

    def forward(self, x, t):
        return self.scale * self.denoiser(x, t) + self.shift


def test_c34_optimal_denoiser_minimises_the_denoising_loss():
    """The simple loss, on mixture data with common random numbers, is smallest at E[ε | x_t]."""
    model = mixture_model()
    data = MixtureSameFamily(Categorical(torch.tensor(MIX_WEIGHTS, dtype=torch.float64)), Independent(Normal(
        torch.tensor(MIX_MEANS, dtype=torch.float64),
        torch.tensor(MIX_STDS, dtype=torch.float64)[:, None].expand(3, 2)), 1))
    torch.manual_seed(0)
    x = data.sample((20000,))

    def loss_with(denoiser):
        torch.manual_seed(1)
        return D.DDPM(denoiser, (2,), model.schedule).double().simple_loss(x).item()

    best = loss_with(model.denoiser)
    for scale, shift in ((1.05, 0.0), (0.95, 0.0), (1.0, 0.05), (1.0, -0.05)):
        assert best < loss_with(Perturbed(model.denoiser, scale, shift)), (scale, shift)


# ============================================================================ C35
def linear_model_marginal(model):
    """The model's exact distribution of x_0 (before the decoder's bins) when its denoiser is affine in
    x_t (one Gaussian): x_{t−1} = A_t x_t + B_t + σ_t z from x_T ~ N(0, 1), so x_0 ~ N(mean, var)."""
    mean, var = 0.0, 1.0
    for t in range(model.T, 0, -1):
        tt = torch.tensor([t])
        mu0 = model.reverse_mean(torch.zeros(1, 1, dtype=torch.float64), tt).item()
        A = model.reverse_mean(torch.ones(1, 1, dtype=torch.float64), tt).item() - mu0
        mean, var = A * mean + mu0, A * A * var + model.reverse_variance(tt, torch.zeros(1, 1)).item()
    return mean, var


@pytest.mark.parametrize("levels", [None, 5])
def test_c35_bound_is_below_the_exact_log_likelihood(levels):
    """−ELBO ≥ −log p_θ(x_0) for a model whose likelihood is exact in closed form (1-D data, an affine
    denoiser: every step Gaussian), and the bound is nearly tight for continuous data, where the
    denoiser is the data's optimal one; averaged over the data, −ELBO ≥ the data's entropy."""
    torch.manual_seed(0)
    s = D.linear_schedule(50)
    m, sd = 0.2, 0.4
    model = D.DDPM(D.GaussianMixtureDenoiser([[m]], [sd], [1.0], s), (1,), s, levels=levels).double()
    mean, var = linear_model_marginal(model)
    p = Normal(mean, math.sqrt(var))
    if levels is None:
        xs = torch.tensor([[-1.0], [0.0], [0.2], [0.5], [1.0]], dtype=torch.float64)
        exact = p.log_prob(xs[:, 0])
    else:
        xs = torch.arange(levels, dtype=torch.float64)[:, None]
        edges = torch.cat([torch.tensor([-math.inf]), torch.linspace(-1, 1, levels)[:-1] + 1 / (levels - 1),
                           torch.tensor([math.inf])]).double()
        exact = (p.cdf(edges[1:]) - p.cdf(edges[:-1])).log()
        assert exact.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    rep = 1500
    bound = model.log_prob(xs.repeat(rep, 1)).reshape(rep, len(xs))
    mean_bound, se = bound.mean(0), bound.std(0) / math.sqrt(rep)
    assert (mean_bound <= exact + 4 * se).all(), f"bound {mean_bound} above exact {exact}"
    if levels is None:
        assert (exact - mean_bound < 0.15).all(), f"the bound should be nearly tight: gap {exact - mean_bound}"
        # data N(m, sd²): E_data[−ELBO] ≥ H(data) = ½ log(2πe sd²)
        data = Normal(m, sd).sample((4000, 1)).double()
        assert -model.log_prob(data).mean().item() > 0.5 * math.log(2 * math.pi * math.e * sd**2)
    else:
        probs = exact.exp()  # data distributed as the model: E_data[−ELBO] ≥ H(data)
        assert -(probs * mean_bound).sum() >= -(probs * exact).sum()


def test_loss_is_the_negative_mean_bound_and_elbo_loss_is_unbiased():
    torch.manual_seed(0)
    s = D.linear_schedule(20)
    model = D.DDPM(D.GaussianMixtureDenoiser([[0.1]], [0.5], [1.0], s), (1,), s, levels=5).double()
    x = torch.randint(5, (6, 1))
    torch.manual_seed(1)
    loss = model.loss(x)
    torch.manual_seed(1)
    assert torch.allclose(loss, -model.log_prob(x).mean())
    xs = x.repeat(3000, 1)
    full = -model.log_prob(xs).mean().item()
    one_t = model.elbo_loss(xs).item()
    assert one_t == pytest.approx(full, rel=0.1), "T · L_{t−1} with t ~ U{1..T} estimates the whole sum"


# ============================================================================ models, shapes
def test_mlp_ddpm_shapes_training_and_samplers():
    torch.manual_seed(0)
    model = D.ddpm_mlp(2, timesteps=30, hidden=16, layers=2, embed_dim=8)
    x = torch.randn(8, 2)
    assert model.log_prob(x).shape == (8,) and model.support is D.constraints.real
    losses = dict(model.training_losses(x))
    assert set(losses) == {"model"} and losses["model"].dim() == 0
    losses["model"].backward()
    assert all(p.grad is not None for p in model.denoiser.parameters())
    assert model.sample(5).shape == (5, 2)
    assert model.sample(4, steps=7, method="ddim").shape == (4, 2)
    torch.manual_seed(3)
    xT = torch.randn(4, 2)
    assert torch.equal(model.ddim(xT, 10), model.ddim(xT, 10)), "DDIM with η = 0 is deterministic"
    assert model.ddim_timesteps(3) == [30, 20, 10, 0]
    assert model.ddim_timesteps(30) == list(range(30, -1, -1))


def test_ddim_step_with_eta_one_is_the_ddpm_posterior_step():
    """A DDIM step t → t − 1 with η = 1 is the ancestral step with σ_t² = β̃_t: μ_θ(x_t, t) + √β̃_t z."""
    model = mixture_model(20)
    model.variance = "small"
    g = torch.Generator().manual_seed(0)
    for t in (2, 10, 20):
        x, z = (torch.randn(6, 2, dtype=torch.float64, generator=g) for _ in range(2))
        tt = torch.full((6,), t)
        ancestral = model.reverse_mean(x, tt) + model.reverse_variance(tt, x).sqrt() * z
        assert torch.allclose(model.ddim_step(x, t, t - 1, eta=1.0, z=z), ancestral, atol=1e-10), t
        deterministic = model.ddim_step(x, t, t - 1, eta=0.0, z=z)
        assert torch.equal(deterministic, model.ddim_step(x, t, t - 1, eta=0.0))


def test_unet_ddpm_on_digit_levels():
    torch.manual_seed(0)
    model = D.ddpm_unet((1, 8, 8), 17, timesteps=10, unet=dict(base=8, mults=(1, 2), blocks=1, embed_dim=16))
    x = torch.randint(17, (3, 1, 8, 8))
    lp = model.log_prob(x)
    assert lp.shape == (3,) and torch.isfinite(lp).all() and (lp < 0).all()
    assert torch.isfinite(model.log_prob(x.reshape(3, 64).float())).all()
    for kw in ({}, dict(steps=4, method="ddim"), dict(steps=3)):
        s = model.sample(2, **kw)
        assert s.shape == (2, 1, 8, 8) and s.dtype == torch.long and bool(model.support.check(s).all())
    net = D.UNet(1, **D.MNIST_UNET)
    assert net(torch.randn(1, 1, 28, 28), torch.tensor([7])).shape == (1, 1, 28, 28)


def test_ddpm_bad_input():
    model = D.ddpm_unet((1, 8, 8), 17, timesteps=5, unet=dict(base=8, mults=(1,), blocks=1, embed_dim=8))
    with pytest.raises(ValueError, match="expects x of shape"):
        model.log_prob(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="steps should be at most T = 5"):
        model.sample(2, steps=6)
    with pytest.raises(ValueError, match="method"):
        model.sample(2, method="euler")
    with pytest.raises(ValueError, match="objective"):
        D.ddpm_mlp(2, objective="vlb")
    with pytest.raises(ValueError, match="divide by 2"):
        D.UNet(1, base=8, mults=(1, 2))(torch.zeros(1, 1, 7, 7), torch.tensor([1]))
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, context=1)


def test_c35_importance_weighted_bound_lies_between_the_bound_and_the_exact_likelihood():
    """One forward chain's log weight has the bound's expectation (the bound's KLs are its closed-form
    average), and k = 16 chains give a tighter bound, still below the exact log p_θ(x_0)."""
    torch.manual_seed(0)
    s = D.linear_schedule(20)
    model = D.DDPM(D.GaussianMixtureDenoiser([[0.0]], [0.5], [1.0], s), (1,), s, levels=5).double()
    mean, var = linear_model_marginal(model)
    x, rep = torch.tensor([[1]]), 2000
    exact = (Normal(mean, math.sqrt(var)).cdf(torch.tensor(-0.25, dtype=torch.float64))
             - Normal(mean, math.sqrt(var)).cdf(torch.tensor(-0.75, dtype=torch.float64))).log().item()
    bound = model.log_prob(x.repeat(rep, 1))
    chain = model.chain_log_weight(model.to_model_space(x.repeat(rep, 1)))
    se = math.hypot(bound.std().item(), chain.std().item()) / math.sqrt(rep)
    assert abs(bound.mean().item() - chain.mean().item()) < 4 * se
    iw = model.log_prob(x.repeat(200, 1), k=16)
    iw_se = iw.std().item() / math.sqrt(200)
    assert bound.mean().item() < iw.mean().item() - 2 * iw_se
    assert iw.mean().item() < exact + 4 * iw_se


def test_discretised_decoder_is_the_gaussian_mass_of_each_bin():
    """log p(x_0 | x_1) for L levels: the N(μ, σ²) mass on x_0's bin (scipy's normal cdf/sf, exact in
    the far tails, e.g. 11 σ), end bins open, so the L masses sum to one."""
    L = 5
    model = D.DDPM(torch.nn.Identity(), (1,), D.linear_schedule(10), levels=L).double()
    mean = torch.tensor([[-0.9], [0.1], [0.6], [1.3]], dtype=torch.float64)
    var = torch.tensor([[0.04], [0.3], [0.01], [0.5]], dtype=torch.float64)
    edges = torch.cat([torch.tensor([-math.inf]), torch.linspace(-1, 1, L)[:-1] + 1 / (L - 1),
                       torch.tensor([math.inf])]).double()
    logs = []
    for k in range(L):
        x0 = model.to_model_space(torch.full((4, 1), k))
        got = model.decoder_log_prob(x0, mean, var)
        a, b = ((edges[k:k + 2] - mean) / var.sqrt()).T.numpy()  # scipy's tails are exact far out
        want = torch.from_numpy(np.log(np.where(a > 0, stats.norm.sf(a) - stats.norm.sf(b),
                                                stats.norm.cdf(b) - stats.norm.cdf(a))))
        assert torch.allclose(got, want, rtol=1e-9), k
        logs.append(got)
    assert torch.allclose(torch.stack(logs).exp().sum(0), torch.ones(4, dtype=torch.float64))


def test_c35_bound_holds_with_a_short_schedule_whose_prior_term_matters():
    """T = 8 steps of β = 0.06 leave ᾱ_T ≈ 0.6: L_T = KL(q(x_T|x_0) ‖ N(0, 1)) is a large part of
    the bound, and −ELBO ≥ −log p_θ(x_0) still, for real and for level data."""
    torch.manual_seed(0)
    s = D.NoiseSchedule([0.06] * 8)
    assert s.alpha_bar[-1] > 0.5
    for levels, xs in ((None, torch.tensor([[-1.0], [0.3], [1.0]], dtype=torch.float64)),
                       (5, torch.tensor([[0], [2], [4]]))):
        model = D.DDPM(D.GaussianMixtureDenoiser([[0.1]], [0.5], [1.0], s), (1,), s, levels=levels).double()
        mean, var = linear_model_marginal(model)
        p, x0 = Normal(mean, math.sqrt(var)), model.to_model_space(xs)[:, 0]
        inf = torch.tensor(math.inf, dtype=torch.float64)
        hi, lo = torch.where(x0 < 1, x0 + 0.5, inf), torch.where(x0 > -1, x0 - 0.5, -inf)  # the bins of 5 levels
        exact = p.log_prob(x0) if levels is None else (p.cdf(hi) - p.cdf(lo)).log()
        bound = model.log_prob(xs.repeat(2000, 1)).reshape(2000, 3)
        assert model.prior_term(x0[:, None]).min() > 0.1
        assert (bound.mean(0) <= exact + 4 * bound.std(0) / math.sqrt(2000)).all(), (levels, bound.mean(0), exact)


def test_c34_a_trained_network_approaches_the_optimal_denoiser():
    """An MLP denoiser trained on the simple loss for 600 batches of mixture data comes close to
    E[ε | x_t] (mean squared distance under 0.1, from about 0.8 at initialisation)."""
    torch.manual_seed(0)
    s = D.linear_schedule(50)
    best = D.GaussianMixtureDenoiser(MIX_MEANS, MIX_STDS, MIX_WEIGHTS, s)
    model = D.DDPM(D.MLPDenoiser(2, 64, 2, 16), (2,), s)
    data = MixtureSameFamily(Categorical(torch.tensor(MIX_WEIGHTS)), Independent(Normal(
        torch.tensor(MIX_MEANS), torch.tensor(MIX_STDS)[:, None].expand(3, 2)), 1))
    x0, t = data.sample((4000,)), torch.randint(1, 51, (4000,))
    xt = s.q_sample(x0, t)

    def distance():
        with torch.no_grad():
            return (model.eps(xt, t).double() - best(xt.double(), t)).square().mean().item()

    before = distance()
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(600):
        loss = dict(model.training_losses(data.sample((256,))))["model"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert distance() < min(0.1, 0.2 * before), (before, distance())


# ============================================================================ C36: the probability-flow ODE
def mixture_ddpm(timesteps: int = 100) -> D.DDPM:
    """A DDPM whose denoiser is the mixture's exact E[ε | x_t]: its PF-ODE transports N(0, I) to the data exactly."""
    s = D.cosine_schedule(timesteps)
    return D.DDPM(D.GaussianMixtureDenoiser(MIX_MEANS, MIX_STDS, MIX_WEIGHTS, s), (2,), s).double()


def two_sample_ok(x, y):
    """Same law, as seen by KS tests on both coordinates and two diagonal projections (Bonferroni)."""
    for w in ([1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]):
        w = torch.tensor(w, dtype=x.dtype)
        if stats.ks_2samp((x @ w).numpy(), (y @ w).numpy()).pvalue < 0.01 / 4:
            return False
    return True


def test_ode_solvers_orders_on_a_linear_ode():
    """dx/dt = −x t: x(1) = x(0) e^{−1/2}; Euler first order, midpoint/Heun second order, RK45 adaptive."""
    x0, exact = torch.ones(3, 1, dtype=torch.float64), math.exp(-0.5)
    drift = lambda x, t: -x * t[:, None]  # noqa: E731
    err = {m: abs(D.ode_solve(drift, x0, 0.0, 1.0, method=m, steps=20)[0][0, 0].item() - exact)
           for m in ("euler", "midpoint", "heun")}
    assert err["euler"] > 10 * max(err["midpoint"], err["heun"]) and err["heun"] < 1e-3
    x1, nfe = D.ode_solve(drift, x0, 0.0, 1.0, method="rk45", rtol=1e-8, atol=1e-10)
    assert abs(x1[0, 0].item() - exact) < 1e-7 and nfe > 0
    assert D.ode_solve(drift, x0, 0.0, 1.0, method="heun", steps=20)[1] == 40
    with pytest.raises(ValueError, match="method"):
        D.ode_solve(drift, x0, 0.0, 1.0, method="rk4")


def test_c36_ode_samples_have_the_data_marginal():
    """With the exact score, the PF-ODE from N(0, I) lands on the data law (fixed-step Heun and adaptive RK45)."""
    torch.manual_seed(0)
    model, data = mixture_ddpm(), noised_mixture(D.cosine_schedule(100), 0).sample((4000,))
    for kwargs in (dict(method="heun", steps=50), dict(method="rk45")):
        x = model.ode_sample(2000, **kwargs)
        assert torch.allclose(x.mean(0), data.mean(0), atol=0.08), kwargs
        assert torch.allclose(x.std(0), data.std(0), rtol=0.06), kwargs
        assert two_sample_ok(x, data), kwargs


def test_c36_ode_log_likelihood_matches_exact_density():
    """log N(x(T); 0, I) + ∫ ∇·f dτ (exact divergence, RK45) equals the mixture's log-density at t = 0."""
    model = mixture_ddpm(20)  # few steps: few kinks in the piecewise-constant β(τ) for RK45 to step over
    pts = torch.tensor([[-1.0, 0.5], [1.0, 0.0], [0.2, 1.3], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    exact = noised_mixture(model.schedule, 0).log_prob(pts)
    got = model.ode_log_prob(pts, divergence="exact", method="rk45", rtol=1e-6, atol=1e-6)
    assert torch.allclose(got, exact, atol=0.02), (got, exact)


def test_c36_hutchinson_is_unbiased_for_the_divergence():
    """The mean of vᵀ(∂f/∂x)v over Rademacher probes equals tr(∂f/∂x) (autograd, per dimension), in 10-D,
    and the Hutchinson ODE log-likelihood averages to the exact-divergence one (same fixed-step path)."""
    torch.manual_seed(0)
    model = D.ddpm_mlp(10, timesteps=50, hidden=32, layers=2).double()
    x = torch.randn(1, 10, dtype=torch.float64).repeat(4000, 1).requires_grad_(True)
    f = model.ode_drift(x, torch.full((4000,), 20.5, dtype=torch.float64))
    exact = D.divergence_exact(f, x)[0]
    est = D.divergence_hutchinson(f, x, D.rademacher(x.shape, x))
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(len(est)) + 1e-9
    assert est.std() > 0, "the probes should vary"
    model2 = mixture_ddpm(20)
    pts = torch.tensor([[0.3, -0.2]], dtype=torch.float64).repeat(400, 1)
    exact_lp = model2.ode_log_prob(pts[:1], divergence="exact", method="heun", steps=20)
    hutch = model2.ode_log_prob(pts, divergence="hutchinson", method="heun", steps=20,
                                generator=torch.Generator().manual_seed(0))
    assert abs(hutch.mean() - exact_lp) < 4 * hutch.std() / math.sqrt(len(hutch)) + 1e-9
    with pytest.raises(ValueError, match="divergence"):
        model2.ode_log_prob(pts[:1], divergence="trace")


# ============================================================================ C37: flow matching
def mixture_flow() -> D.FlowMatching:
    return D.FlowMatching(D.GaussianMixtureVelocity(MIX_MEANS, MIX_STDS, MIX_WEIGHTS), (2,)).double()


def test_c37_conditional_gradient_equals_marginal_gradient():
    """∇_θ E‖v_θ(x_t, t) − (x_1 − x_0)‖² = ∇_θ E‖v_θ(x_t, t) − u_t(x_t)‖², u_t the exact marginal velocity
    of the mixture (a posterior-weighted average of conditional targets), on the same (t, x_0, x_1)."""
    torch.manual_seed(0)
    net = D.MLPDenoiser(2, hidden=16, layers=2, embed_dim=8, time_scale=10.0).double()
    with torch.no_grad():  # larger weights: a field that varies with x, so the gradient sees more than its mean
        for p in net.net.parameters():
            p.mul_(3.0)
    model, u = D.FlowMatching(net, (2,)).double(), D.GaussianMixtureVelocity(MIX_MEANS, MIX_STDS, MIX_WEIGHTS)
    n = 200_000
    x1 = noised_mixture(D.cosine_schedule(10), 0).sample((n,))
    x0, t = torch.randn_like(x1), torch.rand(n, dtype=torch.float64)
    conditional = torch.autograd.grad(model.cfm_loss(x1, x0=x0, t=t), list(net.parameters()))
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    marginal = torch.autograd.grad((model.v(xt, t) - u(xt, t)).square().mean(), list(net.parameters()))
    a, b = torch.cat([g.flatten() for g in conditional]), torch.cat([g.flatten() for g in marginal])
    assert (a - b).norm() < 0.03 * b.norm(), ((a - b).norm() / b.norm()).item()


def test_c37_exact_velocity_transports_noise_to_data():
    """The exact marginal field's ODE from N(0, I) at t = 0 gives the data at t = 1: samples (midpoint, 20 steps)
    and the change-of-variables log-density (RK45) against the mixture's."""
    torch.manual_seed(0)
    model, data = mixture_flow(), noised_mixture(D.cosine_schedule(10), 0)
    x = model.sample(2000, steps=20, method="midpoint")
    ref = data.sample((4000,))
    assert torch.allclose(x.mean(0), ref.mean(0), atol=0.08) and two_sample_ok(x, ref)
    pts = torch.tensor([[-1.0, 0.5], [1.0, 0.0], [0.2, 1.3], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(model.log_prob(pts), data.log_prob(pts), atol=0.02)


def test_c37_short_training_run_learns_the_data():
    """A few hundred Adam steps of the CFM loss on 2-D mixture data: 20 midpoint steps give samples whose
    mean and covariance are close to the data's (and far closer than the untrained model's)."""
    torch.manual_seed(0)
    data = noised_mixture(D.cosine_schedule(10), 0)
    model = D.flow_matching_mlp(2, hidden=64, layers=2).double()
    ref = data.sample((4000,))

    def gap():
        x = model.sample(2000, steps=20)
        return (x.mean(0) - ref.mean(0)).norm() + (torch.cov(x.T) - torch.cov(ref.T)).norm()

    before = gap()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        opt.zero_grad()
        model.cfm_loss(data.sample((256,))).backward()
        opt.step()
    after = gap()
    assert after < 0.25 and after < before / 3, (before, after)


# ============================================================================ guidance, averages
def test_guidance_is_the_null_output_plus_w_times_the_difference():
    torch.manual_seed(0)
    model = D.DDPM(D.MLPDenoiser(2, 16, 2, 8, num_classes=3), (2,), D.linear_schedule(10))
    x, t, y = torch.randn(5, 2), torch.tensor([1, 3, 5, 7, 9]), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        e_y = model.denoiser(x, t, y)
        e_null = model.denoiser(x, t, torch.full_like(y, 3))
        assert torch.allclose(model.eps(x, t), e_null), "no label: the null label"
        assert torch.allclose(model.eps(x, t, y), e_y)
        assert torch.allclose(model.eps(x, t, y, guidance=0.0), e_null)
        assert torch.allclose(model.eps(x, t, y, guidance=3.0), e_null + 3.0 * (e_y - e_null), atol=1e-6)
        fm = D.FlowMatching(D.MLPDenoiser(2, 16, 2, 8, num_classes=3), (2,))
        tf = torch.rand(5)
        v_y, v_null = fm.velocity(x, tf, y), fm.velocity(x, tf, torch.full_like(y, 3))
        assert torch.allclose(fm.v(x, tf, y, guidance=2.5), v_null + 2.5 * (v_y - v_null), atol=1e-6)


def test_drop_labels_replaces_a_fraction_p_with_the_null_label():
    torch.manual_seed(0)
    y = torch.randint(0, 10, (20000,))
    dropped = D.drop_labels(y, 0.1, 10)
    null = dropped == 10
    assert stats.binomtest(int(null.sum()), len(y), 0.1).pvalue > 1e-3
    assert torch.equal(dropped[~null], y[~null]), "the labels that are kept are unchanged"
    assert D.drop_labels(y, 0.0, 10) is y and D.drop_labels(None, 0.1, 10) is None


def test_class_conditional_model_checks_its_labels():
    model = D.ddpm_mlp(2, timesteps=10, hidden=8, layers=1, embed_dim=4)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(2, context=torch.tensor([0, 1]))
    cond = D.DDPM(D.MLPDenoiser(2, 8, 1, 4, num_classes=3), (2,), D.linear_schedule(10))
    assert cond.sample(4).shape == (4, 2), "labels are optional: left out, the model is unconditional"
    assert cond.sample(4, context=2).shape == (4, 2)
    with pytest.raises(ValueError, match="context"):
        cond.sample(4, context=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        cond.loss(torch.randn(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="label_dropout"):
        D.DDPM(D.MLPDenoiser(2, 8, 1, 4, num_classes=3), (2,), D.linear_schedule(10), label_dropout=1.0)
    with pytest.raises(ValueError, match="unconditional"):
        D.UNet(1, base=8, mults=(1,))(torch.zeros(1, 1, 4, 4), torch.tensor([1]), torch.tensor([0]))


def test_guided_samples_follow_their_label_and_guidance_sharpens_them():
    """A conditional DDPM on two labelled clusters at ±2: each label's samples land on its cluster;
    unguided (w = 0) they split between both; w = 3 leaves no more on the wrong side than w = 1."""
    torch.manual_seed(0)
    y = torch.randint(0, 2, (2000,))
    x = torch.stack([4.0 * y - 2, torch.zeros(len(y))], 1) + 0.3 * torch.randn(len(y), 2)
    model = D.DDPM(D.MLPDenoiser(2, 32, 2, 16, num_classes=2), (2,), D.cosine_schedule(50), label_dropout=0.3)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(400):
        i = torch.randint(0, len(x), (256,))
        loss = model.simple_loss(x[i], y[i])
        opt.zero_grad(), loss.backward(), opt.step()
    torch.manual_seed(1)
    wrong = {w: (model.sample(400, context=1, guidance=w)[:, 0] < 0).float().mean().item()
             for w in (0.0, 1.0, 3.0)}
    assert 0.25 < wrong[0.0] < 0.75, f"unguided samples should split between the clusters, got {wrong[0.0]:.2f}"
    assert wrong[1.0] < 0.1, f"label 1's samples should sit at +2, {wrong[1.0]:.2f} did not"
    assert wrong[3.0] <= wrong[1.0]
    torch.manual_seed(1)
    on_zero = model.sample(400, context=0)[:, 0]
    assert (on_zero < 0).float().mean() > 0.9


def test_weight_average_is_an_exponential_moving_average_used_in_eval_mode():
    from dgmlab.train import fit

    torch.manual_seed(0)
    model = D.ddpm_mlp(2, timesteps=10, hidden=8, layers=1, embed_dim=4, average=0.9)
    start = [p.detach().clone() for p in model.denoiser.parameters()]
    lives = []
    fit(model, torch.randn(64, 2), epochs=3, batch_size=32, progress=False,
        callbacks=lambda *a: lives.append([p.detach().clone() for p in model.denoiser.parameters()]))
    assert len(lives) == 3
    avg = [p.detach() for p in model.average.net.parameters()]
    assert not torch.allclose(avg[0], lives[-1][0]), "the average lags the live weights"
    assert all(not a.requires_grad for a in model.average.net.parameters())
    # two steps per epoch, six in all: θ̄ = 0.9⁶ θ_0 + Σ 0.1 · 0.9^(6−k) θ_k; check its bounds on one weight
    lo = torch.minimum(start[0], torch.stack([l[0] for l in lives]).min(0).values)
    assert bool(((avg[0] >= lo - 1e-6)).all())
    x, t = torch.randn(3, 2), torch.tensor([1, 5, 9])
    model.train()
    assert torch.allclose(model.eps(x, t), model.denoiser(x, t))
    model.eval()
    assert torch.allclose(model.eps(x, t), model.average.net(x, t))
    with pytest.raises(ValueError, match="average"):
        D.ddpm_mlp(2, timesteps=10, average=1.5)


def test_weight_average_update_is_the_lerp():
    net = torch.nn.Linear(2, 1)
    avg = D.WeightAverage(net, 0.75)
    old = avg.net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    avg.update(net)
    assert torch.allclose(avg.net.weight, 0.75 * old + 0.25 * net.weight)


def test_sample_by_the_ode_is_ode_sample():
    model = D.DDPM(D.MLPDenoiser(2, 8, 1, 4), (2,), D.linear_schedule(20, 0.05, 0.5))
    assert (1 - model.schedule.alpha_bar[-1]) / model.schedule.alpha_bar[-1] < D.SIGMA_MAX**2  # starts at T
    torch.manual_seed(3)
    a = model.sample(6, method="ode", steps=10)
    torch.manual_seed(3)
    b, nfe = model.ode_sample(6, method="heun", steps=10, return_nfe=True)
    assert torch.equal(a, b) and nfe == 19
    torch.manual_seed(3)
    c = model.ode_sample(6, method="euler", steps=10)
    torch.manual_seed(3)
    assert torch.allclose(c, model.sample(6, method="ddim", steps=10), atol=1e-5), "Euler in σ is DDIM (η = 0)"


def test_dequantized_flow_matching_log_prob_bounds_the_level_probability():
    """With the exact velocity of a 1-D mixture, log_prob at x + u averages to E_u log p(x + u) + log(bin width),
    which lies below log P(x) = log ∫_bin p (Jensen), and close to it for a smooth p."""
    torch.manual_seed(0)
    L, means, stds, weights = 9, [[-0.4], [0.5]], [0.3, 0.4], [0.4, 0.6]
    model = D.DequantizedFlowMatching(D.GaussianMixtureVelocity(means, stds, weights), (1,), levels=L).double()
    assert model.log_prob_is_bound
    x = torch.arange(L).repeat_interleave(40)[:, None]
    got = model.log_prob(x, method="rk45", rtol=1e-6, atol=1e-6).reshape(L, 40).mean(1)
    z, h = 2 * torch.arange(L, dtype=torch.float64) / (L - 1) - 1, 1.0 / (L - 1)
    mass = sum(w * (Normal(m[0], s).cdf(z + h) - Normal(m[0], s).cdf(z - h)) for m, s, w in zip(means, stds, weights))
    assert bool((got <= mass.log() + 0.02).all()), (got, mass.log())
    assert torch.allclose(got, mass.log(), atol=0.15), (got, mass.log())
    tighter = model.log_prob(x, k=16, method="rk45", rtol=1e-6, atol=1e-6).reshape(L, 40).mean(1)
    assert bool((tighter >= got - 0.01).all() and (tighter <= mass.log() + 0.02).all()), (tighter, got)
    with pytest.raises(ValueError, match="levels"):
        D.DequantizedFlowMatching(D.MLPDenoiser(2), (2,), levels=None)


def test_ode_in_sigma_heun_is_second_order_and_euler_first():
    """From the same x_T, halving the step divides Heun's error (against a fine solution) by about 4 and
    Euler's by about 2: the slopes at both ends of a step are averaged."""
    model = mixture_ddpm(1000)
    torch.manual_seed(0)
    xT = torch.randn(200, 2, dtype=torch.float64)
    with torch.no_grad():
        ref = model.ode_sigma(xT, 200)[0]
        err = {(heun, n): (model.ode_sigma(xT, n, heun=heun)[0] - ref).norm(dim=1).mean().item()
               for heun in (True, False) for n in (10, 20)}
    assert err[True, 10] / err[True, 20] > 3.0, err
    assert err[False, 10] / err[False, 20] < 3.0, err
    assert err[True, 20] < err[False, 20]
