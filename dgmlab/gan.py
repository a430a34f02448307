"""Generative adversarial networks (Chapter 7): likelihood-free learning.

A GAN's generator G pushes noise z ~ N(0, I) to an object x = G(z): its model p
is the distribution of G(z), which has no density we can evaluate, so it cannot
be trained by maximum likelihood. Instead a discriminator D(x) ∈ (0, 1) learns
to tell data (π) from samples (p), and the generator learns to fool it
(Goodfellow et al. 2014):

    min_G max_D V(G, D),   V(G, D) = E_{x~π} log D(x) + E_{z} log(1 − D(G(z))).

**The optimal discriminator.** For a fixed p, V is maximised pointwise by

    D*(x) = π(x) / (π(x) + p(x)),                                          (C29)

and at that optimum V(G, D*) = 2 JSD(π ‖ p) − 2 log 2 (C30), minimal, −2 log 2,
iff p = π. When π and p have disjoint supports, JSD = log 2 whatever p's
position: the optimal discriminator is a step, and the generator's gradient
through the *saturating* loss E log(1 − D(G(z))) vanishes. The
*non-saturating* loss −E log D(G(z)) has the same fixed point and a strong
gradient exactly where D rejects the fakes.

All losses are computed from the discriminator's *logits* l (D = σ(l)):
log D = −softplus(−l) and log(1 − D) = −softplus(l), stable for any l.

**The remedy: the R1 gradient penalty** (Mescheder et al. 2018),
(γ/2) E_{x~π} ‖∇_x l(x)‖², added to the discriminator's loss. Chosen over
WGAN-GP because it keeps the standard GAN objective whose theory (D*, JSD) the
chapter develops, it needs no interpolates between real and fake images and no
rewritten critic, and, unlike WGAN-GP, it makes the training dynamics locally
convergent (Mescheder et al., Theorem 4.1: the "Dirac-GAN" oscillates without
it). It penalises the discriminator only on real data, where at the
equilibrium D is flat.

**k discriminator steps per generator step.** :meth:`GAN.training_losses`
yields the discriminator's loss on every batch and the generator's on every
k-th, and :func:`dgmlab.train.fit` drives the two named optimisers
("discriminator", "generator").

A GAN has no ``log_prob``: it is judged by its samples (Chapter 1's sample
quality metrics, a two-sample classifier). Theory on 1-D densities given on a
grid: :func:`optimal_discriminator`, :func:`minimax_value_grid`,
:func:`optimal_logit`, :func:`optimise_discriminator_1d`, :func:`jsd_from_value`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModel, constraints
from .divergences import grid_1d
from .validate import check_choice, check_positive_int, check_tensor

__all__ = [
    "minimax_value", "discriminator_loss", "saturating_generator_loss",
    "non_saturating_generator_loss", "r1_penalty",
    "GAN", "mlp_generator", "mlp_discriminator", "DCGANGenerator", "DCGANDiscriminator",
    "toy_gan", "dcgan", "adam", "generator_gradient_norm",
    "optimal_discriminator", "optimal_logit", "minimax_value_grid", "optimise_discriminator_1d", "jsd_from_value",
    "ModeCoverage", "mode_coverage", "Snapshots",
    "TOY_GAN", "TOY_GAN_TRAINING", "TOY_GAN_COLLAPSE", "TOY_GAN_COLLAPSE_TRAINING", "TOY_GAN_R1",
    "DIGITS_DCGAN", "DIGITS_DCGAN_TRAINING",
    "MNIST_DCGAN", "MNIST_DCGAN_TRAINING", "CIFAR_DCGAN", "CIFAR_DCGAN_TRAINING",
]

LOG2 = math.log(2.0)

def adam(lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999)) -> Callable:
    """Adam with β1 = 0.5 (Radford et al. 2016), as an ``optimizer`` for :func:`dgmlab.train.fit`:
    the default β1 = 0.9 carries momentum across the two players' moves and makes GANs oscillate."""
    return lambda params: torch.optim.Adam(params, lr=lr, betas=betas)


# 2-D toys (the 8 Gaussians, 4,000 points): MLPs. TOY_GAN covers all 8 modes within 10 epochs.
TOY_GAN = dict(latent_dim=2, hidden=(128, 128), generator_loss="non_saturating", k=1, r1=0.0)
TOY_GAN_TRAINING = dict(batch_size=128, optimizer=adam(1e-3))
# Mode collapse provoked: Adam's default β1 = 0.9 carries momentum across the players' moves and
# the generator chases the discriminator from mode to mode. Measured over 60 epochs (seeds 0-5,
# model and fit seeded alike): without a remedy, 1-5 modes covered at epoch 15 and two seeds of
# six still collapsed at epoch 60; TOY_GAN_R1 (the same plus R1, γ = 10) covers 7-8 modes from
# epoch 15 on in five seeds of six and all 8 in six of six at epoch 55, at a lower share of samples
# within 3 std of a mode (0.52-0.75 against 0.78-0.88 for the runs that recovered).
TOY_GAN_COLLAPSE = dict(TOY_GAN)
TOY_GAN_COLLAPSE_TRAINING = dict(batch_size=128, optimizer=adam(1e-3, betas=(0.9, 0.999)))
TOY_GAN_R1 = dict(TOY_GAN_COLLAPSE, r1=10.0)
# The 8×8 digits of 17 levels, read as the "unit" variant (levels / 16 in [0, 1]): 8 → 4 → 2.
# Tuned for 60 s of training on 2 cores, FD in the course's digit classifier's features, 299
# samples rounded to the 17 levels, three draws per run (the floor, test against validation, 0.49):
#   Adam(2e-4, β = (0.5, 0.999)), R1 γ = 1, no average:          FD/floor 2.4-3.8 (seed 0)
#   the same, generator average 0.999 / 0.99:                    3.7 / 2.3 (one draw each)
#   Adam(1e-3, β = (0, 0.99)), γ = 1, average 0.99:              1.4-2.0 (seed 0), 2.0 (seed 1)
#   Adam(2e-3, β = (0, 0.99)), γ = 1, average 0.99 (chosen):     0.9-1.7 (seed 0), 1.7-2.4 (seed 1)
#   the same with γ = 3:                                         1.2-2.4 (seed 0), 1.4-2.0 (seed 1)
# No momentum (β1 = 0, as Mescheder et al. 2018 and Karras et al. 2019 train with R1) and the
# weight average damp the game's oscillation; about 200 epochs fit in the 60 s.
DIGITS_DCGAN = dict(latent_dim=32, channels=32, generator_loss="non_saturating", k=1, r1=1.0, average=0.99)
DIGITS_DCGAN_TRAINING = dict(batch_size=64, optimizer=adam(2e-3, betas=(0.0, 0.99)))
# Full size (GPU): MNIST 1 × 28 × 28 (28 → 14 → 7) and CIFAR-10 3 × 32 × 32 (32 → 16 → 8) in [0, 1],
# the digits' recipe (no momentum, R1, a weight average, over ~1,000 steps for these longer runs).
# Not measured at full size (no GPU was lent). On the CPU, 5 minutes of MNIST at 32 channels
# (`bench gan-mnist`, average 0.99): FD 7.5 against a floor of 0.9 with this optimiser,
# 13.6 with Adam(5e-4, β = (0, 0.99)) and average 0.999. CIFAR-10's rate is halved: untested.
MNIST_DCGAN = dict(latent_dim=100, channels=64, generator_loss="non_saturating", k=1, r1=1.0, average=0.999)
MNIST_DCGAN_TRAINING = dict(epochs=20, batch_size=128, optimizer=adam(2e-3, betas=(0.0, 0.99)))
CIFAR_DCGAN = dict(latent_dim=128, channels=128, generator_loss="non_saturating", k=1, r1=1.0, average=0.999)
CIFAR_DCGAN_TRAINING = dict(epochs=50, batch_size=128, optimizer=adam(1e-3, betas=(0.0, 0.99)))
GENERATOR_LOSSES = ("non_saturating", "saturating")


# ============================================================================ losses
def minimax_value(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """V(G, D) = E_π log D(x) + E_p log(1 − D(G(z))), from D's logits on real and fake objects."""
    log_D_real = -F.softplus(-real_logits)        # log σ(l)
    log_one_minus_D_fake = -F.softplus(fake_logits)  # log(1 − σ(l))
    return log_D_real.mean() + log_one_minus_D_fake.mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−V(G, D): the discriminator maximises V (binary cross-entropy, real = 1, fake = 0)."""
    return -minimax_value(real_logits, fake_logits)


def saturating_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """E_z log(1 − D(G(z))): the generator's part of V, minimised. Flat where D(G(z)) ≈ 0."""
    return -F.softplus(fake_logits).mean()


def non_saturating_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−E_z log D(G(z)): the same fixed point, steep where D rejects the fakes."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """R1 = E_{x~π} ‖∇_x l(x)‖², l the discriminator's logit, on real ``x`` (differentiable in D)."""
    x = x.detach().requires_grad_(True)
    logits = discriminator(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # per-object gradients
    return grad.flatten(1).pow(2).sum(1).mean()


# ============================================================================ the model
class GAN(GenerativeModel):
    """A generator x = G(z), z ~ N(0, I_d), trained against a discriminator D = σ(l(x)).

    ``generator`` maps (n, latent_dim) to objects (n, *event_shape) (or flat (n, D));
    ``discriminator`` maps a batch of objects to logits, (n,) or (n, 1).
    ``generator_loss``: "non_saturating" (−E log D(G(z))) or "saturating" (E log(1 − D(G(z)))).
    ``r1``: the weight γ of the R1 penalty (γ/2) E_π ‖∇_x l‖² (0: none).
    ``k``: discriminator steps (batches) per generator step.
    ``average``: a decay β for an exponential moving average of the generator's weights,
    θ̄ ← β θ̄ + (1 − β) θ after every generator step (0: none). Out of training (``eval()``,
    as :func:`dgmlab.train.fit` leaves the model) ``sample``/``generate`` use θ̄: the
    average damps the oscillation of the two-player game (Yazıcı et al. 2019, "The Unusual
    Effectiveness of Averaging in GAN Training"); in training mode, the live generator.

    There is no likelihood: ``log_prob`` and ``loss`` raise, and training goes
    through :meth:`training_losses` (as :func:`dgmlab.train.fit` does).
    """

    has_rsample = True
    has_log_prob = False  # likelihood-free: judge it by its samples

    def __init__(self, generator: nn.Module, discriminator: nn.Module, event_shape, latent_dim: int, *,
                 support: constraints.Constraint = constraints.real, generator_loss: str = "non_saturating",
                 r1: float = 0.0, k: int = 1, average: float = 0.0):
        super().__init__(event_shape, support=support)
        self.generator, self.discriminator = generator, discriminator
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.generator_loss_name = check_choice(generator_loss, "generator_loss", GENERATOR_LOSSES)
        if not (isinstance(r1, (int, float)) and math.isfinite(r1) and r1 >= 0):
            raise ValueError(f"r1 should be a non-negative weight (0: no penalty), got {r1!r}.")
        self.r1 = float(r1)
        self.k = check_positive_int(k, "k")
        if not (isinstance(average, (int, float)) and 0 <= average < 1):
            raise ValueError(f"average should be a decay in [0, 1) (0: no weight average), got {average!r}.")
        self.average = float(average)
        self.generator_average = copy.deepcopy(generator).requires_grad_(False) if average else None

    # -- sampling --------------------------------------------------------------------------
    def rsample(self, n: int, context=None) -> torch.Tensor:
        """x = G(z), z ~ N(0, I): ``n`` objects, differentiable in the generator's weights."""
        self.check_sample_args(n, context)
        z = torch.randn(n, self.latent_dim, device=self.device, dtype=self.dtype)
        return self.generate(z)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """The generator on given codes z (n, latent_dim): for latent interpolation.

        The weight average θ̄ out of training when there is one, the live weights otherwise."""
        z = check_tensor(z, "z", shape=(None, self.latent_dim), kind="float")
        live = self.training or self.generator_average is None
        return (self.generator if live else self.generator_average)(z).reshape(len(z), *self.event_shape)

    @torch.no_grad()
    def update_average(self) -> None:
        """θ̄ ← β θ̄ + (1 − β) θ for the weights; buffers (batch-norm statistics) copied."""
        for avg, live in zip(self.generator_average.parameters(), self.generator.parameters()):
            avg.lerp_(live, 1 - self.average)
        for avg, live in zip(self.generator_average.buffers(), self.generator.buffers()):
            avg.copy_(live)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits l(x), shape (N,); D(x) = σ(l(x)) is P(x is real)."""
        return self.discriminator(x).reshape(len(x))

    # -- no likelihood -----------------------------------------------------------------------
    def log_prob(self, x, context=None):
        raise NotImplementedError(
            f"{type(self).__name__} is likelihood-free: its samples G(z) have no density it can "
            "evaluate, so there is no log_prob(x) (and no held-out NLL). Judge it by its samples "
            "(sample(n) with Chapter 1's sample-quality metrics, or a two-sample classifier).")

    def loss(self, x, context=None):
        raise NotImplementedError(
            f"{type(self).__name__} has no single loss to minimise: it trains two networks "
            "against each other. Use training_losses(x, step=...) (dgmlab.train.fit does), "
            "and fit it without a validation set.")

    # -- training ----------------------------------------------------------------------------
    def training_losses(self, x, context=None, *, step: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """The discriminator's loss every batch; the generator's after every k-th (``step`` counts batches)."""
        x, _ = self.check_input(x, context)
        yield "discriminator", self.discriminator_objective(x)
        if step % self.k == self.k - 1:
            yield "generator", self.generator_objective(len(x))
            if self.generator_average is not None:  # runs once fit has taken the generator's step
                self.update_average()

    def discriminator_objective(self, x: torch.Tensor) -> torch.Tensor:
        """−V(G, D) on a real batch and as many fakes (detached: G is fixed), + (γ/2)·R1."""
        fake = self.rsample(len(x)).detach()
        loss = discriminator_loss(self.discriminate(x), self.discriminate(fake))
        if self.r1:
            loss = loss + self.r1 / 2 * r1_penalty(self.discriminate, x)
        return loss

    def generator_objective(self, n: int) -> torch.Tensor:
        """The generator's loss on n fresh fakes: non-saturating or saturating."""
        fake_logits = self.discriminate(self.rsample(n))
        if self.generator_loss_name == "saturating":
            return saturating_generator_loss(fake_logits)
        return non_saturating_generator_loss(fake_logits)

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Two optimisers: "discriminator" (D's weights) and "generator" (G's weights)."""
        return {"discriminator": [p for p in self.discriminator.parameters() if p.requires_grad],
                "generator": [p for p in self.generator.parameters() if p.requires_grad]}


def generator_gradient_norm(model: GAN, n: int = 256, *, loss: str = "non_saturating",
                            seed: int = 0) -> float:
    """‖∇_θ L_G‖ of the generator's weights under ``loss`` on n fakes, with D as it is (a measurement)."""
    check_choice(loss, "loss", GENERATOR_LOSSES)
    torch.manual_seed(seed)
    params = [p for p in model.generator.parameters() if p.requires_grad]
    z = torch.randn(check_positive_int(n, "n"), model.latent_dim, device=model.device, dtype=model.dtype)
    logits = model.discriminate(model.generator(z).reshape(n, *model.event_shape))  # the live weights
    value = saturating_generator_loss(logits) if loss == "saturating" else non_saturating_generator_loss(logits)
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


# ============================================================================ networks
def mlp_generator(latent_dim: int, out_dim: int, hidden: Sequence[int] = (128, 128)) -> nn.Sequential:
    """z (n, latent_dim) → x (n, out_dim): ReLU MLP with a linear output (2-D data)."""
    sizes = [check_positive_int(latent_dim, "latent_dim"), *hidden, check_positive_int(out_dim, "out_dim")]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def mlp_discriminator(in_dim: int, hidden: Sequence[int] = (128, 128)) -> nn.Sequential:
    """x (n, in_dim) → logit (n, 1): LeakyReLU(0.2) MLP, as in DCGAN's discriminator."""
    sizes = [check_positive_int(in_dim, "in_dim"), *hidden, 1]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.LeakyReLU(0.2)] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def _check_image_shape(shape) -> tuple[int, int, int]:
    shape = tuple(shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] % 4:
        raise ValueError(f"DCGAN nets take square images whose side is a multiple of 4 "
                         f"((C, 8, 8), (1, 28, 28), (3, 32, 32)), got shape {shape}.")
    return shape


class DCGANGenerator(nn.Module):
    """z → image (Radford et al. 2016): a linear map to 2c × s/4 × s/4, two stride-2 transposed
    convolutions with batch norm and ReLU (s/4 → s/2 → s), a sigmoid: pixels in [0, 1]."""

    def __init__(self, latent_dim: int, shape=(1, 8, 8), channels: int = 32):
        super().__init__()
        self.shape = _check_image_shape(shape)
        c, s = check_positive_int(channels, "channels"), self.shape[1] // 4
        self.project = nn.Sequential(nn.Linear(check_positive_int(latent_dim, "latent_dim"), 2 * c * s * s),
                                     nn.BatchNorm1d(2 * c * s * s), nn.ReLU(), nn.Unflatten(1, (2 * c, s, s)))
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                nn.ConvTranspose2d(c, self.shape[0], 4, stride=2, padding=1), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.project(z))


class DCGANDiscriminator(nn.Module):
    """image → logit: two stride-2 convolutions with LeakyReLU(0.2) (s → s/2 → s/4), a linear map.
    No batch norm: it would couple the objects of a batch, and the R1 penalty is per object."""

    def __init__(self, shape=(1, 8, 8), channels: int = 32):
        super().__init__()
        self.shape = _check_image_shape(shape)
        c, s = check_positive_int(channels, "channels"), self.shape[1] // 4
        self.net = nn.Sequential(
            nn.Conv2d(self.shape[0], c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * c * s * s, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(len(x), *self.shape)).squeeze(1)


def toy_gan(dim: int = 2, *, latent_dim: int = 2, hidden: Sequence[int] = (128, 128), **kwargs) -> GAN:
    """A GAN of MLPs for points in R^dim (the 2-D toys): ``toy_gan(**TOY_GAN)``."""
    return GAN(mlp_generator(latent_dim, dim, hidden), mlp_discriminator(dim, hidden), (dim,), latent_dim,
               **kwargs)


def dcgan(shape=(1, 8, 8), *, latent_dim: int = 32, channels: int = 32, **kwargs) -> GAN:
    """A DCGAN for images in [0, 1] of ``shape``: ``dcgan(**DIGITS_DCGAN)`` on
    ``embedded.digits(variant="unit").x``; ``dcgan((1, 28, 28), **MNIST_DCGAN)``."""
    return GAN(DCGANGenerator(latent_dim, shape, channels), DCGANDiscriminator(shape, channels), tuple(shape),
               latent_dim, support=constraints.unit_interval, **kwargs)


# ============================================================================ theory, 1-D
def optimal_discriminator(log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """D*(x) = π(x) / (π(x) + p(x)) = σ(log π(x) − log p(x)), from log-densities (−inf where 0).

    Where both densities are 0, D* is arbitrary (nothing weighs it): 1/2 is returned."""
    return torch.sigmoid(optimal_logit(log_pi, log_p))


def optimal_logit(log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """l*(x) = log π(x) − log p(x), the logit of D* (±inf where one density is 0, 0 where both are)."""
    log_pi = check_tensor(log_pi, "log_pi", kind="float").double()
    log_p = check_tensor(log_p, "log_p", shape=tuple(log_pi.shape), kind="float").double()
    return torch.nan_to_num(log_pi - log_p, nan=0.0, posinf=math.inf, neginf=-math.inf)


def minimax_value_grid(logits: torch.Tensor, log_pi: torch.Tensor, log_p: torch.Tensor,
                       cell: float) -> torch.Tensor:
    """V(G, D) = ∫ π log D + p log(1 − D) dx for D = σ(l), given its logits l on a grid (Riemann sum).

    In logits, log D = −softplus(−l) and log(1 − D) = −softplus(l): exact even where D
    rounds to 0 or 1 (float64; a density of 0 contributes 0, also against an infinite logit).
    """
    logits = check_tensor(logits, "logits", kind="float").double()
    pi, p = log_pi.double().exp(), log_p.double().exp()
    if logits.shape != pi.shape or pi.shape != p.shape:
        raise ValueError(f"logits, log_pi and log_p should hold values at the same grid points; got shapes "
                         f"{tuple(logits.shape)}, {tuple(pi.shape)}, {tuple(p.shape)}.")
    pi_log_D = torch.where(pi > 0, pi * -F.softplus(-logits), 0.0)
    p_log_one_minus_D = torch.where(p > 0, p * -F.softplus(logits), 0.0)
    return (pi_log_D + p_log_one_minus_D).sum() * cell


def jsd_from_value(value_at_optimum: torch.Tensor | float) -> torch.Tensor | float:
    """JSD(π ‖ p) = (V(G, D*) + 2 log 2) / 2: the optimal discriminator's value measures the JSD."""
    return (value_at_optimum + 2 * LOG2) / 2


def optimise_discriminator_1d(log_pi: Callable[[torch.Tensor], torch.Tensor],
                              log_p: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float, *,
                              points: int = 801, hidden: int = 64, steps: int = 1500, lr: float = 1e-2,
                              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise V(G, D) over an MLP discriminator D = σ(l(x)) on 1-D densities, numerically.

    ``log_pi`` / ``log_p``: functions of x (float64 tensors) giving log-densities.
    V is integrated on a grid of ``points`` over [lo, hi] (no sampling noise) and
    maximised by Adam. Returns the grid x and D(x) there (float64), to compare
    with :func:`optimal_discriminator`.
    """
    x, cell = grid_1d(lo, hi, check_positive_int(points, "points"))
    lpi, lp = log_pi(x), log_p(x)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                        nn.Linear(hidden, 1)).double()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    u = ((2 * x - lo - hi) / (hi - lo))[:, None]  # inputs scaled to [−1, 1]
    for _ in range(check_positive_int(steps, "steps")):
        V = minimax_value_grid(net(u).squeeze(1), lpi, lp, cell)
        opt.zero_grad()
        (-V).backward()
        opt.step()
    with torch.no_grad():
        return x, torch.sigmoid(net(u).squeeze(1))


# ============================================================================ diagnostics, 2-D
class ModeCoverage(NamedTuple):
    """Samples near each mode of a mixture: ``counts`` per mode, the number of modes ``covered``
    (holding at least ``min_share`` of their fair share), and the share of ``high_quality``
    samples (within ``within`` standard deviations of some mode)."""
    counts: list[int]
    covered: int
    high_quality: float


def mode_coverage(samples: torch.Tensor, means: torch.Tensor, std: float, *, within: float = 3.0,
                  min_share: float = 0.25) -> ModeCoverage:
    """Mode coverage of 2-D (or d-D) samples against a mixture of Gaussians with these ``means``.

    A sample counts for its nearest mode if it lies within ``within``·std of it
    (Srivastava et al. 2017, Metz et al. 2017 use 3 std); a mode is covered when it
    holds at least ``min_share`` of the n/K samples it would hold under the data.
    A collapsed generator covers few modes, however good each of its samples is.
    """
    means = check_tensor(means, "means", shape=(None, None), kind="float").float()
    x = check_tensor(samples, "samples", shape=(None, means.shape[1]), kind="float").float()
    if not (std > 0 and within > 0 and 0 < min_share <= 1):
        raise ValueError(f"std and within should be positive and min_share in (0, 1]; got std={std}, "
                         f"within={within}, min_share={min_share}.")
    distance, nearest = torch.cdist(x, means).min(dim=1)
    close = distance <= within * std
    counts = torch.bincount(nearest[close], minlength=len(means))
    covered = int((counts >= min_share * len(x) / len(means)).sum())
    return ModeCoverage(counts.tolist(), covered, float(close.float().mean()))


class Snapshots:
    """A :func:`dgmlab.train.fit` callback keeping G(z) for fixed codes z after every ``every``-th epoch.

    ``frames`` holds (epoch, samples) pairs, samples on the CPU: training seen as a film
    (the chapter's interactive figure of mode collapse). The codes are drawn once, seeded.
    """

    def __init__(self, n: int = 500, latent_dim: int = 2, *, every: int = 1, seed: int = 0):
        self.every = check_positive_int(every, "every")
        g = torch.Generator().manual_seed(seed)
        self.z = torch.randn(check_positive_int(n, "n"), check_positive_int(latent_dim, "latent_dim"), generator=g)
        self.frames: list[tuple[int, torch.Tensor]] = []

    def __call__(self, epoch: int, history, model: GAN) -> None:
        if epoch % self.every == 0:
            with torch.no_grad():
                self.frames.append((epoch, model.generate(self.z.to(model.device, model.dtype)).cpu()))
