"""The outer step: one optimizer (AdamW or SGD) and schedule in both engines, clipping, logged norms."""

import math

import pytest
import torch

from dist_utils import run_on_ranks
from metagan_dist.config import OptimConfig
from metagan_dist.distributed import DistContext
from metagan_dist.engine import DeepSpeedEngine, MetaParameters, TorchEngine, read_deepspeed_config

CPU = DistContext(0, 1, 0, 1, torch.device("cpu"))
SIZES = (30, 20)  # θ_G, θ_D


def make_params(metasgd: bool = False) -> MetaParameters:
    gen = torch.Generator().manual_seed(1)
    return MetaParameters(torch.randn(SIZES[0], generator=gen), torch.randn(SIZES[1], generator=gen),
                          inner_lr=0.05 if metasgd else None)


def test_weight_decay_is_decoupled():
    params = make_params()
    before = params.flat().clone()
    engine = TorchEngine(params, OptimConfig(lr=0.1, weight_decay=0.5), CPU, bucket_mb=1)
    engine.step(torch.zeros_like(before), global_tasks=1)
    # AdamW: θ ← θ(1 − lr·wd) − lr·Adam(g), and Adam(0) = 0. Adam with L2 would step by about lr·sign(θ).
    torch.testing.assert_close(params.flat(), before * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)


def test_meta_sgd_rates_get_no_weight_decay():
    params = make_params(metasgd=True)
    engine = TorchEngine(params, OptimConfig(lr=0.1, weight_decay=0.5), CPU, bucket_mb=1)
    engine.step(torch.zeros(2 * sum(SIZES)), global_tasks=1)
    assert torch.equal(params.generator_lr, torch.full((SIZES[0],), 0.05))


def test_sgd_on_the_reptile_gradient_is_the_interpolation():
    params = make_params()
    theta = params.flat().clone()
    adapted = theta + torch.randn(4, theta.numel())  # θ_i of 4 tasks
    grad_sum = (theta - adapted).sum(0)  # Reptile's meta-gradient θ − θ_i, summed over the tasks
    engine = TorchEngine(params, OptimConfig(name="sgd", lr=0.3), CPU, bucket_mb=1)
    stats = engine.step(grad_sum, global_tasks=4)
    torch.testing.assert_close(params.flat(), theta + 0.3 * (adapted.mean(0) - theta), rtol=0, atol=1e-6)
    assert stats.lr == 0.3 and not stats.clipped


def test_the_logged_norm_is_the_one_before_clipping():
    params = make_params()
    theta = params.flat().clone()
    grad = torch.zeros_like(theta)
    grad[:2] = torch.tensor([30.0, 40.0])  # norm 50
    engine = TorchEngine(params, OptimConfig(name="sgd", lr=1.0, grad_clip=1.0), CPU, bucket_mb=1)
    stats = engine.step(grad.clone(), global_tasks=1)
    assert stats.grad_norm == pytest.approx(50.0) and stats.clipped
    torch.testing.assert_close(theta - params.flat(), grad / (50 + 1e-6), rtol=1e-6, atol=0)
    small = engine.step(grad.clone() / 100, global_tasks=1)
    assert small.grad_norm == pytest.approx(0.5) and not small.clipped


@pytest.mark.parametrize("schedule,factor", [
    ("constant", lambda k, n: 1.0),
    ("linear", lambda k, n: 1 - k / n),
    ("cosine", lambda k, n: 0.5 * (1 + math.cos(math.pi * k / n))),
])
def test_schedules_anneal_to_zero_at_the_last_step(schedule, factor):
    engine = TorchEngine(make_params(), OptimConfig(name="sgd", lr=0.2, schedule=schedule), CPU, bucket_mb=1,
                         total_steps=5)
    rates = [engine.step(torch.ones(sum(SIZES)), global_tasks=1).lr for _ in range(5)]
    assert rates == pytest.approx([0.2 * factor(k, 5) for k in range(5)])
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * factor(5, 5))  # after run.steps
    if schedule != "constant":
        assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_schedule_state_survives_a_checkpoint(tmp_path):
    optim = OptimConfig(lr=0.2, schedule="linear")
    first = TorchEngine(make_params(), optim, CPU, bucket_mb=1, total_steps=10)
    for _ in range(3):
        first.step(torch.ones(sum(SIZES)), global_tasks=1)
    first.save(tmp_path, is_main=True)
    second = TorchEngine(make_params(), optim, CPU, bucket_mb=1, total_steps=10)
    second.load(tmp_path)
    assert second.step(torch.ones(sum(SIZES)), global_tasks=1).lr == pytest.approx(0.2 * 0.7)


def test_deepspeed_json_may_not_set_the_optimizer(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}')
    with pytest.raises(ValueError, match=r"sets 'optimizer', but both engines take the outer optimizer"):
        read_deepspeed_config(path, OptimConfig())
    path.write_text('{"gradient_clipping": 1.0}')
    with pytest.raises(ValueError, match=r"gradient_clipping=1.0 but optim.grad_clip=0.0"):
        read_deepspeed_config(path, OptimConfig())


# ---- the same optimizer inside DeepSpeed ZeRO-2, on 2 gloo ranks -------------------------------------

CASES = {  # weight decay AND clipping on in every case
    "adam-cosine": (OptimConfig(lr=0.05, weight_decay=0.1, grad_clip=2.0, schedule="cosine"), False),
    "sgd-linear": (OptimConfig(name="sgd", lr=0.05, weight_decay=0.1, grad_clip=2.0, schedule="linear"), False),
    "adam-metasgd": (OptimConfig(lr=0.05, weight_decay=0.1, grad_clip=2.0, schedule="constant"), True),
}
STEPS = 6


def both_engines(rank, world_size):
    """Each case: the torch and the DeepSpeed engine fed the same per-rank gradient sums."""
    ctx = DistContext(rank, world_size, rank, world_size, torch.device("cpu"))
    out = {}
    for name, (optim, metasgd) in CASES.items():
        ds_config = read_deepspeed_config("launch/configs/deepspeed_zero2.json", optim)
        engines = [TorchEngine(make_params(metasgd), optim, ctx, bucket_mb=1, total_steps=STEPS),
                   DeepSpeedEngine(make_params(metasgd), optim, ctx, ds_config, total_steps=STEPS)]
        trace = [[], []]
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(100 * step + rank)
            scale = 3.0 if step % 2 else 0.3  # norms above and below the clip
            grad = torch.randn(engines[0].params.flat().numel(), generator=gen) * scale
            for engine, seen in zip(engines, trace):
                stats = engine.step(grad.clone(), global_tasks=3 * world_size)
                seen.append((stats.grad_norm, stats.clipped, stats.lr))
        out[name] = [engine.params.flat().clone() for engine in engines], trace
    return out


@pytest.mark.slow
def test_deepspeed_steps_like_the_torch_engine_with_weight_decay_and_clipping():
    for rank_out in run_on_ranks(both_engines, 2, timeout_s=900):  # DeepSpeed may JIT-compile an op first
        for name, ((torch_params, ds_params), (torch_trace, ds_trace)) in rank_out.items():
            torch.testing.assert_close(ds_params, torch_params, rtol=1e-5, atol=1e-6, msg=name)
            assert [c for _, c, _ in ds_trace] == [c for _, c, _ in torch_trace], name
            assert any(c for _, c, _ in torch_trace) and not all(c for _, c, _ in torch_trace), name
            assert [n for n, _, _ in ds_trace] == pytest.approx([n for n, _, _ in torch_trace], rel=1e-5), name
            assert [lr for _, _, lr in ds_trace] == pytest.approx([lr for _, _, lr in torch_trace]), name
