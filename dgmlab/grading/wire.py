"""What crosses the sandbox wall, and how (used by both :mod:`.judge` and :mod:`.runner`).

Messages are length-prefixed frames on a pipe. The judge (trusted) sends the
runner pickles, which may hold anything the runner needs: tensors, modules,
generators, and persistent ids for what stays behind (the judge's callables,
the runner's own objects, tensors whose gradients the judge will ask for).
The runner (untrusted) answers in *plain data only*: :func:`plain` turns a
value into numbers, strings, tensors, lists, tuples, sets and dicts, with
every other object left in the runner as a numbered handle, and the judge
reads it back with ``torch.load(weights_only=True)``, which builds nothing
else, then checks its size and depth (:func:`unpack`). So an answer cannot
carry code, an ``__eq__`` that always agrees, or a forged verdict: only values.
"""

from __future__ import annotations

import io
import os
import random
import struct

import numpy as np
import torch

MAX_FRAME = 256 * 2**20  # bytes in one message from the runner
MAX_DEPTH = 64  # nesting of a value from the runner
HANDLE, TENSOR = "__dgmlab_handle__", "__dgmlab_tensor__"
_HEADER = struct.Struct(">Q")


class WireError(Exception):
    """A message that is not what the protocol allows (too big, cut short, malformed)."""


def send(fd: int, payload: bytes) -> None:
    data = _HEADER.pack(len(payload)) + payload
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def receive(fd: int, limit: int = MAX_FRAME) -> bytes:
    (size,) = _HEADER.unpack(_read(fd, _HEADER.size))
    if size > limit:
        raise WireError(f"a message of {size / 2**20:.0f} MB, over the limit of {limit / 2**20:.0f} MB")
    return _read(fd, size)


def _read(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------
# Plain data: the runner's answers
# --------------------------------------------------------------------------


def plain(value, keep, tensors: list, depth: int = 0):
    """``value`` as plain data: each tensor (also a NumPy array) is appended to ``tensors`` and
    replaced by ``{TENSOR: index}``; any other object by ``{HANDLE: keep(obj), "type": ...}``."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the value is nested more than {MAX_DEPTH} levels deep")
    if value is None or type(value) in (bool, int, float, complex, str, bytes, torch.Size, torch.dtype):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        tensors.append(torch.from_numpy(np.array(value, order="C", copy=True)))  # (0-d stays 0-d)
        return {TENSOR: len(tensors) - 1, "numpy": True}
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {TENSOR: len(tensors) - 1}
    if type(value) in (list, tuple, set, frozenset):
        items = [plain(v, keep, tensors, depth + 1) for v in value]
        return set(items) if isinstance(value, (set, frozenset)) else type(value)(items)
    if type(value) is dict and all(type(k) in (str, int, float, bool) for k in value):
        return {k: plain(v, keep, tensors, depth + 1) for k, v in value.items()}
    if isinstance(value, torch.nn.Module) and _loads_back(value):
        return value  # a model of the library's (or torch's) classes crosses whole, weights and settings
    return {HANDLE: keep(value), "type": f"{type(value).__module__}.{type(value).__qualname__}"[:200]}


def rebuild(value, tensors: list, handle):
    """The judge's side of :func:`plain`: markers back to tensors, arrays and ``handle(id, type)``."""
    if type(value) is dict and TENSOR in value:
        t = tensors[int(value[TENSOR])]
        return t.numpy() if value.get("numpy") else t
    if type(value) is dict and HANDLE in value:
        return handle(int(value[HANDLE]), str(value.get("type", "object")))
    if type(value) is dict:
        return {k: rebuild(v, tensors, handle) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(rebuild(v, tensors, handle) for v in value)
    return value


def pack(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def library_modules() -> list[type]:
    """The model classes that may cross as values: torch.nn's and dgmlab's own."""
    found, stack = [], [torch.nn.Module]
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        if cls.__module__.startswith(("torch.nn.", "dgmlab.")):
            found.append(cls)
    constraints = [c for c in vars(torch.distributions.constraints).values()
                   if isinstance(c, type) and issubclass(c, torch.distributions.constraints.Constraint)]
    return found + constraints + [torch.nn.Parameter, torch._utils._rebuild_parameter]


def _loads_back(module: torch.nn.Module) -> bool:
    try:
        unpack(pack(module))
        return True
    except Exception:
        return False


def unpack(data: bytes):
    """Read the runner's plain data back, refusing anything else."""
    try:
        with torch.serialization.safe_globals(library_modules()):
            value = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        raise WireError(f"not plain data ({type(err).__name__})") from None
    _check_depth(value)
    return value


def _check_depth(value) -> None:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH + 2:
            raise WireError(f"a value nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, dict):
            stack += [(v, depth + 1) for kv in item.items() for v in kv]
        elif isinstance(item, (list, tuple, set)):
            stack += [(v, depth + 1) for v in item]


# --------------------------------------------------------------------------
# The random streams both sides share, as if the student's code ran in the judge
# --------------------------------------------------------------------------


def rng_state() -> tuple:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (torch.get_rng_state(), (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            random.getstate(), torch.is_grad_enabled())


def set_rng_state(state) -> None:
    """Adopt the other side's random streams (and grad mode); a malformed state is ignored."""
    try:
        torch_state, (kind, keys, pos, has_gauss, gauss), py_state, grad = state
        torch.set_rng_state(torch_state)
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(py_state)
        torch.set_grad_enabled(bool(grad))
    except Exception:
        pass
