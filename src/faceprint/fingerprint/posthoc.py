"""Post-hoc watermark baseline: a 128-bit DWT-DCT watermark added to finished images.

papers/004, Sec. 5.5.2 compares the artificial fingerprints with classical frequency-domain
watermarks applied to images; this is that baseline for faceprint, built on the PyPI package
invisible-watermark 0.2.0 (``imwatermark``): a Haar DWT of the U (chroma) channel, 4x4 blocks
of the LL band, one bit per block by quantisation (step ``scale`` = 36) of its largest DCT
coefficient ("dwtDct") or of the largest singular value of its DCT ("dwtDctSvd"), the 128
bits repeated over all blocks and decoded by majority vote. It protects one image at a time,
after generation: anyone holding the generator can skip it, unlike a fingerprint carried by
the model instance itself.

Size. The library refuses images under 256 x 256 and our faces are 128 x 128. Each image is
upsampled by an integer factor f = ceil(256 / min(H, W)) with nearest-neighbour (pixel
replication), watermarked, and averaged back over f x f blocks to its own size (then rounded
to 8 bits, as a saved PNG would be). The Haar LL band of a replicated image is f x the small
image, so the round trip keeps the watermark exactly: clean bit accuracy is the same at 128 px
as at 256 px. Keeping the 256 px output instead would change the product (4x the pixels of a
128 px face) and flatter the baseline: each attack then hits a 2x magnified face.

Measured on the first 50 celeba-10k faces at 128 px (FaceFolder(..., size=128, limit=50)),
random 128-bit codes, mean bit accuracy with the attacks of :mod:`faceprint.fingerprint.attacks`
(``robustness_sweep(wm.embed(faces, codes), wm.decode, codes, ..., seed=0)``; PSNR against
the input):

  method      output  PSNR  clean  JPEG 50  blur k=5  noise 0.05  crop 0.86
  dwtDctSvd   128 px  41.4  1.000  0.523    0.923     0.571       0.517
  dwtDctSvd   256 px  41.4  1.000  0.723    0.993     0.902       0.518
  dwtDct      128 px  41.6  0.787  0.498    0.525     0.464       0.513
  dwtDctSvd   128 px, scale 72:  35.9 dB, clean 1.000, JPEG 50 0.625, blur 0.988, noise 0.948, crop 0.537

Unmarked faces decode to 0.49-0.50 against the codes. At the paper's acceptance level (bit
accuracy >= 0.75) the default baseline survives blur up to k = 9, down-up resizing to 0.375,
JPEG down to quality 90 (0.75) and noise up to 0.02 (0.96); it fails cropping already at 0.95
(0.65: the block grid moves) and the random combination at probability 0.5 (0.56).

rivaGan (the package's third method) carries 32 bits only (its ONNX model has a 32-bit input;
``RivaWatermark`` raises "only supports 32 bits"), so it cannot carry a 128-bit code; at 32
bits it round-trips through 128 px clean (1.000 on 20 faces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError

METHODS = ("dwtDctSvd", "dwtDct")
WORK_SIDE = 256  # the library's minimum (it checks H * W >= 256 * 256)


@dataclass(frozen=True)
class PosthocConfig:
    """Settings of :class:`PosthocWatermark`.

    method: "dwtDctSvd" (default: survives 8-bit rounding exactly) or "dwtDct".
    n_bits: payload length (128).  scale: quantisation step of the embedded coefficient in
    the U channel (the library's default 36; larger is more robust and more visible).
    keep_work_size: return the 256 px watermarked image instead of averaging it back to the
    input size (see the module docstring for why the default is False).
    """

    method: str = "dwtDctSvd"
    n_bits: int = 128
    scale: int = 36
    keep_work_size: bool = False

    def __post_init__(self):
        if self.method == "rivaGan":
            raise ConfigError(
                "method 'rivaGan' of invisible-watermark 0.2.0 carries only 32 bits, not a 128-bit code; "
                "use method='dwtDctSvd' or 'dwtDct'"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.n_bits, bool) or not isinstance(self.n_bits, int) or not 1 <= self.n_bits <= 1024:
            raise ConfigError(f"n_bits must be an int in [1, 1024], got {self.n_bits!r}; fingerprints use 128")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or not 1 <= self.scale <= 255:
            raise ConfigError(f"scale must be an int in [1, 255], got {self.scale!r}; the library's default is 36")
        if not isinstance(self.keep_work_size, bool):
            raise ConfigError(f"keep_work_size must be True or False, got {self.keep_work_size!r}")


def _imwatermark():
    try:
        import imwatermark
    except ImportError as e:
        raise InputError(
            f"the post-hoc watermark needs invisible-watermark ({e}); install it with "
            "`pip install --no-deps invisible-watermark==0.2.0 PyWavelets opencv-python-headless`"
        ) from None
    return imwatermark


def _check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise InputError(
            f"images must be a (N, 3, H, W) float tensor in [0, 1], got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )
    if not images.dtype.is_floating_point:
        raise InputError(f"images must be floating in [0, 1], got {images.dtype}; convert uint8 with x.float() / 255")
    if images.numel() and (not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1):
        raise InputError("images must hold finite values in [0, 1]; clamp them first")
    if min(images.shape[2], images.shape[3]) < 16:
        raise InputError(f"images of {images.shape[2]}x{images.shape[3]} px are too small to watermark; use at least 16 px")
    return images


def upsample_factor(height: int, width: int) -> int:
    """Integer factor f = ceil(256 / min(H, W)) (at least 1) that the image is replicated by."""
    return max(1, math.ceil(WORK_SIDE / min(height, width)))


def _to_bgr_u8(img: torch.Tensor) -> np.ndarray:  # (3, H, W) float -> (H, W, 3) uint8 BGR
    a = (img.detach().float().cpu() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(a.permute(1, 2, 0).numpy()[:, :, ::-1])


def _from_bgr_u8(arr: np.ndarray) -> torch.Tensor:  # (H, W, 3) uint8 BGR -> (3, H, W) float32
    return torch.from_numpy(np.ascontiguousarray(arr[:, :, ::-1]).astype(np.float32) / 255.0).permute(2, 0, 1)


class PosthocWatermark:
    """Post-hoc DWT-DCT watermark of a bit string into finished images (invisible-watermark).

    Parameters
    ----------
    config : PosthocConfig, optional

    Examples
    --------
    >>> wm = PosthocWatermark()                                     # doctest: +SKIP
    >>> marked = wm.embed(faces, code)          # faces (N, 3, 128, 128), code (128,) bool
    >>> wm.decode(marked)                       # (N, 128) bool
    """

    def __init__(self, config: PosthocConfig | None = None):
        if config is not None and not isinstance(config, PosthocConfig):
            raise InputError(f"config must be a PosthocConfig, got {type(config).__name__}")
        self.config = config or PosthocConfig()
        _imwatermark()

    def __repr__(self) -> str:
        return f"PosthocWatermark({self.config})"

    def _scales(self) -> list[int]:
        s = self.config.scale
        return [0, s, s] if self.config.method == "dwtDct" else [0, s, 0]

    def _work(self, img: torch.Tensor) -> tuple[np.ndarray, int]:
        f = upsample_factor(img.shape[1], img.shape[2])
        up = img if f == 1 else F.interpolate(img[None], scale_factor=f, mode="nearest")[0]
        return _to_bgr_u8(up), f

    def embed(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Watermark each image with its bits.

        Parameters
        ----------
        images : torch.Tensor
            (N, 3, H, W) float in [0, 1].
        bits : torch.Tensor
            (n_bits,) bool for all images, or (N, n_bits) bool, one row per image.

        Returns
        -------
        torch.Tensor
            (N, 3, H, W) float32 in [0, 1] on 8-bit levels (or (N, 3, fH, fW) with
            ``keep_work_size``).
        """
        imw = _imwatermark()
        x = _check_images(images)
        n, nb = x.shape[0], self.config.n_bits
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.bool or bits.dim() not in (1, 2) or bits.shape[-1] != nb:
            raise InputError(
                f"bits must be a torch.bool tensor of shape ({nb},) or (N, {nb}), got "
                f"{tuple(bits.shape) if isinstance(bits, torch.Tensor) else type(bits).__name__}"
            )
        b = bits.cpu().expand(n, -1) if bits.dim() == 1 else bits.cpu()
        if b.shape[0] != n:
            raise InputError(f"bits has {b.shape[0]} rows for {n} images; pass one row per image or one (n_bits,) code")
        out = []
        for i in range(n):
            bgr, f = self._work(x[i])
            enc = imw.WatermarkEncoder()
            enc.set_watermark("bits", [int(v) for v in b[i]])
            marked = _from_bgr_u8(enc.encode(bgr, self.config.method, scales=self._scales()))  # (3, fH, fW)
            if f > 1 and not self.config.keep_work_size:
                marked = F.avg_pool2d(marked[None], f)[0]
                marked = (marked * 255.0).round_() / 255.0  # 8-bit levels, as a saved image
            out.append(marked)
        return torch.stack(out).clamp_(0.0, 1.0)

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded bits (N, n_bits) bool of images at their own size (replicated up as in embed)."""
        imw = _imwatermark()
        x = _check_images(images)
        out = torch.zeros((x.shape[0], self.config.n_bits), dtype=torch.bool)
        for i in range(x.shape[0]):
            bgr, _ = self._work(x[i])
            dec = imw.WatermarkDecoder("bits", self.config.n_bits)
            bits = dec.decode(bgr, self.config.method, scales=self._scales())
            out[i] = torch.from_numpy(np.asarray(bits, dtype=bool).reshape(-1)[: self.config.n_bits])
        return out
