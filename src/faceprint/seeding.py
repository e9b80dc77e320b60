"""Seeds -> torch.Generator, so that image k of a run is reproducible alone.

Every stochastic call in faceprint takes a generator or a seed; nothing reads the global RNG.
A run with seed s gives image k the generator seeded by a 63-bit hash of (s, k), so the k-th
face is the same whether it is drawn alone, in a batch of 64, or as part of a larger run.
"""

from __future__ import annotations

import hashlib

import torch

from .errors import InputError


def check_seed(seed, name: str = "seed") -> int:
    """Validate a user seed: a non-negative int below 2**63."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"{name} must be an int, got {type(seed).__name__} {seed!r}; pass e.g. {name}=0")
    if not 0 <= seed < 2**63:
        raise InputError(f"{name} must be in [0, 2**63), got {seed}; pass a smaller non-negative int")
    return seed


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived from ``seed`` and any number of int/str keys (stable across runs)."""
    check_seed(seed)
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    for k in keys:
        h.update(b"\x00")
        h.update(str(k).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def generator(seed: int, *keys) -> torch.Generator:
    """A CPU torch.Generator seeded from ``seed`` and optional keys (e.g. the image index)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *keys) if keys else check_seed(seed))
    return g
