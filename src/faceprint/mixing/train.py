"""Training of the Texture Mixer (papers/004, ch. 3, Sec. 3.3.1-3.3.2, Fig. 3.2, Eqs. 3.1-3.10),
on TAEF2 latents of texture crops, resumable from a checkpoint.

Each step draws two batches of source textures S1, S2 (their frozen TAEF2 latents z1, z2,
precomputed) and alpha ~ U[0, 1] per item, and runs the chapter's two tasks:

- reconstruction: z^_i = H(z_i, E^g(z_i));
  losses lambda1 L_pix (Eq. 3.4) + lambda2 L_Gram (Eq. 3.5) + lambda3 L_adv (Eq. 3.6, D^rec);
- interpolation: each z_i tiled 3 x 3 (T), shuffled at scales 1, 2, ..., half the tile with the
  four corner tiles left unshuffled (P~, Eq. 3.1), blended with alpha (Eqs. 3.2-3.3), harmonised,
  and a random tile-sized window I_crop compared with alpha-weighted Gram (Eq. 3.8) and
  adversarial (Eq. 3.9, D^itp) losses;
- objective Eq. 3.10 with lambda1 = 100, lambda2 = lambda4 = 0.001, lambda3 = lambda5 = 1 by
  default; both critics by WGAN-GP (gradient penalty weight 10) with Adam, one critic step per
  generator step.

Adaptation to TAEF2 (docs/SEED-SYSTEMS.md Sec. 4.3, and where this differs from it):

- The pixel loss is taken on latents, |H(z) - z|_1: the decoder is frozen, so a harmonised latent
  equal to the source latent decodes to the TAEF2 round trip of the source. (A pixel loss would
  need a full decode per item and step; the round trip itself is TAEF2's error, not the mixer's.)
- The Gram losses use the activations of the frozen TAEF2 decoder at 1x and 2x latent resolution
  (``gram_depth``; :class:`~faceprint.mixing.networks.DecoderTaps`) instead of VGG-19 relu_i_1
  (no VGG weights offline; the decoder's early stages cost ~10% of a full decode). The
  interpolation window is decoded with a 2-latent-pixel context margin, then cropped.
- D^rec and D^itp see latents (8 x 8 windows), not images.
- Loss balance (measured, seed 0, 16 pairs, the benchmark's settings lambda2 = lambda4 = 10):
  at initialisation the gradient norms on H and E^g are adversarial 0.015-0.02, Gram 0.04 and pixel
  0 (H is the identity); after ~550 steps, adversarial (interpolation) 95, pixel 2.1 (x100),
  Gram (interpolation) 1.7 (x10). The interpolation Gram loss is mostly irreducible (a blend of
  two textures cannot match both Gram matrices: its minimum is alpha (1 - alpha) ||G_a - G_b||^2),
  so it barely moves; the WGAN term drives the harmoniser, as in the chapter.

Randomness: every draw of step t comes from ``faceprint.seeding.generator(seed, "mix-step", t)``
and the weights from (seed, "mix-init"), so a run resumed from a checkpoint is bit-identical to an
uninterrupted one (same threads and machine). Checkpoints are one .safetensors file (weights of
H, E^g, both critics, both Adam states, history; class "faceprint.TextureMixerCheckpoint"),
written atomically; never pickled.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import ArtifactError, ConfigError, InputError
from ..io import load_artifact, now_iso, optimizer_state, optimizer_tensors, save_artifact
from ..seeding import check_seed, derive_seed
from ..seeding import generator as make_generator
from . import operations as ops
from .losses import critic_loss, generator_adv_loss, gram_loss, l1_per_item
from .model import DOWNSCALE, MixerConfig, TextureMixer, build_networks
from .networks import DecoderTaps, LatentCritic

CHECKPOINT_CLASS = "faceprint.TextureMixerCheckpoint"


def _num(v, lo=0.0, strict=False) -> bool:
    return (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            and (v > lo if strict else v >= lo))


@dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    Parameters
    ----------
    steps : int
        Generator steps in all (a resumed run continues up to this number).
    batch_size : int
        Source pairs per step.
    lr, beta1, beta2 : Adam settings of both the generator side (H, E^g) and the critics.
    pixel, gram_rec, adv_rec, gram_itp, adv_itp : float
        lambda1 .. lambda5 of Eq. 3.10 (defaults: the chapter's 100, 0.001, 1, 0.001, 1).
    gp_weight : float
        WGAN-GP penalty weight.
    gram_depth : int
        Decoder resolutions whose activations enter the Gram losses (1: 1x; 2: 1x and 2x; 3: up to 4x).
    shuffle : bool
        Shuffle the tiled latents (False: the "no shuffling" ablation).
    blend : bool
        Interpolate two different textures (False: the "no blending" ablation, both sources equal).
    tiles : int
        Tiling factor of the interpolation task (3 in the chapter).
    margin : int
        Latent pixels of context decoded around the interpolation window for its Gram features.
    checkpoint_every : int
        Steps between checkpoints (when a checkpoint path is given).
    """

    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    pixel: float = 100.0
    gram_rec: float = 0.001
    adv_rec: float = 1.0
    gram_itp: float = 0.001
    adv_itp: float = 1.0
    gp_weight: float = 10.0
    gram_depth: int = 2
    shuffle: bool = True
    blend: bool = True
    tiles: int = 3
    margin: int = 2
    checkpoint_every: int = 100

    def __post_init__(self):
        for name, lo in (("steps", 0), ("batch_size", 1), ("tiles", 1), ("margin", 0), ("checkpoint_every", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.gram_depth not in (1, 2, 3):
            raise ConfigError(f"gram_depth must be 1, 2 or 3, got {self.gram_depth!r}")
        if not _num(self.lr, strict=True):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            if not _num(getattr(self, name)) or getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("pixel", "gram_rec", "adv_rec", "gram_itp", "adv_itp", "gp_weight"):
            if not _num(getattr(self, name)):
                raise ConfigError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("shuffle", "blend"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class _State:
    """Everything a run needs: the networks, critics, optimisers, step and history."""

    def __init__(self, config: MixerConfig, train: TrainConfig, seed: int):
        self.config, self.train, self.seed = config, train, seed
        self.h, self.e = build_networks(config, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "mix-critics"))
            self.d_rec = LatentCritic()
            self.d_itp = LatentCritic()
        g_params = list(self.h.parameters()) + (list(self.e.parameters()) if self.e is not None else [])
        betas = (train.beta1, train.beta2)
        self.opt_g = torch.optim.Adam(g_params, lr=train.lr, betas=betas)
        self.opt_d = torch.optim.Adam(list(self.d_rec.parameters()) + list(self.d_itp.parameters()), lr=train.lr,
                                      betas=betas)
        self.step = 0
        self.history: list[dict] = []
        self.seconds = 0.0

    def modules(self) -> dict:
        m = {"harmoniser": self.h, "critic_rec": self.d_rec, "critic_itp": self.d_itp}
        if self.e is not None:
            m["global_encoder"] = self.e
        return m

    # -------------------------------------------------------------- checkpoint
    def save(self, path, data_hash: str) -> None:
        tensors = {}
        for name, mod in self.modules().items():
            tensors.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
        groups = {}
        for oname, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d)):
            t, groups[oname] = optimizer_tensors(oname, opt.state_dict())
            tensors.update(t)
        meta = {"class": CHECKPOINT_CLASS, "config": self.config.to_dict(), "train_config": self.train.to_dict(),
                "seed": self.seed, "step": self.step, "history": self.history, "param_groups": groups,
                "data_hash": data_hash, "seconds": self.seconds, "created": now_iso()}
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path, config: MixerConfig, train: TrainConfig, seed: int, data_hash: str) -> "_State":
        tensors, meta = load_artifact(path, expected_class=CHECKPOINT_CLASS)
        stored = (meta.get("config"), meta.get("seed"), meta.get("data_hash"))
        ours = (config.to_dict(), seed, data_hash)
        if stored != ours:
            raise InputError(f"checkpoint {str(path)!r} belongs to another run (architecture, seed or training data "
                             "differ); delete it or pass another checkpoint path")
        tr = dict(meta.get("train_config") or {})
        tr.pop("steps", None)
        mine = train.to_dict()
        mine.pop("steps", None)
        if tr != mine:
            raise InputError(f"checkpoint {str(path)!r} was trained with other settings ({tr}); only `steps` may "
                             "change when resuming")
        s = cls(config, train, seed)
        try:
            for name, mod in s.modules().items():
                pre = name + "."
                mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, strict=True)
            for oname, opt in (("opt_g", s.opt_g), ("opt_d", s.opt_d)):
                opt.load_state_dict(optimizer_state(oname, tensors, meta["param_groups"][oname]))
        except (KeyError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"checkpoint {str(path)!r} is incomplete or inconsistent ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); delete it and train again") from None
        s.step = int(meta["step"])
        s.history = list(meta.get("history", []))
        s.seconds = float(meta.get("seconds", 0.0))
        return s


def _crop_feats(feats, y0: int, x0: int, size: int):
    """Crop each level (scale 2^i) of a feature pyramid to the window (y0, x0, size) of level 0."""
    out = []
    for i, f in enumerate(feats):
        s = 2 ** i
        out.append(f[..., y0 * s:(y0 + size) * s, x0 * s:(x0 + size) * s])
    return out


def train_step(state: _State, taps: DecoderTaps, latents: torch.Tensor) -> dict:
    """One critic step and one generator step on pairs drawn for step ``state.step``; returns the
    losses (floats)."""
    tc = state.train
    g = make_generator(state.seed, "mix-step", state.step)
    N, C, h, w = latents.shape
    B = tc.batch_size
    i1 = torch.randint(N, (B,), generator=g)
    i2 = torch.randint(N, (B,), generator=g)
    alpha = torch.rand(B, generator=g)
    z1, z2 = latents[i1], latents[i2]
    za, zb = (z1, z2) if tc.blend else (z1, z1)  # sources of the interpolation task
    reps = tc.tiles
    H, W = reps * h, reps * w
    y0 = int(torch.randint(H - h + 1, (1,), generator=g))
    x0 = int(torch.randint(W - w + 1, (1,), generator=g))
    corners = ops.corner_mask(h, w, reps)

    def tiled(z):
        t = ops.tile(z, reps, reps)
        if tc.shuffle:
            t = ops.shuffle(t, local_size=min(h, w), generator=g, keep=corners)
        return t

    Ta, Tb = tiled(za), tiled(zb)
    h_net, e_net = state.h, state.e
    h_net.train()

    def forward():
        zg1 = e_net(z1) if e_net is not None else None
        zg2 = e_net(z2) if e_net is not None else None
        zga, zgb = (zg1, zg2) if tc.blend else (zg1, zg1)
        rec1 = h_net(z1, None if zg1 is None else zg1[:, :, None, None].expand(-1, -1, h, w))
        rec2 = h_net(z2, None if zg2 is None else zg2[:, :, None, None].expand(-1, -1, h, w))
        a4 = alpha.view(B, 1, 1, 1)
        Z = a4 * Ta + (1 - a4) * Tb
        Zg = None
        if zga is not None:
            Zg = (alpha[:, None] * zga + (1 - alpha[:, None]) * zgb)[:, :, None, None].expand(-1, -1, H, W)
        I = h_net(Z, Zg)
        crop = I[..., y0:y0 + h, x0:x0 + w]
        m = tc.margin
        cy0, cx0 = max(0, y0 - m), max(0, x0 - m)
        cy1, cx1 = min(H, y0 + h + m), min(W, x0 + w + m)
        ctx = I[..., cy0:cy1, cx0:cx1]
        return rec1, rec2, crop, ctx, (y0 - cy0, x0 - cx0)

    # ---- critic step on the generator's outputs (detached), then the generator step on the same
    # forward pass (the critics are called again after their update)
    rec1, rec2, crop, ctx, (oy, ox) = forward()
    gd = make_generator(state.seed, "mix-gp", state.step)
    l_drec = 0.5 * (critic_loss(state.d_rec, z1, rec1, gd, gp_weight=tc.gp_weight)
                    + critic_loss(state.d_rec, z2, rec2, gd, gp_weight=tc.gp_weight)).mean()
    l_ditp = (alpha * critic_loss(state.d_itp, za, crop, gd, gp_weight=tc.gp_weight)
              + (1 - alpha) * critic_loss(state.d_itp, zb, crop, gd, gp_weight=tc.gp_weight)).mean()
    state.opt_d.zero_grad(set_to_none=True)
    (l_drec + l_ditp).backward()
    state.opt_d.step()

    # ---- generator step
    for p in list(state.d_rec.parameters()) + list(state.d_itp.parameters()):
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            t1, t2 = taps(z1), taps(z2)
            ta, tb = (t1, t2) if tc.blend else (t1, t1)
        l_pix = (l1_per_item(rec1, z1) + l1_per_item(rec2, z2)).mean()  # Eq. 3.4 sums the two items
        l_grec = (gram_loss(taps(rec1), t1) + gram_loss(taps(rec2), t2)).mean()
        l_arec = (generator_adv_loss(state.d_rec, rec1) + generator_adv_loss(state.d_rec, rec2)).mean()
        f_crop = _crop_feats(taps(ctx), oy, ox, h)
        l_gitp = (alpha * gram_loss(f_crop, ta) + (1 - alpha) * gram_loss(f_crop, tb)).mean()
        l_aitp = generator_adv_loss(state.d_itp, crop).mean()
        loss = (tc.pixel * l_pix + tc.gram_rec * l_grec + tc.adv_rec * l_arec + tc.gram_itp * l_gitp
                + tc.adv_itp * l_aitp)
        state.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        state.opt_g.step()
    finally:
        for p in list(state.d_rec.parameters()) + list(state.d_itp.parameters()):
            p.requires_grad_(True)
    state.step += 1
    out = {"loss": loss, "pix": l_pix, "gram_rec": l_grec, "adv_rec": l_arec, "gram_itp": l_gitp,
           "adv_itp": l_aitp, "critic_rec": l_drec, "critic_itp": l_ditp}
    return {k: float(v.detach()) for k, v in out.items()}


def data_digest(latents: torch.Tensor) -> str:
    """sha256 (16 hex) of the training latents: ties a checkpoint to its data."""
    import hashlib

    return hashlib.sha256(latents.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def train_mixer(latents: torch.Tensor, *, autoencoder, config: MixerConfig | None = None,
                train: TrainConfig | None = None, seed: int = 0, checkpoint=None, resume: bool = True,
                max_seconds: float | None = None, progress: bool = False, data_info: dict | None = None,
                log_every: int = 25) -> TextureMixer:
    """Train a Texture Mixer on texture latents.

    Parameters
    ----------
    latents : torch.Tensor
        (N, 32, h, w) frozen TAEF2 latents of the training textures (h = w = texture_size / 8).
    autoencoder : TAEF2
        Its decoder gives the Gram feature taps; the returned mixer decodes with it.
    config, train : MixerConfig, TrainConfig
    seed : int
        Weights from (seed, "mix-init"), step t's draws from (seed, "mix-step", t).
    checkpoint : path, optional
        Checkpoint file: written every ``train.checkpoint_every`` steps and at the end; with
        ``resume`` an existing one (of the same run) is continued.
    max_seconds : float, optional
        Stop (after a checkpoint) when this much time has passed in this call; the returned
        mixer's provenance says how many steps were done (``complete`` False).
    progress : bool
        Progress bar on a terminal.
    data_info : dict, optional
        Description of the training data for the provenance (sources, split, counts).

    Returns
    -------
    TextureMixer
    """
    check_seed(seed)
    config = config or MixerConfig()
    train = train or TrainConfig()
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != 32:
        raise InputError(f"latents must be (N, 32, h, w) TAEF2 latents, got {tuple(getattr(latents, 'shape', ()))}")
    side = config.texture_size // DOWNSCALE
    if tuple(latents.shape[2:]) != (side, side):
        raise InputError(f"latents must be {side}x{side} (texture_size {config.texture_size} px), got "
                         f"{tuple(latents.shape[2:])}")
    if latents.shape[0] < 2:
        raise InputError(f"need at least 2 training textures, got {latents.shape[0]}")
    if not torch.isfinite(latents).all():
        raise InputError("latents hold NaN or infinite values")
    latents = latents.detach().float().contiguous()
    digest = data_digest(latents)
    state = None
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = _State.load(checkpoint, config, train, seed, digest)
    if state is None:
        state = _State(config, train, seed)
    taps = DecoderTaps(autoencoder.decoder, train.gram_depth)
    t_start = time.perf_counter()
    bar = None
    if progress and sys.stderr is not None and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=train.steps, initial=state.step, desc="mix train", leave=False)
    acc: dict = {}
    stopped_early = False
    while state.step < train.steps:
        t0 = time.perf_counter()
        losses = train_step(state, taps, latents)
        state.seconds += time.perf_counter() - t0
        for k, v in losses.items():
            acc[k] = acc.get(k, 0.0) + v
        acc["_n"] = acc.get("_n", 0) + 1
        if state.step % log_every == 0 or state.step == train.steps:
            n = acc.pop("_n")
            state.history.append({"step": state.step, **{k: round(v / n, 5) for k, v in acc.items()}})
            acc = {}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}")
        if checkpoint is not None and state.step % train.checkpoint_every == 0:
            state.save(checkpoint, digest)
        if max_seconds is not None and time.perf_counter() - t_start > max_seconds and state.step < train.steps:
            stopped_early = True
            break
    if bar is not None:
        bar.close()
    if checkpoint is not None:
        state.save(checkpoint, digest)
    m = TextureMixer(config, autoencoder=autoencoder)
    m.harmoniser_ = state.h.eval()
    m.global_encoder_ = state.e.eval() if state.e is not None else None
    m.train_config_ = train.to_dict()
    m.provenance_ = {"faceprint_version": __version__, "torch_version": torch.__version__, "created": now_iso(),
                     "seed": seed, "trained_steps": state.step, "requested_steps": train.steps,
                     "complete": not stopped_early and state.step >= train.steps, "train_seconds": round(state.seconds, 1),
                     "threads": torch.get_num_threads(), "n_textures": int(latents.shape[0]), "data_hash": digest,
                     "data": data_info or {}, "autoencoder": getattr(autoencoder, "base_id", None),
                     "history": state.history[-200:]}
    return m


__all__ = ["CHECKPOINT_CLASS", "TrainConfig", "data_digest", "train_mixer", "train_step"]
