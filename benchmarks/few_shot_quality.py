"""Few-shot quality on the glyphs pool: meta-train each algorithm on one budget, then evaluate with k = 4 shots.

    python benchmarks/few_shot_quality.py                        # the RESULTS.md figures (about 35 min on 2 CPU cores)
    python benchmarks/few_shot_quality.py --algorithms reptile --tasks 20 --seeds 1   # a quick look

Budget (the same for every algorithm, every value passed explicitly to launch/train.py, see TRAIN):
the seed's MLP pair (G 64-256-1024, D 1024-128-1), k = q = 4, T = 8 tasks per meta-step on one
rank, 5 inner steps (each a G step, then a D step), `split` objective, non-saturating loss, Adam
outer optimizer (lr 1e-3, betas 0.5/0.999, meta-gradient clipped at norm 1), --meta-steps meta-steps;
Meta-SGD alone also clips each task's inner gradient at norm 1 (ALGORITHM_TRAIN).
Then launch/evaluate.py on the first --tasks meta-test tasks (Georgian script, never seen in
meta-training) x --seeds seeds: k = 4, S = 10 steps, M = 64 samples per task against the task's 28
other images. `pretrain-finetune` gets the same real-image budget as one meta-training run;
both baselines are fine-tuned with each of BASELINE_RULES (each its own row; the best row counts).

Target (issue 6), k = 4, S = 10: best meta-learned KID <= 0.7x scratch and <= 0.85x pretrain-finetune.
Writes OUT/runs/<algorithm>/ (the meta-training runs), OUT/eval/ (results.json, results.md,
kid_vs_steps.png, grids/) and OUT/summary.md (machine, commands, timings, table, target check).
Re-running reuses finished training runs (launch/train.py resumes a run folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")
SHOTS, STEPS = 4, 10
TARGETS = {"scratch": 0.7, "pretrain-finetune": 0.85}
BASELINE_RULES = ("sgd:0.05", "adam:0.0001", "adam:0.0003", "adam:0.001")

TRAIN = {  # launch/train.py overrides shared by every algorithm (meta.algorithm and run.* are added per run)
    "data.pool": "glyphs", "model.arch": "mlp", "model.z_dim": 64, "model.width": 0,
    "data.shots": SHOTS, "data.queries": 4, "data.tasks_per_rank": 8, "data.workers": 0,
    "meta.objective": "split", "meta.loss": "ns", "meta.inner_steps": 5, "meta.inner_lr": 0.05, "meta.inner_clip": 0.0,
    "optim.lr": 0.001, "optim.beta1": 0.5, "optim.beta2": 0.999, "optim.grad_clip": 1.0,
    "run.seed": 0, "run.device": "cpu", "run.sample_every": 200, "run.checkpoint_every": 200, "run.log_every": 20,
}
# Meta-SGD's learned G rates keep growing until its inner loop diverges (query L_D above 10 by step 600 in a
# trial run); clipping each task's inner gradient at norm 1 kept it stable.
ALGORITHM_TRAIN = {"metasgd": {"meta.inner_clip": 1.0}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".out/few_shot", help="results folder (default: .out/few_shot)")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS,
                        help="algorithms to meta-train and compare (default: all four)")
    parser.add_argument("--meta-steps", type=int, default=600, help="meta-steps per algorithm (default: 600)")
    parser.add_argument("--tasks", type=int, default=60, help="meta-test tasks evaluated, of 119 (default: 60)")
    parser.add_argument("--seeds", type=int, default=3, help="evaluation seeds (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and evaluation (default: 2)")
    return parser.parse_args()


def run(command: list[str], log: Path) -> float:
    """Run a command with its output in `log`; returns its wall time, or stops with the log's tail on failure."""
    print(f"$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - start


def train_command(algorithm: str, run_dir: Path, args: argparse.Namespace) -> list[str]:
    overrides = {**TRAIN, **ALGORITHM_TRAIN.get(algorithm, {}), "meta.algorithm": algorithm, "run.steps": args.meta_steps, "run.threads": args.threads,
                 "run.out_dir": run_dir}
    return [sys.executable, "launch/train.py", *(f"{key}={value}" for key, value in overrides.items())]


def evaluate_command(runs: dict[str, Path], out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "launch/evaluate.py", *(f"{name}={path}" for name, path in runs.items()),
            "--pool", "glyphs", "--shots", str(SHOTS), "--steps", str(STEPS), "--tasks", str(args.tasks),
            "--seeds", str(args.seeds), "--samples", "64", "--baseline-rules", *BASELINE_RULES,
            "--threads", str(args.threads), "--device", "cpu", "--out", str(out)]


def machine() -> str:
    """lscpu's model and core lines, and the load average (the box is shared)."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    wanted = ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor")
    picked = [" ".join(line.split()) for line in lines if line.split(":")[0] in wanted]
    return "; ".join(picked) + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"


def target_lines(report: dict) -> list[str]:
    """One line per baseline: the measured ratio of the best meta-learned row's KID, the target, met or missed."""
    ratios = report["kid_ratios"]
    lines = []
    for name, target in TARGETS.items():
        entry = ratios["vs"].get(name)
        if entry:
            verdict = "met" if entry["ratio"] <= target else "MISSED"
            lines.append(f"- {ratios['best_meta_learned']} vs {entry['baseline']}: KID ratio {entry['ratio']:.2f} "
                         f"(target <= {target}): {verdict}")
    return lines


def main() -> None:
    args = parse_args()
    out = (REPO / args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine_before = machine()
    runs, timings, commands = {}, {}, []
    for algorithm in args.algorithms:
        runs[algorithm] = out / "runs" / algorithm
        command = train_command(algorithm, runs[algorithm], args)
        commands.append(command)
        timings[algorithm] = run(command, out / "logs" / f"train_{algorithm}.log")
    command = evaluate_command(runs, out / "eval", args)
    commands.append(command)
    timings["evaluate"] = run(command, out / "logs" / "evaluate.log")

    report = json.loads((out / "eval" / "results.json").read_text())
    summary = "\n".join([
        f"- Date: {started}. Machine: {machine_before} (at the start); {machine()} (at the end).",
        "- Wall time (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()) + ".",
        "- Commands (from the repository root):", "",
        "```", *(shlex.join(c).replace(str(REPO) + "/", "") for c in commands), "```", "",
        (out / "eval" / "results.md").read_text(), "Target check (k = 4, S = 10):", "", *target_lines(report), "",
    ])
    (out / "summary.md").write_text(summary)
    print(f"\n{summary}\nwritten: {out / 'summary.md'}, {out / 'eval'}")


if __name__ == "__main__":
    main()
