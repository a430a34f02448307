"""Variational autoencoders (Chapter 5).

A latent variable model draws a code z from a prior p(z) and an object from a
decoder p(x | z). Its likelihood log p(x) = log ∫ p(x | z) p(z) dz has no
closed form, so the VAE trains an *encoder* q(z | x) alongside and maximises
the evidence lower bound (ELBO):

    log p(x) ≥ ELBO(x) = E_{q(z|x)}[log p(x | z)] − KL(q(z | x) ‖ p(z))
                       = log p(x) − KL(q(z | x) ‖ p(z | x)).

The first term is the *reconstruction*, the second the *rate*; the gap is
how far q is from the true posterior. With z = μ(x) + σ(x)·ε, ε ~ N(0, I)
(the reparameterisation trick), a one-sample estimate of the ELBO is
differentiable in the encoder's and the decoder's parameters alike.

A :class:`VAE` is four small parts, each replaceable:

* an :class:`Encoder`: x → features h (an MLP);
* a posterior q(z | x) read off h: :class:`GaussianPosterior` (μ, log σ) or
  :class:`IAFPosterior` (that Gaussian pushed through inverse autoregressive
  flows conditioned on h, Kingma et al. 2016);
* a decoder p(x | z): :class:`BernoulliDecoder`, :class:`CategoricalDecoder`,
  :class:`GaussianDecoder`, or :class:`PixelCNNDecoder` (Chapter 3's gated
  PixelCNN conditioned on z);
* a prior p(z): :class:`StandardNormal`, :class:`MixturePrior`,
  :class:`VampPrior` (Tomczak & Welling 2018) or :class:`FlowPrior` (a MAF).

``log_prob(x, k=1)`` is the ELBO, and with ``k > 1`` the importance-weighted
bound (IWAE, Burda et al. 2015),

    log p(x) ≥ E_{z_1..z_k ~ q(z|x)} log (1/k) Σ_i p(x, z_i) / q(z_i | x),

which never falls in expectation as k grows and reaches log p(x) as k → ∞. Diagnostics:
:func:`kl_per_dimension`, :func:`active_units`, :class:`AggregatedPosterior`
and :func:`elbo_surgery` (Hoffman & Johnson 2016). :func:`gradient_estimates`
compares the reparameterised gradient with the score-function one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from .autoregressive import GatedPixelCNN
from .base import GenerativeModel, constraints
from .flows import IAF, Compose, maf_flow
from .validate import check_choice, check_positive_int, check_tensor

__all__ = [
    "ELBO", "gaussian_kl", "free_bits_kl", "VAE", "vae_mlp",
    "Encoder", "GaussianPosterior", "IAFPosterior", "FlowPosteriorDistribution",
    "BernoulliDecoder", "CategoricalDecoder", "GaussianDecoder", "PixelCNNDecoder",
    "StandardNormal", "MixturePrior", "VampPrior", "FlowPrior",
    "kl_per_dimension", "posterior_means", "unit_activity", "active_units", "AggregatedPosterior",
    "Surgery", "elbo_surgery", "gradient_estimates", "mlp", "Decoder",
    "DIGITS_VAE", "DIGITS_VAE_TRAINING", "DIGITS_PIXELVAE", "DIGITS_PIXELVAE_TRAINING",
]

LOG_2PI = math.log(2 * math.pi)

# Settings for the 17-level digits, chosen on the validation images (each trained with a cosine
# schedule by fit(..., max_seconds=60), the benchmark's protocol). With 1,199 training images the
# factorised VAE overfits within seconds: dropout 0.3 in encoder and decoder is what keeps it
# honest. DIGITS_VAE trains for 300 epochs (about 35 s on one core). The PixelCNN decoder
# (Chapter 3's gated PixelCNN given z) trains with Chapter 3's settings for 30 epochs; without
# a remedy its KL falls to zero (posterior collapse): KL annealing over 600 batches keeps
# part of the latent in use (free_bits=0.25 keeps all of it, at about the same bound).
DIGITS_VAE = dict(latent_dim=32, hidden=(384,), dropout=0.3, decoder="categorical", prior="normal",
                  posterior="gaussian")
DIGITS_VAE_TRAINING = dict(batch_size=64, lr=1e-3)
DIGITS_PIXELVAE = dict(latent_dim=16, hidden=(256,), decoder="pixelcnn", warmup_steps=600,
                       pixelcnn=dict(channels=32, layers=4, kernel=5, first_kernel=7, dropout=0.3))
DIGITS_PIXELVAE_TRAINING = dict(batch_size=32, lr=3e-3, optimizer="adamw", weight_decay=3e-2)


class ELBO(NamedTuple):
    """The ELBO of each object and its two terms, shape (N,) each: elbo = reconstruction − β·kl."""

    elbo: torch.Tensor
    reconstruction: torch.Tensor  # E_q log p(x | z), one-sample estimate
    kl: torch.Tensor  # KL(q(z | x) ‖ p(z)): closed form, or the one-sample log q(z|x) − log p(z)


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) per dimension, in closed form: ½(μ² + σ² − 1) − log σ."""
    return 0.5 * (mu**2 + torch.exp(2 * log_sigma) - 1) - log_sigma


def free_bits_kl(kl: torch.Tensor, free_bits: float, *, dims: int = 1) -> torch.Tensor:
    """The KL term of a batch with free bits λ (Kingma et al. 2016), a scalar.

    ``kl`` (N, G) holds each object's KL split into G groups of ``dims`` latent
    dimensions; the term is Σ_g max(λ·dims, (1/N) Σ_n KL_ng). A group whose
    batch-averaged KL is below its allowance costs the allowance and gets no
    gradient pushing it further down, so the encoder may use it freely. With a
    closed-form KL, each latent dimension is a group (λ per dimension); a KL known
    only as a total (Monte Carlo: a learned prior, an IAF posterior) is one group of
    d dimensions. λ = 0 gives the plain batch mean of the total KL.
    """
    if free_bits <= 0:
        return kl.sum(1).mean()
    return torch.clamp(kl.mean(0), min=free_bits * dims).sum()


# ============================================================================ encoder
def mlp(sizes: Sequence[int], *, dropout: float = 0.0, last_activation: bool = False) -> nn.Sequential:
    """Linear layers of the given sizes with ReLUs between them (and dropout after each ReLU)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers += [nn.ReLU(), nn.Dropout(dropout)] if dropout else [nn.ReLU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x → features h: the object flattened, divided by ``scale`` (levels − 1 for levels, so
    inputs lie in [0, 1]), through an MLP with ``hidden`` sizes (h = the last hidden layer;
    no hidden layer: h is the scaled input itself, and the posterior is linear in x)."""

    def __init__(self, event_shape, hidden: Sequence[int] = (256,), *, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.input_size = math.prod((event_shape,) if isinstance(event_shape, int) else event_shape)
        self.hidden = [check_positive_int(h, "hidden size") for h in hidden]
        self.scale = float(scale)
        self.features = self.hidden[-1] if self.hidden else self.input_size
        self.net = mlp([self.input_size, *self.hidden], dropout=dropout, last_activation=True)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # the inputs' dtype, even with no layer

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input u: x flattened to (N, D) and scaled."""
        return x.reshape(len(x), -1).to(self._anchor.dtype) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(x))


# ======================================================================== posteriors
class GaussianPosterior(nn.Module):
    """q(z | x) = N(μ(h), diag σ²(h)): a linear head on the encoder's features outputs μ and log σ."""

    def __init__(self, features: int, latent_dim: int):
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.head = nn.Linear(features, 2 * latent_dim)

    def params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and log σ, each (N, d)."""
        mu, log_sigma = self.head(h).chunk(2, dim=-1)
        return mu, log_sigma

    def forward(self, h: torch.Tensor) -> Distribution:
        """q(z | x) as a torch distribution, batch (N,), event (d,)."""
        mu, log_sigma = self.params(h)
        return Independent(Normal(mu, log_sigma.exp(), validate_args=False), 1, validate_args=False)

    def rsample(self, h: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """k reparameterised draws z = μ + σ·ε per object, (k, N, d), and their log q(z | x), (k, N)."""
        mu, log_sigma = self.params(h)
        eps = torch.randn(k, *mu.shape, dtype=mu.dtype, device=mu.device)
        z = mu + log_sigma.exp() * eps
        log_q = (-0.5 * eps**2 - log_sigma - 0.5 * LOG_2PI).sum(-1)
        return z, log_q

    def log_prob(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """log q(z | x) for z of shape (..., N, d) against the N objects' features h: (..., N)."""
        mu, log_sigma = self.params(h)
        eps = (z - mu) * torch.exp(-log_sigma)
        return (-0.5 * eps**2 - log_sigma - 0.5 * LOG_2PI).sum(-1)

    def point(self, h: torch.Tensor) -> torch.Tensor:
        """A representative code per object: the mean μ."""
        return self.params(h)[0]


class IAFPosterior(GaussianPosterior):
    """An IAF posterior (Kingma et al. 2016): z₀ ~ N(μ(h), σ²(h)), then T inverse autoregressive
    flow layers conditioned on h, z_t = z_{t−1}·e^{α_t} + m_t with (m_t, α_t) autoregressive in
    z_{t−1}: one pass per layer.

    By the change of variables, log q(z_T | x) = log q(z₀ | x) − Σ_t log|det ∂z_t/∂z_{t−1}|,
    and each Jacobian is triangular, log|det| = Σ_j α_tj. The density of a given z (not one
    just drawn) runs the layers backwards, d passes each. Needs d ≥ 2.
    """

    def __init__(self, features: int, latent_dim: int, *, layers: int = 2, hidden: Sequence[int] = (64,)):
        super().__init__(features, latent_dim)
        if latent_dim < 2:
            raise ValueError("an IAF posterior needs a latent of at least 2 dimensions.")
        # flows.IAF's inverse is its one-pass sampling direction z_{t−1} → z_t
        self.flow = Compose([IAF(latent_dim, hidden, reverse=bool(t % 2), context_dim=features, seed=t)
                             for t in range(check_positive_int(layers, "layers"))])

    def rsample(self, h, k=1):
        z0, log_q0 = super().rsample(h, k)  # z₀ ~ N(μ, σ²), log q(z₀ | x)
        zT, log_det = self.flow.inverse(z0.flatten(0, 1), h.repeat(k, 1))  # z_T, Σ log|det ∂z_t/∂z_{t−1}|
        return zT.reshape(z0.shape), log_q0 - log_det.reshape(log_q0.shape)

    def log_prob(self, z, h):
        shape = z.shape
        h = h.expand(*shape[:-1], h.shape[-1]).reshape(-1, h.shape[-1])
        z0, log_det = self.flow(z.reshape(-1, shape[-1]), h)  # back to z₀, log|det ∂z₀/∂z_T|
        log_q = super().log_prob(z0, h) + log_det  # log q(z₀ | x) + log|det ∂z₀/∂z_T|
        return log_q.reshape(shape[:-1])

    def point(self, h):
        """A representative code per object: the flow applied to the base mean (not the mean of q)."""
        return self.flow.inverse(self.params(h)[0], h)[0]

    def forward(self, h):
        return FlowPosteriorDistribution(self, h)


class FlowPosteriorDistribution(Distribution):
    """An :class:`IAFPosterior` at given features h, as a torch distribution: batch (N,), event (d,).

    ``rsample`` draws in one pass per layer; ``log_prob`` of arbitrary z runs the flow backwards.
    Its mean has no closed form (estimate it from samples).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, posterior: IAFPosterior, h: torch.Tensor):
        self.posterior, self.h = posterior, h
        super().__init__(h.shape[:1], torch.Size([posterior.latent_dim]), validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        k = math.prod(sample_shape)
        z, _ = self.posterior.rsample(self.h, k)
        return z.reshape(*sample_shape, *z.shape[1:])

    def log_prob(self, value):
        return self.posterior.log_prob(value, self.h)


# ========================================================================== decoders
class Decoder(nn.Module):
    """p(x | z): ``log_prob(x, z)`` (N,), ``sample(z)``, ``mean(z)`` = E[x | z]."""

    support: constraints.Constraint = constraints.real
    has_rsample = False

    def __init__(self, event_shape):
        super().__init__()
        self.event_shape = tuple((event_shape,) if isinstance(event_shape, int) else event_shape)
        self.event_size = math.prod(self.event_shape)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form mean; decode with sample=True.")

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(len(t), *self.event_shape)


class BernoulliDecoder(Decoder):
    """Binary pixels, independent given z: p(x | z) = Π_j Bernoulli(x_j; sigmoid(f_j(z)))."""

    support = constraints.boolean

    def __init__(self, event_shape, latent_dim: int, hidden: Sequence[int] = (256,), *, dropout: float = 0.0):
        super().__init__(event_shape)
        self.net = mlp([latent_dim, *hidden, self.event_size], dropout=dropout)

    def log_prob(self, x, z):
        logits = self.net(z)
        return -F.binary_cross_entropy_with_logits(logits, x.reshape(len(x), -1).to(logits.dtype),
                                                   reduction="none").sum(1)

    def mean(self, z):
        return self._shape(torch.sigmoid(self.net(z)))

    def sample(self, z):
        return torch.bernoulli(self.mean(z))


class CategoricalDecoder(Decoder):
    """Pixels on ``levels`` grey levels, independent given z: a softmax over the levels per pixel."""

    def __init__(self, event_shape, latent_dim: int, levels: int, hidden: Sequence[int] = (256,), *,
                 dropout: float = 0.0):
        super().__init__(event_shape)
        self.levels = check_positive_int(levels, "levels")
        self.support = constraints.integer_interval(0, levels - 1)
        self.net = mlp([latent_dim, *hidden, self.event_size * levels], dropout=dropout)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D, levels)."""
        return self.net(z).reshape(len(z), self.event_size, self.levels)

    def log_prob(self, x, z):
        log_p = F.log_softmax(self.logits(z), -1)
        return log_p.gather(-1, x.reshape(len(x), -1, 1).long()).squeeze(-1).sum(1)

    def mean(self, z):
        probs = torch.softmax(self.logits(z), -1)
        return self._shape(probs @ torch.arange(self.levels, dtype=probs.dtype, device=probs.device))

    def sample(self, z):
        logits = self.logits(z)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-12, 1 - 1e-7)))
        return self._shape((logits + gumbel).argmax(-1))  # the Gumbel-max trick: a categorical draw


class GaussianDecoder(Decoder):
    """Continuous data: p(x | z) = N(x; m(z), diag σ²).

    ``variance="shared"``: σ_j is a learned parameter per dimension, the same for
    every z (the decoder's noise level); ``variance="output"``: the network
    outputs log σ_j(z) too (heteroscedastic; more flexible, can overfit by
    shrinking σ on training points). log σ is clamped to [−7, 5] in both cases.
    Sampling x = m(z) + σ·ε is reparameterised.
    """

    has_rsample = True

    def __init__(self, event_shape, latent_dim: int, hidden: Sequence[int] = (256,), *,
                 variance: str = "shared", dropout: float = 0.0):
        super().__init__(event_shape)
        self.variance = check_choice(variance, "variance", ("shared", "output"))
        out = self.event_size * (2 if variance == "output" else 1)
        self.net = mlp([latent_dim, *hidden, out], dropout=dropout)
        self.log_sigma = nn.Parameter(torch.zeros(self.event_size)) if variance == "shared" else None

    def params(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """m(z) and log σ, each (N, D)."""
        out = self.net(z)
        if self.log_sigma is None:
            m, log_sigma = out.chunk(2, -1)
        else:
            m, log_sigma = out, self.log_sigma.expand_as(out)
        return m, log_sigma.clamp(-7.0, 5.0)

    def log_prob(self, x, z):
        m, log_sigma = self.params(z)
        eps = (x.reshape(len(x), -1) - m) * torch.exp(-log_sigma)
        return (-0.5 * eps**2 - log_sigma - 0.5 * LOG_2PI).sum(1)

    def mean(self, z):
        return self._shape(self.params(z)[0])

    def rsample(self, z):
        m, log_sigma = self.params(z)
        return self._shape(m + log_sigma.exp() * torch.randn_like(m))

    def sample(self, z):
        return self.rsample(z)


class PixelCNNDecoder(Decoder):
    """An autoregressive decoder: p(x | z) = Π_i p(x_i | x_<i, z), Chapter 3's gated PixelCNN with a
    linear map of z added to both stacks of every layer (``context_dim`` = the latent size).

    Powerful enough to model the digits without z at all, which is why it invites posterior
    collapse (the KL goes to zero and z is ignored); KL annealing and free bits resist it.
    Sampling is one network pass per pixel.
    """

    def __init__(self, event_shape, latent_dim: int, levels: int, **pixelcnn):
        super().__init__(event_shape)
        self.levels = check_positive_int(levels, "levels")
        self.support = constraints.integer_interval(0, levels - 1)
        self.pixelcnn = GatedPixelCNN(self.event_shape, levels=levels, context_dim=latent_dim, **pixelcnn)

    def log_prob(self, x, z):
        return self.pixelcnn.log_prob(x.reshape(len(x), *self.event_shape), z)  # Σ_i log p(x_i | x_<i, z)

    def sample(self, z):
        return self.pixelcnn.sample(len(z), z)


# ============================================================================ priors
class StandardNormal(nn.Module):
    """p(z) = N(0, I): no parameters."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries the device and dtype

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I), (..., d) → (...)."""
        return (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)

    def rsample(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, dtype=self._anchor.dtype, device=self._anchor.device)

    def sample(self, n: int) -> torch.Tensor:
        return self.rsample(n).detach()


class MixturePrior(nn.Module):
    """A learnable mixture of K diagonal Gaussians: p(z) = Σ_k π_k N(z; m_k, diag s_k²)."""

    def __init__(self, latent_dim: int, components: int = 10):
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        k = check_positive_int(components, "components")
        self.means = nn.Parameter(torch.randn(k, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(k, latent_dim))
        self.logits = nn.Parameter(torch.zeros(k))

    def log_prob(self, z):
        eps = (z.unsqueeze(-2) - self.means) * torch.exp(-self.log_scales)  # (..., K, d)
        log_components = (-0.5 * eps**2 - self.log_scales - 0.5 * LOG_2PI).sum(-1)
        return torch.logsumexp(log_components + F.log_softmax(self.logits, -1), -1)

    def rsample(self, n):
        k = torch.multinomial(torch.softmax(self.logits, -1), n, replacement=True)
        eps = torch.randn(n, self.latent_dim, dtype=self.means.dtype, device=self.means.device)
        return self.means[k] + self.log_scales[k].exp() * eps

    def sample(self, n):
        return self.rsample(n).detach()


class VampPrior(nn.Module):
    """The VampPrior (Tomczak & Welling 2018): p(z) = (1/K) Σ_k q(z | u_k), the encoder's own
    posteriors at K learned pseudo-inputs u_k (in the encoder's input space, D values each).

    It approximates the optimal prior, the aggregated posterior (1/N) Σ_n q(z | x_n), with K ≪ N
    components that share the encoder. The encoder and posterior are the VAE's (held by
    reference, not as sub-modules: their parameters belong to the VAE).
    """

    def __init__(self, encoder: Encoder, posterior: GaussianPosterior, pseudo_inputs: torch.Tensor):
        super().__init__()
        self._q = (encoder, posterior)  # a tuple: not registered twice
        self.latent_dim = posterior.latent_dim
        self.pseudo_inputs = nn.Parameter(check_tensor(pseudo_inputs, "pseudo_inputs",
                                                       shape=(None, encoder.input_size), kind="float").clone())

    def features(self) -> torch.Tensor:
        encoder, _ = self._q
        return encoder.net(self.pseudo_inputs)

    def log_prob(self, z):
        _, posterior = self._q
        h = self.features()  # (K, H)
        k = len(h)
        log_q = posterior.log_prob(z.unsqueeze(-2).expand(*z.shape[:-1], k, z.shape[-1]), h)  # (..., K)
        return torch.logsumexp(log_q, -1) - math.log(k)

    def rsample(self, n):
        _, posterior = self._q
        h = self.features()
        pick = torch.randint(len(h), (n,), device=h.device)
        return posterior.rsample(h[pick], 1)[0][0]

    def sample(self, n):
        return self.rsample(n).detach()


class FlowPrior(nn.Module):
    """A flow prior: p(z) the density of a MAF over the latent (Chapter 4's :func:`~dgmlab.flows.maf_flow`),
    exact, so log p(z) = log N(f(z); 0, I) + log|det ∂f/∂z|. Needs d ≥ 2."""

    def __init__(self, latent_dim: int, *, layers: int = 4, hidden: Sequence[int] = (64,)):
        super().__init__()
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.flow = maf_flow(latent_dim, layers=layers, hidden=hidden)

    def log_prob(self, z):
        return self.flow._log_prob(z.reshape(-1, z.shape[-1])).reshape(z.shape[:-1])

    def rsample(self, n):
        return self.flow.rsample(n)

    def sample(self, n):
        return self.flow.sample(n)


# =============================================================================== VAE
class VAE(GenerativeModel):
    """A variational autoencoder: encoder → posterior q(z | x), prior p(z), decoder p(x | z).

    ``log_prob(x)`` is a lower bound on log p(x) (``log_prob_is_bound``): the ELBO for
    ``k = 1``, the IWAE bound for ``k > 1``. Training minimises −(reconstruction − β·KL),
    with β rising linearly from 0 to ``beta`` over the first ``warmup_steps`` batches (KL
    annealing) and ``free_bits`` nats per latent dimension (see :func:`free_bits_kl`).
    ``iwae_batch`` bounds how many (object, sample) pairs are decoded at once.
    """

    log_prob_is_bound = True

    def __init__(self, encoder: Encoder, posterior: GaussianPosterior, decoder: Decoder, prior: nn.Module, *,
                 beta: float = 1.0, warmup_steps: int = 0, free_bits: float = 0.0, iwae_batch: int = 4096):
        super().__init__(decoder.event_shape, support=decoder.support)
        self.encoder, self.posterior, self.decoder, self.prior = encoder, posterior, decoder, prior
        self.latent_dim = posterior.latent_dim
        if beta < 0 or free_bits < 0:
            raise ValueError(f"beta and free_bits should be ≥ 0, got {beta} and {free_bits}.")
        self.beta, self.free_bits = float(beta), float(free_bits)
        self.warmup_steps = check_positive_int(warmup_steps, "warmup_steps", allow_zero=True)
        self.iwae_batch = check_positive_int(iwae_batch, "iwae_batch")
        self.has_rsample = decoder.has_rsample

    @property
    def analytic_kl(self) -> bool:
        """True when KL(q(z|x) ‖ p(z)) has a closed form here: a diagonal Gaussian q against N(0, I)."""
        return type(self.posterior) is GaussianPosterior and isinstance(self.prior, StandardNormal)

    # -- the bound -----------------------------------------------------------------------
    def elbo(self, x: torch.Tensor, context=None, *, beta: float = 1.0) -> ELBO:
        """The one-sample reparameterised ELBO of each object and its two terms (see :class:`ELBO`)."""
        x, _ = self.check_input(x, context)
        terms, _ = self._elbo(x)
        return ELBO(terms.reconstruction - beta * terms.kl, terms.reconstruction, terms.kl)

    def _elbo(self, x: torch.Tensor) -> tuple[ELBO, torch.Tensor | None]:
        """ELBO = E_q log p(x | z) − KL(q(z|x) ‖ p(z)), one draw z = μ + σ·ε; also the KL per dimension
        (N, d) where it has a closed form."""
        h = self.encoder(x)
        z, log_q = self.posterior.rsample(h)  # z ~ q(z | x), reparameterised
        z, log_q = z[0], log_q[0]
        reconstruction = self.decoder.log_prob(x, z)  # log p(x | z)
        if self.analytic_kl:
            kl_dims = gaussian_kl(*self.posterior.params(h))  # closed form, per dimension
            kl = kl_dims.sum(1)
        else:
            kl_dims, kl = None, log_q - self.prior.log_prob(z)  # Monte Carlo: log q(z|x) − log p(z)
        return ELBO(reconstruction - kl, reconstruction, kl), kl_dims

    def log_prob(self, x: torch.Tensor, context=None, *, k: int = 1) -> torch.Tensor:
        """A lower bound on log p(x), shape (N,): the ELBO (k = 1) or the IWAE bound with k samples."""
        x, _ = self.check_input(x, context)
        k = check_positive_int(k, "k")
        return self._elbo(x)[0].elbo if k == 1 else self._iwae(x, k)

    def _iwae(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """log (1/k) Σ_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x) (Burda et al. 2015).

        The k samples are drawn in chunks and combined with a running logsumexp, so
        memory stays bounded by ``iwae_batch`` decoded pairs whatever k is.
        """
        h = self.encoder(x)
        n, chunk = len(x), max(1, self.iwae_batch // len(x))
        total = None
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            z, log_q = self.posterior.rsample(h, c)  # (c, N, d), (c, N)
            x_rep = x.repeat(c, *[1] * (x.dim() - 1))  # sample-major, like z.flatten(0, 1)
            log_px_z = self.decoder.log_prob(x_rep, z.flatten(0, 1)).reshape(c, n)
            log_w = log_px_z + self.prior.log_prob(z) - log_q  # log p(x, z_i) − log q(z_i | x)
            part = torch.logsumexp(log_w, 0)
            total = part if total is None else torch.logaddexp(total, part)
        return total - math.log(k)

    # -- training ------------------------------------------------------------------------
    def beta_at(self, step: int) -> float:
        """β after ``step`` batches: linear from 0 to ``beta`` over ``warmup_steps`` (then constant)."""
        if self.warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup_steps)

    def loss(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """−mean β-ELBO of the batch (β = ``beta``; with the default β = 1, the plain −ELBO)."""
        x, _ = self.check_input(x, context)
        terms, _ = self._elbo(x)
        return -(terms.reconstruction - self.beta * terms.kl).mean()

    def training_losses(self, x, context=None, *, step: int = 0):
        """−(mean reconstruction − β_step · KL with free bits): annealing and free bits applied."""
        x, _ = self.check_input(x, context)
        terms, kl_dims = self._elbo(x)
        kl = self.kl_term(terms.kl, kl_dims)
        yield "model", -(terms.reconstruction.mean() - self.beta_at(step) * kl)

    def kl_term(self, kl: torch.Tensor, kl_dims: torch.Tensor | None) -> torch.Tensor:
        """The batch's KL term with free bits (:func:`free_bits_kl`); without, the mean KL."""
        if kl_dims is None:  # a Monte-Carlo total: one group of d dimensions
            return free_bits_kl(kl[:, None], self.free_bits, dims=self.latent_dim)
        return free_bits_kl(kl_dims, self.free_bits)

    # -- codes and objects ---------------------------------------------------------------
    def encode(self, x: torch.Tensor, context=None) -> Distribution:
        """The posterior q(z | x): a torch distribution with batch (N,) and event (d,)."""
        x, _ = self.check_input(x, context)
        return self.posterior(self.encoder(x))

    def decode(self, z: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """Objects from codes z (N, d): E[x | z] (the mean image), or a draw x ~ p(x | z)."""
        z = check_tensor(z, "z", shape=(None, self.latent_dim), kind="float")
        return self.decoder.sample(z) if sample else self.decoder.mean(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, context=None, *, sample: bool = False) -> torch.Tensor:
        """decode(a representative code of q(z | x)): the posterior mean for a Gaussian posterior."""
        x, _ = self.check_input(x, context)
        return self.decode(self.posterior.point(self.encoder(x)), sample=sample)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        """z ~ p(z), then x ~ p(x | z): (n, *event_shape)."""
        self.check_sample_args(n, context)
        return self.decoder.sample(self.prior.sample(n))

    def rsample(self, n: int, context=None) -> torch.Tensor:
        if not self.has_rsample:
            return super().rsample(n, context)
        self.check_sample_args(n, context)
        return self.decoder.rsample(self.prior.rsample(n))


# ========================================================================== factory
def vae_mlp(event_shape, latent_dim: int = 16, *, decoder: str = "categorical", levels: int = 17,
            prior: str = "normal", posterior: str = "gaussian", hidden: Sequence[int] = (256,),
            dropout: float = 0.0, components: int = 10, pseudo_inputs: torch.Tensor | int = 50,
            flow_layers: int = 4, flow_hidden: Sequence[int] = (64,), iaf_layers: int = 2,
            iaf_hidden: Sequence[int] = (64,), variance: str = "shared", pixelcnn: dict | None = None,
            **vae) -> VAE:
    """A VAE with MLP encoder and decoder (``hidden`` sizes, mirrored in the decoder).

    ``decoder``: "bernoulli" (binary data), "categorical" (``levels`` grey levels),
    "gaussian" (continuous data; ``variance`` "shared" or "output") or "pixelcnn"
    (a gated PixelCNN given z, keyword arguments in ``pixelcnn``). ``prior``: "normal",
    "mixture" (``components``), "vamp" (``pseudo_inputs``: a count K of pseudo-inputs drawn
    uniformly in [0, 1], or K objects, e.g. training images, scaled as the encoder scales data) or
    "flow" (a MAF, ``flow_layers``, ``flow_hidden``). ``posterior``: "gaussian" or "iaf"
    (``iaf_layers``, ``iaf_hidden``). Other keywords (``beta``, ``warmup_steps``,
    ``free_bits``) go to :class:`VAE`.
    """
    check_choice(decoder, "decoder", ("bernoulli", "categorical", "gaussian", "pixelcnn"))
    check_choice(prior, "prior", ("normal", "mixture", "vamp", "flow"))
    check_choice(posterior, "posterior", ("gaussian", "iaf"))
    scale = {"bernoulli": 1.0, "gaussian": 1.0}.get(decoder, levels - 1)
    enc = Encoder(event_shape, hidden, scale=scale, dropout=dropout)
    q = (GaussianPosterior(enc.features, latent_dim) if posterior == "gaussian" else
         IAFPosterior(enc.features, latent_dim, layers=iaf_layers, hidden=iaf_hidden))
    back = tuple(reversed(hidden))
    dec = {"bernoulli": lambda: BernoulliDecoder(event_shape, latent_dim, back, dropout=dropout),
           "categorical": lambda: CategoricalDecoder(event_shape, latent_dim, levels, back, dropout=dropout),
           "gaussian": lambda: GaussianDecoder(event_shape, latent_dim, back, variance=variance, dropout=dropout),
           "pixelcnn": lambda: PixelCNNDecoder(event_shape, latent_dim, levels, **(pixelcnn or {}))}[decoder]()
    if prior == "vamp":
        pseudo_inputs = (torch.rand(check_positive_int(pseudo_inputs, "pseudo_inputs"), enc.input_size)
                         if isinstance(pseudo_inputs, int) else enc.inputs(pseudo_inputs).detach())
    p = {"normal": lambda: StandardNormal(latent_dim),
         "mixture": lambda: MixturePrior(latent_dim, components),
         "vamp": lambda: VampPrior(enc, q, pseudo_inputs),
         "flow": lambda: FlowPrior(latent_dim, layers=flow_layers, hidden=flow_hidden)}[prior]()
    return VAE(enc, q, dec, p, **vae)


# ======================================================================= diagnostics
def _require_vae(model) -> None:
    if not isinstance(model, VAE):
        raise TypeError(f"expected a dgmlab.vae.VAE, got {type(model).__name__}.")


@torch.no_grad()
def _features(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The encoder's features of x, in eval mode (no dropout), without gradients."""
    _require_vae(model)
    x, _ = model.check_input(x)
    was_training = model.training
    model.eval()
    try:
        return model.encoder(x.to(model.device))
    finally:
        model.train(was_training)


def kl_per_dimension(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The average KL of each latent dimension, (1/N) Σ_n KL(q(z_j | x_n) ‖ N(0, 1)), shape (d,).

    Closed form, :func:`gaussian_kl`; defined for a diagonal Gaussian posterior
    against the standard normal prior, where the KL splits over dimensions. A
    dimension with KL ≈ 0 carries no information about x (its posterior is the prior).
    """
    _require_vae(model)
    if not model.analytic_kl:
        raise ValueError("the KL splits over dimensions only for a diagonal Gaussian posterior and the N(0, I) "
                         f"prior (this VAE has {type(model.posterior).__name__} and {type(model.prior).__name__}); "
                         "use model.elbo(x).kl for the total.")
    return gaussian_kl(*model.posterior.params(_features(model, x))).mean(0)


@torch.no_grad()
def posterior_means(model: VAE, x: torch.Tensor, *, samples: int = 256) -> torch.Tensor:
    """E_q[z | x_n] for each object, (N, d): μ for a Gaussian posterior, else a mean of ``samples`` draws."""
    h = _features(model, x)
    if type(model.posterior) is GaussianPosterior:
        return model.posterior.params(h)[0]
    return model.posterior.rsample(h, check_positive_int(samples, "samples"))[0].mean(0)


def unit_activity(model: VAE, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """A_u = Cov_x(E_q[z_u | x]) for every latent unit u (Burda et al. 2015): shape (d,).

    The variance, over the objects of ``x`` (unbiased), of each unit's posterior
    mean. A unit the encoder ignores has the same posterior for every x: A_u = 0.
    """
    return posterior_means(model, x, **kwargs).var(0)


def active_units(model: VAE, x: torch.Tensor, threshold: float = 0.01, **kwargs) -> int:
    """The number of latent units with activity A_u > ``threshold`` (Burda et al. 2015 use 0.01)."""
    return int((unit_activity(model, x, **kwargs) > threshold).sum())


class AggregatedPosterior(nn.Module):
    """The aggregated posterior of N objects, q_agg(z) = (1/N) Σ_n q(z | x_n).

    It is the distribution of codes the decoder sees in training; the prior that
    maximises the average ELBO over these objects (C22). ``log_prob(z)`` is a
    logsumexp over all N components (O(N) per point, computed in chunks);
    ``sample(m)`` picks objects uniformly and draws from their posteriors.
    The features are computed once, without gradients, in eval mode.
    """

    def __init__(self, model: VAE, x: torch.Tensor, *, chunk: int = 2**17):
        super().__init__()
        self._posterior = (model.posterior,)  # held by reference
        self.register_buffer("h", _features(model, x))
        self.latent_dim, self.chunk = model.latent_dim, check_positive_int(chunk, "chunk")

    def __len__(self) -> int:
        return len(self.h)

    def log_q(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z_m | x_n) for every code and object: (M, N)."""
        posterior, = self._posterior
        z = check_tensor(z, "z", shape=(None, self.latent_dim), kind="float")
        n, rows = len(self.h), max(1, self.chunk // len(self.h))
        return torch.cat([posterior.log_prob(part[:, None, :].expand(len(part), n, self.latent_dim), self.h)
                          for part in z.split(rows)])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q_agg(z) = logsumexp_n log q(z | x_n) − log N, shape (M,)."""
        return torch.logsumexp(self.log_q(z), 1) - math.log(len(self.h))

    def sample(self, m: int) -> torch.Tensor:
        posterior, = self._posterior
        pick = torch.randint(len(self.h), (check_positive_int(m, "m"),), device=self.h.device)
        with torch.no_grad():
            return posterior.rsample(self.h[pick], 1)[0][0]


class Surgery(NamedTuple):
    """ELBO surgery (Hoffman & Johnson 2016): average_kl = mutual_information + marginal_kl, in nats.

    ``*_se`` are standard errors over the N objects (Monte Carlo error of the
    z draws); ``average_kl_se`` is 0 where the KL is in closed form.
    """

    average_kl: float  # (1/N) Σ_n KL(q(z | x_n) ‖ p(z))
    mutual_information: float  # I_q[x, z], x uniform over the N objects
    marginal_kl: float  # KL(q_agg(z) ‖ p(z))
    average_kl_se: float
    mutual_information_se: float
    marginal_kl_se: float


@torch.no_grad()
def elbo_surgery(model: VAE, x: torch.Tensor, *, samples: int = 16) -> Surgery:
    """The rate term of the ELBO split in two: avg KL(q(z|x_n) ‖ p) = I_q[x, z] + KL(q_agg ‖ p).

    With x uniform over the N given objects, the joint q(x, z) = q(z | x)/N has
    marginal q_agg and

        (1/N) Σ_n KL(q(z|x_n) ‖ p) = E_q[log q(z|x) − log q_agg(z)] + E_q[log q_agg(z) − log p(z)]
                                   =        I_q[x, z]             +      KL(q_agg ‖ p).

    Estimators: ``samples`` draws z ~ q(z | x_n) per object (so z ~ q_agg,
    stratified over the objects), log q_agg(z) by :class:`AggregatedPosterior`
    over all N objects (O(N²·samples) density evaluations). On the empirical
    distribution of these N objects the estimates are unbiased Monte Carlo
    averages, and the identity holds draw by draw; I_q ≤ log N then, since x
    takes N values. As estimates for the *population* (x from the data
    distribution, q_agg its infinite mixture), they are biased: the N-point
    mixture puts too much mass near the codes it was built from, so I_q is
    underestimated by a margin that grows as I_q approaches log N (use N well
    above e^{I_q}), and KL(q_agg ‖ p) is correspondingly overestimated. The
    average KL is in closed form when :attr:`VAE.analytic_kl`, else the same
    draws' log q − log p.
    """
    samples = check_positive_int(samples, "samples")
    agg = AggregatedPosterior(model, x)
    h, posterior = agg.h, model.posterior
    z, log_q = posterior.rsample(h, samples)  # (S, N, d), (S, N)
    log_agg = agg.log_prob(z.flatten(0, 1)).reshape(log_q.shape)
    log_p = model.prior.log_prob(z)
    mi = (log_q - log_agg).double().mean(0)  # per object, averaged over its draws
    marginal = (log_agg - log_p).double().mean(0)
    if model.analytic_kl:
        avg = gaussian_kl(*posterior.params(h)).sum(1).double()
        avg_se = 0.0
    else:
        avg = (log_q - log_p).double().mean(0)
        avg_se = _se(avg)
    return Surgery(avg.mean().item(), mi.mean().item(), marginal.mean().item(), avg_se, _se(mi), _se(marginal))


def _se(values: torch.Tensor) -> float:
    return values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")


# =============================================================== gradient estimators
def gradient_estimates(f: Callable[[torch.Tensor], torch.Tensor], mu: float, log_sigma: float, samples: int, *,
                       estimator: str = "reparameterised", seed: int = 0) -> torch.Tensor:
    """Single-sample estimates of ∇_{(μ, log σ)} E_{z ~ N(μ, σ²)}[f(z)], shape (samples, 2).

    ``"reparameterised"``: z = μ + σ·ε, the gradient of f(z) through the sample,
    (f'(z), f'(z)·σε). ``"score"`` (REINFORCE): f(z)·∇ log N(z; μ, σ²) =
    f(z)·((z − μ)/σ², (z − μ)²/σ² − 1), which needs no derivative of f. Both are
    unbiased; their variances differ (the reparameterised one is usually far
    smaller). ``f`` maps a tensor of codes to values elementwise. Seeded.
    """
    check_choice(estimator, "estimator", ("reparameterised", "score"))
    eps = torch.randn(check_positive_int(samples, "samples"), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)
    sigma = math.exp(log_sigma)
    if estimator == "reparameterised":
        # z = μ + σε: ∂f(z)/∂μ = f'(z) and ∂f(z)/∂log σ = f'(z)·σε; f' by autograd (f is elementwise)
        z = (mu + sigma * eps).requires_grad_(True)
        (df_dz,) = torch.autograd.grad(f(z).sum(), z)
        return torch.stack([df_dz, df_dz * sigma * eps], 1)
    z = mu + sigma * eps  # the score of N(z; μ, σ²) with respect to (μ, log σ), times f(z)
    with torch.no_grad():
        fz = f(z)
    return torch.stack([fz * eps / sigma, fz * (eps**2 - 1)], 1)
