"""Diffusion models (Chapter 9): noise schedules, the forward process, denoisers, the DDPM.

**The forward process** adds Gaussian noise in T small steps,

    q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I),   α_t = 1 − β_t,

and, because Gaussians compose, in one step from the data (the closed form):

    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I),   ᾱ_t = Π_{s ≤ t} α_s,

so x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε with ε ~ N(0, I). A :class:`NoiseSchedule`
holds β_t, α_t, ᾱ_t as float64 tables indexed by t = 0..T (ᾱ_0 = 1).

**Three parameterisations** of one denoiser. Given x_t, a network may predict the
noise ε, the clean object x_0, or the score ∇ log q_t(x_t); they convert into one
another (Tweedie: E[x_0 | x_t] = (x_t + (1 − ᾱ_t) ∇ log q_t(x_t)) / √ᾱ_t):

    x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t,      ŝ = −ε̂ / √(1 − ᾱ_t).

**The reverse process** p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I) with
μ_θ = (x_t − β_t / √(1 − ᾱ_t) · ε̂_θ(x_t, t)) / √α_t, the mean of the forward
posterior q(x_{t−1} | x_t, x_0) with x̂_0 put in for x_0. The :class:`DDPM`'s bound
(Ho et al. 2020, eq. 5), in nats:

    −log p_θ(x_0) ≤ KL(q(x_T|x_0) ‖ N(0, I)) + Σ_{t=2}^T KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t))
                    − log p_θ(x_0 | x_1),

whose last term is a *discretised* Gaussian for data on L levels (each level owns a
bin of width 2/(L − 1) of [−1, 1]; the two end bins reach to ±∞). Training
minimises the *simple* loss E_{t,ε} ‖ε − ε̂_θ(x_t, t)‖² or an unbiased one-t estimate of
the bound (the ELBO-weighted loss). Samplers: ancestral DDPM (T steps) and DDIM
(Song et al. 2021; deterministic for η = 0) on any number of steps.

**The probability-flow ODE** dx/dτ = −½β(τ)(x + ∇ log q_τ(x)) shares the SDE's marginals
(:meth:`DDPM.ode_sample`: fixed Euler / Heun steps in the smooth variables x/√ᾱ and σ, where Euler
is DDIM, or adaptive RK45 in τ by :func:`ode_solve`) and gives log p(x) by the change of variables
(:meth:`DDPM.ode_log_prob`: the exact divergence in 2-D, Hutchinson's estimate for images).
**Flow matching** (:class:`FlowMatching`) regresses a velocity on the straight path
x_t = (1 − t) x_0 + t x_1 from noise x_0 (t = 0) to data x_1 (t = 1), target x_1 − x_0.

**Class-conditional models** take labels as ``context`` through a network built with
``num_classes``; **classifier-free guidance** (:func:`guided`, Ho & Salimans 2022) mixes the
conditional and unconditional outputs of the same network, trained with labels dropped at random
(:func:`drop_labels`). Both models sample with a :class:`WeightAverage` of their network when given
``average``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModel, constraints
from .validate import as_tensor, check_choice, check_positive_int, validation_enabled

__all__ = [
    "NoiseSchedule", "linear_schedule", "cosine_schedule",
    "eps_to_x0", "x0_to_eps", "eps_to_score", "score_to_eps", "x0_to_score", "score_to_x0",
    "ode_solve", "divergence_exact", "divergence_hutchinson", "ode_log_density", "rademacher",
    "GaussianMixtureVelocity", "FlowMatching", "DequantizedFlowMatching", "flow_matching_mlp", "flow_matching_unet", "WeightAverage",
    "TimeEmbedding", "ClassEmbedding", "guided", "drop_labels", "MLPDenoiser", "UNet", "GaussianMixtureDenoiser", "DDPM", "ddpm_mlp", "ddpm_unet", "gaussian_kl",
    "DIGITS_UNET", "MNIST_UNET", "CIFAR_UNET", "DIGITS_DDPM", "DIGITS_DDPM_TRAINING", "DIGITS_FM",
    "DIGITS_FM_TRAINING", "TOY_DDPM",
]

LOG_2PI = math.log(2 * math.pi)
SIGMA_MAX = 100.0  # where the probability-flow ODE in σ = √((1 − ᾱ)/ᾱ) starts (DDPM.ode_sigma)

# Settings (fast mode: the 8×8 digits and 2-D toys; full mode: MNIST 28×28, CIFAR-10 32×32).
# Each level of ``mults`` but the last halves the resolution: 8 → 4, 28 → 14 → 7, 32 → 16 → 8.
DIGITS_UNET = dict(base=32, mults=(1, 2), blocks=1, embed_dim=64)
MNIST_UNET = dict(base=64, mults=(1, 2, 2), blocks=2, embed_dim=128)
CIFAR_UNET = dict(base=128, mults=(1, 2, 2), blocks=2, embed_dim=256)
# The digits' models, tuned by `python -m dgmlab.bench diffusion` (5 min each on 2 cores, ~0.65 s per epoch):
# with a weight average of 0.999, the DDPM's ancestral FD fell from 0.86 to 0.71 (floor 0.49)
DIGITS_DDPM = dict(timesteps=1000, schedule="cosine", objective="simple", variance="large", average=0.999)
DIGITS_DDPM_TRAINING = dict(epochs=480, batch_size=64, lr=2e-3)
DIGITS_FM = dict(average=0.999)  # flow_matching_unet: dequantized
DIGITS_FM_TRAINING = dict(epochs=480, batch_size=64, lr=2e-3)
# 2-D toys: the linear schedule, since the cosine one ends at ᾱ_T ≈ 6e-8 for T = 200, where DDIM's first
# x̂_0 = (x_T − √(1 − ᾱ_T) ε̂)/√ᾱ_T multiplies the network's error by ~4,000 (Chapter 9 shows it)
TOY_DDPM = dict(timesteps=200, schedule="linear", objective="simple", variance="large")


# ============================================================================ schedules
class NoiseSchedule:
    """β_t, α_t = 1 − β_t and ᾱ_t = Π_{s≤t} α_s for t = 0..T, float64 tables of length T + 1.

    Index 0 is the data itself: β_0 = 0, ᾱ_0 = 1. Made from β_1..β_T (each in (0, 1)),
    or by :func:`linear_schedule` / :func:`cosine_schedule`.
    """

    def __init__(self, betas):
        betas = as_tensor(betas, "betas").to(torch.float64).flatten()
        if len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas should be a non-empty sequence β_1..β_T with every β_t in (0, 1).")
        self.T = len(betas)
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        self.alpha = 1 - self.beta
        self.alpha_bar = torch.cumprod(self.alpha, 0)

    def __repr__(self):
        return f"NoiseSchedule(T={self.T}, ᾱ_T={self.alpha_bar[-1].item():.3g})"

    def check_t(self, t, n: int | None = None, *, lowest: int = 0) -> torch.Tensor:
        """t as a (N,) long tensor of steps in [lowest, T] (an int serves all n objects); the range is
        checked while :func:`dgmlab.validate.validation` is on."""
        t = as_tensor(t, "t")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"t should hold integer steps, got {t.dtype}; convert it with .long().")
        if t.dim() == 0 and n is not None:
            t = t.expand(n)
        if (t.dim() != 1 and n is not None) or t.dim() > 1 or (n is not None and len(t) != n):
            raise ValueError(f"t should be one step per object, shape ({n if n else 'N'},), got {tuple(t.shape)}.")
        if validation_enabled() and t.numel() and (int(t.min()) < lowest or int(t.max()) > self.T):
            raise ValueError(f"t should lie in [{lowest}, {self.T}] (T = {self.T} steps), "
                             f"got values in [{int(t.min())}, {int(t.max())}].")
        return t.long()

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` ('beta', 'alpha', 'alpha_bar') at steps t (N,), shaped to broadcast
        against ``like`` (N, ...), in its dtype and on its device."""
        values = getattr(self, name).to(like.dtype).to(like.device)[t.to(like.device)]
        return values.reshape(-1, *[1] * (like.dim() - 1))

    def alpha_bar_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ(τ) at steps t (N,) shaped like :meth:`at`: the table for integer t; for real τ ∈ [0, T] the
        continuous-time limit used by the probability-flow ODE, log ᾱ linear between steps, so
        β(τ) = −d log ᾱ/dτ = −log α_⌈τ⌉ ≈ β_⌈τ⌉ is constant on each (t − 1, t]."""
        if not t.is_floating_point():
            return self.at("alpha_bar", t, like)
        log_ab = self.alpha_bar.log().to(like.device)
        tau = t.to(torch.float64).to(like.device).clamp(0, self.T)
        lo = tau.floor().long().clamp(max=self.T - 1)
        values = (log_ab[lo] + (tau - lo) * (log_ab[lo + 1] - log_ab[lo])).exp()
        return values.to(like.dtype).reshape(-1, *[1] * (like.dim() - 1))

    def beta_at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """β(τ) = −d log ᾱ/dτ = −log α_⌈τ⌉ for real τ ∈ (0, T], shaped like :meth:`at`."""
        step = t.to(torch.float64).ceil().long().clamp(1, self.T).to(like.device)
        return (-self.alpha.log().to(like.device)[step]).to(like.dtype).reshape(-1, *[1] * (like.dim() - 1))

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """q(x_{t−1} | x_t, x_0) = N(μ̃, β̃_t I) for t ≥ 1: returns (μ̃, β̃_t), with
        μ̃ = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,
        β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t."""
        beta, alpha = self.at("beta", t, xt), self.at("alpha", t, xt)
        ab, ab_prev = self.at("alpha_bar", t, xt), self.at("alpha_bar", t - 1, xt)
        mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * xt
        return mean, (1 - ab_prev) / (1 - ab) * beta

    # -- the forward process ---------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t, eps: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) in closed form: √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        t = self.check_t(t, len(x0))
        eps = torch.randn_like(x0) if eps is None else eps
        ab = self.at("alpha_bar", t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def q_step(self, x_prev: torch.Tensor, t, eps: torch.Tensor | None = None) -> torch.Tensor:
        """One step of the chain, x_t ~ q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I), t ≥ 1."""
        t = self.check_t(t, len(x_prev), lowest=1)
        eps = torch.randn_like(x_prev) if eps is None else eps
        return self.at("alpha", t, x_prev).sqrt() * x_prev + self.at("beta", t, x_prev).sqrt() * eps

    def q_chain(self, x0: torch.Tensor, t: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0, x_1, .., x_t by t steps of :meth:`q_step`: a tensor of shape (t + 1, *x0.shape)."""
        t = int(self.check_t(t))
        xs = [x0]
        for s in range(1, t + 1):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
            xs.append(self.q_step(xs[-1], s, eps))
        return torch.stack(xs)

    def marginal(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean √ᾱ_t x_0 and variance 1 − ᾱ_t of q(x_t | x_0) (the variance broadcastable)."""
        ab = self.at("alpha_bar", self.check_t(t, len(x0)), x0)
        return ab.sqrt() * x0, 1 - ab


def linear_schedule(timesteps: int = 1000, beta_start: float | None = None,
                    beta_end: float | None = None) -> NoiseSchedule:
    """β_t linear from β_1 to β_T (Ho et al. 2020: 10⁻⁴ to 0.02 over T = 1000). By default both
    ends scale by 1000/T, so a shorter chain noises as much (Nichol & Dhariwal 2021)."""
    T = check_positive_int(timesteps, "timesteps")
    beta_start = 1e-4 * 1000 / T if beta_start is None else beta_start
    beta_end = min(0.02 * 1000 / T, 0.999) if beta_end is None else beta_end
    return NoiseSchedule(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))


def cosine_schedule(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
    """ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)) (Nichol & Dhariwal 2021); β_t =
    1 − ᾱ_t/ᾱ_{t−1}, clipped at ``max_beta`` near t = T where f reaches 0."""
    T = check_positive_int(timesteps, "timesteps")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return NoiseSchedule((1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(1e-8, max_beta))


def make_schedule(name: str, timesteps: int) -> NoiseSchedule:
    """'linear' or 'cosine', with T = ``timesteps``."""
    check_choice(name, "schedule", ["linear", "cosine"])
    return linear_schedule(timesteps) if name == "linear" else cosine_schedule(timesteps)


# ============================================================================ parameterisations
# alpha_bar: ᾱ_t broadcastable against x_t (NoiseSchedule.at("alpha_bar", t, x_t)).
def eps_to_x0(xt, eps, alpha_bar):
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t."""
    return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def x0_to_eps(xt, x0, alpha_bar):
    """ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t)."""
    return (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def eps_to_score(eps, alpha_bar):
    """ŝ = ∇ log q_t(x_t) ≈ −ε̂ / σ_t, σ_t = √(1 − ᾱ_t) (denoising score matching)."""
    return -eps / (1 - alpha_bar).sqrt()


def score_to_eps(score, alpha_bar):
    """ε̂ = −σ_t ŝ, σ_t = √(1 − ᾱ_t)."""
    return -(1 - alpha_bar).sqrt() * score


def x0_to_score(xt, x0, alpha_bar):
    """ŝ = (√ᾱ_t x̂_0 − x_t) / (1 − ᾱ_t) (Tweedie's formula read backwards)."""
    return (alpha_bar.sqrt() * x0 - xt) / (1 - alpha_bar)


def score_to_x0(xt, score, alpha_bar):
    """x̂_0 = (x_t + (1 − ᾱ_t) ŝ) / √ᾱ_t (Tweedie's formula)."""
    return (xt + (1 - alpha_bar) * score) / alpha_bar.sqrt()


def gaussian_kl(mean_q, var_q, mean_p, var_p):
    """KL(N(μ_q, v_q) ‖ N(μ_p, v_p)) per dimension: ½(log v_p/v_q + (v_q + (μ_q − μ_p)²)/v_p − 1)."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)


# ============================================================================ denoisers
class TimeEmbedding(nn.Module):
    """t ↦ [sin(t ω_k), cos(t ω_k)]_k with ω_k = 10000^{−k/(d/2)} (the Transformer's positions),
    then a two-layer MLP: (N,) steps → (N, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_positive_int(dim, "embed_dim")
        if dim % 2:
            raise ValueError(f"embed_dim should be even (sines and cosines), got {dim}.")
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t))


class ClassEmbedding(nn.Module):
    """A label y ∈ {0..C−1}, or the *null* label C (no class: what classifier-free guidance
    trains with a probability ``label_dropout`` and samples with), → a learned vector (N, dim)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        if y is None:
            y = torch.full((n,), self.num_classes, dtype=torch.long, device=self.table.weight.device)
        return self.table(y)


def conditioning(net: nn.Module, emb: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The time embedding plus the class embedding of ``y`` (the null label for None) for a network
    built with ``num_classes``; a label given to an unconditional network is an error."""
    if net.classes is None:
        if y is not None:
            raise ValueError("this network is unconditional: build it with num_classes to give it labels.")
        return emb
    return emb + net.classes(y, len(emb))


def drop_labels(y: torch.Tensor | None, p: float, num_classes: int | None) -> torch.Tensor | None:
    """Classifier-free guidance's training trick: each label replaced by the null label C with
    probability p, so that one network learns p(x | y) and p(x) (Ho & Salimans 2022)."""
    if y is None or p == 0:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, num_classes), y)


def guided(net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, w: float,
           num_classes: int | None) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_∅ + w (out_y − out_∅), from one batched call
    of ``net(x, t, y)`` on the label and on the null label. w = 1: the conditional network as it is;
    w = 0: the unconditional one; w > 1: pushed away from p(x) towards the label (sharper, less diverse).
    For ε this is the score of p(x) p(y | x)^w; w is 1 + the w of Ho & Salimans' eq. 6."""
    if y is None or w == 1:
        return net(x, t, y)
    if w == 0:
        return net(x, t, None)
    null = torch.full_like(y, num_classes)
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    out_y, out_null = both.chunk(2)
    return out_null + w * (out_y - out_null)


class MLPDenoiser(nn.Module):
    """ε̂_θ(x_t, t) for vectors (N, dim): an MLP on [x_t, embedding(time_scale · t)] with SiLUs
    (``time_scale`` = 1000 spreads flow matching's t ∈ [0, 1] over the embedding's frequencies).
    With ``num_classes`` a label y (or the null label) adds its embedding: ε̂_θ(x_t, t, y)."""

    def __init__(self, dim: int, hidden: int = 128, layers: int = 3, embed_dim: int = 32, time_scale: float = 1.0,
                 num_classes: int | None = None):
        super().__init__()
        self.dim, self.time_scale = check_positive_int(dim, "dim"), float(time_scale)
        self.embed = TimeEmbedding(embed_dim)
        self.num_classes = num_classes
        self.classes = None if num_classes is None else ClassEmbedding(num_classes, embed_dim)
        sizes = [dim + embed_dim] + [check_positive_int(hidden, "hidden")] * check_positive_int(layers, "layers")
        body: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            body += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*body, nn.Linear(sizes[-1], dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = conditioning(self, self.embed(self.time_scale * t), y)
        return self.net(torch.cat([x, emb], 1))


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, plus the time embedding's shift, twice, with a skip connection."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(embed_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class UNet(nn.Module):
    """ε̂_θ(x_t, t) for images (N, C, H, W): a small U-Net (Ronneberger et al. 2015, as in Ho et al.
    2020 without attention). Level i has ``base``·mults[i] channels and ``blocks`` residual
    blocks; each level but the last halves H and W (so H, W must divide by 2^(levels−1)); the
    way up concatenates the way down's features at each resolution. ``num_classes``: a class
    embedding joins the time embedding (a label, or the null label, for classifier-free guidance)."""

    def __init__(self, channels: int = 1, base: int = 32, mults: Sequence[int] = (1, 2), blocks: int = 1,
                 embed_dim: int = 64, time_scale: float = 1.0, num_classes: int | None = None):
        super().__init__()
        self.channels, self.levels = check_positive_int(channels, "channels"), len(mults)
        self.time_scale, self.num_classes = float(time_scale), num_classes
        self.classes = None if num_classes is None else ClassEmbedding(num_classes, embed_dim)
        widths = [check_positive_int(base, "base") * check_positive_int(m, "mults") for m in mults]
        self.embed = TimeEmbedding(embed_dim)
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        c = widths[0]
        for w in widths:
            self.down.append(nn.ModuleList([ResBlock(c if b == 0 else w, w, embed_dim) for b in range(blocks)]))
            c = w
        self.middle = ResBlock(c, c, embed_dim)
        for w in reversed(widths):
            self.up.append(nn.ModuleList([ResBlock((c if b == 0 else w) + w, w, embed_dim) for b in range(blocks)]))
            c = w
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"this U-Net halves the image {self.levels - 1} time(s): H and W should divide "
                             f"by {factor}, got {tuple(x.shape[-2:])}; use fewer mults.")
        emb, h, skips = conditioning(self, self.embed(self.time_scale * t), y), self.inp(x), []
        for i, level in enumerate(self.down):
            for block in level:
                h = block(h, emb)
                skips.append(h)
            if i < self.levels - 1:
                h = F.avg_pool2d(h, 2)
        h = self.middle(h, emb)
        for i, level in enumerate(self.up):
            for block in level:
                h = block(torch.cat([h, skips.pop()], 1), emb)
            if i < self.levels - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)


class GaussianMixtureDenoiser(nn.Module):
    """The optimal ε-denoiser for data from a Gaussian mixture Σ_k π_k N(m_k, s_k² I): exact, no training.

    Noised, the mixture stays one: q_t = Σ_k π_k N(√ᾱ_t m_k, v_k I), v_k = ᾱ_t s_k² + 1 − ᾱ_t.
    The minimiser of the denoising loss is E[ε | x_t], read off the posterior mean
    E[x_0 | x_t] = Σ_k r_k(x_t) (m_k + √ᾱ_t s_k²/v_k (x_t − √ᾱ_t m_k)), r_k the component's
    posterior weight. ``means`` (K, d), ``stds`` (K,), ``weights`` (K,); float64 buffers.
    """

    def __init__(self, means, stds, weights, schedule: NoiseSchedule):
        super().__init__()
        means = as_tensor(means, "means").to(torch.float64)
        stds, weights = (as_tensor(v, n).to(torch.float64).flatten() for v, n in ((stds, "stds"), (weights, "weights")))
        if means.dim() != 2 or len(stds) != len(means) or len(weights) != len(means):
            raise ValueError(f"means should be (K, d) and stds, weights (K,), got {tuple(means.shape)}, "
                             f"{tuple(stds.shape)}, {tuple(weights.shape)}.")
        if not bool((stds > 0).all() and (weights > 0).all()):
            raise ValueError("stds and weights should be positive.")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.schedule = schedule

    def _components(self, x, t):
        ab = self.schedule.alpha_bar_at(t, x)  # (N, 1); real t: the continuous-time ᾱ(τ)
        v = ab * self.stds**2 + 1 - ab  # (N, K)
        diff = x[:, None, :] - ab.sqrt()[:, :, None] * self.means[None]  # (N, K, d)
        log_r = self.weights.log() - 0.5 * (diff**2).sum(2) / v - 0.5 * x.shape[1] * (LOG_2PI + v.log())
        return ab, v, diff, torch.softmax(log_r, 1)

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t], shape (N, d)."""
        ab, v, diff, r = self._components(x, t)
        means_k = self.means[None] + (ab.sqrt() * self.stds**2 / v)[:, :, None] * diff
        return (r[:, :, None] * means_k).sum(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[ε | x_t] = (x_t − √ᾱ_t E[x_0 | x_t]) / √(1 − ᾱ_t)."""
        return x0_to_eps(x, self.x0(x, t), self.schedule.alpha_bar_at(t, x))


# ============================================================================ ODE tools
def ode_solve(drift, x: torch.Tensor, t0: float, t1: float, *, method: str = "heun", steps: int = 100,
              rtol: float = 1e-5, atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """x(t1) for dx/dt = drift(x, t) from x(t0) = x, and the number of drift evaluations (NFE).

    'euler': x ← x + h f(x, t) on ``steps`` equal steps (first order). 'midpoint':
    x ← x + h f(x + h/2 f(x, t), t + h/2) (second order, 2 NFE a step). 'heun': the trapezoid
    predictor–corrector x ← x + h/2 (f(x, t) + f(x + h f, t + h)) (second order, 2 NFE a step).
    'rk45': scipy's adaptive Dormand–Prince with error control (``rtol``, ``atol``), in float64.
    ``drift`` takes x (N, ...) and t as an (N,) real tensor."""
    check_choice(method, "method", ["euler", "midpoint", "heun", "rk45"])
    def f(y, t):
        return drift(y, torch.full((len(y),), float(t), dtype=torch.float64, device=y.device))
    if method == "rk45":
        from scipy.integrate import solve_ivp
        shape, dtype = x.shape, x.dtype
        def rhs(t, y):
            return f(torch.as_tensor(y, device=x.device).reshape(shape).to(dtype), t).double().flatten().cpu().numpy()
        sol = solve_ivp(rhs, (t0, t1), x.double().flatten().cpu().numpy(), rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"the adaptive ODE solver failed: {sol.message}; loosen rtol/atol or use 'heun'.")
        return torch.as_tensor(sol.y[:, -1], device=x.device).reshape(shape).to(dtype), int(sol.nfev)
    grid = torch.linspace(t0, t1, check_positive_int(steps, "steps") + 1, dtype=torch.float64).tolist()
    nfe = 0
    for ta, tb in zip(grid[:-1], grid[1:]):
        h, k1 = tb - ta, f(x, ta)
        if method == "euler":
            x, nfe = x + h * k1, nfe + 1
        elif method == "midpoint":
            x, nfe = x + h * f(x + h / 2 * k1, ta + h / 2), nfe + 2
        else:
            x, nfe = x + h / 2 * (k1 + f(x + h * k1, tb)), nfe + 2
    return x, nfe


def divergence_exact(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∇·f = Σ_i ∂f_i/∂x_i by autograd, one backward pass per dimension (cost ∝ d: for 2-D data),
    per object (N,). ``f`` was computed from ``x`` with grad enabled; the result keeps the graph."""
    f, xf = f.flatten(1), x
    div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for i in range(f.shape[1]):
        div = div + torch.autograd.grad(f[:, i].sum(), xf, create_graph=True)[0].flatten(1)[:, i]
    return div


def divergence_hutchinson(f: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate vᵀ (∂f/∂x) v of ∇·f = tr(∂f/∂x), one backward pass whatever d
    (for images): unbiased when E[v vᵀ] = I (Rademacher or Gaussian probes v), per object (N,)."""
    vjp = torch.autograd.grad((f * v).sum(), x, create_graph=True)[0]
    return (vjp * v).flatten(1).sum(1)


def ode_log_density(drift, x: torch.Tensor, t_data: float, t_noise: float, *, exact: bool,
                    v: torch.Tensor | None = None, **solver) -> torch.Tensor:
    """log p_{t_data}(x) = log N(x(t_noise); 0, I) + ∫_{t_data}^{t_noise} ∇·f(x(τ), τ) dτ (N,), by the
    instantaneous change of variables d log p(x(τ))/dτ = −∇·f, the integral carried as an extra state
    of the ODE dx/dτ = f run from x(t_data) = x. ``exact``: :func:`divergence_exact`; else
    :func:`divergence_hutchinson` with the probes ``v`` (shaped like x), fixed along the path.
    ``solver``: keywords of :func:`ode_solve`."""
    d = x[0].numel()

    def augmented(state, t):
        with torch.enable_grad():
            y = state[:, :d].reshape(x.shape).detach().requires_grad_(True)
            f = drift(y, t)
            div = divergence_exact(f, y) if exact else divergence_hutchinson(f, y, v)
        return torch.cat([f.detach().flatten(1), div.detach()[:, None]], 1)

    start = torch.cat([x.flatten(1), torch.zeros(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    end, _ = ode_solve(augmented, start, t_data, t_noise, **solver)
    return -0.5 * (LOG_2PI + end[:, :d] ** 2).sum(1) + end[:, d]


def rademacher(shape, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """±1 with probability ½ each (Hutchinson's probes), in ``like``'s dtype and device."""
    return (torch.randint(0, 2, tuple(shape), generator=generator) * 2 - 1).to(like)


# ============================================================================ the model
class WeightAverage(nn.Module):
    """An exponential moving average of a network's weights, θ̄ ← β θ̄ + (1 − β) θ after every step
    (buffers copied): what diffusion models sample with (Ho et al. 2020 use β = 0.9999), since the
    noisy regression's last iterate wanders around the optimum that the average sits closer to."""

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        if not (isinstance(decay, (int, float)) and 0 < decay < 1):
            raise ValueError(f"average should be a decay in (0, 1), e.g. 0.999 (0: no average), got {decay!r}.")
        self.decay, self.net = float(decay), copy.deepcopy(net).requires_grad_(False)

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        for avg, p in zip(self.net.parameters(), live.parameters()):
            avg.lerp_(p, 1 - self.decay)
        for avg, b in zip(self.net.buffers(), live.buffers()):
            avg.copy_(b)


def conditional_model(net: nn.Module, label_dropout: float) -> dict:
    """The context arguments of a model whose network ``net`` may take class labels: none for an
    unconditional network; else optional labels 0..C−1 (left out: the unconditional model)."""
    if not 0 <= label_dropout < 1:
        raise ValueError(f"label_dropout should be a probability in [0, 1), got {label_dropout}.")
    num_classes = getattr(net, "num_classes", None)
    if num_classes is None:
        return {}
    return dict(context_shape=(), context_support=constraints.integer_interval(0, num_classes - 1),
                context_optional=True)


class DDPM(GenerativeModel):
    """A denoising diffusion probabilistic model (Ho et al. 2020) with an ε-predicting ``denoiser``.

    ``levels``: data on integer levels 0..L−1 (the digits: 17), mapped to [−1, 1] and scored by
    a discretised Gaussian at t = 0, so ``log_prob`` bounds a probability (nats per object);
    None: real vectors scored by a Gaussian density at t = 0. ``variance``: σ_t² = β_t
    ('large') or β̃_t ('small'; β_1 at t = 1, where β̃_1 = 0). ``objective``: what
    :meth:`training_losses` minimises, 'simple' (‖ε − ε̂‖²) or 'elbo' (an unbiased estimate
    of −ELBO from one t per object). ``log_prob`` is the bound (``log_prob_is_bound``), every
    t summed, one ε per t; ``loss`` is its negative mean.

    A denoiser built with ``num_classes`` makes the model class-conditional: ``context`` holds labels
    (optional; left out, the model is unconditional), training drops each label with probability
    ``label_dropout``, and the samplers take a classifier-free ``guidance`` weight (:func:`guided`).
    ``average``: a decay β for a :class:`WeightAverage` of the denoiser, used out of training (eval mode).
    """

    log_prob_is_bound = True

    def __init__(self, denoiser: nn.Module, event_shape, schedule: NoiseSchedule, *, levels: int | None = None,
                 objective: str = "simple", variance: str = "large", label_dropout: float = 0.1,
                 average: float = 0.0):
        support = constraints.real if levels is None else constraints.integer_interval(0, levels - 1)
        super().__init__(event_shape, support=support, **conditional_model(denoiser, label_dropout))
        self.num_classes, self.label_dropout = getattr(denoiser, "num_classes", None), float(label_dropout)
        self.average = WeightAverage(denoiser, average) if average else None
        if levels is not None and check_positive_int(levels, "levels") < 2:
            raise ValueError(f"levels should be at least 2, got {levels}.")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError("schedule should be a NoiseSchedule, e.g. cosine_schedule(1000).")
        self.denoiser, self.schedule, self.levels = denoiser, schedule, levels
        self.objective = check_choice(objective, "objective", ["simple", "elbo"])
        self.variance = check_choice(variance, "variance", ["large", "small"])
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def T(self) -> int:
        return self.schedule.T

    # -- data space ↔ model space -----------------------------------------------------------
    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Levels 0..L−1 → [−1, 1] (x ↦ 2x/(L − 1) − 1); real data as they are."""
        x = x.to(self._anchor.dtype)
        return x if self.levels is None else 2 * x / (self.levels - 1) - 1

    def to_data_space(self, x0: torch.Tensor) -> torch.Tensor:
        """[−1, 1] → the nearest level (levels data); real data as they are."""
        if self.levels is None:
            return x0
        return torch.round((x0 + 1) / 2 * (self.levels - 1)).clamp(0, self.levels - 1).long()

    # -- the denoiser, three ways ---------------------------------------------------------------
    def eps(self, xt: torch.Tensor, t: torch.Tensor, context=None, guidance: float = 1.0) -> torch.Tensor:
        """ε̂_θ(x_t, t): the network's prediction of the noise in x_t (model space); given labels
        (``context``), ε̂_θ(x_t, t, y) under classifier-free ``guidance`` (:func:`guided`)."""
        denoiser = self.denoiser if self.training or self.average is None else self.average.net

        def net(x, t, y):
            labels = () if y is None else (y,)
            return denoiser(x.reshape(len(x), *self.event_shape), t, *labels).reshape(x.shape)

        return guided(net, xt, t, context, guidance, self.num_classes)

    def predict_x0(self, xt, t):
        """x̂_0(x_t, t) = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t."""
        return eps_to_x0(xt, self.eps(xt, t), self.schedule.at("alpha_bar", t, xt))

    def score(self, xt, t):
        """ŝ(x_t, t) = −ε̂ / √(1 − ᾱ_t) ≈ ∇ log q_t(x_t)."""
        return eps_to_score(self.eps(xt, t), self.schedule.at("alpha_bar", t, xt))

    def reverse_mean(self, xt, t, eps=None):
        """μ_θ(x_t, t) = (x_t − β_t/√(1 − ᾱ_t) ε̂) / √α_t."""
        eps = self.eps(xt, t) if eps is None else eps
        at = self.schedule.at
        return (xt - at("beta", t, xt) / (1 - at("alpha_bar", t, xt)).sqrt() * eps) / at("alpha", t, xt).sqrt()

    def reverse_variance(self, t, like):
        """σ_t²: β_t ('large') or β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t ('small', β_1 at t = 1)."""
        at = self.schedule.at
        beta = at("beta", t, like)
        if self.variance == "large":
            return beta
        tilde = (1 - at("alpha_bar", t - 1, like)) / (1 - at("alpha_bar", t, like)) * beta
        return torch.where((t == 1).reshape(beta.shape), beta, tilde)

    # -- the bound ------------------------------------------------------------------------------
    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)), per object (N,)."""
        T = torch.full((len(x0),), self.T, dtype=torch.long, device=x0.device)
        mean, var = self.schedule.marginal(x0, T)
        return gaussian_kl(mean, var, torch.zeros_like(mean), torch.ones_like(var)).flatten(1).sum(1)

    def bound_term(self, x0: torch.Tensor, t: torch.Tensor, context=None) -> torch.Tensor:
        """L_{t−1} for each object at its own t ≥ 1, per object (N,), one draw x_t ~ q(x_t | x_0):
        KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) for t ≥ 2, −log p_θ(x_0 | x_1) for t = 1."""
        xt = self.schedule.q_sample(x0, t)
        mean_p, var_p = self.reverse_mean(xt, t, self.eps(xt, t, context)), self.reverse_variance(t, xt)
        mean_q, var_q = self.schedule.posterior(x0, xt, t)
        var_q = torch.where((t == 1).reshape(var_q.shape), var_p, var_q)  # β̃_1 = 0: unused at t = 1
        kl = gaussian_kl(mean_q, var_q, mean_p, var_p.expand_as(mean_p)).flatten(1).sum(1)
        return torch.where(t == 1, -self.decoder_log_prob(x0, mean_p, var_p), kl)

    def decoder_log_prob(self, x0, mean, var) -> torch.Tensor:
        """log p_θ(x_0 | x_1), per object: N(x_0; μ, σ_1²) for real data; for L levels the mass
        of N(μ, σ_1²) on x_0's bin [x_0 − 1/(L−1), x_0 + 1/(L−1)] (end bins open), in float64."""
        if self.levels is None:
            return (-0.5 * (LOG_2PI + var.log() + (x0 - mean) ** 2 / var)).flatten(1).sum(1)
        x0, mean, sd = x0.double(), mean.double(), var.double().sqrt()
        half = 1.0 / (self.levels - 1)
        lo = torch.where(x0 <= -1 + 1e-6, -math.inf, (x0 - half - mean) / sd)
        hi = torch.where(x0 >= 1 - 1e-6, math.inf, (x0 + half - mean) / sd)
        upper = lo > 0  # both edges above the mean: Φ(b) − Φ(a) = Φ(−a) − Φ(−b), no cancellation
        a, b = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
        log_b = torch.special.log_ndtr(b)
        log_mass = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))  # log(Φ(b) − Φ(a))
        return log_mass.flatten(1).sum(1).to(self._anchor.dtype)

    def log_prob(self, x: torch.Tensor, context=None, *, k: int = 1) -> torch.Tensor:
        """A lower bound on log p(x) in nats, shape (N,). k = 1: the variational bound
        −(L_T + Σ_{t≥2} L_{t−1} + L_0), every t summed, one draw of x_t per t, the KLs in closed
        form (T network evaluations per object). k > 1: the importance-weighted bound over k
        forward chains, log (1/k) Σ_i p_θ(x_0, x^i_{1:T}) / q(x^i_{1:T} | x_0) (Burda et al. 2015),
        never lower in expectation, and tighter as k grows."""
        x, y = self.check_input(x, context)
        k = check_positive_int(k, "k")
        x0 = self.to_model_space(x)
        if k > 1:
            n = len(x0)
            y = None if y is None else y.repeat(k)
            log_w = self.chain_log_weight(x0.repeat(k, *[1] * (x0.dim() - 1)), y).reshape(k, n)
            return torch.logsumexp(log_w, 0) - math.log(k)
        total = self.prior_term(x0)
        for t in range(1, self.T + 1):
            total = total + self.bound_term(x0, torch.full((len(x0),), t, dtype=torch.long, device=x0.device), y)
        return -total

    def chain_log_weight(self, x0: torch.Tensor, context=None) -> torch.Tensor:
        """log p_θ(x_0, x_{1:T}) − log q(x_{1:T} | x_0) for one forward chain x_{1:T} per object:
        log N(x_T; 0, I) + Σ_{t≥2} log N(x_{t−1}; μ_θ(x_t, t), σ_t²) + log p_θ(x_0 | x_1)
        − Σ_t log N(x_t; √α_t x_{t−1}, β_t)."""
        def log_normal(y, mean, var):
            return (-0.5 * (LOG_2PI + var.log() + (y - mean) ** 2 / var)).flatten(1).sum(1)

        at, xs = self.schedule.at, [x0]
        log_w = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
        for t in range(1, self.T + 1):  # the forward chain, and its log q
            tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
            xs.append(self.schedule.q_step(xs[-1], tt))
            log_w = log_w - log_normal(xs[t], at("alpha", tt, x0).sqrt() * xs[t - 1], at("beta", tt, x0))
        log_w = log_w + log_normal(xs[-1], torch.zeros_like(x0), torch.ones_like(x0))
        for t in range(self.T, 0, -1):  # the reverse model, and its log p
            tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
            mean, var = self.reverse_mean(xs[t], tt, self.eps(xs[t], tt, context)), self.reverse_variance(tt, x0)
            log_w = log_w + (self.decoder_log_prob(x0, mean, var) if t == 1 else log_normal(xs[t - 1], mean, var))
        return log_w

    # -- training -------------------------------------------------------------------------------
    def simple_loss(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """E_{t ~ U{1..T}, ε} ‖ε − ε̂_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖², one (t, ε) per object, mean
        over objects and dimensions (Ho et al. 2020, eq. 14); labels dropped as :func:`drop_labels` says."""
        x, y = self.check_input(x, context)
        x0, y = self.to_model_space(x), drop_labels(y, self.label_dropout, self.num_classes)
        t = torch.randint(1, self.T + 1, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        xt = self.schedule.q_sample(x0, t, eps)
        return (eps - self.eps(xt, t, y)).square().mean()

    def elbo_loss(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """An unbiased estimate of the mean −ELBO: L_T + T · L_{t−1} with one t ~ U{1..T} per object."""
        x, y = self.check_input(x, context)
        x0, y = self.to_model_space(x), drop_labels(y, self.label_dropout, self.num_classes)
        t = torch.randint(1, self.T + 1, (len(x0),), device=x0.device)
        return (self.prior_term(x0) + self.T * self.bound_term(x0, t, y)).mean()

    def training_losses(self, x, context=None, *, step: int = 0):
        """The ``objective``: 'simple' (:meth:`simple_loss`) or 'elbo' (:meth:`elbo_loss`)."""
        yield "model", self.simple_loss(x, context) if self.objective == "simple" else self.elbo_loss(x, context)
        if self.average is not None:  # runs once fit has taken the step
            self.average.update(self.denoiser)

    # -- the probability-flow ODE (Song et al. 2021) ------------------------------------------------
    def ode_drift(self, x: torch.Tensor, t: torch.Tensor, context=None, guidance: float = 1.0) -> torch.Tensor:
        """dx/dτ = −½ β(τ) (x + ŝ(x, τ)), ŝ = −ε̂_θ(x, τ)/√(1 − ᾱ(τ)): the ODE whose solutions share the
        marginals q_τ of the VP SDE dx = −½β x dτ + √β dW. Continuous time τ ∈ [0, T] in steps, with
        log ᾱ linear between the schedule's steps (:meth:`NoiseSchedule.alpha_bar_at`), so
        β(τ) = −log α_⌈τ⌉; at integer τ the marginal is exactly the chain's q(x_t | x_0)."""
        ab, beta = self.schedule.alpha_bar_at(t, x), self.schedule.beta_at(t, x)
        return -0.5 * beta * (x + eps_to_score(self.eps(x, t, context, guidance), ab))

    def ode_sample(self, n: int, context=None, *, method: str = "heun", steps: int = 50, rtol: float = 1e-5,
                   atol: float = 1e-5, t_min: float = 1e-3, guidance: float = 1.0, return_nfe: bool = False):
        """``n`` objects by solving the probability-flow ODE from x_T ~ N(0, I), deterministic given x_T.
        'euler' / 'heun': ``steps`` fixed steps on the DDIM grid, in the variables where the ODE is smooth
        (:meth:`ode_sigma`); 'rk45': adaptively in τ (:meth:`ode_drift`) down to τ = t_min (the score is
        singular at τ = 0). With ``return_nfe`` also the number of network evaluations."""
        y = self.check_sample_args(n, context)
        check_choice(method, "method", ["euler", "heun", "rk45"])
        with torch.no_grad():
            xT = torch.randn(n, *self.event_shape, dtype=self._anchor.dtype, device=self._anchor.device)
            if method == "rk45":
                x0, nfe = ode_solve(lambda x, t: self.ode_drift(x, t, y, guidance), xT, float(self.T), t_min,
                                    method=method, rtol=rtol, atol=atol)
            else:
                x0, nfe = self.ode_sigma(xT, check_positive_int(steps, "steps"), heun=method == "heun",
                                         context=y, guidance=guidance)
        x0 = self.to_data_space(x0)
        return (x0, nfe) if return_nfe else x0

    def ode_sigma(self, xT: torch.Tensor, steps: int, *, heun: bool = True, context=None, guidance: float = 1.0):
        """The probability-flow ODE in x̄ = x/√ᾱ and σ = √((1 − ᾱ)/ᾱ), where it reads

            dx̄/dσ = ε̂_θ(√ᾱ x̄, t(σ))     (Song et al. 2021a, §4.3; Karras et al. 2022),

        solved to t = 0 on ``steps`` evenly spaced steps. Euler here is DDIM with η = 0 (unclipped);
        Heun averages the slopes at both ends of a step (not on the last, to σ = 0): 2·steps − 1
        evaluations. The τ-form is stiff where the cosine schedule's β_t nears 1; this form is not.
        It starts at the last t with σ_t ≤ :data:`SIGMA_MAX` (T itself for most schedules), taking x_T
        for x_t: there q(x_t) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) differs from N(0, I) by √ᾱ_t |x_0| ≤ 0.01 |x_0|,
        while the first step from the cosine schedule's σ_T ≈ 2·10⁴ would multiply ε̂'s error by σ_T
        (as Karras et al. 2022 start at σ = 80). Returns (x_0, network evaluations)."""
        ab = self.schedule.alpha_bar.tolist()
        start = max(t for t in range(self.T + 1) if (1 - ab[t]) / ab[t] <= SIGMA_MAX**2)

        def slope(x_bar, t):
            tt = torch.full((len(x_bar),), t, dtype=torch.long, device=x_bar.device)
            return self.eps(math.sqrt(ab[t]) * x_bar, tt, context, guidance)

        def sigma(t):
            return math.sqrt((1 - ab[t]) / ab[t])

        grid = torch.linspace(start, 0, steps + 1, dtype=torch.float64).round().long().tolist()
        taus, nfe = sorted(set(grid), reverse=True), 0
        x_bar = xT / math.sqrt(ab[start])
        for t, s in zip(taus[:-1], taus[1:]):
            d, nfe = slope(x_bar, t), nfe + 1
            x_next = x_bar + (sigma(s) - sigma(t)) * d
            if heun and s > 0:
                d, nfe = (d + slope(x_next, s)) / 2, nfe + 1
                x_next = x_bar + (sigma(s) - sigma(t)) * d
            x_bar = x_next
        return x_bar, nfe  # at t = 0, ᾱ = 1: x̄ = x

    def ode_log_prob(self, x: torch.Tensor, context=None, *, divergence: str = "auto", method: str = "rk45", steps: int = 100,
                     rtol: float = 1e-5, atol: float = 1e-5, t_min: float = 1e-3, generator=None) -> torch.Tensor:
        """log p(x) by the change of variables along the ODE (Chen et al. 2018; Song et al. 2021), nats (N,):

            log p_0(x) = log N(x(T); 0, I) + ∫_{t_min}^T ∇·f(x(τ), τ) dτ,   x(t_min) = x,

        the ODE run forward with its log-density change d log p/dτ = −∇·f as an extra state.
        ``divergence``: 'exact' (autograd per dimension; the default 'auto' picks it up to d = 16, the
        2-D toys) or 'hutchinson' (one Rademacher probe per object, fixed along the path: an unbiased
        estimate of the integral, for images). For levels data it is a density in model space
        ([−1, 1]) moved to the levels' scale by the map's Jacobian, d log(2/(L − 1)), not a probability."""
        x, y = self.check_input(x, context)
        check_choice(divergence, "divergence", ["auto", "exact", "hutchinson"])
        x0 = self.to_model_space(x)
        d = x0[0].numel()
        exact = divergence == "exact" or (divergence == "auto" and d <= 16)
        v = None if exact else rademacher(x0.shape, x0, generator)
        log_p = ode_log_density(lambda x, t: self.ode_drift(x, t, y), x0, t_min, float(self.T), exact=exact, v=v, method=method,
                                steps=steps, rtol=rtol, atol=atol)
        return log_p + (0.0 if self.levels is None else d * math.log(2 / (self.levels - 1)))

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, n: int, context=None, *, steps: int | None = None, method: str = "ddpm",
               eta: float | None = None, guidance: float = 1.0) -> torch.Tensor:
        """``n`` objects by ancestral DDPM sampling (``method='ddpm'``: all T steps, or with ``steps``
        < T the respaced chain, DDIM with η = 1), DDIM (``method='ddim'``, η = 0 by default:
        deterministic given x_T), on ``steps`` evenly spaced steps (default T), or the probability-flow
        ODE (``method='ode'``: Heun on ``steps`` steps, default 50; see :meth:`ode_sample`). ``context``:
        one label or n labels, sampled under classifier-free ``guidance`` (1: none)."""
        y = self.check_sample_args(n, context)
        check_choice(method, "method", ["ddpm", "ddim", "ode"])
        if method == "ode":
            return self.ode_sample(n, y, steps=50 if steps is None else steps, guidance=guidance)
        steps = self.T if steps is None else check_positive_int(steps, "steps")
        if steps > self.T:
            raise ValueError(f"steps should be at most T = {self.T}, got {steps}.")
        with torch.no_grad():
            xT = torch.randn(n, *self.event_shape, dtype=self._anchor.dtype, device=self._anchor.device)
            if method == "ddpm" and steps == self.T and eta is None:
                return self.to_data_space(self.ancestral(xT, y, guidance))
            eta = (1.0 if method == "ddpm" else 0.0) if eta is None else float(eta)
            return self.to_data_space(self.ddim(xT, steps, eta=eta, context=y, guidance=guidance))

    def ancestral(self, xT: torch.Tensor, context=None, guidance: float = 1.0) -> torch.Tensor:
        """x_{t−1} = μ_θ(x_t, t) + σ_t z for t = T..1, from x_T (model space; the last step draws
        x_0 from the decoder N(μ_θ(x_1, 1), σ_1²), which the levels' bins then round)."""
        x = xT
        for t in range(self.T, 0, -1):
            tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
            mean = self.reverse_mean(x, tt, self.eps(x, tt, context, guidance))
            x = mean + self.reverse_variance(tt, x).sqrt() * torch.randn_like(x)
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` + 1 evenly spaced steps from T down to 0 (distinct, rounded)."""
        grid = torch.linspace(self.T, 0, steps + 1, dtype=torch.float64).round().long().tolist()
        return sorted(set(grid), reverse=True)

    def ddim(self, xT: torch.Tensor, steps: int, *, eta: float = 0.0, context=None, guidance: float = 1.0) -> torch.Tensor:
        """DDIM (Song et al. 2021) from x_T on the steps τ of :meth:`ddim_timesteps`:
        x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z, σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)
        (s < t the next step; η = 0 deterministic, η = 1 the DDPM posterior's variance). For levels
        data x̂_0 is clipped to [−1, 1], where the data lie."""
        x = xT
        taus = self.ddim_timesteps(steps)
        for t, s in zip(taus[:-1], taus[1:]):
            x = self.ddim_step(x, t, s, eta=eta, context=context, guidance=guidance)
        return x

    def ddim_step(self, x: torch.Tensor, t: int, s: int, *, eta: float = 0.0,
                  z: torch.Tensor | None = None, context=None, guidance: float = 1.0) -> torch.Tensor:
        """One DDIM step from x_t to x_s (s < t), with noise z (default: drawn) when η > 0."""
        at = self.schedule.at
        tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        ab_t, ab_s = at("alpha_bar", tt, x), at("alpha_bar", tt.new_full(tt.shape, s), x)
        eps = self.eps(x, tt, context, guidance)
        x0 = eps_to_x0(x, eps, ab_t)
        if self.levels is not None:  # the data lie in [−1, 1]: clip x̂_0 there, and re-read ε̂ from it
            x0 = x0.clamp(-1, 1)
            eps = x0_to_eps(x, x0, ab_t)
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).clamp_min(0).sqrt()
        z = torch.randn_like(x) if z is None else z
        return ab_s.sqrt() * x0 + (1 - ab_s - sigma**2).clamp_min(0).sqrt() * eps + sigma * z


def ddpm_mlp(dim: int = 2, *, timesteps: int = 200, schedule: str = "cosine", hidden: int = 128, layers: int = 3,
             embed_dim: int = 32, **kwargs) -> DDPM:
    """A DDPM on real vectors (2-D toys) with an :class:`MLPDenoiser`."""
    return DDPM(MLPDenoiser(dim, hidden, layers, embed_dim), (dim,), make_schedule(schedule, timesteps), **kwargs)


def ddpm_unet(event_shape=(1, 8, 8), levels: int | None = 17, *, timesteps: int = 1000, schedule: str = "cosine",
              unet: dict | None = None, **kwargs) -> DDPM:
    """A DDPM on images (C, H, W) of ``levels`` levels with a :class:`UNet` (default
    :data:`DIGITS_UNET`; :data:`MNIST_UNET`, :data:`CIFAR_UNET` for full mode)."""
    unet = DIGITS_UNET if unet is None else unet
    return DDPM(UNet(event_shape[0], **unet), event_shape, make_schedule(schedule, timesteps), levels=levels, **kwargs)


# ============================================================================ flow matching
class GaussianMixtureVelocity(nn.Module):
    """The exact marginal velocity u_t(x) = E[x_1 − x_0 | x_t = x] of the straight path
    x_t = (1 − t) x_0 + t x_1, x_0 ~ N(0, I) (noise), x_1 ~ Σ_k π_k N(m_k, s_k² I) (data): no training.

    Given component k, (x_t, x_1 − x_0) is jointly Gaussian: x_t ~ N(t m_k, v_k I), v_k = (1 − t)² + t² s_k²,
    Cov(x_1 − x_0, x_t) = c_k I, c_k = t s_k² − (1 − t), so E[x_1 − x_0 | x_t, k] = m_k + c_k/v_k (x_t − t m_k),
    and u_t is its average under the posterior r_k(x_t) ∝ π_k N(x_t; t m_k, v_k I): the marginal field is a
    posterior-weighted average of conditional targets. Same arguments as :class:`GaussianMixtureDenoiser`.
    """

    def __init__(self, means, stds, weights):
        super().__init__()
        ref = GaussianMixtureDenoiser(means, stds, weights, linear_schedule(2))  # checks and stores the mixture
        for name in ("means", "stds", "weights"):
            self.register_buffer(name, getattr(ref, name))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, 1)  # (N, 1)
        v = (1 - t) ** 2 + t**2 * self.stds**2  # (N, K)
        c = t * self.stds**2 - (1 - t)
        diff = x[:, None, :] - t[:, :, None] * self.means[None]  # (N, K, d)
        log_r = self.weights.log() - 0.5 * (diff**2).sum(2) / v - 0.5 * x.shape[1] * (LOG_2PI + v.log())
        u_k = self.means[None] + (c / v)[:, :, None] * diff
        return (torch.softmax(log_r, 1)[:, :, None] * u_k).sum(1)


class FlowMatching(GenerativeModel):
    """Conditional flow matching with straight (optimal-transport) paths (Lipman et al. 2023; Liu et al. 2023).

    Noise at t = 0, data at t = 1: x_t = (1 − t) x_0 + t x_1, x_0 ~ N(0, I), x_1 ~ data, whose conditional
    velocity is the constant u = x_1 − x_0. The loss regresses a ``velocity`` network v_θ(x, t) (t ∈ [0, 1]
    real) on it, E_{t ~ U[0,1], x_0, x_1} ‖v_θ(x_t, t) − (x_1 − x_0)‖²; its gradient equals that of the
    marginal loss E ‖v_θ(x_t, t) − u_t(x_t)‖², u_t(x) = E[x_1 − x_0 | x_t = x], which one cannot compute.
    Sampling solves dx/dt = v_θ(x, t) from noise at t = 0 to t = 1 (Euler / midpoint / Heun / RK45);
    ``log_prob`` is the ODE's exact change of variables (exact divergence up to d = 16, else Hutchinson).
    ``levels``: data on 0..L−1, mapped to [−1, 1] as in :class:`DDPM` (``log_prob`` is then a density on
    the levels' scale, not a probability: :class:`DequantizedFlowMatching` bounds one); labels, guidance and
    ``average`` as in :class:`DDPM`.
    """

    def __init__(self, velocity: nn.Module, event_shape, *, levels: int | None = None, label_dropout: float = 0.1,
                 average: float = 0.0):
        support = constraints.real if levels is None else constraints.integer_interval(0, levels - 1)
        super().__init__(event_shape, support=support, **conditional_model(velocity, label_dropout))
        self.velocity, self.levels = velocity, levels
        self.num_classes, self.label_dropout = getattr(velocity, "num_classes", None), float(label_dropout)
        self.average = WeightAverage(velocity, average) if average else None
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    to_model_space, to_data_space = DDPM.to_model_space, DDPM.to_data_space

    def jitter(self, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The data as trained on: as they are (:class:`DequantizedFlowMatching` spreads them over their bins)."""
        return x1

    def v(self, x: torch.Tensor, t: torch.Tensor, context=None, guidance: float = 1.0) -> torch.Tensor:
        """v_θ(x, t), t (N,) real in [0, 1]; given labels, v_θ(x, t, y) under ``guidance`` (:func:`guided`)."""
        velocity = self.velocity if self.training or self.average is None else self.average.net

        def net(x, t, y):
            labels = () if y is None else (y,)
            return velocity(x.reshape(len(x), *self.event_shape), t.to(x.dtype), *labels).reshape(x.shape)

        return guided(net, x, t, context, guidance, self.num_classes)

    def cfm_loss(self, x: torch.Tensor, context=None, *, x0: torch.Tensor | None = None,
                 t: torch.Tensor | None = None) -> torch.Tensor:
        """E_{t, x_0} ‖v_θ((1 − t) x_0 + t x_1, t) − (x_1 − x_0)‖², x_1 = the data, one (t, x_0) per object
        (drawn, t ~ U[0, 1] and x_0 ~ N(0, I), unless given), mean over objects and dimensions."""
        x, y = self.check_input(x, context)
        x1, y = self.jitter(self.to_model_space(x)), drop_labels(y, self.label_dropout, self.num_classes)
        x0 = torch.randn_like(x1) if x0 is None else x0
        t = torch.rand(len(x1), dtype=x1.dtype, device=x1.device) if t is None else t
        tb = t.reshape(-1, *[1] * (x1.dim() - 1))
        xt = (1 - tb) * x0 + tb * x1
        return (self.v(xt, t, y) - (x1 - x0)).square().mean()

    def training_losses(self, x, context=None, *, step: int = 0):
        """The conditional flow-matching loss (:meth:`cfm_loss`), what :func:`~dgmlab.train.fit` minimises
        (``loss``, as for every model, is −log_prob's mean: here an ODE solve per batch)."""
        yield "model", self.cfm_loss(x, context)
        if self.average is not None:
            self.average.update(self.velocity)

    def log_prob(self, x: torch.Tensor, context=None, *, divergence: str = "auto", method: str = "heun",
                 steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5, generator=None) -> torch.Tensor:
        """log p_1(x) = log N(x(0); 0, I) − ∫_0^1 ∇·v_θ(x(t), t) dt along the ODE from x(1) = x back to t = 0,
        on ``steps`` fixed Heun steps (any device) or adaptively (``method='rk45'``, scipy, on the CPU);
        for levels data a density on the levels' scale, as :meth:`DDPM.ode_log_prob`."""
        x, y = self.check_input(x, context)
        ode = dict(divergence=divergence, method=method, steps=steps, rtol=rtol, atol=atol, generator=generator)
        return self.log_density(self.to_model_space(x), y, **ode)

    def log_density(self, x1: torch.Tensor, y=None, *, divergence: str = "auto", generator=None, **ode):
        """The ODE's log-density at the model-space points x1 (moved to the levels' scale for levels data)."""
        check_choice(divergence, "divergence", ["auto", "exact", "hutchinson"])
        d = x1[0].numel()
        exact = divergence == "exact" or (divergence == "auto" and d <= 16)
        v = None if exact else rademacher(x1.shape, x1, generator)
        log_p = ode_log_density(lambda x, t: self.v(x, t, y), x1, 1.0, 0.0, exact=exact, v=v, **ode)
        return log_p + (0.0 if self.levels is None else d * math.log(2 / (self.levels - 1)))

    def sample(self, n: int, context=None, *, steps: int = 20, method: str = "midpoint", rtol: float = 1e-5,
               atol: float = 1e-5, guidance: float = 1.0, return_nfe: bool = False):
        """``n`` objects: dx/dt = v_θ(x, t) from x(0) ~ N(0, I) to t = 1 on ``steps`` steps ('euler',
        'midpoint' (default), 'heun') or adaptively ('rk45'); labels under ``guidance`` as :meth:`DDPM.sample`.
        With ``return_nfe`` also the NFE."""
        y = self.check_sample_args(n, context)
        with torch.no_grad():
            x0 = torch.randn(n, *self.event_shape, dtype=self._anchor.dtype, device=self._anchor.device)
            x1, nfe = ode_solve(lambda x, t: self.v(x, t, y, guidance), x0, 0.0, 1.0, method=method, steps=steps, rtol=rtol, atol=atol)
        x1 = self.to_data_space(x1)
        return (x1, nfe) if return_nfe else x1


class DequantizedFlowMatching(FlowMatching):
    """Flow matching on levels data 0..L−1 trained on x_1 + u, u uniform on x_1's bin (width 2/(L − 1) in
    model space), so that its density bounds the probability of a level (Theis et al. 2016; Chapter 4):

        log P(x) = log ∫_bin p ≥ log (1/k) Σ_i p(x + u_i) + d log(2/(L − 1))   (in expectation over u_i),

    Jensen's bound for k = 1 and the importance-weighted one for k > 1, never looser as k grows.
    Sampling rounds to the nearest level, as :class:`FlowMatching` does.
    """

    log_prob_is_bound = True

    def __init__(self, velocity: nn.Module, event_shape, *, levels: int, **kwargs):
        if levels is None:
            raise ValueError("DequantizedFlowMatching spreads levels data over their bins: give levels.")
        super().__init__(velocity, event_shape, levels=levels, **kwargs)

    def jitter(self, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_1 + u, u uniform on x_1's bin [−1/(L − 1), 1/(L − 1)]^d."""
        u = torch.rand(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device) - 0.5
        return x1 + 2 * u / (self.levels - 1)

    def log_prob(self, x: torch.Tensor, context=None, *, k: int = 1, divergence: str = "auto", method: str = "heun",
                 steps: int = 100, rtol: float = 1e-5, atol: float = 1e-5, generator=None) -> torch.Tensor:
        """The bound above with k draws u_i per object (nats, shape (N,)); the ODE as :meth:`FlowMatching.log_prob`."""
        x, y = self.check_input(x, context)
        k, n = check_positive_int(k, "k"), len(x)
        x1 = self.jitter(self.to_model_space(x).repeat(k, *[1] * (x.dim() - 1)), generator)
        y = None if y is None else y.repeat(k)
        ode = dict(divergence=divergence, method=method, steps=steps, rtol=rtol, atol=atol, generator=generator)
        log_p = self.log_density(x1, y, **ode).reshape(k, n)
        return torch.logsumexp(log_p, 0) - math.log(k)


def flow_matching_unet(event_shape=(1, 8, 8), levels: int | None = 17, *, unet: dict | None = None,
                       num_classes: int | None = None, dequantize: bool = True, **kwargs) -> FlowMatching:
    """Flow matching on images (C, H, W) of ``levels`` levels with a :class:`UNet` as v_θ (time scaled by
    1000; default :data:`DIGITS_UNET`), a :class:`DequantizedFlowMatching` unless ``dequantize`` is False
    or ``levels`` None; ``num_classes`` for a class-conditional model."""
    unet = DIGITS_UNET if unet is None else unet
    net = UNet(event_shape[0], **unet, time_scale=1000.0, num_classes=num_classes)
    kind = DequantizedFlowMatching if dequantize and levels is not None else FlowMatching
    return kind(net, event_shape, levels=levels, **kwargs)


def flow_matching_mlp(dim: int = 2, *, hidden: int = 128, layers: int = 3, embed_dim: int = 32) -> FlowMatching:
    """Flow matching on real vectors (2-D toys) with an :class:`MLPDenoiser` as v_θ (time scaled by 1000)."""
    return FlowMatching(MLPDenoiser(dim, hidden, layers, embed_dim, time_scale=1000.0), (dim,))
