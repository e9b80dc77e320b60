"""Keyed per-instance fingerprints that hold against the recipient (issue 20; papers/004, Ch. 6's
setting: one model, many recipients, the recipient is the adversary).

Threat model
------------
The recipient of an instance holds: the instance file (its latent bank, mixture, projector,
guard statistics), faceprint's code (this module included), the public TAEF2, and any number of
faces made with it; colluding recipients hold up to c instance files together. They do *not*
hold the owner's folder (the master secret, the registry, the unfingerprinted base model) and
not the training photos (with those they could fit their own model and would not need ours; a
data-level mark cannot survive an attacker who has the unmarked data).

What they may try, and what this mechanism answers (numbers in docs/results/redteam.md):

- *Key recovery* from one instance. Each instance has its own secret, derived from the owner's
  256-bit master secret by HMAC-SHA256 over the instance's registry code; the secret expands
  (SHAKE-256) into an i.i.d. Gaussian pattern g_k(i, j, p) for every bank row i, carrier
  direction j and latent pixel p. The mark is sigma * V g_k added to every bank pixel, where
  the m carrier directions V (32 x m, public) are the directions of a latent pixel that best
  survive a TAEF2 decode -> JPEG -> encode round trip. There is no lattice, no shared
  structure between rows or pixels, and nothing in the bank's statistics that singles the
  pattern out from the photos' own variation in those directions. The earlier mechanism's
  failure (one owner key with one lattice per pixel, visible as the concentration of a bank's
  projections) has no counterpart here.
- *Removal* without the key: noise or smoothing in the carrier directions, or projecting the
  bank on any subspace, must remove the mark's energy from 16 of the 32 most important
  directions of every latent pixel, which costs the faces (see the table). Refitting a model on
  the instance's faces copies marked pixels again. The instance's mixture is re-estimated on the
  marked bank at issue (:func:`fingerprint_keyed_instance`): the plain model's mixture spans the
  *clean* bank's member subspace exactly (rank = members - 1), and projecting a marked bank on
  it would strip any data-level mark for free.
- *Framing* a recipient who is not among the colluders: their pattern is independent of every
  file the colluders hold (a PRF of a secret they lack), so for any image they make, that
  recipient's score is exactly standard normal given the image (below).
- *Collusion*: averaging c banks or faces keeps each colluder's mark at 1/c of its energy;
  with Gaussian patterns no combination of c copies does better in the linear regime (the mean
  is the best estimate of the common clean bank), while a +-1 pattern would let c colluders see
  where their marks differ and strip all but 2^(1-c) of it.

Verification (owner side, non-blind)
------------------------------------
An image is encoded with TAEF2; each latent pixel is matched to the nearest row of the
*unfingerprinted* base bank at that position (what the refinement copied); the clean collage
of those rows is decoded, given the edit (none, a blur, a half-size resize) that brings it
closest to the image, and re-encoded, which cancels the round trip's deterministic error and
an edit the image went through; the residual, projected on the carrier directions' round-trip images and clipped per pixel
(so a wrong match cannot dominate), is the vector v. For an instance k the score is

    T_k = <v, g_k(rows)> / ||v||

and none of v's steps looks at any instance's pattern. So if the image does not come from
instance k, g_k is independent of v and T_k ~ N(0, 1) exactly, whatever the image: the
false-accusation probability of a recipient is Phi(-t) at threshold t, and Sidak's
1 - (1 - Phi(-t))^M over a registry of M (the K scores are independent given v). The
calibration on negatives measures this (it is not assumed). The default target is 1e-5 per
image (:data:`DEFAULT_TARGET_FPR`: T >= 4.26 for one recipient, 4.85 for 16).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import math
import secrets
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import ArtifactError, ConfigError, InputError, NotFittedError
from ..io import load_artifact, now_iso, save_artifact

__all__ = ["KeyedConfig", "OwnerSecret", "KEYED_MECHANISM", "fingerprint_keyed_instance", "project_on_mixture", "Residuals",
           "instance_key", "pattern_rows", "normal_tail", "sidak"]

KEYED_MECHANISM = "keyed-bank"
ARTIFACT_CLASS = "faceprint.fingerprint.OwnerSecret"
_DOMAIN = b"faceprint keyed-bank v1|"
#: default per-image probability that some innocent recipient is accused (any registry size)
DEFAULT_TARGET_FPR = 1e-5


@dataclass(frozen=True)
class KeyedConfig:
    """Parameters of the keyed bank mark.

    directions : carrier directions per latent pixel (of 32 TAEF2 channels).
    sigma : the mark's standard deviation along each carrier direction, in latent units
        (the bank's channels have std 0.6-1.1); 0.2 gives about 33 dB PSNR on generated faces
        (0.15, the first default: 36 dB, but the mark of 4 colluders mixing their banks row by
        row then fell below the 1e-5 threshold; ``python -m faceprint.bench redteam``).
    clip : per-pixel clipping of the projected residual, in multiples of its median norm.
    probe : bank rows used to measure the carrier directions (decode -> JPEG 50 -> encode).
    """

    directions: int = 16
    sigma: float = 0.2
    clip: float = 3.0
    probe: int = 24

    def __post_init__(self):
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or not 1 <= self.directions <= 64:
            raise ConfigError(f"directions must be an int in [1, 64], got {self.directions!r}; try 16")
        for name in ("sigma", "clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if isinstance(self.probe, bool) or not isinstance(self.probe, int) or self.probe < 2:
            raise ConfigError(f"probe must be an int >= 2, got {self.probe!r}")


def instance_key(master: bytes, code_hex: str) -> bytes:
    """The instance's own 256-bit secret: HMAC-SHA256(master, domain | code)."""
    return hmac.new(master, _DOMAIN + code_hex.encode("ascii"), hashlib.sha256).digest()


def pattern_rows(key: bytes, rows: torch.Tensor, m: int, h: int, w: int) -> torch.Tensor:
    """The instance's Gaussian pattern for bank ``rows`` (R,): (R, m, h, w) float32, i.i.d.
    N(0, 1), each row expanded from SHAKE-256(key | row) by Box-Muller (so any row can be made
    without the others)."""
    n = m * h * w
    if n % 2:
        raise ConfigError(f"m * h * w must be even, got {n}")
    rows = [int(r) for r in rows.reshape(-1).tolist()]
    if not rows:
        return torch.zeros(0, m, h, w)
    buf = bytearray()
    for r in rows:
        buf += hashlib.shake_256(key + r.to_bytes(8, "little")).digest(4 * n)
    u = torch.frombuffer(buf, dtype=torch.int32).view(len(rows), 2, n // 2)
    # uniforms in (0, 1): 31 random bits each, offset by half a step so log() never sees 0
    u = ((u.long() & 0x7FFFFFFF).double() + 0.5) / 2.0 ** 31
    r_ = torch.sqrt(-2 * torch.log(u[:, 0]))
    th = 2 * math.pi * u[:, 1]
    z = torch.cat([r_ * torch.cos(th), r_ * torch.sin(th)], 1)  # (R, n)
    return z.float().view(len(rows), m, h, w)


def normal_tail(t: float) -> float:
    """P(N(0, 1) >= t)."""
    return 0.5 * math.erfc(t / math.sqrt(2))


def sidak(p: float, k: int) -> float:
    """P(the best of k independent tests has p-value <= p) = 1 - (1 - p)^k."""
    return -math.expm1(k * math.log1p(-min(p, 1 - 1e-300))) if p < 1 else 1.0


def threshold_for(target_fpr: float, registry_size: int) -> float:
    """Smallest score t whose Sidak-corrected normal tail over ``registry_size`` recipients is
    <= target_fpr."""
    per = -math.expm1(math.log1p(-target_fpr) / max(registry_size, 1))
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if normal_tail(mid) > per:
            lo = mid
        else:
            hi = mid
    return hi


def _q8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def _jpeg(x: torch.Tensor, quality: int = 50) -> torch.Tensor:
    from .attacks import ATTACKS

    return ATTACKS["jpeg"].apply(x, quality)


class OwnerSecret:
    """The owner's master secret with the public carrier geometry measured on TAEF2.

    State: ``master`` (32 bytes, never leaves the owner's folder), ``directions_`` V (C, m),
    ``template_`` (C, m) the directions' image after a clean round trip (what the detector
    correlates with), ``gains_`` (m,) their JPEG-50 gains, ``shape_`` (C, h, w)."""

    def __init__(self, config: KeyedConfig | None = None, master: bytes | None = None):
        self.config = config or KeyedConfig()
        if master is not None and (not isinstance(master, bytes) or len(master) != 32):
            raise ConfigError("master must be 32 bytes")
        self.master = master
        self.directions_: torch.Tensor | None = None
        self.template_: torch.Tensor | None = None
        self.gains_: torch.Tensor | None = None
        self.shape_: tuple[int, int, int] | None = None
        self.provenance_: dict = {}

    # ------------------------------------------------------------------ carriers
    @torch.no_grad()
    def fit(self, bank: torch.Tensor, autoencoder, *, seed: int = 0, master: bytes | None = None) -> "OwnerSecret":
        """Measure the carrier directions on ``config.probe`` rows of ``bank`` (N, C, h, w):
        the per-pixel linear response of decode -> 8 bit -> JPEG 50 -> encode to small random
        perturbations, averaged over pixels and rows; V = its top right singular vectors.
        A new random master secret is drawn unless ``master`` is given."""
        from ..seeding import generator as make_generator

        if not isinstance(bank, torch.Tensor) or bank.dim() != 4 or bank.shape[0] < 2:
            raise InputError(f"bank must be a (N, C, h, w) tensor with N >= 2, got {tuple(getattr(bank, 'shape', ()))}")
        cfg = self.config
        c, h, w = bank.shape[1:]
        if cfg.directions > c:
            raise ConfigError(f"directions {cfg.directions} exceed the {c} latent channels")
        ae = getattr(autoencoder, "base", autoencoder)
        g = make_generator(seed, "keyed-carriers")
        rows = torch.randperm(bank.shape[0], generator=g)[: cfg.probe]
        z0 = bank[rows].float()
        eps = 0.1

        def response(f):
            base = ae.encode(f(_q8(ae.decode(z0))))
            acc = torch.zeros(c, c, dtype=torch.float64)
            for _ in range(2):
                d = torch.randn(z0.shape, generator=g) * eps
                out = ae.encode(f(_q8(ae.decode(z0 + d)))) - base
                acc += torch.einsum("nchw,ndhw->cd", out.double(), d.double()) / (d.numel() / c) / eps ** 2
            return acc / 2

        m_clean = response(lambda x: x)
        m_jpeg = response(_jpeg)
        _, s, vh = torch.linalg.svd(m_jpeg)
        V = vh[: cfg.directions].T.contiguous()  # (C, m), orthonormal columns
        self.directions_ = V.float()
        self.template_ = (m_clean @ V).float().contiguous()
        self.gains_ = s[: cfg.directions].float()
        self.shape_ = (int(c), int(h), int(w))
        self.master = master if master is not None else (self.master or secrets.token_bytes(32))
        self.provenance_ = {"created": now_iso(), "probe_rows": int(len(rows)), "autoencoder": getattr(ae, "id", None),
                            "jpeg_gains": [round(float(v), 4) for v in s]}
        return self

    def _check(self):
        if self.directions_ is None or self.master is None:
            raise NotFittedError("OwnerSecret is not fitted; call fit(bank, autoencoder) or OwnerSecret.load(path)")

    def key_of(self, code_hex: str) -> bytes:
        self._check()
        return instance_key(self.master, code_hex)

    def mark(self, code_hex: str, rows: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
        """The latent mark sigma V g_k of bank rows (default 0..n-1): (R, C, h, w)."""
        self._check()
        c, h, w = self.shape_
        if rows is None:
            rows = torch.arange(n)
        g = pattern_rows(self.key_of(code_hex), rows, self.config.directions, h, w)
        return self.config.sigma * torch.einsum("cm,rmhw->rchw", self.directions_, g)

    def embed(self, bank: torch.Tensor, code_hex: str, *, chunk: int = 512) -> torch.Tensor:
        """bank (N, C, h, w) + the instance's mark, in float32."""
        self._check()
        if bank.dim() != 4 or tuple(bank.shape[1:]) != self.shape_:
            raise InputError(f"bank must have shape (N, {', '.join(map(str, self.shape_))}), got {tuple(bank.shape)}")
        out = bank.float().clone()
        for s in range(0, out.shape[0], chunk):
            rows = torch.arange(s, min(s + chunk, out.shape[0]))
            out[rows] += self.mark(code_hex, rows)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        self._check()
        tensors = {"master": torch.frombuffer(bytearray(self.master), dtype=torch.uint8).clone(),
                   "directions": self.directions_, "template": self.template_, "gains": self.gains_}
        save_artifact(path, tensors, {"class": ARTIFACT_CLASS, "config": asdict(self.config), "shape": list(self.shape_),
                                      "provenance": self.provenance_}, mode=0o600)

    @classmethod
    def load(cls, path) -> "OwnerSecret":
        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        try:
            s = cls(KeyedConfig(**meta["config"]))
            master = tensors["master"]
            if master.dtype != torch.uint8 or master.numel() != 32:
                raise KeyError("master must be 32 bytes")
            s.master = bytes(master.tolist())
            s.directions_, s.template_, s.gains_ = tensors["directions"].float(), tensors["template"].float(), tensors["gains"].float()
            s.shape_ = tuple(int(v) for v in meta["shape"])
            if s.directions_.shape != (s.shape_[0], s.config.directions) or s.template_.shape != s.directions_.shape:
                raise KeyError("directions/template shapes disagree with the config")
            s.provenance_ = meta.get("provenance", {})
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ArtifactError(f"{str(path)!r} is not a consistent owner secret ({e}); restore it from a backup") from None
        return s


def refit_mixture(gen, bank: torch.Tensor) -> None:
    """Re-estimate ``gen``'s mixture (means, member subspaces, noise) on ``bank`` with its
    labels unchanged, so the released file's subspaces span the *marked* bank."""
    mix = copy.deepcopy(gen.mixture_)
    N = bank.shape[0]
    Y = gen.projector_.transform(bank.float()).reshape(N, -1).double()
    K = mix.weights_.numel()
    resp = F.one_hot(mix.labels_.long(), K).double()
    old_dtype = mix.means_.dtype
    mix._m_step(Y, resp)
    mix.astype(old_dtype)
    gen.mixture_ = mix


def project_on_mixture(gen, bank: torch.Tensor) -> torch.Tensor:
    """``bank`` (N, C, h, w) with each row projected on its component's released member subspace
    (mean + span of the stored eigenvectors): a recipient's removal attack on any bank mark. On
    an instance whose mixture was fitted on the clean bank this returns (almost) the clean bank."""
    mix, pj = gen.mixture_, gen.projector_
    Y = pj.transform(bank.float())
    shp = Y.shape
    Y = Y.reshape(shp[0], -1).double()
    out = Y.clone()
    for k in range(mix.weights_.numel()):
        mem = torch.nonzero(mix.labels_ == k).squeeze(1)
        U, mu = mix.eigvecs_[k].double(), mix.means_[k].double()
        out[mem] = mu + ((Y[mem] - mu) @ U) @ U.T
    return pj.inverse(out.float().reshape(shp))


def fingerprint_keyed_instance(gen, secret: OwnerSecret, code_hex: str, info: dict | None = None):
    """A copy of a fitted Generator whose bank carries the instance's keyed mark, with its
    mixture re-estimated on the marked bank (see the module docstring). ``gen`` is not modified."""
    if getattr(gen, "bank_", None) is None:
        raise NotFittedError("gen is not a fitted Generator; fit it or load it first")
    secret._check()
    if tuple(gen.bank_.shape[1:]) != secret.shape_:
        raise ConfigError(f"the owner secret is for latents of shape {secret.shape_}, this model's are "
                          f"{tuple(gen.bank_.shape[1:])}: use another --owner folder")
    g = copy.copy(gen)
    marked = secret.embed(gen.bank_, code_hex)
    g.bank_ = marked.to(gen.bank_.dtype).contiguous()
    refit_mixture(g, g.bank_.float())
    g._cache = {}
    g.provenance_ = dict(gen.provenance_)
    public = {k: v for k, v in asdict(secret.config).items()}
    g.fingerprint_ = {"mechanism": KEYED_MECHANISM, "config": public, **(info or {})}
    return g


class CodePatterns:
    """Every code's pattern for bank rows 0..n_rows-1, expanded once: (K, h*w, n_rows, m) float32,
    i.e. K * n_rows * m * h * w * 4 bytes (1.7 GB for 100 codes of a 1,024-photo bank with 16
    directions). Scoring then costs a gather and a product per image instead of K SHAKE-256
    expansions of every matched row per call (about 1.3 s per code for 1,024 rows)."""

    def __init__(self, secret: OwnerSecret, codes: list[str], n_rows: int):
        secret._check()
        _, h, w = secret.shape_
        m = secret.config.directions
        if not isinstance(n_rows, int) or n_rows < 1:
            raise InputError(f"n_rows must be a positive int (the bank's photos), got {n_rows!r}")
        self.codes = list(codes)
        self.n_rows, self.m, self.h, self.w = n_rows, m, h, w
        self.P = torch.empty(len(self.codes), h * w, n_rows, m)
        for k, code in enumerate(self.codes):
            for s in range(0, n_rows, 512):
                rows = torch.arange(s, min(s + 512, n_rows))
                g = pattern_rows(secret.key_of(code), rows, m, h, w)  # (R, m, h, w)
                self.P[k, :, s:s + len(rows)] = g.permute(2, 3, 0, 1).reshape(h * w, len(rows), m)

    @property
    def nbytes(self) -> int:
        return self.P.numel() * self.P.element_size()

    def scores(self, v: torch.Tensor, rows: torch.Tensor, codes: list[str], *, chunk: int = 16) -> torch.Tensor:
        """(n, K) unnormalised products <v_i, g_k(rows_i)> for residuals v (n, m, h, w)."""
        if list(codes) != self.codes:
            raise InputError("these patterns were made for other codes; build CodePatterns for the codes you score")
        n, m, h, w = v.shape
        if (m, h, w) != (self.m, self.h, self.w):
            raise InputError(f"residuals of shape {(m, h, w)} do not match the patterns' {(self.m, self.h, self.w)}")
        if n and int(rows.max()) >= self.n_rows:
            raise InputError(f"matched row {int(rows.max())} is outside the {self.n_rows} rows the patterns cover")
        pix = torch.arange(h * w)[None, :]
        out = torch.zeros(n, len(self.codes))
        for s in range(0, n, chunk):
            R = rows[s:s + chunk].reshape(-1, h * w)  # (b, hw)
            g = self.P[:, pix, R, :]  # (K, b, hw, m)
            vb = v[s:s + chunk].reshape(-1, m, h * w)  # (b, m, hw)
            out[s:s + chunk] = torch.einsum("kbpm,bmp->bk", g, vb)
        return out


@dataclass
class Residuals:
    """The key-independent part of verification: v (n, m, h, w) and the matched rows (n, h, w)."""

    v: torch.Tensor
    rows: torch.Tensor
    match_distance: torch.Tensor  # (n,) mean distance of each latent pixel to its matched row
    edit: list[str] | None = None  # per image, the edit hypothesis the reference was rendered with
    crop: list[float] | None = None  # per image, the centre-crop fraction it was read as (1.0: uncropped)
    prefilter: list[str] | None = None  # per image, the filter it was read through ("none": as it is)

    def scores(self, secret: OwnerSecret, codes: list[str], *, chunk_rows: int = 4096,
               patterns: "CodePatterns | None" = None) -> torch.Tensor:
        """(n, K) scores T of every image against every code (exactly N(0, 1) for codes that did not make it).

        ``patterns`` (made once by :class:`CodePatterns` for these codes) turns the per-call
        pattern expansion, which dominates when many images meet many codes, into a gather."""
        n, m, h, w = self.v.shape
        norm = self.v.pow(2).sum((1, 2, 3)).sqrt().clamp_min(1e-12)
        if patterns is not None:
            return patterns.scores(self.v, self.rows, codes) / norm[:, None]
        uniq, inv = torch.unique(self.rows, return_inverse=True)  # rows used by any image
        ys = torch.arange(h).view(1, h, 1)
        xs = torch.arange(w).view(1, 1, w)
        out = torch.zeros(n, len(codes))
        for k, code in enumerate(codes):
            key = secret.key_of(code)
            pats = pattern_rows(key, uniq, m, h, w)  # (U, m, h, w)
            g = pats[inv, :, ys, xs].permute(0, 3, 1, 2)  # (n, m, h, w)
            out[:, k] = (self.v * g).sum((1, 2, 3)) / norm
        return out


#: edits an image may have gone through after generation, tried on the reference (see BaseIndex).
#: JPEG is not among them: a JPEG-edited reference did not raise the score of JPEG-edited faces
#: (JPEG 70/50/30: 12.9/9.1/4.2 plain, 12.2/8.9/4.0 with the right quality; blur k5 16.2 -> 20.2,
#: half-size 13.0 -> 17.2; 24 faces of a 256-photo model)
DEFAULT_EDITS = ("none", "blur5", "half")

#: centre-crop fractions tried on every image (see BaseIndex); 1.0, the full frame, first
DEFAULT_CROPS = (1.0, 0.93, 0.86, 0.8)

#: filters an image may be read through, tried on every image (see BaseIndex); "none" first
DEFAULT_PREFILTERS = ("none", "blur3", "blur5")

#: per-pixel weighting of the residual (see BaseIndex)
WEIGHTINGS = ("pixel", "none")
DEFAULT_WEIGHTING = "pixel"
DEFAULT_WEIGHT_FLOOR = 0.1


def apply_edit(images: torch.Tensor, edit: str) -> torch.Tensor:
    """One named edit of images (n, 3, H, W) in [0, 1]: "none", "jpegQ" (JPEG at quality Q),
    "blurK" (Gaussian blur, kernel K), "half" (down to half size and back up)."""
    from .attacks import gaussian_blur, jpeg, resize_down_up

    if edit == "none":
        return images
    if edit.startswith("jpeg") and edit[4:].isdigit() and 1 <= int(edit[4:]) <= 100:
        return jpeg(images, int(edit[4:]))
    if edit.startswith("blur") and edit[4:].isdigit() and int(edit[4:]) % 2 == 1:
        return gaussian_blur(images, int(edit[4:]))
    if edit == "half":
        return resize_down_up(images, 0.5)
    raise ConfigError(f"unknown edit {edit!r}; use none, jpegQ (1-100), blurK (odd K) or half")


class BaseIndex:
    """The unfingerprinted base bank, prepared for matching encoded images to its rows.

    The reference of an image is its matched base rows decoded, saved as 8 bits and encoded
    again. A shared image has often been re-saved as JPEG, blurred or resized, and the reference
    should have gone through the same: each of ``edits`` is applied to the decoded reference and
    the one closest to the image (mean squared pixel difference) is encoded, per image. The
    choice looks at the image and the base model only, never at a pattern, so the score of an
    innocent recipient stays exactly standard normal. Cost: the edits themselves (JPEG with
    libjpeg, a blur, a resize); still one encode per image.

    Crops. A face cut to a centre crop and resized back no longer sits on the latent grid the
    pattern was written on. For each fraction f of ``crops`` the image is shrunk back to the
    crop's size and put at its place (the uncovered border masked out), encoded and matched to
    the base bank; the hypothesis whose latent pixels lie closest to their matched rows, over
    the central cells every hypothesis covers, is read, with the residual zeroed outside the
    covered cells. The choice again sees only the image and the base bank, so the null stays
    N(0, 1). Cost: one more encode per extra hypothesis. ``crops=(1.0,)`` reads the full frame
    only.

    Weighting. The residual of a latent pixel is the mark plus whatever the image went through
    (JPEG, noise, a poor match), and that noise varies a lot from pixel to pixel. With
    ``weighting="pixel"`` each pixel's residual is divided by its own energy (mean square over
    the carrier directions, floored at ``weight_floor`` x the image's median energy so that a
    few nearly empty pixels cannot take over): an inverse-variance weight. It is computed from
    the residual alone, never from a pattern, so an innocent code's score stays exactly N(0, 1).
    ``weighting="none"`` reads the clipped residual as it is.

    Pre-filters. Noise and JPEG blocks reach the latents as noise that drowns the mark; a
    light blur removes more of that than of the mark (the mark survives blur k5 with its
    score at 70%). Each of ``prefilters`` is applied to the image, the result encoded and
    matched, and the one whose latent pixels lie closest to their matched base rows is read,
    with the same filter applied to the reference. Clean, blurred and resized faces keep
    "none"; noisy and recompressed ones take a blur. The choice sees only the image and the
    base bank, so the null stays N(0, 1). Cost: one encode per extra filter.
    ``prefilters=("none",)`` reads images as they are.

    ``autoencoder`` is the base model's (``base.autoencoder``), with the decoder the base decodes
    with: a rewritten base (:mod:`faceprint.rewrite`) renders references through its rewritten
    decoder, as its instances' faces were."""

    def __init__(self, bank: torch.Tensor, autoencoder, secret: OwnerSecret, *, edits: tuple[str, ...] = DEFAULT_EDITS,
                 crops: tuple[float, ...] = DEFAULT_CROPS, weighting: str = DEFAULT_WEIGHTING,
                 weight_floor: float = DEFAULT_WEIGHT_FLOOR, prefilters: tuple[str, ...] = DEFAULT_PREFILTERS):
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if isinstance(weight_floor, bool) or not isinstance(weight_floor, (int, float)) or not 0 < weight_floor <= 1:
            raise ConfigError(f"weight_floor must be a number in (0, 1], got {weight_floor!r}; e.g. {DEFAULT_WEIGHT_FLOOR}")
        self.weighting, self.weight_floor = weighting, float(weight_floor)
        if not edits or "none" not in edits:
            raise ConfigError(f"edits must include 'none', got {edits!r}")
        crops = tuple(float(f) for f in crops)
        if not crops or crops[0] != 1.0 or any(not 0.5 <= f <= 1.0 for f in crops) or len(set(crops)) != len(crops):
            raise ConfigError(f"crops must start with 1.0 (the full frame) and hold distinct fractions in [0.5, 1], "
                              f"got {crops!r}; e.g. {DEFAULT_CROPS}")
        self.crops = crops
        prefilters = tuple(prefilters)
        if not prefilters or prefilters[0] != "none" or len(set(prefilters)) != len(prefilters):
            raise ConfigError(f"prefilters must start with 'none' and be distinct, got {prefilters!r}; "
                              f"e.g. {DEFAULT_PREFILTERS}")
        probe = torch.full((1, 3, 16, 16), 0.5)
        for e in (*edits, *prefilters):
            apply_edit(probe, e)  # unknown names fail here, not mid-verification
        self.edits = tuple(edits)
        self.prefilters = prefilters
        self.bank = bank.float()
        # the base model's own autoencoder: a base whose decoder was rewritten (faceprint rewrite)
        # renders its references with that decoder, or the edited region would read as noise
        self.ae = autoencoder
        self.secret = secret
        N, C, h, w = self.bank.shape
        self._pix = self.bank.permute(2, 3, 0, 1).reshape(h * w, N, C).contiguous()  # (hw, N, C)

    def match(self, z: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest base row per latent pixel: rows (n, h, w), distances (n, h, w)."""
        n, C, h, w = z.shape
        rows, dist = [], []
        for s in range(0, n, chunk):
            q = z[s:s + chunk].permute(2, 3, 0, 1).reshape(h * w, -1, C)
            d = torch.cdist(q, self._pix)  # (hw, b, N)
            v, i = d.min(-1)
            rows.append(i.T.reshape(-1, h, w))
            dist.append(v.T.reshape(-1, h, w))
        return torch.cat(rows), torch.cat(dist)

    @torch.no_grad()
    def residuals(self, images: torch.Tensor, batch: int = 64) -> Residuals:
        """Images (n, 3, H, W) in [0, 1] (resized to the model's size) -> Residuals."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (N, 3, H, W) in [0, 1], got {tuple(getattr(images, 'shape', ()))}")
        C, h, w = self.secret.shape_
        size = (h * 8, w * 8)
        parts = []
        for s in range(0, images.shape[0], batch):
            x = images[s:s + batch].float().clamp(0, 1)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
            parts.append(self._filtered(x))
        return Residuals(torch.cat([p.v for p in parts]), torch.cat([p.rows for p in parts]),
                         torch.cat([p.match_distance for p in parts]), [e for p in parts for e in (p.edit or [])],
                         [c for p in parts for c in (p.crop or [1.0] * len(p.v))],
                         [f for p in parts for f in (p.prefilter or ["none"] * len(p.v))])

    def _filtered(self, x: torch.Tensor) -> Residuals:
        """Residuals of images x at the model's size, each read through the pre-filter whose
        latents lie closest to the base bank (see the class docstring), then crop-searched."""
        n = x.shape[0]
        hyps = []
        for pf in self.prefilters:
            y = x if pf == "none" else _q8(apply_edit(x, pf))
            z = self.ae.encode(y)
            rows, dist = self.match(z)
            hyps.append((pf, y, z, rows, dist))
        pick = torch.stack([d.flatten(1).mean(1) for *_, d in hyps]).argmin(0)  # ties: the first, "none"
        out = [None] * n
        for k, (pf, y, z, rows, dist) in enumerate(hyps):
            sel = (pick == k).nonzero().flatten()
            if not len(sel):
                continue
            first = (z[sel], rows[sel], dist[sel])
            if self.crops == (1.0,):
                r = self.residuals_of_latents(first[0], images=y[sel], matched=first[1:], prefilter=pf)
            else:
                r = self._searched(y[sel], prefilter=pf, first=first)
            for j, i in enumerate(sel.tolist()):
                out[i] = (r, j, pf)
        return Residuals(torch.stack([r.v[j] for r, j, _ in out]), torch.stack([r.rows[j] for r, j, _ in out]),
                         torch.stack([r.match_distance[j] for r, j, _ in out]), [r.edit[j] for r, j, _ in out],
                         [(r.crop or [1.0] * len(r.v))[j] for r, j, _ in out], [pf for *_, pf in out])

    def _searched(self, x: torch.Tensor, *, prefilter: str = "none",
                  first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Residuals:
        """Residuals of images x (n, 3, H, W) at the model's size (already through ``prefilter``),
        each read under the crop hypothesis its latents match best (see the class docstring).
        ``first``: the full frame's latents, rows and distances when already computed."""
        from .attacks import uncrop

        n = x.shape[0]
        hyps = []
        for f in self.crops:
            y, pmask = uncrop(x, f)
            if f == 1.0 and first is not None:
                z, rows, dist = first
            else:
                z = self.ae.encode(y)
                rows, dist = self.match(z)
            cells = F.avg_pool2d(pmask, 8)[:, 0] > 0.999  # latent cells wholly inside the covered part
            hyps.append((f, y, pmask, z, rows, dist, cells))
        common = hyps[int(torch.tensor(self.crops).argmin())][6].float()  # covered by every hypothesis
        crit = torch.stack([(d * common).sum((1, 2)) / common.sum((1, 2)).clamp_min(1) for *_, d, _ in hyps])
        pick = crit.argmin(0)  # (n,): ties go to the first, the full frame
        out_v = out_rows = out_d = None
        edits, crops = [None] * n, [None] * n
        for k, (f, y, pmask, z, rows, dist, cells) in enumerate(hyps):
            sel = (pick == k).nonzero().flatten()
            if not len(sel):
                continue
            r = self.residuals_of_latents(z[sel], images=y[sel], matched=(rows[sel], dist[sel]),
                                          masks=(pmask[sel], cells[sel]) if f < 1 else None, prefilter=prefilter)
            if out_v is None:
                out_v = r.v.new_zeros(n, *r.v.shape[1:])
                out_rows = r.rows.new_zeros(n, *r.rows.shape[1:])
                out_d = r.match_distance.new_zeros(n)
            out_v[sel], out_rows[sel], out_d[sel] = r.v, r.rows, r.match_distance
            for j, i in enumerate(sel.tolist()):
                edits[i], crops[i] = r.edit[j], f
        return Residuals(out_v, out_rows, out_d, edits, crops)

    def _weighted(self, v: torch.Tensor) -> torch.Tensor:
        """v (n, m, h, w) divided per pixel by its energy, floored per image (see the class docstring)."""
        e = v.pow(2).mean(1, keepdim=True)  # (n, 1, h, w)
        floors = []
        for i in range(len(e)):
            live = e[i][e[i] > 0]  # cells outside an undone crop are exactly zero
            floors.append(self.weight_floor * live.median() if live.numel() else e.new_ones(()))
        floor = torch.stack(floors).view(-1, 1, 1, 1).clamp_min(1e-12)
        return v / torch.maximum(e, floor)

    @torch.no_grad()
    def residuals_of_latents(self, latents: torch.Tensor, batch: int = 64, images: torch.Tensor | None = None,
                             *, matched: tuple[torch.Tensor, torch.Tensor] | None = None,
                             masks: tuple[torch.Tensor, torch.Tensor] | None = None,
                             prefilter: str = "none") -> Residuals:
        """The same from TAEF2 latents of images (N, C, h, w) (e.g. a latent cache's), with the
        images themselves at the model's size when at hand (the edit is chosen on them; without
        them, on the latents decoded, one decode more). ``matched``: the rows and distances of
        :meth:`match` when already computed. ``masks``: (pixels (N, 1, H, W), latent cells
        (N, h, w) bool) of the part of each image that holds it (an undone crop): the edit is
        chosen on those pixels and the residual is zero outside those cells. ``prefilter``: the
        filter the images went through before encoding; each candidate reference goes through
        it too."""
        from ..latent.refine import gather

        if images is not None and images.shape[0] != latents.shape[0]:
            raise InputError(f"images ({images.shape[0]}) and latents ({latents.shape[0]}) differ in number")
        T = self.secret.template_
        clip = self.secret.config.clip
        vs, rs, ds, es = [], [], [], []
        for s in range(0, latents.shape[0], batch):
            z = latents[s:s + batch].float()
            rows, dist = self.match(z) if matched is None else (matched[0][s:s + batch], matched[1][s:s + batch])
            pm, cm = (None, None) if masks is None else (masks[0][s:s + batch], masks[1][s:s + batch])
            img = _q8(self.ae.decode(gather(self.bank, rows)))
            ref_img = img if prefilter == "none" else _q8(apply_edit(img, prefilter))
            if len(self.edits) > 1:
                # the edit whose result is closest to the image, in pixels (cheap: one encode in all)
                x = images[s:s + batch].float() if images is not None else self.ae.decode(z).clamp(0, 1)
                cands = torch.stack([_q8(apply_edit(_q8(apply_edit(img, e)), prefilter)) if prefilter != "none"
                                     else _q8(apply_edit(img, e)) for e in self.edits])  # (E, n, 3, H, W)
                if pm is None:
                    err = (cands - x.unsqueeze(0)).pow(2).mean((2, 3, 4))  # (E, n)
                else:
                    err = ((cands - x.unsqueeze(0)).pow(2) * pm.unsqueeze(0)).sum((2, 3, 4)) / pm.sum((1, 2, 3))
                pick = err.argmin(0)
                ref_img = cands[pick, torch.arange(len(z))]
                es.extend(self.edits[int(i)] for i in pick)
            else:
                es.extend(self.edits * len(z))
            ref = self.ae.encode(ref_img)
            v = torch.einsum("nchw,cm->nmhw", z - ref, T)
            # clip each pixel's residual at clip x the image's median pixel norm: a wrongly matched
            # pixel (a residual the size of a whole photo's difference) cannot dominate the score
            pn = v.pow(2).sum(1, keepdim=True).sqrt()
            if cm is None:
                med = pn.flatten(1).median(1).values.view(-1, 1, 1, 1).clamp_min(1e-12)
                ds.append(dist.flatten(1).mean(1))
            else:  # only the cells that hold the image count, the rest is set to zero
                med = torch.stack([pn[i, 0][cm[i]].median() if cm[i].any() else pn.new_zeros(())
                                   for i in range(len(z))]).view(-1, 1, 1, 1).clamp_min(1e-12)
                v = v * cm.unsqueeze(1)
                ds.append((dist * cm).sum((1, 2)) / cm.sum((1, 2)).clamp_min(1))
            v = v * (clip * med / pn.clamp_min(1e-12)).clamp(max=1.0)
            if self.weighting == "pixel":
                v = self._weighted(v)
            vs.append(v)
            rs.append(rows)
        return Residuals(torch.cat(vs), torch.cat(rs), torch.cat(ds), es,
                         [1.0] * sum(len(t) for t in vs) if masks is None else None)
