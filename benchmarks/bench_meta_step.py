"""Meta-step throughput and peak memory: the batched step (eager, chunked, compiled) against a per-task loop.

One meta-step of second-order MAML (ns loss, seed objective, one inner step) on each config:

  mlp-T64-k4    the seed's MLP pair (z = 64, 1x28x28), T = 64 tasks, k = q = 4
  mlp-T16-k16   the same pair, T = 16, k = q = 16
  dcgan-T8-k4   the DCGAN pair (z = 100, width 64, 1x32x32, 1.7 M parameters), T = 8, k = q = 4

Variants, each checked against the loop's meta-gradient before anything is timed:

  loop          one task at a time, plain autograd on per-parameter tensors (the learn2learn way)
  eager         meta_gradients with all T tasks in one chunk (meta.task_chunk = T)
  chunked       meta_gradients with meta.task_chunk = --chunk (default: the config default)
  compiled      chunked, with meta.compile; its compile time (first call less one step) is reported
                apart from its step time; torch's on-disk caches shorten it unless TORCHINDUCTOR_CACHE_DIR
                points to an empty folder
  chunk=C       with --chunks C ...: eager at meta.task_chunk = C, to choose the chunk

Per config, the variants alternate call by call (A, B, C, A, B, C, ...) so that load drifts hit
all of them alike; figures are medians and ratios are to the loop of the same run. Peak memory is
`metagan_dist.memory.peak_tensor_bytes` of one call after warm-up: tensor memory at the allocator
(CUDA's caching allocator, or the CPU allocator's allocations replayed in order), untimed. On the
CPU, glibc keeps freed memory in the process, as launch/train.py sets it up.

    python benchmarks/bench_meta_step.py --threads 1 --out results.json
    python benchmarks/bench_meta_step.py --configs mlp-T64-k4 --variants loop --chunks 4 8 16 32 64
    python benchmarks/bench_meta_step.py --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call

from metagan_dist import EpisodeBatch, MetaConfig, build_pair, meta_gradients
from metagan_dist.flat import FlatLayout
from metagan_dist.memory import keep_freed_memory, peak_tensor_bytes
from metagan_dist.meta import COMPILED_FORWARD_STEP


@dataclass(frozen=True)
class Config:
    arch: str
    tasks: int
    shots: int  # k = q
    z_dim: int
    image: int
    width: int | None = None


CONFIGS = {
    "mlp-T64-k4": Config("mlp", 64, 4, 64, 28),
    "mlp-T16-k16": Config("mlp", 16, 16, 64, 28),
    "dcgan-T8-k4": Config("dcgan", 8, 4, 100, 32, 64),
}
VARIANTS = ("loop", "eager", "chunked", "compiled")


def per_task_loop(G, D, batch: EpisodeBatch, cfg: MetaConfig) -> torch.Tensor:
    """Second-order MAML (ns loss, seed objective), one task at a time; the mean meta-gradient, each parameter
    flattened in its own order (in_flat_order puts it in MetaGradients.flat order)."""
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


def in_flat_order(loop_grad: torch.Tensor, G: nn.Module, D: nn.Module) -> torch.Tensor:
    """The loop's meta-gradient (each parameter in its own order) in MetaGradients.flat's order (FlatLayout's)."""
    layouts = FlatLayout.of(G), FlatLayout.of(D)
    pieces = loop_grad.split([layout.numel for layout in layouts])
    return torch.cat([layout.from_untransposed(x) for layout, x in zip(layouts, pieces)])


def setup(config: Config, device: torch.device) -> tuple[nn.Module, nn.Module, EpisodeBatch, MetaConfig]:
    """The pair, one episode batch of random images and the meta-config (second-order MAML) of a config."""
    torch.manual_seed(0)
    shape = (1, config.image, config.image)
    G, D = (m.to(device) for m in build_pair(config.arch, config.z_dim, shape, width=config.width))
    support = torch.rand(config.tasks, config.shots, *shape, device=device) * 2 - 1
    query = torch.rand(config.tasks, config.shots, *shape, device=device) * 2 - 1
    batch = EpisodeBatch.sample(support, query, 1, config.z_dim)
    return G, D, batch, MetaConfig(algorithm="maml", objective="seed", inner_steps=1, inner_lr=0.05)


def variants(names: list[str], chunks: list[int], chunk: int, config: Config) -> dict[str, dict]:
    """{variant: its meta.task_chunk and meta.compile} for this config."""
    settings = {"eager": {"task_chunk": config.tasks, "compile": False},
                "chunked": {"task_chunk": chunk, "compile": False},
                "compiled": {"task_chunk": chunk, "compile": True}}
    chosen = {name: settings.get(name, {}) for name in names}
    chosen |= {f"chunk={c}": {"task_chunk": c, "compile": False} for c in chunks}
    return chosen


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stops after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes, its device work included."""
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_config(name: str, config: Config, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One record per variant of one config: tasks/s, ratio to the loop, peak MB (and compile time)."""
    G, D, batch, cfg = setup(config, device)
    torch._dynamo.reset()  # each config compiles afresh, never against another config's recompile limit
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    chunk_of = {}
    for variant, setting in variants(args.variants, args.chunks, args.chunk, config).items():
        if variant == "loop":
            runs[variant] = lambda: per_task_loop(G, D, batch, cfg)
        else:
            meta = dataclasses.replace(cfg, **setting)
            runs[variant] = lambda meta=meta: meta_gradients(G, D, batch, meta).flat
            chunk_of[variant] = min(setting["task_chunk"], config.tasks)
    reference = in_flat_order(per_task_loop(G, D, batch, cfg), G, D)
    first_calls = {}
    for variant, run in runs.items():  # first calls: correctness, and the compiler's time
        graphs_before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        got = run()
        sync(device)
        got = in_flat_order(got, G, D) if variant == "loop" else got
        diff = ((got - reference).norm() / reference.norm()).item()
        first_calls[variant] = {"first_call_s": time.perf_counter() - start, "rel_diff_vs_loop": diff,
                                "graphs_compiled": counters["stats"]["unique_graphs"] - graphs_before}
        if diff > args.tolerance:
            raise SystemExit(f"{name} {variant}: meta-gradient differs from the loop's by {diff:.2e}: not comparable")
    times = {variant: [] for variant in runs}
    for i in range(args.warmup + args.repeats):
        for variant, run in runs.items():
            seconds = timed(run, device)
            if i >= args.warmup:
                times[variant].append(seconds)
    loop_step = statistics.median(times["loop"]) if "loop" in times else None
    out = []
    for variant, run in runs.items():
        step = statistics.median(times[variant])
        record = {"config": name, **dataclasses.asdict(config), "variant": variant,
                  "task_chunk": chunk_of.get(variant), "seconds_per_step": step,
                  "tasks_per_s": config.tasks / step, "ratio_to_loop": loop_step / step if loop_step else None,
                  "peak_mb": peak_tensor_bytes(run, device) / 2**20, **first_calls[variant]}
        if variant == "compiled":
            record["compile_s"] = record["first_call_s"] - step
            # dynamo runs a frame eagerly, silently, when it cannot compile it (recompile limit): count graphs too
            record["ran_compiled"] = not COMPILED_FORWARD_STEP.broken and record["graphs_compiled"] > 0
        out.append(record)
    return out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(records: list[dict]) -> str:
    """The records as a markdown table, one row per (config, variant)."""
    rows = ["| config | variant | chunk | tasks/s | × loop | peak MB | compile s |", "|---|---|---|---|---|---|---|"]
    for r in records:
        ratio = f"{r['ratio_to_loop']:.2f}×" if r["ratio_to_loop"] else ""
        compile_s = f"{r['compile_s']:.0f}" + ("" if r["ran_compiled"] else " (fell back)") if "compile_s" in r else ""
        rows.append(f"| {r['config']} | {r['variant']} | {r['task_chunk'] or ''} | {r['tasks_per_s']:.1f} | {ratio} | "
                    f"{r['peak_mb']:.1f} | {compile_s} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads measure the contention)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--chunk", type=int, default=MetaConfig().task_chunk, help="meta.task_chunk of chunked/compiled")
    parser.add_argument("--chunks", type=int, nargs="*", default=[], help="also time these chunk sizes (eager)")
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="leave glibc's malloc as it is (to measure what keeping freed memory is worth)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference from the loop")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 warm-up step and 3 timed steps")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 3
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":  # full fp32 everywhere, so that every variant computes the loop's meta-gradient
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    kept = device.type == "cpu" and not args.no_keep_freed_memory and keep_freed_memory()
    load_before = os.getloadavg()
    records = []
    for name in args.configs:
        records += bench_config(name, CONFIGS[name], args, device)
        print(markdown([r for r in records if r["config"] == name]).split("\n", 2)[-1], flush=True)
    report = {
        "benchmark": "meta_step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "keep_freed_memory": kept,
        "torch": torch.__version__,
        "algorithm": "maml (second order), ns loss, seed objective, 1 inner step",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "records": records,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{report['device']}, {report['threads']} thread(s), load average {load_before[0]:.1f} -> "
          f"{report['load_average_after'][0]:.1f}, keep_freed_memory={kept}\n")
    print(markdown(records))


if __name__ == "__main__":
    main()
