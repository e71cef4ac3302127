"""Count the CUDA kernels a call launches: the benchmark reports it, a test holds it to one per update."""

from collections.abc import Callable

import torch


def cuda_launches(fn: Callable[[], object]) -> int:
    """Kernels launched by one call of `fn` (after a warm-up call, so compilation is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
