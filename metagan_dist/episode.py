"""Episode batches: the support/query images of T tasks plus every random number a meta-step uses.

All randomness of a meta-step (generator noise, WGAN-GP interpolation weights) travels in the
batch as explicit tensors, so a meta-gradient is a pure function of (parameters, batch): tests
can compare implementations exactly and two ranks can reproduce each other's work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor


@dataclass
class EpisodeBatch:
    """T episodes: images in [-1, 1] and the noise for every inner step and for the query.

    support:     [T, k, C, H, W]  images the inner loop adapts on
    query:       [T, q, C, H, W]  images the meta-objective is evaluated on
    inner_noise: [S, T, n, z]     generator noise, one tensor per inner step (S = inner steps)
    query_noise: [T, m, z]        generator noise for the meta-objective
    inner_mix:   [S, T, n]        WGAN-GP interpolation weights per inner step (n must equal k)
    query_mix:   [T, m]           WGAN-GP interpolation weights for the query (m must equal q)
    """

    support: Tensor
    query: Tensor
    inner_noise: Tensor
    query_noise: Tensor
    inner_mix: Tensor
    query_mix: Tensor

    @classmethod
    def sample(
        cls,
        support: Tensor,
        query: Tensor,
        inner_steps: int,
        z_dim: int,
        generator: torch.Generator | None = None,
    ) -> EpisodeBatch:
        """Wrap support/query images with fresh noise: k fakes per inner step, q for the query."""
        if support.dim() != 5 or query.dim() != 5:
            raise ValueError(
                f"support and query must be [T, k, C, H, W] and [T, q, C, H, W]; "
                f"got {tuple(support.shape)} and {tuple(query.shape)}"
            )
        tasks, shots = support.shape[:2]
        queries = query.shape[1]
        opts = dict(generator=generator, dtype=support.dtype, device=support.device)
        return cls(
            support=support,
            query=query,
            inner_noise=torch.randn(inner_steps, tasks, shots, z_dim, **opts),
            query_noise=torch.randn(tasks, queries, z_dim, **opts),
            inner_mix=torch.rand(inner_steps, tasks, shots, **opts),
            query_mix=torch.rand(tasks, queries, **opts),
        )

    @property
    def tasks(self) -> int:
        return self.support.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EpisodeBatch:
        """The same batch on another device."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        return EpisodeBatch(**moved)

    def task_slice(self, start: int, stop: int) -> EpisodeBatch:
        """Tasks start..stop of this batch (every tensor cut along its task dimension)."""
        return EpisodeBatch(
            support=self.support[start:stop],
            query=self.query[start:stop],
            inner_noise=self.inner_noise[:, start:stop],
            query_noise=self.query_noise[start:stop],
            inner_mix=self.inner_mix[:, start:stop],
            query_mix=self.query_mix[start:stop],
        )


def draw_episode(
    images: np.ndarray, shots: int, queries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw k support and q query images without replacement from one task's images [N, ...].

    Support and query never share an image. Raises ValueError when the task has fewer than k + q.
    """
    if shots < 1 or queries < 1:
        raise ValueError(f"shots (k={shots}) and queries (q={queries}) must both be at least 1")
    available = len(images)
    if shots + queries > available:
        raise ValueError(
            f"k={shots} support + q={queries} query images is larger than the {available} "
            f"images the task provides"
        )
    picked = rng.choice(available, size=shots + queries, replace=False)
    return images[picked[:shots]], images[picked[shots:]]
