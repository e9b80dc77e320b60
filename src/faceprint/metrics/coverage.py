"""Per-subgroup coverage of a generated set (papers/004 ch. 7, Sec. 7.4.3-7.4.5 and Table 7.3).

Ch. 7 measures minority inclusion on the subgroup's real photos only: precision and recall,
and IvOM, the mean error of the best reconstruction of each real photo by the generator. A
faceprint model has no latent to optimise per photo, so the analogue of IvOM here is the
distance from each real photo of the subgroup to its nearest generated face in a feature
space (Inception pool features by default): low when every subgroup photo has a generated
face close to it. Recall and coverage are computed with the subgroup's real photos as the real
set and all generated faces as the generated set, so they say how much of the subgroup's
region the model's output reaches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .distribution import check_features, check_same_dim
from .manifold import density_coverage, precision_recall
from .memorization import nearest_distances


@dataclass
class SubgroupCoverage:
    n_real: int
    n_generated: int
    recall: float  # improved recall (k = 3), real = the subgroup's photos
    coverage: float  # Naeem et al. coverage (k = 5), real = the subgroup's photos
    nn_distance_mean: float  # mean distance from a subgroup photo to its nearest generated face (IvOM analogue)
    nn_distance_std: float
    nn_distance_median: float

    def as_dict(self) -> dict:
        return asdict(self)


def subgroup_coverage(real_subgroup, generated, *, k_recall: int = 3, k_coverage: int = 5,
                      chunk_size: int | None = None) -> SubgroupCoverage:
    """Coverage of one subgroup by a generated set.

    Parameters
    ----------
    real_subgroup : (M, D) features of the subgroup's real photos (M > k_coverage).
    generated : (N, D) features of the generated faces.
    """
    r = check_features(real_subgroup, "real_subgroup")
    g = check_features(generated, "generated")
    check_same_dim(r, g, "real_subgroup", "generated")
    pr = precision_recall(r, g, k=k_recall, chunk_size=chunk_size)
    dc = density_coverage(r, g, k=k_coverage, chunk_size=chunk_size)
    d, _ = nearest_distances(r, g, chunk_size=chunk_size)
    return SubgroupCoverage(n_real=int(r.shape[0]), n_generated=int(g.shape[0]), recall=float(pr.recall),
                            coverage=float(dc.coverage), nn_distance_mean=float(np.mean(d)),
                            nn_distance_std=float(np.std(d)), nn_distance_median=float(np.median(d)))
