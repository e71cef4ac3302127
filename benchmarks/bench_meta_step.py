"""Batched meta-step (T task copies at once) vs a per-task loop of the same algorithm.

The loop is the learn2learn way: adapt one task at a time with plain autograd on per-parameter
tensors, accumulating the meta-gradient. Both compute the same second-order MAML meta-gradient
(checked at start-up). Calls alternate between the methods and the ratio of medians is reported;
peak memory is measured per method in a fresh process (see peak_memory_mb).

    python benchmarks/bench_meta_step.py                    # the seed MLP pair, CPU
    python benchmarks/bench_meta_step.py --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metagan_dist import EpisodeBatch, MetaConfig, build_pair, meta_gradients


def per_task_loop(G, D, batch: EpisodeBatch, cfg: MetaConfig) -> torch.Tensor:
    """Second-order MAML (ns loss, seed objective), one task at a time; the mean flat meta-gradient."""
    names_g = [n for n, _ in G.named_parameters()]
    names_d = [n for n, _ in D.named_parameters()]
    theta_g = [p.detach().requires_grad_() for p in G.parameters()]
    theta_d = [p.detach().requires_grad_() for p in D.parameters()]

    def gen(params, z):
        return functional_call(G, dict(zip(names_g, params)), (z,))

    def disc(params, x):
        return functional_call(D, dict(zip(names_d, params)), (x,))

    total = None
    for t in range(batch.tasks):
        pg, pd = theta_g, theta_d
        for z in batch.inner_noise[:, t]:
            alias = [p.clone() for p in pg]
            grads = torch.autograd.grad(F.softplus(-disc(pd, gen(alias, z))).mean(), alias, create_graph=True)
            pg = [p - cfg.inner_lr * g for p, g in zip(pg, grads)]
            alias = [p.clone() for p in pd]
            fake = gen(pg, z)
            loss_d = F.softplus(-disc(alias, batch.support[t])).mean() + F.softplus(disc(alias, fake)).mean()
            grads = torch.autograd.grad(loss_d, alias, create_graph=True)
            pd = [p - cfg.inner_lr * g for p, g in zip(pd, grads)]
        fake_logits = disc(pd, gen(pg, batch.query_noise[t]))
        objective = F.softplus(-fake_logits).mean()
        objective = objective + F.softplus(-disc(pd, batch.query[t])).mean() + F.softplus(fake_logits).mean()
        flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, theta_g + theta_d)])
        total = flat if total is None else total + flat
    return total / batch.tasks


def batched(G, D, batch: EpisodeBatch, cfg: MetaConfig) -> torch.Tensor:
    return meta_gradients(G, D, batch, cfg).flat


METHODS = {"batched": batched, "per_task_loop": per_task_loop}


def setup(args):
    torch.manual_seed(0)
    device = torch.device(args.device)
    shape = (1, args.image, args.image)
    G, D = (m.to(device) for m in build_pair("mlp", args.z_dim, shape))
    support = torch.rand(args.tasks, args.shots, *shape, device=device) * 2 - 1
    query = torch.rand(args.tasks, args.queries, *shape, device=device) * 2 - 1
    batch = EpisodeBatch.sample(support, query, args.inner_steps, args.z_dim)
    cfg = MetaConfig(algorithm="maml", objective="seed", inner_steps=args.inner_steps, inner_lr=0.05)
    return G, D, batch, cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(run, args) -> dict[str, list[float]]:
    """Seconds per meta-step of each method, alternating A, B, A, B so load drifts hit both alike."""
    times = {name: [] for name in METHODS}
    for i in range(args.warmup + args.repeats):
        for name, fn in METHODS.items():
            start = time.perf_counter()
            run(fn)
            sync(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mb(run, fn, device: str) -> float:
    """Peak memory of one call above the memory in use before it.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above its resident set before the call; run it in a fresh process, since
    memory a previous call freed stays resident and would hide this call's peak.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(fn)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    run(fn)
    return (_status_kb("VmHWM") - before) / 1024


def memory_in_fresh_process(method: str, args) -> float:
    """peak_memory_mb of `method`, measured by this script in a new interpreter."""
    forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("device", "tasks", "shots", "queries",
                                                                          "inner_steps", "z_dim", "image")]
    child = subprocess.run([sys.executable, __file__, *forwarded, "--memory-of", method],
                           check=True, capture_output=True, text=True)
    return float(child.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=16, help="T task copies per meta-step")
    parser.add_argument("--shots", type=int, default=16, help="support images per task")
    parser.add_argument("--queries", type=int, default=16, help="query images per task")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--z-dim", type=int, default=64)
    parser.add_argument("--image", type=int, default=28, help="image side (1 channel)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--memory-of", choices=sorted(METHODS), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    G, D, batch, cfg = setup(args)

    def run(fn):
        return fn(G, D, batch, cfg)

    if args.memory_of:
        print(peak_memory_mb(run, METHODS[args.memory_of], args.device))
        return
    a, b = run(batched), run(per_task_loop)
    agreement = ((a - b).norm() / b.norm()).item()
    if agreement > 1e-4:  # the two methods must compute the same meta-gradient to be compared
        raise SystemExit(f"batched and per-task meta-gradients differ (relative {agreement:.2e}): not comparable")
    times = interleaved_times(run, args)
    results = {}
    for name, fn in METHODS.items():
        step = statistics.median(times[name])
        results[name] = {"seconds_per_step": step, "tasks_per_s": args.tasks / step,
                         "peak_mem_mb": memory_in_fresh_process(name, args)}
    speedup = results["batched"]["tasks_per_s"] / results["per_task_loop"]["tasks_per_s"]
    report = {
        "benchmark": "meta_step",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {k: getattr(args, k) for k in ("tasks", "shots", "queries", "inner_steps", "z_dim", "image")}
        | {"model": "seed MLP pair", "algorithm": "maml (second order)"},
        "max_rel_diff_batched_vs_loop": agreement,
        "results": results,
        "speedup_batched_over_loop": speedup,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    b, l = results["batched"], results["per_task_loop"]
    print("\n| device | T | batched tasks/s | loop tasks/s | speed-up | batched peak MB | loop peak MB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {report['device']} | {args.tasks} | {b['tasks_per_s']:.1f} | {l['tasks_per_s']:.1f} | "
        f"{speedup:.2f}x | {b['peak_mem_mb']:.1f} | {l['peak_mem_mb']:.1f} |"
    )


if __name__ == "__main__":
    main()
