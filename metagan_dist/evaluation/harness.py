"""The evaluation loop: every method adapts to the same shots with the same noise; samples are scored per task.

For each seed, each task's images are split at random into k shots and the held-out rest (the real
reference); the adaptation noise and the sample noise are drawn once per seed and shared by all
methods. After each of the curve's step counts, M samples per task are compared with that task's
held-out images in the feature space of the task classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagan_dist.data import images_to_tensor
from metagan_dist.evaluation.features import FeatureNet
from metagan_dist.evaluation.metrics import diversity, fid, kid, precision_recall
from metagan_dist.evaluation.rules import Rule, start_adaptation
from metagan_dist.meta import MetaLearner

METRICS = ("kid", "fid", "precision", "recall", "diversity")
PR_NEIGHBOURS = 3  # k of the k-NN manifolds of precision/recall


@dataclass
class Method:
    """One row of the comparison: an initialisation (per seed) and the rule that adapts it."""

    name: str  # maml | fomaml | reptile | metasgd | scratch | pretrain-finetune (or a user's name)
    kind: str  # meta-learned | baseline
    learner: MetaLearner  # architecture, GAN loss and (for the meta rule) inner rate
    rule: Rule
    init: Callable[[int], tuple[Tensor, Tensor]]  # seed -> flat θ_G [P_G], θ_D [P_D]
    source: str  # where the init comes from, for the report
    inner_lrs: tuple[Tensor, Tensor] | None = None  # Meta-SGD's rates (meta rule)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.rule})"


@dataclass
class EvalPlan:
    """What every method is measured on."""

    tasks: dict[str, np.ndarray]  # key -> uint8 [N, C, H, W]
    shots: int
    steps: list[int]  # sorted step counts at which samples are scored; the last is how far methods adapt
    samples: int  # M per task
    seeds: list[int]
    kid_subsets: int


@dataclass
class MethodScores:
    """Per-step scores of one method: values[step][metric] is a [seeds, tasks] list of lists."""

    values: dict[int, dict[str, list[list[float]]]] = field(default_factory=dict)
    grid: Tensor | None = None  # samples [grid_tasks, M, C, H, W] of the first seed at `grid_step`


def check_plan(plan: EvalPlan) -> None:
    """Every task must give k shots and enough held-out images for every metric."""
    need = plan.shots + PR_NEIGHBOURS + 1
    short = {key: len(images) for key, images in plan.tasks.items() if len(images) < need}
    if short:
        key, count = next(iter(short.items()))
        raise ValueError(
            f"task {key!r} has {count} images; evaluating with k={plan.shots} shots needs at least {need} "
            f"(k shots + {PR_NEIGHBOURS + 1} held out for precision/recall); {len(short)} task(s) are short"
        )
    if plan.samples < PR_NEIGHBOURS + 1:
        raise ValueError(f"--samples must be at least {PR_NEIGHBOURS + 1} for precision/recall, got {plan.samples}")


def evaluate(
    methods: list[Method],
    plan: EvalPlan,
    feature_net: FeatureNet,
    device: torch.device,
    grid_step: int,
    grid_tasks: int,
    progress: bool = True,
) -> tuple[dict[str, MethodScores], Tensor]:
    """Scores of every method (by label) on every task, seed and step count of the plan.

    Also returns the first seed's shots of the first `grid_tasks` tasks [grid_tasks, k, C, H, W],
    the shots beside which each method's `grid` samples were drawn.
    """
    check_plan(plan)
    keys = list(plan.tasks)
    task_features = [feature_net.features(images_to_tensor(plan.tasks[key]).to(device)) for key in keys]
    scores = {method.label: MethodScores() for method in methods}
    z_dim = methods[0].learner.G.module.z_dim
    bar = tqdm(total=len(plan.seeds) * len(methods), desc="evaluate", unit="method", disable=not progress)
    for seed_index, seed in enumerate(plan.seeds):
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(len(plan.tasks[key])) for key in keys]
        support = images_to_tensor(np.stack([plan.tasks[key][o[: plan.shots]] for key, o in zip(keys, orders)]))
        support = support.to(device)
        if seed_index == 0:
            grid_shots = support[:grid_tasks].cpu()
        real = [features[o[plan.shots :]] for features, o in zip(task_features, orders)]
        noise = torch.Generator().manual_seed(seed)
        inner_noise = torch.randn(plan.steps[-1], len(keys), plan.shots, z_dim, generator=noise).to(device)
        inner_mix = torch.rand(plan.steps[-1], len(keys), plan.shots, generator=noise).to(device)
        sample_noise = torch.randn(len(keys), plan.samples, z_dim, generator=noise).to(device)
        for method in methods:
            theta_g, theta_d = (theta.to(device) for theta in method.init(seed))
            adaptation = start_adaptation(method.learner, method.rule, theta_g, theta_d, len(keys), method.inner_lrs)
            done, result = 0, scores[method.label]
            for step in plan.steps:
                adaptation.advance(support, inner_noise[done:step], inner_mix[done:step])
                done = step
                with torch.no_grad():
                    samples = method.learner.G(adaptation.generator, sample_noise)
                fake = feature_net.features(samples.flatten(0, 1)).view(len(keys), plan.samples, -1)
                per_metric = result.values.setdefault(step, {name: [] for name in METRICS})
                task_scores = [score(r, f, plan.kid_subsets, seed) for r, f in zip(real, fake)]
                for name in METRICS:
                    per_metric[name].append([s[name] for s in task_scores])
                if seed_index == 0 and step == grid_step:
                    result.grid = samples[:grid_tasks].cpu()
            bar.update()
    bar.close()
    return scores, grid_shots


def score(real: Tensor, fake: Tensor, kid_subsets: int, seed: int) -> dict[str, float]:
    """Every metric of fake features [M, d] against real features [N, d] of one task.

    Samples of a diverged adaptation (NaN/inf parameters) have non-finite features: every metric is NaN then.
    """
    if not torch.isfinite(fake).all():
        return {name: math.nan for name in METRICS}
    precision, recall = precision_recall(real, fake, k=PR_NEIGHBOURS)
    return {
        "kid": kid(real, fake, subsets=kid_subsets, seed=seed)[0],
        "fid": fid(real, fake),
        "precision": precision,
        "recall": recall,
        "diversity": diversity(fake),
    }
