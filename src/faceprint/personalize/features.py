"""Identity features of a face and the identity subspace of the latent (papers/003, Sec. 3.2,
the multi-scale identity (MSID) encoder, adapted to faceprint: docs/SEED-SYSTEMS.md Sec. 2.3).

F2D takes features of an ArcFace ViT at several depths and trains the recogniser so that the
shallow ones discriminate identity too (their verification AUC rises from 93.99% to 99.46%).
No face recogniser with usable intermediate layers exists offline here, so faceprint builds
the three variants of its Table 3 from what it has:

- ``dlib``: dlib's 128-d descriptor alone: the deepest layer only (F2D's "ArcFace" row).
- ``multiscale``: the descriptor plus the TAEF2 latent of the face region at 16x16, 8x8 and
  4x4 (average pooled inside the face mask), each reduced by PCA: F2D's "multi-scale
  features" row. The shallow scales hold pose, expression, lighting and background as much
  as identity.
- ``msid``: the same scales projected on an identity-discriminative subspace: a shrinkage
  linear discriminant analysis (between-identity against within-identity scatter, fitted
  with identity labels of training photos). This is "encourage shallow layers to discriminate
  identity" in linear form, seconds to fit.

:func:`verification_auc` measures, per scale, how well cosine similarity of each feature tells
genuine pairs from impostor pairs (the Fig. 4 analog; ``python -m faceprint.bench
personalize`` reports it on held-out people).

The face mask (:func:`face_mask`) is a soft ellipse on the 16x16 latent grid around the mean
5-point landmarks of CelebA-framed 128 px faces (brows to chin, cheek to cheek): the region
whose identity coordinates the mapping sets (Sec. 3.4's foreground M).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, NotFittedError

SCALES = (16, 8, 4)
FEATURE_KINDS = ("dlib", "multiscale", "msid")
LATENT_SHAPE = (32, 16, 16)


def face_mask(grid: int = 16, *, soft: float = 0.6) -> torch.Tensor:
    """(grid, grid) weights in [0, 1]: 1 inside an ellipse over the face (from the mean
    landmarks), falling to 0 over ``soft`` of the radius outside it."""
    from ..recognition.identity import MEAN_LANDMARKS

    lm = np.asarray(MEAN_LANDMARKS)  # fractions of the side
    eyes = lm[:4].mean(0)
    nose = lm[4]
    eye_dist = float(np.linalg.norm(lm[0:2].mean(0) - lm[2:4].mean(0)))
    cx = float(eyes[0] + nose[0]) / 2
    cy = float(eyes[1] + nose[1]) / 2 + 0.35 * eye_dist  # the ellipse reaches the chin
    rx = 1.05 * eye_dist
    ry = 1.45 * eye_dist
    c = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    m = ((1 + soft - r) / soft).clamp(0, 1)
    return m.float()


def pooled_face(latents: torch.Tensor, scale: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The latent's face region at one scale: (N, 32 * cells) where cells are the grid cells of
    the pooled mask above 0.5. latents (N, 32, 16, 16) in TAEF2's space."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[1:]) != LATENT_SHAPE:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InputError(f"latents must be (N, 32, 16, 16) TAEF2 latents of 128 px faces, got {got}")
    m = face_mask(16) if mask is None else mask
    z = latents.float() * m
    k = 16 // scale
    if k > 1:
        z = F.avg_pool2d(z, k)
        mk = F.avg_pool2d(m[None, None], k)[0, 0]
    else:
        mk = m
    keep = (mk > 0.5).flatten()
    return z.flatten(2)[:, :, keep].flatten(1)


def _pca(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), basis (d, k)) of the leading principal directions of X (N, d), float64."""
    mu = X.mean(0)
    Xc = X - mu
    k = min(k, Xc.shape[0] - 1, Xc.shape[1])
    if Xc.shape[0] <= Xc.shape[1]:
        G = Xc @ Xc.T
        e, V = torch.linalg.eigh(G)
        order = torch.argsort(e, descending=True)[:k]
        e, V = e[order].clamp_min(1e-12), V[:, order]
        U = (Xc.T @ V) / e.sqrt()
    else:
        e, U = torch.linalg.eigh(Xc.T @ Xc)
        order = torch.argsort(e, descending=True)[:k]
        U = U[:, order]
    return mu, U.contiguous()


def lda_directions(Z: torch.Tensor, ids, k: int, *, shrinkage: float = 0.1) -> torch.Tensor:
    """Shrinkage LDA on PCA coordinates Z (N, p): the k generalized eigenvectors of
    (S_between, S_within + shrinkage * tr(S_within)/p I), columns scaled to unit within-class
    variance: (p, k). Only identities with >= 2 rows count toward S_within."""
    ids = np.asarray(list(ids))
    Z = Z.double()
    N, p = Z.shape
    mu = Z.mean(0)
    Sw = torch.zeros(p, p, dtype=torch.float64)
    Sb = torch.zeros(p, p, dtype=torch.float64)
    n_within = 0
    for person in dict.fromkeys(ids.tolist()):
        rows = torch.from_numpy(np.flatnonzero(ids == person))
        zi = Z[rows]
        mi = zi.mean(0)
        if len(rows) >= 2:
            d = zi - mi
            Sw += d.T @ d
            n_within += len(rows) - 1
        dm = (mi - mu)[:, None]
        Sb += len(rows) * (dm @ dm.T)
    if n_within < 1:
        raise InputError("the identity projection needs people with at least 2 photos each; give several photos of "
                         "each training person (identity labels)")
    Sw /= n_within
    Sb /= N
    tr = float(torch.trace(Sw)) / p
    Sw_r = (1 - shrinkage) * Sw + shrinkage * tr * torch.eye(p, dtype=torch.float64)
    L = torch.linalg.cholesky(Sw_r)
    Li = torch.linalg.inv(L)
    M = Li @ Sb @ Li.T
    e, V = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(e, descending=True)[:k]
    W = Li.T @ V[:, order]  # (p, k), W^T Sw_r W = I
    return W


@dataclass(frozen=True)
class FeatureConfig:
    """pca: PCA dimensions per scale; lda: discriminant directions per scale (at most the
    number of training identities - 1); shrinkage: LDA's within-class regularisation."""

    pca: int = 96
    lda: int = 48
    shrinkage: float = 0.2

    def __post_init__(self):
        for name in ("pca", "lda"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.shrinkage, (int, float)) and 0 <= self.shrinkage <= 1):
            raise InputError(f"shrinkage must be in [0, 1], got {self.shrinkage!r}")


class IdentityFeatures:
    """Multi-scale latent features of faces and their identity-discriminative projection.

    fit(latents (N, 32, 16, 16), ids (N,)) learns, per scale, a PCA (mean_, basis_) and the LDA
    directions (lda_) on the PCA coordinates. transform(latents, descriptors, kind) gives the
    feature vector of each face for ``kind`` in FEATURE_KINDS: dlib's descriptor, then per
    scale the PCA coordinates (multiscale) or their LDA projection (msid), each block scaled to
    unit norm so every scale weighs the same."""

    def __init__(self, config: FeatureConfig | None = None):
        self.config = config or FeatureConfig()
        self.mean_: dict[int, torch.Tensor] = {}
        self.basis_: dict[int, torch.Tensor] = {}
        self.lda_: dict[int, torch.Tensor] = {}

    def fit(self, latents: torch.Tensor, ids) -> "IdentityFeatures":
        ids = list(ids)
        if len(ids) != latents.shape[0]:
            raise InputError(f"ids must have one identity per latent ({latents.shape[0]}), got {len(ids)}")
        n_people = len(set(ids))
        if n_people < 2:
            raise InputError(f"the identity projection needs at least 2 people, got {n_people}")
        for s in SCALES:
            X = pooled_face(latents, s).double()
            mu, U = _pca(X, self.config.pca)
            Z = (X - mu) @ U
            k = min(self.config.lda, n_people - 1, Z.shape[1])
            W = lda_directions(Z, ids, k, shrinkage=self.config.shrinkage)
            self.mean_[s], self.basis_[s], self.lda_[s] = mu.float(), U.float(), W.float()
        return self

    def _check(self):
        if not self.lda_:
            raise NotFittedError("IdentityFeatures is not fitted; call fit(latents, ids) or load a mapping")

    def scale_features(self, latents: torch.Tensor, scale: int, projected: bool) -> torch.Tensor:
        """(N, k) PCA coordinates (projected=False) or LDA projection (True) at one scale."""
        self._check()
        X = pooled_face(latents, scale).float()
        Z = (X - self.mean_[scale]) @ self.basis_[scale]
        return Z @ self.lda_[scale] if projected else Z

    def transform(self, latents: torch.Tensor, descriptors: torch.Tensor, kind: str) -> torch.Tensor:
        if kind not in FEATURE_KINDS:
            raise InputError(f"feature kind must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
        d = descriptors.float()
        blocks = [d / d.norm(dim=1, keepdim=True).clamp_min(1e-8)]
        if kind != "dlib":
            for s in SCALES:
                z = self.scale_features(latents, s, projected=kind == "msid")
                blocks.append(z / z.norm(dim=1, keepdim=True).clamp_min(1e-8))
        return torch.cat(blocks, 1)

    def dim(self, kind: str) -> int:
        self._check()
        if kind == "dlib":
            return 128
        if kind == "multiscale":
            return 128 + sum(self.basis_[s].shape[1] for s in SCALES)
        return 128 + sum(self.lda_[s].shape[1] for s in SCALES)

    def state_tensors(self, prefix: str = "features.") -> dict[str, torch.Tensor]:
        self._check()
        out = {}
        for s in SCALES:
            out[f"{prefix}{s}.mean"] = self.mean_[s]
            out[f"{prefix}{s}.basis"] = self.basis_[s]
            out[f"{prefix}{s}.lda"] = self.lda_[s]
        return out

    @classmethod
    def from_state(cls, config: FeatureConfig, t: dict, prefix: str = "features.") -> "IdentityFeatures":
        f = cls(config)
        for s in SCALES:
            f.mean_[s] = t[f"{prefix}{s}.mean"].float()
            f.basis_[s] = t[f"{prefix}{s}.basis"].float()
            f.lda_[s] = t[f"{prefix}{s}.lda"].float()
        return f


def auc(genuine, impostor) -> float:
    """Area under the ROC of similarity scores (higher = same person): the probability that a
    genuine pair scores above an impostor pair (ties count half), by ranks."""
    g = np.asarray(genuine, dtype=np.float64)
    im = np.asarray(impostor, dtype=np.float64)
    if g.size == 0 or im.size == 0:
        raise InputError(f"need genuine and impostor scores, got {g.size} and {im.size}")
    allv = np.concatenate([g, im])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks of ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rg = ranks[: g.size].sum()
    return float((rg - g.size * (g.size + 1) / 2) / (g.size * im.size))


def verification_auc(features: torch.Tensor, ids) -> float:
    """Verification AUC of cosine similarity over all pairs of rows (genuine: same id)."""
    ids = np.asarray(list(ids))
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = (x @ x.T).numpy()
    iu = np.triu_indices(len(ids), 1)
    same = (ids[:, None] == ids[None, :])[iu]
    flat = sim[iu]
    return auc(flat[same], flat[~same])


def identity_auc_table(feats: IdentityFeatures, latents: torch.Tensor, descriptors: torch.Tensor, ids) -> list[dict]:
    """Per scale: verification AUC of the raw (PCA) latent features and of their identity
    projection, and dlib's descriptor (the deepest 'layer') for reference."""
    rows = [{"scale": "dlib descriptor (128-d)", "raw": verification_auc(descriptors, ids), "msid": None}]
    for s in SCALES:
        rows.append({"scale": f"latent {s}x{s} face region",
                     "raw": verification_auc(feats.scale_features(latents, s, False), ids),
                     "msid": verification_auc(feats.scale_features(latents, s, True), ids)})
    return rows


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, d) and (N, d) (or (1, d) broadcast)."""
    a = a.double()
    b = b.double()
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).float()


__all__ = ["FEATURE_KINDS", "SCALES", "FeatureConfig", "IdentityFeatures", "auc", "cosine", "face_mask",
           "identity_auc_table", "lda_directions", "pooled_face", "verification_auc"]

