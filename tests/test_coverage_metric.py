"""Per-subgroup coverage (papers/004 ch. 7 analogue of Table 7.3)."""

import numpy as np

from faceprint.metrics.coverage import subgroup_coverage


def test_subgroup_left_out_versus_covered():
    rng = np.random.default_rng(0)
    sub = rng.normal(0, 1, (60, 8)) + 10  # the subgroup lives far from the bulk
    bulk_only = rng.normal(0, 1, (400, 8))
    covered = np.concatenate([bulk_only[:340], rng.normal(0, 1, (60, 8)) + 10])
    a = subgroup_coverage(sub, bulk_only)
    b = subgroup_coverage(sub, covered)
    assert a.recall == 0 and a.coverage == 0
    assert b.recall > 0.8 and b.coverage > 0.8
    assert a.nn_distance_mean > 3 * b.nn_distance_mean
    # the IvOM analogue is the mean nearest-generated distance, checked by brute force
    d = np.sqrt(((sub[:, None] - covered[None]) ** 2).sum(-1)).min(1)
    assert np.isclose(b.nn_distance_mean, d.mean()) and np.isclose(b.nn_distance_median, np.median(d))
    assert b.n_real == 60 and b.n_generated == 400
