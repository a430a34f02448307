"""Claims C25-C27: Gumbel-max and Gumbel-softmax, the straight-through estimator and the stop-gradients
of the VQ-VAE; the vector quantiser, code usage, the VQ-VAE's bound and priors, and the dVAE."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.distributions import Categorical, kl_divergence

from dgmlab import autoregressive as A
from dgmlab import discrete as D
from dgmlab import embedded
from dgmlab.train import fit


def generator(seed):
    return torch.Generator().manual_seed(seed)


PI = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)


def counts_of(draws, k):
    return torch.bincount(draws.reshape(-1), minlength=k).double()


# ============================================================================ C25 Gumbel-max
def test_c25_gumbel_max_draws_are_categorical_pi():
    n = 200_000
    logits = (PI.log() + 3.0).expand(n, len(PI))  # unnormalised: only differences of logits matter
    ours = counts_of(D.gumbel_max(logits, generator=generator(0)), len(PI))
    assert stats.chisquare(ours, n * PI).pvalue > 1e-3  # against the probabilities themselves
    torch.manual_seed(1)
    ref = counts_of(Categorical(probs=PI).sample((n,)), len(PI))
    assert stats.chi2_contingency(torch.stack([ours, ref]).numpy()).pvalue > 1e-3  # against torch's sampler
    # the same test has the power to see a wrong sign of the noise: argmax(logits − G) is not Categorical(π)
    wrong = counts_of((logits - D.gumbel_noise(logits, generator=generator(0))).argmax(-1), len(PI))
    assert stats.chisquare(wrong, n * PI).pvalue < 1e-9


def test_c25_gumbel_noise_is_standard_gumbel():
    g = D.gumbel_noise(torch.zeros(100_000, dtype=torch.float64), generator=generator(0))
    assert stats.kstest(g.numpy(), stats.gumbel_r.cdf).pvalue > 1e-3
    assert torch.isfinite(g).all()


def test_gumbel_softmax_has_the_distribution_of_torchs():
    n, tau = 50_000, 0.7
    logits = PI.log().float().expand(n, len(PI))
    ours = D.gumbel_softmax(logits, tau, generator=generator(0))
    torch.manual_seed(0)
    ref = F.gumbel_softmax(logits, tau=tau)
    assert torch.allclose(ours.sum(-1), torch.ones(n))
    for k in range(len(PI)):  # every coordinate's distribution on the simplex, Bonferroni over K
        assert stats.ks_2samp(ours[:, k].numpy(), ref[:, k].numpy()).pvalue > 1e-3 / len(PI)
    hard = D.gumbel_softmax(logits, tau, hard=True, generator=generator(1))
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.equal(hard.sum(-1), torch.ones(n))
    assert stats.chisquare(hard.sum(0).double(), n * PI).pvalue > 1e-3  # the one-hot draw is Categorical(π)


# ============================================================================ C26 the relaxation
def test_c26_gumbel_softmax_tends_to_one_hot_as_tau_falls_and_to_uniform_as_it_grows():
    logits = torch.randn(2000, 5, generator=generator(0), dtype=torch.float64)
    argmax = D.gumbel_max(logits, generator=generator(1))
    largest = []
    for tau in (1e-3, 0.1, 0.5, 1.0, 5.0, 100.0, 1e5):
        y = D.gumbel_softmax(logits, tau, generator=generator(1))  # the same noise every time
        largest.append(y.max(-1).values.mean().item())
        if tau == 1e-3:
            assert torch.equal(y.argmax(-1), argmax)  # the Gumbel-max sample, as a one-hot vector
            assert largest[-1] > 0.99
        if tau == 1e5:
            assert (y - 1 / 5).abs().max() < 1e-3
    assert all(a > b for a, b in zip(largest, largest[1:]))  # monotone in τ, from 1 to 1/K


def test_c26_gradients_flow_through_gumbel_softmax_and_not_through_argmax():
    logits = torch.randn(8, 5, generator=generator(0), requires_grad=True)
    w = torch.randn(5, generator=generator(1))
    y = D.gumbel_softmax(logits, 0.5, generator=generator(2))
    (grad,) = torch.autograd.grad((y * w).sum(), logits)
    assert (grad != 0).all()
    one_hot = F.one_hot(D.gumbel_max(logits, generator=generator(2)), 5).float()
    assert not one_hot.requires_grad and one_hot.grad_fn is None  # argmax cuts the graph: no gradient at all
    with pytest.raises(RuntimeError):
        torch.autograd.grad((one_hot * w).sum(), logits)
    hard = D.gumbel_softmax(logits, 0.5, hard=True, generator=generator(2))
    assert torch.equal(hard.detach(), one_hot)  # the straight-through variant: one-hot forward ...
    (grad_hard,) = torch.autograd.grad((hard * w).sum(), logits)
    assert torch.allclose(grad_hard, grad)  # ... and the soft sample's gradient backward


# ============================================================================ C27 straight through and stop-gradients
def quantizer(ema=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    q = D.VectorQuantizer(6, 3, beta=0.3, ema=ema, **kwargs)
    if not ema:
        with torch.no_grad():
            q.codebook.copy_(torch.randn(6, 3, generator=generator(seed)))
    return q


def encoder_output(seed=1, shape=(4, 3, 2, 2)):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float32, requires_grad=True)


def test_c27_straight_through_hands_the_decoders_gradient_to_the_encoder_unchanged():
    q, z_e = quantizer(), encoder_output()
    vq = q(z_e)
    assert torch.allclose(vq.z_q, q.lookup(vq.codes), atol=1e-6)  # forward: the codes' vectors (up to rounding)
    z_q = vq.z_q
    z_q.retain_grad()
    w = torch.randn(z_q.shape, generator=generator(2))
    (torch.tanh(z_q) * w).sum().backward()  # any "decoder" loss
    assert z_e.grad is not None and torch.equal(z_e.grad, z_q.grad)
    assert q.codebook.grad is None  # the reconstruction never reaches the codebook


def test_c27_straight_through_in_the_vqvae():
    torch.manual_seed(0)
    model = D.VQVAE(num_codes=8, code_dim=4, hidden=8)
    x = embedded.digits("train").x[:6]
    z_e = model.encoder(x)
    vq = model.quantizer(z_e)
    reconstruction = -model.decoder.log_prob(x, vq.z_q).sum()
    d_zq, d_ze = torch.autograd.grad(reconstruction, [vq.z_q, z_e])
    assert torch.equal(d_zq, d_ze)


def test_c27_the_codebook_term_moves_only_the_codebook_and_the_commitment_only_the_encoder():
    q, z_e = quantizer(), encoder_output()
    vq = q(z_e)
    e = q.lookup(vq.codes)
    codebook = torch.autograd.grad(vq.codebook_loss.sum(), [z_e, q.codebook], allow_unused=True)
    commitment = torch.autograd.grad(vq.commitment_loss.sum(), [z_e, q.codebook], allow_unused=True)
    assert codebook[0] is None or torch.equal(codebook[0], torch.zeros_like(z_e))  # sg[z_e]
    assert commitment[1] is None or torch.equal(commitment[1], torch.zeros_like(q.codebook))  # sg[e]
    # what they do move, in closed form: ∂/∂e_k = 2 Σ_{j: k_j = k} (e_k − z_e,j) and ∂/∂z_e = 2β (z_e − e)
    rows = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    codes = vq.codes.reshape(-1)
    by_hand = torch.stack([2 * (q.codebook[k] - rows[codes == k]).sum(0) for k in range(6)]).detach()
    assert torch.allclose(codebook[1], by_hand, atol=1e-5)
    assert torch.allclose(commitment[0], 2 * 0.3 * (z_e - e).detach(), atol=1e-6)


def test_c27_which_parameters_each_term_of_the_vqvae_moves():
    torch.manual_seed(0)
    x = embedded.digits("train").x[:16]
    table = D.term_gradients(D.VQVAE(num_codes=8, code_dim=4, hidden=8), x)
    assert table["reconstruction"]["encoder"] > 0 and table["reconstruction"]["decoder"] > 0
    assert table["reconstruction"]["codebook"] == 0
    assert table["codebook"]["codebook"] > 0 and table["codebook"]["encoder"] == table["codebook"]["decoder"] == 0
    assert table["commitment"]["encoder"] > 0 and table["commitment"]["codebook"] == table["commitment"]["decoder"] == 0
    ema = D.term_gradients(D.VQVAE(num_codes=8, code_dim=4, hidden=8, ema=True), x)
    assert all(ema[term]["codebook"] == 0 for term in ema) and ema["codebook"]["encoder"] == 0  # a buffer


# ============================================================================ the quantiser
def test_nearest_codes_and_lookup_by_brute_force():
    q, z_e = quantizer(), encoder_output(shape=(5, 3, 3, 2))
    rows = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    d = torch.cdist(rows, q.codebook.detach()) ** 2
    assert torch.allclose(q.distances(z_e).reshape(-1, 6), d, atol=1e-5)
    assert torch.equal(q.nearest(z_e).reshape(-1), d.argmin(1)) and q.nearest(z_e).shape == (5, 3, 2)
    assert torch.equal(q.lookup(q.nearest(z_e)).permute(0, 2, 3, 1).reshape(-1, 3), q.codebook[d.argmin(1)])
    flat = q(rows)  # vectors (N, D) work too
    assert flat.codes.shape == (len(rows),) and flat.z_q.shape == rows.shape
    assert flat.commitment_loss.shape == (len(rows),)
    per_object = q(z_e)
    assert torch.allclose(per_object.codebook_loss, ((rows - q.codebook[d.argmin(1)]) ** 2).reshape(5, -1).sum(1))


def test_ema_codebook_is_the_smoothed_moving_average_of_the_assigned_vectors():
    q, z_e = quantizer(ema=True, decay=0.9, eps=1e-3), encoder_output().detach()
    with torch.no_grad():
        q.codebook.copy_(torch.randn(6, 3, generator=generator(5)))
        q.code_sum.copy_(q.codebook)
    e0, size0, sum0 = q.codebook.clone(), q.cluster_size.clone(), q.code_sum.clone()
    q.eval()
    q(z_e)
    assert torch.equal(q.codebook, e0)  # eval mode: no update
    q.train()
    vq = q(z_e)
    assert torch.equal(vq.codebook_loss, torch.zeros(4))
    rows, codes = z_e.permute(0, 2, 3, 1).reshape(-1, 3), vq.codes.reshape(-1)
    size = torch.stack([0.9 * size0[k] + 0.1 * (codes == k).sum() for k in range(6)])
    sums = torch.stack([0.9 * sum0[k] + 0.1 * rows[codes == k].sum(0) for k in range(6)])
    smoothed = (size + 1e-3) / (size.sum() + 6e-3) * size.sum()
    assert torch.allclose(q.cluster_size, size) and torch.allclose(q.code_sum, sums)
    assert torch.allclose(q.codebook, sums / smoothed[:, None], atol=1e-6)


def test_dead_codes_are_restarted_onto_encoder_outputs_of_the_batch():
    q = quantizer(restart=2)
    with torch.no_grad():
        q.codebook[0] = 100.0  # far from everything: never assigned
    z_e = encoder_output().detach()
    rows = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    q.eval()
    for _ in range(3):
        q(z_e)
    assert q.codebook[0].eq(100).all() and q.unused[0] == 0  # eval mode: no counting, no restart
    q.train()
    q(z_e)
    q(z_e)
    assert q.unused[0] == 2 and q.codebook[0].eq(100).all()
    torch.manual_seed(0)
    vq = q(z_e)  # unused for 2 batches: moved onto one of this batch's encoder outputs before quantising
    assert (rows == q.codebook[0]).all(1).any()
    assert (vq.codes == 0).any() and q.unused[0] == 0


def test_code_usage_over_an_epoch_and_its_perplexity():
    codes = torch.tensor([0, 0, 0, 1, 1, 2, 5, 5])
    usage = D.CodeUsage(8).update(codes[:4]).update(codes[4:])
    assert usage.counts.tolist() == [3, 2, 1, 0, 0, 2, 0, 0] and usage.total == 8
    assert usage.fraction_used == 4 / 8
    assert usage.perplexity == pytest.approx(math.exp(stats.entropy([3, 2, 1, 2])))
    assert D.CodeUsage(4).update(torch.arange(4)).perplexity == pytest.approx(4)
    torch.manual_seed(0)
    model, x = D.VQVAE(num_codes=8, code_dim=4, hidden=8), embedded.digits("val").x
    epoch = D.code_usage(model, x, batch_size=7)
    assert torch.equal(epoch.counts, D.code_usage(model, x).counts) and epoch.total == len(x) * 16
    per_batch = [D.CodeUsage(8).update(model.encode(part)).fraction_used for part in x.split(7)]
    assert max(per_batch) <= epoch.fraction_used  # a batch sees at most the codes of the epoch
    with pytest.raises(ValueError, match="should lie in"):
        D.CodeUsage(4).update(torch.tensor([4]))


def test_restarts_fix_codebook_collapse():
    x = embedded.digits("train").x[:400]
    usage = {}
    for name, fix in (("none", dict()), ("restarts", dict(restart=5)), ("ema and restarts", dict(ema=True, restart=5))):
        torch.manual_seed(0)
        model = D.VQVAE(num_codes=16, code_dim=8, hidden=16, **fix)
        fit(model, x, epochs=4, batch_size=32, lr=2e-3, progress=False)
        usage[name] = D.code_usage(model, x).fraction_used
    assert usage["none"] <= 0.5 < 0.9 <= min(usage["restarts"], usage["ema and restarts"])


@pytest.mark.parametrize("levels", [2, 5])
def test_the_decoder_samples_from_the_distribution_it_scores(levels):
    torch.manual_seed(0)
    decoder = D.ConvDecoder((1, 2, 2), 3, levels=levels, hidden=4, upsample=1)
    z = torch.randn(1, 3, 1, 1, generator=generator(0)).expand(40_000, 3, 1, 1)
    with torch.no_grad():
        x = decoder.sample(z)
        p = decoder.distribution(z[:1]).base_dist.probs[0]  # (1, 2, 2) for Bernoulli, (1, 2, 2, levels) otherwise
        assert torch.allclose(decoder.distribution(z[:5]).log_prob(x[:5]), decoder.log_prob(x[:5], z[:5]))
        mean = decoder.mean(z[:1])[0]
    if levels == 2:
        p = torch.stack([1 - p, p], -1)
    for pixel in range(4):
        counts = counts_of(x.reshape(len(x), 4)[:, pixel].long(), levels)
        q = p.reshape(4, levels)[pixel].double()
        assert stats.chisquare(counts, len(x) * q / q.sum()).pvalue > 1e-4
    assert torch.allclose(mean, (p * torch.arange(levels)).sum(-1), atol=1e-6)


# ============================================================================ the VQ-VAE and its bound
def tiny_vqvae(levels=2, num_codes=4, **kwargs):
    """Images of 1×2×2 pixels and a single code: every code grid and every image can be enumerated."""
    torch.manual_seed(0)
    model = D.VQVAE((1, 2, 2), levels=levels, num_codes=num_codes, code_dim=2, hidden=4, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator(p.numel())))
    return model.eval()


def test_the_vqvae_bound_is_the_nearest_codes_term_of_log_p_and_k_sums_more_terms():
    model = tiny_vqvae()
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).reshape(16, 1, 2, 2)
    with torch.no_grad():
        codes = model.encode(xs)
        grids = torch.arange(4).reshape(4, 1, 1, 1)
        log_joint = torch.stack([model.decoder.log_prob(xs, model.quantizer.lookup(g.expand(16, 1, 1)))
                                 for g in grids]) - math.log(4)  # log p(x | z) + log p(z), uniform prior
        exact = torch.logsumexp(log_joint, 0)  # log p(x) = log Σ_z p(x | z) p(z)
        bounds = [model.log_prob(xs, k=k) for k in range(1, 5)]
    assert torch.allclose(bounds[0], log_joint.gather(0, codes.reshape(1, 16)).squeeze(0))  # log p(x, z*(x))
    assert torch.allclose(model.bound(xs).bound, bounds[0])
    assert all((a < b).all() for a, b in zip(bounds, bounds[1:]))  # tighter with every term
    assert torch.allclose(bounds[-1], exact, atol=1e-5)  # every grid: the exact log p(x)
    assert torch.logsumexp(exact, 0).exp().item() == pytest.approx(1.0, abs=1e-5)  # a distribution over x
    assert torch.logsumexp(bounds[0], 0).exp().item() < 1  # the bound's mass falls short
    with pytest.raises(ValueError, match="k should be at most"):
        model.log_prob(xs, k=5)


def test_vqvae_losses_in_training_and_eval_mode():
    torch.manual_seed(0)
    model, x = D.VQVAE(num_codes=8, code_dim=4, hidden=8), embedded.digits("train").x[:8]
    model.train()
    t = model.terms(x)
    assert all(v.shape == (8,) for v in t[:3]) and t.codes.shape == (8, 4, 4)
    assert torch.allclose(model.loss(x), (-t.reconstruction + t.codebook + t.commitment).mean())
    assert torch.allclose(next(model.training_losses(x))[1], model.loss(x))
    model.eval()
    assert torch.allclose(model.loss(x), -model.log_prob(x).mean())
    b = model.bound(x)
    assert torch.allclose(b.prior, torch.full((8,), -16 * math.log(8)))  # uniform prior: −h·w·log K
    assert torch.allclose(b.reconstruction, t.reconstruction)  # the decoder sees the same codes
    assert model.reconstruct(x).shape == x.shape and model.decode(model.encode(x), sample=True).dtype == torch.long


@pytest.mark.parametrize("prior", ["pixelcnn", "transformer"])
def test_a_class_conditional_prior_over_codes_plugs_in_and_learns(prior):
    x, y = embedded.digits("train")
    x, y = x[:300], y[:300]
    torch.manual_seed(0)
    model = D.VQVAE(num_codes=8, code_dim=4, hidden=8, restart=3)
    fit(model, x, epochs=2, batch_size=32, progress=False)
    grid = model.grid_shape
    net = (A.PixelCNN(grid, levels=8, num_classes=10, channels=16, layers=2, kernel=3, first_kernel=3)
           if prior == "pixelcnn" else A.Transformer(grid, 8, d_model=16, heads=2, layers=1, num_classes=10))
    history = D.fit_prior(model, net, x, y, epochs=4, batch_size=32, lr=3e-3, progress=False)
    assert model.prior is net and model.context_shape == () and len(history) == 4
    codes = model.encode(x)
    with torch.no_grad():
        b = model.bound(x, y)
        assert torch.allclose(b.prior, net.log_prob(codes[:, None], y))
        assert torch.allclose(model.log_prob(x, y), b.bound)
    assert -b.prior.mean() < 16 * math.log(8) - 1  # better than the uniform prior over the codes
    s = model.sample(5, context=3)
    assert s.shape == (5, 1, 8, 8) and bool(model.support.check(s).all())
    with pytest.raises(ValueError, match="is conditional"):
        model.log_prob(x[:2])  # the prior needs the labels


def test_vqvae_refuses_bad_input():
    model = D.VQVAE(num_codes=8, code_dim=4, hidden=8)
    with pytest.raises(ValueError, match="divisible"):
        D.VQVAE((1, 7, 7))
    with pytest.raises(ValueError, match="should model code grids of shape"):
        model.prior = A.PixelCNN((1, 8, 8), levels=8)
    with pytest.raises(ValueError, match="should model code grids"):
        model.prior = D.UniformCodes((1, 4, 4), 9)
    with pytest.raises(TypeError, match="GenerativeModel"):
        model.prior = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="expects x of shape"):
        model.log_prob(torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="should lie in"):
        model.log_prob(torch.full((2, 1, 8, 8), 17))
    with pytest.raises(ValueError, match="unconditional"):
        model.log_prob(torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        model.quantizer(torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="codes should lie in"):
        model.decode(torch.full((2, 4, 4), 8))
    with pytest.raises(ValueError, match="tau should be positive"):
        D.gumbel_softmax(torch.zeros(3), 0.0)
    with pytest.raises(TypeError, match="VQVAE or DVAE"):
        D.code_usage(torch.nn.Linear(2, 2), torch.zeros(2, 2))


@pytest.mark.parametrize("settings, shape", [(D.MNIST_VQVAE, (1, 28, 28)), (D.CIFAR_VQVAE, (3, 32, 32))],
                         ids=["mnist", "cifar"])
def test_full_size_configurations_run_on_fake_data(settings, shape):
    torch.manual_seed(0)
    model = D.VQVAE(shape, **settings)
    levels = settings["levels"]
    x = torch.randint(levels, (2, *shape)).float() if levels == 2 else torch.randint(levels, (2, *shape))
    model.train()
    loss = model.loss(x)
    loss.backward()
    assert torch.isfinite(loss) and model.encode(x).shape == (2, shape[1] // 4, shape[2] // 4)
    model.eval()
    assert torch.isfinite(model.log_prob(x)).all() and model.sample(1).shape == (1, *shape)


def test_the_digits_settings_build_the_models_and_their_priors():
    model = D.VQVAE(**D.DIGITS_VQVAE)
    assert model.grid_shape == (1, 4, 4) and model.quantizer.ema and model.quantizer.restart > 0
    assert not D.VQVAE(**D.DIGITS_VQVAE_COLLAPSE).quantizer.ema
    model.prior = A.PixelCNN(model.grid_shape, levels=model.num_codes, num_classes=10, **D.DIGITS_PIXELCNN_PRIOR)
    model.prior = A.Transformer(model.grid_shape, model.num_codes, num_classes=10, **D.DIGITS_TRANSFORMER_PRIOR)
    assert D.DVAE(**D.DIGITS_DVAE).temperature(10**6) == D.DIGITS_DVAE["tau_min"]


# ============================================================================ the dVAE
def tiny_dvae(**kwargs):
    torch.manual_seed(0)
    model = D.DVAE((1, 2, 2), levels=3, num_codes=4, code_dim=2, hidden=4, **kwargs).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator(p.numel()), dtype=torch.float64))
        model.encoder.net[-1].weight.mul_(0.1)  # a posterior q(z | x) that is not too sure of itself
    return model.eval()


def test_dvae_kl_is_the_categorical_kl_to_uniform():
    model = tiny_dvae()
    logits = torch.randn(3, 4, 2, 2, generator=generator(0), dtype=torch.float64)
    q = Categorical(logits=logits.permute(0, 2, 3, 1))
    uniform = Categorical(logits=torch.zeros_like(q.logits))
    assert torch.allclose(model._kl(logits), kl_divergence(q, uniform).sum((1, 2)))


def test_dvae_bounds_by_enumeration():
    """One categorical latent of 4 values: log p(x), the ELBO and its terms are sums over the codes."""
    model = tiny_dvae()
    x = torch.randint(3, (5, 1, 2, 2), generator=generator(0))
    with torch.no_grad():
        log_q = F.log_softmax(model.encoder(x), 1)[:, :, 0, 0]  # (N, K)
        e = model.codebook.weight  # the code vectors, (K, D)
        log_px_z = torch.stack([model.decoder.log_prob(x, e[k].reshape(1, 2, 1, 1).expand(5, 2, 1, 1))
                                for k in range(4)], 1)
        exact = torch.logsumexp(log_px_z - math.log(4), 1)
        elbo = (log_q.exp() * (log_px_z - math.log(4) - log_q)).sum(1)
        torch.manual_seed(0)
        draws = torch.stack([model.log_prob(x) for _ in range(4000)])
        iwae = torch.stack([model.log_prob(x, k=64) for _ in range(50)]).mean(0)
    assert (elbo < exact).all()
    assert torch.allclose(draws.mean(0), elbo, atol=4 * draws.std(0).max().item() / math.sqrt(4000) + 1e-6)
    assert (elbo < iwae).all() and ((iwae - exact).abs() < 0.1).all()  # k = 64 samples: close to log p(x)


def test_dvae_anneals_the_temperature_by_step_and_trains():
    model = D.DVAE(num_codes=8, code_dim=4, hidden=8, tau=2.0, tau_min=0.5, anneal_rate=0.01)
    assert model.temperature(0) == 2.0 and model.temperature(100) == pytest.approx(2 * math.exp(-1))
    assert model.temperature(10**6) == 0.5
    x = embedded.digits("train").x[:300]
    model.train()
    torch.manual_seed(3)
    loss = next(model.training_losses(x[:8], step=100))[1]
    torch.manual_seed(3)
    terms = model.relaxed_elbo(x[:8], tau=model.temperature(100))
    assert torch.allclose(loss, -terms.elbo.mean())
    torch.manual_seed(0)
    before = -model.eval().log_prob(x).mean().item()
    history = fit(model, x, epochs=3, batch_size=32, lr=3e-3, progress=False)
    torch.manual_seed(0)
    after = -model.log_prob(x).mean().item()
    assert after < before - 30 and len(history) == 3
    assert model.reconstruct(x[:4]).shape == (4, 1, 8, 8) and model.sample(3).shape == (3, 1, 8, 8)
    assert D.code_usage(model, x).total == 300 * 16


def test_class_marginal_prior_is_the_mixture_of_its_classes_and_sums_to_one():
    """p(z) = Σ_c π_c p(z | c): by enumeration over every 2×1 grid of 3 codes it sums to one,
    equals the mixture computed by hand, and its samples follow it (χ²)."""
    import itertools

    from scipy.stats import chisquare

    from dgmlab import autoregressive as A

    torch.manual_seed(0)
    conditional = A.Transformer((1, 2, 1), 3, d_model=8, heads=2, layers=1, num_classes=2)
    for p in conditional.parameters():  # away from the near-uniform initialisation
        p.data.normal_(0, 0.5)
    weights = torch.tensor([1.0, 3.0])
    prior = D.ClassMarginal(conditional, weights)
    grids = torch.tensor(list(itertools.product(range(3), repeat=2))).reshape(-1, 1, 2, 1)
    with torch.no_grad():
        log_p = prior.log_prob(grids)
        by_hand = torch.log(0.25 * conditional.log_prob(grids, torch.zeros(9, dtype=torch.long)).exp()
                            + 0.75 * conditional.log_prob(grids, torch.ones(9, dtype=torch.long)).exp())
    assert torch.allclose(log_p.exp().sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(log_p, by_hand, atol=1e-5)
    torch.manual_seed(1)
    drawn = prior.sample(20_000).reshape(-1, 2)
    counts = torch.bincount(drawn[:, 0] * 3 + drawn[:, 1], minlength=9).numpy()
    assert chisquare(counts, 20_000 * log_p.exp().double().numpy()).pvalue > 1e-3
    with pytest.raises(TypeError, match="class-conditional"):
        D.ClassMarginal(A.Transformer((1, 2, 1), 3, d_model=8, heads=2, layers=1), torch.ones(1))
    with pytest.raises(ValueError):
        D.ClassMarginal(conditional, torch.ones(3))
