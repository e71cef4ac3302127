"""The kernel ops against plain-torch oracles: Triton (interpreter on CPU, compiled on CUDA) and reference.

The oracles below are the textbook formulas in ordinary torch ops, differentiated by autograd, so
they share no code with the kernels' forward or backward formulas.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import kernels
import kernels.update as update_module
from conftest import requires_cuda
from kernels.dispatch import MAX_GRID, check_triton_can_run, is_interpreted, resolve_backend, task_block_programs
from kernels.grad_clip import row_norms_op
from kernels.launches import cuda_launches
from kernels.update import BLOCK_FORWARD, inner_update_backward_op

INTERPRETED = is_interpreted(update_module._update_forward_kernel)
_interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU Triton runs only with TRITON_INTERPRET=1 at import")
_cuda_only = [requires_cuda, pytest.mark.gpu]
# (device, dtype) the Triton path is checked on; the interpreter has no bf16 arithmetic.
TRITON_TARGETS = [
    pytest.param("cpu", torch.float32, marks=_interpreter_only, id="interpreter-fp32"),
    pytest.param("cuda", torch.float32, marks=_cuda_only, id="cuda-fp32"),
    pytest.param("cuda", torch.bfloat16, marks=_cuda_only, id="cuda-bf16"),
]
# P not a multiple of any block, T = 1, a larger T than the other sizes.
SIZES = [(1, 1), (1, BLOCK_FORWARD + 3), (5, 2 * BLOCK_FORWARD + 37), (67, 129)]


def oracle_update(theta, grads, lr, max_norm=0.0):
    """The contract of kernels.inner_update in plain torch ops."""
    if max_norm > 0:
        grads = grads * (max_norm / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    return theta - lr * grads


def oracle_reptile(theta, thetas):
    return theta - thetas.mean(0)


def assert_matches(got, want):
    """fp32: elementwise to 1e-5; bf16 (8-bit mantissa): norm-wise relative error below 1e-2."""
    assert got.shape == want.shape and torch.isfinite(got).all()
    if got.dtype == torch.bfloat16:
        assert ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item() < 1e-2
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def update_inputs(tasks, params, lr_kind, theta_kind, device="cpu", dtype=torch.float32):
    """theta, grads (rows of different norms, so clipping hits some tasks only), lr; all leaves."""
    opts = dict(device=device, dtype=dtype)
    theta = torch.randn(params if theta_kind == "shared" else (tasks, params), **opts)
    row_scale = torch.linspace(0.2, 2.0, tasks, **opts)[:, None]
    grads = torch.randn(tasks, params, **opts) * row_scale
    lr = {"float": 0.07, "scalar": torch.tensor(0.07, **opts), "vector": torch.rand(params, **opts)}[lr_kind]
    leaves = [t.requires_grad_() for t in (theta, grads, lr) if isinstance(t, torch.Tensor)]
    return theta, grads, lr, leaves


def value_and_grads(fn, leaves, seed_grad):
    out = fn()
    return out.detach(), torch.autograd.grad(out, leaves, seed_grad)


# ---- the Triton path against the oracle -------------------------------------------------------


@pytest.mark.parametrize("device,dtype", TRITON_TARGETS)
@pytest.mark.parametrize("tasks,params", SIZES)
@pytest.mark.parametrize("lr_kind", ["float", "scalar", "vector"])
@pytest.mark.parametrize("theta_kind", ["shared", "per_task"])
@pytest.mark.parametrize("clip", [False, True])
def test_triton_update_matches_oracle(device, dtype, tasks, params, lr_kind, theta_kind, clip):
    theta, grads, lr, leaves = update_inputs(tasks, params, lr_kind, theta_kind, device, dtype)
    max_norm = params**0.5 if clip else 0.0  # the norm of a row of scale 1: the larger rows get clipped
    seed_grad = torch.randn(tasks, params, device=device, dtype=dtype)
    out, grads_in = value_and_grads(lambda: kernels.inner_update(theta, grads, lr, max_norm, backend="triton"), leaves, seed_grad)
    wide = [t.double() for t in leaves]
    wide_lr = lr if lr_kind == "float" else wide[-1]
    expected, expected_grads = value_and_grads(
        lambda: oracle_update(wide[0], wide[1], wide_lr, max_norm), wide, seed_grad.double()
    )
    assert out.dtype == dtype and out.shape == (tasks, params)
    assert_matches(out, expected)
    for got, want in zip(grads_in, expected_grads):
        assert_matches(got, want)


@pytest.mark.parametrize("device,dtype", TRITON_TARGETS)
@pytest.mark.parametrize("tasks,params", SIZES)
def test_triton_reptile_matches_oracle(device, dtype, tasks, params):
    theta = torch.randn(params, device=device, dtype=dtype, requires_grad=True)
    thetas = torch.randn(tasks, params, device=device, dtype=dtype, requires_grad=True)
    seed_grad = torch.randn(params, device=device, dtype=dtype)
    out, grads_in = value_and_grads(lambda: kernels.reptile_delta(theta, thetas, backend="triton"), [theta, thetas], seed_grad)
    wide = [theta.double(), thetas.double()]
    expected, expected_grads = value_and_grads(lambda: oracle_reptile(*wide), wide, seed_grad.double())
    assert_matches(out, expected)
    for got, want in zip(grads_in, expected_grads):
        assert_matches(got, want)


@pytest.mark.parametrize("device,dtype", TRITON_TARGETS)
def test_triton_clip_factors_match_oracle_with_a_zero_row(device, dtype):
    grads = torch.randn(4, 3 * BLOCK_FORWARD + 5, device=device, dtype=dtype) * torch.tensor([0.0, 0.1, 1.0, 10.0], device=device, dtype=dtype)[:, None]
    grads.requires_grad_()
    max_norm = 50.0
    factors = kernels.clip_factors(grads, max_norm, backend="triton")
    (grad,) = torch.autograd.grad(factors.sum(), grads)
    wide = grads.detach().double().requires_grad_()
    expected = (max_norm / (wide.norm(dim=1) + 1e-6)).clamp(max=1.0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), wide)
    assert_matches(factors, expected)
    assert_matches(grad, expected_grad)
    assert factors[0] == 1 and factors[3] < 1 and torch.isfinite(grad).all()


@pytest.mark.parametrize("device,dtype", TRITON_TARGETS)
def test_triton_path_copies_non_contiguous_inputs(device, dtype):
    tasks, params = 3, BLOCK_FORWARD + 11
    opts = dict(device=device, dtype=dtype)
    grads = torch.randn(params, tasks, **opts).t()  # [T, P] with strides (1, T)
    theta = torch.randn(2 * params, **opts)[::2]  # [P] with stride 2
    lr = torch.rand(params, 2, **opts)[:, 0]
    shared = kernels.inner_update(theta, grads, lr, backend="triton")
    expanded = kernels.inner_update(theta.expand(tasks, -1), grads, lr, backend="triton")  # stride-0 rows
    expected = oracle_update(theta.double(), grads.double(), lr.double())
    assert_matches(shared, expected)
    assert_matches(expanded, expected)
    thetas = torch.randn(params, tasks, **opts).t()
    assert_matches(kernels.reptile_delta(theta, thetas, backend="triton"), oracle_reptile(theta.double(), thetas.double()))


# ---- autograd formulas of the registered ops: finite differences in float64 (reference path) ---


@pytest.mark.parametrize("lr_kind", ["float", "scalar", "vector"])
@pytest.mark.parametrize("theta_kind", ["shared", "per_task"])
@pytest.mark.parametrize("clip", [False, True])
def test_inner_update_gradcheck_and_gradgradcheck(lr_kind, theta_kind, clip):
    theta, grads, lr, leaves = update_inputs(3, 5, lr_kind, theta_kind, dtype=torch.float64)
    max_norm = 5**0.5 if clip else 0.0

    def update(*args):
        rate = lr if lr_kind == "float" else args[-1]
        return kernels.inner_update(args[0], args[1], rate, max_norm, backend="reference")

    assert gradcheck(update, tuple(leaves))
    assert gradgradcheck(update, tuple(leaves))


def test_backward_op_gradcheck_with_every_output_wanted():
    dout, grads = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lr, scale = torch.rand(5, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (dout, grads, lr, scale))

    def backward_op(d, g, a, s):
        return inner_update_backward_op(d, g, a, 0.0, s, True, True, True, True, "reference")

    assert gradcheck(backward_op, inputs)
    assert gradgradcheck(backward_op, inputs)


def test_reptile_and_row_norms_gradcheck_and_gradgradcheck():
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    thetas = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, b: kernels.reptile_delta(a, b, backend="reference"), (theta, thetas))
    assert gradgradcheck(lambda a, b: kernels.reptile_delta(a, b, backend="reference"), (theta, thetas))
    assert gradcheck(lambda x: row_norms_op(x, "reference"), (thetas,))
    assert gradgradcheck(lambda x: row_norms_op(x, "reference"), (thetas,))


@pytest.mark.parametrize("lr_kind", ["scalar", "vector"])
@pytest.mark.parametrize("theta_kind", ["shared", "per_task"])
def test_reference_update_matches_oracle_to_second_order(lr_kind, theta_kind):
    """d/dθ of a loss on the update's gradient (the double backward) against the oracle's."""
    theta, grads, lr, leaves = update_inputs(4, 9, lr_kind, theta_kind, dtype=torch.float64)

    def second_order(update):
        out = update(theta, grads, lr, 1.0)
        first = torch.autograd.grad((out**3).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((f**2).sum() for f in first), leaves)

    got = second_order(lambda *a: kernels.inner_update(*a, backend="reference"))
    for g, want in zip(got, second_order(oracle_update)):
        torch.testing.assert_close(g, want)


# ---- backend selection and bad inputs ----------------------------------------------------------


def test_backend_selection_argument_env_and_auto(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend(None, cpu.double()) == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("reference", cpu) == "reference"  # the argument wins over the environment
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        kernels.inner_update(cpu, cpu[None], 0.1)


@_interpreter_only
@pytest.mark.parametrize("env,launches", [("triton", 1), ("reference", 0)])
def test_env_switch_decides_which_implementation_runs(monkeypatch, env, launches):
    calls = []
    real = update_module._forward_triton
    monkeypatch.setattr(update_module, "_forward_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv(kernels.ENV_VAR, env)
    theta, grads = torch.randn(7), torch.randn(2, 7)
    torch.testing.assert_close(kernels.inner_update(theta, grads, 0.5), oracle_update(theta, grads, 0.5))
    assert len(calls) == launches


def test_triton_refuses_tensors_it_cannot_run_on():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        check_triton_can_run(object(), torch.zeros(1))  # a compiled (not interpreted) kernel, CPU data
    with pytest.raises(TypeError, match="float64"):
        kernels.inner_update(torch.zeros(3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), 0.1, backend="triton")


@pytest.mark.parametrize(
    "theta,grads,lr,error,match",
    [
        (torch.zeros(4), torch.zeros(2, 4, dtype=torch.int64), 0.1, TypeError, "floating-point"),
        (torch.zeros(4, dtype=torch.float64), torch.zeros(2, 4), 0.1, TypeError, "theta is torch.float64"),
        (torch.zeros(4), torch.zeros(2, 4), torch.zeros(4, device="meta"), ValueError, "lr is on meta"),
        (torch.zeros(4), torch.zeros(4), 0.1, ValueError, r"grads must be \[T, P\]"),
        (torch.zeros(5), torch.zeros(2, 4), 0.1, ValueError, "theta must be shared"),
        (torch.zeros(3, 4), torch.zeros(2, 4), 0.1, ValueError, "theta must be shared"),
        (torch.zeros(4), torch.zeros(2, 4), torch.zeros(3), ValueError, "lr must be"),
    ],
)
def test_inner_update_rejects_bad_inputs(theta, grads, lr, error, match):
    for backend in ("reference", "triton"):
        with pytest.raises(error, match=match):
            kernels.inner_update(theta, grads, lr, backend=backend)


def test_negative_clip_and_bad_reptile_shapes_are_errors():
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        kernels.inner_update(torch.zeros(4), torch.zeros(2, 4), 0.1, max_norm=-1.0)
    with pytest.raises(ValueError, match=r"theta \[P\] and thetas \[T, P\]"):
        kernels.reptile_delta(torch.zeros(4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least one task"):
        kernels.reptile_delta(torch.zeros(4), torch.zeros(0, 4))
    with pytest.raises(TypeError, match="thetas is torch.float64"):
        kernels.reptile_delta(torch.zeros(4), torch.zeros(2, 4, dtype=torch.float64))


def test_launch_grid_counts_task_blocks_and_refuses_more_than_a_grid_holds():
    assert task_block_programs(3, 2048, 1024) == 6
    assert task_block_programs(3, 2049, 1024) == 9  # a partial block is a program too
    assert task_block_programs(0, 2049, 1024) == 0
    assert task_block_programs(1, MAX_GRID * 1024, 1024) == MAX_GRID  # the largest grid
    with pytest.raises(ValueError, match=rf"\[T, P\] = \(1, {MAX_GRID * 1024 + 1}\) needs {MAX_GRID + 1} programs"):
        task_block_programs(1, MAX_GRID * 1024 + 1, 1024)


# ---- CUDA only: launches per update, 64-bit offsets ---------------------------------------------


@requires_cuda
@pytest.mark.gpu
def test_one_launch_per_update_and_per_backward():
    theta = torch.randn(300_000, device="cuda", requires_grad=True)
    grads = torch.randn(16, 300_000, device="cuda", requires_grad=True)
    assert cuda_launches(lambda: kernels.inner_update(theta, grads, 0.01)) == 1
    out = kernels.inner_update(theta, grads, 0.01)
    dout = torch.randn_like(out)
    assert cuda_launches(lambda: torch.autograd.grad(out, (theta, grads), dout, retain_graph=True)) == 1
    assert cuda_launches(lambda: kernels.reptile_delta(theta, grads)) == 1


@requires_cuda
@pytest.mark.gpu
def test_offsets_beyond_two_to_the_31():
    tasks, params = 3, 2**30 + 7  # T·P ≈ 3.2e9 elements: 32-bit offsets would wrap
    if torch.cuda.get_device_properties(0).total_memory < 40e9:
        pytest.skip("needs about 30 GB of GPU memory")
    rows = torch.arange(1, tasks + 1, device="cuda", dtype=torch.bfloat16)
    grads = rows[:, None].expand(tasks, params).contiguous().requires_grad_()
    theta = torch.zeros(params, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = kernels.inner_update(theta, grads, 1.0)
    assert all(bool((out[t] == -rows[t]).all()) for t in range(tasks))
    dtheta, dgrads = torch.autograd.grad(out, (theta, grads), torch.ones_like(out))
    assert bool((dtheta == tasks).all()) and bool((dgrads == -1).all())
    del out, dgrads
    grads = grads.detach()
    delta = kernels.reptile_delta(theta.detach(), grads)
    assert bool((delta == -2).all())  # 0 − mean(1, 2, 3)
