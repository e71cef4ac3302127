"""The meta-parameters and the outer step that updates them: one torch optimizer, two engines.

Both engines take the same input, this rank's SUM of meta-gradients over its tasks and the global
task count, and leave identical meta-parameters on every rank. Both step the SAME optimizer, built
here from `optim.*` (AdamW, i.e. Adam with decoupled weight decay, or plain SGD) with the same
learning-rate schedule: the torch engine steps it itself; the DeepSpeed engine receives it (and the
scheduler) through `deepspeed.initialize` and runs it inside ZeRO. Clipping uses one formula in
both (DeepSpeed's: g · c / (‖g‖ + 1e-6) when that is below 1), and both report the norm of the mean
meta-gradient BEFORE clipping.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from metagan_dist.config import OptimConfig
from metagan_dist.distributed import DistContext, agree, all_reduce_sum_
from metagan_dist.meta import MetaGradients

CLIP_EPS = 1e-6  # added to the norm before dividing, as torch's clip_grad_norm_ and DeepSpeed do


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


def build_optimizer(params: MetaParameters, optim: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The outer optimizer of both engines: AdamW or plain SGD, weight decay on θ_G and θ_D only.

    Meta-SGD's inner rates are a group of their own without weight decay: decaying them would pull
    every inner learning rate towards 0. For plain SGD, torch's weight_decay (added to the
    gradient) is the same update as decoupled decay: θ ← θ(1 − lr·wd) − lr·g.
    """
    groups = [{"params": [params.generator, params.discriminator], "weight_decay": optim.weight_decay}]
    if params.generator_lr is not None:
        groups.append({"params": [params.generator_lr, params.discriminator_lr], "weight_decay": 0.0})
    kernel = {"fused": True} if fused else {"foreach": True}
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=0.0, **kernel)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), **kernel)


def schedule_factor(name: str, total_steps: int | None) -> Callable[[int], float]:
    """The learning rate of optimizer step n+1 as a multiple of optim.lr (n steps taken so far)."""
    if name == "constant":
        return lambda taken: 1.0
    if total_steps is None or total_steps < 1:
        raise ValueError(f"optim.schedule={name} needs the run's length (run.steps), got {total_steps}")
    if name == "linear":
        return lambda taken: max(0.0, 1.0 - taken / total_steps)
    if name == "cosine":
        return lambda taken: 0.5 * (1.0 + math.cos(math.pi * min(taken, total_steps) / total_steps))
    raise ValueError(f"unknown optim.schedule {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """optim.schedule over applied optimizer steps (skipped steps do not advance it, as in DeepSpeed)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(optim.schedule, total_steps))


@dataclass
class StepStats:
    """What one applied outer step saw: the norm of the mean meta-gradient before clipping, whether
    clipping scaled it down, and the learning rate it stepped with. The norm is None only if
    DeepSpeed did not compute one."""

    grad_norm: float | None
    clipped: bool
    lr: float | None


def _assign_grads(params: MetaParameters, flat_grad: Tensor) -> None:
    for p, g in zip(params.parameters(), flat_grad.split([p.numel() for p in params.parameters()])):
        p.grad = g.view_as(p)


class TorchEngine:
    """The outer optimizer stepped directly; the meta-gradient is all-reduced here, in buckets."""

    def __init__(self, params: MetaParameters, optim: OptimConfig, ctx: DistContext, bucket_mb: float,
                 total_steps: int | None = None):
        self.params = params
        self.clip = optim.grad_clip
        self.bucket_numel = int(bucket_mb * 2**20 / 4)
        self.optimizer = build_optimizer(params, optim, fused=ctx.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)

    def step(self, grad_sum: Tensor, global_tasks: int) -> StepStats:
        """Average this rank's gradient sum over all ranks' tasks, clip, take one optimizer step."""
        grad = all_reduce_sum_(grad_sum, self.bucket_numel).div_(global_tasks)
        norm = torch.linalg.vector_norm(grad, dtype=torch.float64).item()
        clipped = self.clip > 0 and norm + CLIP_EPS > self.clip
        if clipped:
            grad.mul_(self.clip / (norm + CLIP_EPS))
        _assign_grads(self.params, grad)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(norm, clipped, lr)

    def save(self, folder: Path, is_main: bool) -> None:
        if is_main:
            torch.save({"params": self.params.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / "engine.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "engine.pt", map_location="cpu", weights_only=True)
        self.params.load_state_dict(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


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


def read_deepspeed_config(path: str | Path, optim: OptimConfig) -> dict:
    """The DeepSpeed JSON of engine.deepspeed_config, checked and completed from optim.*.

    Local work only (no collective), so that a problem on any rank is agreed during set-up. The
    optimizer and scheduler come from optim.* and must not be in the JSON; clipping is always set,
    since DeepSpeed silently clips at 1.0 when the JSON leaves it out.
    """
    try:  # checked here, during set-up, rather than inside a collective
        importlib.import_module("deepspeed")
    except ImportError as err:
        raise ImportError(f"engine.name=deepspeed needs the deepspeed package (pip install deepspeed): {err}") from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"engine.deepspeed_config: {path} does not exist")
    try:
        ds_config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"engine.deepspeed_config: {path} is not valid JSON: {err}") from None
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise ValueError(f"{path} sets '{section}', but both engines take the outer optimizer and its schedule "
                             f"from optim.* (optim.name, optim.lr, optim.schedule, ...): remove '{section}'")
    clipping = ds_config.get("gradient_clipping", optim.grad_clip)
    if clipping != optim.grad_clip:
        raise ValueError(f"{path} sets gradient_clipping={clipping} but optim.grad_clip={optim.grad_clip}; "
                         f"set clipping once, with optim.grad_clip")
    ds_config["gradient_clipping"] = optim.grad_clip
    ds_config.setdefault("train_micro_batch_size_per_gpu", 1)
    ds_config.setdefault("gradient_accumulation_steps", 1)
    if optim.name == "sgd":  # not on ZeRO's list of tested optimizers; elementwise, so partitioning is exact
        ds_config["zero_allow_untested_optimizer"] = True
    return ds_config


class DeepSpeedEngine:
    """`deepspeed.initialize` on the meta-parameters with our optimizer and scheduler (ZeRO 1/2).

    DeepSpeed averages gradients over ranks itself; we hand it each rank's sum scaled by
    world_size / global_tasks, so its average is the mean over all tasks. The meta-gradient enters
    through a surrogate loss <θ, g> whose gradient w.r.t. θ is g.
    """

    def __init__(self, params: MetaParameters, optim: OptimConfig, ctx: DistContext, ds_config: dict,
                 total_steps: int | None = None):
        import deepspeed

        self.world_size = ctx.world_size
        self.params = params
        self.clip = optim.grad_clip
        optimizer = build_optimizer(params, optim)
        scheduler = build_scheduler(optimizer, optim, total_steps)
        self.engine, *_ = deepspeed.initialize(model=params, model_parameters=params.parameters(), config=ds_config,
                                               optimizer=optimizer, lr_scheduler=scheduler)

    def step(self, grad_sum: Tensor, global_tasks: int) -> StepStats:
        """Hand DeepSpeed this rank's share of the mean gradient; it reduces over ranks, clips and steps."""
        grad = grad_sum * (self.world_size / global_tasks)
        flat = torch.cat([p.reshape(-1) for p in self.engine.module.parameters()])
        lr = self.engine.get_lr()[0]
        self.engine.backward((flat * grad).sum())
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return StepStats(norm, norm is not None and self.clip > 0 and norm + CLIP_EPS > self.clip, lr)

    def save(self, folder: Path, is_main: bool) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}")


Engine = TorchEngine | DeepSpeedEngine


def build_engine(params: MetaParameters, name: str, optim: OptimConfig, ctx: DistContext, *,
                 total_steps: int, bucket_mb: float, ds_config: dict | None = None) -> Engine:
    """The outer step named by engine.name (deepspeed: `ds_config` from read_deepspeed_config)."""
    if name == "deepspeed":
        if ds_config is None:
            raise ValueError("engine.name=deepspeed needs its JSON config (read_deepspeed_config)")
        return DeepSpeedEngine(params, optim, ctx, ds_config, total_steps)
    return TorchEngine(params, optim, ctx, bucket_mb, total_steps)


@dataclass
class StepOutcome:
    """What all ranks agreed on for one meta-step."""

    applied: bool  # False: some rank's meta-gradient or loss was NaN/Inf, so nobody stepped
    stop: bool  # some rank received SIGTERM/SIGUSR1
    tasks: int  # tasks over all ranks
    loss_g: float  # query-set L_G, mean over all tasks
    loss_d: float
    grad_norm: float | None  # norm of the mean meta-gradient before clipping (None when not applied)
    clipped: bool  # clipping scaled the meta-gradient down
    lr: float | None  # the outer learning rate of this step (None when not applied)


def agree_and_step(engine: Engine, grads: MetaGradients, stop: bool, device: torch.device) -> StepOutcome:
    """Agree across ranks on (tasks, non-finite, stop, losses), then step the engine unless any rank
    saw a non-finite value: every rank skips such a step together and the meta-parameters stay put.

    A rank that failed to produce its meta-gradient calls `fail_step` instead, at the same point:
    then every rank raises the same AgreedError, with that rank's message.
    """
    finite = bool(torch.isfinite(grads.flat).all()) and math.isfinite(grads.loss_g) and math.isfinite(grads.loss_d)
    stats = torch.tensor(
        [grads.tasks, float(not finite), float(stop), float(grads.loss_g), float(grads.loss_d), 0.0],
        dtype=torch.float64, device=device,
    )
    tasks, bad, stopping, loss_g, loss_d, failed = all_reduce_sum_(stats).tolist()
    if failed:
        agree("a meta-step", None)  # raises the failed rank's error on this rank too
    applied = bad == 0
    stepped = engine.step(grads.flat, int(tasks)) if applied else StepStats(None, False, None)
    return StepOutcome(applied, stopping > 0, int(tasks), loss_g / tasks, loss_d / tasks, stepped.grad_norm,
                       stepped.clipped, stepped.lr)


def fail_step(error: BaseException, device: torch.device) -> None:
    """This rank's part of a meta-step it could not compute (e.g. a shard broke mid-run): join the
    step's agreement, then raise AgreedError with this rank's message on every rank, instead of
    leaving the others waiting in the all-reduce. Never returns."""
    all_reduce_sum_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=device))
    agree("a meta-step", error)
