"""The evaluation loop: every method adapts to the same shots with the same noise; samples are scored per task.

For each seed, each task's images are split at random into k shots, an exam set and a reference
set (the rest). Samples are scored against the reference set: recognizability in the recognition
feature space (a task's prototype is the mean feature of its reference set), the other metrics in
the distribution feature space (features.py). So are three reference rows, exactly like samples:
`real` (the exam images: the ceiling), `shots` (the k shots: the copy baseline) and `other-task`
(the next task's exam images: the level of a wrong task). The adaptation noise and the sample
noise are drawn once per seed, each from its own stream, and shared by all methods.
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
from metagan_dist.evaluation.features import FeatureSpaces
from metagan_dist.evaluation.metrics import diversity, fid, kid, precision_recall, recognizability
from metagan_dist.evaluation.rules import Rule, start_adaptation
from metagan_dist.meta import MetaLearner

METRICS = ("recognizability", "precision", "recall", "kid", "fid", "diversity")
REFERENCES = ("real", "shots", "other-task")
PR_NEIGHBOURS = 3  # k of the k-NN manifolds of precision/recall
MIN_SET = PR_NEIGHBOURS + 1  # the fewest images in the exam and reference sets


@dataclass
class Method:
    """One row of the comparison: an initialisation (per seed) and the rule that adapts it."""

    name: str  # maml | fomaml | reptile | metasgd | scratch | pretrain-finetune (or a user's name)
    kind: str  # meta-learned | baseline
    learner: MetaLearner  # architecture, GAN loss, inner rule and D steps
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
    ways: int = 20  # N of recognizability's N-way episodes (at most the number of tasks)
    episodes: int = 20  # N-way episodes per task

    def exam_size(self, images: int) -> int:
        """Images of a task set aside as the `real` row's exam; the rest after the shots is the reference."""
        return (images - self.shots) // 2


@dataclass
class Scores:
    """Per-step scores of one row: values[step][metric] is a [seeds, tasks] list of lists."""

    values: dict[int, dict[str, list[list[float]]]] = field(default_factory=dict)
    grid: Tensor | None = None  # samples [grid_tasks, M, C, H, W] of the first seed at `grid_step`

    def add(self, step: int, per_task: list[dict[str, float]]) -> None:
        row = self.values.setdefault(step, {name: [] for name in METRICS})
        for name in METRICS:
            row[name].append([scores[name] for scores in per_task])


def check_plan(plan: EvalPlan) -> None:
    """Every task must give k shots and exam and reference sets big enough for every metric."""
    need = plan.shots + 2 * MIN_SET
    short = {key: len(images) for key, images in plan.tasks.items() if len(images) < need}
    if short:
        key, count = next(iter(short.items()))
        raise ValueError(
            f"task {key!r} has {count} images; evaluating with k={plan.shots} shots needs at least {need} "
            f"(k shots + {MIN_SET} exam + {MIN_SET} reference images for precision/recall); {len(short)} task(s) are short"
        )
    if plan.samples < MIN_SET:
        raise ValueError(f"--samples must be at least {MIN_SET} for precision/recall, got {plan.samples}")
    if not 2 <= plan.ways <= len(plan.tasks):
        raise ValueError(f"recognizability's N-way episodes need 2 <= ways <= {len(plan.tasks)} tasks, got {plan.ways}")


def evaluate(
    methods: list[Method],
    plan: EvalPlan,
    spaces: FeatureSpaces,
    device: torch.device,
    grid_step: int,
    grid_tasks: int,
    progress: bool = True,
) -> tuple[dict[str, Scores], dict[str, Scores], Tensor]:
    """Scores of every method (by label) and of every reference row, on every task, seed and step count.

    Reference rows are scored once per seed, at step 0. Also returns the first seed's shots of the
    first `grid_tasks` tasks [grid_tasks, k, C, H, W], beside which each method's `grid` was drawn.
    """
    check_plan(plan)
    keys = list(plan.tasks)
    task_features = [spaces.features(images_to_tensor(plan.tasks[key]).to(device)) for key in keys]
    scores = {method.label: Scores() for method in methods}
    references = {name: Scores() for name in REFERENCES}
    z_dim = methods[0].learner.G.module.z_dim
    bar = tqdm(total=len(plan.seeds) * len(methods), desc="evaluate", unit="method", disable=not progress)
    for seed_index, seed in enumerate(plan.seeds):
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(len(plan.tasks[key])) for key in keys]
        support = images_to_tensor(np.stack([plan.tasks[key][o[: plan.shots]] for key, o in zip(keys, orders)]))
        support = support.to(device)
        if seed_index == 0:
            grid_shots = support[:grid_tasks].cpu()
        shots, exams, refs = [], [], []
        for features, order in zip(task_features, orders):
            exam_end = plan.shots + plan.exam_size(len(order))
            for part, rows in ((shots, order[: plan.shots]), (exams, order[plan.shots : exam_end]),
                               (refs, order[exam_end:])):
                part.append(tuple(space[rows] for space in features))
        judge = Judge(refs, plan, seed)
        references["real"].add(0, judge(exams))
        references["shots"].add(0, judge(shots))
        references["other-task"].add(0, judge(exams[1:] + exams[:1]))
        states = np.random.SeedSequence(seed).generate_state(3)
        draws, mixes, sample_draws = (torch.Generator().manual_seed(int(state)) for state in states)
        last_step = plan.steps[-1]
        inner_noise = _per_step(last_step, lambda: torch.randn(len(keys), plan.shots, z_dim, generator=draws)).to(device)
        inner_mix = _per_step(last_step, lambda: torch.rand(len(keys), plan.shots, generator=mixes)).to(device)
        sample_noise = torch.randn(len(keys), plan.samples, z_dim, generator=sample_draws).to(device)
        for method in methods:
            theta_g, theta_d = (theta.to(device) for theta in method.init(seed))
            adaptation = start_adaptation(method.learner, method.rule, theta_g, theta_d, len(keys), method.inner_lrs)
            done, result = 0, scores[method.label]
            for step in plan.steps:
                adaptation.advance(support, inner_noise[done:step], inner_mix[done:step])
                done = step
                with torch.no_grad():
                    samples = method.learner.sample(adaptation.generator, sample_noise, support)
                fake = [f.view(len(keys), plan.samples, -1) for f in spaces.features(samples.flatten(0, 1))]
                result.add(step, judge(list(zip(*fake))))
                if seed_index == 0 and step == grid_step:
                    result.grid = samples[:grid_tasks].cpu()
            bar.update()
    bar.close()
    return scores, references, grid_shots


def _per_step(steps: int, draw: Callable[[], Tensor]) -> Tensor:
    """`steps` draws stacked [steps, ...], one per inner step, so a step's noise does not depend on how
    many steps follow it (the curve's last step count) and every method sees the same noise at step s."""
    return torch.stack([draw() for _ in range(steps)]) if steps else draw()[None][:0]


FeaturePair = tuple[Tensor, Tensor]  # one image set's (recognition [M, d], distribution [M, d]) features


class Judge:
    """Scores one image set per task against the tasks' reference sets: every metric, per task."""

    def __init__(self, references: list[FeaturePair], plan: EvalPlan, seed: int):
        self.references, self.plan, self.seed = [ref for _, ref in references], plan, seed
        self.prototypes = torch.stack([recognition.mean(0) for recognition, _ in references])

    def __call__(self, sets: list[FeaturePair]) -> list[dict[str, float]]:
        """Metrics of sets[i] as samples of task i. A set with NaN/inf features (a diverged
        adaptation) scores NaN everywhere; a set too small for a metric (k < 4 shots) scores None there."""
        finite = [bool(torch.isfinite(r).all() and torch.isfinite(d).all()) for r, d in sets]
        safe = [r if ok else torch.zeros_like(r) for (r, _), ok in zip(sets, finite)]
        recognised = recognizability(safe, self.prototypes, self.plan.ways, self.plan.episodes, self.seed)
        scores = []
        for ref, (_, fake), ok, hit in zip(self.references, sets, finite, recognised):
            if not ok:
                scores.append({name: math.nan for name in METRICS})
                continue
            big = len(fake) >= MIN_SET
            precision, recall = precision_recall(ref, fake, k=PR_NEIGHBOURS, matched=True) if big else (None, None)
            scores.append({
                "recognizability": hit,
                "precision": precision,
                "recall": recall,
                "kid": kid(ref, fake, subsets=self.plan.kid_subsets, seed=self.seed)[0] if len(fake) >= 2 else None,
                "fid": fid(ref, fake) if len(fake) >= 2 else None,
                "diversity": diversity(fake) if len(fake) >= 2 else None,
            })
        return scores
