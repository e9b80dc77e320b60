"""Boundary post-processing of a mixed canvas (papers/004, ch. 3, Sec. 3.3.3): put each user-placed
source back where the user placed it, cut between it and the generated canvas along the least
visible seam, and hide that seam with a Poisson blend.

The chapter: "we first replace the reconstructed regions with the source texture. Then, within the
source texture, we use graph cuts to determine an optimal seam where we can cut between the source
texture and the reconstruction. Finally, we use Poisson blending to minimize the visibility of this
seam." Here:

- :func:`vertical_seam`: the seam is a top-to-bottom path, one column per row, moving at most one
  column between rows, that minimises the summed squared colour difference between the source and
  the reconstruction inside an overlap strip of the source (dynamic programming, as in image
  quilting). For a cut between two regions across a strip this is the minimum cut among
  monotone 8-connected cuts; Kwatra et al.'s graph cut also allows cuts that double back, which a
  strip as narrow as ours rarely needs.
- :func:`poisson_blend`: on the reconstruction's side of the seam, inside a band of ``blend``
  columns, the output keeps the reconstruction's gradients (Pérez et al.'s guidance field) while
  meeting the pasted source at the seam and the untouched reconstruction beyond the band: one
  sparse linear system per image (scipy's direct solver; a band of 64 x 24 px is ~1,500 unknowns).
  The source pixels themselves are not changed (the user's constraint is kept exactly).

Only sources that span the canvas's full height get seams (the horizontal canvas of the
benchmark and the CLI); a source that covers only part of the height is pasted with a straight
boundary, still Poisson-blended.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError


def vertical_seam(cost: np.ndarray) -> np.ndarray:
    """Columns (H,) of the minimum-cost top-to-bottom path through ``cost`` (H, W), moving at most
    one column between consecutive rows."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] < 1 or cost.shape[1] < 1:
        raise InputError(f"seam cost must be a non-empty (H, W) array, got shape {cost.shape}")
    H, W = cost.shape
    acc = cost.copy()
    back = np.zeros((H, W), dtype=np.int64)
    for y in range(1, H):
        prev = acc[y - 1]
        left = np.concatenate([[np.inf], prev[:-1]])
        right = np.concatenate([prev[1:], [np.inf]])
        stack = np.stack([left, prev, right])  # predecessor at x-1, x, x+1
        k = stack.argmin(0)
        back[y] = np.arange(W) + k - 1
        acc[y] += stack[k, np.arange(W)]
    cols = np.zeros(H, dtype=np.int64)
    cols[-1] = int(acc[-1].argmin())
    for y in range(H - 1, 0, -1):
        cols[y - 1] = back[y, cols[y]]
    return cols


def poisson_blend(composite: np.ndarray, guide: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Solve the discrete Poisson equation inside ``region``.

    Parameters
    ----------
    composite : np.ndarray
        (C, H, W) image whose values outside ``region`` are kept and are the boundary conditions.
    guide : np.ndarray
        (C, H, W) image whose Laplacian the result takes inside ``region``.
    region : np.ndarray
        (H, W) bool: the unknown pixels. Neighbours outside the image are left out (a natural,
        zero-flux boundary), so a region may touch the image's edges.

    Returns
    -------
    (C, H, W) float64 image: ``composite`` outside ``region``, the blend inside.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    comp = np.asarray(composite, dtype=np.float64)
    gd = np.asarray(guide, dtype=np.float64)
    reg = np.asarray(region, dtype=bool)
    if comp.shape != gd.shape or comp.ndim != 3 or reg.shape != comp.shape[1:]:
        raise InputError(f"poisson_blend needs composite and guide (C, H, W) of one shape and a region (H, W); got "
                         f"{comp.shape}, {gd.shape}, {reg.shape}")
    out = comp.copy()
    ys, xs = np.nonzero(reg)
    n = ys.size
    if n == 0:
        return out
    H, W = reg.shape
    index = -np.ones((H, W), dtype=np.int64)
    index[ys, xs] = np.arange(n)
    rows, cols, vals = [], [], []
    diag = np.zeros(n)
    rhs = np.zeros((comp.shape[0], n))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        i = np.nonzero(inside)[0]
        diag[i] += 1
        qy, qx = ny[i], nx[i]
        # guidance: sum over neighbours of (g_p - g_q)
        rhs[:, i] += gd[:, ys[i], xs[i]] - gd[:, qy, qx]
        unknown = reg[qy, qx]
        u = i[unknown]
        rows.append(u)
        cols.append(index[qy[unknown], qx[unknown]])
        vals.append(-np.ones(u.size))
        k = i[~unknown]  # known neighbour: moves to the right-hand side
        rhs[:, k] += comp[:, qy[~unknown], qx[~unknown]]
    rows.append(np.arange(n))
    cols.append(np.arange(n))
    vals.append(diag)
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsc()
    sol = spsolve(A, rhs.T)
    sol = sol.reshape(n, -1)
    out[:, ys, xs] = sol.T
    return out


def paste_sources(canvas: torch.Tensor, sources, columns: list[int], *, overlap: int = 24,
                  blend: int = 24) -> tuple[torch.Tensor, dict]:
    """Put the sources back onto a canvas with seams and a Poisson blend (module docstring).

    Parameters
    ----------
    canvas : torch.Tensor
        (1, 3, H, W) generated canvas in [0, 1].
    sources : torch.Tensor or list of torch.Tensor
        (K, 3, h, w), or K images (3, h, w_k) of one height: the user's sources, placed at rows
        0..h and columns ``columns[k]``..+w_k.
    columns : list of int
        Left column of each placement (pixels).
    overlap : int
        Width in pixels of the strip inside a source (at each of its sides that faces generated
        canvas) where the seam may run; at most half the source's width.
    blend : int
        Width in pixels of the Poisson band on the generated side of each seam.

    Returns
    -------
    ((1, 3, H, W) image in [0, 1], info) where info lists per source the seam columns' range and
    the mean squared source/canvas difference along the seam.
    """
    parts = list(sources) if isinstance(sources, (list, tuple)) else (
        [sources[k] for k in range(sources.shape[0])] if isinstance(sources, torch.Tensor) and sources.ndim == 4 else None)
    if (canvas.ndim != 4 or canvas.shape[0] != 1 or not parts
            or any(not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[0] != canvas.shape[1] for x in parts)
            or len({int(x.shape[1]) for x in parts}) != 1):
        raise InputError(f"paste_sources needs a canvas (1, C, H, W) and sources (K, C, h, w) or a list of (C, h, w_k) "
                         f"of one height, got {tuple(canvas.shape)} and "
                         f"{tuple(sources.shape) if isinstance(sources, torch.Tensor) else [tuple(x.shape) for x in parts or []]}")
    K = len(parts)
    h = int(parts[0].shape[1])
    _, C, H, W = canvas.shape
    if len(columns) != K:
        raise InputError(f"columns must give one placement per source ({K}), got {len(columns)}")
    if h > H:
        raise InputError(f"sources are {h} px high, the canvas only {H}")
    for name, v in (("overlap", overlap), ("blend", blend)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"{name} must be an int >= 0, got {v!r}")
    recon = canvas[0].detach().double().numpy()
    out = recon.copy()
    region = np.zeros((H, W), dtype=bool)
    owned = np.zeros((H, W), dtype=bool)  # pixels now holding a source
    info = []
    for k in range(K):
        a = int(columns[k])
        w = int(parts[k].shape[2])
        ov = min(overlap, w // 2)
        if a < 0 or a + w > W:
            raise InputError(f"source {k} placed at column {a} does not fit a canvas {W} px wide")
        src = parts[k].detach().double().numpy()
        take = np.zeros((H, W), dtype=bool)
        take[:h, a:a + w] = True
        seams = {}
        if h == H:  # full-height source: a seam on each side that faces generated canvas
            diff = ((src - recon[:, :, a:a + w]) ** 2).sum(0)  # (h, w)
            if a + w < W and ov > 0:  # right side
                lo = w - ov
                cut = lo + vertical_seam(diff[:, lo:w])
                for y in range(h):
                    take[y, a + cut[y]:a + w] = False
                seams["right"] = (int(a + cut.min()), int(a + cut.max()), float(diff[np.arange(h), cut].mean()))
            if a > 0 and ov > 0:  # left side
                cut = vertical_seam(diff[:, :ov])
                for y in range(h):
                    take[y, a:a + cut[y] + 1] = False
                seams["left"] = (int(a + cut.min()), int(a + cut.max()), float(diff[np.arange(h), cut].mean()))
        out[:, take] = src[:, take[:h, a:a + w]]  # both in row-major order of the window
        owned |= take
        info.append({"source": k, "column": a, "seams": seams})
    if blend > 0:
        # the band: generated pixels within `blend` px (horizontally or vertically) of a source pixel
        grown = owned.copy()
        for _ in range(blend):
            g = grown.copy()
            g[:, 1:] |= grown[:, :-1]
            g[:, :-1] |= grown[:, 1:]
            g[1:, :] |= grown[:-1, :]
            g[:-1, :] |= grown[1:, :]
            grown = g
        region = grown & ~owned
        out = poisson_blend(out, recon, region)
    res = torch.from_numpy(np.clip(out, 0.0, 1.0)).float()[None]
    return res, {"sources": info, "blend_pixels": int(region.sum())}


__all__ = ["paste_sources", "poisson_blend", "vertical_seam"]
