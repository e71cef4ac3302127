"""Fused inner-loop kernels. Provisional torch references; the Triton kernels replace them."""

from __future__ import annotations

import torch
from torch import Tensor


def inner_update(theta: Tensor, grads: Tensor, lr: float | Tensor, max_norm: float = 0.0) -> Tensor:
    """out[t] = theta(_t) - lr ⊙ g[t], g clipped per task to max_norm when > 0."""
    if max_norm > 0:
        norms = grads.flatten(1).norm(dim=1, keepdim=True)
        grads = grads * (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return theta - lr * grads


def reptile_delta(theta: Tensor, thetas: Tensor) -> Tensor:
    """theta - mean_t thetas[t]."""
    return theta - thetas.mean(0)
