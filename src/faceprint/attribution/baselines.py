"""Baselines the learned attribution is compared with (papers/004, Sec. 4.4.1), and one of
faceprint's own.

Every baseline has ``fit(images, labels)`` and ``predict(images) -> labels``, on uint8 images
(N, 3, 128, 128):

- :class:`PixelKNN`: nearest neighbour on raw pixels (k = 1, Euclidean), the chapter's kNN.
- :class:`Eigenface`: PCA of the training pixels (Turk & Pentland), then the nearest class mean
  in the PCA space.
- :class:`PRNU`: Marra et al.'s GAN fingerprint: the noise residual ``x - denoise(x)`` (here a
  Gaussian denoiser, sigma 1 px, channels averaged), averaged over each source's training
  images; an image goes to the source whose fingerprint has the highest normalised correlation
  (zero-mean, unit-norm inner product) with its residual.
- :class:`FeatureLogistic`: multinomial logistic regression (L2, L-BFGS, standardised
  features) on any feature extractor: the Inception pool3 baseline uses
  :class:`faceprint.metrics.InceptionFeatures`.
- :class:`ProvenanceMatch`: the owner-side check only faceprint can make. The image is encoded
  with TAEF2 and each latent pixel is matched to the same position of every model's
  refinement bank (the training latents its NN step copies from). Per bank, the features are
  the mean log nearest distance and the share of latent pixels closer than 0.5, 1 and 2 times
  the training images' median nearest distance; a logistic regression on them attributes.
  A face of an LR-GMM-NN copies its latent pixels from its bank, so after decode and encode
  they sit at the round-trip error from a bank pixel; a model with another bank (setup B)
  is told apart, models sharing a bank (setups A and C) are not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError, NotFittedError
from .classifier import as_float


def _flat(images: torch.Tensor) -> torch.Tensor:
    return as_float(images).reshape(images.shape[0], -1)


def _nearest(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Index of the nearest bank row (Euclidean) for each query row, float32, in chunks."""
    b2 = (bank * bank).sum(1)
    out = []
    for s in range(0, queries.shape[0], chunk):
        q = queries[s:s + chunk]
        d = b2[None, :] - 2 * q @ bank.T  # |q|^2 is constant per row
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


class PixelKNN:
    """1-nearest neighbour on raw pixels."""

    name = "kNN (pixels)"

    def fit(self, images, labels) -> "PixelKNN":
        self.bank_ = _flat(images)
        self.labels_ = labels.long().clone()
        return self

    def predict(self, images) -> torch.Tensor:
        if not hasattr(self, "bank_"):
            raise NotFittedError("PixelKNN is not fitted; call fit(images, labels)")
        out = []
        for s in range(0, images.shape[0], 256):
            out.append(self.labels_[_nearest(_flat(images[s:s + 256]), self.bank_)])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


class Eigenface:
    """PCA on pixels, nearest class mean in the PCA space."""

    name = "Eigenface"

    def __init__(self, components: int = 150, seed: int = 0):
        self.components = components
        self.seed = seed

    def fit(self, images, labels) -> "Eigenface":
        x = _flat(images)
        self.mean_ = x.mean(0)
        q = min(self.components, x.shape[0] - 1, x.shape[1])
        torch.manual_seed(self.seed)  # torch.pca_lowrank takes no generator; fixed for reproducibility
        _, _, v = torch.pca_lowrank(x - self.mean_, q=q, center=False, niter=4)
        self.basis_ = v  # (D, q)
        z = (x - self.mean_) @ v
        k = int(labels.max()) + 1
        self.class_means_ = torch.stack([z[labels == c].mean(0) if (labels == c).any() else torch.full((q,), float("inf"))
                                         for c in range(k)])
        return self

    def predict(self, images) -> torch.Tensor:
        if not hasattr(self, "basis_"):
            raise NotFittedError("Eigenface is not fitted; call fit(images, labels)")
        out = []
        for s in range(0, images.shape[0], 256):
            z = (_flat(images[s:s + 256]) - self.mean_) @ self.basis_
            out.append(torch.cdist(z, self.class_means_).argmin(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def noise_residual(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """x - GaussianBlur_sigma(x), averaged over the colour channels: (N, H, W) float32."""
    x = as_float(images)
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    return (x - y).mean(1)


def _normalise(r: torch.Tensor) -> torch.Tensor:
    r = r.reshape(r.shape[0], -1)
    r = r - r.mean(1, keepdim=True)
    return r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)


class PRNU:
    """Marra et al. (2019): averaged noise residuals as source fingerprints, normalised correlation."""

    name = "PRNU"

    def __init__(self, sigma: float = 1.0, transform=None):
        self.sigma = sigma
        self.transform = transform  # applied to training images (immunised PRNU)

    def fit(self, images, labels, *, generator: torch.Generator | None = None) -> "PRNU":
        k = int(labels.max()) + 1
        sums = torch.zeros(k, images.shape[-2] * images.shape[-1])
        counts = torch.zeros(k)
        for s in range(0, images.shape[0], 256):
            x = as_float(images[s:s + 256])
            if self.transform is not None:
                x = self.transform(x, generator)
            r = noise_residual(x, self.sigma).reshape(x.shape[0], -1)
            lab = labels[s:s + 256].long()
            sums.index_add_(0, lab, r)
            counts.index_add_(0, lab, torch.ones(lab.numel()))
        self.fingerprints_ = _normalise(sums / counts.clamp_min(1)[:, None])
        return self

    def predict(self, images) -> torch.Tensor:
        if not hasattr(self, "fingerprints_"):
            raise NotFittedError("PRNU is not fitted; call fit(images, labels)")
        out = []
        for s in range(0, images.shape[0], 256):
            r = _normalise(noise_residual(images[s:s + 256], self.sigma))
            out.append((r @ self.fingerprints_.T).argmax(1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


class LogisticRegression:
    """Multinomial logistic regression on standardised features (L2 penalty ``l2``), L-BFGS."""

    def __init__(self, l2: float = 1e-3, max_iter: int = 200):
        self.l2 = l2
        self.max_iter = max_iter

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> "LogisticRegression":
        x = torch.as_tensor(features, dtype=torch.float64)
        y = labels.long()
        self.mean_ = x.mean(0)
        self.std_ = x.std(0).clamp_min(1e-8)
        z = (x - self.mean_) / self.std_
        k = int(y.max()) + 1
        w = torch.zeros(z.shape[1], k, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w + b, y) + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w_, self.b_ = w.detach(), b.detach()
        return self

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        z = (torch.as_tensor(features, dtype=torch.float64) - self.mean_) / self.std_
        return F.softmax(z @ self.w_ + self.b_, 1)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(features).argmax(1)


class FeatureLogistic:
    """A fixed feature extractor (images uint8 -> (N, D)) followed by :class:`LogisticRegression`."""

    def __init__(self, extract, name: str = "features + logistic regression", l2: float = 1e-3):
        self.extract = extract
        self.name = name
        self.lr = LogisticRegression(l2)

    def fit(self, images, labels) -> "FeatureLogistic":
        self.lr.fit(self.extract(images), labels)
        return self

    def fit_features(self, features, labels) -> "FeatureLogistic":
        self.lr.fit(features, labels)
        return self

    def predict(self, images) -> torch.Tensor:
        return self.lr.predict(self.extract(images))


class ProvenanceMatch:
    """Owner-side provenance matching against the models' refinement banks (module docstring).

    Parameters
    ----------
    banks : dict name -> latents (M, c, h, w)
        The refinement bank of every model the owner holds (identical banks may repeat; they
        give identical features).
    autoencoder
        Encodes images (N, 3, 128, 128) float -> latents (N, c, h, w).
    """

    name = "provenance match (owner side)"

    def __init__(self, banks: dict, autoencoder):
        if not banks:
            raise InputError("ProvenanceMatch needs at least one model bank")
        # deduplicate banks holding the same latents
        uniq, self.bank_names = [], []
        for name, b in banks.items():
            b = b.float()
            if not any(u.shape == b.shape and torch.equal(u, b) for u in uniq):
                uniq.append(b)
                self.bank_names.append(name)
        self.banks = uniq
        self.autoencoder = autoencoder
        self.lr = LogisticRegression(1e-2)

    def nearest_distances(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, n_banks, h, w): per latent pixel, the distance to the nearest bank pixel at the same position."""
        n, c, h, w = latents.shape
        q = latents.permute(2, 3, 0, 1).reshape(h * w, n, c)
        out = []
        for b in self.banks:
            bb = b.permute(2, 3, 0, 1).reshape(h * w, b.shape[0], c)  # (hw, M, c)
            d = torch.cdist(q, bb, compute_mode="donot_use_mm_for_euclid_dist").min(2).values  # (hw, n)
            out.append(d.T.reshape(n, h, w))
        return torch.stack(out, 1)

    def _latents(self, images) -> torch.Tensor:
        out = []
        for s in range(0, images.shape[0], 64):
            out.append(self.autoencoder.encode(as_float(images[s:s + 64])))
        return torch.cat(out)

    def features(self, images) -> torch.Tensor:
        d = self.nearest_distances(self._latents(images)).flatten(2)  # (N, B, hw)
        scale = self.scale_[None, :, None]
        parts = [d.clamp_min(1e-6).log().mean(2)] + [(d < f * scale).double().mean(2) for f in (0.5, 1.0, 2.0)]
        return torch.cat(parts, 1).double()

    def fit(self, images, labels) -> "ProvenanceMatch":
        d = self.nearest_distances(self._latents(images)).flatten(2)
        self.scale_ = d.median(2).values.median(0).values  # (B,) typical nearest distance per bank
        scale = self.scale_[None, :, None]
        parts = [d.clamp_min(1e-6).log().mean(2)] + [(d < f * scale).double().mean(2) for f in (0.5, 1.0, 2.0)]
        self.lr.fit(torch.cat(parts, 1).double(), labels)
        return self

    def predict(self, images) -> torch.Tensor:
        if not hasattr(self, "scale_"):
            raise NotFittedError("ProvenanceMatch is not fitted; call fit(images, labels)")
        return self.lr.predict(self.features(images))
