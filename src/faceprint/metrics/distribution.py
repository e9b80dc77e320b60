"""Distribution distances between two sets of image features: FID and KID.

- FID: Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local
  Nash equilibrium", Sec. 4 (Frechet distance between Gaussians fitted to the two feature
  sets): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, with the sample covariance
  (ddof=1) as in the reference code (TTUR ``fid.py``).
- KID: Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4 / App. (kernel inception
  distance): the unbiased estimator of MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets as in their reference code
  (``polynomial_mmd_averages``) and torch-fidelity.

All functions are pure: feature arrays (numpy or torch, any float dtype) in, Python floats out;
computations are in float64. They do not care which extractor made the features, but the
usual ones are InceptionV3 pool3 features (:mod:`faceprint.metrics.inception`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..errors import InputError

__all__ = ["KID", "check_features", "feature_stats", "fid", "fid_from_stats", "kid", "mmd2_unbiased"]

FID_METHODS = ("eigh", "sqrtm")


# ----------------------------------------------------------------------------------------------
# Argument checks (also used by manifold.py and memorization.py).


def check_features(x, name: str, *, min_rows: int = 1, flatten: bool = False) -> np.ndarray:
    """A (N, D) float64 numpy array from a numpy array or torch tensor, or InputError.

    With ``flatten`` an (N, ...) array (e.g. latents (N, C, h, w)) becomes (N, prod(...)).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    if not isinstance(x, np.ndarray):
        raise InputError(f"{name} must be a numpy array or torch tensor of shape (N, D), got {type(x).__name__}")
    if flatten and x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2:
        more = " (or (N, ...) with more dims, flattened per item)" if flatten else ""
        raise InputError(
            f"{name} must be 2-D (N, D){more}, got shape {x.shape}; one row per image, e.g. the output of "
            "InceptionFeatures.features()"
        )
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if x.shape[0] < min_rows:
        raise InputError(f"{name} needs at least {min_rows} rows (one per sample), got shape {x.shape}")
    if x.shape[1] < 1:
        raise InputError(f"{name} must have at least one feature column, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise InputError(f"{name} contains {bad} NaN or infinite values; fix them upstream (they are not replaced)")
    return x


def check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"{name_a} and {name_b} must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}; "
            "compute both with the same extractor"
        )


def check_positive_int(value, name: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}; try {example}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# FID.


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and sample covariance (D, D) (ddof=1, as the reference FID) of features (N, D)."""
    x = check_features(features, "features", min_rows=2)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _check_stats(mu, sigma, tag: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu.detach().cpu().numpy() if isinstance(mu, torch.Tensor) else mu, dtype=np.float64)
    sigma = np.asarray(sigma.detach().cpu().numpy() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise InputError(f"mu{tag} must be 1-D (D,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise InputError(f"sigma{tag} must be (D, D) = ({d}, {d}) to match mu{tag}, got shape {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"mu{tag} and sigma{tag} must be finite; fix the statistics upstream")
    scale = max(1.0, float(np.abs(sigma).max(initial=0.0)))
    if not np.allclose(sigma, sigma.T, rtol=0.0, atol=1e-8 * scale):
        raise InputError(f"sigma{tag} must be a symmetric covariance matrix; compute it with np.cov(x, rowvar=False)")
    return mu, sigma


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2.

    S1 S2 is similar to A S2 A with A = S1^(1/2) (symmetric PSD), so its eigenvalues are real
    and non-negative and tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A S2 A)). Two symmetric
    eigendecompositions: no complex arithmetic and no failure on the rank-deficient covariances
    of N < D samples (where scipy's sqrtm returns complex values with round-off imaginary parts).
    """
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    m = 0.5 * (m + m.T)
    lam = np.linalg.eigvalsh(m)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """tr(sqrtm(S1 S2)) exactly as the reference code (TTUR fid.py / pytorch-fid) does it.

    scipy.linalg.sqrtm of the product; if the result is not finite, retry with ``eps`` added to
    both diagonals; a complex result is accepted when the imaginary parts of its diagonal are
    within 1e-3 of 0 (numerical error) and its real part is used; otherwise InputError (a
    ValueError, as in the reference).
    """
    from scipy import linalg

    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = float(np.max(np.abs(covmean.imag)))
            raise InputError(
                f"sqrtm(sigma1 sigma2) has an imaginary component of {m:.3g} (the reference code refuses it too); "
                "use method='eigh', or check that both covariances are positive semi-definite"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def fid_from_stats(mu1, sigma1, mu2, sigma2, *, method: str = "eigh") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    Parameters
    ----------
    mu1, mu2 : array (D,)
    sigma1, sigma2 : array (D, D), symmetric positive semi-definite
    method : {"eigh", "sqrtm"}
        How tr((S1 S2)^(1/2)) is computed. "eigh" (default): two symmetric eigendecompositions
        (see ``_trace_sqrt_product_eigh``), robust for rank-deficient covariances and faster
        (2.4 s vs 13.7 s at D = 2048 on 2 cores). "sqrtm": scipy.linalg.sqrtm with the reference
        code's handling of non-finite and imaginary results. They agree to ~1e-6 relative
        (24.485171 vs 24.485156 for 1000 vs 1000 real photos, whose covariances are singular;
        tests/test_metrics.py checks full-rank and rank-deficient cases).

    Returns
    -------
    float
        The distance (>= 0 up to round-off; tiny negative values are not clipped).
    """
    if method not in FID_METHODS:
        raise InputError(f"method must be one of {FID_METHODS}, got {method!r}; try 'eigh'")
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise InputError(f"mu1 and mu2 must have the same dimension, got {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    tr = _trace_sqrt_product_eigh(sigma1, sigma2) if method == "eigh" else _trace_sqrt_product_sqrtm(sigma1, sigma2)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr)


def fid(features_a, features_b, *, method: str = "eigh") -> float:
    """FID between two feature sets (N_a, D) and (N_b, D) (N >= 2 each).

    Symmetric in its arguments; 0 for identical sets. Like every FID it is biased upwards for
    small N: compare values only at equal set sizes (the usual reporting size is 10k-50k
    generated images against the real set).
    """
    a = check_features(features_a, "features_a", min_rows=2)
    b = check_features(features_b, "features_b", min_rows=2)
    check_same_dim(a, b, "features_a", "features_b")
    mu1, s1 = a.mean(axis=0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(axis=0), np.cov(b, rowvar=False)
    return fid_from_stats(mu1, s1.reshape(a.shape[1], a.shape[1]), mu2, s2.reshape(b.shape[1], b.shape[1]), method=method)


# ----------------------------------------------------------------------------------------------
# KID.


class KID(NamedTuple):
    """Kernel inception distance: mean and standard deviation (ddof=0) of the unbiased MMD^2
    over random subsets, and the per-subset values."""

    mean: float
    std: float
    values: np.ndarray


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D) with k(a, b) = (a.b / D + 1)^3.

    ``sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n)`` (m = n in KID; the reference code's "unbiased" form).
    """
    x = check_features(x, "x", min_rows=2)
    y = check_features(y, "y", min_rows=2)
    check_same_dim(x, y, "x", "y")
    return _mmd2(x, y)


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, n = x.shape[0], y.shape[0]
    kxx = _polynomial_kernel(x, x)
    kyy = _polynomial_kernel(y, y)
    kxy = _polynomial_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.sum() / (m * n))


def kid(features_a, features_b, *, subsets: int = 100, subset_size: int = 1000, seed=0) -> KID:
    """Kernel inception distance between two feature sets (Binkowski et al. 2018).

    For each of ``subsets`` rounds, ``subset_size`` rows are drawn without replacement from each
    set (independently) and the unbiased MMD^2 of :func:`mmd2_unbiased` is computed; the result
    is the mean and standard deviation over rounds (torch-fidelity's defaults: 100 x 1000).

    Parameters
    ----------
    features_a, features_b : array (N_a, D), (N_b, D)
        Both sets need at least ``subset_size`` rows.
    subsets : int
        Number of random subsets.
    subset_size : int
        Rows per subset (>= 2); choose it <= min(N_a, N_b), e.g. 1000 for 10k-image sets.
    seed : int or numpy.random.Generator
        Randomness of the subset draws (numpy ``default_rng(seed)``); the same seed gives the
        same result.

    Returns
    -------
    KID
        (mean, std, values (subsets,)). KID is unbiased: it can be slightly negative for two
        samples of the same distribution.
    """
    a = check_features(features_a, "features_a", min_rows=2)
    b = check_features(features_b, "features_b", min_rows=2)
    check_same_dim(a, b, "features_a", "features_b")
    subsets = check_positive_int(subsets, "subsets", "100")
    subset_size = check_positive_int(subset_size, "subset_size", "1000")
    if subset_size < 2:
        raise InputError(f"subset_size must be at least 2, got {subset_size}; try 1000")
    smallest = min(a.shape[0], b.shape[0])
    if subset_size > smallest:
        raise InputError(
            f"subset_size ({subset_size}) must not exceed the size of either set ({a.shape[0]} and {b.shape[0]} rows); "
            f"pass subset_size={smallest} or fewer, or use larger sets"
        )
    if isinstance(seed, np.random.Generator):
        rng = seed
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        rng = np.random.default_rng(int(seed))
    else:
        raise InputError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__} {seed!r}")
    values = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        ia = rng.choice(a.shape[0], subset_size, replace=False)
        ib = rng.choice(b.shape[0], subset_size, replace=False)
        values[i] = _mmd2(a[ia], b[ib])
    return KID(float(values.mean()), float(values.std()), values)
