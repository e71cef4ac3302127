"""A convolutional autoencoder of a pool's meta-train images: the frozen image prior of the `latent` pair.

The `latent` generator writes a code that this decoder renders, and the `latent` discriminator
judges this encoder's code of an image (models.LatentGenerator, models.LatentDiscriminator). The
autoencoder is trained once per pool, before meta-training and outside the GAN, then cached beside
the pool (`load_or_train_autoencoder`) and copied into every checkpoint, which is therefore
self-contained. Codes are layer-normed, and training adds Gaussian noise to them, so that every
code near the shell of layer-normed vectors decodes to a clean image. The decoder is what gives
the `latent` pair clean strokes (README, "The latent pair").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from metagan_dist.checkpoint import fingerprint, save_file_atomic
from metagan_dist.data import Pool, images_to_tensor

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the networks, their training recipe or the file's layout change
WIDTH = 32  # channels of the first convolution; each stride-2 stage doubles them
BATCH_SIZE = 128
LEARNING_RATE = 2e-3


def _levels(image_shape: tuple[int, int, int]) -> int:
    channels, height, width = image_shape
    if channels not in (1, 3) or height != width or height not in (32, 64):
        raise ValueError(f"the autoencoder takes 1 or 3 channel images of 32x32 or 64x64, got {tuple(image_shape)}")
    return int(np.log2(height)) - 2


def encoder_net(image_shape: tuple[int, int, int], code_dim: int) -> nn.Sequential:
    """Image [n, C, H, W] -> pre-norm code [n, code_dim]: stride-2 convolutions down to 4x4, then a linear map."""
    levels, channels = _levels(image_shape), image_shape[0]
    layers: list[nn.Module] = []
    for level in range(levels):
        out = WIDTH * 2**level
        layers += [nn.Conv2d(channels, out, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, code_dim))


def decoder_net(image_shape: tuple[int, int, int], code_dim: int) -> nn.Sequential:
    """Code [n, code_dim] -> image logits [n, C, H, W]: the encoder's mirror image."""
    levels = _levels(image_shape)
    channels = WIDTH * 2 ** (levels - 1)
    layers: list[nn.Module] = [nn.Linear(code_dim, channels * 16), nn.ReLU(), nn.Unflatten(1, (channels, 4, 4))]
    for _ in range(levels - 1):
        layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1), nn.ReLU()]
        channels //= 2
    return nn.Sequential(*layers, nn.ConvTranspose2d(channels, image_shape[0], 4, 2, 1))


def encode(encoder: nn.Module, images: Tensor, code_dim: int) -> Tensor:
    """The layer-normed code [n, code_dim] of images [n, C, H, W] in [-1, 1]."""
    return F.layer_norm(encoder(images), (code_dim,))


def decode(decoder: nn.Module, codes: Tensor) -> Tensor:
    """Images in [-1, 1] of codes: tanh(logits / 2) = 2·sigmoid(logits) − 1, so training's BCE fits them."""
    return torch.tanh(decoder(codes) / 2)


@dataclass
class AutoencoderWeights:
    """A trained autoencoder: its shapes, its weights and the fingerprint of what it was trained on."""

    image_shape: tuple[int, int, int]
    code_dim: int
    fingerprint: str
    encoder: dict[str, Tensor]
    decoder: dict[str, Tensor]

    def as_dict(self) -> dict:
        """Plain values for torch.save (the weights by reference: no copy per checkpoint)."""
        return {"format": FORMAT, "image_shape": list(self.image_shape), "code_dim": self.code_dim,
                "fingerprint": self.fingerprint, "encoder": self.encoder, "decoder": self.decoder}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> AutoencoderWeights:
        """Weights saved by `as_dict`; a ValueError naming `where` for another format."""
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            found = values.get("format") if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"{where}: not an autoencoder of format {FORMAT} (found {found!r})")
        return cls(tuple(values["image_shape"]), int(values["code_dim"]), values["fingerprint"],
                   values["encoder"], values["decoder"])


def training_fingerprint(images: np.ndarray, code_dim: int, epochs: int, noise: float, seed: int) -> str:
    """The cache's identity: the training images and settings (and FORMAT)."""
    return fingerprint([images], {"format": FORMAT, "code_dim": code_dim, "epochs": epochs, "noise": noise,
                                  "seed": seed, "width": WIDTH})


def train_autoencoder(
    images: np.ndarray, code_dim: int, *, epochs: int = 12, noise: float = 0.2, seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = True,
) -> AutoencoderWeights:
    """Train encoder and decoder on uint8 images [N, C, H, W] with Adam: BCE of each image's reconstruction
    from its code plus Gaussian noise of σ `noise` (codes are layer-normed, so σ is relative to unit scale)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty uint8 array [N, C, H, W], got {getattr(images, 'shape', images)}")
    if code_dim < 2 or epochs < 1 or noise < 0:
        raise ValueError(f"need code_dim >= 2, epochs >= 1 and noise >= 0, got {code_dim}, {epochs}, {noise}")
    image_shape = tuple(images.shape[1:])
    inputs = images_to_tensor(images)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, decoder = encoder_net(image_shape, code_dim).to(device), decoder_net(image_shape, code_dim).to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LEARNING_RATE)
    bar = tqdm(range(epochs), desc="autoencoder", unit="epoch", disable=not progress)
    for _ in bar:
        total = 0.0
        for batch in torch.randperm(len(inputs), generator=generator).split(BATCH_SIZE):
            x = inputs[batch].to(device)
            codes = encode(encoder, x, code_dim)
            codes = codes + noise * torch.randn(codes.shape, generator=generator).to(device)
            loss = F.binary_cross_entropy_with_logits(decoder(codes), (x + 1) / 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        bar.set_postfix(bce=f"{total / len(inputs):.4f}")
    log.info("autoencoder: %d images, %d-d code, reconstruction BCE %.4f", len(inputs), code_dim, total / len(inputs))
    return AutoencoderWeights(
        image_shape, code_dim, training_fingerprint(images, code_dim, epochs, noise, seed),
        {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
    )


def load_or_train_autoencoder(
    cache_path: Path, images: np.ndarray, code_dim: int, *, epochs: int = 12, noise: float = 0.2, seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = True,
) -> AutoencoderWeights:
    """The autoencoder cached at cache_path if it was trained on exactly these images and settings; otherwise
    train it and save it atomically (a cache with another fingerprint is replaced, with a warning)."""
    cache_path = Path(cache_path)
    fingerprint = training_fingerprint(images, code_dim, epochs, noise, seed)
    if cache_path.exists():
        try:
            cached = AutoencoderWeights.from_dict(torch.load(cache_path, map_location="cpu", weights_only=True),
                                                  str(cache_path))
        except Exception as error:
            raise ValueError(f"cannot read autoencoder cache {cache_path}: {error}; delete it to retrain") from error
        if cached.fingerprint == fingerprint:
            return cached
        log.warning("autoencoder cache %s was trained on other images or settings; retraining", cache_path)
    weights = train_autoencoder(images, code_dim, epochs=epochs, noise=noise, seed=seed, device=device,
                                progress=progress)
    save_file_atomic(weights.as_dict(), cache_path)
    return weights


def cache_name(code_dim: int, epochs: int) -> str:
    """The cache file of a pool's autoencoder: one per setting, so runs with other settings keep each other's."""
    return f"autoencoder-code{code_dim}-epochs{epochs}.pt"


def pool_autoencoder(pool: Pool, code_dim: int, epochs: int, device: str | torch.device = "cpu",
                     progress: bool = True) -> AutoencoderWeights:
    """The autoencoder of a pool's meta-train images (split 'train'), cached in the pool's folder."""
    images = np.concatenate(list(pool.load_tasks("train").values()))
    return load_or_train_autoencoder(pool.path / cache_name(code_dim, epochs), images, code_dim, epochs=epochs,
                                     device=device, progress=progress)
