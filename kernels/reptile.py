"""Fused Reptile reduction Δ = θ − mean_t θ_t over task copies [T, P], in one pass and one launch.

Registered as the op metagan::reptile_delta (linear, so its backward is a one-line torch formula
and differentiable again); Triton on the Triton backend, `theta - thetas.mean(0)` on the reference.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import check_same_kind, check_triton_can_run, device_guard, resolve_backend

BLOCK = 1024  # parameters per program (each program loops over all tasks)


@triton.jit(do_not_specialize=["T"])
def _reptile_delta_kernel(theta_ptr, thetas_ptr, out_ptr, T, P, BLOCK: tl.constexpr):
    # One program per block of parameters: sum the T copies in fp32 registers, then one store.
    block = tl.program_id(0)
    cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    ptrs = thetas_ptr + cols  # 64-bit pointer arithmetic: rows advance by P without overflow
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(0, T):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += P
    theta = tl.load(theta_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, (theta - acc / T).to(out_ptr.dtype.element_ty), mask=mask)


def _reptile_delta_triton(theta: Tensor, thetas: Tensor) -> Tensor:
    check_triton_can_run(_reptile_delta_kernel, thetas)
    theta, thetas = theta.contiguous(), thetas.contiguous()
    tasks, params = thetas.shape
    out = torch.empty_like(theta)
    if params:
        with device_guard(thetas):
            _reptile_delta_kernel[(triton.cdiv(params, BLOCK),)](theta, thetas, out, tasks, params, BLOCK=BLOCK, num_warps=4)
    return out


def _check_reptile(theta: Tensor, thetas: Tensor, backend: str) -> None:
    check_same_kind("theta", theta, thetas=thetas)
    if theta.dim() != 1 or thetas.dim() != 2 or thetas.shape[1] != theta.shape[0]:
        raise ValueError(f"reptile_delta takes theta [P] and thetas [T, P], got {tuple(theta.shape)} and {tuple(thetas.shape)}")
    if thetas.shape[0] == 0:
        raise ValueError("reptile_delta needs at least one task copy (T = 0: the mean is undefined)")
    if backend not in ("triton", "reference"):
        raise ValueError(f"reptile_delta runs the 'triton' or 'reference' backend, got {backend!r}")


@torch.library.custom_op("metagan::reptile_delta", mutates_args=())
def reptile_delta_op(theta: Tensor, thetas: Tensor, backend: str) -> Tensor:
    """theta [P] − mean over tasks of thetas [T, P]."""
    _check_reptile(theta, thetas, backend)
    if backend == "triton":
        return _reptile_delta_triton(theta, thetas)
    return theta - thetas.mean(0)


@reptile_delta_op.register_fake
def _reptile_delta_fake(theta: Tensor, thetas: Tensor, backend: str) -> Tensor:
    _check_reptile(theta, thetas, backend)
    return theta.new_empty(theta.shape)


def _reptile_setup(ctx, inputs, output) -> None:
    ctx.tasks = inputs[1].shape[0]


def _reptile_backward(ctx, grad: Tensor):
    return grad, (grad / -ctx.tasks).expand(ctx.tasks, -1), None


reptile_delta_op.register_autograd(_reptile_backward, setup_context=_reptile_setup)


def reptile_delta(theta: Tensor, thetas: Tensor, *, backend: str | None = None) -> Tensor:
    """Reptile's meta-gradient θ − mean_t θ_t for theta [P] and adapted copies thetas [T, P] -> [P].

    backend: "triton", "reference" or "auto" (default: $METAGAN_KERNELS, else auto).
    """
    return reptile_delta_op(theta, thetas, resolve_backend(backend, thetas))
