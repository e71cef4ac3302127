"""Task chunks (meta.task_chunk), the compiled meta-step (meta.compile) and the flat buffers under them.

Chunked and unchunked meta-gradients agree to 1e-12 in float64 for every algorithm, loss and inner
rule; peak tensor memory follows the chunk, not T; compiled and eager meta-gradients agree; a
compiler that fails costs one warning line, never the run.
"""

import dataclasses
import logging

import pytest
import torch

from conftest import requires_cuda
from metagan_dist import EpisodeBatch, MetaConfig, build_pair, meta_gradients
from metagan_dist import meta as meta_module
from metagan_dist.compiling import Compiled
from metagan_dist.config import TrainConfig, incompatible_keys, load_config, to_dict
from metagan_dist.flat import FlatLayout
from metagan_dist.losses import LOSSES
from metagan_dist.memory import keep_freed_memory, peak_tensor_bytes
from metagan_dist.meta import ALGORITHMS, MetaLearner

TASKS = 5  # chunks of 2 leave a tail chunk of 1


def tiny_pair(arch="mlp"):
    G, D = build_pair("mlp", 3, (1, 4, 4), width=6) if arch == "mlp" else build_pair("dcgan", 2, (1, 32, 32), width=1)
    return G.double(), D.double()


def make_batch(G, tasks=TASKS, steps=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    support = torch.rand(tasks, 3, *G.image_shape, generator=gen, dtype=torch.float64) * 2 - 1
    query = torch.rand(tasks, 3, *G.image_shape, generator=gen, dtype=torch.float64) * 2 - 1
    return EpisodeBatch.sample(support, query, steps, G.z_dim, generator=gen)


def metasgd_rates(G, D):
    gen = torch.Generator().manual_seed(7)
    return tuple(0.05 + 0.1 * torch.rand(sum(p.numel() for p in net.parameters()), dtype=torch.float64, generator=gen)
                 for net in (G, D))


def maml(**options):
    """Second-order MAML with two inner steps, as make_batch's noise has them."""
    return MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.1, **options)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_same_meta_gradients(got, want, tol=1e-12):
    assert got.tasks == want.tasks
    assert rel_err(got.flat, want.flat) <= tol
    torch.testing.assert_close(got.loss_g, want.loss_g, rtol=tol, atol=0)
    torch.testing.assert_close(got.loss_d, want.loss_d, rtol=tol, atol=0)


CHUNK_CASES = (
    [("mlp", algorithm, loss, "split", {}) for algorithm in ALGORITHMS for loss in LOSSES]
    + [("mlp", algorithm, "ns", "seed", {}) for algorithm in ("maml", "metasgd")]
    + [("dcgan", algorithm, "hinge", "split", {}) for algorithm in ("maml", "reptile")]
    + [
        ("mlp", "fomaml", "ns", "split", {"inner_rule": "adam", "inner_beta1": 0.5, "inner_lr": 0.01}),
        ("mlp", "reptile", "wgan-gp", "split", {"inner_rule": "adam", "d_steps": 2, "inner_lr": 0.01}),
        ("mlp", "maml", "wgan-gp", "seed", {"d_steps": 2}),
        ("mlp", "metasgd", "hinge", "split", {"d_steps": 2, "inner_clip": 0.5}),
    ]
)


@pytest.mark.parametrize("arch,algorithm,loss,objective,options", CHUNK_CASES)
def test_chunks_sum_to_the_unchunked_meta_gradient(arch, algorithm, loss, objective, options):
    G, D = tiny_pair(arch)
    cfg = MetaConfig(**{"algorithm": algorithm, "loss": loss, "objective": objective, "inner_steps": 2,
                        "inner_lr": 0.1, **options})
    batch = make_batch(G)
    lrs = metasgd_rates(G, D) if algorithm == "metasgd" else None
    whole = meta_gradients(G, D, batch, cfg, inner_lrs=lrs, task_chunk=TASKS)
    assert whole.flat.abs().sum() > 0
    for chunk in (1, 2):
        assert_same_meta_gradients(meta_gradients(G, D, batch, cfg, inner_lrs=lrs, task_chunk=chunk), whole)
    if algorithm == "metasgd":  # the rates' gradients are summed over chunks too
        part = meta_gradients(G, D, batch, cfg, inner_lrs=lrs, task_chunk=2)
        assert rel_err(part.generator_lr, whole.generator_lr) <= 1e-12


def test_the_config_key_sets_the_chunk_and_the_argument_overrides_it():
    G, D = tiny_pair()
    batch = make_batch(G)
    whole = meta_gradients(G, D, batch, maml(task_chunk=TASKS))
    by_key = meta_gradients(G, D, batch, maml(task_chunk=2))
    by_argument = meta_gradients(G, D, batch, maml(task_chunk=TASKS), task_chunk=2)
    torch.testing.assert_close(by_key.flat, by_argument.flat, rtol=0, atol=0)
    assert not torch.equal(by_key.flat, whole.flat)  # other chunks: another summation order, not bit-equal
    assert_same_meta_gradients(by_key, whole)


def test_a_sum_over_chunks_still_counts_every_task_of_the_rank():
    """reduction='sum' with chunks: the sums and the count the all-reduce divides by cover all T tasks."""
    G, D = tiny_pair()
    batch = make_batch(G)
    mean = meta_gradients(G, D, batch, maml(), task_chunk=TASKS)
    total = meta_gradients(G, D, batch, maml(), task_chunk=2, reduction="sum")
    assert total.tasks == TASKS
    torch.testing.assert_close(total.flat / total.tasks, mean.flat, rtol=1e-12, atol=0)
    torch.testing.assert_close(total.loss_g / total.tasks, mean.loss_g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk,message", [(0, "meta.task_chunk must be >= 1, got 0"),
                                           (-3, "meta.task_chunk must be >= 1, got -3"),
                                           (2.5, "meta.task_chunk must be of type int")])
def test_a_chunk_below_one_is_an_error_naming_the_key(chunk, message):
    G, D = tiny_pair()
    with pytest.raises(ValueError, match=message):
        meta_gradients(G, D, make_batch(G), maml(), task_chunk=chunk)
    with pytest.raises(ValueError, match=message):
        MetaConfig(task_chunk=chunk)


def test_the_config_keys_are_checked_on_the_command_line():
    with pytest.raises(ValueError, match="meta.task_chunk must be >= 1, got 0"):
        load_config(None, ["meta.task_chunk=0"])
    with pytest.raises(ValueError, match="bad value for config key 'meta.compile'"):
        load_config(None, ["meta.compile=sometimes"])
    assert load_config(None, ["meta.task_chunk=4", "meta.compile=true"]).meta.task_chunk == 4


def test_a_chunk_larger_than_the_batch_is_clamped_and_logged(caplog):
    G, D = tiny_pair()
    batch = make_batch(G)
    meta_module._log_clamped_chunk.cache_clear()
    with caplog.at_level(logging.INFO, logger="metagan_dist"):
        clamped = meta_gradients(G, D, batch, maml(), task_chunk=97)
        meta_gradients(G, D, batch, maml(), task_chunk=97)
    lines = [r.getMessage() for r in caplog.records if "meta.task_chunk=97" in r.getMessage()]
    assert lines == [f"meta.task_chunk=97 is larger than the batch's T={TASKS} tasks: all {TASKS} go through in "
                     f"one chunk"]  # once, not once per step
    whole = meta_gradients(G, D, batch, maml(), task_chunk=TASKS)
    torch.testing.assert_close(clamped.flat, whole.flat, rtol=0, atol=0)


def test_peak_memory_follows_the_chunk_not_the_tasks():
    """Allocator-level peak (no timing): 8x the tasks in chunks of 2 cost about what 2 tasks cost;
    the same 16 tasks in one chunk cost several times more."""
    G, D = build_pair("mlp", 16, (1, 16, 16), width=128)
    cfg = MetaConfig(algorithm="maml", inner_steps=1, inner_lr=0.05)

    def peak(tasks, chunk):
        batch = EpisodeBatch.sample(torch.rand(tasks, 4, 1, 16, 16), torch.rand(tasks, 4, 1, 16, 16), 1, 16,
                                    generator=torch.Generator().manual_seed(0))
        step = lambda: meta_gradients(G, D, batch, cfg, task_chunk=chunk)  # noqa: E731
        step()
        return peak_tensor_bytes(step)

    two_tasks, sixteen_in_twos, sixteen_at_once = peak(2, 2), peak(16, 2), peak(16, 16)
    assert sixteen_in_twos < 1.25 * two_tasks
    assert sixteen_at_once > 3 * sixteen_in_twos


def test_changing_how_the_step_computes_does_not_block_a_resume():
    saved = to_dict(TrainConfig())
    del saved["meta"]["task_chunk"], saved["meta"]["compile"]  # a checkpoint from before these keys
    current = to_dict(load_config(None, ["meta.task_chunk=3", "meta.compile=true"]))
    assert incompatible_keys(saved, current) == []


# ---- meta.compile ----

@pytest.fixture
def fresh_compiled(monkeypatch):
    """A COMPILED_FORWARD_STEP that has not failed yet, and no compiled code cached from other tests."""
    torch._dynamo.reset()
    compiled = Compiled(MetaLearner.forward_step, "the meta-step's inner loop and query")
    monkeypatch.setattr(meta_module, "COMPILED_FORWARD_STEP", compiled)
    yield compiled
    torch._dynamo.reset()


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("compiled backward failed")


def _compile_failing(where):
    """A stand-in for torch.compile that fails when compiling, when called, or in the backward."""

    def fake_compile(fn, **kwargs):
        if where == "compile":
            raise RuntimeError("torch.compile is not supported on this Python")

        def run(*args):
            if where == "call":
                raise RuntimeError("InvalidCxxCompiler: no working C++ compiler")
            return tuple(_FailingBackward.apply(t) for t in fn(*args))

        return run

    return fake_compile


@pytest.mark.parametrize("where", ["compile", "call", "backward"])
def test_a_failing_compiler_falls_back_with_one_warning(where, fresh_compiled, monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", _compile_failing(where))
    G, D = tiny_pair()
    batch = make_batch(G)
    cfg = maml(task_chunk=2)
    eager = meta_gradients(G, D, batch, cfg)
    with caplog.at_level(logging.WARNING, logger="metagan_dist"):
        first = meta_gradients(G, D, batch, dataclasses.replace(cfg, compile=True))
        second = meta_gradients(G, D, batch, dataclasses.replace(cfg, compile=True))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert warnings[0].getMessage().startswith("meta.compile: torch.compile of the meta-step")
    assert fresh_compiled.broken
    for got in (first, second):
        torch.testing.assert_close(got.flat, eager.flat, rtol=0, atol=0)


def test_no_working_cxx_compiler_falls_back(fresh_compiled, caplog):
    """The real compiler, pointed at a C++ compiler that does not exist: the step runs eagerly."""
    import torch._inductor.config as inductor_config

    G, D = tiny_pair()
    batch = make_batch(G, tasks=2)
    cfg = MetaConfig(algorithm="fomaml", inner_steps=2, inner_lr=0.1)
    # inductor's own patch: monkeypatch.undo would delete the config entries instead of restoring them
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}), \
            caplog.at_level(logging.WARNING, logger="metagan_dist"):
        got = meta_gradients(G, D, batch, dataclasses.replace(cfg, compile=True))
    assert [r.getMessage() for r in caplog.records if "C++ compiler" in r.getMessage()]
    torch.testing.assert_close(got.flat, meta_gradients(G, D, batch, cfg).flat, rtol=0, atol=0)


COMPILE_CASES = [
    ("maml", "ns", {}),  # second order through the compiled inner loop
    ("metasgd", "wgan-gp", {"objective": "seed", "d_steps": 2}),
    ("fomaml", "hinge", {"inner_rule": "adam", "inner_lr": 0.01}),
    ("reptile", "ns", {"inner_rule": "adam", "d_steps": 2, "inner_lr": 0.01}),
]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,loss,options", COMPILE_CASES)
def test_compiled_and_eager_meta_gradients_agree(algorithm, loss, options, fresh_compiled, caplog):
    G, D = tiny_pair()
    batch = make_batch(G, tasks=4)
    cfg = MetaConfig(**{"algorithm": algorithm, "loss": loss, "inner_steps": 2, "inner_lr": 0.1, "task_chunk": 2,
                        **options})
    lrs = metasgd_rates(G, D) if algorithm == "metasgd" else None
    eager = meta_gradients(G, D, batch, cfg, inner_lrs=lrs)
    with caplog.at_level(logging.WARNING, logger="metagan_dist"):
        compiled = meta_gradients(G, D, batch, dataclasses.replace(cfg, compile=True), inner_lrs=lrs)
    assert not fresh_compiled.broken, caplog.text  # it really ran compiled
    assert_same_meta_gradients(compiled, eager, tol=1e-10)


@requires_cuda
@pytest.mark.gpu
def test_chunked_and_compiled_steps_on_cuda(fresh_compiled, caplog):
    """On the GPU the inner update is the Triton kernel, inside the compiled step too."""
    torch.manual_seed(0)
    G, D = (net.cuda() for net in build_pair("mlp", 8, (1, 8, 8), width=16))
    gen = torch.Generator().manual_seed(1)
    batch = EpisodeBatch.sample(torch.rand(4, 3, 1, 8, 8, generator=gen) * 2 - 1,
                                torch.rand(4, 3, 1, 8, 8, generator=gen) * 2 - 1, 2, 8, generator=gen).to("cuda")
    cfg = MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.05)
    whole = meta_gradients(G, D, batch, cfg, task_chunk=4)
    chunked = meta_gradients(G, D, batch, cfg, task_chunk=2)
    with caplog.at_level(logging.WARNING, logger="metagan_dist"):
        compiled = meta_gradients(G, D, batch, dataclasses.replace(cfg, compile=True), task_chunk=2)
    assert not fresh_compiled.broken, caplog.text
    torch.testing.assert_close(chunked.flat, whole.flat, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled.flat, whole.flat, rtol=1e-4, atol=1e-6)


# ---- the flat buffers under the step ----

@pytest.mark.parametrize("transposed", [False, True])
def test_flatten_writes_any_strides_and_unflatten_is_its_inverse(transposed):
    layout = FlatLayout(["w", "b"], [(3, 2), (3,)], [transposed, False])
    w = torch.randn(4, 2, 3, dtype=torch.float64).mT  # [T, 3, 2], transposed strides
    b = torch.randn(4, 3, dtype=torch.float64)
    flat = layout.flatten([w, b])
    stored = w.mT if transposed else w  # a transposed slot holds w's columns one after the other
    torch.testing.assert_close(flat, torch.cat([stored.reshape(4, -1), b], dim=1), rtol=0, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(layout.unflatten(flat), (w, b)))
    torch.testing.assert_close(layout.flatten([None, b])[:, :6], torch.zeros(4, 6, dtype=torch.float64))


def test_only_2d_parameters_can_be_stored_transposed():
    with pytest.raises(ValueError, match="only a 2-D parameter can be stored transposed; 'b' has shape \\(3,\\)"):
        FlatLayout(["w", "b"], [(3, 2), (3,)], [True, True])
    with pytest.raises(ValueError, match="1 transposed flags for 2 parameters"):
        FlatLayout(["w", "b"], [(3, 2), (3,)], [True])


@pytest.mark.parametrize("transposed", [False, True])
def test_flatten_and_unflatten_are_differentiable_twice(transposed):
    layout = FlatLayout(["w", "b"], [(3, 2), (3,)], [transposed, False])
    w = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    flat = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x, y: layout.flatten([x, y]) ** 2, (w, b))
    torch.autograd.gradgradcheck(lambda f: tuple(t ** 2 for t in layout.unflatten(f)), (flat,))


def test_keep_freed_memory_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory() is True
