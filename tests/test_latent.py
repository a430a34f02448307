"""Claim C20 on models with exact posteriors; EM as coordinate ascent; quadrature ground truth."""

import math
import warnings

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal, Normal, kl_divergence
from torch.distributions import Independent

from dgmlab import divergences
from dgmlab import latent as L

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state (sample(n) draws from it)."""
    torch.manual_seed(0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_ppca(dim=5, latent_dim=2, seed=0, log_sigma=-0.4):
    """A LinearGaussian in float64 with every parameter drawn at random."""
    model = L.LinearGaussian(dim, latent_dim, seed=seed).double()
    with torch.no_grad():
        model.mu.copy_(torch.randn(dim, generator=gen(seed + 100), dtype=DOUBLE))
        model.log_sigma.fill_(log_sigma)
    return model


def random_gaussians(n, d, seed):
    """N Gaussians with random means and random (well-conditioned) full covariances."""
    g = gen(seed)
    A = torch.randn(n, d, d, generator=g, dtype=DOUBLE)
    cov = A @ A.transpose(-1, -2) + 0.2 * torch.eye(d, dtype=DOUBLE)
    return MultivariateNormal(torch.randn(n, d, generator=g, dtype=DOUBLE), covariance_matrix=cov)


def random_mixture(dim=3, k=4, seed=0):
    model = L.GaussianMixture(dim, k, seed=seed).double()
    g = gen(seed + 1)
    with torch.no_grad():
        model.logits.copy_(torch.randn(k, generator=g, dtype=DOUBLE))
        model.means.copy_(2 * torch.randn(k, dim, generator=g, dtype=DOUBLE))
        model.log_std.copy_(0.3 * torch.randn(k, dim, generator=g, dtype=DOUBLE))
    return model


def separated_blobs(n=600, seed=0):
    """Three well-separated 2-D Gaussian blobs of unequal sizes and spreads, and the truth."""
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=DOUBLE)
    stds = torch.tensor([[0.5, 1.0], [1.0, 0.5], [0.7, 0.7]], dtype=DOUBLE)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=DOUBLE)
    g = gen(seed)
    z = torch.multinomial(weights, n, replacement=True, generator=g)
    x = means[z] + stds[z] * torch.randn(n, 2, generator=g, dtype=DOUBLE)
    return x, means, stds, weights


# ---------------------------------------------------------------------------- C20
def test_c20_log_p_is_elbo_plus_kl_linear_gaussian():
    for seed, (D, d) in enumerate([(5, 1), (5, 2), (4, 3)]):
        model = random_ppca(D, d, seed=seed)
        x = torch.randn(8, D, generator=gen(seed), dtype=DOUBLE) * 2
        log_p, posterior = model.log_prob(x), model.posterior(x)
        full = random_gaussians(8, d, seed)
        g = gen(seed + 7)
        diagonal = Normal(torch.randn(8, d, generator=g, dtype=DOUBLE),
                          torch.rand(8, d, generator=g, dtype=DOUBLE) + 0.1)
        for q, q_full in ((full, full), (diagonal, MultivariateNormal(diagonal.loc, diag_cov(diagonal))),
                          (Independent(diagonal, 1), MultivariateNormal(diagonal.loc, diag_cov(diagonal)))):
            elbo = model.elbo(x, q)
            kl = kl_divergence(q_full, posterior)  # torch's KL, against the exact posterior
            torch.testing.assert_close(log_p, elbo + kl, rtol=0, atol=1e-6)
            assert (kl > 1e-3).all() and (elbo < log_p).all()
        gap = log_p - model.elbo(x, posterior)
        assert gap.abs().max() < 1e-9  # q = p(z | x): the bound is tight


def diag_cov(q):
    return torch.diag_embed(q.scale**2)


def test_c20_log_p_is_elbo_plus_kl_mixture():
    model = random_mixture()
    x = model.sample(10)
    log_p, posterior = model.log_prob(x), Categorical(logits=model.log_joint(x))  # torch normalises
    for seed in range(3):
        r = torch.softmax(2 * torch.randn(10, 4, generator=gen(seed), dtype=DOUBLE), 1)
        kl = kl_divergence(Categorical(probs=r), posterior)
        torch.testing.assert_close(log_p, model.elbo(x, r) + kl, rtol=0, atol=1e-9)
        assert (kl > 1e-3).all()
    one_hot = torch.eye(4, dtype=DOUBLE)[torch.arange(10) % 4]  # hard assignments: H(r) = 0
    kl = kl_divergence(Categorical(probs=one_hot), posterior)
    torch.testing.assert_close(log_p, model.elbo(x, one_hot) + kl, rtol=0, atol=1e-9)
    torch.testing.assert_close(model.posterior(x), posterior.probs, rtol=0, atol=1e-12)
    assert (log_p - model.elbo(x, model.posterior(x))).abs().max() < 1e-12


# ---------------------------------------------------------------------------- linear-Gaussian model
@pytest.mark.parametrize("D,d", [(5, 1), (6, 3), (2, 4)])
def test_linear_gaussian_marginal_is_the_multivariate_normal(D, d):
    model = random_ppca(D, d, seed=D + d)
    x = torch.randn(9, D, generator=gen(1), dtype=DOUBLE) * 3
    reference = MultivariateNormal(model.mu, model.W @ model.W.T + model.sigma2 * torch.eye(D, dtype=DOUBLE))
    torch.testing.assert_close(model.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-10)


def test_linear_gaussian_posterior_is_bayes_rule():
    model = random_ppca(6, 2, seed=3)
    x = model.sample(5)
    z = torch.randn(4, 5, 2, generator=gen(2), dtype=DOUBLE)  # 4 latents per object
    expected = model.log_joint(x, z) - model.log_prob(x)  # log p(z | x) = log p(x, z) − log p(x)
    torch.testing.assert_close(model.posterior(x).log_prob(z), expected, rtol=0, atol=1e-10)


def test_linear_gaussian_log_joint_is_likelihood_times_prior():
    model = random_ppca(4, 2, seed=5)
    x, z = model.sample(3), torch.randn(3, 2, generator=gen(0), dtype=DOUBLE)
    likelihood = MultivariateNormal(z @ model.W.T + model.mu, model.sigma2 * torch.eye(4, dtype=DOUBLE))
    expected = likelihood.log_prob(x) + Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(model.log_joint(x, z), expected, rtol=0, atol=1e-12)


def test_linear_gaussian_monte_carlo_elbo_is_unbiased_and_differentiable():
    model = random_ppca(5, 2, seed=1)
    x, q = model.sample(4), random_gaussians(4, 2, seed=4)
    torch.manual_seed(0)
    draws = torch.stack([model.elbo_mc(x, q) for _ in range(2000)]).detach()
    exact = model.elbo(x, q).detach()
    stderr = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 4 * stderr).all()
    loc = q.loc.clone().requires_grad_()
    model.elbo_mc(x, MultivariateNormal(loc, q.covariance_matrix), samples=3).sum().backward()
    assert loc.grad is not None and loc.grad.abs().sum() > 0  # reparameterised


def test_linear_gaussian_fit_is_the_maximum_likelihood():
    truth = random_ppca(6, 2, seed=8, log_sigma=-1.0)
    torch.manual_seed(0)
    x = truth.sample(400)
    model = L.LinearGaussian(6, 2, seed=1).double().fit(x)
    best = model.log_prob(x).mean()
    best.backward()  # a maximum: the gradient vanishes in every parameter
    for p in model.parameters():
        assert p.grad.abs().max() < 1e-8
    with torch.no_grad():
        assert best > L.LinearGaussian(6, 2, seed=2).double().log_prob(x).mean() + 1
        for seed in range(5):  # nudged in random directions, the likelihood can only fall
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen(seed), dtype=DOUBLE))
            assert model.log_prob(x).mean() < best
            model.fit(x)
    assert abs(model.log_sigma.exp().item() - truth.log_sigma.exp().item()) < 0.05


def test_linear_gaussian_fit_matches_sklearn_pca():
    decomposition = pytest.importorskip("sklearn.decomposition")
    x = random_ppca(7, 3, seed=2).sample(300).detach()
    model = L.LinearGaussian(7, 3).double().fit(x)
    pca = decomposition.PCA(n_components=3).fit(x.numpy())
    n = len(x)  # sklearn divides by N − 1, maximum likelihood by N
    sklearn_cov = torch.from_numpy(pca.get_covariance()) * (n - 1) / n
    torch.testing.assert_close(model.covariance.detach(), sklearn_cov, rtol=0, atol=1e-10)
    assert model.sigma2.item() == pytest.approx(pca.noise_variance_ * (n - 1) / n, rel=1e-10)
    # the columns of W span the principal subspace
    U = torch.from_numpy(pca.components_.T)
    torch.testing.assert_close(U @ U.T @ model.W.detach(), model.W.detach(), rtol=0, atol=1e-10)


def test_linear_gaussian_samples_have_the_model_moments():
    model = random_ppca(3, 2, seed=4)
    torch.manual_seed(0)
    s = model.sample(40_000)
    assert s.dtype == DOUBLE and not s.requires_grad
    torch.testing.assert_close(s.mean(0), model.mu.detach(), rtol=0, atol=0.05)
    torch.testing.assert_close(s.T.cov(), model.covariance.detach(), rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------- mixture and EM
def test_mixture_log_prob_and_posterior_match_torch():
    model = random_mixture(seed=3)
    x = torch.randn(7, 3, generator=gen(0), dtype=DOUBLE) * 3
    components = Independent(Normal(model.means, model.log_std.exp()), 1)
    reference = MixtureSameFamily(Categorical(logits=model.logits), components)
    torch.testing.assert_close(model.log_prob(x), reference.log_prob(x), rtol=0, atol=1e-12)
    bayes = (model.log_weights + components.log_prob(x[:, None, :])).softmax(1)
    torch.testing.assert_close(model.posterior(x), bayes, rtol=0, atol=1e-12)


def test_em_e_step_closes_the_gap_and_m_step_raises_the_bound():
    x, *_ = separated_blobs(300, seed=1)
    model = L.GaussianMixture(2, 4).double()
    history = model.fit_em(x, steps=25, seed=3)
    ll, after_e, after_m = history
    assert ll.shape == (26,) and after_e.shape == after_m.shape == (25,)
    torch.testing.assert_close(after_e, ll[:-1], rtol=0, atol=1e-10)  # E-step: ELBO = log p
    assert (after_m >= after_e - 1e-12).all()  # M-step: the bound rises ...
    assert (ll[1:] >= after_m - 1e-12).all()  # ... and log p stays above it
    assert (ll.diff() >= -1e-12).all() and ll[-1] > ll[0] + 0.5
    assert (after_m - after_e)[:3].min() > 1e-3  # a real staircase, not a flat line


def test_em_m_step_maximises_the_elbo():
    x, *_ = separated_blobs(200, seed=2)
    model = L.GaussianMixture(2, 3).double().initialise(x, seed=0)
    r = torch.softmax(torch.randn(200, 3, generator=gen(5), dtype=DOUBLE), 1)  # any responsibilities
    before = model.elbo(x, r).mean()
    model.m_step(x, r)
    after = model.elbo(x, r).mean()
    assert after > before
    after.backward()  # θ maximises ELBO(r, θ): the gradient vanishes
    for p in model.parameters():
        assert p.grad.abs().max() < 1e-9


def test_em_recovers_separated_components():
    x, means, stds, weights = separated_blobs(1500, seed=0)
    model = L.GaussianMixture(2, 3).double()
    model.fit_em(x, steps=60, seed=0)
    order = torch.cdist(means, model.means.detach()).argmin(1)  # match each true component
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(model.means.detach()[order], means, rtol=0, atol=0.1)
    torch.testing.assert_close(model.log_std.detach().exp()[order], stds, rtol=0, atol=0.1)
    torch.testing.assert_close(model.log_weights.detach().exp()[order], weights, rtol=0, atol=0.04)


def test_em_agrees_with_sklearn_from_the_same_start():
    mixture = pytest.importorskip("sklearn.mixture")
    x, *_ = separated_blobs(400, seed=3)
    model = L.GaussianMixture(2, 3).double().initialise(x, seed=1)
    start = [t.detach().clone() for t in (model.log_weights.exp(), model.means, model.log_std.exp() ** 2)]
    model.fit_em(x, steps=8, initialise=False)
    reference = mixture.GaussianMixture(3, covariance_type="diag", reg_covar=0.0, tol=0.0, max_iter=8,
                                        init_params="random", random_state=0, weights_init=start[0].numpy(),
                                        means_init=start[1].numpy(), precisions_init=(1 / start[2]).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": we ask for exactly 8 steps
        reference.fit(x.numpy())
    for ours, theirs in ((model.log_weights.exp(), reference.weights_), (model.means, reference.means_),
                         (model.log_std.exp() ** 2, reference.covariances_)):
        torch.testing.assert_close(ours.detach(), torch.from_numpy(theirs), rtol=0, atol=1e-8)
    assert model.log_prob(x).mean().item() == pytest.approx(reference.score(x.numpy()), abs=1e-8)


def test_em_is_deterministic_and_floors_the_variance():
    x, *_ = separated_blobs(100, seed=4)
    a, b = (L.GaussianMixture(2, 3).double() for _ in range(2))
    assert torch.equal(a.fit_em(x, 5, seed=7).log_likelihood, b.fit_em(x, 5, seed=7).log_likelihood)
    x = torch.cat([x, x[:1].repeat(5, 1)])  # a component can collapse on the repeated point
    model = L.GaussianMixture(2, 4).double()
    model.initialise(x, seed=0)
    with torch.no_grad():
        model.means[0] = x[0]
        model.log_std[0] = -4.0
    history = model.fit_em(x, 30, initialise=False)
    variances = model.log_std.detach().exp() ** 2
    assert variances.min().item() == pytest.approx(L.VAR_FLOOR, rel=1e-9)  # collapsed, and held at the floor
    assert (history.log_likelihood.diff() >= -1e-12).all() and torch.isfinite(history.log_likelihood).all()


def test_mixture_samples_follow_the_weights():
    model = random_mixture(dim=2, k=3, seed=6)
    torch.manual_seed(0)
    x, z = model.sample(30_000, return_latent=True)
    freq = torch.bincount(z, minlength=3).double() / len(z)
    torch.testing.assert_close(freq, model.log_weights.exp().detach(), rtol=0, atol=0.015)
    for k in range(3):
        torch.testing.assert_close(x[z == k].mean(0), model.means[k].detach(), rtol=0, atol=0.1)


# ---------------------------------------------------------------------------- quadrature
@pytest.mark.parametrize("d,n", [(1, 2001), (2, 301)])
def test_quadrature_matches_the_exact_marginal_and_posterior(d, n):
    model = random_ppca(4, d, seed=10 + d, log_sigma=-0.2)
    x = model.sample(5)
    grid = L.grid_posterior(model.log_joint, x, dim=d, lo=-6, hi=6, n=n)
    assert grid.z.shape == (n**d, d) and grid.log_density.shape == (5, n**d)
    torch.testing.assert_close(grid.log_marginal, model.log_prob(x).detach(), rtol=0, atol=1e-8)
    p = grid.probabilities
    torch.testing.assert_close(p.sum(1), torch.ones(5, dtype=DOUBLE), rtol=0, atol=1e-12)
    exact = model.posterior(x)
    mean = p @ grid.z
    torch.testing.assert_close(mean, exact.mean.detach(), rtol=0, atol=1e-8)
    centred = grid.z[None] - mean[:, None]
    cov = torch.einsum("ng,ngi,ngj->nij", p, centred, centred)
    torch.testing.assert_close(cov, exact.covariance_matrix.detach(), rtol=0, atol=1e-8)
    wide = random_gaussians(5, d, seed=1)  # q well inside the grid, about the posterior
    q = MultivariateNormal(exact.mean.detach() + 0.3 * wide.loc, 0.03 * wide.covariance_matrix)
    q_full = q
    if d == 1:
        q = Normal(q.loc, q.stddev)
    torch.testing.assert_close(grid.kl_from(q), kl_divergence(q_full, exact).detach(), rtol=0, atol=1e-6)


def test_quadrature_grid_error_shrinks_with_the_grid():
    model = L.LinearGaussian(3, 1, seed=0).double()  # posterior standard deviation 0.24
    with torch.no_grad():
        model.log_sigma.fill_(-0.4)
    x = model.sample(4)
    exact = model.log_prob(x).detach()
    errors = [(L.log_marginal_by_quadrature(model.log_joint, x, lo=-6, hi=6, n=n) - exact).abs().max()
              for n in (11, 21, 41, 81)]  # spacing 1.2, 0.6, 0.3, 0.15
    assert errors[0] > 0.1 and errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-12
    centre = model.posterior(x[:1]).mean.item()  # a box that misses half of the posterior:
    half = L.log_marginal_by_quadrature(model.log_joint, x[:1], lo=centre, hi=centre + 6, n=30001)
    assert (exact[0] - half).item() == pytest.approx(math.log(2), abs=1e-3)  # log p too low by log 2


# ---------------------------------------------------------------------------- the bimodal toy
def test_bimodal_toy_posterior_has_two_modes_that_one_gaussian_cannot_fit():
    toy = L.BimodalToy(noise_std=0.5)
    x = torch.tensor([[2.0], [-1.0]], dtype=DOUBLE)
    grid = toy.posterior(x)
    density = grid.log_density[0]
    peaks = ((density[1:-1] > density[:-2]) & (density[1:-1] > density[2:])).nonzero().flatten() + 1
    mode = math.sqrt(2.0 - 0.5**2 / 2)  # d/dz [−(x − z²)²/(2s²) − z²/2] = 0 at z² = x − s²/2
    assert len(peaks) == 2 and grid.z[peaks, 0].tolist() == pytest.approx([-mode, mode], abs=2e-3)
    q, gap = toy.unimodal_gap(x, seed=0)
    # the gap is the KL from q to the exact posterior, computed two independent ways
    torch.testing.assert_close(gap, grid.kl_from(q), rtol=0, atol=1e-6)
    assert gap[0] > 0.6 and 0 <= gap[1] < 0.01  # one mode missed: about log 2; unimodal: tight
    # the fit is the best Gaussian: the reverse-KL fit of Chapter 2 finds the same one
    mu, sigma = divergences.fit_gaussian_1d(lambda z: toy.log_joint(x[:1], z[:, None, None])[:, 0],
                                            "reverse", lo=-5, hi=5)
    assert abs(abs(q.loc[0, 0].item()) - abs(mu)) < 0.02 and abs(q.scale[0, 0].item() - sigma) < 0.02


def test_bimodal_toy_elbo_is_exact():
    toy = L.BimodalToy(noise_std=0.3)
    x, _ = toy.sample(3, seed=1)
    x = x.double()
    q = Normal(torch.tensor([[0.5], [-1.0], [0.1]], dtype=DOUBLE), torch.tensor([[0.3], [0.6], [1.1]], dtype=DOUBLE))
    grid = toy.posterior(x, lo=-10, hi=10, n=12001)  # q's tails meet log p(x | z) ~ −z⁴
    torch.testing.assert_close(grid.log_marginal - toy.elbo(x, q), grid.kl_from(q), rtol=0, atol=1e-8)
    torch.manual_seed(0)
    z = q.sample((20_000,))
    mc = toy.log_joint(x, z) - q.log_prob(z).sum(-1)
    assert ((mc.mean(0) - toy.elbo(x, q)).abs() < 4 * mc.std(0) / math.sqrt(len(z))).all()


# ---------------------------------------------------------------------------- errors
def test_bad_inputs_get_clear_errors():
    model = random_ppca(4, 2)
    x = model.sample(3)
    with pytest.raises(TypeError, match="MultivariateNormal"):
        model.elbo(x, Categorical(probs=torch.ones(3, 2)))
    with pytest.raises(ValueError, match="N = 3 latents"):
        model.elbo(x, random_gaussians(5, 2, seed=0))
    with pytest.raises(ValueError, match=r"z should have shape \(\.\.\., N, 2\)"):
        model.log_joint(x, torch.zeros(3, 3, dtype=DOUBLE))
    with pytest.raises(ValueError, match="latent_dim < dim"):
        L.LinearGaussian(3, 3).fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match="subspace"):
        L.LinearGaussian(3, 1).fit(torch.randn(10, 1) * torch.ones(1, 3))
    mixture = random_mixture()
    x = mixture.sample(4)
    with pytest.raises(ValueError, match="sum to 1"):
        mixture.elbo(x, torch.full((4, 4), 0.5, dtype=DOUBLE))
    with pytest.raises(ValueError, match="shape"):
        mixture.elbo(x, torch.full((4, 3), 1 / 3, dtype=DOUBLE))
    with pytest.raises(ValueError, match="at least as many points"):
        L.GaussianMixture(3, 5).fit_em(torch.randn(4, 3))
    with pytest.raises(ValueError, match="dimension 1 or 2"):
        L.grid_posterior(model.log_joint, x, dim=3)
    with pytest.raises(ValueError, match="noise_std"):
        L.BimodalToy(0.0)
