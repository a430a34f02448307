"""Sample quality without downloaded weights: distances in a classifier's features.

A likelihood scores a model on the data; it says little about how its
*samples* look. Sample-based scores compare two sets of images instead, the
model's samples and held-out real data, in the features of a trained network.
FID and KID (Heusel et al. 2017; Bińkowski et al. 2018) use Inception-v3,
trained on ImageNet photographs: a 90 MB download whose features say little
about 8×8 digits. Here the feature map is the penultimate layer of a small
convolutional classifier trained *on the same data*, the usual substitute for
digits: it needs no download, trains in seconds (digits) or a minute (MNIST) on
a CPU, and its features separate exactly the classes a good model must
reproduce. Scores are therefore comparable within this course, not with
published Inception figures.

Every estimator here is biased by the sample size ``n`` (FD strongly, ~1/n),
so a number means little alone. Each model's score comes with the **real-data
floor**: the same score between two sets of real images, with the same ``n``:
what a perfect model would score. A model is as good as the data by a score
when it reaches the floor. Both real sets are held out from the classifier's
training (the digits' test and validation splits): the classifier has seen its
training images, whose features therefore sit apart from those of new images
(FD 1.01 for 299 training digits against the test split, 0.49 for the 299
validation digits), so a floor drawn from them would be too high. The features
know digits, not the world: over a third of uniform-noise images land inside
the digits' k-NN manifold.

Scores, in features ``x_1..x_N`` (real) and ``y_1..y_M`` (samples):

* Fréchet distance FD -- between Gaussians fitted to each set;
* kernel distance KID -- an unbiased MMD² with a cubic kernel, with its error;
* precision / recall (Kynkäänniemi et al. 2019) and density / coverage
  (Naeem et al. 2020) -- k-NN estimates of fidelity and diversity;
* a classifier two-sample test (Lopez-Paz & Oquab 2017);
* the class histogram of the samples -- which digits a model draws.

:func:`evaluate_samples` computes them all, floors included.
"""

from __future__ import annotations

import hashlib
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .validate import check_positive_int, check_tensor

__all__ = [
    "FeatureClassifier", "DIGITS_RECIPE", "MNIST_RECIPE", "to_unit", "digits_extractor",
    "mnist_extractor", "weights_sha256", "embed", "frechet_distance",
    "gaussian_frechet_distance", "KID", "kernel_distance", "precision_recall",
    "density_coverage", "C2ST", "classifier_two_sample_test", "class_histogram",
    "compare_features", "evaluate_samples", "Neighbours", "nearest_neighbours",
]

FORMAT = "dgmlab.quality/1"
NUM_CLASSES = 10
_CHUNK = 1 << 22  # matrix entries per block: 32 MB in float64, whatever n
_ARCH = ("image_size", "width", "stages", "num_features", "label_smoothing")
DIGITS_RECIPE = {"format": FORMAT, "data": "digits", "image_size": 8, "width": 16, "stages": 2,
                 "num_features": 64, "label_smoothing": 0.1, "epochs": 30, "batch_size": 128,
                 "lr": 4e-3, "weight_decay": 1e-4, "seed": 0}
MNIST_RECIPE = {"format": FORMAT, "data": "mnist", "image_size": 28, "width": 16, "stages": 3,
                "num_features": 128, "label_smoothing": 0.1, "epochs": 4, "batch_size": 128,
                "lr": 2e-3, "weight_decay": 1e-4, "seed": 0, "val_fraction": 1 / 6}


# --------------------------------------------------------------- the classifier
class FeatureClassifier(nn.Module):
    """A small CNN whose penultimate layer φ(x) ∈ R^num_features is the feature map.

    ``forward(images)`` returns φ, ``logits(images)`` the class scores
    ``head(φ)``, ``loss(x, y)`` the mean cross-entropy that :func:`dgmlab.train.fit`
    minimises (against labels smoothed by ``label_smoothing``, which keeps the
    features of the training images from drifting far from those of new ones).
    Images are floats in [0, 1], ``(N, 1, H, W)`` or flattened ``(N, H·W)``.
    ``stages`` blocks of conv 3×3 → ReLU → max-pool halve the side each.
    """

    def __init__(self, image_size: int = 8, width: int = 16, stages: int = 2,
                 num_features: int = 64, label_smoothing: float = 0.0):
        super().__init__()
        self.image_size, self.num_features = image_size, num_features
        self.label_smoothing = label_smoothing
        layers, c_in = [], 1
        for s in range(stages):
            layers += [nn.Conv2d(c_in, width * 2**s, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = width * 2**s
        side = image_size // 2**stages
        self.body = nn.Sequential(*layers, nn.Flatten(),
                                  nn.Linear(c_in * side * side, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, NUM_CLASSES)
        self.test_accuracy: dict[str, float] = {}
        self.train_seconds, self.recipe = 0.0, {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(_as_images(images, self.image_size).to(self.head.weight.dtype))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y, label_smoothing=self.label_smoothing)


def _as_images(x, size: int) -> torch.Tensor:
    x = check_tensor(x, "images")
    todo = "convert whole levels with to_unit(x, levels) (17 for the digits, 256 for 8-bit)"
    if not x.is_floating_point():
        raise TypeError(f"images should be floats in [0, 1], got dtype {x.dtype}: {todo}.")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"images should be floats in [0, 1], but they span [{x.min():g}, "
                         f"{x.max():g}]: {todo}, or clamp a model's output.")
    if x.dim() == 2 and x.shape[1] == size * size:
        return x.reshape(-1, 1, size, size)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, size, size):
        raise ValueError(f"images should have shape (N, 1, {size}, {size}) or (N, {size * size}) "
                         f"for this extractor, got {tuple(x.shape)}.")
    return x


def to_unit(x, levels: int) -> torch.Tensor:
    """Samples on whole grey levels 0..levels−1 as floats in [0, 1]: ``x / (levels − 1)``.

    ``levels`` is 17 for the digits' levels, 2 for binary images (unchanged), 256 for 8-bit.
    """
    levels = check_positive_int(levels, "levels")
    if levels < 2:
        raise ValueError(f"levels should be at least 2 (binary images), got {levels}.")
    x = check_tensor(x, "x", kind="numeric", min=0, max=levels - 1, whole=True)
    return x.float() / (levels - 1)


# --------------------------------------------------------------- training, cache
def _train(recipe: dict, train: tuple, val: tuple) -> FeatureClassifier:
    """Train the recipe's classifier with fixed seeds; the caller's RNG state is left untouched."""
    from .train import fit

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = FeatureClassifier(**{k: recipe[k] for k in _ARCH})
        fit(model, train, val, epochs=recipe["epochs"], batch_size=recipe["batch_size"],
            lr=recipe["lr"], weight_decay=recipe["weight_decay"], seed=recipe["seed"],
            optimizer="adamw", progress=False)
    model.train_seconds, model.recipe = time.perf_counter() - start, dict(recipe)
    return model.cpu().eval().requires_grad_(False)


def _grey_and_binary(grey: torch.Tensor, binary: torch.Tensor, y: torch.Tensor) -> tuple:
    """Both versions of each image, with its label twice: features for grey and 0/1 samples."""
    return torch.cat([grey, binary]), torch.cat([y, y])


def _test_accuracy(model: FeatureClassifier, grey, binary, labels) -> dict[str, float]:
    """Share of test images, grey and binarized, whose class the classifier gets right."""
    return {name: (embed(model, x)[1].argmax(1) == labels).double().mean().item()
            for name, x in (("grey", grey), ("binary", binary))}


@lru_cache(maxsize=1)
def digits_extractor() -> FeatureClassifier:
    """The digits' feature map, trained once per process (a few seconds, same weights every time).

    Trained on the 1,199 training digits as grey levels (``level / 16``) and
    binarized, with early stopping on the validation split. ``test_accuracy``
    holds its accuracy on the test split, ``{"grey": ≈0.98, "binary": ≈0.96}``.
    """
    from .embedded import digits

    split = {s: (digits(s, "unit"), digits(s, "binary")) for s in ("train", "val", "test")}
    data = {s: _grey_and_binary(u.x, b.x, u.y) for s, (u, b) in split.items()}
    model = _train(DIGITS_RECIPE, data["train"], data["val"])
    (grey, y), (binary, _) = split["test"]
    model.test_accuracy = _test_accuracy(model, grey, binary, y)
    return model


def weights_sha256(state: dict) -> str:
    """sha256 of a state dict: each tensor's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _why_stale(saved: dict, recipe: dict) -> str:
    """Why a cached classifier cannot be trusted for ``recipe`` ("" if it can)."""
    old = saved["recipe"]
    changed = [k for k in sorted(set(old) | set(recipe)) if old.get(k) != recipe.get(k)]
    if changed:
        what = ", ".join("other training images" if k == "data_sha256" else
                         f"{k} {old.get(k)!r} then, {recipe.get(k)!r} now" for k in changed)
        return f"was trained with another recipe ({what})"
    if weights_sha256(saved["state"]) != saved["sha256"]:
        return "holds weights that fail their sha256 check"
    return ""


def _load_cached(path: Path, recipe: dict) -> FeatureClassifier | None:
    """The classifier cached at ``path`` if intact and from ``recipe``; else None, saying why."""
    from .train import CheckpointError, load_checkpoint

    if not path.exists():
        print(f"Training the MNIST feature classifier (a minute or more on a CPU); cache: {path}.")
        return None
    try:
        saved = load_checkpoint(path)
        why = _why_stale(saved, recipe)
        if not why:
            model = FeatureClassifier(**{k: recipe[k] for k in _ARCH})
            model.load_state_dict(saved["state"])
            model.test_accuracy, model.train_seconds = saved["test_accuracy"], saved["seconds"]
            model.recipe = dict(recipe)
            return model.eval().requires_grad_(False)
    except (CheckpointError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        why = f"cannot be read ({type(err).__name__})"
    print(f"Retraining the MNIST feature classifier: its cache {path} {why}.")
    return None


def _train_mnist(recipe: dict, train: tuple, test: tuple, path: Path) -> FeatureClassifier:
    """Train on grey and Bernoulli-binarized images (the last ``val_fraction`` validate); cache."""
    from .embedded import bernoulli_binarize
    from .train import save_checkpoint

    (x, y), (xt, yt) = train, test
    grey, binary = x.float() / 255, bernoulli_binarize(x, seed=0)  # seeds of binarized_mnist
    cut = len(x) - max(1, round(len(x) * recipe["val_fraction"]))
    model = _train(recipe, _grey_and_binary(grey[:cut], binary[:cut], y[:cut]),
                   _grey_and_binary(grey[cut:], binary[cut:], y[cut:]))
    binary_test = bernoulli_binarize(xt, seed=1)
    model.test_accuracy = _test_accuracy(model, xt.float() / 255, binary_test, yt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        save_checkpoint({"format": FORMAT, "recipe": recipe, "state": state,
                         "sha256": weights_sha256(state), "test_accuracy": model.test_accuracy,
                         "seconds": model.train_seconds}, path)
    except OSError as err:  # a read-only data folder: train again next time, but go on now
        print(f"Could not cache the MNIST feature classifier at {path} ({err.strerror or err}); "
              "pass cache='a/writable/file.pt' to keep it.")
    return model


def mnist_extractor(root=None, *, cache=None, recipe: dict | None = None,
                    download: bool = False) -> FeatureClassifier:
    """The MNIST feature map: loaded from its cache if intact, else trained (~1 min, 2 cores).

    The cache, ``<data root>/quality/mnist-classifier.pt`` unless ``cache`` is
    given, holds the weights, their sha256 and the recipe: every setting that
    determines the weights, the sha256 of the training images included. A cache
    whose recipe differs, whose weights fail the checksum or that cannot be read
    is retrained and overwritten. ``recipe`` overrides entries of :data:`MNIST_RECIPE`.
    Test accuracy of the default recipe: 99.4% (grey), 99.2% (binarized).
    """
    from .datasets import data_root, load_mnist

    allowed = set(MNIST_RECIPE) - {"format", "data"}
    if set(recipe or {}) - allowed:
        raise ValueError(f"recipe has unknown settings {sorted(set(recipe) - allowed)}; "
                         f"choose among {sorted(allowed)}.")
    x, y = load_mnist("train", root=root, download=download)
    data_sha = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    full = {**MNIST_RECIPE, **(recipe or {}), "data_sha256": data_sha}
    path = Path(cache) if cache is not None else data_root(root) / "quality" / "mnist-classifier.pt"
    model = _load_cached(path, full)
    if model is None:
        model = _train_mnist(full, (x, y), load_mnist("test", root=root, download=download), path)
    return model


# --------------------------------------------------------------- features
@torch.no_grad()
def embed(extractor: FeatureClassifier, images, batch_size: int = 1000) -> tuple:
    """Features φ(x) as float64 ``(N, num_features)`` and class logits ``(N, 10)``, in batches."""
    f = torch.cat([extractor(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return f.double(), extractor.head(f).double()


def _features(f, name: str, min_n: int = 2) -> torch.Tensor:
    f = check_tensor(f, name, ndim=2, kind="float", finite=True).double()
    if len(f) < min_n:
        raise ValueError(f"{name} holds {len(f)} examples; this estimate needs at least {min_n}.")
    return f


def _pair(real, fake, min_n: int = 2, equal: bool = False) -> tuple:
    x, y = _features(real, "real", min_n), _features(fake, "fake", min_n)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real has {x.shape[1]} features per example and fake {y.shape[1]}: "
                         "compute both with the same extractor.")
    if equal and len(x) != len(y):
        raise ValueError(f"real and fake should hold equal numbers of examples (the per-example "
                         f"terms pair x_i with y_i), got {len(x)} and {len(y)}; subsample one.")
    return x, y


def _blocks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK // max(n_cols, 1))
    return (slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step))


# --------------------------------------------------------------- Fréchet distance
def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """FD of N(μ1, Σ1) and N(μ2, Σ2): ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½).

    The squared 2-Wasserstein distance between the Gaussians (Dowson & Landau
    1982), in float64 through symmetric eigendecompositions.
    """
    mu1, mu2 = (check_tensor(m, name, ndim=1, kind="float").double()
                for m, name in ((mu1, "mu1"), (mu2, "mu2")))
    d = len(mu1)
    if len(mu2) != d:
        raise ValueError(f"mu1 has {d} dimensions and mu2 {len(mu2)}: they should agree.")
    cov1, cov2 = (check_tensor(c, name, shape=(d, d), kind="float").double()
                  for c, name in ((cov1, "cov1"), (cov2, "cov2")))
    root1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(0.0, fd.item())  # FD ≥ 0; rounding can leave −1e−8 for equal Gaussians


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """A^½ of a symmetric positive semi-definite matrix, from A = V diag(λ) Vᵀ."""
    lam, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def _mean_cov(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ = mean of the rows and the unbiased Σ = Σ_i (f_i − μ)(f_i − μ)ᵀ / (n − 1)."""
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (len(f) - 1)


def frechet_distance(real, fake) -> float:
    """FD (Heusel et al. 2017) of the Gaussians fitted to features ``(N, d)`` and ``(M, d)``."""
    x, y = _pair(real, fake)
    return gaussian_frechet_distance(*_mean_cov(x), *_mean_cov(y))


# --------------------------------------------------------------- kernel distance
class KID(NamedTuple):
    """Unbiased MMD² in features (the kernel distance) and its standard error."""

    value: float
    stderr: float


def _cubic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3  # k(x, y) = (xᵀy / d + 1)³


def kernel_distance(real, fake) -> KID:
    """KID (Bińkowski et al. 2018): the unbiased MMD² with k(x, y) = (xᵀy / d + 1)³.

    MMD²_u = Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / n²
    = (1/n) Σ_i h_i, with per-example terms h_i = Σ_{j≠i} [k(x_i,x_j) + k(y_i,y_j)] / (n−1)
    − Σ_j [k(x_i,y_j) + k(x_j,y_i)] / n. As a U-statistic its first-order variance
    is 4 Var(h_i) / n: stderr = 2 std(h) / √n, a little conservative (up to √2
    too large when the distributions agree and the first-order term vanishes).
    Needs equal sizes n; blocks of rows keep memory small (n = 10,000 fits).
    """
    x, y = _pair(real, fake, equal=True)
    n = len(x)
    h = torch.empty(n, dtype=torch.float64)
    for rows in _blocks(n, n):
        k_xx, k_yy = _cubic(x[rows], x), _cubic(y[rows], y)
        self_xx = ((x[rows] ** 2).sum(1) / x.shape[1] + 1) ** 3
        self_yy = ((y[rows] ** 2).sum(1) / y.shape[1] + 1) ** 3
        cross = _cubic(x[rows], y).sum(1) + _cubic(y[rows], x).sum(1)
        h[rows] = (k_xx.sum(1) - self_xx + k_yy.sum(1) - self_yy) / (n - 1) - cross / n
    return KID(h.mean().item(), 2 * h.std().item() / math.sqrt(n))


# --------------------------------------------------------------- k-NN estimates
def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """NND_k(x_i): distance from x_i to its k-th nearest neighbour among the others."""
    r = torch.empty(len(x), dtype=x.dtype)
    for rows in _blocks(len(x), len(x)):
        r[rows] = torch.cdist(x[rows], x).topk(k + 1, largest=False).values[:, k]  # 0: x_i
    return r


def _balls_holding(points, centres, radii) -> torch.Tensor:
    """For each point p, how many balls B(c_i, r_i) hold it: Σ_i 1[‖p − c_i‖ ≤ r_i]."""
    counts = torch.empty(len(points), dtype=torch.int64)
    for rows in _blocks(len(points), len(centres)):
        counts[rows] = (torch.cdist(points[rows], centres) <= radii).sum(1)
    return counts


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds of each set.

    precision = (1/M) Σ_j 1[∃i: ‖y_j − x_i‖ ≤ NND_k(x_i)]  -- samples on the real manifold;
    recall    = (1/N) Σ_i 1[∃j: ‖x_i − y_j‖ ≤ NND_k(y_j)]  -- data on the samples' manifold.
    """
    k = check_positive_int(k, "k")
    x, y = _pair(real, fake, min_n=k + 1)
    precision = (_balls_holding(y, x, _knn_radii(x, k)) > 0).double().mean().item()
    recall = (_balls_holding(x, y, _knn_radii(y, k)) > 0).double().mean().item()
    return precision, recall


def density_coverage(real, fake, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020), on the real k-NN balls only.

    density  = 1/(kM) Σ_j Σ_i 1[‖y_j − x_i‖ ≤ NND_k(x_i)]  -- 1 on average if fake ~ real;
    coverage = (1/N) Σ_i 1[∃j: ‖y_j − x_i‖ ≤ NND_k(x_i)]    -- real balls holding a sample.
    """
    k = check_positive_int(k, "k")
    x, y = _pair(real, fake, min_n=k + 1)
    radii = _knn_radii(x, k)
    density = _balls_holding(y, x, radii).double().sum().item() / (k * len(y))
    blocks = _blocks(len(x), len(y))
    nearest = torch.cat([torch.cdist(x[rows], y).min(1).values for rows in blocks])
    return density, (nearest <= radii).double().mean().item()


# --------------------------------------------------------------- two-sample test, classes
def _halves(f: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.randperm(len(f), generator=g)
    return f[p[: len(f) // 2]], f[p[len(f) // 2:]]


def _stacked(real: torch.Tensor, fake: torch.Tensor) -> tuple:
    """Both sets' features stacked, with labels 0 (real) and 1 (fake), as NumPy arrays."""
    labels = torch.cat([torch.zeros(len(real)), torch.ones(len(fake))])
    return torch.cat([real, fake]).numpy(), labels.numpy()


class C2ST(NamedTuple):
    """Held-out accuracy of a real-vs-sample classifier, its one-sided p-value, test size."""

    accuracy: float
    pvalue: float
    n_test: int


def classifier_two_sample_test(real, fake, *, seed: int = 0) -> C2ST:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017) in features.

    A logistic regression learns real (0) vs fake (1) on a seeded half of each
    set; its accuracy on the other halves is ≈ ½ when the two distributions
    agree. p-value: P(Binomial(n_test, ½) ≥ correct), one-sided.
    """
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _pair(real, fake, min_n=4)
    g = torch.Generator().manual_seed(int(seed))
    (x_fit, x_test), (y_fit, y_test) = _halves(x, g), _halves(y, g)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    clf.fit(*_stacked(x_fit, y_fit))
    features, labels = _stacked(x_test, y_test)
    correct, n_test = int((clf.predict(features) == labels).sum()), len(labels)
    pvalue = binomtest(correct, n_test, 0.5, alternative="greater").pvalue
    return C2ST(correct / n_test, float(pvalue), n_test)


def class_histogram(labels, num_classes: int = NUM_CLASSES) -> tuple[list[int], float]:
    """Counts per predicted class and their entropy H = −Σ_c p_c log p_c (nats, at most log 10).

    Mode coverage: a model that drops digits shows empty classes and a lower H.
    """
    labels = check_tensor(labels, "labels", ndim=1, kind="integer", min=0, max=num_classes - 1)
    counts = torch.bincount(labels, minlength=num_classes)
    p = counts[counts > 0].double() / counts.sum()
    return counts.tolist(), float(-(p * p.log()).sum())


# --------------------------------------------------------------- everything at once
def compare_features(real, fake, *, k_pr: int = 3, k_dc: int = 5, seed: int = 0) -> dict:
    """Every feature-space score of ``fake`` against ``real`` (equal sizes), as a flat dict."""
    kid = kernel_distance(real, fake)
    precision, recall = precision_recall(real, fake, k_pr)
    density, coverage = density_coverage(real, fake, k_dc)
    c2st = classifier_two_sample_test(real, fake, seed=seed)
    return {"fd": frechet_distance(real, fake), "kid": kid.value, "kid_stderr": kid.stderr,
            "precision": precision, "recall": recall, "density": density, "coverage": coverage,
            "c2st_accuracy": c2st.accuracy, "c2st_pvalue": c2st.pvalue}


def _subsample(images, n: int, g: torch.Generator, name: str) -> torch.Tensor:
    if len(images) < n:
        raise ValueError(f"{name} holds {len(images)} images but there are {n} samples: the scores "
                         "are biased by n, so compare equal numbers; draw fewer samples.")
    return images if len(images) == n else images[torch.randperm(len(images), generator=g)[:n]]


def evaluate_samples(samples, heldout, reference, extractor: FeatureClassifier, *,
                     seed: int = 0, k_pr: int = 3, k_dc: int = 5) -> dict:
    """Score ``n`` samples against ``n`` real images ``heldout``, beside the real-data floor.

    Images are floats in [0, 1] (see :func:`to_unit`); larger real sets are
    subsampled to ``n`` with a generator seeded by ``seed``. Each score of samples
    vs held-out (``fd``, ``kid``, ``precision``, ...) comes with ``<score>_floor``:
    the same score for ``n`` images of ``reference``, a second set of real images
    that neither the model nor the extractor trained on, vs the same held-out ones.
    Also ``fd_ratio`` = fd / fd_floor, ``class_counts`` and ``class_entropy`` (with
    its floor) of the classes the extractor predicts, and ``n``.
    """
    n = len(_as_images(samples, extractor.image_size))
    if n <= max(k_pr, k_dc, 3):
        raise ValueError(f"evaluate_samples needs more than max(k_pr, k_dc) = {max(k_pr, k_dc, 3)} "
                         f"samples to find k-th nearest neighbours, got {n}.")
    g = torch.Generator().manual_seed(int(seed))
    heldout = _subsample(heldout, n, g, "heldout")
    reference = _subsample(reference, n, g, "reference")
    (f_s, l_s), (f_h, _), (f_t, l_t) = (embed(extractor, x) for x in (samples, heldout, reference))
    model = compare_features(f_h, f_s, k_pr=k_pr, k_dc=k_dc, seed=seed)
    floor = compare_features(f_h, f_t, k_pr=k_pr, k_dc=k_dc, seed=seed)
    counts, entropy = class_histogram(l_s.argmax(1))
    return {"n": n, **model, **{f"{k}_floor": v for k, v in floor.items()},
            "fd_ratio": model["fd"] / floor["fd"] if floor["fd"] > 0 else math.inf,
            "class_counts": counts, "class_entropy": entropy,
            "class_entropy_floor": class_histogram(l_t.argmax(1))[1]}


# --------------------------------------------------------------- memorisation check
class Neighbours(NamedTuple):
    """Each sample's nearest training image: its Euclidean ``distance`` (n,) and ``index`` (n,)."""

    distance: torch.Tensor
    index: torch.Tensor


def _flat_images(x, name: str) -> torch.Tensor:
    x = check_tensor(x, name, kind="numeric", finite=True)
    if x.dim() < 2 or len(x) == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} should be a batch of images (N, ...) with N ≥ 1, "
                         f"got shape {tuple(x.shape)}.")
    return x.reshape(len(x), -1).double()


def nearest_neighbours(samples, train, *, batch_size: int = 1000) -> Neighbours:
    """The memorisation check: for each sample, the nearest training image in pixel space.

    distance_i = min_n ‖s_i − t_n‖₂ and index_i = argmin_n ‖s_i − t_n‖₂, images
    flattened, in float64. A distance of 0 is an exact copy of a training image;
    compare the distances with those of held-out real images (the floor), which
    are new images of the same kind. Images of any shape, (N, 1, 8, 8) or
    (N, 64) alike, on one scale for both sets (levels with levels, [0, 1] with
    [0, 1]). Memory stays bounded whatever the sizes: ``batch_size`` samples at a
    time against blocks of training images (10,000 × 60,000 MNIST images fit).
    """
    s, t = _flat_images(samples, "samples"), _flat_images(train, "train")
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"samples have {s.shape[1]} values per image {tuple(samples.shape[1:])} "
                         f"and train {t.shape[1]} {tuple(train.shape[1:])}: compare images of "
                         "the same size (resize or flatten one set).")
    batch_size = check_positive_int(batch_size, "batch_size")
    centre = t.mean(0)  # distances do not change; the sums below lose less to rounding
    s, t = s - centre, t - centre
    t_sq = t.square().sum(1)
    index = torch.empty(len(s), dtype=torch.long)
    for i in range(0, len(s), batch_size):
        index[i:i + batch_size] = _nearest_rows(s[i:i + batch_size], t, t_sq)
    distance = (s - t[index]).square().sum(1).sqrt()  # exact: 0 for a copy
    return Neighbours(distance, index)


def _nearest_rows(s: torch.Tensor, t: torch.Tensor, t_sq: torch.Tensor) -> torch.Tensor:
    """argmin_n ‖s_i − t_n‖² = argmin_n (‖t_n‖² − 2 s_i·t_n), over blocks of training rows."""
    best = torch.full((len(s),), math.inf, dtype=torch.float64)
    index = torch.zeros(len(s), dtype=torch.long)
    for cols in _blocks(len(t), len(s)):
        d = t_sq[cols] - 2 * s @ t[cols].T  # ‖s_i‖² is the same for every n: left out
        value, arg = d.min(1)
        better = value < best
        best, index = torch.where(better, value, best), torch.where(better, arg + cols.start, index)
    return index
