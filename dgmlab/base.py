"""The one model API every chapter shares.

A generative model in ``dgmlab`` is a :class:`torch.nn.Module` that can

* ``log_prob(x)`` -- score a batch, shape ``(N, ...) -> (N,)``, in nats; exact,
  or a documented lower bound (the ELBO, a dequantization bound);
* ``sample(n)``   -- draw ``n`` new objects, shape ``(n, ...)``;
* ``loss(x)``     -- the scalar the training loop minimises; by default the
  mean negative log-likelihood, i.e. the Monte-Carlo estimate of the forward
  KL divergence up to the data entropy.

This mirrors :mod:`torch.distributions` (``log_prob``/``sample``) so a student
who knows one knows the other.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GenerativeModel", "count_parameters", "module_device"]


class GenerativeModel(nn.Module):
    """Base class: subclasses implement :meth:`log_prob` and :meth:`sample`.

    Set the class attribute ``log_prob_is_bound = True`` when ``log_prob``
    returns a lower bound on the log-likelihood rather than its exact value,
    so that reports can say "NLL ≤" instead of "NLL =".
    """

    log_prob_is_bound: bool = False

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density (or a documented lower bound) of each row of ``x``, in nats."""
        raise NotImplementedError(f"{type(self).__name__} does not define log_prob(x).")

    def sample(self, n: int) -> torch.Tensor:
        """Draw ``n`` objects from the model."""
        raise NotImplementedError(f"{type(self).__name__} does not define sample(n).")

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the batch: -1/N Σ log p(x_i)."""
        return -self.log_prob(x).mean()

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter or buffer (CPU if it has none)."""
        return module_device(self)

    def num_parameters(self) -> int:
        """Number of trainable scalars."""
        return count_parameters(self)


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
