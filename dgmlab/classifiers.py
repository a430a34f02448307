"""Discriminative vs generative classification (Chapter 1, claim C4).

* :class:`LogisticRegression` models p(y | x) = softmax(W x + b) directly:
  C·D + C parameters. With pixels missing it can only guess them (here: the
  training mean) and hope.
* :class:`GaussianClassifier` models the joint p(x, y) = p(y) N(x; μ_y, Σ_y) and
  classifies by Bayes' rule: (C − 1) + C·D + C·D(D+1)/2 parameters. With pixels
  missing it *marginalises* them, which for a Gaussian means keeping the
  observed rows and columns of μ_y and Σ_y — exact, and no retraining.

Each has one hyper-parameter: the logistic regression's weight decay ``l2``
and the Gaussian classifier's covariance ``shrinkage`` s (Σ̂_y = S_y + s·I,
needed because pixels that never change within a class make S_y singular).
:func:`tune_on_validation` chooses either on a validation split, and
:func:`learning_curve` compares the two, both tuned, as the training set grows.
"""

from __future__ import annotations

import copy
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.distributions import MultivariateNormal

from .base import GenerativeModel, constraints
from .validate import check_positive_int, check_tensor

__all__ = [
    "classifier_parameter_counts",
    "LogisticRegression",
    "GaussianClassifier",
    "gaussian_marginal",
    "random_mask",
    "rows_mask",
    "accuracy",
    "zero_variance_inputs",
    "Tuned",
    "tune_on_validation",
    "compare_classifiers",
    "per_class_subset",
    "learning_curve",
    "L2_GRID",
    "SHRINKAGE_GRID",
]

# Hyper-parameter grids, strongest regularisation first (ties go to the first).
L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4)
SHRINKAGE_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


_SMALL = 1_000_000  # inputs (N·D) below which a problem runs on one CPU thread


@contextlib.contextmanager
def _one_thread(x: torch.Tensor) -> Iterator[None]:
    """Run a small problem (``x.numel()`` < ``_SMALL``) on one CPU thread.

    Fitting or scoring the digits is thousands of tiny tensor operations, which
    extra threads only slow down (badly on a busy machine); one thread also
    gives the same floating-point result whatever the machine's thread count.
    Large problems (MNIST) keep all threads.
    """
    threads = torch.get_num_threads()
    if isinstance(x, torch.Tensor) and x.numel() < _SMALL:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def classifier_parameter_counts(num_classes: int, dim: int) -> dict[str, int]:
    """Parameters of the two classifiers for C classes and D inputs."""
    c = check_positive_int(num_classes, "num_classes")
    d = check_positive_int(dim, "dim")
    return {
        "discriminative": c * d + c,
        "generative": (c - 1) + c * d + c * d * (d + 1) // 2,
    }


def _check_xy(x, y, dim=None):
    x = check_tensor(x, "x", ndim=2, kind="float", finite=True)
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"x should have {dim} features per row, got {x.shape[1]}.")
    if y is not None:
        y = check_tensor(y, "y", shape=(len(x),), kind="integer", min=0)
    return x, y


def _check_observed(observed, x):
    """Normalise a mask of observed inputs to shape (N, D) bool (None: all observed)."""
    if observed is None:
        return None
    observed = check_tensor(observed, "observed", kind="bool")
    if observed.shape == x.shape[1:]:
        observed = observed.expand_as(x)
    if observed.shape != x.shape:
        raise ValueError(
            f"observed should have shape (D,) = {tuple(x.shape[1:])} or (N, D) = {tuple(x.shape)}, "
            f"got {tuple(observed.shape)}."
        )
    if not observed.any(1).all():
        raise ValueError("every row needs at least one observed input; a row of the mask is all False.")
    return observed


class LogisticRegression(nn.Module):
    """Multinomial logistic regression p(y | x) = Cat(softmax(W x + b)): C·D + C parameters."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(check_positive_int(dim, "dim"), check_positive_int(num_classes, "num_classes"))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        # What a missing input is replaced by: the training mean (set by fit).
        self.register_buffer("fill_value", torch.zeros(dim))

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, max_iter: int = 300) -> "LogisticRegression":
        """Minimise the mean cross-entropy + (l2/2)‖W‖² with full-batch L-BFGS (deterministic)."""
        x, y = _check_xy(x, y, self.linear.in_features)
        if y.max() >= self.linear.out_features:
            raise ValueError(f"labels should be < {self.linear.out_features}, got {int(y.max())}.")
        self.fill_value.copy_(x.mean(0))
        opt = torch.optim.LBFGS(self.parameters(), lr=1.0, max_iter=max_iter,
                                history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-7, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self.linear(x), y) + 0.5 * l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with _one_thread(x):
            opt.step(closure)
        return self

    @torch.no_grad()
    def predict_log_proba(self, x: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y | x), shape (N, C); inputs not ``observed`` are replaced by the training mean."""
        x, _ = _check_xy(x, None, self.linear.in_features)
        observed = _check_observed(observed, x)
        if observed is not None:
            x = torch.where(observed, x, self.fill_value)
        return torch.log_softmax(self.linear(x), dim=1)

    def predict(self, x: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """The most probable class of each row, shape (N,)."""
        return self.predict_log_proba(x, observed).argmax(1)


def gaussian_marginal(mean: torch.Tensor, cov: torch.Tensor,
                      observed: torch.Tensor):
    """Marginal of N(mean, cov) over the ``observed`` coordinates: (mean[o], cov[o][:, o]).

    Integrating the other coordinates out of a Gaussian just drops their rows
    and columns. ``mean`` (..., D), ``cov`` (..., D, D), ``observed`` (D,) bool.
    """
    observed = check_tensor(observed, "observed", ndim=1, kind="bool")
    d = observed.numel()
    if mean.shape[-1] != d or cov.shape[-2:] != (d, d):
        shapes = tuple(mean.shape), tuple(cov.shape), tuple(observed.shape)
        raise ValueError("mean (..., D), cov (..., D, D) and observed (D,) "
                         "disagree: {}, {}, {}.".format(*shapes))
    idx = observed.nonzero().squeeze(1)  # the observed coordinates o
    return mean[..., idx], cov[..., idx[:, None], idx]  # μ_o and Σ_oo


class GaussianClassifier(GenerativeModel):
    """Generative classifier: p(x, y) = π_y N(x; μ_y, Σ_y), classification by Bayes' rule.

    Parameters, stored exactly: C − 1 free prior logits, C means of size D and
    C Cholesky factors of Σ_y (D(D+1)/2 entries each, the diagonal as logs).
    ``log_prob(x)`` is the exact marginal density of x (a Gaussian mixture);
    with a class label as ``context`` it is the class-conditional density log p(x | y).
    """

    def __init__(self, dim: int, num_classes: int, shrinkage: float = 1e-2):
        c = check_positive_int(num_classes, "num_classes")
        super().__init__(check_positive_int(dim, "dim"), context_shape=(), context_optional=True,
                         context_support=constraints.integer_interval(0, c - 1))
        self.dim = d = self.event_size  # D, as in the formulas above
        self.num_classes = c
        if shrinkage < 0:
            raise ValueError(f"shrinkage should be ≥ 0, got {shrinkage}.")
        self.shrinkage = float(shrinkage)
        self.prior_logits = nn.Parameter(torch.zeros(c - 1))
        self.means = nn.Parameter(torch.zeros(c, d))
        self.tril_entries = nn.Parameter(torch.zeros(c, d * (d + 1) // 2))
        rows, cols = torch.tril_indices(d, d)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    # -- parameters as distributions ------------------------------------------------
    @property
    def log_prior(self) -> torch.Tensor:
        """log p(y = c), shape (C,)."""
        free = torch.cat([self.prior_logits, self.prior_logits.new_zeros(1)])
        return torch.log_softmax(free, dim=0)

    @property
    def scale_tril(self) -> torch.Tensor:
        """Cholesky factors L_c with Σ_c = L_c L_cᵀ, shape (C, D, D)."""
        L = self.means.new_zeros(self.num_classes, self.dim, self.dim)
        L[:, self._rows, self._cols] = self.tril_entries
        diag = torch.arange(self.dim, device=L.device)
        L[:, diag, diag] = L[:, diag, diag].exp()  # the diagonal is stored as logs
        return L

    @property
    def covariance(self) -> torch.Tensor:
        L = self.scale_tril
        return L @ L.transpose(-1, -2)

    # -- fitting ------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor,
            y: torch.Tensor) -> "GaussianClassifier":
        """Closed-form MLE: class frequencies, means, covariances (+ shrinkage·I)."""
        x, y = _check_xy(x, y, self.dim)
        counts = torch.bincount(y, minlength=self.num_classes).double()
        self._check_counts(counts, y)
        log_prior = (counts / counts.sum()).log()
        self.prior_logits.copy_((log_prior[:-1] - log_prior[-1]).float())
        eye = torch.eye(self.dim, dtype=torch.float64)
        for c in range(self.num_classes):
            xc = x[y == c].double()
            mu = xc.mean(0)
            centred = xc - mu
            cov = centred.T @ centred / len(xc)  # the MLE S_c divides by n_c
            L, info = torch.linalg.cholesky_ex(cov + self.shrinkage * eye)
            if info > 0:
                raise ValueError(self._singular_message(c, xc))
            L[range(self.dim), range(self.dim)] = L.diagonal().log()  # as logs
            self.means[c] = mu.float()
            self.tril_entries[c] = L[self._rows, self._cols].float()
        return self

    def _check_counts(self, counts: torch.Tensor, y: torch.Tensor) -> None:
        if len(counts) > self.num_classes:
            raise ValueError(f"labels should be < {self.num_classes}, got {int(y.max())}.")
        if (counts < 2).any():
            missing = (counts < 2).nonzero().flatten().tolist()
            raise ValueError(f"every class needs at least 2 examples to fit a covariance; "
                             f"classes {missing} do not.")

    def _singular_message(self, c: int, xc: torch.Tensor) -> str:
        constant = int((xc == xc[0]).all(0).sum())
        why = [f"{constant} of its {self.dim} inputs never change in its {len(xc)} "
               "training examples (zero variance)"] if constant else []
        if len(xc) <= self.dim:
            why.append(f"{len(xc)} examples cannot span {self.dim} dimensions")
        reason = " and ".join(why) or "its inputs are linearly dependent"
        fix = "a larger shrinkage" if self.shrinkage else "shrinkage > 0, e.g. 0.01"
        return (f"the covariance of class {c} is singular with shrinkage "
                f"{self.shrinkage:g}: {reason}. Use {fix}.")

    # -- the model API ----------------------------------------------------------------
    def log_joint(self, x: torch.Tensor,
                  observed: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_o, y = c) for every class, shape (N, C); unobserved inputs integrated out."""
        x, _ = self.check_input(x)
        observed = _check_observed(observed, x)
        if observed is None:
            return self._log_joint(x)
        out = x.new_empty(len(x), self.num_classes)
        cov = self.covariance
        # Rows sharing a mask share one marginal: factorise once per mask.
        patterns, group = torch.unique(observed, dim=0, return_inverse=True)
        for g, o in enumerate(patterns):
            rows = (group == g).nonzero().squeeze(1)
            mean_o, cov_o = gaussian_marginal(self.means, cov, o)  # all classes
            mvn = MultivariateNormal(mean_o, covariance_matrix=cov_o)
            out[rows] = mvn.log_prob(x[rows][:, None, o]) + self.log_prior
        return out

    def _log_joint(self, x: torch.Tensor) -> torch.Tensor:
        mvn = MultivariateNormal(self.means, scale_tril=self.scale_tril, validate_args=False)
        return mvn.log_prob(x[:, None, :]) + self.log_prior

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(x) = log Σ_c p(x, y = c), or log p(x | y) given the labels y as ``context``."""
        x, y = self.check_input(x, context)
        if y is not None:
            mvn = MultivariateNormal(self.means[y], scale_tril=self.scale_tril[y], validate_args=False)
            return mvn.log_prob(x)
        return torch.logsumexp(self._log_joint(x), dim=1)

    @torch.no_grad()
    def predict_log_proba(self, x: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y | x_o) by Bayes' rule, shape (N, C)."""
        with _one_thread(x):  # one small Gaussian per pattern of observed inputs
            lj = self.log_joint(x, observed)
        return lj - torch.logsumexp(lj, dim=1, keepdim=True)

    def predict(self, x: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict_log_proba(x, observed).argmax(1)

    @torch.no_grad()
    def sample(self, n: int, context: torch.Tensor | int | None = None) -> torch.Tensor:
        """Draw ``n`` inputs: y ~ p(y) (or the class(es) given as ``context``), then x ~ N(μ_y, Σ_y)."""
        y = self.check_sample_args(n, context)
        if y is None:
            y = torch.multinomial(self.log_prior.exp(), n, replacement=True)
        y = y.to(self.device)
        z = torch.randn(n, self.dim, 1, device=self.device, dtype=self.dtype)
        return self.means[y] + (self.scale_tril[y] @ z).squeeze(-1)


def random_mask(n: int, dim: int, hidden_fraction: float, *, seed: int = 0) -> torch.Tensor:
    """Observed-input masks (n, dim): each row hides round(fraction·dim) inputs chosen at random."""
    check_positive_int(n, "n")
    check_positive_int(dim, "dim")
    if not 0 <= hidden_fraction < 1:
        raise ValueError(f"hidden_fraction should be in [0, 1), got {hidden_fraction}.")
    g = torch.Generator().manual_seed(seed)
    hidden = round(hidden_fraction * dim)
    order = torch.rand(n, dim, generator=g).argsort(dim=1)
    mask = torch.ones(n, dim, dtype=torch.bool)
    mask.scatter_(1, order[:, :hidden], False)
    return mask


def rows_mask(height: int, width: int, hidden_rows: int, *, from_top: bool = True) -> torch.Tensor:
    """One observed-input mask (height·width,) that hides ``hidden_rows`` rows of the image."""
    check_positive_int(height, "height")
    check_positive_int(width, "width")
    if not 0 <= hidden_rows < height:
        raise ValueError(f"hidden_rows should be in [0, {height}), got {hidden_rows}.")
    mask = torch.ones(height, width, dtype=torch.bool)
    if hidden_rows:
        if from_top:
            mask[:hidden_rows] = False
        else:
            mask[height - hidden_rows :] = False
    return mask.reshape(-1)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions."""
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape.")
    return (predicted == labels).float().mean().item()


def zero_variance_inputs(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inputs that never change within a class, shape (C, D) bool.

    Each such input gives the class covariance S_c a zero row and column, so
    S_c is singular and N(μ_c, S_c) has no density: the reason for shrinkage.
    """
    x, y = _check_xy(x, y)
    c = check_positive_int(num_classes, "num_classes")
    if y.max() >= c:
        raise ValueError(f"labels should be < {c}, got {int(y.max())}.")
    out = torch.zeros(c, x.shape[1], dtype=torch.bool)
    for k in range(c):
        xk = x[y == k]
        if len(xk):
            out[k] = (xk == xk[0]).all(0)
    return out


class Tuned(NamedTuple):
    """The outcome of :func:`tune_on_validation`."""

    value: float  # the chosen hyper-parameter
    model: object  # the classifier fitted with it
    scores: dict  # validation accuracy of every value tried


def tune_on_validation(
    fit: Callable[[float], object], grid: Sequence[float], val: tuple[torch.Tensor, torch.Tensor]
) -> Tuned:
    """Fit one classifier per value of ``grid`` and keep the best on the validation split.

    ``fit(value)`` returns a fitted classifier (with ``predict``); the score is
    the validation accuracy, and a tie goes to the value that comes first in
    ``grid`` (list the strongest regularisation first). The kept model is a
    copy, so ``fit`` may warm-start one model along the grid.
    """
    grid = list(grid)
    if not grid:
        raise ValueError("grid should hold at least one value to try.")
    xv, yv = _check_xy(*val)
    best, scores = None, {}
    for value in grid:
        model = fit(value)
        scores[value] = accuracy(model.predict(xv), yv)
        if best is None or scores[value] > scores[best.value]:
            best = Tuned(value, copy.deepcopy(model), scores)
    return best


def _as_grid(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _fit_both(x, y, val, l2, shrinkage, num_classes) -> dict[str, Tuned]:
    """Both classifiers, each tuned on ``val`` over its grid (or fitted with one value)."""
    dim = x.shape[1]
    logistic = LogisticRegression(dim, num_classes)  # warm-started along the l2 grid
    fits = {
        "discriminative": (lambda l2_: logistic.fit(x, y, l2=l2_), _as_grid(l2)),
        "generative": (lambda s: GaussianClassifier(dim, num_classes, shrinkage=s).fit(x, y),
                       _as_grid(shrinkage)),
    }
    out = {}
    for kind, (fit, grid) in fits.items():
        if val is None:
            if len(grid) > 1:
                raise ValueError(f"a grid of values for the {kind} classifier needs a "
                                 "validation split to choose from: pass val=(x, y).")
            out[kind] = Tuned(grid[0], fit(grid[0]), {})
        else:
            out[kind] = tune_on_validation(fit, grid, val)
    return out


def compare_classifiers(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    masks: dict[str, torch.Tensor | None],
    *,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_classes: int = 10,
    l2: float | Sequence[float] = 1e-4,
    shrinkage: float | Sequence[float] = 1e-2,
) -> dict:
    """Fit both classifiers on ``train`` and score them on ``test`` under each mask.

    ``train``/``val``/``test`` are ``(x, y)`` with ``x`` (N, D) float;
    ``masks`` maps a name to an observed-input mask, (D,) or (N_test, D), or
    None for whole inputs. ``l2`` and ``shrinkage`` are one value each, or
    grids to choose from on ``val`` (:func:`tune_on_validation`). Returns the
    fitted ``models``, their ``parameters``, the chosen values ``tuned``, the
    ``validation`` scores of every value tried and ``accuracy[mask][model]``.
    Used unchanged on the digits (fast mode) and on MNIST (full mode).
    """
    (x, y), (xt, yt) = train, test
    x, y = _check_xy(x, y)
    xt, yt = _check_xy(xt, yt, x.shape[1])
    if val is not None:
        val = _check_xy(*val, x.shape[1])
    with _one_thread(x):
        tuned = _fit_both(x, y, val, l2, shrinkage, num_classes)
    models = {kind: t.model for kind, t in tuned.items()}
    acc = {name: {kind: accuracy(m.predict(xt, mask), yt) for kind, m in models.items()}
           for name, mask in masks.items()}
    return {"models": models,
            "parameters": classifier_parameter_counts(num_classes, x.shape[1]),
            "tuned": {"l2": tuned["discriminative"].value,
                      "shrinkage": tuned["generative"].value},
            "validation": {kind: t.scores for kind, t in tuned.items()},
            "accuracy": acc}


def per_class_subset(y: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` examples of every class drawn at random (all of a smaller class)."""
    y = check_tensor(y, "y", ndim=1, kind="integer", min=0)
    n = check_positive_int(n, "n")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y):
        members = (y == c).nonzero().squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(picks).sort().values


def learning_curve(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    per_class: Sequence[int],
    *,
    repeats: int = 3,
    num_classes: int = 10,
    l2: Sequence[float] = L2_GRID,
    shrinkage: Sequence[float] = SHRINKAGE_GRID,
    seed: int = 0,
) -> dict:
    """Test accuracy of both classifiers trained on n examples per class, n in ``per_class``.

    For each n, ``repeats`` random training subsets (seeds ``seed``, ``seed`` + 1, …;
    one fit when n covers every class whole); on each, both classifiers are
    tuned on the whole validation split. Returns
    ``per_class`` and, per classifier, ``accuracy`` and the chosen ``value``s,
    tensors of shape (len(per_class), repeats).
    """
    (x, y), (xt, yt) = train, test
    x, y = _check_xy(x, y)
    xt, yt = _check_xy(xt, yt, x.shape[1])
    val = _check_xy(*val, x.shape[1])
    repeats = check_positive_int(repeats, "repeats")
    kinds = ("discriminative", "generative")
    acc = {kind: torch.zeros(len(per_class), repeats) for kind in kinds}
    chosen = {kind: torch.zeros(len(per_class), repeats, dtype=torch.float64) for kind in kinds}
    largest = int(torch.bincount(y).max())
    for i, n in enumerate(per_class):
        for r in range(repeats):
            if r and n >= largest:  # every subset is the whole set: fitted once
                for kind in kinds:
                    acc[kind][i, r], chosen[kind][i, r] = acc[kind][i, 0], chosen[kind][i, 0]
                continue
            idx = per_class_subset(y, n, seed=seed + r)
            with _one_thread(x[idx]):
                tuned = _fit_both(x[idx], y[idx], val, tuple(l2), tuple(shrinkage), num_classes)
                for kind, t in tuned.items():
                    acc[kind][i, r] = accuracy(t.model.predict(xt), yt)
                    chosen[kind][i, r] = t.value
    return {"per_class": list(per_class),
            **{kind: {"accuracy": acc[kind], "value": chosen[kind]} for kind in kinds}}
