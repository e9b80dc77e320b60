"""A latent GAN on TAEF2 latents with the dual contrastive loss, generator self-attention and
discriminator reference attention (papers/004, Ch. 2: Sec. 2.3.1 Eqs. (2.1)-(2.3), Sec. 2.3.2
Eqs. (2.4)-(2.7), Sec. 2.3.3 Eq. (2.8), training protocol of Sec. 2.4).

:class:`LatentGAN` learns to generate the whitened TAEF2 latents (32 x 16 x 16 at 128 px)
of a photo set. Decoding to images stays with the frozen TAEF2 decoder. It is a latent model
like :class:`faceprint.latent.flowprior.FlowPrior`: a config dataclass, fit(latents, seed=...),
sample_latents(n, seed=...), and save/load to one .safetensors file. Inside a
:class:`faceprint.latent.generator.Generator` (see :func:`fit_gan_generator`) it is the method
"gan", so generate, evaluate, inspect and fingerprint work on it like on every model.

The chapter's three contributions are switches of :class:`GANConfig`:

- ``loss``: "ns" (the non-saturating default), "contrastive" (Eqs. 2.1-2.3, see
  faceprint.gan.losses), "hinge". Sec. 2.4 warms up for about 20 epochs on the default loss
  before switching to the contrastive one. Here the warm-up is ``warmup_fraction`` (0.2) of
  the planned iterations, for "contrastive" and "hinge" alike.
- ``g_attention``: the SAN self-attention replaces the generator's second 8 x 8 convolution.
- ``d_reference_attention``: the discriminator fuses a real reference (a random real latent of
  the training set) with the primary by Eq. 2.8 at 8 x 8.

Training. Alternating Adam steps on D then G with batch ``batch_size``; lazy R1 on the reals
(every ``r1_every`` steps, gamma ``r1_gamma``); an exponential moving average of G's weights
(``ema_beta``) is the generator that samples. The data are whitened per channel: the mean
latent (c, h, w) and one std per channel, both learned at fit.

Reproducibility. Every random draw of iteration t comes from a generator seeded by
(seed, name, t): the mini-batch order (one permutation per epoch), the references, and the z of
D's and G's steps. Weights are initialised inside torch.random.fork_rng from (seed, "gan-init").
So training for a seed is bit-identical at a fixed thread count, and a run resumed from a
checkpoint continues exactly as the uninterrupted one would (tested).

Checkpoints (``checkpoint=`` path) are one .safetensors file written atomically every
``checkpoint_every`` iterations and at the end. It holds G, D, the EMA of G, both optimizers'
state as tensors (their hyper-parameters as JSON), the iteration, the loss history, the config,
the seed and a hash of the data. There is no pickle. ``resume=True`` continues from it, and
refuses a checkpoint made with another config, seed or data.

Divergence. A non-finite loss, or one above ``explode_threshold``, stops training. The model is
restored to the last checkpoint state (kept in memory even without a checkpoint file), and the
stop is recorded in ``provenance_["stopped"]`` with the iteration and the losses. A
:class:`TrainingDivergedWarning` says so. A divergence before the first checkpoint raises
:class:`TrainingDivergedError`.

Sampling. Image i of seed s gets z_i ~ N(0, I) from faceprint.seeding.generator(s, "gan", i).
The generator runs on fixed blocks of 16 indices, as FlowPrior does, so image i is
bit-identical whatever n and start are.

Bad input: latents of another shape (e.g. 32 x 32 x 32 from 256-px photos) are refused, as
are fewer latents than the batch size. Below ``MIN_LATENTS_WARN`` (500) a
:class:`SmallDataWarning` is raised, because a GAN on few photos collapses or memorises. A
batch below 2 with the contrastive loss is refused by the config.

A GAN face has no provenance map: no latent pixel is copied from a training photo. So it
carries no data-level fingerprint; a model-level one (the decoder instance) is what
``faceprint fingerprint issue`` embeds in a GAN model (faceprint.gan.fingerprint).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from .. import __version__
from ..errors import (ArtifactError, ConfigError, InputError, NotFittedError, SmallDataWarning,  # noqa: F401
                      TrainingDivergedError, TrainingDivergedWarning)
from ..io import load_artifact, now_iso, optimizer_state, optimizer_tensors, save_artifact
from ..seeding import check_seed, derive_seed
from ..seeding import generator as make_generator
from .augment import augment, parse_policy
from .losses import LOSSES, losses_for
from .networks import LatentD, LatentG, count_params, macs_per_sample

ARTIFACT_CLASS = "faceprint.LatentGAN"
CHECKPOINT_CLASS = "faceprint.LatentGANCheckpoint"
LATENT_HW = (16, 16)  # the networks are built for 16 x 16 latents (128-px photos with TAEF2)
SAMPLE_BLOCK = 16
MIN_LATENTS_WARN = 500
CALIBRATION_ITERATIONS = 10  # with a time budget and no iteration count: timed to plan the run
MAX_ITERATIONS = 10_000_000


def _is_int(v, lo: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= lo


def _is_num(v, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


@dataclass(frozen=True)
class GANConfig:
    """Hyper-parameters of the latent GAN (see the module docstring).

    Parameters
    ----------
    z_dim : int
        Dimension of the Gaussian input z.
    g_channels : (int, int, int)
        Generator channels at 4x4, 8x8 and 16x16.
    d_width : int
        Discriminator channels at 16x16 (8x8: 2x, 4x4: 4x).
    latent_channels : int
        c of the latents the model is built for (32 for TAEF2).
    loss : {"ns", "contrastive", "hinge"}
    warmup_fraction : float
        Share of the planned iterations trained with "ns" before a "contrastive" or "hinge"
        loss takes over (Sec. 2.4's warm-up, scaled).
    g_attention, d_reference_attention : bool
        The chapter's self-attention in G and reference attention in D.
    noise : bool
        StyleGAN's per-pixel noise inputs in G (faceprint.gan.networks says why they matter on
        TAEF2 latents). Artifacts written before this switch existed load with noise off.
    augment : str
        DiffAugment policies applied to every input of D, real and generated (comma-separated
        of "flip", "translation", "cutout"; "" for none; faceprint.gan.augment).
    attn_patch, attn_reduction, attn_groups, attn_hidden : ints
        The attention layers' patch size s (odd), K/Q channel reduction, channel groups
        sharing a weight map, and hidden width of the weight MLP (faceprint.gan.attention).
    batch_size, iterations : ints
        Mini-batch size (>= 2 for the contrastive loss) and the default number of iterations.
    lr_g, lr_d, beta1, beta2 : Adam settings of G and D.
    r1_gamma, r1_every : lazy R1 penalty on the reals (gamma 0: off).
    ema_beta : float
        Decay of the moving average of G's weights that samples (0: the raw G).
    checkpoint_every, log_every : ints
        Iterations between checkpoints and between loss-history records.
    explode_threshold : float
        A loss above this (or non-finite) stops training as diverged.
    """

    z_dim: int = 128
    g_channels: tuple[int, int, int] = (128, 128, 64)
    d_width: int = 64
    latent_channels: int = 32
    loss: str = "ns"
    warmup_fraction: float = 0.2
    g_attention: bool = False
    d_reference_attention: bool = False
    noise: bool = True
    augment: str = ""
    attn_patch: int = 5
    attn_reduction: int = 8
    attn_groups: int = 8
    attn_hidden: int = 64
    batch_size: int = 64
    iterations: int = 3000
    lr_g: float = 1e-3
    lr_d: float = 1e-3
    beta1: float = 0.0
    beta2: float = 0.99
    r1_gamma: float = 1.0
    r1_every: int = 4
    ema_beta: float = 0.999
    checkpoint_every: int = 250
    log_every: int = 10
    explode_threshold: float = 1e4

    def __post_init__(self):
        for name, lo in (("z_dim", 1), ("d_width", 1), ("latent_channels", 1), ("attn_reduction", 1),
                         ("attn_groups", 1), ("attn_hidden", 1), ("batch_size", 1), ("iterations", 1),
                         ("r1_every", 1), ("checkpoint_every", 1), ("log_every", 1)):
            if not _is_int(getattr(self, name), lo):
                raise ConfigError(f"GAN config {name} must be an int >= {lo}, got {getattr(self, name)!r}")
        if not (isinstance(self.g_channels, tuple) and len(self.g_channels) == 3
                and all(_is_int(c, 1) for c in self.g_channels)):
            raise ConfigError(f"GAN config g_channels must be a tuple of 3 positive ints (4x4, 8x8, 16x16), "
                              f"got {self.g_channels!r}; e.g. (128, 128, 64)")
        if self.loss not in LOSSES:
            raise ConfigError(f"GAN config loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.loss == "contrastive" and self.batch_size < 2:
            raise ConfigError(f"the dual contrastive loss contrasts each sample against a batch of the other kind: "
                              f"batch_size must be >= 2, got {self.batch_size}; use e.g. 32")
        if not _is_int(self.attn_patch, 1) or self.attn_patch % 2 == 0 or self.attn_patch > 15:
            raise ConfigError(f"GAN config attn_patch must be an odd int in [1, 15], got {self.attn_patch!r}; try 5")
        for name, c in (("g_channels[1]", self.g_channels[1]), ("2 * d_width", 2 * self.d_width)):
            uses = self.g_attention if name.startswith("g") else self.d_reference_attention
            if uses and c % self.attn_groups:
                raise ConfigError(f"GAN config attn_groups = {self.attn_groups} must divide {name} = {c}")
        if not isinstance(self.augment, str):
            raise ConfigError(f"GAN config augment must be a string such as 'flip,translation', got {self.augment!r}")
        try:
            parse_policy(self.augment)
        except ValueError as e:
            raise ConfigError(f"GAN config augment: {e}") from None
        for name in ("g_attention", "d_reference_attention", "noise"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GAN config {name} must be True or False, got {getattr(self, name)!r}")
        checks = (("warmup_fraction", 0, 1, False, True), ("lr_g", 0, 1, True, False), ("lr_d", 0, 1, True, False),
                  ("beta1", 0, 1, False, True), ("beta2", 0, 1, False, True), ("r1_gamma", 0, 1e4, False, False),
                  ("ema_beta", 0, 1, False, True), ("explode_threshold", 0, 1e30, True, False))
        for name, lo, hi, lo_open, hi_open in checks:
            if not _is_num(getattr(self, name), lo, hi, lo_open, hi_open):
                raise ConfigError(f"GAN config {name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                  f"{')' if hi_open else ']'}, got {getattr(self, name)!r}")

    def attention_kwargs(self) -> dict:
        return {"patch": self.attn_patch, "reduction": self.attn_reduction, "groups": self.attn_groups,
                "hidden": self.attn_hidden}

    def warmup_iterations(self, planned: int) -> int:
        """Iterations trained with the NS loss before ``loss`` takes over (0 for loss "ns")."""
        return 0 if self.loss == "ns" else int(round(self.warmup_fraction * planned))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["g_channels"] = list(self.g_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GANConfig":
        d = dict(d)
        if isinstance(d.get("g_channels"), list):
            d["g_channels"] = tuple(d["g_channels"])
        d.setdefault("noise", False)  # written before noise inputs existed
        d.setdefault("augment", "")  # written before augmentation existed
        return cls(**d)


#: named configurations; "small" is the default, "tiny" has half the channels (~4x cheaper)
PRESETS = {
    "small": GANConfig(),
    # tiny: half the channels (~4x cheaper), with what a 2-core pilot found it needs (celeba-1k, FID on
    # 500 faces 178 -> 132 from 3,000 to 12,000 iterations, no collapse; without augmentation and
    # with lr 1e-3 / R1 1, D won within 600 iterations and FID rose): DiffAugment translation +
    # cutout on D's inputs, lr 5e-4 for both, R1 gamma 5
    "tiny": GANConfig(z_dim=64, g_channels=(64, 64, 32), d_width=32, batch_size=32, augment="translation,cutout",
                      lr_g=5e-4, lr_d=5e-4, r1_gamma=5.0),
}


def build_networks(config: GANConfig, seed: int) -> tuple[LatentG, LatentD]:
    """G and D of ``config`` with weights initialised from (seed, "gan-init"), the global RNG untouched."""
    attn = config.attention_kwargs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "gan-init"))
        G = LatentG(config.z_dim, config.g_channels, config.latent_channels, attn if config.g_attention else None,
                    noise=config.noise)
        D = LatentD(config.latent_channels, config.d_width, attn if config.d_reference_attention else None)
    return G, D


def _as_latents(data, name: str) -> torch.Tensor:
    x = getattr(data, "latents", data)
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise InputError(f"{name} must be a LatentSet or a (N, c, h, w) latent tensor, got {type(data).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be floating-point latents, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values; re-encode the photos")
    return x.detach().float().contiguous()


def data_fingerprint(x: torch.Tensor) -> str:
    """sha256 of the latents' bytes (float32, C order): what a checkpoint was trained on."""
    return hashlib.sha256(x.float().contiguous().numpy().tobytes()).hexdigest()


def _bar(total: int, initial: int, progress: bool):
    import sys

    if not (progress and sys.stderr is not None and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="GAN training", unit="it", leave=False)


class LatentGAN:
    """Latent GAN. Learned state (set by fit or load): ``G_`` (the EMA generator, eval mode),
    ``mean_`` (c, h, w) and ``std_`` (c,) of the training latents, ``latent_shape_``,
    ``provenance_``, ``history_`` (loss records every ``log_every`` iterations)."""

    def __init__(self, config: GANConfig | None = None):
        self.config = config or GANConfig()
        if not isinstance(self.config, GANConfig):
            raise InputError(f"config must be a GANConfig, got {type(self.config).__name__}")
        self.G_: LatentG | None = None
        self.mean_: torch.Tensor | None = None
        self.std_: torch.Tensor | None = None
        self.latent_shape_: tuple[int, int, int] | None = None
        self.provenance_: dict = {}
        self.history_: list = []

    # ------------------------------------------------------------------ checks
    def expected_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, *LATENT_HW)

    def _check_data(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape[1:])
        if shape != self.expected_shape():
            c, h, w = self.expected_shape()
            raise InputError(f"latents have shape {shape}, this GAN is built for ({c}, {h}, {w}) (TAEF2 latents of "
                             f"{8 * h}-px photos); encode the photos at {8 * h} px (`--size {8 * h}`)")
        N, B = x.shape[0], self.config.batch_size
        if N < B:
            raise InputError(f"{N} training latents is fewer than the batch size {B}; add photos (a GAN wants "
                             f"thousands) or lower batch_size")
        if N < MIN_LATENTS_WARN:
            warnings.warn(f"training a GAN on {N} latents (fewer than {MIN_LATENTS_WARN}): expect mode collapse and "
                          "memorised photos; LR-GMM-NN (`faceprint fit`) suits few photos better", SmallDataWarning,
                          stacklevel=3)

    def _check_fitted(self):
        if self.G_ is None:
            raise NotFittedError("LatentGAN is not fitted; call fit(latents, seed=...) or LatentGAN.load(path)")

    # ------------------------------------------------------------------ training
    def fit(self, data, *, seed: int = 0, iterations: int | None = None, max_seconds: float | None = None,
            until: int | None = None, checkpoint=None, resume: bool = False, progress: bool = False,
            callback=None) -> "LatentGAN":
        """Train on latents (a LatentSet or an (N, c, 16, 16) tensor).

        Parameters
        ----------
        seed : int
            Seeds the initialisation and every draw of training (module docstring).
        iterations : int, optional
            Planned iterations (default ``config.iterations``; with ``max_seconds`` and no
            ``iterations``: as many as the measured speed of the first 10 fits in the time).
            The warm-up is a share of this plan.
        max_seconds : float, optional
            Stop (with a checkpoint) when training took this long, even before the plan ends.
        until : int, optional
            Stop after this iteration (the plan, and so the schedule, stays ``iterations``);
            continue later with ``resume=True``. Used for training curves.
        checkpoint : path, optional
            Checkpoint file (.safetensors) written every ``checkpoint_every`` iterations and at the end.
        resume : bool
            Continue from ``checkpoint`` if it exists (refused if it was made with another
            config, seed or data).
        progress : bool
            A progress bar on a terminal (iteration, losses, time left).
        callback : callable(iteration, info dict), optional
            Called after every checkpoint-sized stretch and at the end (for benchmarks).
        """
        check_seed(seed)
        cfg = self.config
        x = _as_latents(data, "data")
        self._check_data(x)
        if iterations is not None and not _is_int(iterations, 1):
            raise InputError(f"iterations must be an int >= 1, got {iterations!r}")
        if iterations is not None and iterations > MAX_ITERATIONS:
            raise InputError(f"iterations must be at most {MAX_ITERATIONS}, got {iterations}")
        if max_seconds is not None and not _is_num(max_seconds, 0, 1e9, lo_open=True):
            raise InputError(f"max_seconds must be a positive number, got {max_seconds!r}")
        if until is not None and not _is_int(until, 1):
            raise InputError(f"until must be an int >= 1, got {until!r}")
        if resume and checkpoint is None:
            raise InputError("resume=True needs checkpoint= (the file to resume from)")
        N = x.shape[0]
        c = x.shape[1]
        fingerprint = data_fingerprint(x)
        mean = x.mean(0)  # (c, h, w)
        std = (x - mean).pow(2).mean((0, 2, 3)).sqrt().clamp_min(1e-6)  # (c,)
        X = (x - mean) / std[:, None, None]  # (N, c, h, w) whitened

        G, D = build_networks(cfg, seed)
        G_ema = copy.deepcopy(G).eval()
        for p in G_ema.parameters():
            p.requires_grad_(False)
        opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
        start, planned, history, train_seconds = 0, iterations, [], 0.0
        from pathlib import Path

        ckpt_path = Path(checkpoint) if checkpoint is not None else None
        resumed_from = None
        if resume and ckpt_path is not None and ckpt_path.exists():
            state = _read_checkpoint(ckpt_path)
            meta = state["meta"]
            for field, mine in (("config", cfg.to_dict()), ("seed", seed), ("data_sha256", fingerprint)):
                if meta.get(field) != mine:
                    raise InputError(f"checkpoint {str(ckpt_path)!r} was made with another {field} "
                                     f"({_short(meta.get(field))} vs {_short(mine)}); resume with the same settings "
                                     "and photos, or delete the checkpoint to start over")
            if iterations is not None and meta["planned"] != iterations:
                raise InputError(f"checkpoint {str(ckpt_path)!r} plans {meta['planned']} iterations, got iterations="
                                 f"{iterations}; resume with the same plan")
            G.load_state_dict(state["G"])
            D.load_state_dict(state["D"])
            G_ema.load_state_dict(state["G_ema"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            start, planned = int(meta["iteration"]), int(meta["planned"])
            history, train_seconds = list(meta["history"]), float(meta["train_seconds"])
            resumed_from = start
        if planned is None and max_seconds is None:
            planned = cfg.iterations
        d_ns, g_ns = losses_for("ns")
        d_main, g_main = losses_for(cfg.loss)
        policy = parse_policy(cfg.augment)
        B = cfg.batch_size
        perms: dict[int, torch.Tensor] = {}

        def batch_indices(it: int) -> torch.Tensor:
            pos = torch.arange((it - 1) * B, it * B)
            epochs = pos // N
            out = torch.empty(B, dtype=torch.int64)
            for e in epochs.unique().tolist():
                if e not in perms:
                    if len(perms) > 2:
                        perms.clear()
                    perms[e] = torch.randperm(N, generator=make_generator(seed, "gan-epoch", e))
                sel = epochs == e
                out[sel] = perms[e][pos[sel] % N]
            return out

        def snapshot(it):
            return {"G": copy.deepcopy(G.state_dict()), "D": copy.deepcopy(D.state_dict()),
                    "G_ema": copy.deepcopy(G_ema.state_dict()), "opt_g": copy.deepcopy(opt_g.state_dict()),
                    "opt_d": copy.deepcopy(opt_d.state_dict()), "iteration": it, "history": list(history),
                    "train_seconds": train_seconds}

        def write(snap):
            if ckpt_path is None:
                return
            _write_checkpoint(ckpt_path, snap, cfg, seed, fingerprint, planned, N)

        good = snapshot(start)
        stopped = None
        bar = _bar(planned, start, progress) if planned is not None else None  # unplanned: after the timing
        t_run = time.perf_counter()
        seconds_before = train_seconds
        acc = {"loss_d": 0.0, "loss_g": 0.0, "r1": 0.0, "n": 0}
        it = start
        t_cal = None
        try:
            while True:
                if planned is not None and it >= planned:
                    break
                if until is not None and it >= until:
                    break
                it += 1
                if planned is None and it == 1:
                    t_cal = time.perf_counter()
                warm = cfg.warmup_iterations(planned) if planned is not None else it + 1  # unplanned: still NS
                kind = cfg.loss if (cfg.loss != "ns" and it > warm) else "ns"
                d_fn, g_fn = (d_main, g_main) if kind == cfg.loss else (d_ns, g_ns)
                G.train()
                D.train()
                real = X[batch_indices(it)]
                ref = None
                if D.uses_reference:
                    ref = X[torch.randint(N, (B,), generator=make_generator(seed, "gan-ref", it))]
                z_d = torch.randn(B, cfg.z_dim, generator=make_generator(seed, "gan-zd", it))
                z_g = torch.randn(B, cfg.z_dim, generator=make_generator(seed, "gan-zg", it))
                n_d = n_g = None
                if G.n_noise:
                    n_d = torch.randn(B, G.n_noise, *LATENT_HW, generator=make_generator(seed, "gan-nd", it))
                    n_g = torch.randn(B, G.n_noise, *LATENT_HW, generator=make_generator(seed, "gan-ng", it))

                # ---- discriminator step
                for p in D.parameters():
                    p.requires_grad_(True)
                with torch.no_grad():
                    fake = G(z_d, n_d)
                r1_step = cfg.r1_gamma > 0 and it % cfg.r1_every == 0
                if r1_step:
                    real = real.detach().requires_grad_(True)
                d_real = D(augment(real, policy, make_generator(seed, "gan-aug-real", it)), ref)
                d_fake = D(augment(fake, policy, make_generator(seed, "gan-aug-fake", it)), ref)
                loss_d = d_fn(d_real, d_fake)
                r1 = torch.zeros(())
                if r1_step:
                    (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
                    r1 = grad.pow(2).sum((1, 2, 3)).mean()
                    loss_total_d = loss_d + 0.5 * cfg.r1_gamma * cfg.r1_every * r1
                else:
                    loss_total_d = loss_d
                opt_d.zero_grad(set_to_none=True)
                loss_total_d.backward()
                opt_d.step()

                # ---- generator step
                for p in D.parameters():
                    p.requires_grad_(False)
                fake = G(z_g, n_g)
                d_fake_g = D(augment(fake, policy, make_generator(seed, "gan-aug-g", it)), ref)
                if kind == "contrastive":
                    with torch.no_grad():
                        d_real_g = D(augment(real.detach(), policy, make_generator(seed, "gan-aug-real", it)), ref)
                else:
                    d_real_g = d_fake_g.detach()  # unused by the NS and hinge generator losses
                loss_g = g_fn(d_real_g, d_fake_g)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()

                # ---- EMA of G (ramped up at the start, as a short average is better then)
                beta = min(cfg.ema_beta, (1 + it) / (10 + it)) if cfg.ema_beta > 0 else 0.0
                with torch.no_grad():
                    for pe, p in zip(G_ema.parameters(), G.parameters()):
                        pe.lerp_(p.detach(), 1 - beta)

                ld, lg, lr1 = float(loss_d.detach()), float(loss_g.detach()), float(r1.detach())
                bad = [(n, v) for n, v in (("loss_d", ld), ("loss_g", lg), ("r1", lr1))
                       if not math.isfinite(v) or abs(v) > cfg.explode_threshold]
                if bad:
                    stopped = {"reason": "diverged", "iteration": it, "losses": {n: v for n, v in bad},
                               "restored_iteration": good["iteration"]}
                    break
                acc["loss_d"] += ld
                acc["loss_g"] += lg
                acc["r1"] += lr1
                acc["n"] += 1
                if it % cfg.log_every == 0:
                    n = acc["n"]
                    history.append({"iteration": it, "loss": kind, "loss_d": acc["loss_d"] / n,
                                    "loss_g": acc["loss_g"] / n, "r1": acc["r1"] / n})
                    acc = {"loss_d": 0.0, "loss_g": 0.0, "r1": 0.0, "n": 0}
                train_seconds = seconds_before + time.perf_counter() - t_run
                if planned is None and it == CALIBRATION_ITERATIONS:
                    per = (time.perf_counter() - t_cal) / CALIBRATION_ITERATIONS
                    left = max_seconds - train_seconds
                    planned = int(min(MAX_ITERATIONS, max(it, it + math.floor(0.97 * left / per))))
                    bar = _bar(planned, it - 1, progress)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{kind} D {ld:.3f} G {lg:.3f}")
                if it % cfg.checkpoint_every == 0:
                    good = snapshot(it)
                    write(good)
                    if callback is not None:
                        callback(it, {"history": history})
                if max_seconds is not None and train_seconds >= max_seconds and (planned is None or it < planned):
                    stopped = {"reason": "time", "iteration": it, "max_seconds": max_seconds}
                    break
        finally:
            if bar is not None:
                bar.close()
        if stopped is not None and stopped["reason"] == "diverged":
            if good["iteration"] == 0 and resumed_from is None:
                raise TrainingDivergedError(
                    f"GAN training diverged at iteration {stopped['iteration']} ({_losses_text(stopped['losses'])}) "
                    f"before the first checkpoint (every {cfg.checkpoint_every} iterations); lower lr_g/lr_d, raise "
                    "r1_gamma or use loss='ns'")
            G.load_state_dict(good["G"])
            D.load_state_dict(good["D"])
            G_ema.load_state_dict(good["G_ema"])
            history = good["history"]
            train_seconds = good["train_seconds"]
            it = good["iteration"]
            warnings.warn(f"GAN training stopped: the loss diverged at iteration {stopped['iteration']} "
                          f"({_losses_text(stopped['losses'])}); kept the last good checkpoint (iteration {it})"
                          + (f" in {str(ckpt_path)!r}" if ckpt_path else ""), TrainingDivergedWarning, stacklevel=2)
        else:
            if planned is None:  # a time budget shorter than the calibration
                planned = it
            final = snapshot(it)
            final["train_seconds"] = train_seconds
            if ckpt_path is not None and (it % cfg.checkpoint_every != 0 or it == start):
                write(final)
            if callback is not None and it % cfg.checkpoint_every != 0:
                callback(it, {"history": history})

        self.G_ = G_ema if cfg.ema_beta > 0 else copy.deepcopy(G).eval()
        self.G_.eval()
        self.mean_, self.std_ = mean.contiguous(), std.contiguous()
        self.latent_shape_ = (c, *LATENT_HW)
        self.history_ = history
        G_probe = LatentG(cfg.z_dim, cfg.g_channels, cfg.latent_channels,
                          cfg.attention_kwargs() if cfg.g_attention else None, noise=cfg.noise)
        self.provenance_ = {
            "faceprint_version": __version__,
            "torch_version": torch.__version__,
            "created": now_iso(),
            "seed": seed,
            "n_latents": N,
            "data_hash": str(getattr(data, "data_hash", "") or ""),
            "data_sha256": fingerprint,
            "iterations": it,
            "planned_iterations": planned,
            "warmup_iterations": cfg.warmup_iterations(planned),
            "resumed_from": resumed_from,
            "stopped": stopped,
            "train_seconds": round(train_seconds, 3),
            "threads": torch.get_num_threads(),
            "g_parameters": count_params(G_probe),
            "d_parameters": count_params(D),
            "g_macs_per_sample": macs_per_sample(G_probe, torch.zeros(1, cfg.z_dim)),
            "operations": [],
        }
        return self

    # ------------------------------------------------------------------ sampling
    def draw(self, indices, seed: int, attempt: int = 0) -> torch.Tensor:
        """Latents (len(indices), c, h, w) of image indices of the run seeded by ``seed``; ``attempt``
        > 0 gives the indices' other draws (the copy guard's redraws). Blocks of 16 keep every
        image bit-identical whatever it is drawn with."""
        self._check_fitted()
        idx = [int(i) for i in indices]
        c, h, w = self.latent_shape_
        if not idx:
            return torch.zeros(0, c, h, w)
        out = {}
        with torch.no_grad():
            for blk in sorted({i // SAMPLE_BLOCK for i in idx}):
                ids = range(blk * SAMPLE_BLOCK, (blk + 1) * SAMPLE_BLOCK)
                zs, ns = [], []
                for i in ids:  # z, then the noise planes, from the image's own generator
                    g = make_generator(seed, "gan", i, attempt) if attempt else make_generator(seed, "gan", i)
                    zs.append(torch.randn(self.config.z_dim, generator=g))
                    if self.G_.n_noise:
                        ns.append(torch.randn(self.G_.n_noise, *LATENT_HW, generator=g))
                y = self.G_(torch.stack(zs), torch.stack(ns) if ns else None)
                y = y * self.std_[:, None, None] + self.mean_  # (16, c, h, w)
                for j, i in enumerate(ids):
                    out[i] = y[j]
        return torch.stack([out[i] for i in idx])

    def sample_latents(self, n: int, *, seed: int, start: int = 0):
        """n latents for image indices start..start+n-1 of seed: Samples (no components, no provenance)."""
        from ..latent.generator import Samples

        self._check_fitted()
        check_seed(seed)
        if not _is_int(n, 0):
            raise InputError(f"n must be a non-negative int, got {n!r}")
        if not _is_int(start, 0):
            raise InputError(f"start must be a non-negative int, got {start!r}")
        _, h, w = self.latent_shape_
        return Samples(latents=self.draw(range(start, start + n), seed), components=torch.full((n,), -1),
                       provenance=torch.full((n, h, w), -1, dtype=torch.int64), indices=torch.arange(start, start + n))

    # ------------------------------------------------------------------ persistence
    def state_tensors(self, prefix: str = "gan.") -> dict[str, torch.Tensor]:
        self._check_fitted()
        t = {prefix + "g." + k: v.detach().contiguous() for k, v in self.G_.state_dict().items()}
        t[prefix + "mean"] = self.mean_
        t[prefix + "std"] = self.std_
        return t

    def meta(self) -> dict:
        self._check_fitted()
        return {"class": ARTIFACT_CLASS, "config": self.config.to_dict(), "latent_shape": list(self.latent_shape_),
                "provenance": self.provenance_, "history": self.history_}

    @classmethod
    def from_state(cls, meta: dict, tensors: dict, prefix: str = "gan.", *, where: str = "model file") -> "LatentGAN":
        """Rebuild from :meth:`meta` and :meth:`state_tensors` (strict shapes; finite values)."""
        try:
            config = GANConfig.from_dict(meta["config"])
            m = cls(config)
            shape = tuple(int(v) for v in meta["latent_shape"])
            if shape != m.expected_shape():
                raise ValueError(f"latent_shape {shape} does not match the config's {m.expected_shape()}")
            G, _ = build_networks(config, 0)
            state = {k[len(prefix) + 2:]: v for k, v in tensors.items() if k.startswith(prefix + "g.")}
            G.load_state_dict(state, strict=True)
            mean, std = tensors[prefix + "mean"].float(), tensors[prefix + "std"].float()
            if tuple(mean.shape) != shape or tuple(std.shape) != (shape[0],):
                raise ValueError(f"mean/std have shapes {tuple(mean.shape)}/{tuple(std.shape)}, expected {shape}/"
                                 f"({shape[0]},)")
            for name, v in [("mean", mean), ("std", std), *state.items()]:
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"tensor {prefix}{name} holds NaN or infinite values")
            if not bool((std > 0).all()):
                raise ValueError(f"tensor {prefix}std holds non-positive values")
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as e:
            raise ArtifactError(f"{where}: the GAN is incomplete or inconsistent ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); re-create it with "
                                "`faceprint fit --method gan`") from None
        m.G_ = G.eval()
        for p in m.G_.parameters():
            p.requires_grad_(False)
        m.mean_, m.std_, m.latent_shape_ = mean, std, shape
        m.provenance_ = meta.get("provenance") or {}
        m.history_ = meta.get("history") or []
        return m

    def save(self, path) -> None:
        """One .safetensors artifact (the EMA generator's weights, the data whitening; config,
        provenance and loss history as JSON), written atomically."""
        save_artifact(path, self.state_tensors(), self.meta())

    @classmethod
    def load(cls, path) -> "LatentGAN":
        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        return cls.from_state(meta, tensors, where=f"model file {str(path)!r}")

    def record_operation(self, op: dict) -> None:
        entry = {"when": now_iso(), "faceprint_version": __version__, **op}
        self.provenance_ = dict(self.provenance_)
        self.provenance_["operations"] = list(self.provenance_.get("operations", [])) + [entry]

    def with_config(self, **changes) -> GANConfig:
        return replace(self.config, **changes)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _losses_text(losses: dict) -> str:
    return ", ".join(f"{k} = {v:.4g}" for k, v in losses.items())


# ---------------------------------------------------------------------- checkpoints
def _write_checkpoint(path, snap: dict, cfg: GANConfig, seed: int, fingerprint: str, planned, n: int) -> None:
    tensors = {}
    for part in ("G", "D", "G_ema"):
        tensors.update({f"{part}.{k}": v.detach().contiguous() for k, v in snap[part].items()})
    meta = {"class": CHECKPOINT_CLASS, "config": cfg.to_dict(), "seed": seed, "data_sha256": fingerprint,
            "n_latents": n, "iteration": snap["iteration"], "planned": planned, "history": snap["history"],
            "train_seconds": snap["train_seconds"], "created": now_iso(), "torch_version": torch.__version__,
            "threads": torch.get_num_threads()}
    for name in ("opt_g", "opt_d"):
        t, groups = optimizer_tensors(name + ".state", snap[name])
        tensors.update(t)
        meta[name] = {"param_groups": groups}
    save_artifact(path, tensors, meta)


def _read_checkpoint(path) -> dict:
    tensors, meta = load_artifact(path, expected_class=CHECKPOINT_CLASS)
    try:
        out = {"meta": meta}
        for part in ("G", "D", "G_ema"):
            out[part] = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        for name in ("opt_g", "opt_d"):
            out[name] = optimizer_state(name + ".state", tensors, meta[name]["param_groups"])
        for key in ("iteration", "planned", "history", "train_seconds", "config", "seed", "data_sha256"):
            meta[key]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"checkpoint {str(path)!r} is incomplete ({e.__class__.__name__}: {e}); delete it to "
                            "start over") from None
    return out


# ---------------------------------------------------------------------- inside a Generator
def fit_gan_generator(latent_set, autoencoder, *, config: GANConfig | None = None, generator_config=None,
                      seed: int = 0, iterations: int | None = None, max_seconds: float | None = None,
                      checkpoint=None, resume: bool = False, progress: bool = False, callback=None):
    """A :class:`faceprint.latent.generator.Generator` whose default method is this GAN.

    The Generator artifact keeps its usual parts (the training latents as the bank, the copy
    guard's statistics and an LR-GMM fitted with ``generator_config``, the other methods and
    the schema every command reads), and adds the GAN as ``latent_model_`` (tensors ``gan.*``,
    metadata ``latent_model``). ``generate``, ``evaluate``, ``inspect`` and the copy guard then
    work on GAN faces like on every model; ``generate --provenance`` is refused (nothing is copied).
    The GAN is checked against the data before anything is fitted, and trained last."""
    from ..latent.generator import Generator, GeneratorConfig, auto_components

    gan = LatentGAN(config)
    x = _as_latents(latent_set, "latent_set")
    gan._check_data(x)
    gcfg = generator_config or GeneratorConfig()
    K = gcfg.components or auto_components(x.shape[0])
    if K > x.shape[0]:
        raise ConfigError(f"components = {K} exceeds the number of photos ({x.shape[0]}); use fewer components")
    if not hasattr(latent_set, "latents"):  # a bare tensor: no names or hashes to record
        latent_set = type("Latents", (), {"latents": x})()
    t0 = time.perf_counter()
    gen = Generator(gcfg, autoencoder=autoencoder).fit(latent_set, seed=seed)
    t_lrgmm = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallDataWarning)  # already said by _check_data
        gan.fit(latent_set, seed=seed, iterations=iterations, max_seconds=max_seconds, checkpoint=checkpoint,
                resume=resume, progress=progress, callback=callback)
    gen.latent_model_ = gan
    gen.provenance_ = dict(gen.provenance_)
    gen.provenance_["latent_model"] = {"class": ARTIFACT_CLASS, "method": "gan", "loss": gan.config.loss,
                                       "g_attention": gan.config.g_attention,
                                       "d_reference_attention": gan.config.d_reference_attention,
                                       "iterations": gan.provenance_["iterations"],
                                       "train_seconds": gan.provenance_["train_seconds"],
                                       "stopped": gan.provenance_["stopped"]}
    gen.provenance_["fit_seconds"] = dict(gen.provenance_.get("fit_seconds", {}), lrgmm=round(t_lrgmm, 4),
                                          gan=gan.provenance_["train_seconds"])
    return gen
