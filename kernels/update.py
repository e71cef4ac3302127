"""Fused inner-loop update of all task copies in one launch: out[t] = θ(_t) − α ⊙ s_t·g[t].

θ is shared [P] (broadcast over tasks) or per task [T, P]; α a Python float, a 0-d tensor or a
per-parameter [P] tensor (Meta-SGD); s an optional per-task factor [T] (gradient-norm clipping,
from grad_clip.py). Two ops, each one launch on the Triton path:

- metagan::inner_update            the update above
- metagan::inner_update_backward   dθ = Σ_t dout_t (shared θ), dg = −α s_t dout_t,
                                   dα = −Σ_t s_t dout_t ⊙ g_t, ds_t = −Σ_p α dout_t ⊙ g_t

The backward op is registered with its own backward in plain torch ops, so second-order MAML
(backpropagating through the inner gradients and into α) works, and torch.compile sees both ops
as opaque nodes with fake implementations: no graph breaks. Inputs that are not contiguous are
copied to contiguous buffers by the Triton launchers (correct, at the cost of the copy).
"""

import operator
from functools import reduce
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import check_same_kind, check_triton_can_run, device_guard, resolve_backend, task_block_programs
from kernels.grad_clip import clip_factors

BLOCK_FORWARD = 2048  # parameters per program of the update
BLOCK_BACKWARD = 512  # parameters per program of the backward (each loops over all tasks)
LR_FLOAT, LR_SCALAR, LR_VECTOR = 0, 1, 2  # α as a kernel argument, a 0-d tensor, a [P] tensor


@triton.jit(do_not_specialize=["T"])  # T == 1 needs no kernel of its own
def _update_forward_kernel(
    theta_ptr, grads_ptr, lr_ptr, scale_ptr, out_ptr, lr_value, T, P,
    THETA_PER_TASK: tl.constexpr, LR_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (task, block of parameters). Tasks vary fastest, so programs resident together
    # read the same block of a shared θ (and α) and it comes from L2 after the first.
    pid = tl.program_id(0)
    task = pid % T
    block = pid // T
    cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    row = task.to(tl.int64) * P
    g = tl.load(grads_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    if THETA_PER_TASK:
        theta = tl.load(theta_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        theta = tl.load(theta_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if LR_MODE == 0:
        step = g * lr_value
    elif LR_MODE == 1:
        step = g * tl.load(lr_ptr).to(tl.float32)
    else:
        step = g * tl.load(lr_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        step = step * tl.load(scale_ptr + task).to(tl.float32)
    tl.store(out_ptr + row + cols, (theta - step).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "n_blocks"])
def _update_backward_kernel(
    dout_ptr, grads_ptr, lr_ptr, scale_ptr, dtheta_ptr, dgrads_ptr, dlr_ptr, dscale_part_ptr,
    lr_value, T, P, n_blocks,
    LR_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, SUM_TASKS: tl.constexpr, WANT_DGRADS: tl.constexpr,
    WANT_DLR: tl.constexpr, WANT_DSCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per block of parameters, looping over the tasks: the sums over tasks (dθ, dα) stay
    # in registers; the sums over parameters (ds) are written per block and added by the launcher.
    block = tl.program_id(0)
    cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    if LR_MODE == 0:
        lr = lr_value
    elif LR_MODE == 1:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = tl.load(lr_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    sum_dout = tl.zeros([BLOCK], dtype=tl.float32)
    sum_s_dout_g = tl.zeros([BLOCK], dtype=tl.float32)
    dout_ptrs = dout_ptr + cols  # pointer arithmetic is 64-bit: rows advance by P without overflow
    grads_ptrs = grads_ptr + cols
    dgrads_ptrs = dgrads_ptr + cols
    dscale_ptrs = dscale_part_ptr + block
    for task in range(0, T):
        d = tl.load(dout_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + task).to(tl.float32)
        else:
            s = 1.0
        if WANT_DGRADS:
            tl.store(dgrads_ptrs, (-(lr * s) * d).to(dgrads_ptr.dtype.element_ty), mask=mask)
        if SUM_TASKS:
            sum_dout += d
        if WANT_DLR or WANT_DSCALE:
            g = tl.load(grads_ptrs, mask=mask, other=0.0).to(tl.float32)
            if WANT_DLR:
                sum_s_dout_g += s * d * g
            if WANT_DSCALE:
                tl.store(dscale_ptrs, -tl.sum(lr * d * g, axis=0))
        dout_ptrs += P
        grads_ptrs += P
        dgrads_ptrs += P
        dscale_ptrs += n_blocks
    if SUM_TASKS:
        tl.store(dtheta_ptr + cols, sum_dout.to(dtheta_ptr.dtype.element_ty), mask=mask)
    if WANT_DLR:
        tl.store(dlr_ptr + cols, (-sum_s_dout_g).to(dlr_ptr.dtype.element_ty), mask=mask)


def _lr_mode(lr: Tensor | None) -> int:
    if lr is None:
        return LR_FLOAT
    return LR_SCALAR if lr.dim() == 0 else LR_VECTOR


def _contiguous(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.contiguous()


def _forward_triton(theta: Tensor, grads: Tensor, lr: Tensor | None, lr_value: float, scale: Tensor | None) -> Tensor:
    check_triton_can_run(_update_forward_kernel, grads)
    theta, grads, lr, scale = (_contiguous(t) for t in (theta, grads, lr, scale))
    tasks, params = grads.shape
    out = torch.empty_like(grads)
    programs = task_block_programs(tasks, params, BLOCK_FORWARD)
    if programs == 0:
        return out
    with device_guard(grads):
        _update_forward_kernel[(programs,)](
            theta, grads, grads if lr is None else lr, grads if scale is None else scale, out, lr_value,
            tasks, params, THETA_PER_TASK=theta.dim() == 2, LR_MODE=_lr_mode(lr), HAS_SCALE=scale is not None,
            BLOCK=BLOCK_FORWARD, num_warps=4,
        )
    return out


def _forward_reference(theta: Tensor, grads: Tensor, lr: Tensor | None, lr_value: float, scale: Tensor | None) -> Tensor:
    if scale is not None:
        grads = grads * scale[:, None]
    if lr is None:
        return torch.add(theta, grads, alpha=-lr_value)
    return torch.addcmul(theta, grads, lr, value=-1)


def _check_update(theta: Tensor, grads: Tensor, lr: Tensor | None, scale: Tensor | None, backend: str) -> None:
    """Clear errors for inputs the update would otherwise misread."""
    check_same_kind("grads", grads, theta=theta, lr=lr, scale=scale)
    if grads.dim() != 2:
        raise ValueError(f"grads must be [T, P], got shape {tuple(grads.shape)}")
    tasks, params = grads.shape
    if theta.shape not in ((params,), (tasks, params)):
        raise ValueError(
            f"theta must be shared [P] = [{params}] or per task [T, P] = [{tasks}, {params}], got {tuple(theta.shape)}"
        )
    if lr is not None and lr.shape not in ((), (params,)):
        raise ValueError(f"lr must be a number, a 0-d tensor or per parameter [P] = [{params}], got {tuple(lr.shape)}")
    if scale is not None and scale.shape != (tasks,):
        raise ValueError(f"scale must be per task [T] = [{tasks}], got {tuple(scale.shape)}")
    if backend not in ("triton", "reference"):
        raise ValueError(f"the update runs the 'triton' or 'reference' backend, got {backend!r}")


@torch.library.custom_op("metagan::inner_update", mutates_args=())
def inner_update_op(
    theta: Tensor, grads: Tensor, lr: Optional[Tensor], lr_value: float, scale: Optional[Tensor], backend: str
) -> Tensor:
    """out [T, P] = theta(_t) − α ⊙ scale_t·grads_t; α = lr (0-d or [P]) if given, else lr_value."""
    _check_update(theta, grads, lr, scale, backend)
    if backend == "triton":
        return _forward_triton(theta, grads, lr, lr_value, scale)
    return _forward_reference(theta, grads, lr, lr_value, scale)


@inner_update_op.register_fake
def _inner_update_fake(theta, grads, lr, lr_value, scale, backend):
    _check_update(theta, grads, lr, scale, backend)
    return grads.new_empty(grads.shape)


def _backward_triton(
    dout: Tensor, grads: Tensor, lr: Tensor | None, lr_value: float, scale: Tensor | None,
    sum_tasks: bool, want_dgrads: bool, want_dlr: bool, want_dscale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_triton_can_run(_update_backward_kernel, dout)
    dout, grads, lr, scale = (_contiguous(t) for t in (dout, grads, lr, scale))
    tasks, params = dout.shape
    n_blocks = triton.cdiv(params, BLOCK_BACKWARD)
    # An unwanted output is an empty tensor of its own: the outputs of a custom op may not alias.
    dtheta = dout.new_empty(params if sum_tasks else 0)
    dgrads = dout.new_empty(dout.shape if want_dgrads else (0,))
    dlr = dout.new_empty(params if want_dlr else 0)
    dscale_part = torch.empty(tasks if want_dscale else 0, n_blocks, dtype=torch.float32, device=dout.device)
    if n_blocks > 0 and (sum_tasks or want_dgrads or want_dlr or want_dscale):
        with device_guard(dout):
            _update_backward_kernel[(n_blocks,)](
                dout, grads, grads if lr is None else lr, grads if scale is None else scale,
                dtheta if sum_tasks else dout, dgrads if want_dgrads else dout, dlr if want_dlr else dout,
                dscale_part if want_dscale else dout,
                lr_value, tasks, params, n_blocks,
                LR_MODE=_lr_mode(lr), HAS_SCALE=scale is not None, SUM_TASKS=sum_tasks, WANT_DGRADS=want_dgrads,
                WANT_DLR=want_dlr, WANT_DSCALE=want_dscale, BLOCK=BLOCK_BACKWARD, num_warps=4,
            )
    dscale = dscale_part.sum(1).to(dout.dtype) if want_dscale else dout.new_empty(0)
    return dtheta, dgrads, dlr, dscale


def _backward_reference(
    dout: Tensor, grads: Tensor, lr: Tensor | None, lr_value: float, scale: Tensor | None,
    sum_tasks: bool, want_dgrads: bool, want_dlr: bool, want_dscale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rate = lr_value if lr is None else lr
    s = 1.0 if scale is None else scale[:, None]
    return (
        dout.sum(0) if sum_tasks else dout.new_empty(0),
        -(rate * s) * dout if want_dgrads else dout.new_empty(0),
        -(s * dout * grads).sum(0) if want_dlr else dout.new_empty(0),
        -(rate * dout * grads).sum(1) if want_dscale else dout.new_empty(0),
    )


def _backward_shapes(dout: Tensor, sum_tasks: bool, want_dgrads: bool, want_dlr: bool, want_dscale: bool):
    tasks, params = dout.shape
    return ((params,) if sum_tasks else (0,), dout.shape if want_dgrads else (0,),
            (params,) if want_dlr else (0,), (tasks,) if want_dscale else (0,))


def _check_backward(dout: Tensor, grads: Tensor, lr: Tensor | None, scale: Tensor | None, backend: str) -> None:
    if dout.shape != grads.shape:
        raise ValueError(f"dout {tuple(dout.shape)} and grads {tuple(grads.shape)} must have the same shape")
    _check_update(dout, grads, lr, scale, backend)


@torch.library.custom_op("metagan::inner_update_backward", mutates_args=())
def inner_update_backward_op(
    dout: Tensor, grads: Tensor, lr: Optional[Tensor], lr_value: float, scale: Optional[Tensor],
    sum_tasks: bool, want_dgrads: bool, want_dlr: bool, want_dscale: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Σ_t dout_t, −α s_t dout_t, −Σ_t s_t dout_t ⊙ g_t, −Σ_p α dout_t ⊙ g_t); an unwanted one is empty.

    The α gradient is per parameter [P] even for a 0-d α (the caller sums it).
    """
    _check_backward(dout, grads, lr, scale, backend)
    flags = (sum_tasks, want_dgrads, want_dlr, want_dscale)
    if backend == "triton":
        return _backward_triton(dout, grads, lr, lr_value, scale, *flags)
    return _backward_reference(dout, grads, lr, lr_value, scale, *flags)


@inner_update_backward_op.register_fake
def _inner_update_backward_fake(dout, grads, lr, lr_value, scale, sum_tasks, want_dgrads, want_dlr, want_dscale, backend):
    _check_backward(dout, grads, lr, scale, backend)
    return tuple(dout.new_empty(shape) for shape in _backward_shapes(dout, sum_tasks, want_dgrads, want_dlr, want_dscale))


def _update_setup(ctx, inputs, output) -> None:
    theta, grads, lr, lr_value, scale, backend = inputs
    # g enters the backward only through dα and ds: without a learned rate or clipping it is not
    # kept, so each inner step's [T, P] gradient is freed as soon as the next step has used it.
    keep_grads = (lr is not None and lr.requires_grad) or scale is not None
    ctx.save_for_backward(grads if keep_grads else None, lr, scale)
    ctx.theta_shared, ctx.lr_value, ctx.backend = theta.dim() == 1, lr_value, backend


def _update_backward(ctx, dout: Tensor):
    grads, lr, scale = ctx.saved_tensors
    need_theta, need_grads, need_lr, _, need_scale, _ = ctx.needs_input_grad
    dtheta_sum, dgrads, dlr, dscale = inner_update_backward_op(
        dout, dout if grads is None else grads, lr, ctx.lr_value, scale,  # dout: only g's shape is read then
        need_theta and ctx.theta_shared, need_grads, need_lr, need_scale, ctx.backend,
    )
    dtheta = (dtheta_sum if ctx.theta_shared else dout) if need_theta else None
    if need_lr and lr.dim() == 0:
        dlr = dlr.sum()
    return dtheta, dgrads if need_grads else None, dlr if need_lr else None, None, dscale if need_scale else None, None


inner_update_op.register_autograd(_update_backward, setup_context=_update_setup)


def _backward_setup(ctx, inputs, output) -> None:
    dout, grads, lr, lr_value, scale, sum_tasks, want_dgrads, want_dlr, want_dscale, _ = inputs
    ctx.save_for_backward(dout, grads, lr, scale)
    ctx.lr_value, ctx.wanted = lr_value, (sum_tasks, want_dgrads, want_dlr, want_dscale)


def _total(terms: list[Tensor]) -> Tensor | None:
    return reduce(operator.add, terms) if terms else None


def _update_double_backward(ctx, a_theta: Tensor, a_grads: Tensor, a_lr: Tensor, a_scale: Tensor):
    # Cotangents a_* of the backward op's outputs; the backward op is linear in dout and bilinear in
    # (dout, g), (dout, α), (dout, s), so each input's gradient is a short torch expression.
    dout, grads, lr, scale = ctx.saved_tensors
    sum_tasks, want_dgrads, want_dlr, want_dscale = ctx.wanted
    has_theta = sum_tasks and a_theta is not None
    has_grads = want_dgrads and a_grads is not None
    has_lr = want_dlr and a_lr is not None
    has_scale = want_dscale and a_scale is not None
    need_dout, need_grads, need_lr, _, need_scale = ctx.needs_input_grad[:5]
    rate = ctx.lr_value if lr is None else lr
    s = 1.0 if scale is None else scale[:, None]
    a_s = a_scale[:, None] if has_scale else None
    # cross[t, p] = s_t a_lr[p] + α_p a_s[t]: multiplies g in ∂/∂dout and dout in ∂/∂g.
    cross = _total(([s * a_lr] if has_lr else []) + ([rate * a_s] if has_scale else []))
    d_dout = d_grads = d_lr = d_scale = None
    if need_dout:
        terms = [a_theta.expand_as(dout)] if has_theta else []
        terms += [-(rate * s) * a_grads] if has_grads else []
        terms += [-grads * cross] if cross is not None else []
        d_dout = _total(terms)
    if need_grads and cross is not None:
        d_grads = -dout * cross
    if need_lr:
        inner = _total(([s * a_grads] if has_grads else []) + ([grads * a_s] if has_scale else []))
        if inner is not None:
            d_lr = -(dout * inner).sum(0)
            d_lr = d_lr.sum() if lr.dim() == 0 else d_lr
    if need_scale:
        inner = _total(([rate * a_grads] if has_grads else []) + ([grads * a_lr] if has_lr else []))
        if inner is not None:
            d_scale = -(dout * inner).sum(1)
    return d_dout, d_grads, d_lr, None, d_scale, None, None, None, None, None


inner_update_backward_op.register_autograd(_update_double_backward, setup_context=_backward_setup)


def inner_update(
    theta: Tensor, grads: Tensor, lr: float | Tensor, max_norm: float = 0.0, *, backend: str | None = None
) -> Tensor:
    """out [T, P] = theta(_t) − lr ⊙ g_t for every task copy, in one fused launch on the Triton path.

    theta: shared [P] or per task [T, P]; grads: [T, P]; lr: a number, a 0-d tensor or per parameter
    [P] (Meta-SGD; may require grad). max_norm > 0 first scales each task's g_t by
    min(1, max_norm / (‖g_t‖ + 1e-6)). Differentiable to any order in theta, grads and lr.
    backend: "triton", "reference" or "auto" (default: $METAGAN_KERNELS, else auto).
    """
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (0 turns clipping off), got {max_norm}")
    chosen = resolve_backend(backend, grads)
    lr_tensor, lr_value = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
    scale = clip_factors(grads, max_norm, backend=chosen) if max_norm > 0 else None
    return inner_update_op(theta, grads, lr_tensor, lr_value, scale, chosen)
