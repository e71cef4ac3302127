"""Generator/discriminator pairs used as functional templates for T task copies.

Every generator maps noise [n, z_dim] to images [n, C, H, W] in [-1, 1]; every discriminator maps
images to logits [n]. Both carry `z_dim` and `image_shape` so data can be checked against them.
A generator with `conditioned = True` also takes its task's support set: forward(z, shots [k, C, H, W]).
A generator's `sample_median` (a radius, 0 = off) says whether its samples go through median_filter.
No BatchNorm with running statistics anywhere: a running mean shared by all task copies would mix
tasks and make adaptation depend on task order (see flat._check_no_running_stats).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagan_dist.autoencoder import AutoencoderWeights, decode, decoder_net, encode, encoder_net

ARCHITECTURES = ("mlp", "dcgan", "latent")
NORMS = ("none", "layer", "group")  # per-sample normalisations only: no batch statistics that would mix tasks
# τ of ShotMixingGenerator's weights softmax(τ·z): 6 put most of a sample's weight on one shot and scored a
# little higher than 3 in precision and recall (RESULTS.md, "Round 16").
SHOT_MIX_SHARPNESS = 6.0
DEFAULT_NORMS = {"mlp": ("none", "none"), "dcgan": ("group", "none"), "latent": ("none", "none")}  # (G, D)


def norm_layers(kind: str, channels: int) -> list[nn.Module]:
    """The normalisation of `channels` features, using each sample's own statistics: [] for none.

    layer: LayerNorm over all of a sample's features (GroupNorm with one group); group: GroupNorm
    with up to 4 groups. Spectral norm is not offered: its power iteration keeps state between calls.
    """
    if kind not in NORMS:
        raise ValueError(f"unknown normalisation {kind!r}; expected one of {NORMS}")
    groups = {"none": 0, "layer": 1, "group": math.gcd(4, channels)}[kind]
    return [nn.GroupNorm(groups, channels)] if groups else []


class OutputSmoothing(nn.Module):
    """A fixed Gaussian blur of G's pre-activation image (σ pixels, per channel), applied before the tanh.

    An inner Adam step moves every output weight by about its rate whatever the gradient's size, which
    writes pixel-sized noise into the samples; the blur takes that band out, and the tanh after it
    still saturates strokes and background. The kernel is a buffer, not a parameter: no task copy adapts it.
    """

    def __init__(self, channels: int, sigma: float):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"output smoothing needs sigma > 0 pixels, got {sigma}")
        self.radius = math.ceil(2 * sigma)
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        taps = torch.exp(-(offsets**2) / (2 * sigma**2))
        taps = taps / taps.sum()
        kernel = (taps[:, None] * taps[None, :]).expand(channels, 1, -1, -1).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        padded = F.pad(x, (self.radius,) * 4, mode="replicate")  # replicate: the border is not pulled towards 0
        return F.conv2d(padded, self.kernel, groups=self.kernel.shape[0])


def median_filter(images: Tensor, radius: int) -> Tensor:
    """Each pixel replaced by the median of its (2·radius + 1)² window, per channel, borders replicated.

    An edge-preserving denoiser for samples [..., C, H, W]: it removes isolated outlier pixels (the
    salt noise that inner Adam steps write) and keeps strokes wider than the radius.
    """
    if radius < 1:
        raise ValueError(f"a median filter needs a radius of at least 1 pixel, got {radius}")
    size = 2 * radius + 1
    planes = F.pad(images.reshape(-1, 1, *images.shape[-2:]), (radius,) * 4, mode="replicate")
    windows = planes.unfold(2, size, 1).unfold(3, size, 1)  # [N, 1, H, W, size, size]
    return windows.flatten(-2).median(-1).values.reshape(images.shape)


def image_output(image_shape: tuple[int, int, int], smooth: float) -> list[nn.Module]:
    """The last layers of a generator on its pre-activation image: optional smoothing, then the tanh."""
    return [*([OutputSmoothing(image_shape[0], smooth)] if smooth else []), nn.Tanh()]


class MLPGenerator(nn.Module):
    """The seed's generator: z -> hidden (ReLU) -> C*H*W (Tanh); optionally normalised before the ReLU
    and smoothed (`smooth`: σ of OutputSmoothing in pixels, 0 = off) before the tanh."""

    def __init__(
        self, z_dim: int, image_shape: tuple[int, int, int], hidden: int = 256, norm: str = "none", smooth: float = 0.0
    ):
        super().__init__()
        self.z_dim, self.image_shape = z_dim, tuple(image_shape)
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden), *norm_layers(norm, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(image_shape)),
            nn.Unflatten(-1, self.image_shape), *image_output(self.image_shape, smooth),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """The seed's discriminator without its final Sigmoid: C*H*W -> hidden (LeakyReLU 0.01) -> logit.

    outputs > 1 makes it an image encoder ([n, outputs] features): the support encoder uses that.
    """

    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 128, norm: str = "none", outputs: int = 1):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(image_shape), hidden), *norm_layers(norm, hidden), nn.LeakyReLU(0.01),
            nn.Linear(hidden, outputs),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


def _dcgan_levels(size: int) -> int:
    """Number of stride-2 stages between a 4x4 map and a size x size image (3 for 32, 4 for 64)."""
    if size not in (32, 64):
        raise ValueError(f"the DCGAN pair supports 32x32 and 64x64 images, not {size}x{size}")
    return int(math.log2(size)) - 2


class DCGANGenerator(nn.Module):
    """DCGAN generator: z -> 4x4 map -> transposed convs doubling the size -> C x size x size (optionally
    smoothed before the tanh, as MLPGenerator)."""

    def __init__(
        self, z_dim: int, image_shape: tuple[int, int, int], width: int = 64, norm: str = "group", smooth: float = 0.0
    ):
        super().__init__()
        channels, height, width_px = image_shape
        if height != width_px:
            raise ValueError(f"the DCGAN pair needs square images, got {height}x{width_px}")
        self.z_dim, self.image_shape = z_dim, tuple(image_shape)
        levels = _dcgan_levels(height)
        c = width * 2 ** (levels - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, c, 4, 1, 0, bias=norm == "none"), *norm_layers(norm, c), nn.ReLU()]
        for _ in range(levels - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=norm == "none"), *norm_layers(norm, c // 2), nn.ReLU()]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), *image_output(self.image_shape, smooth)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(*z.shape, 1, 1))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator, by default without normalisation (per-sample norms keep WGAN-GP's gradients per sample).

    outputs > 1 makes it an image encoder ([n, outputs] features): the support encoder uses that.
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int = 64, norm: str = "none", outputs: int = 1):
        super().__init__()
        channels, height, _ = image_shape
        self.image_shape = tuple(image_shape)
        levels = _dcgan_levels(height)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(levels - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1), *norm_layers(norm, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, outputs, 4, 1, 0)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1).squeeze(-1)


class SupportConditionedGenerator(nn.Module):
    """A generator that sees its task's shots: G(z, shots) = body([z, layer_norm(mean_j encoder(shots_j))]).

    The mean over shots makes the code independent of their order and number (meta-training k may
    differ from meta-test k); the layer norm keeps its scale fixed while the inner loop moves the
    encoder (without it, inner Adam steps blew the code up). The encoder is part of G's
    parameters: meta-learned with the body and adapted by the same inner loop.
    """

    conditioned = True

    def __init__(self, body: nn.Module, encoder: nn.Module, z_dim: int, support_dim: int):
        super().__init__()
        self.body, self.encoder = body, encoder
        self.z_dim, self.image_shape = z_dim, body.image_shape
        self.support_dim = support_dim

    def forward(self, z: Tensor, shots: Tensor) -> Tensor:
        return self.body(self.body_input(z, self.encoder(shots)))

    def body_input(self, z: Tensor, features: Tensor) -> Tensor:
        """What the body sees, [z, the shots' code] [n, z_dim + support_dim], from the encoder's features of
        the k shots [k, ...]."""
        code = F.layer_norm(features.reshape(len(features), -1).mean(0), (self.support_dim,))
        return torch.cat([z, code.expand(z.shape[0], -1)], dim=1)


class FrozenNet(nn.Module):
    """A network whose weights are buffers, not parameters: no task copy adapts them and the outer loop
    does not learn them. They start unset; `load_` installs trained ones, and running before that is an error."""

    def __init__(self, net: nn.Module, part: str):
        super().__init__()
        for module in net.modules():
            for name, weight in list(module._parameters.items()):
                del module._parameters[name]
                module.register_buffer(name, weight.detach(), persistent=False)
        self.net, self.part, self.loaded = net, part, False

    def load_(self, state: dict[str, Tensor]) -> None:
        """Copy trained weights {name: tensor} (the net's state_dict names) into the buffers."""
        buffers = dict(self.net.named_buffers())
        if buffers.keys() != state.keys() or any(buffers[k].shape != v.shape for k, v in state.items()):
            raise ValueError(f"the autoencoder's {self.part} does not fit this model: it has "
                             f"{ {k: tuple(v.shape) for k, v in state.items()} }, the model needs "
                             f"{ {k: tuple(v.shape) for k, v in buffers.items()} }")
        with torch.no_grad():
            for name, value in state.items():
                buffers[name].copy_(value)
        self.loaded = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.loaded:
            raise RuntimeError(f"the latent pair's {self.part} has no trained weights yet: install_autoencoder first")
        return self.net(x)


class LatentGenerator(nn.Module):
    """z -> hidden (ReLU) -> a layer-normed code (+ σ·zP) -> the frozen decoder of a pretrained autoencoder -> image.

    Only the MLP head is a parameter; every code it writes decodes to a clean image, so inner steps
    move the glyph drawn rather than the pixels (an MLP writing pixels draws its strokes in speckle).
    `code_noise` σ > 0 adds σ·zP to the code, P a fixed Gaussian projection of the first `noise_dim`
    inputs (the noise, not the support code), so the samples of a task spread around the adapted code;
    without it, ten inner steps collapse them to nearly one image.
    """

    def __init__(self, z_dim: int, image_shape: tuple[int, int, int], code_dim: int, hidden: int = 256,
                 code_noise: float = 0.0, noise_dim: int | None = None):
        super().__init__()
        self.z_dim, self.image_shape, self.code_dim, self.code_noise = z_dim, tuple(image_shape), code_dim, code_noise
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, code_dim))
        self.decoder = FrozenNet(decoder_net(self.image_shape, code_dim), "decoder")
        noise_dim = noise_dim or z_dim
        projection = torch.randn(noise_dim, code_dim, generator=torch.Generator().manual_seed(0)) / noise_dim**0.5
        self.register_buffer("projection", projection, persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        return decode(self.decoder, self.code(z))

    def code(self, z: Tensor) -> Tensor:
        """The code [n, code_dim] the decoder draws: the head's layer-normed output (+ σ·zP)."""
        code = F.layer_norm(self.net(z), (self.code_dim,))
        if self.code_noise:
            code = code + self.code_noise * (z[..., : len(self.projection)] @ self.projection)
        return code


class LatentDiscriminator(nn.Module):
    """Image -> the frozen encoder's layer-normed code -> hidden (LeakyReLU 0.01) -> logit (or `outputs` features,
    as MLPDiscriminator: the support encoder uses that). Only the MLP head is a parameter."""

    def __init__(self, image_shape: tuple[int, int, int], code_dim: int, hidden: int = 128, outputs: int = 1):
        super().__init__()
        self.image_shape, self.code_dim = tuple(image_shape), code_dim
        self.encoder = FrozenNet(encoder_net(self.image_shape, code_dim), "encoder")
        self.head = nn.Sequential(nn.Linear(code_dim, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.code(x)).squeeze(-1)

    def code(self, x: Tensor) -> Tensor:
        """The frozen encoder's layer-normed code [n, code_dim] of images x, which the head judges."""
        return encode(self.encoder, x, self.code_dim)


class ShotMixingGenerator(SupportConditionedGenerator):
    """The latent pair's support-conditioned G, its samples spread over the shots' fonts: the body's code
    plus σ·Σ_j w_j (c_j − c̄), c_j the frozen encoder's code of shot j and c̄ their mean.

    The weights w = softmax(τ·z[:k]) − 1/k come from the first k noise inputs: most of a sample's
    weight falls on one shot, so each sample moves from the adapted code towards one shot's font,
    as the shots differ from each other, and never towards their average. A random init gets the
    same spread: it adds variety, not the task (RESULTS.md, "Round 16").
    """

    def __init__(self, body: LatentGenerator, encoder: LatentDiscriminator, z_dim: int, support_dim: int,
                 shot_mix: float):
        super().__init__(body, encoder, z_dim, support_dim)
        self.shot_mix = shot_mix

    def forward(self, z: Tensor, shots: Tensor) -> Tensor:
        shots_n = len(shots)
        if shots_n > self.z_dim:
            raise ValueError(f"model.shot_mix weighs k={shots_n} shots by the first k of z_dim={self.z_dim} noise "
                             f"inputs: use at most {self.z_dim} shots or a larger model.z_dim")
        shot_codes = self.encoder.code(shots)  # encoded once: the support code and the spread share them
        weights = torch.softmax(SHOT_MIX_SHARPNESS * z[:, :shots_n], dim=1) - 1.0 / shots_n
        spread = weights @ (shot_codes - shot_codes.mean(0))
        code = self.body.code(self.body_input(z, self.encoder.head(shot_codes)))
        return decode(self.body.decoder, code + self.shot_mix * spread)


def frozen_parts(*nets: nn.Module) -> list[FrozenNet]:
    """Every FrozenNet inside `nets` (empty for pairs without a pretrained part)."""
    return [module for net in nets for module in net.modules() if isinstance(module, FrozenNet)]


def install_autoencoder(nets: tuple[nn.Module, ...], weights: AutoencoderWeights) -> None:
    """Load a trained autoencoder into every frozen encoder and decoder of `nets` (a latent pair)."""
    parts = frozen_parts(*nets)
    if not parts:
        raise ValueError("these networks have no frozen autoencoder part (model.arch is not 'latent')")
    for part in parts:
        part.load_(weights.encoder if part.part == "encoder" else weights.decoder)


def build_pair(
    arch: str,
    z_dim: int,
    image_shape: tuple[int, int, int],
    width: int | None = None,
    norms: tuple[str, str] | None = None,
    support_dim: int = 0,
    smooth: float = 0.0,
    sample_median: int = 0,
    code_dim: int = 64,
    code_noise: float = 0.0,
    shot_mix: float = 0.0,
) -> tuple[nn.Module, nn.Module]:
    """A (generator, discriminator) pair. `width`: MLP hidden size of G (D gets half) or DCGAN base channels;
    `norms`: (G, D) normalisations from NORMS (default: DEFAULT_NORMS of the architecture);
    `support_dim` > 0: G is support-conditioned, with an encoder (D's architecture) of that many features;
    `smooth` > 0: G's output is blurred before its tanh (OutputSmoothing, σ in pixels);
    `sample_median` > 0: samples (not the inner loop's fakes) go through median_filter of that radius,
    recorded as the generator's `sample_median` attribute (MetaLearner.sample reads it);
    `code_dim`: the autoencoder code size of the latent pair, whose frozen weights install_autoencoder loads;
    `code_noise`: σ of the latent generator's code noise (LatentGenerator);
    `shot_mix`: σ of the spread over the shots' fonts of a support-conditioned latent G (ShotMixingGenerator)."""
    image_shape = tuple(image_shape)
    if len(image_shape) != 3 or image_shape[0] not in (1, 3):
        raise ValueError(f"image_shape must be (C, H, W) with 1 or 3 channels, got {image_shape}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    if smooth < 0:
        raise ValueError(f"smooth is the σ of G's output smoothing in pixels: 0 (off) or more, got {smooth}")
    if sample_median < 0:
        raise ValueError(f"sample_median is the radius of the samples' median filter in pixels: 0 (off) or more, "
                         f"got {sample_median}")
    if support_dim < 0 or support_dim == 1:
        raise ValueError(f"support_dim must be 0 (a generator that does not see the shots) or at least 2 (a "
                         f"layer-normed code of one feature is always 0), got {support_dim}")
    if shot_mix < 0:
        raise ValueError(f"shot_mix is the σ of the samples' spread over the shots' fonts: 0 (off) or more, "
                         f"got {shot_mix}")
    if shot_mix and (arch != "latent" or not support_dim):
        raise ValueError(f"shot_mix spreads a support-conditioned latent generator's codes over its shots' codes: it "
                         f"needs arch 'latent' and support_dim > 0, got arch {arch!r} and support_dim {support_dim}")
    norm_g, norm_d = norms or DEFAULT_NORMS[arch]
    if arch == "latent":
        if code_noise < 0:
            raise ValueError(f"code_noise is the σ of the latent generator's code noise: 0 (off) or more, got {code_noise}")
        if (norm_g, norm_d) != ("none", "none") or smooth:
            raise ValueError(f"the latent pair has no normalisation or output smoothing to set (its decoder draws "
                             f"clean images), got norms {(norm_g, norm_d)} and smooth {smooth}")
        hidden = width or 256
        generator = functools.partial(LatentGenerator, image_shape=image_shape, code_dim=code_dim, hidden=hidden,
                                      code_noise=code_noise, noise_dim=z_dim)
        discriminator = functools.partial(LatentDiscriminator, image_shape, code_dim, max(1, hidden // 2))
    elif arch == "mlp":
        hidden = width or 256
        generator = functools.partial(MLPGenerator, image_shape=image_shape, hidden=hidden, norm=norm_g,
                                      smooth=smooth)
        discriminator = functools.partial(MLPDiscriminator, image_shape, max(1, hidden // 2), norm_d)
    else:
        base = width or 64
        generator = functools.partial(DCGANGenerator, image_shape=image_shape, width=base, norm=norm_g,
                                      smooth=smooth)
        discriminator = functools.partial(DCGANDiscriminator, image_shape, base, norm_d)
    if shot_mix:
        g = ShotMixingGenerator(generator(z_dim + support_dim), discriminator(outputs=support_dim), z_dim, support_dim,
                                shot_mix)
    elif support_dim:
        g = SupportConditionedGenerator(generator(z_dim + support_dim), discriminator(outputs=support_dim), z_dim,
                                        support_dim)
    else:
        g = generator(z_dim)
    g.sample_median = sample_median
    return g, discriminator()
