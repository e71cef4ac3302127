"""Meta-train a GAN over a pool of tasks: one process, or N ranks under torchrun or SLURM.

    python launch/train.py                                    # CPU quick-start on the embedded glyphs pool
    python launch/train.py --config launch/configs/gpu_dcgan.yaml run.steps=20000
    torchrun --nproc_per_node=8 launch/train.py --config launch/configs/gpu_mlp.yaml

One meta-step: every rank draws T tasks and sums their meta-gradients (all T task copies adapted
at once); the sums are all-reduced and divided by the global task count; the outer optimizer then
steps identically on every rank. Rank 0 alone prints, logs, draws samples and writes checkpoints.
Re-running with the same run.out_dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metagan_dist import EpisodeBatch, MetaLearner, meta_gradients
from metagan_dist.checkpoint import CHECKPOINT_VERSION, CheckpointStore, load_trainer_state, save_file_atomic
from metagan_dist.config import describe_options, incompatible_keys, load_config, save_config, to_dict
from metagan_dist.data import Pool, TaskStream, ensure_glyphs_pool, images_to_tensor
from metagan_dist.distributed import (
    StopSignal, all_gather_objects, barrier, init_distributed, raise_if_any_rank_failed, shutdown, verify_replicas,
)
from metagan_dist.engine import MetaParameters, agree_and_step, build_engine
from metagan_dist.monitor import Monitor, logger, setup_logging
from metagan_dist.sampling import adapt_and_generate, save_grid

SAMPLES_PER_TASK = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="options, set in a YAML file or as key=value on the command line:\n" + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of options (see launch/configs/); key=value overrides win")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. meta.algorithm=reptile run.steps=100")
    return parser.parse_args(argv)


def rank_seed(seed: int, rank: int, purpose: int) -> int:
    """Independent, reproducible seeds per (run seed, rank, purpose)."""
    return int(np.random.SeedSequence([seed, rank, purpose]).generate_state(1)[0])


def rng_states(noise: torch.Generator) -> dict:
    """This rank's random states: our noise generator and the global ones libraries may use."""
    states = {"noise": noise.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, noise: torch.Generator) -> None:
    noise.set_state(states["noise"])
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def endless(stream: TaskStream):
    """One epoch after another, forever."""
    while True:
        yield from stream


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(cfg.run.device)
    setup_logging(ctx.rank)
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    out_dir = Path(cfg.run.out_dir)

    # ---- data: the task pool, this rank's stream of episodes, fixed meta-test tasks for samples ----
    pool = Pool(ensure_glyphs_pool() if cfg.data.pool == "glyphs" else cfg.data.pool)
    tasks_per_rank, steps_per_task = cfg.data.tasks_per_rank, cfg.meta.inner_steps
    stream, error = None, None
    try:  # each rank checks its own shards' checksums: agree before anyone enters a collective
        stream = TaskStream(
            pool, "train", shots=cfg.data.shots, queries=cfg.data.queries, tasks_per_batch=tasks_per_rank,
            episodes_per_epoch=tasks_per_rank * cfg.data.batches_per_epoch, seed=cfg.run.seed, rank=ctx.rank,
            world_size=ctx.world_size, num_workers=cfg.data.workers, skip_corrupt=cfg.data.skip_corrupt,
            on_short_task=cfg.data.short_tasks,
        )
    except ValueError as err:
        error = err
    raise_if_any_rank_failed(error, "to open its task stream")

    # ---- model: meta-parameters as flat buffers, identical on every rank (same seed; checked below) ----
    torch.manual_seed(cfg.run.seed)
    G, D = cfg.model.build(pool.image_shape)
    G, D = G.to(ctx.device), D.to(ctx.device)
    learner = MetaLearner(G, D, cfg.meta)
    params = MetaParameters(
        learner.G.flat_parameters(), learner.D.flat_parameters(),
        inner_lr=cfg.meta.inner_lr if cfg.meta.algorithm == "metasgd" else None,
    ).to(ctx.device)
    engine = build_engine(params, cfg.engine.name, cfg.optim, ctx, cfg.engine.deepspeed_config, cfg.engine.bucket_mb)
    noise = torch.Generator().manual_seed(rank_seed(cfg.run.seed, ctx.rank, purpose=1))

    # ---- resume from the run folder's latest checkpoint, if it has one ----
    store = CheckpointStore(out_dir, cfg.run.keep_checkpoints)
    step, skipped, start_time = 0, 0, time.perf_counter()
    if (latest := store.latest()) is not None:
        state = load_trainer_state(latest)
        different = incompatible_keys(state["config"], to_dict(cfg))
        if different:
            raise ValueError(f"{out_dir} holds a run with another config; differing keys: {', '.join(different)}. "
                             f"Use a new run.out_dir, or the saved values (see {out_dir / 'config.yaml'}).")
        if len(state["ranks"]) != ctx.world_size:
            raise ValueError(f"{latest} was written by {len(state['ranks'])} ranks; this run has {ctx.world_size}")
        engine.load(latest)
        mine = state["ranks"][ctx.rank]
        stream.load_state_dict(mine["stream"])
        restore_rng_states(mine["rng"], noise)
        step, skipped = state["step"], state["skipped_steps"]
        logger.info("resumed from %s at step %d", latest, step)
    if ctx.is_main:  # only now: a refused resume must leave the run's own config.yaml as it was
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    sample_shots = sample_inputs = None
    if ctx.is_main:
        test_tasks = pool.load_tasks("test", pool.keys("test")[: cfg.data.sample_tasks])
        sample_shots = images_to_tensor(np.stack([t[: cfg.data.shots] for t in test_tasks.values()])).to(ctx.device)
        fixed = torch.Generator().manual_seed(rank_seed(cfg.run.seed, 0, purpose=2))
        n, k, z = sample_shots.shape[0], cfg.data.shots, cfg.model.z_dim
        sample_inputs = [t.to(ctx.device) for t in (
            torch.randn(cfg.run.sample_steps, n, k, z, generator=fixed),
            torch.rand(cfg.run.sample_steps, n, k, generator=fixed),
            torch.randn(n, SAMPLES_PER_TASK, z, generator=fixed),
        )]

    def write_samples(at: int) -> Path:
        path = out_dir / "samples" / f"step-{at:08d}.png"
        images = adapt_and_generate(learner, params.generator, params.discriminator, sample_shots, *sample_inputs,
                                    inner_lrs=params.inner_lrs())
        save_grid(sample_shots, images, path)
        return path

    def save_checkpoint(at: int) -> None:
        ranks = all_gather_objects({"stream": stream.state_dict(), "rng": rng_states(noise)})
        if ctx.is_main:
            store.begin(at)
        barrier()
        folder = store.staging(at)
        engine.save(folder, ctx.is_main)
        if ctx.is_main:
            save_file_atomic({"version": CHECKPOINT_VERSION, "step": at, "config": to_dict(cfg), "ranks": ranks,
                              "image_shape": list(pool.image_shape), "skipped_steps": skipped},
                             folder / "trainer.pt")
        barrier()
        if ctx.is_main:
            monitor.write(f"checkpoint: {store.publish(at)}")
        barrier()

    verify_replicas(params.flat(), step)
    monitor = Monitor(out_dir, cfg.run.steps, step, enabled=ctx.is_main)
    monitor.write(f"run folder {out_dir.resolve()}: {ctx.world_size} rank(s) x {tasks_per_rank} tasks per step, "
                  f"{cfg.meta.algorithm}, pool {pool.path}")
    if ctx.is_main and step == 0:
        write_samples(0)

    # ---- the loop ----
    stop, consecutive_skips, stopped_early = StopSignal(), 0, False
    batches = endless(stream)
    tick = time.perf_counter()
    while step < cfg.run.steps:
        task_batch = next(batches)
        batch = EpisodeBatch.sample(task_batch.support, task_batch.query, steps_per_task, cfg.model.z_dim,
                                    generator=noise).to(ctx.device, non_blocking=True)
        grads = meta_gradients(G, D, batch, cfg.meta, params=(params.generator, params.discriminator),
                               inner_lrs=params.inner_lrs(), reduction="sum")
        outcome = agree_and_step(engine, grads, stop.requested, ctx.device)
        step += 1
        if not outcome.applied:
            skipped += 1
            consecutive_skips += 1
            logger.warning("step %d skipped on every rank: non-finite meta-gradient or loss (%d skipped so far)",
                           step, skipped)
            if consecutive_skips > cfg.run.max_skipped_steps:
                raise RuntimeError(f"{consecutive_skips} consecutive meta-steps had non-finite meta-gradients; "
                                   f"lower optim.lr or meta.inner_lr (last good checkpoint: {store.latest()})")
        else:
            consecutive_skips = 0

        now = time.perf_counter()
        tasks_per_s, tick = outcome.tasks / (now - tick), now
        monitor.advance(step, tasks_per_s, outcome.loss_g, outcome.loss_d)
        if step % cfg.run.log_every == 0:
            values = {"loss_g": outcome.loss_g, "loss_d": outcome.loss_d, "tasks_per_s": tasks_per_s,
                      "skipped_steps": skipped, "epoch": task_batch.epoch}
            if outcome.gradient is not None:
                values["meta_grad_norm"] = outcome.gradient.norm().item()
            if params.generator_lr is not None:
                values["inner_lr_g_mean"] = params.generator_lr.mean().item()
                values["inner_lr_d_mean"] = params.discriminator_lr.mean().item()
            monitor.log(step, values)
        if step % cfg.run.check_every == 0:
            verify_replicas(params.flat(), step)
        done = step == cfg.run.steps or outcome.stop
        if ctx.is_main and (step % cfg.run.sample_every == 0 or done):
            write_samples(step)
        if step % cfg.run.checkpoint_every == 0 or done:
            save_checkpoint(step)
        if outcome.stop:
            stopped_early = True
            monitor.write(f"stop signal received: checkpointed at step {step}, exiting")
            break

    verify_replicas(params.flat(), step)
    minutes = (time.perf_counter() - start_time) / 60
    monitor.close()
    if ctx.is_main:
        print(f"\n{'stopped' if stopped_early else 'finished'} at step {step}/{cfg.run.steps} in {minutes:.1f} min "
              f"({skipped} skipped steps)\n"
              f"  samples:     {out_dir / 'samples'}\n  metrics:     {out_dir / 'metrics.jsonl'}\n"
              f"  tensorboard: {out_dir / 'tensorboard'}\n  checkpoint:  {store.latest()}", flush=True)
    shutdown()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad config or data: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
