"""The trained mapping f_map from identity (+ expression) features to the generator's
conditioning (papers/003, Eq. 2 and Eq. 4, Sec. 4.1; the CPU adaptation of
docs/SEED-SYSTEMS.md Sec. 2.3).

Conditioning space. F2D's f_map writes a word embedding S* into the text space of a frozen
StableDiffusion. faceprint's frozen generator has no text space; what it has is the TAEF2 latent
its mixture samples. The conditioning is the person's coordinates S* in an **identity subspace
of the face region** of that latent: the face-mask pixels (:func:`features.face_mask`) of the
raw TAEF2 latent, reduced by PCA and then by a shrinkage LDA fitted with identity labels (the
directions along which people differ more than photos of one person do), orthonormalised:
Q (32 |F|, r). A class sample y is personalised by setting only those coordinates inside the
mask, ``y_F <- y_F + m_F * Q (S* - Q^T (y_F - mu))`` (:meth:`PersonalizeMapping.apply`):
expression, accessories, hair and background, which vary within a person, stay the class
model's (Sec. 3.4's face-vs-background rule). ``region="full"`` (an ablation) does the same
over all 256 latent pixels.

The subspace lives in TAEF2's space, not in one fitted model's PCA space, so one mapping serves
every faceprint model of 128 px faces.

f_map. F2D's architecture: two (Linear, Dropout, LeakyReLU) layers and a Linear into the
conditioning space. Input: the identity features of :mod:`.features` (kind "dlib",
"multiscale" or "msid") concatenated with the expression features v_exp (Smiling and
Mouth_Slightly_Open logits of faceprint's attribute classifier, and the yaw, roll and pitch
proxies of the 5-point landmarks), standardised. Training (Eq. 4): with probability
``p_null`` (0.2) v_exp is replaced by a learned null vector ṽ_exp; at inference ṽ_exp is always
used, so the prompt, not the reference, sets the expression. Target: the photo's own identity
coordinates (the face region regresses the photo; the background is never a target, so it
follows the class model: Eq. 7 transposed to latents). ``expression="none"`` (the
"w/o expression guidance" ablation) drops v_exp altogether. No per-person training: a new
person costs one forward pass.

Training is seeded, checkpointed every ``checkpoint_every`` steps and resumable
(:func:`train_mapping`). The artifact (:meth:`PersonalizeMapping.save`) is one safetensors file
with JSON metadata. It holds no photo: PCA means and bases, LDA directions, the conditioning
mean and basis (statistics of thousands of latents), standardisation and MLP weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ArtifactError, ConfigError, InputError, NotFittedError
from .features import FEATURE_KINDS, FeatureConfig, IdentityFeatures, _pca, face_mask, lda_directions

ARTIFACT_CLASS = "faceprint.PersonalizeMapping"
EXPRESSION_ATTRIBUTES = ("Smiling", "Mouth_Slightly_Open")
EXP_DIM = len(EXPRESSION_ATTRIBUTES) + 3  # + yaw, roll, pitch
REGIONS = ("face", "full")
EXPRESSIONS = ("guided", "none")


@dataclass(frozen=True)
class MappingConfig:
    """features: identity feature kind (FEATURE_KINDS). expression: "guided" (v_exp with dropout
    to a learned null, Eq. 4) or "none". region: "face" (identity coordinates inside the face
    mask) or "full" (all latent pixels). rank: dimension r of the conditioning subspace.
    pca: PCA dimensions before its LDA. hidden, dropout: f_map's layers. p_null: Eq. 4's
    dropout probability. steps, batch, lr, weight_decay: AdamW training."""

    features: str = "msid"
    expression: str = "guided"
    region: str = "face"
    rank: int = 48
    pca: int = 160
    shrinkage: float = 0.2
    hidden: int = 512
    dropout: float = 0.1
    p_null: float = 0.2
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    feature_pca: int = 96
    feature_lda: int = 48

    def __post_init__(self):
        if self.features not in FEATURE_KINDS:
            raise ConfigError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {self.features!r}")
        if self.expression not in EXPRESSIONS:
            raise ConfigError(f"expression must be one of {', '.join(EXPRESSIONS)}, got {self.expression!r}")
        if self.region not in REGIONS:
            raise ConfigError(f"region must be one of {', '.join(REGIONS)}, got {self.region!r}")
        for name in ("rank", "pca", "hidden", "steps", "batch", "feature_pca", "feature_lda"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        for name, hi in (("dropout", 0.95), ("p_null", 1.0), ("shrinkage", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
                raise ConfigError(f"{name} must be a number in [0, {hi}], got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr!r}")

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(pca=self.feature_pca, lda=self.feature_lda, shrinkage=self.shrinkage)


@dataclass
class TrainingData:
    """What f_map is trained on: per photo its TAEF2 latent (N, 32, 16, 16), dlib descriptor
    (N, 128), expression features (N, EXP_DIM) and identity label. None of it is saved."""

    latents: torch.Tensor
    descriptors: torch.Tensor
    expression: torch.Tensor
    ids: list

    def __post_init__(self):
        n = self.latents.shape[0]
        if self.descriptors.shape != (n, 128) or self.expression.shape != (n, EXP_DIM) or len(self.ids) != n:
            raise InputError(f"training data must have one latent, descriptor (128), expression vector ({EXP_DIM}) and "
                             f"identity per photo; got {tuple(self.latents.shape)}, {tuple(self.descriptors.shape)}, "
                             f"{tuple(self.expression.shape)}, {len(self.ids)}")


def expression_features(latents: torch.Tensor, landmarks: np.ndarray, classifier) -> torch.Tensor:
    """v_exp (N, EXP_DIM): the classifier's logits of EXPRESSION_ATTRIBUTES and the pose proxies
    (yaw, roll / 30 degrees, pitch) of landmarks (N, 5, 2) found in the 128 px face crops."""
    from .reference import pose_of

    probs = classifier.predict_proba_latents(latents.float())
    cols = []
    for a in EXPRESSION_ATTRIBUTES:
        p = probs[a][:, 1].double().clamp(1e-6, 1 - 1e-6)
        cols.append((p / (1 - p)).log().float())
    pose = []
    for lm in landmarks:
        yaw, roll = pose_of(lm)
        eyes = lm[:4].mean(0)
        eye_dist = float(np.linalg.norm(lm[0:2].mean(0) - lm[2:4].mean(0))) or 1.0
        pitch = float((lm[4][1] - eyes[1]) / eye_dist)
        pose.append([yaw, roll / 30.0, pitch])
    return torch.cat([torch.stack(cols, 1), torch.tensor(pose, dtype=torch.float32).reshape(-1, 3)], 1)


class ConditioningSpace:
    """The identity subspace of the face region (module docstring): mask_ (16, 16) weights,
    pixels_ (P,) flat indices of the region, mean_ (32 P,), basis_ (32 P, r) orthonormal."""

    def __init__(self, region: str = "face"):
        if region not in REGIONS:
            raise ConfigError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
        self.region = region
        self.mask_ = None
        self.pixels_ = None
        self.mean_ = None
        self.basis_ = None
        self._g = None

    def fit(self, latents: torch.Tensor, ids, *, rank: int, pca: int, shrinkage: float) -> "ConditioningSpace":
        m = face_mask(16) if self.region == "face" else torch.ones(16, 16)
        self.mask_ = m
        self.pixels_ = torch.nonzero(m.flatten() > 0.05).squeeze(1)
        X = self._region(latents).double()
        mu, U = _pca(X, pca)
        Z = (X - mu) @ U
        k = min(rank, len(set(ids)) - 1, Z.shape[1])
        if k < 1:
            raise InputError("the conditioning space needs at least 2 training people")
        W = lda_directions(Z, ids, k, shrinkage=shrinkage)
        Qm, _ = torch.linalg.qr(U @ W)  # orthonormal basis of the discriminant directions
        self.mean_, self.basis_ = mu.float(), Qm.float().contiguous()
        return self

    def _region(self, z: torch.Tensor) -> torch.Tensor:
        return z.float().flatten(2)[:, :, self.pixels_].flatten(1)  # (N, 32 P)

    @property
    def rank(self) -> int:
        return int(self.basis_.shape[1])

    def coordinates(self, latents: torch.Tensor) -> torch.Tensor:
        """S (N, r) of latents (N, 32, 16, 16), one face at a time (the arithmetic, hence the
        bits, of face i do not depend on the batch it is in)."""
        if self.basis_ is None:
            raise NotFittedError("ConditioningSpace is not fitted")
        X = self._region(latents) - self.mean_
        return torch.cat([X[i:i + 1] @ self.basis_ for i in range(X.shape[0])]) if X.shape[0] else X[:, :0]

    def _gram(self) -> torch.Tensor:
        """G = Q^T diag(m) Q (r, r): how a mask-weighted step along the basis moves the coordinates."""
        if getattr(self, "_g", None) is None or self._g.shape[0] != self.rank:
            C = self.basis_.shape[0] // self.pixels_.numel()
            w = self.mask_.flatten()[self.pixels_].repeat(C)  # (C P,) channel-major, as _region flattens
            G = self.basis_.T.double() @ (self.basis_.double() * w.double()[:, None])
            self._g = torch.linalg.inv(G + 1e-3 * torch.eye(G.shape[0], dtype=G.dtype)).float()
        return self._g

    def apply(self, latents: torch.Tensor, S: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """Latents (N, 32, 16, 16) whose region's identity coordinates are moved to S (N, r) or
        (1, r) by ``strength`` (1 = set them), everything else unchanged. The step is weighted
        by the mask, m * Q c with c = G^-1 (S - Q^T y) (:meth:`_gram`), so the coordinates land
        on S while the change fades out toward the mask's soft rim."""
        z = latents.float().clone()
        N, C = z.shape[:2]
        cur = self.coordinates(z)
        S = S.float().expand(N, -1)
        w = self.mask_.flatten()[self.pixels_]  # (P,)
        Gi = self._gram()
        flat = z.flatten(2)
        for i in range(N):
            c = ((S[i:i + 1] - cur[i:i + 1]) * strength) @ Gi.T
            delta = c @ self.basis_.T  # (1, C P)
            flat[i, :, self.pixels_] += delta.reshape(C, -1) * w
        return flat.reshape_as(z)

    def state_tensors(self, prefix: str = "conditioning.") -> dict[str, torch.Tensor]:
        return {prefix + "mask": self.mask_, prefix + "pixels": self.pixels_, prefix + "mean": self.mean_,
                prefix + "basis": self.basis_}

    @classmethod
    def from_state(cls, region: str, t: dict, prefix: str = "conditioning.") -> "ConditioningSpace":
        c = cls(region)
        c.mask_ = t[prefix + "mask"].float()
        c.pixels_ = t[prefix + "pixels"].long()
        c.mean_ = t[prefix + "mean"].float()
        c.basis_ = t[prefix + "basis"].float()
        return c


class MapNet(torch.nn.Module):
    """f_map: 2 x (Linear, Dropout, LeakyReLU) + Linear (papers/003 Sec. 4.1), and the learned
    null expression vector ṽ_exp. Dropout draws its masks from the generator passed to forward
    (training); without one it is off."""

    def __init__(self, d_in: int, d_exp: int, hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.l1 = torch.nn.Linear(d_in + d_exp, hidden)
        self.l2 = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, d_out)
        self.p = float(dropout)
        self.null = torch.nn.Parameter(torch.zeros(d_exp))
        self.d_exp = d_exp

    def _drop(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        if g is None or self.p <= 0:
            return x
        return x * (torch.rand(x.shape, generator=g) >= self.p) / (1 - self.p)

    def forward(self, v_id: torch.Tensor, v_exp: torch.Tensor | None, g: torch.Generator | None = None) -> torch.Tensor:
        if self.d_exp:
            if v_exp is None:
                v_exp = self.null.expand(v_id.shape[0], -1)
            x = torch.cat([v_id, v_exp], 1)
        else:
            x = v_id
        x = F.leaky_relu(self._drop(self.l1(x), g), 0.2)
        x = F.leaky_relu(self._drop(self.l2(x), g), 0.2)
        return self.out(x)


class PersonalizeMapping:
    """Identity features + conditioning space + f_map: everything a person's encoding needs."""

    def __init__(self, config: MappingConfig | None = None):
        self.config = config or MappingConfig()
        self.features_: IdentityFeatures | None = None
        self.space_: ConditioningSpace | None = None
        self.net_: MapNet | None = None
        self.exp_mean_ = None
        self.exp_std_ = None
        self.target_scale_ = None
        self.provenance_: dict = {}

    # ------------------------------------------------------------------ building blocks
    def fit_spaces(self, data: TrainingData) -> "PersonalizeMapping":
        """The feature projections and the conditioning space (closed form, seconds)."""
        cfg = self.config
        self.features_ = IdentityFeatures(cfg.feature_config()).fit(data.latents, data.ids)
        self.space_ = ConditioningSpace(cfg.region).fit(data.latents, data.ids, rank=cfg.rank, pca=cfg.pca,
                                                        shrinkage=cfg.shrinkage)
        self.exp_mean_ = data.expression.mean(0)
        self.exp_std_ = data.expression.std(0).clamp_min(1e-3)
        S = self.space_.coordinates(data.latents)
        self.target_scale_ = S.std(0).clamp_min(1e-4)
        d_exp = EXP_DIM if cfg.expression == "guided" else 0
        self.net_ = MapNet(self.features_.dim(cfg.features), d_exp, cfg.hidden, self.space_.rank, cfg.dropout)
        return self

    def _check(self):
        if self.net_ is None:
            raise NotFittedError("PersonalizeMapping is not trained; train it with train_mapping() or load a file")

    def inputs(self, latents: torch.Tensor, descriptors: torch.Tensor, expression: torch.Tensor | None):
        """(v_id, standardised v_exp or None)."""
        v_id = self.features_.transform(latents, descriptors, self.config.features)
        v_exp = None
        if expression is not None and self.config.expression == "guided":
            v_exp = (expression.float() - self.exp_mean_) / self.exp_std_
        return v_id, v_exp

    @torch.no_grad()
    def encode(self, latents: torch.Tensor, descriptors: torch.Tensor, expression: torch.Tensor | None = None) -> torch.Tensor:
        """S* (N, r) of faces: their latents (N, 32, 16, 16) and descriptors (N, 128). With
        ``expression`` None the learned null is used (inference, Eq. 4)."""
        self._check()
        self.net_.eval()
        v_id, v_exp = self.inputs(latents, descriptors, expression)
        return self.net_(v_id, v_exp) * self.target_scale_

    def apply(self, latents: torch.Tensor, S: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        self._check()
        return self.space_.apply(latents, S, strength)

    def digest(self) -> str:
        import hashlib

        self._check()
        h = hashlib.sha256()
        for k, v in sorted(self.state_tensors().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {}
        t.update(self.features_.state_tensors())
        t.update(self.space_.state_tensors())
        t.update({"net." + k: v.detach().clone() for k, v in self.net_.state_dict().items()})
        t["exp.mean"], t["exp.std"], t["target.scale"] = self.exp_mean_, self.exp_std_, self.target_scale_
        return t

    def save(self, path) -> None:
        from ..io import save_artifact

        self._check()
        save_artifact(path, self.state_tensors(), {"class": ARTIFACT_CLASS, "config": asdict(self.config),
                                                    "provenance": self.provenance_,
                                                    "content": "feature and conditioning statistics and MLP weights; "
                                                               "no photo, latent or descriptor of any person"})

    @classmethod
    def load(cls, path) -> "PersonalizeMapping":
        from ..io import load_artifact

        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        try:
            cfg = MappingConfig(**meta["config"])
            m = cls(cfg)
            m.features_ = IdentityFeatures.from_state(cfg.feature_config(), tensors)
            m.space_ = ConditioningSpace.from_state(cfg.region, tensors)
            m.exp_mean_, m.exp_std_ = tensors["exp.mean"].float(), tensors["exp.std"].float()
            m.target_scale_ = tensors["target.scale"].float()
            d_exp = EXP_DIM if cfg.expression == "guided" else 0
            m.net_ = MapNet(m.features_.dim(cfg.features), d_exp, cfg.hidden, m.space_.rank, cfg.dropout)
            m.net_.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
            m.provenance_ = meta.get("provenance", {})
        except (KeyError, TypeError, RuntimeError, ConfigError) as e:
            raise ArtifactError(f"mapping file {str(path)!r} is incomplete or inconsistent ({e.__class__.__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); re-train it with "
                                "`python -m faceprint.bench personalize --train-only`") from None
        for name, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ArtifactError(f"mapping file {str(path)!r}: tensor {name!r} holds NaN or infinite values")
        return m


# ---------------------------------------------------------------------- training
def _checkpoint_state(mapping: PersonalizeMapping, opt, step: int, g: torch.Generator, losses: list) -> dict:
    t = {"ckpt." + k: v for k, v in mapping.state_tensors().items()}
    t["ckpt.rng"] = g.get_state()
    for i, group in enumerate(opt.state_dict()["state"].values()):
        for k, v in group.items():
            if isinstance(v, torch.Tensor):
                t[f"opt.{i}.{k}"] = v.detach().clone().reshape(-1) if v.ndim == 0 else v.detach().clone()
    t["ckpt.losses"] = torch.tensor(losses, dtype=torch.float64)
    return t


def train_mapping(data: TrainingData, config: MappingConfig | None = None, *, seed: int = 0, checkpoint=None,
                  minutes: float | None = None, checkpoint_every: int = 250, progress: bool = False,
                  provenance: dict | None = None) -> tuple[PersonalizeMapping, dict]:
    """Fit the spaces (closed form) and train f_map on ``data`` for ``config.steps`` AdamW steps.

    ``checkpoint`` (a path, kept outside the repository): the state is written there every
    ``checkpoint_every`` steps (atomically) and an interrupted run continues from it exactly
    (same seed and data: the spaces are deterministic). ``minutes`` stops after that much wall
    time, checkpointed. Returns (mapping, report) with report["complete"] False when stopped early.
    """
    from ..io import load_artifact, save_artifact
    from ..seeding import check_seed
    from ..seeding import generator as make_generator

    check_seed(seed)
    config = config or MappingConfig()
    mapping = PersonalizeMapping(config).fit_spaces(data)
    g = make_generator(seed, "personalize-batches")
    init = make_generator(seed, "personalize-init")
    with torch.no_grad():
        for p in mapping.net_.parameters():
            if p.ndim == 2:
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=init) * 2 - 1) * bound)
            else:
                p.zero_()
    V_id, V_exp = mapping.inputs(data.latents, data.descriptors, data.expression)
    T = mapping.space_.coordinates(data.latents) / mapping.target_scale_
    N = T.shape[0]
    net = mapping.net_
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, losses = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        tensors, meta = load_artifact(checkpoint, validate=False)
        if meta.get("class") != "faceprint.PersonalizeMappingCheckpoint" or meta.get("config") != asdict(config) \
                or meta.get("seed") != seed or meta.get("n") != N:
            raise InputError(f"checkpoint {str(checkpoint)!r} belongs to another training run (config, seed or data "
                             "differ); delete it or choose another --out")
        net.load_state_dict({k[len("ckpt.net."):]: v for k, v in tensors.items() if k.startswith("ckpt.net.")})
        opt.load_state_dict(_opt_state(opt, tensors, meta))
        g.set_state(tensors["ckpt.rng"])
        step = int(meta["step"])
        losses = tensors["ckpt.losses"].tolist()
    t0 = time.perf_counter()
    stopped = False
    net.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc="f_map", unit="step", disable=None if progress else True)
    while step < config.steps:
        idx = torch.randint(N, (config.batch,), generator=g)
        v_exp = None
        if V_exp is not None:
            drop = torch.rand(config.batch, generator=g) < config.p_null
            v_exp = torch.where(drop[:, None], net.null.expand(config.batch, -1), V_exp[idx])
        pred = net(V_id[idx], v_exp, g)
        loss = F.mse_loss(pred, T[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        last = step == config.steps
        out_of_time = minutes is not None and time.perf_counter() - t0 > 60 * minutes
        if checkpoint is not None and (step % checkpoint_every == 0 or last or out_of_time):
            save_artifact(checkpoint, _checkpoint_state(mapping, opt, step, g, losses),
                          {"class": "faceprint.PersonalizeMappingCheckpoint", "config": asdict(config), "seed": seed,
                           "n": N, "step": step, "opt_param_groups": opt.state_dict()["param_groups"]}, mode=0o600)
        if out_of_time and not last:
            stopped = True
            break
    bar.close()
    net.eval()
    with torch.no_grad():
        pred = net(V_id, None)
        null_mse = float(F.mse_loss(pred, T))
        full_mse = float(F.mse_loss(net(V_id, V_exp), T)) if V_exp is not None else null_mse
    report = {"steps": step, "complete": not stopped and step >= config.steps, "train_mse_with_expression": full_mse,
              "train_mse_null_expression": null_mse, "target_variance": 1.0,
              "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None,
              "seconds_this_call": round(time.perf_counter() - t0, 2)}
    mapping.provenance_ = {"seed": seed, "training_photos": N, "training_people": len(set(data.ids)),
                           "steps": step, **(provenance or {})}
    return mapping, report


def _opt_state(opt, tensors: dict, meta: dict) -> dict:
    """Rebuild an AdamW state_dict from a checkpoint's flat tensors."""
    sd = opt.state_dict()
    state = {}
    for i, pid in enumerate(sd["param_groups"][0]["params"]):
        entry = {}
        for k in ("step", "exp_avg", "exp_avg_sq"):
            v = tensors.get(f"opt.{i}.{k}")
            if v is not None:
                entry[k] = v.reshape(()) if k == "step" else v
        if entry:
            state[pid] = entry
    return {"state": state, "param_groups": meta["opt_param_groups"]}


__all__ = ["ARTIFACT_CLASS", "EXPRESSION_ATTRIBUTES", "EXP_DIM", "ConditioningSpace", "MapNet", "MappingConfig",
           "PersonalizeMapping", "TrainingData", "expression_features", "train_mapping"]
