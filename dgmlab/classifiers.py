"""Discriminative vs generative classification (Chapter 1, claim C4).

* :class:`LogisticRegression` models p(y | x) = softmax(W x + b) directly:
  C·D + C parameters. With pixels missing it can only guess them (here: the
  training mean) and hope.
* :class:`GaussianClassifier` models the joint p(x, y) = p(y) N(x; μ_y, Σ_y) and
  classifies by Bayes' rule: (C − 1) + C·D + C·D(D+1)/2 parameters. With pixels
  missing it *marginalises* them, which for a Gaussian means keeping the
  observed rows and columns of μ_y and Σ_y — exact, and no retraining.
"""

from __future__ import annotations

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
    "compare_classifiers",
]


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
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self.linear(x), y) + 0.5 * l2 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

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


def gaussian_marginal(mean: torch.Tensor, cov: torch.Tensor, observed: torch.Tensor):
    """Marginal of N(mean, cov) over the ``observed`` coordinates: (mean[o], cov[o][:, o]).

    Integrating the other coordinates out of a Gaussian just drops their rows
    and columns. ``mean`` (..., D), ``cov`` (..., D, D), ``observed`` (D,) bool.
    """
    observed = check_tensor(observed, "observed", ndim=1, kind="bool")
    if mean.shape[-1] != observed.numel() or cov.shape[-2:] != (observed.numel(), observed.numel()):
        raise ValueError(
            f"mean (..., D), cov (..., D, D) and observed (D,) disagree: "
            f"{tuple(mean.shape)}, {tuple(cov.shape)}, {tuple(observed.shape)}."
        )
    idx = observed.nonzero().squeeze(1)
    return mean[..., idx], cov[..., idx[:, None], idx]


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
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> "GaussianClassifier":
        """Closed-form MLE: class frequencies, class means, class covariances (+ shrinkage·I)."""
        x, y = _check_xy(x, y, self.dim)
        counts = torch.bincount(y, minlength=self.num_classes).double()
        if len(counts) > self.num_classes:
            raise ValueError(f"labels should be < {self.num_classes}, got {int(y.max())}.")
        if (counts < 2).any():
            missing = (counts < 2).nonzero().flatten().tolist()
            raise ValueError(f"every class needs at least 2 examples to fit a covariance; classes {missing} do not.")
        log_prior = (counts / counts.sum()).log()
        self.prior_logits.copy_((log_prior[:-1] - log_prior[-1]).float())
        eye = torch.eye(self.dim, dtype=torch.float64)
        for c in range(self.num_classes):
            xc = x[y == c].double()
            mu = xc.mean(0)
            centred = xc - mu
            cov = centred.T @ centred / len(xc) + self.shrinkage * eye  # MLE divides by n_c
            L = torch.linalg.cholesky(cov)
            L[range(self.dim), range(self.dim)] = L.diagonal().log()
            self.means[c] = mu.float()
            self.tril_entries[c] = L[self._rows, self._cols].float()
        return self

    # -- the model API ----------------------------------------------------------------
    def log_joint(self, x: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_o, y = c) for every class, shape (N, C); unobserved inputs are integrated out."""
        x, _ = self.check_input(x)
        observed = _check_observed(observed, x)
        if observed is None:
            return self._log_joint(x)
        out = x.new_empty(len(x), self.num_classes)
        cov = self.covariance
        # Rows sharing a mask share one marginal: group them to factorise once per mask.
        patterns, group = torch.unique(observed, dim=0, return_inverse=True)
        for g, pattern in enumerate(patterns):
            rows = (group == g).nonzero().squeeze(1)
            mean_o, cov_o = gaussian_marginal(self.means, cov, pattern)
            mvn = MultivariateNormal(mean_o, covariance_matrix=cov_o)
            out[rows] = mvn.log_prob(x[rows][:, None, pattern]) + self.log_prior
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



def compare_classifiers(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    masks: dict[str, torch.Tensor],
    *,
    num_classes: int = 10,
    l2: float = 1e-4,
    shrinkage: float = 1e-2,
) -> dict:
    """Fit both classifiers on ``train`` and score them on ``test`` under each observed-input mask.

    ``train``/``test`` are ``(x, y)`` with ``x`` (N, D) float; ``masks`` maps a
    name to an observed-input mask, (D,) or (N_test, D). Returns the two fitted
    models, their parameter counts and ``accuracy[mask name][model name]``.
    Used unchanged on the digits (fast mode) and on MNIST (full mode).
    """
    (x, y), (xt, yt) = train, test
    x, y = _check_xy(x, y)
    xt, yt = _check_xy(xt, yt, x.shape[1])
    models = {
        "discriminative": LogisticRegression(x.shape[1], num_classes).fit(x, y, l2=l2),
        "generative": GaussianClassifier(x.shape[1], num_classes, shrinkage=shrinkage).fit(x, y),
    }
    acc = {
        name: {kind: accuracy(m.predict(xt, None if mask is None else mask), yt) for kind, m in models.items()}
        for name, mask in masks.items()
    }
    return {"models": models, "parameters": classifier_parameter_counts(num_classes, x.shape[1]),
            "accuracy": acc}
