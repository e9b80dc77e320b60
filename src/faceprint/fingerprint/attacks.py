"""Robustness harness shared by every protection: image perturbations and the sweep.

The perturbations follow papers/004: Sec. 5.5.4 (Gaussian noise, Gaussian blur, JPEG, centre
cropping, with working ranges noise std <= 0.05, blur kernel <= 5, JPEG quality >= 50, crop
>= 86/128 px), Sec. 6.4.5 (cropping and resizing, blur, JPEG, noise and their random
combination) and the random-combination protocol of Sec. 4.4.4 (each attack with probability
1/2, in the order cropping, blur, JPEG, noise; SfSNet relighting is left out, it needs a
network we do not have). A resize down-and-up and a regeneration attack through the TAEF2
autoencoder are added.

Every function maps images (N, 3, H, W) float in [0, 1] to a new tensor of the same shape and
range; random ones take an explicit ``generator`` (no global RNG). :data:`ATTACKS` names each
attack with its strength grid; :func:`robustness_sweep` decodes the attacked images and reports
bit accuracy per (attack, strength); :func:`plot_sweep` draws it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..io import atomic_path
from ..seeding import check_seed
from ..seeding import generator as make_generator

# --------------------------------------------------------------------------------------------
# validation


def _check_images(images, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor (N, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"{name} must have shape (N, 3, H, W), got {tuple(images.shape)}; add a batch dimension with x[None]")
    if not images.dtype.is_floating_point:
        raise InputError(f"{name} must be a floating tensor in [0, 1], got {images.dtype}; convert uint8 with x.float() / 255")
    if images.numel() and (not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise InputError(f"{name} must hold finite values in [0, 1]; clamp them first")
    return images


def _check_generator(generator, what: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise InputError(
            f"{what} is random: pass generator= a torch.Generator (e.g. faceprint.seeding.generator(0)), "
            f"got {type(generator).__name__}"
        )
    return generator


def _number(value, name: str, lo: float, hi: float, *, lo_open=False, hi_open=False, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number, got {value!r}; e.g. {example}")
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InputError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {value!r}; e.g. {example}")
    return float(value)


# --------------------------------------------------------------------------------------------
# perturbations


def gaussian_noise(images: torch.Tensor, sigma: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add i.i.d. N(0, sigma^2) noise to every pixel value, then clamp to [0, 1].

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) float in [0, 1].
    sigma : float
        Standard deviation in [0, 1] units (0.05 = 12.75 grey levels); 0 returns a copy.
    generator : torch.Generator
        Required when sigma > 0.
    """
    x = _check_images(images)
    sigma = _number(sigma, "sigma", 0.0, 1.0, example="0.05")
    if sigma == 0.0:
        return x.clone()
    g = _check_generator(generator, "gaussian_noise")
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32, device=g.device).to(x.device, x.dtype)
    return (x + sigma * noise).clamp_(0.0, 1.0)


def blur_sigma(kernel_size: int) -> float:
    """OpenCV's sigma for a Gaussian kernel of odd size k: 0.3 ((k - 1) / 2 - 1) + 0.8.

    This is cv2.getGaussianKernel's rule for sigma <= 0 (also torchvision's default);
    k = 3, 5, 7, 9 -> sigma = 0.8, 1.1, 1.4, 1.7.
    """
    return 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur with a kernel_size x kernel_size kernel (reflect padding).

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) float in [0, 1].
    kernel_size : int
        Odd, >= 1 (1 returns a copy) and smaller than 2 min(H, W).
    sigma : float, optional
        Default :func:`blur_sigma` (kernel_size), the OpenCV convention.
    """
    x = _check_images(images)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"kernel_size must be an odd positive int, got {kernel_size!r}; e.g. 3, 5 or 7")
    if kernel_size == 1:
        return x.clone()
    r = kernel_size // 2
    if r >= min(x.shape[2], x.shape[3]):
        raise InputError(f"kernel_size {kernel_size} is too large for {x.shape[2]}x{x.shape[3]} images; use at most {2 * min(x.shape[2], x.shape[3]) - 1}")
    s = blur_sigma(kernel_size) if sigma is None else _number(sigma, "sigma", 0.0, 1e3, lo_open=True, example="1.1")
    t = torch.arange(kernel_size, dtype=torch.float64) - r
    k1 = torch.exp(-(t**2) / (2 * s * s))
    k1 = (k1 / k1.sum()).to(x.dtype)
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k1.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size).contiguous(), groups=c)
    y = F.conv2d(y, k1.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1).contiguous(), groups=c)
    return y.clamp_(0.0, 1.0)


def _to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((img.detach().float().cpu() * 255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Real JPEG round trip with Pillow (libjpeg): 8-bit RGB, default 4:2:0 chroma subsampling.

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) float in [0, 1]; rounded to 8 bits first.
    quality : int
        1 (worst) to 100 (best; still lossy).
    """
    from PIL import Image

    x = _check_images(images)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InputError(f"quality must be an int in [1, 100], got {quality!r}; e.g. 75 or 50")
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(_to_uint8_hwc(x[i]), mode="RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        out[i] = torch.from_numpy(arr).permute(2, 0, 1).to(x.dtype)
    return out


def crop_resize(images: torch.Tensor, kept_fraction: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop a window keeping ``kept_fraction`` of each side, then resize it back (bilinear).

    The window is round(kept_fraction H) x round(kept_fraction W) (a square for square
    images), centred when ``generator`` is None (papers/004, Sec. 5.5.4: centre cropping; 0.86
    ~ 110/128 px, 0.67 ~ 86/128 px), else at a uniformly random position drawn per image.
    """
    x = _check_images(images)
    f = _number(kept_fraction, "kept_fraction", 0.0, 1.0, lo_open=True, example="0.86")
    n, _, h, w = x.shape
    ch, cw = max(1, round(f * h)), max(1, round(f * w))
    if (ch, cw) == (h, w):
        return x.clone()
    if generator is None:
        tops = [(h - ch) // 2] * n
        lefts = [(w - cw) // 2] * n
    else:
        g = _check_generator(generator, "crop_resize at a random position")
        tops = torch.randint(0, h - ch + 1, (n,), generator=g).tolist()
        lefts = torch.randint(0, w - cw + 1, (n,), generator=g).tolist()
    crops = torch.stack([x[i, :, t : t + ch, l : l + cw] for i, (t, l) in enumerate(zip(tops, lefts))])
    return F.interpolate(crops, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def uncrop(images: torch.Tensor, f: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo a centre crop keeping fraction f that was resized back: the image shrunk to the
    crop's size and put back at the crop's place (as faceprint.fingerprint.attacks.crop_resize
    cuts it); the uncovered border is filled by replication and masked out (mask (N, 1, H, W))."""
    n, _, h, w = images.shape
    if f >= 1.0:
        return images, torch.ones(n, 1, h, w)
    ch, cw = max(1, round(f * h)), max(1, round(f * w))
    top, left = (h - ch) // 2, (w - cw) // 2
    small = F.interpolate(images, size=(ch, cw), mode="bilinear", antialias=True, align_corners=False)
    y = F.pad(small, (left, w - cw - left, top, h - ch - top), mode="replicate").clamp(0, 1)
    mask = torch.zeros(n, 1, h, w)
    e = 4  # resampling and the decoder's border: leave a margin out
    mask[:, :, top + e:top + ch - e, left + e:left + cw - e] = 1
    return y, mask


def resize_down_up(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Downscale by ``scale`` (bilinear with antialiasing), then back up to the original size."""
    x = _check_images(images)
    s = _number(scale, "scale", 0.0, 1.0, lo_open=True, example="0.5")
    h, w = x.shape[2:]
    sh, sw = max(1, round(s * h)), max(1, round(s * w))
    if (sh, sw) == (h, w):
        return x.clone()
    small = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


COMBINATION_BLUR_KERNELS = (1, 3, 5, 7, 9)
COMBINATION_CROP = (0.80, 0.95)  # kept fraction: offsets of 5 % to 20 % of the side
COMBINATION_JPEG = (10, 75)
COMBINATION_NOISE = (5.0 / 255.0, 20.0 / 255.0)  # std, read as 5..20 grey levels


def random_combination(images: torch.Tensor, probability: float = 0.5, *, generator: torch.Generator) -> torch.Tensor:
    """Random combination of papers/004, Sec. 4.4.4, drawn independently per image.

    In order: crop keeping U[0.80, 0.95] of the side at a random position and resize back;
    Gaussian blur with kernel size from {1, 3, 5, 7, 9}; JPEG with quality from U{10..75};
    Gaussian noise with std U[5, 20] / 255. Each is applied with ``probability`` (the paper's
    0.5; the sweep varies it as the strength). Relighting (SfSNet) is not available.
    """
    x = _check_images(images)
    p = _number(probability, "probability", 0.0, 1.0, example="0.5")
    g = _check_generator(generator, "random_combination")
    out = []
    for i in range(x.shape[0]):
        y = x[i : i + 1]
        u = torch.rand(8, generator=g, dtype=torch.float64).tolist()  # fixed draws per image
        if u[0] < p:
            y = crop_resize(y, COMBINATION_CROP[0] + u[1] * (COMBINATION_CROP[1] - COMBINATION_CROP[0]), generator=g)
        if u[2] < p:
            y = gaussian_blur(y, COMBINATION_BLUR_KERNELS[min(int(u[3] * 5), 4)])
        if u[4] < p:
            lo, hi = COMBINATION_JPEG
            y = jpeg(y, lo + min(int(u[5] * (hi - lo + 1)), hi - lo))
        if u[6] < p:
            y = gaussian_noise(y, COMBINATION_NOISE[0] + u[7] * (COMBINATION_NOISE[1] - COMBINATION_NOISE[0]), generator=g)
        out.append(y)
    return torch.cat(out, 0) if out else x.clone()


@lru_cache(maxsize=1)
def _default_autoencoder():
    from ..autoencoder import TAEF2

    return TAEF2.load()


def autoencoder_roundtrip(images: torch.Tensor, rounds: int = 1, *, autoencoder=None) -> torch.Tensor:
    """Regeneration attack: encode and decode through an autoencoder ``rounds`` times.

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) float in [0, 1], H and W multiples of 8.
    rounds : int
        Number of encode/decode passes (>= 1).
    autoencoder : optional
        Anything with encode(images) -> latents and decode(latents) -> images; default the
        pretrained TAEF2 (``TAEF2.load()``, loaded once per process).
    """
    x = _check_images(images)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"rounds must be a positive int, got {rounds!r}; e.g. 1")
    ae = _default_autoencoder() if autoencoder is None else autoencoder
    y = x
    with torch.no_grad():
        for _ in range(rounds):
            y = ae.decode(ae.encode(y))
    return y.to(x.dtype).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# registry of attacks


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the sweep.

    function: (images, strength, generator or None) -> images.  strengths: the sweep grid,
    weakest first.  strength_name: what the strength is (for tables and plots).
    random: whether it needs a generator.  description: one line for reports.
    """

    name: str
    function: Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]
    strengths: tuple
    strength_name: str
    description: str
    random: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"AttackSpec.name must be a non-empty str, got {self.name!r}")
        if not callable(self.function):
            raise ConfigError(f"AttackSpec {self.name!r}: function must be callable, got {type(self.function).__name__}")
        if not isinstance(self.strengths, tuple) or not self.strengths:
            raise ConfigError(f"AttackSpec {self.name!r}: strengths must be a non-empty tuple, got {self.strengths!r}")
        for s in self.strengths:
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise ConfigError(f"AttackSpec {self.name!r}: every strength must be a number, got {s!r}")

    def apply(self, images: torch.Tensor, strength, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the attack at one strength."""
        return self.function(images, strength, generator)


def autoencoder_attack(autoencoder, strengths: tuple = (1, 2)) -> AttackSpec:
    """An :class:`AttackSpec` for :func:`autoencoder_roundtrip` with a given autoencoder."""
    return AttackSpec(
        "autoencoder_roundtrip",
        lambda x, s, g: autoencoder_roundtrip(x, int(s), autoencoder=autoencoder),
        tuple(strengths),
        "rounds",
        "regeneration: encode + decode through the autoencoder, repeated",
    )


ATTACKS: dict[str, AttackSpec] = {
    a.name: a
    for a in (
        AttackSpec("gaussian_noise", lambda x, s, g: gaussian_noise(x, s, generator=g), (0.0, 0.02, 0.05, 0.1, 0.2, 0.4),
                   "sigma", "additive Gaussian noise, std in [0, 1] units", random=True),
        AttackSpec("gaussian_blur", lambda x, s, g: gaussian_blur(x, int(s)), (1, 3, 5, 7, 9),
                   "kernel size", "Gaussian blur, sigma = 0.3((k-1)/2-1)+0.8 (OpenCV)"),
        AttackSpec("jpeg", lambda x, s, g: jpeg(x, int(s)), (95, 90, 75, 50, 30, 10),
                   "quality", "JPEG encode/decode with Pillow, 4:2:0"),
        AttackSpec("crop_resize", lambda x, s, g: crop_resize(x, s), (1.0, 0.95, 0.86, 0.75, 0.67, 0.5),
                   "kept fraction", "centre crop keeping a fraction of the side, resized back"),
        AttackSpec("resize_down_up", lambda x, s, g: resize_down_up(x, s), (1.0, 0.75, 0.5, 0.375, 0.25),
                   "scale", "downscale (antialiased) and upscale back, bilinear"),
        AttackSpec("random_combination", lambda x, s, g: random_combination(x, s, generator=g), (0.0, 0.25, 0.5, 0.75, 1.0),
                   "probability", "papers/004 Sec. 4.4.4: crop, blur, JPEG, noise, each with this probability", random=True),
        AttackSpec("autoencoder_roundtrip", lambda x, s, g: autoencoder_roundtrip(x, int(s)), (1, 2),
                   "rounds", "regeneration through TAEF2 encode + decode, repeated"),
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# the sweep


@dataclass(frozen=True)
class SweepRow:
    """Bit accuracy of N images under one attack at one strength.

    verified_share is the share of images with at least ``threshold`` matching bits (None if no
    threshold was given).
    """

    attack: str
    strength: float
    strength_name: str
    bit_accuracy_mean: float
    bit_accuracy_std: float
    verified_share: float | None
    n_images: int


def _select(attacks) -> list[AttackSpec]:
    if attacks is None:
        return list(ATTACKS.values())
    if isinstance(attacks, str):
        attacks = [attacks]
    if isinstance(attacks, Mapping):
        attacks = list(attacks.values())
    out = []
    for a in attacks:
        if isinstance(a, AttackSpec):
            out.append(a)
        elif isinstance(a, str) and a in ATTACKS:
            out.append(ATTACKS[a])
        else:
            raise InputError(f"unknown attack {a!r}; choose among {', '.join(ATTACKS)} or pass an AttackSpec")
    if not out:
        raise InputError("attacks is empty; pass None for all of faceprint.fingerprint.attacks.ATTACKS")
    return out


def _check_decoded(bits, n: int, n_bits: int) -> torch.Tensor:
    if not isinstance(bits, torch.Tensor) or bits.shape != (n, n_bits):
        raise InputError(
            f"decode_bits must return a ({n}, {n_bits}) bool tensor for {n} images, got "
            f"{tuple(bits.shape) if isinstance(bits, torch.Tensor) else type(bits).__name__}"
        )
    if bits.dtype != torch.bool:
        raise InputError(f"decode_bits must return torch.bool bits, got {bits.dtype}; threshold soft outputs (e.g. logits > 0)")
    return bits.cpu()


def robustness_sweep(
    images: torch.Tensor,
    decode_bits: Callable[[torch.Tensor], torch.Tensor],
    true_bits: torch.Tensor,
    attacks=None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    threshold: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> list[SweepRow]:
    """Bit accuracy of a protection under every attack and strength.

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) float in [0, 1]: protected images.
    decode_bits : callable
        images (n, 3, H, W) -> (n, n_bits) bool decoded bits.
    true_bits : torch.Tensor
        (N, n_bits) or (n_bits,) bool: the bits each image carries.
    attacks : None, str, sequence of names / AttackSpec, or mapping
        Default: every attack of :data:`ATTACKS`.
    seed, generator
        Randomness of the random attacks (one of them is required if any is selected). Each
        (attack, strength) gets its own generator derived from the seed (from ``generator``: a
        seed drawn from it), so a row does not depend on which other attacks run.
    threshold : int, optional
        Matching bits needed to count an image as verified (e.g. ``Calibration.threshold``).
    batch_size : int
        Images attacked and decoded at a time.
    progress : bool
        Show a progress bar (only on a terminal).

    Returns
    -------
    list of SweepRow
        In attack order, strengths in grid order.
    """
    from tqdm.auto import tqdm

    x = _check_images(images)
    specs = _select(attacks)
    n = x.shape[0]
    if n == 0:
        raise InputError("images is empty; pass at least one image")
    if not isinstance(true_bits, torch.Tensor) or true_bits.dtype != torch.bool or true_bits.dim() not in (1, 2):
        raise InputError("true_bits must be a torch.bool tensor of shape (N, n_bits) or (n_bits,)")
    tb = true_bits.cpu()
    tb = tb.expand(n, -1) if tb.dim() == 1 else tb
    if tb.shape[0] != n:
        raise InputError(f"true_bits has {tb.shape[0]} rows for {n} images; pass one row per image or a single (n_bits,) code")
    n_bits = tb.shape[1]
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 <= threshold <= n_bits):
        raise InputError(f"threshold must be an int number of matching bits in [0, {n_bits}], got {threshold!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}; e.g. 64")
    if seed is not None and generator is not None:
        raise InputError("pass seed= or generator=, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
    elif seed is not None:
        base = check_seed(seed)
    else:
        base = None
        rnd = [s.name for s in specs if s.random]
        if rnd:
            raise InputError(f"attacks {rnd} are random: pass seed= (an int) or generator= to robustness_sweep")

    rows: list[SweepRow] = []
    total = sum(len(s.strengths) for s in specs)
    bar = tqdm(total=total, desc="robustness sweep", unit="setting", disable=None if progress else True)
    try:
        for spec in specs:
            for strength in spec.strengths:
                g = make_generator(base, "attack", spec.name, repr(strength)) if base is not None else None
                accs = []
                for s in range(0, n, batch_size):
                    attacked = spec.apply(x[s : s + batch_size], strength, generator=g)
                    bits = _check_decoded(decode_bits(attacked), attacked.shape[0], n_bits)
                    accs.append((bits == tb[s : s + batch_size]).double().mean(1))
                acc = torch.cat(accs)  # (N,)
                share = None
                if threshold is not None:
                    share = float(((acc * n_bits).round() >= threshold).double().mean())
                rows.append(
                    SweepRow(
                        attack=spec.name,
                        strength=float(strength),
                        strength_name=spec.strength_name,
                        bit_accuracy_mean=float(acc.mean()),
                        bit_accuracy_std=float(acc.std(unbiased=False)),
                        verified_share=share,
                        n_images=n,
                    )
                )
                bar.update(1)
    finally:
        bar.close()
    return rows


def format_sweep(rows: Sequence[SweepRow]) -> str:
    """The rows as a plain-text table."""
    lines = [f"{'attack':<22} {'strength':>10} {'bit acc':>8} {'std':>6} {'verified':>9}"]
    for r in rows:
        v = "-" if r.verified_share is None else f"{r.verified_share:.3f}"
        lines.append(f"{r.attack:<22} {r.strength:>10g} {r.bit_accuracy_mean:>8.4f} {r.bit_accuracy_std:>6.3f} {v:>9}")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[SweepRow], path, *, threshold_accuracy: float | None = None, title: str | None = None) -> None:
    """Plot bit accuracy (mean +- std) against strength, one panel per attack; write atomically.

    Parameters
    ----------
    rows : sequence of SweepRow
        From :func:`robustness_sweep`.
    path : str or Path
        Output file; the format follows the suffix (.png, .pdf, .svg).
    threshold_accuracy : float, optional
        Draw the verification threshold (matching bits / n_bits) as a dashed line.
    title : str, optional
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise InputError("rows is empty; run robustness_sweep first")
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "pdf", "svg"):
        raise InputError(f"plot path {str(path)!r} must end in .png, .pdf or .svg")
    names = list(dict.fromkeys(r.attack for r in rows))
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        rs = [r for r in rows if r.attack == name]
        xs = [r.strength for r in rs]
        ax.errorbar(xs, [r.bit_accuracy_mean for r in rs], yerr=[r.bit_accuracy_std for r in rs], marker="o", capsize=3)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        if threshold_accuracy is not None:
            ax.axhline(threshold_accuracy, color="tab:red", lw=0.8, ls="--")
        spec = ATTACKS.get(name)
        if spec is not None and len(spec.strengths) > 1 and spec.strengths[0] > spec.strengths[-1]:
            ax.invert_xaxis()  # stronger attack to the right
        ax.set_ylim(0.0, 1.02)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(rs[0].strength_name)
        ax.set_ylabel("bit accuracy")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
