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


# ------------------------------------------- the Transformer (Chapter 6's prior over codes)
def randomised_transformer(*args, seed=0, scale=0.5, **kwargs):
    """A Transformer with every parameter drawn N(0, scale²): far from the near-uniform start."""
    torch.manual_seed(seed)
    model = A.Transformer(*args, **kwargs)
    for p in model.parameters():
        p.data.normal_(0, scale)
    return model.eval()


def test_causal_mask_by_hand():
    assert A.causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_causal_self_attention_matches_torch():
    """Written out (q, k, v, scaled dot products, mask, softmax, W_o), it equals nn.MultiheadAttention
    with a causal mask, and F.scaled_dot_product_attention(is_causal=True), on the same weights."""
    torch.manual_seed(0)
    attention = A.CausalSelfAttention(12, heads=3)
    for p in attention.parameters():
        p.data.normal_(0, 0.3)
    reference = torch.nn.MultiheadAttention(12, 3, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([attention.q.weight, attention.k.weight, attention.v.weight]))
        reference.in_proj_bias.copy_(torch.cat([attention.q.bias, attention.k.bias, attention.v.bias]))
        reference.out_proj.weight.copy_(attention.proj.weight)
        reference.out_proj.bias.copy_(attention.proj.bias)
    h = torch.randn(4, 7, 12)
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)  # True: may not attend
    expected, _ = reference(h, h, h, attn_mask=future, need_weights=False)
    assert torch.allclose(attention(h), expected, atol=1e-5)
    heads = [x.reshape(4, 7, 3, 4).transpose(1, 2) for x in (attention.q(h), attention.k(h), attention.v(h))]
    sdpa = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
    assert torch.allclose(attention(h), attention.proj(sdpa.transpose(1, 2).reshape(4, 7, 12)), atol=1e-5)


def test_transformer_logits_at_t_depend_only_on_earlier_tokens():
    """Row t of the logits (those of x_t) is unchanged when x_t, x_t+1, ... change, and changes with
    x_t−1: the causal mask and the shift by one start token, neither more nor less."""
    model = randomised_transformer((1, 2, 3), 5, d_model=16, heads=2, layers=2, num_classes=3)
    x = torch.randint(5, (4, 6), generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0, 1, 2, 1])
    base = model.logits(x.reshape(4, 1, 2, 3), c)
    assert base.shape == (4, 6, 5)
    for t in range(6):
        x2 = x.clone()
        x2[:, t:] = (x2[:, t:] + 1 + torch.randint(4, (4, 6 - t))) % 5  # every token from t on changed
        changed = model.logits(x2.reshape(4, 1, 2, 3), c)
        assert torch.allclose(changed[:, : t + 1], base[:, : t + 1], atol=1e-6), f"row ≤ {t} sees x_{t} or later"
        if t < 5:
            assert (changed[:, t + 1] - base[:, t + 1]).abs().amax(1).min() > 1e-3, f"row {t + 1} ignores x_{t}"


def test_learned_positions_let_the_transformer_see_order():
    """Attention alone treats the tokens before a position as a set: in one layer, swapping two
    earlier tokens leaves the last row of logits as it was. The position embeddings break the tie."""
    model = randomised_transformer(5, 4, d_model=8, heads=2, layers=1)
    x, swapped = torch.tensor([[0, 1, 2, 3, 0]]), torch.tensor([[1, 0, 2, 3, 0]])
    with torch.no_grad():
        assert not torch.allclose(model.logits(x)[0, -1], model.logits(swapped)[0, -1], atol=1e-4)
        model.position.weight.zero_()
        assert torch.allclose(model.logits(x)[0, -1], model.logits(swapped)[0, -1], atol=1e-5)  # order-blind


def all_sequences(length, vocab):
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)))


@pytest.mark.parametrize("num_classes", [None, 3])
def test_transformer_probabilities_sum_to_one_for_every_class(num_classes):
    model = randomised_transformer(4, 3, d_model=8, heads=2, layers=2, num_classes=num_classes)
    xs = all_sequences(4, 3)  # all 81
    totals = []
    for y in [None] if num_classes is None else range(num_classes):
        log_p = model.log_prob(xs, None if y is None else torch.full((81,), y)).double()
        totals.append(log_p.exp().sum().item())
        assert log_p.exp().max() > 2 / 81  # far from uniform (1/81): the check is not vacuous
    assert totals == pytest.approx([1.0] * len(totals), abs=1e-5)


def chisquare_pvalue(samples, probs, vocab):
    """scipy's χ² test of sequences (n, L) against the probabilities of all_sequences (in its order);
    cells expected fewer than 5 times are pooled into one."""
    from scipy.stats import chisquare

    n, length = samples.shape
    codes = (samples * vocab ** torch.arange(length - 1, -1, -1)).sum(1)
    counts = torch.bincount(codes, minlength=len(probs)).double()
    expected = probs / probs.sum() * n
    small = expected < 5
    f_obs, f_exp = counts[~small], expected[~small]
    if small.any():
        f_obs, f_exp = torch.cat([f_obs, counts[small].sum()[None]]), torch.cat([f_exp, expected[small].sum()[None]])
    return chisquare(f_obs.numpy(), f_exp.numpy()).pvalue


def test_transformer_samples_follow_its_own_distribution():
    """Many samples against the enumerated probabilities (χ²): one class for all, and a class each."""
    model = randomised_transformer(3, 3, d_model=8, heads=2, layers=1, num_classes=2, seed=2)
    xs = all_sequences(3, 3)
    with torch.no_grad():
        probs = [model.log_prob(xs, torch.full((27,), y)).double().exp() for y in range(2)]
    assert (probs[0] - probs[1]).abs().max() > 0.05  # the classes differ
    torch.manual_seed(3)
    n = 20_000
    assert chisquare_pvalue(model.sample(n, context=1).reshape(n, 3), probs[1], 3) > 1e-3
    y = torch.arange(n) % 2
    mixed = model.sample(n, context=y).reshape(n, 3)
    for k in range(2):
        assert chisquare_pvalue(mixed[y == k], probs[k], 3) > 1e-3


def counting_sequences(n, seed, vocab=6, classes=4, length=5):
    """Toy "captioned" sequences: the first token is the class, then each token is the previous + 0 or + 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    steps = torch.randint(2, (n, length - 1), generator=g)
    return torch.cat([y[:, None], (y[:, None] + steps.cumsum(1)) % vocab], 1), y


def test_the_class_token_conditions_the_transformer_and_it_learns():
    x, y = counting_sequences(512, 0)
    model = randomised_transformer(5, 6, d_model=32, heads=2, layers=2, num_classes=4)
    assert not torch.allclose(model.log_prob(x[:8], y[:8]), model.log_prob(x[:8], (y[:8] + 1) % 4))
    model = A.Transformer(5, 6, d_model=32, heads=2, layers=2, num_classes=4)
    train.fit(model, (x, y), epochs=20, batch_size=64, lr=3e-3, progress=False)
    xt, yt = counting_sequences(256, 1)
    with torch.no_grad():
        right, wrong = model.log_prob(xt, yt).mean(), model.log_prob(xt, (yt + 1) % 4).mean()
    assert -right < 4 * math.log(2) + 0.5  # close to the data's entropy (4 fair binary steps)
    assert wrong < right - 3  # the wrong class makes the first token unlikely
    torch.manual_seed(1)
    c = torch.arange(200) % 4
    s = model.sample(200, context=c)
    assert (s[:, 0] == c).float().mean() > 0.95  # the sequences start with their class ...
    step = (s[:, 1:] - s[:, :-1]) % 6
    assert ((step == 0) | (step == 1)).float().mean() > 0.95  # ... and go on counting


def code_grids(n, seed, levels=16, classes=10, noise=0.3):
    """4×4 grids of codes: a fixed random grid per class, each cell replaced by a uniform code with
    probability ``noise``. Returns the grids, their classes, and the entropy of a grid given its class."""
    base = torch.randint(levels, (classes, 1, 4, 4), generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    replaced = torch.rand(n, 1, 4, 4, generator=g) < noise
    x = torch.where(replaced, torch.randint(levels, (n, 1, 4, 4), generator=g), base[y])
    same, other = 1 - noise + noise / levels, noise / levels
    entropy = -16 * (same * math.log(same) + (levels - 1) * other * math.log(other))
    return x, y, entropy


@pytest.mark.parametrize("prior", ["pixelcnn", "transformer"])
def test_pixelcnn_and_transformer_are_interchangeable_priors_over_a_code_grid(prior):
    """Trained on class-conditional 4×4 grids of 16 codes, both beat the uniform prior (16 log 16
    nats) by far on held-out grids, and neither beats the data's own entropy (cross-entropy ≥ H)."""
    x, y, entropy = code_grids(1000, 0)
    xt, yt, _ = code_grids(500, 1)
    torch.manual_seed(0)
    model = (A.PixelCNN((1, 4, 4), levels=16, channels=32, layers=2, kernel=3, first_kernel=3, num_classes=10)
             if prior == "pixelcnn" else A.Transformer((1, 4, 4), 16, d_model=32, heads=2, layers=2, num_classes=10))
    train.fit(model, (x, y), epochs=8, batch_size=64, lr=3e-3, progress=False)
    with torch.no_grad():
        nll = -model.log_prob(xt, yt).mean().item()
    assert entropy - 1 < nll < 16 * math.log(16) - 10


def test_transformer_refuses_bad_input():
    model = A.Transformer((1, 2, 2), 4, d_model=8, heads=2, layers=1, num_classes=3)
    x, c = torch.zeros(2, 1, 2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    assert model.log_prob(x.reshape(2, 4), c).shape == (2,)  # a flattened grid is fine
    with pytest.raises(ValueError, match=r"expects x of shape \(N, 1, 2, 2\)"):
        model.log_prob(torch.zeros(2, 5, dtype=torch.long), c)
    with pytest.raises(ValueError, match=r"should lie in \[0, 3\]"):
        model.log_prob(torch.full((2, 1, 2, 2), 4), c)
    with pytest.raises(ValueError, match="pass labels"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"should lie in \[0, 2\]"):
        model.sample(2, context=3)
    with pytest.raises(TypeError, match="integer class labels"):
        model.log_prob(x, c.float())
    with pytest.raises(ValueError, match="unconditional"):
        A.Transformer(4, 3, d_model=8, heads=2).log_prob(x.reshape(2, 4), c)
    with pytest.raises(ValueError, match="multiple of heads"):
        A.Transformer(4, 3, d_model=10, heads=4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        A.Transformer(4, 1)
    assert model.sample(3, context=torch.tensor([0, 1, 2])).shape == (3, 1, 2, 2)
