"""The batched meta-gradients against finite differences and an independent per-task loop (float64)."""

import pytest
import torch

import reference_meta as ref
from metagan_dist import EpisodeBatch, MetaConfig, build_pair, meta_gradients

TASKS, SHOTS, QUERIES = 2, 3, 3


def tiny_pair(arch, support_dim=0, smooth=0.0):
    """Small float64 pairs: an MLP on 1x4x4 images and a DCGAN on 1x32x32 with 1 base channel
    (support_dim > 0: G sees an encoding of its task's support set; smooth > 0: G's output is blurred)."""
    if arch == "mlp":
        G, D = build_pair("mlp", 3, (1, 4, 4), width=6, support_dim=support_dim, smooth=smooth)
    else:
        G, D = build_pair("dcgan", 2, (1, 32, 32), width=1, support_dim=support_dim, smooth=smooth)
    return G.double(), D.double()


def make_batch(G, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = G.image_shape
    support = torch.rand(TASKS, SHOTS, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    query = torch.rand(TASKS, QUERIES, *shape, generator=gen, dtype=torch.float64) * 2 - 1
    return EpisodeBatch.sample(support, query, steps, G.z_dim, generator=gen)


def flat_params(module):
    return ref.flat_like([module], module.parameters())


def mean_objective(cfg, G, D, theta_g, theta_d, batch, part):
    """The meta-objective averaged over tasks, from the reference's value-only inner loop."""
    total = 0.0
    for t in range(batch.tasks):
        lg, ld, _, _ = ref.objective_values(
            cfg, G, D, ref.split_like(G, theta_g), ref.split_like(D, theta_d), ref.task_inputs(batch, t)
        )
        total += {"both": lg + ld, "g": lg, "d": ld}[part]
    return total / batch.tasks


def central_difference(f, x, directions, h=1e-6):
    return torch.tensor([(f(x + h * v) - f(x - h * v)) / (2 * h) for v in directions], dtype=torch.float64)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def reference_grads(cfg, G, D, batch, lrs=None, trap=False):
    """Mean over tasks of the per-task loop's meta-gradients, flattened in MetaGradients.flat order."""
    theta_g = [p.detach().clone().requires_grad_() for p in G.parameters()]
    theta_d = [p.detach().clone().requires_grad_() for p in D.parameters()]
    lr_lists = None
    if lrs is not None:
        lr_lists = (
            [x.clone().requires_grad_() for x in ref.split_like(G, lrs[0])],
            [x.clone().requires_grad_() for x in ref.split_like(D, lrs[1])],
        )
    total = None
    for t in range(batch.tasks):
        task = ref.task_inputs(batch, t)
        if cfg.algorithm in ("maml", "metasgd"):
            grads = ref.maml_task_grads(cfg, G, D, theta_g, theta_d, task, lr_lists, trap=trap)
        elif cfg.algorithm == "fomaml":
            grads = ref.fomaml_task_grads(cfg, G, D, theta_g, theta_d, task)
        else:
            grads = ref.reptile_task_delta(cfg, G, D, theta_g, theta_d, task)
        flat = ref.flat_like([G, D] * (1 if lrs is None else 2), grads)
        total = flat if total is None else total + flat
    return total / batch.tasks


FD_CASES = [
    (arch, steps, objective, loss)
    for arch in ("mlp", "dcgan")
    for steps in (1, 2)
    for objective in ("seed", "split")
    for loss in ("ns", "hinge")
]


@pytest.mark.parametrize("arch,steps,objective,loss", FD_CASES)
def test_maml_matches_finite_differences(arch, steps, objective, loss):
    G, D = tiny_pair(arch)
    cfg = MetaConfig(algorithm="maml", objective=objective, loss=loss, inner_steps=steps, inner_lr=0.1)
    batch = make_batch(G, steps)
    grads = meta_gradients(G, D, batch, cfg)
    theta_g, theta_d = flat_params(G), flat_params(D)
    g_g, g_d = grads.flat[: theta_g.numel()], grads.flat[theta_g.numel() :]
    parts = ("both", "both") if objective == "seed" else ("g", "d")

    def directions(n):
        # Every coordinate of the MLP; 6 random unit directions for the larger DCGAN (an error
        # vector e shows up in e·v for a random v almost surely, at the scale of |e|/sqrt(n)).
        if arch == "mlp":
            return list(torch.eye(n, dtype=torch.float64))
        v = torch.randn(6, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        return list(v / v.norm(dim=1, keepdim=True))

    dirs = directions(theta_g.numel())
    fd_g = central_difference(lambda x: mean_objective(cfg, G, D, x, theta_d, batch, parts[0]), theta_g, dirs)
    assert rel_err(torch.stack(dirs) @ g_g, fd_g) <= 1e-6
    dirs = directions(theta_d.numel())
    fd_d = central_difference(lambda x: mean_objective(cfg, G, D, theta_g, x, batch, parts[1]), theta_d, dirs)
    assert rel_err(torch.stack(dirs) @ g_d, fd_d) <= 1e-6


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
@pytest.mark.parametrize("objective", ["seed", "split"])
@pytest.mark.parametrize("loss", ["ns", "hinge", "wgan-gp"])
def test_batched_matches_per_task_loop(arch, algorithm, objective, loss):
    G, D = tiny_pair(arch)
    cfg = MetaConfig(algorithm=algorithm, objective=objective, loss=loss, inner_steps=2, inner_lr=0.1)
    batch = make_batch(G, 2)
    lrs = None
    if algorithm == "metasgd":
        gen = torch.Generator().manual_seed(7)
        lrs = tuple(
            0.05 + 0.1 * torch.rand(n, dtype=torch.float64, generator=gen)
            for n in (flat_params(G).numel(), flat_params(D).numel())
        )
    got = meta_gradients(G, D, batch, cfg, inner_lrs=lrs)
    want = reference_grads(cfg, G, D, batch, lrs)
    assert got.flat.shape == want.shape
    assert rel_err(got.flat, want) <= 1e-10
    if algorithm == "metasgd":
        assert got.generator_lr is not None and got.generator_lr.abs().sum() > 0


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd"])
@pytest.mark.parametrize("loss", ["ns", "wgan-gp"])
@pytest.mark.parametrize("smooth", [0.0, 0.8])
def test_support_conditioned_generator_matches_the_per_task_loop(arch, algorithm, loss, smooth):
    G, D = tiny_pair(arch, support_dim=2, smooth=smooth)
    rule = "adam" if algorithm == "reptile" else "sgd"
    cfg = MetaConfig(algorithm=algorithm, loss=loss, inner_steps=2, inner_lr=0.1 if rule == "sgd" else 0.01,
                     inner_rule=rule)
    batch = make_batch(G, 2)
    lrs = None
    if algorithm == "metasgd":
        lrs = tuple(torch.full_like(flat_params(net), 0.1) for net in (G, D))
    got = meta_gradients(G, D, batch, cfg, inner_lrs=lrs)
    want = reference_grads(cfg, G, D, batch, lrs)
    assert rel_err(got.flat, want) <= 1e-10
    # The encoder is part of G and gets a meta-gradient of its own.
    encoder = sum(p.numel() for p in G.encoder.parameters())
    assert torch.cat([g.reshape(-1) for g in got.generator])[-encoder:].abs().sum() > 0


def test_support_conditioned_maml_matches_finite_differences():
    G, D = tiny_pair("mlp", support_dim=2)
    cfg = MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.1)
    batch = make_batch(G, 2)
    grads = meta_gradients(G, D, batch, cfg)
    theta_g, theta_d = flat_params(G), flat_params(D)
    dirs = list(torch.eye(theta_g.numel(), dtype=torch.float64))
    fd = central_difference(lambda x: mean_objective(cfg, G, D, x, theta_d, batch, "g"), theta_g, dirs)
    assert rel_err(grads.flat[: theta_g.numel()], fd) <= 1e-6


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_smoothed_generator_maml_matches_finite_differences(arch):
    G, D = tiny_pair(arch, smooth=0.8)
    cfg = MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.1)
    batch = make_batch(G, 2)
    grads = meta_gradients(G, D, batch, cfg)
    theta_g, theta_d = flat_params(G), flat_params(D)
    dirs = torch.randn(8, theta_g.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    fd = central_difference(lambda x: mean_objective(cfg, G, D, x, theta_d, batch, "g"), theta_g, dirs)
    assert rel_err(dirs @ grads.flat[: theta_g.numel()], fd) <= 1e-6


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize(
    "algorithm,rule,d_steps",
    [("maml", "sgd", 2), ("fomaml", "sgd", 3), ("fomaml", "adam", 1), ("reptile", "adam", 2), ("reptile", "adam", 1)],
)
@pytest.mark.parametrize("loss", ["ns", "wgan-gp"])
def test_inner_adam_and_several_d_steps_match_the_per_task_loop(arch, algorithm, rule, d_steps, loss):
    G, D = tiny_pair(arch)
    cfg = MetaConfig(algorithm=algorithm, loss=loss, inner_steps=2, inner_lr=0.1 if rule == "sgd" else 0.01,
                     inner_rule=rule, inner_beta1=0.5, d_steps=d_steps)
    batch = make_batch(G, 2)
    got = meta_gradients(G, D, batch, cfg).flat
    want = reference_grads(cfg, G, D, batch)
    assert rel_err(got, want) <= 1e-10
    # The options are not silently ignored: one D step, or SGD, changes the meta-gradient.
    other = MetaConfig(**{**cfg.__dict__, "d_steps": 1} if d_steps > 1 else {**cfg.__dict__, "inner_rule": "sgd"})
    assert rel_err(meta_gradients(G, D, batch, other).flat, want) > 1e-3


@pytest.mark.parametrize("g_average", [0.0, 0.7])
def test_maml_with_two_d_steps_matches_finite_differences(g_average):
    """Also through the averaged G iterates: the query's G is then a weighted sum of all three."""
    G, D = tiny_pair("mlp")
    cfg = MetaConfig(algorithm="maml", objective="split", inner_steps=3, inner_lr=0.1, d_steps=2, g_average=g_average)
    batch = make_batch(G, 3)
    grads = meta_gradients(G, D, batch, cfg)
    theta_g, theta_d = flat_params(G), flat_params(D)
    directions = torch.eye(theta_g.numel(), dtype=torch.float64)[:12]
    numeric = central_difference(lambda t: mean_objective(cfg, G, D, t, theta_d, batch, "g"), theta_g, directions)
    torch.testing.assert_close(grads.flat[: theta_g.numel()][:12], numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
@pytest.mark.parametrize("algorithm,rule",
                         [("maml", "sgd"), ("metasgd", "sgd"), ("fomaml", "adam"), ("reptile", "adam")])
def test_averaged_generator_iterates_match_the_per_task_loop(arch, algorithm, rule):
    G, D = tiny_pair(arch)
    cfg = MetaConfig(algorithm=algorithm, inner_steps=3, inner_lr=0.1 if rule == "sgd" else 0.01, inner_rule=rule,
                     d_steps=2, g_average=0.5)
    batch = make_batch(G, 3)
    lrs = None
    if algorithm == "metasgd":
        gen = torch.Generator().manual_seed(3)
        lrs = tuple(0.05 + 0.1 * torch.rand(flat_params(net).numel(), generator=gen, dtype=torch.float64)
                    for net in (G, D))
    got = meta_gradients(G, D, batch, cfg, inner_lrs=lrs).flat
    want = reference_grads(cfg, G, D, batch, lrs=lrs)
    assert rel_err(got, want) <= 1e-10
    # The average is not silently ignored: the last iterate gives another meta-gradient.
    last = MetaConfig(**{**cfg.__dict__, "g_average": 0.0})
    assert rel_err(meta_gradients(G, D, batch, last, inner_lrs=lrs).flat, want) > 1e-3


def test_second_order_algorithms_refuse_the_first_order_inner_adam():
    for algorithm in ("maml", "metasgd"):
        with pytest.raises(ValueError, match=f"meta.inner_rule 'adam' with meta.algorithm '{algorithm}'"):
            MetaConfig(algorithm=algorithm, inner_rule="adam")


@pytest.mark.parametrize(
    "field,value,match",
    [("inner_rule", "rmsprop", "unknown meta.inner_rule 'rmsprop'"), ("d_steps", 0, "meta.d_steps must be >= 1"),
     ("inner_beta1", 1.0, r"meta.inner_beta1 must be in \[0, 1\)"), ("gp_weight", -1.0, "meta.gp_weight must be >= 0"),
     ("inner_steps", 1.5, "meta.inner_steps must be of type int"),
     ("g_average", 1.0, r"meta.g_average must be in \[0, 1\)")],
)
def test_bad_inner_loop_settings_are_errors_naming_them(field, value, match):
    with pytest.raises(ValueError, match=match):
        MetaConfig(algorithm="reptile", **{field: value})


@pytest.mark.parametrize("arch", ["mlp", "dcgan"])
def test_metasgd_rate_gradients_match_finite_differences(arch):
    G, D = tiny_pair(arch)
    cfg = MetaConfig(algorithm="metasgd", objective="seed", inner_steps=2, inner_lr=0.1)
    batch = make_batch(G, 2)
    n_g, n_d = flat_params(G).numel(), flat_params(D).numel()
    lr_g, lr_d = torch.full((n_g,), 0.1, dtype=torch.float64), torch.full((n_d,), 0.1, dtype=torch.float64)
    grads = meta_gradients(G, D, batch, cfg, inner_lrs=(lr_g, lr_d))
    theta_g, theta_d = flat_params(G), flat_params(D)

    def objective(lg, ld):
        total = 0.0
        for t in range(batch.tasks):
            lrs = (ref.split_like(G, lg), ref.split_like(D, ld))
            a, b, _, _ = ref.objective_values(
                cfg, G, D, ref.split_like(G, theta_g), ref.split_like(D, theta_d), ref.task_inputs(batch, t), lrs
            )
            total += a + b
        return total / batch.tasks

    gen = torch.Generator().manual_seed(3)
    dirs = list(torch.randn(6, n_g, dtype=torch.float64, generator=gen))
    fd = central_difference(lambda x: objective(x, lr_d), lr_g, dirs)
    assert rel_err(torch.stack(dirs) @ grads.generator_lr, fd) <= 1e-6
    dirs = list(torch.randn(6, n_d, dtype=torch.float64, generator=gen))
    fd = central_difference(lambda x: objective(lr_g, x), lr_d, dirs)
    assert rel_err(torch.stack(dirs) @ grads.discriminator_lr, fd) <= 1e-6


@pytest.mark.parametrize("steps", [1, 2])
def test_total_derivative_trap_changes_the_meta_gradient(steps):
    """Taking the D step's gradient w.r.t. θ_D itself (a total derivative) must give another answer."""
    G, D = tiny_pair("mlp")
    cfg = MetaConfig(algorithm="maml", inner_steps=steps, inner_lr=0.5)
    batch = make_batch(G, steps)
    got = meta_gradients(G, D, batch, cfg).flat
    right = reference_grads(cfg, G, D, batch)
    trap = reference_grads(cfg, G, D, batch, trap=True)
    assert rel_err(got, right) <= 1e-10
    assert rel_err(trap, right) > 1e-3


def test_fomaml_and_reptile_differ_from_maml():
    """Sanity on the hand references: the three algorithms are genuinely different estimators."""
    G, D = tiny_pair("mlp")
    batch = make_batch(G, 2)
    flats = {
        a: meta_gradients(G, D, batch, MetaConfig(algorithm=a, inner_steps=2, inner_lr=0.3)).flat
        for a in ("maml", "fomaml", "reptile")
    }
    assert rel_err(flats["fomaml"], flats["maml"]) > 1e-4
    assert rel_err(flats["reptile"], flats["maml"]) > 1e-2


def test_reptile_is_step_size_times_adapted_gradients_for_one_step():
    """One Reptile inner step from a shared θ: θ - θ_t = α g_t, so the meta-gradient is α·mean_t g_t."""
    G, D = tiny_pair("mlp")
    cfg = MetaConfig(algorithm="reptile", inner_steps=1, inner_lr=0.2)
    batch = make_batch(G, 1)
    delta = meta_gradients(G, D, batch, cfg)
    theta_g = [p.detach().clone().requires_grad_() for p in G.parameters()]
    theta_d = [p.detach().clone() for p in D.parameters()]
    grads_g = 0
    for t in range(batch.tasks):
        task = ref.task_inputs(batch, t)
        loss = ref.g_loss(cfg, G, D, theta_g, theta_d, task["noise"][0], task["support"])
        grads_g = grads_g + torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta_g)])
    want = 0.2 * grads_g / batch.tasks
    got = torch.cat([g.reshape(-1) for g in delta.generator])
    assert rel_err(got, want) <= 1e-12


def test_sum_reduction_is_tasks_times_mean():
    G, D = tiny_pair("mlp")
    batch = make_batch(G, 1)
    mean = meta_gradients(G, D, batch, MetaConfig())
    total = meta_gradients(G, D, batch, MetaConfig(), reduction="sum")
    torch.testing.assert_close(total.flat, mean.flat * batch.tasks)
    torch.testing.assert_close(total.loss_g, mean.loss_g * batch.tasks)


def test_gradients_come_in_parameter_order_and_shape():
    G, D = tiny_pair("dcgan")
    grads = meta_gradients(G, D, make_batch(G, 1), MetaConfig(algorithm="metasgd"))
    assert [g.shape for g in grads.generator] == [p.shape for p in G.parameters()]
    assert [g.shape for g in grads.discriminator] == [p.shape for p in D.parameters()]
    n_g, n_d = flat_params(G).numel(), flat_params(D).numel()
    assert grads.flat.numel() == 2 * (n_g + n_d)
    assert grads.generator_lr.shape == (n_g,) and grads.discriminator_lr.shape == (n_d,)
    # The per-parameter tensors are views of the flat buffer, not copies.
    assert grads.generator[0].data_ptr() == grads.flat.data_ptr()


def test_explicit_params_override_the_modules():
    G, D = tiny_pair("mlp")
    batch = make_batch(G, 1)
    theta_g, theta_d = flat_params(G) + 0.01, flat_params(D) - 0.01
    via_params = meta_gradients(G, D, batch, MetaConfig(), params=(theta_g, theta_d))
    with torch.no_grad():
        for p, v in zip(G.parameters(), ref.split_like(G, theta_g)):
            p.copy_(v)
        for p, v in zip(D.parameters(), ref.split_like(D, theta_d)):
            p.copy_(v)
    via_modules = meta_gradients(G, D, batch, MetaConfig())
    torch.testing.assert_close(via_params.flat, via_modules.flat, rtol=0, atol=0)
