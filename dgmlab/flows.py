"""Normalizing flows (Chapter 4).

A flow is an invertible map f between data x and noise z = f(x), with a simple
base density p(z). The change of variables gives the model's exact density,

    log p(x) = log p(z) + log |det ∂f/∂x|,        z = f(x),

and sampling runs the map backwards: z ~ p(z), x = f⁻¹(z).

Every :class:`Transform` here maps in the *normalizing* direction (data →
noise) and returns ``(output, log_abs_det)`` from both ``forward`` and
``inverse``, the log-determinant being that of the map just applied, shape
(N,). Composing transforms adds their log-determinants (:class:`Compose`).
A :class:`Flow` is a base distribution plus a transform, with the course's
model API.

Discrete data live on integer levels y, and level y always owns the bin
[y, y + 1): dequantization adds u ∈ [0, 1), samples are ⌊x⌋, and the
CDF-discretised logistic gives P(y) = F(y + 1) − F(y).

Transforms: :class:`Planar`, :class:`AffineCoupling` (vector, checkerboard
and channel masks), :class:`Squeeze`, :class:`ActNorm`,
:class:`Invertible1x1Conv`, :class:`MAF` and :class:`IAF` (on MADE's masked
network), the elementwise :class:`Logit` and :class:`Scale`,
and :class:`MultiScale` (RealNVP/Glow-style factoring out). For discrete data:
:class:`UniformDequantization`, :class:`VariationalDequantization` and the
CDF-discretised :class:`DiscretizedLogistic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .autoregressive import MaskedMLP
from .base import GenerativeModel, constraints
from .validate import check_positive_int, check_tensor, validation_enabled

__all__ = [
    "Transform", "Compose", "InverseTransform", "Flow",
    "Planar", "AffineCoupling", "coupling_mlp", "coupling_cnn", "checkerboard_mask", "channel_mask",
    "alternating_mask", "Squeeze", "ActNorm", "Invertible1x1Conv", "MAF", "IAF",
    "Logit", "Scale", "MultiScale", "glow_step",
    "UniformDequantization", "VariationalDequantization", "dequantization_noise", "DiscretizedLogistic",
    "realnvp_2d", "maf_flow", "realnvp_image", "planar_flow",
    "DIGITS_MAF", "DIGITS_REALNVP", "DIGITS_NOISE", "DIGITS_FLOW_TRAINING",
]

LOG_2PI = math.log(2 * math.pi)

# Settings for the 17-level digits, chosen on the validation images: RealNVP's are shared
# by the lecture notebook and the benchmark (python -m dgmlab.bench flows), MAF's are the
# benchmark's. Dropout in the MADE networks is what keeps the MAF from memorising 1,199 images.
DIGITS_MAF = dict(layers=5, hidden=(128,), dropout=0.2)
DIGITS_REALNVP = dict(scales=2, steps=4, hidden=32)
DIGITS_NOISE = dict(layers=4, hidden=64)
DIGITS_FLOW_TRAINING = dict(batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=1e-2)


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum every dimension but the batch: (N, ...) → (N,)."""
    return t.reshape(len(t), -1).sum(1)


# ================================================================= the interface
class Transform(nn.Module):
    """An invertible map in the normalizing direction (data → noise), with log-determinants.

    ``forward(x, context)`` returns ``(z, log|det ∂z/∂x|)`` and
    ``inverse(z, context)`` returns ``(x, log|det ∂x/∂z|)``; both
    log-determinants have shape (N,) and are each other's negatives at
    matching points. ``context`` is an optional condition (conditional flows).
    """

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        raise NotImplementedError


class Compose(Transform):
    """Apply transforms one after another; their log-determinants add."""

    def __init__(self, transforms: Sequence[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x, context=None):
        total = x.new_zeros(len(x))
        for t in self.transforms:
            x, log_det = t(x, context)
            total = total + log_det
        return x, total

    def inverse(self, z, context=None):
        total = z.new_zeros(len(z))
        for t in reversed(self.transforms):
            z, log_det = t.inverse(z, context)
            total = total + log_det
        return z, total

    def __len__(self) -> int:
        return len(self.transforms)


class InverseTransform(Transform):
    """Swap a transform's directions (e.g. to use a flow built for sampling as a normalizing one)."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.base = transform

    def forward(self, x, context=None):
        return self.base.inverse(x, context)

    def inverse(self, z, context=None):
        return self.base(z, context)


class Flow(GenerativeModel):
    """A normalizing flow: ``transform`` maps data to noise, whose density is standard normal.

    ``event_shape`` is the shape of one object. ``log_prob(x)`` is exact, and
    sampling is differentiable (``rsample``); with ``context_dim`` the flow is
    conditional on a vector of that size, and every method takes ``context``.
    """

    has_rsample = True

    def __init__(self, transform: Transform, event_shape, *, context_dim: int = 0):
        super().__init__(event_shape, context_shape=(context_dim,) if context_dim else None)
        self.transform = transform
        self.context_dim = context_dim

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I), summed per object: (N,)."""
        return _flat_sum(-0.5 * z**2) - 0.5 * self.event_size * LOG_2PI

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) = log p(z) + log|det ∂z/∂x|, exact, in nats: shape (N,)."""
        return self._log_prob(*self.check_input(x, context))

    def _log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        z, log_det = self.transform(x, context)
        return self.base_log_prob(z) + log_det

    def rsample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """x = f⁻¹(z) for z ~ N(0, I): shape (n, *event_shape), differentiable in the parameters."""
        return self.rsample_and_log_prob(n, context)[0]

    def rsample_and_log_prob(self, n: int, context: torch.Tensor | None = None):
        """Samples and their exact log-density in one go (what reverse-KL training needs).

        log q(x) = log p(z) − log|det ∂x/∂z|: no inverse pass is needed.
        """
        context = self.check_sample_args(n, context)
        z = torch.randn(n, *self.event_shape, device=self.device, dtype=self.dtype)
        x, log_det = self.transform.inverse(z, context)
        return x, self.base_log_prob(z) - log_det


# ================================================================= planar flows
class Planar(Transform):
    """A planar flow z ↦ z + û·tanh(wᵀz + b) (Rezende & Mohamed, 2015), on vectors (N, D).

    Planar layers are made for sampling: ``forward`` is the map in the
    sampling direction (noise → data) and :func:`planar_flow` wraps the stack
    in :class:`InverseTransform`, so that the flow's normalizing direction
    (data → noise) is the numerical inverse.

    Invertible whenever wᵀû ≥ −1; the raw parameter u is mapped to
    û = u + (m(wᵀu) − wᵀu)·w/‖w‖² with m(a) = −1 + softplus(a), which
    guarantees it. log|det| = log|1 + ûᵀψ|, ψ = tanh'(wᵀz + b)·w (the matrix
    determinant lemma). The inverse solves a scalar equation for wᵀz by
    bisection (it is monotone), to float64 precision, and is differentiable.
    ``constrain=False`` uses u as it is, and may not be invertible.
    """

    def __init__(self, dim: int, *, constrain: bool = True, init_scale: float = 0.1):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.w = nn.Parameter(torch.randn(dim) * init_scale)
        self.u = nn.Parameter(torch.randn(dim) * init_scale)
        self.b = nn.Parameter(torch.zeros(1))
        self.constrain = constrain

    @property
    def u_hat(self) -> torch.Tensor:
        if not self.constrain:
            return self.u
        wu = self.w @ self.u
        w_norm2 = (self.w @ self.w).clamp_min(1e-12)
        return self.u + (-1 + F.softplus(wu) - wu) * self.w / w_norm2

    def forward(self, z, context=None):
        z = check_tensor(z, "z", shape=(None, self.dim), kind="float")
        u = self.u_hat
        a = z @ self.w + self.b  # (N,)
        x = z + u * torch.tanh(a)[:, None]
        psi_u = (1 - torch.tanh(a) ** 2) * (self.w @ u)  # ûᵀψ
        return x, torch.log((1 + psi_u).abs().clamp_min(1e-12))

    def inverse(self, x, context=None):
        x = check_tensor(x, "x", shape=(None, self.dim), kind="float")
        with torch.no_grad():  # bisection for the value; the gradients come from the Newton step below
            u = self.u_hat.double()
            w, b = self.w.double(), self.b.double()
            wu = w @ u
            if not self.constrain and validation_enabled() and wu < -1:
                raise ValueError("this planar flow is not invertible (wᵀû < −1): build it with constrain=True.")
            # wᵀz = α solves α + wᵀû·tanh(α + b) = wᵀx: monotone in α, bracketed within |wᵀû| of wᵀx
            target = x.double() @ w
            lo, hi = target - wu.abs() - 1, target + wu.abs() + 1
            for _ in range(100):
                mid = (lo + hi) / 2
                too_big = mid + wu * torch.tanh(mid + b) > target
                hi, lo = torch.where(too_big, mid, hi), torch.where(too_big, lo, mid)
            alpha = (lo + hi) / 2
        # One Newton step with the live parameters and x: it leaves the value where bisection
        # put it but gives α the right gradients (the implicit function theorem), for both
        # x and the parameters, so log_prob of a planar flow can be trained through.
        u, w, b, xd = self.u_hat.double(), self.w.double(), self.b.double(), x.double()
        wu = w @ u
        g = alpha + wu * torch.tanh(alpha + b) - xd @ w
        alpha = alpha - g / (1 + wu * (1 - torch.tanh(alpha + b) ** 2))
        z = (xd - u * torch.tanh(alpha + b)[:, None]).to(x.dtype)
        _, log_det = self.forward(z)
        return z, -log_det


# ================================================================= coupling layers
def alternating_mask(dim: int, parity: int = 0) -> torch.Tensor:
    """A vector mask (dim,) that keeps every other coordinate (parity 0: even ones)."""
    return (torch.arange(dim) % 2 == parity)


def checkerboard_mask(height: int, width: int, parity: int = 0) -> torch.Tensor:
    """A (1, H, W) checkerboard mask: True where (row + column) % 2 == parity."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((i + j) % 2 == parity)[None]


def channel_mask(channels: int, height: int, width: int, parity: int = 0) -> torch.Tensor:
    """A (C, H, W) mask that keeps the first half of the channels (parity 0) or the second."""
    keep = torch.arange(channels) < channels // 2
    return (keep if parity == 0 else ~keep)[:, None, None].expand(channels, height, width).clone()


class _ZeroLast(nn.Sequential):
    """A network whose last layer starts at zero: the coupling it drives starts as the identity."""

    def __init__(self, *layers):
        super().__init__(*layers)
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)


def coupling_mlp(dim: int, hidden: int = 64, context_dim: int = 0) -> nn.Module:
    """An MLP for vector couplings: (N, dim + context_dim) → (N, 2·dim) shifts and log-scales."""
    return _ZeroLast(nn.Linear(dim + context_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                     nn.Linear(hidden, 2 * dim))


def coupling_cnn(channels: int, hidden: int = 64, context_channels: int = 0) -> nn.Module:
    """A small CNN for image couplings: (N, C + context, H, W) → (N, 2C, H, W)."""
    return _ZeroLast(nn.Conv2d(channels + context_channels, hidden, 3, padding=1), nn.ReLU(),
                     nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                     nn.Conv2d(hidden, 2 * channels, 3, padding=1))


class AffineCoupling(Transform):
    """Affine coupling (RealNVP): keep the masked part, shift and scale the rest given it.

    z = m⊙x + (1 − m)⊙(x·e^{s} + t), with (s, t) = net(m⊙x [, context]).
    The Jacobian is triangular, so log|det| = Σ (1 − m)·s; the inverse is exact:
    x = m⊙z + (1 − m)⊙(z − t)·e^{−s}. ``mask`` has the event shape (True =
    kept); ``net`` maps the masked input (with the context concatenated along
    the feature/channel axis) to twice as many features: [s, t]. The log-scale
    is bounded by ``scale_bound``·tanh for stability.
    """

    def __init__(self, mask: torch.Tensor, net: nn.Module, *, scale_bound: float = 3.0):
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.net = net
        self.scale_bound = scale_bound

    def _shift_scale(self, kept: torch.Tensor, context):
        inp = kept if context is None else torch.cat([kept, context], dim=1)
        s, t = self.net(inp).chunk(2, dim=1)
        s = self.scale_bound * torch.tanh(s / self.scale_bound)  # |s| < bound
        free = 1 - self.mask
        return s * free, t * free

    def _check(self, x, name):
        x = check_tensor(x, name, kind="float")
        if tuple(x.shape[1:]) != tuple(self.mask.shape):
            raise ValueError(f"{name} should have shape (N, {', '.join(map(str, self.mask.shape))}) to match "
                             f"the coupling's mask, got {tuple(x.shape)}.")
        return x

    def forward(self, x, context=None):
        x = self._check(x, "x")
        s, t = self._shift_scale(x * self.mask, context)
        # s and t vanish on the kept part, where z = x
        return x * torch.exp(s) + t, _flat_sum(s)

    def inverse(self, z, context=None):
        z = self._check(z, "z")
        s, t = self._shift_scale(z * self.mask, context)
        return (z - t) * torch.exp(-s), -_flat_sum(s)


# ================================================================= image building blocks
class Squeeze(Transform):
    """(C, H, W) → (4C, H/2, W/2): each 2×2 block of pixels becomes 4 channels. Volume-preserving."""

    def forward(self, x, context=None):
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"squeezing needs an even height and width, got {h}×{w}.")
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, 4 * c, h // 2, w // 2), x.new_zeros(n)

    def inverse(self, z, context=None):
        n, c, h, w = z.shape
        if c % 4:
            raise ValueError(f"unsqueezing needs a multiple of 4 channels, got {c}.")
        z = z.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(n, c // 4, 2 * h, 2 * w), z.new_zeros(n)


class ActNorm(Transform):
    """Per-channel affine normalisation (Glow): z = (x + bias)·e^{log_scale}.

    The first batch it sees in training sets bias and scale so that each
    channel of that batch has mean 0 and variance 1 (data-dependent
    initialisation); after that they are ordinary parameters.
    log|det| = (number of positions per channel) · Σ log_scale.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, t, x):
        return t.reshape(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x, context=None):
        if x.shape[1] != len(self.bias):
            raise ValueError(f"ActNorm was built for {len(self.bias)} channels, got {x.shape[1]}.")
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                self.bias.copy_(-x.mean(dims))
                self.log_scale.copy_(-torch.log(x.std(dims).clamp_min(1e-6)))
                self.initialized.fill_(True)
        positions = x[0, 0].numel()  # pixels per channel (1 for vectors)
        z = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        return z, x.new_ones(len(x)) * positions * self.log_scale.sum()

    def inverse(self, z, context=None):
        positions = z[0, 0].numel()
        x = z * torch.exp(-self._view(self.log_scale, z)) - self._view(self.bias, z)
        return x, -z.new_ones(len(z)) * positions * self.log_scale.sum()


class Invertible1x1Conv(Transform):
    """A learned invertible mixing of channels (Glow): z = W·x at every pixel.

    W starts as a random rotation; log|det| = H·W·log|det W|.
    """

    def __init__(self, channels: int, seed: int = 0):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed)))
        self.weight = nn.Parameter(q)

    def forward(self, x, context=None):
        if x.shape[1] != len(self.weight):
            raise ValueError(f"this 1×1 convolution mixes {len(self.weight)} channels, got {x.shape[1]}.")
        z = torch.einsum("ij,nj...->ni...", self.weight, x)
        return z, x.new_ones(len(x)) * x[0, 0].numel() * torch.linalg.slogdet(self.weight)[1]

    def inverse(self, z, context=None):
        x = torch.einsum("ij,nj...->ni...", torch.linalg.inv(self.weight), z)
        return x, -z.new_ones(len(z)) * z[0, 0].numel() * torch.linalg.slogdet(self.weight)[1]


# ================================================================= autoregressive flows
class _AutoregressiveAffine(Transform):
    """Shared by MAF and IAF: a MADE network gives a shift μ_j and log-scale α_j for every dimension j."""

    def __init__(self, dim: int, hidden: Sequence[int] = (128,), *, reverse: bool = False, context_dim: int = 0,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        order = torch.arange(dim - 1, -1, -1) if reverse else torch.arange(dim)
        self.net = MaskedMLP(dim, hidden, out_per_dim=2, order=order, context_dim=context_dim, dropout=dropout,
                             seed=seed)
        nn.init.zeros_(self.net.out.weight)  # start as the identity
        nn.init.zeros_(self.net.out.bias)
        if self.net.direct is not None:
            nn.init.zeros_(self.net.direct.weight)
        self.dim = dim
        self.sequence = self.net.ordering(0).argsort().tolist()  # dimensions in order

    def _params(self, h, context):
        out = self.net(h, context).reshape(len(h), self.dim, 2)
        return out[..., 0], 3.0 * torch.tanh(out[..., 1] / 3.0)  # μ, bounded log-scale α

    def _check(self, x, name):
        return check_tensor(x, name, shape=(None, self.dim), kind="float")


class MAF(_AutoregressiveAffine):
    """Masked autoregressive flow layer (Papamakarios et al., 2017).

    Density direction, one pass: z_j = (x_j − μ_j(x_<j))·e^{−α_j(x_<j)}.
    Sampling direction, D passes: x_j = z_j·e^{α_j} + μ_j, one dimension at a time.
    """

    def forward(self, x, context=None):
        x = self._check(x, "x")
        mu, alpha = self._params(x, context)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(1)

    def inverse(self, z, context=None):
        z = self._check(z, "z")
        x, log_det = torch.zeros_like(z), z.new_zeros(len(z))
        for j in self.sequence:  # x_j needs x_<j: one pass per dimension
            mu, alpha = self._params(x, context)
            x = x.clone()
            x[:, j] = z[:, j] * torch.exp(alpha[:, j]) + mu[:, j]
            log_det = log_det + alpha[:, j]  # the α_j that produced x_j
        return x, log_det


class IAF(_AutoregressiveAffine):
    """Inverse autoregressive flow layer (Kingma et al., 2016): MAF's network used the other way round.

    Sampling direction, one pass: x_j = z_j·e^{α_j(z_<j)} + μ_j(z_<j).
    Density direction, D passes: z_j = (x_j − μ_j)·e^{−α_j}, one dimension at a time.
    """

    def forward(self, x, context=None):
        x = self._check(x, "x")
        z, log_det = torch.zeros_like(x), x.new_zeros(len(x))
        for j in self.sequence:  # z_j needs z_<j: one pass per dimension
            mu, alpha = self._params(z, context)
            z = z.clone()
            z[:, j] = (x[:, j] - mu[:, j]) * torch.exp(-alpha[:, j])
            log_det = log_det - alpha[:, j]  # the α_j that produced z_j
        return z, log_det

    def inverse(self, z, context=None):
        z = self._check(z, "z")
        mu, alpha = self._params(z, context)
        return z * torch.exp(alpha) + mu, alpha.sum(1)


# ================================================================= elementwise maps
class Scale(Transform):
    """Multiply by a constant: z = c·x, log|det| = D·log c."""

    def __init__(self, factor: float):
        super().__init__()
        if factor <= 0:
            raise ValueError(f"factor should be positive, got {factor}.")
        self.factor = float(factor)

    def forward(self, x, context=None):
        return x * self.factor, x.new_full((len(x),), x[0].numel() * math.log(self.factor))

    def inverse(self, z, context=None):
        return z / self.factor, z.new_full((len(z),), -z[0].numel() * math.log(self.factor))


class Logit(Transform):
    """From (0, 1) to the real line: z = logit(α + (1 − 2α)·x) (RealNVP's preprocessing).

    ``alpha`` keeps values away from 0 and 1, where the logit explodes.
    log|det| = Σ [log(1 − 2α) − log s − log(1 − s)], s = α + (1 − 2α)x.
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha should be in [0, 0.5), got {alpha}.")
        self.alpha = float(alpha)

    def forward(self, x, context=None):
        s = self.alpha + (1 - 2 * self.alpha) * x
        if validation_enabled() and ((s <= 0) | (s >= 1)).any():
            raise ValueError(f"Logit expects values in [0, 1] (in (0, 1) when alpha = 0), got values in "
                             f"[{x.min().item():.4g}, {x.max().item():.4g}]. Scale the data first, "
                             "e.g. with Scale(1 / levels) for dequantized levels.")
        log_det = math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)
        return torch.log(s) - torch.log1p(-s), _flat_sum(log_det)

    def inverse(self, z, context=None):
        s = torch.sigmoid(z)  # in (0, 1) for every real z
        x = (s - self.alpha) / (1 - 2 * self.alpha)
        log_det = (-math.log(1 - 2 * self.alpha)
                   + F.logsigmoid(z) + F.logsigmoid(-z))
        return x, _flat_sum(log_det)


# ================================================================= multi-scale
def glow_step(channels: int, hidden: int, parity: int, height: int,
              width: int) -> Transform:
    """One Glow step: ActNorm, an invertible 1×1 convolution, an affine coupling on half the channels."""
    mask = channel_mask(channels, height, width, parity % 2)  # which half is kept
    return Compose([ActNorm(channels),
                    Invertible1x1Conv(channels, seed=parity),
                    AffineCoupling(mask, coupling_cnn(channels, hidden))])


class MultiScale(Transform):
    """A RealNVP/Glow-style multi-scale flow on images (C, H, W), output flattened to (N, C·H·W).

    At each of ``levels`` scales: squeeze, ``steps`` Glow steps, then (except at
    the last scale) half of the channels are *factored out*: they go straight to
    the output, and only the other half is processed further. Coarse structure
    is then modelled by deep layers, fine detail by shallow ones, at a fraction
    of the cost. Needs H and W divisible by 2^levels.
    """

    def __init__(self, image_shape, *, levels: int = 2, steps: int = 4, hidden: int = 64):
        super().__init__()
        c, h, w = (int(s) for s in image_shape)
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"a {levels}-level multi-scale flow needs H and W divisible by {2**levels}, "
                             f"got {h}×{w}.")
        self.image_shape = (c, h, w)
        self.squeeze = Squeeze()
        self.blocks = nn.ModuleList()
        self.shapes = []  # shape entering each level's steps, after the squeeze
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.shapes.append((c, h, w))
            self.blocks.append(Compose([glow_step(c, hidden, k, h, w) for k in range(steps)]))
            if level < levels - 1:
                c = c // 2  # half of the channels leave here

    def forward(self, x, context=None):
        if tuple(x.shape[1:]) != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(f"x should have shape (N, {shape}), "
                             f"got {tuple(x.shape)}.")
        outputs, total = [], x.new_zeros(len(x))
        h = x
        for level, block in enumerate(self.blocks):
            h, _ = self.squeeze(h)  # (C, H, W) → (4C, H/2, W/2)
            h, log_det = block(h)  # the Glow steps of this scale
            total = total + log_det
            if level < len(self.blocks) - 1:
                out, h = h.chunk(2, dim=1)  # factor out half the channels
                outputs.append(out.reshape(len(x), -1))
        outputs.append(h.reshape(len(x), -1))
        return torch.cat(outputs, dim=1), total

    def inverse(self, z, context=None):
        n = len(z)
        z = z.reshape(n, -1)  # noise may come image-shaped or flat
        sizes = []
        for level, (c, h, w) in enumerate(self.shapes):
            sizes.append((c // 2 if level < len(self.shapes) - 1 else c) * h * w)
        pieces = list(z.split(sizes, dim=1))
        total = z.new_zeros(n)
        c, h, w = self.shapes[-1]
        x = pieces[-1].reshape(n, c, h, w)
        for level in range(len(self.blocks) - 1, -1, -1):
            c, h, w = self.shapes[level]
            if level < len(self.blocks) - 1:
                x = torch.cat([pieces[level].reshape(n, c // 2, h, w), x], dim=1)
            x, log_det = self.blocks[level].inverse(x)
            total = total + log_det
            x, _ = self.squeeze.inverse(x)
        return x, total


# ================================================================= discrete data
class UniformDequantization(GenerativeModel):
    """A continuous flow on discrete data y ∈ {0..K−1}^D, through uniform noise.

    log P(y) = log ∫ p(y + u) du ≥ E_{u ~ U[0,1)^D} log p(y + u) (Jensen): the
    returned ``log_prob`` is a one-sample estimate of that lower bound, in nats,
    for the discrete y (bins have volume 1). With ``k`` noise draws per object,
    log (1/k) Σ_i p(y + u_i) is a tighter bound (importance weighting: it
    never falls in expectation as k grows, and reaches log P(y) as k → ∞).
    Samples are ⌊x⌋ for x from the flow.
    """

    log_prob_is_bound = True

    def __init__(self, flow: Flow, levels: int):
        self.levels = check_positive_int(levels, "levels")
        super().__init__(flow.event_shape, support=constraints.integer_interval(0, levels - 1))
        self.flow = flow

    def log_prob(self, y: torch.Tensor, context=None, *, k: int = 1) -> torch.Tensor:
        """log (1/k) Σ_i p(y + u_i) / q(u_i | y), u_i ~ q: a lower bound on log P(y), shape (N,)."""
        y, _ = self.check_input(y, context)
        k = check_positive_int(k, "k")
        log_w = self._log_weights(y.repeat(k, *[1] * (y.dim() - 1))).reshape(k, len(y))
        return torch.logsumexp(log_w, 0) - math.log(k)

    def _log_weights(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y + u) − log q(u | y) for one draw u ~ q per row; q uniform: log q = 0."""
        u = torch.rand(y.shape, device=y.device, dtype=self.flow.dtype)
        return self.flow._log_prob(y.to(u.dtype) + u)  # y + u in [y, y + 1)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        return self.flow.sample(n).floor().clamp(0, self.levels - 1).long()


class VariationalDequantization(UniformDequantization):
    """Dequantize with a learned noise distribution q(u | y) (Flow++): a tighter bound.

    log P(y) ≥ E_{u ~ q(u|y)}[log p(y + u) − log q(u | y)]; with q uniform this
    is :class:`UniformDequantization`'s bound, and the best q (proportional to p
    on each bin) makes it exact. ``noise`` is a conditional :class:`Flow` on
    (0, 1)^D whose context is the data y scaled to [−1, 1], flattened.
    """

    def __init__(self, flow: Flow, noise: Flow, levels: int):
        super().__init__(flow, levels)
        self.noise = noise

    def _log_weights(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y + u) − log q(u | y) for one draw u ~ q(u | y) per row."""
        context = 2 * y.to(self.dtype) / (self.levels - 1) - 1  # y in [−1, 1]
        context = context.reshape(len(y), -1)
        u, log_q = self.noise.rsample_and_log_prob(len(y), context)
        x = y.to(u.dtype) + u.reshape(y.shape)  # in the bin [y, y + 1)
        return self.flow._log_prob(x) - log_q


def dequantization_noise(dim: int, *, layers: int = 4,
                         hidden: int = 64) -> Flow:
    """A conditional flow on (0, 1)^dim given a context of dim values: q(u | y) for variational dequantization."""
    transforms: list[Transform] = [Logit(0.0)]  # u in (0, 1) ↔ the real line
    for k in range(layers):
        mask = alternating_mask(dim, k % 2)
        net = coupling_mlp(dim, hidden, context_dim=dim)
        transforms.append(AffineCoupling(mask, net))
    return Flow(Compose(transforms), dim, context_dim=dim)


class DiscretizedLogistic(GenerativeModel):
    """Independent discretised logistics on K levels: P(y) = F(y + 1) − F(y), F the logistic CDF.

    Level y owns the bin [y, y + 1), the same bins as dequantization (y + u,
    u ∈ [0, 1)), so P(y) = ∫_y^{y+1} p(x) dx is the discrete model a
    dequantized density defines. The first and last levels take the tails
    (F(0) is replaced by 0 and F(K) by 1), so the K probabilities of every
    dimension sum to one exactly: a continuous density turned into a discrete
    distribution through its CDF.
    """

    def __init__(self, event_shape, levels: int):
        self.levels = check_positive_int(levels, "levels")
        super().__init__(event_shape, support=constraints.integer_interval(0, levels - 1))
        self.loc = nn.Parameter(torch.full(self.event_shape, levels / 2))
        self.log_scale = nn.Parameter(torch.full(self.event_shape, math.log(levels / 4)))

    def cdf(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((v - self.loc) / self.log_scale.exp())

    def probs(self, y: torch.Tensor) -> torch.Tensor:
        """P(y) per dimension, shape ``(N, *event_shape)``."""
        return self._probs(self.check_input(y)[0])

    def _probs(self, y: torch.Tensor) -> torch.Tensor:
        y = y.to(self.dtype)
        top, bottom = y >= self.levels - 1, y <= 0  # the end bins take the tails
        upper = torch.where(top, torch.ones_like(y), self.cdf(y + 1))
        lower = torch.where(bottom, torch.zeros_like(y), self.cdf(y))
        return (upper - lower).clamp_min(1e-12)

    def log_prob(self, y: torch.Tensor, context=None) -> torch.Tensor:
        y, _ = self.check_input(y, context)
        return _flat_sum(torch.log(self._probs(y)))

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        u = torch.rand(n, *self.event_shape, device=self.device, dtype=self.dtype).clamp(1e-6, 1 - 1e-6)
        v = self.loc + self.log_scale.exp() * (torch.log(u) - torch.log1p(-u))
        return v.floor().clamp(0, self.levels - 1).long()  # v in [y, y + 1) → y


# ================================================================= ready-made flows
def realnvp_2d(layers: int = 8, hidden: int = 64) -> Flow:
    """RealNVP for 2-D points: affine couplings alternating which coordinate they keep."""
    return Flow(Compose([AffineCoupling(alternating_mask(2, k % 2), coupling_mlp(2, hidden))
                         for k in range(layers)]), 2)


def maf_flow(dim: int, *, layers: int = 5, hidden: Sequence[int] = (128,), levels: int | None = None,
             dropout: float = 0.0) -> Flow:
    """A MAF over ``dim`` dimensions, alternating natural and reversed orders.

    With ``levels`` the data are dequantized levels in [0, levels)^dim: they are
    first scaled to (0, 1) and mapped to the real line by :class:`Logit`, and the
    log-determinants of both steps are part of the density, which therefore
    stays a density over the original units (bins of volume 1).
    """
    transforms: list[Transform] = []
    if levels is not None:
        transforms += [Scale(1.0 / levels), Logit(0.05)]
    transforms += [MAF(dim, hidden, reverse=bool(k % 2), dropout=dropout, seed=k) for k in range(layers)]
    return Flow(Compose(transforms), dim)


def realnvp_image(image_shape, *, levels: int, scales: int = 2, steps: int = 4, hidden: int = 64) -> Flow:
    """A multi-scale RealNVP/Glow flow for images of dequantized ``levels`` (values in [0, levels)).

    Scale to (0, 1), :class:`Logit`, then :class:`MultiScale`; the density is
    over the original units, so it bounds the discrete likelihood directly.
    """
    transform = Compose([Scale(1.0 / levels), Logit(0.05),
                         MultiScale(image_shape, levels=scales, steps=steps, hidden=hidden)])
    return Flow(transform, tuple(image_shape))


def planar_flow(dim: int = 2, layers: int = 16) -> Flow:
    """A stack of planar flows built for sampling: z ~ N(0, I) is pushed through ``layers`` planar maps.

    Sampling and the density of the samples (``rsample_and_log_prob``) are
    cheap, which is what reverse-KL fitting needs; ``log_prob`` of an arbitrary
    point inverts every planar map numerically.
    """
    return Flow(InverseTransform(Compose([Planar(dim) for _ in range(layers)])), dim)
