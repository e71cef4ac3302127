"""The fused per-task Adam (kernels/adam.py) against torch.optim.Adam run on each task on its own.

The Triton kernel runs through the interpreter on the CPU (TRITON_INTERPRET=1, tests/conftest.py)
and natively on CUDA; the reference backend runs everywhere. The oracle is torch.optim.Adam itself,
one optimizer per task copy, so the fused version must be T independent Adams.
"""

import pytest
import torch

from conftest import requires_cuda
from kernels import inner_adam
from kernels.adam import BLOCK
from kernels.launches import cuda_launches
from test_kernels import TRITON_TARGETS, assert_matches

SIZES = [(1, 1), (3, BLOCK + 5), (9, 77)]  # P not a multiple of the block, T = 1, several tasks


def oracle_adam(theta, grads, exp_avg, exp_avg_sq, step, lr, betas=(0.0, 0.999), eps=1e-8, max_norm=0.0):
    """The contract of kernels.inner_adam in plain torch ops (the formula of torch.optim.Adam)."""
    if max_norm > 0:
        grads = grads * (max_norm / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    exp_avg.mul_(betas[0]).add_((1 - betas[0]) * grads)
    exp_avg_sq.mul_(betas[1]).add_((1 - betas[1]) * grads * grads)
    denom = (exp_avg_sq / (1 - betas[1] ** step)).sqrt() + eps
    return theta - lr / (1 - betas[0] ** step) * exp_avg / denom


def torch_adam_per_task(theta, grads_per_step, lr, betas, eps=1e-8):
    """Each task's trajectory under its own torch.optim.Adam: [steps, T, P] of parameters."""
    tasks = grads_per_step[0].shape[0]
    rows = [torch.nn.Parameter((theta if theta.dim() == 1 else theta[t]).detach().clone()) for t in range(tasks)]
    optims = [torch.optim.Adam([row], lr=lr, betas=betas, eps=eps) for row in rows]
    trajectory = []
    for grads in grads_per_step:
        for row, optim, grad in zip(rows, optims, grads):
            row.grad = grad.clone()
            optim.step()
        trajectory.append(torch.stack([row.detach().clone() for row in rows]))
    return trajectory


def run_fused(theta, grads_per_step, lr, betas, backend, max_norm=0.0):
    exp_avg = torch.zeros_like(grads_per_step[0])
    exp_avg_sq = torch.zeros_like(grads_per_step[0])
    trajectory = []
    for step, grads in enumerate(grads_per_step, start=1):
        theta = inner_adam(theta, grads, exp_avg, exp_avg_sq, step, lr, betas, max_norm=max_norm, backend=backend)
        trajectory.append(theta)
    return trajectory


def inputs(tasks, params, steps=3, shared=True, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(params if shared else (tasks, params), generator=g)
    grads = [torch.randn(tasks, params, generator=g) * (0.1 + step) for step in range(steps)]
    return theta.to(device, dtype), [x.to(device, dtype) for x in grads]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=TRITON_TARGETS[0].marks)])
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.5, 0.9)])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-theta", "per-task-theta"])
@pytest.mark.parametrize("tasks,params", SIZES)
def test_fused_adam_equals_torch_adam_run_per_task(backend, betas, shared, tasks, params):
    theta, grads = inputs(tasks, params, shared=shared)
    want = torch_adam_per_task(theta, grads, lr=0.01, betas=betas)
    got = run_fused(theta, grads, 0.01, betas, backend)
    for step_got, step_want in zip(got, want):
        torch.testing.assert_close(step_got, step_want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,dtype", TRITON_TARGETS)
@pytest.mark.parametrize("max_norm", [0.0, 0.3])
def test_triton_adam_matches_oracle_with_clipping(device, dtype, max_norm):
    theta, grads = inputs(5, 2 * BLOCK + 11, device=device, dtype=dtype)
    m, v = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    m_ref, v_ref = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    for step, g in enumerate(grads, start=1):
        got = inner_adam(theta, g, m, v, step, 0.02, (0.5, 0.99), max_norm=max_norm, backend="triton")
        want = oracle_adam(theta.float(), g.float(), m_ref, v_ref, step, 0.02, (0.5, 0.99), max_norm=max_norm)
        assert_matches(got, want.double())
        assert_matches(m, m_ref.double())
        assert_matches(v, v_ref.double())
        theta = got


def test_clipping_scales_each_tasks_gradient_before_the_moments():
    theta, grads = inputs(2, 10, steps=1)
    grads[0][1] *= 1000  # only task 1 exceeds the norm
    m, v = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    inner_adam(theta, grads[0], m, v, 1, 0.1, (0.5, 0.999), max_norm=1.0, backend="reference")
    torch.testing.assert_close(m[0], 0.5 * grads[0][0])
    torch.testing.assert_close(m[1].norm(), torch.tensor(0.5), rtol=1e-5, atol=0)


def test_adam_leaves_the_shared_init_untouched():
    theta, grads = inputs(3, 8, steps=1)
    before = theta.clone()
    out = inner_adam(theta, grads[0], torch.zeros_like(grads[0]), torch.zeros_like(grads[0]), 1, 0.1, backend="reference")
    assert torch.equal(theta, before) and out.shape == (3, 8)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(step=0), ValueError, "count from 1"),
        (dict(betas=(1.0, 0.9)), ValueError, "betas"),
        (dict(lr=0.0), ValueError, "lr > 0"),
        (dict(max_norm=-1.0), ValueError, "max_norm"),
        (dict(exp_avg=torch.zeros(2, 4)), ValueError, "exp_avg must be"),
        (dict(theta=torch.zeros(5)), ValueError, "theta must be"),
        (dict(grads=torch.zeros(3, 8, dtype=torch.float64)), TypeError, "float64"),
    ],
)
def test_bad_inputs_are_errors_naming_them(kwargs, error, match):
    theta, grads = inputs(3, 8, steps=1)
    args = dict(theta=theta, grads=grads[0], exp_avg=torch.zeros(3, 8), exp_avg_sq=torch.zeros(3, 8), step=1, lr=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        inner_adam(**args, backend="reference")


def test_fake_kernel_lets_a_compiled_function_trace_the_op():
    theta, grads = inputs(3, 8, steps=1)
    m, v = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    m2, v2 = m.clone(), v.clone()
    compiled = torch.compile(lambda *a: inner_adam(*a, 1, 0.1, backend="reference"), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(theta, grads[0], m, v), inner_adam(theta, grads[0], m2, v2, 1, 0.1, backend="reference"))
    torch.testing.assert_close(m, m2)


@requires_cuda
@pytest.mark.gpu
def test_one_launch_per_adam_step():
    theta, grads = inputs(64, 100_000, steps=1, device="cuda")
    m, v = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    assert cuda_launches(lambda: inner_adam(theta, grads[0], m, v, 1, 0.01, backend="triton")) == 1
