"""Few-shot evaluation on held-out tasks: meta-learned inits against `scratch` and `pretrain-finetune`.

    python launch/evaluate.py runs/maml runs/reptile --shots 4 --steps 10 --out eval/
    metagan-evaluate maml=runs/a/checkpoints/step-00002000 metasgd=runs/b --baselines scratch --tasks 20

For each meta-test task and seed: k shots at random; the rest of the task is split into an exam set
and a reference set. Every method adapts to the same shots with the same noise, for the curve's step
counts (0, 1, 2, 5, 10, 20, 50 and S), then draws M samples per task, scored against the reference
set in the feature spaces of two task classifiers trained on the meta-train tasks (cached beside
the pool): recognizability first (is it the task? N-way nearest-prototype accuracy of the samples,
a task's prototype being the mean feature of its reference set, in the space of the classifier
trained with corruptions, <pool>/recognition_net.pt), then k-NN precision/recall (recall over sets of
samples as large as the reference set), KID, FID and diversity (in the space of the classifier
trained on clean images, <pool>/feature_net.pt).
Reference rows are scored exactly like samples: `real` (the exam images: the ceiling), `shots`
(the k shots: the copy baseline), `other-task` (another task's exam images); every init is also
scored before adaptation (S = 0).

Methods: each checkpoint (adapted with --rules, default its meta-learned inner rule); `scratch`, a
random init of the same architecture (a fresh one per seed); `pretrain-finetune`, one GAN trained
with Adam on the union of the meta-train tasks for the same compute as the first checkpoint's run
(the same number of real-image evaluations: meta-steps to its latest checkpoint x ranks x tasks per
rank x (inner steps x k + q)), from its initial weights (for a support-conditioned G, a conditional GAN:
each batch from one task, which is also G's support). Baselines adapt with each of --baseline-rules
(default: the first checkpoint's own inner rule, written as sgd:LR or adam:LR:BETA1).

Writes OUT/results.json, OUT/results.md, OUT/curves.png (recognizability and KID against steps)
and OUT/grids/<method>.png (per task: the k shots, then samples after S steps).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from metagan_dist.data import Pool
from metagan_dist.evaluation import baselines
from metagan_dist.evaluation.checkpoint_model import MetaLearnedGAN, load_meta_learned
from metagan_dist.evaluation.cli_support import DEVICES, check_g_average, open_pool, pick_device, run_command
from metagan_dist.evaluation.features import DISTRIBUTION_FILE, RECOGNITION_FILE, load_or_train_feature_spaces
from metagan_dist.evaluation.harness import EvalPlan, Method, check_plan, evaluate
from metagan_dist.evaluation.report import build_report, markdown, plot_curves
from metagan_dist.evaluation.rules import Rule, parse_rule
from metagan_dist.evaluation.shifts import SHIFTS, shift_tasks
from metagan_dist.sampling import save_grid

CURVE_STEPS = (0, 1, 2, 5, 10, 20, 50)
BASELINES = ("scratch", "pretrain-finetune")
GRID_SAMPLES = 12  # samples shown per task in the grids
META_TRAIN_SPLIT = "train"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="[NAME=]PATH",
                        help="meta-trained run folders (their best checkpoint if the run scored its checkpoints, "
                             "run.select_tasks; else their latest) or checkpoint folders (either engine); "
                             "NAME defaults to meta.algorithm. "
                             "All must share one architecture; the first sets the pool, k and the pretraining budget")
    parser.add_argument("--pool", help="'glyphs' or a pool folder (default: the first checkpoint's data.pool)")
    parser.add_argument("--split", default="test", help="split of the held-out tasks (default: test)")
    parser.add_argument("--tasks", type=int, default=0, help="evaluate the first N tasks of the split; 0 = all (default)")
    parser.add_argument("--skip-tasks", type=int, default=0, metavar="N",
                        help="leave out the split's first N tasks, e.g. those a recipe was chosen on; --tasks then "
                             "counts from task N+1 (default: 0)")
    parser.add_argument("--shift", default="none", choices=SHIFTS,
                        help="draw every held-out image (shots, exam and reference sets) off the meta-train style: "
                             "blur (Gaussian, sigma 1 px; no meta-train image is blurred) or bold (3x3 max filter: bright "
                             "strokes 2 px wider than the pool draws them); the feature nets stay those of the unshifted "
                             "meta-train tasks (default: none)")
    parser.add_argument("--shots", type=int, help="k shots per task (default: the first checkpoint's data.shots)")
    parser.add_argument("--steps", type=int, default=10, help="S, the adaptation steps of the table (default: 10)")
    parser.add_argument("--curve-steps", default=",".join(map(str, CURVE_STEPS)),
                        help="comma-separated step counts of the KID curve; S is added (default: 0,1,2,5,10,20,50)")
    parser.add_argument("--samples", type=int, default=64, help="M samples per task (default: 64)")
    parser.add_argument("--ways", type=int, default=20,
                        help="N of recognizability's N-way episodes, chance 1/N; at most the number of tasks (default: 20)")
    parser.add_argument("--episodes", type=int, default=20, help="N-way episodes per task (default: 20)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: shots, noise and scratch inits (default: 3)")
    parser.add_argument("--rules", nargs="+", default=["meta"], metavar="RULE",
                        help="rules the checkpoints adapt with: meta (the checkpoint's own inner rule: SGD, Adam or "
                             "Meta-SGD's rates), sgd:LR, adam:LR[:BETA1] (BETA1 default 0.5) (default: meta)")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                        help="baselines to run (default: both; give none for none)")
    parser.add_argument("--baseline-rules", nargs="+", metavar="RULE",
                        help="rules the baselines adapt with, each its own row: sgd:LR, adam:LR[:BETA1] (default: the "
                             "first checkpoint's own inner rule, the rule its meta-learned init adapts with)")
    parser.add_argument("--pretrain-batch", type=int, default=baselines.PRETRAIN_BATCH,
                        help=f"images per pretraining step; the step count follows from the budget (default: {baselines.PRETRAIN_BATCH})")
    parser.add_argument("--kid-subsets", type=int, default=20, help="random subsets averaged per KID estimate (default: 20)")
    parser.add_argument("--feature-epochs", type=int, default=8, help="epochs of the cached feature net (default: 8)")
    parser.add_argument("--sample-median", type=int, metavar="R",
                        help="radius of the median filter every method's samples go through, 0 = none (default: "
                             "the first checkpoint's model.sample_median)")
    parser.add_argument("--g-average", type=float, metavar="BETA",
                        help="every method's samples come from the BETA-weighted average of G's iterates, 0 = the "
                             "last one (default: each checkpoint's meta.g_average; the baselines take the first's)")
    parser.add_argument("--grid-tasks", type=int, default=6, help="tasks shown in each method's sample grid (default: 6)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA if available (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (use 1-2 on a busy box)")
    parser.add_argument("--out", default="eval", help="output folder (default: eval)")
    args = parser.parse_args(argv)
    zero_allowed = ("tasks", "skip_tasks", "steps", "sample_median")
    for name in ("tasks", "skip_tasks", "steps", "seeds", "samples", "shots", "kid_subsets", "feature_epochs",
                 "grid_tasks", "pretrain_batch", "ways", "episodes", "sample_median"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in zero_allowed else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {0 if name in zero_allowed else 1}, got {value}")
    try:
        curve = {int(s) for s in args.curve_steps.split(",") if s.strip()}
    except ValueError:
        parser.error(f"--curve-steps must be comma-separated integers, got {args.curve_steps!r}")
    if any(s < 0 for s in curve):
        parser.error(f"--curve-steps must be >= 0, got {args.curve_steps!r}")
    check_g_average(parser, args.g_average)
    args.curve = sorted(curve | {args.steps})
    return args


def load_checkpoints(
    specs: list[str], device: torch.device, sample_median: int | None = None, g_average: float | None = None
) -> list[tuple[str, MetaLearnedGAN]]:
    """(name, model) per NAME=PATH or PATH; names must be unique and architectures identical.

    sample_median, g_average: the samples' median filter radius and G's iterate averaging for all of them
    (None: each checkpoint's own).
    """
    loaded = []
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        model = load_meta_learned(path, device, sample_median, g_average)
        loaded.append((name or model.name, model))
    names = [name for name, _ in loaded]
    if len(set(names)) < len(names) or set(names) & set(BASELINES):
        raise ValueError(f"checkpoint names must be unique and not a baseline's; got {names}: name them as NAME=PATH")
    first_name, first = loaded[0]
    for name, model in loaded[1:]:
        if (model.config.model, model.image_shape) != (first.config.model, first.image_shape):
            raise ValueError(
                f"checkpoint {model.folder} ({name}) has model {model.config.model} for {model.image_shape} images, "
                f"but {first.folder} ({first_name}) has {first.config.model} for {first.image_shape}: "
                f"compare inits of one architecture"
            )
    return loaded


def meta_train_images(pool: Pool) -> tuple[np.ndarray, np.ndarray]:
    """All images of the pool's meta-train tasks uint8 [N, C, H, W], and each image's task index [N]."""
    tasks = pool.load_tasks(META_TRAIN_SPLIT)
    labels = np.concatenate([np.full(len(images), i) for i, images in enumerate(tasks.values())])
    return np.concatenate(list(tasks.values())), labels


def build_methods(
    args: argparse.Namespace, loaded: list[tuple[str, MetaLearnedGAN]], pool: Pool, images: np.ndarray,
    labels: np.ndarray, device: torch.device,
) -> tuple[list[Method], dict | None]:
    """The rows of the comparison, and a record of how the pretraining baseline was made (None without it).

    images, labels: the meta-train images uint8 [N, C, H, W] that `pretrain-finetune` is pretrained
    on, and each one's task index [N].
    """
    _, reference = loaded[0]
    config, shape = reference.config, reference.image_shape
    rules = [parse_rule(spec) for spec in args.rules]
    baseline_rules = [parse_rule(spec) for spec in args.baseline_rules] if args.baseline_rules else [own_rule(config)]
    if any(rule.kind == "meta" for rule in baseline_rules):
        raise ValueError("--baseline-rules: baselines have no meta-learned inner rule; use sgd:LR or adam:LR")
    methods = []
    for name, model in loaded:
        for rule in rules:
            methods.append(Method(name, "meta-learned", model.learner, rule,
                                  init=lambda seed, m=model: (m.theta_g, m.theta_d),
                                  source=f"{model.folder} (step {model.step})", inner_lrs=model.inner_lrs))
    pretrain_record = None
    if "scratch" in args.baselines:
        for rule in baseline_rules:
            methods.append(Method("scratch", "baseline", reference.learner, rule,
                                  init=lambda seed: baselines.random_init(config, shape, seed),
                                  source="random init (seed = evaluation seed)"))
    if "pretrain-finetune" in args.baselines:
        budget = baselines.matched_budget(config, reference.run_steps, reference.ranks, args.pretrain_batch)
        start = time.perf_counter()
        theta_g, theta_d = baselines.random_init(config, shape, config.run.seed)
        pretrained = baselines.pretrain(
            reference.learner, theta_g.to(device), theta_d.to(device), images, budget,
            lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2), seed=config.run.seed, tasks=labels,
        )
        pretrain_record = {**budget.as_dict(), "lr": config.optim.lr, "betas": [config.optim.beta1, config.optim.beta2],
                           "matches": f"{reference.folder}: its run's {reference.run_steps} meta-steps x "
                                      f"{reference.ranks} rank(s) x {config.data.tasks_per_rank} tasks x "
                                      f"({config.meta.inner_steps} x {config.data.shots} + {config.data.queries}) real images",
                           "seconds": round(time.perf_counter() - start, 1)}
        for rule in baseline_rules:
            methods.append(Method("pretrain-finetune", "baseline", reference.learner, rule,
                                  init=lambda seed: pretrained,
                                  source=f"GAN pretrained on {pool.path} {META_TRAIN_SPLIT} split, {budget.steps} "
                                         f"Adam steps of {budget.batch} images"
                                         + (" of one task each (conditional)" if reference.learner.conditioned else "")))
    return methods, pretrain_record


def own_rule(config) -> Rule:
    """A checkpoint's inner rule as an explicit rule a baseline can use (Meta-SGD: SGD at its initial rate)."""
    meta = config.meta
    return Rule("adam", meta.inner_lr, meta.inner_beta1) if meta.inner_rule == "adam" else Rule("sgd", meta.inner_lr)


def run(args: argparse.Namespace) -> None:
    """Load, build the methods, evaluate, write JSON, markdown, plot and grids, print the table."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    loaded = load_checkpoints(args.checkpoints, device, args.sample_median, args.g_average)
    _, reference = loaded[0]
    pool = open_pool(args.pool or reference.config.data.pool)
    if tuple(pool.image_shape) != tuple(reference.image_shape):
        raise ValueError(f"pool {pool.path} holds {pool.image_shape} images but the checkpoints' models make "
                         f"{reference.image_shape} (C, H, W)")
    keys = pool.keys(args.split)
    if args.skip_tasks >= len(keys):
        raise ValueError(f"--skip-tasks {args.skip_tasks} leaves no task: split {args.split!r} of pool {pool.path} "
                         f"has {len(keys)}")
    keys = keys[args.skip_tasks:]
    keys = keys[: args.tasks] if args.tasks else keys
    ways = min(args.ways, len(keys))
    if ways < args.ways:
        print(f"note: {len(keys)} tasks: recognizability uses {ways}-way episodes instead of {args.ways}-way")
    plan = EvalPlan(tasks=shift_tasks(pool.load_tasks(args.split, keys), args.shift),
                    shots=args.shots or reference.config.data.shots, steps=args.curve, samples=args.samples,
                    seeds=list(range(args.seeds)), kid_subsets=args.kid_subsets, ways=ways, episodes=args.episodes)
    check_plan(plan)
    images, labels = meta_train_images(pool)
    spaces = load_or_train_feature_spaces(pool.path, images, labels, epochs=args.feature_epochs, device=device)
    methods, pretrain_record = build_methods(args, loaded, pool, images, labels, device)

    start = time.perf_counter()
    scores, references, grid_shots = evaluate(methods, plan, spaces, device, grid_step=args.steps,
                                              grid_tasks=args.grid_tasks)
    settings = {
        "pool": str(pool.path), "split": args.split, "shift": args.shift, "tasks": len(keys), "task_keys": keys,
        "shots": plan.shots, "steps": args.steps, "curve_steps": plan.steps, "samples": plan.samples,
        "seeds": plan.seeds, "ways": plan.ways, "episodes": plan.episodes, "kid_subsets": plan.kid_subsets,
        "feature_nets": {"recognition": {"path": str(pool.path / RECOGNITION_FILE),
                                         "heldout_accuracy": spaces.recognition.heldout_accuracy},
                         "distribution": {"path": str(pool.path / DISTRIBUTION_FILE),
                                          "heldout_accuracy": spaces.distribution.heldout_accuracy}},
        "pretrain": pretrain_record, "device": str(device), "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(), "evaluate_seconds": round(time.perf_counter() - start, 1),
    }
    report = build_report(methods, scores, references, args.steps, settings)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "results.md").write_text(table)
    plot_curves(report, out / "curves.png")
    for method in methods:
        save_grid(grid_shots, scores[method.label].grid[:, :GRID_SAMPLES], out / "grids" / f"{_slug(method.label)}.png")
    print(f"\n{table}\nwritten to {out}: results.json, results.md, curves.png, grids/ "
          f"({len(methods)} methods; evaluation {settings['evaluate_seconds']} s)")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: run(args))


if __name__ == "__main__":
    main()
