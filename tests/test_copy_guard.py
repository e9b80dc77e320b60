"""The copy guard: near-copies of training photos are redrawn, reproducibly (generator.CopyGuard)."""

import pytest
import torch

from faceprint.errors import ConfigError, CopyGuardError
from faceprint.latent.generator import CopyGuard, Generator, GeneratorConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class _Set:
    def __init__(self, latents):
        self.latents = latents
        self.relpaths = [f"{i:03d}.png" for i in range(latents.shape[0])]


def _model_with_a_singleton(**config):
    """40 photos around one face and one photo far away: the far photo is a component of its
    own, so every face drawn from that component is a copy of it (a face built to be a copy)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 8, 8, generator=g)
    crowd = base + 0.6 * torch.randn(40, 4, 8, 8, generator=g)
    lone = base + 8.0 + 0.6 * torch.randn(1, 4, 8, 8, generator=g)
    lat = torch.cat([crowd, lone])
    cfg = GeneratorConfig(**{"components": 2, "channels": 4, "patch_radius": 1, "refinement": "paper",
                             "rank_temperature": 0.5, **config})
    gen = Generator(cfg).fit(_Set(lat), seed=0)
    lone_k = int(gen.mixture_.labels_[40])
    assert int((gen.mixture_.labels_ == lone_k).sum()) == 1
    return gen, lone_k


def test_the_guard_redraws_copies_and_keeps_faces_reproducible():
    gen, lone_k = _model_with_a_singleton()
    off = gen.sample_latents(300, seed=3, guard=None)
    copies = torch.nonzero(off.components == lone_k).squeeze(1)
    assert copies.numel() > 0  # with the guard off, copies of the lone photo are shipped
    shares = [gen.provenance_summary(off.provenance[i:i + 1])[0]["max_share"] for i in copies.tolist()]
    assert min(shares) == 1.0

    on = gen.sample_latents(300, seed=3, guard=CopyGuard())
    assert on.guard["max_share"] == 0.5 and on.guard["threshold"] > 0
    # exactly the copies were redrawn; the other faces are untouched
    redrawn = torch.nonzero(on.redraws > 0).squeeze(1)
    assert set(copies.tolist()) <= set(redrawn.tolist())
    keep = on.redraws == 0
    assert torch.equal(on.latents[keep], off.latents[keep])
    # no shipped face breaks either rule
    for s in gen.provenance_summary(on.provenance):
        assert s["max_share"] <= 0.5
    assert not gen._copies(on.latents, on.provenance, on.guard["threshold"], CopyGuard()).any()
    # a redrawn face is the same image alone or in the batch
    for i in redrawn.tolist()[:3]:
        alone = gen.sample_latents(1, seed=3, start=i, guard=CopyGuard())
        assert torch.equal(alone.latents[0], on.latents[i])
        assert int(alone.redraws[0]) == int(on.redraws[i])


def test_a_face_that_can_only_be_a_copy_is_refused():
    gen, lone_k = _model_with_a_singleton()
    with pytest.raises(CopyGuardError, match="near-copy"):
        gen.sample_latents(4, seed=0, component=lone_k, guard=CopyGuard(max_attempts=3))
    # without the guard the caller gets the copies, knowingly
    smp = gen.sample_latents(4, seed=0, component=lone_k, guard=None)
    assert (smp.provenance == 40).all()


def test_the_threshold_is_the_leave_one_out_quantile(tmp_path):
    gen, _ = _model_with_a_singleton()
    N = gen.n_photos
    flat = gen.bank_.reshape(N, -1).float()
    D = torch.cdist(flat, flat)
    D.fill_diagonal_(float("inf"))
    loo = D.min(1).values.sort().values
    assert torch.allclose(gen.guard_distances_, loo, rtol=1e-4, atol=1e-4)
    assert gen.guard_threshold(0.05) == pytest.approx(float(torch.quantile(loo.double(), 0.05)), rel=1e-4)
    gen.save(tmp_path / "m.safetensors")
    back = Generator.load(tmp_path / "m.safetensors", autoencoder=None)
    assert torch.equal(back.guard_distances_, gen.guard_distances_)


def test_distance_rule_ignores_copied_pixels_but_catches_a_lookalike():
    """A face that copies 40% of one photo and takes the rest from photos far from it passes;
    the same face whose other pixels are that photo's own values plus a little noise (it looks
    like the photo everywhere) is refused, although its share is the same."""
    gen, _ = _model_with_a_singleton()
    thr = gen.guard_threshold(0.05)
    bank = gen.bank_.float()
    prov = torch.full((1, 8, 8), 2, dtype=torch.int64)
    prov[:, :, :3] = 0  # 24 of 64 pixels (37.5%) from photo 0, 24 from photo 1, 16 from photo 2
    prov[:, :, 3:6] = 1
    from faceprint.latent.refine import gather

    collage = gather(bank, prov)
    assert not gen._copies(collage, prov, thr, CopyGuard())
    lookalike = collage.clone()
    lookalike[:, :, :, 3:] = bank[0:1, :, :, 3:] + 0.01
    assert gen._copies(lookalike, prov, thr, CopyGuard())


def test_generate_guards_by_default_and_the_raw_sampler_does_not():
    import inspect

    assert inspect.signature(Generator.generate).parameters["guard"].default == CopyGuard()
    assert inspect.signature(Generator.sample_latents).parameters["guard"].default is None


def test_guard_settings_are_checked():
    for bad in (dict(quantile=1.5), dict(max_share=0), dict(max_attempts=0)):
        with pytest.raises(ConfigError):
            CopyGuard(**bad)


def test_the_share_cap_makes_faces_under_the_bound_and_the_guard_catches_what_it_cannot():
    """With share_cap the seam refinement builds faces under the guard's share bound, so the
    guard redraws none of the crowd's faces for their share; a lone photo's component has no
    second photo to take pixels from, so its faces stay copies and the guard still redraws them."""
    free, _ = _model_with_a_singleton(refinement="seam", rank_temperature=0.02, share_cap=None)
    capped, lone_k = _model_with_a_singleton(refinement="seam", rank_temperature=0.02, share_cap=0.5)
    off = free.sample_latents(200, seed=4, guard=None)
    crowd = off.components != lone_k
    assert (~crowd).any() and crowd.any()
    free_share = torch.tensor([s["max_share"] for s in free.provenance_summary(off.provenance)])
    assert (free_share[crowd] > 0.5).any()  # without the cap some crowd faces are mostly one photo
    raw = capped.sample_latents(200, seed=4, guard=None)
    assert torch.equal(raw.components, off.components)  # the cap changes the NN step only
    share = torch.tensor([s["max_share"] for s in capped.provenance_summary(raw.provenance)])
    assert (share[crowd] <= 0.5).all()
    assert (share[~crowd] == 1.0).all()
    # the guard's share rule alone (threshold 0 turns the distance rule off): only the lone photo's faces
    refused = capped._copies(raw.latents, raw.provenance, 0.0, CopyGuard())
    assert torch.equal(refused, ~crowd)
    assert capped._copies(off.latents, off.provenance, 0.0, CopyGuard())[crowd].any()
