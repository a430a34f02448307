"""Claims C13-C19: normalizing flows, their log-determinants, inverses, duality and discrete data."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from dgmlab import embedded, divergences
from dgmlab import flows as F

torch.manual_seed(0)


def randomise(module, scale=0.3, seed=0):
    """Random weights everywhere (zero-initialised layers would make every map the identity)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * scale
    return module


def vector_transforms():
    d = 5
    return {
        "planar": randomise(F.Planar(d)),
        "coupling": randomise(F.AffineCoupling(F.alternating_mask(d), F.coupling_mlp(d, 16))),
        "maf": randomise(F.MAF(d, (16,))),
        "iaf": randomise(F.IAF(d, (16,), reverse=True)),
        "scale": F.Scale(0.25),
        "composed": F.Compose([randomise(F.MAF(d, (16,)), seed=1), F.Scale(2.0),
                               randomise(F.AffineCoupling(F.alternating_mask(d, 1), F.coupling_mlp(d, 8)), seed=2)]),
    }


def image_transforms():
    c, h, w = 2, 4, 4
    actnorm = F.ActNorm(c)
    actnorm(torch.randn(8, c, h, w))  # data-dependent initialisation
    multiscale = F.MultiScale((c, h, w), levels=2, steps=2, hidden=8)
    multiscale(torch.randn(8, c, h, w))
    with torch.no_grad():  # move every weight off its initial value, keeping the 1×1 mixings well conditioned
        g = torch.Generator().manual_seed(9)
        for p in multiscale.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return {
        "checkerboard coupling": randomise(F.AffineCoupling(F.checkerboard_mask(h, w).expand(c, h, w),
                                                            F.coupling_cnn(c, 8))),
        "channel coupling": randomise(F.AffineCoupling(F.channel_mask(c, h, w), F.coupling_cnn(c, 8))),
        "actnorm": actnorm,
        "1x1 conv": F.Invertible1x1Conv(c, seed=3),
        "squeeze": F.Squeeze(),
        "multiscale": multiscale,
    }


def autograd_log_det(t, x):
    """log|det ∂f/∂x| of the first example, from the full Jacobian computed by autograd."""
    shape = x.shape[1:]

    def f(v):
        return t(v.reshape(1, *shape))[0].reshape(-1)

    return torch.linalg.slogdet(jacobian(f, x[:1].reshape(-1).double().float()))[1].item()


# ---------------------------------------------------------------------------- C13
@pytest.mark.parametrize("name", list(vector_transforms()) + list(image_transforms()))
def test_c13_log_det_equals_the_autograd_jacobian(name):
    t = {**vector_transforms(), **image_transforms()}[name]
    t.eval()
    x = torch.randn(3, 5) if name in vector_transforms() else torch.randn(3, 2, 4, 4)
    z, log_det = t(x)
    assert log_det.shape == (3,)
    for k in range(3):  # float32: about 7 significant digits
        assert log_det[k].item() == pytest.approx(autograd_log_det(t, x[k:k + 1]), abs=1e-4, rel=1e-5)


def test_c13_composed_log_dets_add():
    parts = [randomise(F.MAF(4, (8,)), seed=s) for s in range(3)]
    x = torch.randn(6, 4)
    total, h = torch.zeros(6), x
    for p in parts:
        h, ld = p(h)
        total += ld
    z, log_det = F.Compose(parts)(x)
    assert torch.allclose(z, h) and torch.allclose(log_det, total, atol=1e-6)


def test_c13_flow_density_is_a_density_and_matches_the_pushed_forward_samples():
    torch.manual_seed(1)
    flow = randomise(F.realnvp_2d(layers=4, hidden=16), scale=0.2)
    grid = torch.linspace(-10, 10, 501)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    p = flow.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(501, 501).detach()
    cell = (20 / 500) ** 2
    assert (p.sum() * cell).item() == pytest.approx(1.0, abs=5e-3)
    # samples x = f⁻¹(z) fall into a box as often as the density says
    with torch.no_grad():
        x = flow.sample(20_000)
    inside = ((x[:, 0].abs() < 1) & (x[:, 1].abs() < 1)).float().mean().item()
    box = (gx.abs() < 1) & (gy.abs() < 1)
    assert inside == pytest.approx((p[box].sum() * cell).item(), abs=0.015)


# ---------------------------------------------------------------------------- C14
def test_c14_planar_log_det_formula_and_the_invertibility_constraint():
    g = torch.Generator().manual_seed(4)
    for trial in range(20):
        planar = F.Planar(3)
        with torch.no_grad():
            planar.w.copy_(torch.randn(3, generator=g) * 2)
            planar.u.copy_(torch.randn(3, generator=g) * 2)
        assert (planar.w @ planar.u_hat).item() >= -1 - 1e-6  # û keeps the map invertible
        x = torch.randn(2, 3, generator=g)
        y, log_det = planar(x)
        assert log_det[0].item() == pytest.approx(autograd_log_det(planar, x[:1]), abs=1e-4)
        back, _ = planar.inverse(y)
        assert torch.allclose(planar(back)[0], y, atol=1e-5)  # the inverse maps back onto y ...
        assert torch.allclose(back, x, atol=1e-3)  # ... and x, up to the map's conditioning


def test_c14_planar_inverse_is_differentiable():
    """log p(x) of a planar flow goes through the numerical inverse: its gradients must still be exact."""
    torch.manual_seed(9)
    flow = F.planar_flow(dim=2, layers=3).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 0.8)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: flow.log_prob(v), (x,), eps=1e-6, atol=1e-5)
    params = list(flow.parameters())
    grads = torch.autograd.grad(flow.log_prob(x.detach()).sum(), params)
    with torch.no_grad():  # central differences for one parameter entry of each layer
        for p, g in zip(params, grads):
            old = p.flatten()[0].item()
            p.view(-1)[0] = old + 1e-6
            up = flow.log_prob(x.detach()).sum().item()
            p.view(-1)[0] = old - 1e-6
            down = flow.log_prob(x.detach()).sum().item()
            p.view(-1)[0] = old
            assert g.flatten()[0].item() == pytest.approx((up - down) / 2e-6, abs=1e-4)


def test_c14_an_unconstrained_planar_flow_can_fold_the_plane():
    planar = F.Planar(1, constrain=False)
    with torch.no_grad():
        planar.w.fill_(1.0)
        planar.u.fill_(-3.0)  # wᵀu = −3 < −1
        planar.b.zero_()
    xs = torch.linspace(-3, 3, 601)[:, None]
    ys, _ = planar(xs)
    assert not (ys[1:] > ys[:-1]).all()  # not monotone: two points share an image
    with pytest.raises(ValueError, match="not invertible"):
        planar.inverse(ys)


# ---------------------------------------------------------------------------- C15
@pytest.mark.parametrize("name", ["coupling", "maf", "iaf", "composed", "checkerboard coupling",
                                  "channel coupling", "actnorm", "1x1 conv", "squeeze", "multiscale"])
def test_c15_exactly_invertible(name):
    t = {**vector_transforms(), **image_transforms()}[name]
    t.eval()
    x = torch.randn(16, 5) if name in vector_transforms() else torch.randn(16, 2, 4, 4)
    z, log_det = t(x)
    back, log_det_inv = t.inverse(z)
    assert torch.allclose(back, x, atol=1e-5)
    assert torch.allclose(log_det + log_det_inv, torch.zeros(16), atol=1e-4)
    zz, _ = t(t.inverse(z)[0])
    assert torch.allclose(zz, z, atol=1e-5)


@pytest.mark.parametrize("name", ["coupling", "maf", "iaf"])
def test_c15_the_jacobian_is_triangular(name):
    t = vector_transforms()[name]
    x = torch.randn(1, 5)
    J = jacobian(lambda v: t(v[None])[0][0], x[0])
    if name == "coupling":  # kept coordinates first: block triangular with identity on the kept block
        order = torch.cat([F.alternating_mask(5).nonzero().flatten(), (~F.alternating_mask(5)).nonzero().flatten()])
    elif name == "maf":
        order = torch.arange(5)
    else:
        order = torch.arange(4, -1, -1)
    P = J[order][:, order]
    assert torch.allclose(P.triu(1), torch.zeros(5, 5), atol=1e-6)
    assert t(x)[1].item() == pytest.approx(P.diagonal().abs().log().sum().item(), abs=1e-5)


# ---------------------------------------------------------------------------- C16
def test_c16_kl_duality_in_data_space_and_in_noise_space():
    torch.manual_seed(5)
    flow = randomise(F.realnvp_2d(layers=4, hidden=16), scale=0.15)
    target = embedded.toy_density("two_gaussians")
    grid = torch.linspace(-9, 9, 361)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    cell = (18 / 360) ** 2
    with torch.no_grad():
        # data space: KL(π(x) ‖ p(x | θ))
        kl_x = divergences.f_divergence_grid("kl", target.log_prob(pts), flow.log_prob(pts), cell).item()
        # noise space: π pushed through f, p(z|θ)(z) = π(f⁻¹(z)) |det ∂f⁻¹/∂z|, against N(0, I)
        x, log_det_inv = flow.transform.inverse(pts)
        log_pz_theta = target.log_prob(x) + log_det_inv
        log_base = flow.base_log_prob(pts)
        kl_z = divergences.f_divergence_grid("kl", log_pz_theta, log_base, cell).item()
    assert kl_x > 0.1
    assert kl_z == pytest.approx(kl_x, rel=2e-3)


# ---------------------------------------------------------------------------- C17
def test_c17_cdf_discretisation_is_a_proper_distribution():
    torch.manual_seed(6)
    model = F.DiscretizedLogistic((3, 4), levels=17)
    with torch.no_grad():
        model.loc.normal_(8, 6)
        model.log_scale.normal_(0, 1.5)
    levels = torch.arange(17).reshape(17, 1, 1).expand(17, 3, 4)
    probs = torch.stack([model.probs(levels[k][None])[0] for k in range(17)])
    assert (probs > 0).all()
    assert torch.allclose(probs.sum(0), torch.ones(3, 4), atol=1e-5)
    # P(y) = F(y + 1) − F(y) in the middle bins: level y owns [y, y + 1), as in dequantization
    y = torch.full((1, 3, 4), 7.0)
    assert torch.allclose(model.probs(y), model.cdf(y + 1) - model.cdf(y), atol=1e-6)
    u = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000  # midpoints of [0, 1)
    loc, scale = model.loc[0, 0].double().item(), model.log_scale[0, 0].double().exp().item()
    logistic = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
        [torch.distributions.SigmoidTransform().inv, torch.distributions.AffineTransform(loc, scale)])
    for level in (3, 8, 12):  # ∫_y^{y+1} p(x) dx, the mass a dequantized density gives y
        integral = logistic.log_prob(level + u).exp().mean().item()
        assert model.probs(torch.full((1, 3, 4), float(level)))[0, 0, 0].item() == pytest.approx(integral, rel=1e-4)
    counts = torch.bincount(model.sample(20_000)[:, 0, 0], minlength=17) / 20_000
    assert (counts - probs[:, 0, 0]).abs().max() < 0.015


# ---------------------------------------------------------------------------- C18
def test_c18_uniform_bound_below_the_discrete_likelihood_and_variational_tighter():
    """1-D data on 6 levels, a fixed continuous density p: all three quantities exactly by quadrature."""
    p = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.tensor([0.3, 0.7])),
                                              torch.distributions.Normal(torch.tensor([1.2, 3.9]), torch.tensor([0.6, 1.1])))
    u = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000  # midpoints of [0, 1)
    for y in range(6):
        density = p.log_prob((y + u).float()).double().exp()
        exact = torch.log(density.mean()).item()  # log ∫_y^{y+1} p(x) dx
        uniform = torch.log(density).mean().item()  # E_U[log p(y + u)]
        # a variational q: the density of a Beta(a, b) on the bin, a crude but honest choice
        q = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0 if y < 3 else 1.3))
        q_log = q.log_prob(u.float().clamp(1e-6, 1 - 1e-6)).double()
        variational = ((density.log() - q_log) * q_log.exp()).mean().item()  # E_q[log p − log q]
        best = ((density.log() - (density / density.mean()).log()) * density / density.mean()).mean().item()
        assert uniform <= exact + 1e-9 and variational <= exact + 1e-9
        assert best == pytest.approx(exact, abs=1e-9)  # q ∝ p on the bin closes the gap
    # a learned q closes most of the gap on data (trained in the model below)


def exact_discrete_log_likelihood(flow, y, levels=6, resolution=40):
    """Mean log P(y) of 2-D levels y under a flow's density, by quadrature over each bin [y, y + 1)²."""
    u = (torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij"), -1)
         .reshape(-1, 2) + 0.5) / resolution
    grid = torch.stack(torch.meshgrid(torch.arange(levels), torch.arange(levels), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_bin = torch.stack([torch.logsumexp(flow.log_prob(lv + u), 0) - math.log(len(u)) for lv in grid])
    return log_bin[y[:, 0] * levels + y[:, 1]].mean().item(), torch.logsumexp(log_bin, 0).exp().item()


def test_c18_a_learned_noise_flow_beats_uniform_dequantization():
    """Each flow trained with its own dequantizer (the fair comparison), every bound below the exact value."""
    g = torch.Generator().manual_seed(7)
    y = torch.multinomial(torch.tensor([0.05, 0.4, 0.1, 0.05, 0.3, 0.1]), 4000, replacement=True, generator=g)
    y = torch.stack([y, (y + torch.randint(0, 2, (4000,), generator=g)) % 6], 1)  # 2-D discrete data, levels 0..5
    measured = {}
    for kind in ("uniform", "variational"):
        torch.manual_seed(7)
        flow = F.maf_flow(2, layers=3, hidden=(32,), levels=6)
        model = (F.UniformDequantization(flow, 6) if kind == "uniform" else
                 F.VariationalDequantization(flow, F.dequantization_noise(2, layers=2, hidden=16), 6))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(400):
            loss = -model.log_prob(y[torch.randint(0, 4000, (256,))]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            bound = torch.stack([model.log_prob(y).mean() for _ in range(10)]).mean().item()
            on_uniform = torch.stack([F.UniformDequantization(flow, 6).log_prob(y).mean() for _ in range(10)])
        exact, total = exact_discrete_log_likelihood(flow, y)
        # the bins hold almost all the mass (the Logit's α squeeze leaks a little outside the data range)
        assert 0.95 < total <= 1.0 + 1e-3
        measured[kind] = (bound, exact, on_uniform.mean().item())
    (u_bound, u_exact, _), (v_bound, v_exact, u_on_v) = measured["uniform"], measured["variational"]
    assert u_bound <= u_exact + 0.01 and v_bound <= v_exact + 0.01  # both are lower bounds (Jensen)
    assert u_bound < v_bound  # fair: each flow trained for its own bound
    assert u_on_v < v_bound  # the same density: the learned q beats U
    assert v_exact - v_bound < u_exact - u_bound, measured  # ... and its bound is the tighter one


# ---------------------------------------------------------------------------- C19
def count_passes(net, fn):
    net.calls = 0
    fn()
    return net.calls


@pytest.mark.parametrize("d", [4, 16])
def test_c19_maf_density_is_one_pass_and_sampling_d_passes_iaf_the_reverse(d):
    maf, iaf = F.MAF(d, (8,)), F.IAF(d, (8,))
    x = torch.randn(10, d)
    with torch.no_grad():
        assert count_passes(maf.net, lambda: maf(x)) == 1  # density
        assert count_passes(maf.net, lambda: maf.inverse(x)) == d  # sampling: one pass per dimension
        assert count_passes(iaf.net, lambda: iaf.inverse(x)) == 1  # sampling
        assert count_passes(iaf.net, lambda: iaf(x)) == d  # density


# ---------------------------------------------------------------------------- behaviour
def test_flow_model_api_and_shapes():
    flow = F.realnvp_image((1, 8, 8), levels=17, scales=2, steps=1, hidden=8)
    y = embedded.digits("train").x[:6]
    model = F.UniformDequantization(flow, 17)
    assert model.log_prob_is_bound and model.log_prob(y).shape == (6,)
    s = model.sample(3)
    assert s.shape == (3, 1, 8, 8) and s.dtype == torch.long and 0 <= s.min() and s.max() <= 16
    x, log_q = flow.rsample_and_log_prob(4)
    assert torch.allclose(log_q, flow.log_prob(x), atol=1e-3)


def test_actnorm_initialises_from_the_first_batch():
    x = torch.randn(64, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1])[None, :, None, None] + 2
    a = F.ActNorm(3)
    z, _ = a(x)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(3), atol=1e-3)


def test_log_dets_stay_finite_in_float32_at_cifar_size():
    """Log-determinants are sums of logs, never logs of products: at 3072 dimensions the determinant itself
    (e.g. 256^-3072 for the scaling alone) is far outside float32, its logarithm is not."""
    torch.manual_seed(8)
    flow = F.realnvp_image((3, 32, 32), levels=256, scales=2, steps=1, hidden=8)
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() + torch.rand(2, 3, 32, 32)
    x[0] = 255.99  # every pixel at the edge of the range: the Logit's derivative is at its largest
    z, log_det = flow.transform(x)
    assert z.dtype == log_det.dtype == torch.float32 and torch.isfinite(z).all() and torch.isfinite(log_det).all()
    assert torch.isfinite(flow.log_prob(x)).all()
    scale_only = F.Scale(1 / 256)(x)[1]
    assert scale_only[0].item() == pytest.approx(-3072 * math.log(256), rel=1e-6)
    assert torch.prod(torch.full((3072,), 1 / 256)).item() == 0.0  # the product underflows: why we sum logs
    # the layers' log-dets add up to the composition's (float32 accumulation loses under 1e-5 relative)
    total, h = torch.zeros(2, dtype=torch.float64), x
    for layer in flow.transform.transforms:
        h, part = layer(h)
        total += part.double()
    assert torch.allclose(total, log_det.double(), rtol=1e-5, atol=1e-2)


def test_flows_refuse_bad_input():
    with pytest.raises(ValueError, match="even height"):
        F.Squeeze()(torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match="channels"):
        F.Invertible1x1Conv(3)(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        F.AffineCoupling(F.alternating_mask(4), F.coupling_mlp(4))(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        F.Logit(0.0)(torch.tensor([[1.5]]))
    with pytest.raises(ValueError, match="divisible"):
        F.MultiScale((1, 6, 6), levels=2)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        F.realnvp_2d(2).log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"conditional: pass a context of shape \(2, 4\)"):
        F.dequantization_noise(4).sample(2)
    with pytest.raises(ValueError, match="not conditional"):
        F.realnvp_2d(2).log_prob(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"Scale the data first"):
        F.Logit(0.05)(torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="integer levels"):
        F.UniformDequantization(F.maf_flow(4, levels=17), 17).log_prob(torch.full((1, 4), 0.5))
