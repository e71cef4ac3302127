"""Meta-gradients of a GAN over T task copies at once: MAML, first-order MAML, Reptile, Meta-SGD.

One inner step, for every task copy at once (DESIGN.md):

    θ_G^i ← θ_G^i − α ∂L_G(θ_G^i, θ_D^i)/∂θ_G      generator first
    θ_D^i ← θ_D^i − α ∂L_D(θ_G^i, θ_D^i)/∂θ_D      discriminator against the adapted generator

Both are PARTIAL derivatives. `torch.autograd.grad(L_D, θ_D^i)` would silently return a total
derivative, because the adapted θ_G^i itself depends on θ_D^i through the G step; so each inner
gradient is torch.func.grad of ONE task's loss with respect to that player's argument alone
(`MetaLearner.g_grad`, `d_grad`), mapped over tasks with vmap. Its result stays differentiable in
everything, so the meta-gradient is the exact total derivative of the meta-objective through all
inner steps.

Two things keep the step cheap. A parameter vector shared by all tasks (the meta-parameters before
a player's first inner step) is mapped unbatched: each layer is one matmul over every task's inputs
and no [T, P] copy of θ exists. And the T tasks go through in chunks (`meta.task_chunk`) whose
meta-gradients are summed, so memory follows the chunk, not T.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from kernels import reptile_delta
from metagan_dist.compiling import Compiled
from metagan_dist.episode import EpisodeBatch
from metagan_dist.flat import BatchedNet, Unflattened
from metagan_dist.inner import INNER_RULES, InnerAdam, InnerRule, InnerSGD
from metagan_dist.losses import LOSSES, discriminator_loss, generator_loss, gradient_penalty
from metagan_dist.models import median_filter
from metagan_dist.options import above, any_value, at_least, below_one, check_section, one_of, opt

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")
FIRST_ORDER = ("fomaml", "reptile")  # the algorithms that never differentiate through an inner step
OBJECTIVES = ("seed", "split")
REDUCTIONS = ("mean", "sum")
Params = tuple[Tensor, ...]  # one network's parameters, in order (FlatLayout.unflatten of a flat buffer)
Theta = Tensor | Unflattened  # one network's flat parameters ([P] shared or [T, P]), or those with their views
# Tasks per chunk of the meta-step unless meta.task_chunk says otherwise: chosen on the 2-core CPU by
# benchmarks/bench_meta_step.py (RESULTS.md); on a GPU take the largest chunk that fits in memory.
DEFAULT_TASK_CHUNK = 8

logger = logging.getLogger(__name__)


@dataclass
class MetaConfig:
    """What the inner loop does and what the meta-gradient differentiates (the `meta.*` options of training)."""

    algorithm: str = opt("maml", "maml (second order) | fomaml (first order) | reptile | metasgd (learned inner rates)",
                         check=one_of(ALGORITHMS))
    # `split` is the GAN game itself. `seed` is the seed document's formula; there G also descends
    # L_D, which pulls D(G(z)) towards 0 rather than up, so it is kept for comparison, not as default.
    objective: str = opt("split", "split: G descends L_G, D descends L_D | seed: both nets descend L_G + L_D (the "
                                  "seed's §4.2)", check=one_of(OBJECTIVES))
    loss: str = opt("ns", "GAN loss on logits: ns (non-saturating) | hinge | wgan-gp", check=one_of(LOSSES))
    inner_steps: int = opt(1, "inner steps per task (each: a G step, then d_steps D steps against the adapted G)",
                           check=at_least(1))
    inner_lr: float = opt(0.01, "inner learning rate α (Meta-SGD: the initial value of every per-parameter rate)",
                          check=above(0))
    gp_weight: float = opt(10.0, "λ of the wgan-gp gradient penalty", check=at_least(0))
    inner_clip: float = opt(0.0, "clip each task's inner gradient to this norm, per network; 0 = off",
                            check=at_least(0, " (0 turns it off)"))
    inner_rule: str = opt("sgd", "inner update rule, also the default at adaptation time: sgd | adam (per-task "
                                 "moments, one fused kernel; first order, so fomaml or reptile only)",
                          check=one_of(INNER_RULES))
    inner_beta1: float = opt(0.0, "β1 of the inner Adam (0: no momentum, Reptile's few-shot recipe)", check=below_one())
    inner_beta2: float = opt(0.999, "β2 of the inner Adam", check=below_one())
    d_steps: int = opt(1, "discriminator steps per generator step in every inner step", check=at_least(1))
    g_average: float = opt(0.0, "decay β of the average of G's inner iterates that samples, the query and "
                                "Reptile's step use: Σ_s β^(S−s) θ_G^s / Σ_s β^(S−s) over G after each inner step "
                                "s; 0 = the last iterate. Averaging cancels the back-and-forth of inner steps "
                                "(speckle) and keeps what they agree on", check=below_one())
    task_chunk: int = opt(DEFAULT_TASK_CHUNK, "tasks adapted at once: the T tasks of a meta-step go through in "
                                              "chunks of this many and their meta-gradients are summed; peak "
                                              "memory grows with it, not with T (larger than T: clamped to T)",
                          check=at_least(1))
    compile: bool = opt(False, "torch.compile the functional inner loop and query of the meta-step; where it "
                               "cannot compile, one warning and the eager step", check=any_value())

    def __post_init__(self) -> None:
        check_section("meta", self)
        if self.inner_rule == "adam" and self.algorithm not in FIRST_ORDER:
            raise ValueError(
                f"meta.inner_rule 'adam' with meta.algorithm {self.algorithm!r}: the inner Adam is a first-order rule "
                f"that {self.algorithm} cannot differentiate through; use fomaml or reptile with it, or "
                f"meta.inner_rule=sgd (with an SGD rate, e.g. meta.inner_lr=0.05)"
            )


@dataclass
class MetaGradients:
    """Meta-gradients of G, D (and Meta-SGD's inner rates), all views of one flat buffer.

    flat:            [P_G + P_D] or, for Meta-SGD, [P_G + P_D + P_G + P_D]: what an all-reduce moves
    generator:       one tensor per G parameter, in `generator.parameters()` order
    discriminator:   one tensor per D parameter, in `discriminator.parameters()` order
    generator_lr:    flat [P_G] gradient of G's inner rates (Meta-SGD), else None
    discriminator_lr flat [P_D] gradient of D's inner rates (Meta-SGD), else None
    loss_g, loss_d:  query-set L_G and L_D at the adapted parameters (detached)
    tasks:           T; every figure above is the mean over tasks, or the sum for reduction="sum"
    """

    flat: Tensor
    generator: list[Tensor]
    discriminator: list[Tensor]
    generator_lr: Tensor | None
    discriminator_lr: Tensor | None
    loss_g: Tensor
    loss_d: Tensor
    tasks: int


@contextlib.contextmanager
def _inner_graph(create_graph: bool) -> Iterator[None]:
    """Where inner gradients are taken: recorded for the meta-gradient (second order) or not (first order).

    torch.func.grad computes its gradient either way; under no_grad the result is simply not
    differentiable in the meta-parameters, which is what FOMAML and Reptile want.
    """
    with contextlib.nullcontext() if create_graph else torch.no_grad():
        yield


class Adaptation:
    """T task copies of (θ_G, θ_D) and their inner-rule states, advanced one inner step at a time.

    One inner step (DESIGN.md): a G step, then `d_steps` D steps against the adapted G, each on the
    player's PARTIAL derivative (`MetaLearner.g_grad`, `d_grad`). Meta-training, the sample grids
    and the adapt and evaluate tools all adapt through this one loop. With `g_average` β > 0, the
    adapted G (what samples and the query come from) is the β-weighted average of G's iterates;
    the inner steps themselves always run from the last iterate.
    """

    def __init__(
        self, learner: MetaLearner, theta_g: Tensor, theta_d: Tensor, tasks: int,
        rules: tuple[InnerRule, InnerRule], create_graph: bool, g_average: float = 0.0,
    ):
        self.learner, self.tasks, self.create_graph, self.g_average = learner, tasks, create_graph, g_average
        self.rule_g, self.rule_d = rules
        # Shared [P] until the player's first step: never copied T times (BatchedNet maps it unbatched).
        # Each θ is unflattened once and all its consumers share the views (flat.Unflattened), the query too:
        # so the views are made outside _inner_graph, where the meta-gradient can follow them.
        self._theta_g, self._theta_d = learner.G.unflatten(theta_g), learner.D.unflatten(theta_d)
        self.state_g, self.state_d = self.rule_g.start(theta_g, tasks), self.rule_d.start(theta_d, tasks)
        # g_average: Σ_s β^(S−s) θ_G^s and Σ_s β^(S−s) over the iterates so far, and the average's views.
        self._g_sum: Tensor | None = None
        self._g_weight = 0.0
        self._g_adapted: Unflattened | None = None

    @property
    def adapted_generator(self) -> Unflattened:
        """The adapted θ_G with its views: the last iterate, or with g_average the average of the iterates."""
        if self._g_sum is None:
            return self._theta_g
        if self._g_adapted is None:
            self._g_adapted = self.learner.G.unflatten(self._g_sum / self._g_weight)
        return self._g_adapted

    @property
    def generator(self) -> Tensor:
        """The adapted θ_G of every task copy [T, P_G] (a broadcast view before the first step)."""
        return self.adapted_generator.flat.expand(self.tasks, -1)

    @property
    def discriminator(self) -> Tensor:
        """θ_D of every task copy [T, P_D]."""
        return self._theta_d.flat.expand(self.tasks, -1)

    @property
    def parameters(self) -> tuple[Unflattened, Unflattened]:
        """The adapted (θ_G, θ_D) as they are ([P] shared before the player's first step, else [T, P]), with their
        views."""
        return self.adapted_generator, self._theta_d

    def advance(self, support: Tensor, noise: Tensor, mix: Tensor) -> None:
        """len(noise) more inner steps on support [T, k, C, H, W]; noise [S, T, n, z], mix [S, T, n]."""
        learner = self.learner
        for z, m in zip(noise, mix):
            with _inner_graph(self.create_graph):
                grad_g = learner.g_grad(self._theta_g, self._theta_d, z, support)
            self._theta_g = learner.G.unflatten(self.rule_g.step(self._theta_g.flat, grad_g, self.state_g))
            del grad_g  # the G step's [T, P_G] gradient: freed now, not while D steps allocate theirs
            if self.g_average:
                latest = self._theta_g.flat
                self._g_sum = latest if self._g_sum is None else self.g_average * self._g_sum + latest
                self._g_weight = self.g_average * self._g_weight + 1.0
                self._g_adapted = None
            with _inner_graph(self.create_graph):
                fake = learner.generate(self._theta_g, z, support)
            for _ in range(learner.config.d_steps):
                with _inner_graph(self.create_graph):
                    grad_d = learner.d_grad(self._theta_d, support, fake, m)
                self._theta_d = learner.D.unflatten(self.rule_d.step(self._theta_d.flat, grad_d, self.state_d))
                del grad_d


class MetaLearner:
    """Adapts T task copies of a (G, D) pair at once and differentiates the meta-objective.

    The losses are written for ONE task (`task_*`) and mapped over tasks with vmap; inner gradients
    are torch.func.grad of those per-task losses with respect to one player's flat parameters, so
    they are partial derivatives by construction and stay differentiable in everything else.
    A support-conditioned generator (`conditioned = True`) also gets its task's support set.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, config: MetaConfig):
        self.G = BatchedNet(generator, "generator")
        self.D = BatchedNet(discriminator, "discriminator")
        self.config = config
        self.conditioned = bool(getattr(generator, "conditioned", False))

    # ---- one task: parameters as FlatLayout.unflatten gives them, images [n, C, H, W], noise [n, z], mix [n] ----

    def task_generate(self, params_g: Params, noise: Tensor, support: Tensor) -> Tensor:
        """One task's fakes [n, C, H, W] from noise [n, z] (a conditioned G also sees the support [k, C, H, W])."""
        return self.G.single(params_g, noise, support) if self.conditioned else self.G.single(params_g, noise)

    def task_g_loss(self, params_g: Params, params_d: Params, noise: Tensor, support: Tensor) -> Tensor:
        """L_G of one task in the inner loop."""
        return generator_loss(self.config.loss, self.D.single(params_d, self.task_generate(params_g, noise, support)))

    def task_d_loss(
        self, params_d: Params, real: Tensor, fake: Tensor, mix: Tensor | None, fake_logits: Tensor | None = None
    ) -> Tensor:
        """L_D of one task, with wgan-gp's penalty (mix: its interpolation weights).

        fake_logits: D's logits on `fake` when the caller already has them (the query uses them for L_G too).
        """
        fake_logits = self.D.single(params_d, fake) if fake_logits is None else fake_logits
        loss = discriminator_loss(self.config.loss, self.D.single(params_d, real), fake_logits)
        if self.config.loss == "wgan-gp":
            penalty = gradient_penalty(lambda x: self.D.single(params_d, x), real, fake, mix)
            loss = loss + self.config.gp_weight * penalty
        return loss

    def task_query_losses(
        self, params_g: Params, params_d: Params, support: Tensor, query: Tensor, noise: Tensor, mix: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(L_G, L_D) of one task on its query set (a conditioned G still sees the support, never the query)."""
        fake = self.task_generate(params_g, noise, support)
        fake_logits = self.D.single(params_d, fake)
        return generator_loss(self.config.loss, fake_logits), self.task_d_loss(params_d, query, fake, mix, fake_logits)

    # ---- T tasks: θ shared [P] or per task [T, P] (a Theta: maybe with its views); everything else [T, ...] ----

    def _mix(self, mix: Tensor) -> tuple[Tensor | None, int | None]:
        """wgan-gp's interpolation weights and their vmap in_dim; the other losses take none."""
        return (mix, 0) if self.config.loss == "wgan-gp" else (None, None)

    def generate(self, theta_g: Theta, noise: Tensor, support: Tensor) -> Tensor:
        """Fakes of every task [T, n, C, H, W] from θ_G ([T, P_G] or shared [P_G]), noise [T, n, z] and the
        support [T, k, C, H, W] (which only a conditioned G looks at)."""
        return self.G(theta_g, noise, support) if self.conditioned else self.G(theta_g, noise)

    def sample(self, theta_g: Theta, noise: Tensor, support: Tensor) -> Tensor:
        """Samples to show or score: `generate`, then the generator's `sample_median` filter if it has one.

        The inner loop's fakes stay unfiltered (`generate`): D judges what G's weights draw.
        """
        images = self.generate(theta_g, noise, support)
        radius = getattr(self.G.module, "sample_median", 0)
        return median_filter(images, radius) if radius else images

    def g_grad(self, theta_g: Theta, theta_d: Theta, noise: Tensor, support: Tensor) -> Tensor:
        """∂L_G/∂θ_G of every task [T, P_G], θ_D held fixed."""
        g, d = self.G.unflatten(theta_g), self.D.unflatten(theta_d)
        in_dims = (g.in_dim, d.in_dim, 0, 0)
        return self.G.layout.flatten(vmap(grad(self.task_g_loss), in_dims=in_dims)(g.params, d.params, noise, support))

    def d_grad(self, theta_d: Theta, real: Tensor, fake: Tensor, mix: Tensor) -> Tensor:
        """∂L_D/∂θ_D of every task [T, P_D], the fakes (and the G they came from) held fixed."""
        mix, mix_dim = self._mix(mix)
        d = self.D.unflatten(theta_d)
        grads = vmap(grad(self.task_d_loss), in_dims=(d.in_dim, 0, 0, mix_dim))(d.params, real, fake, mix)
        return self.D.layout.flatten(grads)

    def query_losses(self, theta_g: Theta, theta_d: Theta, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """L_G and L_D per task [T] on the query set, at (adapted) parameters [T, P] (or shared [P])."""
        mix, mix_dim = self._mix(batch.query_mix)
        g, d = self.G.unflatten(theta_g), self.D.unflatten(theta_d)
        in_dims = (g.in_dim, d.in_dim, 0, 0, 0, mix_dim)
        return vmap(self.task_query_losses, in_dims=in_dims)(g.params, d.params, batch.support, batch.query,
                                                             batch.query_noise, mix)

    def inner_rules(self, inner_lrs: tuple[Tensor, Tensor] | None = None) -> tuple[InnerRule, InnerRule]:
        """The meta-learned inner rule of (G, D): the config's SGD or Adam, or SGD at Meta-SGD's rates `inner_lrs`."""
        cfg = self.config
        if cfg.inner_rule == "adam":
            rule = InnerAdam(cfg.inner_lr, (cfg.inner_beta1, cfg.inner_beta2), clip=cfg.inner_clip)
            return rule, rule
        lr_g, lr_d = inner_lrs if inner_lrs is not None else (cfg.inner_lr, cfg.inner_lr)
        return InnerSGD(lr_g, cfg.inner_clip), InnerSGD(lr_d, cfg.inner_clip)

    def start_adaptation(
        self,
        theta_g: Tensor,
        theta_d: Tensor,
        tasks: int,
        rules: tuple[InnerRule, InnerRule] | None = None,
        create_graph: bool = False,
        g_average: float | None = None,
    ) -> Adaptation:
        """T = `tasks` copies of (θ_G, θ_D) ([P] shared or [T, P]) to adapt with `rules` (default: inner_rules()),
        G's iterates averaged with decay `g_average` (default: meta.g_average)."""
        g_average = self.config.g_average if g_average is None else g_average
        return Adaptation(self, theta_g, theta_d, tasks, rules or self.inner_rules(), create_graph, g_average)

    def adapt(
        self,
        theta_g: Tensor,
        theta_d: Tensor,
        support: Tensor,
        noise: Tensor,
        mix: Tensor,
        rules: tuple[InnerRule, InnerRule] | None = None,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Run len(noise) inner steps on the support set; returns adapted [T, P_G] and [T, P_D].

        theta_g, theta_d: shared [P] (or per-task [T, P]); noise: [S, T, n, z]; mix: [S, T, n].
        create_graph keeps every inner gradient differentiable (second-order MAML, Meta-SGD).
        """
        adaptation = self.start_adaptation(theta_g, theta_d, support.shape[0], rules, create_graph)
        adaptation.advance(support, noise, mix)
        return adaptation.generator, adaptation.discriminator

    def forward_step(
        self, theta_g: Tensor, theta_d: Tensor, rates: tuple[Tensor, Tensor] | None, batch: EpisodeBatch
    ) -> tuple[Tensor, ...]:
        """The functional part of a meta-step: the inner loop, then the query (what meta.compile compiles).

        Reptile: (Σ_t θ_G − θ_G^t, Σ_t θ_D − θ_D^t, Σ_t L_G, Σ_t L_D), with no graph. Otherwise the
        query (L_G, L_D) per task [T], differentiable in θ_G, θ_D (and Meta-SGD's `rates`).
        """
        cfg = self.config
        rules = self.inner_rules(rates if cfg.algorithm == "metasgd" else None)
        adaptation = self.start_adaptation(theta_g, theta_d, batch.tasks, rules,
                                           create_graph=cfg.algorithm not in FIRST_ORDER)
        adaptation.advance(batch.support, batch.inner_noise, batch.inner_mix)
        loss_g, loss_d = self.query_losses(*adaptation.parameters, batch)  # the views the inner loop used
        if cfg.algorithm != "reptile":
            return loss_g, loss_d
        tasks, adapted_g, adapted_d = batch.tasks, adaptation.generator, adaptation.discriminator
        return tasks * reptile_delta(theta_g, adapted_g), tasks * reptile_delta(theta_d, adapted_d), loss_g.sum(), loss_d.sum()

    def meta_gradient(
        self, theta_g: Tensor, theta_d: Tensor, batch: EpisodeBatch, inner_lrs: tuple[Tensor, Tensor] | None = None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Sums over tasks of the meta-gradients [g_G, g_D (, g_lrG, g_lrD)], and of L_G, L_D.

        theta_g [P_G] and theta_d [P_D] (and Meta-SGD's inner_lrs) must be leaves requiring grad.
        With meta.compile, forward_step runs compiled; if compiling (or running the compiled code,
        backward included) fails, the step is redone eagerly and compiling is not tried again.
        """
        if self.config.compile and (compiled := COMPILED_FORWARD_STEP.get()) is not None:
            try:
                return self._meta_gradient(compiled, theta_g, theta_d, batch, inner_lrs)
            except Exception as err:  # noqa: BLE001  any failure of the compiler: fall back, never fail the run
                COMPILED_FORWARD_STEP.failed(err)
        return self._meta_gradient(MetaLearner.forward_step, theta_g, theta_d, batch, inner_lrs)

    def _meta_gradient(
        self, forward: Callable[..., tuple[Tensor, ...]], theta_g: Tensor, theta_d: Tensor, batch: EpisodeBatch,
        inner_lrs: tuple[Tensor, Tensor] | None,
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        cfg = self.config
        if cfg.algorithm == "reptile":
            with torch.no_grad():
                delta_g, delta_d, loss_g, loss_d = forward(self, theta_g.detach(), theta_d.detach(), None, batch)
            return [delta_g, delta_d], loss_g, loss_d
        rates = inner_lrs if cfg.algorithm == "metasgd" else None
        loss_g, loss_d = forward(self, theta_g, theta_d, rates, batch)
        g_inputs, d_inputs = [theta_g], [theta_d]
        if rates is not None:
            g_inputs.append(rates[0])
            d_inputs.append(rates[1])
        if cfg.objective == "seed":
            grads = torch.autograd.grad((loss_g + loss_d).sum(), g_inputs + d_inputs)
        else:
            grads_g = torch.autograd.grad(loss_g.sum(), g_inputs, retain_graph=True)
            grads = grads_g + torch.autograd.grad(loss_d.sum(), d_inputs)
        # Order: [g_G, g_D, g_lrG, g_lrD], the layout of MetaGradients.flat.
        ordered = [grads[0], grads[len(g_inputs)]] + (
            [grads[1], grads[len(g_inputs) + 1]] if rates is not None else []
        )
        return ordered, loss_g.detach().sum(), loss_d.detach().sum()


COMPILED_FORWARD_STEP = Compiled(MetaLearner.forward_step, "the meta-step's inner loop and query")


@functools.cache
def _log_clamped_chunk(chunk: int, tasks: int) -> None:
    """Say once per (chunk, T) that the chunk was cut to T (a training run would repeat it every step)."""
    logger.info("meta.task_chunk=%d is larger than the batch's T=%d tasks: all %d go through in one chunk",
                chunk, tasks, tasks)


def _chunk_size(chunk: int, tasks: int) -> int:
    """meta.task_chunk clamped to T (and logged when it is)."""
    if chunk > tasks:
        _log_clamped_chunk(chunk, tasks)
        return tasks
    return chunk


def _check_batch(generator: nn.Module, batch: EpisodeBatch, config: MetaConfig) -> None:
    """Clear errors for data that does not fit the models or the config."""
    s, q = batch.support, batch.query
    if s.dim() != 5 or q.dim() != 5:
        raise ValueError(
            f"support and query must be [T, k, C, H, W] and [T, q, C, H, W]; "
            f"got {tuple(s.shape)} and {tuple(q.shape)}"
        )
    tasks = s.shape[0]
    if tasks == 0:
        raise ValueError("T=0: the episode batch holds no tasks")
    if q.shape[0] != tasks:
        raise ValueError(f"support has T={tasks} tasks but query has T={q.shape[0]}")
    image_shape = tuple(getattr(generator, "image_shape", ()))
    for name, images in (("support", s), ("query", q)):
        if image_shape and tuple(images.shape[2:]) != image_shape:
            raise ValueError(
                f"{name} images are {tuple(images.shape[2:])} (C, H, W) but the models make {image_shape}"
            )
    steps, z_dim = config.inner_steps, getattr(generator, "z_dim", batch.query_noise.shape[-1])
    if batch.inner_noise.dim() != 4 or tuple(batch.inner_noise.shape[:2]) != (steps, tasks):
        raise ValueError(
            f"inner_noise must be [inner_steps={steps}, T={tasks}, n, z]; got {tuple(batch.inner_noise.shape)}"
        )
    if batch.query_noise.dim() != 3 or batch.query_noise.shape[0] != tasks:
        raise ValueError(f"query_noise must be [T={tasks}, m, z]; got {tuple(batch.query_noise.shape)}")
    for name, noise in (("inner_noise", batch.inner_noise), ("query_noise", batch.query_noise)):
        if noise.shape[-1] != z_dim:
            raise ValueError(f"{name} has z={noise.shape[-1]} but the generator takes z_dim={z_dim}")
    if config.loss == "wgan-gp":
        wanted = {"inner_mix": (steps, tasks, s.shape[1]), "query_mix": (tasks, q.shape[1])}
        for name, shape in wanted.items():
            if tuple(getattr(batch, name).shape) != shape:
                raise ValueError(
                    f"wgan-gp pairs every real image with a fake: {name} must be {shape}, "
                    f"got {tuple(getattr(batch, name).shape)} (one fake per support/query image)"
                )
        if batch.inner_noise.shape[2] != s.shape[1] or batch.query_noise.shape[1] != q.shape[1]:
            raise ValueError("wgan-gp needs as many noise vectors per task as real images (k per step, q for the query)")


def meta_gradients(
    generator: nn.Module,
    discriminator: nn.Module,
    batch: EpisodeBatch,
    config: MetaConfig | None = None,
    *,
    params: tuple[Tensor, Tensor] | None = None,
    inner_lrs: tuple[Tensor, Tensor] | None = None,
    reduction: str = "mean",
    task_chunk: int | None = None,
) -> MetaGradients:
    """Meta-gradients of every parameter of G and D for one episode batch; steps no optimizer.

    generator, discriminator: any nn.Modules (G: noise [n, z] -> images [n, C, H, W]; D: images -> logits [n]).
    batch:      T episodes with their noise (EpisodeBatch.sample builds one from support/query images).
    config:     algorithm, objective, loss, inner steps and rate (default MetaConfig(): second-order MAML).
    params:     flat meta-parameters (θ_G [P_G], θ_D [P_D]) to use instead of the modules' own;
                the modules then serve only as architecture templates (the training loop's case).
    inner_lrs:  Meta-SGD's per-parameter inner rates, flat ([P_G], [P_D]); default: all inner_lr.
    reduction:  "mean" over the batch's tasks, or "sum" (to all-reduce, then divide by the global count).
    task_chunk: tasks adapted at once (default: config.task_chunk); the batch goes through in chunks
                of this many and their meta-gradients are summed, so peak memory follows the chunk,
                not T. The result is the same for every chunk size (up to float rounding).

    Example::

        G, D = build_pair("mlp", z_dim=64, image_shape=(1, 28, 28))
        batch = EpisodeBatch.sample(support, query, inner_steps=1, z_dim=64)  # [T,k,1,28,28], [T,q,1,28,28]
        grads = meta_gradients(G, D, batch, MetaConfig(algorithm="maml", inner_lr=0.05))
        for p, g in zip(G.parameters(), grads.generator):
            p.grad = g
    """
    config = config or MetaConfig()
    if task_chunk is not None:  # checked like the config key it overrides: an error names meta.task_chunk
        config = dataclasses.replace(config, task_chunk=task_chunk)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    _check_batch(generator, batch, config)
    learner = MetaLearner(generator, discriminator, config)
    if params is None:
        params = (learner.G.flat_parameters(), learner.D.flat_parameters())
    theta_g, theta_d = (p.detach().requires_grad_() for p in params)
    lrs = None
    if config.algorithm == "metasgd":
        if inner_lrs is None:
            inner_lrs = (torch.full_like(theta_g, config.inner_lr), torch.full_like(theta_d, config.inner_lr))
        lrs = tuple(lr.detach().requires_grad_() for lr in inner_lrs)
    # The chunks' sums go straight into slices of one flat buffer: [g_G, g_D (, g_lrG, g_lrD)].
    sizes = [theta_g.numel(), theta_d.numel()] + ([lr.numel() for lr in lrs] if lrs else [])
    flat = theta_g.new_zeros(sum(sizes))
    pieces = flat.split(sizes)
    loss_g = loss_d = theta_g.new_zeros(())
    chunk = _chunk_size(config.task_chunk, batch.tasks)
    for start in range(0, batch.tasks, chunk):
        grads, chunk_g, chunk_d = learner.meta_gradient(theta_g, theta_d, batch.task_slice(start, start + chunk), lrs)
        for piece, g in zip(pieces, grads):
            piece.add_(g)
        loss_g, loss_d = loss_g + chunk_g, loss_d + chunk_d
        del grads, g  # the chunk's gradients are gone before the next chunk builds its graph
    scale = 1.0 / batch.tasks if reduction == "mean" else 1.0
    flat.mul_(scale)
    return MetaGradients(
        flat=flat,
        generator=learner.G.layout.split(pieces[0]),
        discriminator=learner.D.layout.split(pieces[1]),
        generator_lr=pieces[2] if lrs else None,
        discriminator_lr=pieces[3] if lrs else None,
        loss_g=loss_g * scale,
        loss_d=loss_d * scale,
        tasks=batch.tasks,
    )
