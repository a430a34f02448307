"""Units of likelihood: nats per image and bits per dimension.

A model's negative log-likelihood (NLL) in nats per object, ``L``, becomes bits
per dimension over ``D`` dimensions as ``L / (D ln 2)``. Continuous models of
8-bit images usually see the pixels rescaled to [0, 1] (divided by 256); the
rescaling shrinks volumes by 256 per dimension, so the density grows by the
same factor and the discrete NLL is the continuous one plus ``D log 256``.
That is the offset ``scale`` below adds back, which makes continuous and
discrete models comparable in bits/dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .base import module_device
from .validate import check_positive_int, check_tensor

__all__ = ["nats_to_bpd", "bpd_to_nats", "NLL", "heldout_nll"]

LN2 = math.log(2.0)


def nats_to_bpd(nll_nats, num_dims: int, *, scale: float = 1.0):
    """Bits per dimension from an NLL in nats per object.

    ``scale``: the factor the data were divided by before a continuous model saw
    them (256 for 8-bit pixels mapped to [0, 1]); its log is added per dimension.
    Works on floats and tensors alike.
    """
    check_positive_int(num_dims, "num_dims")
    if scale <= 0:
        raise ValueError(f"scale should be positive, got {scale}.")
    return (nll_nats + num_dims * math.log(scale)) / (num_dims * LN2)


def bpd_to_nats(bpd, num_dims: int, *, scale: float = 1.0):
    """Inverse of :func:`nats_to_bpd`: nats per object from bits per dimension."""
    check_positive_int(num_dims, "num_dims")
    if scale <= 0:
        raise ValueError(f"scale should be positive, got {scale}.")
    return bpd * num_dims * LN2 - num_dims * math.log(scale)


class NLL(NamedTuple):
    """Held-out NLL: mean and standard error in nats per object, and in bits/dim."""

    nats: float
    stderr: float
    bpd: float
    num_dims: int
    is_bound: bool

    def __str__(self) -> str:
        rel = "≤" if self.is_bound else "="
        return f"NLL {rel} {self.nats:.2f} ± {self.stderr:.2f} nats ({self.bpd:.3f} bits/dim)"


@torch.no_grad()
def heldout_nll(model, x: torch.Tensor, *, batch_size: int = 512, scale: float = 1.0,
                **log_prob_kwargs) -> NLL:
    """Mean negative ``model.log_prob`` over held-out data ``x`` of shape ``(N, ...)``.

    The model is put in eval mode for the evaluation and restored afterwards.
    When ``model.log_prob_is_bound`` is True, the result is an upper bound on
    the NLL and is reported as such; ``log_prob_kwargs`` (e.g. ``k=100``
    importance samples for a tighter bound) are passed on to ``log_prob``. A
    model with an estimated normaliser adds its ``log_normalizer_stderr`` to the
    error bar (see :mod:`dgmlab.base`).
    """
    x = check_tensor(x, "x")
    if x.dim() < 2 or len(x) < 1:
        raise ValueError(f"x should be a batch of shape (N, ...) with N ≥ 1, got {tuple(x.shape)}.")
    check_positive_int(batch_size, "batch_size")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    device = module_device(model)  # where its first parameter lives
    try:
        parts = [model.log_prob(x[i : i + batch_size].to(device), **log_prob_kwargs).double().cpu()
                 for i in range(0, len(x), batch_size)]
    finally:
        if was_training:
            model.train()
    logp = torch.cat(parts)
    if logp.shape != (len(x),):
        raise ValueError(
            f"model.log_prob should return one value per object, shape ({len(x)},), "
            f"got {tuple(logp.shape)}."
        )
    nll = -logp
    mean = nll.mean().item()
    stderr = (nll.std(unbiased=True).item() / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    stderr = math.hypot(stderr, getattr(model, "log_normalizer_stderr", 0.0))
    dims = int(x[0].numel())
    return NLL(mean, stderr, float(nats_to_bpd(mean, dims, scale=scale)), dims,
               bool(getattr(model, "log_prob_is_bound", False)))
