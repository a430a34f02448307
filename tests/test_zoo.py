"""The model zoo: every family's table collected or re-run, one table, and the book's copy of it."""

import json

import pytest
import torch

from dgmlab import bench, embedded
from dgmlab.bench import zoo

ZOO_KEYS = {"family", "taxonomy", "chapter", "benchmark", "benchmark_sources", "collected", "nll_kind",
            "nll_error", "in_figure"}


def _row(data, model, fd_ratio, **more):
    """A saved benchmark row with every key the zoo reads (scores made up)."""
    grid = bench.encode_grid(embedded.digits("test", "unit").x[:16])
    return {"data": data, "model": model, "parameters": 10, "train_s": 1.0, "nll_nats": 90.0, "bits_per_dim": 2.0,
            "nll_is_bound": False, "sample_ms": 0.5, "nfe": 1, "fd": fd_ratio, "fd_floor": 1.0, "fd_ratio": fd_ratio,
            "kid": 0.01, "kid_floor": 0.0, "precision": 0.9, "precision_floor": 0.9, "recall": 0.8,
            "recall_floor": 0.9, "class_entropy": 2.2, "class_entropy_floor": 2.3, "samples": grid, **more}


def _saved_tables(folder, stale=()):
    """A results folder with a table for every family benchmark: two models each, a baseline that
    every table repeats, an MNIST row and a re-measured model of another chapter; ``stale``
    benchmarks carry an old digest."""
    for i, (name, *_) in enumerate(zoo.FAMILIES):
        rows = [_row("digits, 17 levels", "independent pixels", 9.0),
                _row("digits, 17 levels", f"{name} model A", 2.0 + i),
                _row("digits, 17 levels", f"{name} model B", 1.5 + i, nll_is_bound=True),
                _row("MNIST, binarized", f"{name} on MNIST", 1.0),
                _row("digits, 17 levels", "VAE (Chapter 5)", 0.1)]
        digest = "old" if name in stale else bench.sources_digest(name)
        (folder / f"{name}.json").write_text(json.dumps({"benchmark": name, "sources": digest, "rows": rows}))


def test_zoo_collects_fresh_tables_reruns_stale_ones_and_keeps_one_row_per_model(tmp_path, monkeypatch):
    _saved_tables(tmp_path, stale=("gan",))
    ran = []

    def rerun(name, results):
        ran.append(name)
        return json.loads((results / f"{name}.json").read_text())["rows"]

    monkeypatch.setattr(zoo, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(zoo, "run", rerun)
    rows = bench.BENCHMARKS["zoo"][0]()
    assert ran == ["gan"]  # only the stale table is re-measured
    models = [r["model"] for r in rows]
    assert models.count("independent pixels") == 1 and rows[0]["benchmark"] == "baselines"
    assert "VAE (Chapter 5)" not in models and not any("MNIST" in r["data"] for r in rows)
    assert len(rows) == 1 + 2 * len(zoo.FAMILIES)
    assert [r["collected"] for r in rows if r["benchmark"] == "gan"] == [False, False]
    assert all(r["collected"] for r in rows if r["benchmark"] != "gan")
    assert all(r["benchmark_sources"] == bench.sources_digest(r["benchmark"]) for r in rows)
    # the gallery: one row per family, its lowest FD ÷ floor
    shown = [r for r in rows if r["in_figure"]]
    assert len(shown) == len(zoo.FAMILIES) and len({r["family"] for r in shown}) == len(shown)
    for row in shown:
        assert row["fd_ratio"] == min(r["fd_ratio"] for r in rows if r["family"] == row["family"])
    assert rows[1]["grid"].shape == (16, 1, 8, 8)
    # --rerun runs every family, fresh or not
    ran.clear()
    monkeypatch.setattr(zoo, "RERUN", True)
    bench.BENCHMARKS["zoo"][0]()
    assert ran == [name for name, *_ in zoo.FAMILIES]


def test_zoo_runs_a_missing_table_and_saves_what_it_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("DGMLAB_DATA", str(tmp_path / "no-mnist"))  # the baselines' digits rows only
    rows, how, digest = zoo.family_rows("baselines", results=tmp_path)
    assert how == "ran" and digest == bench.sources_digest("baselines") and len(rows) == 4
    saved = json.loads((tmp_path / "baselines.json").read_text())
    assert saved["sources"] == digest and saved["rows"] == rows
    again, how, _ = zoo.family_rows("baselines", results=tmp_path)
    assert how == "collected" and again == rows


@pytest.mark.parametrize(("row", "kind", "cell"), [
    (dict(nll_is_bound=False), "exact", "| 90.00 | 2.000 | exact |"),
    (dict(nll_is_bound=True), "bound", "| ≤ 90.00 | 2.000 | bound |"),
    (dict(nll_is_bound=False, ais_only_stderr=0.234), "estimate", "| 90.00 ± 0.23 | 2.000 | estimate |"),
    (dict(nll_nats=None, bits_per_dim=None), "none", "| none | none | none (likelihood-free) |"),
])
def test_the_table_says_whether_an_nll_is_exact_a_bound_or_an_estimate(row, kind, cell):
    saved = _row("digits, 17 levels", "m", 2.0, **row)
    entry = zoo.zoo_row(saved, "flows", "normalizing flows", "explicit, tractable", 4, "collected", "abc" * 20)
    assert entry["nll_kind"] == kind
    table = zoo.zoo_table([entry], notes=("A note.",))
    assert cell in table and "| 2.00 (1.00) | 2.00 | 10.0 (0.0) |" in table
    assert "`python -m dgmlab.bench flows` (collected, sources abcabcabcabc)" in table and table.endswith("A note.")


@pytest.mark.parametrize("name", ["zoo", "zoo-mnist"])
def test_the_zoo_in_the_book_is_the_table_its_last_run_wrote(name):
    saved = json.loads((bench.RESULTS_DIR / f"{name}.json").read_text())
    page = (bench.RESULTS_DIR / f"{name}.md").read_text()
    assert bench.TABLES[name](saved["rows"]) in page and f"by `python -m dgmlab.bench {name}`" in page
    assert {r["family"] for r in saved["rows"]} == {family for _, family, *_ in zoo.FAMILIES}
    assert all(ZOO_KEYS <= set(r) for r in saved["rows"])
    if name == "zoo":  # every row is the one its family's table holds now
        for row in saved["rows"]:
            family = json.loads((bench.RESULTS_DIR / f"{row['benchmark']}.json").read_text())
            assert family["sources"] == row["benchmark_sources"], "re-run `python -m dgmlab.bench zoo`"
            same = [r for r in family["rows"] if (r["data"], r["model"]) == (row["data"], row["model"])]
            assert same == [{k: v for k, v in row.items() if k not in ZOO_KEYS}]


class _MnistJudge:
    """Stands in for the MNIST judge (whose classifier takes minutes to train): fixed scores."""

    levels = 2
    heldout = torch.zeros(4, 1, 28, 28)

    def unit(self, x):
        return x.float().reshape(len(x), 1, 28, 28)

    def extractor(self):
        raise AssertionError("the tiny run should not need the classifier")

    def __call__(self, samples):
        assert samples[0].numel() == 784 and set(samples.unique().tolist()) <= {0, 1}
        return {key: 1.0 for key in ("fd", "fd_floor", "fd_ratio", "kid", "kid_floor", "precision",
                                     "precision_floor", "recall", "recall_floor", "class_entropy",
                                     "class_entropy_floor")}


def test_zoo_mnist_trains_one_model_per_family_on_tiny_settings(monkeypatch):
    from dgmlab import ebm as E

    g = torch.Generator().manual_seed(0)
    fake = {s: torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=g)
            for s, n in (("train", 40), ("val", 20), ("test", 20))}
    labels = {s: torch.arange(n) % 10 for s, n in (("y", 40), ("y_val", 20), ("y_test", 20))}
    data = {**fake, **labels, "flat": {s: x.reshape(len(x), -1) for s, x in fake.items()}}
    monkeypatch.setattr(zoo, "_mnist_data", lambda: data)
    monkeypatch.setattr(zoo, "mnist_judge", lambda: _MnistJudge())
    monkeypatch.setattr(zoo, "ZOO_MNIST_BUDGET_S", 1.0)
    monkeypatch.setattr(zoo, "MNIST_SAMPLES", 6)
    monkeypatch.setattr(zoo, "ZOO_MNIST_ODE_IMAGES", 2)
    monkeypatch.setattr(E, "MNIST_AIS", dict(chains=4, temperatures=10))
    monkeypatch.setattr(bench.gan, "mode_and_copy_diagnostics", lambda model, judge, x: {"histogram_entropy": 2.0})
    monkeypatch.setattr(bench.discrete, "class_accuracy", lambda model, judge, x, y: {})
    monkeypatch.setattr(bench.diffusion, "FM_NLL", dict(divergence="hutchinson", method="euler", steps=2))
    monkeypatch.setattr(bench.diffusion, "MNIST_DIFFUSION_CPU", dict(base=4, mults=(1, 2), blocks=1, embed_dim=8))
    # small networks of every family (the code path is the benchmark's)
    from dgmlab import autoregressive as A
    from dgmlab import discrete as Q
    from dgmlab import gan as G

    monkeypatch.setattr(A, "MNIST_MADE", dict(hidden=(16,), num_masks=1))
    monkeypatch.setattr(bench.autoregressive, "MNIST_PIXELCNN", dict(levels=2, channels=4, layers=1, kernel=3,
                                                                      first_kernel=3))
    monkeypatch.setattr(bench.flows, "MNIST_FLOW", dict(levels=256, scales=1, steps=1, hidden=4))
    monkeypatch.setattr(bench.vae, "MNIST_VAE", dict(latent_dim=2, hidden=(8,), decoder="bernoulli"))
    monkeypatch.setattr(Q, "MNIST_VQVAE", {**Q.MNIST_VQVAE, "num_codes": 8, "code_dim": 4, "hidden": 8,
                                           "residual_blocks": 0})
    monkeypatch.setattr(bench.discrete, "MNIST_VQ_PRIOR", dict(d_model=8, heads=2, layers=1, dropout=0.0))
    monkeypatch.setattr(bench.gan, "MNIST_GAN_CPU", dict(channels=4, average=0.99))
    monkeypatch.setattr(G, "MNIST_DCGAN", {**G.MNIST_DCGAN, "latent_dim": 4})
    monkeypatch.setattr(E, "MNIST_RBM", {**E.MNIST_RBM, "hidden": 8, "chains": 10, "sample_steps": 7})
    rows = bench.BENCHMARKS["zoo-mnist"][0]()
    assert [r["family"] for r in rows] == ["classical baselines", "autoregressive", "autoregressive",
                                          "normalizing flows", "VAEs", "discrete latents", "GANs",
                                          "energy-based (RBMs)", "diffusion, flow matching"]
    assert all(r["data"] == "MNIST, binarized" and r["benchmark"] == "zoo-mnist" for r in rows)
    kinds = [r["nll_kind"] for r in rows]
    assert kinds == ["exact", "exact", "exact", "bound", "bound", "bound", "none", "estimate", "bound"]
    assert [r["nfe"] for r in rows] == [0, 784, 784, 1, 1, 49, 1, 7, 10]
    assert all(r["grid"].shape[1:] == (1, 28, 28) for r in rows)
    assert sum(r["in_figure"] for r in rows) == len(zoo.FAMILIES)
    table = zoo.zoo_table(rows, zoo.ZOO_MNIST_NOTES)
    assert "3 min" not in table and "1 min" not in table  # the budget in the names is the one used
    assert all(f"{zoo.ZOO_MNIST_BUDGET_S / 60:g} min" in r["model"] for r in rows[1:])
