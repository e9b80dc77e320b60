"""k-NN manifold metrics between real and generated feature sets.

- Improved precision and recall: Kynkaanniemi et al. 2019, "Improved precision and recall
  metric for assessing generative models", Sec. 2, Eqs. (1)-(3). Each set's manifold is the
  union of balls around its samples, the radius of a sample's ball being the distance to its
  k-th nearest neighbour in the same set (itself excluded; k = 3 in the paper). Precision is
  the share of generated samples inside the real manifold, recall the share of real samples
  inside the generated manifold. A sample on a ball's boundary counts as inside (``<=``), as in
  the authors' code.
- Density and coverage: Naeem et al. 2020, "Reliable fidelity and diversity metrics for
  generative models", Sec. 3, Eqs. (3)-(4) (k = 5 in the paper). Only real balls are used:
  density = (1 / (k M)) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))] (can exceed 1), coverage =
  share of real samples whose ball holds at least one generated sample. Inside means strictly
  closer (``<``), as in the authors' code (prdc).

Distances are Euclidean, computed in float64 with ``torch.cdist`` over row chunks of about
128 MB, so 10k x 10k sets of 2048-d features never hold a full distance matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from ..errors import InputError
from .distribution import check_features, check_positive_int, check_same_dim

__all__ = ["DensityCoverage", "PrecisionRecall", "density_coverage", "kth_nn_distances", "precision_recall"]

_CHUNK_BYTES = 128 * 2**20


def _chunk_rows(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return check_positive_int(chunk_size, "chunk_size", "1024")
    return max(1, min(8192, _CHUNK_BYTES // (8 * max(1, n_cols))))


def distance_chunks(a: np.ndarray, b: np.ndarray, chunk_size: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, D) with D (stop - start, N_b) float64 = ||a[start:stop, None] - b[None]||."""
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    rows = _chunk_rows(tb.shape[0], chunk_size)
    with torch.no_grad():
        for start in range(0, ta.shape[0], rows):
            stop = min(start + rows, ta.shape[0])
            yield start, stop, torch.cdist(ta[start:stop], tb)


def kth_nn_distances(x, k: int, *, chunk_size: int | None = None) -> np.ndarray:
    """Distance (N,) from each row of x (N, D) to its k-th nearest other row (itself excluded).

    Duplicated rows count as neighbours at distance 0. Needs N > k.
    """
    x = check_features(x, "x")
    k = check_positive_int(k, "k", "3")
    if x.shape[0] <= k:
        raise InputError(f"k-NN radii with k={k} need more than {k} samples, got {x.shape[0]}; use a smaller k or more samples")
    out = np.empty(x.shape[0], dtype=np.float64)
    for start, stop, d in distance_chunks(x, x, chunk_size):
        idx = torch.arange(start, stop)
        d[idx - start, idx] = float("inf")  # exclude each point itself
        out[start:stop] = torch.topk(d, k, dim=1, largest=False).values[:, -1].numpy()
    return out


def _pair(real, fake, k: int, min_fake: int):
    r = check_features(real, "real")
    f = check_features(fake, "fake")
    check_same_dim(r, f, "real", "fake")
    k = check_positive_int(k, "k", "3")
    if r.shape[0] <= k:
        raise InputError(f"real needs more than k={k} samples for its k-NN radii, got {r.shape[0]}")
    if f.shape[0] < min_fake:
        raise InputError(f"fake needs at least {min_fake} samples here (k={k}), got {f.shape[0]}")
    return r, f, k


class PrecisionRecall(NamedTuple):
    """Improved precision and recall (shares in [0, 1])."""

    precision: float
    recall: float


class DensityCoverage(NamedTuple):
    """Density (>= 0, ~1 when the two sets match; can exceed 1) and coverage (in [0, 1])."""

    density: float
    coverage: float


def precision_recall(real, fake, *, k: int = 3, chunk_size: int | None = None) -> PrecisionRecall:
    """Improved precision and recall of generated features against real ones (Kynkaanniemi et al. 2019).

    Parameters
    ----------
    real, fake : array (N_real, D), (N_fake, D)
        Features of real and generated images (the paper: VGG-16 fc2; the usual choice here:
        Inception pool3). Both need more than k rows.
    k : int
        Neighbourhood size of the radii (3 in the paper).
    chunk_size : int, optional
        Rows per distance block (default: about 128 MB per block).

    Returns
    -------
    PrecisionRecall
        precision = mean_j 1[exists i: ||fake_j - real_i|| <= r_k(real_i)];
        recall = mean_i 1[exists j: ||real_i - fake_j|| <= r_k(fake_j)].
        A mode-collapsed fake set (all near a few real samples) has high precision and low
        recall; identical sets have precision = recall = 1.
    """
    r, f, k = _pair(real, fake, k, min_fake=k + 1)
    r_real = torch.from_numpy(kth_nn_distances(r, k, chunk_size=chunk_size))  # (N_real,)
    r_fake = torch.from_numpy(kth_nn_distances(f, k, chunk_size=chunk_size))  # (N_fake,)
    in_real = np.zeros(f.shape[0], dtype=bool)  # fake j inside the real manifold
    in_fake = torch.zeros(r.shape[0], dtype=torch.bool)  # real i inside the fake manifold
    for start, stop, d in distance_chunks(f, r, chunk_size):  # d (chunk of fakes, N_real)
        in_real[start:stop] = (d <= r_real[None, :]).any(dim=1).numpy()
        in_fake |= (d <= r_fake[start:stop, None]).any(dim=0)
    return PrecisionRecall(float(in_real.mean()), float(in_fake.double().mean()))


def density_coverage(real, fake, *, k: int = 5, chunk_size: int | None = None) -> DensityCoverage:
    """Density and coverage of generated features against real ones (Naeem et al. 2020).

    Parameters
    ----------
    real, fake : array (N_real, D), (N_fake, D)
        real needs more than k rows; fake at least one.
    k : int
        Neighbourhood size of the real radii (5 in the paper).
    chunk_size : int, optional
        Rows per distance block.

    Returns
    -------
    DensityCoverage
        density = sum_j #{i: ||fake_j - real_i|| < r_k(real_i)} / (k N_fake);
        coverage = mean_i 1[min_j ||real_i - fake_j|| < r_k(real_i)].
    """
    r, f, k = _pair(real, fake, k, min_fake=1)
    r_real = torch.from_numpy(kth_nn_distances(r, k, chunk_size=chunk_size))  # (N_real,)
    count = 0
    nearest_fake = torch.full((r.shape[0],), float("inf"), dtype=torch.float64)
    for _, _, d in distance_chunks(f, r, chunk_size):  # d (chunk of fakes, N_real)
        count += int((d < r_real[None, :]).sum())
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
    density = count / (k * f.shape[0])
    coverage = float((nearest_fake < r_real).double().mean())
    return DensityCoverage(float(density), coverage)
