"""A meta-trained checkpoint (either engine) rebuilt as a MetaLearner with its meta-parameters, ready to adapt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metagan_dist.checkpoint import load_trainer_state, resolve_checkpoint
from metagan_dist.config import ModelConfig, TrainConfig, from_dict
from metagan_dist.engine import load_meta_parameters
from metagan_dist.meta import MetaLearner
from metagan_dist.models import build_pair

# Square image sizes tried when recovering a checkpoint's image shape from its parameter counts.
CANDIDATE_SIZES = range(1, 257)


@dataclass
class MetaLearnedGAN:
    """A checkpoint's meta-learned (G, D) init: flat θ_G [P_G], θ_D [P_D] and Meta-SGD's rates, on one device."""

    folder: Path
    step: int
    ranks: int
    config: TrainConfig
    image_shape: tuple[int, int, int]
    learner: MetaLearner
    theta_g: Tensor
    theta_d: Tensor
    inner_lrs: tuple[Tensor, Tensor] | None

    @property
    def name(self) -> str:
        return self.config.meta.algorithm


def load_meta_learned(path: str | Path, device: torch.device | str = "cpu") -> MetaLearnedGAN:
    """Load a run folder (its latest checkpoint) or a checkpoint folder written by the torch or DeepSpeed engine.

    Raises FileNotFoundError for a missing checkpoint and ValueError for another format version or config.
    """
    folder = resolve_checkpoint(path)
    state = load_trainer_state(folder)
    config = from_dict(state["config"], str(folder / "trainer.pt"))
    params = load_meta_parameters(folder)
    if (params.generator_lr is not None) != (config.meta.algorithm == "metasgd"):
        raise ValueError(
            f"{folder}: meta.algorithm is {config.meta.algorithm!r} but the checkpoint "
            f"{'holds' if params.generator_lr is not None else 'lacks'} Meta-SGD inner rates"
        )
    image_shape = infer_image_shape(config.model, params.generator.numel(), params.discriminator.numel(), folder)
    generator, discriminator = build_pair(config.model.arch, config.model.z_dim, image_shape, config.model.width or None)
    learner = MetaLearner(generator.to(device), discriminator.to(device), config.meta)
    rates = params.inner_lrs()
    return MetaLearnedGAN(
        folder=folder,
        step=int(state["step"]),
        ranks=len(state["ranks"]),
        config=config,
        image_shape=image_shape,
        learner=learner,
        theta_g=params.generator.detach().to(device),
        theta_d=params.discriminator.detach().to(device),
        inner_lrs=None if rates is None else tuple(r.detach().to(device) for r in rates),
    )


def infer_image_shape(model: ModelConfig, generator_size: int, discriminator_size: int, where: Path) -> tuple[int, int, int]:
    """The square (C, H, W) whose (G, D) pair of this config has exactly these parameter counts.

    Checkpoints record the model config but not the image shape; C in {1, 3} and the size determine
    both counts, and no two candidate shapes give the same pair of counts for the built-in architectures.
    """
    matches = []
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        for channels in (1, 3):
            for size in CANDIDATE_SIZES:
                try:
                    g, d = build_pair(model.arch, model.z_dim, (channels, size, size), model.width or None)
                except ValueError:  # e.g. DCGAN supports 32 and 64 only
                    continue
                if _count(g) == generator_size and _count(d) == discriminator_size:
                    matches.append((channels, size, size))
    if len(matches) != 1:
        raise ValueError(
            f"{where}: cannot tell the image shape of its {model.arch} model from its parameter counts "
            f"(G {generator_size}, D {discriminator_size}): {len(matches)} candidate shapes {matches[:4]}"
        )
    return matches[0]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
