"""The model API of dgmlab.base, enforced once for every model class in the library.

Every public subclass of GenerativeModel in dgmlab must have an example below
(a small instance, a batch of data, a context); the test that lists them fails
for a new class until it has one, and every check then runs on it without
anyone writing a new test.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import dgmlab
from dgmlab import autoregressive as A
from dgmlab import baselines as B
from dgmlab import classifiers as C
from dgmlab import diffusion as DF
from dgmlab import discrete as DS
from dgmlab import ebm as E
from dgmlab import flows as F
from dgmlab import gan as GAN
from dgmlab import latent as L
from dgmlab import vae as V
from dgmlab.base import GenerativeModel
from dgmlab.validate import validation

N = 5


def levels(shape, k, seed=0):
    return torch.randint(k, (N, *shape), generator=torch.Generator().manual_seed(seed))


def binary(shape, seed=0):
    return levels(shape, 2, seed).float()


def normal(shape, seed=0):
    return torch.randn(N, *shape, generator=torch.Generator().manual_seed(seed))


def labels(k, seed=0):
    return levels((), k, seed)


def gaussian_classifier():
    x, y = torch.randn(40, 3), torch.arange(40) % 4
    return C.GaussianClassifier(3, 4).fit(x, y), normal((3,)), labels(4)


def randomised(model):
    """Every parameter drawn at random, so that checks do not pass on a trivial initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


# name -> () -> (model, x, context)
EXAMPLES = {
    "independent bernoulli": lambda: (randomised(B.IndependentBernoulli(6)), binary((6,)), None),
    "independent categorical": lambda: (randomised(B.IndependentCategorical((2, 3), 5)), levels((2, 3), 5), None),
    "markov chain": lambda: (randomised(B.MarkovChain(5, k=3)), levels((5,), 3), None),
    "histogram": lambda: (randomised(B.Histogram(4, k=2)), binary((4,)), None),
    "diagonal gaussian": lambda: (randomised(B.DiagonalGaussian(3)), normal((3,)), None),
    "kernel density, levels": lambda: (B.KernelDensity(levels((2, 3), 5, seed=7), bandwidth=0.7, levels=5),
                                       levels((2, 3), 5), None),
    "kernel density, gaussian": lambda: (B.KernelDensity(normal((3,), seed=7), bandwidth=0.5), normal((3,)), None),
    "uniform levels": lambda: (B.UniformLevels((2, 3), 5), levels((2, 3), 5), None),
    "noise mixture": lambda: (B.NoiseMixture(randomised(B.IndependentCategorical((2, 3), 5)),
                                             B.UniformLevels((2, 3), 5), 0.5), levels((2, 3), 5), None),
    "gaussian classifier": gaussian_classifier,
    "MADE": lambda: (randomised(A.MADE((1, 2, 3), hidden=(8,), levels=3, num_masks=2)), levels((1, 2, 3), 3), None),
    "PixelCNN, class-conditional": lambda: (randomised(A.PixelCNN(
        (1, 4, 4), levels=3, channels=4, layers=1, kernel=3, first_kernel=3, num_classes=2)),
        levels((1, 4, 4), 3), labels(2)),
    "gated PixelCNN, colour, logistic mixture": lambda: (randomised(A.GatedPixelCNN(
        (3, 3, 3), levels=4, channels=6, layers=2, kernel=3, first_kernel=3, output="logistic_mixture",
        mixtures=2)), levels((3, 3, 3), 4), None),
    "Transformer, class-conditional": lambda: (randomised(A.Transformer(
        (1, 2, 3), 4, d_model=8, heads=2, layers=1, num_classes=3)), levels((1, 2, 3), 4), labels(3)),
    "Transformer, sequence": lambda: (randomised(A.Transformer(5, 3, d_model=8, heads=2, layers=2)),
                                      levels((5,), 3), None),
    "VQ-VAE, EMA codebook and restarts": lambda: (randomised(DS.VQVAE(
        (1, 4, 4), levels=3, num_codes=16, code_dim=2, hidden=4, ema=True, restart=2)), levels((1, 4, 4), 3), None),
    "VQ-VAE, binary, class-conditional PixelCNN prior": lambda: (randomised(DS.VQVAE(
        (1, 4, 4), levels=2, num_codes=16, code_dim=2, hidden=4, prior=A.PixelCNN(
            (1, 2, 2), levels=16, channels=4, layers=1, kernel=3, first_kernel=3, num_classes=2))),
        binary((1, 4, 4)), labels(2)),
    "VQ-VAE, class-marginal Transformer prior": lambda: (randomised(DS.VQVAE(
        (1, 4, 4), levels=3, num_codes=16, code_dim=2, hidden=4, prior=DS.ClassMarginal(A.Transformer(
            (1, 2, 2), 16, d_model=8, heads=2, layers=1, num_classes=3), torch.tensor([1.0, 2.0, 3.0])))),
        levels((1, 4, 4), 3), None),
    "class-marginal prior over codes": lambda: (DS.ClassMarginal(randomised(A.Transformer(
        (1, 2, 2), 5, d_model=8, heads=2, layers=1, num_classes=3)), torch.tensor([1.0, 2.0, 3.0])),
        levels((1, 2, 2), 5), None),
    "uniform prior over codes": lambda: (DS.UniformCodes((1, 2, 2), 5), levels((1, 2, 2), 5), None),
    "dVAE": lambda: (randomised(DS.DVAE((1, 4, 4), levels=3, num_codes=4, code_dim=2, hidden=4)),
                     levels((1, 4, 4), 3), None),
    "RBM, binary images": lambda: (randomised(E.RBM((1, 2, 3), 4, sample_steps=5)), binary((1, 2, 3)), None),
    "Gaussian RBM": lambda: (randomised(E.GaussianRBM(3, 4, sample_steps=5)), normal((3,)), None),
    "RealNVP flow": lambda: (randomised(F.realnvp_2d(2, hidden=8)), normal((2,)), None),
    "planar flow": lambda: (F.planar_flow(2, layers=2), normal((2,)), None),
    "conditional flow": lambda: (randomised(F.dequantization_noise(4, layers=2, hidden=8)),
                                 torch.rand(N, 4, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1,
                                 normal((4,))),
    "uniform dequantization": lambda: (F.UniformDequantization(
        F.maf_flow(4, layers=1, hidden=(8,), levels=3), 3), levels((4,), 3), None),
    "variational dequantization": lambda: (F.VariationalDequantization(
        F.realnvp_image((1, 4, 4), levels=3, scales=1, steps=1, hidden=4),
        F.dequantization_noise(16, layers=1, hidden=8), 3), levels((1, 4, 4), 3), None),
    "discretized logistic": lambda: (F.DiscretizedLogistic((2, 3), 5), levels((2, 3), 5), None),
    "linear gaussian (PPCA)": lambda: (randomised(L.LinearGaussian(4, 2)), normal((4,)), None),
    "gaussian mixture": lambda: (randomised(L.GaussianMixture(3, 2)), normal((3,)), None),
    "VAE, bernoulli decoder": lambda: (randomised(V.vae_mlp(6, 2, decoder="bernoulli", hidden=(8,))),
                                       binary((6,)), None),
    "VAE, categorical, IAF posterior, VampPrior": lambda: (randomised(V.vae_mlp(
        (1, 2, 3), 2, decoder="categorical", levels=5, hidden=(8,), posterior="iaf", iaf_hidden=(4,),
        prior="vamp", pseudo_inputs=3)), levels((1, 2, 3), 5), None),
    "VAE, gaussian decoder, mixture prior": lambda: (randomised(V.vae_mlp(
        3, 2, decoder="gaussian", hidden=(8,), prior="mixture", components=3)), normal((3,)), None),
    "DDPM, MLP, 2-D": lambda: (randomised(DF.ddpm_mlp(2, timesteps=6, hidden=8, layers=1, embed_dim=4)),
                               normal((2,)), None),
    "DDPM, U-Net, levels, ELBO objective": lambda: (randomised(DF.ddpm_unet(
        (1, 4, 4), 5, timesteps=4, objective="elbo", variance="small",
        unet=dict(base=4, mults=(1, 2), blocks=1, embed_dim=4))), levels((1, 4, 4), 5), None),
    "DDPM, MLP, class-conditional, averaged": lambda: (randomised(DF.DDPM(
        DF.MLPDenoiser(2, 8, 1, 4, num_classes=3), (2,), DF.linear_schedule(5), average=0.9)),
        normal((2,)), labels(3)),
    "flow matching, MLP, 2-D": lambda: (randomised(DF.flow_matching_mlp(2, hidden=8, layers=1, embed_dim=4)),
                                        normal((2,)), None),
    "flow matching, levels, class-conditional": lambda: (randomised(DF.FlowMatching(
        DF.MLPDenoiser(3, 8, 1, 4, time_scale=1000.0, num_classes=2), (3,), levels=5)), levels((3,), 5), labels(2)),
    "flow matching, dequantized, MLP": lambda: (randomised(DF.DequantizedFlowMatching(
        DF.MLPDenoiser(4, 8, 1, 4, time_scale=1000.0), (4,), levels=3)), levels((4,), 3), None),
    "VAE, PixelCNN decoder, flow prior": lambda: (randomised(V.vae_mlp(
        (1, 3, 3), 2, decoder="pixelcnn", levels=4, hidden=(8,), prior="flow", flow_layers=1, flow_hidden=(4,),
        pixelcnn=dict(channels=4, layers=1, kernel=3, first_kernel=3))), levels((1, 3, 3), 4), None),
}

# Likelihood-free models (has_log_prob = False): name -> () -> (model, x, context)
LIKELIHOOD_FREE = {
    "GAN, MLPs": lambda: (randomised(GAN.toy_gan(3, latent_dim=2, hidden=(8,))), normal((3,)), None),
    "DCGAN": lambda: (GAN.dcgan((1, 4, 4), latent_dim=2, channels=2),
                      torch.rand(N, 1, 4, 4, generator=torch.Generator().manual_seed(1)), None),
}


def model_classes() -> set[type]:
    """Every public GenerativeModel subclass defined in a dgmlab module."""
    for info in pkgutil.walk_packages(dgmlab.__path__, "dgmlab."):
        if ".grading" not in info.name:
            importlib.import_module(info.name)
    found, todo = set(), [GenerativeModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("dgmlab.") and not sub.__name__.startswith("_"):
                found.add(sub)
    return found


def make(name):
    torch.manual_seed(0)
    model, x, context = EXAMPLES[name]()
    return model.eval(), x, context


def call(f, *args, context=None, **kwargs):
    return f(*args, **kwargs) if context is None else f(*args, context, **kwargs)


def test_every_model_class_has_an_example():
    covered = {type(EXAMPLES[name]()[0]) for name in EXAMPLES}
    covered |= {type(LIKELIHOOD_FREE[name]()[0]) for name in LIKELIHOOD_FREE}
    missing = sorted(c.__qualname__ for c in model_classes() - covered)
    assert not missing, f"add an example for {missing} to EXAMPLES in tests/test_api.py"
    assert all(EXAMPLES[name]()[0].has_log_prob for name in EXAMPLES), "put it in LIKELIHOOD_FREE"


@pytest.mark.parametrize("name", LIKELIHOOD_FREE)
def test_likelihood_free_models_sample_and_refuse_log_prob(name):
    torch.manual_seed(0)
    model, x, _ = LIKELIHOOD_FREE[name]()
    model.eval()
    assert not model.has_log_prob
    for method in (model.log_prob, model.loss):
        with pytest.raises(NotImplementedError, match="likelihood-free|training_losses"):
            method(x)
    with torch.enable_grad():
        s = model.sample(7)
    assert s.shape == (7, *model.event_shape) and not s.requires_grad
    assert bool(model.support.check(s).all())
    assert model.rsample(3).requires_grad
    losses = dict(model.training_losses(x, step=0))
    assert set(losses) == set(model.optimizer_parameters()) and all(v.dim() == 0 for v in losses.values())
    with pytest.raises(ValueError, match="expects x of shape"):
        next(model.training_losses(torch.zeros(N, model.event_size + 1)))
    with pytest.raises((TypeError, ValueError), match="n should be"):
        model.sample(0)
    model.to(torch.device("meta"))  # stands in for a GPU: nothing left on the CPU
    assert model.sample(3).device == torch.device("meta")


@pytest.mark.parametrize("name", EXAMPLES)
def test_log_prob_shape_finiteness_and_loss(name):
    model, x, context = make(name)
    assert model.event_size == int(torch.tensor(model.event_shape).prod()) and isinstance(model.event_shape, tuple)
    log_p = call(model.log_prob, x, context=context)
    assert log_p.shape == (N,) and log_p.is_floating_point() and torch.isfinite(log_p).all()
    torch.manual_seed(1)
    loss = call(model.loss, x, context=context)
    torch.manual_seed(1)
    expected = -call(model.log_prob, x, context=context).mean()
    assert loss.dim() == 0 and torch.allclose(loss, expected), "loss should be -log_prob(x).mean()"
    flat = x.reshape(N, -1) if len(model.event_shape) > 1 else x
    assert torch.allclose(call(model.log_prob, flat, context=context), log_p, atol=1e-5) or (
        model.log_prob_is_bound)  # a bound draws fresh noise


@pytest.mark.parametrize("name", EXAMPLES)
def test_sample_shape_support_and_no_gradients(name):
    model, x, context = make(name)
    one = None if context is None else context[0]  # one context for all the samples
    with torch.enable_grad():
        s = model.sample(7, context=one) if context is not None else model.sample(7)
    assert s.shape == (7, *model.event_shape)
    assert s.grad_fn is None and not s.requires_grad, "sample(n) should draw without gradients"
    assert bool(model.support.check(s).all()), "samples should lie in the model's support"
    assert torch.isfinite(call(model.log_prob, s, context=None if one is None else one.expand(7, *one.shape))).all()


@pytest.mark.parametrize("name", EXAMPLES)
def test_rsample_is_differentiable_where_declared(name):
    model, x, context = make(name)
    if not model.has_rsample:
        with pytest.raises(NotImplementedError, match=r"use sample\(n\)"):
            call(model.rsample, 3, context=None if context is None else context[:3])
        return
    s = call(model.rsample, 3, context=None if context is None else context[:3])
    assert s.requires_grad and s.shape == (3, *model.event_shape)
    s.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", EXAMPLES)
def test_bound_flag_and_its_tightness(name):
    model, x, context = make(name)
    assert isinstance(model.log_prob_is_bound, bool)
    takes_k = "k" in inspect.signature(model.log_prob).parameters
    if not model.log_prob_is_bound:
        assert not takes_k, "only a bound can be tightened with k"
        return
    assert takes_k, "a bound model should take k (importance samples) in log_prob"
    torch.manual_seed(2)
    loose = torch.stack([call(model.log_prob, x, context=context, k=1) for _ in range(40)]).mean()
    torch.manual_seed(2)
    tight = torch.stack([call(model.log_prob, x, context=context, k=32) for _ in range(40)]).mean()
    assert tight > loose  # Burda et al.: non-decreasing in k, in expectation


@pytest.mark.parametrize("name", EXAMPLES)
def test_another_dtype_and_device(name):
    model, x, context = make(name)
    xd = x.double() if x.is_floating_point() and not model.support.is_discrete else x
    model.double()
    log_p = call(model.log_prob, xd, context=context if context is None or not context.is_floating_point()
                 else context.double())
    assert log_p.dtype == torch.float64
    s = model.sample(3) if context is None else model.sample(3, context[0])
    assert not s.is_floating_point() or model.support.is_discrete or s.dtype == torch.float64
    # The meta device stands in for a GPU: a tensor left on the CPU, or a sync (.item()), fails there.
    meta = torch.device("meta")
    model.float().to(meta)
    with validation(False):
        log_p = call(model.log_prob, x.to(meta), context=None if context is None else context.to(meta))
        s = model.sample(3) if context is None else model.sample(3, context[0].to(meta))
    assert log_p.device == meta and log_p.shape == (N,)
    assert s.device == meta and s.shape == (3, *model.event_shape)


@pytest.mark.parametrize("name", EXAMPLES)
def test_state_dict_round_trip(name):
    model, x, context = make(name)
    fresh, _, _ = EXAMPLES[name]()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # differs from the model until the state is loaded
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    torch.manual_seed(3)
    a = call(model.log_prob, x, context=context)
    torch.manual_seed(3)
    b = call(fresh.log_prob, x, context=context)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", EXAMPLES)
def test_bad_input_is_refused_at_the_door(name):
    model, x, context = make(name)
    wrong = torch.zeros(N, model.event_size + 1, dtype=x.dtype)
    with pytest.raises(ValueError, match="expects x of shape"):
        call(model.log_prob, wrong, context=context)
    if model.context_shape is None:
        with pytest.raises(ValueError, match="unconditional"):
            model.log_prob(x, torch.zeros(N, 2))
    elif not model.context_optional:
        with pytest.raises(ValueError, match="is conditional"):
            model.log_prob(x)
    outside = x.clone()
    outside.view(-1)[0] = float("nan") if not model.support.is_discrete else 10**6
    with pytest.raises(ValueError, match="NaN|should lie in"):
        call(model.log_prob, outside, context=context)
    with pytest.raises((TypeError, ValueError), match="n should be"):
        model.sample(0)


def test_every_module_of_the_library_is_reachable_as_an_attribute():
    """``dgmlab.<module>`` works for every module of the package (they load on first use)."""
    names = {m.name for m in pkgutil.iter_modules(dgmlab.__path__) if not m.name.startswith("_")}
    missing = sorted(name for name in names if name not in dgmlab._SUBMODULES)
    assert not missing, f"add {missing} to _SUBMODULES (and the module list) in dgmlab/__init__.py"
    assert all(inspect.ismodule(getattr(dgmlab, name)) for name in names)
