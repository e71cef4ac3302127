"""Fused inner-loop kernels: one launch updates every parameter of every task copy.

Each op lives in its own file with its Triton kernel, launcher, torch.library registration
(autograd formula included) and torch reference. `kernels.dispatch` picks the implementation:
Triton on CUDA tensors, the torch reference elsewhere; METAGAN_KERNELS=reference forces the reference.
"""

from kernels.adam import inner_adam
from kernels.dispatch import BACKENDS, ENV_VAR
from kernels.grad_clip import clip_factors
from kernels.update import inner_update
from kernels.reptile import reptile_delta

__all__ = ["BACKENDS", "ENV_VAR", "clip_factors", "inner_adam", "inner_update", "reptile_delta"]
