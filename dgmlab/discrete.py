"""Discrete latents (Chapter 6): vector quantisation, the VQ-VAE, Gumbel-softmax and the dVAE.

**Vector quantisation** (van den Oord et al. 2017). An encoder maps x to a grid
of vectors z_e(x) (one per position j); each is replaced by its nearest entry
of a codebook e_1..e_K,

    k_j = argmin_k ‖z_e,j − e_k‖²,     z_q,j = e_{k_j},

k-means inside a network. The decoder sees z_q. The argmin has no gradient, so
the VQ-VAE trains on

    L = −log p(x | z_q) + ‖sg[z_e] − e‖² + β ‖z_e − sg[e]‖²,

sg = stop-gradient (``.detach()``): the *codebook* term moves only the codes
towards the encoder outputs, the *commitment* term only the encoder towards
its codes, and the reconstruction reaches the encoder through the
*straight-through* estimator z_q = z_e + sg[e − z_e] (forward: e; backward:
the identity), which hands ∂L/∂z_q to z_e unchanged (C27).

**Codebook collapse.** Codes that no encoder output is near get no gradient and
stay unused. Two fixes: the codebook as exponential moving averages of the
vectors assigned to each code (``ema=True``), and *dead-code restarts*
(``restart=T``): a code unused for T training batches in a row is moved onto a
random encoder output of the current batch. Usage is measured over a whole
epoch (:class:`CodeUsage`, :func:`code_usage`): per batch it depends on the
batch size.

**A prior over codes.** With a deterministic one-hot posterior q(z | x) = 1[z = z*(x)],
the ELBO is log p(x | z*) + log p(z*) (no entropy term), a lower bound on
log p(x) = log Σ_z p(x | z) p(z): one term of the sum (``log_prob(x, k)`` sums k of
them, a tighter bound). The prior over the code grid is any autoregressive model of integer
grids (Chapter 3's PixelCNN, a Transformer), trained on the codes of the data
after the VQ-VAE (:func:`fit_prior`); conditioned on a class, it makes
"text-to-image" generation in miniature.

**Gumbel** (Gumbel 1954; Jang et al. 2017; Maddison et al. 2017). With
G_k = −log(−log U_k), U_k ~ U(0, 1), argmax_k(log π_k + G_k) ~ Categorical(π)
exactly (:func:`gumbel_max`, C25); softmax((log π + G)/τ) is a differentiable
relaxation that tends to a one-hot sample as τ → 0 and to uniform as τ → ∞
(:func:`gumbel_softmax`, C26). The :class:`DVAE` trains categorical latents
with it against a uniform prior, annealing τ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Categorical, Distribution, Independent

from .base import GenerativeModel, constraints
from .validate import check_positive_int, check_tensor
from .vae import ELBO

__all__ = [
    "gumbel_noise", "gumbel_max", "gumbel_softmax",
    "Quantized", "VectorQuantizer", "CodeUsage", "code_usage", "UsageTracker",
    "ResidualBlock", "ConvEncoder", "ConvDecoder", "UniformCodes", "ClassMarginal",
    "VQVAETerms", "VQBound", "VQVAE", "fit_prior", "term_gradients", "DVAE",
    "DIGITS_VQVAE", "DIGITS_VQVAE_COLLAPSE", "DIGITS_VQVAE_TRAINING", "DIGITS_VQVAE_EPOCHS",
    "DIGITS_PIXELCNN_PRIOR", "DIGITS_PIXELCNN_PRIOR_TRAINING", "DIGITS_PIXELCNN_PRIOR_EPOCHS",
    "DIGITS_TRANSFORMER_PRIOR", "DIGITS_TRANSFORMER_PRIOR_TRAINING", "DIGITS_TRANSFORMER_PRIOR_EPOCHS",
    "DIGITS_DVAE", "DIGITS_DVAE_TRAINING", "DIGITS_DVAE_EPOCHS",
    "MNIST_VQVAE", "MNIST_VQVAE_TRAINING", "CIFAR_VQVAE", "CIFAR_VQVAE_TRAINING",
]

# Settings for the 17-level digits (1 × 8 × 8 → a 4 × 4 grid of codes), chosen on the validation
# images; each model is trained by fit(..., max_seconds=60) with a cosine schedule over its ``*_EPOCHS``
# (about 0.55 s per epoch on one CPU thread for the VQ-VAE and the dVAE). K = 32 codes: K = 16 gives a
# similar bound but blurrier reconstructions, K = 64 a worse bound (its prior has more to learn).
DIGITS_VQVAE = dict(num_codes=32, code_dim=16, hidden=64, downsample=1, residual_blocks=1, beta=0.25,
                    ema=True, decay=0.99, restart=20)
DIGITS_VQVAE_COLLAPSE = {**DIGITS_VQVAE, "ema": False, "restart": 0}  # no fix: the lecture's collapse
DIGITS_VQVAE_TRAINING = dict(batch_size=64, lr=2e-3)
DIGITS_VQVAE_EPOCHS = 80
# priors over the 4 × 4 codes, class-conditional (num_classes=10): Chapter 3's PixelCNN with K levels
# (it overfits after about 20 epochs) and the Transformer (token embeddings, dropout)
DIGITS_PIXELCNN_PRIOR = dict(channels=64, layers=4, kernel=3, first_kernel=3)
DIGITS_PIXELCNN_PRIOR_TRAINING = dict(batch_size=64, lr=2e-3)
DIGITS_PIXELCNN_PRIOR_EPOCHS = 20
DIGITS_TRANSFORMER_PRIOR = dict(d_model=64, heads=4, layers=2, dropout=0.3)
DIGITS_TRANSFORMER_PRIOR_TRAINING = dict(batch_size=64, lr=2e-3, optimizer="adamw", weight_decay=0.1)
DIGITS_TRANSFORMER_PRIOR_EPOCHS = 60
DIGITS_DVAE = dict(num_codes=32, code_dim=16, hidden=64, downsample=1, residual_blocks=1, tau=1.0,
                   tau_min=0.3, anneal_rate=2e-3)
DIGITS_DVAE_TRAINING = dict(batch_size=64, lr=2e-3)
DIGITS_DVAE_EPOCHS = 60
# Full size. Binarized MNIST: 1 × 28 × 28 → 7 × 7 codes, Bernoulli pixels. CIFAR-10: 3 × 32 × 32 on 256
# levels → 8 × 8 codes, with the encoder and decoder of van den Oord et al. (2017: two
# stride-2 4 × 4 convolutions, two residual blocks ReLU–3×3–ReLU–1×1, 256 hidden units), K = 512 codes
# and a softmax over the 256 levels of every pixel and colour.
MNIST_VQVAE = dict(levels=2, num_codes=128, code_dim=32, hidden=128, downsample=2, residual_blocks=2,
                   ema=True, restart=100)
MNIST_VQVAE_TRAINING = dict(epochs=20, batch_size=128, lr=1e-3)
CIFAR_VQVAE = dict(levels=256, num_codes=512, code_dim=64, hidden=256, downsample=2, residual_blocks=2,
                   ema=True, restart=100)
CIFAR_VQVAE_TRAINING = dict(epochs=50, batch_size=128, lr=2e-4)


# ============================================================================= Gumbel
def gumbel_noise(logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise G = −log(−log U), U ~ U(0, 1), of the shape, dtype and device of ``logits``."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    u = u.clamp(min=torch.finfo(logits.dtype).tiny)  # log 0 would be −∞
    return -torch.log(-torch.log(u))


def gumbel_max(logits: torch.Tensor, dim: int = -1, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A categorical draw by the Gumbel-max trick: argmax_k (logits_k + G_k), G_k i.i.d. Gumbel.

    P(argmax = k) = softmax(logits)_k exactly (C25): the logits need not be normalised.
    Returns the indices (a LongTensor, ``dim`` removed).
    """
    logits = check_tensor(logits, "logits", kind="float")
    return (logits + gumbel_noise(logits, generator=generator)).argmax(dim)


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = False, dim: int = -1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The Gumbel-softmax (concrete) relaxation: y = softmax((logits + G) / τ) along ``dim``.

    A point of the simplex, differentiable in the logits. As τ → 0 it tends to the
    one-hot vector of :func:`gumbel_max` (same noise), as τ → ∞ to uniform 1/K (C26).
    ``hard=True``: the straight-through variant, the one-hot vector of argmax y in the
    forward pass with the gradient of the soft y (one_hot − sg[y] + y).
    """
    logits = check_tensor(logits, "logits", kind="float")
    if not tau > 0:
        raise ValueError(f"the temperature tau should be positive, got {tau}.")
    y = torch.softmax((logits + gumbel_noise(logits, generator=generator)) / tau, dim)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(dim, y.argmax(dim, keepdim=True), 1.0)
    return one_hot - y.detach() + y  # forward: one-hot; backward: the soft sample's gradient


# ===================================================================== quantisation
class Quantized(NamedTuple):
    """What :class:`VectorQuantizer` returns; the losses are per object, shape (N,)."""

    z_q: torch.Tensor  # the straight-through output z_e + sg[e − z_e], shape of z_e
    codes: torch.Tensor  # k_j = argmin_k ‖z_e,j − e_k‖², (N, H, W) or (N,)
    codebook_loss: torch.Tensor  # ‖sg[z_e] − e‖² summed over positions (zero with an EMA codebook)
    commitment_loss: torch.Tensor  # β ‖z_e − sg[e]‖² summed over positions


class VectorQuantizer(nn.Module):
    """Nearest-code assignment of encoder outputs (N, D, H, W) or (N, D) to a codebook of K vectors.

    The codebook starts uniform in [−1/K, 1/K] per coordinate. ``ema=False``: it is a
    parameter, trained by the codebook loss. ``ema=True`` (van den Oord et al. 2017,
    appendix A.1): it is a buffer, updated in training mode after every batch from
    the n_k vectors assigned to each code and their sum s_k,

        N_k ← γ N_k + (1 − γ) n_k,    m_k ← γ m_k + (1 − γ) s_k,    e_k = m_k / Ñ_k,

    Ñ_k = (N_k + ε)/(Σ N + K ε) · Σ N (Laplace smoothing, so that an unused code
    does not divide by zero; N_k starts at 1 and m_k at e_k), with γ = ``decay``;
    its codebook loss is zero. ``restart=T > 0``: dead-code restarts. In training
    mode, a code assigned to no position for T batches in a row is set, before the
    next batch is quantised, to an encoder output of that batch chosen at random
    (with an EMA codebook, N_k = 1 and m_k = that vector).
    """

    def __init__(self, num_codes: int, code_dim: int, *, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, restart: int = 0):
        super().__init__()
        self.num_codes = check_positive_int(num_codes, "num_codes")
        self.code_dim = check_positive_int(code_dim, "code_dim")
        if beta < 0 or not 0 < decay < 1 or eps <= 0:
            raise ValueError(f"need beta ≥ 0, 0 < decay < 1 and eps > 0; got {beta}, {decay}, {eps}.")
        self.beta, self.ema, self.decay, self.eps = float(beta), bool(ema), float(decay), float(eps)
        self.restart = check_positive_int(restart, "restart", allow_zero=True)
        codebook = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)
        if self.ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(num_codes))  # N_k
            self.register_buffer("code_sum", codebook.clone())  # m_k
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("unused", torch.zeros(num_codes, dtype=torch.long))  # batches since last use

    # -- assignment ---------------------------------------------------------------------
    def _rows(self, z_e: torch.Tensor) -> torch.Tensor:
        """z_e (N, D, H, W) or (N, D) as rows (M, D), one per position."""
        z_e = check_tensor(z_e, "z_e", ndim=(2, 4), kind="float")
        if z_e.shape[1] != self.code_dim:
            raise ValueError(f"z_e should have {self.code_dim} channels (dim 1, the code dimension), "
                             f"got shape {tuple(z_e.shape)}.")
        return z_e if z_e.dim() == 2 else z_e.permute(0, 2, 3, 1).reshape(-1, self.code_dim)

    def distances(self, z_e: torch.Tensor) -> torch.Tensor:
        """‖z_e,j − e_k‖² = ‖z_e,j‖² − 2 z_e,j·e_k + ‖e_k‖² for every position j and code k:
        (N, H, W, K), or (N, K) for vectors."""
        return self._distances(self._rows(z_e)).reshape(*z_e.shape[:1], *z_e.shape[2:], self.num_codes)

    def _distances(self, rows: torch.Tensor) -> torch.Tensor:
        e = self.codebook
        return rows.pow(2).sum(1, keepdim=True) - 2 * rows @ e.T + e.pow(2).sum(1)

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """The codes k_j = argmin_k ‖z_e,j − e_k‖²: (N, H, W) or (N,)."""
        with torch.no_grad():
            return self.distances(z_e).argmin(-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The code vectors e_k of integer codes (N, H, W) → (N, D, H, W), or (N,) → (N, D)."""
        codes = check_tensor(codes, "codes", ndim=(1, 3), kind="integer", min=0, max=self.num_codes - 1)
        return self._lookup(codes)

    def _lookup(self, codes: torch.Tensor) -> torch.Tensor:
        e = F.embedding(codes, self.codebook)
        return e if codes.dim() == 1 else e.permute(0, 3, 1, 2)

    # -- the layer ----------------------------------------------------------------------
    def forward(self, z_e: torch.Tensor) -> Quantized:
        """Quantise z_e; in training mode, also restart dead codes and update the EMA codebook."""
        rows = self._rows(z_e)  # z_e,j, one row per position
        if self.training and self.restart:
            self._restart_dead_codes(rows.detach())
        with torch.no_grad():
            codes = self._distances(rows).argmin(1)  # k_j
        e = F.embedding(codes, self.codebook)  # e_{k_j}
        if self.training:
            self._count(codes)
            if self.ema:
                self._ema_update(rows.detach(), codes)
        codebook_loss = (rows.detach() - e).pow(2)  # ‖sg[z_e] − e‖²: moves only the codebook
        commitment_loss = self.beta * (rows - e.detach()).pow(2)  # β‖z_e − sg[e]‖²: moves only the encoder
        z_q = rows + (e - rows).detach()  # straight through: forward e, backward the identity
        if self.ema:
            codebook_loss = torch.zeros_like(codebook_loss)  # the moving averages move the codes instead
        n = len(z_e)
        return Quantized(self._as_input(z_q, z_e), codes.reshape(*z_e.shape[:1], *z_e.shape[2:]),
                         codebook_loss.reshape(n, -1).sum(1), commitment_loss.reshape(n, -1).sum(1))

    def _as_input(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Rows (M, D) back to the layout of ``like``, (N, D, H, W) or (N, D)."""
        if like.dim() == 2:
            return rows
        n, _, h, w = like.shape
        return rows.reshape(n, h, w, self.code_dim).permute(0, 3, 1, 2)

    # -- the fixes for collapse ---------------------------------------------------------
    @torch.no_grad()
    def _count(self, codes: torch.Tensor) -> None:
        """Batches since each code was last assigned: 0 for the codes of this batch, +1 for the rest."""
        used = torch.bincount(codes, minlength=self.num_codes) > 0
        self.unused.copy_(torch.where(used, torch.zeros_like(self.unused), self.unused + 1))

    @torch.no_grad()
    def _ema_update(self, rows: torch.Tensor, codes: torch.Tensor) -> None:
        """N_k ← γN_k + (1−γ)n_k, m_k ← γm_k + (1−γ)s_k, e_k = m_k / Ñ_k (Laplace-smoothed N_k)."""
        one_hot = F.one_hot(codes, self.num_codes).to(self.code_sum.dtype)  # (M, K)
        n_k, s_k = one_hot.sum(0), one_hot.T @ rows.to(one_hot.dtype)
        self.cluster_size.mul_(self.decay).add_(n_k, alpha=1 - self.decay)
        self.code_sum.mul_(self.decay).add_(s_k, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.code_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, rows: torch.Tensor) -> None:
        """Codes unused for ``restart`` batches in a row move onto random encoder outputs of this batch."""
        dead = (self.unused >= self.restart).nonzero().squeeze(1)
        if len(dead) == 0:
            return
        new = rows[torch.randint(len(rows), (len(dead),), device=rows.device)].to(self.codebook.dtype)
        self.codebook[dead] = new
        if self.ema:
            self.cluster_size[dead] = 1.0
            self.code_sum[dead] = new
        self.unused[dead] = 0

    def extra_repr(self) -> str:
        fixes = [f for f, on in (("ema", self.ema), (f"restart={self.restart}", self.restart)) if on]
        return f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}" + "".join(
            ", " + f for f in fixes)


# ======================================================================== code usage
class CodeUsage:
    """How often each of K codes was assigned, accumulated over batches (an epoch, a data set).

    ``fraction_used``: the share of the K codes assigned at least once; ``perplexity``:
    exp(H), H the entropy of the usage histogram p_k = count_k / Σ count (K when every
    code is used equally often, 1 when one code takes everything).
    """

    def __init__(self, num_codes: int):
        self.num_codes = check_positive_int(num_codes, "num_codes")
        self.counts = torch.zeros(num_codes, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> CodeUsage:
        """Add a batch of integer codes (any shape); returns self."""
        codes = check_tensor(codes, "codes", kind="integer", min=0, max=self.num_codes - 1)
        self.counts += torch.bincount(codes.reshape(-1).cpu(), minlength=self.num_codes)
        return self

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def fraction_used(self) -> float:
        return (self.counts > 0).double().mean().item()

    @property
    def perplexity(self) -> float:
        if self.total == 0:
            raise ValueError("no codes counted yet: call update(codes) first.")
        p = self.counts.double() / self.total
        return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())

    def __repr__(self) -> str:
        return (f"CodeUsage({self.fraction_used:.0%} of {self.num_codes} codes used, "
                f"perplexity {self.perplexity if self.total else float('nan'):.1f}, {self.total} assignments)")


@torch.no_grad()
def code_usage(model, x: torch.Tensor, *, batch_size: int = 256) -> CodeUsage:
    """The usage of ``model``'s codes over the whole of ``x`` (a :class:`VQVAE` or a :class:`DVAE`):
    every object encoded (``model.encode``), in eval mode, the counts added up."""
    if not hasattr(model, "encode") or not hasattr(model, "num_codes"):
        raise TypeError(f"code_usage needs a model with encode(x) and num_codes (a VQVAE or DVAE), "
                        f"got {type(model).__name__}.")
    x = check_tensor(x, "x")
    was_training = model.training
    model.eval()
    try:
        usage = CodeUsage(model.num_codes)
        for part in x.split(check_positive_int(batch_size, "batch_size")):
            usage.update(model.encode(part.to(model.device)))
    finally:
        model.train(was_training)
    return usage


class UsageTracker:
    """A callback for :func:`dgmlab.train.fit`: after every epoch, the code usage over all of ``x``.

    ``fraction_used`` and ``perplexity`` hold one value per epoch.
    """

    def __init__(self, x: torch.Tensor, *, batch_size: int = 256):
        self.x, self.batch_size = x, batch_size
        self.fraction_used: list[float] = []
        self.perplexity: list[float] = []

    def __call__(self, epoch: int, history, model) -> None:
        usage = code_usage(model, self.x, batch_size=self.batch_size)
        self.fraction_used.append(usage.fraction_used)
        self.perplexity.append(usage.perplexity)


# ================================================================ encoder and decoder
class ResidualBlock(nn.Module):
    """h + conv1×1(ReLU(conv3×3(ReLU(h)))): van den Oord et al.'s residual block."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


class ConvEncoder(nn.Module):
    """Images on ``levels`` levels (N, C, H, W) → a grid of vectors (N, out, H/2^s, W/2^s).

    The pixels scaled to [−1, 1], a 3×3 convolution, s = ``downsample`` times ReLU and a
    4×4 convolution of stride 2, residual blocks, ReLU and a 1×1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, *, levels: int, hidden: int = 64,
                 downsample: int = 1, residual_blocks: int = 1):
        super().__init__()
        self.levels = levels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1)]
        for _ in range(downsample):
            layers += [nn.ReLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        layers += [ResidualBlock(hidden) for _ in range(residual_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(hidden, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = 2 * x.to(self.net[0].weight.dtype) / (self.levels - 1) - 1
        return self.net(u)


class ConvDecoder(nn.Module):
    """p(x | z): a grid of vectors (N, D, h, w) → independent pixels of ``event_shape`` (C, H, W).

    A 3×3 convolution, residual blocks, ``upsample`` times ReLU and a 4×4 transposed
    convolution of stride 2, ReLU and a 3×3 convolution to the pixels' logits: a softmax
    over the ``levels`` per pixel and colour, or one Bernoulli logit when ``levels == 2``.
    """

    def __init__(self, event_shape, code_dim: int, *, levels: int, hidden: int = 64, upsample: int = 1,
                 residual_blocks: int = 1):
        super().__init__()
        self.event_shape, self.levels = tuple(event_shape), levels
        self.outputs = 1 if levels == 2 else levels  # logits per pixel and colour
        layers: list[nn.Module] = [nn.Conv2d(code_dim, hidden, 3, padding=1)]
        layers += [ResidualBlock(hidden) for _ in range(residual_blocks)]
        for _ in range(upsample):
            layers += [nn.ReLU(), nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(hidden, self.event_shape[0] * self.outputs, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) Bernoulli logits, or (N, C, H, W, levels)."""
        out = self.net(z)
        c, h, w = self.event_shape
        if self.levels == 2:
            return out
        return out.reshape(len(out), c, self.levels, h, w).permute(0, 1, 3, 4, 2)

    def distribution(self, z: torch.Tensor) -> Distribution:
        """p(x | z) as a torch distribution: batch (N,), event (C, H, W)."""
        logits = self.logits(z)
        base = Bernoulli(logits=logits) if self.levels == 2 else Categorical(logits=logits)
        return Independent(base, 3)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) = Σ_pixels log p(x_i | z), shape (N,)."""
        logits = self.logits(z)
        if self.levels == 2:
            return -F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype), reduction="none").sum((1, 2, 3))
        log_p = F.log_softmax(logits, -1).gather(-1, x.long().unsqueeze(-1)).squeeze(-1)
        return log_p.sum((1, 2, 3))

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], the mean image (N, C, H, W) in level units."""
        logits = self.logits(z)
        if self.levels == 2:
            return torch.sigmoid(logits)
        levels = torch.arange(self.levels, dtype=logits.dtype, device=logits.device)
        return torch.softmax(logits, -1) @ levels

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """x ~ p(x | z): levels as integers (0/1 floats for binary pixels)."""
        logits = self.logits(z)
        if self.levels == 2:
            return torch.bernoulli(torch.sigmoid(logits))
        return gumbel_max(logits)


def _check_image_shape(event_shape, downsample: int) -> tuple[int, int, int]:
    shape = tuple(event_shape)
    if len(shape) != 3:
        raise ValueError(f"event_shape should be an image shape (C, H, W), got {shape}.")
    step = 2 ** check_positive_int(downsample, "downsample", allow_zero=True)
    if shape[1] % step or shape[2] % step:
        raise ValueError(f"the image's height and width ({shape[1]}, {shape[2]}) should be divisible by "
                         f"2^downsample = {step}.")
    return shape[0], shape[1] // step, shape[2] // step


# ============================================================================= priors
class UniformCodes(GenerativeModel):
    """The uniform prior over a grid of codes: p(z) = K^(−h·w), every code equally likely everywhere."""

    def __init__(self, grid_shape, num_codes: int):
        self.num_codes = check_positive_int(num_codes, "num_codes")
        super().__init__(grid_shape, support=constraints.integer_interval(0, num_codes - 1))
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries the dtype and device

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        x, _ = self.check_input(x, context)
        return torch.full((len(x),), -self.event_size * math.log(self.num_codes), dtype=self._anchor.dtype,
                          device=x.device)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        return torch.randint(self.num_codes, (n, *self.event_shape), device=self._anchor.device)


class ClassMarginal(GenerativeModel):
    """A class-conditional prior p(z | c) made unconditional by summing out the class:

        p(z) = Σ_c π_c p(z | c),

    π the class frequencies (``class_weights``, normalised here). A proper prior over
    the codes, so a VQ-VAE with it has an unconditional bound and unconditional samples
    (draw c ~ π, then z ~ p(z | c)); :attr:`conditional` is the prior it wraps, to be put
    back (``model.prior = marginal.conditional``) for class-conditional samples.
    ``log_prob`` costs one pass of the conditional prior per class.
    """

    def __init__(self, conditional: GenerativeModel, class_weights: torch.Tensor):
        if not isinstance(conditional, GenerativeModel) or getattr(conditional, "num_classes", None) is None:
            raise TypeError("ClassMarginal wraps a class-conditional GenerativeModel (one with num_classes), got "
                            f"{type(conditional).__name__}.")
        weights = check_tensor(class_weights, "class_weights", shape=(conditional.num_classes,), min=0).double()
        if weights.sum() <= 0:
            raise ValueError("class_weights should not all be zero.")
        super().__init__(conditional.event_shape, support=conditional.support)
        self.conditional = conditional
        self.register_buffer("log_pi", (weights / weights.sum()).log().float())

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """log Σ_c π_c p(z | c), by logsumexp over the classes; shape (N,)."""
        x, _ = self.check_input(x, context)
        classes = torch.arange(len(self.log_pi), device=x.device)
        log_p = torch.stack([self.conditional.log_prob(x, c.expand(len(x))) for c in classes])  # (C, N)
        return torch.logsumexp(log_p + self.log_pi.to(log_p.dtype)[:, None], dim=0)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        """c ~ π, then z ~ p(z | c), for each of the n objects."""
        self.check_sample_args(n, context)
        classes = torch.multinomial(self.log_pi.exp(), n, replacement=True)
        return self.conditional.sample(n, classes.to(self.log_pi.device))


# ============================================================================= VQ-VAE
class VQVAETerms(NamedTuple):
    """The VQ-VAE objective's terms per object, shape (N,) each: loss = −reconstruction + codebook + commitment."""

    reconstruction: torch.Tensor  # log p(x | z_q), in nats
    codebook: torch.Tensor  # ‖sg[z_e] − e‖²
    commitment: torch.Tensor  # β ‖z_e − sg[e]‖²
    codes: torch.Tensor  # z*(x), (N, h, w)


class VQBound(NamedTuple):
    """The VQ-VAE's bound on log p(x) and its two terms, shape (N,) each: bound = reconstruction + prior."""

    bound: torch.Tensor
    reconstruction: torch.Tensor  # log p(x | z*(x))
    prior: torch.Tensor  # log p(z*(x)) under the prior over codes


class VQVAE(GenerativeModel):
    """A VQ-VAE (van den Oord et al. 2017): convolutional encoder, vector quantiser, decoder, prior.

    Images (C, H, W) on ``levels`` levels (``levels=2``: binary pixels as 0/1) are encoded to
    a grid of (H/2^s) × (W/2^s) codes among ``num_codes`` (s = ``downsample``). Training
    (:meth:`terms`, :meth:`training_losses`) minimises −log p(x | z_q) + codebook + commitment
    (see :class:`VectorQuantizer` for ``beta``, ``ema``, ``decay``, ``restart``).

    ``prior`` is a model of the code grid, shape (1, h, w), values in [0, K): any
    GenerativeModel (default :class:`UniformCodes`), e.g. Chapter 3's
    ``PixelCNN((1, h, w), levels=K, num_classes=10)``, trained by :func:`fit_prior`. It
    can be replaced at any time (``model.prior = ...``). The VQ-VAE takes the prior's
    context (class labels): :meth:`log_prob` and :meth:`sample` need it when the prior
    does; encoding, decoding and training do not use it.

    ``log_prob`` is a lower bound (see :meth:`log_prob`); ``loss(x)`` is, in training
    mode, the VQ-VAE objective, and in eval mode −mean log_prob (what validation reports).
    """

    log_prob_is_bound = True

    def __init__(self, event_shape=(1, 8, 8), *, levels: int = 17, num_codes: int = 32, code_dim: int = 16,
                 hidden: int = 64, downsample: int = 1, residual_blocks: int = 1, beta: float = 0.25,
                 ema: bool = False, decay: float = 0.99, restart: int = 0, prior: GenerativeModel | None = None):
        self.levels = check_positive_int(levels, "levels")
        if levels < 2:
            raise ValueError(f"levels should be at least 2, got {levels}.")
        channels, h, w = _check_image_shape(event_shape, downsample)
        self.num_codes, self.grid_shape = check_positive_int(num_codes, "num_codes"), (1, h, w)
        super().__init__(event_shape, support=constraints.integer_interval(0, levels - 1))
        net = dict(levels=levels, hidden=check_positive_int(hidden, "hidden"),
                   residual_blocks=check_positive_int(residual_blocks, "residual_blocks", allow_zero=True))
        self.encoder = ConvEncoder(channels, code_dim, downsample=downsample, **net)
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta=beta, ema=ema, decay=decay, restart=restart)
        self.decoder = ConvDecoder(event_shape, code_dim, upsample=downsample, **net)
        self.prior = UniformCodes(self.grid_shape, num_codes) if prior is None else prior

    def __setattr__(self, name, value):
        """Setting ``prior`` checks it and makes the VQ-VAE take the prior's context (optionally)."""
        if name == "prior":
            self._check_prior(value)
        super().__setattr__(name, value)
        if name == "prior":
            # the prior's context; optional here, since encoding and training do not use it
            self.context_shape, self.context_support = value.context_shape, value.context_support
            self.context_optional = True

    def _check_prior(self, prior) -> None:
        if not isinstance(prior, GenerativeModel):
            raise TypeError("the prior should be a dgmlab GenerativeModel over code grids, "
                            f"got {type(prior).__name__}.")
        support = prior.support
        bounds = (getattr(support, "lower_bound", None), getattr(support, "upper_bound", None))
        if tuple(prior.event_shape) != self.grid_shape or bounds != (0, self.num_codes - 1):
            raise ValueError(f"the prior should model code grids of shape {self.grid_shape} with values in "
                             f"[0, {self.num_codes - 1}], e.g. autoregressive.PixelCNN({self.grid_shape}, "
                             f"levels={self.num_codes}); got event_shape {tuple(prior.event_shape)}, "
                             f"support {support}.")

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The encoder, codebook and decoder: the prior is trained separately (:func:`fit_prior`)."""
        parts = (self.encoder, self.quantizer, self.decoder)
        return {"model": [p for part in parts for p in part.parameters() if p.requires_grad]}

    # -- training ------------------------------------------------------------------------
    def terms(self, x: torch.Tensor, context=None) -> VQVAETerms:
        """The objective's terms for each object (in training mode the quantiser's EMA and restarts run)."""
        x, _ = self.check_input(x, context)
        z_e = self.encoder(x)
        vq = self.quantizer(z_e)  # z_q = z_e + sg[e − z_e], the codes, the two VQ losses
        return VQVAETerms(self.decoder.log_prob(x, vq.z_q), vq.codebook_loss, vq.commitment_loss, vq.codes)

    def loss(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Training mode: the mean of −log p(x | z_q) + ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖².
        Eval mode: −mean log_prob, the bound (what validation reports)."""
        if not self.training:
            return super().loss(x, context)
        t = self.terms(x, context)
        return (-t.reconstruction + t.codebook + t.commitment).mean()

    def training_losses(self, x, context=None, *, step: int = 0):
        """The VQ-VAE objective of the batch (the prior, the codes' model, is not involved)."""
        t = self.terms(x, context)
        yield "model", (-t.reconstruction + t.codebook + t.commitment).mean()

    # -- the bound -----------------------------------------------------------------------
    def bound(self, x: torch.Tensor, context=None) -> VQBound:
        """log p(x | z*) + log p(z*), z*(x) the nearest codes, and its two terms (see :meth:`log_prob`)."""
        x, context = self.check_input(x, context)
        codes = self.quantizer.nearest(self.encoder(x))
        reconstruction = self.decoder.log_prob(x, self.quantizer._lookup(codes))
        prior = self.prior.log_prob(codes[:, None], context)
        return VQBound(reconstruction + prior, reconstruction, prior)

    def log_prob(self, x: torch.Tensor, context=None, *, k: int = 1) -> torch.Tensor:
        """A lower bound on log p(x) (or log p(x | context)), in nats, shape (N,).

        The latent is discrete, so log p(x) = log Σ_z p(x | z) p(z), and any set S of
        distinct code grids gives a lower bound log Σ_{z∈S} p(x | z) p(z). k = 1:
        S = {z*(x)}, the nearest codes; this is the ELBO of the deterministic one-hot
        posterior q(z | x) = 1[z = z*(x)] (its entropy is 0), log p(x | z*) + log p(z*)
        (van den Oord et al. 2017). k > 1 adds the k − 1 grids that differ from z* at
        one position, least distant first: a tighter bound, k decoder and prior passes.
        """
        x, context = self.check_input(x, context)
        k = check_positive_int(k, "k")
        z_e = self.encoder(x)
        total = None
        for codes in self._candidates(z_e, k):
            log_joint = self.decoder.log_prob(x, self.quantizer._lookup(codes)) + self.prior.log_prob(codes[:, None],
                                                                                                     context)
            total = log_joint if total is None else torch.logaddexp(total, log_joint)  # log Σ_z p(x, z)
        return total

    def _candidates(self, z_e: torch.Tensor, k: int) -> Iterator[torch.Tensor]:
        """z*(x), then the k − 1 grids that change one position of z* to another code, in order of
        the increase of the quantisation distance ‖z_e,j − e_k‖² − ‖z_e,j − e_{k*_j}‖²."""
        d = self.quantizer.distances(z_e).detach()  # (N, h, w, K)
        n, h, w, kk = d.shape
        if k - 1 > h * w * (kk - 1):
            raise ValueError(f"k should be at most 1 + h·w·(K − 1) = {1 + h * w * (kk - 1)} (distinct code grids).")
        best = d.argmin(-1)
        yield best
        if k == 1:
            return
        extra = (d - d.gather(-1, best[..., None])).scatter(-1, best[..., None], math.inf).reshape(n, -1)
        picks = extra.topk(k - 1, dim=1, largest=False).indices  # (N, k − 1) over positions × codes
        for i in range(k - 1):
            position, code = picks[:, i:i + 1] // kk, picks[:, i:i + 1] % kk
            yield best.reshape(n, -1).scatter(1, position, code).reshape(n, h, w)

    # -- codes and objects ---------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """The codes z*(x): nearest codebook entries of the encoder's grid, (N, h, w)."""
        x, _ = self.check_input(x, context)
        return self.quantizer.nearest(self.encoder(x))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """Images from codes (N, h, w): E[x | z] (the mean image, in level units), or a draw x ~ p(x | z)."""
        codes = check_tensor(codes, "codes", shape=(None, *self.grid_shape[1:]), kind="integer")
        z_q = self.quantizer.lookup(codes.to(self.device))
        return self.decoder.sample(z_q) if sample else self.decoder.mean(z_q)

    def reconstruct(self, x: torch.Tensor, context=None, *, sample: bool = False) -> torch.Tensor:
        """decode(encode(x)): the mean image of p(x | z*(x)), or a draw from it."""
        return self.decode(self.encode(x, context), sample=sample)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        """Codes z ~ p(z) (or p(z | context)) from the prior, then pixels x ~ p(x | z): (n, *event_shape)."""
        context = self.check_sample_args(n, context)
        codes = self.prior.sample(n, context)[:, 0]
        return self.decoder.sample(self.quantizer._lookup(codes))


def fit_prior(model: VQVAE, prior: GenerativeModel, x: torch.Tensor, context: torch.Tensor | None = None, *,
              val: torch.Tensor | None = None, val_context: torch.Tensor | None = None, encode_batch: int = 500,
              **fit_kwargs):
    """Stage two: make ``prior`` the VQ-VAE's prior and train it on the codes of ``x`` (the VQ-VAE unchanged).

    The codes z*(x), shape (N, 1, h, w), are computed once; ``context`` (class labels, for a
    class-conditional prior) goes with them. ``val``/``val_context``: validation images
    and labels, encoded likewise, ``encode_batch`` objects at a time. Other keywords go to
    :func:`dgmlab.train.fit`, whose History is returned.
    """
    from .train import fit

    if not isinstance(model, VQVAE):
        raise TypeError(f"fit_prior trains the prior of a VQVAE, got {type(model).__name__}.")
    model.prior = prior  # checked: the grid's shape and the number of codes

    def data(images, labels):  # encoded in batches: a whole data set at once can exceed memory
        codes = torch.cat([model.encode(part.to(model.device))[:, None].cpu() for part in images.split(encode_batch)])
        return codes if labels is None else (codes, labels)

    return fit(prior, data(x, context), None if val is None else data(val, val_context), **fit_kwargs)


def term_gradients(model: VQVAE, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Which parameters each term of the VQ-VAE objective moves (C27): for each term
    (reconstruction, codebook, commitment) the norm of its gradient with respect to the
    encoder's, the codebook's and the decoder's parameters (0.0: no gradient at all).

    In eval mode (the EMA codebook is not updated); an EMA codebook is a buffer, so its
    column is 0 for every term.
    """
    if not isinstance(model, VQVAE):
        raise TypeError(f"term_gradients needs a VQVAE, got {type(model).__name__}.")
    parts = {"encoder": list(model.encoder.parameters()), "decoder": list(model.decoder.parameters()),
             "codebook": list(model.quantizer.parameters())}
    was_training = model.training
    model.eval()
    try:
        t = model.terms(x)
        losses = {"reconstruction": -t.reconstruction.mean(), "codebook": t.codebook.mean(),
                  "commitment": t.commitment.mean()}
        table = {}
        for name, loss in losses.items():
            table[name] = {}
            for part, params in parts.items():
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if (
                    params and loss.requires_grad) else []
                table[name][part] = math.sqrt(sum(g.pow(2).sum().item() for g in grads if g is not None))
    finally:
        model.train(was_training)
    return table


# =============================================================================== dVAE
class DVAE(GenerativeModel):
    """A discrete VAE: a grid of categorical latents, trained with the Gumbel-softmax relaxation.

    The encoder gives the logits of q(z_j | x), a K-way categorical at each position j of
    an (H/2^s) × (W/2^s) grid; a code is the vector e_k of a learned codebook, so a
    relaxed sample y_j (a point of the simplex) enters the decoder as Σ_k y_jk e_k. The
    prior is uniform, p(z_j = k) = 1/K, and the KL is in closed form,

        KL(q(z | x) ‖ p(z)) = Σ_j [Σ_k q_jk log q_jk + log K].

    Training maximises the relaxed ELBO E_y[log p(x | y)] − KL, with y =
    :func:`gumbel_softmax` at temperature τ(step) = max(τ_min, τ₀ e^(−rate·step)) (Jang et
    al. 2017; the DALL-E dVAE, Ramesh et al. 2021); ``hard=True`` uses the straight-through
    one-hot samples instead. ``log_prob`` is the ELBO with discrete samples z ~ q (a true
    lower bound; importance-weighted with ``k`` samples). ``loss(x)``: in training mode the
    relaxed −ELBO at τ_min, in eval mode −mean log_prob.
    """

    log_prob_is_bound = True

    def __init__(self, event_shape=(1, 8, 8), *, levels: int = 17, num_codes: int = 32, code_dim: int = 16,
                 hidden: int = 64, downsample: int = 1, residual_blocks: int = 1, tau: float = 1.0,
                 tau_min: float = 0.5, anneal_rate: float = 1e-3, hard: bool = False, kl_weight: float = 1.0):
        self.levels = check_positive_int(levels, "levels")
        if levels < 2:
            raise ValueError(f"levels should be at least 2, got {levels}.")
        if not 0 < tau_min <= tau or anneal_rate < 0 or kl_weight < 0:
            raise ValueError(f"need 0 < tau_min ≤ tau, anneal_rate ≥ 0 and kl_weight ≥ 0; got {tau_min}, {tau}, "
                             f"{anneal_rate}, {kl_weight}.")
        channels, h, w = _check_image_shape(event_shape, downsample)
        self.num_codes, self.grid_shape = check_positive_int(num_codes, "num_codes"), (1, h, w)
        super().__init__(event_shape, support=constraints.integer_interval(0, levels - 1))
        net = dict(levels=levels, hidden=check_positive_int(hidden, "hidden"),
                   residual_blocks=check_positive_int(residual_blocks, "residual_blocks", allow_zero=True))
        self.encoder = ConvEncoder(channels, num_codes, downsample=downsample, **net)  # logits of q(z_j | x)
        self.codebook = nn.Embedding(num_codes, check_positive_int(code_dim, "code_dim"))
        self.decoder = ConvDecoder(event_shape, code_dim, upsample=downsample, **net)
        self.tau, self.tau_min, self.anneal_rate = float(tau), float(tau_min), float(anneal_rate)
        self.hard, self.kl_weight = bool(hard), float(kl_weight)

    def temperature(self, step: int) -> float:
        """τ after ``step`` batches: max(τ_min, τ₀ · exp(−rate · step))."""
        return max(self.tau_min, self.tau * math.exp(-self.anneal_rate * step))

    def _embed(self, y: torch.Tensor) -> torch.Tensor:
        """One-hot or relaxed codes y (N, K, h, w) → decoder inputs Σ_k y_k e_k, (N, D, h, w)."""
        return torch.einsum("nkhw,kd->ndhw", y, self.codebook.weight)

    def _kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(q(z | x) ‖ uniform) = Σ_j [Σ_k q_jk log q_jk + log K], shape (N,)."""
        log_q = F.log_softmax(logits, 1)
        return (log_q.exp() * log_q).sum((1, 2, 3)) + math.prod(logits.shape[2:]) * math.log(self.num_codes)

    def relaxed_elbo(self, x: torch.Tensor, context=None, *, tau: float | None = None) -> ELBO:
        """E_y[log p(x | y)] − KL with one relaxed sample y = gumbel_softmax(logits, τ) (default τ_min)."""
        x, _ = self.check_input(x, context)
        logits = self.encoder(x)  # (N, K, h, w)
        y = gumbel_softmax(logits, self.tau_min if tau is None else tau, hard=self.hard, dim=1)
        reconstruction = self.decoder.log_prob(x, self._embed(y))
        kl = self._kl(logits)
        return ELBO(reconstruction - kl, reconstruction, kl)

    def elbo(self, x: torch.Tensor, context=None) -> ELBO:
        """The ELBO with one discrete sample z ~ q(z | x) (by :func:`gumbel_max`): log p(x | z) − KL."""
        x, _ = self.check_input(x, context)
        logits = self.encoder(x)
        z = F.one_hot(gumbel_max(logits, 1), self.num_codes).permute(0, 3, 1, 2).to(logits.dtype)
        reconstruction = self.decoder.log_prob(x, self._embed(z))
        kl = self._kl(logits)
        return ELBO(reconstruction - kl, reconstruction, kl)

    def log_prob(self, x: torch.Tensor, context=None, *, k: int = 1) -> torch.Tensor:
        """A lower bound on log p(x): the ELBO (k = 1) or log (1/k) Σ_i p(x | z_i) p(z_i) / q(z_i | x), z_i ~ q."""
        x, _ = self.check_input(x, context)
        k = check_positive_int(k, "k")
        if k == 1:
            return self.elbo(x).elbo
        logits = self.encoder(x)
        log_q_all = F.log_softmax(logits, 1)
        log_prior = -math.prod(logits.shape[2:]) * math.log(self.num_codes)  # log p(z) = −h·w·log K
        total = None
        for _ in range(k):
            codes = gumbel_max(logits, 1)  # (N, h, w)
            log_q = log_q_all.gather(1, codes[:, None]).sum((1, 2, 3))
            z = F.one_hot(codes, self.num_codes).permute(0, 3, 1, 2).to(logits.dtype)
            log_w = self.decoder.log_prob(x, self._embed(z)) + log_prior - log_q
            total = log_w if total is None else torch.logaddexp(total, log_w)
        return total - math.log(k)

    def loss(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Training mode: the relaxed −ELBO at τ_min (fit anneals τ: :meth:`training_losses`).
        Eval mode: −mean log_prob, the bound with discrete samples."""
        if not self.training:
            return super().loss(x, context)
        terms = self.relaxed_elbo(x, context)
        return -(terms.reconstruction - self.kl_weight * terms.kl).mean()

    def training_losses(self, x, context=None, *, step: int = 0):
        """−(mean relaxed reconstruction − kl_weight · KL), the relaxation at temperature τ(step)."""
        terms = self.relaxed_elbo(x, context, tau=self.temperature(step))
        yield "model", -(terms.reconstruction - self.kl_weight * terms.kl).mean()

    # -- codes and objects ---------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """The most probable code at each position, argmax_k q(z_j = k | x): (N, h, w)."""
        x, _ = self.check_input(x, context)
        return self.encoder(x).argmax(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
        """Images from codes (N, h, w): the mean image E[x | z], or a draw x ~ p(x | z)."""
        codes = check_tensor(codes, "codes", shape=(None, *self.grid_shape[1:]), kind="integer", min=0,
                             max=self.num_codes - 1)
        z = self.codebook(codes.to(self.device)).permute(0, 3, 1, 2)
        return self.decoder.sample(z) if sample else self.decoder.mean(z)

    def reconstruct(self, x: torch.Tensor, context=None, *, sample: bool = False) -> torch.Tensor:
        """decode(encode(x))."""
        return self.decode(self.encode(x, context), sample=sample)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        """Codes uniform at every position (the prior), then pixels x ~ p(x | z)."""
        self.check_sample_args(n, context)
        codes = torch.randint(self.num_codes, (n, *self.grid_shape[1:]), device=self.device)
        return self.decoder.sample(self.codebook(codes).permute(0, 3, 1, 2))
