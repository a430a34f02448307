"""Energy-based models and restricted Boltzmann machines (Chapter 8).

An energy-based model gives every object an energy E(x) and the density

    p(x) = exp(−E(x)) / Z,        Z = Σ_x exp(−E(x))  (or ∫ … dx),

and Z, a sum over every possible object, is the whole difficulty: the energy
is cheap, the normaliser is not.

**The RBM** (Smolensky 1986; Hinton 2002) couples visible units v (D of them)
to hidden units h ∈ {0, 1}^H through a bipartite energy

    E(v, h) = −bᵀv − cᵀh − vᵀW h          (Bernoulli–Bernoulli, v ∈ {0, 1}^D),

so that each layer is independent given the other (claim C32):

    p(h_j = 1 | v) = σ(c_j + vᵀW_:j),     p(v_i = 1 | h) = σ(b_i + W_i: h),

and the hidden layer sums out in closed form, leaving the *free energy*

    F(v) = −log Σ_h exp(−E(v, h)) = −bᵀv − Σ_j softplus(c_j + vᵀW_:j),
    p(v) = exp(−F(v)) / Z.

:class:`RBM` is that model; :class:`GaussianRBM` has real visible units with
standard deviations σ_i, E(v, h) = Σ_i (v_i − b_i)²/(2σ_i²) − cᵀh − (v/σ)ᵀW h,
and p(v | h) = N(b + σ ⊙ W h, σ²).

**The partition function.** Summing over the *smaller* layer is exact:
:meth:`RBM.log_normalizer` enumerates 2^H hidden states (or 2^D visible ones),
in chunks, in float64, for up to :data:`ENUMERATION_LIMIT` units. Beyond that,
:func:`ais` (annealed importance sampling; Neal 2001, Salakhutdinov & Murray
2008) estimates log Z with a standard error, and :meth:`RBM.set_log_normalizer`
lets ``log_prob`` and :func:`dgmlab.metrics.heldout_nll` use the estimate.

**Training.** The log-likelihood gradient is data statistics minus model
statistics, −∂/∂θ [F(v_data)] + E_model[∂F/∂θ]. The model expectation is exact
by enumeration (``training="exact"``: the loss is the exact NLL), or replaced
by samples from a k-step Gibbs chain started at the data (``"cd"``, CD-k;
Hinton 2002) or kept running between batches (``"pcd"``; Tieleman 2008). A
sampled gradient is no gradient of a printed loss; as the training loop
documents (:mod:`dgmlab.train`), the model yields the surrogate
F(v_data) − F(v_model) with v_model detached, whose gradient *is* the CD
gradient (claim C31 measures its bias against the exact one).

**A neural EBM.** :class:`NeuralEBM` is an MLP energy on 2-D data, sampled by
Langevin dynamics (:func:`langevin`) from a replay buffer and trained
contrastively (Du & Mordatch 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModel, constraints
from .metrics import NLL, heldout_nll
from .validate import as_tensor, check_choice, check_positive_int, check_tensor

__all__ = [
    "RBM", "GaussianRBM", "ENUMERATION_LIMIT", "TRAINING_METHODS", "all_states",
    "rbm_gradient", "base_rate_bias", "ais_schedule", "ais", "AISEstimate", "heldout_nll_by_ais",
    "langevin", "NeuralEBM",
    "DIGITS_RBM", "DIGITS_RBM_TRAINING", "DIGITS_RBM_EPOCHS", "DIGITS_AIS",
    "MNIST_RBM", "MNIST_RBM_TRAINING", "MNIST_AIS", "TOY_EBM", "TOY_EBM_TRAINING", "TOY_EBM_POINTS",
]

ENUMERATION_LIMIT = 20  # the largest layer (in units) that log Z is summed over exactly: 2^20 states
TRAINING_METHODS = ("cd", "pcd", "exact")
_CHUNK = 2**14  # states per chunk of the enumeration

# Settings for the embedded 8×8 binary digits (embedded.digits(split, "binary")): an RBM small
# enough that its log Z, hence its test NLL, is exact. Trained by CD-1 for DIGITS_RBM_EPOCHS epochs
# (about 13 s on one shared core) it reached an exact test NLL of 18.69 nats (independent pixels:
# 25.38; MADE: 17.04). DIGITS_AIS came within 0.013 nats of the exact log Z of such an RBM (100
# epochs of CD-1) in three seeds, in about 1 s (linear schedule).
DIGITS_RBM = dict(hidden=16)
DIGITS_RBM_TRAINING = dict(batch_size=20, lr=3e-3, optimizer="adam")
DIGITS_RBM_EPOCHS = 200
DIGITS_AIS = dict(chains=100, temperatures=1000)
# Full size: binarized MNIST, 500 hidden units (Salakhutdinov & Murray 2008); AIS with their 14,500
# intermediate distributions and 100 chains. Not yet run at full size.
MNIST_RBM = dict(hidden=500, training="pcd", k=1, chains=100)
MNIST_RBM_TRAINING = dict(epochs=20, batch_size=100, lr=1e-3, optimizer="adam")
MNIST_AIS = dict(chains=100, temperatures=14500, schedule="piecewise")
# The 2-D neural EBM, on TOY_EBM_POINTS points of embedded.toy_density(name).sample(n, seed=0):
# about 15 s on one busy core for "eight_gaussians".
TOY_EBM = dict(hidden=(64, 64), buffer_size=5000, langevin_steps=30, step_size=1e-2, alpha=0.1, box=(-4.0, 4.0))
TOY_EBM_TRAINING = dict(epochs=20, batch_size=256, lr=1e-3, optimizer="adam")
TOY_EBM_POINTS = 5000


def all_states(n: int, *, device=None, dtype=torch.float64, start: int = 0,
               stop: int | None = None) -> torch.Tensor:
    """The binary vectors number ``start`` to ``stop`` (default: all 2^n) of length n, as rows."""
    stop = 2**n if stop is None else stop
    index = torch.arange(start, stop, device=device)
    bits = torch.arange(n, device=device)
    return ((index[:, None] >> bits) & 1).to(dtype)


# =============================================================================== RBMs
class _RBMBase(GenerativeModel):
    """What both RBMs share: free energy, Gibbs sampling, log Z, training, AIS hooks.

    A subclass defines the visible layer: :meth:`visible_energy` (the terms of E that
    involve v alone), :meth:`scaled` (the v that meets W), :meth:`visible_given_hidden`,
    :meth:`log_sum_visible` (−F(h): v summed or integrated out) and the annealed pieces.
    """

    def __init__(self, visible, hidden: int, *, support, training: str = "cd", k: int = 1,
                 chains: int | None = None, sample_steps: int = 1000, init_std: float = 0.01):
        super().__init__(visible, support=support)
        self.hidden = check_positive_int(hidden, "hidden")
        self.training_method = check_choice(training, "training", TRAINING_METHODS)
        self.k = check_positive_int(k, "k")
        self.num_chains = None if chains is None else check_positive_int(chains, "chains")
        self.sample_steps = check_positive_int(sample_steps, "sample_steps")
        D = self.event_size
        self.W = nn.Parameter(init_std * torch.randn(D, self.hidden))
        self.b = nn.Parameter(torch.zeros(D))  # visible biases
        self.c = nn.Parameter(torch.zeros(self.hidden))  # hidden biases
        self.chains: torch.Tensor | None = None  # the persistent chains of PCD (not saved)
        self.log_normalizer_estimate: float | None = None  # an AIS estimate of log Z, if set
        self.log_normalizer_stderr: float = 0.0

    # -- the energy and its conditionals (C32) -------------------------------------------------
    def hidden_logits(self, v: torch.Tensor) -> torch.Tensor:
        """c + vᵀW (v scaled by 1/σ for real units): p(h_j = 1 | v) = σ(logit_j). Shape (N, H)."""
        return self.c + self.scaled(v) @ self.W

    def hidden_given_visible(self, v: torch.Tensor) -> torch.distributions.Bernoulli:
        """p(h | v) = Π_j Bernoulli(σ(c_j + vᵀW_:j)): a batch (N, H) of independent units."""
        return torch.distributions.Bernoulli(logits=self.hidden_logits(self._flat(v)), validate_args=False)

    def energy(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """E(v, h) = visible energy − cᵀh − (scaled v)ᵀW h, per row: shape (N,)."""
        v = self._flat(v)
        return self.visible_energy(v) - h @ self.c - ((self.scaled(v) @ self.W) * h).sum(-1)

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = −log Σ_h exp(−E(v, h)) = visible energy − Σ_j softplus(c_j + vᵀW_:j): shape (N,)."""
        v = self._flat(v)
        return self.visible_energy(v) - F.softplus(self.hidden_logits(v)).sum(-1)

    # -- block Gibbs sampling --------------------------------------------------------------------
    @torch.no_grad()
    def gibbs(self, v: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """``steps`` rounds of h ~ p(h | v), then v ~ p(v | h); returns v, shaped like the input."""
        check_positive_int(steps, "steps", allow_zero=True)
        shape, v = v.shape, self._flat(v)
        for _ in range(steps):
            h = torch.bernoulli(torch.sigmoid(self.hidden_logits(v)))
            v = self.visible_given_hidden(h).sample()
        return v.reshape(shape)

    def sample(self, n: int, context=None, *, steps: int | None = None,
               start: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` states after ``steps`` Gibbs rounds (default ``sample_steps``) from ``start``
        (n visible states) or from noise; only approximately from p(v) if the chain mixes slowly."""
        self.check_sample_args(n, context)
        steps = self.sample_steps if steps is None else steps
        if start is None:
            v = self.noise(n)
        else:
            v, _ = self.check_input(start)
            if len(v) != n:
                raise ValueError(f"start should hold n = {n} visible states, got {len(v)}.")
            v = self._flat(v.to(self.W))
        return self.gibbs(v, steps).reshape(n, *self.event_shape)

    def sampling_passes(self) -> int:
        """Network passes per sample: one per Gibbs round of :meth:`sample` (h given v, v given h)."""
        return self.sample_steps

    # -- the partition function -----------------------------------------------------------------
    def can_enumerate(self) -> bool:
        """Whether :meth:`log_normalizer` can sum over one layer exactly (≤ ENUMERATION_LIMIT units)."""
        return min(self.hidden, self._visible_states()) <= ENUMERATION_LIMIT

    def log_normalizer(self) -> torch.Tensor:
        """log Z, exactly: a log-sum-exp over the 2^m states of the smaller layer, in chunks, in
        float64 (differentiable: its gradient is the model statistics E_p[−∂E/∂θ])."""
        if not self.can_enumerate():
            raise ValueError(
                f"{type(self).__name__} with {self.event_size} visible and {self.hidden} hidden units is too large "
                f"to sum over exactly (2^{min(self.hidden, self.event_size)} states; the limit is "
                f"2^{ENUMERATION_LIMIT}). Estimate log Z by annealed importance sampling: "
                "model.set_log_normalizer(ebm.ais(model, data=x_train)), or in one call "
                "ebm.heldout_nll_by_ais(model, x_test, data=x_train).")
        by_hidden = self.hidden <= self._visible_states()
        m = self.hidden if by_hidden else self.event_size
        params64 = {name: p.double() for name, p in self.named_parameters()}  # differentiable casts
        parts = []
        for start in range(0, 2**m, _CHUNK):
            s = all_states(m, device=self.W.device, start=start, stop=min(2**m, start + _CHUNK))
            log_w = torch.func.functional_call(self, params64, (s, "hidden" if by_hidden else "visible"))
            parts.append(torch.logsumexp(log_w, 0))
        return torch.logsumexp(torch.stack(parts), 0).to(self.W.dtype)

    def set_log_normalizer(self, estimate: AISEstimate | None) -> _RBMBase:
        """Let ``log_prob`` use an estimate of log Z (an :class:`AISEstimate`; None: exact again).

        Its standard error becomes ``log_normalizer_stderr``, which
        :func:`dgmlab.metrics.heldout_nll` adds to its error bar. A training step forgets it.
        """
        self.log_normalizer_estimate = None if estimate is None else float(estimate.log_z)
        self.log_normalizer_stderr = 0.0 if estimate is None else float(estimate.stderr)
        return self

    def log_prob(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """log p(v) = −F(v) − log Z, exact (log Z by enumeration), or with the estimate set by
        :meth:`set_log_normalizer`."""
        v, _ = self.check_input(x, context)
        v = self._flat(v.to(self.W.dtype))
        if self.log_normalizer_estimate is not None:
            log_z = torch.tensor(self.log_normalizer_estimate, dtype=self.W.dtype, device=self.W.device)
        else:
            log_z = self.log_normalizer() if torch.is_grad_enabled() else self._log_normalizer_cached()
        return -self.free_energy(v) - log_z

    def _log_normalizer_cached(self) -> torch.Tensor:
        """log Z without gradients, summed again only when a parameter has changed (an optimiser
        step or a load bumps its version): evaluation in many batches sums once."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        if getattr(self, "_log_z_cache", (None,))[0] != key:
            self._log_z_cache = (key, self.log_normalizer().detach())
        return self._log_z_cache[1]

    # -- training (C31) --------------------------------------------------------------------------
    def training_losses(self, x, context=None, *, step: int = 0):
        """One batch's loss: the exact NLL (``"exact"``), or the surrogate F(v_data) − F(v_model),
        v_model drawn by k Gibbs steps from the data (``"cd"``) or from the persistent chains
        (``"pcd"``) and detached, so that its gradient is the CD / PCD gradient."""
        self.log_normalizer_estimate, self.log_normalizer_stderr = None, 0.0  # stale once θ moves
        v, _ = self.check_input(x, context)
        v = self._flat(v)
        if self.training_method == "exact":
            yield "model", -(-self.free_energy(v) - self.log_normalizer()).mean()
            return
        v_model = self.gibbs(self._chain_start(v), self.k)
        if self.training_method == "pcd":
            self.chains = v_model
        yield "model", self.free_energy(v).mean() - self.free_energy(v_model.detach()).mean()

    def _chain_start(self, v: torch.Tensor) -> torch.Tensor:
        """CD starts at the data; PCD continues its chains (started at the first batch it sees)."""
        if self.training_method == "cd":
            return v
        n = self.num_chains or len(v)
        if self.chains is None or self.chains.shape != (n, self.event_size) or self.chains.device != v.device \
                or self.chains.dtype != v.dtype:
            self.chains = v[torch.arange(n, device=v.device) % len(v)].clone()
        return self.chains

    # -- helpers ---------------------------------------------------------------------------------
    def _flat(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(len(v), self.event_size)

    def _visible_states(self) -> int | float:
        return math.inf  # real visible units cannot be enumerated

    def forward(self, states: torch.Tensor, layer: str) -> torch.Tensor:
        """Unnormalised log-probabilities of states of one layer, the terms of log Z's sum:
        −F(h) for ``layer="hidden"``, −F(v) for ``"visible"``."""
        return self.log_sum_visible(states) if layer == "hidden" else -self.free_energy(states)

class RBM(_RBMBase):
    """Bernoulli–Bernoulli RBM: binary v (``visible``: D or an image shape) and H binary hidden units.

    E(v, h) = −bᵀv − cᵀh − vᵀW h; W has shape (D, H). ``training``: ``"cd"`` (CD-k,
    ``k`` steps), ``"pcd"`` (persistent chains, ``chains`` of them; default: the batch
    size) or ``"exact"`` (enumeration; H or D ≤ 20). ``sample(n)`` runs ``sample_steps``
    Gibbs rounds from uniform noise.
    """

    def __init__(self, visible, hidden: int, *, training: str = "cd", k: int = 1,
                 chains: int | None = None, sample_steps: int = 1000, init_std: float = 0.01):
        super().__init__(visible, hidden, support=constraints.boolean, training=training, k=k,
                         chains=chains, sample_steps=sample_steps, init_std=init_std)

    def scaled(self, v: torch.Tensor) -> torch.Tensor:
        return v

    def visible_energy(self, v: torch.Tensor) -> torch.Tensor:
        """−bᵀv."""
        return -(v @ self.b)

    def visible_given_hidden(self, h: torch.Tensor) -> torch.distributions.Bernoulli:
        """p(v | h) = Π_i Bernoulli(σ(b_i + W_i: h))."""
        return torch.distributions.Bernoulli(logits=self.b + h @ self.W.T, validate_args=False)

    def log_sum_visible(self, h: torch.Tensor) -> torch.Tensor:
        """−F(h) = log Σ_v exp(−E(v, h)) = cᵀh + Σ_i softplus(b_i + W_i: h): shape (M,)."""
        return h @ self.c + F.softplus(self.b + h @ self.W.T).sum(-1)

    def noise(self, n: int) -> torch.Tensor:
        """Uniform random binary states, the start of ``sample``'s chains."""
        return torch.bernoulli(torch.full((n, self.event_size), 0.5, dtype=self.W.dtype, device=self.W.device))

    def init_from_data(self, x: torch.Tensor) -> RBM:
        """Visible biases set to the data's log-odds (base rates), as Hinton (2010) advises."""
        with torch.no_grad():
            self.b.copy_(base_rate_bias(x))
        return self

    def _visible_states(self) -> int:
        return self.event_size

    # AIS between the base-rate model p_A(v) ∝ exp(b_Aᵀv) (β = 0) and the RBM (β = 1).
    def annealed_log_weight(self, v, beta: float, base: torch.Tensor) -> torch.Tensor:
        """log p*_β(v) = ((1−β) b_A + β b)ᵀv + Σ_j softplus(β (c_j + vᵀW_:j))."""
        return v @ ((1 - beta) * base + beta * self.b) + F.softplus(beta * self.hidden_logits(v)).sum(-1)

    def annealed_gibbs(self, v, beta: float, base: torch.Tensor) -> torch.Tensor:
        """One Gibbs round that leaves p*_β invariant: h ~ σ(β(c + vW)), v ~ σ((1−β) b_A + β(b + W h))."""
        h = torch.bernoulli(torch.sigmoid(beta * self.hidden_logits(v)))
        return torch.bernoulli(torch.sigmoid((1 - beta) * base + beta * (self.b + h @ self.W.T)))

    def base_log_normalizer(self, base: torch.Tensor) -> torch.Tensor:
        """log Z_A = Σ_i softplus(b_A,i) + H log 2 (the H hidden units, unconnected, count too)."""
        return F.softplus(base).sum() + self.hidden * math.log(2.0)

    def base_sample(self, n: int, base: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(base).expand(n, -1))


class GaussianRBM(_RBMBase):
    """Gaussian–Bernoulli RBM: real v with standard deviations σ (``sigma``; learned if
    ``learn_sigma``), H binary hidden units.

    E(v, h) = Σ_i (v_i − b_i)²/(2σ_i²) − cᵀh − (v/σ)ᵀW h, so p(v | h) = N(b + σ ⊙ W h, σ²)
    and p(h_j = 1 | v) = σ(c_j + (v/σ)ᵀW_:j). Standardise the data (σ = 1 then fits).
    """

    def __init__(self, visible, hidden: int, *, sigma: float = 1.0, learn_sigma: bool = False,
                 training: str = "cd", k: int = 1, chains: int | None = None, sample_steps: int = 1000,
                 init_std: float = 0.01):
        super().__init__(visible, hidden, support=constraints.real, training=training, k=k,
                         chains=chains, sample_steps=sample_steps, init_std=init_std)
        if not sigma > 0:
            raise ValueError(f"sigma should be positive, got {sigma!r}.")
        self.log_sigma = nn.Parameter(torch.full((self.event_size,), math.log(sigma)),
                                      requires_grad=bool(learn_sigma))

    def scaled(self, v: torch.Tensor) -> torch.Tensor:
        return v / self.log_sigma.exp()

    def visible_energy(self, v: torch.Tensor) -> torch.Tensor:
        """Σ_i (v_i − b_i)² / (2σ_i²)."""
        return (0.5 * ((v - self.b) / self.log_sigma.exp()) ** 2).sum(-1)

    def visible_given_hidden(self, h: torch.Tensor) -> torch.distributions.Normal:
        """p(v | h) = N(b + σ ⊙ W h, σ²), independent units."""
        sigma = self.log_sigma.exp()
        return torch.distributions.Normal(self.b + sigma * (h @ self.W.T), sigma, validate_args=False)

    def log_sum_visible(self, h: torch.Tensor) -> torch.Tensor:
        """−F(h) = log ∫ exp(−E(v, h)) dv = cᵀh + Σ_i [a_i b_i/σ_i + a_i²/2 + log σ_i + ½ log 2π],
        a = W h (completing the square)."""
        a, sigma = h @ self.W.T, self.log_sigma.exp()
        return h @ self.c + (a * self.b / sigma + 0.5 * a**2).sum(-1) + (
            self.log_sigma.sum() + 0.5 * self.event_size * math.log(2 * math.pi))

    def noise(self, n: int) -> torch.Tensor:
        """Draws from N(b, σ²), the start of ``sample``'s chains."""
        sigma = self.log_sigma.exp().detach()
        return self.b.detach() + sigma * torch.randn(n, self.event_size, dtype=self.W.dtype, device=self.W.device)

    # AIS from N(b, σ²) with unconnected hidden units (β = 0) to the RBM (β = 1): W and c are annealed.
    def annealed_log_weight(self, v, beta: float, base=None) -> torch.Tensor:
        """log p*_β(v) = −Σ (v − b)²/(2σ²) + Σ_j softplus(β (c_j + (v/σ)ᵀW_:j))."""
        return -self.visible_energy(v) + F.softplus(beta * self.hidden_logits(v)).sum(-1)

    def annealed_gibbs(self, v, beta: float, base=None) -> torch.Tensor:
        """h ~ σ(β(c + (v/σ)W)), v ~ N(b + β σ ⊙ W h, σ²)."""
        h = torch.bernoulli(torch.sigmoid(beta * self.hidden_logits(v)))
        sigma = self.log_sigma.exp()
        return self.b + sigma * (beta * (h @ self.W.T) + torch.randn_like(v))

    def base_log_normalizer(self, base=None) -> torch.Tensor:
        """log Z_A = Σ_i log(√(2π) σ_i) + H log 2."""
        return self.log_sigma.sum() + 0.5 * self.event_size * math.log(2 * math.pi) + self.hidden * math.log(2.0)

    def base_sample(self, n: int, base=None) -> torch.Tensor:
        return self.noise(n)


# ========================================================================= gradients
def rbm_gradient(model: _RBMBase, x: torch.Tensor, *, method: str = "exact",
                 k: int = 1) -> dict[str, torch.Tensor]:
    """The gradient of the batch's NLL (``"exact"``) or its CD-k / PCD-k estimate, by parameter name.

    It is the gradient ``fit`` steps along (data statistics minus model statistics);
    the model's settings are left as they were.
    """
    check_choice(method, "method", TRAINING_METHODS)
    saved = model.training_method, model.k
    model.training_method, model.k = method, check_positive_int(k, "k")
    try:
        _, loss = next(model.training_losses(x))
    finally:
        model.training_method, model.k = saved
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if p.requires_grad])
    return dict(zip(names, grads))


# ==================================================================== AIS (C40)
class AISEstimate(NamedTuple):
    """An AIS estimate of log Z: ``log_z`` = log Z_A + log mean_m w_m, its standard error
    (delta method: sd(w) / (√M mean(w))), and the M chains' log-weights log w_m."""

    log_z: float
    stderr: float
    log_weights: torch.Tensor

    def __str__(self) -> str:
        return f"log Z ≈ {self.log_z:.3f} ± {self.stderr:.3f} ({len(self.log_weights)} chains)"


def base_rate_bias(x: torch.Tensor, *, pseudocount: float = 0.05) -> torch.Tensor:
    """Visible biases b_A = log(p / (1 − p)) of the independent model fitted to the data's
    pixel means p (smoothed by ``pseudocount`` per outcome, so that no bias is infinite)."""
    x = check_tensor(x, "x", kind="numeric")
    p = (x.reshape(len(x), -1).float().mean(0) * len(x) + pseudocount) / (len(x) + 2 * pseudocount)
    return torch.log(p) - torch.log1p(-p)


def ais_schedule(temperatures: int, kind: str = "linear", *, dtype=torch.float64) -> torch.Tensor:
    """Inverse temperatures 0 = β_0 < β_1 < … < β_K = 1 (K = ``temperatures``).

    ``"linear"``: evenly spaced. ``"piecewise"``: Salakhutdinov & Murray's (2008) proportions,
    500 steps on [0, 0.5], 4,000 on [0.5, 0.9] and 10,000 on [0.9, 1] (scaled to K), denser
    where the distributions change fastest.
    """
    K = check_positive_int(temperatures, "temperatures")
    check_choice(kind, "kind", ("linear", "piecewise"))
    if kind == "linear":
        return torch.linspace(0, 1, K + 1, dtype=dtype)
    n1, n2 = max(1, round(K * 500 / 14500)), max(1, round(K * 4000 / 14500))
    n3 = max(1, K - n1 - n2)
    pieces = [torch.linspace(lo, hi, n + 1, dtype=dtype)
              for lo, hi, n in ((0.0, 0.5, n1), (0.5, 0.9, n2), (0.9, 1.0, n3))]
    return torch.cat([pieces[0][:-1], pieces[1][:-1], pieces[2]])


@torch.no_grad()
def ais(model: _RBMBase, *, data: torch.Tensor | None = None, chains: int = 100, temperatures: int = 1000,
        schedule: str = "linear", seed: int | None = 0) -> AISEstimate:
    """Annealed importance sampling estimate of the RBM's log Z (Neal 2001; Salakhutdinov & Murray 2008).

    From p_0 = the base-rate model (fitted to ``data``; uniform if None; N(b, σ²) for a
    :class:`GaussianRBM`) to p_K = the RBM through p*_β, each of ``chains`` chains draws
    v_0 ~ p_0, then for k = 1..K adds log p*_k(v_{k−1}) − log p*_{k−1}(v_{k−1}) to its
    log-weight and moves v_k ~ T_k(v_{k−1}) (one Gibbs round leaving p_k invariant). Then
    Z ≈ Z_A · mean(w): unbiased in Z, so log Z is underestimated on average (Jensen).
    """
    chains = check_positive_int(chains, "chains")
    betas = ais_schedule(temperatures, schedule).tolist()
    base = _ais_base(model, data)
    if seed is None:
        return _ais_run(model, base, chains, betas)
    devices = [model.W.device] if model.W.device.type == "cuda" else []
    with torch.random.fork_rng(devices):  # seeded, without touching the caller's random stream
        torch.manual_seed(seed)
        return _ais_run(model, base, chains, betas)


def _ais_run(model: _RBMBase, base, chains: int, betas: list[float]) -> AISEstimate:
    """The chains of :func:`ais`: log-weights accumulated along the β schedule, then log-mean-exp."""
    v = model.base_sample(chains, base)
    log_w = torch.zeros(chains, dtype=v.dtype, device=v.device)
    for prev, beta in zip(betas[:-1], betas[1:]):
        log_w += model.annealed_log_weight(v, beta, base) - model.annealed_log_weight(v, prev, base)
        v = model.annealed_gibbs(v, beta, base)
    log_w = log_w.double()
    log_z = model.base_log_normalizer(base).double() + torch.logsumexp(log_w, 0) - math.log(chains)
    w = torch.exp(log_w - log_w.max())  # the weights up to a common factor
    stderr = (w.std() / (math.sqrt(chains) * w.mean())).item() if chains > 1 else math.inf
    return AISEstimate(log_z.item(), stderr, log_w.cpu())


def heldout_nll_by_ais(model: _RBMBase, x: torch.Tensor, *, data: torch.Tensor | None = None,
                       **ais_kwargs) -> tuple[NLL, AISEstimate]:
    """The held-out NLL of ``x`` with log Z estimated by :func:`ais` (``data``: the training set,
    for the base rates; ``ais_kwargs``: chains, temperatures, schedule, seed).

    NLL = mean F(x) + log Ẑ; its error bar combines the data's standard error with the
    estimate's (:func:`dgmlab.metrics.heldout_nll`). Returns the NLL and the estimate.
    """
    estimate = ais(model, data=data, **ais_kwargs)
    model.set_log_normalizer(estimate)
    return heldout_nll(model, x), estimate


def _ais_base(model: _RBMBase, data) -> torch.Tensor | None:
    if isinstance(model, GaussianRBM):
        return None
    if data is None:
        return torch.zeros(model.event_size, dtype=model.W.dtype, device=model.W.device)
    data = as_tensor(data, "data")
    if data[0].numel() != model.event_size:
        raise ValueError(f"data should hold visible states of {model.event_size} units, "
                         f"got shape {tuple(data.shape)}.")
    return base_rate_bias(data).to(model.W)


# ============================================================= a neural EBM on 2-D data
def langevin(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, steps: int = 100,
             step_size: float = 1e-2, noise: float = 1.0) -> torch.Tensor:
    """Unadjusted Langevin dynamics on p ∝ exp(−E): x ← x − (ε/2) ∇E(x) + noise · √ε ξ, ξ ~ N(0, I).

    With noise = 1 and ε → 0 its stationary law is p; a smaller ``noise`` (as in Du &
    Mordatch 2019) trades exactness for speed. Returns the final x, detached.
    """
    steps = check_positive_int(steps, "steps", allow_zero=True)
    if not step_size > 0:
        raise ValueError(f"step_size should be positive, got {step_size!r}.")
    x = x.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
            x = (x - 0.5 * step_size * grad + noise * math.sqrt(step_size) * torch.randn_like(x)).detach()
    return x


class NeuralEBM(nn.Module):
    """An MLP energy E_θ(x) on 2-D points, sampled by Langevin dynamics from a replay buffer.

    Training (through :func:`dgmlab.train.fit`) minimises the contrastive loss
    E(x_data) − E(x_sample) + α (E(x_data)² + E(x_sample)²): data pushed down, samples up,
    the squares keeping energies near 0. Samples come from ``langevin_steps`` steps started
    at the buffer (95 %) or at uniform noise on ``box`` (5 %), and go back into the buffer.
    Z is never computed: this model has no ``log_prob``.
    """

    def __init__(self, dim: int = 2, hidden: Sequence[int] = (128, 128), *, buffer_size: int = 10000,
                 langevin_steps: int = 40, step_size: float = 1e-2, noise: float = 1.0, alpha: float = 0.1,
                 box: tuple[float, float] = (-3.0, 3.0), restart: float = 0.05):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        sizes = [self.dim, *(check_positive_int(h, "hidden") for h in hidden), 1]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.buffer_size = check_positive_int(buffer_size, "buffer_size")
        self.langevin_steps = check_positive_int(langevin_steps, "langevin_steps")
        self.step_size, self.noise, self.alpha = float(step_size), float(noise), float(alpha)
        self.box, self.restart = (float(box[0]), float(box[1])), float(restart)
        self.buffer: torch.Tensor | None = None

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E_θ(x), shape (N,)."""
        return self.net(x).squeeze(-1)

    def uniform(self, n: int) -> torch.Tensor:
        """n points uniform on the box."""
        lo, hi = self.box
        p = next(self.parameters())
        return lo + (hi - lo) * torch.rand(n, self.dim, dtype=p.dtype, device=p.device)

    def sample(self, n: int, *, steps: int | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        """n points after ``steps`` Langevin steps (default: ten times the training chains') from
        ``start`` or uniform noise on the box."""
        n = check_positive_int(n, "n")
        x = self.uniform(n) if start is None else as_tensor(start, "start")
        return langevin(self.energy, x, steps=10 * self.langevin_steps if steps is None else steps,
                        step_size=self.step_size, noise=self.noise)

    def replay(self, n: int) -> torch.Tensor:
        """n chains for this batch: from the buffer, a fraction ``restart`` fresh from noise."""
        if self.buffer is None:
            self.buffer = self.uniform(self.buffer_size)
        idx = torch.randint(len(self.buffer), (n,), device=self.buffer.device)
        fresh = torch.rand(n, device=self.buffer.device) < self.restart
        start = torch.where(fresh[:, None], self.uniform(n), self.buffer[idx])
        x = langevin(self.energy, start, steps=self.langevin_steps, step_size=self.step_size, noise=self.noise)
        self.buffer[idx] = x
        return x

    def loss(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """E(x_data) − E(x_sample) + α (E(x_data)² + E(x_sample)²), batch means."""
        x = check_tensor(x, "x", shape=(None, self.dim))
        x_sample = self.replay(len(x))
        e_data, e_sample = self.energy(x), self.energy(x_sample)
        return e_data.mean() - e_sample.mean() + self.alpha * (e_data**2 + e_sample**2).mean()
