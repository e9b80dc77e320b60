"""The autoencoder stage: images (N, 3, H, W) in [0, 1] <-> latents (N, C, H/f, W/f).

papers/000 builds its latent model on a generic autoencoder pretrained on a large auxiliary
dataset; faceprint uses TAEF2 (taef2.py) with pinned weights (weights.py, docs/TAEF2.md).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .taef2 import TAEF2, TAEF2Config, TAEF2Decoder, TAEF2Encoder, native_bf16
from .weights import ENV_VAR, SHA256, find_weights, search_path, weights_id


@runtime_checkable
class Autoencoder(Protocol):
    """What the rest of faceprint needs from an autoencoder.

    ``id`` identifies the weights (cache keys, artifact provenance); ``config`` is a frozen
    dataclass; encode/decode run without autograd and return float32 tensors.
    """

    id: str
    latent_channels: int

    def encode(self, images: torch.Tensor, *, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, latent_channels, h, w)."""
        ...

    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """(N, latent_channels, h, w) -> (N, 3, H, W) in [0, 1]."""
        ...

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(latent_channels, h, w) for one H x W image."""
        ...


__all__ = [
    "Autoencoder",
    "TAEF2",
    "TAEF2Config",
    "TAEF2Encoder",
    "TAEF2Decoder",
    "native_bf16",
    "find_weights",
    "search_path",
    "weights_id",
    "SHA256",
    "ENV_VAR",
]
