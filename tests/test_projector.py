import pytest
import torch

from faceprint.errors import ConfigError, InputError, NotFittedError
from faceprint.latent.projector import PCAProjector, ProjectorConfig


def _latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 6, generator=g)
    base = torch.randn(40, 6, 4, 4, generator=g)
    return torch.einsum("ij,njhw->nihw", mix, base) + 3.0


def test_whitened_and_exact_at_full_rank():
    y = _latents()
    p = PCAProjector(ProjectorConfig(6)).fit(y)
    z = p.transform(y)
    pix = z.permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(pix.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(pix.T @ pix / (pix.shape[0] - 1), torch.eye(6), atol=1e-3, rtol=0)
    torch.testing.assert_close(p.inverse(z), y, atol=1e-4, rtol=0)


def test_truncation_keeps_leading_variance():
    y = _latents(1)
    full = PCAProjector(ProjectorConfig(6)).fit(y)
    p2 = PCAProjector(ProjectorConfig(2)).fit(y)
    err = ((p2.inverse(p2.transform(y)) - y) ** 2).sum(1).mean()
    # residual energy = sum of the discarded eigenvalues
    expected = full.variances_[2:].sum() * (y.numel() / 6 - 1) / (y.numel() / 6)
    torch.testing.assert_close(err, expected, rtol=1e-3, atol=1e-4)


def test_errors():
    with pytest.raises(ConfigError):
        ProjectorConfig(0)
    with pytest.raises(NotFittedError):
        PCAProjector().transform(_latents())
    with pytest.raises(ConfigError, match="exceeds"):
        PCAProjector(ProjectorConfig(7)).fit(_latents())
    with pytest.raises(InputError, match="4-D"):
        PCAProjector().fit(torch.randn(3, 4))
