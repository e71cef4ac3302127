"""Across gloo ranks: the same update as one rank with all tasks, NaN skips, set-up agreement, replica checks."""

import pytest
import torch

from dist_utils import run_on_ranks
from metagan_dist import EpisodeBatch, MetaConfig, build_pair, meta_gradients
from metagan_dist.config import OptimConfig
from metagan_dist.distributed import AgreedError, DistContext, agree, verify_replicas
from metagan_dist.engine import MetaParameters, TorchEngine, agree_and_step
from metagan_dist.flat import FlatLayout

SPLIT = (1, 3)  # uneven tasks per rank: the global mean must weight each task, not each rank


def setup(algorithm):
    torch.manual_seed(0)
    G, D = build_pair("mlp", 4, (1, 6, 6), width=12)
    cfg = MetaConfig(algorithm=algorithm, inner_steps=2, inner_lr=0.1)
    gen = torch.Generator().manual_seed(5)
    tasks = sum(SPLIT)
    batch = EpisodeBatch.sample(torch.rand(tasks, 3, 1, 6, 6, generator=gen) * 2 - 1,
                                torch.rand(tasks, 3, 1, 6, 6, generator=gen) * 2 - 1, 2, 4, generator=gen)
    theta_g, theta_d = (FlatLayout.of(net).flatten(p.detach() for p in net.parameters()) for net in (G, D))
    params = MetaParameters(theta_g, theta_d, inner_lr=0.1 if algorithm == "metasgd" else None)
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
    # Plain SGD, so that the parameter change is -lr times the averaged meta-gradient, exactly enough to compare.
    engine = TorchEngine(params, OptimConfig(name="sgd", lr=1e-2), ctx, bucket_mb=0.05)  # small buckets: several
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
    before = params.flat().clone()
    outcome, after = one_meta_step(G, D, cfg, batch.task_slice(start, start + SPLIT[rank]), params, engine)
    return outcome.tasks, outcome.grad_norm, (before - after) / 1e-2, after


@pytest.mark.parametrize("algorithm", ["maml", "reptile", "metasgd"])
def test_two_ranks_give_the_update_of_one_rank_with_all_tasks(algorithm):
    G, D, cfg, batch, params, engine = setup(algorithm)
    before = params.flat().clone()
    single, single_after = one_meta_step(G, D, cfg, batch, params, engine)
    gradient = (before - single_after) / 1e-2  # SGD: the applied mean meta-gradient
    assert single.grad_norm == pytest.approx(float(gradient.double().norm()), rel=1e-3)
    for tasks, norm, rank_gradient, after in run_on_ranks(ranked_step, 2, algorithm):
        assert tasks == sum(SPLIT)
        assert norm == pytest.approx(single.grad_norm, rel=1e-5)
        torch.testing.assert_close(rank_gradient, gradient, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(after, single_after, rtol=0, atol=1e-7)


def poisoned_step(rank, world_size):
    G, D, cfg, batch, params, engine = setup("maml")
    before = params.flat().clone()
    outcome, after = one_meta_step(G, D, cfg, batch.task_slice(rank, rank + 1), params, engine, poison=rank == 1)
    healthy, _ = one_meta_step(G, D, cfg, batch.task_slice(rank, rank + 1), params, engine)
    return outcome.applied, torch.equal(before, after), healthy.applied


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank():
    for skipped, untouched, next_applied in run_on_ranks(poisoned_step, 2):
        assert not skipped and untouched and next_applied


def swap_97_apart(params):
    params[[3, 100]] = params[[100, 3]]  # the old position weights repeated every 97 elements


def one_bit(params):
    params.view(torch.int32)[250] ^= 1


def nan_in_one_place(params):
    params[42] = float("nan")


CHANGES = {"swap_97_apart": swap_97_apart, "one_bit": one_bit, "nan": nan_in_one_place}
ERRORS = {"permission": (PermissionError("shard x.tar: permission denied"), 2), "value": (ValueError("bad pool"), 2),
          "bug": (RuntimeError("a bug"), 1)}


def checks_and_agreements(rank, world_size):
    """Rank 1 alone changes its replica, or fails its set-up; what every rank then raises."""
    replicas = {}
    for name, change in CHANGES.items():
        params = torch.randn(500, generator=torch.Generator().manual_seed(0))
        verify_replicas(params, step=0)  # identical: passes
        if rank == 1:
            change(params)
        try:
            verify_replicas(params, step=7)
            replicas[name] = None
        except AgreedError as err:
            replicas[name] = str(err)
    set_up = {}
    for name, (error, _) in ERRORS.items():
        try:
            agree("to set up", error if rank == 1 else None, payload=rank)
        except AgreedError as err:
            set_up[name] = (str(err), err.exit_code)
    return replicas, set_up, agree("to set up", None, payload=rank * 10)


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(checks_and_agreements, 2)


@pytest.mark.parametrize("change", ["swap_97_apart", "one_bit"])
def test_any_difference_between_replicas_fails_loudly_on_every_rank(two_ranks, change):
    messages = [replicas[change] for replicas, _, _ in two_ranks]
    assert messages[0] == messages[1] and "diverged across ranks at step 7: sha256 rank 0:" in messages[0]


def test_nan_parameters_are_reported_as_nan_not_as_diverged(two_ranks):
    for replicas, _, _ in two_ranks:
        assert "meta-parameters are not finite at step 7 (rank 1: 1 NaN, 0 Inf of 500 values)" in replicas["nan"]
    params = torch.zeros(4)
    params[1] = float("nan")  # identical bytes everywhere, still not a usable model: one process too
    with pytest.raises(AgreedError, match=r"not finite at step 3 \(rank 0: 1 NaN, 0 Inf of 4 values\)"):
        verify_replicas(params, step=3)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_any_set_up_error_on_one_rank_ends_every_rank_alike(two_ranks, name):
    error, code = ERRORS[name]
    for _, set_up, _ in two_ranks:  # an OSError too, not only a ValueError
        assert set_up[name] == (f"rank 1 failed to set up: {error}", code)


def test_agreement_returns_every_ranks_payload(two_ranks):
    assert [payloads for _, _, payloads in two_ranks] == [[0, 10], [0, 10]]
