"""Nearest-neighbour refinement of sampled latents (papers/000, Sec. 3.3, Eq. (5)-(6)).

For every latent position p, the sampled feature z(p) is replaced by the feature y_j(p) of
the training latent j, among the members of the sample's mixture component, whose
omega x omega patch around p (omega = 2 rho + 1, zero padding at the border) is nearest to
the patch of z around p. Positions are independent, so the whole step is a handful of
batched tensor operations:

    D[b, j, p]  = || z_b(p) - y_j(p) ||^2                 (pixel distances, one bmm per p)
    P[b, j, p]  = sum_{o in [-rho, rho]^2} D[b, j, p + o] (a box filter; zero padding means
                                                           out-of-grid offsets add nothing)
    j*(b, p)    = argmin_j P[b, j, p]

j*(b, p) is the provenance map: which training photo each latent pixel was copied from.

Three selection rules (``RefineConfig.mode``):

"paper"  j*(b, p) = argmin_j P[b, j, p] at every position independently (Eq. (5)).
"seam"   the same patch costs, but the choice at neighbouring positions is made jointly, so that
         the collage has no visible seams (faceprint's own; the idea of graph-cut textures,
         Kwatra et al. 2003, and of image quilting's minimum-error boundary, Efros & Freeman
         2001, on latent pixels). Each position keeps its ``candidates`` cheapest photos, and
         the labelling L minimises

             E(L) = sum_p P[L(p), p] / (omega^2)  +  beta sum_{p ~ p'} seam(L(p), L(p'))

         over 4-neighbours p ~ p', where the seam cost of placing photo a at p beside photo
         b at p' is how much the two photos disagree on both sides of the cut,

             seam(a, b) = || y_a(p) - y_b(p) ||^2 + || y_a(p') - y_b(p') ||^2   (0 if a = b),

         i.e. a cut is free where the two photos already agree. beta = ``seam_weight``. E is
         lowered by iterated conditional modes from the "paper" labelling, updating the two
         colours of a checkerboard in turn (``sweeps`` rounds): each update can only lower E.
         Every latent pixel is still one training photo's pixel, so the provenance map stays
         exact and data-level fingerprints in the bank are carried unchanged.

         ``max_share`` (optional) caps the share of one face's latent pixels that any one
         photo may supply, as a hard constraint of the same ICM: a photo at its cap takes no
         new pixel (when more positions of one half-sweep would join a photo than it has room
         for, the ones that gain most join), and a photo over its cap (the paper labelling
         starts unconstrained) must give pixels back, the cheapest ones first, exactly as many
         as it is over. Extra repair sweeps run until every face is within the cap (or no
         position has an alternative candidate left). The copy guard's share rule then has
         nothing to redraw: the face is made under the bound instead of being thrown away.
"guided" a coarse-to-fine block synthesis guided by the sample (faceprint's own; LatentPatch's
         multi-scale raster synthesis, module latentpatch.py, with the sample z in place of its
         random start). Members and sample are average-pooled into a pyramid of ``levels``
         scales (s = 0 the coarsest, each halving the grid). Scale by scale, coarse to fine,
         the grid is cut into ``block`` x ``block`` blocks visited in raster order; each block
         is copied whole from the member j minimising the sum, over its window (the block grown
         by ``patch_radius``, clipped), of

             M_s[j, p] = || S_s(p) - Y_j^s(p) ||^2                        p synthesised at s
                       = M_{s-1}[j, parent(p)] + guide_weight || z^s(p) - Y_j^s(p) ||^2   otherwise

         (M_{-1} = 0), S_s the synthesis so far. The sample's long-range layout (the mixture
         models it) decides the coarse blocks; the copied blocks' own content then decides how
         their neighbours continue, so a face is a few coherent pieces with seams matched on
         both sides. The choice is the nearest, not a random top-k draw: the randomness is the
         sample's. ``max_share`` applies at the finest scale: a photo takes a block only while
         the block fits under its cap (when no member has room, as in a component of one
         photo, the cap cannot hold and is ignored). Provenance stays exact: one photo per
         finest block.

Large components (every rule). A component of more than ``max_members`` photos is split at fit
into ceil(n / max_members) groups by k-means on the members' 4x4 average-pooled latents (seeded
by the component's index, so the split is a function of the bank); a sample is refined among
the members of the group whose centroid is nearest to its own pooled latent. The search then
never scans more than about ``max_members`` photos per latent pixel, whatever N: at N = 28,000
one component held about 6,900 photos and dominated the synthesis time. Components of at most
``max_members`` photos (all of them at N = 1,024) are searched whole, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError, NotFittedError

REFINE_MODES = ("paper", "seam", "guided")
#: weight of the distance to the guided collage in the seam polish (small: cuts move freely)
POLISH_ANCHOR = 0.1
# the 4-neighbourhood as (dy, dx)
_DIRS = ((-1, 0), (1, 0), (0, -1), (0, 1))


@dataclass(frozen=True)
class RefineConfig:
    """patch_radius: rho (patch side omega = 2 rho + 1; the paper's Fig. 1 uses omega = 5).
    iterations: how many times the projection is applied (the paper uses 1).
    block_elements: memory budget of one distance block, in tensor elements.
    levels, block, guide_weight: the "guided" rule's pyramid scales, block side and weight of
    the sample in the distance (module docstring).
    max_members: components larger than this are searched by groups (module docstring); None
    searches every member.
    polish: sweeps of the guided rule's seam polish (0: none; _polish)."""

    patch_radius: int = 2
    iterations: int = 1
    block_elements: int = 1 << 24
    mode: str = "paper"
    candidates: int = 8
    seam_weight: float = 1.0
    sweeps: int = 4
    max_share: float | None = None
    levels: int = 3
    block: int = 4
    guide_weight: float = 1.0
    max_members: int | None = None
    polish: int = 0

    def __post_init__(self):
        for name, lo in (("patch_radius", 0), ("iterations", 0), ("block_elements", 1), ("candidates", 1),
                         ("sweeps", 0), ("levels", 1), ("block", 1), ("polish", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.mode not in REFINE_MODES:
            raise ConfigError(f"refinement mode must be one of {', '.join(REFINE_MODES)}, got {self.mode!r}")
        if not (isinstance(self.seam_weight, (int, float)) and not isinstance(self.seam_weight, bool)
                and 0 <= self.seam_weight < 1e6):
            raise ConfigError(f"seam_weight must be a number in [0, 1e6), got {self.seam_weight!r}")
        mm = self.max_members
        if mm is not None and (isinstance(mm, bool) or not isinstance(mm, int) or mm < 2):
            raise ConfigError(f"max_members must be None or an int >= 2, got {mm!r}")
        g = self.guide_weight
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
            raise ConfigError(f"guide_weight must be a finite number > 0, got {g!r}; the default is 1.0")
        if self.max_share is not None:
            if not (isinstance(self.max_share, (int, float)) and not isinstance(self.max_share, bool)
                    and 0 < self.max_share <= 1):
                raise ConfigError(f"max_share must be None or a number in (0, 1], got {self.max_share!r}")
            if self.mode == "paper":
                raise ConfigError("max_share needs the seam or guided refinement; the paper's rule chooses every "
                                  "position on its own, with nothing to constrain")


class NNRefiner:
    """Patch nearest-neighbour projection onto a bank of training latents.

    fit(bank (N, q, h, w), labels (N,)) stores the bank and each training latent's cluster;
    refine(z (B, q, h, w), components (B,)) returns (refined (B, q, h, w), provenance (B, h, w)).
    """

    def __init__(self, config: RefineConfig | None = None):
        self.config = config or RefineConfig()
        self.bank_: torch.Tensor | None = None
        self.labels_: torch.Tensor | None = None

    def fit(self, bank: torch.Tensor, labels: torch.Tensor | None = None) -> "NNRefiner":
        if not isinstance(bank, torch.Tensor) or bank.ndim != 4 or bank.shape[0] < 1:
            raise InputError(f"bank must be a non-empty (N, q, h, w) tensor, got {tuple(getattr(bank, 'shape', ()))}")
        if self.config.patch_radius >= max(bank.shape[2], bank.shape[3]):
            raise ConfigError(f"patch_radius {self.config.patch_radius} is not smaller than the latent grid "
                              f"{bank.shape[2]}x{bank.shape[3]}; use a smaller patch radius")
        f = 2 ** (self.config.levels - 1)
        if self.config.mode == "guided" and (bank.shape[2] % f or bank.shape[3] % f):
            raise ConfigError(f"the guided refinement halves the {bank.shape[2]}x{bank.shape[3]} latent grid "
                              f"{self.config.levels - 1} times, so its sides must be divisible by {f}; "
                              "use fewer levels")
        if labels is None:
            labels = torch.zeros(bank.shape[0], dtype=torch.int64)
        labels = torch.as_tensor(labels).long()
        if labels.shape != (bank.shape[0],):
            raise InputError(f"labels must have shape ({bank.shape[0]},), got {tuple(labels.shape)}")
        self.bank_ = bank
        self.labels_ = labels
        self._members = {int(k): torch.nonzero(labels == k).squeeze(1) for k in torch.unique(labels)}
        self._groups = {}  # component -> (centroids (G, D), [members of each group])
        mm = self.config.max_members
        if mm is not None:
            for k, m in self._members.items():
                if m.numel() > mm:
                    self._groups[k] = _split(_coarse(bank[m]), m, -(-m.numel() // mm), k)
        self._sq = {}
        self._pix = None
        self._pyr = {}
        self._plan = None
        return self

    def _pixels(self) -> torch.Tensor:
        """The bank as (N, h*w, C) float32, made once: the seam rule reads whole pixel vectors."""
        if self._pix is None:
            N, C, h, w = self.bank_.shape
            self._pix = self.bank_.float().permute(0, 2, 3, 1).reshape(N, h * w, C).contiguous()
        return self._pix

    def members(self, component: int) -> torch.Tensor:
        self._check_fitted()
        m = self._members.get(int(component))
        if m is None or m.numel() == 0:
            raise InputError(f"component {component} has no training latents in the refinement bank")
        return m

    def refine(self, z: torch.Tensor, components: torch.Tensor | None = None,
               iterations: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Project z (B, q, h, w) onto the bank; returns (refined, provenance (B, h, w) int64).

        With iterations = 0 the input is returned unchanged and provenance is -1 everywhere."""
        self._check_fitted()
        if z.ndim != 4 or z.shape[1:] != self.bank_.shape[1:]:
            raise InputError(f"z must have shape (B, {', '.join(map(str, self.bank_.shape[1:]))}), got {tuple(z.shape)}")
        B = z.shape[0]
        if components is None:
            components = torch.zeros(B, dtype=torch.int64)
        components = torch.as_tensor(components).long()
        iters = self.config.iterations if iterations is None else iterations
        prov = torch.full((B,) + tuple(z.shape[2:]), -1, dtype=torch.int64)
        cur = z.to(self.bank_.dtype)
        for _ in range(iters):
            for k in torch.unique(components).tolist():
                idx = torch.nonzero(components == k).squeeze(1)
                members = self.members(k)
                split = self._groups.get(int(k))
                if split is None:
                    prov[idx] = self._nearest(cur[idx], members)
                    continue
                centroids, groups = split
                which = torch.cdist(_coarse(cur[idx]), centroids).argmin(1)  # (b,) nearest group
                for gi in torch.unique(which).tolist():
                    sub = idx[which == gi]
                    prov[sub] = self._nearest(cur[sub], groups[gi])
            cur = gather(self.bank_, prov)
        return cur, prov

    def _nearest(self, q: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Global index of the chosen member for every query position: (b, h, w)."""
        if self.config.mode == "guided":
            return self._guided(q, members)
        b, c, h, w = q.shape
        rho = self.config.patch_radius
        n = members.numel()
        seam = self.config.mode == "seam" and n > 1
        kc = min(self.config.candidates, n)
        Y, y2 = self._member_bank(members)
        out = torch.empty(b, h * w, dtype=torch.int64)
        step = max(1, self.config.block_elements // max(n * h * w, 1))
        for s in range(0, b, step):
            Q = q[s:s + step].reshape(-1, c, h * w).permute(2, 0, 1)  # (hw, bb, c)
            bb = Q.shape[1]
            D = (Q * Q).sum(2, keepdim=True) + y2 - 2 * torch.bmm(Q, Y)  # (hw, bb, n)
            D = D.clamp_min_(0)
            if rho > 0:
                D = D.permute(1, 2, 0).reshape(bb * n, 1, h, w)
                D = F.avg_pool2d(D, 2 * rho + 1, stride=1, padding=rho, count_include_pad=True)
                D = D.reshape(bb, n, h * w)
            else:
                D = D.permute(1, 2, 0)  # (bb, n, hw)
            if seam:
                cost, cand = D.topk(kc, dim=1, largest=False)  # (bb, kc, hw), ascending
                j = self._seam_labels(cost.permute(0, 2, 1), members[cand].permute(0, 2, 1), h, w)
                out[s:s + bb] = j
            else:
                out[s:s + bb] = members[D.argmin(1)]
        return out.reshape(b, h, w)

    def _seam_labels(self, unary: torch.Tensor, cand: torch.Tensor, h: int, w: int,
                     sweeps: int | None = None) -> torch.Tensor:
        """Iterated conditional modes on the seam energy (module docstring).

        unary (B, hw, k) patch costs of the candidates (ascending), cand (B, hw, k) their global
        photo indices. Returns the chosen global indices (B, hw)."""
        B, hw, k = cand.shape
        bank = self.bank_
        beta = float(self.config.seam_weight)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)  # (hw,)
        # neighbour index and validity per direction
        nb_idx, nb_ok = [], []
        for dy, dx in _DIRS:
            yy, xx = ys + dy, xs + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            nb_idx.append((yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)))
            nb_ok.append(ok)
        pix = self._pixels()  # (N, hw, C): one photo's feature at one position is contiguous
        arange = torch.arange(hw)
        # candidates' own features at p and at each neighbour p' (fixed through the sweeps)
        own = pix[cand, arange.view(1, hw, 1)]  # (B, hw, k, C)
        at_nb = [pix[cand, nb_idx[d].view(1, hw, 1)] for d in range(4)]  # each (B, hw, k, C)
        label = torch.zeros(B, hw, dtype=torch.int64)  # candidate slot; 0 = the paper's choice
        checker = ((ys + xs) % 2).bool()
        halves = []
        for colour in (False, True):  # the pixels of one colour have no neighbour of their colour
            pos = torch.nonzero(checker == colour).squeeze(1)
            halves.append((pos, unary[:, pos], own[:, pos], [a[:, pos] for a in at_nb],
                           [nb_idx[d][pos] for d in range(4)], [nb_ok[d][pos].view(1, -1, 1) for d in range(4)]))
        cap = self.config.max_share
        cap_n = None if cap is None else max(1, int(math.floor(cap * hw + 1e-9)))
        n_bank = bank.shape[0]
        n_sweeps = self.config.sweeps if sweeps is None else sweeps
        sweep = 0
        active = torch.ones(B, dtype=torch.bool)  # faces the sweeps still update
        while True:
            before = None
            if sweep >= n_sweeps:
                # repair sweeps (capped only), for the faces still over the cap, until they are
                # within it or a sweep changes nothing (a component of one photo cannot be capped);
                # each face's decision is its own, so a face is the same alone or in a batch
                if cap_n is None or sweep >= n_sweeps + 2 * hw:
                    break
                L = cand.gather(2, label[..., None])[..., 0]
                active &= _counts(L, n_bank).max(1).values > cap_n
                if not active.any():
                    break
                before = label.clone()
            sweep += 1
            for pos, un, own_c, at_nb_c, nb_c, ok_c in halves:
                L = cand.gather(2, label[..., None])[..., 0]  # (B, hw) global photo per position
                Z = pix[L, arange.view(1, hw)]  # (B, hw, C) the current collage
                cost = un.clone()
                for d in range(4):
                    nbp = L[:, nb_c[d]]  # (B, P) the neighbour's photo
                    nb_at_p = pix[nbp, pos.view(1, -1)][:, :, None]  # y_b(p) (B, P, 1, C)
                    nb_at_nb = Z[:, nb_c[d]][:, :, None]  # y_b(p') (B, P, 1, C)
                    s_ = ((own_c - nb_at_p) ** 2).sum(-1) + ((at_nb_c[d] - nb_at_nb) ** 2).sum(-1)
                    cost += beta * s_ * ok_c[d]
                if cap_n is None:
                    label[:, pos] = cost.argmin(2)
                else:
                    new = _capped_choice(cost, cand[:, pos], label[:, pos], L, cap_n, n_bank)
                    label[:, pos] = torch.where(active[:, None], new, label[:, pos])
            if before is not None:
                active &= (label != before).any(1)
        return cand.gather(2, label[..., None])[..., 0]

    def _guided(self, q: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """The "guided" rule (module docstring): the chosen global photo per position, (b, h, w)."""
        b, c, h, w = q.shape
        cfg = self.config
        n = members.numel()
        if self._plan is None:
            from .latentpatch import _plan

            self._plan = _plan(h, w, cfg.levels, cfg.block, cfg.patch_radius, guided=True)
        plan = self._plan
        pyr = self._member_pyramid(members)
        g = float(cfg.guide_weight)
        cap_n = None if cfg.max_share is None else max(1, int(math.floor(cfg.max_share * h * w + 1e-9)))
        out = torch.empty(b, h * w, dtype=torch.int64)
        step = max(1, cfg.block_elements // max(2 * n * h * w, 1))
        for s0 in range(0, b, step):
            zq = q[s0:s0 + step].float()
            bb = zq.shape[0]
            rows = torch.arange(bb)
            M = None
            for s, level in enumerate(plan):
                f = 2 ** (cfg.levels - 1 - s)
                zs = F.avg_pool2d(zq, f) if f > 1 else zq
                Y, y2 = pyr[s]  # (P, c, n), (P, 1, n)
                Q = zs.reshape(bb, c, -1).permute(2, 0, 1)  # (P, bb, c)
                G = ((Q * Q).sum(2, keepdim=True) + y2 - 2 * torch.bmm(Q, Y)).clamp_min_(0)  # (P, bb, n)
                if M is None:
                    M = g * G
                else:
                    hp, wp = plan[s - 1]["shape"]
                    hs, ws = level["shape"]
                    up = M.reshape(hp, 1, wp, 1, bb, n).expand(hp, 2, wp, 2, bb, n).reshape(hs * ws, bb, n)
                    M = up + g * G
                finest = s == len(plan) - 1
                counts = torch.zeros(bb, n, dtype=torch.int64) if finest and cap_n is not None else None
                prov = torch.empty(len(M), bb, dtype=torch.int64)
                for blk, win in zip(level["blocks"], level["windows"]):
                    dist = M[win].sum(0)  # (bb, n)
                    if counts is not None:
                        full = counts + blk.numel() > cap_n
                        full &= ~full.all(1, keepdim=True)  # no member has room: the cap cannot hold
                        dist = dist.masked_fill(full, float("inf"))
                    choice = dist.argmin(1)  # (bb,)
                    if counts is not None:
                        counts[rows, choice] += blk.numel()
                    prov[blk] = choice[None, :]
                    Yb = Y[blk]  # (nb, c, n)
                    Sb = Yb[:, :, choice]  # (nb, c, bb): the copied member's features
                    d = ((Sb * Sb).sum(1)[:, :, None] + y2[blk] - 2 * torch.bmm(Sb.transpose(1, 2), Yb))
                    M[blk] = d.clamp_min_(0)
            out[s0:s0 + bb] = members[prov.T]
        if cfg.polish > 0:
            out = self._polish(out, h, w)
        return out.reshape(b, h, w)

    def _polish(self, L: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Move the guided rule's block-aligned cuts to where the photos on both sides agree:
        every position may take its own photo or the photo 2 positions away in each of the 4
        directions (so cuts move by up to 2 latent pixels), with the distance to the guided
        collage as unary cost, and the seam rule's ICM (seam_weight, ``polish`` sweeps, the share
        cap) lowers unary + seam energy. L (b, hw) global photos; returns the new (b, hw)."""
        pix = self._pixels()
        hw = h * w
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        cols = [L]
        for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2)):
            nb = (ys + dy).clamp(0, h - 1) * w + (xs + dx).clamp(0, w - 1)
            cols.append(L[:, nb])
        cand = torch.stack(cols, 2)  # (b, hw, 5), slot 0 the guided photo
        arange = torch.arange(hw)
        own = pix[cand, arange.view(1, hw, 1)]  # (b, hw, 5, C)
        unary = POLISH_ANCHOR * ((own - own[:, :, :1]) ** 2).sum(-1)  # 0 for the guided photo
        return self._seam_labels(unary, cand, h, w, sweeps=self.config.polish)

    def _member_pyramid(self, members: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The members' features at every scale of the guided rule, coarse to fine, each laid out
        for the distance bmm as (P, c, n) with squared norms (P, 1, n); kept per member set."""
        key = (members.numel(), int(members[0]), int(members[-1]), int(members.sum()))
        hit = self._pyr.get(key)
        if hit is None or not torch.equal(hit[0], members):
            L = self.config.levels
            Yb = self.bank_[members].float()
            n, c = Yb.shape[:2]
            levels = []
            for s in range(L):
                f = 2 ** (L - 1 - s)
                Ys = F.avg_pool2d(Yb, f) if f > 1 else Yb
                Y = Ys.reshape(n, c, -1).permute(2, 1, 0).contiguous()
                levels.append((Y, (Y * Y).sum(1, keepdim=True)))
            hit = (members.clone(), levels)
            self._pyr[key] = hit
        return hit[1]

    def _member_bank(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' features laid out for the distance bmm, (hw, c, n), and their squared
        norms (hw, 1, n); computed once per member set (a component) and kept."""
        key = (members.numel(), int(members[0]), int(members[-1]), int(members.sum()))
        hit = self._sq.get(key)
        if hit is None or not torch.equal(hit[0], members):
            n, (c, h, w) = members.numel(), self.bank_.shape[1:]
            Y = self.bank_[members].reshape(n, c, h * w).permute(2, 1, 0).contiguous()
            hit = (members.clone(), Y, (Y * Y).sum(1, keepdim=True))
            self._sq[key] = hit
        return hit[1], hit[2]

    def _check_fitted(self):
        if self.bank_ is None:
            raise NotFittedError("NNRefiner is not fitted; call fit(bank, labels) first")


def _coarse(x: torch.Tensor) -> torch.Tensor:
    """Latents (n, c, h, w) as their 4x4 average-pooled features (n, 16 c), float32."""
    return F.adaptive_avg_pool2d(x.float(), 4).reshape(x.shape[0], -1)


def _split(feats: torch.Tensor, members: torch.Tensor, n_groups: int, component: int):
    """k-means of one large component's members into n_groups: (centroids, [members per group]),
    seeded by the component's index; empty groups are dropped."""
    from ..seeding import generator
    from .mixture import kmeans

    lab = kmeans(feats.double(), n_groups, generator=generator(0, "refine-groups", component), n_iter=30)
    groups, cents = [], []
    for gi in range(n_groups):
        sel = lab == gi
        if sel.any():
            groups.append(members[sel])
            cents.append(feats[sel].mean(0))
    return torch.stack(cents), groups


def _counts(L: torch.Tensor, n: int) -> torch.Tensor:
    """How many positions of each face (rows of L, global photo indices) each photo supplies: (B, n)."""
    return torch.zeros(L.shape[0], n, dtype=torch.int64).scatter_add_(1, L, torch.ones_like(L))


def _rank_within(keys: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """For every element, its rank among the elements of the same key, by ascending score
    (ties: the earlier element first). keys, score: (M,)."""
    order = torch.argsort(score, stable=True)
    idx = order[torch.argsort(keys[order], stable=True)]  # grouped by key, by score within a key
    ks = keys[idx]
    at = torch.arange(ks.numel())
    start = torch.ones_like(ks, dtype=torch.bool)
    start[1:] = ks[1:] != ks[:-1]
    first = torch.cummax(torch.where(start, at, torch.zeros_like(at)), 0).values
    rank = torch.empty_like(at)
    rank[idx] = at - first
    return rank


def _capped_choice(cost, cand, slot, L, cap_n: int, n_bank: int) -> torch.Tensor:
    """One half-sweep's new candidate slots under the share cap (module docstring).

    cost, cand (B, P, k): the energies and global photos of the candidates at this half's P
    positions; slot (B, P): their current slots; L (B, hw): every position's current photo.
    The positions of one half have no neighbour among themselves, so each accepted change
    lowers the energy on its own; the cap decides which changes are accepted."""
    B, P, k = cost.shape
    counts = _counts(L, n_bank)  # (B, n_bank), before this half-sweep
    cur = cand.gather(2, slot[..., None])[..., 0]  # (B, P) current photo
    cnt_c = counts.gather(1, cand.reshape(B, -1)).reshape(B, P, k)
    cnt_cur = counts.gather(1, cur)  # (B, P)
    is_cur = torch.arange(k).view(1, 1, k) == slot[..., None]
    allowed = is_cur | (cnt_c < cap_n)  # join a photo only while it has room
    must_leave = (cnt_cur > cap_n)[..., None] & is_cur
    leave_ok = (allowed & ~must_leave).any(2, keepdim=True)
    allowed = torch.where(leave_ok, allowed & ~must_leave, allowed)
    choice = cost.masked_fill(~allowed, float("inf")).argmin(2)  # (B, P)
    new = cand.gather(2, choice[..., None])[..., 0]
    delta = cost.gather(2, choice[..., None])[..., 0] - cost.gather(2, slot[..., None])[..., 0]
    bidx = torch.arange(B).view(B, 1).expand(B, P)
    # joins: at most the photo's room, the largest gains first
    moved = new != cur
    if moved.any():
        keys = (bidx * n_bank + new)[moved]
        rank = _rank_within(keys, delta[moved])
        room = (cap_n - counts.gather(1, new))[moved]
        keep = torch.zeros_like(moved)
        keep[moved] = rank < room
        revert = moved & ~keep
        choice = torch.where(revert, slot, choice)
        new = torch.where(revert, cur, new)
    # forced leaves: exactly as many as the photo is over its cap, the cheapest first
    forced = (new != cur) & (cnt_cur > cap_n) & (delta > 0)
    if forced.any():
        keys = (bidx * n_bank + cur)[forced]
        rank = _rank_within(keys, delta[forced])
        excess = (cnt_cur - cap_n)[forced]
        keep = torch.zeros_like(forced)
        keep[forced] = rank < excess
        choice = torch.where(forced & ~keep, slot, choice)
    return choice


def gather(bank: torch.Tensor, provenance: torch.Tensor) -> torch.Tensor:
    """Latent pixels copied from the bank: out[b, :, p] = bank[provenance[b, p], :, p].

    bank (N, C, h, w), provenance (B, h, w) int64 -> (B, C, h, w)."""
    _, _, h, w = bank.shape
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    # advanced indexing reads only the copied pixels (no copy of the whole bank): (B, h, w, C)
    return bank[provenance, :, ys, xs].permute(0, 3, 1, 2).contiguous()
