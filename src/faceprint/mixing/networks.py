"""The trainable parts of the Texture Mixer on TAEF2 (papers/004, ch. 3, Sec. 3.3.1, Fig. 3.2),
and the frozen feature taps its Gram losses use.

The chapter's networks are an encoder pair (E^l, E^g), a fully convolutional generator
G(z^l, z^g) and two WGAN-GP discriminators. On TAEF2 (docs/SEED-SYSTEMS.md, Sec. 4.3):

- E^l is the frozen TAEF2 encoder (m = 8 instead of 4): z^l = Enc(S), (N, 32, h, w).
- E^g = :class:`GlobalEncoder`, a small CNN on z^l -> a ``global_dim`` vector, broadcast in space.
- G(Z^l, Z^g) = Dec(H([Z^l, Z^g])): :class:`Harmoniser` H is a residual CNN at latent resolution
  whose last convolution starts at zero, so an untrained H is the identity and G starts as the
  plain TAEF2 latent blend; Dec is the frozen TAEF2 decoder (so a fingerprinted instance decoder
  keeps working).
- D^rec, D^itp = :class:`LatentCritic`, WGAN-GP critics on (crops of) latents.
- :class:`DecoderTaps`: activations of the frozen TAEF2 decoder at 1x and 2x (and optionally 4x)
  latent resolution: the feature pyramid of the Gram losses (no VGG-19 weights exist offline;
  the decoder's early stages are far cheaper than a full decode plus an encoder pass).
- :class:`PatchClassifier`: the seam / repetition classifier of the evaluation (Sec. 3.4.2), a
  small image CNN (the chapter uses D's architecture; ours critics see latents, not images).

Weights are created inside ``torch.random.fork_rng`` seeded from the caller's seed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..autoencoder.taef2 import LATENT_CHANNELS


class GlobalEncoder(nn.Module):
    """E^g: latents (N, 32, h, w) -> (N, dim) (mean and max pooled conv features, then linear)."""

    def __init__(self, dim: int = 32, width: int = 64):
        super().__init__()
        self.dim = dim
        self.body = nn.Sequential(
            nn.Conv2d(LATENT_CHANNELS, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(2 * width, dim)

    def forward(self, z):
        h = self.body(z)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return self.head(pooled)


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.leaky_relu(self.c1(F.leaky_relu(x, 0.2)), 0.2))


class Harmoniser(nn.Module):
    """H: [Z^l (N, 32, h, w), Z^g (N, g, h, w)] -> Z^l + delta (N, 32, h, w); delta = 0 at init."""

    def __init__(self, global_dim: int = 32, width: int = 64, blocks: int = 4):
        super().__init__()
        self.global_dim = global_dim
        self.inp = nn.Conv2d(LATENT_CHANNELS + global_dim, width, 3, padding=1)
        self.blocks = nn.Sequential(*[_Res(width) for _ in range(blocks)])
        self.out = nn.Conv2d(width, LATENT_CHANNELS, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, zl, zg=None):
        x = zl if zg is None or self.global_dim == 0 else torch.cat([zl, zg], 1)
        return zl + self.out(F.leaky_relu(self.blocks(self.inp(x)), 0.2))


class LatentCritic(nn.Module):
    """A WGAN-GP critic on latents (N, 32, h, w), h, w >= 4 -> (N,) (no normalisation layers,
    as the gradient penalty asks)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(LATENT_CHANNELS, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(2 * width, 1)

    def forward(self, z):
        return self.head(self.body(z).mean((2, 3))).squeeze(1)


class PatchClassifier(nn.Module):
    """Binary image classifier (N, 3, H, W) in [0, 1] -> logits (N,): seam / repetition scores.
    Four stride-2 convolutions (a seam is a discontinuity every stage still sees), then mean and
    max pooling (a seam or a repeat may be anywhere)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1, stride=2), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, stride=2), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1, stride=2), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(8 * w, 1)

    def forward(self, x):
        h = self.body(x * 2 - 1)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)).squeeze(1)


#: Decoder Sequential index after which each tap is read: after the three GN blocks (1x), after
#: the first upsampling stage (2x), after the second (4x).
TAP_ENDS = (6, 11, 16)


class DecoderTaps(nn.Module):
    """Activations of the frozen TAEF2 decoder at ``depth`` resolutions (1x, 2x[, 4x] of the
    latent): a list of (N, 64, h * 2^i, w * 2^i). Parameters are frozen (requires_grad False);
    gradients flow to the input."""

    def __init__(self, decoder: nn.Sequential, depth: int = 2):
        super().__init__()
        if depth not in (1, 2, 3):
            raise ValueError(f"depth must be 1, 2 or 3, got {depth}")
        self.depth = depth
        stages, start = [], 0
        for end in TAP_ENDS[:depth]:
            stages.append(nn.Sequential(*[decoder[i] for i in range(start, end)]))
            start = end
        self.stages = nn.ModuleList(stages)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def forward(self, z):
        feats = []
        h = z
        for s in self.stages:
            h = s(h)
            feats.append(h)
        return feats
