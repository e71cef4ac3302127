"""The evaluate command end to end on tiny checkpoints and a tiny pool; its outputs, fairness and bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metagan_dist.config import TrainConfig
from metagan_dist.data import Pool
from metagan_dist.evaluation import baselines
from metagan_dist.evaluation.checkpoint_model import load_meta_learned
from metagan_dist.evaluation.evaluate import load_checkpoints, main
from metagan_dist.evaluation.harness import METRICS, REFERENCES, EvalPlan, Judge
from metagan_dist.evaluation.metrics import precision_recall
from metagan_dist.meta import MetaLearner
from train_utils import SHOTS, SQUARES_SHAPE, make_square_pool, train_tiny_run

TASKS, SEEDS, SAMPLES, STEPS = 2, 2, 6, 3
CURVE = [0, 1, 2, 3, 5]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return make_square_pool(tmp_path_factory.mktemp("evaluate") / "pool")


@pytest.fixture(scope="module")
def runs(pool, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    return {"maml": train_tiny_run(pool, root / "maml"),
            "metasgd": train_tiny_run(pool, root / "metasgd", "meta.algorithm=metasgd")}


def common_args(pool: Path, out: Path) -> list[str]:
    return ["--pool", str(pool), "--tasks", str(TASKS), "--seeds", str(SEEDS), "--samples", str(SAMPLES),
            "--steps", str(STEPS), "--curve-steps", "0,1,2,5", "--kid-subsets", "2", "--feature-epochs", "1",
            "--threads", "1", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def evaluated(runs, pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "out"
    # maml twice under two names: identical init and rule must give identical scores (same shots and noise).
    # sgd:1e+30 makes scratch diverge (NaN parameters): reported as such, not a crash, and never "best".
    main([f"maml={runs['maml']}", f"maml_again={runs['maml']}", str(runs["metasgd"]),
          "--baseline-rules", "adam:0.01", "sgd:0.05", "sgd:1e30", *common_args(pool, out)])
    return out


@pytest.fixture(scope="module")
def report(evaluated) -> dict:
    def no_constants(name: str):
        raise AssertionError(f"results.json holds {name}, which is not JSON")

    return json.loads((evaluated / "results.json").read_text(), parse_constant=no_constants)


LABELS = ["maml (meta)", "maml_again (meta)", "metasgd (meta)", "scratch (adam:0.01)", "scratch (sgd:0.05)",
          "scratch (sgd:1e+30)", "pretrain-finetune (adam:0.01)", "pretrain-finetune (sgd:0.05)",
          "pretrain-finetune (sgd:1e+30)"]
DIVERGED = "scratch (sgd:1e+30)"


def test_every_method_is_scored_at_every_curve_step_over_tasks_and_seeds(report):
    assert [row["label"] for row in report["methods"]] == LABELS
    for row in report["methods"]:
        assert sorted(map(int, row["steps"])) == CURVE
        for step, summaries in row["steps"].items():
            assert sorted(summaries) == sorted(METRICS)
            for metric, per_task in row["per_seed_and_task"][step].items():
                assert len(per_task) == SEEDS and all(len(seed) == TASKS for seed in per_task)
                if summaries[metric]["mean"] is not None:
                    assert summaries[metric]["mean"] == pytest.approx(sum(map(sum, per_task)) / (TASKS * SEEDS))
            for summary in summaries.values():
                assert summary["n"] == TASKS * SEEDS
                if row["label"] == DIVERGED and step == str(STEPS):
                    assert (summary["mean"], summary["std"], summary["diverged"]) == (None, None, TASKS * SEEDS)
                elif step == "0" or "1e+30" not in row["rule"]:
                    assert math.isfinite(summary["mean"]) and summary["std"] >= 0 and summary["diverged"] == 0
            if row["label"] == DIVERGED and step == str(STEPS):
                assert row["per_seed_and_task"][step]["kid"] == [[None] * TASKS] * SEEDS
            assert 0 <= (summaries["recognizability"]["mean"] or 0) <= 1
    settings = report["settings"]
    assert settings["shots"] == SHOTS and settings["task_keys"] == Pool(settings["pool"]).keys("test")[:TASKS]
    assert settings["ways"] == TASKS  # fewer tasks than the default 20 ways: every episode holds them all


def test_reference_rows_are_scored_like_samples(report):
    references = report["references"]
    assert sorted(references) == sorted(REFERENCES)
    for name, summaries in references.items():
        assert sorted(summaries) == sorted(METRICS) and summaries["kid"]["n"] == TASKS * SEEDS
    # Held-out real images of a task are that task, far more than another task's images are.
    assert references["real"]["recognizability"]["mean"] > references["other-task"]["recognizability"]["mean"]
    assert references["real"]["kid"]["mean"] < references["other-task"]["kid"]["mean"]
    # k = 3 shots are too few for 3-NN precision/recall: not applicable, not a number and not diverged.
    assert references["shots"]["precision"] == {"mean": None, "std": None, "se": None, "n": TASKS * SEEDS, "diverged": 0}


def test_recall_of_samples_is_scored_on_sets_as_large_as_the_reference_set():
    # 8 reference images per task and 48 samples drawn on a line: 6 sets of 8 samples each get a manifold.
    generator = torch.Generator().manual_seed(0)
    references = [(torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)) for _ in range(2)]
    line = torch.tensor([1.0, 0.0])
    samples = [(torch.randn(48, 2, generator=generator), torch.randn(48, 2, generator=generator) * line) for _ in range(2)]
    plan = EvalPlan(tasks={}, shots=4, steps=[1], samples=48, seeds=[0], kid_subsets=2, ways=2, episodes=2)
    scores = Judge(references, plan, seed=0)(samples)
    for (_, real), (_, fake), score in zip(references, samples, scores):
        assert score["recall"] == precision_recall(real, fake, k=3, matched=True)[1]
        assert score["recall"] > precision_recall(real, fake, k=3)[1]  # all 48 at once: thinner, lower


def test_methods_see_the_same_shots_and_noise(report):
    rows = {row["label"]: row for row in report["methods"]}
    assert rows["maml (meta)"]["steps"] == rows["maml_again (meta)"]["steps"]
    # The same pretrained init before any step, whatever rule adapts it afterwards.
    pretrained = [rows[f"pretrain-finetune ({r})"]["steps"] for r in ("adam:0.01", "sgd:0.05")]
    assert pretrained[0]["0"] == pretrained[1]["0"] and pretrained[0][str(STEPS)] != pretrained[1][str(STEPS)]
    # Scratch draws a fresh init per seed: its two seeds differ at step 0.
    first, second = rows["scratch (adam:0.01)"]["per_seed_and_task"]["0"]["kid"]
    assert first != second


def test_a_steps_scores_do_not_depend_on_how_far_the_curve_goes(report, runs, pool, tmp_path):
    # The report's curve ends at 5 steps; a curve that ends at 2 must score step 2 identically.
    out = tmp_path / "short"
    main([f"maml={runs['maml']}", *common_args(pool, out), "--baselines", "--curve-steps", "0,2", "--steps", "2"])
    short = json.loads((out / "results.json").read_text())["methods"][0]["per_seed_and_task"]["2"]
    assert short == report["methods"][0]["per_seed_and_task"]["2"]


def test_a_shift_draws_every_held_out_image_in_the_new_style(report, runs, pool, tmp_path, capsys):
    out = tmp_path / "bold"
    main([f"maml={runs['maml']}", *common_args(pool, out), "--baselines", "--shift", "bold"])
    shifted = json.loads((out / "results.json").read_text())
    assert shifted["settings"]["shift"] == "bold" and report["settings"]["shift"] == "none"
    assert "(test split, every image shifted: bold)" in (out / "results.md").read_text()
    # The same shots, exam and reference images, emboldened: every reference row scores otherwise.
    for name in REFERENCES:
        assert shifted["references"][name]["kid"]["mean"] != report["references"][name]["kid"]["mean"]
    err = error_of(capsys, runs["maml"], *common_args(pool, tmp_path / "o"), "--shift", "thin")
    assert "argument --shift: invalid choice: 'thin'" in err


def test_best_rows_and_headline_follow_from_recognizability_at_s(report):
    score = {row["label"]: row["steps"][str(STEPS)]["recognizability"]["mean"] for row in report["methods"]}
    assert sorted(report["best"]) == ["maml", "maml_again", "metasgd", "pretrain-finetune", "scratch"]
    for name, label in report["best"].items():
        assert label != DIVERGED
        assert score[label] == max(v for k, v in score.items() if k.startswith(name + " (") and v is not None)
    headline = report["headline"]
    champion = headline["best_meta_learned"]
    assert score[champion] == max(score[label] for label in LABELS[:3]) == headline["recognizability"]
    start = next(row for row in report["methods"] if row["label"] == champion)["steps"]["0"]
    assert headline["at_step_0"] == start["recognizability"]["mean"]
    for name in ("scratch", "pretrain-finetune"):
        entry = headline["vs"][name]
        assert entry["difference"] == pytest.approx(score[champion] - score[entry["baseline"]])


def test_the_pretraining_budget_matches_the_first_checkpoints_compute(report, runs):
    model = load_meta_learned(runs["maml"])
    cfg = model.config
    images = model.step * 1 * cfg.data.tasks_per_rank * (cfg.meta.inner_steps * cfg.data.shots + cfg.data.queries)
    pretrain = report["settings"]["pretrain"]
    assert (pretrain["images"], pretrain["batch"]) == (images, baselines.PRETRAIN_BATCH)
    assert pretrain["steps"] == math.ceil(images / baselines.PRETRAIN_BATCH)


def test_the_markdown_table_plot_grids_and_feature_cache_are_written(evaluated, report, pool):
    table = (evaluated / "results.md").read_text()
    for row in report["methods"]:
        assert f"| {row['method']} | {row['rule']} |" in table
    assert f"Best meta-learned row, {report['headline']['best_meta_learned']}" in table
    assert f"| scratch | sgd:1e+30 | {STEPS} | diverged ({TASKS * SEEDS}/{TASKS * SEEDS}) |" in table
    for name in REFERENCES:
        assert f"| *{name}* | – | – |" in table
    assert "| maml | – | 0 |" in table and "| scratch | – | 0 |" in table  # each init before adaptation
    with Image.open(evaluated / "curves.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 400
    grids = sorted(p.name for p in (evaluated / "grids").iterdir())
    assert len(grids) == len(LABELS)
    with Image.open(evaluated / "grids" / "maml_meta.png") as grid:  # TASKS rows of k shots + M samples
        assert grid.size == ((SHOTS + SAMPLES) * 33 + 1, TASKS * 33 + 1)
    assert (pool / "feature_net.pt").is_file() and (pool / "recognition_net.pt").is_file()


def test_pretraining_is_seeded_and_moves_the_parameters(runs, pool):
    model = load_meta_learned(runs["maml"])
    images = next(iter(Pool(pool).load_tasks("train").values()))
    budget = baselines.PretrainBudget(images=12, batch=4, steps=3)
    theta = baselines.random_init(model.config, SQUARES_SHAPE, seed=0)
    tasks = np.zeros(len(images), dtype=int)  # one task: the tiny runs' G is support-conditioned (the default)
    first, second, other = (baselines.pretrain(model.learner, *theta, images, budget, 0.01, (0.5, 0.999), seed=s,
                                               progress=False, tasks=tasks) for s in (1, 1, 2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[0], theta[0])


def test_pretraining_a_conditioned_generator_draws_each_batch_from_one_task():
    config = TrainConfig()
    config.model.width, config.model.z_dim, config.model.support_dim = 8, 4, 4
    learner = MetaLearner(*config.model.build((1, 8, 8)), config.meta)
    images = np.repeat(np.arange(3, dtype=np.uint8) * 100, 5)[:, None, None, None] * np.ones((1, 1, 8, 8), np.uint8)
    tasks = np.repeat(np.arange(3), 5)  # task t's images all have the value 100 t
    batches = []
    start = learner.start_adaptation

    def recording(*args, **kwargs):
        session = start(*args, **kwargs)
        advance = session.advance
        session.advance = lambda support, *rest: (batches.append(support), advance(support, *rest))
        return session

    learner.start_adaptation = recording
    theta = baselines.random_init(config, (1, 8, 8), seed=0)
    budget = baselines.PretrainBudget(images=24, batch=4, steps=6)
    baselines.pretrain(learner, *theta, images, budget, 0.01, (0.5, 0.999), seed=0, progress=False, tasks=tasks)
    assert len(batches) == 6 and all(batch.unique().numel() == 1 for batch in batches)
    assert len({batch.unique().item() for batch in batches}) > 1  # different tasks over the steps
    with pytest.raises(ValueError, match="needs each image's task index"):
        baselines.pretrain(learner, *theta, images, budget, 0.01, (0.5, 0.999), seed=0, progress=False)


def test_matched_budget_counts_real_images_of_all_ranks():
    cfg = TrainConfig()
    cfg.meta.inner_steps, cfg.data.shots, cfg.data.queries, cfg.data.tasks_per_rank = 2, 4, 5, 8
    assert baselines.matched_budget(cfg, meta_steps=100, ranks=2, batch=64) == baselines.PretrainBudget(
        images=100 * 2 * 8 * (2 * 4 + 5), batch=64, steps=math.ceil(20800 / 64))


# ---- bad input ----

def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, argv)))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_checkpoints_of_different_architectures_are_named(pool, runs, tmp_path, capsys):
    wide = train_tiny_run(pool, tmp_path / "wide", "model.width=24")
    err = error_of(capsys, f"narrow={runs['maml']}", f"wide={wide}", *common_args(pool, tmp_path / "o"))
    assert f"checkpoint {load_meta_learned(wide).folder} (wide)" in err and "compare inits of one architecture" in err


def test_duplicate_names_a_baseline_rule_meta_and_short_tasks_are_errors(pool, runs, tmp_path, capsys):
    args = common_args(pool, tmp_path / "o")
    assert "checkpoint names must be unique" in error_of(capsys, runs["maml"], runs["maml"], *args)
    assert "baselines have no meta-learned inner rule" in error_of(capsys, runs["maml"], "--baseline-rules", "meta", *args)
    err = error_of(capsys, runs["maml"], *args, "--shots", "9")
    assert "has 12 images; evaluating with k=9 shots needs at least 17" in err


def test_sample_median_applies_to_every_checkpoint_and_must_not_be_negative(pool, runs, tmp_path, capsys):
    loaded = load_checkpoints([f"a={runs['maml']}", f"b={runs['maml']}"], torch.device("cpu"), sample_median=1)
    assert [model.learner.G.module.sample_median for _, model in loaded] == [1, 1]
    assert [model.config.model.sample_median for _, model in loaded] == [1, 1]  # the baselines are built from it
    own = load_checkpoints([str(runs["maml"])], torch.device("cpu"))
    assert own[0][1].config.model.sample_median == load_meta_learned(runs["maml"]).config.model.sample_median
    err = error_of(capsys, runs["maml"], *common_args(pool, tmp_path / "o"), "--sample-median", "-1")
    assert "--sample-median must be at least 0, got -1" in err


def test_g_average_applies_to_every_checkpoint_and_must_lie_in_0_1(pool, runs, tmp_path, capsys):
    loaded = load_checkpoints([f"a={runs['maml']}", f"b={runs['maml']}"], torch.device("cpu"), g_average=0.25)
    assert [model.learner.config.g_average for _, model in loaded] == [0.25, 0.25]  # the baselines share the learner
    own = load_checkpoints([str(runs["maml"])], torch.device("cpu"))[0][1].learner.config.g_average
    assert own == TrainConfig().meta.g_average  # the checkpoint's own: the default recipe's
    err = error_of(capsys, runs["maml"], *common_args(pool, tmp_path / "o"), "--g-average", "-0.1")
    assert "--g-average must be in [0, 1) (0 = the last iterate), got -0.1" in err


def test_skip_tasks_evaluates_the_tasks_after_the_first_n(runs, tmp_path, capsys):
    bigger = make_square_pool(tmp_path / "pool16", tasks=16)  # 4 test tasks
    out = tmp_path / "o"
    main([str(runs["maml"]), *common_args(bigger, out), "--baselines", "--skip-tasks", "1", "--seeds", "1"])
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["task_keys"] == Pool(bigger).keys("test")[1 : 1 + TASKS]
    err = error_of(capsys, runs["maml"], *common_args(bigger, tmp_path / "o2"), "--skip-tasks", "4")
    assert f"--skip-tasks 4 leaves no task: split 'test' of pool {bigger} has 4" in err
    err = error_of(capsys, runs["maml"], *common_args(bigger, tmp_path / "o3"), "--skip-tasks", "-1")
    assert "--skip-tasks must be at least 0, got -1" in err


def test_a_pool_of_another_image_shape_is_named(runs, tmp_path, capsys):
    other = make_square_pool(tmp_path / "big", tasks=4, size=64)
    err = error_of(capsys, runs["maml"], *common_args(other, tmp_path / "o"))
    assert f"pool {other} holds (1, 64, 64) images but the checkpoints' models make {SQUARES_SHAPE}" in err


def test_baselines_default_to_the_first_checkpoints_inner_rule(pool, runs, tmp_path):
    out = tmp_path / "o"
    main([str(runs["maml"]), "--baselines", "scratch", *common_args(pool, out)])
    labels = [row["label"] for row in json.loads((out / "results.json").read_text())["methods"]]
    assert labels == ["maml (meta)", "scratch (sgd:0.05)"]  # tiny runs use meta.inner_lr=0.05
