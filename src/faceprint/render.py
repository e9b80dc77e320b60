"""Pictures for people: image files, grids, and colour-coded provenance maps (papers/000, Fig. 1).

A provenance map shows, for every latent pixel of a generated face, which training photo it
was copied from: each training photo gets its own colour (a fixed, well-spread palette keyed
by the photo's index), so large patches of one colour mean large regions copied from one photo.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InputError
from .io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8 (round to nearest)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_png(array: np.ndarray, path) -> None:
    """Write an (H, W, 3) uint8 array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def grid(arrays: np.ndarray, cols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows*(H+pad)+pad, ...) image."""
    n, h, w, c = arrays.shape
    if n == 0:
        raise InputError("cannot make a grid of zero images")
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y:y + h, x:x + w] = arrays[i]
    return out


def palette(indices: np.ndarray) -> np.ndarray:
    """A distinct RGB colour per training-photo index: golden-ratio hues, varied value/saturation.
    indices (...) int -> (..., 3) uint8; index -1 (nothing copied) is mid grey."""
    idx = np.asarray(indices, dtype=np.int64)
    hue = (idx * 0.6180339887498949) % 1.0
    sat = 0.55 + 0.45 * ((idx * 7) % 5) / 4.0
    val = 0.60 + 0.40 * ((idx * 3) % 4) / 3.0
    h6 = hue * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    choices = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)]
    rgb = np.zeros(idx.shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        rgb[m] = np.stack([r[m], g[m], b[m]], -1)
    rgb = (rgb * 255).round().astype(np.uint8)
    rgb[idx < 0] = 128
    return rgb


def provenance_images(provenance: torch.Tensor, size: int) -> np.ndarray:
    """(N, h, w) training indices -> (N, size, size, 3) uint8 colour maps (nearest upscaling)."""
    prov = provenance.numpy()
    n, h, w = prov.shape
    colours = palette(prov)  # (N, h, w, 3)
    ry, rx = size // h, size // w
    return np.repeat(np.repeat(colours, ry, axis=1), rx, axis=2)


def write_faces(images: torch.Tensor, out_dir, indices, provenance: torch.Tensor | None = None) -> list[Path]:
    """Write face_<index>.png (and face_<index>_map.png with provenance) into out_dir."""
    out_dir = Path(out_dir)
    arrays = to_uint8(images)
    maps = provenance_images(provenance, images.shape[-1]) if provenance is not None else None
    paths = []
    for j, i in enumerate(indices):
        p = out_dir / f"face_{int(i):06d}.png"
        save_png(arrays[j], p)
        paths.append(p)
        if maps is not None:
            save_png(maps[j], out_dir / f"face_{int(i):06d}_map.png")
    return paths
