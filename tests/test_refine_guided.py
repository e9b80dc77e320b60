"""The guided refinement (refine.py, mode "guided") against a loop-by-loop float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from faceprint.errors import ConfigError
from faceprint.latent.refine import NNRefiner, RefineConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(z, bank, members, levels, block, radius, g, cap):
    """The definition of the module docstring, one block and one member at a time, every window
    distance summed from scratch: the chosen global photo per finest position (h, w)."""
    c, h, w = z.shape
    z, bank = z.double(), bank.double()
    prev = None  # the coarser scale's synthesis: (member index per position, pooled bank)
    for s in range(levels):
        f = 2 ** (levels - 1 - s)
        zs = F.avg_pool2d(z[None], f)[0] if f > 1 else z
        Ys = F.avg_pool2d(bank[members], f) if f > 1 else bank[members]
        hs, ws = zs.shape[1:]
        chosen = torch.full((hs, ws), -1, dtype=torch.int64)

        def cost(j, y, x):
            if chosen[y, x] >= 0:
                return float(((Ys[chosen[y, x], :, y, x] - Ys[j, :, y, x]) ** 2).sum())
            out = g * float(((zs[:, y, x] - Ys[j, :, y, x]) ** 2).sum())
            if prev is not None:
                pc, pY = prev
                out += float(((pY[pc[y // 2, x // 2], :, y // 2, x // 2] - pY[j, :, y // 2, x // 2]) ** 2).sum())
            return out

        counts = [0] * len(members)
        finest = s == levels - 1
        for by in range(0, hs, block):
            for bx in range(0, ws, block):
                cells = [(y, x) for y in range(by, min(by + block, hs)) for x in range(bx, min(bx + block, ws))]
                win = [(y, x) for y in range(max(by - radius, 0), min(by + block + radius, hs))
                       for x in range(max(bx - radius, 0), min(bx + block + radius, ws))]
                d = [sum(cost(j, y, x) for y, x in win) for j in range(len(members))]
                if finest and cap is not None:
                    cap_n = max(1, math.floor(cap * h * w + 1e-9))
                    room = [counts[j] + len(cells) <= cap_n for j in range(len(members))]
                    if any(room):
                        d = [v if ok else math.inf for v, ok in zip(d, room)]
                j = min(range(len(members)), key=lambda a: d[a])
                counts[j] += len(cells)
                for y, x in cells:
                    chosen[y, x] = j
        prev = (chosen, Ys)
    return members[prev[0]]


@pytest.mark.parametrize("levels,block,radius,g,cap", [
    (2, 2, 1, 1.0, None),
    (3, 2, 1, 0.5, None),
    (2, 3, 0, 2.0, None),  # blocks clipped at the edge (8 is not a multiple of 3)
    (2, 2, 1, 1.0, 0.25),
    (1, 4, 2, 1.0, 0.5),  # one scale: the sample alone guides the first block
])
def test_guided_mode_equals_the_loop_reference(levels, block, radius, g, cap):
    gen = torch.Generator().manual_seed(3)
    N, c, h, w = 9, 3, 8, 8
    bank = torch.randn(N, c, h, w, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 1])
    z = torch.randn(4, c, h, w, generator=gen, dtype=torch.float64)
    comps = torch.tensor([1, 0, 1, 0])
    cfg = RefineConfig(patch_radius=radius, mode="guided", levels=levels, block=block, guide_weight=g, max_share=cap)
    _, prov = NNRefiner(cfg).fit(bank, labels).refine(z, comps)
    for i in range(4):
        members = torch.nonzero(labels == comps[i]).squeeze(1)
        ref = _reference(z[i], bank, members, levels, block, radius, g, cap)
        assert torch.equal(prov[i], ref), f"face {i}"


def test_guided_faces_do_not_depend_on_the_batch_and_respect_the_cap():
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(40, 4, 16, 16, generator=gen)
    z = torch.randn(12, 4, 16, 16, generator=gen)
    r = NNRefiner(RefineConfig(mode="guided", max_share=0.25, block_elements=40 * 256 * 2 * 5)).fit(bank)
    _, prov = r.refine(z)  # several memory blocks of 5 faces
    for i in (0, 7, 11):
        _, alone = r.refine(z[i:i + 1])
        assert torch.equal(alone[0], prov[i])
    assert max(torch.bincount(p.flatten()).max().item() for p in prov) <= 64
    # without the cap, continuing the photo already copied is free: random data collapses to few photos
    _, free = NNRefiner(RefineConfig(mode="guided")).fit(bank).refine(z)
    assert max(torch.bincount(p.flatten()).max().item() for p in free) > 64


def test_a_training_latent_is_copied_whole_without_a_cap():
    gen = torch.Generator().manual_seed(5)
    bank = torch.randn(20, 4, 16, 16, generator=gen)
    out, prov = NNRefiner(RefineConfig(mode="guided")).fit(bank).refine(bank[[3, 11]])
    assert torch.equal(prov[0], torch.full((16, 16), 3)) and torch.equal(prov[1], torch.full((16, 16), 11))
    assert torch.equal(out, bank[[3, 11]])


def test_guided_errors():
    with pytest.raises(ConfigError, match="guide_weight"):
        RefineConfig(mode="guided", guide_weight=0.0)
    with pytest.raises(ConfigError, match="levels"):
        RefineConfig(mode="guided", levels=0)
    with pytest.raises(ConfigError, match="divisible"):
        NNRefiner(RefineConfig(mode="guided", levels=4)).fit(torch.randn(3, 2, 12, 12))


@pytest.mark.parametrize("mode", ["guided", "seam", "paper"])
def test_large_components_are_searched_by_their_nearest_group(mode):
    gen = torch.Generator().manual_seed(7)
    bank = torch.randn(120, 3, 8, 8, generator=gen, dtype=torch.float64)
    bank[:60] += 1.5  # two clumps inside component 0
    labels = torch.zeros(120, dtype=torch.int64)
    labels[100:] = 1  # component 1: 20 photos, under the bound
    z = torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64)
    z[:4] += 1.5
    comps = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    kw = dict(mode=mode, levels=2, block=2, patch_radius=1, max_share=None if mode == "paper" else 0.5)
    split = NNRefiner(RefineConfig(max_members=40, **kw)).fit(bank, labels)
    whole = NNRefiner(RefineConfig(**kw)).fit(bank, labels)
    centroids, groups = split._groups[0]
    assert 1 not in split._groups and len(groups) == 3 and sum(len(g) for g in groups) == 100
    assert sorted(torch.cat(groups).tolist()) == list(range(100))
    _, prov = split.refine(z, comps)
    _, prov_whole = whole.refine(z, comps)
    feats = F.adaptive_avg_pool2d(z.float(), 4).reshape(8, -1)
    for i in range(6):
        g = int(torch.cdist(feats[i:i + 1], centroids).argmin())
        # the reference: the same rule on the group's members alone, as a component of its own
        sub = groups[g]
        ref_labels = torch.full((120,), 5, dtype=torch.int64)
        ref_labels[sub] = 0
        _, ref = NNRefiner(RefineConfig(**kw)).fit(bank, ref_labels).refine(z[i:i + 1], torch.tensor([0]))
        assert torch.equal(prov[i], ref[0]), i
        assert set(prov[i].unique().tolist()) <= set(sub.tolist())
    assert torch.equal(prov[6:], prov_whole[6:])  # a component under the bound is searched whole
    _, alone = split.refine(z[2:3], comps[2:3])
    assert torch.equal(alone[0], prov[2])


def _polish_energy(r, L, guided, h, w):
    """anchor * distance to the guided collage + seam_weight * seam cost over 4-neighbours."""
    from faceprint.latent.refine import POLISH_ANCHOR

    pix = r._pixels()  # (N, hw, C)
    at = torch.arange(h * w)
    Z, G = pix[L, at], pix[guided, at]
    e = POLISH_ANCHOR * ((Z - G) ** 2).sum()
    idx = at.view(h, w)
    for a, b in ((idx[:, :-1], idx[:, 1:]), (idx[:-1], idx[1:])):
        a, b = a.reshape(-1), b.reshape(-1)
        cut = L[a] != L[b]
        s = ((pix[L[a], a] - pix[L[b], a]) ** 2).sum(-1) + ((pix[L[a], b] - pix[L[b], b]) ** 2).sum(-1)
        e += r.config.seam_weight * (s * cut).sum()
    return float(e)


def test_polish_moves_cuts_and_lowers_its_energy():
    gen = torch.Generator().manual_seed(8)
    # smooth photos, so that two photos agree in places and a cut can move to where they do
    bank = F.avg_pool2d(torch.randn(30, 3, 20, 20, generator=gen), 5, stride=1)[:, :, :16, :16] * 3
    z = F.avg_pool2d(torch.randn(6, 3, 20, 20, generator=gen), 5, stride=1)[:, :, :16, :16] * 3
    base = dict(mode="guided", max_share=0.35, seam_weight=1.0)
    _, guided = NNRefiner(RefineConfig(**base)).fit(bank).refine(z)
    r = NNRefiner(RefineConfig(polish=4, **base)).fit(bank)
    _, pol = r.refine(z)
    assert not torch.equal(pol, guided)  # some cut moved
    for i in range(6):
        g, p = guided[i].reshape(-1), pol[i].reshape(-1)
        assert _polish_energy(r, p, g, 16, 16) <= _polish_energy(r, g, g, 16, 16) + 1e-6
        assert torch.bincount(p).max() <= int(0.35 * 256)
        gm = guided[i]  # every polished pixel's photo was within 2 positions of it in the guided map
        for y in range(16):
            for x in range(16):
                opts = {int(gm[y, x])} | {int(gm[min(max(y + dy, 0), 15), min(max(x + dx, 0), 15)])
                                          for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2))}
                assert int(pol[i, y, x]) in opts
    _, alone = r.refine(z[3:4])
    assert torch.equal(alone[0], pol[3])
