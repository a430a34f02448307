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
