"""Verification: Eq. 5.5 p-values, calibration on measured negatives, verdicts."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest

from faceprint.errors import ArtifactError, ConfigError, InputError
from faceprint.fingerprint.verification import (
    Calibration,
    CalibrationConfig,
    Verdict,
    binomial_p_value,
    binomial_p_values,
    bit_accuracy,
    clopper_pearson_upper,
    corrected_p_value,
    matching_bits,
    verify,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _counts(values_and_repeats):
    return torch.cat([torch.full((r,), v, dtype=torch.long) for v, r in values_and_repeats])


def _reference_threshold(counts, n_bits=128, target=1e-3, conf=0.95, k=1, require_binomial=True):
    """Brute force, written independently of the implementation."""
    hist = np.bincount(counts.numpy(), minlength=n_bits + 2)
    exceed_at = np.cumsum(hist[::-1])[::-1]  # exceed_at[m] = #counts >= m
    n = counts.numel()
    for m in range(n_bits + 1):
        exceed = int(exceed_at[m])
        upper = 1.0 if exceed == n else float(beta.ppf(conf, exceed + 1, n - exceed))
        if upper > target:
            continue
        p = float(binom.sf(m - 1, n_bits, 0.5))
        if require_binomial and 1 - (1 - p) ** k > target:
            continue
        return m
    return None


# -- bit statistics -------------------------------------------------------------------------------


def test_binomial_p_value_matches_scipy_and_is_exact_in_the_tail():
    for m in [0, 1, 40, 63, 64, 65, 70, 80, 90, 96, 100, 110, 120, 127, 128]:
        ref = float(binom.sf(m - 1, 128, 0.5))
        assert binomial_p_value(m) == pytest.approx(ref, rel=1e-12, abs=0)
    assert binomial_p_value(128) == 2.0**-128
    assert binomial_p_value(127) == 129 * 2.0**-128
    assert binomial_p_value(0) == 1.0
    assert binomial_p_value(3, n=4) == 5 / 16
    # the paper's operating point: 75 % of 100 bits -> p = 2.8e-7 (papers/004, Sec. 5.5.4)
    assert binomial_p_value(75, n=100) == pytest.approx(2.8e-7, rel=0.02)
    p = [binomial_p_value(m) for m in range(129)]
    assert all(a >= b for a, b in zip(p, p[1:]))
    assert all(a > b for a, b in zip(p[20:], p[21:]))  # below 20 the tail rounds to 1.0
    with pytest.raises(InputError):
        binomial_p_value(129)
    with pytest.raises(InputError):
        binomial_p_value(64.0)


def test_binomial_p_values_vectorised():
    counts = torch.tensor([[0, 64], [100, 128]])
    p = binomial_p_values(counts)
    assert p.dtype == torch.float64 and p.shape == (2, 2)
    assert p[1, 1].item() == 2.0**-128
    assert p[0, 1].item() == pytest.approx(binom.sf(63, 128, 0.5), rel=1e-12)


def test_matching_bits_and_accuracy():
    a = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    ref = torch.tensor([1, 0, 0, 1], dtype=torch.bool)
    assert matching_bits(a, ref).tolist() == [3, 2]
    assert bit_accuracy(a, ref).tolist() == [0.75, 0.5]
    assert int(matching_bits(ref, ref)) == 4
    with pytest.raises(InputError, match="torch.bool"):
        matching_bits(a.float(), ref)


def test_corrected_p_value():
    assert corrected_p_value(0.01, 10) == pytest.approx(1 - 0.99**10, rel=1e-12)
    tiny = 2.0**-100
    assert corrected_p_value(tiny, 1000) == pytest.approx(tiny * 1000, rel=1e-9)
    assert corrected_p_value(1.0, 5) == 1.0
    for p, k in [(0.3, 4), (1e-3, 50), (1e-9, 10**6)]:
        assert corrected_p_value(p, k) <= min(1.0, p * k) + 1e-18


def test_clopper_pearson_upper_bound():
    # rule of three: 0 of n -> about 3/n at 95 %
    assert clopper_pearson_upper(0, 10_000) == pytest.approx(1 - 0.05 ** (1 / 10_000), rel=1e-12)
    assert clopper_pearson_upper(0, 10_000) == pytest.approx(3 / 10_000, rel=0.01)
    for k, n in [(1, 10_000), (7, 10_000), (50, 200)]:
        # the one-sided 95 % bound is the upper end of the two-sided 90 % exact interval
        two_sided = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high
        assert clopper_pearson_upper(k, n) == pytest.approx(two_sided, rel=1e-9)
        assert clopper_pearson_upper(k, n) > k / n
    assert clopper_pearson_upper(5, 5) == 1.0


# -- calibration --------------------------------------------------------------------------------


def test_threshold_from_negatives_with_a_correlated_tail():
    # 10 of 10,000 negatives match 90 bits (a decoder bias the binomial model ignores):
    # 10/10,000 has an upper bound of 1.7e-3 > 1e-3, so m* must pass them: 91
    counts = _counts([(60, 9_990), (90, 10)])
    cal = Calibration.from_counts(counts)
    assert cal.threshold == 91 == _reference_threshold(counts)
    assert cal.fpr(90) == 10 / 10_000
    assert cal.fpr(91) == 0.0
    assert cal.fpr_upper_bound(90) == pytest.approx(beta.ppf(0.95, 11, 9_990), rel=1e-9)
    assert cal.fpr_upper_bound(90) > 1e-3
    assert cal.fpr_upper_bound(91) == pytest.approx(1 - 0.05 ** (1 / 10_000), rel=1e-9)
    assert cal.operating_fpr == 0.0 and cal.operating_fpr_upper_bound < 1e-3
    # with 3 such negatives the bound (7.8e-4) is under 1e-3: the binomial limit decides
    counts3 = _counts([(60, 9_997), (90, 3)])
    cal3 = Calibration.from_counts(counts3)
    assert cal3.threshold == _reference_threshold(counts3) == 82
    assert binomial_p_value(82) <= 1e-3 < binomial_p_value(81)


def test_threshold_empirical_only_and_random_distributions():
    counts = _counts([(50, 10_000)])
    assert Calibration.from_counts(counts).threshold == 82  # binomial floor
    relaxed = Calibration.from_counts(counts, config=CalibrationConfig(require_binomial=False))
    assert relaxed.threshold == 51
    g = torch.Generator().manual_seed(0)
    for p in (0.5, 0.58, 0.65):
        c = torch.distributions.Binomial(128, torch.full((12_000,), p)).sample().long()
        for req in (True, False):
            cal = Calibration.from_counts(c, config=CalibrationConfig(require_binomial=req))
            assert cal.threshold == _reference_threshold(c, require_binomial=req)
    del g


def test_registry_size_scales_the_bound_and_the_p_value():
    counts = _counts([(60, 50_000)])
    cal = Calibration.from_counts(counts, codes_compared=1)
    u = cal.fpr_upper_bound(100)
    assert cal.fpr_upper_bound(100, registry_size=4) == pytest.approx(4 * u)
    assert cal.corrected_p_value(90, 4) == pytest.approx(1 - (1 - binomial_p_value(90)) ** 4)
    assert cal.threshold_for(4) == 85 > cal.threshold == 82
    assert cal.threshold_for(4) == _reference_threshold(counts, k=4)  # corrected p-value decides
    with pytest.raises(ConfigError, match="measure at least"):
        cal.threshold_for(1000)  # 6e-5 x 1000 > 1e-3: more negatives needed


def test_from_negatives_takes_the_best_of_k_codes():
    g = torch.Generator().manual_seed(1)
    decoded = torch.randint(0, 2, (10_000, 128), generator=g).bool()
    codes = torch.randint(0, 2, (3, 128), generator=g).bool()
    cal = Calibration.from_negatives(decoded, codes, description="synthetic")
    best = torch.stack([(decoded == c).sum(1) for c in codes], 1).max(1).values
    assert torch.equal(cal.histogram, torch.bincount(best, minlength=129))
    assert cal.codes_compared == 3 and cal.n_negatives == 10_000
    one = Calibration.from_negatives(decoded, codes[0])
    assert one.codes_compared == 1


def test_calibration_refuses_too_few_negatives_and_unreachable_targets():
    with pytest.raises(ConfigError, match="at least 10000"):
        Calibration.from_counts(_counts([(60, 9_999)]))
    with pytest.raises(ConfigError, match="measure at least"):
        Calibration.from_counts(_counts([(60, 10_000)]), config=CalibrationConfig(target_fpr=1e-5))
    with pytest.raises(ConfigError):
        CalibrationConfig(target_fpr=0.0)
    with pytest.raises(InputError):
        Calibration.from_counts(torch.tensor([1.5, 2.0]))


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_calibration_save_load_roundtrip(tmp_path, suffix):
    counts = _counts([(60, 9_990), (90, 10), (70, 500)])
    cal = Calibration.from_counts(counts, codes_compared=5, description="celeba negatives",
                                  config=CalibrationConfig(target_fpr=2e-3, confidence=0.99))
    path = tmp_path / f"cal{suffix}"
    cal.save(path)
    back = Calibration.load(path)
    assert torch.equal(back.histogram, cal.histogram)
    assert (back.threshold, back.codes_compared, back.config, back.description) == (
        cal.threshold, 5, cal.config, "celeba negatives")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_calibration_load_rejects_tampered_files(tmp_path):
    cal = Calibration.from_counts(_counts([(60, 10_000)]))
    path = tmp_path / "cal.json"
    cal.save(path)
    doc = json.loads(path.read_text())
    doc["threshold"] = 70
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="records threshold 70"):
        Calibration.load(path)
    doc["class"] = "something.else"
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="not a faceprint calibration"):
        Calibration.load(path)
    with pytest.raises(ArtifactError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")


# -- verdicts -------------------------------------------------------------------------------------


def _noisy(code, flips, g):
    out = code.clone()
    idx = torch.randperm(code.numel(), generator=g)[:flips]
    out[idx] = ~out[idx]
    return out


def test_verify_against_one_code():
    g = torch.Generator().manual_seed(2)
    code = torch.randint(0, 2, (128,), generator=g).bool()
    cal = Calibration.from_counts(_counts([(60, 9_990), (90, 10)]))
    v = verify(code, cal, code=code)
    assert isinstance(v, Verdict) and v.match
    assert v.matching_bits == 128 and v.bit_accuracy == 1.0 and v.p_value == 2.0**-128
    assert v.false_positive_rate == 0.0 and v.fpr_upper_bound < 1e-3 and v.threshold == 91
    near = verify(_noisy(code, 37, g), cal, code=code)  # 91 bits: the threshold
    assert near.match and near.matching_bits == 91
    far = verify(_noisy(code, 38, g), cal, code=code)  # 90 bits: as good as biased negatives
    assert not far.match and far.false_positive_rate == 1e-3 and far.fpr_upper_bound > 1e-3
    assert far.p_value == pytest.approx(binom.sf(89, 128, 0.5), rel=1e-12)  # binomial alone would accept
    batch = verify(torch.stack([code, ~code]), cal, code=code)
    assert [b.match for b in batch] == [True, False]
    with pytest.raises(InputError, match="exactly one"):
        verify(code, cal)


def test_verify_against_a_registry(tmp_path):
    from faceprint.fingerprint.registry import Registry

    reg = Registry(tmp_path / "reg.db")
    entries = [reg.issue(f"r{i}", f"inst{i}", "0" * 64, "m", seed=i) for i in range(8)]
    g = torch.Generator().manual_seed(4)
    negatives = torch.randint(0, 2, (10_000, 128), generator=g).bool()
    cal = Calibration.from_registry(negatives, reg)
    assert cal.codes_compared == 8
    decoded = torch.stack([_noisy(entries[5].bits, 10, g), torch.randint(0, 2, (128,), generator=g).bool()])
    hit, miss = verify(decoded, cal, registry=reg)
    assert hit.match and hit.instance == "inst5" and hit.recipient == "r5" and hit.matching_bits == 118
    assert hit.registry_size == 8
    assert hit.p_value_corrected == pytest.approx(1 - (1 - hit.p_value) ** 8, rel=1e-9)
    assert not miss.match and miss.instance is None and miss.recipient is None
    assert miss.nearest_instance is not None and miss.p_value > 1e-6
    assert math.isclose(miss.bit_accuracy, miss.matching_bits / 128)
