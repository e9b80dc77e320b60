"""The backward projector B: any image -> the decoder's value-layer features (papers/001, Sec. 4.1,
Fig. 2; Semi-Cycle-Consistency Sec. 4.1.2; adversarial loss Sec. 4.1.1).

A GAN has no encoder, so the paper trains B from scratch: a down-sampling encoder followed by a
"feature alignment module" of residual blocks. TAEF2 has an encoder, which gives B for free:

    B0(x) = head_m(TAEF2.encode(x))        (head_m = decoder modules 0..m, frozen)

It restores images at about the TAEF2 round trip (docs/TAEF2.md: 34 dB on faces) and, the
encoder being generic, handles out-of-domain images. The paper's projector is built on it:

    B(x) = A(B0(x)),   A = residual blocks at the value layer (conv3x3-ReLU-conv3x3 + skip; the
                           last conv of each block starts at zero, so A starts as the identity)

trained on the model's own samples (x = decode(z), v = head_m(z)), no other data, with

    L_feat = ||A(B0(x)) - v||^2                                   (feature loss, Sec. 4.1)
    L_adv  = (D(A(B0(x))) - 1)^2, D trained on (D(v) - 1)^2 + D(A(B0(x)))^2
             (least-squares GAN with a small convolutional critic on the features, Sec. 4.1.1)
    L_scc  = |tail(B(x)) - x|_1 + (1 - SSIM(tail(B(x)), x))       (Semi-Cycle-Consistency, Sec. 4.1.2)
    L_B    = lambda_feat L_feat + lambda_adv L_adv + lambda_scc L_scc

The text stripped the lambdas. Ours: lambda_feat = 1, lambda_adv = 0.01, lambda_scc = 1 (the
feature loss of a random A is ~1e-2 per element, the L1 + SSIM term ~1e-1; the critic's term
is kept small so it shapes the distribution without outweighing the two reconstruction terms).
The semi-cycle loss runs the decoder tail on random crops of the value map (``crop`` cells
plus a ``margin`` of context on each side, scored on the centre only) to keep the CPU cost at
a fraction of a full decode.

Variants (the Table 1 ablation): losses ("feature",), ("feature", "scc"),
("feature", "scc", "adv"); and B0 (no A). Weights (A only, ~150k parameters, no image content)
are one safetensors file with the layer, variant, steps, seed and the digest of the decoder
head they were trained against.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArtifactError, ConfigError, InputError, TrainingDivergedError
from ..io import load_artifact, now_iso, optimizer_state, optimizer_tensors, save_artifact
from ..seeding import check_seed
from ..seeding import generator as make_generator
from .layers import head, layer_name, modules_digest, resolve_layer, tail, value_scale

ARTIFACT_CLASS = "faceprint.rewrite.BackwardProjector"
CHECKPOINT_CLASS = "faceprint.rewrite.ProjectorCheckpoint"
LOSSES = ("feature", "scc", "adv")
VARIANTS = {"feature": ("feature",), "feature+scc": ("feature", "scc"), "feature+scc+adv": ("feature", "scc", "adv")}
PACKAGED = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ProjectorConfig:
    """layer: value layer ('16x16', '32x32' or a block index); blocks: residual blocks of A
    (0 = B0); losses: subset of LOSSES with "feature" always in it; the loss weights; steps,
    batch and learning rate; crop/margin of the semi-cycle loss in value-layer cells."""

    layer: str | int = "16x16"
    blocks: int = 2
    losses: tuple = ("feature", "scc", "adv")
    lambda_feat: float = 1.0
    lambda_adv: float = 0.01
    lambda_scc: float = 1.0
    steps: int = 1000
    batch: int = 8
    scc_batch: int = 4
    lr: float = 2e-4
    crop: int = 6
    margin: int = 2
    checkpoint_every: int = 50

    def __post_init__(self):
        resolve_layer(self.layer)
        object.__setattr__(self, "losses", tuple(self.losses))
        if not self.losses or "feature" not in self.losses or any(x not in LOSSES for x in self.losses):
            raise ConfigError(f"losses must include 'feature' and be drawn from {LOSSES}, got {self.losses!r}")
        for name, lo in (("blocks", 0), ("steps", 0), ("batch", 1), ("scc_batch", 1), ("crop", 1), ("margin", 0),
                         ("checkpoint_every", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"projector {name} must be an int >= {lo}, got {v!r}")
        for name in ("lambda_feat", "lambda_adv", "lambda_scc", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v != v or v == float("inf"):
                raise ConfigError(f"projector {name} must be a finite number >= 0, got {v!r}")

    @property
    def module(self) -> int:
        return resolve_layer(self.layer)

    @property
    def variant(self) -> str:
        return "+".join(self.losses) if self.blocks else "encoder-only"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["losses"] = list(self.losses)
        return d


class Alignment(nn.Module):
    """The feature alignment module: ``blocks`` residual blocks at 64 channels, identity at start."""

    def __init__(self, blocks: int = 2, channels: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            b = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(channels, channels, 3, padding=1))
            nn.init.zeros_(b[2].weight)
            nn.init.zeros_(b[2].bias)
            self.blocks.append(b)

    def forward(self, f):
        for b in self.blocks:
            f = f + b(f)
        return f


class FeatureCritic(nn.Module):
    """D of the adversarial loss: value-layer features (N, 64, s, s) -> a score map."""

    def __init__(self, channels: int = 64, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, f):
        return self.net(f)


class BackwardProjector:
    """B(x) = A(head_m(TAEF2.encode(x))); with no A (``blocks`` = 0) it is B0.

    ``features(images)`` (N, 3, S, S) in [0, 1] -> (N, 64, s, s); ``restore(images)`` decodes them
    back through the decoder tail (the semi-cycle)."""

    def __init__(self, autoencoder, config: ProjectorConfig | None = None, alignment: Alignment | None = None):
        self.config = config or ProjectorConfig(blocks=0)
        self.autoencoder = autoencoder
        self.m = self.config.module
        self.alignment = alignment if alignment is not None else (
            Alignment(self.config.blocks) if self.config.blocks else None)
        self.provenance_: dict = {}

    @classmethod
    def free(cls, autoencoder, layer="16x16") -> "BackwardProjector":
        """B0: the TAEF2 encoder followed by the decoder's first modules; nothing trained."""
        return cls(autoencoder, ProjectorConfig(layer=layer, blocks=0, losses=("feature",)))

    @property
    def decoder(self) -> nn.Sequential:
        return self.autoencoder.decoder

    @property
    def name(self) -> str:
        return self.config.variant

    @torch.no_grad()
    def base_features(self, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
        """B0(images): (N, 64, s, s) float32."""
        z = self.autoencoder.encode(images.float())
        hd = head(self.decoder, self.m).eval()
        return torch.cat([hd(z[i:i + batch]) for i in range(0, z.shape[0], batch)])

    def align(self, b0: torch.Tensor) -> torch.Tensor:
        return b0 if self.alignment is None else self.alignment(b0)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
        b0 = self.base_features(images, batch)
        if self.alignment is None:
            return b0
        self.alignment.eval()
        return torch.cat([self.alignment(b0[i:i + batch]) for i in range(0, b0.shape[0], batch)])

    @torch.no_grad()
    def restore(self, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """tail(B(images)) clamped to [0, 1]: what the decoder makes of the projected features."""
        f = self.features(images)
        tl = tail(self.decoder, self.m).eval()
        return torch.cat([tl(f[i:i + batch]).clamp(0, 1) for i in range(0, f.shape[0], batch)])

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        if self.alignment is None:
            raise InputError("B0 (the free projector) has no weights to save")
        tensors = {f"alignment.{k}": v for k, v in self.alignment.state_dict().items()}
        meta = {"class": ARTIFACT_CLASS, "config": self.config.to_dict(), "layer_module": self.m,
                "head_digest": modules_digest(self.decoder, self.m),
                "autoencoder": getattr(self.autoencoder, "base_id", getattr(self.autoencoder, "id", None)),
                "provenance": self.provenance_}
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path, autoencoder, *, check_head: bool = True) -> "BackwardProjector":
        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        try:
            cfg = dict(meta["config"])
            cfg["losses"] = tuple(cfg["losses"])
            config = ProjectorConfig(**cfg)
            al = Alignment(config.blocks)
            al.load_state_dict({k[len("alignment."):]: v for k, v in tensors.items() if k.startswith("alignment.")},
                               strict=True)
        except (KeyError, TypeError, RuntimeError, ConfigError) as e:
            raise ArtifactError(f"projector file {str(path)!r} is incomplete or inconsistent ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); train it again") from None
        p = cls(autoencoder, config, al.eval())
        p.provenance_ = meta.get("provenance") or {}
        want = meta.get("head_digest")
        if check_head and want and want != modules_digest(autoencoder.decoder, p.m):
            raise InputError(f"projector {str(path)!r} was trained for other decoder weights up to layer "
                             f"{layer_name(p.m)} than this model's (an earlier rewrite changed them); use the free "
                             "projector (--projector free) or train one for this model")
        return p


def packaged_path(layer) -> Path:
    """Where the shipped projector weights for a value layer live (if trained and shipped)."""
    return PACKAGED / f"projector-{layer_name(resolve_layer(layer))}.safetensors"


def load_projector(spec, autoencoder, layer) -> BackwardProjector:
    """'free' -> B0; 'trained' -> the packaged weights (error if absent); 'auto' -> packaged if
    present and made for this decoder, else B0; anything else is a file path."""
    m = resolve_layer(layer)
    if spec in (None, "auto"):
        path = packaged_path(m)
        if path.is_file():
            try:
                p = BackwardProjector.load(path, autoencoder)
                if p.m == m:
                    return p
            except InputError:
                pass
        return BackwardProjector.free(autoencoder, m)
    if spec == "free":
        return BackwardProjector.free(autoencoder, m)
    path = packaged_path(m) if spec == "trained" else Path(spec)
    if not path.is_file():
        raise InputError(f"--projector {spec!r}: no projector weights at {str(path)!r}; train them with "
                         "`python -m faceprint.bench rewrite --train-projector` or use --projector free")
    p = BackwardProjector.load(path, autoencoder)
    if p.m != m:
        raise InputError(f"--projector {str(path)!r} projects to layer {layer_name(p.m)}, but the rewrite is at "
                         f"{layer_name(m)}; pass a projector for that layer or change --layer")
    return p


# ---------------------------------------------------------------------------------------- losses
def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from ..mixing.evaluation import ssim

    return ssim(a, b)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of images in [0, 1]: (N,)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


class _State:
    def __init__(self, config: ProjectorConfig, seed: int):
        # every parameter is set here from (seed, "projector-init"): the modules' default
        # initialisation (global RNG) is overwritten, so the run depends on the seed only
        g = make_generator(seed, "projector-init")
        self.alignment = Alignment(config.blocks)
        self.critic = FeatureCritic() if "adv" in config.losses else None
        zero = {id(b[2].weight) for b in self.alignment.blocks}  # the residual branches start at zero
        for mod in (self.alignment, self.critic):
            if mod is None:
                continue
            with torch.no_grad():
                for p in mod.parameters():
                    if p.dim() > 1 and id(p) not in zero:
                        p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5 * 0.5)
                    else:
                        p.zero_()
        self.opt = torch.optim.Adam(self.alignment.parameters(), lr=config.lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=config.lr, betas=(0.5, 0.999)) if self.critic else None
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict] = []

    def modules(self):
        out = {"alignment": self.alignment}
        if self.critic is not None:
            out["critic"] = self.critic
        return out

    def opts(self):
        out = {"opt": self.opt}
        if self.opt_d is not None:
            out["opt_d"] = self.opt_d
        return out

    def save(self, path, config: ProjectorConfig, seed: int, data_hash: str) -> None:
        tensors, groups = {}, {}
        for name, mod in self.modules().items():
            tensors.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
        for oname, opt in self.opts().items():
            t, groups[oname] = optimizer_tensors(oname, opt.state_dict())
            tensors.update(t)
        save_artifact(path, tensors, {"class": CHECKPOINT_CLASS, "config": config.to_dict(), "seed": seed,
                                      "data_hash": data_hash, "step": self.step, "seconds": self.seconds,
                                      "history": self.history, "param_groups": groups, "created": now_iso()})

    @classmethod
    def load(cls, path, config: ProjectorConfig, seed: int, data_hash: str) -> "_State":
        tensors, meta = load_artifact(path, expected_class=CHECKPOINT_CLASS)
        mine = config.to_dict()
        theirs = dict(meta.get("config") or {})
        mine.pop("steps"), theirs.pop("steps", None)
        if theirs != mine or meta.get("seed") != seed or meta.get("data_hash") != data_hash:
            raise InputError(f"checkpoint {str(path)!r} belongs to another run (settings, seed or data differ); "
                             "delete it or choose another --out")
        s = cls(config, seed)
        try:
            for name, mod in s.modules().items():
                pre = name + "."
                mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, strict=True)
            for oname, opt in s.opts().items():
                opt.load_state_dict(optimizer_state(oname, tensors, meta["param_groups"][oname]))
        except (KeyError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"checkpoint {str(path)!r} is inconsistent ({e.__class__.__name__}); delete it") from None
        s.step, s.seconds = int(meta["step"]), float(meta.get("seconds", 0.0))
        s.history = list(meta.get("history") or [])
        return s


def data_digest(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_projector(autoencoder, latents: torch.Tensor, images: torch.Tensor, *, config: ProjectorConfig,
                    seed: int = 0, checkpoint=None, resume: bool = True, max_seconds: float | None = None,
                    base: torch.Tensor | None = None, values: torch.Tensor | None = None,
                    progress=None) -> BackwardProjector:
    """Train A on the model's own samples: ``latents`` (N, 32, h, w) and their decoded ``images``
    (N, 3, S, S) in [0, 1] (or uint8). ``base`` = B0(images) and ``values`` = head_m(latents) may be
    given precomputed. Resumable from ``checkpoint``; stops after ``max_seconds`` (the returned
    projector's provenance says how many steps it has). Each step's draws come from (seed, step),
    so an interrupted and resumed run equals an uninterrupted one."""
    check_seed(seed)
    if config.blocks == 0:
        raise ConfigError("a projector with 0 alignment blocks is B0: nothing to train")
    N = latents.shape[0]
    if images.shape[0] != N or N < 2:
        raise InputError(f"need the same number (>= 2) of latents and images, got {N} and {images.shape[0]}")
    m = config.module
    dec = autoencoder.decoder.eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    proj = BackwardProjector(autoencoder, config)
    if base is None:
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        base = proj.base_features(x)
    if values is None:
        with torch.no_grad():
            hd = head(dec, m)
            values = torch.cat([hd(latents[i:i + 32].float()) for i in range(0, N, 32)])
    digest = data_digest(latents[: min(N, 64)], base[: min(N, 64)])
    state = None
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = _State.load(checkpoint, config, seed, digest)
    if state is None:
        state = _State(config, seed)
    tl = tail(dec, m)
    sc = value_scale(m)
    t_start = time.perf_counter()
    while state.step < config.steps:
        t0 = time.perf_counter()
        g = make_generator(seed, "projector-step", state.step)
        idx = torch.randint(N, (config.batch,), generator=g)
        b0, v = base[idx].float(), values[idx].float()
        state.alignment.train()
        f = state.alignment(b0)
        loss_feat = F.mse_loss(f, v)
        loss = config.lambda_feat * loss_feat
        rec = {"step": state.step, "feature": loss_feat.item()}
        if "adv" in config.losses:
            # critic step on (real v, fake f)
            state.opt_d.zero_grad(set_to_none=True)
            d_loss = ((state.critic(v) - 1) ** 2).mean() + (state.critic(f.detach()) ** 2).mean()
            d_loss.backward()
            state.opt_d.step()
            for p in state.critic.parameters():
                p.requires_grad_(False)
            adv = ((state.critic(f) - 1) ** 2).mean()
            for p in state.critic.parameters():
                p.requires_grad_(True)
            loss = loss + config.lambda_adv * adv
            rec.update(adv=adv.item(), critic=d_loss.item())
        if "scc" in config.losses:
            s = f.shape[-1]
            c, mg = min(config.crop, s), config.margin
            k = min(config.scc_batch, config.batch)
            y0 = int(torch.randint(0, s - c + 1, (1,), generator=g))
            x0 = int(torch.randint(0, s - c + 1, (1,), generator=g))
            ya, xa = max(0, y0 - mg), max(0, x0 - mg)
            yb, xb = min(s, y0 + c + mg), min(s, x0 + c + mg)
            out = tl(f[:k, :, ya:yb, xa:xb]).clamp(0, 1)
            oy, ox = (y0 - ya) * sc, (x0 - xa) * sc
            out = out[:, :, oy:oy + c * sc, ox:ox + c * sc]
            xi = images[idx[:k]]
            xi = xi.float() / 255 if xi.dtype == torch.uint8 else xi.float()
            tgt = xi[:, :, y0 * sc:(y0 + c) * sc, x0 * sc:(x0 + c) * sc]
            l1 = (out - tgt).abs().mean()
            ss = _ssim(out, tgt).mean() if out.shape[-1] >= 11 else torch.tensor(1.0)
            scc = l1 + (1 - ss)
            loss = loss + config.lambda_scc * scc
            rec.update(scc=scc.item())
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"projector training diverged at step {state.step} (loss {float(loss)}); "
                                        "lower the learning rate or the adversarial weight")
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        state.opt.step()
        state.step += 1
        state.seconds += time.perf_counter() - t0
        if state.step % 10 == 0 or state.step == config.steps:
            state.history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in rec.items()})
            if progress:
                progress(state.step, rec)
        if checkpoint is not None and state.step % config.checkpoint_every == 0:
            state.save(checkpoint, config, seed, digest)
        if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
            break
    if checkpoint is not None:
        state.save(checkpoint, config, seed, digest)
    proj = BackwardProjector(autoencoder, config, state.alignment.eval())
    proj.provenance_ = {"trained_steps": state.step, "planned_steps": config.steps, "seed": seed,
                        "complete": state.step >= config.steps, "train_seconds": round(state.seconds, 2),
                        "data": f"{N} faces generated by the model (latents and their decodes), digest {digest}",
                        "last": state.history[-1] if state.history else None, "created": now_iso()}
    return proj


# ---------------------------------------------------------------------------------------- evaluation
ENCODER_TAPS = (1, 5, 9, 13)


@torch.no_grad()
def encoder_feature_distance(a: torch.Tensor, b: torch.Tensor, encoder: nn.Sequential, batch: int = 16) -> torch.Tensor:
    """TFD, the TAEF2-encoder feature distance (an LPIPS-like distance with no learned weights,
    because no LPIPS network is available offline): at the outputs of encoder modules 1, 5, 9,
    13 (full, 1/2, 1/4, 1/8 resolution), activations are unit-normalised over channels at every
    position, and the squared difference is summed over channels, averaged over positions, then
    averaged over the four taps. (N,) for images a, b (N, 3, H, W) in [0, 1]."""
    out = []
    enc = encoder.eval()
    for i in range(0, a.shape[0], batch):
        ha, hb = a[i:i + batch].float(), b[i:i + batch].float()
        d = 0.0
        for j, layer in enumerate(enc):
            ha, hb = layer(ha), layer(hb)
            if j in ENCODER_TAPS:
                na = ha / ha.norm(dim=1, keepdim=True).clamp_min(1e-10)
                nb = hb / hb.norm(dim=1, keepdim=True).clamp_min(1e-10)
                d = d + ((na - nb) ** 2).sum(1).flatten(1).mean(1)
            if j >= ENCODER_TAPS[-1]:
                break
        out.append(d / len(ENCODER_TAPS))
    return torch.cat(out)


def sliced_wasserstein_features(a: torch.Tensor, b: torch.Tensor, *, directions: int = 128, max_cells: int = 20000,
                                seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between the per-cell feature vectors of two sets of value-layer
    maps (N, C, s, s) and (M, C, s', s'): equal numbers of cells drawn from each (seeded), projected
    on ``directions`` random unit vectors, mean absolute difference of the sorted projections."""
    g = make_generator(seed, "swd-features")
    pa = a.float().permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    pb = b.float().permute(0, 2, 3, 1).reshape(-1, b.shape[1])
    n = min(pa.shape[0], pb.shape[0], max_cells)
    pa = pa[torch.randperm(pa.shape[0], generator=g)[:n]]
    pb = pb[torch.randperm(pb.shape[0], generator=g)[:n]]
    d = torch.randn(pa.shape[1], directions, generator=g)
    d = d / d.norm(dim=0, keepdim=True)
    sa, _ = (pa @ d).sort(0)
    sb, _ = (pb @ d).sort(0)
    return float((sa - sb).abs().mean())


def restoration_table(projector: BackwardProjector, images: torch.Tensor) -> dict:
    """PSNR, SSIM and TFD of tail(B(x)) against x, means over the images."""
    r = projector.restore(images)
    return {"psnr": float(psnr(r, images).mean()), "ssim": float(_ssim(r, images).mean()),
            "tfd": float(encoder_feature_distance(r, images, projector.autoencoder.encoder).mean()),
            "n": int(images.shape[0])}
