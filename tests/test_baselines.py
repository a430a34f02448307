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
