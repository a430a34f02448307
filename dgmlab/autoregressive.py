"""Autoregressive models (Chapter 3): MADE and PixelCNN; the Transformer (Chapter 6).

The chain rule writes any distribution as p(x) = Π_j p(x_j | x_<j). An
autoregressive network computes all m conditionals in **one** pass, by
masking its weights so that output j never sees inputs j, j+1, ...; the
density of an image is then exact and cheap, while sampling needs m passes,
one per dimension, because x_j must exist before x_{j+1} can be drawn.

* :class:`MADE` masks a fully connected network, using *degrees*: every unit
  gets a number, and a weight survives only if it goes from a lower (or equal)
  degree to a higher one. Several orderings/connectivities can be trained at
  once and averaged at test time.
* :class:`PixelCNN` masks convolutions (type A: the centre pixel is hidden;
  type B: visible, for every layer after the first). Its receptive field has a
  *blind spot*: pixels up and to the right that it never sees.
* :class:`GatedPixelCNN` splits the network into a vertical stack (rows above)
  and a horizontal stack (pixels to the left), with gated activations
  tanh ⊙ σ: no blind spot.
* :class:`Transformer` (Chapter 6, a prior over a VQ-VAE's codes) reads a
  sequence of tokens through causal self-attention: every earlier token is
  in view, none later, and a class token can open the sequence.

Images are ``(N, C, H, W)`` integers in 0..levels−1 (``levels=2``: binary,
given as floats 0/1 too). With C = 3 colour channels a pixel is generated
red, then green, then blue: feature channels are split into C groups and the
masks let group c see only colours < c of the current pixel.
Outputs: ``"categorical"`` (a softmax over the levels) or
``"logistic_mixture"`` (a discretised mixture of logistics, which knows that
neighbouring levels are alike and needs far fewer parameters per pixel).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModel, constraints
from .validate import check_choice, check_positive_int, check_tensor

__all__ = [
    "MaskedLinear",
    "MaskedMLP",
    "made_degrees",
    "made_masks",
    "MADE",
    "MaskedConv2d",
    "conv_mask",
    "PixelCNN",
    "GatedPixelCNN",
    "GatedLayer",
    "condition",
    "shift_down",
    "gate",
    "discretized_logistic_mixture_log_prob",
    "receptive_field",
    "causal_mask",
    "CausalSelfAttention",
    "Block",
    "Transformer",
    "DIGITS_MADE",
    "DIGITS_MADE_TRAINING",
    "DIGITS_PIXELCNN",
    "DIGITS_PIXELCNN_TRAINING",
    "MNIST_MADE",
    "MNIST_MADE_TRAINING",
]

# Settings for the embedded digits, chosen on the validation images, shared by
# the lecture notebook and the benchmark (python -m dgmlab.bench autoregressive).
# With only 1,199 training images the models overfit within seconds: dropout,
# weight decay and MADE's ensemble of orderings are what keep them honest.
DIGITS_MADE = dict(hidden=(500,), num_masks=8)
DIGITS_MADE_TRAINING = dict(batch_size=32, lr=1e-3)
DIGITS_PIXELCNN = dict(channels=32, layers=5, kernel=5, first_kernel=7, output="logistic_mixture",
                       mixtures=5, dropout=0.3)
DIGITS_PIXELCNN_TRAINING = dict(batch_size=32, lr=3e-3, optimizer="adamw", weight_decay=3e-2)
# MADE on binarized MNIST: one hidden layer, natural order (about 90 nats after 6 CPU minutes)
MNIST_MADE = dict(hidden=(1000,), num_masks=1)
MNIST_MADE_TRAINING = dict(epochs=60, batch_size=100, lr=1e-3)  # with a cosine schedule over the epochs


# =============================================================================== MADE
class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` (out, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("mask", torch.ones(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def made_degrees(order: torch.Tensor, hidden: Sequence[int],
                 generator: torch.Generator | None = None
                 ) -> list[torch.Tensor]:
    """Degrees of the input and hidden units of a MADE.

    ``order`` (D,) holds each input's position in the ordering (0 = first):
    that is its degree. Each hidden unit gets a degree drawn uniformly from
    {lowest degree of the layer below, ..., D − 2}: a unit of degree d may
    only see inputs of degree ≤ d, and may only feed outputs of degree > d,
    so degree D − 1 would feed nothing.
    """
    order = check_tensor(order, "order", ndim=1, kind="integer")
    d = len(order)
    degrees = [order.long()]
    for size in hidden:
        lowest = min(int(degrees[-1].min()), d - 2)
        highest = max(d - 2, lowest)
        degrees.append(torch.randint(lowest, highest + 1, (size,),
                                     generator=generator))
    return degrees


def made_masks(degrees: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Masks (out, in) from degrees: M[k, k'] = 1[d_out(k) ≥ d_in(k')] in the hidden layers,
    and M[j, k] = 1[d_j > d(k)] at the output.

    The strict inequality at the output is what makes output j depend on
    inputs earlier in the ordering only (output j carries input j's degree).
    """
    hidden = [(d_out[:, None] >= d_in[None, :]).float()  # d_out ≥ d_in
              for d_in, d_out in zip(degrees[:-1], degrees[1:])]
    output = (degrees[0][:, None] > degrees[-1][None, :]).float()  # d_j > d_k
    return hidden + [output]


class MaskedMLP(nn.Module):
    """A fully connected network in which output block j only sees input blocks earlier in an order.

    ``dim`` dimensions, each entering as ``in_per_dim`` input units and leaving
    as ``out_per_dim`` output units (one logit, ``levels`` logits, a shift and a
    log-scale, ...). ``num_masks`` orders and connectivities are available
    (``set_mask``): number 0 uses ``order`` (default: the natural one), the others
    are random permutations. ``context_dim`` extra inputs (a condition) feed
    every hidden unit unmasked. ``calls`` counts forward passes (for Chapter 4's
    MAF-vs-IAF comparison).
    """

    def __init__(self, dim: int, hidden: Sequence[int], *, in_per_dim: int = 1, out_per_dim: int = 1,
                 num_masks: int = 1, order: torch.Tensor | None = None, direct: bool = True,
                 context_dim: int = 0, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        if dim < 2:
            raise ValueError("a masked network needs at least 2 dimensions.")
        self.hidden = [check_positive_int(h, "hidden size") for h in hidden]
        if not self.hidden:
            raise ValueError("hidden should list at least one layer size.")
        self.k_in, self.k_out = in_per_dim, out_per_dim
        self.num_masks = check_positive_int(num_masks, "num_masks")
        self.seed, self.dropout = int(seed), float(dropout)
        self.base_order = torch.arange(dim) if order is None else check_tensor(
            order, "order", shape=(dim,), kind="integer").long()
        if sorted(self.base_order.tolist()) != list(range(dim)):
            raise ValueError(f"order should be a permutation of 0..{dim - 1}.")
        sizes = [dim * in_per_dim, *self.hidden]
        self.layers = nn.ModuleList(MaskedLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = MaskedLinear(sizes[-1], dim * out_per_dim)
        self.direct = MaskedLinear(dim * in_per_dim, dim * out_per_dim, bias=False) if direct else None
        self.context = nn.Linear(context_dim, self.hidden[0]) if context_dim else None
        self.current_mask = -1
        self.calls = 0
        self.set_mask(0)

    def ordering(self, k: int) -> torch.Tensor:
        """Position of each dimension in ordering ``k``."""
        if k == 0:
            return self.base_order
        return torch.randperm(self.dim, generator=torch.Generator().manual_seed(self.seed * 7919 + k))

    def set_mask(self, k: int) -> None:
        """Switch to ordering/connectivity ``k`` (0 ≤ k < num_masks); deterministic in (seed, k)."""
        if not 0 <= k < self.num_masks:
            raise ValueError(f"mask index should be in [0, {self.num_masks}), got {k}.")
        if k == self.current_mask:
            return
        g = torch.Generator().manual_seed(self.seed * 104729 + k)
        degrees = made_degrees(self.ordering(k), self.hidden, g)
        masks = made_masks(degrees)
        # every dimension is repeated k_in / k_out times (one-hot inputs, several outputs)
        masks[0] = masks[0].repeat_interleave(self.k_in, dim=1)
        masks[-1] = masks[-1].repeat_interleave(self.k_out, dim=0)
        for layer, mask in zip([*self.layers, self.out], masks):
            layer.mask.copy_(mask)
        if self.direct is not None:
            order = degrees[0]
            direct = (order[:, None] > order[None, :]).float()
            self.direct.mask.copy_(direct.repeat_interleave(self.k_out, 0).repeat_interleave(self.k_in, 1))
        self.current_mask = k

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(N, dim·in_per_dim) → (N, dim·out_per_dim), output units grouped by dimension."""
        self.calls += 1
        h = inputs
        for i, layer in enumerate(self.layers):
            pre = layer(h)
            if i == 0 and self.context is not None:
                if context is None:
                    raise ValueError("this network is conditional: pass a context.")
                pre = pre + self.context(context)
            h = F.dropout(F.relu(pre), self.dropout, self.training)
        return self.out(h) + (self.direct(inputs) if self.direct is not None else 0)


class MADE(GenerativeModel):
    """Masked Autoencoder for Distribution Estimation (Germain et al., 2015).

    ``event_shape``: the shape of one object (e.g. 64 or (1, 8, 8)); ``levels``:
    2 for Bernoulli outputs (one logit per dimension), more for categorical
    outputs (the inputs are then one-hot). ``num_masks`` orderings and
    connectivities: mask 0 keeps the natural order; during training each
    batch draws one at random (``loss``), and ``log_prob`` in eval mode
    averages the probabilities of all of them (still a normalised
    distribution: a mixture of autoregressive models). ``direct`` adds masked
    input-to-output connections. Parameters: ``num_parameters()`` counts the
    full weight matrices (masked entries included).
    """

    def __init__(self, event_shape, hidden: Sequence[int] = (500,), *, levels: int = 2,
                 num_masks: int = 1, direct: bool = True, dropout: float = 0.0, seed: int = 0):
        self.levels = check_positive_int(levels, "levels")
        super().__init__(event_shape, support=constraints.integer_interval(0, levels - 1))
        d = self.event_size
        if levels < 2 or d < 2:
            raise ValueError(f"MADE needs at least 2 dimensions and 2 levels, got {d} and {levels}.")
        k = 1 if levels == 2 else levels  # one-hot inputs and one logit per level for categorical data
        self.net = MaskedMLP(d, hidden, in_per_dim=k, out_per_dim=k, num_masks=num_masks, direct=direct,
                             dropout=dropout, seed=seed)
        self._members: list[int] | None = None  # the ensemble members in use; None: all of them

    @property
    def num_masks(self) -> int:
        return self.net.num_masks

    @contextlib.contextmanager
    def orders(self, *members: int) -> Iterator[MADE]:
        """Inside the block, ``log_prob`` and ``sample`` use only these ensemble members.

        ``with made.orders(0): ...`` evaluates the natural order alone.
        """
        if not members or any(not 0 <= k < self.num_masks for k in members):
            raise ValueError(f"give one or more member indices in [0, {self.num_masks}), got {members}.")
        outer, self._members = self._members, sorted(set(members))
        try:
            yield self
        finally:
            self._members = outer

    def _active(self) -> list[int]:
        return list(range(self.num_masks)) if self._members is None else self._members

    @property
    def current_mask(self) -> int:
        return self.net.current_mask

    def ordering(self, k: int) -> torch.Tensor:
        """Position of each dimension in ordering ``k`` (k = 0: the natural order)."""
        return self.net.ordering(k)

    def set_mask(self, k: int) -> None:
        """Switch to ordering/connectivity ``k`` (0 ≤ k < num_masks)."""
        self.net.set_mask(k)

    # -- the network ---------------------------------------------------------------------
    def _inputs(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows (N, D) of levels as network inputs: the values (binary) or one-hot codes."""
        if self.levels == 2:
            return flat.to(self.dtype)
        return F.one_hot(flat.long(), self.levels).to(self.dtype).reshape(len(flat), -1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Conditional logits under the current mask: (N, D) for Bernoulli, (N, D, levels) otherwise."""
        x, _ = self.check_input(x)
        return self._logits(x.reshape(len(x), self.event_size))

    def _logits(self, flat: torch.Tensor) -> torch.Tensor:
        out = self.net(self._inputs(flat))
        return out if self.levels == 2 else out.reshape(len(flat), self.event_size, self.levels)

    def _log_prob_current(self, flat: torch.Tensor) -> torch.Tensor:
        logits = self._logits(flat)
        if self.levels == 2:
            return -F.binary_cross_entropy_with_logits(logits, flat.to(logits.dtype), reduction="none").sum(1)
        return -F.cross_entropy(logits.transpose(1, 2), flat.long(), reduction="none").sum(1)

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Exact log p(x) in nats, shape (N,).

        In training: the current ordering. In eval mode: the mixture of the ensemble's
        members (all ``num_masks``, or those chosen with :meth:`orders`).
        """
        x, _ = self.check_input(x, context)
        x = x.reshape(len(x), self.event_size)
        if self.training:
            return self._log_prob_current(x)
        keep, members = self.current_mask, self._active()
        parts = []
        for k in members:
            self.set_mask(k)
            parts.append(self._log_prob_current(x))
        self.set_mask(keep)
        # log of the mean probability: a mixture of the ensemble's members
        return torch.logsumexp(torch.stack(parts), 0) - math.log(len(members))

    def loss(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Mean NLL. In training, each call first draws one of the ``num_masks`` orderings and
        scores that one; in eval mode, the ensemble's (``-log_prob(x).mean()``)."""
        if not self.training:
            return super().loss(x, context)
        if self.num_masks > 1:
            self.set_mask(int(torch.randint(self.num_masks, (1,))))
        x, _ = self.check_input(x, context)
        return -self._log_prob_current(x.reshape(len(x), self.event_size)).mean()

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        """Draw ``n`` objects: pick a member of the ensemble, then one dimension per pass (D passes)."""
        self.check_sample_args(n, context)
        was_training, keep = self.training, self.current_mask
        self.eval()
        device = self.device
        active = torch.tensor(self._active())
        members = active[torch.randint(len(active), (n,))] if len(active) > 1 else active.expand(n)
        out = torch.zeros(n, self.event_size, dtype=self.dtype if self.levels == 2 else torch.long,
                          device=device)
        for k in members.unique().tolist():
            rows = (members == k).nonzero().squeeze(1).to(device)
            self.set_mask(k)
            x = out[rows]
            for j in self.ordering(k).argsort().tolist():  # dimensions in the order of member k
                logits = self._logits(x)[:, j]
                if self.levels == 2:
                    x[:, j] = torch.bernoulli(torch.sigmoid(logits))
                else:
                    x[:, j] = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
            out[rows] = x
        self.set_mask(keep)
        self.train(was_training)
        return out.reshape(n, *self.event_shape)


# ============================================================================ PixelCNN
def _groups(n: int, colors: int, halves: int = 1) -> torch.Tensor:
    """Colour group of each of ``n`` channels: channel o belongs to group ⌊(o mod n/halves)·colors/(n/halves)⌋.

    ``halves=2`` for gated layers, whose outputs are [a | b] with the same
    group layout in each half.
    """
    per = n // halves
    if per % colors:
        raise ValueError(f"{per} channels cannot be split into {colors} colour groups; use a multiple of {colors}.")
    return (torch.arange(n) % per) * colors // per


def conv_mask(kernel: tuple[int, int], kind: str, in_groups: torch.Tensor,
              out_groups: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask (out, in, kh, kw) of a masked convolution.

    ``kind``: ``"A"`` / ``"B"`` — a full PixelCNN kernel: rows above, then the
    pixels left of the centre, then the centre itself only from lower colour
    groups (A) or lower-or-equal groups (B); ``"H-A"`` / ``"H-B"`` — a
    one-row kernel (1, k) of the gated horizontal stack, same rule on its row.
    """
    check_choice(kind, "kind", ("A", "B", "H-A", "H-B"))
    kh, kw = kernel
    mask = torch.zeros(len(out_groups), len(in_groups), kh, kw)
    ci, cj = kh // 2, kw // 2  # the centre: the pixel being predicted
    if kind in ("A", "B"):
        mask[:, :, :ci, :] = 1  # every row above the centre
    mask[:, :, ci, :cj] = 1  # the pixels left of the centre
    out_g, in_g = out_groups[:, None], in_groups[None, :]
    if kind.endswith("A"):  # the centre: earlier colours only
        mask[:, :, ci, cj] = (out_g > in_g).float()
    else:  # the centre: earlier colours and the colour itself
        mask[:, :, ci, cj] = (out_g >= in_g).float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed mask (see :func:`conv_mask`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel, kind: str,
                 *, colors: int = 1, out_halves: int = 1):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        if any(k % 2 == 0 for k in kernel):
            raise ValueError("kernel sizes should be odd (the mask is centred "
                             f"on the pixel), got {kernel}.")
        super().__init__(in_channels, out_channels, kernel,
                         padding=(kernel[0] // 2, kernel[1] // 2))
        in_groups = _groups(in_channels, colors)  # the colour of each channel
        out_groups = _groups(out_channels, colors, out_halves)
        self.register_buffer("mask", conv_mask(kernel, kind, in_groups,
                                               out_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias,
                        padding=self.padding)


def discretized_logistic_mixture_log_prob(params: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """log P(x) under a mixture of logistics discretised into ``levels`` bins on [−1, 1].

    ``params`` (N, 3M, ...) = mixture logits, means, log-scales; ``x`` (N, ...)
    integer levels. Bin k covers [x_k − δ, x_k + δ] with x_k = 2k/(levels−1) − 1
    and δ = 1/(levels−1); the two end bins extend to ∓∞, so the levels'
    probabilities sum to one exactly.
    """
    m = params.shape[1] // 3
    logit_pi, mu, log_s = params[:, :m], params[:, m: 2 * m], params[:, 2 * m:].clamp(min=-7.0)
    centre = (2 * x.float() / (levels - 1) - 1).unsqueeze(1)
    half = 1.0 / (levels - 1)
    inv_s = torch.exp(-log_s)
    upper, lower = inv_s * (centre + half - mu), inv_s * (centre - half - mu)
    log_cdf_upper = F.logsigmoid(upper)  # the first bin: P(X ≤ upper)
    log_survival_lower = F.logsigmoid(-lower)  # the last bin: P(X > lower)
    # a middle bin: σ(a) − σ(b) = σ(a) σ(−b) (1 − e^{b−a}) for a > b, stable in both tails
    log_middle = log_cdf_upper + log_survival_lower + torch.log(-torch.expm1((lower - upper).clamp(max=-1e-12)))
    xb = x.unsqueeze(1)
    log_p = torch.where(xb == 0, log_cdf_upper, torch.where(xb == levels - 1, log_survival_lower, log_middle))
    return torch.logsumexp(log_p + F.log_softmax(logit_pi, dim=1), dim=1)


class _PixelModel(GenerativeModel):
    """What PixelCNN and GatedPixelCNN share: inputs, output heads, log_prob, sampling."""

    def __init__(self, event_shape, *, levels: int, channels: int, output: str, mixtures: int,
                 num_classes: int | None, context_dim: int = 0):
        self.levels = check_positive_int(levels, "levels")
        if levels < 2:
            raise ValueError("levels should be at least 2.")
        if len(tuple(event_shape)) != 3:
            raise ValueError(f"event_shape should be an image shape (C, H, W), got {tuple(event_shape)}.")
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.context_dim = check_positive_int(context_dim, "context_dim", allow_zero=True)
        if self.num_classes and self.context_dim:
            raise ValueError("condition on class labels (num_classes) or on a vector (context_dim), not both.")
        if self.num_classes:
            context_shape, context_support = (), constraints.integer_interval(0, self.num_classes - 1)
        else:
            context_shape, context_support = ((self.context_dim,) if self.context_dim else None), constraints.real
        super().__init__(event_shape, support=constraints.integer_interval(0, levels - 1),
                         context_shape=context_shape, context_support=context_support)
        self.colors = self.event_shape[0]
        self.output = check_choice(output, "output", ("categorical", "logistic_mixture"))
        self.mixtures = check_positive_int(mixtures, "mixtures")
        if channels % self.colors:
            raise ValueError(f"channels ({channels}) should be a multiple of the colour channels ({self.colors}).")
        self.params_per_color = levels if output == "categorical" else 3 * mixtures
        c = self.colors
        self.head = nn.Sequential(
            nn.ReLU(), MaskedConv2d(channels, channels, 1, "B", colors=c),
            nn.ReLU(), MaskedConv2d(channels, c * self.params_per_color, 1, "B", colors=c))

    # -- subclasses define the masked feature network and how far up it looks --------------
    def features(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def reach_up(self) -> int:
        """How many rows above a pixel can influence it (for sampling on a crop)."""
        raise NotImplementedError

    # -- inputs and outputs ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Levels 0..K−1 → values in [−1, 1] (what the network sees)."""
        return 2 * x.to(self.dtype) / (self.levels - 1) - 1

    def params_from_encoded(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Output parameters (N, C, P, H, W) from encoded inputs; differentiable w.r.t. ``h``.

        ``context``: class labels (N,) of a class-conditional model, or vectors
        (N, context_dim) of a model conditioned on a vector (a VAE's latent z)."""
        out = self.head(self.features(h, context))
        n, _, hh, ww = out.shape
        return out.reshape(n, self.colors, self.params_per_color, hh, ww)

    def _log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x_ij,c | x_<) for every pixel and colour: (N, C, H, W)."""
        if self.output == "categorical":
            return -F.cross_entropy(params.transpose(1, 2), x.long(), reduction="none")
        n, c, p, hh, ww = params.shape
        flat = params.reshape(n * c, p, hh, ww)
        return discretized_logistic_mixture_log_prob(flat, x.reshape(n * c, hh, ww).long(), self.levels
                                                     ).reshape(n, c, hh, ww)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(x) (or log p(x | y), y the class labels or vectors given as ``context``) in
        nats: one pass, all conditionals at once. Shape (N,)."""
        x, y = self.check_input(x, context)
        params = self.params_from_encoded(self.encode(x), y)
        return self._log_prob_pixels(params, x).sum((1, 2, 3))

    def _draw(self, params: torch.Tensor) -> torch.Tensor:
        """Sample levels from output parameters (N, P) of one colour of one pixel."""
        if self.output == "categorical":
            return torch.multinomial(torch.softmax(params, -1), 1).squeeze(1)
        m = self.mixtures
        k = torch.multinomial(torch.softmax(params[:, :m], -1), 1)
        mu, log_s = params[:, m:2 * m].gather(1, k), params[:, 2 * m:].clamp(min=-7.0).gather(1, k)
        u = torch.rand_like(mu).clamp(1e-5, 1 - 1e-5)
        value = mu + log_s.exp() * (torch.log(u) - torch.log1p(-u))  # a logistic sample
        # rounding to the nearest bin centre gives exactly the discretised probabilities
        return ((value + 1) / 2 * (self.levels - 1)).round().clamp(0, self.levels - 1).long().squeeze(1)

    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor | int | None = None, *, x: torch.Tensor | None = None,
               start: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Draw ``n`` images pixel by pixel, colour by colour (C·H·W passes).

        Each pass runs the network only on the rows that matter: the row being
        drawn and the ``reach_up`` rows above it, since rows further up cannot
        influence it and rows below are not drawn yet. ``x`` and ``start``
        complete given images: pixels before ``start`` (raster order) are kept.
        ``context``: the class label(s) of a class-conditional model, or the vector(s) of a
        vector-conditional one: one for all n images, or one each.
        """
        y = self.check_sample_args(n, context)
        was_training = self.training
        self.eval()
        device = self.device
        y = None if y is None else y.to(device)
        c, hh, ww = self.event_shape
        if x is None:
            out = torch.zeros(n, c, hh, ww, dtype=torch.long, device=device)
        else:
            out = self.check_input(x)[0].long().clone().to(device)
            if len(out) != n:
                raise ValueError(f"x holds {len(out)} images but n = {n}.")
        i0, j0 = start
        for i in range(i0, hh):
            top = max(0, i - self.reach_up)
            for j in range(j0 if i == i0 else 0, ww):
                for color in range(c):
                    crop = out[:, :, top: i + 1]
                    params = self.params_from_encoded(self.encode(crop), y)
                    out[:, color, i, j] = self._draw(params[:, color, :, i - top, j])
        self.train(was_training)
        return out


class PixelCNN(_PixelModel):
    """The original PixelCNN: a type-A masked convolution, then residual blocks of type-B ones.

    Its receptive field grows like a triangle that leans left: the pixels up
    and to the right of the current one, though earlier in the raster order,
    are never seen (the blind spot).
    """

    def __init__(self, event_shape=(1, 8, 8), *, levels: int = 17, channels: int = 64, layers: int = 5,
                 kernel: int = 3, first_kernel: int = 7, output: str = "categorical", mixtures: int = 5,
                 num_classes: int | None = None, context_dim: int = 0):
        super().__init__(event_shape, levels=levels, channels=channels, output=output, mixtures=mixtures,
                         num_classes=num_classes, context_dim=context_dim)
        c = self.colors
        self.first = MaskedConv2d(c, channels, first_kernel, "A", colors=c)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), MaskedConv2d(channels, channels, kernel, "B", colors=c))
                                    for _ in range(layers))
        self.embed = condition(num_classes, context_dim, channels)
        self.kernel, self.first_kernel, self.n_layers = kernel, first_kernel, layers

    @property
    def reach_up(self) -> int:
        return self.first_kernel // 2 + self.n_layers * (self.kernel // 2)

    def features(self, h, context):
        h = self.first(h)
        if self.embed is not None:
            h = h + self.embed(context)[:, :, None, None]
        for block in self.blocks:
            h = h + block(h)  # residual: keeps the gradient path short
        return h


def condition(num_classes: int | None, context_dim: int, size: int) -> nn.Module | None:
    """What turns a condition into ``size`` features: an embedding of class labels, a linear map
    of a vector (``context_dim``), or None for an unconditional model."""
    if num_classes:
        return nn.Embedding(num_classes, size)
    return nn.Linear(context_dim, size) if context_dim else None


def shift_down(t: torch.Tensor) -> torch.Tensor:
    """Move a feature map (N, C, H, W) down by one row; zeros enter at the top.

    Row i of the result is row i − 1 of ``t``. The gated PixelCNN hands its
    vertical stack to the horizontal stack through this shift, so that what
    reaches row i has only seen rows < i.
    """
    return F.pad(t, (0, 0, 1, 0))[:, :, :-1]


def gate(t: torch.Tensor) -> torch.Tensor:
    """The gated activation tanh(a) ⊙ σ(b) of t = [a | b] (channels split in two halves)."""
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of the gated PixelCNN: vertical stack (rows above) and horizontal stack (left).

    The vertical stack at row r sees rows r − k//2 ... r, all of it, widening by
    k//2 columns per layer (:meth:`look_up`). It is handed to the horizontal
    stack shifted down by one row (:func:`shift_down`), so the horizontal stack
    at row i only ever gets rows < i from it, plus the pixels left of it in its
    own row: together, everything before the pixel and nothing after.
    """

    def __init__(self, channels: int, kernel: int, *, first: bool, colors: int, dropout: float,
                 num_classes: int | None, context_dim: int = 0):
        super().__init__()
        self.k, self.first = kernel, first
        self.vertical = nn.Conv2d(channels, 2 * channels, (kernel // 2 + 1, kernel))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal = MaskedConv2d(channels, 2 * channels, (1, kernel), "H-A" if first else "H-B",
                                       colors=colors, out_halves=2)
        self.h_out = MaskedConv2d(channels, channels, 1, "B", colors=colors)
        self.dropout = nn.Dropout(dropout)
        self.cond_v = condition(num_classes, context_dim, 2 * channels)
        self.cond_h = condition(num_classes, context_dim, 2 * channels)

    def look_up(self, v: torch.Tensor) -> torch.Tensor:
        """The vertical convolution: at row r, rows r − k//2 ... r over k columns (padded above)."""
        k = self.k
        return self.vertical(F.pad(v, (k // 2, k // 2, k // 2, 0)))

    def condition(self, a_v, a_h, context):
        """Add the condition to both stacks: a class's embedding, or a linear map of a vector
        (conditional models only). The same bias reaches every pixel, so it cannot break causality."""
        if self.cond_v is None:
            return a_v, a_h
        return (a_v + self.cond_v(context)[:, :, None, None],
                a_h + self.cond_h(context)[:, :, None, None])

    def forward(self, v, h, context=None):
        a_v = self.look_up(v)  # at row r: rows r - k//2 ... r, full width
        # the horizontal stack: the pixels left of it in its row, and the
        # vertical stack shifted one row down, so row r only gets rows < r
        a_h = self.horizontal(h) + self.v_to_h(shift_down(a_v))
        a_v, a_h = self.condition(a_v, a_h, context)
        v_new = gate(a_v)
        h_new = self.h_out(self.dropout(gate(a_h)))
        return v_new, (h_new if self.first else h + h_new)


class GatedPixelCNN(_PixelModel):
    """Gated PixelCNN (van den Oord et al., 2016): two stacks, gated activations, no blind spot.

    ``kernel`` is the width of each layer's window (the first layer uses
    ``first_kernel``); ``dropout`` regularises the horizontal stack, which
    matters on small data sets; ``num_classes`` adds class conditioning, ``context_dim``
    conditioning on a vector (a VAE's latent z: a learned linear map of it is added to both
    stacks of every layer, as the class embedding is).
    """

    def __init__(self, event_shape=(1, 8, 8), *, levels: int = 17, channels: int = 48, layers: int = 4,
                 kernel: int = 5, first_kernel: int = 7, output: str = "categorical", mixtures: int = 5,
                 dropout: float = 0.0, num_classes: int | None = None, context_dim: int = 0):
        super().__init__(event_shape, levels=levels, channels=channels, output=output, mixtures=mixtures,
                         num_classes=num_classes, context_dim=context_dim)
        c = self.colors
        # the input enters through a type-B 1×1 convolution per colour group (a colour may see itself
        # here: the first gated layer's horizontal mask is of type A)
        self.stem = MaskedConv2d(c, channels, 1, "B", colors=c)
        kernels = [first_kernel] + [kernel] * (layers - 1)
        self.layers = nn.ModuleList(
            GatedLayer(channels, k, first=(i == 0), colors=c, dropout=dropout, num_classes=num_classes,
                       context_dim=context_dim)
            for i, k in enumerate(kernels))

    @property
    def reach_up(self) -> int:
        return 1 + sum(layer.k // 2 for layer in self.layers)

    def features(self, h, context):
        h = self.stem(h)
        # the vertical stack may see the whole input row by row: it reaches the
        # horizontal stack only through the one-row shift in every layer
        v = h
        for layer in self.layers:
            v, h = layer(v, h, context)
        return h


# =========================================================================== analysis
def receptive_field(model: _PixelModel | MADE, pixel: tuple[int, int] | int, *, color: int = 0,
                    trials: int = 3, seed: int = 0) -> torch.Tensor:
    """Which inputs influence the output at ``pixel``: a boolean map from input gradients.

    For a PixelCNN, ``pixel`` is (row, column) and the result has the image's
    shape (C, H, W); for a MADE, ``pixel`` is a dimension and the result has
    shape (D,). The gradient of the output parameters at that position with
    respect to every (encoded) input is taken at a few random inputs; an
    input influences the output if any gradient is non-zero.
    """
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    seen = None
    try:
        for _ in range(trials):
            if isinstance(model, MADE):
                x = torch.randint(model.levels, (1, model.event_size), generator=g)
                inp = model._inputs(x).requires_grad_(True)
                out = model.net(inp).reshape(1, model.event_size, model.net.k_out)[0, pixel].sum()
                (grad,) = torch.autograd.grad(out, inp)
                hit = grad.reshape(model.event_size, model.net.k_in).abs().sum(1) > 0
            else:
                c, hh, ww = model.event_shape
                x = torch.randint(model.levels, (1, c, hh, ww), generator=g)
                h = model.encode(x).requires_grad_(True)
                y = (torch.zeros(1, dtype=torch.long) if model.num_classes is not None
                     else torch.zeros(1, model.context_dim) if model.context_dim else None)
                out = model.params_from_encoded(h, y)[0, color, :, pixel[0], pixel[1]].sum()
                (grad,) = torch.autograd.grad(out, h)
                hit = grad[0] != 0
            seen = hit if seen is None else seen | hit
    finally:
        model.train(was_training)
    return seen


# ========================================================================= Transformer
def causal_mask(t: int, device=None) -> torch.Tensor:
    """The (t, t) boolean mask of causal attention: entry (i, j) is True where position i may
    attend to position j, i.e. j ≤ i (a lower triangle, diagonal included)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position i only attends to positions j ≤ i.

    For each of the H heads, with d_h = d_model / H and the projections
    q = h W_q, k = h W_k, v = h W_v of the sequence h (N, T, d_model):

        A = softmax(q kᵀ / √d_h + M),   M_ij = 0 if j ≤ i else −∞,
        head = A v;

    the heads are concatenated and mixed by the output projection W_o. The mask
    M is what makes the network autoregressive: row i of A puts no weight on later
    positions, so nothing after position i reaches output i.
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) should be a multiple of heads ({heads}).")
        self.heads, self.d_head = heads, d_model // heads
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.proj = nn.Linear(d_model, d_model)  # W_o
        self.dropout = nn.Dropout(dropout)

    def split_heads(self, a: torch.Tensor) -> torch.Tensor:
        """(N, T, d_model) → (N, H, T, d_h): one sequence of d_h features per head."""
        n, t, _ = a.shape
        return a.reshape(n, t, self.heads, self.d_head).transpose(1, 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, T, d_model) → (N, T, d_model)."""
        n, t, d = h.shape
        q, k, v = self.split_heads(self.q(h)), self.split_heads(self.k(h)), self.split_heads(self.v(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (N, H, T, T): q_i · k_j / √d_h
        scores = scores.masked_fill(~causal_mask(t, h.device), float("-inf"))  # no look ahead
        attention = self.dropout(torch.softmax(scores, dim=-1))  # each row sums to 1 over j ≤ i
        heads = attention @ v  # (N, H, T, d_h)
        return self.proj(heads.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """One Transformer layer (pre-LayerNorm, as in GPT-2):

        h ← h + Attention(LayerNorm(h)),   h ← h + MLP(LayerNorm(h)),

    the MLP acting on each position alone (d_model → 4·d_model → d_model, GELU).
    Only the attention mixes positions, and it looks back only.
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class Transformer(GenerativeModel):
    """A small decoder-only Transformer over sequences of tokens (minGPT-style).

    One object is L = event_size integer tokens in 0..vocab−1, of shape
    ``event_shape``: a sequence (L,) or a grid such as (1, h, w) of a VQ-VAE's
    codes, read in raster order. By the chain rule

        log p(x | c) = Σ_{t=1..L} log p(x_t | x_<t, c),

    and one pass computes every term: the network reads the sequence shifted
    right by one, [s, x_1, …, x_{L−1}], where the start token s is a learned
    "begin" token or, with ``num_classes``, the token of the class c given as
    ``context`` (DALL-E's recipe in miniature: a "caption" token, then the image
    tokens, one sequence). Token and learned position embeddings are summed, go
    through ``layers`` :class:`Block` s of causal self-attention, and a final
    LayerNorm and linear head give at position t the logits of x_t; the causal
    mask lets position t see s, x_1, …, x_{t−1} only. ``sample`` draws x_1,
    x_2, … one at a time (L passes; no key/value cache, which is fine for L ≤ 64).

    Parameters: 12·layers·d_model² + 13·layers·d_model (the blocks) plus
    (2·vocab + L + classes + 2)·d_model + vocab (embeddings, final norm, head;
    classes = 1 without ``num_classes``: the begin token); with the defaults
    (d_model 64, 2 layers) about 100k: 103,824 for a 4×4 grid of 16 codes with
    10 classes (``num_parameters()``).
    """

    def __init__(self, event_shape, vocab: int, *, d_model: int = 64, heads: int = 4, layers: int = 2,
                 dropout: float = 0.0, num_classes: int | None = None):
        self.vocab = check_positive_int(vocab, "vocab")
        if vocab < 2:
            raise ValueError(f"vocab should be at least 2 tokens, got {vocab}.")
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        super().__init__(event_shape, support=constraints.integer_interval(0, vocab - 1),
                         context_shape=None if num_classes is None else (),
                         context_support=constraints.integer_interval(0, (num_classes or 1) - 1))
        d = check_positive_int(d_model, "d_model")
        self.token = nn.Embedding(vocab, d)
        self.start = nn.Embedding(self.num_classes or 1, d)  # the "begin" token, or one per class
        self.position = nn.Embedding(self.event_size, d)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, check_positive_int(heads, "heads"), dropout)
                                    for _ in range(check_positive_int(layers, "layers")))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.apply(_gpt_init)

    def _logits(self, prefix: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Logits (N, t+1, vocab) of x_1, …, x_{t+1} from the tokens ``prefix`` (N, t) = x_1..x_t."""
        n, t = prefix.shape
        s = self.start(c.long() if c is not None else torch.zeros(n, dtype=torch.long, device=prefix.device))
        h = torch.cat([s[:, None], self.token(prefix)], dim=1)  # [s, x_1, …, x_t]: shifted right
        h = self.dropout(h + self.position.weight[: t + 1])
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def logits(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, L, vocab): row t those of token t given the tokens before it (raster order) and c."""
        x, c = self.check_input(x, context)
        return self._logits(x.reshape(len(x), -1)[:, :-1].long(), c)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(x | c) = Σ_t log p(x_t | x_<t, c) in nats, shape (N,): one pass."""
        x, c = self.check_input(x, context)
        tokens = x.reshape(len(x), -1).long()
        log_p = torch.log_softmax(self._logits(tokens[:, :-1], c), dim=-1)  # (N, L, vocab)
        return log_p.gather(-1, tokens[..., None]).squeeze(-1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor | int | None = None) -> torch.Tensor:
        """Draw ``n`` objects token by token: x_t ~ softmax(logits_t(x_<t, c)), t = 1..L.

        ``context``: the class of a class-conditional model, one int for all n or a
        tensor (n,) of labels."""
        c = self.check_sample_args(n, context)
        was_training = self.training
        self.eval()
        device = self.device
        c = None if c is None else c.to(device)
        x = torch.zeros(n, 0, dtype=torch.long, device=device)
        for _ in range(self.event_size):
            logits = self._logits(x, c)[:, -1]  # those of the next token
            x = torch.cat([x, torch.multinomial(torch.softmax(logits, -1), 1)], dim=1)
        self.train(was_training)
        return x.reshape(n, *self.event_shape)


def _gpt_init(module: nn.Module) -> None:
    """GPT-2's initialisation: weights N(0, 0.02²), biases zero (LayerNorm keeps its 1 and 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
