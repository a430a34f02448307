"""Claims C38-C39: sample quality in the features of a classifier trained on the same data."""

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from dgmlab import datasets, embedded, quality as Q, train


@pytest.fixture(scope="module")
def extractor():
    return Q.digits_extractor()  # trained once per process: a few seconds


@pytest.fixture(scope="module")
def digits():
    return {s: embedded.digits(s, "unit") for s in ("train", "val", "test", "all")}


@pytest.fixture(scope="module")
def feats(extractor, digits):
    return {s: Q.embed(extractor, d.x)[0] for s, d in digits.items()}


def randn(*shape, seed=0, g=None):
    g = g if g is not None else torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def score(samples, digits, extractor, **kw):
    """Samples scored against the test split, beside the floor: the validation split's score."""
    return Q.evaluate_samples(samples, digits["test"].x, digits["val"].x, extractor, **kw)


def noise_images(n, seed):
    """Salt-and-pepper junk: every pixel an independent fair coin, nothing like a digit."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) < 0.5).float()


def of_classes(digits, keep, n, seed):
    """``n`` real images (train and val splits) of the classes ``keep`` only: modes dropped."""
    x = torch.cat([digits["train"].x, digits["val"].x])
    y = torch.cat([digits["train"].y, digits["val"].y])
    idx = torch.nonzero(torch.isin(y, torch.tensor(keep)))[:, 0]
    return x[idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]]]


def random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ------------------------------------------------------------------ inputs, extractor
def test_to_unit_maps_whole_levels_onto_the_unit_interval(digits):
    levels = embedded.digits("test", "levels").x
    assert torch.equal(Q.to_unit(levels, 17), digits["test"].x)
    binary = embedded.digits("test", "binary").x
    assert torch.equal(Q.to_unit(binary, 2), binary)
    bytes_ = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.equal(Q.to_unit(bytes_, 256), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(ValueError, match="whole numbers"):
        Q.to_unit(digits["test"].x, 17)  # already in [0, 1]
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        Q.to_unit(levels + 1, 17)
    with pytest.raises(ValueError, match="at least 2"):
        Q.to_unit(levels, 1)


def test_digits_extractor_is_accurate_cached_and_exposes_its_features(extractor, digits):
    assert Q.digits_extractor() is extractor  # one training per process
    assert isinstance(extractor.num_features, int) and extractor.num_features == 64
    for variant, key in (("unit", "grey"), ("binary", "binary")):
        x, y = embedded.digits("test", variant)
        with torch.no_grad():
            accuracy = (extractor.logits(x).argmax(1) == y).double().mean().item()
        assert accuracy == pytest.approx(extractor.test_accuracy[key], abs=1e-12)
        assert accuracy > 0.95
    x = digits["test"].x
    with torch.no_grad():
        f = extractor(x)
        assert f.shape == (299, 64) and f.dtype == torch.float32
        assert torch.equal(extractor(x.flatten(1)), f)  # (N, 64) works as (N, 1, 8, 8)
    assert 0 < extractor.train_seconds < 60
    assert not any(p.requires_grad for p in extractor.parameters())


def test_digits_extractor_trains_to_the_same_weights_and_leaves_the_global_rng_alone(extractor):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # a state the training's own seed would not leave behind
        state = torch.get_rng_state()
        again = Q.digits_extractor.__wrapped__()  # the uncached function: a second training
        assert torch.equal(torch.get_rng_state(), state)
    assert Q.weights_sha256(again.state_dict()) == Q.weights_sha256(extractor.state_dict())
    assert again.recipe == Q.DIGITS_RECIPE and again.recipe["format"] == Q.FORMAT


def test_extractor_rejects_images_it_cannot_read(extractor, digits):
    x = digits["test"].x
    with pytest.raises(TypeError, match="to_unit"):
        extractor(embedded.digits("test", "levels").x)
    with pytest.raises(ValueError, match=r"span \[0, 16\].*to_unit"):
        extractor(x * 16)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\) or \(N, 64\)"):
        extractor(torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        extractor(torch.zeros(3, 63))


# ------------------------------------------------------------------ C38: Fréchet distance
def test_c38_closed_form_matches_sqrtm_and_the_diagonal_formula():
    d = 6
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = randn(d, g=g), randn(d, g=g)
    s1, s2 = random_spd(d, 1), random_spd(d, 2)
    ours = Q.gaussian_frechet_distance(mu1, s1, mu2, s2)
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())  # Tr (Σ1Σ2)^½, a different route
    want = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * root.real)
    assert ours == pytest.approx(want, rel=1e-9)
    assert Q.gaussian_frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)
    assert Q.gaussian_frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    sd1, sd2 = randn(d, g=g).abs() + 0.1, randn(d, g=g).abs() + 0.1
    diagonal = Q.gaussian_frechet_distance(mu1, torch.diag(sd1**2), mu2, torch.diag(sd2**2))
    want = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()  # ‖μ1 − μ2‖² + Σ (σ1 − σ2)²
    assert diagonal == pytest.approx(want.item(), rel=1e-10)


def test_c38_fd_of_gaussian_samples_converges_to_the_closed_form():
    d, n = 4, 200_000
    g = torch.Generator().manual_seed(3)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    s1, s2 = random_spd(d, 4), random_spd(d, 5)
    x = mu1 + randn(n, d, g=g) @ torch.linalg.cholesky(s1).T
    y = mu2 + randn(n, d, g=g) @ torch.linalg.cholesky(s2).T
    exact = Q.gaussian_frechet_distance(mu1, s1, mu2, s2)
    assert Q.frechet_distance(x, y) == pytest.approx(exact, rel=0.02)
    # the plug-in estimate uses the unbiased covariances, as torch.cov does
    a, b = x[:50], y[:50]
    plug_in = Q.gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert Q.frechet_distance(a, b) == pytest.approx(plug_in, rel=1e-12)


def test_c38_fd_between_two_samples_of_the_same_data_shrinks_as_n_grows(feats):
    f = feats["all"]  # 1,797 digits: disjoint pairs up to n = 850
    sizes = (50, 150, 400, 850)
    fd = []
    for n in sizes:
        runs = []
        for seed in range(3):
            perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))
            runs.append(Q.frechet_distance(f[perm[:n]], f[perm[n: 2 * n]]))
        fd.append(sum(runs) / len(runs))
    assert all(a > b for a, b in zip(fd, fd[1:])), fd
    assert fd[-1] < fd[0] / 5  # the bias falls roughly as 1/n


def test_c38_dropped_modes_and_junk_rank_below_the_data(extractor, digits):
    data = score(digits["val"].x, digits, extractor)  # unseen real digits: the floor itself
    dropped = score(of_classes(digits, [0, 1, 2, 3, 4], 299, 0), digits, extractor)
    junky = digits["val"].x.clone()
    junky[::2] = noise_images(150, 0)  # half the samples are junk
    junk = score(junky, digits, extractor)
    assert data["fd"] < 1.5 * data["fd_floor"]  # real digits reach the floor
    for bad in (dropped, junk):
        assert bad["fd_ratio"] > 2.5 and bad["fd"] > 5 * data["fd"]
        assert bad["kid"] > data["kid"] + 4 * bad["kid_stderr"]
        assert bad["c2st_accuracy"] > 0.6 and bad["c2st_pvalue"] < 1e-6
    assert data["fd_floor"] == dropped["fd_floor"] == junk["fd_floor"]  # independent of samples
    assert data["c2st_pvalue"] > 0.01 and abs(data["c2st_accuracy"] - 0.5) < 0.1
    # the class histogram sees which digits are missing
    assert sum(dropped["class_counts"][5:]) < 5  # a few digits misread, at most
    assert dropped["class_entropy"] < math.log(5) + 0.05 < data["class_entropy"]
    assert data["class_entropy"] > math.log(10) - 0.05


# ------------------------------------------------------------------ C39: precision, recall
def test_c39_knn_estimates_follow_their_definitions_on_points_by_hand():
    # 1-D, k = 1. Real radii NND_1: 1, 1, 1, 1, 7 (the point 10's nearest is 3).
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [2.9], [20.0], [21.0], [22.0]], dtype=torch.float64)
    # fake radii: 2.4, 2.4, 1, 1, 1. Balls of real holding each fake: 2, 2, 0, 0, 0.
    precision, recall = Q.precision_recall(real, fake, k=1)
    density, coverage = Q.density_coverage(real, fake, k=1)
    assert precision == pytest.approx(2 / 5)  # 0.5 and 2.9 lie on the real manifold
    assert recall == pytest.approx(4 / 5)  # every real point but 10 lies in a fake ball
    assert density == pytest.approx(4 / 5)  # (2 + 2 + 0 + 0 + 0) / (k M)
    assert coverage == pytest.approx(4 / 5)  # the ball [3, 17] around 10 holds no fake


def test_c39_precision_falls_by_the_share_of_junk(feats, extractor, digits):
    real, samples = feats["test"], feats["val"]
    junk = Q.embed(extractor, noise_images(299, 1))[0]
    p_real, _ = Q.precision_recall(real, samples)
    p_junk, _ = Q.precision_recall(real, junk)
    assert p_real > 0.85 and p_junk < 0.2  # noise lies (mostly) off the digits' manifold
    d_real, d_junk = Q.density_coverage(real, samples)[0], Q.density_coverage(real, junk)[0]
    for share in (0.2, 0.5):
        m = round(share * 299)
        mixed = torch.cat([junk[:m], samples[m:]])
        precision, _ = Q.precision_recall(real, mixed)
        p_rest, _ = Q.precision_recall(real, samples[m:])
        p_part, _ = Q.precision_recall(real, junk[:m])
        # precision is a mean over samples: exactly the mix of the two parts' precisions
        assert precision == pytest.approx((m * p_part + (299 - m) * p_rest) / 299, abs=1e-12)
        # so it falls by about the share of junk, as much as the junk is off the manifold
        assert precision == pytest.approx((1 - share) * p_real + share * p_junk, abs=0.03)
        assert precision < p_real - 0.8 * share * (p_real - p_junk)
        density, _ = Q.density_coverage(real, mixed)
        assert density == pytest.approx((1 - share) * d_real + share * d_junk, abs=0.05)


def test_c39_recall_falls_to_the_kept_share_when_modes_drop(extractor, digits, feats):
    real, labels = feats["test"], digits["test"].y
    _, r_all = Q.precision_recall(real, feats["val"])
    assert r_all > 0.8
    for keep in ([0, 1, 2], [0, 1, 2, 3, 4]):
        fake = Q.embed(extractor, of_classes(digits, keep, 299, 1))[0]
        precision, recall = Q.precision_recall(real, fake)
        _, coverage = Q.density_coverage(real, fake)
        kept = torch.isin(labels, torch.tensor(keep))
        share = kept.double().mean().item()
        assert precision > 0.85  # the samples are real digits: on the manifold
        assert 0.8 * share < recall < share + 0.05 and coverage < share + 0.05
        # the real digits of the dropped classes lie in no sample's k-NN ball
        _, r_dropped = Q.precision_recall(real[~kept], fake)
        assert r_dropped < 0.1


# ------------------------------------------------------------------ KID
def test_c38_kid_equals_the_quadratic_formula_in_any_chunking(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = randn(40, 5, g=g), randn(40, 5, g=g) + 0.3
    k = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    n = 40
    off = lambda m: m.sum() - m.diagonal().sum()  # noqa: E731
    want = (off(k(x, x)) + off(k(y, y))) / (n * (n - 1)) - 2 * k(x, y).sum() / n**2
    whole = Q.kernel_distance(x, y)
    assert whole.value == pytest.approx(want.item(), rel=1e-12)
    monkeypatch.setattr(Q, "_CHUNK", 7 * 40)  # blocks of 7 rows, the last one short
    chunked = Q.kernel_distance(x, y)
    assert chunked.value == pytest.approx(whole.value, rel=1e-12)
    assert chunked.stderr == pytest.approx(whole.stderr, rel=1e-12)
    with pytest.raises(ValueError, match="equal numbers"):
        Q.kernel_distance(x, y[:30])


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_c38_kid_is_unbiased_and_its_stderr_matches_the_spread_over_30_seeds(shift):
    values, errors = [], []
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        x, y = randn(300, 8, g=g), randn(300, 8, g=g) + shift
        kid = Q.kernel_distance(x, y)
        values.append(kid.value)
        errors.append(kid.stderr)
    values, spread = torch.tensor(values), torch.tensor(values).std().item()
    assert 0.5 < spread / (sum(errors) / 30) < 2.0
    g = torch.Generator().manual_seed(99)
    big = Q.kernel_distance(randn(3000, 8, g=g), randn(3000, 8, g=g) + shift)
    tolerance = 3 * math.hypot(spread / math.sqrt(30), big.stderr)
    assert abs(values.mean().item() - big.value) < tolerance  # unbiased at n = 300


def test_c38_real_samples_sit_at_the_floor(extractor, digits, feats):
    # Real digits the classifier never saw are the floor: every score within its noise.
    r = score(digits["val"].x[:150], digits, extractor)
    assert abs(r["kid"]) < 3 * r["kid_stderr"] and abs(r["kid_floor"]) < 3 * r["kid_stderr_floor"]
    assert r["fd_ratio"] == pytest.approx(r["fd"] / r["fd_floor"]) and r["fd_ratio"] < 2
    for key in ("precision", "recall", "density", "coverage"):
        assert abs(r[key] - r[f"{key}_floor"]) < 0.15, key
    # Why the floor is not drawn from the training images: the classifier has seen them, and
    # in its features they sit farther from new digits than other new digits do.
    g = torch.Generator().manual_seed(0)
    fd_train = [Q.frechet_distance(feats["test"], feats["train"][torch.randperm(1199, generator=g)[:299]])
                for _ in range(8)]
    assert np.mean(fd_train) > 1.2 * Q.frechet_distance(feats["test"], feats["val"])


# ------------------------------------------------------------------ torchmetrics
def test_c38_fd_and_kid_agree_with_torchmetrics_given_the_same_features(extractor, digits):
    from torchmetrics.image.fid import FrechetInceptionDistance  # requirements.txt: tests only
    from torchmetrics.image.kid import KernelInceptionDistance

    module = copy.deepcopy(extractor).double()  # float64 features end to end
    real, fake = digits["test"].x.double(), digits["val"].x.double()
    fid = FrechetInceptionDistance(feature=module, normalize=False)
    with pytest.warns(UserWarning, match="save all extracted features"):
        kid = KernelInceptionDistance(feature=module, subsets=1, subset_size=299, normalize=False)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.no_grad():
        f_real, f_fake = module(real), module(fake)
    assert Q.frechet_distance(f_real, f_fake) == pytest.approx(fid.compute().item(), rel=1e-6)
    kid_mean, _ = kid.compute()
    assert Q.kernel_distance(f_real, f_fake).value == pytest.approx(kid_mean.item(), rel=1e-6)


# ------------------------------------------------------------------ C2ST, classes, entry point
def test_classifier_two_sample_test_tells_junk_from_data_and_not_data_from_data(feats, extractor):
    same = Q.classifier_two_sample_test(feats["test"], feats["val"], seed=0)
    assert same.n_test == 300 and abs(same.accuracy - 0.5) < 0.1 and same.pvalue > 0.01
    assert Q.classifier_two_sample_test(feats["test"], feats["val"], seed=0) == same  # seeded
    correct = round(same.accuracy * same.n_test)  # one-sided: P(Binomial(300, ½) ≥ correct)
    tail = scipy.stats.binom.sf(correct - 1, same.n_test, 0.5)
    assert same.pvalue == pytest.approx(tail, rel=1e-9)
    junk = Q.classifier_two_sample_test(feats["test"], Q.embed(extractor, noise_images(299, 2))[0])
    assert junk.accuracy > 0.95 and junk.pvalue < 1e-30


def test_class_histogram_counts_and_entropy():
    counts, h = Q.class_histogram(torch.arange(50) % 10)
    assert counts == [5] * 10 and h == pytest.approx(math.log(10))
    counts, h = Q.class_histogram(torch.tensor([3, 3, 3, 3]))
    assert counts[3] == 4 and sum(counts) == 4 and h == 0.0
    _, h = Q.class_histogram(torch.tensor([0, 0, 0, 1]))
    assert h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        Q.class_histogram(torch.tensor([10]))


def test_evaluate_samples_is_fast_seeded_and_reports_every_score_with_its_floor(extractor, digits):
    r = score(digits["val"].x, digits, extractor)
    for key in ("fd", "kid", "kid_stderr", "precision", "recall", "density", "coverage",
                "c2st_accuracy", "c2st_pvalue"):
        assert isinstance(r[key], float) and isinstance(r[f"{key}_floor"], float), key
    assert r["n"] == 299
    assert {"fd_ratio", "class_entropy", "class_entropy_floor", "class_counts"} <= set(r)
    assert sum(r["class_counts"]) == 299
    assert score(digits["val"].x, digits, extractor) == r
    half, other = (score(digits["val"].x[:150], digits, extractor, seed=s) for s in (0, 1))
    assert other["fd_floor"] != half["fd_floor"]  # other subsamples of 150 real images
    # samples may be flattened, and held-out sets larger than n are subsampled to n
    assert score(digits["val"].x[:100].flatten(1), digits, extractor)["n"] == 100


def test_bad_inputs_get_errors_that_say_what_to_do(extractor, digits):
    f = randn(20, 4)
    with pytest.raises(ValueError, match="same extractor"):
        Q.frechet_distance(f, randn(20, 5))
    with pytest.raises(ValueError, match="at least 4"):
        Q.precision_recall(f[:3], f, k=3)
    with pytest.raises(ValueError, match="at least 6"):
        Q.density_coverage(f, f[:5], k=5)
    with pytest.raises(ValueError, match="2 dimensions"):
        Q.kernel_distance(f[0], f[1])
    with pytest.raises(ValueError, match="NaN"):
        Q.frechet_distance(f, torch.full((20, 4), math.nan))
    with pytest.raises(ValueError, match="should agree"):
        Q.gaussian_frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        Q.gaussian_frechet_distance(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="draw fewer samples"):
        Q.evaluate_samples(digits["val"].x, digits["test"].x[:100], digits["train"].x, extractor)
    with pytest.raises(ValueError, match="more than"):
        score(digits["val"].x[:5], digits, extractor)
    with pytest.raises(TypeError, match="to_unit"):
        score(embedded.digits("val", "levels").x, digits, extractor)


# ------------------------------------------------------------------ the MNIST cache
TINY = {"epochs": 3, "width": 8, "num_features": 16, "batch_size": 32, "lr": 1e-2}  # a second


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Tiny MNIST-format files, found by load_mnist in place of the real ones; training counted."""
    monkeypatch.delenv(datasets.DATA_ENV, raising=False)
    fake = datasets.write_fake_mnist(tmp_path, n_train=300, n_test=100)
    monkeypatch.setitem(datasets.DATASETS, "mnist", fake)
    calls = []
    real_train = Q._train
    monkeypatch.setattr(Q, "_train", lambda *a: calls.append(1) or real_train(*a))
    return tmp_path, calls


def test_mnist_extractor_trains_once_then_loads_its_cache(fake_mnist, capsys):
    root, calls = fake_mnist
    first = Q.mnist_extractor(root, recipe=TINY)
    assert len(calls) == 1 and (root / "quality" / "mnist-classifier.pt").is_file()
    assert capsys.readouterr().out.startswith("Training the MNIST feature classifier")
    assert first.test_accuracy["grey"] > 0.8 and first.test_accuracy["binary"] > 0.8
    second = Q.mnist_extractor(root, recipe=TINY)
    assert len(calls) == 1 and capsys.readouterr().out == ""  # loaded, silently
    assert Q.weights_sha256(second.state_dict()) == Q.weights_sha256(first.state_dict())
    assert second.test_accuracy == first.test_accuracy and second.recipe == first.recipe
    x, _ = datasets.load_mnist("test", root=root, download=False)
    with torch.no_grad():
        assert torch.equal(second(x.float() / 255), first(x.float() / 255))
    assert second(x[:3].float() / 255).shape == (3, 16) and second.num_features == 16


def test_mnist_cache_that_is_corrupt_stale_or_tampered_is_retrained(fake_mnist, capsys,
                                                                    monkeypatch):
    root, calls = fake_mnist
    path = root / "quality" / "mnist-classifier.pt"
    Q.mnist_extractor(root, recipe=TINY)
    path.write_bytes(b"not a checkpoint")
    Q.mnist_extractor(root, recipe=TINY)
    assert len(calls) == 2 and "cannot be read" in capsys.readouterr().out
    Q.mnist_extractor(root, recipe={**TINY, "epochs": 2})  # the recipe changed
    assert len(calls) == 3 and "another recipe (epochs 3 then, 2 now)" in capsys.readouterr().out
    saved = train.load_checkpoint(path)
    saved["state"]["head.bias"] += 1.0  # weights changed, checksum not
    train.save_checkpoint(saved, path)
    Q.mnist_extractor(root, recipe={**TINY, "epochs": 2})
    assert len(calls) == 4 and "sha256" in capsys.readouterr().out
    other = datasets.write_fake_mnist(root, n_train=300, n_test=100, seed=1)  # other training data
    monkeypatch.setitem(datasets.DATASETS, "mnist", other)
    Q.mnist_extractor(root, recipe={**TINY, "epochs": 2})
    assert len(calls) == 5 and "(other training images)" in capsys.readouterr().out
    Q.mnist_extractor(root, recipe={**TINY, "epochs": 2})
    assert len(calls) == 5  # the retrained cache is trusted again
    with pytest.raises(ValueError, match="unknown settings.*'epoch'"):
        Q.mnist_extractor(root, recipe={"epoch": 1})


def test_an_unwritable_cache_is_reported_and_the_classifier_still_served(fake_mnist, capsys,
                                                                         monkeypatch):
    root, calls = fake_mnist

    def read_only(obj, path):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(train, "save_checkpoint", read_only)  # a shared, read-only data folder
    model = Q.mnist_extractor(root, recipe=TINY)
    assert model.num_features == 16 and len(calls) == 1
    assert "Could not cache the MNIST feature classifier" in capsys.readouterr().out


# ------------------------------------------------------------------ memorisation: nearest neighbours
def test_nearest_neighbours_match_a_kd_tree_and_find_planted_copies(monkeypatch):
    from scipy.spatial import cKDTree

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (700, 1, 8, 8), generator=g, dtype=torch.uint8)  # 8-bit levels
    samples = torch.randint(0, 256, (300, 1, 8, 8), generator=g, dtype=torch.uint8)
    planted = torch.tensor([5, 123, 699])
    samples[[0, 150, 299]] = train[planted]  # exact copies
    samples[1] = train[42]
    samples[1, 0, 3, 3] = int(train[42, 0, 3, 3]) ^ 1  # a near copy: one level off in one pixel
    distance, index = cKDTree(train.flatten(1).double().numpy()).query(samples.flatten(1).double().numpy())
    for batch_size, chunk in ((1000, Q._CHUNK), (7, 1000)):  # one block; blocks of 7 × 142
        monkeypatch.setattr(Q, "_CHUNK", chunk)
        nn_ = Q.nearest_neighbours(samples, train, batch_size=batch_size)
        assert nn_.distance.shape == nn_.index.shape == (300,) and nn_.index.dtype == torch.long
        assert np.allclose(nn_.distance.numpy(), distance, rtol=1e-12, atol=0)
        assert np.array_equal(nn_.index.numpy(), index)
        assert torch.equal(nn_.distance[[0, 150, 299]], torch.zeros(3, dtype=torch.float64))
        assert torch.equal(nn_.index[[0, 150, 299]], planted)
        assert nn_.distance[1].item() == 1.0 and nn_.index[1].item() == 42
    flat = Q.nearest_neighbours(samples.flatten(1).float() / 255, train.float() / 255)  # (N, 64) vs images
    assert torch.equal(flat.index, torch.from_numpy(index))


def test_nearest_neighbours_refuse_mismatched_images():
    train = torch.zeros(10, 1, 8, 8)
    with pytest.raises(ValueError, match=r"64 values per image.*train 784"):
        Q.nearest_neighbours(train, torch.zeros(5, 1, 28, 28))
    with pytest.raises(ValueError, match=r"batch of images \(N, \.\.\.\) with N ≥ 1"):
        Q.nearest_neighbours(torch.zeros(64), train)
    with pytest.raises(ValueError, match=r"N ≥ 1"):
        Q.nearest_neighbours(train, torch.zeros(0, 64))
    with pytest.raises(ValueError, match="NaN"):
        Q.nearest_neighbours(torch.full((2, 64), float("nan")), train)
    with pytest.raises(ValueError, match="batch_size should be positive"):
        Q.nearest_neighbours(train, train, batch_size=0)
