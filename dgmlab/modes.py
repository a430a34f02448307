"""Fast mode (the default) and full mode, chosen by one setting.

* **fast** -- the embedded digits, small models, seconds on a laptop CPU. Every
  notebook runs top to bottom in about a minute, and that is what the book and
  the tests execute.
* **full** -- MNIST / CIFAR-10 from their canonical files and GPU-sized models.
  On when a CUDA GPU is present, or when ``DGMLAB_FULL=1``; ``DGMLAB_FULL=0``
  forces fast mode even on a GPU machine (what the tests do, so that stored
  notebook outputs stay comparable).

Full-size notebook cells are tagged ``full-size`` and start with::

    if modes.full_size("train X on MNIST for 20 epochs", expected="~93 nats"):
        ...

In fast mode :func:`full_size` prints what the cell would run and returns False,
so the cell never silently does nothing.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass

import torch

__all__ = ["Mode", "current", "device", "full_size", "config", "is_smoke",
           "FULL_ENV", "DEVICE_ENV", "SMOKE_ENV"]

FULL_ENV = "DGMLAB_FULL"
DEVICE_ENV = "DGMLAB_DEVICE"
SMOKE_ENV = "DGMLAB_SMOKE"  # tests only: full-size cells run their code path with tiny settings
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Mode:
    """The active mode: ``full`` or not, the device to use, and why."""

    full: bool
    device: torch.device
    reason: str

    @property
    def name(self) -> str:
        return "full" if self.full else "fast"


def _best_device() -> torch.device:
    """The fastest available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def current() -> Mode:
    """Read the mode from the environment (``DGMLAB_FULL``, ``DGMLAB_DEVICE``)."""
    raw = os.environ.get(FULL_ENV, "").strip().lower()
    if raw in _TRUE:
        full, reason = True, f"{FULL_ENV}={raw}"
    elif raw in _FALSE:
        full, reason = False, f"{FULL_ENV}={raw}"
    elif raw == "":
        full = torch.cuda.is_available()
        reason = "a CUDA GPU is present" if full else "no GPU found and DGMLAB_FULL is not set"
    else:
        raise ValueError(
            f"{FULL_ENV} should be 1 (full size) or 0 (fast), got {raw!r}."
        )
    dev = os.environ.get(DEVICE_ENV, "").strip()
    if dev:
        try:
            device = torch.device(dev)
        except RuntimeError as err:
            raise ValueError(f"{DEVICE_ENV}={dev!r} is not a device torch knows: {err}") from None
    else:
        # Fast mode stays on the CPU: the models are tiny, and CPU results are
        # the ones stored in the notebooks.
        device = _best_device() if full else torch.device("cpu")
    return Mode(full=full, device=device, reason=reason)


def device() -> torch.device:
    """The device the active mode trains on."""
    return current().device


def full_size(what: str, *, expected: str | None = None) -> bool:
    """Gate a full-size cell: True in full mode; in fast mode, say what it would run.

    ``what`` describes the run (data, model, epochs); ``expected`` the figure it
    should reach, e.g. ``"about 1.05 bits/dim"``.
    """
    mode = current()
    if mode.full:
        lines = [f"Full mode ({mode.reason}) on {mode.device}: {what}."]
    else:
        lines = [f"Fast mode: skipped a full-size run. In full mode this cell would {what}."]
    if expected:
        lines.append(f"Expected result: {expected}.")
    if not mode.full:
        lines.append(f"Run it on a GPU, or set {FULL_ENV}=1 before starting Jupyter.")
    # wrapped to fit a notebook or book column without scrolling sideways
    print("\n".join(textwrap.fill(line, width=78, subsequent_indent="  ") for line in lines))
    return mode.full


def is_smoke() -> bool:
    """True when ``DGMLAB_SMOKE=1``: the test suite running full-size cells on tiny data."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in _TRUE


def config(*, full: dict, smoke: dict) -> dict:
    """The settings of a full-size cell: ``full`` normally, ``smoke`` in the tests.

    The test suite runs every full-size cell end to end on tiny fake data with
    ``DGMLAB_SMOKE=1``; the cell's code path is the same, only these numbers
    (sizes, epochs, time budgets) shrink. Both dicts must have the same keys.
    """
    if set(full) != set(smoke):
        raise ValueError(f"full and smoke settings must have the same keys; they differ in "
                         f"{sorted(set(full) ^ set(smoke))}.")
    chosen = dict(smoke if is_smoke() else full)
    print("Configuration:", ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return chosen
