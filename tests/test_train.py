"""Tests of dgmlab.train: the one training loop, its checkpoints and its resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dgmlab import train
from dgmlab.train import CheckpointError, History, evaluate, fit, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning")


# ------------------------------------------------------------------ models
class GaussianMean(nn.Module):
    """N(mu, I) with a learnable mean: the maximum-likelihood mu is the data mean."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x - self.mu) ** 2).sum(1).mean()


# The model and the run of the kill-and-resume test. It is run in a child process
# (killed, then restarted) and, for the reference, exec'd here. Its loss draws
# from the global RNG twice (noise injection and dropout), and it is trained with
# Adam on shuffled batches, so a resume that restored the RNG or the shuffling
# generator wrongly would end with different weights.
CHILD = textwrap.dedent('''
    import json, os, sys, time
    import torch
    import torch.nn.functional as F
    from torch import nn
    from dgmlab.train import fit

    class NoisyAutoencoder(nn.Module):
        def __init__(self, hang_at=0, marker=None):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 2))
            self.calls, self.hang_at, self.marker = 0, hang_at, marker

        def loss(self, x):
            self.calls += 1
            if self.calls == self.hang_at:  # mid-epoch: tell the parent, wait to be killed
                open(self.marker, "w").close()
                time.sleep(120)
            noisy = x + 0.3 * torch.randn_like(x)
            return ((self.net(noisy) - x) ** 2).mean()

    class ToyGAN(NoisyAutoencoder):
        """Two optimisers: a discriminator step every batch, a generator step every 2nd."""

        def __init__(self, hang_at=0, marker=None):
            super().__init__(hang_at, marker)
            self.generator = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2))
            self.discriminator = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.3),
                                               nn.Linear(16, 1))

        def optimizer_parameters(self):
            return {"discriminator": list(self.discriminator.parameters()),
                    "generator": list(self.generator.parameters())}

        def loss(self, x):  # the discriminator's loss: what validation scores
            super().loss(x)  # counts the call (and hangs when told to)
            fake = self.generator(torch.randn(len(x), 1))
            return (F.softplus(-self.discriminator(x)) + F.softplus(self.discriminator(fake))).mean()

        def training_losses(self, x, *, step):
            yield "discriminator", self.loss(x)
            if step % 2 == 1:
                yield "generator", F.softplus(-self.discriminator(self.generator(torch.randn(len(x), 1)))).mean()

    def run(checkpoint=None, hang_at=0, marker=None, kind="autoencoder"):
        g = torch.Generator().manual_seed(123)
        data = torch.randn(200, 2, generator=g)
        torch.manual_seed(1)
        model = {"autoencoder": NoisyAutoencoder, "gan": ToyGAN}[kind](hang_at, marker)
        history = fit(model, data[:160], data[160:], epochs=6, batch_size=32, lr=1e-2, seed=7,
                      checkpoint=checkpoint, progress=False)
        return model, history

    if __name__ == "__main__":
        checkpoint, out, marker, hang_at, kind = sys.argv[1:5] + [sys.argv[5]]
        model, history = run(checkpoint, int(hang_at), marker, kind)
        torch.save({"state": model.state_dict(), "history": history.to_dict()}, out)
''')
CALLS_PER_EPOCH = 5 + 2  # 160/32 training batches + 40/32 validation batches


def make_data(n: int = 256, dim: int = 2, mean: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + torch.randn(n, dim, generator=g)


def noisy_mlp() -> nn.Module:
    """A small MLP whose loss draws noise from the global RNG."""

    class NoisyMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

        def loss(self, x):
            return ((self.net(x + 0.1 * torch.randn_like(x)) - x) ** 2).mean()

    torch.manual_seed(0)
    return NoisyMLP()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


def is_plain(obj) -> bool:
    if isinstance(obj, torch.Tensor) or type(obj) in (str, int, float, bool, type(None)):
        return True
    if isinstance(obj, dict):
        return all(type(k) in (str, int) and is_plain(v) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return all(is_plain(v) for v in obj)
    return False


# -------------------------------------------------------------- resume
@pytest.mark.parametrize("kind", ["autoencoder", "gan"])
def test_killed_run_resumes_bit_for_bit(tmp_path, kind):
    """SIGKILLed in epoch 4, then run again: the same weights and losses as a run never stopped,
    with one optimiser, and with two optimisers stepping at different rates (a GAN)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ckpt, out, marker = tmp_path / "run.pt", tmp_path / "final.pt", tmp_path / "hung"
    env = {**os.environ, "DGMLAB_FULL": "0"}
    hang_at = 3 * CALLS_PER_EPOCH + 3  # epoch 4, batch 3: three checkpoints written
    cmd = [sys.executable, str(script), str(ckpt), str(out), str(marker)]

    child = subprocess.Popen(cmd + [str(hang_at), kind], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, f"child exited early:\n{child.stderr.read()}"
        assert time.monotonic() < deadline, "child never reached the batch to be killed at"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(ckpt)["epoch"] == 3  # the kill left the last checkpoint intact
    assert not out.exists()

    done = subprocess.run(cmd + ["0", kind], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resumed = torch.load(out, weights_only=True)

    ns: dict = {}
    exec(compile(CHILD, "child", "exec"), ns)
    model, reference = ns["run"](kind=kind)  # never interrupted, no checkpoint at all
    assert resumed["history"]["resumed_from"] == 3
    assert_same_weights(resumed["state"], model.state_dict())
    assert resumed["history"]["train_loss"] == reference.train_loss
    assert resumed["history"]["losses"] == reference.losses
    assert resumed["history"]["val_loss"] == reference.val_loss


def test_interrupted_run_keeps_checkpoint_and_resumes(tmp_path):
    """Ctrl-C in epoch 3: re-raised with a note, checkpoint of epoch 2 intact, resume matches."""
    data = make_data(64)
    ckpt = tmp_path / "run.pt"

    def interrupt(epoch, history, model):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        fit(noisy_mlp(), data, epochs=5, batch_size=16, checkpoint=ckpt, progress=False,
            callbacks=[interrupt])
    assert "run the same fit(...) call again" in "".join(getattr(info.value, "__notes__", []))
    assert load_checkpoint(ckpt)["epoch"] == 2

    resumed = noisy_mlp()
    history = fit(resumed, data, epochs=5, batch_size=16, checkpoint=ckpt, progress=False)
    reference = noisy_mlp()
    expected = fit(reference, data, epochs=5, batch_size=16, progress=False)
    assert history.resumed_from == 2 and history.epoch == [1, 2, 3, 4, 5]
    assert history.train_loss == expected.train_loss
    assert_same_weights(resumed.state_dict(), reference.state_dict())


def test_finished_run_returns_at_once_with_final_weights(tmp_path):
    data, ckpt = make_data(), tmp_path / "run.pt"
    first = GaussianMean()
    h1 = fit(first, data, epochs=3, checkpoint=ckpt, progress=False)
    after_first = torch.get_rng_state()

    def untrainable() -> GaussianMean:
        model = GaussianMean()
        model.loss = lambda x: pytest.fail("a finished run must not train again")
        return model

    second = untrainable()
    torch.manual_seed(99)
    h2 = fit(second, data, epochs=3, checkpoint=ckpt, progress=False)
    assert torch.equal(second.mu, first.mu)
    assert h2.train_loss == h1.train_loss and h2.completed and h2.resumed_from == 3
    assert torch.equal(torch.get_rng_state(), after_first)  # the RNG as the run left it

    # Deleting the checkpoint starts over (and so does call loss).
    ckpt.unlink()
    with pytest.raises(pytest.fail.Exception, match="must not train"):
        fit(untrainable(), data, epochs=3, checkpoint=ckpt, progress=False)


# ---------------------------------------------------------- checkpoints
def test_checkpoint_is_plain_data_loadable_with_weights_only(tmp_path):
    ckpt = tmp_path / "run.pt"
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    fit(noisy_mlp(), make_data(64), make_data(32, seed=1), epochs=2, checkpoint=ckpt,
        scheduler=sched, patience=5, progress=False)
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert is_plain(state)
    assert {"model", "optimizer", "scheduler", "rng", "history", "early_stopping",
            "fingerprint", "epoch", "finished"} <= state.keys()
    assert state["epoch"] == 2 and state["finished"] is True
    assert History.from_dict(state["history"]).epoch == [1, 2]


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.ones(3), "step": 1}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    original = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(3), "step": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert path.read_bytes() == original
    assert load_checkpoint(path)["step"] == 1


def test_save_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(TypeError, match=r"checkpoint\['opt'\]\[0\] is a SGD"):
        save_checkpoint({"opt": [torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)]}, path)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_mismatched_checkpoint_is_refused(tmp_path):
    data, ckpt = make_data(), tmp_path / "run.pt"
    fit(GaussianMean(), data, epochs=2, batch_size=16, checkpoint=ckpt, progress=False)
    with pytest.raises(CheckpointError, match="batch_size is 16 in the checkpoint, 32 now") as info:
        fit(GaussianMean(), data, epochs=2, batch_size=32, checkpoint=ckpt, progress=False)
    assert str(ckpt) in str(info.value) and "Delete it" in str(info.value)
    with pytest.raises(CheckpointError, match=r"'mu' has shape \[2\] in the checkpoint, \[3\]"):
        fit(GaussianMean(3), make_data(dim=3), epochs=2, batch_size=16, checkpoint=ckpt,
            progress=False)
    # Deleted, it is written anew.
    ckpt.unlink()
    fit(GaussianMean(), data, epochs=2, batch_size=32, checkpoint=ckpt, progress=False)
    assert load_checkpoint(ckpt)["fingerprint"]["batch_size"] == 32


def test_reordered_model_tensors_are_refused_with_a_message(tmp_path):
    """Same names and shapes in another order: the optimiser state (kept by position) would
    land on the wrong tensors, so the checkpoint is refused, and the message says why."""

    class Pair(nn.Module):
        def __init__(self, order: str):
            super().__init__()
            for name in order:
                setattr(self, name, nn.Linear(2, 2))

        def loss(self, x):
            return ((self.a(x) + self.b(x)) ** 2).mean()

    data, ckpt = make_data(32), tmp_path / "run.pt"
    fit(Pair("ab"), data, epochs=1, checkpoint=ckpt, progress=False)
    with pytest.raises(CheckpointError, match="tensors come in a different order"):
        fit(Pair("ba"), data, epochs=1, checkpoint=ckpt, progress=False)


def test_checkpoint_is_saved_after_every_epoch_and_ctrl_c_keeps_the_last(tmp_path, monkeypatch):
    data, ckpt = make_data(64), tmp_path / "run.pt"
    saved = []
    real_save = train.save_checkpoint

    def recording_save(obj, path):
        saved.append((obj["epoch"], obj["finished"]))
        real_save(obj, path)

    monkeypatch.setattr(train, "save_checkpoint", recording_save)

    def interrupt(epoch, history, model):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(noisy_mlp(), data, epochs=5, batch_size=16, checkpoint=ckpt, progress=False,
            callbacks=[interrupt])
    assert saved == [(1, False), (2, False)] and load_checkpoint(ckpt)["epoch"] == 2

    history = fit(noisy_mlp(), data, epochs=5, batch_size=16, checkpoint=ckpt, progress=False)
    assert history.resumed_from == 2
    assert saved == [(1, False), (2, False), (3, False), (4, False), (5, True)]
    assert history.train_loss == fit(noisy_mlp(), data, epochs=5, batch_size=16,
                                     progress=False).train_loss


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "truncated", "foreign"])
def test_corrupt_checkpoint_is_refused(tmp_path, content):
    data, ckpt = make_data(), tmp_path / "run.pt"
    if content == "truncated":
        fit(GaussianMean(), data, epochs=1, checkpoint=ckpt, progress=False)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif content == "foreign":
        torch.save({"weights": torch.ones(2)}, ckpt)
    else:
        ckpt.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        fit(GaussianMean(), data, epochs=1, checkpoint=ckpt, progress=False)
    assert str(ckpt) in str(info.value) and "Delete it" in str(info.value)


# ------------------------------------------------------------ training
def test_fits_the_mean_of_a_gaussian():
    data = make_data(512, mean=3.0)
    model = GaussianMean()
    history = fit(model, data, epochs=30, batch_size=64, lr=0.1, progress=False)
    assert torch.allclose(model.mu, data.mean(0), atol=0.05)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.completed and history.stop_reason == "epochs" and len(history) == 30
    assert history.val_loss == [] and history.best_epoch is None
    assert all(b > a for a, b in zip(history.seconds, history.seconds[1:]))


def test_same_seed_same_weights_different_seed_different():
    data = make_data(128)
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        runs[name] = noisy_mlp()
        fit(runs[name], data, epochs=3, batch_size=16, seed=seed, progress=False)
    assert_same_weights(runs["a"].state_dict(), runs["b"].state_dict())
    assert not torch.equal(runs["a"].net[0].weight, runs["c"].net[0].weight)


def drifting_run(extra_callback=lambda e, h, m: None, **kwargs):
    """Train data at 5, val data at 0, mu starts at 0: the val loss grows every epoch."""
    model = GaussianMean(1)
    trace = []
    record = lambda e, h, m: trace.append(m.mu.detach().clone())  # noqa: E731
    history = fit(model, torch.full((32, 1), 5.0), torch.zeros(8, 1), epochs=20, lr=0.1,
                  progress=False, callbacks=[record, extra_callback], **kwargs)
    return model, history, trace


def test_early_stopping_stops_and_restores_best():
    model, history, trace = drifting_run(patience=2)
    assert history.stopped_early and history.stop_reason == "patience"
    assert history.epoch == [1, 2, 3] and history.best_epoch == 1
    assert history.best_val_loss == history.val_loss[0] == min(history.val_loss)
    assert torch.equal(model.mu, trace[0]) and not torch.equal(model.mu, trace[-1])


def test_early_stopping_state_survives_a_resume(tmp_path):
    """Interrupted in epoch 3 (best epoch 1, one bad epoch so far): resumed, it stops at 3."""
    ckpt = tmp_path / "run.pt"

    def interrupt(epoch, history, model):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drifting_run(patience=2, checkpoint=ckpt, extra_callback=interrupt)
    model, history, trace = drifting_run(patience=2, checkpoint=ckpt)
    expected, _, _ = drifting_run(patience=2)
    assert history.resumed_from == 2 and history.epoch == [1, 2, 3] and history.best_epoch == 1
    assert torch.equal(model.mu, expected.mu)


def test_clip_grad_norm_bounds_the_gradient():
    def norms_seen(clip):
        norms = []

        def sgd(params):
            opt = torch.optim.SGD(params, lr=1e-3)
            opt.register_step_pre_hook(lambda o, a, k: norms.append(torch.linalg.vector_norm(
                torch.cat([p.grad.flatten() for g in o.param_groups for p in g["params"]]))))
            return opt

        fit(GaussianMean(4), make_data(64, dim=4, mean=50.0), epochs=2, batch_size=8,
            optimizer=sgd, clip_grad_norm=clip, progress=False)
        return torch.stack(norms)

    assert norms_seen(None).min() > 10  # without clipping the gradients are large...
    assert norms_seen(0.5).max() <= 0.5 * (1 + 1e-5)  # ...with it, bounded


def test_max_seconds_stops_mid_epoch():
    class Slow(GaussianMean):
        calls = 0

        def loss(self, x):
            Slow.calls += 1
            time.sleep(0.01)
            return super().loss(x)

    model = Slow()
    history = fit(model, make_data(100), epochs=50, batch_size=1, max_seconds=0.2, progress=False)
    assert history.stop_reason == "max_seconds" and history.completed and not history.stopped_early
    assert len(history) == 1 and Slow.calls < 100  # stopped inside the first epoch
    assert 0.2 <= history.seconds[-1] < 2


def test_time_budget_stop_continues_with_a_larger_budget(tmp_path):
    """Out of time is not finished: more time trains on (optimiser and schedule restored);
    the same budget returns at once, as does a run that ran out of epochs."""

    class Slow(GaussianMean):
        batches = 0  # training steps taken, over all runs

        def loss(self, x):
            if not self.training:
                return super().loss(x)
            Slow.batches += 1
            time.sleep(0.01)
            return super().loss(x)

    def untrainable() -> Slow:
        model = Slow()
        model.loss = lambda *x: pytest.fail("this run had nothing left to train")
        return model

    data, val, ckpt = make_data(100), make_data(20, seed=1), tmp_path / "run.pt"
    opts = []

    def run(model, max_seconds):
        return fit(model, data, val, epochs=4, batch_size=10, lr=0.1, max_seconds=max_seconds,
                   optimizer=lambda p: opts.append(torch.optim.Adam(p, lr=0.1)) or opts[-1],
                   scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
                   checkpoint=ckpt, progress=False)

    first = Slow()
    h1 = run(first, 0.03)  # 10 batches of 10 ms per epoch: stops inside epoch 1
    assert h1.stop_reason == "max_seconds" and len(h1) == 1 and Slow.batches < 10
    assert load_checkpoint(ckpt)["finished"] is False

    same = untrainable()
    h2 = run(same, 0.03)  # no more time than was spent: returns as the first run ended
    assert h2.stop_reason == "max_seconds" and h2.epoch == [1] and h2.resumed_from == 1
    assert torch.equal(same.mu, first.mu)

    h3 = run(Slow(), h1.seconds[-1] + 0.05)  # a little more time: a little further
    assert h3.stop_reason == "max_seconds" and 1 < len(h3) < 4 and h3.resumed_from == 1
    assert h3.seconds[-1] > h1.seconds[-1] + 0.05

    h4 = run(Slow(), None)  # no limit: on to the last epoch
    assert h4.stop_reason == "epochs" and h4.completed and h4.epoch == [1, 2, 3, 4]
    assert h4.lr == pytest.approx([0.1, 0.05, 0.025, 0.0125])  # the schedule carried on
    adam = opts[-1].state[opts[-1].param_groups[0]["params"][0]]
    assert adam["step"].item() == Slow.batches  # Adam's moments carried on too
    assert load_checkpoint(ckpt)["finished"] is True
    h5 = run(untrainable(), None)
    assert h5.epoch == [1, 2, 3, 4] and h5.stop_reason == "epochs"


def test_amp_true_runs_bfloat16_autocast_on_cpu():
    class Recorder(GaussianMean):
        dtypes = []

        def loss(self, x):
            Recorder.dtypes.append((x @ torch.ones(2, 2)).dtype)  # matmuls autocast
            return super().loss(x)

    model = Recorder()
    history = fit(model, make_data(), epochs=3, lr=0.1, amp=True, device="cpu", progress=False)
    assert set(Recorder.dtypes) == {torch.bfloat16}
    assert model.mu.dtype == torch.float32 and all(map(math.isfinite, history.train_loss))
    Recorder.dtypes.clear()
    fit(Recorder(), make_data(), epochs=1, amp="auto", device="cpu", progress=False)
    assert set(Recorder.dtypes) == {torch.float32}  # "auto" is off on the CPU


def test_non_finite_loss_names_epoch_and_batch():
    class Explodes(GaussianMean):
        def loss(self, x):
            return super().loss(x) * (float("nan") if self.mu.abs().sum() > 0 else 1.0)

    model = Explodes()
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 2/4.*lower learning rate"):
        fit(model, make_data(256), epochs=2, progress=False)
    assert torch.isfinite(model.mu).all()  # the weights of the last good step


def test_tuples_and_datasets_reach_loss_x_y():
    x = torch.randn(50, 3)
    y = torch.arange(50)

    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3))
            self.seen = 0

        def loss(self, xb, yb):
            assert torch.equal(xb, x[yb])  # the pairing survives the shuffling
            self.seen += len(yb)
            return ((xb - self.w) ** 2).mean()

    class ListOfPairs(Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return x[i], int(y[i])

    for data in [(x, y), [x, y], TensorDataset(x, y), ListOfPairs()]:
        model = Pairs()
        fit(model, data, data, epochs=2, batch_size=16, progress=False)
        assert model.seen == 2 * 50 + 2 * 50  # every training and validation example


def test_scheduler_callbacks_and_history():
    calls = []
    history = fit(
        GaussianMean(), make_data(), make_data(seed=1), epochs=4, lr=0.4, optimizer="sgd",
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        callbacks=[lambda e, h, m: calls.append((e, len(h), isinstance(m, GaussianMean)))],
        progress=False,
    )
    assert history.lr == pytest.approx([0.4, 0.2, 0.1, 0.05])
    assert calls == [(1, 1, True), (2, 2, True), (3, 3, True), (4, 4, True)]
    assert History.from_dict(history.to_dict()) == history
    assert len(history.val_loss) == 4 and history.best_epoch == 4


def test_evaluate_is_the_per_example_mean_without_grad_in_eval_mode():
    class Probe(GaussianMean):
        def loss(self, x):
            assert not torch.is_grad_enabled() and not self.training
            return super().loss(x)

    model, data = Probe(), make_data(100)
    model.train()
    expected = 0.5 * (data**2).sum(1).mean().item()
    assert evaluate(model, data, batch_size=30) == pytest.approx(expected, rel=1e-6)
    assert model.training  # its mode is restored


def test_progress_goes_to_stderr_only_and_can_be_silenced(capsys):
    fit(GaussianMean(), make_data(), epochs=2, progress=False)
    assert capsys.readouterr() == ("", "")
    fit(GaussianMean(), make_data(), make_data(seed=1), epochs=2, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "GaussianMean" in err and "2/2" in err and "val=" in err


# ---------------------------------------------------------- bad inputs
class NoLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


class VectorLoss(GaussianMean):
    def loss(self, x):
        return (x - self.mu).pow(2).sum(1)


@pytest.mark.parametrize(
    "model, data, kwargs, error, message",
    [
        (GaussianMean(), torch.empty(0, 2), {}, ValueError, "train is empty"),
        (GaussianMean(), (torch.ones(5, 2), torch.ones(4)), {}, ValueError, r"lengths \[5, 4\]"),
        (GaussianMean(), {"x": torch.ones(3)}, {}, TypeError, "got dict"),
        (NoLoss(), torch.ones(4, 2), {}, TypeError, "has no loss"),
        ("model", torch.ones(4, 2), {}, TypeError, "nn.Module"),
        (GaussianMean(), torch.ones(4, 2), {"epochs": 0}, ValueError, "epochs should be positive"),
        (GaussianMean(), torch.ones(4, 2), {"batch_size": 2.5}, TypeError, "batch_size"),
        (GaussianMean(), torch.ones(4, 2), {"lr": -1}, ValueError, "lr should be a positive"),
        (GaussianMean(), torch.ones(4, 2), {"optimizer": "rmsprop"}, ValueError, "'adam'"),
        (GaussianMean(), torch.ones(4, 2), {"amp": "yes"}, ValueError, "amp"),
        (GaussianMean(), torch.ones(4, 2), {"amp": 0}, ValueError, r"amp should be True, False"),
        (GaussianMean(), torch.ones(4, 2), {"amp": 1}, ValueError, r"not 0 or 1\); got 1"),
        (GaussianMean(), torch.ones(4, 2), {"patience": 3}, ValueError, "pass val data"),
        (GaussianMean(), torch.ones(4, 2), {"clip_grad_norm": 0}, ValueError, "clip_grad_norm"),
        (GaussianMean(), torch.ones(4, 2), {"device": "gpu0"}, ValueError, "device"),
        (GaussianMean(), torch.ones(4, 2), {"scheduler": "cosine"}, TypeError, "scheduler"),
        (VectorLoss(), torch.ones(4, 2), {}, ValueError, r"scalar tensor .*shape \(4,\)"),
    ],
)
def test_bad_inputs_give_clear_errors(model, data, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit(model, data, progress=False, **kwargs)


def test_cosine_schedule_anneals_to_zero():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = train.cosine(4)(opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_fit_and_evaluate_reports_nll_and_samples(capsys):
    from dgmlab.baselines import DiagonalGaussian

    torch.manual_seed(0)
    x = torch.randn(400, 2) * 2 + 1
    model = DiagonalGaussian(2)
    out = train.fit_and_evaluate(model, x[:300], x[300:350], x[350:], samples=5, epochs=30,
                                 batch_size=100, lr=0.1, progress=False)
    assert out["samples"].shape == (5, 2) and len(out["history"]) == 30
    assert out["nll"].nats == pytest.approx(-model.log_prob(x[350:]).mean().item(), rel=1e-5)
    assert "DiagonalGaussian: 4 parameters, 30 epochs" in capsys.readouterr().out


def test_fit_trains_where_the_model_is_and_full_size_runs_on_the_modes_device(monkeypatch):
    """A GPU turns full mode on; the lecture's small CPU models must stay on the CPU even then
    (the next cells feed them CPU tensors), while fit_and_evaluate trains on the mode's device."""
    from dgmlab import modes

    monkeypatch.setattr(modes, "device", lambda: torch.device("meta"))  # stands in for a GPU
    model = GaussianMean()
    fit(model, make_data(), epochs=1, progress=False)
    assert model.mu.device.type == "cpu"

    class Called(Exception):
        pass

    def record(model, *args, **kwargs):
        raise Called(kwargs["device"])

    monkeypatch.setattr(train, "fit", record)
    with pytest.raises(Called) as called:
        train.fit_and_evaluate(model, make_data(), None, make_data())
    assert called.value.args[0] == torch.device("meta")


# ------------------------------------------------ several optimisers, steps
class ToyGAN(nn.Module):
    """A 1-D GAN: generator x = a·z + b, logistic discriminator; k discriminator steps per
    generator step. It counts each optimiser's steps and records the steps it was shown."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.generator = nn.Linear(1, 1)
        self.discriminator = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.k, self.steps_seen, self.updates = k, [], {"discriminator": 0, "generator": 0}

    def optimizer_parameters(self):
        return {"discriminator": list(self.discriminator.parameters()),
                "generator": list(self.generator.parameters())}

    def sample(self, n):
        return self.generator(torch.randn(n, 1))

    def training_losses(self, x, *, step):
        self.steps_seen.append(step)
        d = self.discriminator
        real, fake = d(x), d(self.sample(len(x)).detach())
        yield "discriminator", (nn.functional.softplus(-real) + nn.functional.softplus(fake)).mean()
        self.updates["discriminator"] += 1
        if step % self.k == self.k - 1:  # every k-th batch, against the discriminator just updated
            yield "generator", nn.functional.softplus(-d(self.sample(len(x)))).mean()
            self.updates["generator"] += 1


def test_two_optimisers_alternate_and_a_toy_gan_learns_the_data_mean():
    data = 3.0 + 0.5 * torch.randn(512, 1, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    gan = ToyGAN(k=2)
    before = gan.sample(4000).mean().item()
    g_before = [p.clone() for p in gan.generator.parameters()]
    history = fit(gan, data, epochs=40, batch_size=64, lr=2e-2, progress=False)
    assert gan.steps_seen == list(range(40 * 8))  # one step number per batch, counted on
    assert gan.updates == {"discriminator": 320, "generator": 160}
    assert set(history.losses) == {"discriminator", "generator"}
    assert history.train_loss[-1] == pytest.approx(sum(v[-1] for v in history.losses.values()))
    assert not all(torch.equal(a, b) for a, b in zip(g_before, gan.generator.parameters()))
    with torch.no_grad():
        after = gan.sample(4000).mean().item()
    assert abs(before - 3.0) > 2 and abs(after - 3.0) < 0.5  # the generator moved to the data


def test_an_unknown_optimiser_name_is_refused():
    class Typo(ToyGAN):
        def training_losses(self, x, *, step):
            yield "discriminatr", self.discriminator(x).mean()

    with pytest.raises(KeyError, match=r"'discriminatr'.*\['discriminator', 'generator'\]"):
        fit(Typo(), make_data(16, dim=1), epochs=1, progress=False)


def test_step_counts_on_across_a_resume(tmp_path):
    """A per-step schedule (a VAE's β, a dVAE's temperature) reads the step, which a resumed run
    continues from where the checkpoint left it."""
    data, ckpt = make_data(40, dim=1), tmp_path / "run.pt"

    def interrupt(epoch, history, model):
        if epoch == 2:
            raise KeyboardInterrupt

    first = ToyGAN()
    with pytest.raises(KeyboardInterrupt):
        fit(first, data, epochs=4, batch_size=10, checkpoint=ckpt, progress=False, callbacks=[interrupt])
    second = ToyGAN()
    fit(second, data, epochs=4, batch_size=10, checkpoint=ckpt, progress=False)
    assert first.steps_seen == list(range(8)) and second.steps_seen == list(range(4, 16))


# ---------------------------------------------------------- validation
def test_data_are_checked_once_then_training_runs_without_value_checks():
    from dgmlab.baselines import IndependentBernoulli
    from dgmlab.validate import validation_enabled

    class Spy(IndependentBernoulli):
        checks, enabled = 0, []

        def check_input(self, x, context=None):
            Spy.checks += 1
            return super().check_input(x, context)

        def loss(self, x, context=None):
            Spy.enabled.append(validation_enabled())
            return super().loss(x, context)

    x = (torch.rand(64, 6, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    fit(Spy(6), x, x[:16], epochs=2, batch_size=16, progress=False)
    assert set(Spy.enabled) == {False} and validation_enabled()  # off inside, on again after
    # once per data set at the door, then once per batch (4 training, 1 validation per epoch)
    assert len(Spy.enabled) == 2 * (4 + 1) and Spy.checks == 2 + len(Spy.enabled)
    bad = x.clone()
    bad[40, 3] = 2.0
    with pytest.raises(ValueError, match=r"train data: x should lie in \[0, 1\]"):
        fit(Spy(6), bad, epochs=1, progress=False)


# ------------------------------------------------- verified checkpoints
def test_a_checkpoint_with_one_flipped_byte_inside_a_tensor_is_refused(tmp_path):
    import zipfile

    ckpt = tmp_path / "run.pt"
    fit(GaussianMean(8), make_data(dim=8), epochs=1, checkpoint=ckpt, progress=False)
    with zipfile.ZipFile(ckpt) as archive:  # where the first stored tensor's bytes begin
        entry = next(i for i in archive.infolist() if "/data/" in i.filename)
        with archive.open(entry) as f:
            payload = f.read()
    raw = bytearray(ckpt.read_bytes())
    offset = raw.find(payload)
    assert offset > 0 and entry.compress_type == zipfile.ZIP_STORED
    raw[offset + len(payload) // 2] ^= 0x01  # one bit of one weight
    ckpt.write_bytes(bytes(raw))
    assert torch.load(ckpt, weights_only=True)["model"]  # torch.load itself does not notice
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a checkpoint") as info:
        fit(GaussianMean(8), make_data(dim=8), epochs=2, checkpoint=ckpt, progress=False)
    assert "checksum" in str(info.value) and "Delete it" in str(info.value)


def test_a_writer_killed_mid_checkpoint_leaves_a_temporary_file_that_the_next_run_removes(tmp_path):
    ckpt = tmp_path / "run.pt"
    writer = textwrap.dedent(f'''
        import time
        from dgmlab.files import atomic_open
        with atomic_open({str(ckpt)!r}) as f:
            f.write(b"half a checkpoint")
            f.flush()
            print("writing", flush=True)
            time.sleep(120)
    ''')
    child = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    temporaries = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name != "run.pt")  # noqa: E731
    assert len(temporaries()) == 1
    train.Checkpoint(ckpt)  # the writer is alive: its file is left alone
    assert len(temporaries()) == 1
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert len(temporaries()) == 1 and not ckpt.exists()  # SIGKILL: nothing could clean up
    fit(GaussianMean(), make_data(), epochs=1, checkpoint=ckpt, progress=False)
    assert temporaries() == [] and load_checkpoint(ckpt)["epoch"] == 1


# ------------------------------------------------------------ the pieces
def test_time_budget_carries_over_and_counts_only_running_epochs():
    budget = train.TimeBudget(0.05, spent=0.04)
    assert not budget.exhausted() and budget.spent() == pytest.approx(0.04)
    budget.start()
    time.sleep(0.02)
    assert budget.exhausted() and budget.spent() >= 0.06
    budget.end_epoch()
    spent = budget.spent()
    time.sleep(0.02)
    assert budget.spent() == spent  # between epochs the clock stands still
    assert not train.TimeBudget(None, spent=1e9).exhausted()


def test_early_stopping_tracks_the_best_weights_and_counts_bad_epochs():
    model, history = GaussianMean(1), History()
    stopper = train.EarlyStopping(patience=2)
    for epoch, (mu, loss) in enumerate([(1.0, 3.0), (2.0, 2.0), (3.0, 2.5), (4.0, 2.0)], 1):
        model.mu.data.fill_(mu)
        history.append(epoch, {"model": 0.0}, loss, float(epoch), 0.1)
        stopper.update(history, model)
    assert history.best_epoch == 2 and history.best_val_loss == 2.0  # a tie is no improvement
    assert stopper.bad_epochs == 2 and stopper.stop
    stopper.restore_best(model)
    assert model.mu.item() == 2.0
    again = train.EarlyStopping(patience=2)
    again.load_state_dict(stopper.state_dict())
    assert again.stop and again.best_state["mu"].item() == 2.0


def test_batches_shuffle_reproducibly_and_cover_every_example_once():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    batches = train.Batches((x, y), "train")
    assert len(batches) == 10 and batches.count(4) == 3
    epoch = list(batches.shuffled(4, torch.Generator().manual_seed(0), "cpu"))
    again = list(batches.shuffled(4, torch.Generator().manual_seed(0), "cpu"))
    assert [len(b[0]) for b in epoch] == [4, 4, 2]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(epoch, again))
    seen = torch.cat([b[1] for b in epoch])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(b[0][:, 0], b[1].float()) for b in epoch)  # pairs stay together
