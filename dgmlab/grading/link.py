"""The judge's end of the channel into the sandbox: calling the student's code from outside.

A :class:`Remote` stands in the judge for an object that lives in the
student's process (their functions, mostly). Calling it sends the arguments
in and gets the result back as plain data (:mod:`.wire`). The two processes
share the random streams and grad mode at every crossing, so a check runs as
if the student's function were local; the judge's own functions passed in
(a lambda, a reference) are called back in the judge. Gradients cross too:
tensors that require grad go in as leaves, and :class:`_Bridge` connects the
results to them, so ``torch.autograd.grad`` in a check reaches the student's
computation (through tensor arguments and module parameters).
"""

from __future__ import annotations

import builtins
import io
import pickle
import time
import types

import torch

from . import wire


class KernelDied(BaseException):
    """The student's process is gone or broke the protocol (a BaseException: checks do not catch it)."""


class RemoteError(Exception):
    """An exception of a type the judge does not have, raised by the student's code."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


class Remote:
    """An object living in the student's process."""

    def __init__(self, link: Link, key: int, kind: str) -> None:
        self._link, self._key, self._kind = link, key, kind

    def __call__(self, *args, **kwargs):
        return self._link.call(self._key, "call", args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") and name not in ("__name__", "__qualname__", "__doc__"):
            raise AttributeError(name)
        return self._link.call(self._key, "getattr", (name,), {})

    def __getitem__(self, key):
        return self._link.call(self._key, "getitem", (key,), {})

    def __iter__(self):
        return iter(self._link.call(self._key, "list", (), {}))

    def __len__(self) -> int:
        return int(self._link.call(self._key, "len", (), {}))

    def __repr__(self) -> str:
        return f"<{self._kind} from the student's notebook>"


class _Bridge(torch.autograd.Function):
    """Results computed in the student's process, joined to the judge's graph through their inputs."""

    @staticmethod
    def forward(ctx, link, call, outputs, flags, *inputs):
        ctx.link, ctx.call, ctx.flags = link, call, flags
        ctx.mark_non_differentiable(*[o for o, f in zip(outputs, flags) if not f])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        wanted = [torch.zeros(()) if g is None else g for g, f in zip(grads, ctx.flags) if f]
        return (None, None, None, None, *ctx.link.vjp(ctx.call, wanted))


class Link:
    """Requests to the runner in the sandbox, over its stdin/stdout."""

    def __init__(self, fd_out: int, fd_in: int) -> None:
        self.fd_out, self.fd_in = fd_out, fd_in
        self.deadline = float("inf")
        self._calls = 0
        self._callbacks: dict[int, object] = {}
        self._inputs: list[list] = []  # per call in flight: judge tensors sent as leaves
        self._callback_graphs: dict[int, tuple[list, list]] = {}  # invocation -> (argument leaves, inputs)

    def send(self, message: dict) -> None:
        try:
            wire.send(self.fd_out, pickle.dumps(message, protocol=5))
        except OSError as err:
            raise KernelDied(f"the student's process is gone ({err})") from None

    def receive(self) -> dict:
        try:
            message = wire.unpack(wire.receive(self.fd_in))
        except (EOFError, OSError, wire.WireError) as err:
            raise KernelDied(f"the student's process is gone or sent garbage ({err})") from None
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise KernelDied("the student's process sent something that is not a reply")
        return message

    def request(self, message: dict) -> dict:
        self.send(message)
        while True:
            reply = self.receive()
            if reply["op"] == "callback":
                self.send(self._callback(reply))
            elif reply["op"] == "callback_vjp":
                self.send(self._callback_vjp(reply))
            else:
                return reply

    def handle(self, key: int, kind: str) -> Remote:
        return Remote(self, key, kind)

    def value(self, reply: dict):
        tensors = [t if isinstance(t, torch.Tensor) else torch.zeros(0) for t in reply.get("tensors", [])]
        return wire.rebuild(reply.get("value"), tensors, self.handle), tensors

    # ---- calls ----------------------------------------------------------------------------------
    def dumps(self, value, inputs: list, generators: list) -> bytes:
        link = self

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, Remote):
                    return ("handle", obj._key)
                if isinstance(obj, torch.Tensor) and obj.requires_grad:
                    inputs.append(obj)
                    kind = "parameter" if isinstance(obj, torch.nn.Parameter) else "grad"
                    return (kind, len(inputs) - 1, obj.detach())
                if isinstance(obj, torch.Generator):
                    generators.append(obj)
                    return ("generator", len(generators) - 1, obj.get_state())
                if _judges(obj):
                    link._callbacks[id(obj)] = obj
                    return ("callback", id(obj))
                return None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=5).dump(value)
        return buffer.getvalue()

    def call(self, key: int, how: str, args: tuple, kwargs: dict):
        inputs, generators = [], []
        self._inputs.append(inputs)
        self._calls += 1
        call = self._calls
        try:
            data = self.dumps((args, kwargs), inputs, generators)
            reply = self.request({"op": "call", "target": key, "how": how, "args": data, "call": call,
                                  "rng": wire.rng_state(), "timeout": min(self.deadline - time.monotonic(), 1e6)})
        finally:
            self._inputs.pop()
        wire.set_rng_state(reply.get("rng"))
        if reply["op"] == "raise":
            raise student_exception(reply)
        for generator, state in zip(generators, reply.get("generators", [])):
            try:
                generator.set_state(state)
            except Exception:
                pass
        tensors = [t if isinstance(t, torch.Tensor) else torch.zeros(0) for t in reply.get("tensors", [])]
        flags = [bool(f) and t.is_floating_point() for t, f in zip(tensors, reply.get("grad", []))]
        flags += [False] * (len(tensors) - len(flags))
        if inputs and any(flags):
            tensors = list(_Bridge.apply(self, call, tuple(tensors), tuple(flags), *inputs))
        elif any(flags):
            tensors = [t.requires_grad_(True) if f else t for t, f in zip(tensors, flags)]
        return wire.rebuild(reply.get("value"), tensors, self.handle)

    def vjp(self, call: int, grads: list) -> list:
        reply = self.request({"op": "vjp", "call": call, "grads": [g.detach() for g in grads]})
        if reply["op"] != "grads":
            raise student_exception(reply)
        return [t if p else None for t, p in zip(reply["tensors"], reply["present"])]

    def _callback(self, request: dict) -> dict:
        """Run one of the judge's functions (or read an attribute of one of its objects) for the student's code."""
        target = self._callbacks.get(request.get("key"))
        try:
            tensors = [t for t in request.get("tensors", []) if isinstance(t, torch.Tensor)]
            leaves = [t.requires_grad_(True) for t, f in zip(tensors, request.get("grad", []))
                      if f and t.is_floating_point()]
            args, kwargs = wire.rebuild(request.get("value"), tensors, self.handle)
            wire.set_rng_state(request.get("rng"))
            result = getattr(target, str(request["attr"])) if request.get("attr") else target
            result = result(*args, **kwargs) if request.get("call") else result
            inputs = self._inputs[-1] if self._inputs else []
            before = len(inputs)
            data = self.dumps(result, inputs, [])
            self._calls += 1
            self._callback_graphs[self._calls] = (leaves, inputs[before:], before)
            return {"op": "callback_return", "value": data, "rng": wire.rng_state(), "invocation": self._calls}
        except Exception as err:
            return {"op": "callback_raise", "message": f"{type(err).__name__}: {err}"}

    def _callback_vjp(self, request: dict) -> dict:
        """Gradients through one of the judge's functions, with respect to what the student's code passed in."""
        leaves, outputs, first = self._callback_graphs.get(request.get("invocation"), ([], [], 0))
        grad = request.get("tensors", [None])[0]
        output = outputs[int(request.get("output", 0)) - first] if outputs else None
        grads = (torch.autograd.grad(output, leaves, grad, allow_unused=True, retain_graph=True)
                 if leaves and output is not None and output.requires_grad else [None] * len(leaves))
        return {"op": "callback_grads", "grads": [None if g is None else g.detach() for g in grads]}


def _judges(obj) -> bool:
    """What stays in the judge and is used from the sandbox by callbacks: the notebook's functions
    (lambdas, references, closures) and objects of classes the notebook defines."""
    if isinstance(obj, (types.FunctionType, types.MethodType)):
        target = getattr(obj, "__func__", obj)
        return target.__module__ == "__main__" or "<" in target.__qualname__
    return type(obj).__module__ == "__main__" and not isinstance(obj, type)


def student_exception(reply: dict) -> BaseException:
    """The exception the student's code raised, as the judge can raise it; ``remote_frames`` says where."""
    name, message = str(reply.get("type", "Exception"))[:100], str(reply.get("message", ""))[:2000]
    if name == "KeyboardInterrupt":
        exc: BaseException = KeyboardInterrupt()
    else:
        cls = getattr(builtins, name, None)
        try:
            exc = cls(message) if isinstance(cls, type) and issubclass(cls, Exception) else RemoteError(name, message)
        except Exception:
            exc = RemoteError(name, message)
    if isinstance(exc, NameError) and isinstance(reply.get("name"), str):
        exc.name = reply["name"]
    frames = reply.get("frames") if isinstance(reply.get("frames"), list) else []
    exc.remote_frames = [(str(f[0])[:300], str(f[1])[:200], int(f[2]), str(f[3])[:300]) for f in frames[-20:]
                         if isinstance(f, (list, tuple)) and len(f) == 4 and isinstance(f[2], int)]
    return exc
