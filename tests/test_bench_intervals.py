"""The rebalance benchmark's interval for classifier-corrected shares."""

import numpy as np

from faceprint.bench.taming_control import corrected_interval
from faceprint.recognition.attributes import correct_proportions


def test_perfect_classifier_gives_the_binomial_interval():
    lo, hi = corrected_interval([0.3, 0.7], np.eye(2), [10_000, 10_000], 1000, draws=4000, seed=1)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 1000)
    assert abs(lo[0] - (0.3 - half)) < 0.006 and abs(hi[0] - (0.3 + half)) < 0.006
    assert abs(lo[1] - (0.7 - half)) < 0.006


def test_interval_is_around_the_corrected_share_and_widens_with_classifier_error():
    C = np.array([[0.9, 0.1], [0.2, 0.8]])
    p = np.array([0.25, 0.75])
    m = C.T @ p  # what the classifier would measure on faces with true shares p
    assert np.allclose(correct_proportions(m, C), p)
    lo, hi = corrected_interval(m, C, [2000, 2000], 1000, seed=0)
    assert lo[0] < 0.25 < hi[0] and lo[1] < 0.75 < hi[1]
    lo_few, hi_few = corrected_interval(m, C, [50, 50], 1000, seed=0)  # rates known from few photos
    assert hi_few[0] - lo_few[0] > 1.3 * (hi[0] - lo[0])
    lo_p, hi_p = corrected_interval(m, np.eye(2), [2000, 2000], 1000, seed=0)  # no correction: narrower
    assert hi_p[0] - lo_p[0] < hi[0] - lo[0]
