"""Interactive figures respond to the reader: live as widgets, in the book as frames and sliders."""

from __future__ import annotations

import base64
import io
import itertools
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402
from nbclient import NotebookClient  # noqa: E402
from PIL import Image  # noqa: E402

from dgmlab import interactive  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import browser  # noqa: E402

WIDGET_VIEW = interactive.WIDGET_VIEW_MIMETYPE
CONTROLS = {"height": [1, 2, 3], "colour": ["C0", "C3"]}


class Recorder:
    """A draw function that remembers every call: a bar of the given height and colour."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, fig, height, colour="C0"):
        self.calls.append({"height": height, "colour": colour})
        ax = fig.subplots()
        ax.bar([0], [height], color=colour)
        ax.set_ylim(0, 4)
        ax.set_title(f"{height} {colour}")


def small(draw=None, controls=CONTROLS, **kwargs):
    kwargs = {"figsize": (2.0, 1.5), "dpi": 40, **kwargs}
    return interactive.figure(draw or Recorder(), controls, **kwargs)


def png_of(data_uri: str) -> bytes:
    return base64.b64decode(data_uri.split(",", 1)[1])


@pytest.fixture(autouse=True)
def no_figure_leaks():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "a test left pyplot figures open"


# --------------------------------------------------------------------------- frames


def test_one_frame_per_combination_in_product_order():
    draw = Recorder()
    fig = small(draw)
    assert draw.calls == [] and fig.n_frames == 6  # nothing is drawn before it is needed
    frames = fig.frames
    order = list(itertools.product([1, 2, 3], ["C0", "C3"]))  # the last control varies fastest
    assert list(frames) == order == fig.keys()
    assert [(c["height"], c["colour"]) for c in draw.calls] == order
    for png in frames.values():
        image = Image.open(io.BytesIO(png))
        image.verify()
        assert image.format == "PNG" and image.size == (80, 60)  # figsize × dpi
    assert len(set(frames.values())) == 6, "different values should give different images"
    assert fig.frames is frames and len(draw.calls) == 6  # cached, not redrawn


def test_stray_pyplot_figures_are_closed_with_a_warning():
    def draw(fig, height):
        plt.figure()  # the mistake: drawing through pyplot instead of on fig
        fig.subplots().plot([0, height])

    with pytest.warns(RuntimeWarning, match="Draw onto the fig"):
        small(draw, {"height": [1, 2]}).frames
    # no_figure_leaks checks that both stray figures were closed


# --------------------------------------------------------------------------- static HTML


def test_html_is_self_contained_and_holds_every_frame():
    fig = small(labels={"height": "bar <height>"}, initial={"height": 2})
    page = fig.html()
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert not re.search(r"<script[^>]+src=|<link|<iframe|@import", page)
    for png in fig.frames.values():
        assert base64.b64encode(png).decode() in page
    sliders = re.findall(r'<input type="range"[^>]*>', page)
    assert len(sliders) == 2
    assert 'max="2"' in sliders[0] and 'value="1"' in sliders[0]  # height starts at 2: position 1
    assert 'max="1"' in sliders[1] and 'value="0"' in sliders[1]
    assert "bar &lt;height&gt;" in page and "<height>" not in page  # labels are escaped
    assert re.findall(r"<output[^>]*>([^<]*)</output>", page) == ["2", "C0"]
    initial_src = re.search(r'<img src="([^"]+)"', page).group(1)
    assert png_of(initial_src) == fig.frames[(2, "C0")]
    assert page.count("<script>") == 1 and "addEventListener(\"input\"" in page


def test_html_ids_are_deterministic_and_distinct_between_figures():
    first, again = small().html(), small().html()
    assert first == again, "building the same figure twice should give identical HTML"
    other = small(controls={"height": [1, 3]}).html()
    ids = set(re.findall(r'id="([^"]+)"', first))
    other_ids = set(re.findall(r'id="([^"]+)"', other))
    assert len(ids) == 3 and len(other_ids) == 2  # the figure and one id per slider
    assert not ids & other_ids, "two figures on one page must not share ids"


def test_save_html_writes_a_standalone_page_atomically(tmp_path):
    fig = small()
    path = fig.save_html(tmp_path / "sub" / "page.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and fig.html() in text and text.rstrip().endswith("</html>")
    assert [p.name for p in path.parent.iterdir()] == ["page.html"]  # no temporary file left behind


# --------------------------------------------------------------------------- display


def test_mimebundle_outside_a_kernel_is_static():
    draw = Recorder()
    fig = small(draw)
    assert fig._repr_mimebundle_(include={"text/plain"}) == {"text/plain": repr(fig)}
    assert draw.calls == [], "a text-only display should not render frames"
    bundle = fig._repr_mimebundle_()
    assert set(bundle) == {"text/html", "image/png", "text/plain"}
    assert bundle["text/html"] == fig.html()
    assert bundle["image/png"] == fig.frames[(1, "C0")]  # the initial frame, for PDF builds
    assert "6 frames (3 × 2)" in bundle["text/plain"] and "\n" not in bundle["text/plain"]
    assert WIDGET_VIEW not in fig._repr_mimebundle_(exclude={"text/html"})


def test_mimebundle_in_a_kernel_adds_the_live_widget():
    source = (
        "from dgmlab import interactive\n"
        "def draw(fig, a):\n"
        "    fig.subplots().plot([0, a])\n"
        "interactive.figure(draw, {'a': [1, 2]}, figsize=(2, 1.5), dpi=40)"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    assert [o.output_type for o in outputs] == ["execute_result"]
    data = outputs[0].data
    assert set(data) == {WIDGET_VIEW, "text/html", "image/png", "text/plain"}
    assert data[WIDGET_VIEW]["model_id"]
    assert 'class="dgmlab-interactive"' in data["text/html"]


# --------------------------------------------------------------------------- live widget


def test_live_widget_redraws_when_a_slider_moves():
    import ipywidgets

    draw = Recorder()
    fig = small(draw, initial={"colour": "C3"})
    box = fig.widget()
    assert fig.widget() is box  # created once
    *sliders, output = box.children
    assert all(isinstance(s, ipywidgets.SelectionSlider) for s in sliders)
    assert isinstance(output, ipywidgets.Output)
    # exactly the book's values, shown with the book's labels
    assert [s.options for s in sliders] == [(("1", 1), ("2", 2), ("3", 3)), (("C0", "C0"), ("C3", "C3"))]
    assert [s.value for s in sliders] == [1, "C3"]
    assert draw.calls == [{"height": 1, "colour": "C3"}]  # only the initial frame, not all six

    sliders[0].value = 3  # what the front end does when the student moves the slider
    assert draw.calls[-1] == {"height": 3, "colour": "C3"}
    shown = base64.b64decode(output.outputs[0]["data"]["image/png"])
    assert shown == fig.render({"height": 3, "colour": "C3"})

    fig.frames  # once the frames exist, moving a slider reuses them
    calls = len(draw.calls)
    sliders[1].value = "C0"
    assert len(draw.calls) == calls
    assert base64.b64decode(output.outputs[0]["data"]["image/png"]) == fig.frames[(3, "C0")]


def test_live_widget_shows_an_error_from_draw_in_place_of_the_figure():
    def draw(fig, a):
        if a == 2:
            raise ZeroDivisionError("a = 2 is not allowed here")
        fig.subplots().plot([0, a])

    box = small(draw, {"a": [1, 2]}).widget()
    box.children[0].value = 2
    shown = box.children[-1].outputs[0]
    assert shown["output_type"] == "error" and shown["ename"] == "ZeroDivisionError"
    assert "a = 2 is not allowed" in shown["evalue"]


# --------------------------------------------------------------------------- validation


def _bar(fig, a):
    fig.subplots().bar([0], [a])


@pytest.mark.parametrize("controls,kwargs,error,message", [
    ({}, {}, ValueError, "non-empty dict"),
    ({"a": []}, {}, ValueError, r"controls\['a'\] is empty"),
    ({"not valid": [1]}, {}, ValueError, "not a valid Python keyword argument"),
    ({"lambda": [1]}, {}, ValueError, "not a valid Python keyword argument"),
    ({"a": "abc"}, {}, TypeError, "should be a list of values"),
    ({"a": [1, object()]}, {}, TypeError, "numbers or strings"),
    ({"a": [1, float("nan")]}, {}, ValueError, "finite"),
    ({"a": [1, 1.0]}, {}, ValueError, r"repeats values \(1\)"),
    ({"a": range(15), "b": range(15)}, {}, ValueError, r"225 frames \(15 a × 15 b\); at most 200"),
    ({"a": [1, 2]}, {"initial": {"a": 5}}, ValueError, r"initial\['a'\] should be one of 1, 2; got 5"),
    ({"a": [1, 2]}, {"initial": {"b": 1}}, ValueError, r"initial names unknown controls \['b'\]"),
    ({"a": [1, 2]}, {"labels": {"b": "B"}}, ValueError, r"labels name unknown controls \['b'\]"),
    ({"a": [1, 2]}, {"dpi": 0}, ValueError, "dpi should be positive"),
    ({"a": [1, 2]}, {"figsize": (0, 2)}, ValueError, "figsize should be positive"),
    ({"b": [1, 2]}, {}, TypeError, r"draw should accept draw\(fig, b=...\)"),
])
def test_validation_messages(controls, kwargs, error, message):
    with pytest.raises(error, match=message):
        interactive.figure(_bar, controls, **kwargs)


def test_numpy_values_become_python_values_and_initial_takes_the_lists_element():
    import numpy as np

    fig = small(_bar, {"a": np.linspace(0.0, 1.0, 3)}, initial={"a": 1})
    assert fig.values["a"] == (0.0, 0.5, 1.0) and type(fig.values["a"][0]) is float
    assert fig.initial == {"a": 1.0}


# --------------------------------------------------------------------------- real browser


@pytest.fixture(scope="module")
def chromium():
    if browser.find_chromium() is None:
        pytest.skip(browser.INSTALL_HINT)
    with browser.Browser() as b:
        yield b


_state = browser._figure_state  # shown values, image source, slider positions


def test_a_reader_moves_the_slider_in_a_browser_without_network(chromium, tmp_path):
    fig, other = small(initial={"height": 2}), small(controls={"height": [1, 3]})
    page = tmp_path / "page.html"
    fig.save_html(page)  # a standalone page, then a second figure added to it by hand
    page.write_text(page.read_text().replace("</body>", other.html() + "\n</body>"))
    chromium.open_page(page.as_uri())
    figure_id, other_id = fig.element_id, other.element_id
    assert _state(chromium, figure_id)["shown"] == ["2", "C0"]
    other_before = _state(chromium, other_id)
    before = chromium.screenshot(f"#{figure_id}")

    chromium.press_key(f"#{figure_id}-0", "ArrowRight")  # the height slider, as a reader would

    after = chromium.screenshot(f"#{figure_id}")
    state = _state(chromium, figure_id)
    assert before != after, "the picture did not change when the slider moved"
    assert state["shown"] == ["3", "C0"]
    assert png_of(state["src"]) == fig.frames[(3, "C0")]
    assert _state(chromium, other_id) == other_before, "moving one figure's slider changed another figure"
    chromium.press_key(f"#{figure_id}-1", "ArrowRight")
    assert png_of(_state(chromium, figure_id)["src"]) == fig.frames[(3, "C3")]
    assert chromium.external_requests == [], "the page reached for the network"


def test_check_sliders_passes_good_pages_and_catches_dead_ones(chromium, tmp_path):
    good = small().save_html(tmp_path / "good.html")
    dead = tmp_path / "dead.html"  # the static snapshot problem: sliders that move nothing
    dead.write_text(good.read_text().replace('addEventListener("input", update)', 'addEventListener("x", update)'))
    assert browser.check_sliders([good], browser=chromium) == []
    problems = browser.check_sliders([dead], browser=chromium)
    assert problems and any("is not the frame" in p for p in problems)
    assert browser.check_sliders([tmp_path / "missing.html"], browser=chromium)


def test_check_sliders_command_line(tmp_path):
    if browser.find_chromium() is None:
        pytest.skip(browser.INSTALL_HINT)
    page = small().save_html(tmp_path / "page.html")
    script = Path(browser.__file__)
    ok = subprocess.run([sys.executable, script, "check-sliders", page, "--strict-network"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "1 interactive figure(s), ok" in ok.stdout
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body><p>no figures</p></body></html>")
    bad = subprocess.run([sys.executable, script, "check-sliders", empty], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "no interactive figure found" in bad.stderr
