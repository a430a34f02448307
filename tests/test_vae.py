"""Claims C21-C24: the VAE, its bounds (ELBO, IWAE), its priors and posteriors, and its diagnostics."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import Independent, MixtureSameFamily, MultivariateNormal, Normal, Categorical
from torch.distributions import kl_divergence

from dgmlab import autoregressive as A
from dgmlab import embedded
from dgmlab import latent as L
from dgmlab import vae as V
from dgmlab.metrics import heldout_nll
from dgmlab.train import fit, load_checkpoint


def randomise(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ------------------------------------------------------------------ a linear-Gaussian VAE with an exact log p(x)
def linear_gaussian_vae(W, b, sigma, *, posterior="gaussian", prior=None, **iaf):
    """x | z ~ N(Wz + b, σ² I), z ~ N(0, I): a VAE whose decoder is linear, with a linear encoder
    (no hidden layer: the features are x itself)."""
    D, d = W.shape
    enc = V.Encoder(D, hidden=())
    q = V.GaussianPosterior(D, d) if posterior == "gaussian" else V.IAFPosterior(D, d, **iaf)
    dec = V.GaussianDecoder(D, d, hidden=())
    with torch.no_grad():
        dec.net[0].weight.copy_(W)
        dec.net[0].bias.copy_(b)
        dec.log_sigma.fill_(math.log(sigma))
    return V.VAE(enc, q, dec, prior if prior is not None else V.StandardNormal(d))


def exact_log_p(W, b, sigma, x):
    """log N(x; b, WWᵀ + σ²I): the marginal of the linear-Gaussian model."""
    cov = W @ W.T + sigma**2 * torch.eye(len(W), dtype=W.dtype)
    return MultivariateNormal(b, cov).log_prob(x)


def exact_posterior(W, b, sigma, x):
    """p(z | x) = N(M⁻¹Wᵀ(x − b), σ²M⁻¹), M = WᵀW + σ²I."""
    M = W.T @ W + sigma**2 * torch.eye(W.shape[1], dtype=W.dtype)
    Minv = torch.linalg.inv(M)
    return (x - b) @ W @ Minv.T, sigma**2 * Minv


def exact_elbo(W, b, sigma, x, mu, s):
    """The ELBO in closed form for q = N(mu, diag s²) per row: E_q log p(x|z) − KL(q ‖ N(0, I))."""
    resid = x - mu @ W.T - b
    spread = (W**2 @ (s**2).T).T  # diag(W diag(s²) Wᵀ), per row
    D = W.shape[0]
    rec = -0.5 * D * math.log(2 * math.pi * sigma**2) - ((resid**2).sum(1) + spread.sum(1)) / (2 * sigma**2)
    return rec - V.gaussian_kl(mu, s.log()).sum(1)


W_CORRELATED = torch.tensor([[1.0, 0.9], [0.8, 1.0], [1.2, 1.1], [0.5, 0.6]], dtype=torch.float64)
B = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)
SIGMA = 0.5


def model_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return z @ W_CORRELATED.T + B + SIGMA * torch.randn(n, 4, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ a small VAE trained on the binary digits
@pytest.fixture(scope="module")
def trained():
    x = embedded.digits("train", "binary", flatten=True).x
    torch.manual_seed(0)
    model = V.vae_mlp(64, 4, decoder="bernoulli", hidden=(64,))
    fit(model, x, epochs=30, batch_size=64, lr=3e-3, progress=False)
    return model, x


# ============================================================================ the KL term
def test_gaussian_kl_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, log_sigma = torch.randn(6, 3, generator=g, dtype=torch.float64), 0.5 * torch.randn(6, 3, generator=g,
                                                                                           dtype=torch.float64)
    ours = V.gaussian_kl(mu, log_sigma)
    q, p = Normal(mu, log_sigma.exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(ours, kl_divergence(q, p), atol=1e-12)
    torch.manual_seed(0)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z))
    assert ((ours - mc.mean(0)).abs() < 4 * mc.std(0) / math.sqrt(len(z))).all()


def test_the_vae_kl_closed_form_equals_its_monte_carlo_estimate(trained):
    model, x = trained
    assert model.analytic_kl
    torch.manual_seed(0)
    closed = model.elbo(x[:50]).kl
    h = model.encoder(x[:50])
    z, log_q = model.posterior.rsample(h, 4000)
    mc = (log_q - model.prior.log_prob(z)).mean(0)  # the estimator used for priors without a closed form
    assert torch.allclose(closed, mc, atol=0.15)
    # the KL per dimension adds up to the total
    assert V.kl_per_dimension(model, x).sum().item() == pytest.approx(model.elbo(x).kl.mean().item(), rel=1e-5)


# ============================================================================ C21 ELBO surgery
def test_c21_elbo_surgery_against_closed_forms_where_everything_is_gaussian():
    """Gaussian data and a linear-Gaussian encoder: q_agg is Gaussian, and I_q and KL(q_agg ‖ p) have closed forms."""
    D, d, n = 3, 2, 2000
    g = torch.Generator().manual_seed(0)
    L = torch.tensor([[1.0, 0, 0], [0.5, 0.8, 0], [-0.3, 0.2, 0.6]], dtype=torch.float64)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) @ L.T  # Σx = LLᵀ
    A_, b = torch.tensor([[0.8, -0.2, 0.3], [0.1, 0.6, -0.4]], dtype=torch.float64), torch.tensor([0.3, -0.2],
                                                                                                   dtype=torch.float64)
    log_s = torch.tensor([math.log(0.6), math.log(0.8)], dtype=torch.float64)
    model = linear_gaussian_vae(torch.zeros(D, d), torch.zeros(D), 1.0).double()
    with torch.no_grad():  # q(z | x) = N(Ax + b, diag s²), s independent of x
        model.posterior.head.weight.copy_(torch.cat([A_, torch.zeros(d, D)]))
        model.posterior.head.bias.copy_(torch.cat([b, log_s]))
    S = torch.diag((2 * log_s).exp())
    C = A_ @ L @ L.T @ A_.T + S  # the population's q_agg = N(b, C)
    mi = 0.5 * (torch.logdet(C) - torch.logdet(S)).item()
    marginal = kl_divergence(MultivariateNormal(b, C), MultivariateNormal(torch.zeros(d, dtype=torch.float64),
                                                                          torch.eye(d, dtype=torch.float64))).item()
    torch.manual_seed(0)
    s = V.elbo_surgery(model, x, samples=4)
    assert s.mutual_information == pytest.approx(mi, abs=0.03 + 3 * s.mutual_information_se)
    assert s.marginal_kl == pytest.approx(marginal, abs=0.03 + 3 * s.marginal_kl_se)
    assert s.average_kl == pytest.approx(mi + marginal, abs=0.05)  # the population identity, up to sampling x
    assert s.average_kl == pytest.approx(s.mutual_information + s.marginal_kl, abs=4 * math.hypot(
        s.mutual_information_se, s.marginal_kl_se))


def test_c21_elbo_surgery_identity_on_a_trained_vae(trained):
    model, x = trained
    torch.manual_seed(0)
    s = V.elbo_surgery(model, x[:600], samples=8)
    assert s.average_kl_se == 0  # closed form: the identity is a real check of the two Monte-Carlo terms
    se = math.hypot(s.mutual_information_se, s.marginal_kl_se)
    assert s.average_kl == pytest.approx(s.mutual_information + s.marginal_kl, abs=4 * se + 0.02)
    assert 0.5 < s.mutual_information <= math.log(600)  # the codes carry information, at most log N
    assert s.marginal_kl > -4 * s.marginal_kl_se  # a KL: non-negative up to Monte-Carlo error


def test_aggregated_posterior_is_the_mixture_of_the_posteriors(trained):
    model, x = trained
    agg = V.AggregatedPosterior(model, x[:7])
    z = torch.randn(5, 4)
    q = model.encode(x[:7])
    by_hand = torch.logsumexp(torch.stack([q.log_prob(zi.expand(7, 4)) for zi in z]), 1) - math.log(7)
    assert torch.allclose(agg.log_prob(z), by_hand, atol=1e-5)
    torch.manual_seed(0)
    draws = agg.sample(4000)
    assert torch.allclose(draws.mean(0), q.mean.mean(0), atol=0.1)


# ============================================================================ C22 learned priors
def fit_prior(model, x, steps=300, lr=3e-2):
    """Maximise the average ELBO over the prior's parameters only, encoder and decoder frozen:
    that is, maximise E_{q_agg} log p(z) with fresh z ~ q(z | x_n) every step."""
    torch.manual_seed(0)
    h = model.encoder(x).detach()
    params = [p for p in model.prior.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        z = model.posterior.rsample(h)[0][0].detach()
        loss = -model.prior.log_prob(z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def mean_elbo(model, x, repeats=20):
    torch.manual_seed(1)
    with torch.no_grad():
        return torch.stack([model.log_prob(x) for _ in range(repeats)]).mean().item()


def test_c22_learned_prior_raises_the_elbo(trained):
    model, x = trained  # encoder and decoder stay as trained: only the priors' parameters are optimised
    torch.manual_seed(0)
    baseline = mean_elbo(model, x)
    s = V.elbo_surgery(model, x, samples=4)
    enc, q = model.encoder, model.posterior
    priors = {"mixture": V.MixturePrior(4, 10),
              "vamp": V.VampPrior(enc, q, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20]]),
              "flow": V.FlowPrior(4, layers=3, hidden=(32,))}
    gains = {}
    for name, prior in priors.items():
        torch.manual_seed(0)
        learned = V.VAE(enc, q, model.decoder, prior)
        fit_prior(learned, x, lr=3e-2 if name != "flow" else 1e-2)
        gains[name] = mean_elbo(learned, x) - baseline
        # no prior beats the aggregated posterior: avg KL(q ‖ p) = I_q + KL(q_agg ‖ p) ≥ I_q
        s_learned = V.elbo_surgery(learned, x, samples=4)
        assert s_learned.average_kl > s.mutual_information - 3 * s.mutual_information_se
    # each learned prior closes part of the gap KL(q_agg ‖ N(0, I)), and no more than all of it
    for name, gain in gains.items():
        assert 0.2 * s.marginal_kl < gain < s.marginal_kl + 0.1, (name, gain, s.marginal_kl)


def test_c22_the_aggregated_posterior_is_the_best_prior(trained):
    model, x = trained
    x = x[:400]
    agg = V.AggregatedPosterior(model, x)
    torch.manual_seed(0)
    h = model.encoder(x).detach()
    z, log_q = model.posterior.rsample(h, 8)
    z, log_q = z.detach(), log_q.detach()

    def average_kl(prior_log_prob):  # (1/N) Σ_n KL(q(z|x_n) ‖ p), Monte Carlo on the same draws
        return (log_q - prior_log_prob(z.reshape(-1, 4)).reshape(log_q.shape)).mean().item()

    best = average_kl(agg.log_prob)
    mixture = fit_prior(V.VAE(model.encoder, model.posterior, model.decoder, V.MixturePrior(4, 10)), x).prior
    for prior in [V.StandardNormal(4), mixture, V.MixturePrior(4, 3)]:
        with torch.no_grad():
            assert average_kl(prior.log_prob) > best + 0.05


# ============================================================================ C23 IWAE
def test_c23_iwae_increases_with_k_towards_log_p():
    x = model_data(16, seed=3)
    model = linear_gaussian_vae(W_CORRELATED, B, SIGMA).double()
    mean, cov = exact_posterior(W_CORRELATED, B, SIGMA, x[:1])
    with torch.no_grad():  # a mean-field posterior: exact means, too-narrow diagonal spreads
        Minv_W = torch.linalg.solve(W_CORRELATED.T @ W_CORRELATED + SIGMA**2 * torch.eye(2, dtype=torch.float64),
                                    W_CORRELATED.T)
        model.posterior.head.weight.copy_(torch.cat([Minv_W, torch.zeros(2, 4, dtype=torch.float64)]))
        model.posterior.head.bias.copy_(torch.cat([-Minv_W @ B, 0.5 * cov.diagonal().log() - 0.7]))
    ppca = L.LinearGaussian(4, 2).double()  # the chapter's exact model agrees with the closed form used here
    with torch.no_grad():
        ppca.W.copy_(W_CORRELATED), ppca.mu.copy_(B), ppca.log_sigma.fill_(math.log(SIGMA))
    assert torch.allclose(ppca.log_prob(x), exact_log_p(W_CORRELATED, B, SIGMA, x))
    log_p = exact_log_p(W_CORRELATED, B, SIGMA, x).mean().item()
    torch.manual_seed(0)
    bounds, ses = [], []
    with torch.no_grad():
        for k in (1, 10, 100, 1000):
            runs = torch.stack([model.log_prob(x, k=k).mean() for _ in range(200 if k == 1 else 30)])
            bounds.append(runs.mean().item())
            ses.append(runs.std().item() / math.sqrt(len(runs)))
    assert all(b2 > b1 for b1, b2 in zip(bounds, bounds[1:])), bounds
    assert all(b < log_p - 3 * se for b, se in zip(bounds, ses)), (bounds, log_p)
    assert log_p - bounds[-1] < 0.2 * (log_p - bounds[0]), (bounds, log_p)  # most of the gap closed
    # k = 1 is the ELBO, in expectation: the closed-form ELBO of this Gaussian q
    mu, log_s = model.posterior.params(model.encoder(x))
    elbo = exact_elbo(W_CORRELATED, B, SIGMA, x, mu.detach(), log_s.detach().exp()).mean().item()
    assert bounds[0] == pytest.approx(elbo, abs=4 * ses[0])
    torch.manual_seed(0)
    with torch.no_grad():  # the IWAE estimator with k = 1, by Monte Carlo KL, has the same expectation
        iwae1 = torch.stack([model._iwae(x, 1).mean() for _ in range(200)])
    assert iwae1.mean().item() == pytest.approx(elbo, abs=4 * iwae1.std().item() / math.sqrt(200))


def test_iwae_in_chunks_fits_memory_and_heldout_nll_takes_k(trained):
    model, x = trained
    test = embedded.digits("test", "binary", flatten=True).x
    model.iwae_batch = 2048  # chunks of 6 samples for 299 digits
    torch.manual_seed(0)
    tight = heldout_nll(model, test, k=1000)
    loose = heldout_nll(model, test)
    assert tight.is_bound and tight.nats < loose.nats
    model.iwae_batch = 10**7  # all samples at once: the same bound, up to Monte Carlo error
    torch.manual_seed(1)
    with torch.no_grad():
        one_go = -model.log_prob(test, k=1000).mean().item()
    assert one_go == pytest.approx(tight.nats, abs=0.05)
    model.iwae_batch = 4096


# ============================================================================ C24 flow posterior and prior
def train_posterior(model, x, steps=600, lr=3e-2):
    torch.manual_seed(0)
    params = [p for p in [*model.encoder.parameters(), *model.posterior.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_c24_iaf_posterior_tightens_the_bound():
    """Non-orthogonal W: the true posterior is correlated, which no diagonal Gaussian matches."""
    x = model_data(256)
    _, cov = exact_posterior(W_CORRELATED, B, SIGMA, x[:1])
    rho = (cov[0, 1] / cov.diagonal().prod().sqrt()).item()
    assert abs(rho) > 0.8  # strongly correlated
    log_p = exact_log_p(W_CORRELATED, B, SIGMA, x).mean().item()
    torch.manual_seed(0)
    gaussian = train_posterior(linear_gaussian_vae(W_CORRELATED, B, SIGMA).double(), x)
    torch.manual_seed(0)
    iaf = linear_gaussian_vae(W_CORRELATED, B, SIGMA, posterior="iaf", layers=2, hidden=(16,)).double()
    iaf = train_posterior(iaf, x)
    for m in (gaussian, iaf):
        frozen(m.decoder)
    gap_gaussian, gap_iaf = log_p - mean_elbo(gaussian, x, 50), log_p - mean_elbo(iaf, x, 50)
    # the best mean-field Gaussian misses by −½ log(1 − ρ²) (reverse KL to a correlated Gaussian)
    assert gap_gaussian == pytest.approx(-0.5 * math.log(1 - rho**2), rel=0.1)
    assert 0 < gap_iaf < 0.5 * gap_gaussian
    # a flow prior, fitted with encoder and decoder frozen, raises the Gaussian posterior's ELBO too
    frozen(gaussian)
    with_flow = V.VAE(gaussian.encoder, gaussian.posterior, gaussian.decoder,
                      V.FlowPrior(2, layers=3, hidden=(16,)).double())
    fit_prior(with_flow, x, steps=300, lr=1e-2)
    assert mean_elbo(with_flow, x, 50) > mean_elbo(gaussian, x, 50) + 0.1


def test_iaf_log_q_is_the_change_of_variables_by_brute_force():
    torch.manual_seed(0)
    q = randomise(V.IAFPosterior(5, 3, layers=2, hidden=(8,)), scale=0.4).double()
    h = torch.randn(1, 5, dtype=torch.float64)
    mu, log_sigma = q.params(h)
    torch.manual_seed(1)
    zT, log_q = q.rsample(h, 1)
    z0 = q.flow(zT[0], h)[0]  # back through the flow
    eps = (z0 - mu) / log_sigma.exp()

    def sampling_map(e):  # ε ↦ z_T, for this object
        return q.flow.inverse((mu + log_sigma.exp() * e)[None].reshape(1, 3), h)[0][0]

    J = jacobian(sampling_map, eps[0])
    brute = Normal(0.0, 1.0).log_prob(eps).sum() - torch.linalg.slogdet(J)[1]  # log N(ε) − log|det ∂z_T/∂ε|
    assert log_q.item() == pytest.approx(brute.item(), abs=1e-8)
    assert q.log_prob(zT, h).item() == pytest.approx(log_q.item(), abs=1e-8)  # the density direction agrees
    assert not torch.allclose(zT[0], mu + log_sigma.exp() * eps)  # the flow did something


# ============================================================================ gradient estimators
def test_reparameterised_and_score_gradients_are_unbiased_and_reparameterised_has_lower_variance():
    a, mu, log_sigma = 1.5, 0.3, math.log(0.7)

    def f(z):
        return (z - a) ** 2

    exact = torch.tensor([2 * (mu - a), 2 * math.exp(2 * log_sigma)], dtype=torch.float64)  # ∇ (σ² + (μ − a)²)
    variances = {}
    for estimator in ("reparameterised", "score"):
        g = V.gradient_estimates(f, mu, log_sigma, 20_000, estimator=estimator)
        se = g.std(0) / math.sqrt(len(g))
        assert ((g.mean(0) - exact).abs() < 4 * se).all(), (estimator, g.mean(0), exact)
        variances[estimator] = g.var(0)
    assert (variances["reparameterised"] * 3 < variances["score"]).all()


# ============================================================================ training: β and free bits
def test_beta_annealing_and_free_bits_behave_as_documented(trained):
    model, x = trained
    model = V.VAE(model.encoder, model.posterior, model.decoder, model.prior, beta=2.0, warmup_steps=100)
    assert [model.beta_at(s) for s in (0, 50, 100, 500)] == [0.0, 1.0, 2.0, 2.0]
    batch = x[:64]
    torch.manual_seed(0)
    e = model.elbo(batch)
    torch.manual_seed(0)
    (name, loss), = model.training_losses(batch, step=25)
    assert name == "model" and loss.item() == pytest.approx(-(e.reconstruction - 0.5 * e.kl).mean().item(), rel=1e-6)
    # loss(x) is −β-ELBO at the full β; with the defaults, the plain −ELBO
    torch.manual_seed(0)
    assert model.loss(batch).item() == pytest.approx(-(e.reconstruction - 2.0 * e.kl).mean().item(), rel=1e-6)
    plain = V.VAE(model.encoder, model.posterior, model.decoder, model.prior)
    torch.manual_seed(0)
    (_, train_loss), = plain.training_losses(batch, step=7)
    torch.manual_seed(0)
    assert train_loss.item() == pytest.approx(-plain.elbo(batch).elbo.mean().item(), rel=1e-6)
    # free bits: Σ_j max(λ, batch-mean KL_j); dimensions under λ get no gradient from the KL
    kl_j = V.kl_per_dimension(model, batch)
    lam = kl_j.sort().values[1].item() + 1e-3  # two dimensions below λ, two above
    fb = V.VAE(model.encoder, model.posterior, model.decoder, model.prior, free_bits=lam)
    model.eval()
    torch.manual_seed(0)
    (_, loss_fb), = fb.training_losses(batch)
    torch.manual_seed(0)
    e = fb.elbo(batch)
    assert loss_fb.item() == pytest.approx(-e.reconstruction.mean().item() + kl_j.clamp(min=lam).sum().item(),
                                           rel=1e-5)
    huge = V.VAE(model.encoder, model.posterior, model.decoder, model.prior, free_bits=100.0)
    torch.manual_seed(0)
    (_, loss_huge), = huge.training_losses(batch)
    torch.manual_seed(0)
    rec_only = -huge.elbo(batch).reconstruction.mean()
    head = model.posterior.head.weight
    g_huge, = torch.autograd.grad(loss_huge, head)
    g_rec, = torch.autograd.grad(rec_only, head)
    assert torch.allclose(g_huge, g_rec)  # every dimension is free: the KL pushes nothing
    assert V.free_bits_kl(e.kl[:, None], 0.0).item() == pytest.approx(e.kl.mean().item())


def test_fit_with_a_checkpoint_resumes_bit_for_bit(tmp_path):
    x = embedded.digits("train", "binary", flatten=True).x[:256]
    ckpt = tmp_path / "vae.pt"

    def model():
        torch.manual_seed(0)
        return V.vae_mlp(64, 3, decoder="bernoulli", hidden=(32,), prior="mixture", posterior="iaf",
                         iaf_hidden=(8,), components=3, warmup_steps=10, free_bits=0.1)

    def interrupt(epoch, history, m):  # in epoch 3, after the checkpoint of epoch 2
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model(), x, epochs=4, batch_size=64, checkpoint=ckpt, progress=False, callbacks=[interrupt])
    assert load_checkpoint(ckpt)["epoch"] == 2
    resumed = model()
    history = fit(resumed, x, epochs=4, batch_size=64, checkpoint=ckpt, progress=False)
    reference = model()
    expected = fit(reference, x, epochs=4, batch_size=64, progress=False)
    assert history.resumed_from == 2 and history.train_loss == expected.train_loss
    for (k, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


# ============================================================================ diagnostics
def test_active_units_count_the_dimensions_the_encoder_uses(trained):
    model, x = trained
    activity = V.unit_activity(model, x)
    means = model.encode(x).mean
    assert torch.allclose(activity, means.var(0))
    assert V.active_units(model, x) == int((activity > 0.01).sum())
    dead = V.VAE(model.encoder, V.GaussianPosterior(64, 4), model.decoder, model.prior)
    with torch.no_grad():  # two units whose posterior ignores x (KL = 0 too), two that copy the trained ones
        dead.posterior.head.weight.copy_(model.posterior.head.weight)
        dead.posterior.head.bias.copy_(model.posterior.head.bias)
        dead.posterior.head.weight[[0, 1, 4, 5]] = 0
        dead.posterior.head.bias[[0, 1, 4, 5]] = 0
    assert V.active_units(dead, x) == V.active_units(model, x[:, :]) - int((activity[:2] > 0.01).sum())
    assert torch.allclose(V.kl_per_dimension(dead, x)[:2], torch.zeros(2), atol=1e-7)


def test_priors_are_the_densities_they_claim(trained):
    model, x = trained
    torch.manual_seed(0)
    mix = randomise(V.MixturePrior(3, 4), seed=2)
    ref = MixtureSameFamily(Categorical(logits=mix.logits), Independent(Normal(mix.means, mix.log_scales.exp()), 1))
    z = torch.randn(10, 3)
    assert torch.allclose(mix.log_prob(z), ref.log_prob(z), atol=1e-5)
    u = torch.rand(6, 64)
    vamp = V.VampPrior(model.encoder, model.posterior, u)
    q = model.posterior(model.encoder.net(u))  # the encoder's posteriors at the pseudo-inputs
    z = torch.randn(5, 4)
    by_hand = torch.logsumexp(torch.stack([q.log_prob(zi.expand(6, 4)) for zi in z]), 1) - math.log(6)
    assert torch.allclose(vamp.log_prob(z), by_hand, atol=1e-5)
    flow = randomise(V.FlowPrior(2, layers=2, hidden=(8,)), scale=0.2)  # normalised: integrates to 1 on a grid
    g = torch.linspace(-8, 8, 401)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum().item() * (g[1] - g[0]).item() ** 2
    assert mass == pytest.approx(1.0, abs=0.01)
    for prior in (V.StandardNormal(4), mix, vamp, flow):
        assert prior.sample(7).shape == (7, prior.latent_dim)


def test_decoders_sample_from_the_distribution_they_score():
    torch.manual_seed(0)
    dec = randomise(V.CategoricalDecoder(2, 3, 5, hidden=(8,)), scale=0.5)
    z = torch.randn(1, 3).expand(20_000, 3)
    draws = dec.sample(z).reshape(-1, 2)
    probs = torch.softmax(dec.logits(z[:1]), -1)[0]  # (2, 5)
    freq = torch.stack([torch.bincount(draws[:, j], minlength=5) for j in range(2)]).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.015)
    assert torch.allclose(dec.mean(z[:1]).flatten(), probs @ torch.arange(5.0), atol=1e-6)
    bern = randomise(V.BernoulliDecoder(3, 2, hidden=(4,)))
    assert bern.sample(torch.randn(4, 2)).unique().tolist() in ([0.0, 1.0], [0.0], [1.0])
    gauss = randomise(V.GaussianDecoder(3, 2, hidden=(4,), variance="output"))
    zz = torch.randn(50_000, 2)
    zz[:] = zz[:1]
    xs = gauss.rsample(zz)
    m, log_s = gauss.params(zz[:1])
    assert torch.allclose(xs.mean(0), m[0], atol=0.05) and torch.allclose(xs.std(0), log_s[0].exp(), rtol=0.03)


# ============================================================================ the PixelCNN decoder's condition
def test_a_vector_conditioned_gated_pixelcnn_depends_on_its_context_and_stays_autoregressive():
    torch.manual_seed(0)
    model = randomise(A.GatedPixelCNN((1, 2, 2), levels=3, channels=4, layers=2, kernel=3, first_kernel=3,
                                      context_dim=2)).eval()
    assert model.context_shape == (2,)
    grid = torch.cartesian_prod(*[torch.arange(3)] * 4).reshape(-1, 1, 2, 2)  # all 81 images
    for c in (torch.zeros(2), torch.tensor([1.5, -2.0])):
        with torch.no_grad():
            assert model.log_prob(grid, c).exp().sum().item() == pytest.approx(1.0, abs=1e-5)  # normalised
    with torch.no_grad():
        a, b = model.log_prob(grid[:5], torch.zeros(2)), model.log_prob(grid[:5], torch.tensor([1.5, -2.0]))
    assert (a - b).abs().max() > 1e-3  # it depends on the context
    big = randomise(A.GatedPixelCNN((1, 5, 5), levels=3, channels=4, layers=2, kernel=3, first_kernel=3,
                                    context_dim=3)).eval()
    for pixel in [(0, 0), (2, 3), (4, 4)]:
        seen = A.receptive_field(big, pixel)[0]
        later = torch.arange(25).reshape(5, 5) >= pixel[0] * 5 + pixel[1]
        assert not seen[later].any()  # still autoregressive: no pixel at or after this one is seen
    with pytest.raises(ValueError, match="not both"):
        A.GatedPixelCNN((1, 2, 2), levels=3, num_classes=2, context_dim=2)
    with pytest.raises(ValueError, match="is conditional"):
        model.log_prob(grid[:3])


# ============================================================================ the API, shapes and errors
def test_vae_api_shapes_and_errors(trained):
    model, x = trained
    assert model.log_prob_is_bound and not model.has_rsample
    assert model.encode(x[:3]).batch_shape == (3,) and model.encode(x[:3]).event_shape == (4,)
    assert model.decode(torch.zeros(2, 4)).shape == (2, 64) and model.reconstruct(x[:2]).shape == (2, 64)
    assert model.sample(3).shape == (3, 64)
    with pytest.raises(ValueError, match="z should have shape"):
        model.decode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="k should be"):
        model.log_prob(x[:2], k=0)
    with pytest.raises(ValueError, match="expects x of shape"):
        model.elbo(torch.zeros(2, 65))
    with pytest.raises(ValueError, match="decoder should be one of"):
        V.vae_mlp(64, decoder="poisson")
    with pytest.raises(ValueError, match="at least 2"):
        V.IAFPosterior(8, 1)
    with pytest.raises(ValueError, match="KL splits over dimensions"):
        V.kl_per_dimension(V.vae_mlp(64, 2, decoder="bernoulli", prior="mixture"), x[:3])
    with pytest.raises(ValueError, match="beta and free_bits"):
        V.vae_mlp(64, decoder="bernoulli", beta=-1.0)
    iaf = V.vae_mlp(64, 3, decoder="bernoulli", hidden=(8,), posterior="iaf", iaf_hidden=(4,))
    q = iaf.encode(x[:2])
    torch.manual_seed(0)
    z = q.rsample((5,))
    torch.manual_seed(0)
    z_again, log_q = iaf.posterior.rsample(iaf.encoder(x[:2]), 5)
    assert z.shape == (5, 2, 3) and torch.allclose(z, z_again)
    assert torch.allclose(q.log_prob(z), log_q, atol=1e-5)  # density direction = sampling direction
    gauss = V.vae_mlp(3, 2, decoder="gaussian", hidden=(8,))
    assert gauss.has_rsample and gauss.rsample(4).requires_grad
    pix = V.vae_mlp((1, 4, 4), 2, decoder="pixelcnn", levels=3, hidden=(8,),
                    pixelcnn=dict(channels=4, layers=1, kernel=3, first_kernel=3))
    with pytest.raises(NotImplementedError, match="sample=True"):
        pix.decode(torch.zeros(1, 2))
    assert pix.decode(torch.zeros(2, 2), sample=True).shape == (2, 1, 4, 4)
