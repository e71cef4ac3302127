"""Which implementation a kernel op runs (Triton or torch reference), and the input checks they share.

Backends: "triton" (the fused kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set
before `kernels` was imported), "reference" (the same formulas in plain torch ops), "auto" (Triton on
CUDA tensors, the reference elsewhere). The environment variable METAGAN_KERNELS sets the default,
so `METAGAN_KERNELS=reference` forces the torch reference everywhere; a `backend=` argument wins.
"""

import contextlib
import os

import torch
import triton
from torch import Tensor

ENV_VAR = "METAGAN_KERNELS"
BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes the tests cover; fp32 arithmetic inside
MAX_GRID = 2**31 - 1  # programs a Triton launch grid holds along its first axis


def resolve_backend(backend: str | None, like: Tensor) -> str:
    """"triton" or "reference" for tensors like `like`: the argument, else $METAGAN_KERNELS, else auto.

    auto picks Triton for CUDA tensors of a kernel dtype (float64 stays on the reference).
    """
    choice = backend or os.environ.get(ENV_VAR) or "auto"
    if choice not in BACKENDS:
        source = "backend argument" if backend else f"${ENV_VAR}"
        raise ValueError(f"unknown kernel backend {choice!r} from the {source}; expected one of {BACKENDS}")
    if choice == "auto":
        return "triton" if like.is_cuda and like.dtype in TRITON_DTYPES else "reference"
    return choice


def is_interpreted(kernel: object) -> bool:
    """True when a @triton.jit kernel runs in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_triton_can_run(kernel: object, tensor: Tensor) -> None:
    """Clear error instead of a crash when the Triton path gets tensors it cannot run on."""
    if tensor.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton kernels take {TRITON_DTYPES}, got {tensor.dtype}; use backend='reference'")
    if not tensor.is_cuda and not is_interpreted(kernel):
        raise RuntimeError(
            f"the 'triton' kernel backend needs CUDA tensors, got {tensor.device}; on the CPU use "
            f"backend='reference' (the default there), or set TRITON_INTERPRET=1 before importing kernels"
        )


def task_block_programs(tasks: int, params: int, block: int) -> int:
    """Programs of a launch with one program per (task, block of `block` parameters) over a [tasks, params]
    buffer; a clear error where that is more than a grid holds."""
    programs = tasks * triton.cdiv(params, block)
    if programs > MAX_GRID:
        raise ValueError(f"[T, P] = {(tasks, params)} needs {programs} programs of {block} parameters, more than "
                         f"the {MAX_GRID} a launch grid holds")
    return programs


def device_guard(tensor: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensor's (matters for cuda:1, ...)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_same_kind(reference_name: str, reference: Tensor, **others: Tensor | None) -> None:
    """Every given tensor must share the reference tensor's floating dtype and device."""
    if not reference.is_floating_point():
        raise TypeError(f"{reference_name} must be a floating-point tensor, got {reference.dtype}")
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{name} is {tensor.dtype} but {reference_name} is {reference.dtype}; they must match")
        if tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")
