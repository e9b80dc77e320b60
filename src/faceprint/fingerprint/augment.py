"""Differentiable image perturbations for training robust fingerprints ("immunization",
papers/004, Ch. 6, Sec. 6.4.5; the perturbations of Ch. 5, Sec. 5.5.4).

An immunized fingerprint is trained with the generated images perturbed, in random strengths,
before the bit extractor sees them. Everything here keeps the autograd graph so the embedding
side learns what survives:

- :func:`gaussian_noise`, :func:`gaussian_blur`, :func:`crop_resize` (crop a random square of
  a random side fraction and resize it back; batched through ``grid_sample``),
  :func:`resize_down_up` are plain differentiable tensor ops;
- :func:`diff_jpeg` is a differentiable JPEG (DiffJPEG-like, after Shin & Song, 2017): RGB ->
  YCbCr, 4:2:0 chroma subsampling, 8x8 orthonormal DCT, division by the libjpeg quality-scaled
  quantisation tables, rounding with a straight-through gradient, and the inverse;
- :func:`real_jpeg` runs Pillow's JPEG codec forward and passes the gradient straight through
  (forward = real codec, backward = identity), so the extractor trains on the exact codec;
- :func:`quantize_8bit` rounds to 8-bit levels (straight-through), as saving a PNG does.

:class:`Augmenter` draws one perturbation (or a chain of two or three) per image.

These are *training* augmentations. The evaluation attacks shared by every mechanism live in
``faceprint.fingerprint.attacks``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "crop_resize",
    "diff_jpeg",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg_quant_tables",
    "quantize_8bit",
    "real_jpeg",
    "resize_down_up",
]

# Standard JPEG quantisation tables (ITU-T T.81, Annex K).
_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip
_CHROMA = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32  # fmt: skip


def _check_images(images, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"{name} must be a (N, 3, H, W) float tensor in [0, 1], got {got}")
    if not images.is_floating_point():
        raise InputError(f"{name} must be floating point, got {images.dtype}; use images.float() / 255")


def _straight_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Value of y, gradient of x."""
    return x + (y - x).detach()


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels of an 8-bit image (straight-through gradient)."""
    return _straight_through(images, (images.clamp(0, 1) * 255).round() / 255)


def gaussian_noise(images: torch.Tensor, sigma, *, generator: torch.Generator) -> torch.Tensor:
    """images + N(0, sigma^2), clamped to [0, 1]. sigma: float or (N,) tensor (per image)."""
    _check_images(images)
    s = torch.as_tensor(sigma, dtype=images.dtype).reshape(-1, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (images + s * noise).clamp(0, 1)


def _gauss_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, sigma: float, *, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding. kernel_size default: 2 ceil(3 sigma) + 1.

    (The OpenCV/torchvision default sigma of a kernel size k is 0.3 ((k - 1) / 2 - 1) + 0.8,
    i.e. 1.1 for k = 5.)"""
    _check_images(images)
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    r = kernel_size // 2
    if r == 0:
        return images
    k = _gauss_kernel(float(sigma), r).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x


def crop_resize(images: torch.Tensor, kept, *, generator: torch.Generator) -> torch.Tensor:
    """Crop a square of side ``kept`` x the image side at a random position and resize it back to
    the full size (bilinear). kept: float or (N,) tensor in (0, 1]."""
    _check_images(images)
    n = images.shape[0]
    f = torch.as_tensor(kept, dtype=images.dtype).reshape(-1).expand(n)
    # centre offset in normalised coordinates, uniform over the positions that keep the crop inside
    u = torch.rand(n, 2, generator=generator, dtype=images.dtype) * 2 - 1
    t = u * (1 - f)[:, None]
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = f
    theta[:, 1, 1] = f
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_down_up(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize to ``scale`` x the size (bilinear, antialiased) and back (bilinear)."""
    _check_images(images)
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                          antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def real_jpeg(images: torch.Tensor, quality) -> torch.Tensor:
    """Pillow's JPEG codec (4:2:0, the given quality) forward; identity gradient.

    quality: int or a sequence of N ints (per image)."""
    _check_images(images)
    from PIL import Image

    n = images.shape[0]
    qs = [int(quality)] * n if isinstance(quality, (int, float)) else [int(q) for q in quality]
    arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(arr[i]).save(buf, format="JPEG", quality=qs[i])
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    y = torch.from_numpy(out).permute(0, 3, 1, 2).to(images.dtype) / 255
    return _straight_through(images, y)


def jpeg_quant_tables(quality: float) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's quality-scaled luma and chroma tables, (8, 8) each."""
    q = min(100.0, max(1.0, float(quality)))
    scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    out = []
    for t in (_LUMA, _CHROMA):
        tt = torch.tensor(t, dtype=torch.float32).view(8, 8)
        out.append(torch.clamp(torch.floor((tt * scale + 50) / 100), 1, 255))
    return out[0], out[1]


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float32)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m  # (8, 8), orthonormal: m @ m.T = I


_DCT = _dct_matrix()


def _blocks_quantize(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (N, H, W), H and W multiples of 8, values level-shifted; DCT, quantise, dequantise, IDCT."""
    n, h, w = x.shape
    d = _DCT.to(x.dtype)
    b = x.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)  # (N, by, bx, 8, 8)
    c = d @ b @ d.T
    q = c / table.to(x.dtype)
    q = q + (q.round() - q).detach()  # straight-through rounding
    c = q * table.to(x.dtype)
    b = d.T @ c @ d
    return b.permute(0, 1, 3, 2, 4).reshape(n, h, w)


def diff_jpeg(images: torch.Tensor, quality: float) -> torch.Tensor:
    """Differentiable JPEG approximation at one quality (4:2:0, libjpeg tables)."""
    _check_images(images)
    n, _, h, w = images.shape
    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(images, (0, pw, 0, ph), mode="replicate") * 255 if (ph or pw) else images * 255
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    lt, ct = jpeg_quant_tables(quality)
    y = _blocks_quantize(y - 128, lt) + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)  # (N, 2, H/2, W/2)
    hh, ww = chroma.shape[-2:]
    chroma = _blocks_quantize(chroma.reshape(n * 2, hh, ww), ct).reshape(n, 2, hh, ww)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma.unbind(1)
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    out = torch.stack([r, g, b], 1)[:, :, :h, :w] / 255
    return out.clamp(0, 1)


@dataclass(frozen=True)
class AugmentConfig:
    """Which perturbations the extractor sees in training, how often and how strong.

    weights: relative frequency of (identity, noise, blur, jpeg, crop, resize, chain) draws;
    "jpeg" is the real codec with a straight-through gradient half the time and the
    differentiable approximation otherwise; "chain" applies two or three of the others in a
    random order. Ranges are uniform; the upper ends are past the evaluation strengths (noise
    0.05, blur kernel 5 ~ sigma 1.1, JPEG 50, crop 86 %) so the targets sit inside the range.
    """

    weights: tuple[float, ...] = (0.15, 0.15, 0.15, 0.2, 0.15, 0.1, 0.1)
    noise_sigma: tuple[float, float] = (0.0, 0.08)
    blur_sigma: tuple[float, float] = (0.3, 1.6)
    jpeg_quality: tuple[int, int] = (35, 90)
    crop_kept: tuple[float, float] = (0.7, 1.0)
    resize_scale: tuple[float, float] = (0.4, 0.9)

    def __post_init__(self):
        if len(self.weights) != 7 or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ConfigError(f"weights must be 7 non-negative numbers with a positive sum, got {self.weights!r}")
        for name in ("noise_sigma", "blur_sigma", "jpeg_quality", "crop_kept", "resize_scale"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ConfigError(f"{name} must be (low, high) with low <= high, got {(lo, hi)!r}")
        if not (0 < self.crop_kept[0] <= self.crop_kept[1] <= 1):
            raise ConfigError(f"crop_kept must lie in (0, 1], got {self.crop_kept!r}")
        if not (1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100):
            raise ConfigError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality!r}")


class Augmenter:
    """Draw one perturbation per image (see :class:`AugmentConfig`); ``strength`` in [0, 1]
    scales every range from its mildest end (used to ramp augmentation up in training)."""

    OPS = ("identity", "noise", "blur", "jpeg", "crop", "resize", "chain")

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()

    def _u(self, rng: torch.Generator, lo: float, hi: float, strength: float, *, mild_high: bool = False) -> float:
        """Uniform in the range shrunk towards its mild end by ``strength``."""
        r = float(torch.rand((), generator=rng))
        if mild_high:  # larger values are milder (quality, kept fraction, scale)
            return hi - (hi - lo) * strength * r
        return lo + (hi - lo) * strength * r

    def _one(self, x: torch.Tensor, op: str, rng: torch.Generator, strength: float) -> torch.Tensor:
        c = self.config
        if op == "identity":
            return x
        if op == "noise":
            return gaussian_noise(x, self._u(rng, *c.noise_sigma, strength), generator=rng)
        if op == "blur":
            return gaussian_blur(x, self._u(rng, *c.blur_sigma, strength))
        if op == "jpeg":
            q = round(self._u(rng, *c.jpeg_quality, strength, mild_high=True))
            if float(torch.rand((), generator=rng)) < 0.5:
                return real_jpeg(x, q)
            return diff_jpeg(x, q)
        if op == "crop":
            return crop_resize(x, self._u(rng, *c.crop_kept, strength, mild_high=True), generator=rng)
        if op == "resize":
            return resize_down_up(x, self._u(rng, *c.resize_scale, strength, mild_high=True))
        raise InputError(f"unknown perturbation {op!r}")

    def __call__(self, images: torch.Tensor, *, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
        """Perturb each image with one randomly drawn perturbation; returns (N, 3, H, W)."""
        _check_images(images)
        n = images.shape[0]
        w = torch.tensor(self.config.weights, dtype=torch.float64)
        ops = torch.multinomial(w, n, replacement=True, generator=generator)
        out = images
        pieces, index = [], []
        for k, op in enumerate(self.OPS):
            idx = torch.nonzero(ops == k).squeeze(1)
            if idx.numel() == 0:
                continue
            x = images[idx]
            if op == "chain":
                chain = torch.randperm(5, generator=generator)[: 2 + int(torch.randint(2, (), generator=generator))]
                for j in sorted(chain.tolist(), key=lambda j: (j == 2, j)):  # JPEG last, as a saved file would be
                    x = self._one(x, ("noise", "blur", "jpeg", "crop", "resize")[j], generator, strength)
            else:
                x = self._one(x, op, generator, strength)
            pieces.append(x)
            index.append(idx)
        order = torch.cat(index)
        out = torch.cat(pieces)[torch.argsort(order)]
        return quantize_8bit(out)
