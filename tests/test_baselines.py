"""Claims C1-C3: maximum likelihood is counting, parameter counts, the curse of dimensionality."""

import itertools
import math

import pytest
import torch

from dgmlab import baselines as B
from dgmlab import embedded, train


def all_configurations(m, k=2):
    return torch.tensor(list(itertools.product(range(k), repeat=m)))


def bernoulli_loglik(theta, x):
    return (x * torch.log(theta) + (1 - x) * torch.log1p(-theta)).sum()


# --------------------------------------------------------------------------- C1
def test_c1_bernoulli_mle_is_the_empirical_frequency():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200, 5, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])).double()
    theta = B.bernoulli_mle(x)
    assert torch.allclose(theta, x.mean(0))
    # the log-likelihood is lower at every nearby parameter: θ̂ is the maximum
    best = bernoulli_loglik(theta, x)
    for delta in (-0.02, -0.005, 0.005, 0.02):
        assert bernoulli_loglik((theta + delta).clamp(1e-6, 1 - 1e-6), x) < best


def test_c1_categorical_mle_is_the_empirical_frequency():
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(torch.tensor([0.5, 0.2, 0.2, 0.1]), 300, replacement=True, generator=g)[:, None]
    probs = B.categorical_mle(x, 4)[0]
    counts = torch.bincount(x[:, 0], minlength=4).double()
    assert torch.allclose(probs, counts / counts.sum())
    best = (counts * probs.log()).sum()
    for _ in range(20):  # random points of the simplex do worse
        other = torch.distributions.Dirichlet(torch.ones(4)).sample().double()
        assert (counts * other.log()).sum() < best


def test_c1_gradient_descent_reaches_the_frequencies():
    """Fitting by the shared training loop lands on the closed-form MLE."""
    x = embedded.digits("train", "binary", flatten=True).x[:, 25:31]  # row 3: 0 < θ̂ < 1
    model = B.IndependentBernoulli(6)
    train.fit(model, x, epochs=300, batch_size=len(x), lr=0.1, progress=False)
    assert torch.allclose(model.probs.double(), B.bernoulli_mle(x), atol=2e-3)
    rolls = torch.tensor([[0], [1], [1], [2], [2], [2], [3], [3], [3], [3]])  # a four-sided die
    die = B.IndependentCategorical(1, 4)
    train.fit(die, rolls, epochs=300, batch_size=10, lr=0.05, progress=False)
    assert torch.allclose(die.probs[0].double(), torch.tensor([0.1, 0.2, 0.3, 0.4]).double(), atol=2e-3)


def test_c1_smoothing_keeps_unseen_outcomes_possible():
    x = torch.zeros(10, 3)  # no pixel is ever 1
    assert torch.equal(B.bernoulli_mle(x), torch.zeros(3, dtype=torch.float64))
    smoothed = B.bernoulli_mle(x, alpha=1.0)
    assert torch.allclose(smoothed, torch.full((3,), 1 / 12, dtype=torch.float64))
    model = B.IndependentBernoulli.from_data(x, alpha=1.0)
    assert torch.isfinite(model.log_prob(torch.ones(1, 3))).all()


# --------------------------------------------------------------------------- C2
@pytest.mark.parametrize("m,k", [(1, 2), (3, 2), (6, 2), (4, 3), (3, 17)])
def test_c2_models_store_exactly_the_counted_parameters(m, k):
    assert B.Histogram(m, k).num_parameters() == B.parameter_count("full", m, k) == k**m - 1
    assert B.IndependentCategorical(m, k).num_parameters() == B.parameter_count("independent", m, k)
    assert B.MarkovChain(m, k).num_parameters() == B.parameter_count("markov", m, k)
    if k == 2:
        assert B.IndependentBernoulli(m).num_parameters() == m
        assert B.parameter_count("markov", m) == 2 * m - 1


def test_c2_chain_rule_alone_does_not_reduce_the_count():
    """The conditionals p(x_j | x_<j) of any joint hold exactly k^m − 1 free numbers."""
    from dgmlab import probability

    m, k = 5, 2
    joint = torch.rand((k,) * m, generator=torch.Generator().manual_seed(2)).double()
    joint /= joint.sum()
    factors = probability.chain_rule_factors(joint)
    free = sum(f[..., 0].numel() * (k - 1) for f in factors)  # rows × (k − 1) free entries each
    assert free == B.parameter_count("chain_rule", m, k) == B.parameter_count("full", m, k) == 31
    assert torch.allclose(probability.joint_from_factors(factors), joint)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_c2_every_model_is_a_distribution(alpha):
    x = embedded.digits("train", "binary", flatten=True).x[:, 26:33]  # 7 central pixels
    configs = all_configurations(7).float()
    for model in (B.Histogram.from_data(x, 2, alpha), B.MarkovChain.from_data(x, 2, alpha),
                  B.IndependentBernoulli.from_data(x, alpha)):
        total = model.log_prob(configs).exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-4), type(model).__name__


def test_c2_markov_chain_mle_matches_transition_frequencies():
    x = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]]).float()
    model = B.MarkovChain.from_data(x)
    probs = model.log_prob(all_configurations(3).float()).exp()
    joint = {tuple(c.tolist()): p.item() for c, p in zip(all_configurations(3), probs)}
    # p(x1=0) = 3/4; p(x2=1 | x1=0) = 1/3 (rows 1, 2, 4); p(x3=1 | x2=1) = 1/2 (rows 2, 3)
    assert joint[(0, 1, 1)] == pytest.approx(3 / 4 * 1 / 3 * 1 / 2, abs=1e-6)
    # p(x1=1) = 1/4; p(x2=1 | x1=1) = 1; p(x3=0 | x2=1) = 1/2
    assert joint[(1, 1, 0)] == pytest.approx(1 / 4 * 1 * 1 / 2, abs=1e-6)
    # never seen: x2=1 after x1=1 is certain, so (1, 0, ·) gets (almost) nothing
    assert joint[(1, 0, 0)] < 1e-9


def test_c2_samples_reproduce_the_fitted_marginals():
    x = embedded.digits("train", "binary", flatten=True).x
    torch.manual_seed(0)
    for model in (B.IndependentBernoulli.from_data(x, 0.5), B.MarkovChain.from_data(x, 2, 0.5)):
        s = model.sample(4000).reshape(4000, -1)
        assert s.shape == (4000, 64)
        # 4000 draws: standard error of a frequency ≤ 0.008
        assert (s.mean(0) - x.mean(0)).abs().max() < 0.05


# --------------------------------------------------------------------------- C3
def test_c3_bins_grow_exponentially_and_so_do_empty_ones():
    x, xt = (embedded.digits(s, "levels", flatten=True).x for s in ("train", "test"))
    study = B.curse_of_dimensionality(x, xt, [1, 2, 3, 4, 5], k=17)
    assert study["bins"] == [17, 289, 4913, 83521, 1419857]
    unseen = study["unseen"]
    # nested variable sets: a configuration unseen on d pixels stays unseen on d + 1
    assert all(a <= b for a, b in zip(unseen, unseen[1:]))
    assert unseen[0] == 0.0 and unseen[-1] > 0.75
    occupied = study["occupied"]
    assert occupied[-1] < 1e-3  # 1,199 images cannot fill 1.4 million bins


def test_c3_mle_memorises_the_training_images():
    """The raw MLE's training NLL falls with d while the held-out NLL becomes infinite."""
    x, xt = (embedded.digits(s, "levels", flatten=True).x for s in ("train", "test"))
    study = B.curse_of_dimensionality(x, xt, [1, 2, 3, 4, 5], k=17)
    train_nll = study["mle_train"]
    assert all(a > b for a, b in zip(train_nll, train_nll[1:]))  # ever better on training data
    # each training image keeps probability ≥ 1/n: at most log(n) nats per image
    assert all(t * d <= math.log(len(x)) + 1e-9 for t, d in zip(train_nll, study["dims"]))
    for unseen, test_nll in zip(study["unseen"], study["mle_test"]):
        assert (test_nll == math.inf) == (unseen > 0)  # one empty-bin test image suffices
    assert study["mle_test"][0] < math.inf and study["mle_test"][1] == math.inf
    # the test images that did land in a seen bin are the typical ones: selection flatters
    assert study["mle_test_seen"][-1] < train_nll[-1]


def test_c3_mle_figures_on_a_hand_example():
    """Four training rows, three test rows over 2 binary variables, counted by hand."""
    x = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 1]])
    xt = torch.tensor([[0, 0], [1, 1], [1, 0]])  # the last one is in an empty bin
    study = B.curse_of_dimensionality(x, xt, [2], k=2, alpha=1.0, order=torch.tensor([0, 1]))
    assert study["occupied"] == [0.75] and study["unseen"] == [pytest.approx(1 / 3)]
    train_nll = -(2 * math.log(2 / 4) + math.log(1 / 4) + math.log(1 / 4)) / 4 / 2
    assert study["mle_train"][0] == pytest.approx(train_nll)
    assert study["mle_test"] == [math.inf]
    assert study["mle_test_seen"][0] == pytest.approx(-(math.log(2 / 4) + math.log(1 / 4)) / 2 / 2)
    # smoothed with α = 1 over 4 bins: (n_b + 1) / (4 + 4)
    smoothed = -(math.log(3 / 8) + math.log(2 / 8) + math.log(1 / 8)) / 3 / 2
    assert study["smoothed_test"][0] == pytest.approx(smoothed, rel=1e-5)
    assert study["pseudo_mass"] == [pytest.approx(4 / 8)]


def test_c3_smoothing_drifts_to_the_uniform_distribution():
    """With α = 0.5 the pseudo-counts α k^d swamp the n images: both NLLs tend to log k."""
    x, xt = (embedded.digits(s, "levels", flatten=True).x for s in ("train", "test"))
    study = B.curse_of_dimensionality(x, xt, [1, 2, 3, 4, 5], k=17, alpha=0.5)
    # one variable: the histogram *is* the independent model
    assert study["smoothed_test"][0] == pytest.approx(study["independent_test"][0], rel=1e-6)
    mass = study["pseudo_mass"]
    assert mass[0] < 0.01 and mass[-1] > 0.99
    uniform = math.log(17)
    train_nll, test_nll = study["smoothed_train"], study["smoothed_test"]
    assert all(a < b for a, b in zip(train_nll[1:], train_nll[2:]))  # the *training* NLL rises
    assert uniform - train_nll[-1] < 0.3 and uniform - test_nll[-1] < 0.1
    assert all(t <= uniform for t in train_nll + test_nll)
    # five variables: the full table loses to the model that ignores all dependence
    assert test_nll[-1] > study["independent_test"][-1] + 0.2
    with pytest.raises(ValueError, match="alpha should be > 0"):
        B.curse_of_dimensionality(x, xt, [1], k=17, alpha=0.0)


def test_c3_histogram_refuses_an_impossible_table():
    with pytest.raises(ValueError, match="curse of dimensionality"):
        B.Histogram(64, 2)
    with pytest.raises(ValueError, match=r"256\^784 = about 10\^1888 bins"):
        B.Histogram((1, 28, 28), 256)  # k^m far beyond a float


def test_histogram_encode_decode_round_trip():
    h = B.Histogram(4, 3)
    configs = all_configurations(4, 3)
    codes = h.encode(configs)
    assert torch.equal(codes, torch.arange(81))
    assert torch.equal(h.decode(codes), configs)


def test_models_refuse_bad_input():
    model = B.IndependentBernoulli(64)
    with pytest.raises(ValueError, match=r"shape \(N, 64\)"):
        model.log_prob(torch.zeros(3, 63))
    with pytest.raises(ValueError, match=r"should lie in \[0, 1\]"):
        model.log_prob(torch.full((2, 64), 2.0))
    with pytest.raises(ValueError, match="integer levels"):
        B.IndependentCategorical(4, 17).log_prob(torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="structure should be one of"):
        B.parameter_count("tree", 4)
    with pytest.raises(ValueError, match="at least 2"):
        B.parameter_count("full", 3, k=1)


# --------------------------------------------------------------------------- C28
def digit_levels(split):
    return embedded.digits(split).x  # (N, 1, 8, 8), whole levels 0..16


def test_c28_noise_mixture_loses_at_most_log_100():
    """0.01·p + 0.99·noise: every held-out image loses at most log 100 nats, yet 99% of samples are noise."""
    from scipy.stats import binomtest

    x, xt = digit_levels("train"), digit_levels("test")
    p = B.IndependentCategorical.from_data(x, 17, alpha=0.5)
    mix = B.NoiseMixture(p, B.UniformLevels((1, 8, 8), 17), weight=0.01)
    loss = p.log_prob(xt).double() - mix.log_prob(xt).double()  # NLL increase of each image
    assert (loss <= math.log(100) + 1e-4).all()  # log p_mix ≥ log p + log w, on every image
    assert loss.min() > math.log(100) - 1e-3  # nearly tight: 17^−64 is nothing beside p(x)
    torch.manual_seed(0)
    n = 20000
    s, from_model = mix.sample_with_source(n)
    assert s.shape == (n, 1, 8, 8) and s.dtype == torch.long and from_model.dtype == torch.bool
    assert binomtest(int(from_model.sum()), n, 0.01).pvalue > 1e-3  # ≈ 200 of 20,000 from p
    noise = s[~from_model].double()  # uniform levels: mean 8, sd √((17² − 1)/12) ≈ 4.9 per pixel
    assert abs(noise.mean().item() - 8) < 4 * math.sqrt(24) / math.sqrt(noise.numel())
    # the model's draws are digit-like; noise is ~170 nats less likely under p than they are
    assert p.log_prob(s[from_model]).mean() > p.log_prob(s[~from_model]).mean() + 40


def test_c28_narrow_kde_copies_and_generalises_badly():
    """A narrow kernel samples copies of training digits, yet its held-out NLL is the worst."""
    from dgmlab import quality
    from dgmlab.metrics import heldout_nll

    x, xt = digit_levels("train"), digit_levels("test")
    h = 0.05
    narrow, wide = B.KernelDensity(x, bandwidth=h, levels=17), B.KernelDensity(x, bandwidth=2.0, levels=17)
    independent = B.IndependentCategorical.from_data(x, 17, alpha=0.5)
    torch.manual_seed(0)
    copies = quality.nearest_neighbours(narrow.sample(500), x)
    assert (copies.distance == 0).all()  # every sample is a training digit: "perfect" samples
    floor = quality.nearest_neighbours(xt, x).distance  # held-out digits: new images
    assert floor.min() > 5
    assert quality.nearest_neighbours(wide.sample(500), x).distance.median() > 0.5 * floor.median()
    nll = {name: heldout_nll(m, xt).nats for name, m in
           (("narrow", narrow), ("wide", wide), ("independent", independent))}
    assert nll["narrow"] > 10 * nll["independent"] and nll["narrow"] > 10 * nll["wide"]
    assert nll["wide"] > nll["independent"]  # in 64 dimensions even a wide kernel loses to it
    # h → 0: only the nearest training images count, −log p(x) = d²/(2h²) + log N − log(ties)
    d = torch.cdist(xt.flatten(1).double(), x.flatten(1).double())
    ties = (d == d.min(1, keepdim=True).values).sum(1)
    expected = floor.square() / (2 * h**2) + math.log(len(x)) - ties.double().log()
    assert torch.allclose(-narrow.log_prob(xt).double(), expected, rtol=1e-6)


def tiny_levels(d, k):
    return all_configurations(d, k)  # every image of d pixels with k levels: k^d rows


@pytest.mark.parametrize("h", [0.3, 1.0, 4.0])
def test_kernel_density_on_levels_is_normalised_and_matches_torch_distributions(h):
    d, k = 2, 5
    centres = torch.tensor([[0, 4], [2, 2], [4, 1]])
    kde = B.KernelDensity(centres, bandwidth=h, levels=k)
    configs = tiny_levels(d, k)
    log_p = kde.log_prob(configs).double()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)  # a distribution over k^d images
    levels = torch.arange(k).double()
    logits = -(levels - centres[..., None].double()) ** 2 / (2 * h**2)  # (N, D, K), unnormalised
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(len(centres), dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Categorical(logits=logits), 1))
    assert torch.allclose(log_p, reference.log_prob(configs), atol=1e-5)
    table = B.discretised_gaussian_kernel(k, h)
    assert torch.allclose(table.exp().sum(1), torch.ones(k, dtype=torch.float64))
    assert torch.allclose(table, torch.log_softmax(-(levels - levels[:, None]) ** 2 / (2 * h**2), 1))


def test_kernel_density_on_continuous_data_is_a_gaussian_mixture(monkeypatch):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 1, 2, 2, generator=g, dtype=torch.float64)
    x = 2 * torch.randn(2100, 1, 2, 2, generator=g, dtype=torch.float64)  # > 1024 rows: two blocks
    h = 0.7
    kde = B.KernelDensity(centres, bandwidth=h)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(7, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(centres.flatten(1), h), 1))
    expected = reference.log_prob(x.flatten(1))
    assert kde.event_shape == (1, 2, 2) and kde.log_prob(x).dtype == torch.float64
    assert torch.allclose(kde.log_prob(x), expected, atol=1e-9)
    monkeypatch.setattr(B, "KDE_BLOCK", 3000)  # blocks of 2 centres, the last one short
    assert torch.allclose(kde.log_prob(x), expected, atol=1e-9)
    assert torch.allclose(kde.log_prob(x.flatten(1)), expected, atol=1e-9)  # (N, D) as (N, 1, 2, 2)


def test_kernel_density_samples_follow_the_kernel():
    from scipy.stats import chisquare

    torch.manual_seed(0)
    centres, k, h, n = torch.tensor([[0, 3, 5], [1, 3, 2]]), 6, 0.8, 20000
    kde = B.KernelDensity(centres, bandwidth=h, levels=k)
    s = kde.sample(n)
    assert s.shape == (n, 3) and s.dtype == torch.long
    kernel = B.discretised_gaussian_kernel(k, h).exp()  # rows: k_h(· | c)
    for j in range(3):  # each pixel's marginal: (1/N) Σ_n k_h(l | c_{n,j})
        expected = kernel[centres[:, j]].mean(0) * n
        assert chisquare(torch.bincount(s[:, j], minlength=k).double(), expected).pvalue > 1e-3
    means = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    gauss = B.KernelDensity(means, bandwidth=0.5).sample(n).double()
    # moments of the mixture: mean = centres' mean, covariance = h²I + the centres' covariance
    mu = means.double().mean(0)
    cov = 0.25 * torch.eye(2, dtype=torch.float64) + torch.cov(means.double().T, correction=0)
    assert ((gauss.mean(0) - mu).abs() < 4 * cov.diag().sqrt() / math.sqrt(n)).all()
    assert torch.allclose(torch.cov(gauss.T), cov, atol=0.06)
    assert B.KernelDensity(torch.tensor([[0, 1]]), bandwidth=0.5, levels=2).sample(3).dtype == torch.float32


def test_noise_mixture_and_uniform_levels_are_distributions():
    d, k, w = 2, 5, 0.3
    configs = tiny_levels(d, k)
    noise = B.UniformLevels(d, k)
    assert torch.allclose(noise.log_prob(configs), B.IndependentCategorical(d, k).log_prob(configs))
    assert noise.num_parameters() == 0
    g = torch.Generator().manual_seed(3)
    p = B.IndependentCategorical(d, k, torch.randn(d, k - 1, generator=g))
    mix = B.NoiseMixture(p, noise, weight=w)
    log_mix = mix.log_prob(configs).double()
    assert log_mix.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    direct = w * p.log_prob(configs).double().exp() + (1 - w) * noise.log_prob(configs).double().exp()
    assert torch.allclose(log_mix, direct.log(), atol=1e-6)
    kde_mix = B.NoiseMixture(B.KernelDensity(configs[:4], bandwidth=0.5, levels=k), noise, 0.5)
    assert kde_mix.log_prob(configs).double().exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(0)
    for weight, n in ((0.01, 3), (0.99, 3), (0.5, 1)):  # all noise, all model, one draw
        x, src = B.NoiseMixture(p, noise, weight).sample_with_source(n)
        assert x.shape == (n, d) and src.shape == (n,) and x.dtype == torch.long
    assert torch.equal(B.UniformLevels((1, 2, 2), 2).sample(5).unique().sort().values,
                       torch.tensor([0.0, 1.0]))


def test_c28_models_refuse_bad_input():
    x = digit_levels("train")[:10]
    with pytest.raises(ValueError, match="bandwidth should be a positive number"):
        B.KernelDensity(x, bandwidth=0.0, levels=17)
    with pytest.raises(ValueError, match="bandwidth"):
        B.KernelDensity(x, bandwidth=float("nan"), levels=17)
    with pytest.raises(TypeError, match="pass levels=K"):
        B.KernelDensity(x, bandwidth=1.0)  # whole levels without levels=
    with pytest.raises(ValueError, match=r"should lie in \[0, 16\]"):
        B.KernelDensity(x + 1, bandwidth=1.0, levels=17)
    with pytest.raises(ValueError, match="whole numbers"):
        B.KernelDensity(x / 16, bandwidth=1.0, levels=17)
    with pytest.raises(ValueError, match="levels should be at least 2"):
        B.KernelDensity(x, bandwidth=1.0, levels=1)
    with pytest.raises(ValueError, match=r"batch of N ≥ 1 objects"):
        B.KernelDensity(torch.zeros(5), bandwidth=1.0)
    kde = B.KernelDensity(x, bandwidth=1.0, levels=17)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\) or \(N, 64\)"):
        kde.log_prob(torch.zeros(2, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="integer levels"):
        kde.log_prob(x.float() / 16)
    noise = B.UniformLevels((1, 8, 8), 17)
    with pytest.raises(ValueError, match="one shape"):
        B.NoiseMixture(kde, B.UniformLevels((1, 4, 4), 17))
    for w in (0.0, 1.0, -0.5, True):
        with pytest.raises(ValueError, match=r"number in \(0, 1\)"):
            B.NoiseMixture(kde, noise, w)
    with pytest.raises(TypeError, match="with a likelihood"):
        B.NoiseMixture(kde, lambda x: x)
    with pytest.raises(ValueError, match="unconditional"):
        B.NoiseMixture(kde, noise).sample(3, context=1)
