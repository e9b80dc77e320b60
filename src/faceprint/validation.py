"""Validation of every artifact faceprint reads: schema, tensors, and the model's invariants.

An artifact (:mod:`faceprint.io`) is a .safetensors file whose header holds JSON metadata. A
file may have been damaged, edited by hand, or crafted to make a command crash, hang or write
a new model from nonsense. :func:`validate_artifact` is run by :func:`faceprint.io.load_artifact`
on every artifact before any class builds an object from it; it checks, for the artifact's class:

* the metadata's schema: the type and range of every field it knows (``format_version`` an int
  this faceprint reads, ``config`` a dict of typed, bounded values, ...);
* every tensor it knows: present, of an allowed dtype, of the shape the config and the other
  tensors imply, and finite;
* the model's invariants: mixture weights non-negative and summing to 1, eigenvalues
  non-negative, ranks consistent with the eigenpairs, component labels in range with at
  least one member per drawable component, the projector's and each component's basis
  orthonormal within a tolerance.

Unknown metadata keys and tensor names are *ignored* (a later faceprint may add optional
ones; config keys it does not know are left to the config class, which may reject them).

A failed check raises :class:`faceprint.errors.ArtifactError` with one line naming the file,
the field and what is wrong. The cost is a few passes over the tensors (``isfinite`` and, for
large eigenbases, a randomized orthonormality probe instead of a full Gram matrix): about a
millisecond per megabyte of model (``python -m faceprint.bench reliability --overhead``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .errors import ArtifactError

__all__ = [
    "VALIDATORS",
    "validate_artifact",
    "validate_bank_fingerprinter",
    "validate_calibration",
    "validate_flow_prior",
    "validate_generator",
    "validate_header",
]

_ABSENT = object()  # a metadata value that is missing, or None where None is allowed

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
#: Largest rank temperature (lambda) accepted in a model file: d_k = floor(lambda pi_k d0) is
#: clipped to the component's rank anyway, so any larger value only risks overflow.
MAX_RANK_TEMPERATURE = 1e6
#: Tolerance on ||U^T U - I|| entries (float32 bases from float64 eigendecompositions are
#: orthonormal to ~1e-6; a hand-edited or rescaled basis is off by far more).
ORTHO_TOL = 1e-3
#: Above this many multiply-adds, a basis is checked with random probes instead of U^T U.
_EXACT_GRAM_FLOPS = 20_000_000
_PROBES = 8


class Check:
    """Helpers bound to one file: each failed check raises one ArtifactError line."""

    def __init__(self, path, kind: str = "model file"):
        self.path = str(path)
        self.kind = kind

    def fail(self, field: str, what: str):
        raise ArtifactError(
            f"{self.kind} {self.path!r}: {field} {what}; the file is incomplete, damaged or altered: "
            "re-create it (e.g. with `faceprint fit`) or restore a copy"
        )

    # -- metadata ------------------------------------------------------------------------
    def _value(self, d: dict, key: str, label: str, required: bool, none_ok: bool):
        """d[key], or _ABSENT when it is missing (refused if required) or None where allowed."""
        if key not in d:
            if required:
                self.fail(label, "is missing")
            return _ABSENT
        v = d[key]
        return _ABSENT if v is None and none_ok else v

    def dict_(self, meta: dict, key: str, *, required: bool = True, none_ok: bool = False) -> dict | None:
        v = self._value(meta, key, f"metadata {key!r}", required, none_ok)
        if v is _ABSENT:
            return None
        if not isinstance(v, dict):
            self.fail(f"metadata {key!r}", f"must be a JSON object, got {_kind(v)}")
        return v

    def int_(self, d: dict, key: str, where: str, *, lo=None, hi=None, required: bool = True, none_ok: bool = False):
        v = self._value(d, key, f"{where}.{key}", required, none_ok)
        if v is _ABSENT:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"{where}.{key}", f"must be an integer, got {_kind(v)} {_short(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(f"{where}.{key}", f"= {_short(v)} is out of range [{lo if lo is not None else '-inf'}, "
                                        f"{hi if hi is not None else 'inf'}]")
        return v

    def real(self, d: dict, key: str, where: str, *, lo=None, hi=None, lo_open=False, required: bool = True):
        v = self._value(d, key, f"{where}.{key}", required, False)
        if v is _ABSENT:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(f"{where}.{key}", f"must be a number, got {_kind(v)} {_short(v)}")
        if not math.isfinite(v):
            self.fail(f"{where}.{key}", f"must be finite, got {v!r}")
        if lo is not None and (v <= lo if lo_open else v < lo):
            self.fail(f"{where}.{key}", f"= {v!r} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            self.fail(f"{where}.{key}", f"= {v!r} must be <= {hi}")
        return v

    def str_(self, d: dict, key: str, where: str, *, choices=None, required: bool = True, none_ok: bool = False):
        v = self._value(d, key, f"{where}.{key}", required, none_ok)
        if v is _ABSENT:
            return None
        if not isinstance(v, str):
            self.fail(f"{where}.{key}", f"must be a string, got {_kind(v)} {_short(v)}")
        if choices is not None and v not in choices:
            self.fail(f"{where}.{key}", f"= {_short(v)} is not one of {', '.join(map(repr, choices))}")
        return v

    def bool_(self, d: dict, key: str, where: str, *, required: bool = False):
        v = self._value(d, key, f"{where}.{key}", required, False)
        if v is _ABSENT:
            return None
        if not isinstance(v, bool):
            self.fail(f"{where}.{key}", f"must be true or false, got {_kind(v)} {_short(v)}")
        return v

    def str_list(self, d: dict, key: str, where: str, *, required: bool = True):
        v = self._value(d, key, f"{where}.{key}", required, False)
        if v is _ABSENT:
            return None
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            self.fail(f"{where}.{key}", f"must be a list of strings, got {_kind(v)}")
        return v

    # -- tensors -------------------------------------------------------------------------
    def tensor(self, tensors: dict, name: str, *, dtypes=FLOAT_DTYPES, ndim: int | None = None,
               shape: tuple | None = None, finite: bool = True) -> torch.Tensor:
        if name not in tensors:
            self.fail(f"tensor {name!r}", "is missing")
        t = tensors[name]
        if t.dtype not in dtypes:
            kinds = "floating-point" if dtypes is FLOAT_DTYPES else "integer" if dtypes is INT_DTYPES else \
                "/".join(str(d).replace("torch.", "") for d in dtypes)
            self.fail(f"tensor {name!r}", f"has dtype {str(t.dtype).replace('torch.', '')}, expected {kinds}")
        if ndim is not None and t.dim() != ndim:
            self.fail(f"tensor {name!r}", f"has shape {tuple(t.shape)}, expected {ndim} dimensions")
        if shape is not None:
            if t.dim() != len(shape) or any(s is not None and int(a) != int(s) for a, s in zip(t.shape, shape)):
                want = "(" + ", ".join("*" if s is None else str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"
                self.fail(f"tensor {name!r}", f"has shape {tuple(t.shape)}, expected {want} from the config and the other tensors")
        if finite and t.dtype in FLOAT_DTYPES and t.numel() and not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            self.fail(f"tensor {name!r}", f"holds {bad} NaN or infinite values")
        return t

    def orthonormal(self, name: str, U: torch.Tensor, *, rows: bool = False, tol: float = ORTHO_TOL, seed: int = 0):
        """U (d, m) with orthonormal columns (rows=True: U (m, d) with orthonormal rows)."""
        if rows:
            U = U.T
        d, m = U.shape
        if m == 0:
            return
        if m > d:
            self.fail(f"tensor {name!r}", f"has {m} basis vectors in {d} dimensions (at most {d} can be orthonormal)")
        U = U.detach().cpu().float().numpy()  # numpy: far cheaper than torch's per-op overhead here
        norms = np.einsum("ij,ij->j", U, U)  # (m,)
        dev = float(np.abs(norms - 1).max())
        if dev <= tol:
            if d * m * m <= _EXACT_GRAM_FLOPS:
                G = U.T @ U
                G[np.diag_indices(m)] -= 1
                dev = float(np.abs(G).max())
            else:  # (U^T U - I) x for random x: a nonzero off-diagonal block shows up with certainty
                x = np.random.default_rng(seed).standard_normal((m, _PROBES)).astype(np.float32)
                r = U.T @ (U @ x) - x
                dev = float((np.linalg.norm(r, axis=0) / np.linalg.norm(x, axis=0)).max())
        if not dev <= tol:
            self.fail(f"tensor {name!r}", f"is not orthonormal (largest deviation of U^T U from I: {dev:.3g}, "
                                          f"tolerance {tol:g})")


def all_finite(t: torch.Tensor) -> bool:
    """torch.isfinite(t).all(), through numpy where it can (an order of magnitude faster on CPU)."""
    if t.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().cpu().numpy()).all())
    return bool(torch.isfinite(t).all())


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# --------------------------------------------------------------------------------------------
# the header (every class)


def validate_header(path, meta: dict, *, max_version: int, kind: str = "model file") -> None:
    """format_version (an int in [1, max_version]), faceprint_version (a string), class (a string)."""
    c = Check(path, kind)
    if "format_version" not in meta:
        raise ArtifactError(f"{kind} {str(path)!r} has no faceprint metadata (format_version); is it a faceprint model?")
    v = meta["format_version"]
    if isinstance(v, bool) or not isinstance(v, int):
        c.fail("metadata 'format_version'", f"must be an integer, got {_kind(v)} {_short(v)}")
    if v < 1:
        c.fail("metadata 'format_version'", f"= {v} is not a faceprint format version (1..{max_version})")
    if v > max_version:
        raise ArtifactError(f"{kind} {str(path)!r} has format version {v}, this faceprint reads up to {max_version}; "
                            "upgrade faceprint")
    c.str_(meta, "faceprint_version", "metadata", required=False)
    if "class" in meta and not isinstance(meta["class"], str):
        c.fail("metadata 'class'", f"must be a string, got {_kind(meta['class'])} {_short(meta['class'])}")


# --------------------------------------------------------------------------------------------
# faceprint.Generator

_METHODS = ("lrgmm-nn", "lrgmm", "nn", "gaussian")


def _projector(c: Check, tensors: dict, q: int, channels: int | None = None, prefix: str = "projector.") -> int:
    """The PCA projector's tensors; returns c (latent channels)."""
    mean = c.tensor(tensors, prefix + "mean", ndim=1)
    C = mean.shape[0]
    if channels is not None and C != channels:
        c.fail(f"tensor {prefix + 'mean'!r}", f"has {C} channels, the latents have {channels}")
    if C < 1:
        c.fail(f"tensor {prefix + 'mean'!r}", "is empty")
    if q > C:
        c.fail("config.channels", f"= {q} exceeds the {C} latent channels of the projector")
    comps = c.tensor(tensors, prefix + "components", shape=(q, C))
    var = c.tensor(tensors, prefix + "variances", shape=(q,))
    if var.numel() and not bool((var > 0).all()):
        c.fail(f"tensor {prefix + 'variances'!r}", f"holds non-positive values (min {float(var.min()):.3g})")
    if prefix + "explained_variance_ratio" in tensors:
        evr = c.tensor(tensors, prefix + "explained_variance_ratio", ndim=1)
        if evr.numel() and float(evr.min()) < -1e-4:
            c.fail(f"tensor {prefix + 'explained_variance_ratio'!r}", f"holds negative values (min {float(evr.min()):.3g})")
    c.orthonormal(prefix + "components", comps, rows=True)
    return C


def _generator_config(c: Check, cfg: dict) -> None:
    w = "config"
    c.int_(cfg, "components", w, lo=1, hi=1_000_000, required=False, none_ok=True)
    c.int_(cfg, "channels", w, lo=1, hi=1_000_000)
    c.real(cfg, "rank_temperature", w, lo=0, lo_open=True, hi=MAX_RANK_TEMPERATURE, required=False)
    c.int_(cfg, "patch_radius", w, lo=0, hi=1_000, required=False)
    c.int_(cfg, "iterations", w, lo=0, hi=1_000, required=False)
    c.real(cfg, "reg_covar", w, lo=0, lo_open=True, required=False)
    c.str_(cfg, "copy", w, choices=("full", "projected"), required=False)
    c.str_(cfg, "method", w, choices=_METHODS, required=False)
    c.int_(cfg, "em_max_iter", w, lo=1, hi=1_000_000, required=False)
    c.real(cfg, "em_tol", w, lo=0, required=False)


def _mixture_config(c: Check, m: dict) -> None:
    w = "mixture_config"
    c.int_(m, "n_components", w, lo=1, hi=1_000_000, required=False)
    c.real(m, "reg_covar", w, lo=0, lo_open=True, required=False)
    c.int_(m, "max_iter", w, lo=1, required=False)
    c.real(m, "tol", w, lo=0, required=False)
    c.int_(m, "kmeans_iter", w, lo=0, required=False)
    c.int_(m, "kmeans_init", w, lo=1, required=False)
    c.real(m, "member_tol", w, lo=0, hi=1, required=False)
    c.str_(m, "dtype", w, choices=("float64", "float32"), required=False)


def _mixture(c: Check, tensors: dict, d0: int, N: int | None, prefix: str = "mixture.") -> int:
    """The mixture's tensors in d0 dimensions; labels (N,) if N is given. Returns K."""
    wts = c.tensor(tensors, prefix + "weights", ndim=1)
    K = wts.numel()
    if K < 1:
        c.fail(f"tensor {prefix + 'weights'!r}", "is empty (no mixture component)")
    wd = wts.double()
    if bool((wd < 0).any()):
        c.fail(f"tensor {prefix + 'weights'!r}", f"holds negative weights (min {float(wd.min()):.3g})")
    total = float(wd.sum())
    if not abs(total - 1.0) <= 1e-3:
        c.fail(f"tensor {prefix + 'weights'!r}", f"sums to {total:.6g}, not 1")
    c.tensor(tensors, prefix + "means", shape=(K, d0))
    ranks = c.tensor(tensors, prefix + "ranks", dtypes=INT_DTYPES, shape=(K,))
    if K and (int(ranks.min()) < 0 or int(ranks.max()) > d0):
        c.fail(f"tensor {prefix + 'ranks'!r}", f"holds ranks outside [0, {d0}] ({int(ranks.min())}..{int(ranks.max())})")
    R = int(ranks.long().sum())
    ev = c.tensor(tensors, prefix + "eigvals", shape=(R,))
    if R and float(ev.min()) < 0:
        c.fail(f"tensor {prefix + 'eigvals'!r}", f"holds negative eigenvalues (min {float(ev.min()):.3g})")
    U = c.tensor(tensors, prefix + "eigvecs", shape=(d0, R))
    s = 0
    for k, r in enumerate(ranks.tolist()):
        c.orthonormal(f"{prefix}eigvecs (component {k})", U[:, s:s + r], seed=k)
        s += r
    if N is not None:
        labels = c.tensor(tensors, prefix + "labels", dtypes=INT_DTYPES, shape=(N,))
        if N:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= K:
                c.fail(f"tensor {prefix + 'labels'!r}", f"holds component labels {lo}..{hi} outside [0, {K})")
            counts = torch.bincount(labels.long(), minlength=K)
            empty = [k for k in range(K) if counts[k] == 0 and float(wd[k]) > 0]
            if empty:
                c.fail(f"tensor {prefix + 'labels'!r}", f"gives component {empty[0]} (weight {float(wd[empty[0]]):.3g}) "
                                                        "no training latent to refine from")
    if prefix + "history" in tensors:
        c.tensor(tensors, prefix + "history", ndim=1, finite=False)
    return K


def validate_generator(path, tensors: dict, meta: dict) -> None:
    """A faceprint.Generator artifact (see the module docstring for what is checked).

    Unknown tensors (e.g. ``guard.*``) and unknown config keys are ignored; ``decoder.*``
    tensors must be floating-point and finite (their shapes are checked by the decoder)."""
    c = Check(path)
    cfg = c.dict_(meta, "config")
    _generator_config(c, cfg)
    mcfg = c.dict_(meta, "mixture_config")
    _mixture_config(c, mcfg)
    c.bool_(meta, "mixture_converged", "metadata")
    training = c.dict_(meta, "training")
    c.dict_(meta, "provenance", required=False)
    prov = meta.get("provenance")
    if isinstance(prov, dict) and "operations" in prov and not isinstance(prov["operations"], list):
        c.fail("provenance.operations", f"must be a list, got {_kind(prov['operations'])}")
    ae = c.dict_(meta, "autoencoder", required=False, none_ok=True)
    if ae is not None:
        c.str_(ae, "id", "autoencoder", required=False, none_ok=True)
    c.dict_(meta, "fingerprint", required=False, none_ok=True)

    bank = c.tensor(tensors, "bank", ndim=4)
    N, C, h, w = (int(s) for s in bank.shape)
    if N < 2 or C < 1 or h < 1 or w < 1:
        c.fail("tensor 'bank'", f"has shape {tuple(bank.shape)}; a model needs at least 2 training latents")
    q = cfg["channels"]
    _projector(c, tensors, q, C)
    radius = cfg.get("patch_radius", 2)
    if radius >= max(h, w):
        c.fail("config.patch_radius", f"= {radius} is not smaller than the {h}x{w} latent grid")
    _mixture(c, tensors, q * h * w, N)

    # the training record: names and hashes in bank order
    c.str_list(training, "relpaths", "training")
    c.str_list(training, "hashes", "training", required=False)
    for key in ("relpaths", "hashes"):
        v = training.get(key) or []
        if v and len(v) != N:
            c.fail(f"training.{key}", f"lists {len(v)} photos, the bank holds {N}")
    c.str_(training, "data_hash", "training", required=False)
    c.str_(training, "root", "training", required=False)
    size = c.int_(training, "image_size", "training", lo=8, hi=65536, required=False)
    if size is not None and size != 8 * h:
        c.fail("training.image_size", f"= {size} does not match the {h}x{w} latent grid ({8 * h} px)")

    for name, t in tensors.items():
        if name.startswith("decoder."):
            c.tensor(tensors, name)


# --------------------------------------------------------------------------------------------
# fingerprint owner files


def validate_bank_fingerprinter(path, tensors: dict, meta: dict) -> None:
    """The owner's data-level fingerprint key (key.safetensors)."""
    c = Check(path, "fingerprint key")
    cfg = c.dict_(meta, "config")
    bits = c.int_(cfg, "bits", "config", lo=4, hi=1 << 20)
    if bits % 4:
        c.fail("config.bits", f"= {bits} is not a multiple of 4")
    m = c.int_(cfg, "channels", "config", lo=1, hi=1 << 16)
    c.real(cfg, "step", "config", lo=0, lo_open=True)
    c.int_(cfg, "key_seed", "config", lo=0, hi=2**63 - 1)
    c.int_(cfg, "probe", "config", lo=2, required=False)
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and not isinstance(s, bool)
                                                                 and 1 <= s <= 1 << 16 for s in shape)):
        c.fail("metadata 'shape'", f"must be a list of 3 positive integers (C, h, w), got {_short(shape)}")
    C, h, w = shape
    if m > C:
        c.fail("config.channels", f"= {m} exceeds the {C} latent channels")
    if h * w < bits:
        c.fail("metadata 'shape'", f"has {h * w} latent pixels, fewer than the {bits} bits")
    ch = c.tensor(tensors, "channels", dtypes=INT_DTYPES, shape=(m,))
    if m and (int(ch.min()) < 0 or int(ch.max()) >= C or len(set(ch.tolist())) != m):
        c.fail("tensor 'channels'", f"must hold {m} distinct channel indices in [0, {C})")
    scale = c.tensor(tensors, "scale", shape=(m,))
    if not bool((scale > 0).all()):
        c.fail("tensor 'scale'", "holds non-positive values")
    a = c.tensor(tensors, "assign", dtypes=INT_DTYPES, shape=(h * w,))
    if int(a.min()) < 0 or int(a.max()) >= bits:
        c.fail("tensor 'assign'", f"holds bit indices outside [0, {bits})")
    c.tensor(tensors, "spread", shape=(m, h, w))
    c.tensor(tensors, "dither", shape=(h, w))


def validate_calibration(path, tensors: dict, meta: dict) -> None:
    """The owner's calibration (calibration.safetensors): histogram of matching bits."""
    c = Check(path, "calibration file")
    c.dict_(meta, "config")
    c.int_(meta, "codes_compared", "metadata", lo=1)
    n_bits = c.int_(meta, "n_bits", "metadata", lo=1, hi=1 << 20, required=False)
    c.int_(meta, "threshold", "metadata", lo=0, required=False)
    hist = c.tensor(tensors, "histogram", dtypes=INT_DTYPES, ndim=1)
    if n_bits is not None and hist.numel() != n_bits + 1:
        c.fail("tensor 'histogram'", f"has {hist.numel()} bins, expected n_bits + 1 = {n_bits + 1}")
    if hist.numel() and int(hist.min()) < 0:
        c.fail("tensor 'histogram'", "holds negative counts")


# --------------------------------------------------------------------------------------------
# other model classes


def validate_flow_prior(path, tensors: dict, meta: dict) -> None:
    """A faceprint.FlowPrior: PCA tensors, projector and flow weights (shapes of the flow are
    checked by its strict state_dict load)."""
    c = Check(path, "flow prior file")
    cfg = c.dict_(meta, "config")
    q = c.int_(cfg, "channels", "config", lo=1, hi=1_000_000)
    dims = c.int_(cfg, "dims", "config", lo=1, hi=10_000_000, required=False)
    ls = meta.get("latent_shape")
    if not (isinstance(ls, list) and len(ls) == 3 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                            for s in ls)):
        c.fail("metadata 'latent_shape'", f"must be a list of 3 positive integers, got {_short(ls)}")
    _projector(c, tensors, q, ls[0])
    mean = c.tensor(tensors, "pca.mean", ndim=1)
    d = mean.numel()
    comps = c.tensor(tensors, "pca.components", shape=(dims, d) if dims is not None else None, ndim=2)
    if comps.shape[1] != d:
        c.fail("tensor 'pca.components'", f"has shape {tuple(comps.shape)}, expected (*, {d})")
    var = c.tensor(tensors, "pca.variances", shape=(comps.shape[0],))
    if not bool((var > 0).all()):
        c.fail("tensor 'pca.variances'", "holds non-positive values")
    rv = c.tensor(tensors, "pca.residual_variance", shape=(1,))
    if not float(rv[0]) > 0:
        c.fail("tensor 'pca.residual_variance'", "must be positive")
    c.orthonormal("pca.components", comps, rows=True)
    for name, t in tensors.items():  # the flow's weights (its integer buffers, e.g. orders, too)
        if name.startswith("flow."):
            c.tensor(tensors, name, dtypes=FLOAT_DTYPES + INT_DTYPES + (torch.bool,))


def _finite_floats(kind: str) -> Callable:
    def check(path, tensors: dict, meta: dict) -> None:
        c = Check(path, kind)
        for name, t in tensors.items():
            if t.dtype in FLOAT_DTYPES:
                c.tensor(tensors, name)

    return check


def validate_identity_gallery(path, tensors: dict, meta: dict) -> None:
    c = Check(path, "identity gallery")
    c.tensor(tensors, "descriptors", shape=(None, 128))


#: artifact class (metadata "class") -> validator(path, tensors, meta)
VALIDATORS: dict[str, Callable] = {
    "faceprint.Generator": validate_generator,
    "faceprint.fingerprint.BankFingerprinter": validate_bank_fingerprinter,
    "faceprint.fingerprint.Calibration": validate_calibration,
    "faceprint.FlowPrior": validate_flow_prior,
    "AttributeClassifier": _finite_floats("attribute classifier"),
    "IdentityGallery": validate_identity_gallery,
}


def validate_artifact(path, tensors: dict, meta: dict) -> None:
    """Run the validator of the artifact's class (metadata "class"); classes without one get
    the generic check (every floating-point tensor finite)."""
    cls = meta.get("class")
    check = VALIDATORS.get(cls) if isinstance(cls, str) else None
    if check is None:
        check = _finite_floats("artifact")
    check(path, tensors, meta)
