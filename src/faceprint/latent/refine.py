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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError, NotFittedError


@dataclass(frozen=True)
class RefineConfig:
    """patch_radius: rho (patch side omega = 2 rho + 1; the paper's Fig. 1 uses omega = 5).
    iterations: how many times the projection is applied (the paper uses 1).
    block_elements: memory budget of one distance block, in tensor elements."""

    patch_radius: int = 2
    iterations: int = 1
    block_elements: int = 1 << 24

    def __post_init__(self):
        for name, lo in (("patch_radius", 0), ("iterations", 0), ("block_elements", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")


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
        if labels is None:
            labels = torch.zeros(bank.shape[0], dtype=torch.int64)
        labels = torch.as_tensor(labels).long()
        if labels.shape != (bank.shape[0],):
            raise InputError(f"labels must have shape ({bank.shape[0]},), got {tuple(labels.shape)}")
        self.bank_ = bank
        self.labels_ = labels
        self._members = {int(k): torch.nonzero(labels == k).squeeze(1) for k in torch.unique(labels)}
        self._sq = {}
        return self

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
                prov[idx] = self._nearest(cur[idx], self.members(k))
            cur = gather(self.bank_, prov)
        return cur, prov

    def _nearest(self, q: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Global index of the nearest member patch for every query position: (b, h, w)."""
        b, c, h, w = q.shape
        rho = self.config.patch_radius
        n = members.numel()
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
                j = D.argmin(1)  # (bb, hw)
            else:
                j = D.argmin(2).T  # (bb, hw)
            out[s:s + bb] = members[j]
        return out.reshape(b, h, w)

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


def gather(bank: torch.Tensor, provenance: torch.Tensor) -> torch.Tensor:
    """Latent pixels copied from the bank: out[b, :, p] = bank[provenance[b, p], :, p].

    bank (N, C, h, w), provenance (B, h, w) int64 -> (B, C, h, w)."""
    _, _, h, w = bank.shape
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    # advanced indexing reads only the copied pixels (no copy of the whole bank): (B, h, w, C)
    return bank[provenance, :, ys, xs].permute(0, 3, 1, 2).contiguous()
