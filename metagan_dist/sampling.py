"""Adapt a meta-learned GAN to a few shots and draw samples: the sample grids and the adapt tool."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from metagan_dist.meta import MetaLearner


def meta_inner_rates(
    learner: MetaLearner, inner_lrs: tuple[Tensor, Tensor] | None = None
) -> tuple[float | Tensor, float | Tensor]:
    """The meta-learned inner rates (lr_G, lr_D): Meta-SGD's per-parameter rates when given, else meta.inner_lr."""
    if inner_lrs is None:
        return learner.config.inner_lr, learner.config.inner_lr
    return inner_lrs[0].detach(), inner_lrs[1].detach()


def adapt_and_generate(
    learner: MetaLearner,
    theta_g: Tensor,
    theta_d: Tensor,
    shots: Tensor,
    inner_noise: Tensor,
    inner_mix: Tensor,
    sample_noise: Tensor,
    inner_lrs: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Adapt to each task's shots [T, k, C, H, W] with len(inner_noise) inner steps, then generate.

    Uses the meta-learned inner rule (Meta-SGD's rates when given). sample_noise [T, m, z];
    returns images [T, m, C, H, W] in [-1, 1].
    """
    lr_g, lr_d = meta_inner_rates(learner, inner_lrs)
    adapted_g, _ = learner.adapt(
        theta_g.detach(), theta_d.detach(), shots, inner_noise, inner_mix, lr_g, lr_d, create_graph=False
    )
    with torch.no_grad():
        return learner.G(adapted_g.expand(shots.shape[0], -1), sample_noise)


def save_grid(shots: Tensor, samples: Tensor, path: Path) -> None:
    """One row per task: its k shots, then its generated samples (PNG, pixel values mapped from [-1, 1])."""
    from torchvision.utils import save_image

    rows = torch.cat([shots, samples], dim=1).detach().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.flatten(0, 1), path, nrow=rows.shape[1], normalize=True, value_range=(-1, 1), padding=1)
