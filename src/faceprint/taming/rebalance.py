"""Set how often attribute values appear in a model's output (papers/002: "forcing a model to
output specific image categories according to a given target distribution").

For a mixture this is an exact re-weighting once every component holds one attribute value:

1. Split: every component is split along the requested attributes' joint values
   (:meth:`GaussianMixture.split`): part (k, v) is the Gaussian fitted to component k's
   responsibilities restricted to the photos with value v, and the NN refinement of a sample
   from that part copies only from those photos. Cells with too few photos in a component
   (``min_members``) stay together in a remainder part, whose attribute rate is fractional.
2. Re-weight: among all weightings pi' with the requested marginal shares
   sum_k pi'_k p_k(a = v) = t(a, v), take the one closest to the fitted weights in
   KL(pi' || pi): the exponential tilt pi'_k ∝ pi_k exp(sum theta_(a,v) p_k(a = v)), with theta
   found by Newton's method on the convex dual. With 0/1 rates this is exact iterative
   proportional fitting; with fractional rates it is the least change that meets the targets.

The attribute of a training photo comes from a label table (e.g. celeba's attributes.csv) or
from faceprint's attribute classifiers; which one is recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass
class RebalanceReport:
    targets: dict  # attribute -> {value: share}
    shares_before: dict  # attribute -> {value: expected share under the fitted weights}
    shares_after: dict
    components_before: int
    components_after: int
    kl: float  # KL(pi' || pi) of the new weights from the split model's weights
    seconds: float


def _encode(values: list[str]) -> tuple[torch.Tensor, list[str]]:
    cats = sorted(set(values))
    pos = {c: i for i, c in enumerate(cats)}
    return torch.tensor([pos[v] for v in values], dtype=torch.int64), cats


def tilt_weights(weights: torch.Tensor, rates: torch.Tensor, targets: torch.Tensor, *, max_iter: int = 100,
                 tol: float = 1e-10) -> torch.Tensor:
    """The weights pi' closest to ``weights`` in KL(pi' || pi) with rates^T pi' = targets.

    weights (K,), rates (K, C) (column c: each component's share of constraint c), targets (C,).
    Raises InputError when no weighting of these components reaches the targets."""
    pi = weights.double() / weights.double().sum()
    A = rates.double()
    b = targets.double()
    keep = pi > 0
    theta = torch.zeros(A.shape[1], dtype=torch.float64)
    logpi = torch.where(keep, pi.clamp_min(1e-300).log(), torch.full_like(pi, -math.inf))

    def dual(th):
        return torch.logsumexp(logpi + A @ th, 0) - th @ b

    for _ in range(max_iter):
        w = torch.softmax(logpi + A @ theta, 0)
        mean = A.T @ w
        g = mean - b
        if float(g.abs().max()) < tol:
            break
        H = (A.T * w) @ A - torch.outer(mean, mean)
        step = torch.linalg.lstsq(H + 1e-12 * torch.eye(len(b), dtype=H.dtype), g[:, None]).solution[:, 0]
        t, f0 = 1.0, dual(theta)
        while t > 1e-8 and dual(theta - t * step) > f0 - 1e-4 * t * float(g @ step):
            t /= 2
        theta = theta - t * step
    w = torch.softmax(logpi + A @ theta, 0)
    err = float((A.T @ w - b).abs().max())
    if err > 1e-6:
        raise InputError(f"the requested shares cannot be reached by re-weighting this model's components "
                         f"(closest miss {err:.3g}); the training photos have too few examples of a requested "
                         "value, or the requests contradict each other")
    return w


def attribute_shares(weights: torch.Tensor, rates: torch.Tensor, columns: list[tuple[str, str]]) -> dict:
    """Expected share of every (attribute, value) under component weights: {attr: {value: share}}."""
    s = (rates.double().T @ weights.double()).tolist()
    out: dict = {}
    for (a, v), x in zip(columns, s):
        out.setdefault(a, {})[v] = x
    return out


def _targets(requests: dict, cats: dict) -> dict:
    """Normalise requests {attr: {value: share}} (missing values of a binary attribute get the
    rest; a categorical attribute must list every value or use "uniform")."""
    out = {}
    for a, req in requests.items():
        values = cats[a]
        if req == "uniform":
            out[a] = {v: 1 / len(values) for v in values}
            continue
        req = dict(req)
        for v, share in req.items():
            if v not in values:
                raise InputError(f"attribute {a!r} has no value {v!r} among the training photos; values: "
                                 f"{', '.join(values)}")
            if not (0 <= share <= 1):
                raise InputError(f"share of {a}={v} must be in [0, 1], got {share}")
        rest = [v for v in values if v not in req]
        left = 1 - sum(req.values())
        if left < -1e-9:
            raise InputError(f"shares requested for {a!r} add up to more than 1 ({sum(req.values()):.3f})")
        if rest and len(rest) > 1 and left > 1e-9:
            # spread the rest over the unnamed values in their current proportions later
            req.update({v: None for v in rest})
        elif rest:
            req.update({v: max(left, 0.0) / len(rest) for v in rest})
        elif abs(left) > 1e-6:
            raise InputError(f"shares requested for {a!r} add up to {1 - left:.3f}, not 1")
        out[a] = req
    return out


def rebalance(gen, labels: dict, requests: dict, *, min_members: float = 8.0, source: str = "labels"):
    """A copy of ``gen`` whose output has the requested attribute shares.

    Parameters
    ----------
    gen : Generator (fitted)
    labels : {attribute: list of str}
        The value of each attribute for every training photo, in bank order.
    requests : {attribute: {value: share} or "uniform"}
        E.g. {"Male": {"1": 0.5}}, {"Eyeglasses": {"1": 0.3}}, {"race": "uniform"}. For a binary
        attribute the other value gets the rest.
    min_members : float
        Smallest number of (effective) photos a split-off part may have.
    source : str
        Where the labels came from (recorded in the provenance).

    Returns
    -------
    (Generator, RebalanceReport)
    """
    gen._check_fitted()
    if not requests:
        raise InputError("no attribute share requested; e.g. --attribute Male=0.5")
    N = gen.n_photos
    cats, codes = {}, {}
    for a in requests:
        if a not in labels:
            raise InputError(f"no labels for attribute {a!r}; labels available: {', '.join(sorted(labels)) or 'none'}")
        vals = [str(v) for v in labels[a]]
        if len(vals) != N:
            raise InputError(f"labels[{a!r}] has {len(vals)} values for {N} training photos")
        codes[a], cats[a] = _encode(vals)
    targets = _targets(requests, cats)
    t0 = time.perf_counter()
    out = gen.copy()
    mix = out.mixture_
    K0 = mix.weights_.numel()
    attrs = list(requests)
    # joint cell of the requested attributes
    radix = [len(cats[a]) for a in attrs]
    cell = torch.zeros(N, dtype=torch.int64)
    for a, r in zip(attrs, radix):
        cell = cell * r + codes[a]
    Y = out.projector_.transform(out.bank_.float()).reshape(N, -1)
    info = mix.split(Y, cell, min_members=min_members)
    rates_cell = info["cell_rates"]  # (K', cells)
    # per-(attribute, value) rates of every component
    columns, cols = [], []
    n_cells = rates_cell.shape[1]
    cell_vals = []
    for c in range(n_cells):
        rem, vals = c, []
        for r in reversed(radix):
            vals.append(rem % r)
            rem //= r
        cell_vals.append(list(reversed(vals)))
    for ai, a in enumerate(attrs):
        for vi, v in enumerate(cats[a]):
            sel = [c for c in range(n_cells) if cell_vals[c][ai] == vi]
            columns.append((a, v))
            cols.append(rates_cell[:, sel].sum(1))
    R = torch.stack(cols, 1)  # (K', C)
    split_w = mix.weights_.double()
    before = attribute_shares(split_w, R, columns)
    # unnamed values of a categorical attribute keep their current relative proportions
    tvec = []
    for (a, v) in columns:
        t = targets[a][v]
        if t is None:
            unnamed = [u for u, s in targets[a].items() if s is None]
            left = 1 - sum(s for s in targets[a].values() if s is not None)
            tot = sum(before[a][u] for u in unnamed)
            t = left * before[a][v] / tot if tot > 0 else left / len(unnamed)
        tvec.append(t)
    # one constraint per attribute is implied by the others (shares add up to 1): drop it
    use = []
    for a in attrs:
        idx = [i for i, (b, _) in enumerate(columns) if b == a]
        use.extend(idx[:-1] if len(idx) > 1 else idx)
    new_w = tilt_weights(split_w, R[:, use], torch.tensor(tvec, dtype=torch.float64)[use])
    kl = float((new_w[new_w > 0] * (new_w[new_w > 0] / split_w[new_w > 0]).log()).sum())
    mix.weights_ = new_w.to(mix.means_.dtype)
    out._cache = {}
    after = attribute_shares(new_w, R, columns)
    seconds = time.perf_counter() - t0
    out.provenance_["components"] = mix.weights_.numel()
    final_targets = {a: {v: tvec[i] for i, (b, v) in enumerate(columns) if b == a} for a in attrs}
    out.record_operation({"operation": "rebalance", "targets": final_targets, "label_source": source,
                          "shares_before": before, "components_before": K0,
                          "components_after": mix.weights_.numel(), "kl": kl, "seconds": round(seconds, 4)})
    return out, RebalanceReport(targets=final_targets, shares_before=before, shares_after=after,
                                components_before=K0, components_after=mix.weights_.numel(), kl=kl,
                                seconds=seconds)
