"""Chapter 8: RBMs against brute-force enumeration (C32), CD-k against the exact gradient (C31),
AIS against exact log Z (C40), Gibbs and Langevin sampling, the neural EBM."""

import math

import pytest
import torch
from scipy.stats import chisquare

from dgmlab import ebm
from dgmlab import embedded
from dgmlab.metrics import heldout_nll
from dgmlab.train import fit

DOUBLE = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _randomised(model, g, scale):
    """The model in float64 with W ~ scale·N(0, 1) and b, c ~ N(0, 1), drawn from ``g``."""
    model = model.double()
    with torch.no_grad():
        model.W.copy_(scale * torch.randn(*model.W.shape, generator=g, dtype=DOUBLE))
        model.b.copy_(torch.randn(*model.b.shape, generator=g, dtype=DOUBLE))
        model.c.copy_(torch.randn(*model.c.shape, generator=g, dtype=DOUBLE))
    return model


def random_rbm(D, H, seed=0, scale=1.0):
    """A Bernoulli RBM in float64 with every parameter drawn at random."""
    return _randomised(ebm.RBM(D, H), gen(seed), scale)


def random_gaussian_rbm(D, H, seed=0, scale=0.7):
    """A Gaussian RBM in float64 with every parameter, log σ included, drawn at random."""
    g = gen(seed)
    model = _randomised(ebm.GaussianRBM(D, H), g, scale)
    with torch.no_grad():
        model.log_sigma.copy_(0.3 * torch.randn(D, generator=g, dtype=DOUBLE))
    return model


def brute_energy(model, v, h):
    """E(v, h) = −bᵀv − cᵀh − vᵀWh written out here, for every pair: shape (len(v), len(h))."""
    W, b, c = model.W.detach(), model.b.detach(), model.c.detach()
    return -(v @ b)[:, None] - (h @ c)[None, :] - v @ W @ h.T


def joint_table(model):
    """p(v, h) for all 2^D × 2^H pairs, and the states."""
    V, H = ebm.all_states(model.event_size), ebm.all_states(model.hidden)
    log_p = -brute_energy(model, V, H)
    return (log_p - torch.logsumexp(log_p.flatten(), 0)).exp(), V, H


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


# ----------------------------------------------------------------------------- C32
def test_c32_conditionals_are_the_sigmoids_of_the_joint_table():
    model = random_rbm(4, 4, seed=1)  # square W: a transposed W would not fail by its shape
    p, V, H = joint_table(model)
    p_h_given_v = p / p.sum(1, keepdim=True)  # (2^D, 2^H)
    expected_h = p_h_given_v @ H  # p(h_j = 1 | v) for every v
    p_v_given_h = p / p.sum(0, keepdim=True)
    expected_v = p_v_given_h.T @ V  # p(v_i = 1 | h) for every h
    with torch.no_grad():
        assert torch.allclose(model.hidden_given_visible(V).probs, expected_h, atol=1e-10)
        assert torch.allclose(model.visible_given_hidden(H).probs, expected_v, atol=1e-10)


def test_c32_gaussian_rbm_conditionals():
    """p(h | v) = σ(c + (v/σ)ᵀW) normalises exp(−E(v, ·)) over h; p(v | h) = N(b + σWh, σ²) is
    exp(−E(·, h)) up to a constant in v."""
    model = random_gaussian_rbm(3, 3, seed=2)
    v = torch.randn(50, 3, generator=gen(3), dtype=DOUBLE) * 2
    H = ebm.all_states(3)
    with torch.no_grad():
        neg_e = -torch.stack([model.energy(v, h.expand(50, 3)) for h in H], 1)  # (50, 8)
        p_h = (neg_e - torch.logsumexp(neg_e, 1, keepdim=True)).exp()
        assert torch.allclose(model.hidden_given_visible(v).probs, p_h @ H, atol=1e-10)
        for h in H:
            hh = h.expand(50, 3)
            gap = model.visible_given_hidden(hh).log_prob(v).sum(-1) + model.energy(v, hh)
            assert gap.std() < 1e-10  # the same constant for every v
        sigma = model.log_sigma.exp()
        assert torch.allclose(model.visible_given_hidden(H).mean, model.b + sigma * (H @ model.W.T))


def test_free_energy_sums_out_the_hidden_layer():
    model = random_rbm(5, 3, seed=4)
    V, H = ebm.all_states(5), ebm.all_states(3)
    with torch.no_grad():
        assert torch.allclose(model.free_energy(V), -torch.logsumexp(-brute_energy(model, V, H), 1), atol=1e-10)
        assert torch.allclose(model.energy(V[:8], H[:8]), brute_energy(model, V[:8], H[:8]).diagonal())


def test_gaussian_free_energy_and_log_z_by_quadrature():
    model = random_gaussian_rbm(2, 3, seed=5)
    t = torch.linspace(-12, 12, 601, dtype=DOUBLE)
    grid = torch.cartesian_prod(t, t)
    H = ebm.all_states(3)
    with torch.no_grad():
        v = grid[::997]
        brute_f = -torch.logsumexp(-torch.stack([model.energy(v, h.expand(len(v), 3)) for h in H], 1), 1)
        assert torch.allclose(model.free_energy(v), brute_f, atol=1e-10)
        quad = torch.logsumexp(-model.free_energy(grid), 0) + 2 * math.log(t[1] - t[0])
        assert abs(model.log_normalizer().item() - quad.item()) < 1e-6


@pytest.mark.parametrize("D, H", [(5, 3), (3, 5)])  # summing over the hidden, then over the visible layer
def test_exact_log_z_against_brute_force_over_all_pairs(D, H):
    model = random_rbm(D, H, seed=6)
    V, Hs = ebm.all_states(D), ebm.all_states(H)
    brute = torch.logsumexp(-brute_energy(model, V, Hs).flatten(), 0)
    assert abs(model.log_normalizer().item() - brute.item()) < 1e-10


def test_log_z_by_chunks_agrees_with_the_other_layer():
    model = random_rbm(16, 15, seed=7, scale=0.3)  # 2^15 hidden states: two chunks
    by_hidden = model.log_normalizer()
    by_visible = torch.logsumexp(-model.free_energy(ebm.all_states(16)), 0)
    assert abs(by_hidden.item() - by_visible.item()) < 1e-9


@pytest.mark.parametrize("D, H", [(6, 3), (3, 6)])
def test_log_prob_sums_to_one_over_all_visible_states(D, H):
    model = random_rbm(D, H, seed=8)
    assert abs(model.log_prob(ebm.all_states(D)).exp().sum().item() - 1) < 1e-10


def test_too_large_to_enumerate_points_to_ais_and_an_estimate_is_used():
    model = ebm.RBM(30, 25)
    with pytest.raises(ValueError, match="annealed importance sampling"):
        model.log_prob(torch.zeros(2, 30))
    est = ebm.AISEstimate(12.5, 0.25, torch.zeros(3))
    model.set_log_normalizer(est)
    x = torch.bernoulli(torch.full((4, 30), 0.5))
    assert torch.allclose(model.log_prob(x), -model.free_energy(x) - 12.5)
    nll = heldout_nll(model, x)
    per_object = (model.free_energy(x) + 12.5).double()
    assert math.isclose(nll.stderr, math.hypot(per_object.std().item() / 2, 0.25), rel_tol=1e-5)
    next(model.training_losses(x))  # a training step makes the estimate stale: forgotten
    assert model.log_normalizer_estimate is None


# ----------------------------------------------------------------------------- C31
def brute_gradient(model, x):
    """−(data statistics − model statistics) of the NLL, from the joint table."""
    p, V, H = joint_table(model)
    ph = torch.sigmoid(model.c.detach() + x @ model.W.detach())
    model_W = V.T @ p @ H  # E_model[v hᵀ]
    return {"W": -(x.T @ ph / len(x) - model_W), "b": -(x.mean(0) - p.sum(1) @ V),
            "c": -(ph.mean(0) - p.sum(0) @ H)}


def test_c31_exact_gradient_is_data_minus_model_statistics():
    model = random_rbm(5, 4, seed=9)
    x = torch.bernoulli(torch.full((12, 5), 0.4), generator=gen(10)).double()
    got, expected = ebm.rbm_gradient(model, x, method="exact"), brute_gradient(model, x)
    for name in ("W", "b", "c"):
        assert torch.allclose(got[name], expected[name], atol=1e-10), name


def test_c31_cd_k_bias_shrinks_as_k_grows():
    """Averaged over 16,000 chains, CD-k's gradient approaches the exact gradient as k grows."""
    model = random_rbm(6, 4, seed=0, scale=1.5)
    x = torch.bernoulli(torch.full((8, 6), 0.5), generator=gen(1)).double().repeat(2000, 1)
    exact = flat(ebm.rbm_gradient(model, x, method="exact"))
    bias = {k: (flat(ebm.rbm_gradient(model, x, method="cd", k=k)) - exact).norm().item() / exact.norm().item()
            for k in (1, 2, 5, 30)}
    assert bias[1] > 0.25  # CD-1 is far off on this model
    assert bias[1] > 1.5 * bias[2] > 2.25 * bias[5]
    assert bias[30] < 0.05  # the Monte-Carlo noise of 16,000 chains


# ----------------------------------------------------------------------------- C40
def test_c40_ais_agrees_with_exact_log_z_and_its_spread_shrinks():
    model = random_rbm(30, 12, seed=2, scale=0.5)
    exact = model.log_normalizer().item()
    data = torch.bernoulli(torch.sigmoid(model.b.detach()).expand(500, -1), generator=gen(3))
    runs = {T: ebm.ais(model, data=data, chains=100, temperatures=T, seed=4) for T in (10, 100, 1000)}
    spread = {T: r.log_weights.std().item() for T, r in runs.items()}
    assert spread[10] > 2 * spread[100] > 4 * spread[1000]
    best = runs[1000]
    assert abs(best.log_z - exact) < max(0.1, 4 * best.stderr) and best.stderr < 0.05
    assert abs(runs[10].log_z - exact) > abs(best.log_z - exact)


def test_ais_for_the_gaussian_rbm_and_with_a_piecewise_schedule():
    model = random_gaussian_rbm(5, 6, seed=11, scale=0.5)
    est = ebm.ais(model, chains=200, temperatures=500, schedule="piecewise", seed=0)
    assert abs(est.log_z - model.log_normalizer().item()) < max(0.05, 4 * est.stderr)


def test_ais_schedules():
    for kind in ("linear", "piecewise"):
        b = ebm.ais_schedule(145, kind)
        assert len(b) == 146 and b[0] == 0 and b[-1] == 1 and (b.diff() > 0).all()
    late = ebm.ais_schedule(145, "piecewise")
    assert (late > 0.9).sum() > 0.6 * 145  # most steps where p_β changes fastest


# ------------------------------------------------------------------- sampling and training
def test_gibbs_chains_reach_the_exact_distribution():
    model = random_rbm(4, 4, seed=12)
    p = model.log_prob(ebm.all_states(4)).exp().detach()
    n = 20_000
    v = model.sample(n, steps=50)
    counts = torch.bincount((v * 2 ** torch.arange(4, dtype=DOUBLE)).sum(1).long(), minlength=16)
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
    start = torch.zeros(3, 4, dtype=DOUBLE)
    assert model.sample(3, steps=0, start=start).equal(start)


def test_pcd_keeps_its_chains_between_batches_and_cd_starts_at_the_data():
    model = random_rbm(6, 3, seed=13)
    model.training_method, model.num_chains = "pcd", 5
    x1 = torch.bernoulli(torch.full((4, 6), 0.5), generator=gen(1)).double()
    x2 = 1 - x1
    next(model.training_losses(x1))
    assert model.chains.shape == (5, 6)  # its own number of chains, not the batch size
    before = model.chains.clone()
    torch.manual_seed(5)
    expected = model.gibbs(before, 1)
    torch.manual_seed(5)
    next(model.training_losses(x2))
    assert model.chains.equal(expected)  # continued from where the last batch left them
    model.training_method, model.chains = "cd", None
    torch.manual_seed(6)
    expected_cd = model.free_energy(x2).mean() - model.free_energy(model.gibbs(x2, 1)).mean()
    torch.manual_seed(6)
    assert torch.allclose(next(model.training_losses(x2))[1], expected_cd)
    assert model.chains is None


@pytest.mark.parametrize("training", ebm.TRAINING_METHODS)
def test_fit_lowers_the_exact_nll_on_binary_digits(training):
    x = embedded.digits("train", "binary").x[:400]
    model = ebm.RBM((1, 8, 8), 8, training=training, k=1)
    before = heldout_nll(model, x).nats
    fit(model, x, epochs=3, batch_size=20, lr=1e-2, progress=False)
    after = heldout_nll(model, x).nats
    assert after < before - 5


def test_rbm_gradient_leaves_the_settings_alone():
    model = random_rbm(4, 3)
    ebm.rbm_gradient(model, torch.ones(2, 4, dtype=DOUBLE), method="cd", k=3)
    assert (model.training_method, model.k) == ("cd", 1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="training"):
        ebm.RBM(4, 3, training="cd10")
    with pytest.raises(ValueError, match="sigma"):
        ebm.GaussianRBM(4, 3, sigma=0.0)
    with pytest.raises(ValueError, match="start should hold"):
        ebm.RBM(4, 3).sample(2, start=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="data should hold"):
        ebm.ais(ebm.RBM(4, 3), data=torch.zeros(5, 7))


# ------------------------------------------------------------------------ Langevin and the EBM
def test_langevin_samples_a_known_gaussian():
    mu, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])
    energy = lambda x: 0.5 * (((x - mu) / std) ** 2).sum(-1)  # noqa: E731
    x = ebm.langevin(energy, torch.zeros(4000, 2), steps=1500, step_size=0.02)
    assert torch.allclose(x.mean(0), mu, atol=0.06)
    assert torch.allclose(x.std(0), std, rtol=0.05)


def test_neural_ebm_fit_lowers_the_energy_of_data_below_noise():
    toy = embedded.toy_density("eight_gaussians")
    x = toy.sample(2000, seed=0)
    model = ebm.NeuralEBM(hidden=(32, 32), buffer_size=2000, langevin_steps=20, step_size=0.01, box=(-4, 4))
    fit(model, x, epochs=4, batch_size=128, lr=3e-3, progress=False)
    with torch.no_grad():
        gap = model.energy(model.uniform(2000)).mean() - model.energy(x).mean()
    s = model.sample(500, steps=200)
    noise = model.uniform(500)
    assert gap > 1.0
    assert s.shape == (500, 2) and torch.isfinite(s).all()
    assert toy.log_prob(s).clamp(min=-50).mean() > toy.log_prob(noise).clamp(min=-50).mean() + 5


def test_c40_ais_is_unbiased_in_z_even_with_few_temperatures():
    """E[w] = Z / Z_A for any number of temperatures: with 3 of them and 50,000 chains the mean
    weight is right within its standard error, though the log-weights spread widely."""
    model = random_rbm(10, 5, seed=14, scale=1.0)
    est = ebm.ais(model, chains=50_000, temperatures=3, seed=0)
    assert est.log_weights.std() > 0.5
    assert abs(est.log_z - model.log_normalizer().item()) < 3 * est.stderr


def test_log_z_is_summed_again_when_a_parameter_changes():
    model = random_rbm(5, 3, seed=15)
    x = ebm.all_states(5)
    with torch.no_grad():
        first = model.log_prob(x)
        model.W.add_(0.5)  # in place, as an optimiser step
        assert torch.allclose(model.log_prob(x).exp().sum(), torch.tensor(1.0, dtype=DOUBLE))
        assert not torch.allclose(model.log_prob(x), first)
    fresh = random_rbm(5, 3, seed=16)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh.log_prob(x), model.log_prob(x))


def test_ais_is_reproducible_and_leaves_the_global_random_stream_alone():
    model = random_rbm(6, 3, seed=17)
    state = torch.get_rng_state()
    a = ebm.ais(model, chains=10, temperatures=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert ebm.ais(model, chains=10, temperatures=20, seed=3).log_weights.equal(a.log_weights)


def test_a_base_rate_start_spreads_the_weights_less_than_a_uniform_one():
    model = random_rbm(30, 8, seed=18, scale=0.3)
    with torch.no_grad():
        model.b.mul_(3)  # pixels far from 50/50, as in digits
    data = torch.bernoulli(torch.sigmoid(model.b.detach()).expand(1000, -1), generator=gen(19))
    fitted = ebm.ais(model, data=data, chains=200, temperatures=30, seed=0)
    uniform = ebm.ais(model, chains=200, temperatures=30, seed=0)
    assert fitted.log_weights.std() < 0.5 * uniform.log_weights.std()
    exact = model.log_normalizer().item()
    assert abs(fitted.log_z - exact) < abs(uniform.log_z - exact)


def test_heldout_nll_by_ais_agrees_with_the_exact_nll_within_its_error():
    model = random_rbm(20, 10, seed=20, scale=0.3)
    x = torch.bernoulli(torch.sigmoid(model.b.detach()).expand(300, -1), generator=gen(21))
    exact = heldout_nll(model, x)
    nll, est = ebm.heldout_nll_by_ais(model, x, data=x, **ebm.DIGITS_AIS)
    assert abs(nll.nats - exact.nats) < max(0.02, 3 * est.stderr)
    assert nll.stderr > exact.stderr and model.log_normalizer_stderr == est.stderr


@pytest.mark.parametrize("training", ["cd", "exact"])
def test_gaussian_rbm_learns_two_clusters(training):
    g = gen(22)
    centre = torch.tensor([1.5, -1.0, 0.5])
    x = torch.where(torch.rand(600, 1, generator=g) < 0.5, centre, -centre) + 0.5 * torch.randn(600, 3, generator=g)
    model = ebm.GaussianRBM(3, 4, training=training, learn_sigma=True)
    before = heldout_nll(model, x).nats
    fit(model, x, epochs=15, batch_size=30, lr=2e-2, progress=False)
    assert heldout_nll(model, x).nats < before - 0.5
