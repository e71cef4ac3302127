"""GAN losses on discriminator logits, one value per task (mean over that task's samples).

Logits are [T, n]; every function returns [T]. Formulas as in DESIGN.md:
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
    """L_G per task from the discriminator's logits on generated images [T, n]."""
    if loss == "ns":
        return F.softplus(-fake_logits).mean(1)
    return -fake_logits.mean(1)


def discriminator_loss(loss: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_D per task without the gradient penalty (added by the caller for wgan-gp)."""
    if loss == "ns":
        return F.softplus(-real_logits).mean(1) + F.softplus(fake_logits).mean(1)
    if loss == "hinge":
        return F.relu(1 - real_logits).mean(1) + F.relu(1 + fake_logits).mean(1)
    return fake_logits.mean(1) - real_logits.mean(1)


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, mix: Tensor) -> Tensor:
    """Mean over samples of (||∇_x D(x̂)|| - 1)² at x̂ = mix·real + (1 - mix)·fake, per task.

    real, fake: [T, n, C, H, W]; mix: [T, n]; critic maps [T, n, C, H, W] to logits [T, n] and must
    not couple samples (no batch statistics), so one backward of the summed logits gives every
    sample's own input gradient. Built with create_graph so the penalty is differentiable in θ_D.
    """
    weight = mix.view(*mix.shape, *([1] * (real.dim() - 2)))
    x_hat = weight * real + (1 - weight) * fake
    if not x_hat.requires_grad:
        x_hat.requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(2).norm(dim=2) - 1) ** 2).mean(1)
