"""The student's side of grading: runs inside the sandbox, trusted by nobody.

``python -m dgmlab.grading.runner`` reads the judge's requests on stdin and
answers on stdout (:mod:`.wire`); stdin and stdout themselves then point at
``/dev/null``, so the student's prints and child processes cannot reach the
channel by accident. It runs the submission's cells in an IPython shell,
capturing outputs up to a cap, and answers the judge's calls of the student's
functions with plain data. A cell or call that runs past its time is
interrupted as Jupyter would (SIGINT); one that ignores that is stopped by the
judge's limit on the whole notebook.
"""

from __future__ import annotations

import _thread
import io
import os
import pickle
import resource
import signal
import sys
import threading
import time

import torch

from . import wire
from .feedback import frame_records

TEXT_LIMIT = 100_000  # characters of text output kept per cell
DATA_LIMIT = 2_000_000  # bytes of rich output (figures) kept per cell


class _Capped(io.TextIOBase):
    """A stream that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit, self.parts, self.kept, self.dropped = limit, [], 0, 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        room = max(0, self.limit - self.kept)
        self.parts.append(text[:room])
        self.kept += min(room, len(text))
        self.dropped += max(0, len(text) - room)
        return len(text)

    def text(self) -> str:
        note = f"\n[output truncated: {self.dropped:,} more characters not kept by the grader]\n" if self.dropped else ""
        return "".join(self.parts) + note


class _Timer:
    """Interrupts the main thread (as SIGINT would) after ``seconds``, unless cancelled."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self._timer = threading.Timer(max(seconds, 0.01), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        _thread.interrupt_main()

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


class Runner:
    def __init__(self, fd_in: int, fd_out: int) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        self.fd_in, self.fd_out = fd_in, fd_out
        self.handles: dict[int, object] = {}
        self.graphs: dict[int, tuple[list, list]] = {}
        self.shell = InteractiveShell.instance()
        self.shell.enable_gui = lambda gui=None: None  # a plain shell has no GUI loop; inline needs none
        self.shell.enable_matplotlib("inline")
        self.shell._showtraceback = self._record_traceback
        self.shell.displayhook.write_format_data = self._record_result
        self._outputs: list[dict] = []
        self._error: tuple | None = None

    # ---- the channel --------------------------------------------------------------------------
    def send(self, message: dict) -> None:
        wire.send(self.fd_out, wire.pack(message))

    def receive(self) -> dict:
        return pickle.loads(wire.receive(self.fd_in, limit=2**40))

    def keep(self, obj) -> int:
        self.handles[id(obj)] = obj
        return id(obj)

    def answer(self, op: str, value, tensors: list | None = None, **fields) -> dict:
        """The reply carrying ``value`` as plain data; ``tensors`` (if given) receives its tensors, not copied."""
        tensors = [] if tensors is None else tensors
        data = wire.plain(value, self.keep, tensors)
        return {"op": op, "value": data, "grad": [bool(t.requires_grad) for t in tensors],
                "tensors": [t.detach().cpu().clone().as_subclass(torch.Tensor) for t in tensors], **fields}

    def serve(self) -> None:
        while True:
            message = self.receive()
            if message["op"] == "stop":
                return
            self.send(self.dispatch(message))

    def dispatch(self, message: dict) -> dict:
        try:
            return getattr(self, "op_" + message["op"])(message)
        except BaseException as exc:  # anything the student's code raised, reported as data
            return self.failure(exc)

    def failure(self, exc: BaseException) -> dict:
        frames = frame_records(exc.__traceback__)
        return {"op": "raise", "type": type(exc).__name__, "message": str(exc)[:2000],
                "name": getattr(exc, "name", None) if isinstance(exc, NameError) else None,
                "frames": frames, "rng": wire.rng_state()}

    # ---- running cells ----------------------------------------------------------------------------
    def _record_traceback(self, etype, evalue, stb) -> None:
        self._error = (etype.__name__, str(evalue)[:2000], [str(s)[:5000] for s in stb[-20:]])

    def _record_result(self, format_dict, md_dict=None) -> None:
        data = {k: v for k, v in format_dict.items() if isinstance(v, str) and len(v) < DATA_LIMIT}
        self._outputs.append({"output_type": "execute_result", "data": data, "metadata": {},
                              "execution_count": self.shell.execution_count})

    def op_run(self, message: dict) -> dict:
        from IPython.utils.capture import capture_output

        self._outputs, self._error = [], None
        started = time.monotonic()
        with capture_output(display=True) as captured:
            sys.stdout = out = _Capped(TEXT_LIMIT)
            sys.stderr = err = _Capped(TEXT_LIMIT)
            with _Timer(message["timeout"]) as timer:
                self.shell.run_cell(message["source"], store_history=True)
        outputs = [{"output_type": "stream", "name": name, "text": s.text()}
                   for name, s in (("stdout", out), ("stderr", err)) if s.kept or s.dropped]
        size = 0
        for rich in captured.outputs:
            size += sum(len(str(v)) for v in rich.data.values())
            if size <= DATA_LIMIT:
                outputs.append({"output_type": "display_data", "data": dict(rich.data), "metadata": {}})
        if size > DATA_LIMIT:
            outputs.append({"output_type": "stream", "name": "stderr",
                            "text": f"[figures and rich outputs over {DATA_LIMIT:,} bytes were not kept]\n"})
        outputs += self._outputs
        if self._error:
            ename, evalue, stb = self._error
            outputs.append({"output_type": "error", "ename": ename, "evalue": evalue, "traceback": stb})
        late = timer.fired and time.monotonic() - started >= message["timeout"]
        status = "timeout" if late and self._error and self._error[0] == "KeyboardInterrupt" else (
            "error" if self._error else "ok")
        return {"op": "ran", "outputs": outputs, "status": status, "count": self.shell.execution_count - 1}

    def op_define(self, message: dict) -> dict:
        """Names the visible part of a check cell defined in the judge (students' functions may read them)."""
        self.shell.user_ns.update(self.load(message["values"], [], []))
        return {"op": "defined"}

    def op_names(self, message: dict) -> dict:
        space = self.shell.user_ns
        return self.answer("names", {n: space[n] for n in message["names"] if n in space})

    # ---- calls from the judge --------------------------------------------------------------------------
    def load(self, data: bytes, leaves: list, generators: list, invocation: int | None = None,
             arguments: tuple = ()):
        """Unpickle the judge's message; with ``invocation``, tensors that need a gradient are joined to
        ``arguments`` (the student's tensors passed to that judge function) by :class:`_CallbackBridge`."""
        runner = self

        class Loader(pickle.Unpickler):
            def persistent_load(self, pid):
                kind, key = pid[0], pid[1]
                if kind == "handle":
                    return runner.handles[key]
                if kind == "callback":
                    return _Callback(runner, key, leaves, generators)
                if kind == "generator":
                    generators.append(torch.Generator().set_state(pid[2]))
                    return generators[-1]
                leaf = pid[2].detach().clone()
                leaf = torch.nn.Parameter(leaf) if kind == "parameter" else leaf.requires_grad_(True)
                leaves.append(leaf)
                if invocation is not None and arguments:
                    return _CallbackBridge.apply(runner, invocation, pid[1], leaf, *arguments)
                return leaf

        return Loader(io.BytesIO(data)).load()

    def op_call(self, message: dict) -> dict:
        leaves, generators = [], []
        target = self.handles[message["target"]]
        args, kwargs = self.load(message["args"], leaves, generators)
        wire.set_rng_state(message["rng"])
        with _Timer(message["timeout"]):
            result = _apply(target, message["how"], args, kwargs)
        found: list = []
        reply = self.answer("return", result, found, rng=wire.rng_state(),
                            generators=[g.get_state() for g in generators], call=message["call"])
        tensors = [t for t, g in zip(found, reply["grad"]) if g]
        if leaves and tensors:
            self.graphs[message["call"]] = (leaves, tensors)
            while len(self.graphs) > 64:
                self.graphs.pop(next(iter(self.graphs)))
        return reply

    def op_vjp(self, message: dict) -> dict:
        leaves, outputs = self.graphs[message["call"]]
        grads = torch.autograd.grad(outputs, leaves, message["grads"], allow_unused=True, retain_graph=True)
        return {"op": "grads", "present": [g is not None for g in grads],
                "tensors": [torch.zeros(0) if g is None else g.detach().clone() for g in grads]}


def _apply(target, how: str, args: tuple, kwargs: dict):
    if how == "call":
        return target(*args, **kwargs)
    if how == "getattr":
        return getattr(target, args[0])
    if how == "getitem":
        return target[args[0]]
    if how == "list":
        return list(target)
    if how == "len":
        return len(target)
    raise ValueError(f"unknown operation {how!r}")


class _Callback:
    """One of the judge's functions, called from the student's code: the call goes back to the judge."""

    def __init__(self, runner: Runner, key: int, leaves: list, generators: list) -> None:
        self.runner, self.key, self.leaves, self.generators = runner, key, leaves, generators

    def __call__(self, *args, **kwargs):
        return self._ask((args, kwargs), attr=None, call=True)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask(((), {}), attr=name, call=False)

    def _ask(self, arguments, attr, call):
        runner = self.runner
        found: list = []
        runner.send(runner.answer("callback", arguments, found, key=self.key, attr=attr, call=call,
                                  rng=wire.rng_state()))
        needing = tuple(t for t in found if t.requires_grad)
        while True:
            message = runner.receive()
            if message["op"] == "callback_return":
                wire.set_rng_state(message["rng"])
                return runner.load(message["value"], self.leaves, self.generators, message["invocation"], needing)
            if message["op"] == "callback_raise":
                raise RuntimeError(message["message"])
            runner.send(runner.dispatch(message))  # the judge's callback calls the student back


class _CallbackBridge(torch.autograd.Function):
    """A judge function's result, joined to the student's tensors it was computed from."""

    @staticmethod
    def forward(ctx, runner, invocation, output, leaf, *arguments):
        ctx.runner, ctx.invocation, ctx.output, ctx.n = runner, invocation, output, len(arguments)
        return leaf.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        runner = ctx.runner
        runner.send(runner.answer("callback_vjp", grad, invocation=ctx.invocation, output=ctx.output))
        message = runner.receive()
        grads = list(message.get("grads", []) if message.get("op") == "callback_grads" else [])[:ctx.n]
        return (None, None, None, grad, *grads, *[None] * (ctx.n - len(grads)))


def main() -> int:
    fd_in, fd_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    settings = pickle.loads(wire.receive(fd_in))
    if settings.get("memory"):
        resource.setrlimit(resource.RLIMIT_AS, (settings["memory"], settings["memory"]))
    runner = Runner(fd_in, fd_out)
    runner.send({"op": "ready"})
    runner.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
