"""The embedded digits and the 2-D toy densities."""

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
