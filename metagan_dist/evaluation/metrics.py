"""Sample-quality metrics on feature matrices [N, d]: recognizability, FID, KID, k-NN precision/recall, diversity.

Every function accepts torch tensors or numpy arrays, computes in float64 on the CPU and returns
plain Python floats. Bad input (wrong rank, mismatched feature dimensions, too few samples, NaN or
inf) raises ValueError naming the offending argument.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

FeatureMatrix = Tensor | np.ndarray

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def fid(real: FeatureMatrix, fake: FeatureMatrix) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).

    ‖μ_r − μ_f‖² + tr Σ_r + tr Σ_f − 2 tr (Σ_r^½ Σ_f Σ_r^½)^½, with unbiased covariances.
    """
    real, fake = _feature_pair(real, fake, min_samples=2)
    mean_gap = real.mean(0) - fake.mean(0)
    cov_real, cov_fake = _covariance(real), _covariance(fake)
    sqrt_real = _psd_sqrt(cov_real)
    cross_trace = _psd_sqrt(sqrt_real @ cov_fake @ sqrt_real).trace()
    distance = mean_gap @ mean_gap + cov_real.trace() + cov_fake.trace() - 2 * cross_trace
    # The distance is >= 0; a tiny negative value is rounding (e.g. a set against itself).
    return max(float(distance), 0.0)


def kid(
    real: FeatureMatrix,
    fake: FeatureMatrix,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with k(x, y) = (xᵀy/d + 1)³.

    Mean and spread (population standard deviation, not a standard error) over `subsets` random
    subsets of min(subset_size, N_real, N_fake) samples per side, drawn without replacement.
    Unbiased, so usable for small sample counts; the mean can be slightly negative.
    """
    real, fake = _feature_pair(real, fake, min_samples=2)
    if subsets < 1:
        raise ValueError(f"kid needs subsets >= 1, got subsets={subsets}")
    if subset_size < 2:
        raise ValueError(f"kid needs subset_size >= 2, got subset_size={subset_size}")
    size = min(subset_size, len(real), len(fake))
    if size == len(real) == len(fake):
        subsets = 1  # every subset would be both whole sets, reordered: one estimate says it all
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        real_subset = real[torch.from_numpy(rng.choice(len(real), size, replace=False))]
        fake_subset = fake[torch.from_numpy(rng.choice(len(fake), size, replace=False))]
        estimates.append(_unbiased_mmd2(real_subset, fake_subset))
    values = np.asarray(estimates)
    return float(values.mean()), float(values.std())


def _unbiased_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD² between float64 sets x [m, d] and y [n, d] under the cubic polynomial kernel.

    Within-set sums skip the diagonal (i ≠ j); the cross term averages all m·n pairs.
    """
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def precision_recall(
    real: FeatureMatrix, fake: FeatureMatrix, k: int = 3, matched: bool = False
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour manifolds.

    Precision: share of fakes inside the real manifold (union of balls reaching each real point's
    k-th nearest real neighbour); recall: share of reals inside the fake manifold, built alike.
    matched: when there are more fakes than reals, recall is the mean over disjoint subsets of the
    fakes as large as the real set (a remainder is left out), so both manifolds' radii come from sets
    of one size. Otherwise the fakes' radii shrink as more are drawn, and recall falls for the same
    generator. Precision does not depend on the number of fakes and uses them all.
    """
    if k < 1:
        raise ValueError(f"precision_recall needs k >= 1, got k={k}")
    real, fake = _feature_pair(real, fake, min_samples=k + 1)
    real_to_fake = _pairwise_distances(real, fake)  # [N_real, N_fake]
    precision = (real_to_fake <= _knn_radii(real, k)[:, None]).any(dim=0).double().mean()
    size = len(real) if matched and len(fake) > len(real) else len(fake)
    recalls = []
    for start in range(0, len(fake) - size + 1, size):
        subset = slice(start, start + size)
        covered = real_to_fake[:, subset] <= _knn_radii(fake[subset], k)  # [N_real, size]
        recalls.append(covered.any(dim=1).double().mean())
    return float(precision), float(torch.stack(recalls).mean())


def diversity(features: FeatureMatrix) -> float:
    """Mean Euclidean distance over all pairs of distinct samples; near 0 means mode collapse."""
    features = _as_features(features, "features", min_samples=2)
    n = len(features)
    upper = torch.triu_indices(n, n, offset=1)
    return float(_pairwise_distances(features, features)[upper[0], upper[1]].mean())


def recognizability(
    samples: list[FeatureMatrix], prototypes: FeatureMatrix, ways: int = 20, episodes: int = 20, seed: int = 0
) -> list[float]:
    """Is each task's sample set recognisably that task? Per task, N-way nearest-prototype accuracy.

    samples[i] [M_i, d]: features of task i's samples; prototypes [T, d]: row i is task i's prototype
    (the mean feature of its held-out real images). For each task, `episodes` N-way episodes pair it
    with N - 1 other tasks drawn at random; every sample is classified by its nearest prototype
    (Euclidean) among the episode's N, and the task scores the share classified as itself, averaged
    over its episodes. Chance is 1 / N.
    """
    prototypes = _as_features(prototypes, "prototypes", min_samples=2)
    tasks = len(prototypes)
    if len(samples) != tasks:
        raise ValueError(f"recognizability got samples of {len(samples)} tasks but {tasks} prototypes")
    if not 2 <= ways <= tasks:
        raise ValueError(f"recognizability needs 2 <= ways <= {tasks} (the number of tasks), got ways={ways}")
    if episodes < 1:
        raise ValueError(f"recognizability needs episodes >= 1, got episodes={episodes}")
    rng = np.random.default_rng(seed)
    scores = []
    for task, features in enumerate(samples):
        features = _as_features(features, f"samples[{task}]", min_samples=1)
        if features.shape[1] != prototypes.shape[1]:
            raise ValueError(
                f"samples[{task}] has feature dimension {features.shape[1]} but prototypes have {prototypes.shape[1]}"
            )
        others = np.delete(np.arange(tasks), task)
        columns = np.stack([np.concatenate([[task], rng.choice(others, ways - 1, replace=False)]) for _ in range(episodes)])
        distances = torch.cdist(features, prototypes)[:, torch.from_numpy(columns)]  # [M, episodes, N]
        scores.append(float((distances.argmin(dim=2) == 0).double().mean()))
    return scores


def _covariance(samples: Tensor) -> Tensor:
    centred = samples - samples.mean(0)
    return centred.T @ centred / (len(samples) - 1)


def _cubic_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def _knn_radii(points: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point (the point itself excluded)."""
    distances = _pairwise_distances(points, points)
    # Row i holds 0 for the point itself, so the (k+1)-th smallest entry is its k-th neighbour.
    return distances.kthvalue(k + 1, dim=1).values


def _pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    # Direct differences rather than the ‖a‖² + ‖b‖² − 2ab expansion: equal points give exactly 0,
    # which the manifold tests (distance <= radius) rely on.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigen-decomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    # Rounding can push zero eigenvalues of singular covariances (N <= d) slightly below 0.
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _feature_pair(real: FeatureMatrix, fake: FeatureMatrix, min_samples: int) -> tuple[Tensor, Tensor]:
    real = _as_features(real, "real", min_samples)
    fake = _as_features(fake, "fake", min_samples)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake features must have the same dimension; got real {tuple(real.shape)} "
            f"and fake {tuple(fake.shape)}"
        )
    return real, fake


def _as_features(values: FeatureMatrix, name: str, min_samples: int) -> Tensor:
    """Validate a feature matrix [N, d] and return it as a float64 CPU tensor."""
    if not isinstance(values, (Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(values).__name__}")
    tensor = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a feature matrix [N, d], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < min_samples:
        raise ValueError(f"{name} has {tensor.shape[0]} samples; this metric needs at least {min_samples}")
    if tensor.shape[1] < 1:
        raise ValueError(f"{name} has feature dimension 0")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf in {bad} of {tensor.shape[0]} samples")
    return tensor
