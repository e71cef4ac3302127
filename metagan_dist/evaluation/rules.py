"""Adaptation rules for few-shot fine-tuning: the meta-learned inner rule, plain SGD, or Adam.

Every rule runs the inner loop's order (DESIGN.md): a G step, then a D step against the adapted G,
on T task copies at once. `meta` and `sgd` are MetaLearner.adapt itself; `adam` keeps per-task
Adam moments (Adam is element-wise, so one optimizer over a [T, P] buffer is T independent ones).
An adaptation advances in chunks of steps, so callers can score the networks after any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagan_dist.meta import MetaLearner
from metagan_dist.sampling import meta_inner_rates

RULE_KINDS = ("meta", "sgd", "adam")
FINE_TUNE_BETAS = (0.5, 0.999)  # Adam betas of the `adam` rule: the usual GAN choice


@dataclass(frozen=True)
class Rule:
    """How to adapt: `meta` (the checkpoint's inner rule), or `sgd`/`adam` with learning rate `lr`."""

    kind: str
    lr: float | None = None

    def __str__(self) -> str:
        return self.kind if self.lr is None else f"{self.kind}:{self.lr:g}"


def parse_rule(spec: str) -> Rule:
    """`meta`, `sgd:LR` or `adam:LR` -> Rule; ValueError naming the spec otherwise."""
    kind, _, lr = spec.partition(":")
    usage = f"adaptation rule {spec!r}: expected meta, sgd:LR or adam:LR (e.g. adam:0.001)"
    if kind not in RULE_KINDS or (kind == "meta") != (lr == ""):
        raise ValueError(usage)
    if kind == "meta":
        return Rule("meta")
    try:
        rate = float(lr)
    except ValueError:
        raise ValueError(usage) from None
    if not rate > 0:
        raise ValueError(f"adaptation rule {spec!r}: the learning rate must be positive")
    return Rule(kind, rate)


class SGDAdaptation:
    """T task copies adapted by MetaLearner.adapt: the meta-learned rates (`meta`) or one fixed rate (`sgd`)."""

    def __init__(
        self, learner: MetaLearner, theta_g: Tensor, theta_d: Tensor, tasks: int, lr_g: float | Tensor, lr_d: float | Tensor
    ):
        self.learner, self.tasks, self.lr_g, self.lr_d = learner, tasks, lr_g, lr_d
        # Shared [P] until the first step: the inner update broadcasts it to T copies itself.
        self._theta_g, self._theta_d = theta_g.detach(), theta_d.detach()

    @property
    def generator(self) -> Tensor:
        """θ_G of every task copy [T, P_G]."""
        return self._theta_g.expand(self.tasks, -1)

    @property
    def discriminator(self) -> Tensor:
        """θ_D of every task copy [T, P_D]."""
        return self._theta_d.expand(self.tasks, -1)

    def advance(self, support: Tensor, noise: Tensor, mix: Tensor) -> None:
        """len(noise) more steps on support [T, k, C, H, W]; noise [S, T, n, z], mix [S, T, n]."""
        theta_g, theta_d = self.learner.adapt(
            self._theta_g, self._theta_d, support, noise, mix, self.lr_g, self.lr_d, create_graph=False
        )
        self._theta_g, self._theta_d = theta_g.detach(), theta_d.detach()


class AdamAdaptation:
    """T task copies adapted with Adam on each player's partial gradient (G step, then D step against the new G)."""

    def __init__(self, learner: MetaLearner, theta_g: Tensor, theta_d: Tensor, lr: float, betas: tuple[float, float]):
        self.learner = learner
        self._theta_g = theta_g.detach().clone().requires_grad_()
        self._theta_d = theta_d.detach().clone().requires_grad_()
        self.optim_g = torch.optim.Adam([self._theta_g], lr=lr, betas=betas)
        self.optim_d = torch.optim.Adam([self._theta_d], lr=lr, betas=betas)

    @property
    def generator(self) -> Tensor:
        """θ_G of every task copy [T, P_G]."""
        return self._theta_g.detach()

    @property
    def discriminator(self) -> Tensor:
        """θ_D of every task copy [T, P_D]."""
        return self._theta_d.detach()

    def advance(self, support: Tensor, noise: Tensor, mix: Tensor) -> None:
        """len(noise) more steps on support [T, k, C, H, W]; noise [S, T, n, z], mix [S, T, n]."""
        with torch.enable_grad():
            for z, m in zip(noise, mix):
                self.optim_g.zero_grad(set_to_none=True)
                self.learner.g_loss(self._theta_g, self.discriminator, z).sum().backward()
                self.optim_g.step()
                fake = self.learner.G(self.generator, z)
                self.optim_d.zero_grad(set_to_none=True)
                self.learner.d_loss(self._theta_d, support, fake, m).sum().backward()
                self.optim_d.step()


Adaptation = SGDAdaptation | AdamAdaptation


def start_adaptation(
    learner: MetaLearner,
    rule: Rule,
    theta_g: Tensor,
    theta_d: Tensor,
    tasks: int,
    inner_lrs: tuple[Tensor, Tensor] | None = None,
    adam_betas: tuple[float, float] = FINE_TUNE_BETAS,
) -> Adaptation:
    """Begin adapting T=`tasks` copies of θ_G, θ_D ([P] shared or [T, P]) with `rule`.

    inner_lrs: Meta-SGD's learned rates, used by the `meta` rule (else meta.inner_lr).
    """
    if rule.kind == "adam":
        return AdamAdaptation(learner, theta_g.expand(tasks, -1), theta_d.expand(tasks, -1), rule.lr, adam_betas)
    lr_g, lr_d = meta_inner_rates(learner, inner_lrs) if rule.kind == "meta" else (rule.lr, rule.lr)
    return SGDAdaptation(learner, theta_g, theta_d, tasks, lr_g, lr_d)
