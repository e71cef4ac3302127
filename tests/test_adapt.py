"""The adapt command end to end on a tiny checkpoint, its bad-input errors, and the adaptation rules it uses."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reference_meta as ref
from metagan_dist import MetaConfig, build_pair
from metagan_dist.checkpoint import load_trainer_state
from metagan_dist.config import TrainConfig
from metagan_dist.data import Pool
from metagan_dist.evaluation.adapt import main
from metagan_dist.evaluation.checkpoint_model import load_meta_learned
from metagan_dist.evaluation.rules import Rule, parse_rule, start_adaptation
from metagan_dist.meta import MetaLearner
from train_utils import SHOTS, SQUARES_SHAPE, Z_DIM, make_square_pool, train_tiny_run

PAD = 1  # save_grid's padding between images


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return make_square_pool(tmp_path_factory.mktemp("adapt") / "pool")


@pytest.fixture(scope="module")
def run(pool, tmp_path_factory) -> Path:
    return train_tiny_run(pool, tmp_path_factory.mktemp("adapt") / "run")


@pytest.fixture(scope="module")
def metasgd_run(pool, tmp_path_factory) -> Path:
    return train_tiny_run(pool, tmp_path_factory.mktemp("adapt") / "metasgd", "meta.algorithm=metasgd")


def write_images(folder: Path, count: int, size: int = 32, mode: str = "L", start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{i:02d}.png")
    return folder


def grid_size(columns: int, rows: int = 1, side: int = 32) -> tuple[int, int]:
    """(width, height) of a save_grid PNG."""
    return columns * (side + PAD) + PAD, rows * (side + PAD) + PAD


def error_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, argv)))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---- end to end ----

def test_a_diverged_adaptation_is_an_error_and_writes_nothing(run, tmp_path, capsys):
    images = write_images(tmp_path / "shots", 5)
    err = error_of(capsys, run, "--images", images, "--steps", "3", "--rule", "sgd:1e30", "--out", tmp_path / "out",
                   "--device", "cpu")
    assert "the adaptation diverged" in err and "sgd:1e+30" in err, err
    assert not (tmp_path / "out").exists()


def test_adapt_from_a_folder_writes_the_grid_and_the_weights(run, tmp_path, capsys):
    images = write_images(tmp_path / "shots", 5)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    main([str(run), "--images", str(images), "--steps", "3", "--samples", "6", "--out", str(out), "--save-weights",
          "--device", "cpu"])
    printed = capsys.readouterr().out
    assert str(out / "grid.png") in printed and str(out / "adapted.pt") in printed

    with Image.open(out / "grid.png") as grid:
        assert grid.size == grid_size(SHOTS + 6)
    weights = torch.load(out / "adapted.pt", weights_only=True)
    model = load_meta_learned(run)
    assert weights["generator"].shape == model.theta_g.shape and weights["discriminator"].shape == model.theta_d.shape
    assert not torch.equal(weights["generator"], model.theta_g)  # adapted, not the meta-learned init
    assert weights["shots"] == [str(images / f"img{i:02d}.png") for i in range(SHOTS)]
    assert (weights["steps"], weights["rule"], weights["image_shape"]) == (3, "meta", list(SQUARES_SHAPE))


def test_sample_median_filters_the_samples_and_overrides_the_checkpoints_radius(run, tmp_path, capsys):
    images = write_images(tmp_path / "shots", 5)
    grids = {}
    for radius in (0, 1):
        out = tmp_path / f"median{radius}"
        main([str(run), "--images", str(images), "--steps", "2", "--samples", "6", "--out", str(out), "--save-weights",
              "--device", "cpu", "--sample-median", str(radius)])
        weights = torch.load(out / "adapted.pt", weights_only=True)
        assert weights["config"]["model"]["sample_median"] == radius
        with Image.open(out / "grid.png") as grid:
            grids[radius] = np.asarray(grid)
    shots_width = SHOTS * (32 + PAD)
    assert np.array_equal(grids[0][:, :shots_width], grids[1][:, :shots_width])  # the same shots
    assert not np.array_equal(grids[0][:, shots_width:], grids[1][:, shots_width:])  # filtered samples
    assert load_meta_learned(run).learner.G.module.sample_median == 0  # the checkpoint's own radius
    assert load_meta_learned(run, sample_median=2).learner.G.module.sample_median == 2
    assert "--sample-median must be >= 0" in error_of(capsys, run, "--images", images, "--sample-median", "-1")


def test_g_average_overrides_the_checkpoints_and_must_lie_in_0_1(run, tmp_path, capsys):
    images = write_images(tmp_path / "shots", 5)
    out = tmp_path / "averaged"
    main([str(run), "--images", str(images), "--steps", "2", "--samples", "6", "--out", str(out), "--save-weights",
          "--device", "cpu", "--g-average", "0.25"])
    assert torch.load(out / "adapted.pt", weights_only=True)["config"]["meta"]["g_average"] == 0.25
    assert load_meta_learned(run).config.meta.g_average == TrainConfig().meta.g_average  # the checkpoint's own
    assert "--g-average must be in [0, 1)" in error_of(capsys, run, "--images", images, "--g-average", "1")


def test_adapt_to_a_pool_task_with_meta_sgd_rates_and_adam(metasgd_run, pool, tmp_path):
    key = Pool(pool).keys("test")[0]
    for rule in ("meta", "adam:0.01"):
        out = tmp_path / rule.replace(":", "_")
        main([str(metasgd_run), "--task", key, "--pool", str(pool), "--steps", "2", "--samples", "4",
              "--rule", rule, "--out", str(out), "--save-weights"])
        weights = torch.load(out / "adapted.pt", weights_only=True)
        assert weights["shots"][0].endswith(f"test/{key}#0") and weights["rule"] == rule
        with Image.open(out / "grid.png") as grid:
            assert grid.size == grid_size(SHOTS + 4)


def test_a_support_conditioned_run_trains_adapts_and_samples_from_its_saved_weights(pool, tmp_path):
    run = train_tiny_run(pool, tmp_path / "run", "model.support_dim=4", "meta.algorithm=reptile",
                         "meta.inner_rule=adam", "meta.inner_lr=0.01", "run.sample_every=2", steps=2)
    assert (run / "samples" / "step-00000002.png").is_file()
    key = Pool(pool).keys("test")[0]
    out = tmp_path / "adapted"
    main([str(run), "--task", key, "--pool", str(pool), "--steps", "2", "--samples", "4", "--out", str(out),
          "--save-weights", "--seed", "3"])
    weights = torch.load(out / "adapted.pt", weights_only=True)
    model = load_meta_learned(run)
    assert model.learner.conditioned and weights["support"].shape == (SHOTS, *SQUARES_SHAPE)
    # The saved weights and shots are all a conditioned G needs to draw; other shots draw other images.
    z = torch.randn(1, 4, Z_DIM)
    samples = model.learner.sample(weights["generator"][None], z, weights["support"][None])
    assert samples.shape == (1, 4, *SQUARES_SHAPE)
    other = model.learner.sample(weights["generator"][None], z, -weights["support"][None])
    assert not torch.allclose(samples, other)


def test_a_deepspeed_checkpoint_loads_to_the_same_parameters(run, tmp_path):
    """DeepSpeed writes mp_rank_00_model_states.pt ({"module": state_dict}) instead of engine.pt."""
    torch_folder = load_meta_learned(run).folder
    ds_folder = Path(shutil.copytree(torch_folder, tmp_path / torch_folder.name))
    params = torch.load(ds_folder / "engine.pt", weights_only=True)["params"]
    (ds_folder / "engine.pt").unlink()
    torch.save({"module": params}, ds_folder / "mp_rank_00_model_states.pt")
    loaded, reference = load_meta_learned(ds_folder), load_meta_learned(torch_folder)
    assert torch.equal(loaded.theta_g, reference.theta_g) and torch.equal(loaded.theta_d, reference.theta_d)


# ---- bad input ----

def test_a_folder_with_fewer_than_k_usable_images_names_the_folder(run, tmp_path, capsys):
    images = write_images(tmp_path / "two", 2)
    (images / "broken.png").write_bytes(b"not a png")
    err = error_of(capsys, run, "--images", images)
    assert f"image folder {images} holds 2 usable image(s), fewer than the {SHOTS} shots" in err
    assert "broken.png" in err


def test_images_of_another_size_name_the_file_and_resize_converts_them_saying_so(run, tmp_path, capsys):
    images = write_images(tmp_path / "small", SHOTS, size=28)
    err = error_of(capsys, run, "--images", images)
    assert f"image {images / 'img00.png'} is 28x28 with 1 channel(s)" in err and "32x32 with 1 channel(s)" in err
    assert "--resize" in err

    main([str(run), "--images", str(images), "--resize", "--steps", "1", "--samples", "2", "--out", str(tmp_path / "o")])
    assert f"resized/converted {SHOTS} of {SHOTS} image(s) to 32x32 with 1 channel(s)" in capsys.readouterr().out
    assert (tmp_path / "o" / "grid.png").is_file()


def test_images_with_another_channel_count_name_the_file(run, tmp_path, capsys):
    images = write_images(tmp_path / "rgb", SHOTS, mode="RGB")
    err = error_of(capsys, run, "--images", images)
    assert f"image {images / 'img00.png'} is 32x32 with 3 channel(s)" in err


def test_a_checkpoint_of_another_format_version_names_the_file_and_version(run, tmp_path, capsys):
    folder = Path(shutil.copytree(load_meta_learned(run).folder, tmp_path / "old"))
    state = load_trainer_state(folder)
    torch.save({**state, "version": 99}, folder / "trainer.pt")
    err = error_of(capsys, folder, "--images", write_images(tmp_path / "shots", SHOTS))
    assert f"{folder / 'trainer.pt'} has checkpoint format version 99" in err


def test_a_version_2_checkpoint_is_read_in_its_untransposed_flat_order(metasgd_run, tmp_path):
    """Before version 3, every parameter (nn.Linear weights too) was stored in its own order in the flat vectors."""
    new = load_meta_learned(metasgd_run)
    folder = Path(shutil.copytree(new.folder, tmp_path / "v2"))
    engine = torch.load(folder / "engine.pt", weights_only=True)
    nets = {"generator": new.learner.G.module, "discriminator": new.learner.D.module}
    for key in ("generator", "discriminator", "generator_lr", "discriminator_lr"):
        net = nets[key.removesuffix("_lr")]
        engine["params"][key] = torch.cat([t.reshape(-1) for t in ref.split_like(net, engine["params"][key])])
    torch.save(engine, folder / "engine.pt")
    torch.save({**load_trainer_state(folder), "version": 2}, folder / "trainer.pt")
    old = load_meta_learned(folder)
    pairs = [(new.learner.G, new.theta_g, old.theta_g), (new.learner.D, new.theta_d, old.theta_d),
             (new.learner.G, new.inner_lrs[0], old.inner_lrs[0]), (new.learner.D, new.inner_lrs[1], old.inner_lrs[1])]
    for net, want, got in pairs:
        assert not torch.equal(want, torch.cat([t.reshape(-1) for t in net.layout.split(want)]))  # the orders differ
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_checkpoint_saved_before_newer_keys_loads_as_it_was_trained(run, tmp_path):
    folder = Path(shutil.copytree(load_meta_learned(run).folder, tmp_path / "older"))
    state = load_trainer_state(folder)
    state["config"]["meta"].pop("inner_rule"), state["config"]["meta"].pop("d_steps")
    torch.save(state, folder / "trainer.pt")
    older = load_meta_learned(folder)
    assert (older.config.meta.inner_rule, older.config.meta.d_steps) == ("sgd", 1)
    # A model whose saved shape no longer fits the meta-parameters is refused, naming the folder.
    state["config"]["model"]["support_dim"] = 8 if state["config"]["model"]["support_dim"] != 8 else 16
    torch.save(state, folder / "trainer.pt")
    with pytest.raises(ValueError, match=f"{folder}: its θ_G has .* values but its config's model"):
        load_meta_learned(folder)


def test_a_folder_without_checkpoints_is_named(tmp_path, capsys):
    err = error_of(capsys, tmp_path, "--images", write_images(tmp_path / "shots", SHOTS))
    assert f"{tmp_path} is neither a checkpoint folder" in err


def test_an_unknown_task_and_a_bad_rule_are_named(run, pool, capsys):
    assert "no task 'nope'" in error_of(capsys, run, "--task", "nope", "--pool", pool)
    key = Pool(pool).keys("test")[0]
    assert "adaptation rule 'adam'" in error_of(capsys, run, "--task", key, "--pool", pool, "--rule", "adam")


# ---- the pieces ----

def test_parse_rule_accepts_the_three_kinds_and_rejects_the_rest():
    assert parse_rule("meta") == Rule("meta") and parse_rule("sgd:0.1") == Rule("sgd", 0.1)
    assert str(parse_rule("adam:1e-3")) == "adam:0.001"
    for bad in ("meta:0.1", "sgd", "adam:x", "adam:-1", "rmsprop:0.1"):
        with pytest.raises(ValueError, match="adaptation rule"):
            parse_rule(bad)


@pytest.fixture
def learner() -> MetaLearner:
    G, D = build_pair("mlp", Z_DIM, SQUARES_SHAPE, 16)
    return MetaLearner(G, D, MetaConfig(inner_lr=0.05))


def task_inputs(tasks: int = 2, steps: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(tasks, SHOTS, *SQUARES_SHAPE, generator=g) * 2 - 1
    return support, torch.randn(steps, tasks, SHOTS, Z_DIM, generator=g), torch.rand(steps, tasks, SHOTS, generator=g)


def test_the_meta_rule_in_chunks_is_metalearner_adapt_in_one_call(learner):
    support, noise, mix = task_inputs()
    theta_g, theta_d = learner.G.flat_parameters(), learner.D.flat_parameters()
    adaptation = start_adaptation(learner, Rule("meta"), theta_g, theta_d, tasks=2)
    assert torch.equal(adaptation.generator, theta_g.expand(2, -1))  # step 0 is the init itself
    adaptation.advance(support, noise[:1], mix[:1])
    adaptation.advance(support, noise[1:], mix[1:])
    expected_g, expected_d = learner.adapt(theta_g, theta_d, support, noise, mix)
    torch.testing.assert_close(adaptation.generator, expected_g)
    torch.testing.assert_close(adaptation.discriminator, expected_d)


def test_g_average_reads_out_the_weighted_mean_of_the_iterates_and_steps_from_the_last(learner):
    support, noise, mix = task_inputs(steps=3)
    theta_g, theta_d = learner.G.flat_parameters(), learner.D.flat_parameters()
    iterates = []  # G after 1, 2 and 3 steps of the plain (last-iterate) adaptation
    plain = learner.start_adaptation(theta_g, theta_d, tasks=2)
    for s in range(3):
        plain.advance(support, noise[s : s + 1], mix[s : s + 1])
        iterates.append(plain.generator)
    averaged = learner.start_adaptation(theta_g, theta_d, tasks=2, g_average=0.5)
    assert torch.equal(averaged.generator, theta_g.expand(2, -1))  # no step yet: the init
    averaged.advance(support, noise[:2], mix[:2])  # in two chunks, like the evaluation's curve
    averaged.advance(support, noise[2:], mix[2:])
    torch.testing.assert_close(averaged.generator, (iterates[0] + 2 * iterates[1] + 4 * iterates[2]) / 7)
    torch.testing.assert_close(averaged.discriminator, plain.discriminator)  # D steps against the last G, as before
    assert learner.config.g_average == 0.0 and torch.equal(plain.generator, iterates[-1])


def test_the_meta_rule_uses_meta_sgd_rates(learner):
    support, noise, mix = task_inputs()
    theta_g, theta_d = learner.G.flat_parameters(), learner.D.flat_parameters()
    frozen_g = (torch.zeros_like(theta_g), torch.full_like(theta_d, 0.05))
    adaptation = start_adaptation(learner, Rule("meta"), theta_g, theta_d, tasks=2, inner_lrs=frozen_g)
    adaptation.advance(support, noise, mix)
    assert torch.equal(adaptation.generator, theta_g.expand(2, -1))  # rate 0: G stays put
    assert not torch.equal(adaptation.discriminator, theta_d.expand(2, -1))


@pytest.mark.parametrize("rule", ["adam:0.01", "sgd:0.05"])
def test_each_task_copy_adapts_on_its_own_shots_only(learner, rule):
    support, noise, mix = task_inputs()
    other_support, _, _ = task_inputs(seed=1)
    theta_g, theta_d = learner.G.flat_parameters(), learner.D.flat_parameters()
    results = []
    for second_task in (support[1], other_support[1]):
        adaptation = start_adaptation(learner, parse_rule(rule), theta_g, theta_d, tasks=2)
        adaptation.advance(torch.stack([support[0], second_task]), noise, mix)
        results.append((adaptation.generator, adaptation.discriminator))
    (g1, d1), (g2, d2) = results
    assert torch.equal(g1[0], g2[0]) and torch.equal(d1[0], d2[0])  # task 0 does not see task 1's shots
    assert not torch.equal(d1[1], d2[1])
    assert not torch.equal(g1[0], theta_g)


def test_a_first_adam_step_moves_the_generator_by_lr_against_the_sign_of_its_gradient(learner):
    """Adam's first step is lr * g / (|g| + eps): about lr * sign(∂L_G/∂θ_G), L_G against the initial D."""
    support, noise, mix = task_inputs(tasks=1, steps=1)
    theta_g, theta_d = learner.G.flat_parameters(), learner.D.flat_parameters()
    adaptation = start_adaptation(learner, Rule("adam", 0.01), theta_g, theta_d, tasks=1)
    adaptation.advance(support, noise, mix)
    grad_g = torch.func.grad(lambda t: torch.nn.functional.softplus(
        -learner.D(theta_d[None], learner.G(t[None], noise[0]))).mean())(theta_g)
    moved = grad_g.abs() > 1e-3  # there g / (|g| + eps) is sign(g) to 1e-5
    torch.testing.assert_close(adaptation.generator[0][moved], (theta_g - 0.01 * grad_g.sign())[moved], rtol=0, atol=1e-6)
