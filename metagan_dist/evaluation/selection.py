"""Checkpoint selection: score a run's meta-parameters at each checkpoint as evaluate.py scores an init.

Meta-training a GAN is chaotic: within one run, the init's recognizability after 10 steps moved by
up to 0.3 between checkpoints 100 meta-steps apart, and its score on meta-train tasks ranks the
checkpoints as the held-out tasks do (benchmarks/RESULTS.md, "Round 17"). So train.py scores every
checkpoint on fixed meta-train tasks (`run.select_tasks`) and checkpoints/BEST names the best one;
the held-out split is never looked at.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from metagan_dist.data import Pool
from metagan_dist.evaluation.evaluate import META_TRAIN_SPLIT, meta_train_images
from metagan_dist.evaluation.features import load_or_train_feature_spaces
from metagan_dist.evaluation.harness import EvalPlan, Method, check_plan, evaluate
from metagan_dist.evaluation.rules import Rule
from metagan_dist.meta import MetaLearner

SELECTION_SEED = 0  # the same shots, noise and episodes at every checkpoint, and evaluate.py's seed 0
SELECTION_SAMPLES = 64  # M samples per task, as evaluate.py draws by default
SELECTION_KID_SUBSETS = 2  # the harness scores every metric; only recognizability is read here


class CheckpointScorer:
    """Recognizability of meta-parameters on the first `tasks` meta-train tasks of `pool`: adapted with
    the learner's own inner rule for `steps` steps from `shots` shots, N-way as evaluate.py scores it."""

    def __init__(self, pool: Pool, learner: MetaLearner, tasks: int, shots: int, steps: int, device: torch.device):
        keys = pool.keys(META_TRAIN_SPLIT)[:tasks]
        if len(keys) < 2:
            raise ValueError(f"run.select_tasks: pool {pool.path} has {len(keys)} meta-train task(s); scoring "
                             f"checkpoints needs at least 2 (or set run.select_tasks=0)")
        self.plan = EvalPlan(tasks=pool.load_tasks(META_TRAIN_SPLIT, keys), shots=shots, steps=[steps],
                             samples=SELECTION_SAMPLES, seeds=[SELECTION_SEED], kid_subsets=SELECTION_KID_SUBSETS,
                             ways=min(EvalPlan.ways, len(keys)))  # the harness's 20-way, fewer tasks permitting
        try:
            check_plan(self.plan)
        except ValueError as err:
            raise ValueError(f"run.select_tasks: {err} (or set run.select_tasks=0)") from None
        self.learner, self.device, self.steps = learner, device, steps
        self.spaces = load_or_train_feature_spaces(pool.path, *meta_train_images(pool), device=device)

    def __call__(self, theta_g: Tensor, theta_d: Tensor, inner_lrs: tuple[Tensor, Tensor] | None = None) -> float:
        """Mean recognizability over the tasks; NaN if every adaptation diverged (diverged tasks are left out)."""
        method = Method("selection", "meta-learned", self.learner, Rule("meta"), init=lambda seed: (theta_g, theta_d),
                        source="the run's meta-parameters", inner_lrs=inner_lrs)
        scores, _, _ = evaluate([method], self.plan, self.spaces, self.device, grid_step=-1, grid_tasks=0,
                                progress=False)
        values = np.asarray(scores[method.label].values[self.steps]["recognizability"], dtype=float)
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    @property
    def description(self) -> str:
        plan = self.plan
        return (f"{len(plan.tasks)} meta-train tasks, {plan.shots} shots, {self.steps} steps, "
                f"{plan.ways}-way recognizability")
