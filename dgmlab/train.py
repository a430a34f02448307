"""One training loop for every chapter: :func:`fit`.

Every model in the course learns the same way: for each shuffled mini-batch,
compute the loss, zero the gradients, backpropagate, clip them, take a step.
:func:`fit` is that loop, to be read next to the lecture. What a real run needs
besides lives in small pieces around it, each tested on its own:

* :class:`History`       -- what ``fit`` returns: losses and times per epoch, how the run ended;
* :class:`Checkpoint`    -- atomic, verified checkpoints from which a killed run goes on bit for bit;
* :class:`EarlyStopping` -- patience on the validation loss, and the best weights;
* :class:`TimeBudget`    -- a limit in seconds that carries over when a run is resumed;
* :class:`Batches`       -- the data, shuffled reproducibly and cut into mini-batches.

**Models that do not just minimise one loss.** ``fit`` asks the model what to
minimise (:meth:`dgmlab.base.GenerativeModel.training_losses`): a sequence of
(optimiser name, loss) pairs per batch, one optimiser per name
(:meth:`~dgmlab.base.GenerativeModel.optimizer_parameters`). The usual case is
one pair, ``("model", model.loss(x))``. A GAN yields the discriminator's loss
every batch and the generator's every k-th (``step`` counts batches); an RBM
trained by contrastive divergence yields a free-energy difference whose
gradient is the CD-k gradient; a VAE or a dVAE reads its β or temperature off
``step``; a VQ-VAE's EMA codebook lives in buffers, saved with the weights; a
diffusion model draws its times from the global RNG, which checkpoints keep.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
import zipfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate
from tqdm.std import tqdm  # the text bar: notebooks are rendered statically

from dgmlab import modes
from dgmlab.base import count_parameters, module_device
from dgmlab.files import atomic_open, remove_stale_temporaries
from dgmlab.validate import as_tensor, check_choice, check_positive_int, validation

__all__ = [
    "fit", "evaluate", "fit_and_evaluate", "cosine", "History", "Batches", "Checkpoint",
    "EarlyStopping", "TimeBudget", "save_checkpoint", "load_checkpoint", "CheckpointError",
]

FORMAT = "dgmlab.train/2"  # written into every checkpoint, checked on resume
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


# ==================================================================== the loop
def fit(model: nn.Module, train, val=None, *, epochs: int = 10, batch_size: int = 64,
        lr: float = 1e-3, optimizer: str | Callable = "adam", weight_decay: float = 0.0,
        scheduler: Callable | None = None, clip_grad_norm: float | None = None,
        patience: int | None = None, max_seconds: float | None = None,
        checkpoint: str | os.PathLike | None = None, seed: int = 0, device="auto",
        amp: bool | str = "auto", callbacks: Iterable[Callable] | Callable = (),
        progress: bool = True) -> History:
    """Train ``model`` on ``train`` for ``epochs`` passes of shuffled mini-batches.

    ``train``/``val``: a tensor ``(N, ...)`` (batches reach ``model.loss(x)``), a
    tuple of tensors sharing N (``model.loss(x, context)``) or a Dataset of tuples.
    ``val`` is scored after every epoch; the best epoch's weights are put back at
    the end, and ``patience`` epochs without a better score stop the run early.
    ``optimizer``: "adam", "adamw", "sgd" (no momentum), or ``params -> Optimizer``;
    ``scheduler``: ``optimizer -> LRScheduler``, stepped once per epoch.
    ``clip_grad_norm`` bounds the global gradient norm; ``max_seconds`` is a time
    budget, checked between batches. ``callbacks``: functions
    ``cb(epoch, history, model)`` called after every epoch.

    Reproducible: ``seed`` seeds the global torch RNG (the model's own noise) and
    the shuffling. ``device="auto"`` trains where the model is; ``amp="auto"``
    uses bfloat16 autocast on GPUs that support it natively (``True``: also on
    the CPU). The model ends in eval mode, on its device.

    ``checkpoint="run.pt"`` saves after every epoch; the same call again goes on
    from there bit for bit (a finished run returns at once; one stopped by its
    time budget goes on when given more time). Delete the file to start over.
    """
    run = _Run(model, train, val, locals())  # every argument above, checked
    history = run.start()  # a fresh, seeded run, or the checkpoint's
    with _Progress(run, history, progress) as bar, _interrupt_note(run), validation(False):
        while not run.finished:
            model.train()
            losses = _Means()
            for batch in run.batches():                          # a shuffled mini-batch
                for name, loss in run.losses(batch):             # its loss (one per optimiser)
                    opt = run.optimizers[name]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()                              # the gradient
                    run.clip(opt)                                # bounded
                    opt.step()                                   # one step downhill
                    losses.add(name, loss.item(), len(batch[0]))
                run.step += 1
                if run.budget.exhausted():
                    break
            run.end_epoch(history, losses.means())  # validation, early stopping, schedule, checkpoint
            bar.update(history)
    model.eval()
    return history


class _Run:
    """Everything ``fit`` sets up: checked arguments, optimisers, schedulers, the pieces."""

    def __init__(self, model, train, val, args: dict):
        _check_model(model)
        self.model, self.epochs = model, check_positive_int(args["epochs"], "epochs")
        self.train, self.val = Batches(train, "train"), None if val is None else Batches(val, "val")
        self.batch_size = check_positive_int(args["batch_size"], "batch_size")
        self.seed = check_positive_int(args["seed"], "seed", allow_zero=True)
        self.clip_norm = _check_number(args["clip_grad_norm"], "clip_grad_norm", optional=True)
        if args["patience"] is not None and val is None:
            raise ValueError("patience (early stopping) watches the validation loss: pass val data.")
        self.stopper = EarlyStopping(args["patience"])
        self.budget = TimeBudget(_check_number(args["max_seconds"], "max_seconds", optional=True))
        self.callbacks = _check_callbacks(args["callbacks"])
        self.device = module_device(model) if args["device"] == "auto" else _resolve_device(args["device"])
        self.autocast = _autocast(args["amp"], self.device)
        _check_data(model, self.train, self.val)
        model.to(self.device)
        self.optimizers = _optimizers(model, args["optimizer"], args["lr"], args["weight_decay"])
        self.schedulers = _schedulers(self.optimizers, args["scheduler"])
        self.checkpoint = None if args["checkpoint"] is None else Checkpoint(args["checkpoint"])
        self.fingerprint = _fingerprint(model, self.optimizers, self.schedulers, dict(
            epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, clip_grad_norm=self.clip_norm,
            patience=args["patience"], n_train=len(self.train), n_val=0 if val is None else len(self.val)))
        self.shuffler = torch.Generator()
        self.epoch, self.step, self.epoch_step = 1, 0, 0  # the epoch under way; batches so far
        self.finished, self.saved = False, None  # nothing left to train; last epoch in the checkpoint

    def start(self) -> History:
        """A new run, seeded; or the checkpoint's run, restored to the end of its last epoch."""
        if self.checkpoint is None or not self.checkpoint.exists():
            torch.manual_seed(self.seed)  # for the model's own randomness (noise, dropout)
            self.shuffler.manual_seed(self.seed)
            return History()
        state = self.checkpoint.load(self.fingerprint)
        with self.checkpoint.restoring():
            history = _restore(self, state)
        self.saved = history.resumed_from = state["epoch"]
        return history

    def batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """This epoch's shuffled mini-batches, on the training device; starts the clock."""
        self.budget.start()
        self.epoch_step = self.step
        return self.train.shuffled(self.batch_size, self.shuffler, self.device)

    def losses(self, batch) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's (optimiser, loss) pairs for ``batch``, each checked; forward passes autocast."""
        losses = _training_losses(self.model, batch, self.step)
        where = f"epoch {self.epoch}, batch {self.step - self.epoch_step + 1}/{self.train.count(self.batch_size)}"
        while True:
            with self.autocast():  # only the forward pass: backward runs in the forward's precisions
                name, loss = next(losses, (None, None))
            if name is None:
                return
            if name not in self.optimizers:
                raise KeyError(f"{type(self.model).__name__}.training_losses named the optimiser "
                               f"{name!r}; optimizer_parameters() defines {sorted(self.optimizers)}.")
            yield name, _check_loss(loss, self.model, where)

    def clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Rescale this optimiser's gradients together so their global L2 norm is at most the bound."""
        if self.clip_norm is not None:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.clip_norm)

    def end_epoch(self, history: History, losses: dict[str, float]) -> None:
        """Book-keeping after an epoch: history, validation, early stopping, schedule, checkpoint."""
        val_loss = None if self.val is None else _mean_loss(self.model, self.val, self.batch_size, self.device)
        history.append(self.epoch, losses, val_loss, self.budget.spent(), _lr(self.optimizers))
        self.budget.end_epoch()
        if val_loss is not None:
            self.stopper.update(history, self.model)
        for sched in self.schedulers.values():
            sched.step()
        for cb in self.callbacks:  # before the checkpoint: their RNG draws are saved too
            cb(self.epoch, history, self.model)
        history.stop_reason = ("patience" if self.stopper.stop else "epochs" if self.epoch == self.epochs
                               else "max_seconds" if self.budget.exhausted() else "")
        # Out of epochs or patience is final; out of time is not: with more time, the run goes on.
        self.finished = history.stop_reason in ("epochs", "patience")
        if self.finished:
            self.stopper.restore_best(self.model)
        if self.checkpoint is not None:
            self.checkpoint.save(_state(self, history))
            self.saved = self.epoch
        if history.stop_reason == "max_seconds":  # returned like a finished run; the file keeps the last weights
            self.stopper.restore_best(self.model)
            self.finished = True
        self.epoch += 1


def _training_losses(model, batch, step: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.training_losses`` if it has one; else the one loss of a plain ``nn.Module``."""
    if hasattr(model, "training_losses"):
        yield from model.training_losses(*batch, step=step)
    else:
        yield "model", model.loss(*batch)


class _Means:
    """Per-example means of each optimiser's loss over an epoch."""

    def __init__(self):
        self.total, self.count = defaultdict(float), defaultdict(int)

    def add(self, name: str, value: float, n: int) -> None:
        self.total[name] += value * n
        self.count[name] += n

    def means(self) -> dict[str, float]:
        return {name: self.total[name] / self.count[name] for name in self.total}


# ===================================================================== history
@dataclass
class History:
    """What :func:`fit` returns: one entry per epoch, and how the run ended.

    ``losses[name]`` is the mean training loss of each optimiser; ``train_loss``
    their sum (with one optimiser, its loss). ``seconds`` is the cumulative
    training time (it carries on across resumes), ``lr`` the first optimiser's
    learning rate during each epoch, ``val_loss`` empty without validation data.
    ``stop_reason``: "epochs", "patience" (early stopping), "max_seconds" (the
    time budget: a larger one trains on), or "" while running.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    val_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    stop_reason: str = ""
    resumed_from: int | None = None

    def __len__(self) -> int:
        return len(self.epoch)

    @property
    def completed(self) -> bool:
        return bool(self.stop_reason)

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "patience"

    def append(self, epoch: int, losses: dict[str, float], val_loss: float | None, seconds: float,
               lr: float) -> None:
        self.epoch.append(epoch)
        self.train_loss.append(sum(losses.values()))
        for name, value in losses.items():
            self.losses.setdefault(name, []).append(value)
        if val_loss is not None:
            self.val_loss.append(val_loss)
        self.seconds.append(seconds)
        self.lr.append(lr)

    def to_dict(self) -> dict:
        """Plain lists and numbers (a copy): fit for JSON and for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """Inverse of :meth:`to_dict`."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Not History fields: {sorted(unknown)}.")
        plain = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}
        plain["losses"] = {k: list(v) for k, v in d.get("losses", {}).items()}
        return cls(**plain)


# ========================================================================= data
class Batches:
    """The data ``fit`` accepts, cut into mini-batches: a tensor ``(N, ...)``, a tuple of
    tensors sharing N (a TensorDataset counts as one), or a map-style Dataset of tuples."""

    def __init__(self, data, name: str):
        self.name, self.tensors, self.dataset = name, None, None
        data = data.tensors if isinstance(data, TensorDataset) else data
        if isinstance(data, IterableDataset) or (isinstance(data, Dataset) and not hasattr(data, "__len__")):
            raise TypeError(f"{name} should be a map-style Dataset (with __len__ and __getitem__), "
                            "so that it can be shuffled.")
        if isinstance(data, Dataset):
            self.dataset, self.n = data, len(data)
            if self.n:
                self._as_tuple(default_collate([data[0]]))  # fail at the door
        elif isinstance(data, (tuple, list, torch.Tensor)) or hasattr(data, "__array__"):
            parts = data if isinstance(data, (tuple, list)) else (data,)
            self.tensors = tuple(as_tensor(t, f"{name}[{i}]") for i, t in enumerate(parts))
            self.n = self._common_length()
        else:
            raise TypeError(f"{name} should be a tensor of shape (N, ...), a tuple of such tensors "
                            f"or a torch Dataset; got {type(data).__name__}.")
        if self.n == 0:
            raise ValueError(f"{name} is empty: it needs at least one example.")

    def _common_length(self) -> int:
        if not self.tensors:
            raise ValueError(f"{self.name} is an empty tuple; pass (x,) or (x, context) tensors.")
        if any(t.dim() == 0 for t in self.tensors):
            raise ValueError(f"{self.name} holds a scalar; every tensor needs a first dimension N.")
        lengths = [len(t) for t in self.tensors]
        if len(set(lengths)) > 1:
            raise ValueError(f"{self.name} holds tensors of different lengths {lengths}; the first "
                             "dimension indexes the examples, so it must agree.")
        return lengths[0]

    def __len__(self) -> int:
        return self.n

    def count(self, batch_size: int) -> int:
        return math.ceil(self.n / batch_size)

    def _as_tuple(self, batch) -> tuple[torch.Tensor, ...]:
        batch = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(batch, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in batch):
            raise TypeError(f"The items of {self.name} should be tensors or tuples of tensors "
                            f"(or numbers), got {type(batch).__name__} after batching.")
        return tuple(batch)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The examples ``idx`` (shape ``(B,)``) as a tuple of tensors on ``device``."""
        if self.tensors is not None:
            return tuple(t[idx.to(t.device)].to(device) for t in self.tensors)
        items = default_collate([self.dataset[i] for i in idx.tolist()])
        return tuple(t.to(device) for t in self._as_tuple(items))

    def shuffled(self, batch_size: int, generator: torch.Generator, device) -> Iterator[tuple]:
        """One epoch: a fresh permutation drawn from ``generator``, cut into batches."""
        for idx in torch.randperm(self.n, generator=generator).split(batch_size):
            yield self.batch(idx, device)

    def in_order(self, batch_size: int, device) -> Iterator[tuple]:
        for idx in torch.arange(self.n).split(batch_size):
            yield self.batch(idx, device)


def _check_data(model, train: Batches, val: Batches | None) -> None:
    """Check every example once, at the door (the loop then runs with value checks off)."""
    check = getattr(model, "check_input", None)
    for data in (train, val):
        if check is not None and data is not None and data.tensors is not None:
            try:
                check(*data.tensors[:2])
            except (ValueError, TypeError) as err:
                raise type(err)(f"{data.name} data: {err}") from None


# =================================================================== pieces
class TimeBudget:
    """A training-time limit in seconds that carries over across resumes (None: no limit)."""

    def __init__(self, max_seconds: float | None, spent: float = 0.0):
        self.max_seconds, self.before, self.started = max_seconds, spent, None

    def start(self) -> None:
        """Start the clock for an epoch; time already spent (``before``) counts too."""
        self.started = time.perf_counter()

    def spent(self) -> float:
        running = 0.0 if self.started is None else time.perf_counter() - self.started
        return self.before + running

    def exhausted(self) -> bool:
        return self.max_seconds is not None and self.spent() > self.max_seconds

    def end_epoch(self) -> None:
        self.before, self.started = self.spent(), None


class EarlyStopping:
    """Track the best validation loss and its weights; ``stop`` after ``patience`` epochs
    without an improvement (None: never stop, but still keep the best weights)."""

    def __init__(self, patience: int | None):
        self.patience = None if patience is None else check_positive_int(patience, "patience")
        self.best_state: dict | None = None
        self.bad_epochs = 0

    def update(self, history: History, model: nn.Module) -> None:
        loss = history.val_loss[-1]
        if history.best_val_loss is None or loss < history.best_val_loss:
            history.best_epoch, history.best_val_loss, self.bad_epochs = history.epoch[-1], loss, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"best_state": self.best_state, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best_state, self.bad_epochs = state["best_state"], state["bad_epochs"]


# ============================================================== checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is corrupt, or belongs to a different run."""


class Checkpoint:
    """The checkpoint file of one run: atomic writes, verified reads, no stale temporaries.

    Creating one deletes the temporary files of writers killed half way through
    (see :func:`dgmlab.files.remove_stale_temporaries`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)  # fail now, not later
        remove_stale_temporaries(self.path)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self, state: dict) -> None:
        save_checkpoint(state, self.path)

    def load(self, fingerprint: dict) -> dict:
        """Load and verify the checkpoint, and make sure it belongs to this very run."""
        state = load_checkpoint(self.path)
        todo = "Delete it (or pass another checkpoint path) to start over."
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not a checkpoint of this version of dgmlab's fit. {todo}")
        diffs = _differences(state.get("fingerprint", {}), fingerprint)
        if diffs:
            raise CheckpointError(f"The checkpoint {self.path} was written by a different run: "
                                  + "; ".join(diffs) + f". {todo}")
        return state

    @contextlib.contextmanager
    def restoring(self):
        """Turn a malformed checkpoint's low-level error into a CheckpointError naming the file."""
        try:
            yield
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"The checkpoint {self.path} could not be restored "
                                  f"({type(err).__name__}: {err}). Delete it to start over.") from err


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically: the file is the old one or the new one, never half.

    Only plain data (tensors, numbers, strings, None, lists, tuples, dicts) is
    accepted, so that :func:`load_checkpoint` can read it with ``weights_only=True``.
    """
    _check_plain(obj)
    with atomic_open(path, "wb", private=True) as f:
        torch.save(obj, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU, after verifying every byte of it.

    ``torch.save`` writes a zip archive with a CRC-32 checksum per entry, but
    ``torch.load`` does not check them: a flipped byte inside a tensor loads as
    a wrong weight. The checksums are verified first, and the archive is then
    read with ``weights_only=True`` (no pickled code runs).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every entry, compares its CRC-32
        if damaged is not None:
            raise ValueError(f"the checksum of its entry {damaged!r} does not match its content")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"Could not read the checkpoint {path} ({type(err).__name__}: {reason}). It is "
            "corrupt, truncated or not a checkpoint. Delete it to start over.") from err


def _check_plain(obj, where: str = "checkpoint") -> None:
    """Refuse anything that ``torch.load(weights_only=True)`` would not read back."""
    if isinstance(obj, torch.Tensor) or type(obj) in (str, int, float, bool, type(None)):
        return  # exact types: a NumPy float is a float, but would not load
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int.")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}. A checkpoint holds only tensors, numbers, "
                    "strings, None, lists, tuples and dicts, so that it loads with weights_only=True.")


def _state(run: _Run, history: History) -> dict:
    """Everything a resumed run needs to go on as if it had never stopped."""
    return {
        "format": FORMAT, "epoch": run.epoch, "step": run.step, "finished": run.finished,
        "fingerprint": run.fingerprint, "model": run.model.state_dict(),
        "optimizer": {name: opt.state_dict() for name, opt in run.optimizers.items()},
        "scheduler": {name: s.state_dict() for name, s in run.schedulers.items()},
        "rng": _get_rng_state(run.shuffler), "history": history.to_dict(),
        "early_stopping": run.stopper.state_dict(),
    }


def _restore(run: _Run, state: dict) -> History:
    """Put the run back where the checkpoint left it; ``run.finished`` if nothing is left to do."""
    run.model.load_state_dict(state["model"])
    _set_rng_state(state["rng"], run.shuffler)
    history = History.from_dict(state["history"])
    run.stopper.load_state_dict(state["early_stopping"])
    run.step, run.epoch = state["step"], state["epoch"] + 1
    run.budget.before = history.seconds[-1] if history.seconds else 0.0
    out_of_time = history.stop_reason == "max_seconds" and run.budget.exhausted()
    if state["finished"] or out_of_time:
        run.stopper.restore_best(run.model)  # as the stopped run returned it
        run.finished = True
        return history
    for name, opt in run.optimizers.items():
        opt.load_state_dict(state["optimizer"][name])
    for name, sched in run.schedulers.items():
        sched.load_state_dict(state["scheduler"][name])
    history.stop_reason = ""  # out of time before, with more time now: go on
    return history


def _fingerprint(model: nn.Module, optimizers: dict, schedulers: dict, hparams: dict) -> dict:
    """What a checkpoint must agree on to continue this run: the model and the hyperparameters."""
    plain = (bool, int, float, str, tuple)  # the optimisers' own settings (lr, betas, ...)
    return {
        "model": type(model).__name__,
        "tensors": [[name, list(t.shape)] for name, t in model.state_dict().items()],
        "optimizer": {name: [type(opt).__name__, {k: v for k, v in opt.defaults.items() if isinstance(v, plain)}]
                      for name, opt in optimizers.items()},
        "scheduler": {name: type(s).__name__ for name, s in schedulers.items()},
        **hparams,
    }


def _differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two fingerprints."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "tensors":
            sa, sb = dict(map(tuple, a or [])), dict(map(tuple, b or []))
            name = next((n for n in [*sa, *sb] if sa.get(n) != sb.get(n)), None)
            if name is None:  # same names and shapes: the optimiser state would be misassigned
                out.append("the model's tensors come in a different order than in the "
                           f"checkpoint ({list(sa)[:4]}... then, {list(sb)[:4]}... now)")
            else:
                out.append(f"model tensor {name!r} has shape {sa.get(name)} in the checkpoint, "
                           f"{sb.get(name)} now (None: absent)")
        else:
            out.append(f"{key} is {a!r} in the checkpoint, {b!r} now")
    return out


def _get_rng_state(shuffler: torch.Generator) -> dict:
    """Every random stream the run draws from, so that a resume replays the same numbers."""
    return {"torch": torch.get_rng_state(), "shuffle": shuffler.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def _set_rng_state(state: dict, shuffler: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    shuffler.set_state(state["shuffle"])


# ============================================================ progress, Ctrl-C
class _Progress:
    """A text progress bar over epochs, on stderr, showing the latest losses."""

    def __init__(self, run: _Run, history: History, enabled: bool):
        self.bar = tqdm(total=run.epochs, initial=len(history), desc=type(run.model).__name__,
                        unit="epoch", file=sys.stderr, disable=not enabled)

    def update(self, h: History) -> None:
        shown = h.losses if len(h.losses) > 1 else {"train": h.train_loss}
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in shown.items()}
                             | ({"val": f"{h.val_loss[-1]:.4g}"} if h.val_loss else {}))

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


@contextlib.contextmanager
def _interrupt_note(run: _Run):
    """On Ctrl-C, add a note to the KeyboardInterrupt saying how to go on."""
    try:
        yield
    except KeyboardInterrupt as err:
        if run.saved is not None:
            note = (f"fit was interrupted in epoch {run.epoch}. The checkpoint {run.checkpoint.path} holds "
                    f"epoch {run.saved}: run the same fit(...) call again to continue from there.")
        else:
            note = (f"fit was interrupted in epoch {run.epoch}; no checkpoint was written. "
                    "Pass checkpoint='run.pt' to make a run resumable.")
        err.add_note(note) if hasattr(err, "add_note") else None  # Python 3.11+
        raise


# ================================================================= evaluate
def evaluate(model: nn.Module, data, *, batch_size: int = 256, device="auto") -> float:
    """Mean of ``model.loss`` per example over ``data``, in eval mode and without gradients.

    ``data`` is given as to :func:`fit`. ``device="auto"`` keeps the model where it
    is; another device moves it there. Its train/eval mode is restored after.
    """
    _check_model(model)
    batches = Batches(data, "data")
    batch_size = check_positive_int(batch_size, "batch_size")
    dev = module_device(model) if device == "auto" else _resolve_device(device)
    model.to(dev)
    return _mean_loss(model, batches, batch_size, dev)


@torch.no_grad()
def _mean_loss(model: nn.Module, data: Batches, batch_size: int, device: torch.device) -> float:
    """Per-example mean of ``model.loss`` (a batch mean) over ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)  # one sync, at the end
        for b, batch in enumerate(data.in_order(batch_size, device)):
            loss = _check_loss(model.loss(*batch), model, f"batch {b + 1}", train=False)
            total += loss.detach().double() * len(batch[0])
    finally:
        model.train(was_training)
    return total.item() / len(data)


def fit_and_evaluate(model: nn.Module, train, val, test: torch.Tensor, *, samples: int = 16,
                     scale: float = 1.0, **fit_kwargs) -> dict:
    """Train with :func:`fit`, then report the held-out NLL and draw ``samples`` objects.

    The recipe of every full-size notebook cell in one call: returns a dict with
    ``history``, ``nll`` (a :class:`dgmlab.metrics.NLL`: nats and bits/dim; pass
    ``scale=256`` for continuous models of rescaled 8-bit data) and ``samples``,
    and prints a one-line summary. Unless ``device`` is given, it trains on
    :func:`dgmlab.modes.device` (the GPU in full mode).
    """
    from .metrics import heldout_nll

    fit_kwargs.setdefault("device", modes.device())
    history = fit(model, train, val, **fit_kwargs)
    nll = heldout_nll(model, test, scale=scale)
    drawn = model.sample(samples).cpu() if samples else None
    seconds = history.seconds[-1] if history.seconds else 0.0
    print(f"{type(model).__name__}: {count_parameters(model):,} parameters, {len(history)} epochs "
          f"in {seconds:.0f} s; test {nll}")
    return {"history": history, "nll": nll, "samples": drawn}


def cosine(epochs: int) -> Callable:
    """A ``scheduler`` for :func:`fit`: the learning rate follows half a cosine to 0 over ``epochs``."""
    epochs = check_positive_int(epochs, "epochs")
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


# ================================================================== helpers
def _optimizers(model: nn.Module, optimizer, lr, weight_decay) -> dict[str, torch.optim.Optimizer]:
    """One optimiser per name in ``model.optimizer_parameters()`` (plain modules: one, "model")."""
    lr = _check_number(lr, "lr")
    weight_decay = _check_number(weight_decay, "weight_decay", allow_zero=True)
    if not callable(optimizer):
        check_choice(optimizer, "optimizer", list(OPTIMIZERS))
    groups = (model.optimizer_parameters() if hasattr(model, "optimizer_parameters")
              else {"model": [p for p in model.parameters() if p.requires_grad]})
    if not any(groups.values()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to fit.")
    if callable(optimizer):
        return {name: optimizer(params) for name, params in groups.items()}
    return {name: OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)
            for name, params in groups.items()}


def _schedulers(optimizers: dict, scheduler) -> dict:
    if scheduler is None:
        return {}
    if not callable(scheduler):
        raise TypeError("scheduler should be None or a function optimizer -> LRScheduler, "
                        "e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10).")
    return {name: scheduler(opt) for name, opt in optimizers.items()}


def _lr(optimizers: dict) -> float:
    return next(iter(optimizers.values())).param_groups[0]["lr"]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model should be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(getattr(model, "loss", None)) and not callable(getattr(model, "training_losses", None)):
        raise TypeError(f"{type(model).__name__} has no loss(...) method. Models in dgmlab subclass "
                        "dgmlab.base.GenerativeModel, whose loss(x) is the mean negative log-likelihood.")


def _check_loss(loss, model: nn.Module, where: str, train: bool = True) -> torch.Tensor:
    name = type(model).__name__
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{name}.loss should return a scalar tensor (the mean over the batch), got "
                         f"{got} at {where}. Average it, e.g. loss.mean().")
    if train and not loss.requires_grad:
        raise RuntimeError(f"{name}.loss returned a tensor that depends on no trainable parameter "
                           "(computed under torch.no_grad(), or detached?).")
    if train and not math.isfinite(value := loss.item()):
        raise FloatingPointError(f"The training loss is {value} at {where}; the weights are those of "
                                 "the step before. Try a lower learning rate or gradient clipping "
                                 "(clip_grad_norm=1.0).")
    return loss


def _check_callbacks(callbacks) -> tuple:
    callbacks = (callbacks,) if callable(callbacks) else tuple(callbacks)
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks should be functions cb(epoch, history, model); got {cb!r}.")
    return callbacks


def _check_number(x, name: str, *, allow_zero: bool = False, optional: bool = False):
    if x is None and optional:
        return None
    bad = isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x)
    if bad or x < 0 or (x == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} should be a {kind} number, got {x!r}.")
    return float(x)


def _resolve_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device should be 'auto', 'cpu', 'cuda', ... got {device!r} ({err}).") from None


def _autocast(amp, device: torch.device) -> Callable:
    """A context factory for the forward passes: bfloat16 autocast, or nothing (float32)."""
    if not (isinstance(amp, bool) or (isinstance(amp, str) and amp == "auto")):
        raise ValueError(f"amp should be True, False or 'auto' (not 0 or 1); got {amp!r}.")
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if amp is False or (amp == "auto" and not native_bf16):
        return contextlib.nullcontext
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"amp=True works on CUDA and on the CPU, not on {device.type}; pass amp=False.")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
