"""The latent pair: a frozen autoencoder (trained, cached, carried in checkpoints) under meta-learned MLP heads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_meta as ref
from metagan_dist import MetaConfig, build_pair, meta_gradients
from metagan_dist import autoencoder as ae
from metagan_dist.autoencoder import AutoencoderWeights, decoder_net, encoder_net, load_or_train_autoencoder
from metagan_dist.evaluation.checkpoint_model import load_meta_learned
from metagan_dist.config import ModelConfig
from metagan_dist.models import ShotMixingGenerator, frozen_parts, install_autoencoder
from test_meta_gradients import central_difference, flat_params, make_batch, mean_objective, reference_grads, rel_err
from train_utils import finish, make_square_pool, torchrun, train, tiny_run_args

SHAPE = (1, 32, 32)


def fresh_weights(code_dim, seed=0):
    """An untrained autoencoder's weights (random, seeded): enough to check plumbing and gradients."""
    torch.manual_seed(seed)
    enc, dec = encoder_net(SHAPE, code_dim), decoder_net(SHAPE, code_dim)
    return AutoencoderWeights(SHAPE, code_dim, "test", enc.state_dict(), dec.state_dict())


def latent_pair(code_dim=3, support_dim=0, width=4, z_dim=2, smooth=False, code_noise=0.0, shot_mix=0.0):
    """A small float64 latent pair with an untrained autoencoder installed; smooth=True swaps the frozen nets'
    ReLUs for softplus, so finite differences never straddle a kink (the heads stay as they are)."""
    torch.manual_seed(1)
    G, D = build_pair("latent", z_dim, SHAPE, width=width, support_dim=support_dim, code_dim=code_dim,
                      code_noise=code_noise, shot_mix=shot_mix)
    install_autoencoder((G, D), fresh_weights(code_dim))
    if smooth:
        for part in frozen_parts(G, D):
            for i, layer in enumerate(part.net):
                if isinstance(layer, (nn.ReLU, nn.LeakyReLU)):
                    part.net[i] = nn.Softplus()
    return G.double(), D.double()


def square_images(n_tasks=8, per_task=12):
    """uint8 [n_tasks * per_task, 1, 32, 32]: a bright 6x6 square in the task's cell of a 4x4 grid, jittered."""
    rng = np.random.default_rng(0)
    images = np.full((n_tasks * per_task, 1, 32, 32), 20, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = ((i // per_task) // 4) * 8 + rng.integers(0, 3), ((i // per_task) % 4) * 8 + rng.integers(0, 3)
        image[0, top: top + 6, left: left + 6] = 230
    return images


def test_only_the_heads_are_parameters_and_the_autoencoder_draws():
    G, D = build_pair("latent", 5, SHAPE, width=8, code_dim=4)
    assert sum(p.numel() for p in G.parameters()) == (5 * 8 + 8) + (8 * 4 + 4)
    assert sum(p.numel() for p in D.parameters()) == (4 * 4 + 4) + (4 * 1 + 1)
    with pytest.raises(RuntimeError, match="decoder has no trained weights"):
        G(torch.randn(2, 5))
    weights = fresh_weights(4)
    install_autoencoder((G, D), weights)
    # An independent reference: plain modules loaded with the same weights, the head's own layers.
    dec, enc = decoder_net(SHAPE, 4), encoder_net(SHAPE, 4)
    dec.load_state_dict(weights.decoder)
    enc.load_state_dict(weights.encoder)
    z, x = torch.randn(3, 5), torch.rand(3, *SHAPE) * 2 - 1
    head = F.layer_norm(G.net(z), (4,))
    torch.testing.assert_close(G(z), 2 * torch.sigmoid(dec(head)) - 1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D(x), D.head(F.layer_norm(enc(x), (4,))).squeeze(-1))


@pytest.mark.parametrize("support_dim", [0, 3])
def test_code_noise_spreads_samples_by_a_projection_of_the_noise_only(support_dim):
    z_dim, code_dim = 5, 4
    G, D = build_pair("latent", z_dim, SHAPE, width=8, code_dim=code_dim, support_dim=support_dim, code_noise=0.5)
    install_autoencoder((G, D), fresh_weights(code_dim))
    body = G.body if support_dim else G
    assert body.projection.shape == (z_dim, code_dim)  # the noise, not the support code
    with torch.no_grad():
        body.net[-1].weight.zero_()  # the head writes one code whatever its input
    z = torch.randn(3, body.z_dim)
    want = ae.decode(body.decoder.net, F.layer_norm(body.net[-1].bias, (code_dim,)) + 0.5 * z[:, :z_dim] @ body.projection)
    torch.testing.assert_close(body(z), want)
    assert (body(z)[0] - body(z)[1]).abs().max() > 1e-3
    body.code_noise = 0.0
    torch.testing.assert_close(body(z)[0], body(z)[1])


def test_shot_mix_moves_each_sample_towards_one_shots_code():
    z_dim, code_dim, support_dim, k = 6, 4, 3, 4
    G, D = build_pair("latent", z_dim, SHAPE, width=8, code_dim=code_dim, support_dim=support_dim, shot_mix=0.7)
    weights = fresh_weights(code_dim)
    install_autoencoder((G, D), weights)
    # An independent reference: plain modules loaded with the same weights, the heads' own layers.
    enc, dec = encoder_net(SHAPE, code_dim), decoder_net(SHAPE, code_dim)
    enc.load_state_dict(weights.encoder)
    dec.load_state_dict(weights.decoder)
    z, shots = torch.randn(5, z_dim), torch.rand(k, *SHAPE) * 2 - 1
    support_code = F.layer_norm(G.encoder.head(F.layer_norm(enc(shots), (code_dim,))).mean(0), (support_dim,))
    head = F.layer_norm(G.body.net(torch.cat([z, support_code.expand(5, -1)], 1)), (code_dim,))
    shot_codes = F.layer_norm(enc(shots), (code_dim,))
    mix = torch.softmax(6.0 * z[:, :k], 1) - 1 / k
    want = 2 * torch.sigmoid(dec(head + 0.7 * mix @ (shot_codes - shot_codes.mean(0)))) - 1
    torch.testing.assert_close(G(z, shots), want, rtol=1e-5, atol=1e-6)
    # Equal weights on every shot: no spread, the plain support-conditioned sample.
    even = z.clone()
    even[:, :k] = 0.3
    plain = 2 * torch.sigmoid(dec(F.layer_norm(G.body.net(torch.cat([even, support_code.expand(5, -1)], 1)),
                                               (code_dim,)))) - 1
    torch.testing.assert_close(G(even, shots), plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k=7 shots by the first k of z_dim=6"):
        G(z, torch.rand(7, *SHAPE))
    # The config builds it (and a checkpoint rebuilds it) from model.shot_mix.
    built, _ = ModelConfig(arch="latent", support_dim=3, shot_mix=0.7).build(SHAPE)
    assert isinstance(built, ShotMixingGenerator) and built.shot_mix == 0.7
    with pytest.raises(ValueError, match=r"model.shot_mix must be >= 0 \(0 = off\), got -1.0"):
        ModelConfig(arch="latent", support_dim=3, shot_mix=-1.0)


def test_bad_latent_settings_are_clear_errors():
    with pytest.raises(ValueError, match="no normalisation or output smoothing"):
        build_pair("latent", 4, SHAPE, norms=("layer", "none"))
    with pytest.raises(ValueError, match="code_noise is the σ"):
        build_pair("latent", 4, SHAPE, code_noise=-0.1)
    with pytest.raises(ValueError, match="shot_mix is the σ"):
        build_pair("latent", 4, SHAPE, support_dim=2, shot_mix=-0.1)
    for arch, support_dim in (("latent", 0), ("mlp", 2)):
        with pytest.raises(ValueError, match=f"needs arch 'latent' and support_dim > 0, got arch '{arch}'"):
            build_pair(arch, 4, SHAPE, support_dim=support_dim, shot_mix=0.5)
    with pytest.raises(ValueError, match="32x32 or 64x64"):
        build_pair("latent", 4, (1, 28, 28))
    G, D = build_pair("latent", 4, SHAPE, code_dim=4)
    with pytest.raises(ValueError, match="does not fit this model"):
        install_autoencoder((G, D), fresh_weights(5))
    mlp = build_pair("mlp", 4, SHAPE)
    with pytest.raises(ValueError, match="no frozen autoencoder part"):
        install_autoencoder(mlp, fresh_weights(4))


def test_the_autoencoder_learns_to_reconstruct():
    images = square_images()
    x = torch.from_numpy(images).float() / 127.5 - 1

    def error(epochs):
        weights = ae.train_autoencoder(images, 8, epochs=epochs, progress=False)
        enc, dec = encoder_net(SHAPE, 8), decoder_net(SHAPE, 8)
        enc.load_state_dict(weights.encoder)
        dec.load_state_dict(weights.decoder)
        with torch.no_grad():
            return (ae.decode(dec, ae.encode(enc, x, 8)) - x).abs().mean().item()

    short, long = error(1), error(200)  # 1 and 200 Adam steps (96 images, one batch an epoch)
    assert long < 0.2 * short, (short, long)
    assert long < 0.5 * (x - x.mean(0)).abs().mean().item()  # far better than the mean image: codes tell tasks apart


def test_the_cache_is_reused_retrained_for_other_settings_and_damage_is_named(tmp_path, monkeypatch):
    images, path = square_images(2, 6), tmp_path / "autoencoder-4.pt"
    first = load_or_train_autoencoder(path, images, 4, epochs=1, progress=False)
    assert path.exists()
    monkeypatch.setattr(ae, "train_autoencoder", lambda *a, **k: pytest.fail("a matching cache was retrained"))
    again = load_or_train_autoencoder(path, images, 4, epochs=1, progress=False)
    assert again.fingerprint == first.fingerprint
    assert all(torch.equal(again.decoder[k], first.decoder[k]) for k in first.decoder)
    monkeypatch.undo()
    other = load_or_train_autoencoder(path, images, 4, epochs=2, progress=False)
    assert other.fingerprint != first.fingerprint
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"cannot read autoencoder cache {path}"):
        load_or_train_autoencoder(path, images, 4, epochs=2, progress=False)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
@pytest.mark.parametrize("support_dim,code_noise,shot_mix",
                         [(0, 0.0, 0.0), (2, 0.0, 0.0), (2, 0.5, 0.0), (2, 0.0, 1.0)])
def test_latent_pair_matches_the_per_task_loop(algorithm, support_dim, code_noise, shot_mix):
    G, D = latent_pair(support_dim=support_dim, code_noise=code_noise, shot_mix=shot_mix, z_dim=3 if shot_mix else 2)
    rule = "adam" if algorithm in ("fomaml", "reptile") else "sgd"
    cfg = MetaConfig(algorithm=algorithm, inner_steps=2, inner_lr=0.1 if rule == "sgd" else 0.01, inner_rule=rule,
                     d_steps=2)
    batch = make_batch(G, 2)
    lrs = tuple(torch.full_like(flat_params(net), 0.1) for net in (G, D)) if algorithm == "metasgd" else None
    got = meta_gradients(G, D, batch, cfg, inner_lrs=lrs)
    want = reference_grads(cfg, G, D, batch, lrs)
    assert got.flat.abs().sum() > 0
    assert rel_err(got.flat, want) <= 1e-10


def test_latent_maml_matches_finite_differences():
    G, D = latent_pair(support_dim=2, smooth=True)
    cfg = MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.1)
    batch = make_batch(G, 2)
    grads = meta_gradients(G, D, batch, cfg)
    theta_g, theta_d = flat_params(G), flat_params(D)
    for part, theta, grad, objective in (
        ("g", theta_g, grads.flat[: theta_g.numel()], lambda x: mean_objective(cfg, G, D, x, theta_d, batch, "g")),
        ("d", theta_d, grads.flat[theta_g.numel():], lambda x: mean_objective(cfg, G, D, theta_g, x, batch, "d")),
    ):
        dirs = list(torch.eye(theta.numel(), dtype=torch.float64))
        # h = 1e-4: G's meta-gradient is small (|g| ~ 1e-4 through an untrained decoder), so at h = 1e-6 the
        # rounding of the objective (~1e-16 / h) dominates; with smooth nets the truncation error is ~h².
        assert rel_err(grad, central_difference(objective, theta, dirs, h=1e-4)) <= 1e-6, part


@pytest.mark.slow
def test_two_ranks_train_resume_and_evaluate_with_the_autoencoder_of_the_checkpoint(tmp_path):
    pool = make_square_pool(tmp_path / "squares")
    out = tmp_path / "run"
    latent = {"model.arch": "latent", "model.code_dim": 4, "model.autoencoder_epochs": 1, "meta.algorithm": "reptile",
              "meta.inner_rule": "adam", "meta.inner_lr": 0.01, "data.shots": 3, "data.batches_per_epoch": 2}
    code, output = finish(torchrun(tiny_run_args(pool, out, 2, **latent), nproc=2), timeout=600)
    assert code == 0, output[-3000:]
    assert "meta-parameters identical on 2 rank(s)" in output
    cache = pool / ae.cache_name(4, 1)
    cached = AutoencoderWeights.from_dict(torch.load(cache, weights_only=True), str(cache))
    model = load_meta_learned(out)
    assert model.config.model.arch == "latent"
    decoder = next(part for part in frozen_parts(model.learner.G.module) if part.part == "decoder")
    for name, value in cached.decoder.items():  # the checkpoint's copy is the cache's, installed
        assert torch.equal(dict(decoder.net.named_buffers())[name], value)

    cache.unlink()  # a resumed run takes the checkpoint's autoencoder: nothing is retrained
    code, output = finish(torchrun(tiny_run_args(pool, out, 4, **latent), nproc=2), timeout=600)
    assert code == 0, output[-3000:]
    assert "resumed from" in output and not cache.exists()
    resumed = load_meta_learned(out)
    z, shots = torch.randn(1, 5, resumed.config.model.z_dim), torch.rand(1, 3, *SHAPE) * 2 - 1
    samples = resumed.learner.sample(resumed.theta_g[None], z, shots)
    assert samples.shape == (1, 5, *SHAPE) and samples.isfinite().all()


def test_a_single_process_run_writes_the_autoencoder_into_its_checkpoint(tmp_path):
    pool = make_square_pool(tmp_path / "squares")
    args = tiny_run_args(pool, tmp_path / "run", 1, **{"model.arch": "latent", "model.code_dim": 4,
                                                        "model.autoencoder_epochs": 1})
    result = train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-00000001" / "trainer.pt", weights_only=False)
    assert AutoencoderWeights.from_dict(state["autoencoder"], "trainer.pt").code_dim == 4
