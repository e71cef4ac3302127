"""Meta-train a GAN over a pool of tasks: one process, or N ranks under torchrun or SLURM.

    python launch/train.py                                    # CPU quick-start on the embedded glyphs pool
    python launch/train.py --config launch/configs/gpu_dcgan.yaml run.steps=20000
    torchrun --nproc_per_node=8 launch/train.py --config launch/configs/gpu_mlp.yaml
    python launch/train.py --config launch/configs/cpu_latent.yaml   # heads on a frozen autoencoder of the pool

One meta-step: every rank draws T tasks and sums their meta-gradients (all T task copies adapted
at once); the sums are all-reduced and divided by the global task count; the outer optimizer then
steps identically on every rank. Rank 0 alone prints, logs, draws samples and writes checkpoints.
Re-running with the same run.out_dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import signal

# A stop signal that arrives while the modules below load (seconds) must not kill the rank with the
# default action: remember it; StopSignal takes it over, and set-up ends cleanly on every rank.
EARLY_SIGNALS: list[int] = []
for _signal in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_signal, lambda signum, frame: EARLY_SIGNALS.append(signum))

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metagan_dist import EpisodeBatch, MetaLearner, meta_gradients  # noqa: E402
from metagan_dist.autoencoder import AutoencoderWeights, pool_autoencoder  # noqa: E402
from metagan_dist.checkpoint import (  # noqa: E402
    CHECKPOINT_VERSION, CheckpointStore, load_trainer_state, save_file_atomic,
)
from metagan_dist.config import (  # noqa: E402
    TrainConfig, describe_options, incompatible_keys, load_config, save_config, to_dict,
)
from metagan_dist.data import Pool, TaskStream, ensure_glyphs_pool, images_to_tensor  # noqa: E402
from metagan_dist.distributed import (  # noqa: E402
    AgreedError, DistContext, StopSignal, agree, all_gather_objects, barrier, broadcast_, exit_code_of,
    init_distributed, shutdown, verify_replicas,
)
from metagan_dist.engine import (  # noqa: E402
    MetaParameters, agree_and_step, build_engine, fail_step, read_deepspeed_config,
)
from metagan_dist.evaluation.selection import CheckpointScorer  # noqa: E402
from metagan_dist.memory import keep_freed_memory  # noqa: E402
from metagan_dist.models import frozen_parts, install_autoencoder  # noqa: E402
from metagan_dist.monitor import GradientLog, Monitor, logger, setup_logging  # noqa: E402
from metagan_dist.sampling import adapt_and_generate, save_grid  # noqa: E402

SAMPLES_PER_TASK = 8
SLOW_CHECKPOINT_S = 15  # warn: a stop must checkpoint within the launcher's SIGTERM-to-SIGKILL window


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


@dataclass
class SetUp:
    """What set-up prepares on each rank with local work only, before any collective."""

    pool: Pool
    stream: TaskStream
    sample_tasks: dict[str, np.ndarray] = field(default_factory=dict)  # rank 0: tasks of the sample grids
    sample_split: str = "test"
    resume: dict | None = None  # the latest checkpoint's trainer state
    latest: Path | None = None
    ds_config: dict | None = None
    autoencoder: AutoencoderWeights | None = None  # rank 0, model.arch=latent: the frozen image prior


def set_up(cfg: TrainConfig, ctx: DistContext, store: CheckpointStore) -> SetUp:
    """Open the pool and this rank's task stream (checksums of its share of shards), load the sample
    tasks (rank 0), read the DeepSpeed JSON and the checkpoint to resume from, and check them."""
    pool = Pool(ensure_glyphs_pool() if cfg.data.pool == "glyphs" else cfg.data.pool)
    tasks_per_rank = cfg.data.tasks_per_rank
    stream = TaskStream(
        pool, "train", shots=cfg.data.shots, queries=cfg.data.queries, tasks_per_batch=tasks_per_rank,
        episodes_per_epoch=tasks_per_rank * cfg.data.batches_per_epoch, seed=cfg.run.seed, rank=ctx.rank,
        world_size=ctx.world_size, num_workers=cfg.data.workers, skip_corrupt=cfg.data.skip_corrupt,
        on_short_task=cfg.data.short_tasks,
    )
    setup = SetUp(pool, stream)
    if ctx.is_main:
        setup.sample_split = "test" if "test" in pool.manifest.splits else "train"
        if setup.sample_split == "train":
            logger.warning("pool %s has no 'test' split: the sample grids show %d meta-TRAINING tasks, not held-out "
                           "ones", pool.path, cfg.data.sample_tasks)
        keys = pool.keys(setup.sample_split)[: cfg.data.sample_tasks]
        setup.sample_tasks = pool.load_tasks(setup.sample_split, keys)
    if cfg.engine.name == "deepspeed":
        setup.ds_config = read_deepspeed_config(cfg.engine.deepspeed_config, cfg.optim)
    if (latest := store.latest()) is not None:
        state = load_trainer_state(latest, resume=True)
        different = incompatible_keys(state["config"], to_dict(cfg))
        if different:
            raise ValueError(f"{store.dir.parent} holds a run with another config; differing keys: "
                             f"{', '.join(different)}. Use a new run.out_dir, or the saved values "
                             f"(see {store.dir.parent / 'config.yaml'}).")
        if len(state["ranks"]) != ctx.world_size:
            raise ValueError(f"{latest} was written by {len(state['ranks'])} ranks; this run has {ctx.world_size}")
        setup.resume, setup.latest = state, latest
    if cfg.model.arch == "latent" and ctx.is_main:  # a resumed run keeps the autoencoder it started with
        setup.autoencoder = (AutoencoderWeights.from_dict(setup.resume.get("autoencoder"), str(latest / "trainer.pt"))
                             if setup.resume else pool_autoencoder(pool, cfg.model.code_dim,
                                                                   cfg.model.autoencoder_epochs, ctx.device))
    return setup


def share_autoencoder(nets: tuple[torch.nn.Module, ...], weights: AutoencoderWeights | None) -> None:
    """Install rank 0's autoencoder (`weights`, None elsewhere) into the frozen parts of every rank's nets."""
    if weights is not None:
        install_autoencoder(nets, weights)
    for part in frozen_parts(*nets):
        for buffer in part.buffers():
            broadcast_(buffer)
        part.loaded = True


def agree_on_set_up(what: str, step: Callable[[], Any], stop: StopSignal,
                    share: Callable[[Any], object] = lambda result: None) -> tuple[Any, list[object], str | None]:
    """Run a local set-up step on every rank, then agree in one all-gather: any rank's error is
    raised on every rank (AgreedError), and a stop signal on any rank is reported to all.

    Returns (this rank's result, every rank's `share(result)`, and "SIGTERM on rank 1" if some rank
    was asked to stop, else None).
    """
    result, error = None, None
    try:
        result = step()
    except Exception as err:  # noqa: BLE001  (agreed below, then raised on every rank)
        error = err
        if exit_code_of(err) != 2:  # not bad input but a bug: keep its traceback in this rank's log
            logger.exception("set-up failed")
    payloads = agree(what, error, payload=(None if error else share(result), stop.name if stop.requested else None))
    stops = [f"{name} on rank {rank}" for rank, (_, name) in enumerate(payloads) if name]
    return result, [shared for shared, _ in payloads], stops[0] if stops else None


def endless(stream: TaskStream):
    """One epoch after another, forever."""
    while True:
        yield from stream


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stop = StopSignal(EARLY_SIGNALS[0] if EARLY_SIGNALS else None)
    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(cfg.run.device)
    setup_logging(ctx.rank)
    torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    if ctx.device.type == "cpu" and keep_freed_memory():
        logger.info("CPU: freed memory stays in this process (glibc malloc, no mmap or trim), so meta-steps do "
                    "not page-fault their buffers back in")
    out_dir = Path(cfg.run.out_dir)
    tasks_per_rank, steps_per_task = cfg.data.tasks_per_rank, cfg.meta.inner_steps
    store = CheckpointStore(out_dir, cfg.run.keep_checkpoints)

    # ---- set-up, local work first (pool, task stream, checksums, checkpoint): agreed before any
    # other collective, so a problem or a stop signal on any rank ends every rank alike ----
    setup, damaged, stopping = agree_on_set_up("to set up", lambda: set_up(cfg, ctx, store), stop,
                                               share=lambda done: done.stream.dropped)
    if stopping:
        return stopped_during_set_up(stopping, ctx, store)
    pool, stream = setup.pool, setup.stream
    for dropped in damaged:  # shards any rank found damaged (data.skip_corrupt): left out on every rank
        stream.drop_shards(dropped)

    # ---- model: meta-parameters as flat buffers, identical on every rank (same seed; checked below) ----
    torch.manual_seed(cfg.run.seed)
    G, D = cfg.model.build(pool.image_shape)
    G, D = G.to(ctx.device), D.to(ctx.device)
    share_autoencoder((G, D), setup.autoencoder)
    learner = MetaLearner(G, D, cfg.meta)
    params = MetaParameters(
        learner.G.flat_parameters(), learner.D.flat_parameters(),
        inner_lr=cfg.meta.inner_lr if cfg.meta.algorithm == "metasgd" else None,
    ).to(ctx.device)
    engine = build_engine(params, cfg.engine.name, cfg.optim, ctx, total_steps=cfg.run.steps,
                          bucket_mb=cfg.engine.bucket_mb, ds_config=setup.ds_config)
    noise = torch.Generator().manual_seed(rank_seed(cfg.run.seed, ctx.rank, purpose=1))
    # Rank 0 scores every checkpoint (run.select_tasks); the feature nets train here on first use.
    scorer, _, stopping = agree_on_set_up("to score checkpoints", lambda: CheckpointScorer(
        pool, learner, cfg.run.select_tasks, cfg.run.sample_shots, cfg.run.sample_steps, ctx.device)
        if ctx.is_main and cfg.run.select_tasks else None, stop)
    if stopping:
        return stopped_during_set_up(stopping, ctx, store)

    # ---- resume from the run folder's latest checkpoint, if it has one ----
    step, skipped, clipped, start_time = 0, 0, 0, time.perf_counter()

    def resume() -> None:
        engine.load(setup.latest)
        mine = setup.resume["ranks"][ctx.rank]
        stream.load_state_dict(mine["stream"])
        restore_rng_states(mine["rng"], noise)

    if setup.resume is not None:
        _, _, stopping = agree_on_set_up("to resume", resume, stop)
        step, skipped = setup.resume["step"], setup.resume["skipped_steps"]
        clipped = setup.resume["clipped_steps"]
        logger.info("resumed from %s at step %d", setup.latest, step)
        if cfg.optim.schedule != "constant" and (before := setup.resume["config"]["run"]["steps"]) != cfg.run.steps:
            logger.warning("run.steps changed from %d to %d: the %s learning-rate schedule now ends at step %d",
                           before, cfg.run.steps, cfg.optim.schedule, cfg.run.steps)
        if stopping:
            return stopped_during_set_up(stopping, ctx, store)
    if ctx.is_main:  # only now: a refused resume must leave the run's own config.yaml as it was
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    sample_shots = sample_inputs = None
    if ctx.is_main:
        test_tasks = setup.sample_tasks
        k, z = cfg.run.sample_shots, cfg.model.z_dim  # meta-test k and S may differ from meta-training's
        sample_shots = images_to_tensor(np.stack([t[:k] for t in test_tasks.values()])).to(ctx.device)
        fixed = torch.Generator().manual_seed(rank_seed(cfg.run.seed, 0, purpose=2))
        n = sample_shots.shape[0]
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
        started = time.perf_counter()
        ranks = all_gather_objects({"stream": stream.state_dict(), "rng": rng_states(noise)})
        if ctx.is_main:
            store.begin(at)
        barrier()
        folder = store.staging(at)
        engine.save(folder, ctx.is_main)
        if ctx.is_main:
            save_file_atomic({"version": CHECKPOINT_VERSION, "step": at, "config": to_dict(cfg), "ranks": ranks,
                              "image_shape": list(pool.image_shape), "skipped_steps": skipped,
                              "clipped_steps": gradients.clipped_steps,
                              **({"autoencoder": setup.autoencoder.as_dict()} if setup.autoencoder else {})},
                             folder / "trainer.pt")
        barrier()
        if ctx.is_main:
            monitor.write(f"checkpoint: {store.publish(at)}")
        barrier()
        if (seconds := time.perf_counter() - started) > SLOW_CHECKPOINT_S:
            logger.warning("checkpoint took %.0f s: after SIGTERM, torchrun kills ranks that have not exited within "
                           "its shutdown timeout (30 s unless --shutdown-timeout or TORCH_ELASTIC_SHUTDOWN_TIMEOUT "
                           "says otherwise; launch/slurm/train.sbatch widens it)", seconds)

    def score_checkpoint(at: int) -> None:
        """Rank 0: score the checkpoint of step `at`; BEST names it if it beats every earlier one."""
        score = scorer(params.generator, params.discriminator, params.inner_lrs())
        monitor.log(at, {"select_recognizability": score})
        best = store.best()
        if math.isfinite(score) and (best is None or score > best[1]):
            store.mark_best(at, score)
            monitor.write(f"best checkpoint so far: step {at}, recognizability {score:.3f} ({scorer.description})")

    verify_replicas(params.flat(), step)
    gradients = GradientLog(clipped)
    monitor = Monitor(out_dir, cfg.run.steps, step, enabled=ctx.is_main)
    monitor.write(f"run folder {out_dir.resolve()}: {ctx.world_size} rank(s) x {tasks_per_rank} tasks per step, "
                  f"{cfg.data.workers} loader worker(s) per rank, {cfg.meta.algorithm}, {cfg.engine.name} engine, "
                  f"pool {pool.path} ({len(stream.usable)} tasks)")
    if ctx.is_main and step == 0:
        write_samples(0)

    # ---- the loop ----
    consecutive_skips, stopped_early = 0, False
    batches = endless(stream)
    tick = time.perf_counter()
    while step < cfg.run.steps:
        try:
            task_batch = next(batches)
        except Exception as err:  # noqa: BLE001  e.g. a shard damaged mid-run: every rank stops with this message
            fail_step(err, ctx.device)
        batch = EpisodeBatch.sample(task_batch.support, task_batch.query, steps_per_task, cfg.model.z_dim,
                                    generator=noise).to(ctx.device, non_blocking=True)
        grads = meta_gradients(G, D, batch, cfg.meta, params=(params.generator, params.discriminator),
                               inner_lrs=params.inner_lrs(), reduction="sum")
        outcome = agree_and_step(engine, grads, stop.requested, ctx.device)
        step += 1
        gradients.record(outcome.grad_norm, outcome.clipped, outcome.lr)
        if not outcome.applied:
            skipped += 1
            consecutive_skips += 1
            logger.warning("step %d skipped on every rank: non-finite meta-gradient or loss (%d skipped so far)",
                           step, skipped)
            if consecutive_skips > cfg.run.max_skipped_steps:
                raise AgreedError(f"{consecutive_skips} consecutive meta-steps had non-finite meta-gradients or "
                                  f"losses (run.max_skipped_steps={cfg.run.max_skipped_steps}); lower optim.lr or "
                                  f"meta.inner_lr (last good checkpoint: {store.latest()})", 1)
        else:
            consecutive_skips = 0

        now = time.perf_counter()
        tasks_per_s, tick = outcome.tasks / (now - tick), now
        monitor.advance(step, tasks_per_s, outcome.loss_g, outcome.loss_d)
        if step % cfg.run.log_every == 0:
            values = {"loss_g": outcome.loss_g, "loss_d": outcome.loss_d, "tasks_per_s": tasks_per_s,
                      "skipped_steps": skipped, "epoch": task_batch.epoch, **gradients.values()}
            if params.generator_lr is not None:
                values["inner_lr_g_mean"] = params.generator_lr.mean().item()
                values["inner_lr_d_mean"] = params.discriminator_lr.mean().item()
            monitor.log(step, values)
        if step % cfg.run.check_every == 0:
            verify_replicas(params.flat(), step)
        finished = step == cfg.run.steps
        # A stop checkpoints first and draws no samples: it must fit the launcher's kill window.
        if step % cfg.run.checkpoint_every == 0 or finished or outcome.stop:
            save_checkpoint(step)
            if scorer is not None and not outcome.stop:
                score_checkpoint(step)
        if ctx.is_main and not outcome.stop and (step % cfg.run.sample_every == 0 or finished):
            write_samples(step)
        if outcome.stop:
            stopped_early = True
            monitor.write(f"stop signal received: checkpointed at step {step}, exiting")
            break

    digest = verify_replicas(params.flat(), step)
    minutes = (time.perf_counter() - start_time) / 60
    monitor.close()
    if ctx.is_main:
        print(f"\n{'stopped' if stopped_early else 'finished'} at step {step}/{cfg.run.steps} in {minutes:.1f} min "
              f"({skipped} skipped steps)\n"
              f"  meta-parameters identical on {ctx.world_size} rank(s): sha256 {digest[:16]}\n"
              f"  samples:     {out_dir / 'samples'}\n  metrics:     {out_dir / 'metrics.jsonl'}\n"
              f"  tensorboard: {out_dir / 'tensorboard'}\n  checkpoint:  {store.latest()}", flush=True)
        if (best := store.best()) is not None:
            print(f"  best:        {best[0]} (recognizability {best[1]:.3f} on meta-train tasks; adapt.py and "
                  f"evaluate.py read it from the run folder)", flush=True)
    shutdown()


def stopped_during_set_up(signal_and_rank: str, ctx: DistContext, store: CheckpointStore) -> None:
    """Every rank ends cleanly when any rank got a stop signal during set-up: nothing new to save."""
    if ctx.is_main:
        print(f"stopped by a signal during set-up ({signal_and_rank}), before any meta-step: nothing new to save; "
              f"the latest checkpoint is {store.latest()}", flush=True)
    shutdown()


def leave_now(status: int) -> None:
    """End this rank with `status` at once, without the interpreter's teardown (logs and output flushed first)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run(argv: list[str] | None = None) -> int:
    """main() with bad input and agreed errors as one line on stderr; returns the exit status."""
    try:
        main(argv)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            # Done and the process group destroyed: in the teardown, a rank once died of "terminate called
            # without an active exception" (SIGABRT, a C++ thread destroyed unjoined) after a complete run,
            # and torchrun then failed the whole job.
            leave_now(0)
        return 0
    except AgreedError as err:  # every rank raises it alike: one clear line each, the same exit status
        failure = (str(err), err.exit_code)
    except (ValueError, OSError, ImportError) as err:  # bad config or data, found alike on every rank
        failure = (str(err), 2)
    # Written outside the except block: main()'s frame, and so its progress bar, is gone by now, and the
    # error stays the last line. One write: other ranks' lines in the same pipe cannot split it.
    sys.stderr.write(f"error: {failure[0]}\n")
    sys.stderr.flush()
    if torch.distributed.is_initialized():
        # Every rank got here together. Leave at once: torchrun terminates the other ranks as soon as it
        # sees one exit, and a rank still in interpreter shutdown (default signal handlers by then)
        # would die of that SIGTERM instead of exiting with this status.
        leave_now(failure[1])
    return failure[1]


if __name__ == "__main__":
    sys.exit(run())
