"""Interactive figures that stay interactive in the rendered book.

A figure with sliders is an ipywidgets control in live Jupyter, but a static
book page has no kernel: its widget snapshot would ignore the reader. So
``figure(draw, controls)`` (an :class:`InteractiveFigure`) shows, depending on where it is displayed,

* live (IPython kernel + ipywidgets): one ``SelectionSlider`` per control over
  an ``Output`` that shows the redrawn figure;
* in the book (``text/html``): every frame precomputed as a base64 PNG, with a
  native ``<input type="range">`` per control and a few lines of inline
  JavaScript that swap the image. No kernel, no network, no CDN.

Both use exactly the values given for each control, so what a reader sees in
the book is what a student sees live. Example::

    def draw(fig, separation, weight):
        ax = fig.subplots()
        ...

    interactive.figure(draw, {"separation": [0, 1, 2, 3, 4], "weight": [0.1, 0.3, 0.5]},
                       labels={"separation": "mode separation d"}, figsize=(8, 3),
                       initial={"separation": 2})

Inside a kernel the output carries both versions. The book's ``_config.yml``
tells myst-nb to render ``text/html`` rather than the widget view
(``nb_mime_priority_overrides``), and to load no widget JavaScript from a CDN
(``nb_ipywidgets_js: {}``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import inspect
import io
import itertools
import json
import keyword
import math
import os
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .files import atomic_write
from .validate import check_choice, check_positive_int

__all__ = ["figure", "InteractiveFigure", "MAX_FRAMES", "WIDGET_VIEW_MIMETYPE"]

MAX_FRAMES = 200
"""Most frames one figure may have: beyond this the page gets heavy and the build slow."""

WIDGET_VIEW_MIMETYPE = "application/vnd.jupyter.widget-view+json"

Value = int | float | str | bool
Draw = Callable[..., Any]


class InteractiveFigure:
    """An interactive figure: ``draw(fig, **values)`` over every combination of ``controls``.

    ``controls`` maps each parameter name (a keyword ``draw`` accepts) to the
    list of values its slider steps through, numbers or strings. The book
    page holds one PNG per combination (the product of the list lengths), so
    keep it to about 50 frames or fewer (at most :data:`MAX_FRAMES`) at a
    modest ``dpi`` (72-90): a 640×240 line plot is ~70 ms and ~19 KB a
    frame, so 25 frames cost ~2 s of build and ~0.5 MB of page. ``labels``
    names the sliders (default: the parameter names); ``initial`` picks
    starting values (default: the first value of each list); ``figsize``
    defaults to the course style's; ``alt`` describes the figure for screen
    readers.

    ``draw`` must draw onto the Figure it is given (``fig.subplots()``,
    ``fig.add_subplot``), not through ``plt``: the helper creates and
    discards each figure itself.

    Frames are rendered when first needed, then cached. Displaying the figure
    in a kernel renders them too, because the executed notebook must carry
    the static version for the book; the live sliders then reuse them and
    respond at once. ``display(fig.widget())`` shows the live control alone.

    ``frames`` maps each value tuple (in the order of ``names``) to PNG bytes;
    ``html()`` is the static, self-contained version; ``widget()`` the live
    ipywidgets one. Displaying it in Jupyter picks the right one.
    """

    def __init__(
        self,
        draw: Draw,
        controls: Mapping[str, Sequence[Value]],
        *,
        labels: Mapping[str, str] | None = None,
        figsize: tuple[float, float] | None = None,
        dpi: int = 80,
        initial: Mapping[str, Value] | None = None,
        alt: str | None = None,
    ):
        if not callable(draw):
            raise TypeError(f"draw should be a function draw(fig, **values), got {type(draw).__name__}.")
        self._draw = draw
        self.values: dict[str, tuple[Value, ...]] = _check_controls(controls)
        self.names: tuple[str, ...] = tuple(self.values)
        self.labels: dict[str, str] = _check_labels(labels, self.names)
        self.initial: dict[str, Value] = _check_initial(initial, self.values)
        self.figsize: tuple[float, float] = _check_figsize(figsize)
        self.dpi: int = check_positive_int(dpi, "dpi")
        self.alt: str = alt if alt is not None else "Interactive figure: " + ", ".join(self.labels.values())
        _check_signature(draw, self.initial)
        self._frames: dict[tuple[Value, ...], bytes] | None = None
        self._html: str | None = None
        self._widget: Any = None

    # ------------------------------------------------------------------ frames

    @property
    def n_frames(self) -> int:
        """Number of frames: the product of the number of values of each control."""
        return math.prod(len(v) for v in self.values.values())

    def keys(self) -> list[tuple[Value, ...]]:
        """Every value tuple, in frame order: ``itertools.product`` order, the last control varying fastest."""
        return list(itertools.product(*self.values.values()))

    @property
    def frames(self) -> dict[tuple[Value, ...], bytes]:
        """PNG bytes of every frame, keyed by value tuple in :meth:`keys` order (rendered once, then cached)."""
        if self._frames is None:
            self._frames = {key: self.render(dict(zip(self.names, key))) for key in self.keys()}
        return self._frames

    def render(self, values: Mapping[str, Value]) -> bytes:
        """Draw one frame for ``values`` (name -> value) and return it as PNG bytes."""
        before = set(plt.get_fignums())
        # A bare Figure is not registered with pyplot, so it cannot leak, and the
        # inline backend of a kernel does not display it behind our back.
        fig = Figure(figsize=self.figsize, dpi=self.dpi)
        FigureCanvasAgg(fig)
        try:
            self._draw(fig, **values)
            buffer = io.BytesIO()
            # No "Software" stamp: identical drawings give identical bytes, hence stable page ids.
            fig.savefig(buffer, format="png", dpi=self.dpi, metadata={"Software": None})
        finally:
            stray = [n for n in plt.get_fignums() if n not in before]
            for number in stray:
                plt.close(number)
        if stray:
            warnings.warn(
                f"draw() opened {len(stray)} pyplot figure(s), which were closed and are not in the "
                "frame. Draw onto the fig it is given (fig.subplots(), fig.add_subplot()) instead of plt.",
                RuntimeWarning,
                stacklevel=2,
            )
        return buffer.getvalue()

    # ------------------------------------------------------------------ static HTML

    @functools.cached_property
    def element_id(self) -> str:
        """The HTML id of the figure: a hash of its frames and controls, so it is stable across builds."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.names, self._value_labels(), list(self.labels.values())]).encode())
        for png in self.frames.values():
            digest.update(hashlib.sha256(png).digest())
        return "dgmlab-figure-" + digest.hexdigest()[:16]

    def html(self) -> str:
        """The static figure: all frames inline as base64 PNGs, native range sliders, inline script."""
        if self._html is None:
            self._html = self._build_html()
        return self._html

    def save_html(self, path: str | os.PathLike) -> Path:
        """Write a complete standalone HTML page holding this figure (atomically); return its path."""
        path = Path(path)
        title = html.escape(self.alt)
        page = (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{title}</title>\n</head>\n<body style=\"font-family:sans-serif\">\n{self.html()}\n"
            "</body>\n</html>\n"
        )
        atomic_write(path, page.encode("utf-8"))
        return path

    def _value_labels(self) -> list[list[str]]:
        return [[_format_value(v) for v in values] for values in self.values.values()]

    def _build_html(self) -> str:
        frames = [base64.b64encode(png).decode("ascii") for png in self.frames.values()]
        start = [self.values[name].index(self.initial[name]) for name in self.names]
        width, height = _png_size(next(iter(self.frames.values())))
        uid = self.element_id
        value_labels = self._value_labels()
        sliders = "\n".join(
            _slider_html(f"{uid}-{k}", self.labels[name], len(value_labels[k]), start[k], value_labels[k][start[k]])
            for k, name in enumerate(self.names)
        )
        data = _json_for_script({"values": value_labels, "frames": frames})
        return (
            f'<div class="dgmlab-interactive" id="{uid}" data-key="{uid}" '
            'style="margin:0.5em 0;font-size:0.9em">\n'
            f'<img src="data:image/png;base64,{frames[_frame_index(start, value_labels)]}" '
            f'width="{width}" height="{height}" alt="{html.escape(self.alt)}" '
            'style="display:block;max-width:100%;height:auto">\n'
            '<div class="dgmlab-controls" style="display:grid;grid-template-columns:max-content '
            f'minmax(6em,20em) max-content;gap:0.3em 0.8em;align-items:center;margin-top:0.3em">\n{sliders}\n</div>\n'
            f'<script type="application/json" class="dgmlab-frames">{data}</script>\n'
            f"<script>{_SCRIPT.replace('@KEY@', uid)}</script>\n"
            "</div>"
        )

    # ------------------------------------------------------------------ live widget

    def widget(self) -> Any:
        """The live ipywidgets control (a VBox of sliders over an Output); created on first call."""
        if self._widget is None:
            self._widget = self._build_widget()
        return self._widget

    def _build_widget(self) -> Any:
        try:
            import ipywidgets
        except ImportError as error:
            raise ImportError(
                "The live figure needs ipywidgets: pip install ipywidgets (the static .html() works without it)."
            ) from error
        output = ipywidgets.Output()
        value_labels = self._value_labels()
        sliders = [
            ipywidgets.SelectionSlider(
                options=list(zip(value_labels[k], self.values[name])),
                value=self.initial[name],
                description=self.labels[name],
                # Redraw on release (and on each arrow key), not on every pixel of a drag:
                # a kernel that redraws slower than the mouse moves would queue up frames.
                continuous_update=False,
                style={"description_width": "initial"},
                layout=ipywidgets.Layout(width="min(100%, 32em)"),
            )
            for k, name in enumerate(self.names)
        ]

        def redraw(change: Any = None) -> None:
            self._show(output, {name: s.value for name, s in zip(self.names, sliders)})

        for slider in sliders:
            slider.observe(redraw, names="value")
        redraw()
        return ipywidgets.VBox([*sliders, output])

    def _show(self, output: Any, values: dict[str, Value]) -> None:
        """Put the frame for ``values`` into ``output`` (the cached PNG when there is one)."""
        key = tuple(values[name] for name in self.names)
        try:
            png = self._frames[key] if self._frames is not None else self.render(values)
        except Exception as error:  # show the student's error where the figure would be
            output.outputs = ({
                "output_type": "error",
                "ename": type(error).__name__,
                "evalue": str(error),
                "traceback": "".join(traceback.format_exception(error)).rstrip().split("\n"),
            },)
            return
        width, height = _png_size(png)
        # Setting the outputs directly (rather than `with output: display(...)`) works the
        # same inside a comm callback, at display time and in tests without a kernel.
        output.outputs = ({
            "output_type": "display_data",
            "data": {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": self._describe(values)},
            "metadata": {"image/png": {"width": width, "height": height}},
        },)

    # ------------------------------------------------------------------ display

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """Everything a front end or builder may pick from, best first.

        * the live widget view, only inside a kernel with ipywidgets (a kernel
          that executes the book gets it too: the book's
          ``nb_mime_priority_overrides`` drops it, so the static HTML is shown);
        * ``text/html``, the static figure with its sliders;
        * ``image/png``, the initial frame, for builders without HTML (PDF);
        * ``text/plain``, one line.
        """

        def wanted(mime: str) -> bool:
            return (include is None or mime in include) and (exclude is None or mime not in exclude)

        bundle: dict[str, Any] = {}
        if wanted(WIDGET_VIEW_MIMETYPE) and _live_kernel():
            view = self.widget()._repr_mimebundle_()
            if view and WIDGET_VIEW_MIMETYPE in view:
                bundle[WIDGET_VIEW_MIMETYPE] = view[WIDGET_VIEW_MIMETYPE]
        if wanted("text/html"):
            bundle["text/html"] = self.html()
        if wanted("image/png"):
            bundle["image/png"] = self.frames[tuple(self.initial[name] for name in self.names)]
        if wanted("text/plain"):
            bundle["text/plain"] = repr(self)
        return bundle

    def _describe(self, values: Mapping[str, Value]) -> str:
        return ", ".join(f"{self.labels[n]} = {_format_value(values[n])}" for n in self.names)

    def __repr__(self) -> str:
        shape = " × ".join(str(len(v)) for v in self.values.values())
        return (f"<interactive figure: {', '.join(self.names)}; {self.n_frames} frames ({shape}); "
                f"showing {self._describe(self.initial)}>")


figure = InteractiveFigure
"""``interactive.figure(draw, controls, ...)``: the name the notebooks use."""


# ---------------------------------------------------------------------- checks


def _check_controls(controls: Mapping[str, Sequence[Value]]) -> dict[str, tuple[Value, ...]]:
    """Names are keyword identifiers, lists non-empty, values distinct numbers/strings, frames few."""
    if not isinstance(controls, Mapping) or not controls:
        raise ValueError(
            "controls should be a non-empty dict: parameter name -> list of values, "
            "e.g. {'separation': [0, 1, 2]}."
        )
    checked: dict[str, tuple[Value, ...]] = {}
    for name, values in controls.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(
                f"control name {name!r} is not a valid Python keyword argument name; "
                "use letters, digits and underscores, e.g. 'mode_separation'."
            )
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
            raise TypeError(f"controls[{name!r}] should be a list of values, got {type(values).__name__}.")
        if len(values) == 0:
            raise ValueError(f"controls[{name!r}] is empty: give its slider at least one value.")
        values = tuple(_check_value(v, name) for v in values)
        shown = [_format_value(v) for v in values]
        if len(set(shown)) != len(shown):
            repeated = sorted({s for s in shown if shown.count(s) > 1})
            raise ValueError(f"controls[{name!r}] repeats values ({', '.join(repeated)}); give distinct values.")
        checked[name] = values
    total = math.prod(len(v) for v in checked.values())
    if total > MAX_FRAMES:
        shape = " × ".join(f"{len(v)} {n}" for n, v in checked.items())
        raise ValueError(
            f"these controls make {total} frames ({shape}); at most {MAX_FRAMES} are allowed "
            "(about 50 keep the page light). Use fewer values per control."
        )
    return checked


def _check_value(value: Any, name: str) -> Value:
    """A slider value: a Python number or string (NumPy scalars are unwrapped)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, Real):
        if not math.isfinite(value):
            raise ValueError(f"controls[{name!r}] holds {value!r}; slider values must be finite.")
        return value
    raise TypeError(f"controls[{name!r}] should hold numbers or strings, got {type(value).__name__} ({value!r}).")


def _check_labels(labels: Mapping[str, str] | None, names: tuple[str, ...]) -> dict[str, str]:
    labels = dict(labels or {})
    unknown = [n for n in labels if n not in names]
    if unknown:
        raise ValueError(f"labels name unknown controls {unknown}; the controls are {list(names)}.")
    for name, label in labels.items():
        if not isinstance(label, str):
            raise TypeError(f"labels[{name!r}] should be a string, got {type(label).__name__}.")
    return {name: labels.get(name, name) for name in names}


def _check_initial(initial: Mapping[str, Value] | None, values: dict[str, tuple[Value, ...]]) -> dict[str, Value]:
    initial = dict(initial or {})
    unknown = [n for n in initial if n not in values]
    if unknown:
        raise ValueError(f"initial names unknown controls {unknown}; the controls are {list(values)}.")
    for name, value in initial.items():
        check_choice(value, f"initial[{name!r}]", values[name])
        # Store the list's own element (2 for 2.0), so it indexes frames and options alike.
        initial[name] = values[name][values[name].index(value)]
    return {name: initial.get(name, options[0]) for name, options in values.items()}


def _check_figsize(figsize: tuple[float, float] | None) -> tuple[float, float]:
    if figsize is None:
        import matplotlib as mpl

        return tuple(float(x) for x in mpl.rcParams["figure.figsize"])  # type: ignore[return-value]
    try:
        width, height = (float(x) for x in figsize)
    except (TypeError, ValueError):
        raise TypeError(f"figsize should be (width, height) in inches, got {figsize!r}.") from None
    if not (width > 0 and height > 0):
        raise ValueError(f"figsize should be positive (width, height) in inches, got {figsize!r}.")
    return width, height


def _check_signature(draw: Draw, initial: dict[str, Value]) -> None:
    """Fail now, not at the first frame, when draw cannot take ``(fig, **values)``."""
    try:
        signature = inspect.signature(draw)
    except (TypeError, ValueError):  # some builtins have no signature: let the first call tell
        return
    try:
        signature.bind(None, **initial)
    except TypeError as error:
        wanted = ", ".join(f"{name}=..." for name in initial)
        raise TypeError(
            f"draw should accept draw(fig, {wanted}) (one keyword per control), "
            f"but its signature is {getattr(draw, '__name__', 'draw')}{signature}: {error}."
        ) from None


# ---------------------------------------------------------------------- helpers


def _format_value(value: Value) -> str:
    """How a value is shown next to its slider: short, the same live and in the book."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _frame_index(positions: Sequence[int], value_labels: Sequence[Sequence[str]]) -> int:
    """Index in frame order of slider positions (the last control varies fastest)."""
    index = 0
    for position, options in zip(positions, value_labels):
        index = index * len(options) + position
    return index


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels, read from the PNG header."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _json_for_script(obj: Any) -> str:
    """JSON safe to inline in a <script> element (no '<', '>' or '&' to end it early)."""
    text = json.dumps(obj, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _slider_html(uid: str, label: str, n: int, position: int, shown: str) -> str:
    """Label, native range input and shown value: three cells of the controls' grid."""
    # A native range input: keyboard arrows, Home/End, touch and screen readers work as is.
    return (
        f'<label for="{uid}">{html.escape(label)}</label>'
        f'<input type="range" id="{uid}" min="0" max="{n - 1}" step="1" value="{position}" '
        f'autocomplete="off" aria-valuetext="{html.escape(shown)}" style="width:100%;margin:0"'
        f"{' disabled' if n == 1 else ''}>"
        f'<output for="{uid}">{html.escape(shown)}</output>'
    )


# Finds its own figure (document.currentScript; front ends that run scripts out of
# place fall back to the first figure with this key not yet bound), then maps the
# slider positions to a frame. Plain ES5 so old browsers work too.
_SCRIPT = """
(function () {
  var s = document.currentScript, root = s && s.parentNode;
  if (!root || root.getAttribute("data-key") !== "@KEY@" || root.hasAttribute("data-bound")) {
    root = document.querySelector('.dgmlab-interactive[data-key="@KEY@"]:not([data-bound])');
  }
  if (!root) { return; }
  root.setAttribute("data-bound", "1");
  var data = JSON.parse(root.querySelector("script.dgmlab-frames").textContent);
  var img = root.querySelector("img");
  var sliders = root.querySelectorAll("input[type=range]");
  var shown = root.querySelectorAll("output");
  function update() {
    var index = 0;
    for (var k = 0; k < sliders.length; k++) {
      var i = Number(sliders[k].value), text = data.values[k][i];
      index = index * data.values[k].length + i;
      shown[k].textContent = text;
      sliders[k].setAttribute("aria-valuetext", text);
    }
    img.src = "data:image/png;base64," + data.frames[index];
  }
  for (var k = 0; k < sliders.length; k++) { sliders[k].addEventListener("input", update); }
  update();
})();
"""


def _live_kernel() -> bool:
    """True inside a running IPython kernel (Jupyter, nbclient) that has ipywidgets."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True
