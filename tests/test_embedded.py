"""The embedded digits and the 2-D toy densities."""

import math

import pytest
import torch

from dgmlab import embedded


def test_digit_splits_are_fixed_disjoint_and_balanced():
    sizes = {s: len(embedded.digits(s).x) for s in ("train", "val", "test")}
    assert sizes == embedded.SPLIT_SIZES == {"train": 1199, "val": 299, "test": 299}
    full = embedded.digits("all", flatten=True).x
    assert len(full) == 1797
    # the splits partition the data set (rows compared as whole images)
    parts = torch.cat([embedded.digits(s, flatten=True).x for s in ("train", "val", "test")])
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(parts) == key(full)
    for s in ("train", "val", "test"):
        share = torch.bincount(embedded.digits(s).y, minlength=10) / sizes[s]
        assert share.min() > 0.07 and share.max() < 0.13, (s, share)  # every class ~10 %
    # the rule is documented: image i of the file is in test iff i % 6 == 5
    assert torch.equal(embedded.digits("test", flatten=True).x[0], full[5])


def test_digit_variants_agree():
    lv = embedded.digits("train")
    assert lv.x.shape == (1199, 1, 8, 8) and lv.x.dtype == torch.int64
    assert lv.x.min() == 0 and lv.x.max() == 16
    bi = embedded.digits("train", "binary")
    assert bi.x.dtype == torch.float32 and set(bi.x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(bi.x, (lv.x >= 8).float())
    un = embedded.digits("train", "unit", flatten=True)
    assert un.x.shape == (1199, 64) and torch.allclose(un.x * 16, lv.x.reshape(1199, 64).float())
    assert torch.equal(lv.y, bi.y)


def test_digits_are_copies():
    a = embedded.digits("train")
    a.x[:] = 0
    assert embedded.digits("train").x.max() == 16


def test_digits_refuse_bad_arguments():
    with pytest.raises(ValueError, match="split should be one of"):
        embedded.digits("validation")
    with pytest.raises(ValueError, match="variant should be one of"):
        embedded.digits("train", "grey")


@pytest.mark.parametrize("name", [n for n in embedded.TOY_DENSITIES if embedded.toy_density(n).exact])
def test_toy_densities_integrate_to_one_and_match_their_samplers(name):
    toy = embedded.toy_density(name)
    lo, hi = toy.extent
    n = 200
    edges = torch.linspace(lo, hi, n + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    gx, gy = torch.meshgrid(centres, centres, indexing="xy")
    p = toy.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(n, n)
    cell = ((hi - lo) / n) ** 2
    assert (p.sum() * cell).item() == pytest.approx(1.0, abs=3e-3)
    # the sampler draws from that density: compare masses on a coarse 8×8 grid
    coarse = p.reshape(8, n // 8, 8, n // 8).sum((1, 3)) * cell
    x = toy.sample(40_000, seed=0)
    ix = ((x - lo) / (hi - lo) * 8).floor().long().clamp(0, 7)
    freq = torch.zeros(8, 8)
    freq.index_put_((ix[:, 1], ix[:, 0]), torch.ones(len(x)), accumulate=True)
    freq /= len(x)
    assert 0.5 * (freq - coarse).abs().sum().item() < 0.02  # total variation


def test_toy_sampling_is_seeded():
    toy = embedded.toy_density("two_moons")
    assert torch.equal(toy.sample(5, seed=1), toy.sample(5, seed=1))
    assert not torch.equal(toy.sample(5, seed=1), toy.sample(5, seed=2))
    assert toy.sample(7).shape == (7, 2) and toy.sample(7).dtype == torch.float32


def test_toy_density_errors():
    with pytest.raises(NotImplementedError, match="no closed-form"):
        embedded.toy_density("spirals").log_prob(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        embedded.toy_density("rings").log_prob(torch.zeros(3))
    with pytest.raises(ValueError, match="name should be one of"):
        embedded.toy_density("swiss_roll")
    assert embedded.toy_density("checkerboard").log_prob(torch.tensor([[-1.5, -1.5]])).item() == float("-inf")


# ---------------------------------------------------------------------------- energies
def box_integral(u, half_width, half_height=None, resolution=0.04):
    """∫ exp(−U) over [−L, L] × [−H, H] (H = L by default) by the midpoint rule, in float64."""
    def centres(half):
        n = int(round(2 * half / resolution))
        return (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half / n) - half, 2 * half / n

    (c1, h1), (c2, h2) = centres(half_width), centres(half_height or half_width)
    gx, gy = torch.meshgrid(c1, c2, indexing="xy")
    values = torch.cat([(-u(torch.stack([a.flatten(), b.flatten()], 1))).exp()
                        for a, b in zip(gx.split(200), gy.split(200))])
    return (values.sum() * h1 * h2).item()


@pytest.mark.parametrize("name,envelope", [("ring", None), ("ring", 2.0), ("wave", 2.0), ("two_waves", 2.0),
                                           ("step_wave", 1.5)])
def test_normalisable_energies_integrate_to_a_limit_as_the_box_grows(name, envelope):
    u = embedded.energy(name, envelope=envelope)
    masses = [box_integral(u, half) for half in (8.0, 12.0, 16.0)]  # the mass outside shrinks to nothing
    assert masses[0] <= masses[1] <= masses[2] * (1 + 1e-12)
    assert masses[1] == pytest.approx(masses[0], rel=2e-4) and masses[2] == pytest.approx(masses[1], rel=1e-8)
    if name != "ring":  # the closed form: the z₂-integral is constant, the z₁-marginal N(0, s²)
        assert math.log(masses[2]) == pytest.approx(embedded.log_normalizer(name, envelope=envelope), abs=1e-6)
    assert (name in embedded.NORMALISABLE) == (name == "ring")


@pytest.mark.parametrize("name", ["wave", "two_waves", "step_wave"])
def test_the_bare_waves_are_not_normalisable(name):
    """Periodic in z₁ with nothing to confine it: the integral grows with the box, in proportion to its width."""
    u = embedded.energy(name)
    # z₁ over widths 8 and 16 (whole periods of the sine), z₂ over all the ridges' mass
    small, large = box_integral(u, 4.0, 8.0), box_integral(u, 8.0, 8.0)
    assert large / small == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(ValueError, match="not normalisable"):
        embedded.log_normalizer(name)


def test_energy_envelope_is_checked_and_adds_a_gaussian_term():
    z = torch.tensor([[1.5, -0.3], [-2.0, 0.7]])
    for name in embedded.ENERGIES:
        bare, wrapped = embedded.energy(name)(z), embedded.energy(name, envelope=2.0)(z)
        assert torch.allclose(wrapped - bare, 0.5 * (z[:, 0] / 2.0) ** 2)
    for bad in (0.0, -1.0, float("inf"), "wide"):
        with pytest.raises(ValueError, match="envelope should be a positive width"):
            embedded.energy("wave", envelope=bad)
    with pytest.raises(NotImplementedError, match="no closed form"):
        embedded.log_normalizer("ring")


def test_two_moons_quadrature_is_converged():
    """The moons' density is a quadrature over each arc: its default node count must match a much finer one."""
    fine = embedded._two_moons(nodes=256)
    toy = embedded.toy_density("two_moons")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([toy.sample(5000, seed=3), torch.rand(5000, 2, generator=g) * 6 - 3]).double()
    reference = fine.log_prob(x)
    near = reference > -30
    assert (toy.log_prob(x) - reference)[near].abs().max().item() < 1e-10
