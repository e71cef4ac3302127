"""Checkpoint selection (run.select_tasks): every checkpoint scored as evaluate.py scores it, BEST the best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metagan_dist.checkpoint import CheckpointStore
from metagan_dist.evaluation.checkpoint_model import load_meta_learned
from metagan_dist.evaluation.evaluate import main as evaluate_main
from train_utils import finish, make_square_pool, meta_parameters, tiny_run_args, torchrun, train

STEPS, SCORED_TASKS, SAMPLE_SHOTS, SAMPLE_STEPS = 4, 6, 4, 10
# A run whose checkpoints score differently: a conditioned G and an inner Adam that adapts in 10 steps.
SCORED_RUN = {"run.select_tasks": SCORED_TASKS, "run.sample_shots": SAMPLE_SHOTS, "run.sample_steps": SAMPLE_STEPS,
              "model.support_dim": 8, "meta.algorithm": "fomaml", "meta.inner_rule": "adam", "meta.inner_lr": 0.1,
              "optim.lr": 0.01}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return make_square_pool(tmp_path_factory.mktemp("selection") / "pool")


@pytest.fixture(scope="module")
def run(pool, tmp_path_factory) -> Path:
    """Every step checkpointed, scored and kept, for the reference below."""
    out = tmp_path_factory.mktemp("selection") / "run"
    done = train(tiny_run_args(pool, out, STEPS, **SCORED_RUN, **{"run.checkpoint_every": 1,
                                                                 "run.keep_checkpoints": STEPS}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best:" in done.stdout
    return out


def logged_scores(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["select_recognizability"] for line in lines if "select_recognizability" in line}


def test_every_checkpoint_is_scored_and_best_names_the_first_highest(run):
    scores = logged_scores(run)
    assert sorted(scores) == list(range(1, STEPS + 1))
    assert len(set(scores.values())) > 1, "the checkpoints must score differently for the test to choose"
    best_step = max(scores, key=lambda step: (scores[step], -step))
    record = json.loads((run / "checkpoints" / "BEST").read_text())
    assert (record["step"], record["score"]) == (best_step, scores[best_step])
    assert record["checkpoint"] == CheckpointStore.tag(best_step)


def test_the_scores_are_evaluate_pys_recognizability_on_the_meta_train_tasks(run, pool, tmp_path):
    """The independent path: launch/evaluate.py on each kept checkpoint, --split train, seed 0."""
    checkpoints = [f"s{step}={run / 'checkpoints' / CheckpointStore.tag(step)}" for step in range(1, STEPS + 1)]
    evaluate_main([*checkpoints, "--pool", str(pool), "--split", "train", "--tasks", str(SCORED_TASKS), "--seeds", "1",
                   "--shots", str(SAMPLE_SHOTS), "--steps", str(SAMPLE_STEPS), "--curve-steps", str(SAMPLE_STEPS),
                   "--baselines", "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    evaluated = {int(row["method"][1:]): row["steps"][str(SAMPLE_STEPS)]["recognizability"]["mean"]
                 for row in report["methods"]}
    assert evaluated == pytest.approx(logged_scores(run), abs=1e-12)


def test_a_run_folder_loads_its_best_checkpoint_with_its_runs_budget(run):
    best = json.loads((run / "checkpoints" / "BEST").read_text())["step"]
    model = load_meta_learned(run)
    assert (model.step, model.run_steps) == (best, STEPS)
    assert load_meta_learned(run / "checkpoints" / CheckpointStore.tag(STEPS)).run_steps == STEPS


def test_scoring_leaves_an_interrupted_and_resumed_run_bit_identical(pool, tmp_path):
    args = {**SCORED_RUN, "run.checkpoint_every": 2}
    assert train(tiny_run_args(pool, tmp_path / "straight", STEPS, **args)).returncode == 0
    assert train(tiny_run_args(pool, tmp_path / "resumed", STEPS // 2, **args)).returncode == 0
    assert train(tiny_run_args(pool, tmp_path / "resumed", STEPS, **args)).returncode == 0
    a, b = meta_parameters(tmp_path / "straight"), meta_parameters(tmp_path / "resumed")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert logged_scores(tmp_path / "straight") == logged_scores(tmp_path / "resumed")
    best = [(run / "checkpoints" / "BEST").read_text() for run in (tmp_path / "straight", tmp_path / "resumed")]
    assert best[0] == best[1]


@pytest.mark.slow
def test_rank_0_scores_for_two_gloo_ranks_under_either_engine(pool, tmp_path):
    """Only rank 0 scores, while rank 1 waits in the next all-reduce; DeepSpeed's parameters score alike."""
    args = {**SCORED_RUN, "run.checkpoint_every": 2}
    scores = {}
    for engine in ("torch", "deepspeed"):
        out = tmp_path / engine
        extra = {"engine.name": engine, "engine.deepspeed_config": "launch/configs/deepspeed_zero2.json"}
        code, output = finish(torchrun(tiny_run_args(pool, out, STEPS, **args, **extra)), timeout=900)
        assert code == 0, output[-3000:]
        scores[engine] = logged_scores(out)
        assert sorted(scores[engine]) == [2, 4]
        best = json.loads((out / "checkpoints" / "BEST").read_text())
        assert best["score"] == max(scores[engine].values())
    assert scores["deepspeed"] == pytest.approx(scores["torch"], abs=0.05)  # equal up to float rounding


def test_tasks_too_small_to_score_are_one_clear_error(pool, tmp_path):
    result = train(tiny_run_args(pool, tmp_path / "run", 2, **{"run.select_tasks": SCORED_TASKS,
                                                                "run.sample_shots": 8}))
    assert result.returncode == 2
    assert "run.select_tasks" in result.stderr and "has 12 images" in result.stderr
    assert "Traceback" not in result.stderr
