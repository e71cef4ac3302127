"""Task streaming throughput: episodes/s of TaskStream from shards on local disk.

    python benchmarks/bench_data.py [--pool PATH] [--workers 0 2] [--batches 400] [--repeats 3] [--out FILE]

Defaults follow the issue: k = q = 5, 32x32 (the glyphs pool, built on first use), T = 16.
For each worker count it reports the steady rate (after the first batch, median of repeats) and
the start-up time to the first batch (index, worker start). Prints a markdown
table and writes JSON (to --out, else stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

from metagan_dist.data import TaskStream, ensure_glyphs_pool


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def measure(pool: str, workers: int, batches: int, args: argparse.Namespace, seed: int) -> dict:
    """One epoch of `batches` batches: seconds to the first batch, then episodes/s for the rest."""
    stream = TaskStream(
        pool,
        shots=args.shots,
        queries=args.queries,
        tasks_per_batch=args.tasks,
        episodes_per_epoch=batches * args.tasks,
        num_workers=workers,
        seed=seed,
    )
    started = time.perf_counter()
    iterator = iter(stream)
    next(iterator)
    first = time.perf_counter()
    rest = sum(1 for _ in iterator)
    done = time.perf_counter()
    return {"first_batch_s": first - started, "steady_eps": rest * args.tasks / (done - first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", help="pool folder (default: the glyphs pool, built on first use)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=400, help="batches per measured epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=16, help="tasks per batch (T)")
    parser.add_argument("--out", help="write the JSON here instead of stdout")
    args = parser.parse_args()
    pool = args.pool or str(ensure_glyphs_pool())

    rows = []
    for workers in args.workers:
        runs = [measure(pool, workers, args.batches, args, seed) for seed in range(args.repeats)]
        rows.append(
            {
                "workers": workers,
                "steady_eps_median": statistics.median(run["steady_eps"] for run in runs),
                "first_batch_s_median": statistics.median(run["first_batch_s"] for run in runs),
                "runs": runs,
            }
        )
    result = {
        "benchmark": "bench_data",
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "pool": pool},
        "results": rows,
    }
    print(
        f"\nTaskStream, k={args.shots} q={args.queries} T={args.tasks}, {args.batches} batches x "
        f"{args.repeats} repeats, {result['cpu']} ({result['cores']} cores)\n"
    )
    print("| workers | episodes/s (steady, median) | first batch (s) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['steady_eps_median']:.0f} | {row['first_batch_s_median']:.2f} |")
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as stream:
            stream.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
