"""Task draws of 8 ranks x 4 DataLoader workers on the glyphs pool: uniform over tasks, mixed scripts.

Fixed seeds, so the outcome is fixed too (no flakiness); the bounds hold with a wide margin.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

import pytest
import torch

from metagan_dist.data import Pool, TaskStream, ensure_glyphs_pool

RANKS, WORKERS, TASKS_PER_RANK, STEPS = 8, 4, 8, 100


def script(key: str) -> str:
    """LATIN, GREEK, CYRILLIC, ...: the first word of the task character's Unicode name."""
    return unicodedata.name(chr(int(key[1:], 16))).split()[0]


def chi_square_p_value(statistic: float, dof: int) -> float:
    """P(χ²_dof ≥ statistic): the regularized upper incomplete gamma function Q(dof/2, statistic/2)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_chi_square_p_value_against_known_quantiles():
    assert abs(chi_square_p_value(3.841, 1) - 0.05) < 1e-3
    assert abs(chi_square_p_value(124.342, 100) - 0.05) < 1e-3


@pytest.mark.slow
def test_task_draws_of_8_ranks_x_4_workers_are_uniform_and_mix_scripts():
    pool = Pool(ensure_glyphs_pool())
    keys = pool.keys("train")
    steps = []  # per rank: its batches' keys, step by step
    for rank in range(RANKS):
        stream = TaskStream(pool, "train", shots=5, queries=5, tasks_per_batch=TASKS_PER_RANK,
                            episodes_per_epoch=TASKS_PER_RANK * STEPS, seed=0, rank=rank, world_size=RANKS,
                            num_workers=WORKERS)
        steps.append([batch.keys for batch in stream])
    assert all(len(batches) == STEPS for batches in steps)  # the same number of steps on every rank

    counts = Counter(key for batches in steps for batch in batches for key in batch)
    assert set(counts) == set(keys)  # every task of the split was drawn
    n, draws = len(keys), RANKS * TASKS_PER_RANK
    expected = STEPS * draws / n
    statistic = sum((counts[key] - expected) ** 2 / expected for key in keys)
    # Each meta-step is a sample of `draws` distinct tasks, so a count varies by p(1 - p) per step
    # (p = draws / n) rather than the multinomial's p: Pearson's statistic is scaled back by that.
    scaled = statistic * (n - 1) / (n * (1 - draws / n))
    p_value = chi_square_p_value(scaled, n - 1)
    assert p_value > 0.01, f"task draw counts are not uniform: chi-square {scaled:.1f} on {n - 1} dof, p = {p_value:.2g}"

    global_batches = [[key for rank in range(RANKS) for key in steps[rank][step]] for step in range(STEPS)]
    assert all(len(set(batch)) == draws for batch in global_batches)  # no task twice in a meta-batch
    assert min(len({script(key) for key in batch}) for batch in global_batches) >= 4
    per_rank = [len({script(key) for key in batch}) for batches in steps for batch in batches]
    # Uniform draws of 8 of these 660 tasks span 3.3 of the 7 scripts on average (Latin is 57% of them).
    assert sum(per_rank) / len(per_rank) >= 3.0
