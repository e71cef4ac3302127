"""launch/train.py end to end: config errors, outputs, bit-exact resume, signals, crashes, DeepSpeed."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from metagan_dist.config import TrainConfig, load_config
from train_utils import (
    REPO, TRAIN, fault_env, finish, latest_step, make_tiny_pool, meta_parameters, send, tiny_run_args, torchrun,
    train, wait_for_checkpoint, worker_pid,
)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_tiny_pool(tmp_path_factory.mktemp("pool") / "tiny")


def every_key():
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(section.default_factory()):
            yield f"{section.name}.{f.name}"


def test_help_documents_every_option():
    result = train(["--help"])
    assert result.returncode == 0
    for key in every_key():
        assert key in result.stdout, key


@pytest.mark.parametrize(
    "override,message",
    [("meta.inner_stepz=2", "unknown config key 'meta.inner_stepz'"),
     ("run.steps=many", "bad value for config key 'run.steps'"),
     ("meta.loss=lsgan", "unknown meta.loss 'lsgan'"),
     ("engine.name=jax", "unknown engine.name 'jax'")],
)
def test_bad_configuration_is_one_clear_error(override, message, tmp_path):
    result = train([override, f"run.out_dir={tmp_path}"])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "launch" / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        assert isinstance(load_config(path), TrainConfig)


def test_missing_pool_is_one_clear_error(tmp_path):
    result = train(tiny_run_args(tmp_path / "nowhere", tmp_path / "run", 2))
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


def test_run_writes_its_outputs(pool, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_run_args(pool, out, 4, **{"run.sample_every": 2, "run.checkpoint_every": 2}))
    assert result.returncode == 0, result.stderr
    assert "finished at step 4/4" in result.stdout
    assert (out / "config.yaml").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert {"loss_g", "loss_d", "tasks_per_s", "meta_grad_norm"} <= lines[0].keys()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "step-00000000.png", "step-00000002.png", "step-00000004.png"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_step(out) == 4


@pytest.mark.parametrize("algorithm,workers", [("maml", 0), ("metasgd", 1), ("reptile", 0)])
def test_interrupted_and_resumed_run_is_bit_identical(pool, tmp_path, algorithm, workers):
    args = {"meta.algorithm": algorithm, "data.workers": workers, "run.checkpoint_every": 3}
    straight = tmp_path / "straight"
    assert train(tiny_run_args(pool, straight, 7, **args)).returncode == 0
    resumed = tmp_path / "resumed"
    assert train(tiny_run_args(pool, resumed, 3, **args)).returncode == 0
    second = train(tiny_run_args(pool, resumed, 7, **args))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "at step 3" in second.stderr
    a, b = meta_parameters(straight), meta_parameters(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_an_incompatible_config_is_refused(pool, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_run_args(pool, out, 2)).returncode == 0
    result = train(tiny_run_args(pool, out, 4, **{"meta.algorithm": "reptile", "data.shots": 4}))
    assert result.returncode == 2
    assert "data.shots, meta.algorithm" in result.stderr
    assert "algorithm: maml" in (out / "config.yaml").read_text()  # the run's record is untouched


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_log_the_meta_gradient_norm_before_clipping(pool, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_run_args(pool, out, 3, **{"optim.grad_clip": 1e-4}))
    assert result.returncode == 0, result.stderr
    lines = metrics(out)
    assert all(line["meta_grad_norm"] > 1e-2 for line in lines)  # the raw norm, far above the clip
    assert [line["clipped_fraction"] for line in lines] == [1.0, 1.0, 1.0]
    assert [line["clipped_steps"] for line in lines] == [1, 2, 3]


def test_a_pool_without_a_test_split_trains_and_says_so(tmp_path):
    no_test = make_tiny_pool(tmp_path / "no-test", test_fraction=0.0)
    out = tmp_path / "run"
    result = train(tiny_run_args(no_test, out, 2))
    assert result.returncode == 0, result.stderr
    assert "has no 'test' split: the sample grids show 2 meta-TRAINING tasks" in result.stderr
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-00000000.png", "step-00000002.png"]


def test_after_a_resume_metrics_hold_each_step_once(pool, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_run_args(pool, out, 5, **{"run.checkpoint_every": 3})).returncode == 0
    # As if the run had died after logging step 5 but before its checkpoint: LATEST still names step 3.
    checkpoints = out / "checkpoints"
    (checkpoints / "LATEST").write_text("step-00000003")
    for leftover in checkpoints.glob("step-00000005*"):
        shutil.rmtree(leftover)
    result = train(tiny_run_args(pool, out, 7, **{"run.checkpoint_every": 3}))
    assert result.returncode == 0, result.stderr
    assert [line["step"] for line in metrics(out)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_stop_signal_during_set_up_ends_the_run_cleanly(pool, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "in-set-up"
    env = {**os.environ, **fault_env(slow_set_up={"rank": 0, "seconds": 4, "marker": str(marker)})}
    process = subprocess.Popen([sys.executable, TRAIN, *tiny_run_args(pool, out, 5)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopped by a signal during set-up (SIGTERM on rank 0), before any meta-step" in stdout
    assert "Traceback" not in stderr and latest_step(out) == 0


def test_a_non_finite_step_is_skipped_and_training_goes_on(pool, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_run_args(pool, out, 4), env=fault_env(nan_grads={"rank": 0, "from_step": 2, "to_step": 2}))
    assert result.returncode == 0, result.stderr
    assert "step 2 skipped on every rank: non-finite meta-gradient or loss (1 skipped so far)" in result.stderr
    lines = metrics(out)
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1, 1]
    assert "meta_grad_norm" not in lines[1] and "meta_grad_norm" in lines[2]  # a skipped step has no norm
    assert all(torch.isfinite(value).all() for value in meta_parameters(out).values())


def test_too_many_non_finite_steps_stop_with_one_line_and_a_good_checkpoint(pool, tmp_path):
    out = tmp_path / "run"
    args = tiny_run_args(pool, out, 10, **{"run.checkpoint_every": 1, "run.max_skipped_steps": 2})
    result = train(args, env=fault_env(nan_grads={"rank": 0, "from_step": 3, "to_step": None}))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 3 consecutive meta-steps had non-finite meta-gradients or losses (run.max_skipped_steps=2); lower "
        f"optim.lr or meta.inner_lr (last good checkpoint: {out / 'checkpoints' / 'step-00000004'})")
    assert "Traceback" not in result.stderr
    # Skipped steps leave the meta-parameters as they were, so their checkpoints are good ones too.
    assert latest_step(out) == 4
    assert all(torch.isfinite(value).all() for value in meta_parameters(out).values())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_one_rank_stops_every_rank_at_a_checkpoint(pool, tmp_path, sig):
    out = tmp_path / "run"
    process = torchrun(tiny_run_args(pool, out, 100_000, **{"run.checkpoint_every": 2}))
    wait_for_checkpoint(out, 2, process)
    send(worker_pid(process.pid, rank=1), sig)
    code, output = finish(process)
    assert code == 0, output[-3000:]
    assert "stop signal received" in output
    stopped = latest_step(out)
    assert 2 <= stopped < 100_000
    assert f"stopped at step {stopped}/100000" in output
    state = torch.load(out / "checkpoints" / f"step-{stopped:08d}" / "trainer.pt", weights_only=False)
    assert state["step"] == stopped and len(state["ranks"]) == 2


@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_last_checkpoint(pool, tmp_path):
    out = tmp_path / "run"
    steps = 400
    process = torchrun(tiny_run_args(pool, out, steps, **{"run.checkpoint_every": 4}), extra=("--max-restarts=1",))
    wait_for_checkpoint(out, 8, process)
    killed_after = latest_step(out)
    send(worker_pid(process.pid, rank=1), signal.SIGKILL)
    code, output = finish(process)
    assert code == 0, output[-3000:]
    resumed = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and resumed[0] >= killed_after  # lost at most the steps since that checkpoint
    assert latest_step(out) == steps


@pytest.mark.slow
def test_deepspeed_engine_matches_the_torch_engine(pool, tmp_path):
    """ZeRO-2 on 2 gloo ranks, stopped by a signal at step 3 and resumed, against the torch engine on the
    same tasks, with decoupled weight decay, clipping that acts on some steps, and a cosine schedule."""
    common = {"run.checkpoint_every": 2, "optim.lr": 1e-2, "optim.weight_decay": 0.5, "optim.grad_clip": 1.1,
              "optim.schedule": "cosine"}
    torch_run = tmp_path / "torch"
    code, output = finish(torchrun(tiny_run_args(pool, torch_run, 6, **common)))
    assert code == 0, output[-3000:]
    ds_run = tmp_path / "deepspeed"
    ds = tiny_run_args(pool, ds_run, 6, **common, **{"engine.name": "deepspeed",
                                                      "engine.deepspeed_config": "launch/configs/deepspeed_zero2.json"})
    stop = fault_env(signal_at_step={"rank": 1, "step": 3, "signal": "SIGTERM"})
    code, output = finish(torchrun(ds, env=stop), timeout=900)  # may JIT-compile an op
    assert code == 0 and "checkpointed at step 3" in output, output[-3000:]
    code, output = finish(torchrun(ds))
    assert code == 0 and "resumed from" in output, output[-3000:]
    a, b = meta_parameters(torch_run), meta_parameters(ds_run)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    earlier = meta_parameters(torch_run / "checkpoints" / "step-00000002")
    assert not torch.equal(a["generator"], earlier["generator"])  # the engines really stepped
    logged = [metrics(run) for run in (torch_run, ds_run)]
    for key in ("meta_grad_norm", "lr"):
        assert [line[key] for line in logged[1]] == pytest.approx([line[key] for line in logged[0]], rel=1e-4), key
    clipped = [line["clipped_fraction"] for line in logged[0]]
    assert clipped == [line["clipped_fraction"] for line in logged[1]] and 0 < sum(clipped) < len(clipped)
