"""The seam-aware refinement (refine.py, mode "seam") against an explicit, loop-by-loop reference."""

import pytest
import torch
import torch.nn.functional as F

from faceprint.latent.refine import NNRefiner, RefineConfig, gather

pytestmark = pytest.mark.usefixtures("one_thread")
DIRS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _patch_costs(z, bank, members, rho):
    """P[m, i, j]: mean over the zero-padded window of squared pixel distances, explicitly."""
    q, h, w = z.shape
    om = 2 * rho + 1
    zp = F.pad(z, (rho,) * 4)
    bp = F.pad(bank, (rho,) * 4)
    P = torch.empty(len(members), h, w, dtype=z.dtype)
    for a, m in enumerate(members):
        for i in range(h):
            for j in range(w):
                P[a, i, j] = ((zp[:, i:i + om, j:j + om] - bp[m, :, i:i + om, j:j + om]) ** 2).sum() / om ** 2
    return P


def _reference(z, bank, members, rho, k, beta, sweeps):
    """Candidates, then checkerboard ICM on E = sum unary + beta * sum seam, one pixel at a time."""
    q, h, w = z.shape
    P = _patch_costs(z, bank, members, rho)
    cand = {}
    for i in range(h):
        for j in range(w):
            order = sorted(range(len(members)), key=lambda a: (float(P[a, i, j]), a))[:k]
            cand[i, j] = [(members[a], float(P[a, i, j])) for a in order]
    label = {(i, j): cand[i, j][0][0] for i in range(h) for j in range(w)}

    def seam(a, b, p, pn):
        if a == b:
            return 0.0
        return float(((bank[a, :, p[0], p[1]] - bank[b, :, p[0], p[1]]) ** 2).sum()
                     + ((bank[a, :, pn[0], pn[1]] - bank[b, :, pn[0], pn[1]]) ** 2).sum())

    for _ in range(sweeps):
        for colour in (0, 1):
            new = dict(label)
            for i in range(h):
                for j in range(w):
                    if (i + j) % 2 != colour:
                        continue
                    best, arg = None, None
                    for photo, u in cand[i, j]:
                        e = u
                        for dy, dx in DIRS:
                            ii, jj = i + dy, j + dx
                            if 0 <= ii < h and 0 <= jj < w:
                                e += beta * seam(photo, label[ii, jj], (i, j), (ii, jj))
                        if best is None or e < best - 1e-12:
                            best, arg = e, photo
                    new[i, j] = arg
            label = new
    out = torch.empty(h, w, dtype=torch.int64)
    for (i, j), v in label.items():
        out[i, j] = v
    return out


def _energy(prov, z, bank, rho, beta):
    P = None
    h, w = prov.shape
    members = sorted(set(prov.flatten().tolist()))
    P = _patch_costs(z, bank, list(range(bank.shape[0])), rho)
    e = sum(float(P[prov[i, j], i, j]) for i in range(h) for j in range(w))
    for i in range(h):
        for j in range(w):
            for ii, jj in ((i + 1, j), (i, j + 1)):
                if ii < h and jj < w and prov[i, j] != prov[ii, jj]:
                    a, b = prov[i, j], prov[ii, jj]
                    e += beta * float(((bank[a, :, i, j] - bank[b, :, i, j]) ** 2).sum()
                                      + ((bank[a, :, ii, jj] - bank[b, :, ii, jj]) ** 2).sum())
    del members
    return e


@pytest.mark.parametrize("rho,k,beta,sweeps", [(1, 3, 0.5, 2), (2, 4, 0.2, 3), (0, 2, 1.0, 1)])
def test_seam_mode_equals_the_loop_reference(rho, k, beta, sweeps):
    g = torch.Generator().manual_seed(rho * 10 + k)
    bank = torch.randn(24, 3, 5, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(2, (24,), generator=g)
    labels[:2] = torch.arange(2)
    z = torch.randn(3, 3, 5, 6, generator=g, dtype=torch.float64)
    comps = torch.tensor([0, 1, 1])
    cfg = RefineConfig(patch_radius=rho, mode="seam", candidates=k, seam_weight=beta, sweeps=sweeps,
                       block_elements=300)  # tiny blocks: the chunked path
    out, prov = NNRefiner(cfg).fit(bank, labels).refine(z, comps)
    for b in range(3):
        members = torch.nonzero(labels == comps[b]).squeeze(1).tolist()
        assert torch.equal(prov[b], _reference(z[b], bank, members, rho, k, beta, sweeps))
    assert torch.equal(out, gather(bank, prov))
    assert torch.equal(labels[prov], comps[:, None, None].expand_as(prov))


def test_seam_mode_lowers_the_energy_and_makes_fewer_pieces():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(40, 4, 6, 6, generator=g, dtype=torch.float64)
    z = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    paper = NNRefiner(RefineConfig(patch_radius=1)).fit(bank).refine(z)[1]
    seam = NNRefiner(RefineConfig(patch_radius=1, mode="seam", candidates=6, seam_weight=0.3, sweeps=4)).fit(bank).refine(z)[1]
    for b in range(4):
        assert _energy(seam[b], z[b], bank, 1, 0.3) <= _energy(paper[b], z[b], bank, 1, 0.3) + 1e-9
    cuts = lambda p: int((p[:, 1:] != p[:, :-1]).sum() + (p[:, :, 1:] != p[:, :, :-1]).sum())  # noqa: E731
    assert cuts(seam) < cuts(paper)


def test_zero_seam_weight_is_the_paper_rule():
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(30, 3, 5, 5, generator=g)
    z = torch.randn(6, 3, 5, 5, generator=g)
    paper = NNRefiner(RefineConfig()).fit(bank).refine(z)[1]
    seam = NNRefiner(RefineConfig(mode="seam", seam_weight=0.0)).fit(bank).refine(z)[1]
    assert torch.equal(paper, seam)
