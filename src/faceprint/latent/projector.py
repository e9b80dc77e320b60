"""PCA projector P0 per latent pixel (papers/000, Sec. 3.1, Eq. (1)-(2)).

Every latent pixel y(p) in R^c (c = 32 for TAEF2) is reduced to q whitened principal
coordinates:  P0 y = diag(s0)^(-1/2) V0 (y - ybar),  and mapped back by
P0* z = V0^T diag(s0)^(1/2) z + ybar. The same projector is shared by all positions p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import all_finite
from ..errors import ConfigError, InputError, NotFittedError


@dataclass(frozen=True)
class ProjectorConfig:
    """channels: q, the number of principal channels kept per latent pixel."""

    channels: int = 16

    def __post_init__(self):
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ConfigError(f"channels (q) must be a positive int, got {self.channels!r}; try 8, 16 or 32")


class PCAProjector:
    """Per-pixel PCA with whitening. Learned state: mean_ (c,), components_ (q, c), variances_ (q,)."""

    def __init__(self, config: ProjectorConfig | None = None):
        self.config = config or ProjectorConfig()
        self.mean_: torch.Tensor | None = None
        self.components_: torch.Tensor | None = None
        self.variances_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None

    def fit(self, latents: torch.Tensor) -> "PCAProjector":
        """Fit on latents (N, c, h, w)."""
        _check_latents(latents, "latents")
        c = latents.shape[1]
        q = self.config.channels
        if q > c:
            raise ConfigError(f"channels (q) = {q} exceeds the autoencoder's {c} latent channels; choose q <= {c}")
        # the channel covariance over every pixel of every latent, accumulated in float64 a chunk
        # of latents at a time (the pixels of 28,000 latents in float64 would take 1.8 GB)
        N = latents.shape[0]
        X = latents.reshape(N, c, -1)
        m = N * X.shape[2]
        s1 = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, c, dtype=torch.float64)
        step = max(1, (1 << 22) // (c * X.shape[2]))
        for a in range(0, N, step):
            x = X[a:a + step].double().transpose(0, 1).reshape(c, -1)  # (c, chunk pixels)
            s1 += x.sum(1)
            s2 += x @ x.T
        mean = s1 / m
        cov = (s2 - m * torch.outer(mean, mean)) / max(m - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(evals, descending=True)
        evals, evecs = evals[order].clamp_min(0), evecs[:, order]
        # deterministic sign: the largest-magnitude entry of each eigenvector is positive
        idx = evecs.abs().argmax(0)
        signs = torch.sign(evecs[idx, torch.arange(c)])
        signs[signs == 0] = 1
        evecs = evecs * signs
        floor = evals[0] * 1e-12 + 1e-30
        self.mean_ = mean.float()
        self.components_ = evecs[:, :q].T.contiguous().float()  # (q, c)
        self.variances_ = evals[:q].clamp_min(floor).float()  # (q,)
        self.explained_variance_ratio_ = (evals / evals.sum()).float()
        return self

    def _check_fitted(self):
        if self.components_ is None:
            raise NotFittedError("PCAProjector is not fitted; call fit(latents) first")

    def transform(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, c, h, w) -> (N, q, h, w) whitened principal coordinates (Eq. 1)."""
        self._check_fitted()
        _check_latents(latents, "latents")
        if latents.shape[1] != self.mean_.shape[0]:
            raise InputError(f"latents have {latents.shape[1]} channels, the projector was fitted on {self.mean_.shape[0]}")
        x = latents.float() - self.mean_[None, :, None, None]
        z = torch.einsum("qc,nchw->nqhw", self.components_, x)
        return z / self.variances_.sqrt()[None, :, None, None]

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """(N, q, h, w) -> (N, c, h, w) (Eq. 2)."""
        self._check_fitted()
        if z.ndim != 4 or z.shape[1] != self.components_.shape[0]:
            raise InputError(
                f"projected latents must have shape (N, {self.components_.shape[0]}, h, w), got {tuple(z.shape)}"
            )
        z = z.float() * self.variances_.sqrt()[None, :, None, None]
        return torch.einsum("qc,nqhw->nchw", self.components_, z) + self.mean_[None, :, None, None]

    # persistence -----------------------------------------------------------------------
    def state_tensors(self, prefix: str = "projector.") -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {
            prefix + "mean": self.mean_,
            prefix + "components": self.components_,
            prefix + "variances": self.variances_,
            prefix + "explained_variance_ratio": self.explained_variance_ratio_,
        }

    @classmethod
    def from_state(cls, config: ProjectorConfig, tensors: dict, prefix: str = "projector.") -> "PCAProjector":
        p = cls(config)
        p.mean_ = tensors[prefix + "mean"]
        p.components_ = tensors[prefix + "components"]
        p.variances_ = tensors[prefix + "variances"]
        p.explained_variance_ratio_ = tensors[prefix + "explained_variance_ratio"]
        return p


def _check_latents(latents, name):
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise InputError(f"{name} must be a 4-D tensor (N, c, h, w), got {type(latents).__name__} "
                         f"{tuple(getattr(latents, 'shape', ()))}")
    if latents.shape[0] < 1:
        raise InputError(f"{name} is empty (N = 0); encode at least one photo")
    if not all_finite(latents):
        raise InputError(f"{name} contains NaN or infinite values")
