"""Flat parameters: a network's parameters as one vector [P], task copies as [T, P].

The inner update, the Reptile reduction and the all-reduce all work on these flat buffers, so
none of them cares how many tensors a network has. `BatchedNet` runs T task copies of a module
at once from a [T, P] buffer with torch.func (vmap over functional_call), not a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap


class FlatLayout:
    """Where each named parameter of a module lives in its flat vector."""

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size]):
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    @classmethod
    def of(cls, module: nn.Module) -> FlatLayout:
        """The layout of `module.named_parameters()`, in that order."""
        named = list(module.named_parameters())
        return cls([n for n, _ in named], [p.shape for _, p in named])

    def flatten(self, tensors: Iterable[Tensor]) -> Tensor:
        """Concatenate tensors shaped like the parameters (in order) into one [P] vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of a [..., P] buffer shaped [..., *shape], one per parameter, in order."""
        if flat.shape[-1] != self.numel:
            raise ValueError(f"flat buffer has {flat.shape[-1]} values per copy, the layout needs {self.numel}")
        lead = flat.shape[:-1]
        return [chunk.view(*lead, *shape) for chunk, shape in zip(flat.split(self.sizes, dim=-1), self.shapes)]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """`split` as a name -> view dict, the form functional_call takes."""
        return dict(zip(self.names, self.split(flat)))


def _check_no_running_stats(module: nn.Module, role: str) -> None:
    """Refuse BatchNorm with running statistics: one running mean shared by all task copies
    would leak between tasks and make the adapted networks depend on the order of tasks."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
            raise ValueError(
                f"{role} layer '{name}' is a BatchNorm with running statistics, which breaks per-task "
                f"adaptation; use GroupNorm/LayerNorm, no norm, or track_running_stats=False"
            )


class BatchedNet:
    """A module used as a functional template: forward T task copies from a [T, P] buffer."""

    def __init__(self, module: nn.Module, role: str = "network"):
        _check_no_running_stats(module, role)
        self.module = module
        self.layout = FlatLayout.of(module)

    def __call__(self, flat: Tensor, x: Tensor) -> Tensor:
        """flat [T, P], x [T, n, ...] -> [T, n, ...]: copy t runs on x[t] with parameters flat[t]."""

        def one_task(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(self.module, params, (inputs,))

        return vmap(one_task)(self.layout.views(flat), x)

    def flat_parameters(self) -> Tensor:
        """The module's current parameters as one detached [P] vector."""
        return self.layout.flatten(p.detach() for p in self.module.parameters())
