"""The share cap of the seam refinement (refine.py, RefineConfig.max_share)."""

import pytest
import torch

from faceprint.errors import ConfigError
from faceprint.latent.refine import NNRefiner, RefineConfig, _rank_within, gather

pytestmark = pytest.mark.usefixtures("one_thread")


def _shares(prov):
    flat = prov.reshape(prov.shape[0], -1)
    return torch.stack([torch.bincount(r).max() for r in flat]).double() / flat.shape[1]


def _near_copies(g, bank, n, noise=0.05):
    """Queries that sit on training latents: the paper rule copies them almost whole."""
    idx = torch.randint(bank.shape[0], (n,), generator=g)
    return bank[idx] + noise * torch.randn(n, *bank.shape[1:], generator=g, dtype=bank.dtype)


@pytest.mark.parametrize("cap", [0.5, 0.3, 0.25])
def test_no_photo_supplies_more_than_the_cap(cap):
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(40, 4, 8, 8, generator=g)
    z = _near_copies(g, bank, 6)
    free = NNRefiner(RefineConfig(patch_radius=1, mode="seam", candidates=6, seam_weight=0.3)).fit(bank)
    capped = NNRefiner(RefineConfig(patch_radius=1, mode="seam", candidates=6, seam_weight=0.3,
                                    max_share=cap)).fit(bank)
    assert (_shares(free.refine(z)[1]) > 0.9).all()  # the uncapped rule copies the photo
    out, prov = capped.refine(z)
    assert (_shares(prov) <= cap + 1e-12).all()
    assert torch.equal(out, gather(bank, prov))  # the provenance still names every copied pixel


def test_a_cap_that_never_binds_changes_nothing():
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(30, 3, 6, 6, generator=g)
    z = torch.randn(5, 3, 6, 6, generator=g)
    kw = dict(patch_radius=1, mode="seam", candidates=5, seam_weight=0.5, sweeps=3)
    free = NNRefiner(RefineConfig(**kw)).fit(bank).refine(z)[1]
    assert float(_shares(free).max()) < 0.6
    capped = NNRefiner(RefineConfig(**kw, max_share=0.6)).fit(bank).refine(z)[1]
    assert torch.equal(free, capped)
    whole = NNRefiner(RefineConfig(**kw, max_share=1.0)).fit(bank).refine(z)[1]
    assert torch.equal(free, whole)


def test_capped_faces_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(50, 4, 8, 8, generator=g)
    labels = torch.randint(2, (50,), generator=g)
    z = _near_copies(g, bank, 7)
    comps = labels[torch.randint(50, (7,), generator=g)]
    ref = NNRefiner(RefineConfig(patch_radius=2, mode="seam", candidates=8, seam_weight=0.3, max_share=0.4,
                                 block_elements=2000)).fit(bank, labels)
    _, batch = ref.refine(z, comps)
    for i in range(7):
        _, alone = ref.refine(z[i:i + 1], comps[i:i + 1])
        assert torch.equal(alone[0], batch[i])
    # members only: the cap never sends a pixel outside the face's component
    assert torch.equal(labels[batch], comps[:, None, None].expand_as(batch))


def test_the_cap_costs_little_patch_energy_on_ordinary_queries():
    """Forcing pixels away from a photo must pick the next cheapest candidates, not arbitrary ones:
    the capped collage stays much closer to the query than a random candidate collage."""
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(60, 4, 8, 8, generator=g)
    z = _near_copies(g, bank, 4, noise=0.3)
    kw = dict(patch_radius=1, mode="seam", candidates=6, seam_weight=0.3)
    out_c, prov_c = NNRefiner(RefineConfig(**kw, max_share=0.5)).fit(bank).refine(z)
    assert (_shares(prov_c) <= 0.5).all()
    rnd = gather(bank, torch.randint(60, prov_c.shape, generator=g))
    err_c = ((out_c - z) ** 2).sum(dim=(1, 2, 3))
    err_r = ((rnd - z) ** 2).sum(dim=(1, 2, 3))
    assert (err_c < 0.5 * err_r).all()


def test_rank_within_groups():
    keys = torch.tensor([3, 1, 3, 1, 3, 2])
    score = torch.tensor([0.5, 0.2, -1.0, 0.2, 0.5, 9.0])
    # key 3: -1.0 (idx 2) first, then the tie 0.5 at idx 0 before idx 4; key 1: tie, idx 1 first
    assert _rank_within(keys, score).tolist() == [1, 0, 0, 1, 2, 0]


def test_cap_errors():
    with pytest.raises(ConfigError, match="max_share"):
        RefineConfig(mode="seam", max_share=0.0)
    with pytest.raises(ConfigError, match="max_share"):
        RefineConfig(mode="seam", max_share=1.5)
    with pytest.raises(ConfigError, match="seam"):
        RefineConfig(mode="paper", max_share=0.5)


def test_a_face_that_cannot_be_capped_does_not_change_its_neighbours_in_the_batch():
    """A component of one photo cannot satisfy the cap; its repair stops when a sweep changes
    nothing, and the other faces of the batch get no extra sweeps because of it."""
    g = torch.Generator().manual_seed(6)
    bank = torch.randn(30, 4, 8, 8, generator=g)
    labels = torch.zeros(30, dtype=torch.int64)
    labels[7] = 1  # photo 7 alone in component 1
    z = _near_copies(g, bank, 5, noise=0.3)
    comps = torch.tensor([0, 1, 0, 0, 1])
    ref = NNRefiner(RefineConfig(patch_radius=1, mode="seam", candidates=6, seam_weight=0.3,
                                 max_share=0.3)).fit(bank, labels)
    _, batch = ref.refine(z, comps)
    assert (batch[comps == 1] == 7).all()
    assert (_shares(batch[comps == 0]) <= 0.3 + 1e-12).all()
    for i in range(5):
        assert torch.equal(ref.refine(z[i:i + 1], comps[i:i + 1])[1][0], batch[i])
