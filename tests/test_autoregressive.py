"""Claims C10-C12: autoregressive masks, exact normalisation, and sampling."""

import itertools
import math

import pytest
import torch

from dgmlab import autoregressive as A
from dgmlab import baselines, embedded, metrics, train


def before(image_shape, i, j, color):
    """Inputs that may influence colour ``color`` of pixel (i, j): earlier pixels, earlier colours."""
    c, h, w = image_shape
    allowed = torch.zeros(c, h, w, dtype=torch.bool)
    allowed.reshape(c, -1)[:, : i * w + j] = True
    allowed[:color, i, j] = True
    return allowed


PIXEL_MODELS = {
    "pixelcnn": lambda: A.PixelCNN((1, 5, 5), levels=3, channels=6, layers=2, first_kernel=3),
    "gated": lambda: A.GatedPixelCNN((1, 5, 5), levels=3, channels=6, layers=3, kernel=3),
    "pixelcnn-rgb": lambda: A.PixelCNN((3, 4, 4), levels=4, channels=6, layers=2, first_kernel=3),
    "gated-rgb-mixture": lambda: A.GatedPixelCNN((3, 4, 4), levels=4, channels=6, layers=2, kernel=3,
                                                 output="logistic_mixture", mixtures=2),
    "gated-conditional": lambda: A.GatedPixelCNN((1, 4, 4), levels=2, channels=4, layers=2, kernel=3,
                                                 num_classes=3),
}


# ---------------------------------------------------------------------------- C10
def test_made_masks_from_degrees_by_hand():
    degrees = [torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1, 0])]
    hidden, out = A.made_masks(degrees)
    # a hidden unit of degree d sees inputs of degree ≤ d ...
    assert hidden.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
    # ... and output j (degree j) sees hidden units of degree < j: never its own input
    assert out.tolist() == [[0, 0, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize("levels", [2, 5])
def test_c10_made_output_depends_only_on_earlier_dimensions(levels):
    made = A.MADE(7, (24, 24), levels=levels, num_masks=4, seed=3)
    for k in range(4):
        made.set_mask(k)
        order = made.ordering(k)
        for j in range(7):
            seen = A.receptive_field(made, j)
            assert torch.equal(seen & ~(order < order[j]), torch.zeros(7, dtype=torch.bool)), (k, j)
        # and by perturbation: changing the last dimension in the order changes no output
        last = int(order.argmax())
        x = torch.randint(levels, (5, 7))
        x2 = x.clone()
        x2[:, last] = (x2[:, last] + 1) % levels
        made.eval()
        assert torch.equal(made.logits(x), made.logits(x2))
    # the first dimension in the order is a constant; the last sees everything before it
    made.set_mask(0)
    assert not A.receptive_field(made, 0).any() and A.receptive_field(made, 6)[:6].all()


@pytest.mark.parametrize("name", list(PIXEL_MODELS))
def test_c10_pixelcnn_output_depends_only_on_earlier_pixels_and_colours(name):
    torch.manual_seed(0)  # the same weights whatever ran before in this process
    model = PIXEL_MODELS[name]()
    c, h, w = model.event_shape
    for i in range(h):
        for j in range(w):
            for color in range(c):
                seen = A.receptive_field(model, (i, j), color=color)
                leak = seen & ~before(model.event_shape, i, j, color)
                assert not leak.any(), f"{name}: pixel ({i}, {j}) colour {color} sees {leak.nonzero().tolist()}"
    # not vacuous: the last pixel sees its left neighbour, and the last colour the first one
    assert A.receptive_field(model, (h - 1, w - 1), color=c - 1, trials=10)[0, h - 1, w - 2]
    if c > 1:
        assert A.receptive_field(model, (1, 1), color=c - 1, trials=10)[0, 1, 1]


def test_c10_the_plain_pixelcnn_has_a_blind_spot_and_the_gated_one_not():
    shape = (1, 8, 8)
    plain = A.PixelCNN(shape, levels=2, channels=8, layers=6, first_kernel=3)
    gated = A.GatedPixelCNN(shape, levels=2, channels=8, layers=6, kernel=3, first_kernel=3)
    i, j = 6, 3
    seen_plain, seen_gated = (A.receptive_field(m, (i, j))[0] for m in (plain, gated))
    # (i − 1, j + 2) comes earlier in the raster order, yet every path to it crosses a
    # masked position: however deep the plain stack, it is never seen
    assert not seen_plain[i - 1, j + 2] and seen_gated[i - 1, j + 2]
    assert torch.equal(seen_gated, before(shape, i, j, 0)[0])  # the gated one sees all that it may
    assert (before(shape, i, j, 0)[0] & ~seen_plain).sum() >= 3


def test_conv_masks_by_hand():
    groups = torch.zeros(1, dtype=torch.long)
    a = A.conv_mask((3, 3), "A", groups, groups)[0, 0]
    b = A.conv_mask((3, 3), "B", groups, groups)[0, 0]
    assert a.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert b.tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    rgb = torch.arange(3)
    centre_a = A.conv_mask((3, 3), "A", rgb, rgb)[:, :, 1, 1]
    assert centre_a.tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]  # G sees R; B sees R and G
    assert A.conv_mask((1, 3), "H-B", rgb, rgb)[:, :, 0, 2].sum() == 0  # nothing to the right


# ---------------------------------------------------------------------------- C11
def enumerate_images(shape, levels):
    c, h, w = shape
    return torch.tensor(list(itertools.product(range(levels), repeat=c * h * w))).reshape(-1, c, h, w)


@pytest.mark.parametrize("model", [
    A.GatedPixelCNN((1, 2, 3), levels=2, channels=4, layers=2, kernel=3),
    A.GatedPixelCNN((1, 2, 2), levels=5, channels=4, layers=2, kernel=3, output="logistic_mixture", mixtures=3),
    A.PixelCNN((2, 2, 2), levels=2, channels=4, layers=1, first_kernel=3),
    A.PixelCNN((1, 3, 3), levels=2, channels=4, layers=2, first_kernel=3, output="logistic_mixture", mixtures=2),
], ids=["gated-binary", "gated-mixture", "pixelcnn-2-colours", "pixelcnn-mixture"])
def test_c11_pixelcnn_probabilities_sum_to_one(model):
    torch.manual_seed(0)
    for p in model.parameters():  # random weights, far from any symmetric start
        p.data.normal_(0, 0.5)
    xs = enumerate_images(model.event_shape, model.levels)
    total = model.log_prob(xs).double().exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)


def test_c11_conditional_pixelcnn_is_normalised_for_every_class():
    model = A.GatedPixelCNN((1, 2, 3), levels=2, channels=4, layers=2, kernel=3, num_classes=3)
    xs = enumerate_images(model.event_shape, 2)
    for y in range(3):
        assert model.log_prob(xs, torch.full((len(xs),), y)).exp().sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("levels,num_masks", [(2, 1), (2, 5), (3, 3)])
def test_c11_made_probabilities_sum_to_one(levels, num_masks):
    made = A.MADE(7 if levels == 2 else 5, (16,), levels=levels, num_masks=num_masks)
    for p in made.parameters():
        p.data.normal_(0, 0.5)
    made.eval()
    xs = torch.tensor(list(itertools.product(range(levels), repeat=made.event_size)))
    assert made.log_prob(xs).double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_discretised_logistic_bins_sum_to_one_and_match_the_cdf():
    torch.manual_seed(1)
    params = torch.randn(4, 6, 3, 3)  # 2 components
    levels = 7
    xs = torch.arange(levels).reshape(levels, 1, 1, 1).expand(levels, 4, 3, 3)
    probs = torch.stack([A.discretized_logistic_mixture_log_prob(params, x, levels) for x in xs]).exp()
    assert torch.allclose(probs.sum(0), torch.ones(4, 3, 3), atol=1e-5)
    # a single component, a middle bin: σ((x + δ − μ)/s) − σ((x − δ − μ)/s)
    p1 = torch.tensor([0.0, 0.1, math.log(0.3)]).reshape(1, 3, 1, 1)
    centre, half = 2 * 3 / 6 - 1, 1 / 6
    expected = torch.sigmoid(torch.tensor((centre + half - 0.1) / 0.3)) - torch.sigmoid(torch.tensor((centre - half - 0.1) / 0.3))
    got = A.discretized_logistic_mixture_log_prob(p1, torch.tensor([[[3]]]), 7).exp().item()
    assert got == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------- C12
def chi_square_ok(counts, probs, n):
    expected = probs * n
    keep = expected > 5
    stat = (((counts - expected) ** 2) / expected)[keep].sum().item()
    dof = int(keep.sum()) - 1
    return stat < dof + 5 * math.sqrt(2 * dof)  # far beyond the 99.9th percentile of χ²(dof)


@pytest.mark.parametrize("model", [
    A.GatedPixelCNN((1, 2, 2), levels=2, channels=4, layers=2, kernel=3),
    A.GatedPixelCNN((1, 1, 3), levels=4, channels=4, layers=2, kernel=3, output="logistic_mixture", mixtures=2),
    A.PixelCNN((2, 1, 2), levels=2, channels=4, layers=1, first_kernel=3),
], ids=["gated", "mixture", "pixelcnn-2-colours"])
def test_c12_sampling_reproduces_the_models_own_distribution(model):
    torch.manual_seed(2)
    for p in model.parameters():
        p.data.normal_(0, 0.7)
    xs = enumerate_images(model.event_shape, model.levels)
    probs = model.log_prob(xs).double().exp()
    n = 20_000
    samples = model.sample(n)
    codes = (samples.reshape(n, -1) * (model.levels ** torch.arange(xs[0].numel() - 1, -1, -1))).sum(1)
    ref = (xs.reshape(len(xs), -1) * (model.levels ** torch.arange(xs[0].numel() - 1, -1, -1))).sum(1)
    counts = torch.zeros(len(xs), dtype=torch.float64)
    lookup = {code: k for k, code in enumerate(ref.tolist())}
    for code in codes.tolist():
        counts[lookup[code]] += 1
    assert chi_square_ok(counts, probs, n)
    # the marginal of every pixel too
    marg_model = (probs[:, None] * (xs.reshape(len(xs), -1) == 1)).sum(0)
    marg_sample = (samples.reshape(n, -1) == 1).double().mean(0)
    assert (marg_model - marg_sample).abs().max() < 0.02


def random_made_ensemble(seed: int):
    """A binary MADE on 4 pixels with 3 orderings and large random weights (eval mode), and all 16 images."""
    torch.manual_seed(seed)
    made = A.MADE(4, (12,), num_masks=3)
    for p in made.parameters():
        p.data.normal_(0, 1.0)
    return made.eval(), torch.tensor(list(itertools.product([0, 1], repeat=4))).float()


def image_counts(samples: torch.Tensor) -> torch.Tensor:
    """How often each of the 16 images was drawn, in itertools.product order (the binary code)."""
    return torch.bincount((samples * torch.tensor([8, 4, 2, 1])).sum(1).long(), minlength=16).double()


def test_c12_made_sampling_reproduces_its_distribution_including_the_ensemble():
    made, xs = random_made_ensemble(3)
    probs = made.log_prob(xs).double().exp()
    n = 20_000
    assert chi_square_ok(image_counts(made.sample(n)), probs, n)


def test_made_can_be_evaluated_and_sampled_with_chosen_orders():
    made, xs = random_made_ensemble(4)
    everyone = made.log_prob(xs)
    members = []
    for k in range(3):
        made.set_mask(k)
        members.append(made._log_prob_current(xs))
    made.set_mask(2)  # the block must not depend on, or change, the current mask
    with made.orders(1):
        alone = made.log_prob(xs)
        samples = made.sample(20_000)
    assert made.current_mask == 2
    assert torch.allclose(alone, members[1]) and not torch.allclose(alone, members[0])
    assert alone.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert chi_square_ok(image_counts(samples), alone.double().exp(), 20_000)
    with made.orders(0, 2):
        pair = made.log_prob(xs)
    assert torch.allclose(pair, torch.logsumexp(torch.stack([members[0], members[2]]), 0) - math.log(2), atol=1e-6)
    assert torch.allclose(made.log_prob(xs), everyone)  # all members again after the block
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        with made.orders(3):
            pass
    with pytest.raises(AttributeError):
        made.num_masks = 1  # read-only: choose members with orders(...)


def test_c12_sampling_is_sequential_and_on_a_crop_exact():
    """The crop used while sampling gives the same conditionals as the whole image."""
    torch.manual_seed(4)
    model = A.GatedPixelCNN((1, 9, 5), levels=3, channels=4, layers=2, kernel=3, first_kernel=3)
    assert model.reach_up == 3
    x = torch.randint(3, (2, 1, 9, 5))
    full = model.params_from_encoded(model.encode(x))
    for i in range(9):
        top = max(0, i - model.reach_up)
        crop = model.params_from_encoded(model.encode(x[:, :, top: i + 1]))
        assert torch.allclose(crop[..., i - top, :], full[..., i, :], atol=1e-6)
    # one draw per pixel: a model whose output ignores the input still fills every pixel
    s = model.sample(3)
    assert s.shape == (3, 1, 9, 5) and s.dtype == torch.long and s.max() < 3


def test_completion_keeps_the_given_pixels():
    torch.manual_seed(5)
    model = A.GatedPixelCNN((1, 6, 6), levels=17, channels=4, layers=2, kernel=3)
    x = torch.randint(17, (4, 1, 6, 6))
    done = model.sample(4, x=x, start=(3, 0))
    assert torch.equal(done[:, :, :3], x[:, :, :3])
    assert not torch.equal(done[:, :, 3:], x[:, :, 3:])


def test_made_learns_the_binarised_digits():
    """A short run beats the independent-pixel baseline on held-out digits (learning works)."""
    torch.manual_seed(0)
    x, xv, xt = (embedded.digits(s, "binary", flatten=True).x for s in ("train", "val", "test"))
    made = A.MADE(64, (256,), num_masks=4)
    train.fit(made, x, xv, epochs=25, batch_size=64, lr=2e-3, progress=False)
    independent = baselines.IndependentBernoulli.from_data(x, alpha=1.0)
    assert metrics.heldout_nll(made, xt).nats < metrics.heldout_nll(independent, xt).nats - 3


def test_models_refuse_bad_input():
    model = A.GatedPixelCNN((1, 8, 8), levels=17, channels=4, layers=1)
    with pytest.raises(ValueError, match=r"should lie in \[0, 16\]"):
        model.log_prob(torch.full((1, 1, 8, 8), 17))
    with pytest.raises(ValueError, match="colour channel"):
        model.log_prob(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer levels"):
        model.log_prob(torch.full((1, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="unconditional"):
        model.log_prob(torch.zeros(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of"):
        A.GatedPixelCNN((3, 8, 8), channels=8)
    conditional = A.GatedPixelCNN((1, 4, 4), levels=2, channels=4, layers=1, num_classes=10)
    with pytest.raises(ValueError, match="pass labels"):
        conditional.log_prob(torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="odd"):
        A.PixelCNN((1, 8, 8), levels=2, kernel=4)
    made = A.MADE(64)
    with pytest.raises(ValueError, match="integer levels"):
        made.log_prob(torch.full((1, 64), 0.5))
    with pytest.raises(ValueError, match="integer levels"):
        A.MADE(4, levels=3).log_prob(torch.full((1, 4), 1.5))
    with pytest.raises(ValueError, match=r"shape \(N, 64\)"):
        made.log_prob(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="mask index"):
        made.set_mask(1)


# ------------------------------------------------- the gated layer, piece by piece
def test_shift_down_moves_every_row_down_by_one():
    t = torch.arange(2 * 3 * 4.0).reshape(1, 2, 3, 4)
    shifted = A.shift_down(t)
    assert shifted.shape == t.shape
    assert torch.equal(shifted[:, :, 1:], t[:, :, :-1]) and not shifted[:, :, 0].any()


def test_gate_is_tanh_times_sigmoid_of_the_two_halves():
    t = torch.randn(2, 6, 3, 3)
    assert torch.allclose(A.gate(t), torch.tanh(t[:, :3]) * torch.sigmoid(t[:, 3:]))


def seen_at(output, inputs, r, c):
    """Which pixels of ``inputs`` (1, C, H, W) the output at (r, c) depends on: (H, W) booleans."""
    (grad,) = torch.autograd.grad(output[0, :, r, c].sum(), inputs, retain_graph=True)
    return grad[0].abs().sum(0) != 0


@pytest.mark.parametrize("first", [True, False])
def test_the_one_row_shift_keeps_the_horizontal_stack_causal(first):
    """The vertical stack sees its own row (even the pixel and those right of it); after the
    one-row shift the horizontal stack only gets rows above, plus pixels left of it."""
    torch.manual_seed(0)
    layer = A.GatedLayer(2, 3, first=first, colors=1, dropout=0.0, num_classes=None)
    v = torch.randn(1, 2, 7, 7, requires_grad=True)
    h = torch.randn(1, 2, 7, 7, requires_grad=True)
    r, c = 4, 3
    vertical = seen_at(layer.look_up(v), v, r, c)
    assert vertical[r, c + 1] and vertical[r - 1].any() and not vertical[r + 1:].any()
    shifted = seen_at(A.shift_down(layer.look_up(v)), v, r, c)
    assert shifted.nonzero()[:, 0].unique().tolist() == [r - 2, r - 1]
    _, h_new = layer(v, h)
    assert torch.equal(seen_at(h_new, v, r, c), shifted)
    from_h = seen_at(h_new, h, r, c)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[r, c - 1: c + (0 if first else 1)] = True  # the first layer hides the pixel itself
    assert torch.equal(from_h, expected)
