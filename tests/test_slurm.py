"""launch/slurm/train.sbatch on a real single-node SLURM cluster that this test starts and stops.

Needs Debian's slurm-wlm and munge (.ci/run installs them) and root. Without them the test is
skipped on a developer machine, but fails under CI=true, so CI can never pass it silently.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_utils import REPO, fault_env, latest_step, make_tiny_pool, tiny_run_args

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
SLOW_STOP_CHECKPOINT_S = 35  # longer than torchrun's default 30 s from SIGTERM to SIGKILL


def _need_slurm():
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    reason = None
    if missing:
        reason = f"SLURM/munge not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    elif os.geteuid() != 0:
        reason = "starting slurmd needs root"
    if reason and os.environ.get("CI") == "true":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


SLURM_CONF = """\
ClusterName=metagan-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path) -> None:
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """slurmctld + slurmd (+ munged if none runs) on localhost; stopped afterwards."""
    _need_slurm()
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(d=folder, cpus=os.cpu_count()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge_pid = Path("/run/munge/munged.pid")
    started_munge = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
    if started_munge:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                           env=env).stdout:
            if time.monotonic() > deadline:
                raise AssertionError("the SLURM node did not become idle:\n" + (folder / "slurmd.log").read_text())
            time.sleep(0.5)
        yield env
    finally:
        _stop(folder / "slurmd.pid")
        _stop(folder / "slurmctld.pid")
        if started_munge:
            _stop(munge_pid)


@pytest.mark.slow
def test_sbatch_script_trains_two_cpu_ranks(slurm_cluster, tmp_path):
    pool = make_tiny_pool(tmp_path / "pool")
    out = tmp_path / "run"
    args = tiny_run_args(pool, out, 6, **{"run.checkpoint_every": 3, "run.sample_every": 3})
    env = {**slurm_cluster, "NPROC_PER_NODE": "2", "CONFIG": "launch/configs/cpu_2rank.yaml",
           "PYTHON": sys.executable, "RDZV_PORT": "29533"}
    log = tmp_path / "job.out"
    result = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", f"--chdir={REPO}", f"--output={log}", "launch/slurm/train.sbatch", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    output = log.read_text(errors="replace") if log.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{output[-4000:]}"
    assert "2 rank(s)" in output and "finished at step 6/6" in output
    assert latest_step(out) == 6
    assert (out / "checkpoints" / "step-00000006" / "trainer.pt").is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "step-00000000.png", "step-00000003.png", "step-00000006.png"]


def _job_state(job: str, env: dict) -> str:
    result = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env)
    fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return fields.get("JobState", "GONE")


@pytest.mark.slow
def test_usr1_before_the_time_limit_checkpoints_and_requeues(slurm_cluster, tmp_path):
    """The whole preemption path, with a stop checkpoint that takes longer than torchrun's default
    30 s between SIGTERM and SIGKILL (a slow file system): the script's wider window keeps it."""
    pool = make_tiny_pool(tmp_path / "pool")
    out = tmp_path / "run"
    steps = 60
    args = tiny_run_args(pool, out, steps, **{"run.checkpoint_every": 2})
    env = {**slurm_cluster, "NPROC_PER_NODE": "2", "CONFIG": "launch/configs/cpu_2rank.yaml",
           "PYTHON": sys.executable, "RDZV_PORT": "29534", **fault_env(slow_stop_checkpoint_s=SLOW_STOP_CHECKPOINT_S)}
    log = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", f"--chdir={REPO}", f"--output={log}", "launch/slurm/train.sbatch",
         *args], cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 300
    while latest_step(out) < 2:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    # What SLURM does 120 s before the time limit (--signal=B:USR1@120), done now.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, env=env)
    deadline, pending_since = time.monotonic() + 600, None
    while (state := _job_state(job, env)) not in ("COMPLETED", "FAILED", "CANCELLED", "GONE"):
        pending_since = (pending_since or time.monotonic()) if state == "PENDING" else None
        # SLURM delays a requeued job's start by minutes; start it sooner, but not within the second
        # its previous run was killed in: slurmd, counting in whole seconds, would take the new
        # launch's credential for the revoked one and fail the job ("Job credential revoked").
        if pending_since is not None and time.monotonic() - pending_since > 3:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, capture_output=True)
        assert time.monotonic() < deadline, f"job {job} still {state}:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(1)
    output = log.read_text(errors="replace")
    assert _job_state(job, env) == "COMPLETED", output[-4000:]
    assert "USR1: the time limit is near" in output and "faults: writing" in output
    stopped = re.search(r"stop signal received: checkpointed at step (\d+)", output)
    assert stopped, output[-4000:]  # the slow stop checkpoint was finished, not killed
    resumed = re.search(r"resumed from \S+ at step (\d+)", output.split("(restart 1)")[-1])
    assert resumed and resumed.group(1) == stopped.group(1), output[-4000:]  # nothing lost
    assert f"finished at step {steps}/{steps}" in output
    assert latest_step(out) == steps
