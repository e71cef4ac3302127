"""The meta-parameters and the outer optimizer that steps them: torch Adam or a DeepSpeed engine.

Both engines take the same input, this rank's SUM of meta-gradients over its tasks and the global
task count, and leave identical meta-parameters on every rank.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from metagan_dist.config import OptimConfig
from metagan_dist.distributed import DistContext, all_reduce_sum_
from metagan_dist.meta import MetaGradients


class MetaParameters(nn.Module):
    """Everything the outer loop learns, as flat fp32 vectors: θ_G, θ_D and Meta-SGD's rates."""

    def __init__(self, theta_g: Tensor, theta_d: Tensor, inner_lr: float | None = None):
        super().__init__()
        self.generator = nn.Parameter(theta_g.detach().float().clone())
        self.discriminator = nn.Parameter(theta_d.detach().float().clone())
        self.generator_lr = self.discriminator_lr = None
        if inner_lr is not None:  # Meta-SGD: one learned inner rate per parameter
            self.generator_lr = nn.Parameter(torch.full_like(self.generator, inner_lr))
            self.discriminator_lr = nn.Parameter(torch.full_like(self.discriminator, inner_lr))

    def inner_lrs(self) -> tuple[Tensor, Tensor] | None:
        if self.generator_lr is None:
            return None
        return self.generator_lr, self.discriminator_lr

    def flat(self) -> Tensor:
        """All meta-parameters in MetaGradients.flat order, detached (for checksums)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])


def _assign_grads(params: MetaParameters, flat_grad: Tensor) -> None:
    for p, g in zip(params.parameters(), flat_grad.split([p.numel() for p in params.parameters()])):
        p.grad = g.view_as(p)


class TorchEngine:
    """Adam on the meta-parameters; the meta-gradient is all-reduced here, in buckets."""

    def __init__(self, params: MetaParameters, optim: OptimConfig, ctx: DistContext, bucket_mb: float):
        self.params = params
        self.clip = optim.grad_clip
        self.bucket_numel = int(bucket_mb * 2**20 / 4)
        fused = ctx.device.type == "cuda"
        self.optimizer = torch.optim.Adam(
            params.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
            weight_decay=optim.weight_decay, fused=fused or None, foreach=None if fused else True,
        )

    def step(self, grad_sum: Tensor, global_tasks: int) -> Tensor:
        """Average this rank's gradient sum over all ranks' tasks, take one Adam step; returns the average."""
        grad = all_reduce_sum_(grad_sum, self.bucket_numel).div_(global_tasks)
        _assign_grads(self.params, grad)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad

    def save(self, folder: Path, is_main: bool) -> None:
        if is_main:
            torch.save({"params": self.params.state_dict(), "optimizer": self.optimizer.state_dict()}, folder / "engine.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "engine.pt", map_location="cpu", weights_only=True)
        self.params.load_state_dict(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])


def load_meta_parameters(folder: Path) -> MetaParameters:
    """The meta-parameters of a checkpoint folder written by either engine (on the CPU)."""
    torch_file, deepspeed_file = folder / "engine.pt", folder / "mp_rank_00_model_states.pt"
    if torch_file.is_file():
        state = torch.load(torch_file, map_location="cpu", weights_only=True)["params"]
    elif deepspeed_file.is_file():
        state = torch.load(deepspeed_file, map_location="cpu", weights_only=False)["module"]
    else:
        raise FileNotFoundError(f"{folder} holds neither engine.pt (engine=torch) nor {deepspeed_file.name} (deepspeed)")
    lr = 0.0 if "generator_lr" in state else None
    params = MetaParameters(state["generator"], state["discriminator"], inner_lr=lr)
    params.load_state_dict(state)
    return params


class DeepSpeedEngine:
    """`deepspeed.initialize` on the meta-parameters (ZeRO 1/2 from a JSON config).

    DeepSpeed averages gradients over ranks itself; we hand it each rank's sum scaled by
    world_size / global_tasks, so its average is the mean over all tasks. The meta-gradient enters
    through a surrogate loss <θ, g> whose gradient w.r.t. θ is g.
    """

    def __init__(self, params: MetaParameters, optim: OptimConfig, ctx: DistContext, config_path: str):
        import deepspeed

        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"engine.deepspeed_config: {path} does not exist")
        ds_config = json.loads(path.read_text())
        # Clipping and the outer optimizer come from our config, so both engines read the same keys;
        # clipping is always set, since DeepSpeed silently clips at 1.0 when the JSON leaves it out.
        clipping = ds_config.get("gradient_clipping", optim.grad_clip)
        if clipping != optim.grad_clip:
            raise ValueError(f"{path} sets gradient_clipping={clipping} but optim.grad_clip={optim.grad_clip}; "
                             f"set clipping once, with optim.grad_clip")
        ds_config["gradient_clipping"] = optim.grad_clip
        ds_config.setdefault("train_micro_batch_size_per_gpu", 1)
        ds_config.setdefault("gradient_accumulation_steps", 1)
        ds_config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "weight_decay": optim.weight_decay,
                       "torch_adam": True},
        }
        self.world_size = ctx.world_size
        self.params = params
        self.engine, *_ = deepspeed.initialize(model=params, model_parameters=params.parameters(), config=ds_config)

    def step(self, grad_sum: Tensor, global_tasks: int) -> None:
        """Hand DeepSpeed this rank's share of the mean gradient; it reduces over ranks and steps.

        Returns None: the averaged gradient lives in DeepSpeed's (possibly partitioned) buffers.
        """
        grad = grad_sum * (self.world_size / global_tasks)
        flat = torch.cat([p.reshape(-1) for p in self.engine.module.parameters()])
        self.engine.backward((flat * grad).sum())
        self.engine.step()

    def save(self, folder: Path, is_main: bool) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")


def build_engine(params: MetaParameters, name: str, optim: OptimConfig, ctx: DistContext, ds_config: str, bucket_mb: float):
    """The outer optimizer named by engine.name."""
    if name == "deepspeed":
        return DeepSpeedEngine(params, optim, ctx, ds_config)
    return TorchEngine(params, optim, ctx, bucket_mb)


@dataclass
class StepOutcome:
    """What all ranks agreed on for one meta-step."""

    applied: bool  # False: some rank's meta-gradient or loss was NaN/Inf, so nobody stepped
    stop: bool  # some rank received SIGTERM/SIGUSR1
    tasks: int  # tasks over all ranks
    loss_g: float  # query-set L_G, mean over all tasks
    loss_d: float
    gradient: Tensor | None  # the mean meta-gradient applied (torch engine), else None


def agree_and_step(engine: TorchEngine | DeepSpeedEngine, grads: MetaGradients, stop: bool, device: torch.device) -> StepOutcome:
    """Agree across ranks on (tasks, non-finite, stop, losses), then step the engine unless any rank
    saw a non-finite value: every rank skips such a step together and the meta-parameters stay put."""
    finite = bool(torch.isfinite(grads.flat).all()) and math.isfinite(grads.loss_g) and math.isfinite(grads.loss_d)
    stats = torch.tensor(
        [grads.tasks, float(not finite), float(stop), float(grads.loss_g), float(grads.loss_d)],
        dtype=torch.float64, device=device,
    )
    tasks, bad, stopping, loss_g, loss_d = all_reduce_sum_(stats).tolist()
    applied = bad == 0
    gradient = engine.step(grads.flat, int(tasks)) if applied else None
    return StepOutcome(applied, stopping > 0, int(tasks), loss_g / tasks, loss_d / tasks, gradient)
