"""Adapt a meta-learned GAN to a few shots and draw samples: the sample grids and the adapt tool."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from metagan_dist.meta import MetaLearner


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
    rates = None if inner_lrs is None else tuple(rate.detach() for rate in inner_lrs)
    adapted_g, _ = learner.adapt(theta_g.detach(), theta_d.detach(), shots, inner_noise, inner_mix,
                                 learner.inner_rules(rates))
    with torch.no_grad():
        return learner.sample(adapted_g, sample_noise, shots)


def save_grid(shots: Tensor, samples: Tensor, path: Path) -> None:
    """One row per task: its k shots, then its generated samples (PNG, pixel values mapped from [-1, 1])."""
    from torchvision.utils import save_image

    rows = torch.cat([shots, samples], dim=1).detach().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.flatten(0, 1), path, nrow=rows.shape[1], normalize=True, value_range=(-1, 1), padding=1)
