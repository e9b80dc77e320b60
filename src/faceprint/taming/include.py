"""Guarantee minority coverage (papers/004 ch. 7, Inclusive GAN, Sec. 7.3.4): the user names
subgroups (e.g. Bald, Eyeglasses, a race or age band) the model must cover.

Ch. 7 adds a reconstruction loss on the subgroup's photos so that every one of them has a
generated sample near it. The mixture's analogue is direct:

1. the subgroup gets components of its own, fitted on its photos only (the split of
   :meth:`GaussianMixture.split`); a subgroup mixed into large components otherwise gets
   sampled near those components' means, and its NN refinement copies from everyone;
2. those components get at least a chosen share of the output (default: twice the subgroup's
   share of the training photos, at least 5%), re-weighted by the minimum-KL tilt of
   :func:`faceprint.taming.rebalance.tilt_weights`; the low-rank sampler's rank d_k grows with
   the weight (papers/000 Eq. 3), so the subgroup's samples also vary more.

Coverage is then measured per subgroup with :func:`faceprint.metrics.coverage.subgroup_coverage`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import InputError
from .rebalance import tilt_weights


@dataclass
class IncludeReport:
    subgroups: list[str]
    data_share: dict  # subgroup -> share of training photos
    share_before: dict  # subgroup -> expected share of output before
    share_after: dict
    components_before: int
    components_after: int
    seconds: float


def include(gen, members: dict, *, share: float | dict | None = None, min_members: float = 8.0, source: str = "labels"):
    """A copy of ``gen`` in which each named subgroup has its own components and a floor share.

    Parameters
    ----------
    gen : Generator (fitted)
    members : {subgroup name: bool sequence over the training photos (bank order)}
    share : float or {name: float}, optional
        Minimum expected share of the output for each subgroup (default: max(2 x data share, 0.05),
        capped so that all floors fit).
    min_members : float
        Smallest number of photos for a split-off part.
    """
    gen._check_fitted()
    if not members:
        raise InputError("no subgroup to include; e.g. --include Bald")
    N = gen.n_photos
    names = list(members)
    masks = {}
    for name in names:
        m = torch.as_tensor([bool(x) for x in members[name]])
        if m.numel() != N:
            raise InputError(f"subgroup {name!r}: {m.numel()} membership values for {N} training photos")
        if int(m.sum()) < 2:
            raise InputError(f"subgroup {name!r} has {int(m.sum())} training photos; at least 2 are needed to cover it")
        masks[name] = m
    data_share = {n: float(masks[n].float().mean()) for n in names}
    floors = {}
    for n in names:
        s = share.get(n) if isinstance(share, dict) else share
        if s is None:
            s = max(2 * data_share[n], 0.05)
        if not (0 < s < 1):
            raise InputError(f"share for {n!r} must be in (0, 1), got {s}")
        floors[n] = s
    t0 = time.perf_counter()
    out = gen.copy()
    mix = out.mixture_
    K0 = mix.weights_.numel()
    cell = torch.zeros(N, dtype=torch.int64)
    for n in names:
        cell = cell * 2 + masks[n].long()
    Y = out.projector_.transform(out.bank_.float()).reshape(N, -1)
    info = mix.split(Y, cell, min_members=min(min_members, min(float(masks[n].sum()) for n in names)))
    rates_cell = info["cell_rates"]
    n_cells = rates_cell.shape[1]
    cols = []
    for j, n in enumerate(names):
        bit = len(names) - 1 - j
        sel = [c for c in range(n_cells) if (c >> bit) & 1]
        cols.append(rates_cell[:, sel].sum(1))
    R = torch.stack(cols, 1)  # (K', S): each component's share in each subgroup
    w = mix.weights_.double()
    cur = (R.T @ w).tolist()
    before = dict(zip(names, cur))
    need = [i for i, n in enumerate(names) if before[n] < floors[n]]
    if need:
        targets = torch.tensor([floors[names[i]] for i in need], dtype=torch.float64)
        w = tilt_weights(w, R[:, need], targets)
    mix.weights_ = w.to(mix.means_.dtype)
    out._cache = {}
    after = dict(zip(names, (R.T @ w).tolist()))
    seconds = time.perf_counter() - t0
    out.provenance_["components"] = mix.weights_.numel()
    out.record_operation({"operation": "include", "subgroups": names, "label_source": source,
                          "data_share": data_share, "floors": floors, "share_before": before, "share_after": after,
                          "components_before": K0, "components_after": mix.weights_.numel(),
                          "seconds": round(seconds, 4)})
    return out, IncludeReport(subgroups=names, data_share=data_share, share_before=before, share_after=after,
                              components_before=K0, components_after=mix.weights_.numel(), seconds=seconds)
