"""Memorization and provenance of generated faces.

Two questions, answered with pure functions on arrays:

1. Does a generated face sit closer to a training photo than real faces do? For each generated
   face: the distance to its nearest training photo and to its nearest held-out real photo
   (photos of the same distribution that were not used for fitting). Held-out photos give the
   reference: how close a *new* real face typically comes to the training set. The report
   gives the share of generated faces closer to a training photo than any held-out photo is to
   its own nearest training photo (threshold = the minimum over held-out photos), the same
   share with a less brittle threshold (a low quantile, default the 5th percentile, of those
   held-out distances), and the share of generated faces closer to the training set than to
   the held-out set (about 1/2 when the two sets are equally large and the model does not copy,
   in the spirit of the data-copying test of Meehan et al. 2020, "A non-parametric test to detect
   data-copying in generative models"). Works in any space:
   Inception features, or latents (N, C, h, w) flattened per face.
2. From the provenance map of a patch-copying model (LR-GMM-NN refinement, latent patches;
   papers/000): which training photo each latent pixel was copied from (-1: not copied). Per
   face, the number of distinct training photos and the largest share of the face taken from
   one photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .distribution import check_features, check_same_dim
from .manifold import distance_chunks

__all__ = ["MemorizationReport", "ProvenanceStats", "memorization_report", "nearest_distances", "provenance_stats"]


def nearest_distances(queries, bank, *, chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query to its nearest bank row, and that row's index.

    Parameters
    ----------
    queries : array (N, D) or (N, ...)
        Rows with more than two dims (e.g. latents (N, C, h, w)) are flattened per item.
    bank : array (M, D) or (M, ...), M >= 1
    chunk_size : int, optional
        Queries per distance block (default: about 128 MB per block).

    Returns
    -------
    distances (N,) float64, indices (N,) int64
        Ties go to the lowest index.
    """
    q = check_features(queries, "queries", min_rows=0, flatten=True)
    b = check_features(bank, "bank", flatten=True)
    check_same_dim(q, b, "queries", "bank")
    dist = np.empty(q.shape[0], dtype=np.float64)
    idx = np.empty(q.shape[0], dtype=np.int64)
    for start, stop, d in distance_chunks(q, b, chunk_size):  # d (chunk, M)
        v, i = d.min(dim=1)
        dist[start:stop] = v.numpy()
        idx[start:stop] = i.numpy()
    return dist, idx


@dataclass(frozen=True)
class MemorizationReport:
    """Nearest-neighbour distances of generated faces to training and held-out photos.

    Attributes
    ----------
    gen_to_train, gen_to_train_index : (N,) float64, (N,) int64
        Distance from each generated face to its nearest training photo, and that photo.
    gen_to_heldout, gen_to_heldout_index : (N,), (N,)
        The same against the held-out photos.
    heldout_to_train, heldout_to_train_index : (M,), (M,)
        Distance from each held-out photo to its nearest training photo.
    threshold_min : float
        min(heldout_to_train): no held-out photo is closer to the training set than this.
    share_below_min : float
        Share of generated faces with gen_to_train < threshold_min ("closer to a training photo
        than any held-out photo is to its own nearest training photo"). Brittle: one held-out
        near-duplicate of a training photo drives it to 0.
    quantile, threshold_quantile : float
        The quantile q (default 0.05) and the q-quantile of heldout_to_train (numpy's linear
        interpolation).
    share_below_quantile : float
        Share of generated faces with gen_to_train < threshold_quantile (q of held-out photos
        are that close; a faithful non-copying model gives about q).
    share_closer_to_train : float
        Share of generated faces with gen_to_train < gen_to_heldout.
    """

    gen_to_train: np.ndarray
    gen_to_train_index: np.ndarray
    gen_to_heldout: np.ndarray
    gen_to_heldout_index: np.ndarray
    heldout_to_train: np.ndarray
    heldout_to_train_index: np.ndarray
    threshold_min: float
    share_below_min: float
    quantile: float
    threshold_quantile: float
    share_below_quantile: float
    share_closer_to_train: float

    @property
    def flagged_min(self) -> np.ndarray:
        """Indices of generated faces below threshold_min (candidate copies)."""
        return np.flatnonzero(self.gen_to_train < self.threshold_min)

    @property
    def flagged_quantile(self) -> np.ndarray:
        """Indices of generated faces below threshold_quantile."""
        return np.flatnonzero(self.gen_to_train < self.threshold_quantile)

    def summary(self) -> dict:
        """Scalars only (for tables and JSON)."""
        return {
            "n_generated": int(self.gen_to_train.shape[0]),
            "n_heldout": int(self.heldout_to_train.shape[0]),
            "gen_to_train_median": float(np.median(self.gen_to_train)),
            "gen_to_train_min": float(self.gen_to_train.min()),
            "gen_to_heldout_median": float(np.median(self.gen_to_heldout)),
            "heldout_to_train_median": float(np.median(self.heldout_to_train)),
            "threshold_min": self.threshold_min,
            "share_below_min": self.share_below_min,
            "quantile": self.quantile,
            "threshold_quantile": self.threshold_quantile,
            "share_below_quantile": self.share_below_quantile,
            "share_closer_to_train": self.share_closer_to_train,
        }


def memorization_report(
    gen_feats, train_feats, heldout_feats, *, quantile: float = 0.05, chunk_size: int | None = None
) -> MemorizationReport:
    """Nearest training / held-out distances of generated faces, and the shares that flag copies.

    Parameters
    ----------
    gen_feats : array (N, D) or (N, ...)
        Generated faces, in the same space as the photos (Inception features, or latents
        (N, C, h, w), flattened per face).
    train_feats : array (T, D) or (T, ...)
        The photos the model was fitted on.
    heldout_feats : array (M, D) or (M, ...)
        Real photos of the same distribution not used for fitting.
    quantile : float in (0, 1)
        The quantile of held-out-to-training distances used as the less brittle threshold.
    chunk_size : int, optional
        Rows per distance block.

    Returns
    -------
    MemorizationReport
    """
    g = check_features(gen_feats, "gen_feats", flatten=True)
    t = check_features(train_feats, "train_feats", flatten=True)
    h = check_features(heldout_feats, "heldout_feats", flatten=True)
    check_same_dim(g, t, "gen_feats", "train_feats")
    check_same_dim(h, t, "heldout_feats", "train_feats")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < float(quantile) < 1.0:
        raise InputError(f"quantile must be a number strictly between 0 and 1, got {quantile!r}; try 0.05")
    g_t, g_ti = nearest_distances(g, t, chunk_size=chunk_size)
    g_h, g_hi = nearest_distances(g, h, chunk_size=chunk_size)
    h_t, h_ti = nearest_distances(h, t, chunk_size=chunk_size)
    thr_min = float(h_t.min())
    thr_q = float(np.quantile(h_t, float(quantile)))
    return MemorizationReport(
        gen_to_train=g_t,
        gen_to_train_index=g_ti,
        gen_to_heldout=g_h,
        gen_to_heldout_index=g_hi,
        heldout_to_train=h_t,
        heldout_to_train_index=h_ti,
        threshold_min=thr_min,
        share_below_min=float(np.mean(g_t < thr_min)),
        quantile=float(quantile),
        threshold_quantile=thr_q,
        share_below_quantile=float(np.mean(g_t < thr_q)),
        share_closer_to_train=float(np.mean(g_t < g_h)),
    )


@dataclass(frozen=True)
class ProvenanceStats:
    """Per-face provenance counts from a provenance map (N, h, w).

    Attributes
    ----------
    distinct : (N,) int64
        Number of distinct training photos a face's pixels were copied from.
    largest_share : (N,) float64
        Largest share of the face's h*w pixels copied from one training photo (0 if none).
    top_photo : (N,) int64
        That photo's index (-1 if nothing was copied; ties go to the lowest index).
    copied_share : (N,) float64
        Share of the face's pixels with a provenance (>= 0). The largest share among copied
        pixels only (as in ``Generator.provenance_summary``) is largest_share / copied_share.
    mean_distinct, median_distinct, mean_largest_share, median_largest_share : float
    """

    distinct: np.ndarray
    largest_share: np.ndarray
    top_photo: np.ndarray
    copied_share: np.ndarray
    mean_distinct: float
    median_distinct: float
    mean_largest_share: float
    median_largest_share: float

    def summary(self) -> dict:
        return {
            "n_faces": int(self.distinct.shape[0]),
            "mean_distinct": self.mean_distinct,
            "median_distinct": self.median_distinct,
            "mean_largest_share": self.mean_largest_share,
            "median_largest_share": self.median_largest_share,
            "mean_copied_share": float(self.copied_share.mean()) if self.copied_share.size else float("nan"),
        }


def provenance_stats(provenance) -> ProvenanceStats:
    """Distinct training photos per face and the largest share taken from one photo.

    Parameters
    ----------
    provenance : int array (N, h, w) (numpy or torch)
        Training-photo index of each latent pixel; -1 where nothing was copied.

    Returns
    -------
    ProvenanceStats
    """
    if isinstance(provenance, torch.Tensor):
        provenance = provenance.detach().cpu().numpy()
    if not isinstance(provenance, np.ndarray):
        raise InputError(f"provenance must be an int array (N, h, w), got {type(provenance).__name__}")
    if provenance.ndim != 3:
        raise InputError(f"provenance must be 3-D (N, h, w), got shape {provenance.shape}; add a batch dimension for one face")
    if not np.issubdtype(provenance.dtype, np.integer) or provenance.dtype == np.bool_:
        raise InputError(f"provenance must hold integer photo indices, got dtype {provenance.dtype}")
    n = provenance.shape[0]
    flat = provenance.reshape(n, -1).astype(np.int64)
    pixels = flat.shape[1]
    if pixels == 0:
        raise InputError(f"provenance must have at least one pixel per face, got shape {provenance.shape}")
    if flat.size and flat.min() < -1:
        raise InputError(f"provenance values must be photo indices >= 0 or -1 (not copied), got minimum {int(flat.min())}")
    distinct = np.zeros(n, dtype=np.int64)
    largest = np.zeros(n, dtype=np.float64)
    top = np.full(n, -1, dtype=np.int64)
    copied = np.zeros(n, dtype=np.float64)
    for i in range(n):
        row = flat[i][flat[i] >= 0]
        copied[i] = row.size / pixels
        if row.size == 0:
            continue
        values, counts = np.unique(row, return_counts=True)  # values sorted: argmax ties -> lowest index
        j = int(np.argmax(counts))
        distinct[i] = values.size
        largest[i] = counts[j] / pixels
        top[i] = values[j]
    nan = float("nan")
    return ProvenanceStats(
        distinct=distinct,
        largest_share=largest,
        top_photo=top,
        copied_share=copied,
        mean_distinct=float(distinct.mean()) if n else nan,
        median_distinct=float(np.median(distinct)) if n else nan,
        mean_largest_share=float(largest.mean()) if n else nan,
        median_largest_share=float(np.median(largest)) if n else nan,
    )
