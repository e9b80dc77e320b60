"""LatentPatch baseline (papers/000 ref. [35], Sec. 2, 3.3, 4.2): the sequential synthesis equals a
from-scratch reference, copies training latent pixels exactly, and is reproducible per image."""

import math

import pytest
import torch
import torch.nn.functional as F

from faceprint.errors import ConfigError, InputError, NotFittedError
from faceprint.latent.latentpatch import LatentPatch, LatentPatchConfig
from faceprint.seeding import generator


def _bank(n=12, c=3, h=8, w=8, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _reference(bank, cfg, seed, index):
    """The algorithm of the module docstring written plainly for one image: every window's
    distance recomputed from the synthesized features, float64, explicit loops."""
    N, c, h, w = bank.shape
    L = cfg.levels
    pyr = [F.avg_pool2d(bank.double(), 2 ** (L - 1 - s)) if s < L - 1 else bank.double() for s in range(L)]
    n_steps = sum(math.ceil(p.shape[2] / cfg.block) * math.ceil(p.shape[3] / cfg.block) for p in pyr)
    u = torch.rand(n_steps, generator=generator(seed, "latentpatch", index), dtype=torch.float64)
    step = 0
    prev = None  # provenance of the coarser scale (hs, ws)
    for s in range(L):
        Y = pyr[s]  # (N, c, hs, ws)
        hs, ws = Y.shape[2:]
        prov = torch.full((hs, ws), -1, dtype=torch.int64)
        for by in range(0, hs, cfg.block):
            for bx in range(0, ws, cfg.block):
                d = torch.zeros(N, dtype=torch.float64)
                context = False
                for y in range(max(by - cfg.radius, 0), min(by + cfg.block + cfg.radius, hs)):
                    for x in range(max(bx - cfg.radius, 0), min(bx + cfg.block + cfg.radius, ws)):
                        if prov[y, x] >= 0:
                            d += ((Y[prov[y, x], :, y, x] - Y[:, :, y, x]) ** 2).sum(1)
                            context = True
                        elif s > 0 and cfg.guide_weight > 0:
                            Yc = pyr[s - 1]
                            j = prev[y // 2, x // 2]
                            d += cfg.guide_weight * ((Yc[j, :, y // 2, x // 2] - Yc[:, :, y // 2, x // 2]) ** 2).sum(1)
                            context = True
                if context:
                    order = torch.argsort(d, stable=True)[:cfg.k]
                    choice = int(order[min(int(u[step] * cfg.k), cfg.k - 1)])
                else:
                    choice = min(int(u[step] * N), N - 1)
                prov[by:by + cfg.block, bx:bx + cfg.block] = choice
                step += 1
        prev = prov
    return prov


CONFIGS = [
    LatentPatchConfig(levels=2, block=2, radius=1, k=3),
    LatentPatchConfig(levels=3, block=1, radius=1, k=2, guide_weight=0.5),
    LatentPatchConfig(levels=2, block=3, radius=2, k=4, guide_weight=0.0),  # blocks clipped at the edge
    LatentPatchConfig(levels=1, block=2, radius=0, k=2),  # no context anywhere: uniform draws
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_the_plain_reference(cfg):
    bank = _bank()
    lp = LatentPatch(cfg).fit(bank)
    _, prov = lp.sample(4, seed=3)
    for i in range(4):
        assert torch.equal(prov[i], _reference(bank, cfg, 3, i)), f"image {i}"


def test_shapes_dtypes_and_exact_copies():
    bank = _bank(n=10, c=4, h=8, w=8)
    lp = LatentPatch(LatentPatchConfig(levels=2, block=2, radius=1, k=3)).fit(bank)
    z, prov = lp.sample(6, seed=0)
    assert z.shape == (6, 4, 8, 8) and z.dtype == torch.float32
    assert prov.shape == (6, 8, 8) and prov.dtype == torch.int64
    assert int(prov.min()) >= 0 and int(prov.max()) < 10
    # every output latent pixel is the training latent pixel named by the provenance, same position
    for i in range(6):
        for y in range(8):
            for x in range(8):
                assert torch.equal(z[i, :, y, x], bank[prov[i, y, x], :, y, x])
    # each block of the finest scale is copied whole from one training latent
    blocks = prov.reshape(6, 4, 2, 4, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    z0, p0 = lp.sample(0, seed=0)
    assert z0.shape == (0, 4, 8, 8) and p0.shape == (0, 8, 8)


def test_image_i_depends_only_on_seed_and_i():
    bank = _bank(n=16)
    cfg = LatentPatchConfig(levels=2, block=2, radius=1, k=3)
    lp = LatentPatch(cfg).fit(bank)
    z, prov = lp.sample(7, seed=5)
    for i in range(7):
        zi, pi = lp.sample(1, seed=5, start=i)
        assert torch.equal(zi[0], z[i]) and torch.equal(pi[0], prov[i])
    z2, p2 = lp.sample(4, seed=5, start=3)
    assert torch.equal(z2, z[3:])
    # one image per chunk gives the same result as everything at once
    tiny = LatentPatch(LatentPatchConfig(levels=2, block=2, radius=1, k=3, block_elements=1)).fit(bank)
    assert torch.equal(tiny.sample(7, seed=5)[1], prov)
    assert not torch.equal(lp.sample(7, seed=6)[1], prov)
    assert len({tuple(p.flatten().tolist()) for p in prov}) > 1  # images of a run differ


def test_single_latent_bank_with_k1_reproduces_it():
    bank = _bank(n=1, c=5, h=16, w=16)
    lp = LatentPatch(LatentPatchConfig(k=1)).fit(bank)
    z, prov = lp.sample(3, seed=0)
    assert (prov == 0).all()
    assert torch.equal(z, bank.expand(3, -1, -1, -1))


def test_pca_matching_copies_full_channels():
    bank = _bank(n=12, c=6, h=8, w=8)
    lp = LatentPatch(LatentPatchConfig(levels=2, block=2, radius=1, k=3, channels=2)).fit(bank)
    assert lp.pyramid_[-1].shape == (64, 12, 2)
    z, prov = lp.sample(3, seed=1)
    assert z.shape == (3, 6, 8, 8)
    ys, xs = torch.arange(8)[:, None], torch.arange(8)[None, :]
    assert torch.equal(z, bank.permute(0, 2, 3, 1)[prov, ys, xs].permute(0, 3, 1, 2))


@pytest.mark.parametrize("kwargs", [
    {"levels": 0}, {"block": 0}, {"radius": -1}, {"k": 0}, {"k": True}, {"k": 2.0},
    {"guide_weight": -1.0}, {"guide_weight": float("nan")}, {"channels": 0}, {"block_elements": 0},
])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        LatentPatchConfig(**kwargs)


def test_fit_and_sample_errors():
    with pytest.raises(InputError, match="at least 5"):
        LatentPatch().fit(_bank(n=3, h=16, w=16))
    with pytest.raises(InputError):
        LatentPatch().fit(torch.randn(8, 16, 16))
    with pytest.raises(InputError):
        LatentPatch().fit(torch.zeros(8, 3, 16, 16, dtype=torch.int64))
    nan = _bank(n=8, h=16, w=16)
    nan[2, 0, 1, 1] = float("nan")
    with pytest.raises(InputError):
        LatentPatch().fit(nan)
    with pytest.raises(ConfigError, match="divisible"):
        LatentPatch(LatentPatchConfig(levels=3)).fit(_bank(n=8, h=6, w=6))
    with pytest.raises(ConfigError):
        LatentPatch(LatentPatchConfig(channels=9)).fit(_bank(n=8, c=3, h=16, w=16))
    with pytest.raises(InputError):
        LatentPatch(config={"k": 3})
    with pytest.raises(NotFittedError):
        LatentPatch().sample(1, seed=0)
    lp = LatentPatch(LatentPatchConfig(levels=2, block=2, k=2)).fit(_bank(n=4))
    for bad in ({"n": -1, "seed": 0}, {"n": 1.5, "seed": 0}, {"n": 1, "seed": -1}, {"n": 1, "seed": 0, "start": -2}):
        n = bad.pop("n")
        with pytest.raises(InputError):
            lp.sample(n, **bad)


def test_real_latents_give_varied_faces_from_many_photos(celeba_latents):
    bank = celeba_latents.latents  # (96, 32, 16, 16)
    lp = LatentPatch().fit(bank)
    z, prov = lp.sample(12, seed=0)
    assert z.shape == (12,) + tuple(bank.shape[1:])
    assert torch.isfinite(z).all()
    # not all the same, and no face is a training latent copied whole
    assert len({tuple(p.flatten().tolist()) for p in prov}) == 12
    per_face = [len(torch.unique(p)) for p in prov]
    assert min(per_face) >= 2, per_face
    assert len(torch.unique(prov)) >= 30  # the run draws on many training photos
    zi, pi = lp.sample(1, seed=0, start=7)
    assert torch.equal(pi[0], prov[7]) and torch.equal(zi[0], z[7])
