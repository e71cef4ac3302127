"""The baselines a meta-learned init must beat: a random init (`scratch`) and a GAN pretrained on all meta-train tasks.

Same compute for `pretrain-finetune`, defined as the same number of real-image evaluations:
a meta-step evaluates T tasks x (inner_steps x k support + q query) real images on every rank,
so a run of N meta-steps on R ranks buys the pretraining N x R x T x (inner_steps x k + q) real
images, taken in Adam steps of `batch` images (one G step, then one D step, as in the inner loop)
with the run's outer-optimizer settings (optim.lr, beta1, beta2) from the run's initial weights.
A support-conditioned generator is pretrained as a conditional GAN: each step's batch comes from one
task, and it is also the support G is conditioned on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagan_dist.config import TrainConfig
from metagan_dist.data import images_to_tensor
from metagan_dist.flat import FlatLayout
from metagan_dist.inner import InnerAdam
from metagan_dist.meta import MetaLearner

PRETRAIN_BATCH = 64


def random_init(config: TrainConfig, image_shape: tuple[int, int, int], seed: int) -> tuple[Tensor, Tensor]:
    """Flat θ_G [P_G], θ_D [P_D] of a freshly initialised pair of the config's architecture (seeded, CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator, discriminator = config.model.build(image_shape)
    return tuple(FlatLayout.of(net).flatten(p.detach() for p in net.parameters()) for net in (generator, discriminator))


@dataclass(frozen=True)
class PretrainBudget:
    """Real images a pretraining may evaluate, and the Adam steps of `batch` images that spend them."""

    images: int
    batch: int
    steps: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def matched_budget(config: TrainConfig, meta_steps: int, ranks: int, batch: int = PRETRAIN_BATCH) -> PretrainBudget:
    """The same compute as `meta_steps` meta-steps of `config` on `ranks` ranks (see the module docstring)."""
    per_task = config.meta.inner_steps * config.data.shots + config.data.queries
    images = meta_steps * ranks * config.data.tasks_per_rank * per_task
    return PretrainBudget(images=images, batch=batch, steps=math.ceil(images / batch))


def pretrain(
    learner: MetaLearner,
    theta_g: Tensor,
    theta_d: Tensor,
    images: np.ndarray,
    budget: PretrainBudget,
    lr: float,
    betas: tuple[float, float],
    seed: int,
    progress: bool = True,
    tasks: np.ndarray | None = None,
) -> tuple[Tensor, Tensor]:
    """Train one GAN from (θ_G, θ_D) on uint8 images [N, C, H, W] (the union of the meta-train tasks).

    Each step draws `budget.batch` images at random (with replacement across steps) and fresh noise,
    all from a generator seeded with `seed`: from all images, or, for a support-conditioned G (which
    needs `tasks`, each image's task index [N]), from one task drawn at random. Returns the trained
    flat θ_G [P_G], θ_D [P_D].
    """
    if learner.conditioned and tasks is None:
        raise ValueError("pretraining a support-conditioned generator needs each image's task index (tasks=)")
    device = theta_g.device
    rng = torch.Generator().manual_seed(seed)
    data = images_to_tensor(images)
    members = [torch.from_numpy(np.flatnonzero(tasks == t)) for t in np.unique(tasks)] if learner.conditioned else None
    rule = InnerAdam(lr, betas)
    session = learner.start_adaptation(theta_g, theta_d, tasks=1, rules=(rule, rule), g_average=0.0)  # the last G
    z_dim = learner.G.module.z_dim
    for _ in tqdm(range(budget.steps), desc="pretrain", unit="step", disable=not progress):
        pick = torch.randint(len(data), (budget.batch,), generator=rng)
        if members is not None:
            task = members[int(torch.randint(len(members), (), generator=rng))]
            pick = task[pick % len(task)]
        batch = data[pick][None].to(device)
        noise = torch.randn(1, 1, budget.batch, z_dim, generator=rng).to(device)
        mix = torch.rand(1, 1, budget.batch, generator=rng).to(device)
        session.advance(batch, noise, mix)
    return session.generator[0], session.discriminator[0]
