"""The feature spaces of the metrics: small CNNs trained to tell which meta-train task an image is from.

Nothing is downloaded: a network learns the features that separate this pool's tasks, and its
penultimate layer (FEATURE_DIM values) is the feature space. Two are trained once per pool and
cached beside it (`load_or_train_feature_net`), one per question:

- "is it the task?" (recognizability): trained on corrupted images too (`corrupt`: pixel noise,
  salt and pepper, blur, a lifted background, thicker or thinner strokes), so a character drawn
  with noise is still that character. The clean-trained net is brittle: on held-out glyph tasks,
  5% salt noise took real images' recognizability from 0.97 to 0.13 and a 1-pixel blur to 0.64,
  so a recognisable but noisy sample scored like noise and the metric disagreed with the pictures.
- "how close in distribution?" (KID, FID, precision/recall, diversity): trained on clean images
  only, like the Inception features of FID, so noise and blur that a person sees count as distance.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from metagan_dist.checkpoint import fingerprint, save_file_atomic

log = logging.getLogger(__name__)

FEATURE_DIM = 128
CACHE_FORMAT = 2  # bump when the network, its training recipe or the cache layout changes
CLEAN_SHARE = 0.25  # share of training images left uncorrupted
HELD_OUT_FRACTION = 0.1
BATCH_SIZE = 128
LEARNING_RATE = 5e-3


@dataclass(frozen=True)
class FeatureNetConfig:
    """Everything that fixes the network's shape: input channels/size and the number of tasks."""

    channels: int
    image_size: int
    num_classes: int
    width: int = 16
    feature_dim: int = FEATURE_DIM


class FeatureNet(nn.Module):
    """Task classifier: 3 conv stages (32→16→8→4) → FEATURE_DIM-d features → task logits.

    64×64 inputs enter through a stride-2 first convolution, so both sizes cost the same.
    `features` runs in eval mode (BatchNorm's running statistics): an image's features never
    depend on the other images of its batch.
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        w, stride = config.width, config.image_size // 32
        self.body = nn.Sequential(
            _conv_block(config.channels, w, stride),
            nn.MaxPool2d(2),  # 16x16
            _conv_block(w, 2 * w, 1),
            nn.MaxPool2d(2),  # 8x8
            _conv_block(2 * w, 4 * w, 1),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(4 * w * 16, config.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.heldout_accuracy = float("nan")

    def forward(self, images: Tensor) -> Tensor:
        """Task logits [N, num_classes] for images [N, C, H, W] in [-1, 1]."""
        return self.head(self.body(images))

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Penultimate-layer features [N, feature_dim] (float32, CPU) of images in [-1, 1], in batches."""
        expected = (self.config.channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [N, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([self.body(batch.to(device, torch.float32)).cpu() for batch in images.split(batch_size)])


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


def uint8_to_unit_range(images: np.ndarray) -> Tensor:
    """uint8 images [N, C, H, W] → float32 tensor in [-1, 1], the range generators produce."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)


def train_feature_net(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 8,
    seed: int = 0,
    corruptions: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureNet:
    """Train the task classifier on uint8 images [N, C, H, W] with task labels [N]; deterministic on CPU.

    corruptions: train on `corrupt`ed images (the recognizability judge) instead of clean ones only.
    10% of the images are held out; their accuracy is stored in `net.heldout_accuracy` and logged.
    """
    _check_training_data(images, labels)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    classes, targets = np.unique(labels, return_inverse=True)
    config = FeatureNetConfig(channels=images.shape[1], image_size=images.shape[2], num_classes=len(classes))
    inputs, targets = uint8_to_unit_range(images), torch.from_numpy(targets.astype(np.int64))

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)
    n_held_out = max(1, round(HELD_OUT_FRACTION * len(inputs)))
    held_out, train = order[:n_held_out], order[n_held_out:]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    steps_per_epoch = -(-len(train) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=epochs * steps_per_epoch)

    bar = tqdm(range(epochs), desc="feature net", unit="epoch", disable=not progress)
    for _ in bar:
        net.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(BATCH_SIZE):
            images_in = corrupt(inputs[batch], generator) if corruptions else inputs[batch]
            loss = F.cross_entropy(net(images_in.to(device)), targets[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        net.heldout_accuracy = _accuracy(net, inputs[held_out], targets[held_out])
        bar.set_postfix(loss=f"{loss.item():.3f}", heldout_acc=f"{net.heldout_accuracy:.3f}")
    log.info(
        "feature net: %d tasks, held-out accuracy %.3f (chance %.3f)",
        len(classes), net.heldout_accuracy, 1 / len(classes),
    )
    return net.eval()


def corrupt(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image [N, C, H, W] in [-1, 1] with one nuisance a task's identity survives, or none (CLEAN_SHARE).

    Gaussian noise (σ up to 0.4), salt and pepper (up to 10% of pixels), a 3x3 blur blended in, a
    background lifted by up to 0.6, or strokes one pixel thicker or thinner.
    """
    n, shape = len(images), images.shape
    per_image = (n, 1, 1, 1)
    noisy = images + 0.4 * torch.rand(per_image, generator=generator) * torch.randn(shape, generator=generator)
    salt_share, draw = 0.1 * torch.rand(per_image, generator=generator), torch.rand(shape, generator=generator)
    salted = torch.where(draw < salt_share / 2, -1.0, torch.where(draw < salt_share, 1.0, images))
    blend = torch.rand(per_image, generator=generator)
    blurred = (1 - blend) * images + blend * F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    lifted = images.clamp(min=-1 + 0.6 * torch.rand(per_image, generator=generator))
    thicker = F.max_pool2d(images, 3, 1, 1)
    thinner = -F.max_pool2d(-images, 3, 1, 1)
    variants = torch.stack([images, noisy, salted, blurred, lifted, thicker, thinner])
    weights = torch.tensor([CLEAN_SHARE / (1 - CLEAN_SHARE) * 6] + [1.0] * 6)
    choice = torch.multinomial(weights, n, replacement=True, generator=generator)
    return variants[choice, torch.arange(n)].clamp(-1, 1)


@torch.no_grad()
def _accuracy(net: FeatureNet, inputs: Tensor, targets: Tensor) -> float:
    net.eval()
    device = next(net.parameters()).device
    predictions = torch.cat([net(batch.to(device)).argmax(1).cpu() for batch in inputs.split(512)])
    return float((predictions == targets).float().mean())


def load_or_train_feature_net(
    cache_path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 8,
    seed: int = 0,
    corruptions: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    retrain_on_mismatch: bool = True,
) -> FeatureNet:
    """Load the feature net cached at cache_path if it was trained on exactly these images/labels/settings.

    Otherwise train it and save it atomically; a cache with another fingerprint is retrained
    (replaced) or, with retrain_on_mismatch=False, rejected with a ValueError.
    """
    cache_path = Path(cache_path)
    fingerprint = training_fingerprint(images, labels, epochs=epochs, seed=seed, corruptions=corruptions)
    if cache_path.exists():
        try:
            cached = torch.load(cache_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read feature-net cache {cache_path}: {error}") from error
        if cached.get("fingerprint") == fingerprint:
            return _net_from_cache(cached, device)
        message = (
            f"feature-net cache {cache_path} was trained on other data or settings "
            f"(fingerprint {cached.get('fingerprint')!r}, expected {fingerprint!r})"
        )
        if not retrain_on_mismatch:
            raise ValueError(message + "; delete it or pass retrain_on_mismatch=True")
        log.warning("%s; retraining", message)
    net = train_feature_net(images, labels, epochs=epochs, seed=seed, corruptions=corruptions, device=device,
                            progress=progress)
    save_file_atomic(
        {
            "fingerprint": fingerprint,
            "config": asdict(net.config),
            "heldout_accuracy": net.heldout_accuracy,
            "state_dict": {name: value.cpu() for name, value in net.state_dict().items()},
        },
        cache_path,
    )
    return net


RECOGNITION_FILE = "recognition_net.pt"  # the corruption-trained net: recognizability
DISTRIBUTION_FILE = "feature_net.pt"  # the clean-trained net: KID, FID, precision/recall, diversity


@dataclass
class FeatureSpaces:
    """The evaluation's two feature spaces: `recognition` (is it the task?) and `distribution` (how close?)."""

    recognition: FeatureNet
    distribution: FeatureNet

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(recognition, distribution) features [N, d] of images [N, C, H, W] in [-1, 1]."""
        return self.recognition.features(images), self.distribution.features(images)


def load_or_train_feature_spaces(
    folder: Path, images: np.ndarray, labels: np.ndarray, *, epochs: int = 8, seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = True,
) -> FeatureSpaces:
    """Both feature nets of a pool, cached in `folder` (RECOGNITION_FILE, DISTRIBUTION_FILE), trained if needed."""
    nets = [load_or_train_feature_net(Path(folder) / name, images, labels, epochs=epochs, seed=seed,
                                      corruptions=corruptions, device=device, progress=progress)
            for name, corruptions in ((RECOGNITION_FILE, True), (DISTRIBUTION_FILE, False))]
    return FeatureSpaces(*nets)


def training_fingerprint(
    images: np.ndarray, labels: np.ndarray, *, epochs: int, seed: int, corruptions: bool = False
) -> str:
    """The cache's identity: the training images, labels and settings (and the cache format)."""
    return fingerprint([images, labels], {"format": CACHE_FORMAT, "epochs": epochs, "seed": seed,
                                          "feature_dim": FEATURE_DIM, "corruptions": corruptions})


def _net_from_cache(cached: dict, device: str | torch.device) -> FeatureNet:
    net = FeatureNet(FeatureNetConfig(**cached["config"]))
    net.load_state_dict(cached["state_dict"])
    net.heldout_accuracy = cached["heldout_accuracy"]
    return net.to(device).eval()


def _check_training_data(images: np.ndarray, labels: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be a uint8 numpy array [N, C, H, W], got {_describe(images)}")
    n, channels, height, width = images.shape
    if channels not in (1, 3) or height != width or height not in (32, 64):
        raise ValueError(f"images must have 1 or 3 channels and be 32x32 or 64x64, got shape {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, one per image, got {_describe(labels)}")
    if len(np.unique(labels)) < 2:
        raise ValueError("labels must name at least 2 tasks for a task classifier")
    if n < 10:
        raise ValueError(f"need at least 10 images to train and hold out, got {n}")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
