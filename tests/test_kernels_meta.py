"""The kernels inside meta-learning: MAML/Meta-SGD/Reptile meta-gradients and a compiled meta-step.

Three ways to run the inner update are compared: the Triton kernels (METAGAN_KERNELS=triton; the
interpreter on CPU), the ops' torch reference (METAGAN_KERNELS=reference), and the plain-torch
oracles patched into metagan_dist.inner and metagan_dist.meta, which use no custom op at all.
"""

import pytest
import torch

import kernels
import metagan_dist.inner as inner
import metagan_dist.meta as meta
from conftest import requires_cuda
from metagan_dist import EpisodeBatch, MetaConfig, build_pair, meta_gradients
from test_kernels import TRITON_TARGETS, oracle_reptile, oracle_update
from test_kernels_adam import oracle_adam

Z_DIM, TASKS, SHOTS, QUERIES = 4, 3, 2, 2
CONFIGS = {
    "maml-2-steps-clipped": MetaConfig(algorithm="maml", inner_steps=2, inner_lr=0.05, inner_clip=0.5),
    "maml-hinge": MetaConfig(algorithm="maml", loss="hinge", inner_lr=0.05),
    "metasgd-split": MetaConfig(algorithm="metasgd", objective="split", inner_steps=2, inner_lr=0.05),
    "fomaml": MetaConfig(algorithm="fomaml", inner_lr=0.05),
    "reptile": MetaConfig(algorithm="reptile", inner_steps=2, inner_lr=0.05),
    "fomaml-adam": MetaConfig(algorithm="fomaml", inner_steps=2, inner_lr=0.01, inner_rule="adam"),
    "reptile-adam-2-d-steps": MetaConfig(algorithm="reptile", inner_steps=2, inner_lr=0.01, inner_rule="adam",
                                         inner_beta1=0.5, d_steps=2),
}


FP32_DEVICES = [pytest.param(p.values[0], marks=p.marks, id=p.id) for p in TRITON_TARGETS if p.values[1] == torch.float32]


def _meta_gradient(monkeypatch, implementation, config, device):
    """MetaGradients.flat of a tiny MLP pair, with the inner update run by `implementation`."""
    torch.manual_seed(0)
    G, D = build_pair("mlp", Z_DIM, (1, 8, 8), width=8)
    G, D = G.to(device), D.to(device)
    gen = torch.Generator().manual_seed(1)
    support = torch.rand(TASKS, SHOTS, 1, 8, 8, generator=gen) * 2 - 1
    query = torch.rand(TASKS, QUERIES, 1, 8, 8, generator=gen) * 2 - 1
    batch = EpisodeBatch.sample(support, query, config.inner_steps, Z_DIM, generator=gen).to(device)
    calls = []
    if implementation == "oracle":  # counted, so the test fails if meta.py stops calling these names
        monkeypatch.setattr(inner, "inner_update", lambda *a: calls.append(1) or oracle_update(*a))
        monkeypatch.setattr(inner, "inner_adam", lambda *a: calls.append(1) or oracle_adam(*a))
        monkeypatch.setattr(meta, "reptile_delta", lambda *a: calls.append(1) or oracle_reptile(*a))
    else:
        monkeypatch.setenv(kernels.ENV_VAR, implementation)
    flat = meta_gradients(G, D, batch, config).flat
    assert calls or implementation != "oracle"
    return flat


@pytest.mark.parametrize("device", FP32_DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_gradient_through_kernels_equals_reference_and_oracle(monkeypatch, device, name):
    config = CONFIGS[name]
    oracle = _meta_gradient(monkeypatch, "oracle", config, device)
    monkeypatch.undo()
    reference = _meta_gradient(monkeypatch, "reference", config, device)
    triton = _meta_gradient(monkeypatch, "triton", config, device)
    assert torch.isfinite(oracle).all() and oracle.abs().max() > 0
    torch.testing.assert_close(reference, oracle, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(triton, oracle, rtol=1e-4, atol=1e-6)


def _linear_meta_loss(theta, lr, xs, ys, xq, yq):
    """MAML on linear regression tasks, inner gradients in closed form so they stay differentiable
    in θ under torch.compile: two clipped inner steps (shared θ, then per-task θ), query MSE."""
    adapted = theta
    for _ in range(2):
        pred = torch.einsum("tnp,tp->tn", xs, adapted.expand(xs.shape[0], -1))
        grads = 2 * torch.einsum("tnp,tn->tp", xs, pred - ys) / xs.shape[1]
        adapted = kernels.inner_update(adapted, grads, lr, max_norm=1.0)
    return ((torch.einsum("tnp,tp->tn", xq, adapted) - yq) ** 2).mean()


def _linear_tasks(device):
    gen = torch.Generator().manual_seed(2)
    tasks, shots, params = 4, 5, 6
    data = [torch.randn(tasks, shots, params, generator=gen), torch.randn(tasks, shots, generator=gen)] * 2
    theta = torch.randn(params, generator=gen).to(device).requires_grad_()
    lr = torch.full((params,), 0.1, device=device, requires_grad=True)
    return theta, lr, *(x.to(device) for x in data)


def _compiled_matches_oracle(monkeypatch, device, compile_backend, env):
    monkeypatch.setenv(kernels.ENV_VAR, env)
    torch._dynamo.reset()
    inputs = _linear_tasks(device)
    compiled = torch.compile(_linear_meta_loss, fullgraph=True, backend=compile_backend)  # raises on a graph break
    loss = compiled(*inputs)
    got = torch.autograd.grad(loss, inputs[:2])
    monkeypatch.setattr(kernels, "inner_update", oracle_update)
    expected_loss = _linear_meta_loss(*inputs)
    expected = torch.autograd.grad(expected_loss, inputs[:2])
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("env", ["auto", pytest.param("triton", marks=TRITON_TARGETS[0].marks)])
def test_meta_step_compiles_without_graph_breaks(monkeypatch, env):
    explanation = torch._dynamo.explain(_linear_meta_loss)(*_linear_tasks("cpu"))
    assert explanation.graph_break_count == 0
    ops = {str(node.target) for node in explanation.graphs[0].graph.nodes if node.op == "call_function"}
    assert {"metagan.inner_update.default", "metagan.row_norms.default"} <= ops
    _compiled_matches_oracle(monkeypatch, "cpu", "aot_eager", env)


@pytest.mark.slow
def test_meta_step_compiles_with_inductor_on_cpu(monkeypatch):
    _compiled_matches_oracle(monkeypatch, "cpu", "inductor", "auto")


@requires_cuda
@pytest.mark.gpu
def test_meta_step_compiles_with_inductor_on_cuda(monkeypatch):
    _compiled_matches_oracle(monkeypatch, "cuda", "inductor", "auto")
