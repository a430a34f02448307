"""Plots in one consistent style: image grids, 2-D densities, samples, curves.

Importing this module changes nothing in matplotlib: a notebook opts in to the
course style (:data:`STYLE`) with :func:`use_style`. Every function draws on a given ``ax`` (or a fresh one), labels what it draws,
and returns the axes so cells can add to them.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from collections.abc import Callable, Mapping

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch

from .validate import check_positive_int

__all__ = [
    "STYLE",
    "PALETTE",
    "use_style",
    "subplots",
    "image_grid",
    "density_heatmap",
    "density_grid",
    "scatter_samples",
    "training_curves",
    "show_source",
]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]

STYLE = {
    "figure.dpi": 90,
    "savefig.dpi": 90,
    "figure.figsize": (6.0, 3.6),
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "axes.prop_cycle": mpl.cycler(color=PALETTE),
    "legend.frameon": False,
    "image.cmap": "viridis",
    "lines.linewidth": 1.8,
}


def use_style() -> None:
    """Apply the course style to matplotlib, for the rest of the session (a notebook's first cell)."""
    mpl.rcParams.update(STYLE)


def subplots(nrows: int = 1, ncols: int = 1, *, size: float = 3.0, **kwargs):
    """``plt.subplots`` with square-ish panels of ``size`` inches."""
    kwargs.setdefault("figsize", (size * ncols, size * nrows))
    return plt.subplots(nrows, ncols, **kwargs)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _mosaic(images: np.ndarray, nrow: int, pad: int, pad_value: float) -> np.ndarray:
    n, c, h, w = images.shape
    ncol = math.ceil(n / nrow)
    out = np.full((c, nrow * (h + pad) - pad, ncol * (w + pad) - pad), pad_value, dtype=np.float32)
    for k in range(n):
        r, q = divmod(k, ncol)
        out[:, r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = images[k]
    return out


def image_grid(
    images,
    *,
    nrow: int | None = None,
    ax=None,
    title: str | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = None,
    cmap: str = "gray_r",
    pad: int = 1,
):
    """Show a batch of images ``(N, C, H, W)`` or ``(N, H, W)`` (C = 1 or 3) as one mosaic.

    Grey images are drawn dark-on-light (ink is dark); ``vmax`` defaults to
    the data's maximum (1 for [0, 1] images, 16 for digit levels). Colour
    images must lie in [0, 1] or 0..255.
    """
    x = _to_numpy(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ValueError(
            f"images should have shape (N, C, H, W) with C = 1 or 3, or (N, H, W); got {tuple(x.shape)}."
        )
    if nrow is None:
        nrow = max(1, math.isqrt(len(x)))  # about square
    else:
        nrow = check_positive_int(nrow, "nrow")
    ax = _square_axes(ax)
    if x.shape[1] == 3:
        if x.max() > 1.0:
            x = x / 255.0
        mosaic = _mosaic(x, nrow, pad, 1.0).transpose(1, 2, 0)
        ax.imshow(np.clip(mosaic, 0, 1), interpolation="nearest")
    else:
        top = float(x.max()) if vmax is None else vmax
        top = top if top > 0 else 1.0
        mosaic = _mosaic(x, nrow, pad, (vmin or 0.0) + 0.15 * (top - (vmin or 0.0)))
        ax.imshow(mosaic[0], cmap=cmap, vmin=vmin, vmax=top, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def _extent_pair(extent) -> tuple[tuple[float, float], tuple[float, float]]:
    ext = tuple(extent)
    if len(ext) == 2 and all(np.isscalar(e) for e in ext):
        return (float(ext[0]), float(ext[1])), (float(ext[0]), float(ext[1]))
    if len(ext) == 2 and all(len(e) == 2 for e in ext):
        return (float(ext[0][0]), float(ext[0][1])), (float(ext[1][0]), float(ext[1][1]))
    raise ValueError(f"extent should be (lo, hi) or ((xlo, xhi), (ylo, yhi)), got {extent!r}.")


def _square_axes(ax):
    return ax if ax is not None else plt.subplots(figsize=(3.2, 3.2))[1]


def _label_plane(ax, title: str | None):
    """Name the axes of the data plane (x₁, x₂) and set the title."""
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title:
        ax.set_title(title)
    return ax


@torch.no_grad()
def density_grid(log_prob: Callable[[torch.Tensor], torch.Tensor], extent, resolution: int = 200):
    """Evaluate ``log_prob`` on a square grid: returns ``(xs, ys, log_density)`` with shape (res, res)."""
    check_positive_int(resolution, "resolution")
    (x0, x1), (y0, y1) = _extent_pair(extent)
    xs = torch.linspace(x0, x1, resolution)
    ys = torch.linspace(y0, y1, resolution)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    lp = log_prob(pts)
    if isinstance(lp, torch.Tensor):
        lp = lp.detach().cpu()
    lp = torch.as_tensor(lp, dtype=torch.float32).reshape(resolution, resolution)
    return xs.numpy(), ys.numpy(), lp.numpy()


def density_heatmap(
    density,
    extent,
    *,
    resolution: int = 200,
    ax=None,
    title: str | None = None,
    cmap: str = "viridis",
    log: bool = False,
):
    """Heat map of a 2-D density: ``density`` is a model/toy with ``log_prob``, or a callable.

    Shows p(x) (or log p(x) with ``log=True``) over ``extent``.
    """
    fn = density.log_prob if hasattr(density, "log_prob") else density
    if not callable(fn):
        raise TypeError("density should have a log_prob method or be a callable returning log-densities.")
    xs, ys, lp = density_grid(fn, extent, resolution)
    values = lp if log else np.exp(lp)
    if log:
        finite = values[np.isfinite(values)]
        floor = finite.max() - 12 if finite.size else 0.0
        values = np.where(np.isfinite(values), np.maximum(values, floor), floor)
    ax = _square_axes(ax)
    ax.imshow(values, origin="lower", extent=(xs[0], xs[-1], ys[0], ys[-1]), cmap=cmap,
              aspect="equal", interpolation="bilinear")
    return _label_plane(ax, title)


def scatter_samples(
    samples,
    *,
    ax=None,
    title: str | None = None,
    extent=None,
    color: str | None = None,
    label: str | None = None,
    s: float = 2.0,
    alpha: float = 0.5,
):
    """Scatter plot of 2-D points ``(N, 2)``, square and optionally clipped to ``extent``."""
    x = _to_numpy(samples)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"samples should have shape (N, 2), got {tuple(x.shape)}.")
    ax = _square_axes(ax)
    ax.scatter(x[:, 0], x[:, 1], s=s, alpha=alpha, color=color or PALETTE[0], label=label,
               linewidths=0, rasterized=True)
    if extent is not None:
        (x0, x1), (y0, y1) = _extent_pair(extent)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    return _label_plane(ax, title)


def training_curves(
    history,
    *,
    ax=None,
    title: str | None = None,
    ylabel: str = "loss (nats)",
    logy: bool = False,
):
    """Train (and validation, if recorded) loss per epoch from a ``History`` or a dict of lists."""
    h = history.to_dict() if hasattr(history, "to_dict") else history
    if not isinstance(h, Mapping) or "train_loss" not in h:
        raise TypeError("history should be a train.History or a dict with a 'train_loss' list.")
    train = list(h["train_loss"])
    if not train:
        raise ValueError("history has no epochs to plot.")
    epochs = list(h.get("epoch") or range(1, len(train) + 1))
    ax = ax if ax is not None else plt.subplots(figsize=(4.5, 3.0))[1]
    ax.plot(epochs, train, label="train", color=PALETTE[0])
    val = list(h.get("val_loss") or [])
    if val:
        ax.plot(epochs[: len(val)], val, label="validation", color=PALETTE[1])
    best = h.get("best_epoch")
    if best is not None and val:
        ax.axvline(best, color="0.6", ls=":", lw=1, label=f"best (epoch {best})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    if title:
        ax.set_title(title)
    return ax



def show_source(obj, *, docstring: bool = False):
    """The library's own code of ``obj`` (a function, class or method), shown as a code block.

    A chapter shows the layer it teaches with this instead of a copy, so the page
    never drifts from what runs. The docstring is left out unless ``docstring``
    (the chapter's prose explains the code). Renders in Jupyter and in the book.
    """
    from IPython.display import Markdown

    try:
        lines, _ = inspect.getsourcelines(obj)
    except (TypeError, OSError) as err:
        raise TypeError(f"show_source needs a function, class or method of the library, got {obj!r} ({err}).")
    text = textwrap.dedent("".join(lines))
    if not docstring:
        text = _without_docstring(text)
    return Markdown(f"```python\n{text.rstrip()}\n```")


def _without_docstring(text: str) -> str:
    """``text`` (the source of one function or class) without its docstring's lines."""
    body = ast.parse(text).body[0].body
    first = body[0] if body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return text
    lines = text.splitlines(keepends=True)
    return "".join(lines[: first.lineno - 1] + lines[first.end_lineno:])
