"""A meta-trained checkpoint (either engine) rebuilt as a MetaLearner with its meta-parameters, ready to adapt."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metagan_dist.autoencoder import AutoencoderWeights
from metagan_dist.checkpoint import TRANSPOSED_LINEAR_SINCE, CheckpointStore, load_trainer_state, resolve_checkpoint
from metagan_dist.config import TrainConfig, from_dict
from metagan_dist.engine import load_meta_parameters
from metagan_dist.meta import MetaLearner
from metagan_dist.models import frozen_parts, install_autoencoder


@dataclass
class MetaLearnedGAN:
    """A checkpoint's meta-learned (G, D) init: flat θ_G [P_G], θ_D [P_D] and Meta-SGD's rates, on one device."""

    folder: Path
    step: int
    ranks: int
    run_steps: int  # meta-steps of its run's latest checkpoint (>= step when BEST named an earlier one)
    config: TrainConfig
    image_shape: tuple[int, int, int]
    learner: MetaLearner
    theta_g: Tensor
    theta_d: Tensor
    inner_lrs: tuple[Tensor, Tensor] | None

    @property
    def name(self) -> str:
        return self.config.meta.algorithm


def load_meta_learned(
    path: str | Path, device: torch.device | str = "cpu", sample_median: int | None = None,
    g_average: float | None = None,
) -> MetaLearnedGAN:
    """Load a run folder (its best checkpoint, else its latest) or a checkpoint folder, either engine.

    sample_median: the radius of the median filter its samples go through, instead of the config's
    `model.sample_median` (it changes no parameter: the filter acts on samples only).
    g_average: the decay of the average of G's iterates its samples come from, instead of the config's
    `meta.g_average` (it changes how an adaptation reads out G, not the parameters).
    Raises FileNotFoundError for a missing checkpoint and ValueError for another format version or config.
    """
    folder = resolve_checkpoint(path)
    state = load_trainer_state(folder)
    config = from_dict(state["config"], str(folder / "trainer.pt"))
    if sample_median is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, sample_median=sample_median))
    if g_average is not None:
        config = dataclasses.replace(config, meta=dataclasses.replace(config.meta, g_average=g_average))
    params = load_meta_parameters(folder)
    if (params.generator_lr is not None) != (config.meta.algorithm == "metasgd"):
        raise ValueError(
            f"{folder}: meta.algorithm is {config.meta.algorithm!r} but the checkpoint "
            f"{'holds' if params.generator_lr is not None else 'lacks'} Meta-SGD inner rates"
        )
    image_shape = tuple(state["image_shape"])
    generator, discriminator = config.model.build(image_shape)
    if frozen_parts(generator, discriminator):  # the latent pair: its autoencoder travels in the checkpoint
        where = str(folder / "trainer.pt")
        install_autoencoder((generator, discriminator), AutoencoderWeights.from_dict(state.get("autoencoder"), where))
    learner = MetaLearner(generator.to(device), discriminator.to(device), config.meta)
    for role, theta, net in (("θ_G", params.generator, learner.G), ("θ_D", params.discriminator, learner.D)):
        if theta.numel() != net.layout.numel:
            raise ValueError(f"{folder}: its {role} has {theta.numel()} values but its config's model {config.model} "
                             f"has {net.layout.numel}")
    theta_g, theta_d, rates = params.generator, params.discriminator, params.inner_lrs()
    if state["version"] < TRANSPOSED_LINEAR_SINCE:  # written in the untransposed flat order: convert
        layout_g, layout_d = learner.G.layout, learner.D.layout
        theta_g, theta_d = layout_g.from_untransposed(theta_g.detach()), layout_d.from_untransposed(theta_d.detach())
        if rates is not None:
            rates = layout_g.from_untransposed(rates[0].detach()), layout_d.from_untransposed(rates[1].detach())
    return MetaLearnedGAN(
        folder=folder,
        step=int(state["step"]),
        ranks=len(state["ranks"]),
        run_steps=_run_steps(folder, int(state["step"])),
        config=config,
        image_shape=image_shape,
        learner=learner,
        theta_g=theta_g.detach().to(device),
        theta_d=theta_d.detach().to(device),
        inner_lrs=None if rates is None else tuple(r.detach().to(device) for r in rates),
    )


def _run_steps(folder: Path, step: int) -> int:
    """The step of the latest checkpoint in the run `folder` belongs to (`step` for a lone checkpoint folder)."""
    latest = CheckpointStore(folder.parent.parent, keep=1).latest() if folder.parent.name == "checkpoints" else None
    return max(step, CheckpointStore.step_of(latest)) if latest is not None else step
