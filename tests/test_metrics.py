"""Metrics against closed forms and naive reference implementations written out here, loop by loop."""

import itertools
import math

import numpy as np
import pytest
import torch

from metagan_dist.evaluation.metrics import diversity, fid, kid, precision_recall, recognizability


def _gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- FID


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """‖μx − μy‖² + tr Σx + tr Σy − 2 Σ √λ(Σx Σy): the eigenvalues of the non-symmetric product
    are those of (Σx^½ Σy Σx^½), real and >= 0, so this avoids any matrix square root."""
    cov_x, cov_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    eigenvalues = np.linalg.eigvals(cov_x @ cov_y).real.clip(min=0)
    gap = x.mean(0) - y.mean(0)
    return float(gap @ gap + np.trace(cov_x) + np.trace(cov_y) - 2 * np.sqrt(eigenvalues).sum())


def test_fid_of_a_set_with_itself_is_zero():
    x = _gaussian(500, 16, seed=1) * 3 + 2
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid(x, x.numpy()) == pytest.approx(0.0, abs=1e-9)  # numpy input, same answer


def test_fid_of_a_shifted_copy_is_the_squared_shift():
    # Same covariance on both sides, so the trace terms cancel exactly: FID = ‖shift‖².
    x = _gaussian(300, 8, seed=2)
    shift = torch.arange(8, dtype=torch.float64) / 4
    assert fid(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


@pytest.mark.parametrize(("n_x", "n_y", "d"), [(7, 9, 3), (40, 25, 6), (4, 5, 6)])  # last: singular (N < d)
def test_fid_matches_the_eigenvalue_reference_formula(n_x, n_y, d):
    x = (_gaussian(n_x, d, seed=3) @ _gaussian(d, d, seed=4)).numpy()
    y = (_gaussian(n_y, d, seed=5) @ _gaussian(d, d, seed=6) + 0.5).numpy()
    assert fid(x, y) == pytest.approx(_reference_fid(x, y), rel=1e-7, abs=1e-9)


def test_fid_in_one_dimension_is_mean_gap_and_std_gap_squared():
    x, y = np.array([[0.0], [1.0], [5.0]]), np.array([[2.0], [2.5], [-1.0], [4.0]])
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert fid(x, y) == pytest.approx(expected, rel=1e-12)


def test_fid_of_large_gaussian_samples_matches_the_closed_form_of_the_true_parameters():
    # Covariances Q diag(a) Qᵀ and Q diag(b) Qᵀ commute (shared rotation Q, so neither is
    # diagonal), which gives the closed form ‖μ‖² + Σ (√a − √b)² independently of any sqrtm.
    n, d = 20_000, 4
    a = torch.tensor([1.0, 4.0, 0.25, 2.25], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 1.0, 0.25], dtype=torch.float64)
    mean = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    rotation, _ = torch.linalg.qr(_gaussian(d, d, seed=7))
    x = (_gaussian(n, d, seed=8) * a.sqrt()) @ rotation.T
    y = (_gaussian(n, d, seed=9) * b.sqrt()) @ rotation.T + mean
    true_distance = float(mean @ mean + ((a.sqrt() - b.sqrt()) ** 2).sum())  # = 5.5
    # Tolerance: over 30 seeds this estimate had standard deviation 0.046 (its bias, about
    # (tr Σx + tr Σy)/n = 7e-4, is negligible), so 0.25 is more than 5 standard deviations.
    assert fid(x, y) == pytest.approx(true_distance, abs=0.25)


# ---------------------------------------------------------------- KID


def _reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(u, v) = (uᵀv/d + 1)³ as a plain double loop (Bińkowski et al. 2018, eq. 4)."""
    d = x.shape[1]

    def kernel(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def _cubic_kernel_matrices(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = x.shape[1]
    return tuple((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))


def _vectorised_reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The same unbiased estimator in matrix form (diagonals removed), for sets too big to loop over."""
    (k_xx, k_yy, k_xy), m, n = _cubic_kernel_matrices(x, y), len(x), len(y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def _biased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The biased (V-statistic) MMD², diagonals included: positive on average even for equal laws."""
    k_xx, k_yy, k_xy = _cubic_kernel_matrices(x.numpy(), y.numpy())
    return float(k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())


def test_kid_equals_the_double_loop_reference_on_tiny_inputs():
    x, y = _gaussian(5, 3, seed=10).numpy(), (_gaussian(5, 3, seed=11) + 0.3).numpy()
    mean, std = kid(x, y, subsets=10)  # subsets of 5 out of 5: the whole sets, one estimate
    assert mean == pytest.approx(_reference_mmd2(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_is_unbiased_for_two_samples_of_the_same_distribution():
    equal, shifted, biased = [], [], []
    for seed in range(100):
        x, y = _gaussian(20, 8, seed=2 * seed), _gaussian(20, 8, seed=2 * seed + 1)
        equal.append(kid(x, y)[0])
        shifted.append(kid(x, y + 0.5)[0])
        biased.append(_biased_mmd2(x, y))
    standard_error = np.std(equal) / math.sqrt(len(equal))
    assert abs(np.mean(equal)) < 4 * standard_error
    # The test has power: the biased estimator on the same draws, and a mean shift, are far off zero.
    assert np.mean(biased) > 20 * standard_error
    assert np.mean(shifted) > 20 * standard_error


def test_kid_handles_fewer_samples_than_the_subset_size():
    few, many = _gaussian(6, 4, seed=12), _gaussian(200, 4, seed=13)
    mean, std = kid(few, many, subsets=20, subset_size=1000, seed=0)
    assert std > 0  # subsets of 6 out of 200 fakes differ from one another
    assert kid(few, many, subsets=20, subset_size=1000, seed=0) == (mean, std)  # seeded
    assert kid(few, many, subsets=20, subset_size=1000, seed=1) != (mean, std)


def test_kid_over_subsets_averages_to_the_whole_set_estimate():
    # Every pair is equally likely to land in a random subset, so the expected subset estimate is
    # the unbiased estimate on the whole sets; subsets are drawn independently, hence the CLT bound.
    x, y = _gaussian(120, 4, seed=14), _gaussian(90, 4, seed=15) * 1.3
    subsets = 400
    mean, std = kid(x, y, subsets=subsets, subset_size=15, seed=3)
    whole_sets = _vectorised_reference_mmd2(x.numpy(), y.numpy())
    assert whole_sets > 0.05  # different laws, so this is not a comparison of two zeros
    assert mean == pytest.approx(whole_sets, abs=4 * std / math.sqrt(subsets))


# ---------------------------------------------------------------- precision / recall


def _reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 written out point by point."""

    def radius(points, i):
        distances = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
        return distances[k - 1]

    def covered(sample, manifold):
        return any(np.linalg.norm(sample - manifold[i]) <= radius(manifold, i) for i in range(len(manifold)))

    precision = np.mean([covered(f, real) for f in fake])
    recall = np.mean([covered(r, fake) for r in real])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_the_point_by_point_reference(k):
    real = _gaussian(30, 2, seed=16).numpy()
    fake = (_gaussian(25, 2, seed=17) + 1.5).numpy()
    expected = _reference_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that exercises both sides
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)


def test_a_point_on_a_ball_boundary_is_inside_the_manifold():
    # Reals 0, 1, 2, 3 on a line: with k=1 every radius is 1. The fake at 4 sits exactly on the
    # ball around 3 (covered, as with the paper's `<=`); the fake at 4.5 does not.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert precision_recall(real, np.array([[4.0], [4.5], [10.0], [11.0]]), k=1)[0] == 0.25


def test_identical_sets_have_full_precision_and_recall():
    x = _gaussian(50, 5, seed=18)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_fakes_collapsed_onto_one_real_point_have_high_precision_and_low_recall():
    real = _gaussian(50, 5, seed=19)
    fake = real[7].repeat(50, 1)
    precision, recall = precision_recall(real, fake)
    assert precision == 1.0
    assert recall == pytest.approx(1 / 50)  # only the real point itself is covered


def test_far_apart_sets_have_zero_precision_and_recall():
    real = _gaussian(40, 5, seed=20)
    assert precision_recall(real, _gaussian(40, 5, seed=21) + 100.0) == (0.0, 0.0)


def test_matched_recall_is_the_mean_over_real_sized_subsets_of_the_fakes():
    real = _gaussian(10, 2, seed=22).numpy()
    fake = (_gaussian(35, 2, seed=23) * 0.5 + 0.5).numpy()  # 3 subsets of 10; the last 5 fakes are left out
    subsets = [_reference_precision_recall(real, fake[i : i + 10], k=3)[1] for i in (0, 10, 20)]
    precision, recall = precision_recall(real, fake, k=3, matched=True)
    assert 0 < min(subsets) and max(subsets) < 1 and len(set(subsets)) > 1  # subsets that differ
    assert recall == pytest.approx(np.mean(subsets), abs=1e-12)
    assert precision == pytest.approx(_reference_precision_recall(real, fake, k=3)[0], abs=1e-12)


def test_matched_recall_changes_nothing_when_there_are_no_more_fakes_than_reals():
    real, fake = _gaussian(30, 2, seed=16), _gaussian(25, 2, seed=17) + 1.5
    assert precision_recall(real, fake, matched=True) == precision_recall(real, fake)


def test_matched_recall_does_not_fall_as_more_fakes_are_drawn():
    # Fakes drawn on a line through a 2-D cloud of reals: the more fakes, the thinner their unmatched manifold.
    real = _gaussian(12, 2, seed=24)
    many = _gaussian(12 * 16, 2, seed=25) * torch.tensor([1.0, 0.0], dtype=torch.float64)
    few = many[:12]
    assert precision_recall(real, many)[1] < precision_recall(real, few)[1] / 2
    assert precision_recall(real, many, matched=True)[1] == pytest.approx(precision_recall(real, few)[1], abs=0.15)


# ---------------------------------------------------------------- diversity


def test_diversity_is_zero_for_a_collapsed_set_and_matches_the_pairwise_reference():
    assert diversity(torch.ones(20, 6)) == 0.0
    x = _gaussian(12, 3, seed=22).numpy()
    pairs = list(itertools.combinations(range(12), 2))
    expected = sum(np.linalg.norm(x[i] - x[j]) for i, j in pairs) / len(pairs)
    assert diversity(x) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- bad input

GOOD = torch.randn(10, 4)


@pytest.mark.parametrize(
    ("metric", "kwargs"),
    [(fid, {}), (kid, {}), (precision_recall, {"k": 3})],
    ids=["fid", "kid", "precision_recall"],
)
@pytest.mark.parametrize(
    ("real", "fake", "message"),
    [
        (GOOD, torch.randn(10, 5), "same dimension"),
        (GOOD, torch.randn(1, 4), "fake has 1 samples"),
        (torch.randn(10), GOOD, r"real must be a feature matrix \[N, d\]"),
        (GOOD.clone().index_fill_(0, torch.tensor([2]), float("nan")), GOOD, "real contains NaN or inf in 1 of 10"),
        (GOOD, [[0.0] * 4] * 10, "fake must be a torch tensor or numpy array, got list"),
    ],
    ids=["dims", "too-few", "rank", "nan", "type"],
)
def test_bad_input_raises_a_value_error_naming_it(metric, kwargs, real, fake, message):
    with pytest.raises(ValueError, match=message):
        metric(real, fake, **kwargs)


def test_metric_specific_limits_raise():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(GOOD[:3], GOOD, k=3)  # k=3 neighbours need 4 points
    with pytest.raises(ValueError, match="k >= 1"):
        precision_recall(GOOD, GOOD, k=0)
    with pytest.raises(ValueError, match="subsets >= 1"):
        kid(GOOD, GOOD, subsets=0)
    with pytest.raises(ValueError, match="features has 1 samples"):
        diversity(GOOD[:1])
    with pytest.raises(ValueError, match="features contains NaN or inf"):
        diversity(torch.tensor([[1.0], [float("inf")]]))


# ---------------------------------------------------------------- recognizability


def _reference_recognizability(samples, prototypes, ways, episodes, seed):
    """Episode by episode, sample by sample, class by class; the same episodes as the metric draws."""
    rng = np.random.default_rng(seed)
    scores = []
    for task, features in enumerate(samples):
        others = [t for t in range(len(prototypes)) if t != task]
        columns = [[task, *rng.choice(others, ways - 1, replace=False)] for _ in range(episodes)]
        hits = 0
        for episode in columns:
            for x in features:
                distances = [math.dist(x.tolist(), prototypes[c].tolist()) for c in episode]
                hits += distances.index(min(distances)) == 0
        scores.append(hits / (episodes * len(features)))
    return scores


def test_recognizability_matches_the_sample_by_sample_reference():
    prototypes = _gaussian(7, 5, seed=1)
    samples = [prototypes[t] + 1.5 * _gaussian(6, 5, seed=10 + t) for t in range(7)]
    got = recognizability(samples, prototypes, ways=4, episodes=5, seed=3)
    assert got == pytest.approx(_reference_recognizability(samples, prototypes, 4, 5, 3))
    assert 0 < min(got) and max(got) < 1  # a test that can tell right from wrong: neither all hits nor none


def test_recognizability_is_one_for_samples_at_their_prototype_and_zero_at_anothers():
    prototypes = _gaussian(5, 3, seed=2)
    own = [prototypes[t].expand(4, -1) + 1e-3 for t in range(5)]
    assert recognizability(own, prototypes, ways=5, episodes=3) == [1.0] * 5
    wrong = [prototypes[(t + 1) % 5].expand(4, -1) for t in range(5)]
    assert recognizability(wrong, prototypes, ways=5, episodes=3) == [0.0] * 5


def test_recognizability_of_features_unrelated_to_the_tasks_is_chance():
    prototypes = _gaussian(40, 8, seed=4)
    samples = [_gaussian(50, 8, seed=100 + t) for t in range(40)]
    assert np.mean(recognizability(samples, prototypes, ways=20, episodes=20, seed=0)) == pytest.approx(1 / 20, abs=0.02)


def test_recognizability_bad_input_names_it():
    prototypes = _gaussian(4, 3, seed=5)
    samples = [_gaussian(2, 3, seed=t) for t in range(4)]
    with pytest.raises(ValueError, match="samples of 3 tasks but 4 prototypes"):
        recognizability(samples[:3], prototypes, ways=2)
    with pytest.raises(ValueError, match="2 <= ways <= 4"):
        recognizability(samples, prototypes, ways=5)
    with pytest.raises(ValueError, match="samples\\[1\\] has feature dimension 2"):
        recognizability([samples[0], _gaussian(2, 2, seed=9), *samples[2:]], prototypes, ways=2)
    with pytest.raises(ValueError, match="episodes >= 1"):
        recognizability(samples, prototypes, ways=2, episodes=0)
