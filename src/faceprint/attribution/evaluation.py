"""Measures of an attribution: accuracy, confusion, the FD ratio (papers/004, Sec. 4.4.1) and
open-set rates with their Clopper-Pearson bounds.

FD ratio: the chapter reports "the ratio of inter-class and intra-class Frechet Distance" of a
feature without a formula. Here: inter = the mean, over pairs of sources, of the Frechet
distance between their feature sets; intra = the mean, over sources, of the Frechet distance
between two random halves of one source's features (what sampling alone gives). A ratio near 1
means the sources are no further apart than two samples of one source.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from ..errors import InputError


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    if pred.shape != labels.shape or labels.numel() == 0:
        raise InputError(f"pred and labels must be non-empty and of one shape, got {tuple(pred.shape)} and {tuple(labels.shape)}")
    return float((pred.long() == labels.long()).double().mean())


def confusion(pred: torch.Tensor, labels: torch.Tensor, k: int) -> list[list[int]]:
    """Counts [true][predicted]."""
    m = torch.zeros(k, k, dtype=torch.int64)
    m.index_put_((labels.long(), pred.long()), torch.ones(labels.numel(), dtype=torch.int64), accumulate=True)
    return m.tolist()


def chance_band(k: int, n: int, sigmas: float = 3.0) -> tuple[float, float]:
    """Chance accuracy 1/k +- ``sigmas`` binomial standard deviations for n test images."""
    p = 1.0 / k
    s = math.sqrt(p * (1 - p) / max(1, n))
    return p - sigmas * s, p + sigmas * s


def fd_ratio(features, labels, *, seed: int = 0) -> dict:
    """Inter- over intra-class Frechet distance of ``features`` (N, D) grouped by ``labels`` (N,)."""
    from ..metrics.distribution import feature_stats, fid_from_stats

    f = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    classes = sorted(set(int(c) for c in y))
    if len(classes) < 2:
        raise InputError("fd_ratio needs features of at least 2 sources")
    rng = np.random.default_rng(seed)
    stats, intra = {}, []
    for c in classes:
        fc = f[y == c]
        if fc.shape[0] < 4:
            raise InputError(f"fd_ratio needs at least 4 images per source, source {c} has {fc.shape[0]}")
        stats[c] = feature_stats(fc)
        perm = rng.permutation(fc.shape[0])
        a, b = fc[perm[: fc.shape[0] // 2]], fc[perm[fc.shape[0] // 2:]]
        intra.append(fid_from_stats(*feature_stats(a), *feature_stats(b)))
    inter = [fid_from_stats(*stats[a], *stats[b]) for a, b in itertools.combinations(classes, 2)]
    i_mean, e_mean = float(np.mean(inter)), float(np.mean(intra))
    return {"inter": i_mean, "intra": e_mean, "ratio": i_mean / e_mean if e_mean > 0 else float("inf")}


def rate_with_bound(k: int, n: int, confidence: float = 0.95) -> dict:
    """k events in n trials: the rate and its one-sided Clopper-Pearson upper bound."""
    from ..fingerprint.verification import clopper_pearson_upper

    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "upper95": None}
    return {"k": int(k), "n": int(n), "rate": k / n, "upper95": clopper_pearson_upper(int(k), int(n), confidence)}
