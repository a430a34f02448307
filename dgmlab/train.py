"""One training loop for every chapter: :func:`fit`.

Every model in the course is trained the same way -- minimise ``model.loss(*batch)``
with a gradient-based optimiser, one shuffled pass over the data per epoch -- so
the loop is written once, here, to be read. Around the textbook loop it keeps the
books a real run needs: validation and early stopping, gradient clipping, mixed
precision on GPUs, a time budget, and checkpoints from which a killed run
continues *bit for bit*, as if it had never stopped.

Reading order: :class:`History` (what ``fit`` returns), the data, the
checkpoints, :func:`fit` itself, :func:`evaluate`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate
from tqdm.std import tqdm  # the text bar: notebooks are rendered statically

from dgmlab import modes
from dgmlab.base import count_parameters, module_device
from dgmlab.files import atomic_open
from dgmlab.validate import as_tensor, check_choice, check_positive_int

__all__ = [
    "fit", "evaluate", "History", "save_checkpoint", "load_checkpoint", "CheckpointError", "cosine",
    "fit_and_evaluate",
]

FORMAT = "dgmlab.train/1"  # written into every checkpoint, checked on resume
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


# --------------------------------------------------------------------- history
@dataclass
class History:
    """What :func:`fit` returns: one entry per epoch, and how the run ended.

    ``seconds`` is the cumulative training time (it carries on across resumes),
    ``lr`` the learning rate used during each epoch, ``val_loss`` is empty when
    there is no validation data. ``stop_reason`` is ``"epochs"``, ``"patience"``
    (early stopping) or ``"max_seconds"`` once ``completed``; only the last can
    be continued, by calling ``fit`` again with a larger ``max_seconds``.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    stop_reason: str = ""
    resumed_from: int | None = None
    completed: bool = False

    def __len__(self) -> int:
        return len(self.epoch)

    def to_dict(self) -> dict:
        """Plain lists and numbers (a copy): fit for JSON and for checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """Inverse of :meth:`to_dict`."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Not History fields: {sorted(unknown)}.")
        return cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()})


# ------------------------------------------------------------------------ data
class _Batches:
    """The three kinds of data ``fit`` accepts, behind one method: ``batch(idx)``.

    A tensor ``(N, ...)``, a tuple/list of tensors sharing ``N`` (a TensorDataset
    counts as one), or a map-style Dataset whose items are tensors or tuples.
    """

    def __init__(self, data, name: str):
        self.name = name
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.dataset: Dataset | None = None
        if isinstance(data, TensorDataset):
            data = data.tensors
        if isinstance(data, IterableDataset):
            raise TypeError(
                f"{name} is an IterableDataset; fit needs a map-style Dataset "
                "(with __len__ and __getitem__) so that it can shuffle it."
            )
        if isinstance(data, Dataset):
            if not hasattr(data, "__len__"):
                raise TypeError(f"{name} is a Dataset without __len__; give it one.")
            self.dataset, n = data, len(data)
            if n > 0:
                self._as_tuple(default_collate([data[0]]))  # fail at the door
        elif isinstance(data, (tuple, list)):
            self.tensors = tuple(as_tensor(t, f"{name}[{i}]") for i, t in enumerate(data))
            if not self.tensors:
                raise ValueError(f"{name} is an empty tuple; pass (x,) or (x, y) tensors.")
        elif isinstance(data, torch.Tensor) or hasattr(data, "__array__"):
            self.tensors = (as_tensor(data, name),)
        else:
            raise TypeError(
                f"{name} should be a tensor of shape (N, ...), a tuple of such tensors "
                f"or a torch Dataset; got {type(data).__name__}."
            )
        if self.tensors is not None:
            for i, t in enumerate(self.tensors):
                if t.dim() == 0:
                    raise ValueError(f"{name}[{i}] is a scalar; it needs a first dimension N.")
            lengths = [len(t) for t in self.tensors]
            if len(set(lengths)) > 1:
                raise ValueError(
                    f"{name} holds tensors of different lengths {lengths}; the first "
                    "dimension indexes the examples, so it must agree."
                )
            n = lengths[0]
        if n == 0:
            raise ValueError(f"{name} is empty: it needs at least one example.")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def _as_tuple(self, batch) -> tuple[torch.Tensor, ...]:
        batch = (batch,) if isinstance(batch, torch.Tensor) else batch
        if not isinstance(batch, (tuple, list)) or not all(
            isinstance(t, torch.Tensor) for t in batch
        ):
            raise TypeError(
                f"The items of {self.name} should be tensors or tuples of tensors "
                f"(or numbers), got {type(batch).__name__} after batching."
            )
        return tuple(batch)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The examples ``idx`` (shape ``(B,)``) as a tuple of tensors on ``device``."""
        if self.tensors is not None:
            return tuple(t[idx.to(t.device)].to(device) for t in self.tensors)
        items = default_collate([self.dataset[i] for i in idx.tolist()])
        return tuple(t.to(device) for t in self._as_tuple(items))


# ----------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that belongs to a different run."""


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
    raise TypeError(
        f"{where} is a {type(obj).__name__}. A checkpoint holds only tensors, numbers, "
        "strings, None, lists, tuples and dicts, so that it loads with weights_only=True."
    )


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically: the file is the old one or the new one, never half.

    The bytes go to a temporary file in the same folder, are flushed to disk, and
    the file is renamed over ``path`` (``os.replace`` is atomic); a failure
    removes the temporary file and leaves an existing checkpoint untouched.
    """
    path = os.fspath(path)
    _check_plain(obj)
    with atomic_open(path, "wb", private=True) as f:  # old file or new, never half of one
        torch.save(obj, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU with ``weights_only=True`` (no pickled code runs)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"Could not read the checkpoint {path} ({type(err).__name__}: {reason}). "
            "It is corrupt, truncated or not a checkpoint. Delete it, or pass "
            "resume=False to fit to start over and overwrite it."
        ) from err


def _fingerprint(model: nn.Module, opt: torch.optim.Optimizer, sched, hparams: dict) -> dict:
    """What a checkpoint must agree on to continue this run: the model and the hyperparameters."""
    plain = (bool, int, float, str, tuple)  # the optimiser's own settings (lr, betas, ...)
    return {
        "model": type(model).__name__,
        "tensors": [[name, list(t.shape)] for name, t in model.state_dict().items()],
        "optimizer": type(opt).__name__,
        "optimizer_settings": {k: v for k, v in opt.defaults.items() if isinstance(v, plain)},
        "scheduler": None if sched is None else type(sched).__name__,
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


def _resume_state(path: str, fingerprint: dict) -> dict:
    """Load the checkpoint at ``path`` and make sure it belongs to this very run."""
    state = load_checkpoint(path)
    todo = "Delete it, pass another checkpoint path, or pass resume=False to start over."
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dgmlab training checkpoint. {todo}")
    diffs = _differences(state.get("fingerprint", {}), fingerprint)
    if diffs:
        raise CheckpointError(
            f"The checkpoint {path} was written by a different run: " + "; ".join(diffs)
            + f". {todo}"
        )
    return state


# ------------------------------------------------------------------ the loop
def fit(
    model: nn.Module,
    train,
    val=None,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str | Callable = "adam",
    weight_decay: float = 0.0,
    scheduler: Callable | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    amp: bool | str = "auto",
    clip_grad_norm: float | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = True,
    max_seconds: float | None = None,
    progress: bool = True,
    desc: str | None = None,
    callbacks: Iterable[Callable] | Callable = (),
) -> History:
    """Train ``model`` by minimising ``model.loss(*batch)`` over shuffled mini-batches.

    ``train``/``val``: a tensor ``(N, ...)`` (batches reach ``model.loss(x)``), a
    tuple of tensors sharing ``N`` (``model.loss(x, y)``) or a Dataset of tuples.
    ``val`` is scored after every epoch (eval mode, no gradients); with it, the
    best epoch is tracked, ``patience`` epochs without an improvement larger than
    ``min_delta`` stop the run, and ``restore_best`` puts the best weights back
    at the end. ``optimizer`` is "adam", "adamw", "sgd" (plain, no momentum) or
    ``params -> Optimizer`` (which then sets lr and weight decay itself);
    ``scheduler`` is ``optimizer -> LRScheduler``, stepped once per epoch.

    Reproducible: a fresh run seeds the global torch RNG with ``seed`` (models may
    draw noise from it) and a private generator for the shuffling. ``device="auto"``
    trains where the model is (a new model: on the CPU, which is what the lecture's
    small models want in every mode); :func:`fit_and_evaluate`, the full-size
    recipe, defaults to :func:`dgmlab.modes.device` instead (the GPU in full mode).
    The model stays on its device afterwards, in eval mode.
    ``amp="auto"`` is mixed precision on CUDA only; ``amp=True`` also on the CPU.
    ``clip_grad_norm`` bounds the global gradient norm; ``max_seconds`` is a time
    budget, checked between batches (``History.stop_reason`` says what ended the run).

    ``checkpoint="run.pt"`` saves every ``checkpoint_every`` epochs and at the end;
    calling ``fit`` again the same way continues from it bit for bit (a finished
    run returns at once). A run stopped by ``max_seconds`` is not finished: called
    with a larger budget (or None) it trains on; with the same one it returns at
    once. On Ctrl-C the KeyboardInterrupt is re-raised with a note saying how to
    resume; the last checkpoint stays intact.
    """
    # -- check everything before the first (possibly long) epoch
    _check_model(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters: nothing to fit.")
    train_data = _Batches(train, "train")
    val_data = None if val is None else _Batches(val, "val")
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    seed = check_positive_int(seed, "seed", allow_zero=True)
    lr = _check_number(lr, "lr")
    weight_decay = _check_number(weight_decay, "weight_decay", allow_zero=True)
    min_delta = _check_number(min_delta, "min_delta", allow_zero=True)
    clip_grad_norm = _check_number(clip_grad_norm, "clip_grad_norm", optional=True)
    max_seconds = _check_number(max_seconds, "max_seconds", optional=True)
    if patience is not None:
        patience = check_positive_int(patience, "patience")
        if val_data is None:
            raise ValueError("patience (early stopping) watches the validation loss: "
                             "pass val data.")
    if not callable(optimizer):
        check_choice(optimizer, "optimizer", list(OPTIMIZERS))
    if scheduler is not None and not callable(scheduler):
        raise TypeError("scheduler should be None or a function optimizer -> LRScheduler, "
                        "e.g. lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10).")
    callbacks = (callbacks,) if callable(callbacks) else tuple(callbacks)
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks should be functions cb(epoch, history, model); got {cb!r}.")
    device = module_device(model) if device == "auto" else _resolve_device(device)
    amp_dtype = _amp_dtype(amp, device)
    checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if checkpoint is not None:  # fail now, not after the first epoch
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)

    # -- build the run
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if callable(optimizer):
        opt = optimizer(params)
    else:
        opt = OPTIMIZERS[optimizer](params, lr=lr, weight_decay=weight_decay)
    sched = None if scheduler is None else scheduler(opt)
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    shuffler = torch.Generator()
    fingerprint = _fingerprint(model, opt, sched, dict(
        epochs=epochs, batch_size=batch_size, seed=seed, clip_grad_norm=clip_grad_norm,
        patience=patience, min_delta=min_delta, restore_best=restore_best,
        n_train=len(train_data), n_val=0 if val_data is None else len(val_data),
    ))

    # -- start fresh, or pick up where a checkpoint left off
    history, bad_epochs, best_state, last_saved = History(), 0, None, None
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        state = _resume_state(checkpoint, fingerprint)
        try:
            model.load_state_dict(state["model"])
            _set_rng_state(state["rng"], shuffler)
            history = History.from_dict(state["history"])
            history.resumed_from = last_saved = state["epoch"]
            best_state = state["early_stopping"]["best_state"]
            out_of_time = history.stop_reason == "max_seconds" and (
                max_seconds is not None and max_seconds <= history.seconds[-1])
            if state["finished"] or out_of_time:
                if restore_best and best_state is not None:  # as the stopped run returned it
                    model.load_state_dict(best_state)
                model.eval()
                return history
            opt.load_state_dict(state["optimizer"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            if scaler is not None and state["scaler"] is not None:
                scaler.load_state_dict(state["scaler"])
            bad_epochs = state["early_stopping"]["bad_epochs"]
            if history.stop_reason == "max_seconds":  # more time now: carry on
                history.completed, history.stop_reason = False, ""
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"The checkpoint {checkpoint} could not be restored ({type(err).__name__}: "
                f"{err}). Delete it, or pass resume=False to start over."
            ) from err
    else:
        torch.manual_seed(seed)  # for the model's own randomness (noise, dropout)
        shuffler.manual_seed(seed)
    best = math.inf if history.best_val_loss is None else history.best_val_loss

    n_batches = math.ceil(len(train_data) / batch_size)
    epoch = len(history)
    bar = tqdm(total=epochs, initial=epoch, desc=desc or type(model).__name__, unit="epoch",
               file=sys.stderr, disable=not progress)
    try:
        for epoch in range(len(history) + 1, epochs + 1):
            # -- one pass over the shuffled training data
            start, before = time.perf_counter(), (history.seconds[-1] if history.seconds else 0.0)
            lr_now, stop_reason = opt.param_groups[0]["lr"], ""
            model.train()
            order = torch.randperm(len(train_data), generator=shuffler)  # a new shuffle each epoch
            total, seen = 0.0, 0
            for b, idx in enumerate(order.split(batch_size)):
                where = f"epoch {epoch}, batch {b + 1}/{n_batches}"
                batch = train_data.batch(idx, device)
                total += len(idx) * _train_step(model, batch, opt, scaler, amp_dtype,
                                                clip_grad_norm, where)
                seen += len(idx)
                if max_seconds is not None and before + time.perf_counter() - start > max_seconds:
                    stop_reason = "max_seconds"  # checked between batches: may end mid-epoch
                    break
            val_loss = None if val_data is None else _mean_loss(model, val_data, batch_size, device)

            # -- book-keeping: history, best epoch, schedule, callbacks
            history.epoch.append(epoch)
            history.train_loss.append(total / seen)
            history.seconds.append(before + time.perf_counter() - start)
            history.lr.append(lr_now)
            if val_loss is not None:
                history.val_loss.append(val_loss)
                if val_loss < best - min_delta:  # only a real improvement resets patience
                    best, bad_epochs = val_loss, 0
                    history.best_epoch, history.best_val_loss = epoch, val_loss
                    if restore_best:
                        best_state = {k: v.detach().to("cpu", copy=True)
                                      for k, v in model.state_dict().items()}
                else:
                    bad_epochs += 1
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(history.train_loss[-1] if val_loss is None else val_loss)
            elif sched is not None:
                sched.step()
            bar.update(1)
            bar.set_postfix(train=f"{history.train_loss[-1]:.4g}",
                            **({} if val_loss is None else {"val": f"{val_loss:.4g}"}))
            for cb in callbacks:  # before the checkpoint: their RNG draws get saved too
                cb(epoch, history, model)

            # -- stop? then save
            if patience is not None and bad_epochs >= patience:
                stop_reason, history.stopped_early = "patience", True
            stop_reason = stop_reason or ("epochs" if epoch == epochs else "")
            # Out of epochs or patience is final; out of time is not, unless no epoch is left:
            # its checkpoint keeps the last weights and best_state, for a larger budget.
            final = bool(stop_reason) and (stop_reason != "max_seconds" or epoch == epochs)
            if stop_reason:
                history.completed, history.stop_reason = True, stop_reason
            if final and restore_best and best_state is not None:
                model.load_state_dict(best_state)
            if checkpoint is not None and (stop_reason or epoch % checkpoint_every == 0):
                save_checkpoint({
                    "format": FORMAT,
                    "epoch": epoch,
                    "finished": final,
                    "fingerprint": fingerprint,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": None if sched is None else sched.state_dict(),
                    "scaler": None if scaler is None else scaler.state_dict(),
                    "rng": _get_rng_state(shuffler),
                    "history": history.to_dict(),
                    "early_stopping": {"best_val_loss": history.best_val_loss,
                                       "bad_epochs": bad_epochs,
                                       "best_state": None if final else best_state},
                }, checkpoint)
                last_saved = epoch
            if stop_reason:
                if not final and restore_best and best_state is not None:
                    model.load_state_dict(best_state)
                break
    except KeyboardInterrupt as err:
        if last_saved is not None:
            note = (f"fit was interrupted in epoch {epoch}. The checkpoint {checkpoint} holds "
                    f"epoch {last_saved}: run the same fit(...) call again to continue from there.")
        else:
            note = (f"fit was interrupted in epoch {epoch}; no checkpoint was written. "
                    "Pass checkpoint='run.pt' to make a run resumable.")
        if hasattr(err, "add_note"):  # Python 3.11+
            err.add_note(note)
            raise
        raise KeyboardInterrupt(note) from err
    finally:
        bar.close()
    model.eval()
    return history


def _train_step(model, batch, opt, scaler, amp_dtype, clip_grad_norm, where: str) -> float:
    """One gradient step on one batch; returns the batch's loss."""
    device_type = batch[0].device.type
    autocast = (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:  # the forward pass only; backward runs in the forward's precisions
        loss = _check_loss(model.loss(*batch), model, where)
    if not loss.requires_grad:
        raise RuntimeError(
            f"{type(model).__name__}.loss returned a tensor that depends on no trainable "
            "parameter (computed under torch.no_grad(), or detached?)."
        )
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(
            f"The training loss is {value} at {where}; the weights are those of the step "
            "before. Try a lower learning rate or gradient clipping (clip_grad_norm=1.0)."
        )
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # so that clipping sees the true gradient norm
    if clip_grad_norm is not None:
        # Rescale all gradients together so that their global L2 norm is at most the bound.
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_grad_norm)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)  # skipped when the scaled gradients overflowed
        scaler.update()
    return value


# ------------------------------------------------------------------ evaluate
def evaluate(model: nn.Module, data, *, batch_size: int = 256,
             device: str | torch.device = "auto") -> float:
    """Mean of ``model.loss`` per example over ``data``, in eval mode and without gradients.

    ``data`` is given as to :func:`fit`. ``device="auto"`` keeps the model where it
    is; another device moves it there. Its train/eval mode is restored after.
    """
    _check_model(model)
    batches = _Batches(data, "data")
    batch_size = check_positive_int(batch_size, "batch_size")
    dev = module_device(model) if device == "auto" else _resolve_device(device)
    model.to(dev)
    return _mean_loss(model, batches, batch_size, dev)


@torch.no_grad()
def _mean_loss(model: nn.Module, data: _Batches, batch_size: int, device: torch.device) -> float:
    """Per-example mean of ``model.loss`` (a batch mean) over ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)  # one sync, at the end
        for b, idx in enumerate(torch.arange(len(data)).split(batch_size)):
            loss = _check_loss(model.loss(*data.batch(idx, device)), model, f"batch {b + 1}")
            total += loss.detach().double() * len(idx)
    finally:
        model.train(was_training)
    return total.item() / len(data)


# ------------------------------------------------------------------- helpers
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model should be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(getattr(model, "loss", None)):
        raise TypeError(
            f"{type(model).__name__} has no loss(...) method. Models in dgmlab subclass "
            "dgmlab.base.GenerativeModel, whose loss(x) is the mean negative log-likelihood."
        )


def _check_loss(loss, model: nn.Module, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
               else type(loss).__name__)
        raise ValueError(
            f"{type(model).__name__}.loss should return a scalar tensor (the mean over the "
            f"batch), got {got} at {where}. Average it, e.g. loss.mean()."
        )
    return loss


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
        raise ValueError(
            f"device should be 'auto', 'cpu', 'cuda', ... got {device!r} ({err})."
        ) from None


def _amp_dtype(amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of this run, or None for full float32 precision."""
    if not (isinstance(amp, bool) or (isinstance(amp, str) and amp == "auto")):
        raise ValueError(f"amp should be True, False or 'auto' (not 0 or 1); got {amp!r}.")
    if amp is False or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16  # slow on most CPUs: it is here so the code path is testable
    raise ValueError(f"amp=True works on CUDA and on the CPU, not on {device.type}; "
                     "pass amp=False.")


def _get_rng_state(shuffler: torch.Generator) -> dict:
    """Every random stream the run draws from, so that a resume replays the same numbers."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "shuffle": shuffler.get_state(),
    }


def _set_rng_state(state: dict, shuffler: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    shuffler.set_state(state["shuffle"])


def cosine(epochs: int) -> Callable:
    """A ``scheduler`` for :func:`fit`: the learning rate follows half a cosine to 0 over ``epochs``."""
    epochs = check_positive_int(epochs, "epochs")
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


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
    drawn = None
    if samples:
        with torch.no_grad():
            drawn = model.sample(samples).cpu()
    seconds = history.seconds[-1] if history.seconds else 0.0
    count = count_parameters(model)
    print(f"{type(model).__name__}: {count:,} parameters, {len(history)} epochs in {seconds:.0f} s; "
          f"test {nll}")
    return {"history": history, "nll": nll, "samples": drawn}
