"""NN refinement returns exactly the brute-force nearest patch (papers/000, Eq. 5-6)."""

import pytest
import torch
import torch.nn.functional as F

from faceprint.errors import ConfigError, InputError
from faceprint.latent.refine import NNRefiner, RefineConfig, gather


def _brute_force(z, comps, bank, labels, rho):
    """Explicit zero-padded patches and explicit squared differences, one position at a time."""
    B, q, h, w = z.shape
    om = 2 * rho + 1
    zp = F.pad(z, (rho, rho, rho, rho))
    bp = F.pad(bank, (rho, rho, rho, rho))
    out = torch.empty(B, h, w, dtype=torch.int64)
    for b in range(B):
        members = torch.nonzero(labels == comps[b]).squeeze(1)
        for i in range(h):
            for j in range(w):
                qpatch = zp[b, :, i:i + om, j:j + om]
                best, arg = None, None
                for m in members.tolist():
                    d = float(((qpatch - bp[m, :, i:i + om, j:j + om]) ** 2).sum())
                    if best is None or d < best:
                        best, arg = d, m
                out[b, i, j] = arg
    return out


@pytest.mark.parametrize("rho", [0, 1, 2])
def test_exact_nearest_patch(rho):
    g = torch.Generator().manual_seed(rho)
    bank = torch.randn(30, 3, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(3, (30,), generator=g)
    labels[:3] = torch.arange(3)
    z = torch.randn(5, 3, 6, 5, generator=g, dtype=torch.float64)
    comps = torch.randint(3, (5,), generator=g)
    r = NNRefiner(RefineConfig(patch_radius=rho, block_elements=500)).fit(bank, labels)  # tiny blocks: chunking
    out, prov = r.refine(z, comps)
    assert torch.equal(prov, _brute_force(z, comps, bank, labels, rho))
    assert torch.equal(out, gather(bank, prov))
    # every copied pixel comes from a member of the sample's own component
    assert torch.equal(labels[prov], comps[:, None, None].expand_as(prov))


def test_float32_default_agrees_with_float64():
    g = torch.Generator().manual_seed(9)
    bank = torch.randn(200, 8, 8, 8, generator=g)
    z = torch.randn(16, 8, 8, 8, generator=g)
    p32 = NNRefiner().fit(bank).refine(z)[1]
    p64 = NNRefiner().fit(bank.double()).refine(z.double())[1]
    assert (p32 == p64).float().mean() > 0.999


def test_a_training_latent_projects_onto_itself():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(20, 4, 5, 5, generator=g)
    out, prov = NNRefiner().fit(bank).refine(bank[7:8])
    assert (prov == 7).all()
    assert torch.equal(out, bank[7:8])


def test_iterations_zero_is_identity_and_gather_shapes():
    bank = torch.randn(4, 2, 3, 3)
    z = torch.randn(2, 2, 3, 3)
    out, prov = NNRefiner(RefineConfig(iterations=0)).fit(bank).refine(z)
    assert torch.equal(out, z) and (prov == -1).all()
    prov = torch.tensor([[[0, 1, 2], [3, 0, 1], [2, 3, 0]]])
    got = gather(bank, prov)
    assert got.shape == (1, 2, 3, 3)
    assert torch.equal(got[0, :, 1, 2], bank[1, :, 1, 2])


def test_errors():
    with pytest.raises(ConfigError):
        RefineConfig(patch_radius=-1)
    with pytest.raises(ConfigError, match="patch_radius"):
        NNRefiner(RefineConfig(patch_radius=4)).fit(torch.randn(3, 2, 4, 4))
    r = NNRefiner().fit(torch.randn(3, 2, 4, 4), torch.tensor([0, 0, 1]))
    with pytest.raises(InputError, match="shape"):
        r.refine(torch.randn(1, 3, 4, 4))
    with pytest.raises(InputError, match="no training latents"):
        r.refine(torch.randn(1, 2, 4, 4), torch.tensor([5]))
