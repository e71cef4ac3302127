"""Adapt a meta-trained GAN to a new task from k images and draw samples.

    python launch/adapt.py runs/quickstart --images my_letters/ --shots 5 --steps 10
    python launch/adapt.py runs/quickstart --task <key> --pool glyphs        # a meta-test task of a pool
    metagan-adapt runs/quickstart/checkpoints/step-00000600 --images x/ --rule adam:0.001 --save-weights

Writes OUT/grid.png (the k shots, then the samples, in one row) and with --save-weights
OUT/adapted.pt: a dict with the adapted flat parameters "generator" [P_G] and "discriminator"
[P_D], the shots it adapted on ("support" [k, C, H, W] in [-1, 1]: a support-conditioned G needs
them to sample), the checkpoint's "config", "image_shape" and how they were adapted. To sample:
`load_meta_learned(checkpoint).learner.sample(w["generator"][None], z[None], w["support"][None])`
with z [n, z_dim].
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from metagan_dist.checkpoint import save_file_atomic
from metagan_dist.config import to_dict
from metagan_dist.data import images_to_tensor
from metagan_dist.evaluation.checkpoint_model import load_meta_learned
from metagan_dist.evaluation.cli_support import DEVICES, check_g_average, open_pool, pick_device, run_command
from metagan_dist.evaluation.rules import parse_rule, start_adaptation
from metagan_dist.evaluation.shots import shots_from_folder, shots_from_pool
from metagan_dist.sampling import save_grid


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run folder (its best checkpoint if the run scored its "
                        "checkpoints, run.select_tasks; else its latest) or a checkpoint folder, either engine")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="FOLDER",
                        help="folder of the new task's images (png/jpg/bmp...); the first k readable ones in name order")
    source.add_argument("--task", metavar="KEY", help="a task of a pool (see --pool, --split); its first k images")
    parser.add_argument("--pool", help="pool of --task: 'glyphs' or a pool folder (default: the checkpoint's data.pool)")
    parser.add_argument("--split", default="test", help="split of --task (default: test, the meta-test tasks)")
    parser.add_argument("--shots", type=int, help="k, the images to adapt on (default: the checkpoint's data.shots)")
    parser.add_argument("--steps", type=int, default=10, help="S adaptation steps, each a G step then a D step (default: 10)")
    parser.add_argument("--rule", default="meta",
                        help="meta: the checkpoint's own inner rule (SGD or Adam at meta.inner_lr, or Meta-SGD's "
                             "learned rates); sgd:LR, or adam:LR[:BETA1] (β1 default 0.5, β2 0.999) (default: meta)")
    parser.add_argument("--samples", type=int, default=16, help="samples to draw after adapting (default: 16)")
    parser.add_argument("--sample-median", type=int, metavar="R",
                        help="radius of the median filter the samples go through, 0 = none (default: the "
                             "checkpoint's model.sample_median)")
    parser.add_argument("--g-average", type=float, metavar="BETA",
                        help="the samples come from the BETA-weighted average of G's iterates, 0 = the last one "
                             "(default: the checkpoint's meta.g_average)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adaptation and sample noise (default: 0)")
    parser.add_argument("--resize", action="store_true",
                        help="convert and resize images of another size or channel count to the model's (Lanczos); "
                             "without it such images are an error")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA if available (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--out", help="output folder (default: adapted/<task or folder name>)")
    parser.add_argument("--save-weights", action="store_true", help="also write OUT/adapted.pt, the adapted G and D")
    args = parser.parse_args(argv)
    for name in ("shots", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.steps < 0:
        parser.error(f"--steps must be >= 0, got {args.steps}")
    if args.sample_median is not None and args.sample_median < 0:
        parser.error(f"--sample-median must be >= 0 (0 = no filter), got {args.sample_median}")
    check_g_average(parser, args.g_average)
    if args.images is not None and args.pool is not None:
        parser.error("--pool applies to --task, not to --images")
    return args


def adapt(args: argparse.Namespace) -> None:
    """Load, adapt with progress, write the grid (and weights), print what was written where."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rule = parse_rule(args.rule)
    model = load_meta_learned(args.checkpoint, device, args.sample_median, args.g_average)
    k = args.shots or model.config.data.shots
    if args.images is not None:
        shots = shots_from_folder(args.images, k, model.image_shape, args.resize)
        name = Path(args.images).resolve().name
    else:
        pool = open_pool(args.pool or model.config.data.pool)
        shots = shots_from_pool(pool, args.split, args.task, k, model.image_shape, args.resize)
        name = args.task
    for note in shots.notes:
        print(note)

    support = images_to_tensor(shots.images)[None].to(device)  # [1, k, C, H, W]
    noise = torch.Generator().manual_seed(args.seed)
    z_dim = model.config.model.z_dim
    inner_noise = torch.randn(args.steps, 1, k, z_dim, generator=noise).to(device)
    inner_mix = torch.rand(args.steps, 1, k, generator=noise).to(device)
    sample_noise = torch.randn(1, args.samples, z_dim, generator=noise).to(device)

    adaptation = start_adaptation(model.learner, rule, model.theta_g, model.theta_d, 1, model.inner_lrs)
    for step in tqdm(range(args.steps), desc=f"adapt ({rule})", unit="step"):
        adaptation.advance(support, inner_noise[step : step + 1], inner_mix[step : step + 1])
    with torch.no_grad():
        samples = model.learner.sample(adaptation.generator, sample_noise, support)
    if not (torch.isfinite(adaptation.generator).all() and torch.isfinite(samples).all()):
        raise ValueError(f"the adaptation diverged: non-finite generator weights or samples after {args.steps} steps "
                         f"with rule {rule}; nothing written (try a smaller rate)")

    out = Path(args.out or Path("adapted") / name)
    grid = out / "grid.png"
    save_grid(support, samples, grid)
    written = [f"  grid:    {grid} (row: {k} shots, then {args.samples} samples)"]
    if args.save_weights:
        weights = out / "adapted.pt"
        save_file_atomic({
            "generator": adaptation.generator[0].cpu(), "discriminator": adaptation.discriminator[0].cpu(),
            "support": support[0].cpu(),
            "image_shape": list(model.image_shape), "config": to_dict(model.config),
            "checkpoint": str(model.folder), "checkpoint_step": model.step, "shots": shots.sources,
            "steps": args.steps, "rule": str(rule), "seed": args.seed,
        }, weights)
        written.append(f"  weights: {weights} (adapted flat G [{model.theta_g.numel()}] and D [{model.theta_d.numel()}])")
    print(f"adapted {model.name} checkpoint {model.folder} (step {model.step}) to {name}: "
          f"{k} shots, {args.steps} steps, rule {rule}, on {device}\n" + "\n".join(written))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_command(lambda: adapt(args))


if __name__ == "__main__":
    main()
