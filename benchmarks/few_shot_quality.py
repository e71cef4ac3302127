"""Few-shot quality on the glyphs pool: meta-train the recipes, evaluate them against the baselines, check the targets.

    python benchmarks/few_shot_quality.py      # the RESULTS.md figures

The MLP family alone (`--latent-seeds 0`) took 25 min on one 2-core AMD EPYC and 76 min on a slower one;
the whole run took 79 min on a 2-core Intel Xeon, with probes sharing its cores, and the MLP family alone
44 min there with checkpoint selection, and 39 min on a 2-core AMD EPYC (benchmarks/RESULTS.md).

A smoke run, with fewer tasks, seeds and meta-steps:

    python benchmarks/few_shot_quality.py --tasks 20 --seeds 1 --train-seeds 1 --latent-seeds 1 \
        --quick-steps 300 --long-steps 300 --latent-steps 300

1. Meta-trains with launch/train.py: the quick start (its defaults, as `make train` runs them) once
   per training seed (`--train-seeds`, run.seed = 0, 1, ...), the longer CPU run
   (launch/configs/cpu_long.yaml) once, and the latent pair (launch/configs/cpu_latent.yaml) once per
   `--latent-seeds`. Meta-training is chaotic: runs that differ only in their seed scored 0.37-0.77
   since meta.g_average (benchmarks/RESULTS.md), so one run is one draw of a recipe. Each run keeps
   its best checkpoint (run.select_tasks; off in cpu_latent.yaml), and the evaluation reads it.
2. Evaluates each family of nets with one launch/evaluate.py call on the held-out Georgian script:
   --tasks tasks x --seeds seeds, k = 4 shots, S = 10 steps, 20-way recognizability, M = 64 samples
   per task, against `scratch` (a random init of the family's nets; for the latent pair, random heads
   on the same frozen autoencoder) and `pretrain-finetune` (the same nets trained on all meta-train
   images for the same compute), each adapted with every rule of BASELINE_RULES (each its own row;
   the best counts).
3. Checks the targets (TARGETS, from issue 9) per family, against that family's own baselines. The
   quick start counts as the mean of its training runs, never the best of them, with its spread over
   training runs x tasks x evaluation seeds; each run's own figure is listed too. A miss is named with
   its shortfall, and the script exits 1 unless some family meets every target.

Writes OUT/runs/<name>/ (the meta-training runs; a re-run resumes or reuses them), OUT/eval/<family>/
(results.json, results.md, curves.png, grids/) and OUT/summary.md (machine, commands, timings,
tables, target checks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOTS, STEPS, WAYS = 4, 10, 20
QUICK, LONG, LATENT = "quickstart", "long", "latent"  # a recipe's runs are named RECIPE_s0, RECIPE_s1, ... (LONG: one)
CONFIGS = {QUICK: None, LONG: "launch/configs/cpu_long.yaml", LATENT: "launch/configs/cpu_latent.yaml"}  # None: defaults
# Families of nets: each is evaluated in one call, whose baselines are inits of the family's own nets.
FAMILIES = {"mlp": (QUICK, LONG), "latent": (LATENT,)}
# Every baseline adapts with each rule (Adam rules as LR:BETA1): the recipe's own inner rule, the fit test's
# GAN rule, and the rates at which a random init learned fastest in 10 steps in our sweeps (RESULTS.md;
# adam:0.02:0 is the random latent heads' best).
BASELINE_RULES = ("sgd:0.05", "adam:0.001:0.5", "adam:0.002:0.5", "adam:0.003:0", "adam:0.01:0", "adam:0.02:0")
CURVE_STEPS = "0,2,5,10,20"
TARGETS = {  # name: (what, threshold); every figure at S = 10 unless it says otherwise
    "recognizability": ("best meta-learned row's recognizability", 0.7),
    "margin_scratch": ("best meta-learned row minus scratch's best row", 0.4),
    "margin_pretrain": ("best meta-learned row minus pretrain-finetune's best row", 0.4),
    "adaptation": ("best meta-learned row at S = 10 minus the same init at S = 0", 0.4),
    "precision": ("best meta-learned row's precision", 0.5),
    "recall": ("best meta-learned row's recall", 0.2),
    "quickstart": ("the quick-start checkpoint's recognizability", 0.5),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".out/few_shot", help="results folder (default: .out/few_shot)")
    parser.add_argument("--tasks", type=int, default=60, help="meta-test tasks evaluated, of 119 (default: 60)")
    parser.add_argument("--seeds", type=int, default=3, help="evaluation seeds (default: 3)")
    parser.add_argument("--train-seeds", type=int, default=3,
                        help="meta-training runs of the quick start, run.seed = 0, 1, ... (default: 3)")
    parser.add_argument("--latent-seeds", type=int, default=2,
                        help="meta-training runs of the latent pair, run.seed = 0, 1, ...; 0 skips it (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and evaluation (default: 2)")
    parser.add_argument("--quick-steps", type=int, help="run.steps of the quick start (default: its config's)")
    parser.add_argument("--long-steps", type=int, help="run.steps of the long run (default: its config's)")
    parser.add_argument("--latent-steps", type=int, help="run.steps of the latent pair (default: its config's)")
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


def train_command(config: str | None, run_dir: Path, steps: int | None, threads: int, seed: int) -> list[str]:
    overrides = [f"run.out_dir={run_dir}", "run.device=cpu", f"run.threads={threads}", f"run.seed={seed}"]
    overrides += [f"run.steps={steps}"] if steps else []
    return [sys.executable, "launch/train.py", *(["--config", config] if config else []), *overrides]


def evaluate_command(runs: dict[str, Path], out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "launch/evaluate.py", *(f"{name}={path}" for name, path in runs.items()),
            "--pool", "glyphs", "--shots", str(SHOTS), "--steps", str(STEPS), "--ways", str(WAYS),
            "--tasks", str(args.tasks), "--seeds", str(args.seeds), "--samples", "64",
            "--curve-steps", CURVE_STEPS, "--baseline-rules", *BASELINE_RULES, "--threads", str(args.threads),
            "--device", "cpu", "--out", str(out)]


def machine() -> str:
    """lscpu's model and core lines, and the load average (the box may be shared)."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    wanted = ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor")
    picked = [" ".join(line.split()) for line in lines if line.split(":")[0] in wanted]
    return "; ".join(picked) + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"


def pooled(summaries: list[dict]) -> tuple[float, float] | None:
    """Mean and std over the union of equal-sized (run x seed x task) sets, from each set's mean and std;
    None if any run diverged on a task."""
    if any(summary["mean"] is None for summary in summaries):
        return None
    mean = sum(summary["mean"] for summary in summaries) / len(summaries)
    second = sum(summary["std"] ** 2 + summary["mean"] ** 2 for summary in summaries) / len(summaries)
    return mean, math.sqrt(max(second - mean**2, 0.0))


def recipes(report: dict, members: dict[str, list[str]]) -> dict[str, dict[str, dict[str, tuple[float, float] | None]]]:
    """Per recipe (members: recipe -> its runs' names): {step: {metric: pooled (mean, std) over its runs}}, own rule."""
    rows = {row["label"]: row for row in report["methods"]}
    out = {}
    for recipe, names in members.items():
        runs = [rows[f"{name} (meta)"]["steps"] for name in names]
        out[recipe] = {step: {metric: pooled([run[step][metric] for run in runs]) for metric in runs[0][step]}
                       for step in runs[0]}
    return out


def measured(report: dict, members: dict[str, list[str]]) -> dict[str, tuple[float, float] | None]:
    """Each target's measured value and its spread (std over runs x tasks x seeds, or of the difference's terms);
    the quick-start target only where the quick start is among `members`."""
    rows = {row["label"]: row for row in report["methods"]}
    pooled_rows = recipes(report, members)
    scored = {recipe: steps[str(STEPS)]["recognizability"] for recipe, steps in pooled_rows.items()}
    best = max((r for r in scored if scored[r] is not None), key=lambda r: scored[r][0], default=None)
    if best is None:
        return dict.fromkeys(name for name in TARGETS if name != "quickstart" or QUICK in members)
    at_s, at_0 = pooled_rows[best][str(STEPS)], pooled_rows[best]["0"]

    def margin(method: str) -> tuple[float, float]:
        other = rows[report["best"][method]]["steps"][str(STEPS)]["recognizability"]
        return at_s["recognizability"][0] - other["mean"], math.hypot(at_s["recognizability"][1], other["std"])

    values = {
        "recognizability": at_s["recognizability"],
        "margin_scratch": margin("scratch"),
        "margin_pretrain": margin("pretrain-finetune"),
        "adaptation": (at_s["recognizability"][0] - at_0["recognizability"][0],
                       math.hypot(at_s["recognizability"][1], at_0["recognizability"][1])),
        "precision": at_s["precision"],
        "recall": at_s["recall"],
    }
    return values | ({"quickstart": scored[QUICK]} if QUICK in members else {})


def recipe_lines(report: dict, members: dict[str, list[str]]) -> list[str]:
    """The recipes' pooled figures at S = 0 and S = STEPS, then every training run's own recognizability."""
    rows = {row["label"]: row for row in report["methods"]}
    lines = ["| recipe | runs | S | recognizability | precision | recall |", "|---|---|---|---|---|---|"]
    for recipe, steps in recipes(report, members).items():
        for step in ("0", str(STEPS)):
            cells = ["diverged" if steps[step][m] is None else f"{steps[step][m][0]:.2f} ± {steps[step][m][1]:.2f}"
                     for m in ("recognizability", "precision", "recall")]
            lines.append(f"| {recipe} | {len(members[recipe])} | {step} | " + " | ".join(cells) + " |")
    own = {name: rows[f"{name} (meta)"]["steps"][str(STEPS)]["recognizability"]["mean"] for names in members.values()
           for name in names}
    per_run = [f"{name} " + ("diverged" if value is None else f"{value:.2f}") for name, value in own.items()]
    return lines + ["", f"Each training run's recognizability at S = {STEPS}: " + ", ".join(per_run) + "."]


def target_lines(report: dict, members: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """One line per target (measured ± spread, threshold, met or missed by how much), and the missed names."""
    lines, missed = [], []
    for name, value in measured(report, members).items():
        what, threshold = TARGETS[name]
        if value is None:
            missed.append(name)
            lines.append(f"- {what}: diverged, target >= {threshold}: MISSED")
            continue
        mean, spread = value
        verdict = "met" if mean >= threshold else f"MISSED by {threshold - mean:.2f}"
        missed += [] if mean >= threshold else [name]
        spread_text = f"± {spread:.2f} over runs x tasks x seeds"
        lines.append(f"- {what}: {mean:.2f} ({spread_text}), target >= {threshold}: {verdict}")
    return lines, missed


def family_section(family: str, eval_dir: Path, report: dict, members: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """The summary's section on one family (its evaluation table, recipes and target check), and its missed targets."""
    lines, missed = target_lines(report, members)
    section = [
        f"## Family `{family}`: " + ", ".join(members), "",
        (eval_dir / "results.md").read_text(),
        "The recipes, each pooled over its training runs (mean ± std over runs x tasks x seeds, its own rule):", "",
        *recipe_lines(report, members), "",
        f"Target check against this family's baselines (k = {SHOTS}, S = {STEPS}, {WAYS}-way"
        + ("; the quick start is the mean of its runs" if QUICK in members else "") + "):", "",
        *lines, "",
        f"Sample grids (k shots, then samples after S = {STEPS} steps): {eval_dir / 'grids'}; "
        "look at them before believing any line above.", "",
    ]
    return section, missed


def main() -> None:
    args = parse_args()
    out = (REPO / args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine_before = machine()
    if args.train_seeds < 1 or args.latent_seeds < 0:
        sys.exit(f"--train-seeds must be at least 1 and --latent-seeds at least 0, got {args.train_seeds} and "
                 f"{args.latent_seeds}")
    members = {QUICK: [f"{QUICK}_s{seed}" for seed in range(args.train_seeds)], LONG: [LONG],
               LATENT: [f"{LATENT}_s{seed}" for seed in range(args.latent_seeds)]}
    steps = {QUICK: args.quick_steps, LONG: args.long_steps, LATENT: args.latent_steps}
    runs, timings, commands = {}, {}, []
    for recipe, names in members.items():
        for seed, name in enumerate(names):
            runs[name] = out / "runs" / name
            command = train_command(CONFIGS[recipe], runs[name], steps[recipe], args.threads, seed)
            commands.append(command)
            timings[f"train {name}"] = run(command, out / "logs" / f"train_{name}.log")
    sections, misses = [], {}
    for family, recipes_of_family in FAMILIES.items():
        family_members = {recipe: members[recipe] for recipe in recipes_of_family if members[recipe]}
        if not family_members:
            continue
        eval_dir = out / "eval" / family
        command = evaluate_command({name: runs[name] for names in family_members.values() for name in names},
                                   eval_dir, args)
        commands.append(command)
        timings[f"evaluate {family}"] = run(command, out / "logs" / f"evaluate_{family}.log")
        report = json.loads((eval_dir / "results.json").read_text())
        section, misses[family] = family_section(family, eval_dir, report, family_members)
        sections += section

    verdict = [f"- `{family}`: " + (f"missed {', '.join(missed)}" if missed else "every target met")
               for family, missed in misses.items()]
    summary = "\n".join([
        f"- Date: {started}. Machine: {machine_before} (at the start); {machine()} (at the end).",
        "- Wall time (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items()) + ".",
        "- Commands (from the repository root):", "",
        "```", *(shlex.join(c).replace(str(REPO) + "/", "") for c in commands), "```", "",
        *sections,
        "## Verdict (the run passes when one family meets every target)", "", *verdict, "",
    ])
    (out / "summary.md").write_text(summary)
    print(f"\n{summary}\nwritten: {out / 'summary.md'}, {out / 'eval'}")
    if all(misses.values()):
        sys.exit("no family met every target: " + "; ".join(
            f"{family} missed {', '.join(missed)}" for family, missed in misses.items()))


if __name__ == "__main__":
    main()
