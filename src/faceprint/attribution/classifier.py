"""Learned attribution of images to their source (papers/004, Ch. 4, Secs. 4.3 and 4.4.4).

:class:`Attributor` holds an :class:`~faceprint.attribution.network.AttributionNet` trained by
cross-entropy on (image, source) pairs, the names of its sources, and what makes an answer
accountable:

- an **open-set threshold** (not in the chapter): the score of an image is its fingerprint's
  cosine similarity to the centroid of the predicted source's training fingerprints (``score
  = "centroid"``) or the softmax probability of the predicted source (``score = "softmax"``);
  :meth:`Attributor.calibrate` sets the threshold to the (1 - coverage) quantile of the scores
  of held-out images of the known sources, and an image scoring below it is answered
  "unknown" rather than given the nearest source;
- the **measured error rates** (accuracy, coverage, false attribution on unseen sources with a
  Clopper-Pearson bound, robustness), stored with the weights and printed with every answer:
  attribution is evidence, not proof;
- the **autoencoder id** of the decoder the sources' images went through: a classifier is
  refused for images of another autoencoder.

Training (:func:`train_network`) runs on random crops (``TrainConfig.crop``, default 64 px on
the 8-px latent grid; the network is fully convolutional and is applied to the whole image at
test time), class-balanced epochs, Adam with a cosine schedule, and per-epoch checkpoints so an
interrupted training resumes exactly. **Immunisation** (Sec. 4.4.4) is the same loop started
from a trained network with an ``attack`` applied to every training image before cropping.

The file format is one .safetensors artifact (network weights, centroids) with JSON metadata;
never a pickle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import ArtifactError, ConfigError, InputError
from ..io import load_artifact, now_iso, optimizer_state, optimizer_tensors, save_artifact
from ..seeding import check_seed
from ..seeding import generator as make_generator
from .network import AttributionNet, NetConfig

ARTIFACT_CLASS = "faceprint.attribution.Attributor"
CHECKPOINT_CLASS = "faceprint.attribution.TrainingCheckpoint"
SCORES = ("centroid", "softmax")
UNKNOWN = "unknown"
IMAGE_SIZE = 128


@dataclass(frozen=True)
class TrainConfig:
    """How a network is trained.

    epochs: passes over the class-balanced training set (each class drawn as often as the
    largest).  batch_size, lr, weight_decay: Adam settings (cosine decay to lr/20).
    crop: side of the random training crops (px; 0 or >= the image side: whole images).
    crop_align: crop offsets are multiples of this (8: on the TAEF2 latent grid; 1: anywhere).
    max_seconds: stop after the epoch that passes this (None: no limit); the result records
    how many epochs ran.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    crop: int = 64
    crop_align: int = 8
    max_seconds: float | None = None

    def __post_init__(self):
        for name, lo in (("epochs", 1), ("batch_size", 2), ("crop", 0), ("crop_align", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"TrainConfig.{name} must be an int >= {lo}, got {v!r}")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.max_seconds is not None and (isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, (int, float))
                                             or self.max_seconds <= 0):
            raise ConfigError(f"TrainConfig.max_seconds must be None or a positive number, got {self.max_seconds!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# data helpers


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 in [0, 1]; float input is checked and returned as float32."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a (N, 3, H, W) tensor (uint8, or float in [0, 1]), got {got}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise InputError(f"images must be uint8 or floating point, got {images.dtype}")
    x = images.float()
    if x.numel() and (not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1):
        raise InputError("float images must hold finite values in [0, 1]; divide uint8 images by 255")
    return x


def _check_labels(labels, n: int, k: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        raise InputError(f"labels must be a (N,) integer tensor with one label per image ({n}), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise InputError(f"labels must lie in [0, {k}) (one per source), got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels


def balanced_order(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one class-balanced epoch: each class drawn as often as the largest one
    (smaller classes are cycled in fresh permutations), the whole shuffled."""
    counts = torch.bincount(labels, minlength=k)
    m = int(counts.max())
    parts = []
    for c in range(k):
        idx = torch.nonzero(labels == c).squeeze(1)
        if idx.numel() == 0:
            continue
        reps = [idx[torch.randperm(idx.numel(), generator=generator)] for _ in range((m + idx.numel() - 1) // idx.numel())]
        parts.append(torch.cat(reps)[:m])
    order = torch.cat(parts)
    return order[torch.randperm(order.numel(), generator=generator)]


def random_crops(x: torch.Tensor, crop: int, align: int, generator: torch.Generator) -> torch.Tensor:
    """One random crop x crop window per image (offsets multiples of ``align``)."""
    n, _, h, w = x.shape
    if crop <= 0 or crop >= min(h, w):
        return x
    ny, nx = (h - crop) // align + 1, (w - crop) // align + 1
    ty = torch.randint(ny, (n,), generator=generator) * align
    tx = torch.randint(nx, (n,), generator=generator) * align
    return torch.stack([x[i, :, int(a):int(a) + crop, int(b):int(b) + crop] for i, (a, b) in enumerate(zip(ty, tx))])


# --------------------------------------------------------------------------------------------
# training


def _checkpoint_key(net: AttributionNet, cfg: TrainConfig, seed: int, tag: str, n: int) -> dict:
    c = cfg.to_dict()
    c.pop("max_seconds")
    return {"net": net.config.to_dict(), "sources": net.fc.out_features, "train": c, "seed": seed, "tag": tag, "n": n}


def _save_checkpoint(path, net, opt, epoch: int, key: dict, history: list) -> None:
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    opt_t, groups = optimizer_tensors("opt", opt.state_dict())
    tensors.update(opt_t)
    save_artifact(path, tensors, {"class": CHECKPOINT_CLASS, "key": key, "epoch": epoch, "param_groups": groups,
                                  "history": history})


def _load_checkpoint(path, net, opt, key: dict):
    """(next epoch, history) from a checkpoint of the same settings, else None."""
    try:
        tensors, meta = load_artifact(path, CHECKPOINT_CLASS, validate=False)
    except ArtifactError:
        return None
    if meta.get("key") != key:
        return None
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    opt.load_state_dict(optimizer_state("opt", tensors, meta["param_groups"]))
    return int(meta["epoch"]) + 1, list(meta.get("history", []))


def train_network(net: AttributionNet, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig | None = None, *,
                  seed: int, attack: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                  checkpoint=None, tag: str = "train", progress: Callable[[str], None] | None = None) -> dict:
    """Train (or fine-tune, with ``attack``) ``net`` in place on uint8 images (N, 3, S, S).

    Parameters
    ----------
    net : AttributionNet
        Trained from its current weights (fresh or a trained one to immunise).
    images, labels : torch.Tensor
        (N, 3, S, S) uint8 (or float in [0, 1]) and (N,) source indices.
    config : TrainConfig
    seed : int
        Drives the epoch order, crops and attacks (epoch e uses generator(seed, tag, e)).
    attack : callable, optional
        (float images (B, 3, S, S), generator) -> attacked images, applied before cropping
        (immunisation, Sec. 4.4.4).
    checkpoint : path, optional
        Written after every epoch and read back first: an interrupted training resumes at the
        next epoch with the same result as an uninterrupted one.
    tag : str
        Names this training in the seeds and the checkpoint key.

    Returns
    -------
    dict
        epochs_done, complete, seconds (all epochs, also those of earlier calls resumed from the
        checkpoint), call_seconds (this call), history (per epoch: loss, accuracy on the training
        crops, seconds).
    """
    cfg = config or TrainConfig()
    check_seed(seed)
    k = net.fc.out_features
    if images.shape[0] < 2:
        raise InputError(f"need at least 2 training images, got {images.shape[0]}")
    labels = _check_labels(labels, images.shape[0], k)
    if images.dtype != torch.uint8:
        as_float(images[:1])  # validates
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    key = _checkpoint_key(net, cfg, seed, tag, int(images.shape[0]))
    start, history = 0, []
    if checkpoint is not None:
        got = _load_checkpoint(checkpoint, net, opt, key)
        if got is not None:
            start, history = got
    steps_per_epoch = None
    t0 = time.perf_counter()
    complete = start >= cfg.epochs
    for epoch in range(start, cfg.epochs):
        g = make_generator(seed, "attribution-train", tag, epoch)
        order = balanced_order(labels, k, g)
        steps_per_epoch = (order.numel() + cfg.batch_size - 1) // cfg.batch_size
        net.train()
        te, tot_loss, tot_ok, tot_n = time.perf_counter(), 0.0, 0, 0
        for step in range(steps_per_epoch):
            t = (epoch * steps_per_epoch + step) / (cfg.epochs * steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if idx.numel() < 2:
                continue
            x = as_float(images[idx])
            if attack is not None:
                x = (attack(x, g).clamp(0, 1) * 255).round() / 255  # as a saved 8-bit file would be
            x = random_crops(x, cfg.crop, cfg.crop_align, g)
            y = labels[idx]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * y.numel()
            tot_ok += int((logits.argmax(1) == y).sum())
            tot_n += y.numel()
        history.append({"epoch": epoch, "loss": tot_loss / max(1, tot_n), "train_accuracy": tot_ok / max(1, tot_n),
                        "seconds": time.perf_counter() - te})
        if progress is not None:
            h = history[-1]
            progress(f"[{tag}] epoch {epoch + 1}/{cfg.epochs}: loss {h['loss']:.4f}, crop accuracy "
                     f"{h['train_accuracy']:.4f}, {h['seconds']:.0f} s")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, net, opt, epoch, key, history)
        complete = epoch + 1 >= cfg.epochs
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds and not complete:
            break
    net.eval()
    # seconds: the training's total over every call that advanced it (from the checkpointed history)
    return {"epochs_done": len(history), "complete": complete, "seconds": sum(h["seconds"] for h in history),
            "call_seconds": time.perf_counter() - t0, "history": history}


@torch.no_grad()
def predict(net: AttributionNet, images: torch.Tensor, *, batch_size: int = 64,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N, K), image fingerprints (N, feature_dim)) of whole images.

    ``transform`` (float images -> float images) is applied per batch first (an attack)."""
    net.eval()
    probs, feats = [], []
    for s in range(0, images.shape[0], batch_size):
        x = as_float(images[s:s + batch_size])
        if transform is not None:
            x = transform(x)
        f = net.fingerprints(x)
        probs.append(F.softmax(net.fc(f), 1))
        feats.append(f)
    if not probs:
        return torch.zeros(0, net.fc.out_features), torch.zeros(0, net.config.feature_dim)
    return torch.cat(probs), torch.cat(feats)


def centroid_scores(features: torch.Tensor, centroids: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each fingerprint (N, D) to its predicted source's centroid (K, D)."""
    return F.cosine_similarity(features, centroids[predicted], dim=1)


# --------------------------------------------------------------------------------------------
# the attributor


@dataclass
class Attribution:
    """One answer: ``source`` (a known source's name or "unknown"), ``nearest`` (the most likely
    known source even when unknown), its ``probability``, the open-set ``score`` and
    ``threshold``, and notes (e.g. the image was resized)."""

    source: str
    nearest: str
    probability: float
    score: float
    threshold: float | None
    probabilities: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Attributor:
    """A trained attribution classifier with its sources, threshold and measured error rates.

    Parameters
    ----------
    sources : sequence of str
        Source names, in label order.
    autoencoder_id : str
        Id of the autoencoder whose decoder made the generated sources' images (TAEF2.id).
    net_config : NetConfig, optional
    score : {"centroid", "softmax"}
        The open-set score (module docstring).
    seed : int
        The network's initial weights (training has its own seed, :meth:`fit`).
    """

    def __init__(self, sources: Sequence[str], autoencoder_id: str, net_config: NetConfig | None = None, *,
                 score: str = "centroid", seed: int = 0):
        sources = list(sources)
        if len(sources) < 2 or len(set(sources)) != len(sources) or not all(isinstance(s, str) and s for s in sources):
            raise InputError(f"sources must be at least 2 distinct non-empty names, got {sources!r}")
        if UNKNOWN in sources:
            raise InputError(f"{UNKNOWN!r} is the open-set answer and cannot be a source name")
        if not isinstance(autoencoder_id, str) or not autoencoder_id:
            raise InputError(f"autoencoder_id must be a non-empty string (e.g. TAEF2.load().id), got {autoencoder_id!r}")
        if score not in SCORES:
            raise InputError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        self.sources = sources
        self.autoencoder_id = autoencoder_id
        self.score = score
        self.net = AttributionNet(len(sources), net_config, seed=seed)
        self.centroids_: torch.Tensor | None = None
        self.threshold_: float | None = None
        self.coverage_: float | None = None
        self.error_rates_: dict = {}
        self.training_: dict = {}

    # ------------------------------------------------------------------ training
    def fit(self, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig | None = None, *, seed: int,
            checkpoint=None, tag: str = "train", progress=None, attack=None) -> "Attributor":
        """Train the network (see :func:`train_network`), then set the source centroids from the
        training images' fingerprints."""
        res = train_network(self.net, images, labels, config, seed=seed, checkpoint=checkpoint, tag=tag,
                            progress=progress, attack=attack)
        self.training_ = {"config": (config or TrainConfig()).to_dict(), "seed": seed, "tag": tag,
                          "epochs_done": res["epochs_done"], "complete": res["complete"], "seconds": res["seconds"],
                          "final_loss": res["history"][-1]["loss"] if res["history"] else None,
                          "n_images": int(images.shape[0]), "created": now_iso()}
        self.set_centroids(images, labels)
        return self

    def set_centroids(self, images: torch.Tensor, labels: torch.Tensor, *, limit_per_source: int = 500) -> None:
        """Centroid of each source's image fingerprints (up to ``limit_per_source`` images each)."""
        labels = _check_labels(labels, images.shape[0], len(self.sources))
        keep = torch.cat([torch.nonzero(labels == c).squeeze(1)[:limit_per_source] for c in range(len(self.sources))])
        _, f = predict(self.net, images[keep])
        cent = torch.zeros(len(self.sources), f.shape[1])
        for c in range(len(self.sources)):
            m = labels[keep] == c
            if m.any():
                cent[c] = f[m].mean(0)
        self.centroids_ = cent

    def scores(self, images: torch.Tensor, *, transform=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities (N, K), predicted (N,), open-set scores (N,))."""
        probs, feats = predict(self.net, images, transform=transform)
        pred = probs.argmax(1)
        if self.score == "softmax" or self.centroids_ is None:
            s = probs.gather(1, pred[:, None]).squeeze(1)
        else:
            s = centroid_scores(feats, self.centroids_, pred)
        return probs, pred, s

    def calibrate(self, images: torch.Tensor, labels: torch.Tensor, *, coverage: float = 0.95) -> float:
        """Set the threshold so that ``coverage`` of these held-out images of known sources score
        at or above it (images never used in training). Returns the threshold."""
        if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
            raise InputError(f"coverage must be in (0, 1], got {coverage!r}; e.g. 0.95")
        labels = _check_labels(labels, images.shape[0], len(self.sources))
        if images.shape[0] < 20:
            raise InputError(f"calibration needs at least 20 held-out images of the known sources, got {images.shape[0]}")
        _, _, s = self.scores(images)
        # 'lower': the threshold is one of the scores, so at least ``coverage`` of them are at or
        # above it (linear interpolation would land between two scores and keep fewer)
        self.threshold_ = (float(torch.quantile(s.double(), 1.0 - coverage, interpolation="lower"))
                           if coverage < 1 else float(s.min()))
        self.coverage_ = float(coverage)
        return self.threshold_

    # ------------------------------------------------------------------ answers
    def attribute(self, images: torch.Tensor, *, notes: Sequence[Sequence[str]] | None = None) -> list[Attribution]:
        """One :class:`Attribution` per image (N, 3, 128, 128) uint8 or float in [0, 1]."""
        x = as_float(images)
        if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise InputError(f"images must be {IMAGE_SIZE}x{IMAGE_SIZE} px (the size the classifier was trained on), "
                             f"got {x.shape[-2]}x{x.shape[-1]}; faceprint.attribution.read_image resizes with a note")
        probs, pred, s = self.scores(x)
        out = []
        for i in range(x.shape[0]):
            p = int(pred[i])
            known = self.threshold_ is None or float(s[i]) >= self.threshold_
            out.append(Attribution(
                source=self.sources[p] if known else UNKNOWN, nearest=self.sources[p], probability=float(probs[i, p]),
                score=float(s[i]), threshold=self.threshold_,
                probabilities={n: float(probs[i, c]) for c, n in enumerate(self.sources)},
                notes=list(notes[i]) if notes is not None else []))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """One .safetensors artifact: weights and centroids; sources, autoencoder id, threshold,
        error rates and training record in the metadata. Written atomically, never pickled."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.centroids_ is not None:
            tensors["centroids"] = self.centroids_
        meta = {"class": ARTIFACT_CLASS, "sources": self.sources, "autoencoder_id": self.autoencoder_id,
                "network": self.net.config.to_dict(), "score": self.score, "threshold": self.threshold_,
                "coverage": self.coverage_, "error_rates": self.error_rates_, "training": self.training_,
                "image_size": IMAGE_SIZE, "faceprint_version": __version__}
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path, *, autoencoder_id: str | None = None) -> "Attributor":
        """Read a classifier; refuse it if ``autoencoder_id`` is given and differs from the one
        it was trained for (its answers would be meaningless for another decoder's images)."""
        tensors, meta = load_artifact(path, ARTIFACT_CLASS)
        where = f"classifier {str(path)!r}"
        sources = meta.get("sources")
        if not isinstance(sources, list) or len(sources) < 2 or not all(isinstance(s, str) for s in sources):
            raise ArtifactError(f"{where}: metadata 'sources' must be a list of at least 2 names, got {sources!r}")
        ae = meta.get("autoencoder_id")
        if not isinstance(ae, str) or not ae:
            raise ArtifactError(f"{where}: metadata 'autoencoder_id' is missing; re-train the classifier")
        if autoencoder_id is not None and ae.split("+")[0] != str(autoencoder_id).split("+")[0]:
            raise ArtifactError(
                f"{where} was trained on images decoded by autoencoder {ae!r}, but the images come from "
                f"{autoencoder_id!r}; its answers and error rates do not hold for another decoder: train a classifier "
                "on that autoencoder's outputs (faceprint attribute train)")
        try:
            net_config = NetConfig.from_dict(meta.get("network", {}))
        except ConfigError as e:
            raise ArtifactError(f"{where}: metadata 'network' is invalid ({e})") from None
        score = meta.get("score", "centroid")
        if score not in SCORES:
            raise ArtifactError(f"{where}: metadata 'score' must be one of {SCORES}, got {score!r}")
        obj = cls(sources, ae, net_config, score=score)
        state = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
        try:
            obj.net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ArtifactError(f"{where}: the weights do not fit its network config ({str(e).splitlines()[0]})") from None
        obj.net.eval()
        c = tensors.get("centroids")
        if c is not None:
            if tuple(c.shape) != (len(sources), net_config.feature_dim):
                raise ArtifactError(f"{where}: tensor 'centroids' has shape {tuple(c.shape)}, expected "
                                    f"({len(sources)}, {net_config.feature_dim})")
            obj.centroids_ = c.float()
        t = meta.get("threshold")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise ArtifactError(f"{where}: metadata 'threshold' must be a number or null, got {t!r}")
        obj.threshold_ = None if t is None else float(t)
        obj.coverage_ = meta.get("coverage")
        obj.error_rates_ = meta.get("error_rates") or {}
        obj.training_ = meta.get("training") or {}
        return obj
