"""Low-rank sampling from the mixture (papers/000, Sec. 3.2, Eq. (3)-(4)).

Component k keeps its d_k = floor(lambda * pi_k * d0) leading eigenpairs (at least 1, at most
its rank), and a sample is  z = c_k + V_k diag(sqrt(s_k)) eps,  eps ~ N(0, I_{d_k}), whose
covariance is the best rank-d_k approximation of Sigma_k. (The paper's Eq. (4) prints the
inverse square root; a sampler needs sqrt(s_k) to reproduce the covariance, as in Eq. (3).)
lambda (the "rank temperature") trades diversity (large) for quality (small) (paper, Fig. 8).

Image i of a run with seed s draws its component and its eps from the generator seeded by
(s, i) alone, so it does not depend on how many images are drawn with it.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..seeding import generator as make_generator


def image_generator(seed: int, tag: str, index: int, attempt: int = 0) -> torch.Generator:
    """The random stream of image ``index`` of a run (attempt 0), or of its attempt-th redraw."""
    if attempt == 0:
        return make_generator(seed, tag, index)
    return make_generator(seed, tag, index, "redraw", attempt)
from .mixture import GaussianMixture


def component_ranks(mixture: GaussianMixture, rank_temperature: float) -> list[int]:
    """d_k = floor(lambda pi_k d0), clipped to [1, rank of S_k] (0 only if S_k = 0)."""
    if not (isinstance(rank_temperature, (int, float)) and rank_temperature > 0 and math.isfinite(rank_temperature)):
        raise ConfigError(f"rank_temperature (lambda) must be a positive number, got {rank_temperature!r}; "
                          "the paper uses 0.12 (K = 8) and 0.003 (K = 1)")
    d0 = mixture.n_features
    ranks = []
    for pi, e in zip(mixture.weights_.tolist(), mixture.eigvals_):
        dk = math.floor(rank_temperature * pi * d0)
        ranks.append(min(max(dk, 1), e.numel()))
    return ranks


class LowRankSampler:
    """Draws latent vectors (n, d0) and their components from a fitted mixture."""

    def __init__(self, mixture: GaussianMixture, rank_temperature: float):
        self.mixture = mixture
        self.rank_temperature = rank_temperature
        self.ranks = component_ranks(mixture, rank_temperature)
        self._factors = [
            (U[:, :dk] * (e[:dk] + mixture.component_noise(k)).sqrt()).float().T.contiguous()  # (d_k, d0)
            for k, (U, e, dk) in enumerate(zip(mixture.eigvecs_, mixture.eigvals_, self.ranks))
        ]
        self._means = mixture.means_.float()
        self._weights = mixture.weights_.double()

    def covariance(self, k: int) -> torch.Tensor:
        """The covariance the sampler reproduces for component k: (d0, d0)."""
        F = self._factors[k].double()
        return F.T @ F

    def draw(self, n: int, seed: int, start: int = 0, component: int | None = None):
        """n samples for image indices start..start+n-1: (z (n, d0) float32, components (n,))."""
        return self.draw_at(list(range(start, start + n)), seed, component=component)

    def draw_at(self, indices: list[int], seed: int, *, attempt: int = 0, component: int | None = None):
        """Samples for the given image indices: (z (n, d0) float32, components (n,)).

        ``attempt`` > 0 gives the attempt-th redraw of each image (used by the copy guard): its
        own random stream, so a redrawn face is the same whichever batch it is drawn in."""
        n = len(indices)
        comps = torch.empty(n, dtype=torch.int64)
        z = torch.empty(n, self._means.shape[1])
        for i, idx in enumerate(indices):
            # one image at a time: the arithmetic (not only the draws) is then independent of n
            g = image_generator(seed, "lrgmm", idx, attempt)
            k = int(torch.multinomial(self._weights, 1, generator=g)) if component is None else component
            comps[i] = k
            eps = torch.randn(1, self.ranks[k], generator=g)
            z[i] = self._means[k] + (eps @ self._factors[k])[0]
        return z, comps
