"""EM mixture: monotone likelihood, agreement with scikit-learn, exactness of the dual algebra."""

import math

import numpy as np
import pytest
import torch

from faceprint.errors import ConfigError, InputError, NotFittedError
from faceprint.latent.mixture import GaussianMixture, MixtureConfig, kmeans
from faceprint.seeding import generator


def _blobs(N, d, K, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, d)) * 2
    parts = [rng.normal(size=(N // K, d)) @ rng.normal(size=(d, d)) * scale + centres[k] for k in range(K)]
    return torch.tensor(np.concatenate(parts))


def _sklearn_init(X, labels, K, reg):
    """The M-step from hard labels, in numpy, as scikit-learn's *_init arguments."""
    N, d = X.shape
    resp = np.zeros((N, K))
    resp[np.arange(N), labels] = 1
    nk = resp.sum(0) + 10 * np.finfo(float).eps
    means = resp.T @ X / nk[:, None]
    precs = []
    for k in range(K):
        diff = X - means[k]
        cov = (resp[:, k] * diff.T) @ diff / nk[k] + reg * np.eye(d)
        precs.append(np.linalg.inv(cov))
    return nk / N, means, np.array(precs)


@pytest.mark.parametrize("N,d,K", [(300, 5, 3), (60, 40, 3), (120, 200, 4)])
def test_matches_sklearn_given_same_initialisation(N, d, K):
    sk_mixture = pytest.importorskip("sklearn.mixture")
    X = _blobs(N, d, K)
    labels = kmeans(X, K, generator=generator(1))
    reg = 1e-2
    cfg = MixtureConfig(n_components=K, reg_covar=reg, tol=1e-6, max_iter=200, member_tol=0.0)
    ours = GaussianMixture(cfg).fit(X, init_labels=labels)
    w, m, p = _sklearn_init(X.numpy(), labels.numpy(), K, reg)
    sk = sk_mixture.GaussianMixture(K, covariance_type="full", reg_covar=reg, tol=1e-6, max_iter=200,
                                    weights_init=w, means_init=m, precisions_init=p).fit(X.numpy())
    assert abs(ours.score(X) - sk.score(X.numpy())) < 1e-3
    # per-sample log densities agree too, not only their mean
    np.testing.assert_allclose(ours.log_prob(X).numpy(), sk.score_samples(X.numpy()), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.sort(ours.weights_.numpy()), np.sort(sk.weights_), atol=1e-6)


def test_log_likelihood_never_decreases():
    # soft, overlapping clusters in low dimension so that EM takes many iterations
    g = torch.Generator().manual_seed(3)
    X = torch.cat([torch.randn(200, 3, generator=g) + torch.tensor([i * 1.2, 0.0, 0.0]) for i in range(4)]).double()
    cfg = MixtureConfig(n_components=4, tol=0.0, max_iter=60, reg_covar=1e-4, member_tol=0.0)
    gm = GaussianMixture(cfg).fit(X, generator=generator(5))
    ll = np.array(gm.history_.log_likelihood)
    assert len(ll) == 60
    assert np.all(np.diff(ll) >= -1e-9), np.diff(ll).min()
    assert ll[-1] > ll[0]


def test_log_likelihood_never_decreases_high_dimension():
    X = _blobs(256, 512, 4, seed=2)
    gm = GaussianMixture(MixtureConfig(n_components=4, tol=0.0, max_iter=10)).fit(X, generator=generator(0))
    ll = np.array(gm.history_.log_likelihood)
    assert np.all(np.diff(ll) >= -1e-6 * np.abs(ll[:-1]))


def test_dual_covariance_and_density_equal_dense_formulas():
    X = _blobs(40, 60, 2, seed=4)  # fewer points than dimensions: the dual path
    gm = GaussianMixture(MixtureConfig(n_components=2, reg_covar=0.05, max_iter=5, member_tol=0.0)).fit(
        X, generator=generator(0))
    lp = gm.component_log_prob(X)
    for k in range(2):
        S = gm.covariance(k)
        dist = torch.distributions.MultivariateNormal(gm.means_[k], covariance_matrix=S)
        np.testing.assert_allclose(lp[:, k].numpy(), dist.log_prob(X).numpy(), rtol=1e-8, atol=1e-6)
        # eigenvectors orthonormal
        U = gm.eigvecs_[k]
        np.testing.assert_allclose((U.T @ U).numpy(), np.eye(U.shape[1]), atol=1e-8)


def test_kmeans_every_cluster_nonempty_and_reproducible():
    X = _blobs(90, 8, 3)
    a = kmeans(X, 6, generator=generator(7))
    b = kmeans(X, 6, generator=generator(7))
    assert torch.equal(a, b)
    assert set(a.tolist()) == set(range(6))


def test_bad_input_and_config():
    with pytest.raises(ConfigError, match="n_components"):
        MixtureConfig(n_components=0)
    with pytest.raises(ConfigError, match="reg_covar"):
        MixtureConfig(reg_covar=-1.0)
    gm = GaussianMixture(MixtureConfig(n_components=5))
    with pytest.raises(InputError, match="5 components on 3 samples"):
        gm.fit(torch.randn(3, 4), generator=generator(0))
    with pytest.raises(InputError, match="NaN"):
        gm.fit(torch.full((10, 2), math.nan), generator=generator(0))
    with pytest.raises(InputError, match="generator"):
        gm.fit(torch.randn(10, 2))
    with pytest.raises(NotFittedError):
        gm.log_prob(torch.randn(2, 2))


def _low_rank_blobs(N, d, K, rank, seed):
    """K clusters, each with a rank-``rank`` covariance plus a little isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(K, d, generator=g, dtype=torch.float64)
    basis = torch.randn(K, d, rank, generator=g, dtype=torch.float64)
    lab = torch.randint(K, (N,), generator=g)
    z = torch.randn(N, rank, 1, generator=g, dtype=torch.float64)
    X = centres[lab] + (basis[lab] @ z)[..., 0] + 0.05 * torch.randn(N, d, generator=g, dtype=torch.float64)
    return X, lab


def test_scale_path_log_likelihood_is_within_tolerance_of_the_exact_em():
    """Subsampled EM + one assignment pass, truncated E-step and a rank cap: the mean
    log-likelihood per dimension of the training points stays within 0.05 nats of the exact
    EM's (the data's true rank is below the cap), and the clusters are recovered."""
    X, lab = _low_rank_blobs(1200, 60, 4, 5, seed=2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    exact = GaussianMixture(MixtureConfig(n_components=4)).fit(X, generator=gen())
    fast = GaussianMixture(MixtureConfig(n_components=4, subsample=300, top_components=2, max_rank=8,
                                         dtype="float32")).fit(X, generator=gen())
    d = X.shape[1]
    ll_exact, ll_fast = exact.score(X) / d, fast.score(X.float()) / d
    assert abs(ll_exact - ll_fast) < 0.05, (ll_exact, ll_fast)
    assert all(e.numel() <= 8 for e in fast.eigvals_)
    # the same partition as the true clusters, up to relabelling
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(lab.numpy(), fast.labels_.numpy()) > 0.99
    assert fast.labels_.shape == (1200,)


def test_truncated_e_step_equals_the_full_one_when_it_keeps_every_component():
    X, _ = _low_rank_blobs(300, 20, 3, 3, seed=4)
    a = GaussianMixture(MixtureConfig(n_components=3)).fit(X, generator=torch.Generator().manual_seed(1))
    b = GaussianMixture(MixtureConfig(n_components=3, top_components=3)).fit(X, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a.means_, b.means_) and a.score(X) == pytest.approx(b.score(X))
    # scoring against fewer components gives -inf exactly outside each row's nearest means
    b2 = GaussianMixture(MixtureConfig(n_components=3, top_components=1))
    b2.__dict__.update({k: v for k, v in a.__dict__.items() if k != "config"})
    lp = b2._component_log_prob(X, rows_of=b2._nearest_means(X, 1))
    assert torch.equal(torch.isfinite(lp).sum(1), torch.ones(300, dtype=torch.int64))


def test_top_eigh_finds_the_leading_eigenpairs_of_a_large_component():
    """The randomized range finder the scale path uses for components of more than 4 * max_rank
    members: the leading eigenvalues within 2%, the same subspace, the same result twice."""
    from faceprint.latent.mixture import _scatter_eigh, _top_eigh

    g = torch.Generator().manual_seed(0)
    n, d, r = 600, 1024, 48
    L = torch.randn(n, 200, generator=g) * torch.logspace(0, -1.5, 200)[None]
    A = L @ torch.randn(200, d, generator=g) / 20 + 0.01 * torch.randn(n, d, generator=g)
    e0, U0 = _scatter_eigh(A)
    e1, U1 = _top_eigh(A, r, seed=3)
    assert e1.shape == (r,) and U1.shape == (d, r)
    assert float(((e1 - e0[:r]).abs() / e0[:r]).max()) < 0.02
    assert float(((U1.T @ U0[:, :r]) ** 2).sum()) / r > 0.99
    assert torch.allclose(U1.T @ U1, torch.eye(r, dtype=A.dtype), atol=1e-6)
    e2, U2 = _top_eigh(A, r, seed=3)
    assert torch.equal(e1, e2) and torch.equal(U1, U2)
    # a wrong subspace would be caught: the trailing eigenvectors are orthogonal to the leading ones
    assert float(((U1.T @ U0[:, r:2 * r]) ** 2).sum()) / r < 0.05
