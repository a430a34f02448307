"""Claims C6-C9: f-divergences, their properties, MLE as forward KL, mode covering vs seeking."""

import math

import pytest
import torch

from dgmlab import baselines, divergences as D, train

Normal = torch.distributions.Normal
PROPER = [n for n, g in D.GENERATORS.items() if g.offset == 0]


def random_simplex(k, n=1, seed=0, sparse=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, k, generator=g, dtype=torch.float64) ** 3
    if sparse:
        p[torch.rand(n, k, generator=g) < 0.3] = 0.0
        p[:, 0] += 1e-3  # keep every row a distribution
    return p / p.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------- C6
@pytest.mark.parametrize("name", list(D.GENERATORS))
def test_c6_generator_is_convex_with_f1_zero(name):
    g = D.GENERATORS[name]
    u = torch.logspace(-4, 4, 2001, dtype=torch.float64)
    f = g(u)
    # convexity on a non-uniform grid: every chord lies above the function
    left, mid, right = u[:-2], u[1:-1], u[2:]
    t = (mid - left) / (right - left)
    chord = (1 - t) * f[:-2] + t * f[2:]
    assert (chord - f[1:-1] >= -1e-10 * (1 + f[1:-1].abs())).all()
    # f(1) = 0 for every divergence; the GAN generator is offset by −log 4
    assert g(torch.tensor(1.0)).item() == pytest.approx(g.offset, abs=1e-12)
    if name == "gan":
        assert g.offset == pytest.approx(-math.log(4))
    # the edge limits are what the generator tends to
    assert g(torch.tensor(1e-24)).item() == pytest.approx(g.f0, abs=1e-9) or math.isinf(g.f0)
    big = torch.tensor(1e12, dtype=torch.float64)
    assert (g(big) / big).item() == pytest.approx(g.slope_at_infinity, abs=1e-3) or math.isinf(g.slope_at_infinity)


@pytest.mark.parametrize("name", list(D.GENERATORS))
def test_c6_f_divergence_equals_the_closed_form_on_discrete_distributions(name):
    pi, p = random_simplex(7, 20, seed=1), random_simplex(7, 20, seed=2)
    assert torch.allclose(D.f_divergence(name, pi, p), D.closed_form(name, pi, p), rtol=1e-10, atol=1e-12)
    pi, p = random_simplex(7, 20, seed=3, sparse=True), random_simplex(7, 20, seed=4, sparse=True)
    a, b = D.f_divergence(name, pi, p), D.closed_form(name, pi, p)
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and not torch.isnan(a).any()
    assert torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)], rtol=1e-10, atol=1e-12)


def chi2_gaussians(m1, s1, m2, s2):
    """Pearson χ²(N(m1, s1²) ‖ N(m2, s2²)) = ∫ π²/p − 1, derived by completing the square."""
    a = 1 / s1**2 - 1 / (2 * s2**2)
    b = 2 * m1 / s1**2 - m2 / s2**2
    c = m1**2 / s1**2 - m2**2 / (2 * s2**2)
    return s2 / (s1**2 * math.sqrt(2 * math.pi)) * math.sqrt(math.pi / a) * math.exp(b**2 / (4 * a) - c) - 1


def hellinger_gaussians(m1, s1, m2, s2):
    """∫(√π − √p)² = 2 − 2·(Bhattacharyya coefficient) for two 1-D Gaussians."""
    bc = math.sqrt(2 * s1 * s2 / (s1**2 + s2**2)) * math.exp(-((m1 - m2) ** 2) / (4 * (s1**2 + s2**2)))
    return 2 - 2 * bc


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.5, 1.3, -0.2, 1.0), (0.0, 0.7, 1.0, 0.9), (2.0, 1.0, 2.0, 1.5)])
def test_c6_f_divergence_equals_the_closed_form_on_gaussians(m1, s1, m2, s2):
    x, dx = D.grid_1d(-25, 25, 20001)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731  (float32 parameters cost 1e-6 here)
    log_pi, log_p = Normal(f64(m1), f64(s1)).log_prob(x), Normal(f64(m2), f64(s2)).log_prob(x)

    def kl(ma, sa, mb, sb):
        return D.kl_gaussians(f64([ma]), f64([[sa**2]]), f64([mb]), f64([[sb**2]])).item()

    exact = {"kl": kl(m1, s1, m2, s2), "reverse_kl": kl(m2, s2, m1, s1),
             "pearson": chi2_gaussians(m1, s1, m2, s2), "hellinger": hellinger_gaussians(m1, s1, m2, s2)}
    for name, value in exact.items():
        assert D.f_divergence_grid(name, log_pi, log_p, dx).item() == pytest.approx(value, rel=1e-10, abs=1e-12), name
    # JS and GAN have no Gaussian closed form: check them against their table formulas on the grid
    for name in ("js", "gan"):
        masses = (log_pi.exp() * dx, log_p.exp() * dx)
        masses = tuple(m / m.sum() for m in masses)
        assert D.f_divergence_grid(name, log_pi, log_p, dx).item() == pytest.approx(
            D.closed_form(name, *masses).item(), abs=1e-6)


def test_c6_kl_gaussians_full_covariance_matches_monte_carlo():
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    c1, c2 = A @ A.T + torch.eye(3, dtype=torch.float64), B @ B.T + torch.eye(3, dtype=torch.float64)
    m1, m2 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    exact = D.kl_gaussians(m1, c1, m2, c2).item()
    q1 = torch.distributions.MultivariateNormal(m1, c1)
    q2 = torch.distributions.MultivariateNormal(m2, c2)
    torch.manual_seed(0)
    x = q1.sample((200_000,))
    est = D.mc_kl(q1.log_prob(x), q2.log_prob(x))
    assert abs(est.mean - exact) < 4 * est.stderr
    assert exact == pytest.approx(torch.distributions.kl_divergence(q1, q2).item(), rel=1e-10)
    diag = D.kl_diag_gaussians(m1, c1.diagonal(), m2, c2.diagonal()).item()
    assert diag == pytest.approx(D.kl_gaussians(m1, torch.diag(c1.diagonal()), m2, torch.diag(c2.diagonal())).item())


# ---------------------------------------------------------------------------- C7
@pytest.mark.parametrize("name", list(D.GENERATORS))
def test_c7_divergence_is_nonnegative_and_zero_only_for_equal_distributions(name):
    g = D.GENERATORS[name]
    pi, p = random_simplex(6, 500, seed=6), random_simplex(6, 500, seed=7)
    d = D.f_divergence(name, pi, p)
    assert (d > g.offset).all()  # strictly positive for different distributions (GAN: above −log 4)
    same = D.f_divergence(name, pi, pi)
    assert torch.allclose(same, torch.full_like(same, g.offset), atol=1e-12)
    # it grows continuously from 0 as p moves away from π
    gaps = [D.f_divergence(name, pi[:1], (1 - t) * pi[:1] + t * p[:1]).item() - g.offset for t in (1e-3, 1e-2, 1e-1)]
    assert 0 < gaps[0] < gaps[1] < gaps[2]


def test_infinite_divergences_are_inf_not_nan():
    pi = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    p = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    for name in ("kl", "reverse_kl", "pearson"):
        assert D.f_divergence(name, pi, p).item() == math.inf
    assert D.f_divergence("hellinger", pi, p).item() == pytest.approx(1.0)  # bounded
    assert D.f_divergence("js", pi, p).item() == pytest.approx(0.5 * math.log(2))
    x, dx = D.grid_1d(-1, 1, 201)
    inside = torch.where(x.abs() < 0.5, 0.0, -math.inf).double()
    assert D.f_divergence_grid("kl", torch.full_like(x, -math.log(2)), inside - math.log(dx * 100), dx).item() == math.inf


def test_kl_is_infinite_exactly_when_pi_puts_mass_where_p_has_none():
    pi, p = random_simplex(5, 400, seed=8, sparse=True), random_simplex(5, 400, seed=9, sparse=True)
    outside = ((p == 0) & (pi > 0)).any(-1)
    assert 0 < outside.sum() < len(pi)  # both cases occur
    kl = D.f_divergence("kl", pi, p)
    assert torch.equal(torch.isinf(kl), outside)  # on finitely many outcomes: the only way to be infinite
    reverse = D.f_divergence("kl", p, pi)
    assert torch.equal(torch.isinf(reverse), ((pi == 0) & (p > 0)).any(-1))
    # the reverse-KL generator prices the same mistake through f(0⁺) = ∞
    via_generator = D.f_divergence("reverse_kl", pi, p)
    assert torch.equal(torch.isinf(via_generator), torch.isinf(reverse))
    finite = ~torch.isinf(reverse)
    assert torch.allclose(via_generator[finite], reverse[finite], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(D.GENERATORS))
def test_disjoint_supports_give_the_edge_constant_whatever_the_distance(name):
    g = D.GENERATORS[name]
    box = torch.zeros(21, 30, dtype=torch.float64)
    for s in range(21):
        box[s, s:s + 10] = 0.1  # uniform on {s, ..., s + 9}
    d = D.f_divergence(name, box[0].expand_as(box), box)
    disjoint = d[10:]
    assert (disjoint == g.f0 + g.slope_at_infinity).all()  # f(0⁺) + f'(∞), the same at every shift
    if name == "js":  # grows linearly while the boxes overlap, then stuck at log 2
        assert torch.allclose(d[:11], torch.arange(11, dtype=torch.float64) / 10 * math.log(2), atol=1e-12)
    if name == "kl":
        assert torch.isinf(d[1:]).all() and d[0] == 0


def test_a_generator_strictly_convex_only_at_one_still_gives_a_divergence():
    # total variation, f(u) = ½|u − 1|: straight on either side of u = 1, with a kink at 1
    tv = D.FGenerator("tv", "total variation", lambda u: 0.5 * (u - 1).abs(), 0.5, 0.5, r"\tfrac12|u - 1|", "")
    pi, p = random_simplex(6, 500, seed=10, sparse=True), random_simplex(6, 500, seed=11, sparse=True)
    d = D.f_divergence(tv, pi, p)
    assert torch.allclose(d, 0.5 * (pi - p).abs().sum(-1), atol=1e-12)  # the edge limits included
    assert (d > 0).all() and (D.f_divergence(tv, pi, pi) == 0).all()


@pytest.mark.parametrize("tiny", [1e-310, 5e-324])  # subnormal p: π/p overflows to inf
def test_tiny_p_takes_the_limit_for_p_zero_and_matches_the_closed_form(tiny):
    pi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    p = torch.tensor([1.0, tiny], dtype=torch.float64)
    zero = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for name in D.GENERATORS:
        got = D.f_divergence(name, pi, p).item()
        assert got == D.f_divergence(name, pi, zero).item(), name  # the p → 0 limit, never NaN
        if name in ("kl", "pearson"):
            assert got == math.inf  # π · lim f(u)/u with an infinite slope
        else:  # bounded terms: the limit is what the closed form gives at this p
            assert got == pytest.approx(D.closed_form(name, pi, p).item(), rel=1e-12), name
    # f(π/p) itself can overflow while π/p is finite (here 5e307): still no NaN
    p = torch.tensor([1.0, 1e-308], dtype=torch.float64)
    assert D.f_divergence("js", pi, p).item() == pytest.approx(D.closed_form("js", pi, p).item(), rel=1e-12)
    assert D.f_divergence("kl", pi, p).item() == math.inf


def test_monte_carlo_with_an_overflowing_ratio_is_never_nan():
    log_pi = torch.tensor([0.0, 0.0], dtype=torch.float64)
    est = D.mc_f_divergence("js", log_pi, torch.tensor([-800.0, -1.0]))  # π/p = e^800 overflows
    assert est.mean == math.inf and est.stderr == math.inf
    for name, g in D.GENERATORS.items():  # lim_{u→∞} f(u): the sign of the slope, −inf for slope 0
        limit = math.copysign(math.inf, g.slope_at_infinity) if g.slope_at_infinity else -math.inf
        assert D.mc_f_divergence(name, log_pi, torch.tensor([-800.0, -1.0])).mean == limit, name
    # where π/p = e^708.5 is still finite, the sublinear generators stay exact
    log_p = torch.tensor([-708.5, -1.0], dtype=torch.float64)
    assert D.mc_f_divergence("reverse_kl", log_pi, log_p).mean == pytest.approx((-708.5 - 1.0) / 2, rel=1e-12)
    # GAN: f(u) = u log u − (u + 1) log(u + 1) ≈ −1 − log u for huge u; f(e) = e − (e + 1) log(e + 1)
    gan = (-1 - 708.5 + math.e - (math.e + 1) * math.log(math.e + 1)) / 2
    assert D.mc_f_divergence("gan", log_pi, log_p).mean == pytest.approx(gan, rel=1e-12)


def test_divergences_refuse_bad_input():
    with pytest.raises(ValueError, match="negative"):
        D.f_divergence("kl", torch.tensor([1.2, -0.2]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="sum to 1"):
        D.f_divergence("kl", torch.tensor([0.3, 0.3]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="same outcomes"):
        D.f_divergence("kl", torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="generator should be one of"):
        D.f_divergence("tv", torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="positive definite"):
        D.kl_gaussians(torch.zeros(2), -torch.eye(2), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="log_p must be finite"):
        D.mc_f_divergence("kl", torch.zeros(3), torch.tensor([0.0, -math.inf, 0.0]))


def test_monte_carlo_error_bars_shrink_like_one_over_root_n():
    pi, p = Normal(0.0, 1.0), Normal(1.0, 1.5)
    exact = D.kl_diag_gaussians(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2.25])).item()
    torch.manual_seed(1)
    small, large = pi.sample((1000,)), pi.sample((100_000,))
    a, b = (D.mc_kl(pi.log_prob(x), p.log_prob(x)) for x in (small, large))
    for est in (a, b):
        assert abs(est.mean - exact) < 4 * est.stderr
    assert a.stderr / b.stderr == pytest.approx(10.0, rel=0.2)  # 100× the samples, 1/10 the error
    y = p.sample((100_000,))  # the same KL as E_p f(π/p) with f = u log u, from samples of p
    est = D.mc_f_divergence("kl", pi.log_prob(y), p.log_prob(y))
    assert abs(est.mean - exact) < 4 * est.stderr


# ---------------------------------------------------------------------------- C8
def bimodal(d=2.5, w=0.3):
    return lambda t: torch.logaddexp(math.log(w) + Normal(-d, 1.0).log_prob(t), math.log(1 - w) + Normal(d, 1.0).log_prob(t))


def test_c8_forward_kl_and_expected_nll_differ_by_the_data_entropy():
    log_pi = bimodal()
    x, dx = D.grid_1d(-15, 15, 12001)
    lp = log_pi(x)
    entropy = -(lp.exp() * lp).sum() * dx
    gaps = []
    for mu in (-1.0, 0.0, 0.7, 2.0):
        for sigma in (0.8, 1.5, 3.0):
            lq = Normal(mu, sigma).log_prob(x)
            kl = D.f_divergence_grid("kl", lp, lq, dx)
            cross_entropy = -(lp.exp() * lq).sum() * dx  # the expected NLL, −E_π log p
            gaps.append((cross_entropy - kl).item())
    assert max(gaps) - min(gaps) < 1e-9  # the same constant for every model ...
    assert gaps[0] == pytest.approx(entropy.item(), abs=1e-9)  # ... and it is H(π)


def test_c8_maximum_likelihood_lands_on_the_forward_kl_minimiser():
    w, d = 0.3, 2.5
    torch.manual_seed(0)
    n = 20_000
    comp = (torch.rand(n) > w).float()
    x = (torch.randn(n) + d * (2 * comp - 1))[:, None]
    model = baselines.DiagonalGaussian(1)
    train.fit(model, x, epochs=60, batch_size=2000, lr=0.05, progress=False)  # gradient MLE
    mu_kl, sigma_kl = D.fit_gaussian_1d(bimodal(d, w), "forward", lo=-15, hi=15)
    # the exact forward-KL minimiser is moment matching: E x and sd(x) under π
    mean = (1 - 2 * w) * d
    assert mu_kl == pytest.approx(mean, abs=1e-6)
    assert sigma_kl == pytest.approx(math.sqrt(1 + d**2 - mean**2), abs=1e-6)
    se_mu, se_sigma = sigma_kl / math.sqrt(n), sigma_kl / math.sqrt(2 * n)
    assert model.mean.item() == pytest.approx(mu_kl, abs=5 * se_mu + 0.01)
    assert model.std.item() == pytest.approx(sigma_kl, abs=5 * se_sigma + 0.01)


# ---------------------------------------------------------------------------- C9
def reverse_kl_on_grid(log_pi, mus, sigmas):
    x, dx = D.grid_1d(-15, 15, 6001)
    lp = log_pi(x)
    lp = lp - torch.logsumexp(lp, 0) - math.log(dx)
    best = (math.inf, None, None)
    for mu in mus:
        for s in sigmas:
            lq = Normal(mu, s).log_prob(x)
            val = D.f_divergence_grid("kl", lq, lp, dx).item()
            best = min(best, (val, mu, s))
    return best


def test_c9_forward_kl_covers_the_modes_reverse_kl_seeks_one():
    d, w = 3.0, 0.3
    log_pi = bimodal(d, w)
    mu_f, s_f = D.fit_gaussian_1d(log_pi, "forward")
    mu_r, s_r = D.fit_gaussian_1d(log_pi, "reverse")
    # forward: wide and between the modes, putting real density on both
    assert -d < mu_f < d and s_f > 2.5
    q_f = Normal(mu_f, s_f)
    assert q_f.log_prob(torch.tensor(-d)).exp() > 0.03 and q_f.log_prob(torch.tensor(d)).exp() > 0.03
    # reverse: on the heavier mode (weight 0.7 at +d), about as narrow as it
    assert mu_r == pytest.approx(d, abs=0.05) and s_r == pytest.approx(1.0, abs=0.05)
    assert Normal(mu_r, s_r).log_prob(torch.tensor(-d)).exp() < 1e-5
    # the optimiser found the global minimum of the reverse KL (brute force on a grid of (μ, σ))
    _, mu_b, s_b = reverse_kl_on_grid(log_pi, torch.linspace(-4, 4, 81).tolist(), torch.linspace(0.5, 4, 36).tolist())
    assert mu_r == pytest.approx(mu_b, abs=0.11) and s_r == pytest.approx(s_b, abs=0.11)


def test_c9_the_two_fits_agree_when_the_target_is_gaussian():
    log_pi = lambda t: Normal(0.7, 1.3).log_prob(t)  # noqa: E731
    for direction in ("forward", "reverse"):
        mu, s = D.fit_gaussian_1d(log_pi, direction)
        assert mu == pytest.approx(0.7, abs=1e-4) and s == pytest.approx(1.3, abs=1e-4)
