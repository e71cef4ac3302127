"""Fused per-task Adam step for all task copies in one launch (the inner rule `adam` of fomaml/reptile).

Adam is element-wise, so one Adam over a [T, P] buffer is T independent Adams, one per task copy:

    m_t ← β1 m_t + (1 − β1) s_t g_t          v_t ← β2 v_t + (1 − β2) (s_t g_t)²
    out_t = θ(_t) − lr / (1 − β1^k) · m_t / (sqrt(v_t / (1 − β2^k)) + eps)

with k the step number (1, 2, ...; the same for every task) and s_t an optional per-task gradient
scale (norm clipping, from grad_clip.py). The moments m, v [T, P] are updated in place; θ is shared
[P] (the first step from a meta-init) or per task [T, P]. Registered as metagan::inner_adam; it is
a first-order rule (no autograd formula): second-order MAML and Meta-SGD use the SGD update.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import check_same_kind, check_triton_can_run, device_guard, resolve_backend, task_block_programs
from kernels.grad_clip import clip_factors

BLOCK = 1024  # parameters per program


@triton.jit(do_not_specialize=["T"])
def _adam_kernel(
    theta_ptr, grads_ptr, exp_avg_ptr, exp_avg_sq_ptr, scale_ptr, out_ptr,
    T, P, beta1, beta2, step_size, bias_correction2_sqrt, eps,
    THETA_PER_TASK: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (task, block of parameters); tasks vary fastest so a shared θ block is reused from L2.
    pid = tl.program_id(0)
    task = pid % T
    block = pid // T
    cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    row = task.to(tl.int64) * P
    g = tl.load(grads_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + task).to(tl.float32)
    m = tl.load(exp_avg_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    if THETA_PER_TASK:
        theta = tl.load(theta_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        theta = tl.load(theta_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    tl.store(exp_avg_ptr + row + cols, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_sq_ptr + row + cols, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + row + cols, (theta - step_size * m / denom).to(out_ptr.dtype.element_ty), mask=mask)


def _adam_triton(
    theta: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scale: Tensor | None,
    beta1: float, beta2: float, step_size: float, bias_correction2_sqrt: float, eps: float,
) -> Tensor:
    check_triton_can_run(_adam_kernel, grads)
    theta, grads, scale = theta.contiguous(), grads.contiguous(), None if scale is None else scale.contiguous()
    tasks, params = grads.shape
    out = torch.empty_like(grads)
    programs = task_block_programs(tasks, params, BLOCK)
    if programs == 0:
        return out
    with device_guard(grads):
        _adam_kernel[(programs,)](
            theta, grads, exp_avg, exp_avg_sq, grads if scale is None else scale, out,
            tasks, params, beta1, beta2, step_size, bias_correction2_sqrt, eps,
            THETA_PER_TASK=theta.dim() == 2, HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=4,
        )
    return out


def _adam_reference(
    theta: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scale: Tensor | None,
    beta1: float, beta2: float, step_size: float, bias_correction2_sqrt: float, eps: float,
) -> Tensor:
    if scale is not None:
        grads = grads * scale[:, None]
    exp_avg.lerp_(grads, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return torch.addcdiv(theta, exp_avg, denom, value=-step_size)


def _check_adam(
    theta: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scale: Tensor | None, backend: str
) -> None:
    check_same_kind("grads", grads, theta=theta, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, scale=scale)
    if grads.dim() != 2:
        raise ValueError(f"grads must be [T, P], got shape {tuple(grads.shape)}")
    tasks, params = grads.shape
    if theta.shape not in ((params,), (tasks, params)):
        raise ValueError(
            f"theta must be shared [P] = [{params}] or per task [T, P] = [{tasks}, {params}], got {tuple(theta.shape)}"
        )
    for name, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if moment.shape != grads.shape or not moment.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [T, P] = {tuple(grads.shape)} buffer, got {tuple(moment.shape)}")
    if scale is not None and scale.shape != (tasks,):
        raise ValueError(f"scale must be per task [T] = [{tasks}], got {tuple(scale.shape)}")
    if backend not in ("triton", "reference"):
        raise ValueError(f"inner_adam runs the 'triton' or 'reference' backend, got {backend!r}")


@torch.library.custom_op("metagan::inner_adam", mutates_args=("exp_avg", "exp_avg_sq"))
def inner_adam_op(
    theta: Tensor, grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, scale: Optional[Tensor],
    beta1: float, beta2: float, step_size: float, bias_correction2_sqrt: float, eps: float, backend: str,
) -> Tensor:
    """One Adam step of every task copy; updates exp_avg/exp_avg_sq in place and returns the new θ [T, P]."""
    _check_adam(theta, grads, exp_avg, exp_avg_sq, scale, backend)
    run = _adam_triton if backend == "triton" else _adam_reference
    return run(theta, grads, exp_avg, exp_avg_sq, scale, beta1, beta2, step_size, bias_correction2_sqrt, eps)


@inner_adam_op.register_fake
def _inner_adam_fake(theta, grads, exp_avg, exp_avg_sq, scale, beta1, beta2, step_size, bias_correction2_sqrt, eps, backend):
    _check_adam(theta, grads, exp_avg, exp_avg_sq, scale, backend)
    return grads.new_empty(grads.shape)


def inner_adam(
    theta: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.0, 0.999),
    eps: float = 1e-8,
    max_norm: float = 0.0,
    *,
    backend: str | None = None,
) -> Tensor:
    """Adam step number `step` (1, 2, ...) of every task copy, as torch.optim.Adam would take it per task.

    theta: shared [P] or per task [T, P]; grads, exp_avg, exp_avg_sq: [T, P] (the moments start at
    zero and are updated in place). max_norm > 0 first scales each task's g_t to norm at most
    max_norm. Returns the new θ [T, P]. backend: "triton", "reference" or "auto".
    """
    if step < 1:
        raise ValueError(f"Adam steps count from 1, got step={step}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"Adam betas must lie in [0, 1), got {tuple(betas)}")
    if lr <= 0 or eps <= 0:
        raise ValueError(f"Adam needs lr > 0 and eps > 0, got lr={lr}, eps={eps}")
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (0 turns clipping off), got {max_norm}")
    chosen = resolve_backend(backend, grads)
    scale = clip_factors(grads, max_norm, backend=chosen) if max_norm > 0 else None
    beta1, beta2 = float(betas[0]), float(betas[1])
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    return inner_adam_op(
        theta, grads, exp_avg, exp_avg_sq, scale, beta1, beta2, step_size, bias_correction2_sqrt, float(eps), chosen
    )
