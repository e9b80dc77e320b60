"""The Texture Mixer on TAEF2: encode, tile/shuffle/blend in latent space, harmonise, decode
(papers/004, ch. 3, Sec. 3.3.1 and 3.3.3; docs/SEED-SYSTEMS.md Sec. 4.3 for the CPU adaptation).

    z^l_k = Enc(S_k)                  frozen TAEF2 encoder, (1, 32, h/8, w/8)
    z^g_k = E^g(z^l_k)                small global encoder, (1, g)
    Z^l   = sum_k W_k P~(T(z^l_k))    tiled to the canvas, shuffled (Eq. 3.1), blended (Eq. 3.2)
    Z^g   = sum_k W_k z^g_k           broadcast and blended with the same weights (Eq. 3.3)
    I     = Dec(H(Z^l, Z^g))          trained harmoniser H, frozen TAEF2 decoder

W_k are spatial weight maps at latent resolution (one latent pixel = 8 x 8 image pixels) that sum
to 1. The test-time uses of Sec. 3.3.3 are thin wrappers: :meth:`TextureMixer.canvas` (sparse
placement on a horizontal canvas, two or more sources), :meth:`~TextureMixer.dissolve` (uniform
weights), :meth:`~TextureMixer.brush` (a mask painting source B onto A) and
:meth:`~TextureMixer.hybrid` (left of A, right of B, a linear transition band; the chapter's
animal hybridisation on aligned faces). The canvas ends with the chapter's boundary
post-processing (the sources put back, a least-visible seam, a Poisson blend:
:mod:`faceprint.mixing.postprocess`).

``harmonise=False`` and ``shuffle=False`` give the plain TAEF2 latent blend (the free baseline);
:func:`pixel_blend` is the naive alpha blend of tiled pixels.

The artifact is one .safetensors file (class "faceprint.TextureMixer"): the harmoniser and the
global encoder (a few hundred thousand weights of convolutions on 32-channel latents, which hold
no image content of the training photos), the configs and the training provenance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import ArtifactError, ConfigError, InputError, NotFittedError
from ..io import load_artifact, now_iso, save_artifact
from ..seeding import check_seed, derive_seed
from ..seeding import generator as make_generator
from . import operations as ops
from .networks import GlobalEncoder, Harmoniser

ARTIFACT_CLASS = "faceprint.TextureMixer"
DOWNSCALE = 8
#: Largest output (pixels) a mix may have: the decoder holds ~64 float32 channels per pixel in
#: several buffers (about 1 KB per output pixel at peak), so 4 Mpx is ~4 GB.
MAX_PIXELS = 1 << 22
MIN_SIDE = 32


def _is_int(v, lo: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= lo


@dataclass(frozen=True)
class MixerConfig:
    """Architecture of the trainable parts.

    Parameters
    ----------
    global_dim : int
        Size of z^g (0: no global latent, the chapter's "no z^g" ablation).
    width, blocks : int
        Channels and residual blocks of the harmoniser H (at latent resolution).
    encoder_width : int
        Channels of the global encoder E^g.
    texture_size : int
        Side in pixels of the training textures (64 -> 8 x 8 latents).
    """

    global_dim: int = 32
    width: int = 64
    blocks: int = 4
    encoder_width: int = 64
    texture_size: int = 64

    def __post_init__(self):
        for name, lo in (("global_dim", 0), ("width", 1), ("blocks", 0), ("encoder_width", 1), ("texture_size", 32)):
            if not _is_int(getattr(self, name), lo):
                raise ConfigError(f"{name} must be an int >= {lo}, got {getattr(self, name)!r}")
        if self.texture_size % (2 * DOWNSCALE):
            raise ConfigError(f"texture_size must be a multiple of {2 * DOWNSCALE} px, got {self.texture_size}; try 64")

    def to_dict(self) -> dict:
        return asdict(self)


def build_networks(config: MixerConfig, seed: int) -> tuple[Harmoniser, GlobalEncoder | None]:
    """H and E^g with weights drawn from (seed, "mix-init"), without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "mix-init"))
        h = Harmoniser(config.global_dim, config.width, config.blocks)
        e = GlobalEncoder(config.global_dim, config.encoder_width) if config.global_dim > 0 else None
    return h, e


def check_images(x, name: str, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """(N, 3, H, W) or (3, H, W) float in [0, 1], H and W multiples of 8 and >= 32 -> (N, 3, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor (N, 3, H, W) in [0, 1], got {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"{name} must be RGB (N, 3, H, W) or (3, H, W), got shape {tuple(x.shape)}; "
                         "convert grey/RGBA/CMYK images to RGB first")
    if not x.is_floating_point():
        raise InputError(f"{name} must be floating point in [0, 1], got {x.dtype}; use images.float() / 255")
    h, w = x.shape[-2:]
    if h % DOWNSCALE or w % DOWNSCALE:
        raise InputError(f"{name} is {h}x{w} px (H x W), not on the {DOWNSCALE}-px latent grid; crop it to "
                         f"{h // DOWNSCALE * DOWNSCALE}x{w // DOWNSCALE * DOWNSCALE}")
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{name} is {h}x{w} px; sides must be at least {MIN_SIDE} px for a texture or face to mix")
    if h * w > max_pixels:
        raise InputError(f"{name} is {h}x{w} = {h * w:,} px, above the {max_pixels:,} px a mix may hold in memory; "
                         "downscale or crop it")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise InputError(f"{name} holds {bad} NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise InputError(f"{name} holds values from {lo:.4g} to {hi:.4g}, outside [0, 1]; divide 0-255 images by 255")
    return x.float()


def pixel_blend(sources: torch.Tensor, weights: torch.Tensor, height: int, width: int,
                anchors: list[int] | None = None) -> torch.Tensor:
    """The naive alpha blend: each source (K, 3, h, w) tiled over (height, width) (anchored at its
    placement column), blended with pixel weights (K, 1, height, width). -> (1, 3, height, width)."""
    K = sources.shape[0]
    anchors = anchors or [0] * K
    out = torch.zeros(1, 3, height, width)
    for k in range(K):
        out += weights[k:k + 1] * _tile_anchored(sources[k:k + 1], height, width, anchors[k])
    return out.clamp(0, 1)


def _tile_anchored(z: torch.Tensor, height: int, width: int, x0: int) -> torch.Tensor:
    """Tile z (1, C, h, w) over (height, width) so that a copy starts at column x0 (row 0)."""
    h, w = z.shape[-2:]
    rows = torch.arange(height) % h
    cols = (torch.arange(width) - x0) % w
    return z[:, :, rows][:, :, :, cols]


class TextureMixer:
    """Local + global latents, blended and harmonised, decoded by TAEF2 (see the module docstring).

    Learned state: harmoniser_ (H), global_encoder_ (E^g or None), provenance_ (dict).

    Parameters
    ----------
    config : MixerConfig
    autoencoder : TAEF2, optional
        Needed for the image-level methods (encode/decode); a fingerprinted instance decoder
        (``TAEF2.with_decoder_state``) is used as given.
    """

    def __init__(self, config: MixerConfig | None = None, *, autoencoder=None):
        self.config = config or MixerConfig()
        if not isinstance(self.config, MixerConfig):
            raise ConfigError(f"config must be a MixerConfig, got {type(self.config).__name__}")
        self.autoencoder = autoencoder
        self.harmoniser_: Harmoniser | None = None
        self.global_encoder_: GlobalEncoder | None = None
        self.provenance_: dict = {}
        self.train_config_: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def initial(cls, config: MixerConfig | None = None, *, seed: int = 0, autoencoder=None) -> "TextureMixer":
        """An untrained mixer (H = identity): the plain latent blend with a global encoder attached."""
        check_seed(seed)
        m = cls(config, autoencoder=autoencoder)
        m.harmoniser_, m.global_encoder_ = build_networks(m.config, seed)
        m.provenance_ = {"created": now_iso(), "seed": seed, "trained_steps": 0}
        return m

    def _check_ready(self, need_ae: bool = True):
        if self.harmoniser_ is None:
            raise NotFittedError("TextureMixer has no weights; train one (faceprint.mixing.train_mixer) or "
                                 "TextureMixer.load(path)")
        if need_ae and self.autoencoder is None:
            raise NotFittedError("TextureMixer has no autoencoder; pass autoencoder=TAEF2.load()")

    # ------------------------------------------------------------------ latent level
    def global_latent(self, zl: torch.Tensor) -> torch.Tensor | None:
        """z^g (N, g) of local latents (N, 32, h, w); None without a global encoder."""
        if self.global_encoder_ is None:
            return None
        with torch.no_grad():
            return self.global_encoder_(zl)

    def harmonise(self, Zl: torch.Tensor, Zg: torch.Tensor | None) -> torch.Tensor:
        """H(Z^l, Z^g) without gradients: (N, 32, h, w)."""
        self._check_ready(need_ae=False)
        with torch.no_grad():
            self.harmoniser_.eval()
            return self.harmoniser_(Zl, Zg)

    def mix_latents(self, zl: torch.Tensor, weights: torch.Tensor, *, size: tuple[int, int] | None = None,
                    anchors: list[int] | None = None, keep: torch.Tensor | None = None, shuffle: bool = True,
                    harmonise: bool = True, seed: int = 0) -> torch.Tensor:
        """Blend K local latents into one and harmonise it.

        Parameters
        ----------
        zl : torch.Tensor
            (K, 32, h, w) local latents of the sources.
        weights : torch.Tensor
            (K, 1, H, W) weights at latent resolution, summing to 1 over K (H, W = ``size`` or h, w).
        size : (H, W), optional
            Canvas size in latent pixels; the sources are tiled to it (default: their own size,
            no tiling).
        anchors : list of int, optional
            Latent column where each source's own copy sits on the canvas (tiling is aligned to it).
        keep : torch.Tensor, optional
            (K, 1, H, W) bool: where each source's tiled latent stays unshuffled (its placement).
        shuffle : bool
            Apply P (Eq. 3.1) to each tiled source (only with tiling).
        harmonise : bool
            Apply H (False: the plain latent blend).
        seed : int
            Seed of the shuffling draws.

        Returns
        -------
        (1, 32, H, W) latent.
        """
        K, _, h, w = zl.shape
        H, W = size or (h, w)
        if weights.shape != (K, 1, H, W):
            raise InputError(f"weights must have shape ({K}, 1, {H}, {W}), got {tuple(weights.shape)}")
        tiled = (H, W) != (h, w)
        anchors = anchors or [0] * K
        parts = []
        g = make_generator(seed, "mix-shuffle")
        for k in range(K):
            z = _tile_anchored(zl[k:k + 1], H, W, anchors[k]) if tiled else zl[k:k + 1]
            if tiled and shuffle:
                z = ops.shuffle(z, local_size=min(h, w), generator=g, keep=None if keep is None else keep[k:k + 1])
            parts.append(z)
        Zl = ops.blend(parts, [weights[k:k + 1] for k in range(K)])
        if not harmonise:
            return Zl
        Zg = None
        zg = self.global_latent(zl)
        if zg is not None:
            Zg = ops.blend([zg[k:k + 1, :, None, None].expand(1, -1, H, W) for k in range(K)],
                           [weights[k:k + 1] for k in range(K)])
        return self.harmonise(Zl, Zg)

    # ------------------------------------------------------------------ image level
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images, batch_size=_batch(self.autoencoder, images.shape[0], images.shape[-2:]))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        size = (z.shape[-2] * DOWNSCALE, z.shape[-1] * DOWNSCALE)
        return self.autoencoder.decode(z, batch_size=_batch(self.autoencoder, z.shape[0], size))

    def canvas(self, sources, width: int, *, shuffle: bool = True, harmonise: bool = True, seed: int = 0,
               height: int | None = None, postprocess: bool = True) -> torch.Tensor:
        """Interpolate two or more textures along a horizontal canvas (Sec. 3.4.2's task).

        Parameters
        ----------
        sources : torch.Tensor
            (K, 3, h, w) textures in [0, 1], K >= 2, all the same size on the 8-px grid.
        width : int
            Canvas width in pixels (a multiple of 8, at least K * w). Source 0 sits at the left
            end, source K-1 at the right end, the others at equal spacing.
        height : int, optional
            Canvas height (default h).
        postprocess : bool
            Put the sources back at their placements, cut along the least visible seam and
            Poisson-blend it (the chapter's boundary post-processing,
            :func:`faceprint.mixing.postprocess.paste_sources`). False keeps the decoded canvas.

        Returns
        -------
        (1, 3, height, width) image.
        """
        self._check_ready(need_ae=True)
        x = check_images(sources, "sources")
        K, _, h, w = x.shape
        if K < 2:
            raise InputError(f"a canvas needs at least two sources, got {K}; one source alone is synthesis, not mixing")
        height = h if height is None else height
        _check_canvas(height, width)
        zl = self._encode(x)
        lw, lh, LW, LH = w // DOWNSCALE, h // DOWNSCALE, width // DOWNSCALE, height // DOWNSCALE
        wts = ops.canvas_weights(K, LW, lw)  # (K, LW)
        weights = wts.view(K, 1, 1, LW).expand(K, 1, LH, LW).contiguous()
        anchors = ops.placements(K, LW, lw)
        keep = torch.zeros(K, 1, LH, LW, dtype=torch.bool)
        for k, a in enumerate(anchors):
            keep[k, :, :lh, a:a + lw] = True
        z = self.mix_latents(zl, weights, size=(LH, LW), anchors=anchors, keep=keep, shuffle=shuffle,
                             harmonise=harmonise, seed=seed)
        out = self._decode(z)
        if postprocess:
            from .postprocess import paste_sources

            out, _ = paste_sources(out, x, [a * DOWNSCALE for a in anchors])
        return out

    def mix(self, a, b, alpha, *, harmonise: bool = True) -> torch.Tensor:
        """Blend two same-size images with a weight map of B: (1, 3, H, W).

        ``alpha``: a number in [0, 1] (dissolve) or an (H, W) / (1, 1, H, W) map in [0, 1] at
        image resolution (averaged over each 8 x 8 cell onto the latent grid); 1 = all B."""
        self._check_ready(need_ae=True)
        xa, xb = check_images(a, "a"), check_images(b, "b")
        if xa.shape != xb.shape or xa.shape[0] != 1:
            raise InputError(f"a and b must be single images of the same size, got {tuple(xa.shape)} and "
                             f"{tuple(xb.shape)}; crop or resize them to one size first")
        H, W = xa.shape[-2:]
        al = ops.check_alpha(alpha, "alpha", (H, W))
        la = al if al.ndim == 0 else ops.alpha_to_latent(al)
        zl = self._encode(torch.cat([xa, xb]))
        LH, LW = H // DOWNSCALE, W // DOWNSCALE
        wb = (la * torch.ones(1, 1, LH, LW)) if la.ndim == 0 else la
        weights = torch.cat([1 - wb, wb])
        z = self.mix_latents(zl, weights, harmonise=harmonise)
        return self._decode(z)

    def dissolve(self, a, b, alpha: float = 0.5, **kw) -> torch.Tensor:
        """Uniform cross-dissolve: alpha = 0 gives A's round trip, 1 gives B's."""
        return self.mix(a, b, float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else alpha, **kw)

    def brush(self, a, b, mask, *, strength: float = 1.0, **kw) -> torch.Tensor:
        """Paint B onto A where ``mask`` (H, W) in [0, 1] is high (weights strength * mask)."""
        s = ops.check_alpha(strength, "strength")
        H, W = check_images(a, "a").shape[-2:]
        m = ops.check_alpha(mask, "mask", (H, W))
        return self.mix(a, b, m * s, **kw)

    def hybrid(self, a, b, *, band: int = 32, centre: int | None = None, postprocess: bool = False,
               overlap: int = 16, **kw) -> torch.Tensor:
        """Left of A, right of B, with a linear transition band of ``band`` px (a multiple of 8).

        ``postprocess``: the chapter's hybridisation finish: A's own pixels left of the band and B's
        right of it, cut along the least visible seam inside an ``overlap``-px strip of each and
        Poisson-blended across the band (:func:`faceprint.mixing.postprocess.paste_sources`); off,
        the whole image is the decoded mix (every pixel through the decoder, e.g. a fingerprinted
        instance's)."""
        H, W = check_images(a, "a").shape[-2:]
        if not _is_int(band, 0) or band % DOWNSCALE or band > W:
            raise InputError(f"band must be a multiple of {DOWNSCALE} px between 0 and the width {W}, got {band!r}")
        c = W // 2 if centre is None else centre
        if not _is_int(c, 0) or c % DOWNSCALE or c > W:
            raise InputError(f"centre must be a column on the {DOWNSCALE}-px grid inside the image, got {centre!r}")
        alpha = 1 - ops.band_alpha(H // DOWNSCALE, W // DOWNSCALE, band // DOWNSCALE, c / DOWNSCALE)
        # alpha is B's weight per latent pixel; expand to the pixel grid for mix()
        out = self.mix(a, b, alpha.repeat_interleave(DOWNSCALE, 2).repeat_interleave(DOWNSCALE, 3), **kw)
        lo, hi = int(round(c - band / 2)), int(round(c + band / 2))
        if postprocess and lo > 0 and hi < W:
            from .postprocess import paste_sources

            xa, xb = check_images(a, "a")[0], check_images(b, "b")[0]
            out, _ = paste_sources(out, [xa[..., :lo], xb[..., hi:]], [0, hi], overlap=overlap, blend=max(band, 8))
        return out

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_ready(need_ae=False)
        t = {"harmoniser." + k: v for k, v in self.harmoniser_.state_dict().items()}
        if self.global_encoder_ is not None:
            t.update({"global_encoder." + k: v for k, v in self.global_encoder_.state_dict().items()})
        return t

    def save(self, path) -> None:
        """One .safetensors artifact (H and E^g weights; configs, provenance), written atomically."""
        meta = {"class": ARTIFACT_CLASS, "config": self.config.to_dict(), "train_config": self.train_config_,
                "provenance": self.provenance_,
                "autoencoder": {"id": getattr(self.autoencoder, "base_id", None) or self.provenance_.get("autoencoder")}}
        save_artifact(path, self.state_tensors(), meta)

    @classmethod
    def load(cls, path, *, autoencoder="auto", weights=None) -> "TextureMixer":
        """Load a mixer written by :meth:`save`; autoencoder="auto" loads TAEF2, None skips it."""
        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        try:
            config = MixerConfig(**meta["config"])
            m = cls(config)
            h, e = build_networks(config, 0)
            h.load_state_dict({k[len("harmoniser."):]: v for k, v in tensors.items() if k.startswith("harmoniser.")},
                              strict=True)
            if e is not None:
                e.load_state_dict({k[len("global_encoder."):]: v for k, v in tensors.items()
                                   if k.startswith("global_encoder.")}, strict=True)
            m.harmoniser_, m.global_encoder_ = h.eval(), (e.eval() if e is not None else None)
            m.provenance_ = meta.get("provenance", {})
            m.train_config_ = meta.get("train_config", {})
        except (KeyError, TypeError, ConfigError, RuntimeError) as err:
            raise ArtifactError(f"mixer file {str(path)!r} is incomplete or inconsistent ({err.__class__.__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); re-create it with "
                                "`python -m faceprint.bench mix --train-only`") from None
        if autoencoder == "auto":
            from ..autoencoder import TAEF2

            autoencoder = TAEF2.load(weights)
        m.autoencoder = autoencoder
        return m

    def weights_digest(self) -> str:
        """sha256 (16 hex digits) of the learned tensors: names the mixer in provenance records."""
        import hashlib

        hsh = hashlib.sha256()
        for k, v in sorted(self.state_tensors().items()):
            hsh.update(k.encode())
            hsh.update(v.detach().float().contiguous().numpy().tobytes())
        return hsh.hexdigest()[:16]


def _batch(ae, n: int, size) -> int | None:
    """Images per forward pass: all n when they fit in the autoencoder's chunk (no zero padding of
    a few images up to a whole chunk), else its default chunk (padded, batch-independent)."""
    cfg = getattr(ae, "config", None)
    if cfg is None or not hasattr(cfg, "chunk_size"):
        return None
    chunk = cfg.chunk_size(int(size[0]), int(size[1]))
    return max(1, n) if n <= chunk else None


def _check_canvas(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v, MIN_SIDE) or v % DOWNSCALE:
            raise InputError(f"canvas {name} must be a multiple of {DOWNSCALE} px and at least {MIN_SIDE}, got {v!r}")
    if height * width > MAX_PIXELS:
        raise InputError(f"canvas {height}x{width} = {height * width:,} px is above the {MAX_PIXELS:,} px a mix may "
                         "hold in memory; make it smaller")


__all__ = ["ARTIFACT_CLASS", "MAX_PIXELS", "MixerConfig", "TextureMixer", "build_networks", "check_images",
           "pixel_blend"]

