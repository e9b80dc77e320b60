"""Attribute classifiers on TAEF2 latents, with their held-out confusion rates and rate correction.

faceprint's own recognisers for face attributes (the control stage measures how often a
generator makes, e.g., bald or eyeglass-wearing faces): one classifier per dataset, trained on
the TAEF2 latents (32, 16, 16) of 128 px photos, multi-task (one head per attribute):

- "celeba": the 40 binary attributes of celeba-10k (CelebA's annotation);
- "utkface": gender (2 classes), race (5) and age band (5) of UTKFace.

Model (chosen by held-out balanced accuracy, ``python -m faceprint.bench recognisers
--compare-inputs``): the latent is average-pooled 2x2 (-> (32, 8, 8), 2,048 features),
standardised, and each attribute gets a logistic-regression head (a sigmoid for binary
attributes, a softmax for several classes) trained with a class-balanced loss (each class
weighs as much as the others), input dropout and weight decay, by AdamW. Balanced training
maximises TPR - FPR, which is what the correction below divides by.

Measured (``python -m faceprint.bench recognisers``, seed 0, held-out identities of celeba-10k
/ held-out files of UTKFace): mean balanced accuracy 0.817 over the 40 CelebA attributes (vs
0.785 for the same model trained unweighted, 0.801 on the raw 8,192-d latents, 0.794 pooled
4x4, 0.8125 for a 64-unit MLP four times larger); e.g. Male 0.936, Eyeglasses 0.942, Bald 0.916;
UTKFace gender 0.877, race 0.706, age band 0.748. The rates hardly move on held-out photos after
a TAEF2 decode -> encode round trip (what a generated face is), and both sets are stored.

Scope: a classifier is only valid on faces framed like its training photos. UTKFace crops are
tighter than CelebA's: the UTKFace gender head scores 0.58 balanced accuracy on celeba-10k
photos and CelebA's Male head 0.68 on UTKFace. Use "celeba" for generators fitted on CelebA
photos and "utkface" for generators fitted on UTKFace photos.

Correcting measured rates for classifier error: if a classifier has true positive rate TPR
and false positive rate FPR (measured on held-out photos and stored in the artifact), the rate
m it measures on a set of faces has expectation p * TPR + (1 - p) * FPR, so the true rate is
estimated by p = (m - FPR) / (TPR - FPR) (:func:`correct_rate`; Rogan & Gladen, Am. J.
Epidemiol. 1978); for several classes, the measured proportions m solve C^T p = m with C the
held-out confusion matrix P(predicted j | true i) (:func:`correct_proportions`). Both assume
that the classifier errs on the faces measured as it does on held-out photos: generated faces
differ from photos, so treat corrected rates as estimates.

Artifacts (``weights/<name>.safetensors``, written by ``python -m faceprint.bench recognisers
--train-attributes``) hold the weights, the standardisation, the tasks and classes, the config,
the split rule, the seed, the exact command, the data hash and the held-out metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ArtifactError, ConfigError, DataError, InputError, NotFittedError

__all__ = [
    "AGE_BANDS",
    "DATASETS",
    "AttributeClassifier",
    "AttributeConfig",
    "Task",
    "compare_inputs",
    "correct_proportions",
    "correct_rate",
    "dataset_labels",
    "evaluate_dataset",
    "load_classifier",
    "split_mask",
    "task_metrics",
    "train_dataset",
    "weights_dir",
]

ARTIFACT_CLASS = "AttributeClassifier"
LATENT_SHAPE = (32, 16, 16)
AGE_BANDS = ((0, 9, "0-9"), (10, 19, "10-19"), (20, 39, "20-39"), (40, 59, "40-59"), (60, 200, "60+"))
RACES = ("white", "black", "asian", "indian", "other")
#: dataset name -> (folder under the datasets folder, label CSV, split key column or None for the file)
DATASETS = {
    "celeba": ("celeba-10k", "attributes.csv", "identity"),
    "utkface": ("utkface", "labels.csv", None),
}


def weights_dir() -> Path:
    """The package folder holding the shipped classifier artifacts."""
    return Path(__file__).resolve().parent / "weights"


# --------------------------------------------------------------------------------------------
# rate correction


def correct_rate(measured, tpr, fpr, *, clip: bool = False):
    """Estimate a true rate from a rate measured by an imperfect binary classifier.

    Parameters
    ----------
    measured : float or array-like
        Share of faces the classifier called positive, in [0, 1].
    tpr, fpr : float
        The classifier's true and false positive rates (held-out), with tpr > fpr.
    clip : bool
        Clip the estimate to [0, 1] (sampling noise can push it outside). Off by default so
        that a value outside [0, 1] stays visible.

    Returns
    -------
    float or numpy.ndarray
        (measured - fpr) / (tpr - fpr).
    """
    for name, v in (("tpr", tpr), ("fpr", fpr)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0 <= v <= 1:
            raise InputError(f"{name} must be a rate in [0, 1], got {v!r}")
    if tpr <= fpr:
        raise InputError(
            f"tpr ({tpr}) must exceed fpr ({fpr}): a classifier no better than chance cannot correct a rate"
        )
    m = np.asarray(measured, dtype=np.float64)
    if not np.all(np.isfinite(m)) or np.any(m < 0) or np.any(m > 1):
        raise InputError(f"measured must be rate(s) in [0, 1], got {measured!r}")
    p = (m - fpr) / (tpr - fpr)
    if clip:
        p = np.clip(p, 0.0, 1.0)
    return float(p) if p.ndim == 0 else p


def correct_proportions(measured, confusion, *, clip: bool = False) -> np.ndarray:
    """Estimate true class proportions from proportions measured by an imperfect classifier.

    Parameters
    ----------
    measured : array-like, (C,)
        Share of faces assigned to each class (sums to 1).
    confusion : array-like, (C, C)
        ``confusion[i, j]`` = P(predicted j | true i) on held-out data (rows sum to 1).
    clip : bool
        Clip negative estimates to 0 and renormalise (off by default).

    Returns
    -------
    numpy.ndarray, (C,)
        p solving ``confusion.T @ p = measured`` (sums to 1 when the inputs do).
    """
    m = np.asarray(measured, dtype=np.float64)
    c = np.asarray(confusion, dtype=np.float64)
    if m.ndim != 1 or c.shape != (m.size, m.size) or m.size < 2:
        raise InputError(
            f"measured must be (C,) and confusion (C, C) with C >= 2, got {m.shape} and {c.shape}"
        )
    if not np.all(np.isfinite(c)) or np.any(c < 0) or not np.allclose(c.sum(1), 1.0, atol=1e-6):
        raise InputError("confusion must hold rates P(predicted j | true i) whose rows sum to 1")
    if not np.all(np.isfinite(m)) or np.any(m < 0) or not np.isclose(m.sum(), 1.0, atol=1e-6):
        raise InputError(f"measured must be proportions (>= 0, summing to 1), got {m.tolist()}")
    if np.linalg.cond(c) > 1e8:
        raise InputError("confusion is singular: the classifier cannot tell some classes apart, so no correction exists")
    p = np.linalg.solve(c.T, m)
    if clip:
        p = np.clip(p, 0.0, None)
        p = p / p.sum()
    return p


# --------------------------------------------------------------------------------------------
# config and tasks


@dataclass(frozen=True)
class Task:
    """One attribute: its name and class names (binary tasks: (negative, positive))."""

    name: str
    classes: tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"task name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.classes, tuple) or len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"task {self.name!r} needs a tuple of >= 2 distinct class names, got {self.classes!r}")

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def n_outputs(self) -> int:
        return 1 if self.binary else len(self.classes)


@dataclass(frozen=True)
class AttributeConfig:
    """How an attribute classifier is built and trained.

    Parameters
    ----------
    pool : {1, 2, 4, 8, 16}
        Average-pooling factor on the 16x16 latent grid: 1 uses the raw 8,192 values, 2 gives
        (32, 8, 8) = 2,048 features, 4 gives 512.
    hidden : int
        0: a logistic-regression head per task; > 0: one shared hidden layer (GELU) of this width.
    epochs, batch_size, lr, weight_decay, dropout
        AdamW with a one-cycle learning-rate schedule; weight decay on weights only; dropout on
        the standardised input (and the hidden layer).
    balanced : bool
        Weigh classes equally in the loss (maximises balanced accuracy, i.e. TPR - FPR).
    test_fraction : float
        Share of the data held out (by identity where the dataset has identities).
    """

    pool: int = 2
    hidden: int = 0
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    dropout: float = 0.3
    balanced: bool = True
    test_fraction: float = 0.2

    def __post_init__(self):
        if self.pool not in (1, 2, 4, 8, 16):
            raise ConfigError(f"pool must be one of 1, 2, 4, 8, 16, got {self.pool!r}; 2 is the measured best")
        for name, lo in (("hidden", 0), ("epochs", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        for name, lo, hi in (("lr", 0, 1), ("weight_decay", 0, 10), ("dropout", 0, 0.95), ("test_fraction", 0, 0.9)):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and lo <= v <= hi
            if not ok or (name in ("lr", "test_fraction") and v == 0):
                raise ConfigError(f"{name} must be a number in {'(' if name in ('lr', 'test_fraction') else '['}{lo}, {hi}], got {v!r}")
        if not isinstance(self.balanced, bool):
            raise ConfigError(f"balanced must be True or False, got {self.balanced!r}")

    @property
    def n_features(self) -> int:
        c, h, w = LATENT_SHAPE
        return c * (h // self.pool) * (w // self.pool)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# splits and labels


def split_mask(keys, seed: int, test_fraction: float = 0.2) -> np.ndarray:
    """Held-out mask: key k is held out when sha256("<seed>:<k>") mod 10,000 < 10,000 * test_fraction.

    The rule depends on the key only (an identity, or a file name), so every photo of one
    person falls on the same side, and any subset of the data can be split the same way.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    cut = int(round(10_000 * test_fraction))
    return np.array([int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(), 16) % 10_000 < cut for k in keys], dtype=bool)


def _age_band(v: str) -> int:
    s = v.strip()
    if not s:
        return -1
    try:
        a = int(float(s))
    except ValueError:
        raise DataError(f"age {v!r} is not a number") from None
    for i, (lo, hi, _) in enumerate(AGE_BANDS):
        if lo <= a <= hi:
            return i
    raise DataError(f"age {v!r} is outside 0..200")


def dataset_labels(name: str, labels: dict[str, list[str]]) -> tuple[list[Task], np.ndarray]:
    """Tasks and an (N, T) int64 label matrix (class index; -1 = missing) from a dataset's CSV columns."""
    if name == "celeba":
        cols = [c for c in labels if c != "identity"]
        tasks = [Task(c, ("no", "yes")) for c in cols]
        y = np.full((len(labels[cols[0]]), len(cols)), -1, np.int64)
        for j, c in enumerate(cols):
            for i, v in enumerate(labels[c]):
                s = v.strip()
                if s in ("1", "-1"):
                    y[i, j] = int(s == "1")
                elif s:
                    raise DataError(f"celeba attribute {c!r} holds {v!r}; expected -1 or 1")
        return tasks, y
    if name == "utkface":
        tasks = [Task("gender", ("female", "male")), Task("race", RACES), Task("age_band", tuple(b[2] for b in AGE_BANDS))]
        n = len(labels["gender"])
        y = np.full((n, 3), -1, np.int64)
        for i in range(n):
            g, r = labels["gender"][i].strip(), labels["race"][i].strip()
            y[i, 0] = {"female": 0, "male": 1}.get(g, -1) if g else -1
            y[i, 1] = RACES.index(r) if r in RACES else -1
            y[i, 2] = _age_band(labels["age"][i])
        return tasks, y
    raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")


def _load_dataset(name: str, base, *, progress: bool = False):
    """(LatentSet, tasks, labels (N, T), split keys) of a dataset folder under ``base``."""
    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder

    if name not in DATASETS:
        raise InputError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    folder_name, csv_name, key_col = DATASETS[name]
    root = Path(base) / folder_name
    if not (root / csv_name).is_file():
        raise DataError(f"dataset {name!r}: {str(root / csv_name)!r} not found; pass the folder holding {folder_name}/")
    folder = FaceFolder(root / "images", size=128, labels=root / csv_name)
    ls = encode_folder(folder, TAEF2.load(), cache=LatentCache(), progress=progress)
    tasks, y = dataset_labels(name, ls.labels)
    keys = ls.labels[key_col] if key_col else ls.relpaths
    return ls, tasks, y, keys


# --------------------------------------------------------------------------------------------
# metrics


def task_metrics(pred, true, classes) -> dict:
    """Held-out metrics of one task from predicted and true class indices (missing: -1 in true).

    Returns n, accuracy, balanced accuracy (mean per-class recall), the majority-class rate,
    the confusion rates P(predicted j | true i) with the support of each class, and for binary
    tasks the prevalence, TPR and FPR.
    """
    pred = np.asarray(pred, np.int64)
    true = np.asarray(true, np.int64)
    keep = true >= 0
    pred, true = pred[keep], true[keep]
    c = len(classes)
    counts = np.zeros((c, c), np.int64)
    np.add.at(counts, (true, pred), 1)
    support = counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(support[:, None] > 0, counts / np.maximum(support[:, None], 1), np.nan)
    recall = np.diag(rates)
    n = int(keep.sum())
    out = {
        "kind": "binary" if c == 2 else "multiclass",
        "classes": list(classes),
        "n": n,
        "accuracy": float((pred == true).mean()) if n else float("nan"),
        "balanced_accuracy": float(np.nanmean(recall)) if n else float("nan"),
        "majority": float(support.max() / max(n, 1)),
        "support": support.tolist(),
        "confusion": rates.tolist(),
    }
    if c == 2:
        out.update(prevalence=float(support[1] / max(n, 1)), tpr=float(rates[1, 1]), fpr=float(rates[0, 1]))
    return out


# --------------------------------------------------------------------------------------------
# the classifier


class AttributeClassifier:
    """Multi-task attribute classifier on TAEF2 latents.

    Parameters
    ----------
    config : AttributeConfig, optional

    Attributes
    ----------
    tasks_ : list of Task
    mean_, std_ : torch.Tensor
        (F,) standardisation of the pooled latent features.
    weight_, bias_ : torch.Tensor
        (O, F') and (O,) output layer (O = sum of the tasks' outputs; F' = F or ``hidden``).
    hidden_weight_, hidden_bias_ : torch.Tensor or None
        The hidden layer when ``config.hidden > 0``.
    metrics_ : dict
        task -> held-out metrics on photos (see :func:`task_metrics`), set by training or loading.
    metrics_roundtrip_ : dict
        task -> held-out metrics on the same photos after a TAEF2 decode -> encode round trip
        (what :meth:`classify` sees of a generated face): the rates to correct with when
        measuring generated faces.
    provenance : dict
        Data, split, seed, command, training time (set by :func:`train_dataset` or loading).
    """

    def __init__(self, config: AttributeConfig | None = None):
        if config is not None and not isinstance(config, AttributeConfig):
            raise ConfigError(f"config must be an AttributeConfig, got {type(config).__name__}")
        self.config = config or AttributeConfig()
        self.tasks_: list[Task] | None = None
        self.mean_ = self.std_ = self.weight_ = self.bias_ = None
        self.hidden_weight_ = self.hidden_bias_ = None
        self.metrics_: dict = {}
        self.metrics_roundtrip_: dict = {}
        self.provenance: dict = {}
        self._autoencoder = None

    def __repr__(self) -> str:
        tasks = "unfitted" if self.tasks_ is None else f"{len(self.tasks_)} tasks"
        return f"AttributeClassifier({tasks}, {self.config!r})"

    # ---------------------------------------------------------------------------------------- features
    def _features(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[1:]) != LATENT_SHAPE:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError(
                f"latents must be a (N, 32, 16, 16) tensor (TAEF2 latents of 128 px faces), got {got}; "
                "classify images with classify(images)"
            )
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise InputError("latents must be finite floating-point values")
        z = latents.detach().to(torch.float32)
        if self.config.pool > 1:
            z = F.avg_pool2d(z, self.config.pool)
        return z.flatten(1)

    def _check_fitted(self):
        if self.tasks_ is None:
            raise NotFittedError("this AttributeClassifier is not trained; call fit() or use load_classifier(name)")

    @property
    def tasks(self) -> list[Task]:
        self._check_fitted()
        return list(self.tasks_)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise InputError(f"no attribute {name!r}; this classifier knows {', '.join(t.name for t in self.tasks_)}")

    # ---------------------------------------------------------------------------------------- fit
    def fit(self, latents: torch.Tensor, labels, tasks, *, seed: int = 0, progress: bool = False) -> AttributeClassifier:
        """Train on latents (N, 32, 16, 16) and labels (N, T) class indices (-1 = missing).

        Parameters
        ----------
        latents : torch.Tensor
        labels : array-like of int, (N, T)
        tasks : list of Task
            One per column of ``labels``.
        seed : int
            Initialisation, batch order and dropout masks (no global random state is used).
        """
        cfg = self.config
        x = self._features(latents)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        tasks = list(tasks)
        if not tasks or not all(isinstance(t, Task) for t in tasks):
            raise InputError("tasks must be a non-empty list of Task")
        if y.ndim != 2 or y.shape != (x.shape[0], len(tasks)):
            raise InputError(f"labels must be (N={x.shape[0]}, T={len(tasks)}) class indices, got {tuple(y.shape)}")
        for j, t in enumerate(tasks):
            col = y[:, j]
            if (col < -1).any() or (col >= len(t.classes)).any():
                raise InputError(f"labels of task {t.name!r} must be -1 (missing) or 0..{len(t.classes) - 1}")
            present = set(col[col >= 0].tolist())
            if len(present) < len(t.classes):
                raise DataError(f"task {t.name!r}: classes {sorted(set(range(len(t.classes))) - present)} have no "
                                "training example; every class needs some")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an int, got {seed!r}")
        g = torch.Generator().manual_seed(seed)
        mean = x.mean(0)
        std = x.std(0).clamp_min(1e-3)
        xs = (x - mean) / std
        n, f = xs.shape
        o = sum(t.n_outputs for t in tasks)
        params = {}
        width = f
        if cfg.hidden:
            bound = 1 / np.sqrt(f)
            params["hidden_weight"] = (torch.rand(cfg.hidden, f, generator=g) * 2 - 1) * bound
            params["hidden_bias"] = torch.zeros(cfg.hidden)
            width = cfg.hidden
        params["weight"] = (torch.rand(o, width, generator=g) * 2 - 1) / np.sqrt(width)
        params["bias"] = torch.zeros(o)
        for p in params.values():
            p.requires_grad_(True)
        # class weights: each class of a task weighs the same in total
        cw = []
        for j, t in enumerate(tasks):
            col = y[:, j]
            cnt = torch.bincount(col[col >= 0], minlength=len(t.classes)).double()
            w = (cnt.sum() / (len(t.classes) * cnt)) if cfg.balanced else torch.ones(len(t.classes), dtype=torch.float64)
            cw.append(w.float())
        decay = [params[k] for k in params if k.endswith("weight")]
        no_decay = [params[k] for k in params if k.endswith("bias")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        for _ in tqdm(range(cfg.epochs), desc="training", unit="epoch", disable=None if progress else True):
            perm = torch.randperm(n, generator=g)
            for s in range(0, n, cfg.batch_size):
                idx = perm[s : s + cfg.batch_size]
                logits = self._forward(xs[idx], params, g)
                loss = self._loss(logits, y[idx], tasks, cw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.fit_seconds_ = time.perf_counter() - t0
        self.tasks_ = tasks
        self.mean_, self.std_ = mean, std
        self.weight_ = params["weight"].detach().clone()
        self.bias_ = params["bias"].detach().clone()
        if cfg.hidden:
            self.hidden_weight_ = params["hidden_weight"].detach().clone()
            self.hidden_bias_ = params["hidden_bias"].detach().clone()
        return self

    def _forward(self, xs, params, g=None):
        """Logits (N, O) from standardised features; dropout when a generator is given (training)."""
        p = self.config.dropout
        if g is not None and p > 0:
            xs = xs * (torch.rand(xs.shape, generator=g) >= p) / (1 - p)
        if "hidden_weight" in params and params["hidden_weight"] is not None:
            xs = F.gelu(xs @ params["hidden_weight"].T + params["hidden_bias"])
            if g is not None and p > 0:
                xs = xs * (torch.rand(xs.shape, generator=g) >= p) / (1 - p)
        return xs @ params["weight"].T + params["bias"]

    @staticmethod
    def _loss(logits, y, tasks, cw):
        total = logits.new_zeros(())
        k = 0
        for j, t in enumerate(tasks):
            col = y[:, j]
            m = col >= 0
            if m.any():
                if t.binary:
                    z = logits[m, k]
                    tgt = col[m].float()
                    w = cw[j][col[m]]
                    total = total + (F.binary_cross_entropy_with_logits(z, tgt, reduction="none") * w).sum() / w.sum()
                else:
                    z = logits[m, k : k + len(t.classes)]
                    total = total + F.cross_entropy(z, col[m], weight=cw[j])
            k += t.n_outputs
        return total / len(tasks)

    # ---------------------------------------------------------------------------------------- predict
    def _logits(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        xs = (self._features(latents) - self.mean_) / self.std_
        params = {"weight": self.weight_, "bias": self.bias_, "hidden_weight": self.hidden_weight_, "hidden_bias": self.hidden_bias_}
        with torch.no_grad():
            return self._forward(xs, params)

    def predict_proba_latents(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """task -> (N, C) class probabilities, from latents (N, 32, 16, 16)."""
        logits = self._logits(latents)
        out, k = {}, 0
        for t in self.tasks_:
            if t.binary:
                p1 = torch.sigmoid(logits[:, k])
                out[t.name] = torch.stack([1 - p1, p1], 1)
            else:
                out[t.name] = torch.softmax(logits[:, k : k + len(t.classes)], 1)
            k += t.n_outputs
        return out

    def predict_latents(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """task -> (N,) int64 predicted class index (binary tasks: 1 = has the attribute)."""
        return {k: v.argmax(1) for k, v in self.predict_proba_latents(latents).items()}

    def _encoder(self, autoencoder):
        if autoencoder is not None:
            return autoencoder
        if self._autoencoder is None:
            from ..autoencoder import TAEF2

            self._autoencoder = TAEF2.load()
        return self._autoencoder

    def encode(self, images: torch.Tensor, *, autoencoder=None) -> torch.Tensor:
        """TAEF2 latents (N, 32, 16, 16) of images (N, 3, 128, 128) in [0, 1]."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, 128, 128):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(
                f"images must be a (N, 3, 128, 128) tensor in [0, 1] (the working resolution), got {got}; "
                "load photos with faceprint.data.load_image(path, 128)"
            )
        ae = self._encoder(autoencoder)
        return ae.encode(images)

    def classify(self, images: torch.Tensor, *, autoencoder=None) -> dict[str, torch.Tensor]:
        """task -> (N,) predicted class index for images (N, 3, 128, 128) in [0, 1].

        The images are encoded with TAEF2 (``autoencoder`` or the pinned TAEF2, loaded once),
        then classified (:meth:`predict_latents`).
        """
        return self.predict_latents(self.encode(images, autoencoder=autoencoder))

    def predict_proba(self, images: torch.Tensor, *, autoencoder=None) -> dict[str, torch.Tensor]:
        """task -> (N, C) probabilities for images (N, 3, 128, 128) in [0, 1]."""
        return self.predict_proba_latents(self.encode(images, autoencoder=autoencoder))

    # ---------------------------------------------------------------------------------------- rates
    def measured_rates(self, predictions: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """task -> (C,) share of faces predicted in each class."""
        out = {}
        for t in self.tasks:
            if t.name in predictions:
                p = torch.as_tensor(predictions[t.name])
                out[t.name] = np.bincount(p.numpy(), minlength=len(t.classes)) / max(len(p), 1)
        return out

    def corrected_rate(self, task: str, measured, *, rates: str = "roundtrip", clip: bool = False):
        """Correct a measured rate (binary task: share predicted positive; multiclass: (C,)
        proportions) with this classifier's held-out TPR/FPR or confusion matrix.

        ``rates="roundtrip"`` (default, for generated faces) uses the rates measured on held-out
        photos after a TAEF2 round trip, falling back to the photo rates if absent;
        ``rates="photos"`` uses the rates measured on the photos' own latents.
        """
        if rates not in ("roundtrip", "photos"):
            raise InputError(f"rates must be 'roundtrip' or 'photos', got {rates!r}")
        t = self.task(task)
        m = (self.metrics_roundtrip_.get(task) if rates == "roundtrip" else None) or self.metrics_.get(task)
        if m is None:
            raise NotFittedError(f"no held-out metrics for {task!r}: evaluate the classifier (train_dataset does)")
        if t.binary:
            return correct_rate(measured, m["tpr"], m["fpr"], clip=clip)
        return correct_proportions(measured, m["confusion"], clip=clip)

    # ---------------------------------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write the classifier (weights, standardisation, tasks, config, metrics, provenance)."""
        self._check_fitted()
        from ..io import now_iso, save_artifact

        tensors = {"mean": self.mean_, "std": self.std_, "weight": self.weight_, "bias": self.bias_}
        if self.hidden_weight_ is not None:
            tensors.update(hidden_weight=self.hidden_weight_, hidden_bias=self.hidden_bias_)
        meta = {
            "class": ARTIFACT_CLASS,
            "config": self.config.to_dict(),
            "tasks": [[t.name, list(t.classes)] for t in self.tasks_],
            "metrics": self.metrics_,
            "metrics_roundtrip": self.metrics_roundtrip_,
            "provenance": {"created": now_iso(), **self.provenance},
        }
        save_artifact(path, tensors, meta)

    @classmethod
    def load(cls, path) -> AttributeClassifier:
        """Read an artifact written by :meth:`save`."""
        from ..io import load_artifact

        tensors, meta = load_artifact(path, expected_class=ARTIFACT_CLASS)
        try:
            clf = cls(AttributeConfig(**meta["config"]))
            clf.tasks_ = [Task(name, tuple(classes)) for name, classes in meta["tasks"]]
            clf.mean_, clf.std_ = tensors["mean"].float(), tensors["std"].float()
            clf.weight_, clf.bias_ = tensors["weight"].float(), tensors["bias"].float()
            if "hidden_weight" in tensors:
                clf.hidden_weight_, clf.hidden_bias_ = tensors["hidden_weight"].float(), tensors["hidden_bias"].float()
        except (KeyError, TypeError, ConfigError) as e:
            raise ArtifactError(f"attribute classifier file {str(path)!r} is incomplete or inconsistent ({e})") from None
        o = sum(t.n_outputs for t in clf.tasks_)
        width = clf.config.hidden or clf.config.n_features
        if tuple(clf.weight_.shape) != (o, width) or tuple(clf.mean_.shape) != (clf.config.n_features,):
            raise ArtifactError(f"attribute classifier file {str(path)!r}: weight shape {tuple(clf.weight_.shape)} does not "
                                f"match its {len(clf.tasks_)} tasks and config")
        clf.metrics_ = meta.get("metrics", {})
        clf.metrics_roundtrip_ = meta.get("metrics_roundtrip", {})
        clf.provenance = meta.get("provenance", {})
        return clf


def load_classifier(name: str) -> AttributeClassifier:
    """A shipped classifier: "celeba" (40 CelebA attributes) or "utkface" (gender, race, age band)."""
    if name not in DATASETS:
        raise InputError(f"name must be one of {', '.join(DATASETS)}, got {name!r}")
    path = weights_dir() / f"{name}.safetensors"
    if not path.is_file():
        raise ArtifactError(f"attribute classifier {str(path)!r} is missing; train it with "
                            "`python -m faceprint.bench recognisers --train-attributes`")
    return AttributeClassifier.load(path)


# --------------------------------------------------------------------------------------------
# training and evaluation on the shared datasets


def _held_out_metrics(clf: AttributeClassifier, latents, y, tasks) -> dict:
    pred = clf.predict_latents(latents)
    return {t.name: task_metrics(pred[t.name].numpy(), y[:, j], t.classes) for j, t in enumerate(tasks)}


def train_dataset(name: str, base, *, seed: int = 0, config: AttributeConfig | None = None,
                  command: str = "", progress: bool = False) -> AttributeClassifier:
    """Train the classifier of dataset ``name`` ("celeba" or "utkface") found under ``base``
    on its training split, measure it on its held-out split and return it (metrics and
    provenance set). Latents come from the latent cache (outside the repository)."""
    config = config or AttributeConfig()
    ls, tasks, y, keys = _load_dataset(name, base, progress=progress)
    test = split_mask(keys, seed, config.test_fraction)
    tr = torch.from_numpy(~test)
    clf = AttributeClassifier(config).fit(ls.latents[tr], y[~test], tasks, seed=seed, progress=progress)
    z_test = ls.latents[torch.from_numpy(test)]
    clf.metrics_ = _held_out_metrics(clf, z_test, y[test], tasks)
    ae = clf._encoder(None)
    clf.metrics_roundtrip_ = _held_out_metrics(clf, ae.encode(ae.decode(z_test)), y[test], tasks)
    folder, csv_name, key_col = DATASETS[name]
    clf.provenance = {
        "command": command,
        "data": f"{folder}: {ls.root} (labels {csv_name})",
        "data_hash": ls.data_hash,
        "photos": len(ls),
        "autoencoder": ls.autoencoder_id,
        "split": {"rule": f"held out: sha256('<seed>:<{key_col or 'file name'}>') mod 10000 < {int(round(1e4 * config.test_fraction))}",
                  "key": key_col or "file", "test_fraction": config.test_fraction,
                  "train": int((~test).sum()), "test": int(test.sum())},
        "seed": seed,
        "train_seconds": round(clf.fit_seconds_, 2),
        "torch_threads": torch.get_num_threads(),
    }
    return clf


def evaluate_dataset(clf: AttributeClassifier, name: str, base, *, roundtrip: bool = False) -> dict:
    """Held-out metrics of ``clf`` on dataset ``name``, with the split stored in its provenance.

    ``roundtrip=True``: the held-out latents are first decoded to images and encoded again with
    TAEF2, as a generated face is (decode, then :meth:`AttributeClassifier.classify`), so the
    rates measure the classifier on decoder output rather than on photos.
    """
    ls, tasks, y, keys = _load_dataset(name, base)
    split = clf.provenance.get("split", {})
    seed = clf.provenance.get("seed", 0)
    test = split_mask(keys, seed, split.get("test_fraction", clf.config.test_fraction))
    names = [t.name for t in clf.tasks]
    cols = [next(j for j, t in enumerate(tasks) if t.name == n) for n in names]
    z = ls.latents[torch.from_numpy(test)]
    if roundtrip:
        ae = clf._encoder(None)
        z = ae.encode(ae.decode(z))
    return _held_out_metrics(clf, z, y[test][:, cols], [tasks[j] for j in cols])


def cross_gender(models: dict, base) -> list[dict]:
    """Gender of each dataset's classifier on the other dataset's held-out photos."""
    out = []
    ls_c, tasks_c, y_c, keys_c = _load_dataset("celeba", base)
    ls_u, tasks_u, y_u, keys_u = _load_dataset("utkface", base)
    male_c = y_c[:, [t.name for t in tasks_c].index("Male")]
    male_u = y_u[:, 0]
    for clf_name, task, ls, y, keys, photos in (
        ("utkface", "gender", ls_c, male_c, keys_c, "celeba-10k"),
        ("celeba", "Male", ls_u, male_u, keys_u, "utkface"),
    ):
        clf = models[clf_name]
        other = "celeba" if clf_name == "utkface" else "utkface"
        prov = models[other].provenance
        test = split_mask(keys, prov.get("seed", 0), prov.get("split", {}).get("test_fraction", 0.2))
        pred = clf.predict_latents(ls.latents[torch.from_numpy(test)])[task].numpy()
        m = task_metrics(pred, y[test], ("female", "male"))
        out.append({"classifier": f"{clf_name} {task}", "photos": f"{photos} held-out", "n": m["n"],
                    "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]})
    return out


def compare_inputs(celeba_root, *, seed: int = 0) -> tuple[list[list], list[dict]]:
    """Held-out mean accuracy of candidate inputs/models on celeba-10k's 40 attributes (the
    measurement that chose :class:`AttributeConfig`'s defaults)."""
    base = Path(celeba_root).parent
    ls, tasks, y, keys = _load_dataset("celeba", base)
    test = split_mask(keys, seed, 0.2)
    tr, te = torch.from_numpy(~test), torch.from_numpy(test)
    candidates = [
        ("raw latents, 8192-d", "logistic (balanced)", AttributeConfig(pool=1, epochs=15, weight_decay=1e-1)),
        ("pooled 2x2, 2048-d", "logistic (balanced)", AttributeConfig(pool=2)),
        ("pooled 2x2, 2048-d", "logistic (unweighted)", AttributeConfig(pool=2, balanced=False)),
        ("pooled 4x4, 512-d", "logistic (balanced)", AttributeConfig(pool=4)),
        ("pooled 2x2, 2048-d", "MLP 64 (balanced)", AttributeConfig(pool=2, hidden=64, weight_decay=5e-2)),
    ]
    rows, out = [], []
    for inp, model, cfg in candidates:
        clf = AttributeClassifier(cfg).fit(ls.latents[tr], y[~test], tasks, seed=seed)
        m = _held_out_metrics(clf, ls.latents[te], y[test], tasks)
        acc = float(np.mean([v["accuracy"] for v in m.values()]))
        bal = float(np.mean([v["balanced_accuracy"] for v in m.values()]))
        n_params = clf.weight_.numel() + clf.bias_.numel() + (clf.hidden_weight_.numel() + clf.hidden_bias_.numel()
                                                              if clf.hidden_weight_ is not None else 0)
        rows.append([inp, model, n_params, f"{clf.fit_seconds_:.1f}", f"{acc:.4f}", f"{bal:.4f}"])
        out.append({"input": inp, "model": model, "config": cfg.to_dict(), "params": n_params,
                    "train_seconds": clf.fit_seconds_, "mean_accuracy": acc, "mean_balanced_accuracy": bal,
                    "per_attribute": {k: {"accuracy": v["accuracy"], "balanced_accuracy": v["balanced_accuracy"]} for k, v in m.items()}})
    return rows, out
