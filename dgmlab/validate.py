"""Input checks shared by every public function of ``dgmlab``.

A wrong shape or dtype deep inside a model gives a cryptic error three calls
later. These helpers fail at the door instead, with a message that says what
was expected, what arrived and what to do about it.

Shape and dtype checks cost nothing. Checks of the *values* (a range, whole
numbers, no NaN) read the data, which on a GPU means waiting for it: like
``torch.distributions``' ``validate_args``, they can be switched off with
:func:`validation`. :func:`dgmlab.train.fit` checks the whole data set once,
then trains with the value checks off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "validation",
    "validation_enabled",
    "as_tensor",
    "check_tensor",
    "check_probabilities",
    "check_positive_int",
    "check_choice",
]

_KINDS = {
    "float": lambda dt: dt.is_floating_point,
    "integer": lambda dt: (not dt.is_floating_point) and (not dt.is_complex) and dt != torch.bool,
    "bool": lambda dt: dt == torch.bool,
    "numeric": lambda dt: not dt.is_complex,
}


_ENABLED = True


def validation_enabled() -> bool:
    """Whether value checks (ranges, whole numbers, NaN) run; shape and dtype checks always do."""
    return _ENABLED


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Switch the value checks on or off inside a ``with`` block (restored after it)."""
    global _ENABLED
    before, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = before


def _format_shape(shape: Sequence[int | None | str]) -> str:
    parts = ["N" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def as_tensor(x, name: str = "x", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Turn a tensor, array or nested list into a tensor (no copy when possible)."""
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    if isinstance(x, (np.ndarray, list, tuple, int, float, np.number)):
        return torch.as_tensor(np.asarray(x), dtype=dtype)
    raise TypeError(
        f"{name} should be a torch.Tensor (or a NumPy array), got {type(x).__name__}."
    )


def check_tensor(
    x,
    name: str = "x",
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    kind: str | None = None,
    min: float | None = None,
    max: float | None = None,
    finite: bool = False,
    whole: bool = False,
    convert: bool = True,
) -> torch.Tensor:
    """Check a tensor's shape, dtype kind and value range; return it as a tensor.

    ``shape`` may hold ``None`` for any size (e.g. ``(None, 64)`` for a batch of
    64-dimensional vectors); ``kind`` is one of ``"float"``, ``"integer"``,
    ``"bool"`` or ``"numeric"``; ``min``/``max`` bound the values inclusively;
    ``whole`` asks for whole numbers of any dtype (discrete levels, not rescaled values).
    The value checks (``finite``, ``whole``, ``min``, ``max``) are skipped while
    :func:`validation` is off.
    """
    if convert:
        x = as_tensor(x, name)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} should be a torch.Tensor, got {type(x).__name__}.")
    _check_shape(x, name, ndim, shape)
    if kind is not None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}.")
        if not _KINDS[kind](x.dtype):
            hint = {"float": " Convert it with x.float().",
                    "integer": " Convert it with x.long() (after rounding, if it holds levels)."}.get(kind, "")
            raise TypeError(f"{name} should hold {kind} values, got dtype {x.dtype}.{hint}")
    if _ENABLED:
        _check_range(x, name, min, max, finite, whole)
    return x


def _check_shape(x: torch.Tensor, name: str, ndim, shape) -> None:
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} should have {want} dimensions, got {x.dim()} (shape {tuple(x.shape)}).")
    if shape is not None:
        if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            raise ValueError(f"{name} should have shape {_format_shape(shape)}, got {tuple(x.shape)}.")


def _check_range(x: torch.Tensor, name: str, min, max, finite: bool, whole: bool) -> None:
    """The value checks: they read the data (a device sync)."""
    if finite and x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    if whole and x.is_floating_point() and not torch.equal(x, x.round()):
        raise ValueError(f"{name} should hold whole numbers (integer levels, not rescaled values), "
                         "e.g. embedded.digits(...).x rather than its [0, 1] version.")
    if x.numel() and (min is not None or max is not None):
        lo, hi = x.min().item(), x.max().item()
        if (min is not None and lo < min) or (max is not None and hi > max):
            rng = f"[{'-inf' if min is None else min}, {'inf' if max is None else max}]"
            raise ValueError(f"{name} should lie in {rng}, but its values span [{lo:g}, {hi:g}].")


def check_probabilities(
    p, name: str = "p", *, dim: int = -1, atol: float = 1e-5
) -> torch.Tensor:
    """Check that ``p`` is non-negative and sums to one along ``dim``."""
    p = check_tensor(p, name, kind="float", finite=True)
    if p.numel() == 0:
        raise ValueError(f"{name} is empty: a distribution needs at least one outcome.")
    if (p < 0).any():
        raise ValueError(f"{name} has negative entries (smallest {p.min().item():g}).")
    total = p.sum(dim)
    if not torch.allclose(total, torch.ones_like(total), atol=atol, rtol=0):
        worst = (total - 1).abs().max().item()
        raise ValueError(
            f"{name} should sum to 1 along dim {dim}, but is off by up to {worst:.3g}. "
            "Normalise it (p / p.sum()) first."
        )
    return p


def check_positive_int(n, name: str = "n", *, allow_zero: bool = False) -> int:
    """Check that ``n`` is a (non-negative when ``allow_zero``) Python integer."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} should be an integer, got {type(n).__name__} ({n!r}).")
    if n < 0 or (n == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} should be {bound}, got {n}.")
    return int(n)


def check_choice(value, name: str, choices: Sequence) -> object:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        opts = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} should be one of {opts}; got {value!r}.")
    return value
