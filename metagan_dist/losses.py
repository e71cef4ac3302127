"""GAN losses on discriminator logits, one value per task (mean over that task's samples).

Logits are [T, n] (or one task's [n], as inside vmap); every function returns [T] (or a scalar). Formulas as in DESIGN.md:
  ns:      L_D = softplus(-D(x)) + softplus(D(G(z)));  L_G = softplus(-D(G(z)))
  hinge:   L_D = relu(1 - D(x)) + relu(1 + D(G(z)));   L_G = -D(G(z))
  wgan-gp: L_D = D(G(z)) - D(x) + λ (||∇D(x̂)|| - 1)²;  L_G = -D(G(z))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("ns", "hinge", "wgan-gp")


def generator_loss(loss: str, fake_logits: Tensor) -> Tensor:
    """L_G per task from the discriminator's logits on generated images [T, n] (or [n])."""
    if loss == "ns":
        return F.softplus(-fake_logits).mean(-1)
    return -fake_logits.mean(-1)


def discriminator_loss(loss: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_D per task without the gradient penalty (added by the caller for wgan-gp)."""
    if loss == "ns":
        return F.softplus(-real_logits).mean(-1) + F.softplus(fake_logits).mean(-1)
    if loss == "hinge":
        return F.relu(1 - real_logits).mean(-1) + F.relu(1 + fake_logits).mean(-1)
    return fake_logits.mean(-1) - real_logits.mean(-1)


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, mix: Tensor) -> Tensor:
    """Mean over samples of (||∇_x D(x̂)|| - 1)² at x̂ = mix·real + (1 - mix)·fake, per task.

    real, fake: [T, n, C, H, W] with mix [T, n], or one task's [n, C, H, W] with mix [n]; critic maps
    x̂ to logits shaped like mix and must not couple samples (no batch statistics), so one gradient of
    the summed logits gives every sample's own input gradient. torch.func.grad keeps the penalty
    differentiable in θ_D and works inside vmap/grad (the per-task inner losses) as well as outside.
    """
    weight = mix.view(*mix.shape, *([1] * (real.dim() - mix.dim())))
    x_hat = weight * real + (1 - weight) * fake
    grad = torch.func.grad(lambda x: critic(x).sum())(x_hat)
    return ((grad.flatten(mix.dim()).norm(dim=-1) - 1) ** 2).mean(-1)
