"""Classical discrete models: the baselines every deep model has to beat.

For ``m`` variables with ``k`` values each:

===============  =========================================  =======================
model            factorisation                              free parameters
===============  =========================================  =======================
``Histogram``    the full joint table                       k^m − 1
(chain rule)     p(x₁) p(x₂|x₁) … p(x_m|x_<m)               k^m − 1 (the same!)
``MarkovChain``  p(x₁) Π p(x_j | x_{j−1})                   (k−1) + (m−1)·k·(k−1)
``Independent``  Π p(x_j)                                   m·(k−1)
===============  =========================================  =======================

Each model stores exactly its free parameters: a categorical with ``k``
outcomes keeps ``k − 1`` logits and a fixed 0 for the last outcome, so
``num_parameters()`` *is* the count in the table. All follow the course's
model API (:class:`~dgmlab.base.GenerativeModel`) and can be fitted in closed
form (``from_data``, the maximum-likelihood frequencies, optionally smoothed)
or by gradient descent with the shared training loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModel, constraints
from .validate import check_choice, check_positive_int, check_tensor

__all__ = [
    "parameter_count",
    "bernoulli_mle",
    "categorical_mle",
    "IndependentBernoulli",
    "IndependentCategorical",
    "MarkovChain",
    "Histogram",
    "MAX_HISTOGRAM_BINS",
    "curse_of_dimensionality",
    "DiagonalGaussian",
    "discretised_gaussian_kernel",
    "KernelDensity",
    "UniformLevels",
    "NoiseMixture",
]

STRUCTURES = ("full", "chain_rule", "independent", "markov")
MAX_HISTOGRAM_BINS = 2**24
LOGIT_CLAMP = 30.0  # Bernoulli logits: keeps log-probabilities finite at frequencies 0 and 1
PROB_FLOOR = 1e-12  # categorical tables: the smallest probability a fitted outcome keeps
KDE_BLOCK = 1 << 22  # kernel density: entries of one (images × centres) block, 32 MB in float64


def parameter_count(structure: str, m: int, k: int = 2) -> int:
    """Free parameters of a distribution over ``m`` variables with ``k`` values each.

    ``structure``: ``"full"`` (joint table), ``"chain_rule"`` (all conditionals
    p(x_j|x_<j)), ``"independent"`` or ``"markov"`` (first-order chain).
    """
    check_choice(structure, "structure", STRUCTURES)
    m = check_positive_int(m, "m")
    k = check_positive_int(k, "k")
    if k < 2:
        raise ValueError(f"k should be at least 2 values per variable, got {k}.")
    if structure in ("full", "chain_rule"):
        return k**m - 1
    if structure == "independent":
        return m * (k - 1)
    return (k - 1) + (m - 1) * k * (k - 1)


def bernoulli_mle(x: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """θ̂_j = (Σ_i x_ij + α) / (n + 2α): the frequency of ones per column of ``x`` (N, m).

    With α = 0 this is the maximum-likelihood estimate; α > 0 is Laplace
    smoothing (a Beta(α+1, α+1) prior), which keeps unseen outcomes possible.
    """
    x = check_tensor(x, "x", ndim=2, min=0, max=1)
    if alpha < 0:
        raise ValueError(f"alpha should be ≥ 0, got {alpha}.")
    n = x.shape[0]
    return (x.double().sum(0) + alpha) / (n + 2 * alpha)


def categorical_mle(x: torch.Tensor, k: int, alpha: float = 0.0) -> torch.Tensor:
    """π̂_jv = (#{x_ij = v} + α) / (n + kα) for integer data ``x`` (N, m): shape (m, k)."""
    k = check_positive_int(k, "k")
    x = check_tensor(x, "x", ndim=2, kind="integer", min=0, max=k - 1)
    if alpha < 0:
        raise ValueError(f"alpha should be ≥ 0, got {alpha}.")
    m = x.shape[1]
    # count each (pixel, value) pair: code j·k + v, one bincount for all pixels
    codes = (torch.arange(m) * k + x.long()).reshape(-1)
    counts = torch.bincount(codes, minlength=m * k).double().reshape(m, k)
    return (counts + alpha) / (x.shape[0] + k * alpha)


def _free_logits(probs: torch.Tensor) -> torch.Tensor:
    """Logits relative to the last outcome: log π_v − log π_k for v < k (shape (..., k−1)).

    Probabilities are floored at ``PROB_FLOOR`` first, so an outcome never seen
    in the data keeps a finite (tiny) log-probability instead of −∞.
    """
    logp = probs.clamp_min(PROB_FLOOR).log()
    return (logp[..., :-1] - logp[..., -1:]).float()


def _log_softmax_free(free: torch.Tensor) -> torch.Tensor:
    """Append the fixed 0 logit of the last outcome and normalise: (..., k−1) -> (..., k)."""
    zeros = torch.zeros(*free.shape[:-1], 1, dtype=free.dtype, device=free.device)
    return torch.log_softmax(torch.cat([free, zeros], dim=-1), dim=-1)


class _FlatModel(GenerativeModel):
    """Shared plumbing: discrete data with ``k`` values per variable, seen as ``(N, D)`` rows."""

    def __init__(self, event_shape, k: int):
        self.k = check_positive_int(k, "k")
        if k < 2:
            raise ValueError(f"k should be at least 2 values per variable, got {k}.")
        super().__init__(event_shape, support=constraints.integer_interval(0, k - 1))

    def _flat(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """Checked data as rows of D integer values, shape (N, D)."""
        x, _ = self.check_input(x, context)
        return x.reshape(len(x), self.event_size).long()

    def _shape(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows (n, D) back to objects (n, *event_shape); binary data as floats 0/1."""
        flat = flat.to(self.dtype) if self.k == 2 else flat
        return flat.reshape(len(flat), *self.event_shape)


class IndependentBernoulli(_FlatModel):
    """Every binary pixel on its own: p(x) = Π_j θ_j^{x_j} (1 − θ_j)^{1 − x_j}. m parameters."""

    def __init__(self, event_shape, logits: torch.Tensor | None = None):
        super().__init__(event_shape, k=2)
        d = self.event_size
        init = torch.zeros(d) if logits is None else logits.reshape(d).float()
        self.logits = nn.Parameter(init.clone())

    @classmethod
    def from_data(cls, x: torch.Tensor, alpha: float = 0.0) -> "IndependentBernoulli":
        """The MLE (α = 0) or Laplace-smoothed fit to binary data ``x`` (N, *event_shape)."""
        theta = bernoulli_mle(x.reshape(len(x), -1), alpha)
        return cls(x.shape[1:], torch.logit(theta).clamp(-LOGIT_CLAMP, LOGIT_CLAMP))

    @property
    def probs(self) -> torch.Tensor:
        """θ_j = p(x_j = 1), shape ``event_shape``."""
        return torch.sigmoid(self.logits).reshape(self.event_shape)

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        x = self._flat(x, context).to(self.logits.dtype)
        # log θ^x (1-θ)^(1-x), written with logits for numerical stability
        return -F.binary_cross_entropy_with_logits(
            self.logits.expand_as(x), x, reduction="none"
        ).sum(1)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        u = torch.rand(n, self.event_size, device=self.device, dtype=self.dtype)
        return self._shape(u < torch.sigmoid(self.logits))


class IndependentCategorical(_FlatModel):
    """Every pixel on its own with ``k`` levels: p(x) = Π_j π_{j, x_j}. m·(k−1) parameters."""

    def __init__(self, event_shape, k: int, free_logits: torch.Tensor | None = None):
        super().__init__(event_shape, k)
        d = self.event_size
        init = torch.zeros(d, k - 1) if free_logits is None else free_logits.float()
        self.free_logits = nn.Parameter(init.reshape(d, k - 1).clone())

    @classmethod
    def from_data(cls, x: torch.Tensor, k: int, alpha: float = 0.0) -> "IndependentCategorical":
        """The MLE (α = 0) or smoothed fit to integer data ``x`` (N, *event_shape) in 0..k−1."""
        probs = categorical_mle(x.reshape(len(x), -1), k, alpha)
        return cls(x.shape[1:], k, _free_logits(probs))

    @property
    def probs(self) -> torch.Tensor:
        """π_{j, v}, shape ``(*event_shape, k)``."""
        return _log_softmax_free(self.free_logits).exp().reshape(*self.event_shape, self.k)

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        x = self._flat(x, context)
        logp = _log_softmax_free(self.free_logits)  # (D, k)
        return logp.gather(1, x.T).sum(0)  # pick log π_{j, x_j} for each pixel, add over j

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        probs = _log_softmax_free(self.free_logits).exp()
        return self._shape(torch.multinomial(probs, n, replacement=True).T)


class MarkovChain(_FlatModel):
    """First-order chain over the pixels in raster order: p(x) = p(x₁) Π_j p(x_j | x_{j−1}).

    (k−1) + (m−1)·k·(k−1) parameters: one categorical for the first pixel and,
    for every later pixel, one categorical per value of its predecessor.
    """

    def __init__(self, event_shape, k: int = 2):
        super().__init__(event_shape, k)
        self.first = nn.Parameter(torch.zeros(k - 1))
        self.transition = nn.Parameter(torch.zeros(self.event_size - 1, k, k - 1))  # [j, previous value, :]

    @classmethod
    def from_data(cls, x: torch.Tensor, k: int = 2, alpha: float = 0.0) -> "MarkovChain":
        """Closed-form MLE (α = 0) or smoothed fit: conditional frequencies of each transition."""
        model = cls(x.shape[1:], k)
        flat, d = model._flat(x), model.event_size
        first = torch.bincount(flat[:, 0], minlength=k).double()
        # code of (j, x_{j-1}, x_j) for every transition, counted in one bincount
        pair = torch.arange(d - 1) * k * k + flat[:, :-1] * k + flat[:, 1:]
        counts = torch.bincount(pair.reshape(-1), minlength=(d - 1) * k * k)
        counts = counts.double().reshape(d - 1, k, k)
        with torch.no_grad():
            model.first.copy_(_free_logits((first + alpha) / (first.sum() + k * alpha)))
            totals = counts.sum(-1, keepdim=True) + k * alpha
            # a predecessor value never seen leaves its row uniform (0/0 -> 1/k)
            cond = torch.where(totals > 0, (counts + alpha) / totals.clamp_min(1e-300), 1.0 / k)
            model.transition.copy_(_free_logits(cond))
        return model

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        x = self._flat(x, context)
        log_first = _log_softmax_free(self.first)[x[:, 0]]
        log_trans = _log_softmax_free(self.transition)  # (D−1, k, k)
        j = torch.arange(self.event_size - 1, device=x.device)
        steps = log_trans[j, x[:, :-1], x[:, 1:]]  # log p(x_j | x_{j−1}) for every j ≥ 2
        return log_first + steps.sum(1)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        out = torch.empty(n, self.event_size, dtype=torch.long, device=self.device)
        out[:, 0] = torch.multinomial(_log_softmax_free(self.first).exp(), n, replacement=True)
        trans = _log_softmax_free(self.transition).exp()
        for j in range(1, self.event_size):  # sequential: each pixel needs the one before
            out[:, j] = torch.multinomial(trans[j - 1, out[:, j - 1]], 1).squeeze(1)
        return self._shape(out)


class Histogram(_FlatModel):
    """The full joint table over ``m`` variables with ``k`` values: k^m − 1 parameters.

    The most flexible discrete model and the least usable: the number of bins
    grows as k^m, so beyond a few pixels almost every bin is empty. Tables are
    limited to ``MAX_HISTOGRAM_BINS`` bins.
    """

    def __init__(self, event_shape, k: int = 2):
        super().__init__(event_shape, k)
        d = self.event_size
        bins = k**d
        if bins > MAX_HISTOGRAM_BINS:
            size = f"about 10^{d * math.log10(k):.0f}"  # k^D may be too large for a float
            raise ValueError(
                f"A histogram over {d} variables with {k} values needs {k}^{d} = {size} bins, "
                f"more than the {MAX_HISTOGRAM_BINS:,} allowed here: that is the curse of dimensionality. "
                "Use fewer variables or a factorised model."
            )
        self.free_logits = nn.Parameter(torch.zeros(bins - 1))
        self.register_buffer("radix", k ** torch.arange(d - 1, -1, -1), persistent=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bin index of each row: x read as a D-digit number in base k, shape (N,)."""
        return (self._flat(x) * self.radix).sum(1)

    def decode(self, index: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: the configurations of bins ``index``, shape (N, D)."""
        return (index.long()[:, None] // self.radix) % self.k

    @classmethod
    def from_data(cls, x: torch.Tensor, k: int = 2,
                  alpha: float = 0.0) -> "Histogram":
        """π̂_b = (count_b + α) / (n + α k^m): the MLE (α = 0) or its smoothed version."""
        model = cls(x.shape[1:], k)
        bins = k**model.event_size
        counts = torch.bincount(model.encode(x), minlength=bins).double()  # n_b
        probs = (counts + alpha) / (counts.sum() + alpha * bins)
        with torch.no_grad():
            model.free_logits.copy_(_free_logits(probs))
        return model

    @property
    def probs(self) -> torch.Tensor:
        """The table π_b over all k^m bins, shape (k^m,)."""
        return _log_softmax_free(self.free_logits).exp()

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        bin_of_x = (self._flat(x, context) * self.radix).sum(1)
        return _log_softmax_free(self.free_logits)[bin_of_x]

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        return self._shape(self.decode(torch.multinomial(self.probs, n, replacement=True)))


def curse_of_dimensionality(
    train: torch.Tensor,
    test: torch.Tensor,
    dims,
    *,
    k: int,
    alpha: float = 0.5,
    order: torch.Tensor | None = None,
) -> dict[str, list]:
    """The histogram on the first ``d`` variables, for each d in ``dims``: two failures.

    ``train``/``test`` are (N, m) integer-valued; variables are taken in
    ``order`` (default: decreasing training variance, the informative ones
    first), so the variable sets are nested. Returns lists, one entry per d;
    every NLL is per variable, in nats:

    * ``bins`` (k^d), ``occupied`` (fraction of bins holding a training point),
      ``unseen`` (fraction of test points in an empty bin);
    * the raw MLE π̂_b = n_b / n: ``mle_train`` (at most log(n)/d, reached once
      every training point has a bin of its own), ``mle_test`` (∞ as soon as
      one test point is unseen) and ``mle_test_seen`` (the test points in
      occupied bins only: a flattering, selected subset);
    * the smoothed π̂_b = (n_b + α)/(n + α k^d): ``smoothed_train``,
      ``smoothed_test`` and ``pseudo_mass`` = α k^d/(n + α k^d), the share of
      probability the pseudo-counts spread uniformly over all bins;
    * ``independent_test``: the independent model with the same α, on test.
    """
    train = check_tensor(train, "train", ndim=2, kind="numeric", min=0, max=k - 1)
    test = check_tensor(test, "test", shape=(None, train.shape[1]), kind="numeric",
                        min=0, max=k - 1)
    if alpha <= 0:
        raise ValueError(f"alpha should be > 0 (the smoothed histogram), got {alpha}.")
    if order is None:
        order = train.double().var(0).argsort(descending=True)
    rows = []
    for d in dims:
        d = check_positive_int(int(d), "d")
        rows.append(_histogram_scores(train[:, order[:d]].long(), test[:, order[:d]].long(), k, alpha))
    keys = ("dims", "bins", "occupied", "unseen", "mle_train", "mle_test", "mle_test_seen",
            "smoothed_train", "smoothed_test", "pseudo_mass", "independent_test")
    return {key: [row[key] for row in rows] for key in keys}


@torch.no_grad()
def _histogram_scores(a: torch.Tensor, b: torch.Tensor, k: int, alpha: float) -> dict:
    """One entry of :func:`curse_of_dimensionality`: training variables ``a``, test ``b``, (N, d)."""
    n, d = a.shape
    smoothed = Histogram.from_data(a, k, alpha)
    bin_a, bin_b = smoothed.encode(a), smoothed.encode(b)
    counts = torch.bincount(bin_a, minlength=k**d).double()
    log_mle = (counts / n).log()  # −∞ on the empty bins
    seen = counts[bin_b] > 0
    indep = IndependentCategorical.from_data(a, k, alpha)
    return {
        "dims": d, "bins": k**d,
        "occupied": (counts > 0).double().mean().item(),
        "unseen": 1 - seen.double().mean().item(),
        "mle_train": -log_mle[bin_a].mean().item() / d,
        "mle_test": -log_mle[bin_b].mean().item() / d,
        "mle_test_seen": -log_mle[bin_b[seen]].mean().item() / d if seen.any() else math.nan,
        "smoothed_train": -smoothed.log_prob(a).mean().item() / d,
        "smoothed_test": -smoothed.log_prob(b).mean().item() / d,
        "pseudo_mass": alpha * k**d / (n + alpha * k**d),
        "independent_test": -indep.log_prob(b).mean().item() / d,
    }


class DiagonalGaussian(GenerativeModel):
    """A Gaussian with a diagonal covariance, N(μ, diag(σ²)): the simplest continuous model.

    2·d parameters (means and log standard deviations). ``from_data`` is the
    MLE: the sample mean and the (biased, divide-by-n) sample variance.
    """

    has_rsample = True

    def __init__(self, dim: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__(check_positive_int(dim, "dim"))
        self.mean = nn.Parameter(torch.zeros(dim) if mean is None else mean.reshape(dim).float().clone())
        log_std = torch.zeros(dim) if std is None else check_tensor(std, "std", min=1e-30).reshape(dim).float().log()
        self.log_std = nn.Parameter(log_std.clone())

    @classmethod
    def from_data(cls, x: torch.Tensor) -> "DiagonalGaussian":
        """Maximum-likelihood fit to ``x`` of shape (N, dim)."""
        x = check_tensor(x, "x", ndim=2, kind="float", finite=True)
        if len(x) < 2:
            raise ValueError("fitting a Gaussian needs at least 2 points.")
        return cls(x.shape[1], x.mean(0), x.var(0, unbiased=False).sqrt())

    @property
    def std(self) -> torch.Tensor:
        return self.log_std.exp()

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        x, _ = self.check_input(x, context)
        z = (x - self.mean) / self.std
        return (-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(1)

    def rsample(self, n: int, context=None) -> torch.Tensor:
        """x = μ + σ ⊙ ε with ε ~ N(0, I): differentiable in μ and σ (the reparameterisation trick)."""
        self.check_sample_args(n, context)
        return self.mean + self.std * torch.randn(n, *self.event_shape, device=self.device, dtype=self.dtype)


# --------------------------------------------------------------------------- C28
def discretised_gaussian_kernel(levels: int, bandwidth: float) -> torch.Tensor:
    """log k_h(l | c) for whole levels c, l in 0..K−1: a Gaussian kernel normalised over the levels.

    k_h(l | c) = exp(−(l − c)²/(2h²)) / Z_h(c), Z_h(c) = Σ_{l'=0}^{K−1} exp(−(l' − c)²/(2h²)).
    Row c is a distribution over l (float64, shape (K, K)); near the ends (c = 0,
    K − 1) Z_h(c) is smaller, since the kernel's mass beyond the edge is cut off.
    """
    logits = _kernel_logits(_check_levels(levels), _check_bandwidth(bandwidth))
    return logits - logits.logsumexp(1, keepdim=True)


def _kernel_logits(levels: int, h: float) -> torch.Tensor:
    """−(l − c)²/(2h²) for c (rows) and l (columns) in 0..K−1, float64: the unnormalised kernel."""
    l = torch.arange(levels, dtype=torch.float64)
    return -(l[None, :] - l[:, None]) ** 2 / (2 * h**2)  # [c, l]


def _check_levels(levels) -> int:
    levels = check_positive_int(levels, "levels")
    if levels < 2:
        raise ValueError(f"levels should be at least 2 (binary images), got {levels}.")
    return levels


def _check_bandwidth(bandwidth) -> float:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) \
            or not math.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(f"bandwidth should be a positive number, the kernel's standard deviation "
                         f"(in levels for K-level images), got {bandwidth!r}.")
    return float(bandwidth)


class KernelDensity(GenerativeModel):
    """A kernel density estimate: one kernel on every training image, p(x) = (1/N) Σ_n k_h(x | c_n).

    * Continuous data (``levels=None``): k_h(x | c) = N(x; c, h²I), an isotropic Gaussian.
    * K-level images (``levels=K``, centres and x whole levels 0..K−1): independent
      pixels around the centre, k_h(x | c) = Π_d k_h(x_d | c_d), each a Gaussian
      discretised onto the levels (:func:`discretised_gaussian_kernel`): an exact
      distribution over the K^D images, so ``log_prob`` is an NLL in nats like the
      other K-level models'.

    Both read log k_h(x | c_n) = −‖x − c_n‖²/(2h²) − A_n, with the normaliser
    A_n = (D/2) log(2πh²), or Σ_d log Z_h(c_{n,d}) on levels, so that
    log p(x) = logsumexp_n [−‖x − c_n‖²/(2h²) − A_n] − log N, computed over blocks
    of images × centres (memory stays bounded). ``sample(n)`` picks a centre
    uniformly, then draws from its kernel. No parameters: the estimate *is* the data.

    C28, likelihood is not sample quality: with a narrow kernel (h → 0) every
    sample is a copy of a training image -- perfect-looking samples, nearest
    training neighbour at distance 0 -- while a held-out image, never seen,
    gets almost no probability: log p(x) ≈ −min_n ‖x − c_n‖²/(2h²) − log N, a
    poor held-out likelihood. The bandwidth that maximises the held-out
    likelihood is larger, and its samples are noisier.
    """

    def __init__(self, centres, *, bandwidth: float, levels: int | None = None):
        self.bandwidth = _check_bandwidth(bandwidth)
        self.levels = None if levels is None else _check_levels(levels)
        centres = self._check_centres(centres)
        support = constraints.real if levels is None else constraints.integer_interval(0, levels - 1)
        super().__init__(tuple(centres.shape[1:]), support=support)
        flat = centres.reshape(len(centres), -1)
        self.register_buffer("centres", flat if levels is None else flat.float())
        self.register_buffer("log_norm", self._normalisers(flat))

    def _check_centres(self, centres) -> torch.Tensor:
        if self.levels is None:
            centres = check_tensor(centres, "centres", kind="numeric", finite=True)
            if not centres.is_floating_point():
                raise TypeError(f"centres hold whole numbers ({centres.dtype}): for K-level images "
                                "pass levels=K (17 for the digits); for continuous data, centres.float().")
        else:
            centres = check_tensor(centres, "centres", kind="numeric", min=0, max=self.levels - 1,
                                   whole=True)
        if centres.dim() < 2 or len(centres) == 0:
            raise ValueError(f"centres should be a batch of N ≥ 1 objects, shape (N, ...) such as the "
                             f"training images (N, 1, 8, 8), got {tuple(centres.shape)}.")
        return centres

    def _normalisers(self, flat: torch.Tensor) -> torch.Tensor:
        """A_n: (D/2) log(2πh²) for the Gaussian, Σ_d log Z_h(c_{n,d}) on levels; shape (N,), float64."""
        h, d = self.bandwidth, flat.shape[1]
        if self.levels is None:
            return torch.full((len(flat),), d / 2 * math.log(2 * math.pi * h**2), dtype=torch.float64)
        log_z = _kernel_logits(self.levels, h).logsumexp(1)  # log Z_h(c) for c = 0..K−1
        return log_z[flat.long()].sum(1)

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """log p(x) = logsumexp_n [−‖x − c_n‖²/(2h²) − A_n] − log N, in nats; shape (N,)."""
        x, _ = self.check_input(x, context)
        x = x.reshape(len(x), -1).double()
        rows = 1024  # images per block; _log_mixture then takes centres in blocks of KDE_BLOCK / rows
        parts = [self._log_mixture(x[i:i + rows]) for i in range(0, len(x), rows)]
        return torch.cat(parts).to(self.dtype) if parts else x.new_zeros(0, dtype=self.dtype)

    def _log_mixture(self, x: torch.Tensor) -> torch.Tensor:
        """log (1/N) Σ_n k_h(x | c_n) for a block of rows x (B, D), over blocks of centres."""
        step, h = max(1, KDE_BLOCK // len(x)), self.bandwidth
        x_sq, parts = x.square().sum(1, keepdim=True), []
        for j in range(0, len(self.centres), step):
            c = self.centres[j:j + step].double()
            dist_sq = (x_sq - 2 * x @ c.T + c.square().sum(1)).clamp_min(0)  # ‖x − c_n‖²
            parts.append(torch.logsumexp(-dist_sq / (2 * h**2) - self.log_norm[j:j + step], dim=1))
        return torch.logsumexp(torch.stack(parts, 1), dim=1) - math.log(len(self.centres))

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        """Pick a centre c uniformly, then x ~ k_h(· | c): c + hε (Gaussian), or each pixel's level."""
        self.check_sample_args(n, context)
        c = self.centres[torch.randint(len(self.centres), (n,), device=self.device)]
        if self.levels is None:
            return (c + self.bandwidth * torch.randn_like(c)).reshape(n, *self.event_shape)
        probs = discretised_gaussian_kernel(self.levels, self.bandwidth).exp().to(self.device)
        x = torch.multinomial(probs[c.long().reshape(-1)], 1).reshape(n, *self.event_shape)
        return x.to(self.dtype) if self.levels == 2 else x  # binary data as 0./1., like the others


class UniformLevels(_FlatModel):
    """Noise: every pixel uniform over its K levels, p(x) = K^−D for every image. No parameters."""

    def __init__(self, event_shape, levels: int):
        super().__init__(event_shape, _check_levels(levels))
        self.levels = self.k
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries dtype and device

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        x = self._flat(x, context)
        return torch.full((len(x),), -self.event_size * math.log(self.k), dtype=self.dtype,
                          device=x.device)

    @torch.no_grad()
    def sample(self, n: int, context=None) -> torch.Tensor:
        self.check_sample_args(n, context)
        return self._shape(torch.randint(self.k, (n, self.event_size), device=self.device))


class NoiseMixture(GenerativeModel):
    """A model diluted with noise: p_mix(x) = w·p(x) + (1 − w)·q(x), exact by logaddexp.

    log p_mix(x) = logaddexp(log w + log p(x), log(1 − w) + log q(x)). ``sample``
    draws from p with probability w and from q otherwise; :meth:`sample_with_source`
    also says which (``from_model``).

    C28, likelihood is not sample quality: since (1 − w)·q(x) ≥ 0,
    log p_mix(x) ≥ log p(x) + log w for every x. With w = 0.01 the NLL grows by at
    most log 100 ≈ 4.6 nats per image (a rounding error beside ~100 nats of a
    digit) while 99% of the samples are noise. When q(x) ≪ p(x) on the data (noise
    spreads its mass over K^D images) the bound is nearly tight. If p's
    ``log_prob`` is a lower bound (an ELBO), so is p_mix's.
    """

    def __init__(self, model: GenerativeModel, noise: GenerativeModel, weight: float = 0.01):
        for m, name in ((model, "model"), (noise, "noise")):
            if not isinstance(m, GenerativeModel) or not m.has_log_prob:
                raise TypeError(f"{name} should be a GenerativeModel with a likelihood (log_prob), "
                                f"got {type(m).__name__}.")
            if m.context_shape is not None:
                raise ValueError(f"{name} is conditional; NoiseMixture mixes unconditional models.")
        if tuple(model.event_shape) != tuple(noise.event_shape):
            raise ValueError(f"model and noise should model objects of one shape, got "
                             f"{tuple(model.event_shape)} and {tuple(noise.event_shape)}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1:
            raise ValueError(f"weight should be the model's share w, a number in (0, 1), got {weight!r}.")
        super().__init__(model.event_shape, support=model.support)
        self.model, self.noise, self.weight = model, noise, float(weight)
        self.log_prob_is_bound = bool(model.log_prob_is_bound or noise.log_prob_is_bound)

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """log p_mix(x) = logaddexp(log w + log p(x), log(1 − w) + log q(x)); shape (N,)."""
        x, _ = self.check_input(x, context)
        log_p, log_q = self.model.log_prob(x), self.noise.log_prob(x)
        dtype = torch.promote_types(log_p.dtype, log_q.dtype)
        w = self.weight
        return torch.logaddexp(math.log(w) + log_p.to(dtype), math.log1p(-w) + log_q.to(dtype))

    @torch.no_grad()
    def sample_with_source(self, n: int, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws and ``from_model`` (n,) bool: True where drawn from p (probability w)."""
        self.check_sample_args(n, context)
        k = int((torch.rand(n) < self.weight).sum())  # how many of the n come from p: Binomial(n, w)
        parts = ([self.model.sample(k)] if k else []) + ([self.noise.sample(n - k)] if k < n else [])
        x = torch.cat([part.reshape(len(part), *self.event_shape).to(parts[0].dtype) for part in parts])
        order = torch.randperm(n)  # shuffled, so that p's draws are not all first
        return x[order.to(x.device)], (order < k).to(x.device)

    def sample(self, n: int, context=None) -> torch.Tensor:
        """``n`` draws of p_mix: each from p with probability w, else from the noise q."""
        return self.sample_with_source(n, context)[0]
