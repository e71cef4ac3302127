"""Independent per-task references for the meta-learning core (tests only).

Written the plain way, one task at a time, on per-parameter tensor lists with
torch.func.functional_call and torch.autograd.grad, and with the GAN losses spelled out here
again from DESIGN.md: no vmap, no flat buffers, no kernels, nothing shared with metagan_dist
except the modules used as templates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def forward(module, params, *inputs):
    names = [n for n, _ in module.named_parameters()]
    return functional_call(module, dict(zip(names, params)), inputs)


def generate(G, pg, z, support):
    """G's fakes; a support-conditioned G also gets the task's support images."""
    return forward(G, pg, z, support) if getattr(G, "conditioned", False) else forward(G, pg, z)


def _stored_transposed(module):
    """The flat format's rule, written out again: nn.Linear weights are stored as their transpose's values."""
    return {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)}


def split_like(module, flat):
    """A flat vector in the format of `module` as per-parameter tensors (views)."""
    transposed, out, offset = _stored_transposed(module), [], 0
    for p in module.parameters():
        piece = flat[offset : offset + p.numel()]
        out.append(piece.view(p.shape[1], p.shape[0]).t() if id(p) in transposed else piece.view_as(p))
        offset += p.numel()
    assert offset == flat.numel()
    return out


def flat_like(modules, tensors):
    """Per-parameter tensors of `modules` (in order; a module may repeat) as one vector in their flat format."""
    tensors, pieces = list(tensors), []
    for module in modules:
        transposed = _stored_transposed(module)
        for p in module.parameters():
            t = tensors[len(pieces)].detach()
            pieces.append((t.t() if id(p) in transposed else t).reshape(-1))
    assert len(pieces) == len(tensors)
    return torch.cat(pieces)


def penalty(D, pd, real, fake, mix):
    """Gradient penalty computed sample by sample: mean_j (||∇_x D(x̂_j)|| - 1)²."""
    terms = []
    for j in range(real.shape[0]):
        x_hat = (mix[j] * real[j] + (1 - mix[j]) * fake[j]).unsqueeze(0)
        x_hat = x_hat.detach().requires_grad_() if not x_hat.requires_grad else x_hat
        (g,) = torch.autograd.grad(forward(D, pd, x_hat).sum(), x_hat, create_graph=True)
        terms.append((g.norm() - 1) ** 2)
    return torch.stack(terms).mean()


def g_loss(cfg, G, D, pg, pd, z, support):
    fake_logits = forward(D, pd, generate(G, pg, z, support))
    if cfg.loss == "ns":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()


def d_loss(cfg, G, D, pg, pd, real, z, mix, support):
    fake = generate(G, pg, z, support)
    r, f = forward(D, pd, real), forward(D, pd, fake)
    if cfg.loss == "ns":
        return F.softplus(-r).mean() + F.softplus(f).mean()
    if cfg.loss == "hinge":
        return F.relu(1 - r).mean() + F.relu(1 + f).mean()
    return f.mean() - r.mean() + cfg.gp_weight * penalty(D, pd, real, fake, mix)


def task_inputs(batch, t):
    return dict(
        support=batch.support[t],
        query=batch.query[t],
        noise=batch.inner_noise[:, t],
        mix=batch.inner_mix[:, t],
        query_noise=batch.query_noise[t],
        query_mix=batch.query_mix[t],
    )


class PlainAdam:
    """Adam on a list of tensors, spelled out (the formula of torch.optim.Adam), one state per tensor."""

    def __init__(self, cfg, tensors):
        self.lr, self.b1, self.b2, self.eps = cfg.inner_lr, cfg.inner_beta1, cfg.inner_beta2, 1e-8
        self.m = [torch.zeros_like(t) for t in tensors]
        self.v = [torch.zeros_like(t) for t in tensors]
        self.k = 0

    def step(self, params, grads):
        self.k += 1
        self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m, grads)]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, grads)]
        size = self.lr / (1 - self.b1**self.k)
        return [p - size * m / ((v / (1 - self.b2**self.k)).sqrt() + self.eps) for p, m, v in zip(params, self.m, self.v)]


def averaged(cfg, iterates):
    """The adapted G: the last of G's iterates, or with cfg.g_average β > 0 their average weighted β^(S−s)."""
    beta = cfg.g_average
    if not beta:
        return iterates[-1]
    weights = [beta ** (len(iterates) - 1 - s) for s in range(len(iterates))]
    return [sum(w * it[i] for w, it in zip(weights, iterates)) / sum(weights) for i in range(len(iterates[0]))]


def objective_values(cfg, G, D, pg, pd, task, lrs=None):
    """(L_G, L_D) on the query after the inner loop; inner gradients at detached leaves (values only).

    Each inner step: a G step, then cfg.d_steps D steps against the adapted G, with SGD (at
    cfg.inner_lr or the per-tensor rates `lrs`) or Adam (cfg.inner_rule). The query (and the
    returned G) uses `averaged` G iterates.
    """
    lr_g, lr_d = lrs if lrs is not None else ([cfg.inner_lr] * len(pg), [cfg.inner_lr] * len(pd))
    pg, pd = [p.detach() for p in pg], [p.detach() for p in pd]
    adam = cfg.inner_rule == "adam"
    opt_g, opt_d = (PlainAdam(cfg, pg), PlainAdam(cfg, pd)) if adam else (None, None)
    iterates = []
    for z, mix in zip(task["noise"], task["mix"]):
        leaves = [p.clone().requires_grad_() for p in pg]
        grads = torch.autograd.grad(g_loss(cfg, G, D, leaves, pd, z, task["support"]), leaves)
        pg = opt_g.step(pg, grads) if adam else [p - lr * g for p, lr, g in zip(pg, lr_g, grads)]
        iterates.append(pg)
        for _ in range(cfg.d_steps):
            leaves = [p.clone().requires_grad_() for p in pd]
            grads = torch.autograd.grad(d_loss(cfg, G, D, pg, leaves, task["support"], z, mix, task["support"]), leaves)
            pd = opt_d.step(pd, grads) if adam else [p - lr * g for p, lr, g in zip(pd, lr_d, grads)]
    pg = averaged(cfg, iterates)
    with torch.enable_grad():
        lg = g_loss(cfg, G, D, pg, pd, task["query_noise"], task["support"])
        ld = d_loss(cfg, G, D, pg, pd, task["query"], task["query_noise"], task["query_mix"], task["support"])
    return lg.item(), ld.item(), pg, pd


def maml_task_grads(cfg, G, D, theta_g, theta_d, task, lrs=None, trap=False):
    """Second-order meta-gradients of one task; lists of tensors [G..., D..., (lrG..., lrD...)].

    trap=True takes the discriminator's inner gradient the naive way, w.r.t. the very tensors the
    adapted generator was computed from: a total derivative, the bug DESIGN.md warns about.
    """
    lr_g, lr_d = lrs if lrs is not None else ([cfg.inner_lr] * len(theta_g), [cfg.inner_lr] * len(theta_d))
    pg, pd = list(theta_g), list(theta_d)
    iterates = []
    for z, mix in zip(task["noise"], task["mix"]):
        alias = [p.clone() for p in pg]
        grads = torch.autograd.grad(g_loss(cfg, G, D, alias, pd, z, task["support"]), alias, create_graph=True)
        pg = [p - lr * g for p, lr, g in zip(pg, lr_g, grads)]
        iterates.append(pg)
        for _ in range(cfg.d_steps):
            alias = pd if trap else [p.clone() for p in pd]
            loss = d_loss(cfg, G, D, pg, alias, task["support"], z, mix, task["support"])
            grads = torch.autograd.grad(loss, alias, create_graph=True)
            pd = [p - lr * g for p, lr, g in zip(pd, lr_d, grads)]
    pg = averaged(cfg, iterates)
    lg = g_loss(cfg, G, D, pg, pd, task["query_noise"], task["support"])
    ld = d_loss(cfg, G, D, pg, pd, task["query"], task["query_noise"], task["query_mix"], task["support"])
    g_in, d_in = list(theta_g), list(theta_d)
    if lrs is not None:
        g_lr_in, d_lr_in = list(lr_g), list(lr_d)
    else:
        g_lr_in, d_lr_in = [], []
    if cfg.objective == "seed":
        inputs = g_in + d_in + g_lr_in + d_lr_in
        return list(torch.autograd.grad(lg + ld, inputs))
    gg = torch.autograd.grad(lg, g_in + g_lr_in, retain_graph=True)
    dd = torch.autograd.grad(ld, d_in + d_lr_in)
    ng, nd = len(g_in), len(d_in)
    return list(gg[:ng]) + list(dd[:nd]) + list(gg[ng:]) + list(dd[nd:])


def fomaml_task_grads(cfg, G, D, theta_g, theta_d, task):
    """First-order MAML: the meta-objective's gradient at the adapted parameters."""
    _, _, pg, pd = objective_values(cfg, G, D, theta_g, theta_d, task)
    pg = [p.detach().requires_grad_() for p in pg]
    pd = [p.detach().requires_grad_() for p in pd]
    lg = g_loss(cfg, G, D, pg, pd, task["query_noise"], task["support"])
    ld = d_loss(cfg, G, D, pg, pd, task["query"], task["query_noise"], task["query_mix"], task["support"])
    if cfg.objective == "seed":
        return list(torch.autograd.grad(lg + ld, pg + pd))
    return list(torch.autograd.grad(lg, pg)) + list(torch.autograd.grad(ld, pd))


def reptile_task_delta(cfg, G, D, theta_g, theta_d, task):
    """Reptile: θ minus this task's adapted θ (mean over tasks taken by the caller)."""
    _, _, pg, pd = objective_values(cfg, G, D, theta_g, theta_d, task)
    return [a.detach() - b for a, b in zip(list(theta_g) + list(theta_d), pg + pd)]
