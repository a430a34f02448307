"""The plotting helpers draw what they are given and refuse what they cannot draw."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dgmlab import embedded, viz  # noqa: E402
from dgmlab.train import History  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_image_grid_builds_a_padded_mosaic():
    images = torch.arange(6 * 4 * 5, dtype=torch.float32).reshape(6, 1, 4, 5)
    ax = viz.image_grid(images, nrow=2, title="six")
    mosaic = ax.images[0].get_array()
    assert mosaic.shape == (2 * 4 + 1, 3 * 5 + 2)  # 2 rows × 3 columns, 1-pixel gaps
    assert np.array_equal(mosaic[:4, 5 + 1 : 10 + 1], images[1, 0].numpy())  # second image, first row
    assert ax.get_title() == "six"
    colour = viz.image_grid(torch.rand(4, 3, 8, 8))
    assert colour.images[0].get_array().shape == (17, 17, 3)


def test_image_grid_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        viz.image_grid(torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        viz.image_grid(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="nrow should be positive"):
        viz.image_grid(torch.zeros(4, 8, 8), nrow=0)  # not silently the default


def test_density_heatmap_shows_the_density():
    toy = embedded.toy_density("two_gaussians")
    ax = viz.density_heatmap(toy, toy.extent, resolution=64)
    img = ax.images[0].get_array()
    xs, ys, lp = viz.density_grid(toy.log_prob, toy.extent, 64)
    assert img.shape == (64, 64) and np.allclose(img, np.exp(lp))
    # the two modes sit at x1 = ±1.5: the brightest column is near one of them
    col = xs[np.argmax(img.max(0))]
    assert abs(abs(col) - 1.5) < 0.2
    assert viz.density_heatmap(lambda p: -(p**2).sum(1), (-1, 1), resolution=8, log=True).images
    with pytest.raises(TypeError, match="log_prob"):
        viz.density_heatmap(3, (-1, 1))


def test_scatter_and_training_curves():
    ax = viz.scatter_samples(torch.randn(50, 2), extent=(-2, 2))
    assert ax.collections[0].get_offsets().shape == (50, 2)
    assert ax.get_xlim() == (-2.0, 2.0)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        viz.scatter_samples(torch.randn(5, 3))
    h = History(epoch=[1, 2, 3], train_loss=[3.0, 2.0, 1.5], val_loss=[3.1, 2.5, 2.6], best_epoch=2)
    ax = viz.training_curves(h)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["train", "validation"] and "best (epoch 2)" in labels[2]
    assert list(ax.get_lines()[1].get_ydata()) == [3.1, 2.5, 2.6]
    with pytest.raises(ValueError, match="no epochs"):
        viz.training_curves({"train_loss": []})


def test_importing_viz_leaves_matplotlib_alone_until_a_notebook_opts_in():
    import subprocess
    import sys

    probe = ("import matplotlib as mpl; before = dict(mpl.rcParams); "
             "import dgmlab.viz, dgmlab.interactive; "
             "print(sorted(k for k in before if before[k] != mpl.rcParams[k])); "
             "dgmlab.viz.use_style(); print(mpl.rcParams['axes.spines.top'])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "False"]


def test_show_source_shows_the_librarys_own_code_without_its_docstring():
    import inspect

    from dgmlab import flows

    source = inspect.getsource(flows.AffineCoupling.forward)
    shown = viz.show_source(flows.AffineCoupling.forward).data
    assert shown.startswith("```python\ndef forward(") and shown.endswith("\n```")
    assert source.strip().splitlines()[-1].strip() in shown  # the code itself, to its last line
    whole = viz.show_source(flows.Planar).data
    doc = flows.Planar.__doc__.strip().splitlines()[0]
    assert whole.startswith("```python\nclass Planar(Transform):\n") and doc not in whole
    assert doc in viz.show_source(flows.Planar, docstring=True).data
    with pytest.raises(TypeError, match="function, class or method"):
        viz.show_source(3)
