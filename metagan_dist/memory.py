"""Memory of a meta-step: keep freed CPU memory in the process, and measure a call's peak tensor memory.

A meta-step allocates and frees the same [C, P] buffers every step. By default glibc serves blocks
above a threshold (128 KiB to 32 MiB, adjusted as it goes) with mmap and unmaps them when freed,
and trims the heap's free top back to the OS, so the next step faults every page in again from
zeroed memory. On the 2-core CPU that was more than half of the eager step's time at T = 64 (minor
faults and system time in benchmarks/RESULTS.md). `keep_freed_memory` turns both off: every block comes from
the heap and the heap never shrinks. Resident memory then stays at the highest it has been, which a
training process returns to on every step anyway. Other C libraries (musl, macOS): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
NEVER_TRIM = 2**31 - 1  # the largest trim threshold mallopt takes (an int)


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to never mmap blocks and never trim the heap; False where that is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # not glibc
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def peak_tensor_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory allocated during one call of `fn`, above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: every allocation and free of torch's CPU allocator,
    recorded by the profiler and replayed in time order (no timing involved, so it does not depend
    on the machine's load). Tensors only: not Python objects, not memory the allocator keeps spare.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
