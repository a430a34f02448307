"""Claims C29-C30: the optimal discriminator and the value of the GAN game; the GAN's losses,
its R1 penalty, its k-step training and its networks (Chapter 7)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from dgmlab import embedded
from dgmlab import gan as G
from dgmlab.divergences import f_divergence_grid, grid_1d
from dgmlab.train import fit

LOG2 = math.log(2.0)


def normal(mu, sigma):
    return lambda x: Normal(torch.tensor(mu, dtype=torch.float64), sigma).log_prob(x)


# ------------------------------------------------------------------ C29: the optimal discriminator
def test_c29_numerically_optimised_discriminator_matches_the_formula():
    log_pi, log_p = normal(0.0, 1.0), normal(1.5, 0.6)  # different widths: D* is not a plain sigmoid
    x, D = G.optimise_discriminator_1d(log_pi, log_p, -6.0, 6.0, points=401, steps=800, lr=2e-2)
    D_star = G.optimal_discriminator(log_pi(x), log_p(x))
    pi, p = log_pi(x).exp(), log_p(x).exp()
    assert torch.allclose(D_star, pi / (pi + p), atol=1e-12)  # the formula, from densities
    where = (pi + p) > 0.02  # where there is mass to weigh D by
    assert (D - D_star)[where].abs().max() < 0.03
    cell = x[1] - x[0]
    V_num, V_star = (G.minimax_value_grid(l, log_pi(x), log_p(x), cell)
                     for l in (torch.logit(D), G.optimal_logit(log_pi(x), log_p(x))))
    assert V_num <= V_star + 1e-9 and V_star - V_num < 2e-3  # D* is the maximiser, and it was reached


def test_c29_d_star_is_one_half_where_the_densities_agree_and_the_maximum_of_v():
    x, cell = grid_1d(-8, 8, 2001)
    lpi, lp = normal(0.0, 1.0)(x), normal(2.0, 1.0)(x)
    D_star = G.optimal_discriminator(lpi, lp)
    assert abs(D_star[torch.argmin((x - 1.0).abs())] - 0.5) < 1e-9  # π(1) = p(1)
    V_star = G.minimax_value_grid(G.optimal_logit(lpi, lp), lpi, lp, cell)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # any other discriminator scores lower
        other = (D_star + 0.05 * torch.randn(len(x), generator=g, dtype=torch.float64)).clamp(1e-6, 1 - 1e-6)
        assert G.minimax_value_grid(torch.logit(other), lpi, lp, cell) < V_star


# ------------------------------------------------------------------ C30: V(G, D*) = 2 JSD − 2 log 2
@pytest.mark.parametrize("mu, sigma", [(0.0, 1.0), (0.5, 1.0), (2.0, 0.5), (-3.0, 2.0)])
def test_c30_value_at_the_optimum_is_two_jsd_minus_two_log_two(mu, sigma):
    x, cell = grid_1d(-15, 15, 6001)
    lpi, lp = normal(0.0, 1.0)(x), normal(mu, sigma)(x)
    V_star = G.minimax_value_grid(G.optimal_logit(lpi, lp), lpi, lp, cell)
    jsd = f_divergence_grid("js", lpi, lp, cell)  # Chapter 2's JSD
    assert torch.allclose(V_star, 2 * jsd - 2 * LOG2, atol=1e-8)
    assert torch.allclose(G.jsd_from_value(V_star), jsd, atol=1e-8)
    if mu == 0.0 and sigma == 1.0:  # p = π: the minimum, −2 log 2
        assert abs(V_star + 2 * LOG2) < 1e-8
    else:
        assert V_star > -2 * LOG2 + 1e-3


def test_c30_support_mismatch_jsd_is_stuck_at_log_two_and_the_saturating_gradient_vanishes():
    x, cell = grid_1d(-2, 10, 6001)
    lpi = normal(0.0, 0.1)(x)
    values = []
    for theta in (3.0, 5.0, 7.0):  # p's support (to 50 σ) far from π's
        lp = normal(theta, 0.1)(x)
        values.append(G.minimax_value_grid(G.optimal_logit(lpi, lp), lpi, lp, cell))
        assert abs(f_divergence_grid("js", lpi, lp, cell) - LOG2) < 1e-9
    assert all(abs(v) < 1e-8 for v in values)  # 2 log 2 − 2 log 2, whatever θ: no slope to follow
    # A (near-)optimal discriminator σ(a(1.5 − x)) rejects fakes x = θ + 0.1 ε with θ = 3:
    theta = torch.tensor(3.0, requires_grad=True)
    fake_logits = 20.0 * (1.5 - (theta + 0.1 * torch.randn(512, generator=torch.Generator().manual_seed(0))))
    (g_sat,) = torch.autograd.grad(G.saturating_generator_loss(fake_logits), theta, retain_graph=True)
    (g_ns,) = torch.autograd.grad(G.non_saturating_generator_loss(fake_logits), theta)
    assert abs(g_sat) < 1e-9 and abs(g_ns) > 10  # vanishes vs dl/dθ = −20: pulled towards the data
    assert g_ns > 0  # gradient descent moves θ down, towards π


# ------------------------------------------------------------------ losses
def test_losses_match_binary_cross_entropy_with_logits():
    g = torch.Generator().manual_seed(0)
    real, fake = 3 * torch.randn(64, generator=g), 3 * torch.randn(64, generator=g)
    real[0], fake[0] = 60.0, -60.0  # far in the tails: still finite
    bce = F.binary_cross_entropy_with_logits
    expected_d = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    assert torch.allclose(G.discriminator_loss(real, fake), expected_d, atol=1e-6)
    assert torch.allclose(G.minimax_value(real, fake), -expected_d, atol=1e-6)
    assert torch.allclose(G.non_saturating_generator_loss(fake), bce(fake, torch.ones_like(fake)), atol=1e-6)
    assert torch.allclose(G.saturating_generator_loss(fake), -bce(fake, torch.zeros_like(fake)), atol=1e-6)
    # and against the definitions in D = σ(l), away from the tails
    D_real, D_fake = torch.sigmoid(real[1:]), torch.sigmoid(fake[1:])
    V = torch.log(D_real).mean() + torch.log(1 - D_fake).mean()
    assert torch.allclose(G.minimax_value(real[1:], fake[1:]), V, atol=1e-5)
    assert torch.isfinite(G.minimax_value(torch.tensor([-200.0]), torch.tensor([200.0])))


def test_r1_penalty_matches_a_direct_autograd_computation():
    torch.manual_seed(0)
    D = G.DCGANDiscriminator((1, 8, 8), channels=8)
    x = torch.rand(5, 1, 8, 8)
    penalty = G.r1_penalty(D, x)
    direct = []
    for i in range(len(x)):  # one object at a time: ‖∇_x l(x_i)‖²
        xi = x[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(D(xi).sum(), xi, create_graph=True)
        direct.append(gi.pow(2).sum())
    direct = torch.stack(direct).mean()
    assert torch.allclose(penalty, direct, rtol=1e-5)
    w = D.net[0].weight  # and it is differentiable in D's weights, the same way
    assert torch.allclose(torch.autograd.grad(penalty, w)[0], torch.autograd.grad(direct, w)[0],
                          rtol=1e-4, atol=1e-7)
    assert not x.requires_grad  # the data is left alone


def test_non_saturating_gradient_is_strong_where_the_saturating_one_vanishes():
    torch.manual_seed(0)
    model = G.toy_gan(**G.TOY_GAN)
    last = model.discriminator[-1]
    with torch.no_grad():
        last.bias.fill_(-12.0)  # D(G(z)) ≈ 6e-6: the discriminator rejects every fake
    sat = G.generator_gradient_norm(model, 512, loss="saturating")
    non_sat = G.generator_gradient_norm(model, 512, loss="non_saturating")
    assert non_sat > 1e-2 and sat / non_sat < 1e-4  # the ratio is D/(1 − D) ≈ e^-12 per fake
    with torch.no_grad():
        last.bias.fill_(12.0)  # fooled: now the non-saturating gradient is the small one
    assert G.generator_gradient_norm(model, 512, loss="non_saturating") < 1e-4 * G.generator_gradient_norm(
        model, 512, loss="saturating")


# ------------------------------------------------------------------ the model and its training
def test_k_discriminator_steps_per_generator_step():
    model = G.toy_gan(**{**G.TOY_GAN, "k": 3})
    x = embedded.toy_density("eight_gaussians").sample(16, seed=0)
    names = [[name for name, _ in model.training_losses(x, step=s)] for s in range(6)]
    assert names == [["discriminator"], ["discriminator"], ["discriminator", "generator"]] * 2
    groups = model.optimizer_parameters()
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert ids["discriminator"].isdisjoint(ids["generator"])
    assert ids["discriminator"] | ids["generator"] == {id(p) for p in model.parameters()}


def test_discriminator_step_leaves_the_generator_alone_and_vice_versa():
    torch.manual_seed(0)
    model = G.toy_gan(**G.TOY_GAN)
    x = embedded.toy_density("eight_gaussians").sample(64, seed=0)
    (_, d_loss), (_, g_loss) = list(model.training_losses(x, step=0))
    g_params = list(model.generator.parameters())
    assert all(g is None for g in torch.autograd.grad(d_loss, g_params, allow_unused=True))  # fakes detached
    assert all(g is not None for g in torch.autograd.grad(g_loss, g_params, allow_unused=True))


@pytest.mark.parametrize("k", [1, 2])
def test_k_step_training_covers_the_eight_gaussians(k):
    data = embedded.toy_density("eight_gaussians").sample(2048, seed=0)
    angles = torch.arange(8) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)

    def coverage(model):
        d = torch.cdist(model.sample(1000), means)
        near = d.min(1).values < 0.6  # within 3 σ of a mode
        return near.float().mean().item(), len(set(d.argmin(1)[near].tolist()))

    torch.manual_seed(0)
    model = G.toy_gan(**{**G.TOY_GAN, "k": k, "hidden": (64, 64)})
    assert coverage(model)[0] < 0.1
    history = fit(model, data, epochs=30, progress=False, **G.TOY_GAN_TRAINING)
    near, modes = coverage(model)
    assert set(history.losses) == {"discriminator", "generator"}
    assert near > 0.2 and modes == 8  # seeds 0-2 give 0.25-0.72 near a mode; untrained: 0
    # the discriminator is near its equilibrium value −V = 2 log 2, not winning outright
    assert abs(history.losses["discriminator"][-1] - 2 * LOG2) < 0.25


def test_dcgan_shapes_for_digits_mnist_and_cifar_and_a_short_fit():
    for shape, settings in [((1, 8, 8), G.DIGITS_DCGAN), ((1, 28, 28), G.MNIST_DCGAN), ((3, 32, 32), G.CIFAR_DCGAN)]:
        torch.manual_seed(0)
        model = G.dcgan(shape, **{**settings, "channels": 8})
        s = model.sample(3)
        assert s.shape == (3, *shape) and 0 <= s.min() and s.max() <= 1
        assert model.discriminate(s).shape == (3,)
    torch.manual_seed(0)
    model = G.dcgan(**{**G.DIGITS_DCGAN, "k": 2})
    x = embedded.digits("train", "unit").x[:256]
    history = fit(model, x, epochs=2, progress=False, **G.DIGITS_DCGAN_TRAINING)
    assert all(math.isfinite(v[-1]) for v in history.losses.values())
    torch.manual_seed(1)
    a = model.sample(4)
    torch.manual_seed(1)
    assert torch.equal(a, model.sample(4))  # seeded, in eval mode: reproducible


def test_no_likelihood_and_clear_errors():
    model = G.toy_gan()
    x = torch.zeros(4, 2)
    with pytest.raises(NotImplementedError, match="likelihood-free"):
        model.log_prob(x)
    with pytest.raises(NotImplementedError, match="training_losses"):
        model.loss(x)
    assert model.has_rsample and not model.has_log_prob
    assert model.rsample(3).requires_grad
    with pytest.raises(ValueError, match="generator_loss"):
        G.toy_gan(generator_loss="wasserstein")
    with pytest.raises(ValueError, match="expects x of shape"):
        next(model.training_losses(torch.zeros(4, 3)))
    with pytest.raises(ValueError, match="multiple of 4"):
        G.dcgan((1, 10, 10))
    with pytest.raises(ValueError, match="r1"):
        G.toy_gan(r1=-1.0)


@pytest.mark.parametrize("name, loss", [("non_saturating", G.non_saturating_generator_loss),
                                        ("saturating", G.saturating_generator_loss)])
def test_the_model_trains_its_generator_with_the_chosen_loss(name, loss):
    model = G.toy_gan(**{**G.TOY_GAN, "generator_loss": name})
    with torch.no_grad():
        model.discriminator[-1].bias.fill_(-3.0)  # D(G(z)) ≠ 1/2: the two losses differ
    x = embedded.toy_density("eight_gaussians").sample(32, seed=0)
    torch.manual_seed(5)
    _, (_, by_model) = list(model.training_losses(x, step=0))
    torch.manual_seed(5)
    model.rsample(32)  # the discriminator step's fakes
    assert torch.allclose(by_model, loss(model.discriminate(model.rsample(32))))


def test_the_discriminator_loss_adds_half_gamma_times_r1():
    x = embedded.digits("train", "unit").x[:16]
    plain, penalised = (G.dcgan(**{**G.DIGITS_DCGAN, "channels": 4, "r1": r1}) for r1 in (0.0, 10.0))
    penalised.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    a = plain.discriminator_objective(x)
    torch.manual_seed(0)
    b = penalised.discriminator_objective(x)
    assert torch.allclose(b, a + 5.0 * G.r1_penalty(plain.discriminate, x), rtol=1e-5)


# ------------------------------------------------------------------ diagnostics on the 2-D mixture
def eight_means():
    angles = torch.arange(8) * (2 * math.pi / 8)
    return 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def test_mode_coverage_counts_covered_modes_and_near_samples():
    data = embedded.toy_density("eight_gaussians").sample(4000, seed=1)
    full = G.mode_coverage(data, eight_means(), 0.2)
    assert full.covered == 8 and sum(full.counts) == round(full.high_quality * 4000)
    assert full.high_quality > 0.98  # 3 std in 2-D holds 1 − e^{−4.5} = 98.9 % of a Gaussian
    assert abs(full.high_quality - (1 - math.exp(-4.5))) < 0.01
    one_mode = eight_means()[3] + 0.2 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    collapsed = G.mode_coverage(one_mode, eight_means(), 0.2)
    assert collapsed.covered == 1 and collapsed.counts[3] == sum(collapsed.counts) > 950
    far = G.mode_coverage(torch.zeros(100, 2), eight_means(), 0.2)  # the centre: near no mode
    assert far.covered == 0 and far.high_quality == 0.0
    # a mode with fewer than a quarter of its fair share is not covered
    mixed = torch.cat([one_mode[:900], eight_means()[0] + 0.01 * torch.randn(20, 2)])
    assert G.mode_coverage(mixed, eight_means(), 0.2).covered == 1
    assert G.mode_coverage(mixed, eight_means(), 0.2, min_share=0.1).covered == 2
    with pytest.raises(ValueError, match="std"):
        G.mode_coverage(data, eight_means(), 0.0)
    with pytest.raises(ValueError, match="samples"):
        G.mode_coverage(data[:, :1], eight_means(), 0.2)


def test_snapshots_keep_fixed_codes_pushed_through_the_generator_every_few_epochs():
    torch.manual_seed(0)
    model = G.toy_gan(**{**G.TOY_GAN, "hidden": (16,)})
    snaps = G.Snapshots(50, model.latent_dim, every=2, seed=3)
    fit(model, embedded.toy_density("eight_gaussians").sample(256, seed=0), epochs=4, progress=False,
        callbacks=snaps, **G.TOY_GAN_TRAINING)
    assert [epoch for epoch, _ in snaps.frames] == [2, 4]  # every 2nd of 4 epochs
    assert all(frame.shape == (50, 2) for _, frame in snaps.frames)
    assert torch.equal(snaps.frames[-1][1], model.generate(snaps.z).detach())  # the last frame is G now
    assert torch.equal(G.Snapshots(50, 2, seed=3).z, snaps.z)  # the same codes for the same seed


def test_r1_restores_coverage_where_momentum_makes_training_collapse():
    data = embedded.toy_density("eight_gaussians").sample(4000, seed=0)
    covered = {}
    for name, settings in [("collapse", G.TOY_GAN_COLLAPSE), ("r1", G.TOY_GAN_R1)]:
        torch.manual_seed(0)
        model = G.toy_gan(**settings)
        fit(model, data, epochs=20, progress=False, seed=0, **G.TOY_GAN_COLLAPSE_TRAINING)
        covered[name] = G.mode_coverage(model.sample(2000), eight_means(), 0.2).covered
    # measured: 1 mode without the remedy, 8 with it (seeds 0-5 at epoch 15: 1-5 against 4-8)
    assert covered["collapse"] <= 3 and covered["r1"] >= 7


def test_generator_average_follows_the_weights_and_draws_the_samples_out_of_training():
    torch.manual_seed(0)
    model = G.toy_gan(**{**G.TOY_GAN, "hidden": (8,)}, average=0.9)
    before = [p.clone() for p in model.generator_average.parameters()]
    assert all(torch.equal(a, p) for a, p in zip(before, model.generator.parameters()))  # starts as G
    assert not any(p.requires_grad for p in model.generator_average.parameters())
    fit(model, embedded.toy_density("eight_gaussians").sample(128, seed=0), epochs=1, progress=False,
        **{**G.TOY_GAN_TRAINING, "batch_size": 128})  # one batch: one generator step, one average update
    for old, avg, live in zip(before, model.generator_average.parameters(), model.generator.parameters()):
        assert torch.allclose(avg, 0.9 * old + 0.1 * live, atol=1e-7) and not torch.equal(avg, live)
    z = torch.randn(5, 2)
    assert not model.training and torch.equal(model.generate(z), model.generator_average(z))
    model.train()
    assert torch.equal(model.generate(z), model.generator(z))  # training draws from the live weights
    model.eval()  # the measured gradient is the live generator's, even out of training
    assert G.generator_gradient_norm(model, 16) > 0
    with pytest.raises(ValueError, match="average"):
        G.toy_gan(average=1.0)
