"""The attribution network of papers/004, Ch. 4, Sec. 4.3 (Fig. 4.2), sized for a CPU.

A convolutional classifier maps an image to its **image fingerprint**, the 512-d feature before
the last fully connected layer (the chapter's 1 x 1 x 512 tensor); the rows of that layer's
weight matrix are the **model fingerprints**, one per source (Sec. 4.3).

CPU adaptation: early strides (one full-resolution convolution, then a stride 2 at every
stage but one), batch normalisation after every convolution and leaky ReLU (0.2). At 128 px
the default width (16) costs about 140 M multiply-adds per face and has about 1.8 M parameters
(the chapter's network is a ProGAN discriminator; ours keeps its shape: stacked 3 x 3
convolutions halving the resolution to a 4 x 4 map, global average pooling, FC).

Component-analysis variants (Sec. 4.3.1), selected by :class:`NetConfig`:

- ``band="low", factor=f``: **pre-downsampling**. The input is reduced to 128/f px by a
  Gaussian pyramid (5-tap binomial filter, stride 2, repeated) and brought back to the input
  size (bilinear), so the network only sees frequencies below the 128/f grid (Table 4.4 "L-f").
- ``band="high", factor=f`` (f >= 2): **pre-downsampling residual**. The Laplacian band between
  resolutions 128/(f/2) and 128/f: ``down^(k-1)(x) - up(down^k(x))`` with f = 2^k, brought back
  to the input size (Table 4.4 "H-f"; Fig. 4.2c: "the residual component between 16x16 and 8x8"
  for f = 16). One octave, as in the chapter.
- ``pool_after=k``: **post-pooling**. Average pooling over the whole map starts after the k-th
  convolution; the later layers then act on a 1 x 1 map (a padded 3 x 3 convolution on a 1 x 1
  map uses its centre tap: a fully connected layer), so the feature is an average of local
  statistics of patches the size of the k-th layer's receptive field (Table 4.5).
  :data:`RECEPTIVE_FIELDS` gives the patch side of each k.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..seeding import check_seed
from ..seeding import generator as make_generator

BANDS = ("full", "low", "high")
# (in multiplier, out multiplier, stride) of each 3x3 convolution, in units of the width;
# the input has 3 channels and the last layer has feature_dim channels.
_LAYERS = ((None, 1, 1), (1, 2, 2), (2, 4, 2), (4, 8, 2), (8, 8, 1), (8, 16, 2), (16, None, 2))


def _receptive_fields() -> tuple[int, ...]:
    r, j, out = 1, 1, []
    for _, _, s in _LAYERS:
        r += 2 * j
        j *= s
        out.append(r)
    return tuple(out)


#: Patch side (px) seen by one feature after k convolutions, k = 1..7: 3, 5, 9, 17, 33, 49, 81.
RECEPTIVE_FIELDS = _receptive_fields()
N_LAYERS = len(_LAYERS)


@dataclass(frozen=True)
class NetConfig:
    """Shape of an attribution network.

    width: channels of the first convolution (doubling at the stages of ``_LAYERS``).
    feature_dim: size of the image fingerprint (512, as in the chapter).
    band, factor: the input band (see the module docstring); factor a power of 2.
    pool_after: None (pool at the end) or k in 1..6 (post-pooling after the k-th convolution).
    """

    width: int = 16
    feature_dim: int = 512
    band: str = "full"
    factor: int = 1
    pool_after: int | None = None

    def __post_init__(self):
        for name, lo in (("width", 1), ("feature_dim", 2), ("factor", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"NetConfig.{name} must be an int >= {lo}, got {v!r}")
        if self.band not in BANDS:
            raise ConfigError(f"NetConfig.band must be one of {', '.join(BANDS)}, got {self.band!r}")
        if self.factor & (self.factor - 1):
            raise ConfigError(f"NetConfig.factor must be a power of 2, got {self.factor}; e.g. 2, 4, 8 or 16")
        if self.band == "full" and self.factor != 1:
            raise ConfigError(f"NetConfig.factor is for band 'low' or 'high'; band 'full' takes factor 1, got {self.factor}")
        if self.band == "high" and self.factor < 2:
            raise ConfigError("NetConfig band 'high' needs factor >= 2 (the band between 128/(f/2) and 128/f px)")
        if self.pool_after is not None and (isinstance(self.pool_after, bool) or not isinstance(self.pool_after, int)
                                            or not 1 <= self.pool_after < N_LAYERS):
            raise ConfigError(f"NetConfig.pool_after must be None or an int in [1, {N_LAYERS - 1}], got {self.pool_after!r}")

    @property
    def patch(self) -> int | None:
        """Patch side of the post-pooling variant (None: the whole image)."""
        return None if self.pool_after is None else RECEPTIVE_FIELDS[self.pool_after - 1]

    def label(self) -> str:
        if self.band != "full":
            return f"{self.band}-f x{self.factor}"
        if self.pool_after is not None:
            return f"patch {self.patch}px"
        return "full"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"network config must be a JSON object, got {type(d).__name__}")
        known = {k: d[k] for k in ("width", "feature_dim", "band", "factor", "pool_after") if k in d}
        return cls(**known)


# 5-tap binomial filter of the Gaussian pyramid (Burt & Adelson)
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def pyramid_down(x: torch.Tensor) -> torch.Tensor:
    """One Gaussian-pyramid step: 5-tap binomial blur (reflect padding), then stride 2."""
    c = x.shape[1]
    k = _BINOMIAL.to(x.dtype)
    pad = 2 if min(x.shape[-2:]) > 2 else 0
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    if pad:
        y = F.conv2d(y, k.view(1, 1, 1, 5).expand(c, 1, 1, 5).contiguous(), groups=c)
        y = F.conv2d(y, k.view(1, 1, 5, 1).expand(c, 1, 5, 1).contiguous(), groups=c)
    return y[:, :, ::2, ::2]


def band_filter(x: torch.Tensor, band: str, factor: int) -> torch.Tensor:
    """The input band of the component-analysis networks, at the input size (see module doc)."""
    if band == "full" or factor == 1:
        return x
    h, w = x.shape[-2:]
    steps = int(round(math.log2(factor)))
    if band == "low":
        y = x
        for _ in range(steps):
            y = pyramid_down(y)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    a = x
    for _ in range(steps - 1):
        a = pyramid_down(a)
    b = pyramid_down(a)
    lap = a - F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
    return F.interpolate(lap, size=(h, w), mode="bilinear", align_corners=False) if lap.shape[-2:] != (h, w) else lap


class AttributionNet(nn.Module):
    """images (N, 3, H, W) in [0, 1] -> logits (N, K); :meth:`fingerprints` gives (N, feature_dim)."""

    def __init__(self, n_sources: int, config: NetConfig | None = None, *, seed: int = 0):
        super().__init__()
        check_seed(seed)
        if isinstance(n_sources, bool) or not isinstance(n_sources, int) or n_sources < 2:
            raise InputError(f"an attribution network needs at least 2 sources, got {n_sources!r}")
        self.config = config or NetConfig()
        w, fd = self.config.width, self.config.feature_dim
        convs = []
        for a, b, s in _LAYERS:
            cin = 3 if a is None else a * w
            cout = fd if b is None else b * w
            convs.append(nn.Sequential(nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(cout),
                                       nn.LeakyReLU(0.2, inplace=True)))
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(fd, n_sources)  # rows: the model fingerprints
        # every initial weight comes from ``seed`` (never the global random state): the same seed,
        # the same network, in any process
        g = make_generator(seed, "attribution-init")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu", generator=g)
        bound = 1.0 / math.sqrt(fd)  # nn.Linear's own default range
        nn.init.uniform_(self.fc.weight, -bound, bound, generator=g)
        nn.init.uniform_(self.fc.bias, -bound, bound, generator=g)

    def fingerprints(self, images: torch.Tensor) -> torch.Tensor:
        """Image fingerprints (N, feature_dim)."""
        x = band_filter((images - 0.5) / 0.25, self.config.band, self.config.factor)
        for k, conv in enumerate(self.convs, start=1):
            x = conv(x)
            if self.config.pool_after == k:
                x = x.mean((2, 3), keepdim=True)
        return x.mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fingerprints(images))

    @property
    def model_fingerprints(self) -> torch.Tensor:
        """(K, feature_dim): the last layer's weight rows."""
        return self.fc.weight.detach()


def multiply_adds(config: NetConfig, size: int = 128) -> int:
    """Multiply-adds of the convolutions for one size x size image (the cost of a forward pass)."""
    w, fd = config.width, config.feature_dim
    total, s = 0, size
    for k, (a, b, st) in enumerate(_LAYERS, start=1):
        cin = 3 if a is None else a * w
        cout = fd if b is None else b * w
        s = (s + st - 1) // st
        total += s * s * cin * cout * 9
        if config.pool_after == k:
            s = 1
    return total
