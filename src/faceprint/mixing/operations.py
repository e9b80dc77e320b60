"""Latent-space operations of the Texture Mixer (papers/004, ch. 3, Sec. 3.3.1, Eqs. 3.1-3.3).

- :func:`tile`: T(z), the 3 x 3 (or any n_h x n_w) spatial tiling of a local latent tensor.
- :func:`shuffle`: P(T(z)) = P_0 o P_1 o ... o P_n (Eq. 3.1): at each scale s_i = 2^i, i = n
  (coarsest: half the local tensor) down to 0, the grid of s_i x s_i cells is shuffled by
  swapping each row of cells with the next one with probability 1/2, first top-down then
  bottom-up, then the columns left-to-right and right-to-left. (The thesis prints
  "i = 0, 2, ..., n"; every scale 2^0 .. 2^n is used here, as the coarse-to-fine description
  says.) ``keep`` overrides chosen regions with the unshuffled tensor: the four corner tiles of
  the 3 x 3 training tiling (P-tilde), or the places where a user put a texture at test time.
- :func:`blend`: Z = sum_k w_k Z_k with weights w_k that may vary in space (Eqs. 3.2-3.3 with
  alpha uniform in training, spatially varying at test time).
- :func:`check_alpha`, :func:`alpha_to_latent`: validation of user alpha maps and their
  reduction to the latent grid (8 x 8 pixel cells, area average).

All functions are deterministic given their ``generator``; tensors are (N, C, h, w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError

DOWNSCALE = 8


def tile(z: torch.Tensor, reps_h: int = 3, reps_w: int = 3) -> torch.Tensor:
    """T(z): repeat a latent (N, C, h, w) spatially -> (N, C, reps_h * h, reps_w * w)."""
    if z.ndim != 4:
        raise InputError(f"z must be (N, C, h, w), got shape {tuple(z.shape)}")
    for name, r in (("reps_h", reps_h), ("reps_w", reps_w)):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise InputError(f"{name} must be a positive int, got {r!r}")
    return z.repeat(1, 1, reps_h, reps_w)


def tile_to(z: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Repeat z (N, C, h, w) until it covers (height, width), anchored at the top left, and cut."""
    h, w = z.shape[-2:]
    out = tile(z, math.ceil(height / h), math.ceil(width / w))
    return out[..., :height, :width]


def coarsest_scale(local_size: int) -> int:
    """n with s_n = 2^n = half the local tensor's side (at least 0)."""
    return max(0, int(math.floor(math.log2(max(1, local_size // 2)))))


def _swap_order(count: int, generator: torch.Generator) -> torch.Tensor:
    """The cell order after the two passes of random neighbour swaps (forward then backward)."""
    order = torch.arange(count)
    if count < 2:
        return order
    coins = torch.rand(2 * (count - 1), generator=generator) < 0.5
    k = 0
    for i in range(count - 1):  # top-down (left-to-right): swap i with its successor
        if coins[k]:
            order[[i, i + 1]] = order[[i + 1, i]]
        k += 1
    for i in range(count - 1, 0, -1):  # bottom-up (right-to-left): swap i with its successor i-1
        if coins[k]:
            order[[i, i - 1]] = order[[i - 1, i]]
        k += 1
    return order


def _pixel_index(order: torch.Tensor, s: int, size: int) -> torch.Tensor:
    """Pixel index along one axis for a permutation ``order`` of cells of side s (a ragged last
    cell, when size is not a multiple of s, stays where it is)."""
    full = size // s
    idx = torch.arange(size)
    if full == 0:
        return idx
    cells = order[:full]
    head = (cells[:, None] * s + torch.arange(s)[None, :]).reshape(-1)
    idx[: full * s] = head
    return idx


def shuffle_permutation(height: int, width: int, scales, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column source indices (height,), (width,) of one draw of P = P_0 o ... o P_n.

    P_n is applied first (coarse to fine); composing index maps keeps it one gather."""
    rows = torch.arange(height)
    cols = torch.arange(width)
    for s in sorted(scales, reverse=True):  # coarse to fine
        r_order = _swap_order(height // s, generator)
        c_order = _swap_order(width // s, generator)
        rows = rows[_pixel_index(r_order, s, height)]
        cols = cols[_pixel_index(c_order, s, width)]
    return rows, cols


def shuffle(x: torch.Tensor, *, local_size: int, generator: torch.Generator, keep: torch.Tensor | None = None,
            scales=None) -> torch.Tensor:
    """P-tilde(x): multi-scale random row/column swaps of a tiled latent x (N, C, H, W), Eq. 3.1.

    Parameters
    ----------
    x : torch.Tensor
        (N, C, H, W) tiled latents; each item gets its own draw.
    local_size : int
        Side of the untiled local tensor (8 for a 64 px texture); the coarsest scale is half of it.
    generator : torch.Generator
        Source of all the coin flips.
    keep : torch.Tensor, optional
        (N or 1, 1, H, W) bool: positions that keep the unshuffled x (the corner override).
    scales : sequence of int, optional
        Cell sides to shuffle at (default 1, 2, 4, ..., 2^n).
    """
    if x.ndim != 4:
        raise InputError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if scales is None:
        scales = [2 ** i for i in range(coarsest_scale(local_size) + 1)]
    n, _, H, W = x.shape
    outs = []
    for b in range(n):
        rows, cols = shuffle_permutation(H, W, scales, generator)
        outs.append(x[b][:, rows][:, :, cols])
    out = torch.stack(outs)
    if keep is not None:
        out = torch.where(keep.to(torch.bool), x, out)
    return out


def corner_mask(local_h: int, local_w: int, reps: int = 3) -> torch.Tensor:
    """(1, 1, reps*h, reps*w) bool, True on the four corner tiles of a reps x reps tiling."""
    m = torch.zeros(1, 1, reps * local_h, reps * local_w, dtype=torch.bool)
    for ty in (0, reps - 1):
        for tx in (0, reps - 1):
            m[..., ty * local_h:(ty + 1) * local_h, tx * local_w:(tx + 1) * local_w] = True
    return m


def blend(parts, weights) -> torch.Tensor:
    """sum_k w_k parts_k: parts a list of (N, C, h, w) (or (N, C, 1, 1) global vectors, broadcast),
    weights a list of (N or 1, 1, h, w) or (N,) tensors (Eqs. 3.2-3.3)."""
    if len(parts) != len(weights) or not parts:
        raise InputError(f"blend needs as many weights as parts, got {len(parts)} parts and {len(weights)} weights")
    out = None
    for p, w in zip(parts, weights):
        if w.ndim == 1:
            w = w.view(-1, 1, 1, 1)
        term = p * w
        out = term if out is None else out + term
    return out


# ------------------------------------------------------------------------------------------------
# user alpha maps


def check_alpha(alpha, name: str, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Validate an alpha (blending weight) map: a number, or an (H, W) / (1, 1, H, W) tensor of
    finite values in [0, 1] of the expected ``shape`` (H, W). Returns (1, 1, H, W) float32 (or a
    0-d tensor for a number). Nothing is clipped or rescaled."""
    if isinstance(alpha, bool):
        raise InputError(f"{name} must be a number in [0, 1] or an (H, W) map, got {alpha!r}")
    if isinstance(alpha, (int, float)):
        v = float(alpha)
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise InputError(f"{name} must be in [0, 1], got {alpha!r}; 0 keeps the first source, 1 the second")
        return torch.tensor(v)
    if not isinstance(alpha, torch.Tensor):
        raise InputError(f"{name} must be a number or a torch.Tensor map, got {type(alpha).__name__}")
    a = alpha.detach()
    if a.ndim == 2:
        a = a[None, None]
    if a.ndim != 4 or a.shape[:2] != (1, 1):
        raise InputError(f"{name} must have shape (H, W) or (1, 1, H, W), got {tuple(alpha.shape)}")
    if shape is not None and tuple(a.shape[-2:]) != tuple(shape):
        raise InputError(f"{name} has shape {tuple(a.shape[-2:])} but the output is {tuple(shape)} (H, W); "
                         "make the mask the same size as the sources")
    a = a.float()
    bad = int((~torch.isfinite(a)).sum())
    if bad:
        raise InputError(f"{name} holds {bad} NaN or infinite values; every weight must be a number in [0, 1]")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name} holds values from {lo:.4g} to {hi:.4g}, outside [0, 1]; weights are never "
                         "clipped silently: rescale the map to [0, 1]")
    return a


def alpha_to_latent(alpha: torch.Tensor) -> torch.Tensor:
    """A (1, 1, H, W) pixel alpha map (H, W multiples of 8) -> (1, 1, H/8, W/8) by 8 x 8 area
    average: each latent pixel covers 8 x 8 image pixels, so that is where a brush edge lands."""
    h, w = alpha.shape[-2:]
    if h % DOWNSCALE or w % DOWNSCALE:
        raise InputError(f"alpha map {h}x{w} is not on the {DOWNSCALE}-px grid; crop it to "
                         f"{h // DOWNSCALE * DOWNSCALE}x{w // DOWNSCALE * DOWNSCALE}")
    return F.avg_pool2d(alpha, DOWNSCALE)


def ramp(width: int, start: int, stop: int) -> torch.Tensor:
    """(width,) weights: 1 before ``start``, 0 from ``stop`` on, linear in between (the weights at
    cell centres: (stop - x - 0.5) / (stop - start))."""
    x = torch.arange(width, dtype=torch.float32) + 0.5
    if stop <= start:
        return (x < start).float()
    return ((stop - x) / (stop - start)).clamp(0.0, 1.0)


def band_alpha(height: int, width: int, band: int, centre: float | None = None) -> torch.Tensor:
    """(1, 1, height, width) weight of the LEFT source of a hybrid: 1 left of a vertical band of
    ``band`` columns centred at ``centre`` (default the middle), 0 right of it, linear inside."""
    c = width / 2 if centre is None else centre
    start, stop = int(round(c - band / 2)), int(round(c + band / 2))
    return ramp(width, start, stop).view(1, 1, 1, width).expand(1, 1, height, width).contiguous()


def canvas_weights(k: int, width: int, tile_w: int) -> torch.Tensor:
    """(k, width) weights of k sources placed along a horizontal canvas: source 0 over the first
    ``tile_w`` columns, source k-1 over the last, the others at equal spacing; linear
    interpolation between consecutive placements; the weights sum to 1 at every column."""
    if k < 2:
        raise InputError(f"a canvas needs at least two sources, got {k}")
    if width < k * tile_w:
        raise InputError(f"a canvas of width {width} cannot hold {k} sources of width {tile_w}; make it at least "
                         f"{k * tile_w} wide")
    # centres of the placements, in columns
    starts = [round(i * (width - tile_w) / (k - 1)) for i in range(k)]
    x = torch.arange(width, dtype=torch.float32)
    w = torch.zeros(k, width)
    for i in range(k):
        lo, hi = starts[i], starts[i] + tile_w
        w[i, lo:hi] = 1.0
    for i in range(k - 1):
        a, b = starts[i] + tile_w, starts[i + 1]  # the gap between placement i and i+1
        if b > a:
            t = ((x[a:b] + 0.5 - a) / (b - a)).clamp(0, 1)
            w[i, a:b] = 1 - t
            w[i + 1, a:b] = t
    w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
    return w


def placements(k: int, width: int, tile_w: int) -> list[int]:
    """Left columns of the k placements of :func:`canvas_weights`."""
    return [round(i * (width - tile_w) / (k - 1)) for i in range(k)]
