"""Adaptation rules for few-shot fine-tuning: the checkpoint's own inner rule, plain SGD, or Adam.

Every rule adapts T task copies at once through the meta-learner's own inner loop
(`MetaLearner.start_adaptation`: a G step, then the D steps against the adapted G), so `meta`
replays exactly the rule meta-training used: SGD at meta.inner_lr, Meta-SGD's learned rates, or
the inner Adam. An adaptation advances in chunks of steps, so callers can score it after any step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from metagan_dist.inner import InnerAdam, InnerRule, InnerSGD
from metagan_dist.meta import Adaptation, MetaLearner

RULE_KINDS = ("meta", "sgd", "adam")
FINE_TUNE_BETA1 = 0.5  # β1 of `adam:LR` when not given: the usual GAN choice (β2 is 0.999)
ADAM_BETA2 = 0.999


@dataclass(frozen=True)
class Rule:
    """How to adapt: `meta` (the checkpoint's inner rule), `sgd:LR`, or `adam:LR[:BETA1]`."""

    kind: str
    lr: float | None = None
    beta1: float | None = None  # adam only

    def __str__(self) -> str:
        if self.kind == "meta":
            return "meta"
        return f"{self.kind}:{self.lr:g}" + (f":{self.beta1:g}" if self.beta1 is not None else "")

    def inner_rules(self, learner: MetaLearner, inner_lrs: tuple[Tensor, Tensor] | None = None) -> tuple[InnerRule, InnerRule]:
        """The (G, D) inner rules this adaptation rule means for `learner` (Meta-SGD's rates for `meta`)."""
        if self.kind == "meta":
            return learner.inner_rules(None if inner_lrs is None else tuple(r.detach() for r in inner_lrs))
        if self.kind == "sgd":
            return InnerSGD(self.lr), InnerSGD(self.lr)
        beta1 = FINE_TUNE_BETA1 if self.beta1 is None else self.beta1
        rule = InnerAdam(self.lr, (beta1, ADAM_BETA2))
        return rule, rule


def parse_rule(spec: str) -> Rule:
    """`meta`, `sgd:LR` or `adam:LR[:BETA1]` -> Rule; ValueError naming the spec otherwise."""
    kind, *values = spec.split(":")
    usage = f"adaptation rule {spec!r}: expected meta, sgd:LR or adam:LR[:BETA1] (e.g. adam:0.001 or adam:0.01:0)"
    allowed = {"meta": (0, 0), "sgd": (1, 1), "adam": (1, 2)}
    if kind not in allowed or not allowed[kind][0] <= len(values) <= allowed[kind][1]:
        raise ValueError(usage)
    if kind == "meta":
        return Rule("meta")
    try:
        numbers = [float(value) for value in values]
    except ValueError:
        raise ValueError(usage) from None
    if not numbers[0] > 0:
        raise ValueError(f"adaptation rule {spec!r}: the learning rate must be positive")
    if len(numbers) == 2 and not 0 <= numbers[1] < 1:
        raise ValueError(f"adaptation rule {spec!r}: Adam's beta1 must lie in [0, 1)")
    return Rule(kind, numbers[0], numbers[1] if len(numbers) == 2 else None)


def start_adaptation(
    learner: MetaLearner,
    rule: Rule,
    theta_g: Tensor,
    theta_d: Tensor,
    tasks: int,
    inner_lrs: tuple[Tensor, Tensor] | None = None,
) -> Adaptation:
    """Begin adapting T=`tasks` copies of θ_G, θ_D ([P] shared or [T, P]) with `rule`.

    inner_lrs: Meta-SGD's learned rates, used by the `meta` rule.
    """
    return learner.start_adaptation(theta_g.detach(), theta_d.detach(), tasks, rule.inner_rules(learner, inner_lrs))
