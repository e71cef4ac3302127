"""Flat parameters: a network's parameters as one vector [P], task copies as [T, P].

The inner update, the Reptile reduction and the all-reduce all work on these flat buffers, so
none of them cares how many tensors a network has. `BatchedNet` runs T task copies of a module
at once from a [T, P] buffer with torch.func (vmap over functional_call), not a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap


class FlatLayout:
    """Where each named parameter of a module lives in its flat vector, and in which order of its values.

    A parameter marked `transposed` (2-D) is stored column by column, as its transpose's contiguous
    values. `FlatLayout.of` marks nn.Linear weights: autograd's gradient of an F.linear weight is the
    transpose of a contiguous [in, out] product, so stored transposed it goes into the flat buffer as a
    straight copy instead of a strided transpose (benchmarks/RESULTS.md, issue 11). Views and
    gradients still have the parameter's own shape; only the flat order differs.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], transposed: Sequence[bool] | None = None):
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)
        self.transposed = [False] * len(self.shapes) if transposed is None else list(transposed)
        if len(self.transposed) != len(self.shapes):
            raise ValueError(f"{len(self.transposed)} transposed flags for {len(self.shapes)} parameters")
        for name, shape, flag in zip(self.names, self.shapes, self.transposed):
            if flag and len(shape) != 2:
                raise ValueError(f"only a 2-D parameter can be stored transposed; {name!r} has shape {tuple(shape)}")

    @classmethod
    def of(cls, module: nn.Module) -> FlatLayout:
        """The layout of `module.named_parameters()`, in that order, with nn.Linear weights stored transposed."""
        linear = {f"{name}.weight" if name else "weight" for name, sub in module.named_modules()
                  if isinstance(sub, nn.Linear)}
        named = list(module.named_parameters())
        return cls([n for n, _ in named], [p.shape for _, p in named], [n in linear for n, _ in named])

    def from_untransposed(self, flat: Tensor) -> Tensor:
        """A [..., P] buffer with every parameter in its own order (no weight transposed: the flat format of
        checkpoints before version 3, or a per-parameter concatenation) in this layout's order; a new buffer."""
        return self.flatten(FlatLayout(self.names, self.shapes).split(flat))

    def flatten(self, tensors: Iterable[Tensor | None]) -> Tensor:
        """Tensors shaped like the parameters (in order), with the same leading dims [*lead] (e.g. [T]),
        into one new [*lead, P] buffer; None counts as zeros.

        Each tensor is copied once, straight into its slice, whatever its strides (a transposed
        weight gradient is not made contiguous first and then concatenated). Differentiable to any
        order: its backward is `unflatten`.
        """
        return _Flatten.apply(self, *tensors)

    def unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Views [*lead, *shape] of a [*lead, P] buffer, one per parameter, in order; no copy.

        Unlike `split`, the backward writes the gradients into one flat buffer with `flatten`
        (one copy each) instead of reshaping each and concatenating them. Differentiable to any order.
        """
        return _Unflatten.apply(self, flat)

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of a [..., P] buffer shaped [..., *shape], one per parameter, in order."""
        if flat.shape[-1] != self.numel:
            raise ValueError(f"flat buffer has {flat.shape[-1]} values per copy, the layout needs {self.numel}")
        lead = flat.shape[:-1]
        return [chunk.view(*lead, *shape[::-1]).transpose(-1, -2) if flag else chunk.view(*lead, *shape)
                for chunk, shape, flag in zip(flat.split(self.sizes, dim=-1), self.shapes, self.transposed)]

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """`split` as a name -> view dict, the form functional_call takes."""
        return dict(zip(self.names, self.split(flat)))


class _Flatten(torch.autograd.Function):
    """FlatLayout.flatten as an autograd function whose backward is _Unflatten (so any order works).

    With setup_context, torch.func.grad can differentiate through it too (a per-task loss built
    from a BatchedNet call); it has no vmap rule, so it runs outside vmap, on all tasks at once.
    """

    @staticmethod
    def forward(layout: FlatLayout, *tensors: Tensor | None) -> Tensor:
        index, like = next((i, t) for i, t in enumerate(tensors) if t is not None)
        lead = like.shape[: like.dim() - len(layout.shapes[index])]
        flat = like.new_empty(*lead, layout.numel)
        for slot, tensor in zip(layout.split(flat), tensors):
            if tensor is None:
                slot.zero_()
            else:
                slot.copy_(tensor)
        return flat

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.layout = inputs[0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return None, *_Unflatten.apply(ctx.layout, grad)


class _Unflatten(torch.autograd.Function):
    """FlatLayout.unflatten as an autograd function whose backward is _Flatten (so any order works)."""

    @staticmethod
    def forward(layout: FlatLayout, flat: Tensor) -> tuple[Tensor, ...]:
        return tuple(layout.split(flat))

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        ctx.layout = inputs[0]

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, Tensor]:
        return None, _Flatten.apply(ctx.layout, *grads)


def _check_no_running_stats(module: nn.Module, role: str) -> None:
    """Refuse BatchNorm with running statistics: one running mean shared by all task copies
    would leak between tasks and make the adapted networks depend on the order of tasks."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
            raise ValueError(
                f"{role} layer '{name}' is a BatchNorm with running statistics, which breaks per-task "
                f"adaptation; use GroupNorm/LayerNorm, no norm, or track_running_stats=False"
            )


def task_dim(flat: Tensor) -> int | None:
    """vmap's in_dim of a flat buffer: 0 for task copies [T, P], None for one vector [P] shared by all tasks."""
    return 0 if flat.dim() == 2 else None


class Unflattened(NamedTuple):
    """A flat buffer ([P] shared by all tasks, or [T, P]) with its per-parameter views, unflattened once.

    Why once: consumers that share the views add up their gradients per parameter, and autograd
    flattens the sum into one [T, P] gradient after the last consumer, once the buffer itself can be
    freed. Unflattened once per consumer, each consumer's [T, P] gradient is flattened (a new buffer
    next to the per-parameter gradients) while the buffer is still alive: the peak memory of the
    meta-step (benchmarks/RESULTS.md, issue 11).
    """

    flat: Tensor
    params: tuple[Tensor, ...]

    @property
    def in_dim(self) -> int | None:
        """vmap's in_dim of the views (`task_dim` of the buffer)."""
        return task_dim(self.flat)


class BatchedNet:
    """A module used as a functional template: forward T task copies from a [T, P] buffer.

    A shared [P] buffer is passed to vmap unbatched, so every task's layer runs as ONE matmul over
    all tasks' inputs instead of T matmuls against T copies of the same weights.
    """

    def __init__(self, module: nn.Module, role: str = "network"):
        _check_no_running_stats(module, role)
        self.module = module
        self.layout = FlatLayout.of(module)

    def unflatten(self, theta: Tensor | Unflattened) -> Unflattened:
        """A flat buffer with its views (`FlatLayout.unflatten`); one that has them already, as it is."""
        return theta if isinstance(theta, Unflattened) else Unflattened(theta, self.layout.unflatten(theta))

    def __call__(self, theta: Tensor | Unflattened, *inputs: Tensor) -> Tensor:
        """theta [T, P] or shared [P] (or either with its views), inputs [T, ...] each -> [T, n, ...]: task t
        runs on its inputs with theta[t] (or theta)."""
        theta = self.unflatten(theta)
        in_dims = (theta.in_dim,) + (0,) * len(inputs)
        return vmap(self.single, in_dims=in_dims)(theta.params, *inputs)

    def single(self, params: Sequence[Tensor], *inputs: Tensor) -> Tensor:
        """One task: its parameters (FlatLayout.unflatten of its [P]), inputs (e.g. x [n, ...]) -> [n, ...].

        This is what vmap maps over tasks and what torch.func.grad differentiates per task.
        """
        return functional_call(self.module, dict(zip(self.layout.names, params)), inputs)

    def flat_parameters(self) -> Tensor:
        """The module's current parameters as one detached [P] vector."""
        return self.layout.flatten(p.detach() for p in self.module.parameters())
