"""Identity recogniser: dlib's 128-d face descriptor, its verification ROC and a gallery rule.

Implements the frozen identity recogniser of the control stage ("tame a fitted model"): the
face descriptor of dlib (``dlib_face_recognition_resnet_model_v1``, D. King, a ResNet-29
trained with a pairwise hinge metric loss on ~3M faces; 99.38% on LFW; public domain),
shipped by the PyPI package ``face-recognition-models`` and run by ``dlib-bin``. Two faces are
the same person when the Euclidean distance of their descriptors is below 0.6 (dlib's
threshold).

Alignment. The network expects dlib's 150x150 face chip (the similarity transform that puts
the 5 landmarks of ``shape_predictor_5_face_landmarks`` at fixed places, 25% padding). faceprint
images are square centre crops of CelebA-aligned photos (or generated faces that imitate them),
so the face sits in a known box: ``align="landmarks"`` (default) runs the 5-point landmark
model inside that fixed box and cuts the chip from the image (no face detector); ``"fixed"``
uses the mean landmarks of celeba-id at 128 px instead (no landmark model, for faces whose
landmarks cannot be trusted); ``"chip"`` takes images that already are 150x150 chips.
Measured on celeba-id (``python -m faceprint.bench recognisers``, 1,600 photos of 160 people):
at threshold 0.6, landmark alignment at 128 px accepts 89.4% of genuine pairs and 0.30% of
impostor pairs, as at native resolution (89.9%, 0.29%); "fixed" 89.1%, 0.32%; after a TAEF2
round trip 85.5%, 0.39%; resizing the whole 128 px image to 150 px without alignment is useless
(97%, 90%).

Decision rule for "is this face person P" (:class:`IdentityGallery`, :meth:`IdentityRecogniser.accepts`):
P is enrolled with k of P's photos; a face is accepted as P when the distance from its
descriptor to the **mean** descriptor of the k photos is at most ``gallery_threshold``. The
default threshold is calibrated on celeba-id (see ``GALLERY_THRESHOLD``); the rule "closer than
0.6 to any of the k photos" is available (``gallery_rule="any"``) but its false accept rate
grows with k. The 68-point landmark model shipped in the same package (non-commercial iBUG
300-W terms) is never used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError, WeightsError

__all__ = [
    "DEFAULT_BOX",
    "DESCRIPTOR_DIM",
    "GALLERY_THRESHOLD",
    "MEAN_LANDMARKS",
    "MODEL_FILES",
    "PAIR_THRESHOLD",
    "IdentityConfig",
    "IdentityGallery",
    "IdentityRecogniser",
    "find_dlib_models",
    "gallery_rates",
    "pair_distances",
    "roc_points",
    "threshold_at_far",
]

DESCRIPTOR_DIM = 128
CHIP_SIZE = 150
#: dlib's same-person threshold on the descriptor distance.
PAIR_THRESHOLD = 0.6
#: Threshold of the mean-descriptor gallery rule (k = 5 enrolment photos), calibrated on
#: celeba-id (160 people x 10 photos): the largest threshold with an impostor accept rate
#: <= 1e-3 per (face, person) trial was 0.510 at 128 px and 0.495 after a TAEF2 round trip
#: (even-indexed people); at 0.5 the rule accepts 94.4% of genuine 128 px probes (93.8% after
#: the round trip) and 0.068% (0.106%) of impostor trials (all 160 people).
GALLERY_THRESHOLD = 0.5
GALLERY_RULES = ("mean", "any")
ALIGNMENTS = ("landmarks", "fixed", "chip")

#: The face box (left, top, right, bottom) as fractions of the side of a square centre crop of
#: a CelebA-aligned photo: dlib's HOG detector box on the 178x218 originals (46, 86, 135, 176)
#: moved into the 178x178 centre square.
DEFAULT_BOX = (46 / 178, 66 / 178, 135 / 178, 156 / 178)
#: Mean 5-point landmarks (x, y) of 240 celeba-id photos at 128 px (40 people x 6), as fractions
#: of the side: right-eye outer/inner corner, left-eye outer/inner corner, base of the nose.
MEAN_LANDMARKS = (
    (82.95 / 128, 66.36 / 128),
    (71.70 / 128, 67.13 / 128),
    (44.32 / 128, 66.32 / 128),
    (55.40 / 128, 67.19 / 128),
    (63.16 / 128, 88.07 / 128),
)

RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARK_MODEL = "shape_predictor_5_face_landmarks.dat"
#: sha256 of the model files of face-recognition-models 0.3.0 that faceprint was measured with.
MODEL_FILES = {
    RECOGNITION_MODEL: "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    LANDMARK_MODEL: "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
}
INSTALL_HINT = "install them with: pip install dlib-bin face-recognition-models"

_VERIFIED: dict[str, str] = {}  # path -> sha256 already checked in this process


# --------------------------------------------------------------------------------------------
# model files


def _import_dlib():
    try:
        import dlib
    except ImportError as e:
        raise WeightsError(f"the identity recogniser needs dlib, which cannot be imported ({e}); {INSTALL_HINT}") from None
    return dlib


def find_dlib_models(models_dir=None) -> dict[str, Path]:
    """Locate and verify (sha256) the dlib model files; return name -> path.

    Parameters
    ----------
    models_dir : str, Path or None
        A folder holding ``dlib_face_recognition_resnet_model_v1.dat`` and
        ``shape_predictor_5_face_landmarks.dat``; None: the ``models`` folder of the installed
        ``face_recognition_models`` package, found without importing it (its ``__init__``
        needs pkg_resources, which this setuptools lacks).

    Raises
    ------
    WeightsError
        If the package or a file is missing, or a file's sha256 differs from :data:`MODEL_FILES`.
    """
    from ..io import sha256_file

    if models_dir is None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(f"the dlib face models (package face-recognition-models) are not installed; {INSTALL_HINT}")
        folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    else:
        if not isinstance(models_dir, (str, os.PathLike)):
            raise InputError(f"models_dir must be a folder path or None, got {type(models_dir).__name__} {models_dir!r}")
        folder = Path(models_dir).expanduser()
    out = {}
    for name, digest in MODEL_FILES.items():
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"dlib model file {str(path)!r} is missing; {INSTALL_HINT} (or pass models_dir=)")
        key = str(path.resolve())
        if _VERIFIED.get(key) != digest:
            got = sha256_file(path)
            if got != digest:
                raise WeightsError(
                    f"dlib model file {str(path)!r} has sha256 {got[:16]}..., expected {digest[:16]}... "
                    "(face-recognition-models 0.3.0); reinstall the package or pass models_dir= to intact copies"
                )
            _VERIFIED[key] = digest
        out[name] = path
    return out


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class IdentityConfig:
    """How faces are aligned and compared.

    Parameters
    ----------
    align : {"landmarks", "fixed", "chip"}
        "landmarks": 5-point landmarks found inside ``box``, then dlib's face chip (default);
        "fixed": the chip of :data:`MEAN_LANDMARKS` (no landmark model); "chip": the images are
        150x150 chips already.
    box : tuple of 4 floats
        (left, top, right, bottom) of the face as fractions of the image side, for "landmarks".
    padding : float
        Chip padding around the landmarks (dlib's default 0.25; the network was trained with it).
    num_jitters : int
        dlib's test-time jittering (0 = none; k > 0 averages k jittered copies, k times slower).
    pair_threshold : float
        Same person when the distance of two descriptors is below this (dlib: 0.6).
    gallery_rule : {"mean", "any"}
        "mean": accept a face as P when its distance to the mean descriptor of P's enrolment
        photos is at most ``gallery_threshold``; "any": when its distance to any of them is.
    gallery_threshold : float or None
        None: :data:`GALLERY_THRESHOLD` for "mean", ``pair_threshold`` for "any".
    """

    align: str = "landmarks"
    box: tuple[float, float, float, float] = DEFAULT_BOX
    padding: float = 0.25
    num_jitters: int = 0
    pair_threshold: float = PAIR_THRESHOLD
    gallery_rule: str = "mean"
    gallery_threshold: float | None = None

    def __post_init__(self):
        if self.align not in ALIGNMENTS:
            raise ConfigError(f"align must be one of {ALIGNMENTS}, got {self.align!r}; 'landmarks' suits 128 px faces")
        box = self.box
        if (
            not isinstance(box, (tuple, list))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1)
        ):
            raise ConfigError(
                f"box must be (left, top, right, bottom) fractions of the image side with 0 <= left < right <= 1 "
                f"and 0 <= top < bottom <= 1, got {box!r}; the default is {tuple(round(v, 3) for v in DEFAULT_BOX)}"
            )
        object.__setattr__(self, "box", tuple(float(v) for v in box))
        if isinstance(self.padding, bool) or not isinstance(self.padding, (int, float)) or not 0 <= self.padding <= 1:
            raise ConfigError(f"padding must be a number in [0, 1], got {self.padding!r}; dlib's networks use 0.25")
        if isinstance(self.num_jitters, bool) or not isinstance(self.num_jitters, int) or self.num_jitters < 0:
            raise ConfigError(f"num_jitters must be an int >= 0, got {self.num_jitters!r}; 0 is deterministic and fastest")
        for name in ("pair_threshold", "gallery_threshold"):
            v = getattr(self, name)
            if v is None and name == "gallery_threshold":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 4:
                raise ConfigError(f"{name} must be a distance in (0, 4), got {v!r}; dlib's pair threshold is 0.6")
        if self.gallery_rule not in GALLERY_RULES:
            raise ConfigError(f"gallery_rule must be one of {GALLERY_RULES}, got {self.gallery_rule!r}")

    @property
    def resolved_gallery_threshold(self) -> float:
        """The gallery threshold in force (the default of the rule when ``gallery_threshold`` is None)."""
        if self.gallery_threshold is not None:
            return float(self.gallery_threshold)
        return GALLERY_THRESHOLD if self.gallery_rule == "mean" else float(self.pair_threshold)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# gallery


@dataclass(frozen=True)
class IdentityGallery:
    """A person enrolled from k photos: their descriptors and mean descriptor.

    Attributes
    ----------
    name : str
    descriptors : torch.Tensor
        (k, 128) float32.
    """

    name: str
    descriptors: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise InputError(f"name must be a str, got {type(self.name).__name__} {self.name!r}")
        d = _check_descriptors(self.descriptors, "descriptors")
        if d.shape[0] == 0:
            raise InputError("a gallery needs at least one descriptor; enrol one or more photos of the person")
        object.__setattr__(self, "descriptors", d)

    @property
    def mean(self) -> torch.Tensor:
        """(128,) mean descriptor."""
        return self.descriptors.mean(0)

    def __len__(self) -> int:
        return self.descriptors.shape[0]

    def save(self, path) -> None:
        """Write the gallery (descriptors of someone's photos: keep it out of repositories)."""
        from ..io import now_iso, save_artifact

        save_artifact(path, {"descriptors": self.descriptors},
                      {"class": "IdentityGallery", "name": self.name, "created": now_iso(),
                       "model": MODEL_FILES[RECOGNITION_MODEL]})

    @classmethod
    def load(cls, path) -> IdentityGallery:
        from ..io import load_artifact

        tensors, meta = load_artifact(path, expected_class="IdentityGallery")
        return cls(meta.get("name", ""), tensors["descriptors"])


def _check_descriptors(d, name: str) -> torch.Tensor:
    if isinstance(d, np.ndarray):
        d = torch.from_numpy(d)
    if not isinstance(d, torch.Tensor) or d.ndim != 2 or d.shape[1] != DESCRIPTOR_DIM or not d.is_floating_point():
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise InputError(f"{name} must be a float (N, {DESCRIPTOR_DIM}) tensor of face descriptors, got {got}; "
                         "compute them with IdentityRecogniser.describe(images)")
    d = d.detach().to(torch.float32)
    if not torch.isfinite(d).all():
        raise InputError(f"{name} holds NaN or infinite values")
    return d


# --------------------------------------------------------------------------------------------
# the recogniser


class IdentityRecogniser:
    """dlib's face descriptor on faceprint images, with pair and gallery decisions.

    Parameters
    ----------
    config : IdentityConfig, optional
    models_dir : str or Path, optional
        See :func:`find_dlib_models`.

    Examples
    --------
    >>> rec = IdentityRecogniser()
    >>> d = rec.describe(images)                 # (N, 128)
    >>> p = rec.enrol(rec.describe(photos_of_p), name="P")
    >>> rate = rec.accepts(d, p).float().mean()  # share of faces accepted as P
    """

    def __init__(self, config: IdentityConfig | None = None, *, models_dir=None):
        if config is not None and not isinstance(config, IdentityConfig):
            raise ConfigError(f"config must be an IdentityConfig, got {type(config).__name__}")
        self.config = config or IdentityConfig()
        dlib = _import_dlib()
        files = find_dlib_models(models_dir)
        self._dlib = dlib
        self._net = dlib.face_recognition_model_v1(str(files[RECOGNITION_MODEL]))
        self._landmarks = dlib.shape_predictor(str(files[LANDMARK_MODEL])) if self.config.align == "landmarks" else None
        self.id = "dlib-resnet-v1-" + MODEL_FILES[RECOGNITION_MODEL][:12]

    def __repr__(self) -> str:
        return f"IdentityRecogniser({self.config!r})"

    # ---------------------------------------------------------------------------------------- images
    def _to_uint8(self, images) -> np.ndarray:
        if not isinstance(images, torch.Tensor):
            raise InputError(f"images must be a torch.Tensor (N, 3, S, S) in [0, 1], got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise InputError(
                f"images must be square RGB (N, 3, S, S), got shape {tuple(images.shape)}; "
                "load photos with faceprint.data.load_image (centre square crop)"
            )
        if not images.is_floating_point():
            raise InputError(f"images must be floating point in [0, 1], got {images.dtype}; use images.float() / 255")
        s = images.shape[2]
        if self.config.align == "chip" and s != CHIP_SIZE:
            raise InputError(f"align='chip' needs {CHIP_SIZE}x{CHIP_SIZE} images, got {s}x{s}; use align='landmarks'")
        if s < 32:
            raise InputError(f"images must be at least 32x32 to hold a recognisable face, got {s}x{s}")
        if images.numel():
            lo, hi = (float(v) for v in torch.aminmax(images.detach()))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
                raise InputError(f"images must hold finite values in [0, 1], got min {lo:.4g} and max {hi:.4g}")
        x = (images.detach().to("cpu", torch.float32) * 255.0).round_().to(torch.uint8)
        return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # (N, S, S, 3)

    def _shape(self, img: np.ndarray):
        dlib = self._dlib
        s = img.shape[0]
        if self.config.align == "landmarks":
            l, t, r, b = (int(round(v * s)) for v in self.config.box)
            return self._landmarks(img, dlib.rectangle(l, t, r, b))
        pts = dlib.points([dlib.point(int(round(x * s)), int(round(y * s))) for x, y in MEAN_LANDMARKS])
        return dlib.full_object_detection(dlib.rectangle(0, 0, s - 1, s - 1), pts)

    def chips(self, images: torch.Tensor) -> np.ndarray:
        """The aligned 150x150 chips the network sees: (N, 150, 150, 3) uint8."""
        arr = self._to_uint8(images)
        if self.config.align == "chip":
            return arr
        return np.stack([self._dlib.get_face_chip(a, self._shape(a), CHIP_SIZE, self.config.padding) for a in arr]) \
            if len(arr) else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)

    def describe(self, images: torch.Tensor) -> torch.Tensor:
        """Face descriptors of images.

        Parameters
        ----------
        images : torch.Tensor
            (N, 3, S, S) float in [0, 1], S >= 32: square face crops as faceprint loads and
            generates them (128 px is the working resolution; 150 px chips with align="chip").

        Returns
        -------
        torch.Tensor
            (N, 128) float32. About 0.07-0.1 s per face on one CPU core.
        """
        chips = self.chips(images)
        out = np.zeros((len(chips), DESCRIPTOR_DIM), np.float32)
        for i, c in enumerate(chips):
            out[i] = np.asarray(self._net.compute_face_descriptor(np.ascontiguousarray(c), self.config.num_jitters))
        return torch.from_numpy(out)

    # ---------------------------------------------------------------------------------------- decisions
    @staticmethod
    def distance(a, b) -> torch.Tensor:
        """(N, M) Euclidean distances between descriptors a (N, 128) and b (M, 128)."""
        a = _check_descriptors(a, "a").double()
        b = _check_descriptors(b, "b").double()
        return torch.cdist(a, b).float()

    def same_person(self, a, b) -> torch.Tensor:
        """(N,) bool: a[i] and b[i] are the same person (distance < pair_threshold)."""
        a = _check_descriptors(a, "a")
        b = _check_descriptors(b, "b")
        if a.shape != b.shape:
            raise InputError(f"a and b must have the same shape (pairs a[i], b[i]), got {tuple(a.shape)} and {tuple(b.shape)}")
        return (a.double() - b.double()).norm(dim=1) < self.config.pair_threshold

    def enrol(self, descriptors, name: str = "") -> IdentityGallery:
        """A gallery from the descriptors (k, 128) of k photos of one person."""
        return IdentityGallery(name, _check_descriptors(descriptors, "descriptors"))

    def gallery_distance(self, descriptors, gallery: IdentityGallery) -> torch.Tensor:
        """(N,) distance of each face to the gallery under the configured rule (mean or nearest)."""
        if not isinstance(gallery, IdentityGallery):
            raise InputError(f"gallery must be an IdentityGallery (from enrol()), got {type(gallery).__name__}")
        d = _check_descriptors(descriptors, "descriptors").double()
        if self.config.gallery_rule == "mean":
            return (d - gallery.mean.double()).norm(dim=1).float()
        return torch.cdist(d, gallery.descriptors.double()).min(1).values.float()

    def accepts(self, descriptors, gallery: IdentityGallery) -> torch.Tensor:
        """(N,) bool: each face is accepted as the gallery's person."""
        return self.gallery_distance(descriptors, gallery) <= self.config.resolved_gallery_threshold

    def acceptance_rate(self, images: torch.Tensor, gallery: IdentityGallery) -> float:
        """Share of ``images`` (N, 3, S, S) accepted as the gallery's person."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
            raise InputError("images must be a non-empty (N, 3, S, S) tensor")
        return float(self.accepts(self.describe(images), gallery).float().mean())


# --------------------------------------------------------------------------------------------
# evaluation (pure functions on descriptor arrays)


def _ids_array(identities, n: int) -> np.ndarray:
    ids = np.asarray(list(identities))
    if ids.ndim != 1 or len(ids) != n:
        raise InputError(f"identities must be a sequence of {n} labels (one per descriptor), got shape {ids.shape}")
    return ids


def pair_distances(descriptors, identities) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j: (genuine distances, impostor distances) as float64 arrays."""
    d = _check_descriptors(descriptors, "descriptors").double()
    ids = _ids_array(identities, d.shape[0])
    dist = torch.cdist(d, d).numpy()
    iu = np.triu_indices(len(ids), 1)
    same = (ids[:, None] == ids[None, :])[iu]
    flat = dist[iu]
    return flat[same], flat[~same]


def roc_points(genuine, impostor, thresholds) -> list[dict]:
    """True/false accept rates (distance < threshold) at each threshold."""
    g, im = np.asarray(genuine, float), np.asarray(impostor, float)
    if g.size == 0 or im.size == 0:
        raise InputError(f"need genuine and impostor distances, got {g.size} and {im.size}")
    return [{"threshold": float(t), "tar": float(np.mean(g < t)), "far": float(np.mean(im < t)),
             "genuine": int(g.size), "impostor": int(im.size)} for t in thresholds]


def threshold_at_far(impostor, far: float) -> float:
    """The largest threshold whose false accept rate (distance < t) is at most ``far``."""
    im = np.sort(np.asarray(impostor, float))
    if im.size == 0:
        raise InputError("impostor distances are empty")
    if not 0 < far < 1:
        raise InputError(f"far must be in (0, 1), got {far!r}")
    k = int(np.floor(far * im.size))  # at most k impostors may fall below t
    return float(im[k]) if k < im.size else float(im[-1])


def gallery_rates(descriptors, identities, *, enrol: int, thresholds, rule: str = "mean") -> list[dict]:
    """Genuine and impostor accept rates of the gallery rule.

    Each person is enrolled with their first ``enrol`` descriptors (in the given order); every
    other descriptor is a probe: against its own person's gallery (genuine trial) and against
    every other person's gallery (impostor trials). A trial is accepted when the gallery
    distance (mean or nearest, see :class:`IdentityConfig`) is at most the threshold.
    """
    if rule not in GALLERY_RULES:
        raise InputError(f"rule must be one of {GALLERY_RULES}, got {rule!r}")
    if isinstance(enrol, bool) or not isinstance(enrol, int) or enrol < 1:
        raise InputError(f"enrol must be a positive int, got {enrol!r}")
    d = _check_descriptors(descriptors, "descriptors").double()
    ids = _ids_array(identities, d.shape[0])
    people = list(dict.fromkeys(ids.tolist()))
    gal_idx, probe_idx, probe_person = [], [], []
    for p_i, p in enumerate(people):
        members = np.flatnonzero(ids == p)
        if len(members) <= enrol:
            raise InputError(f"person {p!r} has {len(members)} descriptors; need more than enrol={enrol}")
        gal_idx.append(members[:enrol])
        probe_idx.extend(members[enrol:].tolist())
        probe_person.extend([p_i] * (len(members) - enrol))
    probes = d[probe_idx]  # (M, 128)
    probe_person = np.asarray(probe_person)
    if rule == "mean":
        means = torch.stack([d[g].mean(0) for g in gal_idx])  # (P, 128)
        dist = torch.cdist(probes, means).numpy()  # (M, P)
    else:
        dist = np.stack([torch.cdist(probes, d[g]).min(1).values.numpy() for g in gal_idx], 1)
    own = np.zeros_like(dist, dtype=bool)
    own[np.arange(len(probe_person)), probe_person] = True
    gen, imp = dist[own], dist[~own]
    return [{"threshold": float(t), "genuine_accept": float(np.mean(gen <= t)), "impostor_accept": float(np.mean(imp <= t)),
             "genuine_trials": int(gen.size), "impostor_trials": int(imp.size)} for t in thresholds]
