"""Per-task gradient-norm clipping factors s_t = min(1, max_norm / (‖g_t‖ + 1e-6)) for grads [T, P].

Pass one of the two-pass clipped update: two launches give the row norms (per-chunk sums of
squares in fp32, then one program per task adds its chunks, so the result is deterministic);
inner_update.py folds s_t into its single update launch (pass two). Registered as the op
metagan::row_norms with a differentiable backward, so clipping works under second-order MAML.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import check_same_kind, check_triton_can_run, device_guard, resolve_backend

BLOCK = 2048  # columns a program reads per iteration
BLOCKS_PER_CHUNK = 8  # iterations per program: one partial sum covers BLOCK * BLOCKS_PER_CHUNK columns
FINISH_BLOCK = 1024  # partial sums the finishing program adds per iteration
CLIP_EPS = 1e-6


@triton.jit(do_not_specialize=["T", "n_chunks"])
def _row_sumsq_kernel(x_ptr, partial_ptr, T, P, n_chunks, BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr):
    # One program per (row, chunk of columns): the chunk's sum of squares, accumulated in fp32.
    pid = tl.program_id(0)
    row = pid % T
    chunk = pid // T
    row_ptr = x_ptr + row.to(tl.int64) * P
    start = chunk.to(tl.int64) * (BLOCK * BLOCKS_PER_CHUNK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(BLOCKS_PER_CHUNK):
        cols = start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < P, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + row.to(tl.int64) * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["n_chunks"])
def _finish_norms_kernel(partial_ptr, norms_ptr, n_chunks, FINISH_BLOCK: tl.constexpr):
    # One program per row: add its partial sums in a fixed order, then the square root.
    row = tl.program_id(0)
    row_ptr = partial_ptr + row.to(tl.int64) * n_chunks
    acc = tl.zeros([FINISH_BLOCK], dtype=tl.float32)
    for start in range(0, n_chunks, FINISH_BLOCK):
        idx = start + tl.arange(0, FINISH_BLOCK)
        acc += tl.load(row_ptr + idx, mask=idx < n_chunks, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(norms_ptr + row, tl.sqrt(total).to(norms_ptr.dtype.element_ty))


def _row_norms_triton(x: Tensor) -> Tensor:
    """‖x_t‖ for each row of x [T, P], in two deterministic launches (x copied if not contiguous)."""
    check_triton_can_run(_row_sumsq_kernel, x)
    x = x.contiguous()
    tasks, params = x.shape
    norms = x.new_empty(tasks)
    if tasks == 0:
        return norms
    n_chunks = max(1, triton.cdiv(params, BLOCK * BLOCKS_PER_CHUNK))
    partial = torch.empty(tasks, n_chunks, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _row_sumsq_kernel[(tasks * n_chunks,)](
            x, partial, tasks, params, n_chunks, BLOCK=BLOCK, BLOCKS_PER_CHUNK=BLOCKS_PER_CHUNK, num_warps=8
        )
        _finish_norms_kernel[(tasks,)](partial, norms, n_chunks, FINISH_BLOCK=FINISH_BLOCK, num_warps=4)
    return norms


def _check_rows(x: Tensor, backend: str) -> None:
    check_same_kind("x", x)
    if x.dim() != 2:
        raise ValueError(f"row_norms takes a [T, P] buffer, got shape {tuple(x.shape)}")
    if backend not in ("triton", "reference"):
        raise ValueError(f"row_norms runs the 'triton' or 'reference' backend, got {backend!r}")


@torch.library.custom_op("metagan::row_norms", mutates_args=())
def row_norms_op(x: Tensor, backend: str) -> Tensor:
    """Euclidean norm of each row of x [T, P] -> [T] (dtype of x, accumulated in fp32 by Triton)."""
    _check_rows(x, backend)
    if backend == "triton":
        return _row_norms_triton(x)
    return torch.linalg.vector_norm(x, dim=1)


@row_norms_op.register_fake
def _row_norms_fake(x: Tensor, backend: str) -> Tensor:
    _check_rows(x, backend)
    return x.new_empty(x.shape[0])


def _row_norms_setup(ctx, inputs, output) -> None:
    x, _ = inputs
    ctx.save_for_backward(x, output)


def _row_norms_backward(ctx, grad_norms: Tensor):
    # d‖x_t‖/dx_t = x_t / ‖x_t‖ (0 for a zero row). Plain torch ops on x and the saved output, so a
    # second backward differentiates through them (and through row_norms again for the norms).
    x, norms = ctx.saved_tensors
    zero = norms == 0
    coef = torch.where(zero, torch.zeros_like(norms), grad_norms / torch.where(zero, torch.ones_like(norms), norms))
    return coef[:, None] * x, None


row_norms_op.register_autograd(_row_norms_backward, setup_context=_row_norms_setup)


def clip_factors(grads: Tensor, max_norm: float, *, backend: str | None = None) -> Tensor:
    """Per-task factors [T] that scale each g_t to norm at most max_norm: min(1, max_norm / (‖g_t‖ + 1e-6))."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive to clip, got {max_norm}")
    norms = row_norms_op(grads, resolve_backend(backend, grads))
    return (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)

