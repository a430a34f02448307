"""The one model API every chapter shares.

A generative model in ``dgmlab`` is a :class:`torch.nn.Module` shaped like a
:mod:`torch.distributions` distribution (and like nflows' flows):

* ``event_shape`` -- the shape of one object, e.g. ``(1, 8, 8)``, and
  ``event_size`` its number of dimensions D (64): what bits *per dimension*
  divide by;
* ``log_prob(x, context=None)`` -- ``(N, *event_shape) -> (N,)``, in nats:
  exact, or a lower bound (see *Bounds* below);
* ``sample(n, context=None)`` -- ``n`` new objects, drawn without gradients;
* ``rsample(n, context=None)`` -- the same, differentiable with respect to the
  parameters (reparameterised), where sampling allows it (``has_rsample``);
* ``loss(x, context=None)`` -- what training minimises; by default the mean
  negative log-likelihood, the Monte-Carlo estimate of KL(π ‖ p) up to the
  data's entropy.

**Conditioning** has one name, ``context``: a class label per object, or a
vector per object (``context_shape``), required or optional. ``sample`` also
takes a single context for all ``n`` objects (``sample(8, context=3)``).

**Bounds and their tightness.** A latent-variable model cannot compute
log p(x); its ``log_prob`` returns a lower bound (the ELBO, a dequantization
bound) and the class sets ``log_prob_is_bound = True``, so reports say
"NLL ≤". A bound that tightens with more work takes the keyword ``k``:
``log_prob(x, context, k=...)`` averages k importance weights inside the log
(k = 1 is the plain bound; in expectation the bound never falls as k grows and
reaches log p(x) as k → ∞, Burda et al. 2015). :func:`dgmlab.metrics.heldout_nll`
passes ``k`` on. A model that is exact up to an *estimated* normaliser (an
RBM's log Z by annealed importance sampling) keeps ``log_prob_is_bound =
False`` and exposes the estimate's standard error as ``log_normalizer_stderr``,
which :func:`~dgmlab.metrics.heldout_nll` adds to its error bar. Every family
then reports the same way: exact, bound, or estimate with its error.

**No likelihood.** A likelihood-free model (a GAN, Chapter 7) sets
``has_log_prob = False``: its ``log_prob`` and ``loss`` raise
``NotImplementedError`` saying so, and it is judged by its samples.

**Training.** :func:`dgmlab.train.fit` asks the model what to minimise:
:meth:`GenerativeModel.training_losses` yields (optimiser name, loss) pairs for
one batch, and :meth:`GenerativeModel.optimizer_parameters` says which
parameters each named optimiser trains. The default is one optimiser,
``"model"``, minimising :meth:`loss`; a GAN alternates two.

**Input checks** happen once, at the public boundary: ``log_prob`` and
``sample`` call :meth:`check_input` / :meth:`check_sample_args`, which
compare shapes (free) and, while :func:`dgmlab.validate.validation` is on,
the values against ``support`` (one device sync). A layer inside a model
that checks its inputs' values (a logit's domain) does so only while
validation is on. :func:`dgmlab.train.fit` checks its whole data set once,
then trains with value checks off.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributions import constraints

from .validate import as_tensor, check_positive_int, validation_enabled

__all__ = ["GenerativeModel", "count_parameters", "module_device", "constraints"]


class GenerativeModel(nn.Module):
    """Base class: subclasses call ``super().__init__(event_shape, ...)`` and implement
    :meth:`log_prob` and :meth:`sample` (or :meth:`rsample`, which gives ``sample`` for free).

    ``event_shape`` ``()`` means scalar objects, a batch of shape (N,).
    ``support`` is a :mod:`torch.distributions.constraints` object for the
    values of x (``constraints.real``, ``constraints.integer_interval(0, 16)``,
    ``constraints.boolean``). ``context_shape`` is the shape of one object's
    context (``()`` for a class label, ``(d,)`` for a vector; None: the model
    is unconditional) and ``context_support`` its values;
    ``context_optional=True`` lets the context be left out (a joint model p(x, y)
    scores x alone by its marginal).
    """

    log_prob_is_bound: bool = False  # True: log_prob is a lower bound on log p(x)
    has_log_prob: bool = True  # False: likelihood-free (a GAN): log_prob raises, judge its samples
    has_rsample: bool = False  # True: rsample draws differentiable samples

    def __init__(self, event_shape=(), *, support: constraints.Constraint = constraints.real,
                 context_shape=None, context_support: constraints.Constraint = constraints.real,
                 context_optional: bool = False):
        super().__init__()
        self.event_shape = _shape(event_shape, "event_shape")
        self.event_size = math.prod(self.event_shape)
        self.support = support
        self.context_shape = None if context_shape is None else _shape(context_shape, "context_shape")
        self.context_support = context_support
        self.context_optional = bool(context_optional)

    # -- what every model defines ----------------------------------------------------------
    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density (or a documented lower bound) of each object of ``x``, in nats: shape (N,)."""
        raise NotImplementedError(f"{type(self).__name__} does not define log_prob(x).")

    def sample(self, n: int, context=None) -> torch.Tensor:
        """Draw ``n`` objects, shape ``(n, *event_shape)``, without gradients."""
        if not self.has_rsample:
            raise NotImplementedError(f"{type(self).__name__} does not define sample(n).")
        with torch.no_grad():
            return self.rsample(n, context)

    def rsample(self, n: int, context=None) -> torch.Tensor:
        """Draw ``n`` objects through a differentiable map of parameter-free noise."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot draw differentiable samples (its sampling is discrete "
            "or step by step): use sample(n), which draws without gradients.")

    def loss(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood of the batch: -1/N Σ log p(x_i)."""
        log_p = self.log_prob(x) if context is None else self.log_prob(x, context)
        return -log_p.mean()

    # -- what the training loop asks ------------------------------------------------------
    def training_losses(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                        step: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """The losses of one training batch, as (optimiser name, loss) pairs, in order.

        :func:`dgmlab.train.fit` steps the named optimiser on each loss before it
        asks for the next one, so a GAN can yield ``("discriminator", ...)`` and
        then ``("generator", ...)``, computed against the updated discriminator.
        ``step`` counts the batches trained on since the start (a resumed run goes
        on counting), for schedules by step (a VAE's β, a dVAE's temperature) and
        for "k discriminator steps per generator step". The default: one loss.
        """
        yield "model", self.loss(x, context)

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters of each named optimiser (default: all of them, ``"model"``)."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    # -- input checks, at the public boundary ----------------------------------------------
    def check_input(self, x, context=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` of shape ``(N, *event_shape)`` (or flattened ``(N, D)``) with values in the
        support, and its context; returns both as tensors, x reshaped to the event shape."""
        x = as_tensor(x, "x")
        flat_ok = len(self.event_shape) > 1 and x.dim() == 2 and x.shape[1] == self.event_size
        if x.dim() == 0 or (tuple(x.shape[1:]) != self.event_shape and not flat_ok):
            raise ValueError(f"{type(self).__name__} expects x of shape {_batch_of(self.event_shape)}"
                             f"{'' if len(self.event_shape) < 2 else f' or (N, {self.event_size})'}"
                             f"{_meaning(self.event_shape)}, got {tuple(x.shape)}.")
        n = len(x)
        x = x.reshape(n, *self.event_shape)
        _check_values(x, self.support, "x")
        return x, self._check_context(context, n)

    def check_sample_args(self, n: int, context=None) -> torch.Tensor | None:
        """Check ``n`` and the context of ``sample(n, context)``; one context serves all n."""
        return self._check_context(context, check_positive_int(n, "n"))

    def _check_context(self, context, n: int) -> torch.Tensor | None:
        name = type(self).__name__
        if self.context_shape is None:
            if context is not None:
                raise ValueError(f"{name} is unconditional (not conditional on anything): "
                                 "call it without a context.")
            return None
        want = _batch_of(self.context_shape).replace("N", str(n))
        if context is None:
            if self.context_optional:
                return None
            what = "pass labels as context, of shape" if _is_discrete(self.context_support) else \
                "pass a context of shape"
            raise ValueError(f"{name} is conditional: {what} {want}.")
        context = as_tensor(context, "context")
        if tuple(context.shape) == self.context_shape:  # one context for every object
            context = context.expand(n, *self.context_shape)
        if tuple(context.shape) != (n, *self.context_shape):
            raise ValueError(f"context should have shape {want}, got {tuple(context.shape)}.")
        if _is_discrete(self.context_support) and context.is_floating_point():
            raise TypeError("context should hold integer class labels; convert it with .long().")
        _check_values(context, self.context_support, "context")
        return context

    # -- conveniences ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter or buffer (CPU if it has none)."""
        return module_device(self)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's first floating-point parameter or buffer (float32 if none)."""
        for t in [*self.parameters(), *self.buffers()]:
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def num_parameters(self) -> int:
        """Number of trainable scalars."""
        return count_parameters(self)


def _shape(shape, name: str) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{name} should be a tuple of positive integers, got {shape!r}.")
    return shape


def _batch_of(shape: tuple[int, ...]) -> str:
    """The shape of a batch of N objects of ``shape``, as text: "(N, 1, 8, 8)", "(N,)"."""
    return "(" + ", ".join(["N", *map(str, shape)]) + ("," if not shape else "") + ")"


def _meaning(shape: tuple[int, ...]) -> str:
    if len(shape) == 3:
        return f" ({shape[0]} colour channel(s) of {shape[1]}×{shape[2]} pixels)"
    return f" ({shape[0]} features)" if len(shape) == 1 else ""


def _is_discrete(support: constraints.Constraint) -> bool:
    return bool(getattr(support, "is_discrete", False))


def _check_values(t: torch.Tensor, support: constraints.Constraint, name: str) -> None:
    """Values outside the support raise; the check reads the data, so it runs only while
    :func:`dgmlab.validate.validation` is on."""
    if not _is_discrete(support) and not t.is_floating_point():
        raise TypeError(f"{name} should hold floating-point values, got {t.dtype}; "
                        f"convert it with {name}.float().")
    if not validation_enabled() or t.numel() == 0 or bool(support.check(t).all()):
        return
    if not _is_discrete(support):
        raise ValueError(f"{name} contains NaN values.")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"{name} should hold integer levels (whole numbers), e.g. "
                         "embedded.digits(...).x rather than its [0, 1] version.")
    lo, hi = (0, 1) if support is constraints.boolean else (support.lower_bound, support.upper_bound)
    raise ValueError(f"{name} should lie in [{lo}, {hi}], but its values span "
                     f"[{t.min().item():g}, {t.max().item():g}].")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def module_device(module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``module``'s first parameter or buffer; ``default`` if it has none.

    Anything that is not an ``nn.Module`` (a plain object with ``log_prob``) gets
    ``default`` too.
    """
    if isinstance(module, nn.Module):
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
    return torch.device(default)
