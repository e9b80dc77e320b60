"""Training data of the mapping: dlib descriptors and landmarks of many photos, cached.

The descriptors of the training photos are computed once (about 0.1-0.3 s per photo with dlib
on one core) and kept in a descriptor cache: one safetensors file (content sha256 of each photo
-> its 128-d descriptor and its 5 landmarks in the 128 px crop), written atomically with mode
0600 (descriptors are biometric data, kept like the owner's key) and never inside the
repository. :func:`describe_photos` fills it incrementally and saves it every ``save_every``
photos, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .mapping import TrainingData, expression_features

CACHE_CLASS = "faceprint.DescriptorCache"


def _load_cache(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from ..io import load_artifact

    if path is None or not Path(path).is_file():
        return {}
    tensors, meta = load_artifact(path, validate=False)
    if meta.get("class") != CACHE_CLASS:
        raise InputError(f"descriptor cache {str(path)!r} is not a faceprint descriptor cache; choose another path")
    keys = meta.get("keys", [])
    d, lm = tensors["descriptors"].numpy(), tensors["landmarks"].numpy()
    return {k: (d[i], lm[i]) for i, k in enumerate(keys)}


def _save_cache(path, cache: dict) -> None:
    from ..io import save_artifact

    keys = sorted(cache)
    d = torch.from_numpy(np.stack([cache[k][0] for k in keys]).astype(np.float32)) if keys else torch.zeros(0, 128)
    lm = torch.from_numpy(np.stack([cache[k][1] for k in keys]).astype(np.float32)) if keys else torch.zeros(0, 5, 2)
    save_artifact(path, {"descriptors": d, "landmarks": lm},
                  {"class": CACHE_CLASS, "keys": keys, "note": "dlib descriptors of photos (biometric): keep private"},
                  mode=0o600)


def describe_photos(paths, recogniser, finder, *, cache=None, save_every: int = 500, progress: bool = False,
                    deadline: float | None = None) -> tuple[torch.Tensor, np.ndarray, list[bool]]:
    """(descriptors (N, 128), landmarks (N, 5, 2) in the 128 px centre crop, done (N,) bool) of
    photo files. Photos already in ``cache`` (a file path) are not described again.
    ``deadline`` (time.monotonic() value) stops early; the rows not done are zero and
    ``done`` says which."""
    from ..data import load_image
    from ..io import sha256_file
    from ..recognition.identity import DEFAULT_BOX

    paths = [Path(p) for p in paths]
    store = _load_cache(cache)
    shas = [sha256_file(p) for p in paths]
    out_d = np.zeros((len(paths), 128), np.float32)
    out_l = np.zeros((len(paths), 5, 2), np.float32)
    done = [False] * len(paths)
    new = 0
    from tqdm.auto import tqdm

    for i, (p, h) in enumerate(tqdm(list(zip(paths, shas)), desc="descriptors", unit="photo",
                                    disable=None if progress else True)):
        if h not in store:
            if deadline is not None and time.monotonic() > deadline:
                continue
            img = load_image(p, 128)
            desc = recogniser.describe(img[None])[0].numpy()
            u8 = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            lm = finder.box_landmarks(u8, DEFAULT_BOX).astype(np.float32)
            store[h] = (desc, lm)
            new += 1
            if cache is not None and new % save_every == 0:
                _save_cache(cache, store)
        out_d[i], out_l[i] = store[h]
        done[i] = True
    if cache is not None and new:
        _save_cache(cache, store)
    return torch.from_numpy(out_d), out_l, done


def training_data(latents: torch.Tensor, descriptors: torch.Tensor, landmarks: np.ndarray, ids, classifier) -> TrainingData:
    """The mapping's training set from per-photo latents, descriptors, landmarks and identities."""
    exp = expression_features(latents, np.asarray(landmarks, dtype=np.float64), classifier)
    return TrainingData(latents.float(), descriptors.float(), exp, list(ids))


__all__ = ["describe_photos", "training_data"]
