"""Inner-loop update rules: how one player's T task copies [T, P] take one adaptation step.

A rule is stateless; `start` makes the per-task state it needs (Adam's moments), `step` returns the
new parameters. Meta-training and adaptation use the same rule objects, so a checkpoint adapts at
test time with exactly the rule it was meta-trained with (`MetaLearner.inner_rules`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import inner_adam, inner_update

INNER_RULES = ("sgd", "adam")


@dataclass(frozen=True, eq=False)  # lr may be a tensor: compare rules by identity
class InnerSGD:
    """θ ← θ − α ⊙ g, α a number or Meta-SGD's per-parameter rates [P]; differentiable to any order."""

    lr: float | Tensor
    clip: float = 0.0  # clip each task's gradient to this norm first; 0 = off

    def start(self, theta: Tensor, tasks: int) -> None:
        return None

    def step(self, theta: Tensor, grad: Tensor, state: None) -> Tensor:
        return inner_update(theta, grad, self.lr, self.clip)

    def __str__(self) -> str:
        return f"sgd:{self.lr:g}" if isinstance(self.lr, float) else "sgd (learned per-parameter rates)"


@dataclass
class AdamState:
    """Per-task Adam moments [T, P] and the step count (shared by all tasks)."""

    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: int = 0


@dataclass(frozen=True)
class InnerAdam:
    """Per-task Adam (one fused kernel launch per step for all tasks); a first-order rule.

    The step counts as a constant: when θ requires grad (first-order MAML), the adapted θ depends
    on it through the identity alone, as in FOMAML with SGD.
    """

    lr: float
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8
    clip: float = 0.0

    def start(self, theta: Tensor, tasks: int) -> AdamState:
        shape = (tasks, theta.shape[-1])
        zeros = dict(dtype=theta.dtype, device=theta.device)
        return AdamState(torch.zeros(shape, **zeros), torch.zeros(shape, **zeros))

    def step(self, theta: Tensor, grad: Tensor, state: AdamState) -> Tensor:
        state.step += 1
        new = inner_adam(theta.detach(), grad.detach(), state.exp_avg, state.exp_avg_sq, state.step, self.lr,
                         self.betas, self.eps, self.clip)
        return theta + (new - theta.detach()) if theta.requires_grad else new

    def __str__(self) -> str:
        return f"adam:{self.lr:g} (betas {self.betas[0]:g}, {self.betas[1]:g})"


InnerRule = InnerSGD | InnerAdam
