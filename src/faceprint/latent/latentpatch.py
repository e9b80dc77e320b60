"""LatentPatch baseline: multi-scale, sequential, non-parametric patch synthesis in latent space.

LatentPatch (Samuth, Rabin, Tschumperlé, Jurie, ICIP 2023; papers/000 ref. [35]) is the
training-free method papers/000 compares against. This module implements it from the
description papers/000 gives; the quotes are the sentences each choice rests on.

What papers/000 says about LatentPatch
--------------------------------------
* Sec. 2: "In Latent-Patch, a multi-scale non-parametric auto-regressive model is used,
  inspired from patch-based texture synthesis algorithms and the PatchMatch approach
  introduced for image editing. A limitation of this approach is the lack of long-range
  correlation by the sequential nature of the synthesis, which can results in global
  inconsistencies, such as face asymmetries (different eyes' color, earring on only one
  side, etc), different hair styles depending on the spatial location, or inconsistent
  background."
* Sec. 3.3: "contrarily to [35] where large patches from the training set are sequentially
  copied to generate a new latent representation similar to a patchwork"; and "plausible
  latent code can be obtained by sampling directly local neighborhoods (or patches) of
  spatial resolution omega x omega from the training data"; the texture-synthesis work it
  builds on is Efros & Leung [8].
* Sec. 4.2: LatentPatch "does not require any training", "explicitly synthesizes new image
  samples by copying local regions from examples images", "copies large regions of latent
  features to achieve realistic portrait generation", and draws its copies "randomly from
  the top k-NN".
* Sec. 3.1: the PCA projector P0 (Eq. 1) is used "As proposed in [35]".
* Appendix, Table 1: no training; sampling takes 581 ms per image (GPU, VQ-GAN latents
  256 x 16 x 16, N = 1024), about 30x LR-GMM-NN.

The algorithm
-------------
fit (no training): keep the bank of training latents Y_j (N, c, h, w) and a pyramid of
matching features Y_j^s at ``levels`` scales s = 0 (coarsest) .. L-1 (finest, h x w), each a
2x2 average pooling of the next finer one (TAEF2 at 128 px: 4x4, 8x8, 16x16).

sample, for each image independently, from the coarsest scale to the finest:

1. Scale s is cut into non-overlapping ``block`` x ``block`` blocks (clipped at the grid's
   edge), visited in raster (scan-line) order: the causal order of Efros-Leung synthesis
   and of auto-regressive models ("sequential", "auto-regressive").
2. The matching window of a block is the block grown by ``radius`` latent pixels on every
   side, clipped to the grid (positions outside contribute nothing: the zero-padding
   convention of faceprint.latent.refine). Its squared distance to training latent j sums,
   over the window's positions p:
   - p already synthesized at this scale:  || S^s(p) - Y_j^s(p) ||^2;
   - p not yet synthesized, s > 0:  guide_weight * || S^{s-1}(p') - Y_j^{s-1}(p') ||^2, p'
     the parent of p, i.e. the coarser synthesis upsampled (nearest) as a guide, compared
     with training latent j's coarser scale upsampled the same way (like with like);
   - p not yet synthesized at the coarsest scale: nothing (there is no guide yet).
   Only training latents AT THE SAME POSITIONS are compared: faces are aligned, and
   papers/000 restricts its own NN search the same way (Sec. 3.3, "at the same location
   p"). There is no search window of offsets, so each output latent pixel is a training
   latent pixel at its own position and the provenance is one training index per pixel.
3. The k training latents nearest in that distance are found (torch.topk; its tie order is
   deterministic for a given row), one of them is drawn uniformly ("randomly from the top
   k-NN") and the whole block is copied from it ("large patches ... are sequentially
   copied").
4. A block whose window has no context at all -- with the defaults, only the single block
   that covers the whole 4x4 coarsest scale -- is copied from a training latent drawn
   uniformly among all N. So the synthesis starts from a random training latent's 4x4
   layout (pose, hair outline, background tone) at the coarsest scale, and every finer scale
   re-synthesizes the whole grid guided by the upsampled coarser synthesis.

The result is the finest synthesis: out[:, p] = Y_{prov(p)}(p), copying the autoencoder's
full c-channel training latent pixels (never averaged), with provenance (n, h, w) int64.

Defaults, and why
-----------------
* levels = 3: 4x4 -> 8x8 -> 16x16 on TAEF2 at 128 px ("multi-scale").
* block = 4, radius = 2: 4x4 latent pixels (32x32 image pixels at 128 px) copied per step,
  matched on an 8x8 window (omega = 8). Steps per image: 1 + 4 + 16 = 21. We first tried
  block = 2 (the LatentPatch paper's own Fig. 1 caption, arXiv:2401.16830, speaks of a "2x2
  Patch sequence") with radius 1 and 2, k = 5, on 1,024 CelebA latents: faces were blotchy,
  with many 2x2 seams, and drew on 31-37 training photos per face with ~10% of a face from
  its main photo -- a fine mosaic, not the "large regions" papers/000 describes. With
  block = 4 the faces are plausible portraits with visible seams and occasional
  asymmetries; they draw on ~10 photos per face (6-15), ~21% of a face from its main one.
  (Also tried: top-k draws at the coarsest scale only and the nearest neighbour at finer
  scales. Faces then are 3-5 large pieces of training faces, the finer scales keeping the
  coarse sources; we kept one k for every scale, as papers/000 describes.)
* k = 5: papers/000 gives no value for LatentPatch's k; 5 keeps every copy among close
  matches while still varying the result.
* guide_weight = 1: a guide position counts like a synthesized one (0.5 and 2 looked alike).
* channels = None: match on the c = 32 TAEF2 channels as they are. LatentPatch reduces
  VQ-GAN's 256 channels with the PCA P0 (Sec. 3.1); TAEF2's 32 channels have similar
  variances, so no reduction is needed. channels = q matches on P0's q whitened principal
  channels instead (faceprint.latent.projector). The copied values are always the full
  c-channel latent pixels.

Cost and exactness
------------------
The synthesis is sequential: each step depends on the blocks copied before it. Images of a
batch go through the steps together, which is exact: each has its own distances, top-k and
random choices, drawn from faceprint.seeding.generator(seed, "latentpatch", i), so image i
depends only on (seed, i), not on the batch it is drawn in. Distances are computed directly
(torch.cdist without the matrix-product shortcut), never by a batch-sized GEMM, so the
arithmetic of one image does not depend on the others. The per-position terms
||S(p) - Y_j(p)||^2 are computed once, when p is synthesized (S(p) = Y_{prov(p)}(p) never
changes after), and a window's distance is their sum in a fixed order: the quantity one
gets by recomputing every window from scratch (up to float32 rounding), without the
repetition; tests/test_latentpatch.py checks the provenance against such a float64
from-scratch reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validation import all_finite
from ..errors import ConfigError, InputError, NotFittedError
from ..seeding import check_seed
from ..seeding import generator as make_generator
from .projector import PCAProjector, ProjectorConfig


@dataclass(frozen=True)
class LatentPatchConfig:
    """Hyper-parameters of LatentPatch (the module docstring gives the reasons).

    levels: scales of the pyramid, each halving the grid (the finest is the latent grid).
    block: side of the block of latent pixels copied at each step, at every scale.
    radius: margin of the matching window around the block (window side block + 2 radius).
    k: the copy is drawn uniformly among the k nearest training latents.
    guide_weight: weight of the upsampled coarser synthesis in the distance.
    channels: None (match on the autoencoder's c channels) or q (match on q whitened PCA
    channels; the copied values are always the c-channel latents).
    block_elements: memory budget of the distance buffer (images * h * w * N floats); sets how
    many images are synthesized together. Results do not depend on it.
    """

    levels: int = 3
    block: int = 4
    radius: int = 2
    k: int = 5
    guide_weight: float = 1.0
    channels: int | None = None
    block_elements: int = 1 << 24

    def __post_init__(self):
        for name, lo in (("levels", 1), ("block", 1), ("radius", 0), ("k", 1), ("block_elements", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        g = self.guide_weight
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ConfigError(f"guide_weight must be a finite number >= 0, got {g!r}; the default is 1.0")
        q = self.channels
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise ConfigError(f"channels must be None (all autoencoder channels) or a positive int, got {q!r}")


class LatentPatch:
    """Training-free multi-scale sequential patch synthesis from a bank of training latents.

    fit(latents (N, c, h, w)) stores the bank and its pyramid of matching features;
    sample(n, seed=...) returns (latents (n, c, h, w) float32, provenance (n, h, w) int64).
    State set by fit: bank_ (N, c, h, w) float32, pyramid_ (coarse to fine, each
    (h_s * w_s, N, q)), projector_ (a PCAProjector, or None when config.channels is None).
    """

    def __init__(self, config: LatentPatchConfig | None = None):
        if config is not None and not isinstance(config, LatentPatchConfig):
            raise InputError(f"config must be a LatentPatchConfig or None, got {type(config).__name__}")
        self.config = config or LatentPatchConfig()
        self.bank_: torch.Tensor | None = None
        self.pyramid_: list[torch.Tensor] | None = None
        self.projector_: PCAProjector | None = None
        self._plan: list[dict] = []

    # ------------------------------------------------------------------ fitting
    def fit(self, latents: torch.Tensor) -> "LatentPatch":
        """Store the training latents (N, c, h, w) and precompute the matching pyramid."""
        cfg = self.config
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise InputError(f"latents must be a (N, c, h, w) tensor, got {type(latents).__name__} "
                             f"{tuple(getattr(latents, 'shape', ()))}")
        if not latents.is_floating_point():
            raise InputError(f"latents must be a floating-point tensor, got {latents.dtype}")
        N, c, h, w = latents.shape
        if N < cfg.k:
            raise InputError(f"LatentPatch copies each block from one of the k = {cfg.k} nearest training latents, "
                             f"so it needs at least {cfg.k} of them; got N = {N}. Pass more latents or a smaller k")
        if not all_finite(latents):
            raise InputError("latents contain NaN or infinite values")
        f = 2 ** (cfg.levels - 1)
        if h % f or w % f:
            raise ConfigError(f"levels = {cfg.levels} halves the {h}x{w} latent grid {cfg.levels - 1} times, "
                              f"so h and w must be divisible by {f}; use fewer levels")
        if cfg.channels is not None and cfg.channels > c:
            raise ConfigError(f"channels = {cfg.channels} exceeds the latents' {c} channels; "
                              f"use channels <= {c} or None")
        bank = latents.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if cfg.channels is not None:
            projector = PCAProjector(ProjectorConfig(cfg.channels)).fit(bank)
            feats = projector.transform(bank)  # (N, q, h, w)
        else:
            projector, feats = None, bank
        pyramid = []
        for s in range(cfg.levels):
            factor = 2 ** (cfg.levels - 1 - s)
            fs = F.avg_pool2d(feats, factor) if factor > 1 else feats  # (N, q, h_s, w_s)
            pyramid.append(fs.permute(2, 3, 0, 1).reshape(-1, N, fs.shape[1]).contiguous())  # (h_s w_s, N, q)
        self.bank_ = bank
        self.pyramid_ = pyramid
        self.projector_ = projector
        self._plan = _plan(h, w, cfg.levels, cfg.block, cfg.radius, guided=cfg.guide_weight > 0)
        return self

    def _check_fitted(self):
        if self.bank_ is None:
            raise NotFittedError("LatentPatch is not fitted; call fit(latents) first")

    @property
    def n_steps(self) -> int:
        """Sequential steps (blocks copied) per image, over all scales."""
        self._check_fitted()
        return sum(len(level["blocks"]) for level in self._plan)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, *, seed: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the latents of image indices start .. start + n - 1 of the run seeded by ``seed``.

        Returns (latents (n, c, h, w) float32, provenance (n, h, w) int64), where
        latents[i, :, y, x] == bank_[provenance[i, y, x], :, y, x]. Image i depends only on
        (seed, i) and the bank."""
        self._check_fitted()
        check_seed(seed)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InputError(f"n must be a non-negative int, got {n!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InputError(f"start must be a non-negative int, got {start!r}")
        N, c, h, w = self.bank_.shape
        chunk = max(1, self.config.block_elements // (h * w * N))
        provs = []
        for s in range(start, start + n, chunk):
            m = min(chunk, start + n - s)
            # every random number image i uses, one per step, from its own generator
            u = torch.stack([torch.rand(self.n_steps, generator=make_generator(seed, "latentpatch", s + i),
                                        dtype=torch.float64) for i in range(m)])  # (m, steps)
            provs.append(self._synthesize(u))
        if not provs:
            return torch.zeros(0, c, h, w), torch.zeros(0, h, w, dtype=torch.int64)
        prov = torch.cat(provs)  # (n, h, w)
        # out[i, :, y, x] = bank_[prov[i, y, x], :, y, x], gathered without copying the bank
        ys = torch.arange(h)[None, :, None]
        xs = torch.arange(w)[None, None, :]
        out = self.bank_.permute(0, 2, 3, 1)[prov, ys, xs]  # (n, h, w, c)
        return out.permute(0, 3, 1, 2).contiguous(), prov

    def _synthesize(self, u: torch.Tensor) -> torch.Tensor:
        """The sequential synthesis of B images with uniform draws u (B, steps) -> provenance (B, h, w)."""
        cfg = self.config
        B = u.shape[0]
        N = self.bank_.shape[0]
        k = cfg.k
        rows = torch.arange(B)
        step = 0
        M = None  # (h_s w_s, B, N): per-position squared distance of the synthesis to each training latent
        prov = None
        for s, level in enumerate(self._plan):
            P = self.pyramid_[s]  # (h_s w_s, N, q)
            hs, ws = level["shape"]
            if s == 0:
                M = torch.zeros(hs * ws, B, N)
            else:
                # the coarser synthesis upsampled (nearest) guides the positions not yet
                # synthesized: its distances to the coarser training latents, repeated 2x2
                hp, wp = self._plan[s - 1]["shape"]
                M = M.reshape(hp, 1, wp, 1, B, N).expand(hp, 2, wp, 2, B, N).reshape(hs * ws, B, N)
                M = M * cfg.guide_weight
            prov = torch.empty(hs * ws, B, dtype=torch.int64)
            for blk, win, ctx in zip(level["blocks"], level["windows"], level["context"]):
                if not ctx:
                    # nothing synthesized in the window and no guide: a uniformly drawn training latent
                    choice = (u[:, step] * N).long().clamp_max(N - 1)
                else:
                    dist = M[win[0]].clone()  # (B, N): the window's distance, summed in a fixed order
                    for p in win[1:]:
                        dist += M[p]
                    nearest = torch.topk(dist, k, dim=1, largest=False, sorted=True).indices  # (B, k)
                    choice = nearest[rows, (u[:, step] * k).long().clamp_max(k - 1)]
                prov[blk] = choice[None, :]
                Pb = P[blk]  # (nb, N, q)
                d = torch.cdist(Pb[:, choice, :], Pb, compute_mode="donot_use_mm_for_euclid_dist")  # (nb, B, N)
                M[blk] = d * d
                step += 1
        return prov.T.reshape(B, *self._plan[-1]["shape"])


def _plan(h: int, w: int, levels: int, block: int, radius: int, guided: bool) -> list[dict]:
    """Per scale, coarse to fine: the grid shape; the blocks in raster order (flat position
    indices, clipped at the edge); their matching windows (block grown by radius, clipped);
    and whether a window has any context (a position synthesized earlier at this scale, or a
    coarser guide)."""
    plan = []
    for s in range(levels):
        factor = 2 ** (levels - 1 - s)
        hs, ws = h // factor, w // factor
        blocks, windows, context = [], [], []
        done = torch.zeros(hs * ws, dtype=torch.bool)
        for by in range(0, hs, block):
            for bx in range(0, ws, block):
                ys, xs = torch.arange(by, min(by + block, hs)), torch.arange(bx, min(bx + block, ws))
                blk = (ys[:, None] * ws + xs[None, :]).reshape(-1)
                wy = torch.arange(max(by - radius, 0), min(by + block + radius, hs))
                wx = torch.arange(max(bx - radius, 0), min(bx + block + radius, ws))
                win = (wy[:, None] * ws + wx[None, :]).reshape(-1)
                blocks.append(blk)
                windows.append(win.tolist())
                context.append((s > 0 and guided) or bool(done[win].any()))
                done[blk] = True
        plan.append({"shape": (hs, ws), "blocks": blocks, "windows": windows, "context": context})
    return plan
