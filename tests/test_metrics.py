"""Nats, bits per dimension and held-out NLL."""

import math

import pytest
import torch

from torch import nn

from dgmlab import baselines, embedded, metrics
from dgmlab.base import GenerativeModel, module_device


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
    x = embedded.digits("train", "binary", flatten=True).x
    xt = embedded.digits("test", "binary", flatten=True).x
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


def test_module_device_is_where_the_first_parameter_or_buffer_lives():
    meta = torch.device("meta")  # a non-CPU device that needs no GPU
    assert module_device(nn.Linear(2, 2, device="meta")) == meta
    buffered = nn.Module()
    buffered.register_buffer("table", torch.zeros(3, device="meta"))
    assert module_device(buffered) == meta
    assert module_device(nn.Module()) == torch.device("cpu")
    assert module_device(nn.Module(), default="meta") == meta
    assert module_device(object()) == torch.device("cpu")  # not a module: the default
    model = GenerativeModel()
    model.register_buffer("b", torch.zeros(1, device="meta"))
    assert model.device == meta


def test_heldout_nll_feeds_a_plain_module_on_its_own_device():
    class PlainOnMeta(nn.Module):  # an nn.Module without a .device attribute
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, device="meta"))
            self.seen = []

        def log_prob(self, x):
            self.seen.append(x.device)
            return torch.zeros(len(x))

    model = PlainOnMeta()
    metrics.heldout_nll(model, torch.zeros(5, 3), batch_size=2)
    assert model.seen == [torch.device("meta")] * 3


def test_heldout_nll_passes_k_to_a_bound_and_adds_an_estimated_normalisers_error():
    from dgmlab import flows

    torch.manual_seed(0)
    model = flows.UniformDequantization(flows.maf_flow(4, layers=1, hidden=(8,), levels=3), 3)
    y = torch.randint(3, (400, 4), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    loose = metrics.heldout_nll(model, y)
    torch.manual_seed(0)
    tight = metrics.heldout_nll(model, y, k=64)
    assert loose.is_bound and tight.is_bound and tight.nats < loose.nats  # the bound tightens

    class Estimated(baselines.DiagonalGaussian):
        log_normalizer_stderr = 0.3  # as an RBM whose log Z came from AIS

    x = torch.randn(100, 2)
    plain, estimated = metrics.heldout_nll(baselines.DiagonalGaussian(2), x), metrics.heldout_nll(Estimated(2), x)
    assert estimated.nats == plain.nats
    assert estimated.stderr == pytest.approx(math.hypot(plain.stderr, 0.3))
