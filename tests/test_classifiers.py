"""Claim C4: discriminative vs generative classifiers, and marginalising missing pixels."""

import math

import pytest
import torch

from dgmlab import classifiers as C
from dgmlab import embedded


@pytest.fixture(scope="module")
def digits():
    return {s: embedded.digits(s, "unit", flatten=True) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def fitted(digits):
    x, y = digits["train"]
    return C.LogisticRegression(64, 10).fit(x, y, l2=1e-4), C.GaussianClassifier(64, 10).fit(x, y)


def test_c4_parameter_counts(fitted):
    counts = C.classifier_parameter_counts(10, 64)
    assert counts == {"discriminative": 10 * 64 + 10, "generative": 9 + 640 + 10 * 64 * 65 // 2}
    mlr, gda = fitted
    assert sum(p.numel() for p in mlr.parameters()) == counts["discriminative"] == 650
    assert gda.num_parameters() == counts["generative"] == 21449


def test_c4_both_classifiers_work_on_whole_images(digits, fitted):
    x, y = digits["test"]
    for model in fitted:
        assert C.accuracy(model.predict(x), y) > 0.93


def test_c4_generative_classifier_survives_missing_pixels(digits, fitted):
    x, y = digits["test"]
    mlr, gda = fitted
    for hidden in (0.5, 0.7):
        mask = C.random_mask(len(x), 64, hidden, seed=3)
        acc_mlr, acc_gda = C.accuracy(mlr.predict(x, mask), y), C.accuracy(gda.predict(x, mask), y)
        assert acc_gda > acc_mlr + 0.1, (hidden, acc_mlr, acc_gda)
    top = C.rows_mask(8, 8, 4)  # the top half of every digit hidden
    assert C.accuracy(gda.predict(x, top), y) > C.accuracy(mlr.predict(x, top), y) + 0.1


def test_c4_constant_pixels_make_the_class_covariances_singular(digits):
    """Border pixels that are 0 in every image of a class: zero variance, a singular S_c."""
    x, y = digits["train"]
    constant = C.zero_variance_inputs(x, y, 10)
    assert constant.shape == (10, 64) and (constant.sum(1) >= 5).all()
    other_deficit = 0
    for c in range(10):
        xc = x[y == c].double()
        assert (xc[:, constant[c]] == xc[0, constant[c]]).all()  # really constant
        assert (xc[:, ~constant[c]].var(0) > 0).all()  # and the others really vary
        # every class has more images than pixels, so the constant pixels cost (almost) all the rank
        rank = torch.linalg.matrix_rank(torch.cov(xc.T, correction=0)).item()
        assert rank <= 64 - constant[c].sum().item()
        other_deficit += 64 - constant[c].sum().item() - rank
    assert other_deficit <= 2
    with pytest.raises(ValueError, match=r"class 0 is singular .*: \d+ of its 64 inputs never change"):
        C.GaussianClassifier(64, 10, shrinkage=0.0).fit(x, y)
    C.GaussianClassifier(64, 10, shrinkage=1e-3).fit(x, y)  # any s > 0 makes it definite
    few = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))  # 3 per class, 5 inputs
    with pytest.raises(ValueError, match="3 examples cannot span 5 dimensions"):
        C.GaussianClassifier(5, 2, shrinkage=0.0).fit(few, torch.tensor([0, 0, 0, 1, 1, 1]))


def test_tune_on_validation_keeps_the_best_and_breaks_ties_towards_the_first():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([0, 1])

    class Fixed:
        def __init__(self, label):
            self.label = label

        def predict(self, inputs):
            return torch.full((len(inputs),), self.label)

    tuned = C.tune_on_validation(lambda v: Fixed(int(v > 1)), [0.5, 2.0, 3.0, 1.0], (x, y))
    assert tuned.scores == {0.5: 0.5, 2.0: 0.5, 3.0: 0.5, 1.0: 0.5} and tuned.value == 0.5
    shared = Fixed(0)  # one model mutated along the grid, as a warm start does

    def fit(v):
        shared.label = int(v)
        return shared

    x3, y3 = torch.zeros(3, 1), torch.tensor([1, 1, 0])
    tuned = C.tune_on_validation(fit, [0, 1], (x3, y3))
    assert tuned.value == 1 and tuned.scores == {0: pytest.approx(1 / 3), 1: pytest.approx(2 / 3)}
    fit(0)
    assert tuned.model.label == 1  # a copy: later fits do not change the kept model
    with pytest.raises(ValueError, match="at least one value"):
        C.tune_on_validation(fit, [], (x3, y3))


def test_c4_both_tuned_on_validation_the_gaussian_classifier_still_wins(digits):
    """The fair comparison: l2 and shrinkage each chosen on the validation split."""
    result = C.compare_classifiers(digits["train"], digits["test"], {"whole": None},
                                   val=digits["val"], l2=C.L2_GRID, shrinkage=C.SHRINKAGE_GRID)
    tuned, scores = result["tuned"], result["validation"]
    assert set(scores["discriminative"]) == set(C.L2_GRID)
    assert set(scores["generative"]) == set(C.SHRINKAGE_GRID)
    for kind, key in (("discriminative", "l2"), ("generative", "shrinkage")):
        assert scores[kind][tuned[key]] == max(scores[kind].values())
    # the models returned are the ones fitted with the chosen values
    xv, yv = digits["val"]
    for kind, key in (("discriminative", "l2"), ("generative", "shrinkage")):
        assert C.accuracy(result["models"][kind].predict(xv), yv) == scores[kind][tuned[key]]
    acc = result["accuracy"]["whole"]
    assert acc["generative"] > acc["discriminative"] + 0.02, acc
    with pytest.raises(ValueError, match="needs a validation split"):
        C.compare_classifiers(digits["train"], digits["test"], {}, l2=C.L2_GRID)


def test_c4_learning_curve_small_data_needs_strong_regularisation(digits):
    """With few images per class both tuned classifiers lose accuracy and choose stronger
    regularisation; the Gaussian classifier is ahead at every size on these digits."""
    curve = C.learning_curve(digits["train"], digits["val"], digits["test"], [3, 30, 200], repeats=2)
    assert curve["per_class"] == [3, 30, 200]
    for kind in ("discriminative", "generative"):
        acc, value = curve[kind]["accuracy"].mean(1), curve[kind]["value"]
        assert acc.shape == (3,) and (acc[1:] > acc[:-1]).all(), (kind, acc)
        assert value[0].min() > value[-1].max(), (kind, value)  # strong at 3, weak at all
        assert torch.equal(curve[kind]["accuracy"][-1, 0], curve[kind]["accuracy"][-1, 1])
    assert (curve["generative"]["accuracy"].mean(1) > curve["discriminative"]["accuracy"].mean(1)).all()


def test_small_fits_run_on_one_thread_and_do_not_depend_on_the_thread_count(digits):
    x, y = digits["train"]
    threads = torch.get_num_threads()
    weights = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            weights.append(C.LogisticRegression(64, 10).fit(x, y, l2=1e-4).linear.weight.detach())
            assert torch.get_num_threads() == n  # restored after the fit
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(weights[0], weights[1])


def test_per_class_subset():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    idx = C.per_class_subset(y, 2, seed=0)
    assert torch.bincount(y[idx]).tolist() == [2, 2, 1]
    assert torch.equal(idx, C.per_class_subset(y, 2, seed=0)) and torch.equal(idx, idx.sort().values)
    assert torch.equal(C.per_class_subset(y, 5), torch.arange(6))


def test_c4_marginalising_a_gaussian_is_exact():
    """log N(x_o; μ_o, Σ_oo) equals the log of the joint density integrated over x_h numerically."""
    mean = torch.tensor([0.3, -0.5], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    observed = torch.tensor([True, False])
    m_o, c_o = C.gaussian_marginal(mean, cov, observed)
    joint = torch.distributions.MultivariateNormal(mean, cov)
    hidden = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    for x0 in (-1.0, 0.2, 1.7):
        pts = torch.stack([torch.full_like(hidden, x0), hidden], dim=1)
        integral = torch.trapezoid(joint.log_prob(pts).exp(), hidden)
        exact = torch.distributions.Normal(m_o[0], c_o[0, 0].sqrt()).log_prob(torch.tensor(x0)).exp()
        assert integral.item() == pytest.approx(exact.item(), rel=1e-6)


def test_c4_masked_posterior_uses_only_the_observed_pixels(digits, fitted):
    """Changing a hidden pixel must not change the generative prediction; it does change the raw input."""
    _, gda = fitted
    x = digits["test"].x[:5].clone()
    mask = C.random_mask(5, 64, 0.5, seed=0)
    before = gda.predict_log_proba(x, mask)
    x[~mask] = 0.77
    assert torch.allclose(gda.predict_log_proba(x, mask), before, atol=1e-5)


def test_c4_generative_model_is_a_density():
    """In 2-D, the classifier's p(x) = Σ_c p(c) N(x; μ_c, Σ_c) integrates to one."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.randn(90, 2, generator=g) * 0.5 + torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])[y]
    gda = C.GaussianClassifier(2, 3).fit(x, y)
    grid = torch.linspace(-4, 6, 401)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    p = gda.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(401, 401)
    mass = torch.trapezoid(torch.trapezoid(p, grid, dim=1), grid).item()
    assert mass == pytest.approx(1.0, abs=1e-3)
    assert gda.log_prior.exp().sum().item() == pytest.approx(1.0)
    torch.manual_seed(0)
    samples = gda.sample(3000, context=1)
    assert torch.allclose(samples.mean(0), gda.means[1], atol=0.05)


def test_masks():
    m = C.random_mask(4, 10, 0.3, seed=1)
    assert m.shape == (4, 10) and (m.sum(1) == 7).all()
    assert torch.equal(m, C.random_mask(4, 10, 0.3, seed=1))
    r = C.rows_mask(3, 2, 1)
    assert r.tolist() == [False, False, True, True, True, True]


def test_classifiers_refuse_bad_input(fitted):
    mlr, gda = fitted
    with pytest.raises(ValueError, match="64 features"):
        gda.predict(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="observed should have shape"):
        mlr.predict(torch.zeros(2, 64), torch.ones(3, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="all False"):
        gda.predict(torch.zeros(1, 64), torch.zeros(64, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 examples"):
        C.GaussianClassifier(2, 3).fit(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]))
    assert not math.isnan(gda.log_prob(torch.zeros(1, 64)).item())
