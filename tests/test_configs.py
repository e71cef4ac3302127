"""Every shipped config starts for real: its data, model, algorithm and engine settings, with the
rank count its `# Launch:` line names, on the CPU over gloo (device overridden, 2 meta-steps, T = 1).
Then 16 ranks with the defaults, and 8 ranks x 4 loader workers on a pool of a single shard.

Each run must step, checkpoint, and end with the ranks' meta-parameters identical (launch/train.py
verifies that by sha256 and prints it). Slow: about a minute per 8-rank job on 2 cores.
"""

import re
from pathlib import Path

import pytest
import torch
import yaml

from metagan_dist.data import Pool, ensure_glyphs_pool
from train_utils import REPO, finish, latest_step, make_tiny_pool, tiny_run_args, torchrun

pytestmark = pytest.mark.slow
CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
# What every start overrides: where it runs and how long, nothing the config is about.
# model.autoencoder_epochs: the latent pair's autoencoder trains for 1 epoch, not 12 (other pairs ignore it).
# run.select_tasks: scoring checkpoints would train the glyphs pool's feature nets (minutes); tests/test_selection.py.
ON_THE_CPU = {"run.device": "cpu", "run.steps": 2, "run.threads": 1, "data.tasks_per_rank": 1, "run.log_every": 1,
              "model.autoencoder_epochs": 1, "run.select_tasks": 0}


def launch_ranks(config: Path) -> int:
    """The rank count of the config's `# Launch:` header line (1 for plain `python launch/train.py`)."""
    line = next(line for line in config.read_text().splitlines() if line.startswith("# Launch:"))
    found = re.search(r"--nproc_per_node=(\d+)", line)
    return int(found.group(1)) if found else 1


@pytest.fixture(scope="module", autouse=True)
def glyphs_pool():
    """Built once here (about 20 s on first use), not by 8 ranks racing for its lock."""
    return ensure_glyphs_pool()


def start(args: list[str], ranks: int, out: Path, timeout: float = 900) -> str:
    code, output = finish(torchrun([*args, f"run.out_dir={out}"], nproc=ranks), timeout=timeout)
    assert code == 0, output[-4000:]
    assert f"finished at step 2/2" in output and f"meta-parameters identical on {ranks} rank(s)" in output, output[-3000:]
    assert latest_step(out) == 2
    state = torch.load(out / "checkpoints" / "step-00000002" / "trainer.pt", weights_only=False)
    assert len(state["ranks"]) == ranks and state["step"] == 2
    return output


def test_every_config_names_its_rank_count():
    # cpu_2rank, cpu_latent, cpu_long, cpu_quickstart, deepspeed, gpu_*
    assert [launch_ranks(c) for c in CONFIGS] == [2, 1, 1, 1, 8, 8, 8]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_a_shipped_config_starts_steps_and_checkpoints(config, tmp_path):
    ranks = launch_ranks(config)
    overrides = [f"{key}={value}" for key, value in ON_THE_CPU.items()]
    output = start(["--config", str(config), *overrides], ranks, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    written = yaml.safe_load(config.read_text())
    for section in ("model", "data", "meta", "optim", "engine"):  # its own settings ran, not the defaults
        for key, value in (written.get(section) or {}).items():
            if f"{section}.{key}" not in ON_THE_CPU:
                assert saved[section][key] == value, f"{section}.{key}"
    workers = (written.get("data") or {}).get("workers", 1)
    assert f"{ranks} rank(s) x 1 tasks per step, {workers} loader worker(s) per rank" in output


def test_16_ranks_with_the_defaults(tmp_path):
    start([f"{key}={value}" for key, value in ON_THE_CPU.items()], 16, tmp_path / "run")


def test_8_ranks_x_4_workers_on_a_pool_of_one_shard(tmp_path):
    pool = make_tiny_pool(tmp_path / "one-shard", shard_tasks=100)
    assert len(Pool(pool).shards("train")) == 1
    args = tiny_run_args(pool, tmp_path / "run", 2, **{"data.workers": 4, "data.tasks_per_rank": 2})
    output = start([a for a in args if not a.startswith("run.out_dir=")], 8, tmp_path / "run")
    assert "8 rank(s) x 2 tasks per step, 4 loader worker(s) per rank" in output
