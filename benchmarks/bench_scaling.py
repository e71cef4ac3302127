"""Weak scaling of the meta-step: T tasks per rank on 1..N ranks, tasks/s, efficiency, all-reduce share.

Each rank runs the training loop's step (meta_gradients on its own T tasks, then agree_and_step
with the torch engine: the stats all-reduce and the bucketed meta-gradient all-reduce) on
synthetic episodes, so data loading is not measured. On the CPU every rank gets one thread
(gloo); with --device cuda each rank gets its own GPU (NCCL).

    python benchmarks/bench_scaling.py                       # 1 and 2 CPU ranks
    python benchmarks/bench_scaling.py --device cuda --ranks 1 2 4 8

It also prints an estimate for 8 GPUs: the compute time per step measured here (on one GPU with
--device cuda) plus a ring all-reduce of the meta-gradient, latency + 2 (N-1)/N x bytes / bus
bandwidth (--latency-us 30, --nvlink-gbps 350: an NCCL all-reduce on 8 NVLink-connected H100s),
with no overlap assumed, and the shortest compute per step that keeps 85% efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metagan_dist import EpisodeBatch, MetaConfig, MetaLearner, build_pair, meta_gradients
from metagan_dist.config import OptimConfig
from metagan_dist.distributed import DistContext
from metagan_dist import engine as engine_module
from metagan_dist.engine import MetaParameters, TorchEngine, agree_and_step


class TimedAllReduce:
    """Wraps the engine's all_reduce_sum_ to add up the seconds spent in it (waiting for peers included)."""

    def __init__(self, all_reduce, sync):
        self.all_reduce, self.sync, self.seconds = all_reduce, sync, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.all_reduce(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out


def rank_main(rank: int, world: int, args: argparse.Namespace, store_dir: str, out: dict) -> None:
    """One rank: warm up, then time `repeats` meta-steps split into compute and communication."""
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    shape = (1, args.image, args.image)
    G, D = (m.to(device) for m in build_pair("mlp", args.z_dim, shape))
    cfg = MetaConfig(algorithm=args.algorithm, inner_steps=args.inner_steps, inner_lr=0.05)
    learner = MetaLearner(G, D, cfg)
    params = MetaParameters(learner.G.flat_parameters(), learner.D.flat_parameters()).to(device)
    ctx = DistContext(rank, world, rank, world, device)
    engine = TorchEngine(params, OptimConfig(), ctx, bucket_mb=25.0)
    gen = torch.Generator().manual_seed(rank)
    support = torch.rand(args.tasks, args.shots, *shape, generator=gen) * 2 - 1
    query = torch.rand(args.tasks, args.queries, *shape, generator=gen) * 2 - 1
    batch = EpisodeBatch.sample(support, query, args.inner_steps, args.z_dim, generator=gen).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    timed = engine_module.all_reduce_sum_ = TimedAllReduce(engine_module.all_reduce_sum_, sync)
    compute, comm, total = [], [], []
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        timed.seconds = 0.0
        start = time.perf_counter()
        grads = meta_gradients(G, D, batch, cfg, params=(params.generator, params.discriminator), reduction="sum")
        sync()
        computed = time.perf_counter()
        agree_and_step(engine, grads, stop=False, device=device)
        sync()
        if i >= args.warmup:
            compute.append(computed - start)
            comm.append(timed.seconds)
            total.append(time.perf_counter() - start)
    out[rank] = {"compute_s": statistics.median(compute), "allreduce_s": statistics.median(comm),
                 "step_s": statistics.median(total), "grad_bytes": grads.flat.numel() * grads.flat.element_size()}
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict:
    """Start `world` ranks; per-step medians: step and compute of the slowest rank, all-reduce averaged."""
    with tempfile.TemporaryDirectory() as store_dir, mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(rank_main, args=(world, args, store_dir, out), nprocs=world, start_method="spawn")
        ranks = dict(out)
    step = max(r["step_s"] for r in ranks.values())
    compute = max(r["compute_s"] for r in ranks.values())
    allreduce = statistics.mean(r["allreduce_s"] for r in ranks.values())
    return {"ranks": world, "step_s": step, "compute_s": compute, "allreduce_s": allreduce,
            "allreduce_share": allreduce / step, "tasks_per_s": world * args.tasks / step,
            "grad_bytes": ranks[0]["grad_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--algorithm", default="maml")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per rank (weak scaling)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--z-dim", type=int, default=64)
    parser.add_argument("--image", type=int, default=28)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--nvlink-gbps", type=float, default=350.0, help="all-reduce bus bandwidth for the estimate")
    parser.add_argument("--latency-us", type=float, default=30.0, help="all-reduce latency for the estimate")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    if args.device == "cpu" and max(args.ranks) > (os.cpu_count() or 1):
        parser.error(f"{max(args.ranks)} CPU ranks need as many cores; this machine has {os.cpu_count()}")

    rows = [run_world(world, args) for world in args.ranks]
    base = rows[0]["tasks_per_s"] / rows[0]["ranks"]
    for row in rows:
        row["efficiency"] = row["tasks_per_s"] / (row["ranks"] * base)
    # 8 GPUs: the compute per step measured here (1 rank) + a ring all-reduce over NVLink, no overlap.
    ring_s = args.latency_us * 1e-6 + 2 * 7 / 8 * rows[0]["grad_bytes"] / (args.nvlink_gbps * 1e9)
    estimate = {"ranks": 8, "compute_s": rows[0]["compute_s"], "allreduce_s": ring_s,
                "efficiency": rows[0]["compute_s"] / (rows[0]["compute_s"] + ring_s),
                "min_compute_s_for_85pct": ring_s * 0.85 / 0.15,
                "assumes": f"compute per step as measured here on 1 {args.device} rank; ring all-reduce of "
                           f"{rows[0]['grad_bytes']} bytes at {args.nvlink_gbps} GB/s bus bandwidth plus "
                           f"{args.latency_us} us latency; no overlap"}
    report = {"benchmark": "scaling", "device": args.device, "date": time.strftime("%Y-%m-%d"),
              "config": {k: getattr(args, k) for k in ("algorithm", "tasks", "shots", "queries", "inner_steps",
                                                       "z_dim", "image")} | {"model": "seed MLP pair"},
              "weak_scaling": rows, "estimate_8_gpus": estimate}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    print("\n| ranks | tasks/s | efficiency | all-reduce share of a step |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['ranks']} | {row['tasks_per_s']:.1f} | {row['efficiency']:.0%} | {row['allreduce_share']:.1%} |")
    print(f"| 8 GPUs (estimate, {args.device} compute) | | {estimate['efficiency']:.1%} | "
          f"{ring_s / (ring_s + rows[0]['compute_s']):.1%} |")
    print(f"\n8 GPUs stay at >= 85% efficiency while a meta-step computes for >= "
          f"{estimate['min_compute_s_for_85pct'] * 1e6:.0f} us (all-reduce {ring_s * 1e6:.0f} us).")


if __name__ == "__main__":
    main()
