"""Low-rank sampling (papers/000, Eq. 3-4): intended covariance, ranks, reproducibility."""

import math

import pytest
import torch

from faceprint.errors import ConfigError
from faceprint.latent.lowrank import LowRankSampler, component_ranks
from faceprint.latent.mixture import GaussianMixture, MixtureConfig
from faceprint.seeding import generator


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(0)
    d = 12
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    X = torch.cat([torch.randn(400, d, generator=g, dtype=torch.float64) @ A * 0.3,
                   torch.randn(200, d, generator=g, dtype=torch.float64) @ A.T * 0.2 + 6.0])
    return GaussianMixture(MixtureConfig(n_components=2, reg_covar=1e-3)).fit(X, generator=generator(0))


def test_ranks_follow_the_formula(mixture):
    d0 = mixture.n_features
    lam = 1.0
    ranks = component_ranks(mixture, lam)
    for pi, dk in zip(mixture.weights_.tolist(), ranks):
        assert dk == min(max(math.floor(lam * pi * d0), 1), d0)
    assert component_ranks(mixture, 1e-9) == [1, 1]
    with pytest.raises(ConfigError):
        component_ranks(mixture, 0.0)


def test_samples_have_the_intended_covariance(mixture):
    lam = 0.75  # d_k = floor(0.75 * pi_k * 12): a genuine truncation
    s = LowRankSampler(mixture, lam)
    for k in range(2):
        dk = s.ranks[k]
        assert 1 <= dk < 12
        # the intended covariance, computed independently from the dense Sigma_k
        e, U = torch.linalg.eigh(mixture.covariance(k))
        e, U = e.flip(0)[:dk], U.flip(1)[:, :dk]
        intended = (U * e) @ U.T
        torch.testing.assert_close(s.covariance(k), intended, rtol=1e-4, atol=1e-5)
        z, comps = s.draw(20000, seed=11, component=k)
        assert (comps == k).all()
        zc = z.double() - mixture.means_[k]
        emp = zc.T @ zc / z.shape[0]
        scale = intended.abs().max()
        assert (emp - intended).abs().max() < 0.05 * scale
        torch.testing.assert_close(z.double().mean(0), mixture.means_[k], atol=0.05 * scale.sqrt(), rtol=0)
        # samples live in the span of the kept eigenvectors: nothing outside it
        resid = zc - (zc @ U) @ U.T
        assert resid.abs().max() < 1e-4 * zc.abs().max()


def test_component_frequencies_follow_weights(mixture):
    _, comps = LowRankSampler(mixture, 0.5).draw(6000, seed=3)
    freq = torch.bincount(comps, minlength=2).double() / 6000
    assert (freq - mixture.weights_).abs().max() < 0.03


def test_image_i_is_independent_of_batch(mixture):
    s = LowRankSampler(mixture, 0.5)
    z, c = s.draw(64, seed=5)
    for i in (0, 17, 63):
        zi, ci = s.draw(1, seed=5, start=i)
        assert torch.equal(zi[0], z[i]) and ci[0] == c[i]
    z2, _ = s.draw(64, seed=6)
    assert not torch.equal(z, z2)
