"""The benchmark runner: rows, tables, and files the book includes."""

import json
import math

import pytest
import torch

from dgmlab import baselines, bench, embedded, metrics

ROW_KEYS = {"nll_nats", "nll_is_bound", "train_s", "sample_ms", "fd", "fd_floor", "fd_ratio", "kid",
            "precision", "recall", "class_entropy"}


def test_baselines_benchmark_rows_match_a_direct_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("DGMLAB_DATA", str(tmp_path / "nothing-here"))  # no MNIST: digits rows only
    rows = bench.run("baselines", out_dir=tmp_path)
    assert [r["data"] for r in rows] == ["digits, binary"] * 2 + ["digits, 17 levels"] * 2
    xb, xb_test = (embedded.digits(s, "binary", flatten=True).x for s in ("train", "test"))
    direct = metrics.heldout_nll(baselines.IndependentBernoulli.from_data(xb, alpha=1.0), xb_test)
    assert rows[0]["nll_nats"] == pytest.approx(direct.nats)
    assert rows[0]["parameters"] == 64 and rows[3]["parameters"] == baselines.parameter_count("markov", 64, 17)
    assert all(r["train_s"] >= 0 and r["sample_ms"] > 0 for r in rows)
    assert all(ROW_KEYS <= set(r) for r in rows)
    # the samples of independent pixels are far from the data, beside a floor shared by the rows
    assert all(r["fd_ratio"] > 1.5 and r["fd"] == pytest.approx(r["fd_ratio"] * r["fd_floor"]) for r in rows)
    assert rows[0]["fd_floor"] == rows[1]["fd_floor"] != rows[2]["fd_floor"] == rows[3]["fd_floor"]
    table = (tmp_path / "baselines.md").read_text()
    assert "| digits, binary | independent pixels | 64 |" in table and "do not edit" in table
    saved = json.loads((tmp_path / "baselines.json").read_text())
    assert saved["rows"] == rows and "grid" not in rows[0]  # the sample grid is saved as 8-bit pixels
    assert bench.decode_grid(rows[0]["samples"]).shape == (16, 1, 8, 8)
    assert saved["sources"] == bench.sources_digest("baselines") and saved["command"] == "python -m dgmlab.bench baselines"
    assert all(r["nfe"] == 0 for r in rows)  # a table of counts calls no network
    assert "`python -m dgmlab.bench baselines` (sources " in table
    png = (tmp_path / "baselines.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) <= 100_000


def test_cli_lists_and_refuses_unknown_benchmarks(capsys):
    assert bench.main([]) == 0
    assert "baselines" in capsys.readouterr().out
    assert bench.main(["nonsense", "--no-save"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_markdown_marks_bounds_and_shows_each_score_beside_its_floor():
    row = {"data": "d", "model": "m", "parameters": 1, "train_s": 0.0, "nll_nats": 1.0,
           "bits_per_dim": 0.1, "density_ms": 0.1, "sample_ms": 0.1, "nll_is_bound": True,
           "fd": 12.34, "fd_floor": 1.5, "precision": 0.5, "precision_floor": 0.8,
           "recall": 0.25, "recall_floor": 0.75}
    table = bench.markdown_table([row])
    assert "≤ 1.00" in table and "| 12.3 (1.5) | 0.50 (0.80) | 0.25 (0.75) |" in table


@pytest.mark.parametrize("name", sorted(bench.BENCHMARKS))
def test_book_results_are_the_benchmark_format(name):
    """Every table the book includes was written by the current benchmark code: same columns,
    and every row with the keys the model zoo collects."""
    page = (bench.RESULTS_DIR / f"{name}.md").read_text()
    saved = json.loads((bench.RESULTS_DIR / f"{name}.json").read_text())
    assert saved["benchmark"] == name and saved["rows"]
    # the page shows the table of the saved rows (not edited by hand), and the command that wrote them
    assert bench.TABLES.get(name, bench.markdown_table)(saved["rows"]) in page
    assert f"by `python -m dgmlab.bench {name}`" in page
    if name not in bench.TABLES:
        assert page.splitlines()[1].startswith("| " + " | ".join(bench.HEADERS))
    assert all(ROW_KEYS <= set(r) for r in saved["rows"])
    png = bench.RESULTS_DIR / f"{name}.png"  # its sample grids, shown beside the table
    assert png.is_file() and png.stat().st_size <= 100_000


def test_sample_figure_has_a_titled_panel_per_row_and_stays_small():
    import io

    import matplotlib.image

    rows = [{"model": f"model {i} with a long name, 10 min", "data": "MNIST, binarized", "nll_nats": 90.0 + i,
             "nll_is_bound": i == 1}
            for i in range(3)]
    digits = embedded.digits("test", "unit").x
    grids = [digits[16 * i: 16 * (i + 1)] for i in range(3)]
    png = bench.sample_figure(rows, grids, max_bytes=100_000)
    image = matplotlib.image.imread(io.BytesIO(png))
    assert len(png) <= 100_000 and image.shape[1] > 2 * image.shape[0]  # three panels side by side
    smaller = bench.sample_figure(rows, grids, max_bytes=len(png) - 1)
    assert len(smaller) < len(png)  # a tighter limit lowers the resolution
    many = bench.sample_figure(rows * 3, grids * 3, max_bytes=400_000)  # nine panels: two lines of them
    wrapped = matplotlib.image.imread(io.BytesIO(many))
    assert wrapped.shape[1] < 1.2 * bench.PANELS_PER_LINE / 3 * image.shape[1] and wrapped.shape[0] > 1.5 * image.shape[0]


def test_every_table_in_the_book_has_its_benchmark():
    """A benchmark removed by mistake would leave its old table in the book, never re-run."""
    written = {path.stem for path in bench.RESULTS_DIR.glob("*.json")}
    assert written == set(bench.BENCHMARKS)


# ---------------------------------------------------------------------------- VAE rows
VAE_KEYS = {"iwae_k", "elbo_nats", "elbo_bpd", "kl_nats", "active_units", "latent_dim", "epochs"}


class _QuickJudge:
    """Stands in for a :class:`bench.Judge` (whose feature classifier takes half a minute to train):
    fixed scores, the digits' image shape."""

    heldout = torch.zeros(1, 1, 8, 8)

    def unit(self, x):
        return x.float() / 16

    def __call__(self, samples):
        return {key: 1.0 for key in ROW_KEYS | {"fd_floor", "precision_floor", "recall_floor"}
                if key not in ("nll_nats", "nll_is_bound", "train_s", "sample_ms")}


def _small_vae(steps=200):
    """A VAE with 4 latents and dropout, trained for a few seconds on the digits (no history)."""
    from dgmlab import vae as V

    torch.manual_seed(0)
    model = V.vae_mlp((1, 8, 8), latent_dim=4, hidden=(64,), dropout=0.3)
    x = embedded.digits("train").x
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(x[torch.randint(len(x), (64,))]).backward()
        optimizer.step()
    return model


def test_vae_rows_report_the_iwae_bound_and_the_diagnostics():
    from dgmlab import vae as V

    test = embedded.digits("test").x
    model = _small_vae()
    row = bench.measure_vae("digits, 17 levels", "small VAE", lambda: model, test, _QuickJudge(), k=64)
    assert ROW_KEYS | VAE_KEYS - {"epochs"} <= set(row) and row["nll_is_bound"]
    assert row["iwae_k"] == 64 and row["latent_dim"] == 4 and "epochs" not in row  # no history, no epochs
    assert model.training  # evaluated without dropout, then returned to training mode
    # the KL is exact here (Gaussian q, N(0, I) prior): the closed form, averaged over the test digits
    assert row["kl_nats"] == pytest.approx(V.kl_per_dimension(model, test).sum().item(), rel=1e-5)
    assert row["active_units"] == V.active_units(model, test) > 0
    assert row["elbo_bpd"] == pytest.approx(metrics.nats_to_bpd(row["elbo_nats"], 64))
    torch.manual_seed(1)
    elbo = metrics.heldout_nll(model, test.repeat(20, 1, 1, 1))  # k = 1, no dropout: the −ELBO, 20 draws each
    assert row["elbo_nats"] == pytest.approx(elbo.nats, abs=0.3)
    # the NLL column is the k = 64 bound, below the −ELBO (a one-draw −ELBO with k = 1)
    assert row["nll_nats"] < row["elbo_nats"] - 0.5
    assert row["bits_per_dim"] == pytest.approx(metrics.nats_to_bpd(row["nll_nats"], 64))


def test_vae_benchmark_row_runs_on_tiny_settings(monkeypatch):
    monkeypatch.setattr(bench.vae, "digits_judge", lambda variant: _QuickJudge())
    row = bench.digits_vae_row("tiny VAE", dict(latent_dim=2, hidden=(16,), prior="vamp", pseudo_inputs=5),
                               dict(batch_size=64), epochs=1, budget=10.0, k=3, train_size=128)
    assert row["data"] == "digits, 17 levels" and row["model"] == "tiny VAE" and row["epochs"] == 1
    assert row["iwae_k"] == 3 and row["latent_dim"] == 2 and 0 <= row["active_units"] <= 2
    assert row["kl_nats"] > 0 and row["grid"].shape == (16, 1, 8, 8)


def test_markdown_table_adds_the_vae_columns_only_when_rows_carry_them():
    row = {"data": "d", "model": "m", "parameters": 1, "train_s": 0.0, "nll_nats": 1.0, "bits_per_dim": 0.1,
           "sample_ms": 0.1, "nll_is_bound": False, "fd": 1.0, "fd_floor": 1.0, "precision": 0.5,
           "precision_floor": 0.8, "recall": 0.25, "recall_floor": 0.75}
    plain = bench.markdown_table([row])
    assert plain.splitlines()[0] == "| " + " | ".join(bench.HEADERS) + " |"
    assert "−ELBO" not in plain and "active units" not in plain
    vae = {**row, "model": "vae", "nll_is_bound": True, "iwae_k": 1000, "elbo_nats": 93.864, "elbo_bpd": 2.116,
           "kl_nats": 11.3, "active_units": 30, "latent_dim": 32}
    lines = bench.markdown_table([row, vae]).splitlines()
    header = lines[0].strip("| ").split(" | ")
    assert header == [*bench.HEADERS, "NLL bound", "−ELBO (nats)", "−ELBO (bits/dim)", "KL (nats)", "active units"]
    assert lines[1].count("---") == len(header)
    assert lines[2].endswith("| – | – | – | – | – |")  # the baseline's row: no bound, no latent
    assert lines[3].endswith("| IWAE, k = 1000 | 93.86 | 2.116 | 11.30 | 30 / 32 |")


def test_vae_mnist_benchmark_says_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DGMLAB_DATA", str(tmp_path / "nothing-here"))
    assert bench.main(["vae-mnist", "--no-save"]) == 2
    assert "MNIST" in capsys.readouterr().err and not list(tmp_path.iterdir())


def _tiny_vqvae(**settings):
    from dgmlab import discrete as D

    torch.manual_seed(0)
    return D.VQVAE(embedded.DIGITS_SHAPE, levels=17, num_codes=8, code_dim=4, hidden=8, **settings)


def test_discrete_diagnostics_are_the_usage_of_the_whole_set_and_the_reconstruction_term():
    from dgmlab import discrete as D

    x, test = embedded.digits("train").x, embedded.digits("test").x
    model = _tiny_vqvae().eval()
    row = bench.discrete_diagnostics(model, test, x)
    usage = D.code_usage(model, x)
    assert row["code_usage"] == usage.fraction_used and row["perplexity"] == pytest.approx(usage.perplexity)
    assert row["num_codes"] == 8 and 0 < row["code_usage"] <= 1
    with torch.no_grad():  # the reconstruction term of the k = 1 bound, for the nearest codes
        assert row["recon_nats"] == pytest.approx(-model.bound(test).reconstruction.mean().item(), rel=1e-5)
    dvae = D.DVAE(embedded.DIGITS_SHAPE, levels=17, num_codes=8, code_dim=4, hidden=8).eval()
    row = bench.discrete_diagnostics(dvae, test, x)
    with torch.no_grad():
        codes = dvae.encode(test)  # the most probable codes, decoded through the codebook
        recon = dvae.decoder.log_prob(test, dvae.codebook(codes).permute(0, 3, 1, 2)).mean().item()
    assert row["recon_nats"] == pytest.approx(-recon, rel=1e-5)


class _Copier(torch.nn.Module):
    """Samples real test digits: of the asked class when ``follows`` is True, else of class 0."""

    def __init__(self, follows):
        super().__init__()
        self.follows = follows
        self.x, self.y = embedded.digits("test").x, embedded.digits("test").y

    def sample(self, n, context):
        classes = context if self.follows else torch.zeros_like(context)
        return torch.stack([self.x[(self.y == c).nonzero()[i % int((self.y == c).sum()), 0]]
                            for i, c in enumerate(classes.tolist())])


def test_class_accuracy_rewards_samples_of_the_asked_class_only():
    test = embedded.digits("test")
    judge = bench.digits_judge("levels")
    right = bench.class_accuracy(_Copier(True), judge, test.x, test.y, per_class=20)
    wrong = bench.class_accuracy(_Copier(False), judge, test.x, test.y, per_class=20)
    assert right["class_accuracy_floor"] == wrong["class_accuracy_floor"] > 0.9
    assert right["class_accuracy"] > 0.9 and wrong["class_accuracy"] < 0.2  # class 0 only: right 1 time in 10


def test_discrete_benchmark_row_runs_on_tiny_settings(monkeypatch):
    monkeypatch.setattr(bench.discrete, "digits_judge", lambda variant: _QuickJudge())
    monkeypatch.setattr(bench.discrete, "DIGITS_BUDGET_S", 3.0)
    monkeypatch.setattr(bench.discrete, "class_accuracy", lambda model, judge, x, y: {
        "class_accuracy": float(model.sample(10, torch.arange(10)).shape == (10, 1, 8, 8)),
        "class_accuracy_floor": 1.0})
    row = bench.digits_discrete_row("tiny VQ-VAE", lambda: _tiny_vqvae(ema=True, restart=2), 1,
                                    dict(batch_size=64), prior="transformer")
    assert row["bound"] == "reconstruction + prior" and row["nll_is_bound"] and row["num_codes"] == 8
    assert row["class_accuracy"] == 1.0 and row["grid"].shape == (16, 1, 8, 8)
    assert row["recon_nats"] < row["nll_nats"]  # the bound adds the prior's −log p(z*) > 0
    lines = bench.markdown_table([row]).splitlines()
    assert "codes used" in lines[0] and "class accuracy (floor)" in lines[0] and "| 1.00 (1.00) |" in lines[2]


# ------------------------------------------------------------------------------ GANs
class _Pool(torch.nn.Module):
    """Samples the objects of a fixed pool in turn (copies of training digits, or noise)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def sample(self, n):
        return self.pool[torch.arange(n) % len(self.pool)]


def test_mode_and_copy_diagnostics_see_copies_missing_classes_and_noise():
    train = embedded.digits("train")
    judge = bench.digits_judge("levels")
    copies = bench.mode_and_copy_diagnostics(_Pool(train.x[torch.randperm(len(train.x))]), judge, train.x)
    assert copies["nn_distance_min"] == copies["nn_distance_median"] == 0.0  # every sample is a training image
    assert 0 < copies["nn_floor_min"] <= copies["nn_floor_median"]  # no test image is one
    assert sum(copies["histogram_counts"]) == bench.HISTOGRAM_SAMPLES
    assert copies["histogram_entropy"] > 0.95 * math.log(10) and copies["histogram_entropy_floor"] > 2.25
    zeros = bench.mode_and_copy_diagnostics(_Pool(train.x[train.y == 0]), judge, train.x)
    assert zeros["histogram_entropy"] < 0.3 and max(zeros["histogram_counts"]) > 950  # one class only
    noise = torch.randint(0, 17, (500, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    far = bench.mode_and_copy_diagnostics(_Pool(noise), judge, train.x)
    assert far["nn_distance_min"] > copies["nn_floor_median"]  # noise is far from every digit


def test_gan_row_has_no_likelihood_and_judges_rounded_samples(monkeypatch):
    from dgmlab import gan as G

    class _GanJudge(_QuickJudge):
        levels = 17

        def __call__(self, samples):
            return {**super().__call__(samples), "kid_floor": 1.0, "c2st_accuracy": 0.5, "c2st_accuracy_floor": 0.5}

    judge, seen = _GanJudge(), {}

    def diagnostics(model, judge, train):
        seen["samples"], seen["train"] = model.sample(50), train
        return {"histogram_entropy": 2.0, "histogram_entropy_floor": 2.3, "nn_distance_median": 1.0,
                "nn_distance_min": 0.5, "nn_floor_median": 1.5, "nn_floor_min": 1.0}

    monkeypatch.setattr(bench.gan, "mode_and_copy_diagnostics", diagnostics)
    unit = embedded.digits("train", "unit").x[:128]
    row = bench.gan_row("digits, 17 levels", "tiny DCGAN", lambda: G.dcgan(latent_dim=4, channels=4), unit, judge,
                        budget=2.0, training=dict(batch_size=64))
    assert row["nll_nats"] is None and row["bits_per_dim"] is None and not row["nll_is_bound"]
    assert row["epochs"] >= 1 and row["parameters"] == G.dcgan(latent_dim=4, channels=4).num_parameters()
    drawn = seen["samples"]
    assert drawn.dtype == torch.long and 0 <= drawn.min() and drawn.max() <= 16  # on the data's 17 levels
    assert torch.equal(seen["train"], (unit * 16).round().long()) and torch.equal(seen["train"],
                                                                                  embedded.digits("train").x[:128])
    table = bench.markdown_table([row])
    assert "| none | none |" in table and "| 1000.0 (1000.0) | 0.50 (0.50) | 2.000 (2.300) | 1 | 1.00 | 1.00, 0.50 (1.50, 1.00) |" in table
    png = bench.sample_figure([row], [row["grid"]])
    assert png.startswith(b"\x89PNG")


# ------------------------------------------------------------------------------ energy-based models
def test_ais_diagnostics_put_the_estimate_beside_the_exact_log_z():
    from dgmlab import ebm as E

    x = embedded.digits("train", "binary").x
    torch.manual_seed(0)
    model = E.RBM(embedded.DIGITS_SHAPE, hidden=6, init_std=0.5).init_from_data(x)
    row = bench.ais_diagnostics(model, x, dict(chains=50, temperatures=300))
    assert row["exact_log_z"] == pytest.approx(float(model.log_normalizer().detach()))
    assert row["ais_error"] == pytest.approx(row["ais_log_z"] - row["exact_log_z"])
    assert abs(row["ais_error"]) < 5 * row["ais_stderr"] + 0.05 and row["ais_s"] > 0
    assert row["ais_runs"] == "50 × 300"
    table = bench.markdown_table([{**{k: 1.0 for k in ROW_KEYS | {"fd_floor", "precision_floor", "recall_floor",
                                                                  "bits_per_dim", "parameters"}},
                                   "data": "d", "model": "m", "nll_is_bound": False, **row}])
    assert "AIS log Z − exact" in table.splitlines()[0] and f"{row['ais_error']:+.3f} (± " in table and "50 × 300, " in table


def test_rbm_benchmark_rows_run_on_tiny_settings(monkeypatch):
    from dgmlab import ebm as E

    monkeypatch.setattr(bench.ebm, "digits_judge", lambda variant: _QuickJudge())
    monkeypatch.setattr(bench.ebm, "DIGITS_BUDGET_S", 2.0)
    monkeypatch.setattr(bench.ebm, "RBM_METHODS", (("CD-1", dict(training="cd", k=1), 2, {}),))
    monkeypatch.setattr(E, "DIGITS_RBM", dict(hidden=4, sample_steps=5))
    monkeypatch.setattr(E, "DIGITS_AIS", dict(chains=10, temperatures=20))
    rows = bench.BENCHMARKS["rbm"][0]()
    assert [r["model"] for r in rows] == ["independent pixels", "RBM (4 hidden), CD-1"]
    rbm = rows[1]
    assert rbm["epochs"] == 2 and not rbm["nll_is_bound"] and rbm["parameters"] == 64 * 4 + 64 + 4
    assert rbm["nll_nats"] < rows[0]["nll_nats"] + 5 and "ais_error" in rbm and "ais_error" not in rows[0]


# ------------------------------------------------------------------------------ diffusion, flow matching
def test_sampler_tables_say_how_many_network_evaluations_each_sampler_takes():
    from dgmlab import diffusion as D

    ddpm = D.DDPM(D.UNet(1, base=8, mults=(1, 2), embed_dim=8), (1, 8, 8), D.cosine_schedule(1000), levels=17)
    fm = D.flow_matching_unet(unet=dict(base=8, mults=(1, 2), embed_dim=8))
    counted = []
    ddpm.denoiser.register_forward_hook(lambda *a: counted.append(1))
    for label, kwargs, nfe in bench.DDPM_SAMPLERS:
        if kwargs:  # the ancestral sampler: one evaluation per step, T steps
            counted.clear()
            ddpm.sample(1, **kwargs)
            assert len(counted) == nfe, label
    for label, kwargs, nfe in bench.FM_SAMPLERS:
        assert fm.sample(1, return_nfe=True, **kwargs)[1] == nfe, label


def test_diffusion_benchmark_rows_run_on_tiny_settings(monkeypatch):
    from dgmlab import diffusion as D

    monkeypatch.setattr(bench.diffusion, "digits_judge", lambda variant: _QuickJudge())
    monkeypatch.setattr(bench.diffusion, "mode_and_copy_diagnostics", lambda model, judge, x: {"nn_distance_min": 1.0})
    monkeypatch.setattr(bench.diffusion, "class_accuracy", lambda model, judge, x, y, per_class: {
        "class_accuracy": float(model.sample(10, torch.arange(10)).shape == (10, 1, 8, 8)),
        "class_accuracy_floor": 1.0})
    monkeypatch.setattr(bench.diffusion, "DIFFUSION_BUDGET_S", 1.0)
    monkeypatch.setattr(bench.diffusion, "GUIDANCE_BUDGET_S", 1.0)
    monkeypatch.setattr(bench.diffusion, "DDPM_SAMPLERS", (("DDIM, 2 steps", dict(method="ddim", steps=2), 2),))
    monkeypatch.setattr(bench.diffusion, "FM_SAMPLERS", bench.diffusion.FM_SAMPLERS[-1:])
    monkeypatch.setattr(bench.diffusion, "DDPM_DIAGNOSED", "DDIM, 2 steps")
    monkeypatch.setattr(bench.diffusion, "GUIDANCE_WEIGHTS", (0.0, 3.0))
    monkeypatch.setattr(bench.diffusion, "FM_NLL", dict(divergence="hutchinson", method="euler", steps=2))
    monkeypatch.setattr(D, "DIGITS_UNET", dict(base=8, mults=(1, 2), embed_dim=8))
    monkeypatch.setattr(D, "DIGITS_DDPM", dict(D.DIGITS_DDPM, timesteps=10))
    rows = bench.BENCHMARKS["diffusion"][0]()
    assert [r["model"] for r in rows] == ["DDPM: DDIM, 2 steps", "flow matching: Euler, 1 step",
                                          "class-conditional flow matching: guidance w = 0",
                                          "class-conditional flow matching: guidance w = 3"]
    assert all(r["nll_is_bound"] and r["grid"].shape[1:] == (1, 8, 8) for r in rows)
    assert [r["nfe"] for r in rows] == [2, 1, 10, 20] and rows[-1]["class_accuracy"] == 1.0
    assert rows[0]["likelihood"] == "bound, T = 10" and "nn_distance_min" in rows[0] and "nn_distance_min" in rows[1]
    assert "nn_distance_min" not in rows[2]
    header = bench.markdown_table([dict(r) for r in rows]).splitlines()[0]
    assert "network evaluations per sample" in header and "FD ÷ floor" in header and "class accuracy" in header
