"""Models, flat buffers, losses, episodes and the core's errors for bad input."""

import numpy as np
import pytest
import torch
from torch import nn

import reference_meta as ref
from metagan_dist import EpisodeBatch, MetaConfig, build_pair, draw_episode, meta_gradients
from metagan_dist.config import ModelConfig
from metagan_dist.flat import BatchedNet, FlatLayout
from metagan_dist.losses import gradient_penalty
from metagan_dist.meta import MetaLearner
from metagan_dist.models import OutputSmoothing, median_filter


@pytest.mark.parametrize(
    "arch,shape", [("mlp", (1, 28, 28)), ("dcgan", (1, 32, 32)), ("dcgan", (3, 32, 32)), ("dcgan", (1, 64, 64)), ("dcgan", (3, 64, 64))]
)
def test_pairs_make_and_judge_images_of_their_shape(arch, shape):
    G, D = build_pair(arch, 16, shape, width=8)
    images = G(torch.randn(5, 16))
    assert images.shape == (5, *shape)
    assert images.abs().max() <= 1
    assert D(images).shape == (5,)


def test_seed_mlp_pair_has_the_seed_layout():
    G, D = build_pair("mlp", 64, (1, 28, 28))
    assert [tuple(p.shape) for p in G.parameters()] == [(256, 64), (256,), (784, 256), (784,)]
    assert [tuple(p.shape) for p in D.parameters()] == [(128, 784), (128,), (1, 128), (1,)]
    assert isinstance(D.net[2], nn.LeakyReLU) and D.net[2].negative_slope == 0.01


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("dcgan", (1, 32, 32))])
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_normalised_pairs_normalise_each_sample_on_its_own(arch, shape, norm):
    G, D = build_pair(arch, 4, shape, width=8, norms=(norm, norm))
    assert any(isinstance(m, nn.GroupNorm) for m in G.modules()) and any(isinstance(m, nn.GroupNorm) for m in D.modules())
    z = torch.randn(6, 4)
    images = G(z)
    # A sample's image and logit do not depend on the other samples of its batch.
    torch.testing.assert_close(G(z[:1]), images[:1])
    torch.testing.assert_close(D(images[:2]), D(images)[:2])
    assert not list(G.buffers()) and not list(D.buffers())


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("dcgan", (1, 32, 32))])
def test_support_conditioned_generator_draws_from_the_mean_encoding_of_its_shots(arch, shape):
    G, D = build_pair(arch, 4, shape, width=4, support_dim=3)
    assert G.conditioned and G.z_dim == 4 and G.image_shape == shape
    z, shots, other = torch.randn(5, 4), torch.rand(4, *shape) * 2 - 1, torch.rand(4, *shape) * 2 - 1
    images = G(z, shots)
    assert images.shape == (5, *shape) and D(images).shape == (5,)
    # The shots' order does not matter, their content does, and any k works (mean of the encodings).
    torch.testing.assert_close(G(z, shots.flip(0)), images)
    assert not torch.allclose(G(z, other), images)
    torch.testing.assert_close(G(z, torch.cat([shots, shots])), images)
    code = G.encoder(shots).mean(0)
    code = (code - code.mean()) / (code.var(unbiased=False) + 1e-5).sqrt()
    want = G.body(torch.cat([z, code.expand(5, -1)], dim=1))
    torch.testing.assert_close(images, want)


def test_output_smoothing_is_a_normalised_gaussian_blur_with_replicated_borders():
    sigma = 0.7
    smooth = OutputSmoothing(2, sigma).double()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    # Direct sum over the window, the border replicated by clamping indices.
    r = smooth.radius
    taps = torch.tensor([np.exp(-(d * d) / (2 * sigma * sigma)) for d in range(-r, r + 1)], dtype=torch.float64)
    taps = taps / taps.sum()
    want = torch.zeros_like(x)
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            rows = (torch.arange(5) + a).clamp(0, 4)
            cols = (torch.arange(6) + b).clamp(0, 5)
            want += taps[a + r] * taps[b + r] * x[:, :, rows][:, :, :, cols]
    torch.testing.assert_close(smooth(x), want)
    # A flat image stays flat (the weights sum to 1), and channels do not mix.
    torch.testing.assert_close(smooth(torch.full((1, 2, 5, 6), -0.9, dtype=torch.float64)),
                               torch.full((1, 2, 5, 6), -0.9, dtype=torch.float64))
    one_channel = x.clone()
    one_channel[:, 1] = 0
    assert smooth(one_channel)[:, 1].abs().max() == 0


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("dcgan", (3, 32, 32))])
def test_smoothed_generator_has_the_same_parameters_and_a_smoothed_output(arch, shape):
    torch.manual_seed(0)
    plain, _ = build_pair(arch, 4, shape, width=4)
    torch.manual_seed(0)
    smoothed, _ = build_pair(arch, 4, shape, width=4, smooth=0.8)
    assert FlatLayout.of(smoothed).names == FlatLayout.of(plain).names
    assert FlatLayout.of(smoothed).shapes == FlatLayout.of(plain).shapes
    assert not smoothed.state_dict().keys() - plain.state_dict().keys()  # the kernel is not saved
    z = torch.randn(5, 4)
    pre = plain.net[:-1](z if arch == "mlp" else z[..., None, None])  # the image before the last layer, the tanh
    smooth = next(m for m in smoothed.modules() if isinstance(m, OutputSmoothing))
    torch.testing.assert_close(smoothed(z), torch.tanh(smooth(pre)))
    assert not torch.allclose(smoothed(z), plain(z))


def test_model_config_builds_a_smoothed_generator_and_refuses_a_negative_sigma():
    G, _ = ModelConfig(g_smooth=0.5).build((1, 8, 8))
    assert any(isinstance(m, OutputSmoothing) for m in G.modules())
    G, _ = ModelConfig().build((1, 8, 8))
    assert not any(isinstance(m, OutputSmoothing) for m in G.modules())
    with pytest.raises(ValueError, match="model.g_smooth must be >= 0"):
        ModelConfig(g_smooth=-0.5)
    with pytest.raises(ValueError, match="smooth is the σ of G's output smoothing"):
        build_pair("mlp", 4, (1, 8, 8), smooth=-1)


def test_median_filter_is_the_median_of_each_window_with_replicated_borders():
    images = torch.randn(2, 3, 3, 6, 5, dtype=torch.float64)  # [T, n, C, H, W]
    for radius in (1, 2):
        got = median_filter(images, radius)
        assert got.shape == images.shape
        height, width = images.shape[-2:]
        for index in np.ndindex(*images.shape[:3]):
            plane = images[index]
            for y in range(height):
                for x in range(width):
                    rows = [min(max(y + dy, 0), height - 1) for dy in range(-radius, radius + 1)]
                    cols = [min(max(x + dx, 0), width - 1) for dx in range(-radius, radius + 1)]
                    window = plane[rows][:, cols].flatten()
                    assert got[index][y, x] == window.sort().values[len(window) // 2]


def test_median_filter_removes_isolated_pixels_and_keeps_strokes():
    image = -torch.ones(1, 1, 12, 12)
    image[..., 2:9, 5:8] = 1  # a stroke three pixels wide
    salted = image.clone()
    salted[..., 10, 1] = salted[..., 1, 10] = 1  # salt on the background
    salted[..., 4, 6] = -1  # pepper in the stroke
    torch.testing.assert_close(median_filter(salted, 1), median_filter(image, 1))
    assert median_filter(salted, 1)[..., 3:8, 5:8].eq(1).all()  # the stroke's body survives
    diverged = image.clone()
    diverged[..., 6, 1] = float("nan")
    assert median_filter(diverged, 1).isnan().any()  # a diverged sample is not filtered into a number
    with pytest.raises(ValueError, match="radius of at least 1"):
        median_filter(image, 0)


def test_samples_go_through_the_generators_median_filter_and_inner_fakes_do_not():
    shape = (1, 8, 8)
    G, D = ModelConfig(support_dim=4, sample_median=1).build(shape)
    assert G.sample_median == 1 and ModelConfig().build(shape)[0].sample_median == 0
    learner = MetaLearner(G, D, MetaConfig())
    theta_g = learner.G.flat_parameters()
    noise, support = torch.randn(2, 5, G.z_dim), torch.rand(2, 3, *shape) * 2 - 1
    fakes = learner.generate(theta_g, noise, support)
    torch.testing.assert_close(learner.sample(theta_g, noise, support), median_filter(fakes, 1))
    assert not torch.allclose(fakes, median_filter(fakes, 1))  # the filter did something to these samples
    with pytest.raises(ValueError, match="model.sample_median must be >= 0"):
        ModelConfig(sample_median=-1)
    with pytest.raises(ValueError, match="sample_median is the radius"):
        build_pair("mlp", 4, shape, sample_median=-1)


def test_model_config_builds_a_support_conditioned_generator_on_request():
    plain, _ = ModelConfig().build((1, 8, 8))
    conditioned, _ = ModelConfig(support_dim=16).build((1, 8, 8))
    assert not getattr(plain, "conditioned", False) and conditioned.conditioned
    assert conditioned.encoder.net[-1].out_features == 16
    with pytest.raises(ValueError, match="model.support_dim must be >= 0"):
        ModelConfig(support_dim=-1)
    with pytest.raises(ValueError, match="model.support_dim must be 0 .* or at least 2"):
        ModelConfig(support_dim=1)


def test_model_config_builds_the_architectures_default_norms_unless_told():
    from metagan_dist.config import ModelConfig

    default_g, default_d = ModelConfig(arch="dcgan", width=4).build((1, 32, 32))
    assert any(isinstance(m, nn.GroupNorm) for m in default_g.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in default_d.modules())
    plain_g, _ = ModelConfig(arch="dcgan", width=4, g_norm="none").build((1, 32, 32))
    assert not any(isinstance(m, nn.GroupNorm) for m in plain_g.modules())
    with pytest.raises(ValueError, match="unknown model.d_norm 'batch'"):
        ModelConfig(d_norm="batch")


def test_no_meta_learned_network_keeps_running_statistics():
    for arch, shape in [("mlp", (1, 28, 28)), ("dcgan", (3, 64, 64))]:
        for net in build_pair(arch, 8, shape):
            assert not list(net.buffers())


def test_flat_layout_round_trip():
    G, _ = build_pair("dcgan", 8, (3, 32, 32), width=4)
    layout = FlatLayout.of(G)
    flat = layout.flatten(G.parameters())
    assert flat.shape == (sum(p.numel() for p in G.parameters()),)
    for view, p in zip(layout.split(flat), G.parameters()):
        assert torch.equal(view, p)
    copies = torch.stack([flat, flat * 2])
    views = layout.views(copies)
    assert all(v.shape == (2, *p.shape) for v, p in zip(views.values(), G.parameters()))
    with pytest.raises(ValueError, match="needs"):
        layout.split(flat[:-1])


def test_linear_weights_are_stored_transposed_and_conv_weights_are_not():
    mlp_g, mlp_d = build_pair("mlp", 4, (1, 6, 6), width=8, support_dim=4)
    conv_g, conv_d = build_pair("dcgan", 8, (1, 32, 32), width=4, support_dim=4)
    for net in (mlp_g, mlp_d, conv_g, conv_d):
        layout = FlatLayout.of(net)
        linear = {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
        assert [n for n, t in zip(layout.names, layout.transposed) if t] == [n for n in layout.names if n in linear]
    assert sum(FlatLayout.of(mlp_g).transposed) == 4 and not any(FlatLayout.of(conv_g).transposed)
    flat = FlatLayout.of(mlp_g).flatten(mlp_g.parameters())
    weight = mlp_g.body.net[0].weight  # [hidden, z + code]: stored as its columns, one after the other
    assert torch.equal(flat[: weight.numel()], weight.detach().t().reshape(-1))


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("dcgan", (1, 32, 32))])
def test_batched_net_equals_each_task_run_alone(arch, shape):
    G, _ = build_pair(arch, 4, shape, width=4)
    net = BatchedNet(G)
    flats = torch.stack([net.flat_parameters() + 0.01 * t for t in range(3)])
    z = torch.randn(3, 5, 4)
    batched = net(flats, z)
    for t in range(3):
        alone = ref.forward(G, ref.split_like(G, flats[t]), z[t])
        torch.testing.assert_close(batched[t], alone)


def test_batchnorm_with_running_stats_is_refused():
    D = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(1))
    with pytest.raises(ValueError, match="running statistics"):
        BatchedNet(D, "discriminator")


def test_gradient_penalty_matches_a_direct_computation():
    _, D = build_pair("dcgan", 4, (1, 32, 32), width=2)
    D = D.double()
    net = BatchedNet(D)
    theta = torch.stack([net.flat_parameters(), net.flat_parameters() * 0.9])
    real = torch.rand(2, 3, 1, 32, 32, dtype=torch.float64)
    fake = torch.rand(2, 3, 1, 32, 32, dtype=torch.float64)
    mix = torch.rand(2, 3, dtype=torch.float64)
    got = gradient_penalty(lambda x: net(theta, x), real, fake, mix)
    for t in range(2):
        params = ref.split_like(D, theta[t])
        want = ref.penalty(D, params, real[t], fake[t], mix[t])
        torch.testing.assert_close(got[t], want, rtol=1e-12, atol=1e-12)
    # And from first principles for one sample: the input gradient of the logit, by hand.
    x_hat = (mix[0, 0] * real[0, 0] + (1 - mix[0, 0]) * fake[0, 0]).unsqueeze(0).requires_grad_()
    (g,) = torch.autograd.grad(D(x_hat).sum(), x_hat)
    single = gradient_penalty(lambda x: net(theta[:1], x), real[:1, :1], fake[:1, :1], mix[:1, :1])
    torch.testing.assert_close(single[0], (g.norm() - 1) ** 2)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
def test_wgan_gp_runs_under_every_algorithm(algorithm):
    G, D = build_pair("mlp", 8, (1, 8, 8), width=16)
    batch = EpisodeBatch.sample(torch.rand(3, 4, 1, 8, 8) * 2 - 1, torch.rand(3, 4, 1, 8, 8) * 2 - 1, 2, 8)
    grads = meta_gradients(G, D, batch, MetaConfig(algorithm=algorithm, loss="wgan-gp", inner_steps=2))
    assert torch.isfinite(grads.flat).all() and grads.flat.abs().sum() > 0
    assert torch.isfinite(grads.loss_d)


def test_draw_episode_splits_without_replacement():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    support, query = draw_episode(images, 4, 6, np.random.default_rng(0))
    drawn = np.concatenate([support.ravel(), query.ravel()])
    assert sorted(drawn.tolist()) == list(range(10))
    again = draw_episode(images, 4, 6, np.random.default_rng(0))
    assert np.array_equal(again[0], support)


# --- bad input: each a ValueError that names the value -------------------------------------------


def _batch(tasks=2, shape=(1, 8, 8), z=8, steps=1, shots=3):
    return EpisodeBatch.sample(torch.rand(tasks, shots, *shape), torch.rand(tasks, 3, *shape), steps, z)


def test_error_image_size_mismatch():
    G, D = build_pair("mlp", 8, (1, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 16, 16\).*\(1, 8, 8\)"):
        meta_gradients(G, D, _batch(shape=(1, 16, 16)))


def test_error_channel_mismatch():
    G, D = build_pair("dcgan", 8, (1, 32, 32), width=2)
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(1, 32, 32\)"):
        meta_gradients(G, D, _batch(shape=(3, 32, 32)))


def test_error_no_tasks():
    G, D = build_pair("mlp", 8, (1, 8, 8))
    with pytest.raises(ValueError, match="T=0"):
        meta_gradients(G, D, _batch(tasks=0))


def test_error_more_shots_than_the_task_has():
    with pytest.raises(ValueError, match=r"k=5 support \+ q=3 .* 6 images"):
        draw_episode(np.zeros((6, 1, 8, 8), np.uint8), 5, 3, np.random.default_rng(0))


def test_error_noise_for_the_wrong_number_of_inner_steps():
    G, D = build_pair("mlp", 8, (1, 8, 8))
    with pytest.raises(ValueError, match="inner_steps=2"):
        meta_gradients(G, D, _batch(steps=1), MetaConfig(inner_steps=2))


def test_error_noise_of_the_wrong_width():
    G, D = build_pair("mlp", 8, (1, 8, 8))
    with pytest.raises(ValueError, match="z_dim=8"):
        meta_gradients(G, D, _batch(z=5))


@pytest.mark.parametrize(
    "field,value", [("algorithm", "maml2"), ("loss", "lsgan"), ("objective", "both")]
)
def test_error_unknown_names(field, value):
    with pytest.raises(ValueError, match=f"unknown meta.{field} '{value}'"):
        MetaConfig(**{field: value})


def test_error_unknown_reduction_and_bad_numbers():
    G, D = build_pair("mlp", 8, (1, 8, 8))
    with pytest.raises(ValueError, match="'median'"):
        meta_gradients(G, D, _batch(), reduction="median")
    with pytest.raises(ValueError, match="inner_steps"):
        MetaConfig(inner_steps=0)
    with pytest.raises(ValueError, match="inner_lr"):
        MetaConfig(inner_lr=-1.0)


def test_error_unknown_architecture_and_image_size():
    with pytest.raises(ValueError, match="'resnet'"):
        build_pair("resnet", 8, (1, 32, 32))
    with pytest.raises(ValueError, match="48x48"):
        build_pair("dcgan", 8, (1, 48, 48))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_pair("mlp", 8, (2, 8, 8))


def test_error_wgan_gp_needs_one_fake_per_real_image():
    G, D = build_pair("mlp", 8, (1, 8, 8))
    batch = _batch(shots=3)
    batch.inner_noise = batch.inner_noise[:, :, :2]
    with pytest.raises(ValueError, match="wgan-gp"):
        meta_gradients(G, D, batch, MetaConfig(loss="wgan-gp"))
