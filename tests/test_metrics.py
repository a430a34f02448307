"""Nats, bits per dimension and held-out NLL."""

import math

import pytest
import torch

from dgmlab import baselines, data, metrics


def test_bits_per_dim_conversions():
    assert metrics.nats_to_bpd(784 * math.log(2), 784) == pytest.approx(1.0)
    # a uniform density on [0, 1]^D has continuous NLL 0; for 8-bit data that is 8 bits/dim
    assert metrics.nats_to_bpd(0.0, 3072, scale=256) == pytest.approx(8.0)
    for nats in (0.0, 81.3, 1234.5):
        for scale in (1.0, 256.0):
            bpd = metrics.nats_to_bpd(nats, 784, scale=scale)
            assert metrics.bpd_to_nats(bpd, 784, scale=scale) == pytest.approx(nats)
    t = metrics.nats_to_bpd(torch.tensor([0.0, 64 * math.log(2)]), 64)
    assert torch.allclose(t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="positive"):
        metrics.nats_to_bpd(1.0, 0)


def test_heldout_nll_matches_a_direct_computation():
    x = data.digits("train", "binary", flatten=True).x
    xt = data.digits("test", "binary", flatten=True).x
    model = baselines.IndependentBernoulli.from_data(x, alpha=1.0)
    model.train()
    res = metrics.heldout_nll(model, xt, batch_size=50)
    direct = -model.log_prob(xt).double()
    assert res.nats == pytest.approx(direct.mean().item(), rel=1e-6)
    assert res.stderr == pytest.approx(direct.std().item() / math.sqrt(len(xt)), rel=1e-6)
    assert res.bpd == pytest.approx(direct.mean().item() / (64 * math.log(2)), rel=1e-6)
    assert res.num_dims == 64 and not res.is_bound
    assert model.training  # the model's mode is restored
    assert "bits/dim" in str(res) and "=" in str(res)


def test_heldout_nll_checks_the_model_output():
    class Bad(torch.nn.Module):
        def log_prob(self, x):
            return torch.zeros(len(x), 2)

    with pytest.raises(ValueError, match="one value per object"):
        metrics.heldout_nll(Bad(), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"shape \(N, ...\)"):
        metrics.heldout_nll(Bad(), torch.zeros(4))
