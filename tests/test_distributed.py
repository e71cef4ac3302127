"""Meta-steps across 2 gloo ranks: same update as one rank with all tasks, NaN skips, drift detection."""

import pytest
import torch

from dist_utils import run_on_ranks
from metagan_dist import EpisodeBatch, MetaConfig, build_pair, meta_gradients
from metagan_dist.config import OptimConfig
from metagan_dist.distributed import DistContext, verify_replicas
from metagan_dist.engine import MetaParameters, TorchEngine, agree_and_step

SPLIT = (1, 3)  # uneven tasks per rank: the global mean must weight each task, not each rank


def setup(algorithm):
    torch.manual_seed(0)
    G, D = build_pair("mlp", 4, (1, 6, 6), width=12)
    cfg = MetaConfig(algorithm=algorithm, inner_steps=2, inner_lr=0.1)
    gen = torch.Generator().manual_seed(5)
    tasks = sum(SPLIT)
    batch = EpisodeBatch.sample(torch.rand(tasks, 3, 1, 6, 6, generator=gen) * 2 - 1,
                                torch.rand(tasks, 3, 1, 6, 6, generator=gen) * 2 - 1, 2, 4, generator=gen)
    theta_g = torch.cat([p.detach().reshape(-1) for p in G.parameters()])
    theta_d = torch.cat([p.detach().reshape(-1) for p in D.parameters()])
    params = MetaParameters(theta_g, theta_d, inner_lr=0.1 if algorithm == "metasgd" else None)
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
    engine = TorchEngine(params, OptimConfig(lr=1e-2), ctx, bucket_mb=0.05)  # small buckets: several all-reduces
    return G, D, cfg, batch, params, engine


def one_meta_step(G, D, cfg, batch, params, engine, poison=False):
    grads = meta_gradients(G, D, batch, cfg, params=(params.generator, params.discriminator),
                           inner_lrs=params.inner_lrs(), reduction="sum")
    if poison:
        grads.flat[3] = float("nan")
    outcome = agree_and_step(engine, grads, stop=False, device=torch.device("cpu"))
    return outcome, params.flat().clone()


def ranked_step(rank, world_size, algorithm):
    G, D, cfg, batch, params, engine = setup(algorithm)
    start = sum(SPLIT[:rank])
    outcome, after = one_meta_step(G, D, cfg, batch.task_slice(start, start + SPLIT[rank]), params, engine)
    return outcome.tasks, outcome.gradient, after


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "metasgd"])
def test_two_ranks_give_the_update_of_one_rank_with_all_tasks(algorithm):
    G, D, cfg, batch, params, engine = setup(algorithm)
    single, single_after = one_meta_step(G, D, cfg, batch, params, engine)
    ranks = run_on_ranks(ranked_step, 2, algorithm)
    # Adam's first step is about lr * sign(g): where |g| is near rounding level (Reptile's θ - mean θ_t
    # cancels; Meta-SGD's rate gradients are tiny), fp32 summation order moves it by up to a whole
    # step, so parameters are compared where |g| > 1e-6, to 1e-4 of a step (lr = 1e-2).
    conditioned = single.gradient.abs() > 1e-6
    assert conditioned.float().mean() > 0.7
    for tasks, gradient, after in ranks:
        assert tasks == sum(SPLIT)
        torch.testing.assert_close(gradient, single.gradient, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(after[conditioned], single_after[conditioned], rtol=0, atol=1e-6)
    assert torch.equal(ranks[0][2], ranks[1][2])  # replicas stay bit-identical


def poisoned_step(rank, world_size):
    G, D, cfg, batch, params, engine = setup("maml")
    before = params.flat().clone()
    outcome, after = one_meta_step(G, D, cfg, batch.task_slice(rank, rank + 1), params, engine, poison=rank == 1)
    healthy, _ = one_meta_step(G, D, cfg, batch.task_slice(rank, rank + 1), params, engine)
    return outcome.applied, torch.equal(before, after), healthy.applied


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank():
    for skipped, untouched, next_applied in run_on_ranks(poisoned_step, 2):
        assert not skipped and untouched and next_applied


def drifted(rank, world_size):
    params = torch.arange(10, dtype=torch.float32)
    verify_replicas(params, step=0)  # identical: passes
    if rank == 1:
        params[[2, 3]] = params[[3, 2]]  # same sum, swapped values
    try:
        verify_replicas(params, step=7)
    except RuntimeError as err:
        return str(err)
    return None


def test_drift_between_ranks_fails_loudly_on_every_rank():
    messages = run_on_ranks(drifted, 2)
    assert all(m is not None and "diverged across ranks at step 7" in m for m in messages)
