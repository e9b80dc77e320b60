"""TAEF2: the pretrained tiny autoencoder of faceprint (docs/TAEF2.md).

It plays the role of the generic autoencoder pretrained on a large auxiliary dataset in
papers/000 (LR-GMM-NN): images (N, 3, H, W) in [0, 1] <-> latents (N, 32, H/8, W/8). The
network is the TAESD-family encoder/decoder by madebyollin (MIT licence); faceprint only
loads it (weights.py) and runs it fast on a CPU.

Two ways to run it:

- ``TAEF2.encoder`` / ``TAEF2.decoder``: plain float32 ``nn.Sequential`` modules whose
  state_dict keys are exactly those of the weight files. Use them when gradients are needed.
- ``TAEF2.encode`` / ``TAEF2.decode``: the fast inference path. The same layers are run as a
  fixed plan of oneDNN kernels: channels_last, conv+ReLU and conv+add+ReLU fused into one
  kernel, and each "nearest upsample x2 then 3x3 conv" computed as one 2x2 convolution with
  four times the output channels on the low-resolution input followed by a pixel interleave
  (exact up to float rounding, 4/9 of the multiply-adds). Inputs go through in fixed-size,
  zero-padded chunks so the result for one image never depends on how many images were passed
  with it (see TAEF2Config).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError, WeightsError
from .weights import load_state_dicts, weights_id

LATENT_CHANNELS = 32
DOWNSCALE = 8
PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("channels_last", "contiguous")


# ----------------------------------------------------------------------------------------------
# The network, laid out so that state_dict keys match taef2_{encoder,decoder}.pth exactly.


def _conv(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """x -> 3 tanh(x / 3): keeps decoder inputs in (-3, 3), near identity for small x."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block: relu(conv(relu(conv(relu(conv(x))))) + x) on 64 channels.

    With ``groupnorm=True`` the block first adds a pre-mix ``x = x + m(x)`` where m is a 1x1 conv
    to 4x the channels (no bias), GroupNorm(4), ReLU and a 1x1 conv back (no bias).
    """

    def __init__(self, channels: int = 64, *, groupnorm: bool = False):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c), nn.ReLU(), nn.Conv2d(4 * c, c, 1, bias=False)
            )
            if groupnorm
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


class TAEF2Encoder(nn.Sequential):
    """(N, 3, H, W) in [0, 1] -> (N, 32, H/8, W/8). Float32 reference module."""

    def __init__(self):
        def down():
            return _conv(64, 64, stride=2, bias=False)

        def gn():
            return Block(64, groupnorm=True)

        super().__init__(
            _conv(3, 64), Block(),
            down(), Block(), Block(), Block(),
            down(), Block(), Block(), Block(),
            down(), gn(), gn(), gn(),
            _conv(64, LATENT_CHANNELS),
        )  # fmt: skip


class TAEF2Decoder(nn.Sequential):
    """(N, 32, h, w) -> (N, 3, 8h, 8w), not yet clamped to [0, 1]. Float32 reference module."""

    def __init__(self):
        def up():
            return nn.Upsample(scale_factor=2, mode="nearest")

        def gn():
            return Block(64, groupnorm=True)

        super().__init__(
            SoftClamp(), _conv(LATENT_CHANNELS, 64), nn.ReLU(), gn(), gn(), gn(),
            up(), _conv(64, 64, bias=False), Block(), Block(), Block(),
            up(), _conv(64, 64, bias=False), Block(), Block(), Block(),
            up(), _conv(64, 64, bias=False), Block(),
            _conv(64, 3),
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Fast inference plan.


def _fused_kernels_work() -> bool:
    """True if torch's oneDNN fused convolution ops exist and agree with F.conv2d here."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._convolution_pointwise
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(8, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
        b = torch.randn(8, generator=g)
        ref = (F.conv2d(x, w, b, padding=1) + x).relu()
        got = op.binary(x, x, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
        got2 = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
        return torch.allclose(got, ref, atol=1e-4) and torch.allclose(got2, F.conv2d(x, w, b, padding=1).relu(), atol=1e-4)
    except (AttributeError, RuntimeError, TypeError):
        return False


_FUSED_OK: bool | None = None


def fused_kernels_available() -> bool:
    """Whether the oneDNN fused conv kernels can be used (checked once per process)."""
    global _FUSED_OK
    if _FUSED_OK is None:
        _FUSED_OK = _fused_kernels_work()
    return _FUSED_OK


_BF16_RUNS = None


def bf16_runs() -> bool:
    """Whether this CPU can run bfloat16 convolutions at all (oneDNN needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT; without them it refuses bf16 convolutions). Probed once per process."""
    global _BF16_RUNS
    if _BF16_RUNS is None:
        try:
            x = torch.zeros(1, 8, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            w = torch.zeros(8, 8, 3, 3, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            torch.nn.functional.conv2d(x, w, padding=1)
            if fused_kernels_available():  # the fused oneDNN kernel is what the plans run
                torch.ops.mkldnn._convolution_pointwise(x, w, torch.zeros(8), [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            _BF16_RUNS = True
        except (RuntimeError, AttributeError):
            _BF16_RUNS = False
    return _BF16_RUNS


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16), so bf16 is fast here."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


class _Conv:
    """One convolution prepared for the plan: weights in compute dtype and memory format."""

    def __init__(self, weight, bias, padding, stride, dtype, memory_format, fused):
        self.w = weight.detach().to(dtype).contiguous(memory_format=memory_format)
        self.b = None if bias is None else bias.detach().to(dtype)
        # The fused unary kernel takes a float32 bias with bfloat16 data. Rounding a bias to bf16
        # shifts a whole channel (most of bf16's PSNR loss at the output conv): keep it float32
        # there. (The fused conv+add kernel insists on a bias of the data's dtype.)
        self.b_unary = None if bias is None else bias.detach().float() if fused else self.b
        self.padding = list(padding)
        self.stride = list(stride)
        self.fused = fused

    @classmethod
    def of(cls, conv: nn.Conv2d, dtype, memory_format, fused):
        return cls(conv.weight, conv.bias, conv.padding, conv.stride, dtype, memory_format, fused)

    def __call__(self, x, *, relu: bool = False, add=None):
        """conv(x) [+ add] [then ReLU], as one kernel when fused."""
        if self.fused:
            op = torch.ops.mkldnn._convolution_pointwise
            act = "relu" if relu else None
            if add is None:
                return op(x, self.w, self.b_unary, self.padding, self.stride, [1, 1], 1, act or "none", [], "")
            return op.binary(x, add, self.w, self.b, self.padding, self.stride, [1, 1], 1, "add", None, act, [], "")
        y = F.conv2d(x, self.w, self.b, stride=self.stride, padding=self.padding)
        if add is not None:
            y = y.add_(add)
        return y.relu_() if relu else y


class _ConvStep:
    def __init__(self, conv: _Conv, relu: bool):
        self.conv, self.relu = conv, relu
        self.dtype = conv.w.dtype

    def __call__(self, x):
        return self.conv(x, relu=self.relu)


class _BlockStep:
    def __init__(self, block: Block, dtype, memory_format, fused):
        def mk(c):
            return _Conv.of(c, dtype, memory_format, fused)

        self.dtype = dtype
        self.c0, self.c2, self.c4 = mk(block.conv[0]), mk(block.conv[2]), mk(block.conv[4])
        self.pool = None
        if block.pool is not None:
            gn = block.pool[1]
            self.pool = (
                mk(block.pool[0]),
                gn.num_groups,
                gn.weight.detach().to(dtype),
                gn.bias.detach().to(dtype),
                gn.eps,
                mk(block.pool[3]),
            )

    def __call__(self, x):
        if self.pool is not None:
            expand, groups, gw, gb, eps, project = self.pool
            h = F.group_norm(expand(x), groups, gw, gb, eps).relu_()
            x = project(h, add=x)
        h = self.c0(x, relu=True)
        h = self.c2(h, relu=True)
        return self.c4(h, relu=True, add=x)


class _UpsampleStep:
    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


class _UpConvStep:
    """Nearest upsample x2 followed by a bias-free 3x3 conv (padding 1), at low resolution.

    Output pixel (2i+a, 2j+b) of conv(up(x)) only sees low-resolution rows {i-1, i} (a = 0) or
    {i, i+1} (a = 1) and likewise columns, with the 3x3 taps summed where they hit the same
    source pixel. So each of the four phases (a, b) is a 2x2 conv of x; the four are stacked as
    one 2x2 conv with 4x the output channels over x padded by 1, and the phases are interleaved.
    """

    def __init__(self, conv: nn.Conv2d, dtype, memory_format, fused):
        w = conv.weight.detach().float()  # (O, I, 3, 3)

        def merge(t, a, dim):
            t0, t1, t2 = t.unbind(dim)
            return torch.stack([t0, t1 + t2] if a == 0 else [t0 + t1, t2], dim)

        phases = [merge(merge(w, a, 2), b, 3) for a in (0, 1) for b in (0, 1)]  # 4 x (O, I, 2, 2)
        self.out_channels = w.shape[0]
        self.conv = _Conv(torch.cat(phases, 0), None, (1, 1), (1, 1), dtype, memory_format, fused)
        self.dtype = dtype
        self.memory_format = memory_format

    def __call__(self, x):
        n, _, h, w = x.shape
        o = self.conv(x)  # (N, 4*O, h+1, w+1)
        c = self.out_channels
        o6 = o.view(n, 2, 2, c, h + 1, w + 1)
        y = torch.empty((n, c, 2 * h, 2 * w), dtype=o.dtype, device=o.device, memory_format=self.memory_format)
        y6 = y.view(n, c, h, 2, w, 2)
        for a in (0, 1):
            for b in (0, 1):
                y6[:, :, :, a, :, b] = o6[:, a, b, :, a : a + h, b : b + w]
        return y


class _Plan:
    """A Sequential (encoder or decoder) compiled into a list of prepared steps.

    Steps run in ``dtype`` except the encoder's first convolution (3 input channels), which
    always runs in float32: rounding the input image and that layer's weights to bfloat16 cost
    0.06 dB of round-trip PSNR at 128 px, for 0.5 ms per image saved. (The decoder's output conv
    stays in bf16: with its bias kept in float32, see _Conv, it loses nothing measurable.)
    """

    def __init__(self, seq: nn.Sequential, dtype, memory_format, *, fused: bool, subpixel: bool):
        self.memory_format = memory_format
        self.prologue = []  # elementwise steps run in float32 before the cast (the soft clamp)
        self.steps = []
        mods = list(seq)
        i = 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if isinstance(m, SoftClamp) and not self.steps:
                self.prologue.append(m)
            elif isinstance(m, Block):
                self.steps.append(_BlockStep(m, dtype, memory_format, fused))
            elif isinstance(m, nn.Conv2d):
                relu = isinstance(nxt, nn.ReLU)
                conv = _Conv.of(m, torch.float32 if m.in_channels == 3 else dtype, memory_format, fused)
                self.steps.append(_ConvStep(conv, relu))
                i += relu
            elif isinstance(m, nn.Upsample):
                if subpixel and isinstance(nxt, nn.Conv2d) and nxt.bias is None and nxt.kernel_size == (3, 3):
                    self.steps.append(_UpConvStep(nxt, dtype, memory_format, fused))
                    i += 1
                else:
                    self.steps.append(_UpsampleStep(dtype))
            else:
                raise TypeError(f"no fast path for layer {i} ({type(m).__name__})")
            i += 1

    def __call__(self, x):
        for m in self.prologue:
            x = m(x)
        x = x.contiguous(memory_format=self.memory_format)
        for step in self.steps:
            if x.dtype != step.dtype:
                x = x.to(step.dtype)
            x = step(x)
        return x.float()


# ----------------------------------------------------------------------------------------------
# Public API.


@dataclass(frozen=True)
class TAEF2Config:
    """How TAEF2 runs (not what it computes: the weights are pinned, see TAEF2.id).

    Parameters
    ----------
    precision : {"auto", "bf16", "fp32"}
        Compute precision of encode/decode. "bf16" (bfloat16 weights and activations, float32
        accumulation, float32 first encoder layer and output biases) is about 5x faster than
        "fp32" on CPUs with AMX/AVX512-BF16 (128 px, 2 cores: ~5 ms vs ~25 ms per image each way)
        and costs 0.03 dB of round-trip PSNR (33.55 vs 33.58 dB on 64 faces); "auto" picks
        "bf16" on such CPUs and "fp32" elsewhere. TAEF2.load resolves "auto", so a loaded
        model's config is always concrete.
    chunk_pixels : int
        Image pixels per forward pass when encode/decode get no batch_size: a chunk holds
        max(1, chunk_pixels // (H * W)) images, i.e. 4 at 128 px, 1 at 256 px, 16 at 64 px
        (measured fastest on 2 cores; larger chunks spill the caches and run slower).
    pad_chunks : bool
        Zero-pad the last chunk to the full chunk size, so every forward pass has the same batch
        size and an image's output does not depend on how many images came with it.
    memory_format : {"channels_last", "contiguous"}
        Activation layout; channels_last is what oneDNN is fastest with.
    fused : bool
        Use oneDNN fused conv+ReLU / conv+add+ReLU kernels (falls back to plain ops if this
        torch build lacks them).
    subpixel : bool
        Compute "upsample x2 then conv" at low resolution (4/9 of the work).
    """

    precision: str = "auto"
    chunk_pixels: int = 4 * 128 * 128
    pad_chunks: bool = True
    memory_format: str = "channels_last"
    fused: bool = True
    subpixel: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}; try 'auto'")
        if isinstance(self.chunk_pixels, bool) or not isinstance(self.chunk_pixels, int) or self.chunk_pixels < 1:
            raise ConfigError(f"chunk_pixels must be a positive int, got {self.chunk_pixels!r}; try {4 * 128 * 128}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        for name in ("pad_chunks", "fused", "subpixel"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def resolved(self) -> TAEF2Config:
        """This config with precision "auto" replaced by what this machine runs fastest."""
        if self.precision != "auto":
            return self
        return dataclasses.replace(self, precision="bf16" if native_bf16() else "fp32")

    def chunk_size(self, height: int, width: int) -> int:
        """Images per forward pass for H x W images (the default batch_size of encode/decode)."""
        return max(1, self.chunk_pixels // max(1, height * width))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_tensor(x, name: str, *, channels: int, shape_text: str, hint: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor of shape {shape_text}, got {type(x).__name__}; "
            "convert a NumPy array with torch.from_numpy(array)"
        )
    if x.dim() != 4:
        raise InputError(
            f"{name} must be 4-D {shape_text}, got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single item"
        )
    if x.shape[1] != channels:
        raise InputError(
            f"{name} must have {channels} channels in dim 1 {shape_text}, got shape {tuple(x.shape)}; "
            + ("convert grey/RGBA images to RGB and use (N, C, H, W) order, not (N, H, W, C)" if channels == 3 else hint)
        )
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; {hint}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name} contains {bad} NaN or infinite values; fix the values upstream (they are not replaced)")


class TAEF2:
    """The pretrained TAEF2 autoencoder (the Autoencoder protocol).

    Build it with :meth:`TAEF2.load`. ``encode`` maps images (N, 3, H, W) float in [0, 1], H and
    W multiples of 8, to latents (N, 32, H/8, W/8) float32; ``decode`` maps latents back to
    images clamped to [0, 1]. Both run without autograd, in chunks of
    ``config.chunk_size(H, W)`` images.

    Attributes
    ----------
    id : str
        "taef2-" + 16 hex digits identifying the pinned weights (for cache keys and artifacts).
    config : TAEF2Config
        How it runs; ``config.precision`` is "bf16" or "fp32".
    latent_channels : int
        32.
    downscale : int
        8, the spatial factor between images and latents.
    encoder, decoder : nn.Sequential
        Float32 reference modules (weights in a state_dict layout identical to the files);
        usable with autograd.
    weights_dir : pathlib.Path
        Where the weights were loaded from.
    """

    latent_channels = LATENT_CHANNELS
    downscale = DOWNSCALE

    def __init__(self, encoder: TAEF2Encoder, decoder: TAEF2Decoder, *, config: TAEF2Config, device="cpu", weights_dir=None):
        self.config = config.resolved()
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.decoder = decoder.to(self.device).eval()
        self.weights_dir = weights_dir
        self.id = weights_id()
        self.base_id = self.id  # the pinned pretrained weights; differs from id only for a replaced decoder
        self.base = self
        # what a latent cache must key on: the weights and how they are run
        self.encode_id = f"{self.id}:{self.config.precision}"
        self.fused = self.config.fused and self.device.type == "cpu" and fused_kernels_available()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float32
        fmt = torch.channels_last if self.config.memory_format == "channels_last" else torch.contiguous_format
        with torch.no_grad():
            self._enc = _Plan(self.encoder, dtype, fmt, fused=self.fused, subpixel=self.config.subpixel)
            self._dec = _Plan(self.decoder, dtype, fmt, fused=self.fused, subpixel=self.config.subpixel)

    @classmethod
    def load(cls, weights=None, *, device="cpu", config: TAEF2Config | None = None) -> TAEF2:
        """Find, verify (sha256) and load the pretrained weights.

        Parameters
        ----------
        weights : str or os.PathLike, optional
            Folder holding taef2_encoder.pth and taef2_decoder.pth; default: the lookup of
            :func:`faceprint.autoencoder.find_weights` (FACEPRINT_WEIGHTS, ../shared, cache).
        device : str or torch.device
            "cpu" (the fast fused path is CPU only).
        config : TAEF2Config, optional
            Precision, chunk size, ...; default TAEF2Config() (precision "auto").

        Raises
        ------
        WeightsError
            Weights missing or failing their checksum.
        """
        if config is not None and not isinstance(config, TAEF2Config):
            raise ConfigError(f"config must be a TAEF2Config, got {type(config).__name__}")
        folder, enc_sd, dec_sd = load_state_dicts(weights)
        encoder, decoder = TAEF2Encoder(), TAEF2Decoder()
        encoder.load_state_dict(enc_sd, strict=True)
        decoder.load_state_dict(dec_sd, strict=True)
        return cls(encoder, decoder, config=config or TAEF2Config(), device=device, weights_dir=folder)

    def with_decoder_state(self, state: dict[str, torch.Tensor]) -> TAEF2:
        """A TAEF2 with the same encoder and run settings and other decoder weights of the same
        architecture (e.g. a fingerprinted instance's). ``id`` becomes base id + a digest of the
        weights; ``base_id``/``base`` keep naming the pretrained autoencoder."""
        import hashlib

        decoder = TAEF2Decoder()
        try:
            decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as e:
            raise WeightsError(f"decoder weights do not fit the TAEF2 decoder ({str(e).splitlines()[0]}); "
                               "the model file's decoder was not made for TAEF2") from None
        base = self.base
        out = TAEF2(base.encoder, decoder, config=base.config, device=base.device, weights_dir=base.weights_dir)
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().float().contiguous().numpy().tobytes())
        out.id = f"{base.id}+{h.hexdigest()[:12]}"
        out.base_id, out.base = base.id, base
        out.encode_id = base.encode_id
        return out

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TAEF2(id={self.id!r}, precision={c.precision!r}, chunk_pixels={c.chunk_pixels}, "
            f"fused={self.fused}, device={str(self.device)!r})"
        )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (32, H/8, W/8) of the latent of one H x W image."""
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % DOWNSCALE:
                raise InputError(f"{name} must be a positive multiple of {DOWNSCALE}, got {v!r}; resize or crop images to e.g. 128")
        return (LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE)

    def _chunk(self, batch_size, height: int, width: int) -> int:
        if batch_size is None:
            return self.config.chunk_size(height, width)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(
                f"batch_size must be a positive int or None, got {batch_size!r}; try None (chooses from config.chunk_pixels)"
            )
        return batch_size

    def encode(self, images: torch.Tensor, *, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) float in [0, 1], H and W multiples of 8 -> latents (N, 32, H/8, W/8) float32.

        Parameters
        ----------
        images : torch.Tensor
            Any floating dtype; values must be finite and inside [0, 1].
        batch_size : int, optional
            Images per forward pass (default ``config.chunk_size(H, W)``, 4 at 128 px). With
            config.pad_chunks the last pass is zero-padded, so an image's latent does not depend
            on N; keep the same batch_size (or None) for bit-identical results.
        progress : bool
            Show a progress bar (only on a terminal).
        """
        hint = "convert uint8 images with images.float() / 255"
        _check_tensor(images, "images", channels=3, shape_text="(N, 3, H, W)", hint=hint)
        n, _, h, w = images.shape
        if h % DOWNSCALE or w % DOWNSCALE or h == 0 or w == 0:
            raise InputError(
                f"images height and width must be positive multiples of {DOWNSCALE}, got {h}x{w}; "
                f"crop or resize to e.g. {max(DOWNSCALE, h // DOWNSCALE * DOWNSCALE)}x{max(DOWNSCALE, w // DOWNSCALE * DOWNSCALE)}"
            )
        if images.numel():
            lo, hi = (float(v) for v in torch.aminmax(images))
            if lo < 0.0 or hi > 1.0:
                raise InputError(
                    f"images must hold values in [0, 1], got min {lo:.4g} and max {hi:.4g}; "
                    "divide 0-255 images by 255, map [-1, 1] images with (x + 1) / 2, and clamp(0, 1) after resampling"
                )
        out = torch.empty((n, LATENT_CHANNELS, h // DOWNSCALE, w // DOWNSCALE), dtype=torch.float32, device=self.device)
        return self._run(self._enc, images, out, self._chunk(batch_size, h, w), progress, "encode", clamp=False)

    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """Latents (N, 32, h, w) float -> images (N, 3, 8h, 8w) float32 clamped to [0, 1].

        batch_size and progress as in :meth:`encode`.
        """
        _check_tensor(
            latents, "latents", channels=LATENT_CHANNELS, shape_text="(N, 32, h, w)",
            hint="pass latents as produced by encode() (float, 32 channels)",
        )  # fmt: skip
        n, _, h, w = latents.shape
        if h == 0 or w == 0:
            raise InputError(f"latents must have positive height and width, got shape {tuple(latents.shape)}")
        out = torch.empty((n, 3, h * DOWNSCALE, w * DOWNSCALE), dtype=torch.float32, device=self.device)
        chunk = self._chunk(batch_size, h * DOWNSCALE, w * DOWNSCALE)
        return self._run(self._dec, latents, out, chunk, progress, "decode", clamp=True)

    def _run(self, plan: _Plan, x: torch.Tensor, out: torch.Tensor, chunk: int, progress: bool, desc: str, clamp: bool):
        n = x.shape[0]
        if n == 0:
            return out
        from tqdm import tqdm

        show = bool(progress) and sys.stderr is not None and sys.stderr.isatty()
        with tqdm(total=n, desc=desc, unit="img", disable=not show, leave=False) as bar:
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                with torch.inference_mode():
                    part = x[start:stop].to(device=self.device, dtype=torch.float32)
                    if self.config.pad_chunks and stop - start < chunk:
                        pad = part.new_zeros((chunk - (stop - start), *part.shape[1:]))
                        part = torch.cat([part, pad])
                    y = plan(part)[: stop - start]
                    if clamp:
                        y = y.clamp(0.0, 1.0)
                # `out` is an ordinary tensor (callers may modify it in place); copy into it.
                with torch.no_grad():
                    out[start:stop].copy_(y)
                bar.update(stop - start)
        return out


__all__ = ["TAEF2", "TAEF2Config", "TAEF2Encoder", "TAEF2Decoder", "Block", "SoftClamp", "native_bf16"]
