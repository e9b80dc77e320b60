"""Texture crops of hair and background from aligned face photos (the training and test
"texture category" of the mixer; papers/004 ch. 3 trains one model per category, Sec. 3.4).

The chapter's earth/animal texture datasets are not available; faceprint's shared photos are.
In a CelebA-aligned photo (178 x 218, face centred around (89, 120)) the top band holds hair and
background: crops are taken at three places of that band,

    "hair"   top centre  (57, 8) .. (121, 72)
    "left"   top left    (0, 0)  .. (64, 64)     (background, or long hair)
    "right"  top right   (114, 0) .. (178, 64)

each moved by a random offset of up to ``jitter`` px (inside the photo) and mirrored left-right
with probability 1/2 (the chapter's augmentation, Sec. 3.4.1, without rotation, histogram
matching and downscaling). ``band_crops`` takes 64 x 128 crops of the top band (the real
negatives of the repetition classifier). UTKFace's crops are too tight (the face fills the
frame; hair and background only in thin edges) to give 64 px textures, so they are not used.

The split is by person (celeba-id identities), hence by photo: no photo, and no person, gives
crops to both sides. Crops are image content of the shared photos: keep them (and their
latents) out of the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, InputError
from ..seeding import generator as make_generator

REGIONS = {"hair": (57, 8), "left": (0, 0), "right": (114, 0)}
CELEBA_SIZE = (178, 218)


@dataclass
class TextureSplit:
    """Photos of one side of the split: files (relative to root) and identities."""

    root: str
    files: list[str]
    identities: list[str]


def split_celeba_id(root, *, test_people: int = 32, seed: int = 0) -> tuple[TextureSplit, TextureSplit]:
    """(train, test) photos of celeba-id, split by identity (``test_people`` people held out,
    chosen by a seeded permutation of the sorted identities)."""
    root = Path(root)
    table = root / "identities.csv"
    if not table.is_file():
        raise DataError(f"{str(table)!r} not found; pass the celeba-id folder (with identities.csv and images/)")
    rows = [line.strip().split(",") for line in table.read_text().splitlines()[1:] if line.strip()]
    people = sorted({r[1] for r in rows})
    if test_people >= len(people):
        raise InputError(f"test_people must be below the {len(people)} people of celeba-id, got {test_people}")
    perm = torch.randperm(len(people), generator=make_generator(seed, "texture-split")).tolist()
    test = {people[i] for i in perm[:test_people]}
    tr = [(f, p) for f, p in rows if p not in test]
    te = [(f, p) for f, p in rows if p in test]
    return (TextureSplit(str(root), [f for f, _ in tr], [p for _, p in tr]),
            TextureSplit(str(root), [f for f, _ in te], [p for _, p in te]))


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def texture_crops(split: TextureSplit, *, size: int = 64, per_photo: int = 3, jitter: int = 8, seed: int = 0,
                  limit: int | None = None, regions=("hair", "left", "right")) -> tuple[torch.Tensor, list[int]]:
    """Crops (M, 3, size, size) float in [0, 1] and the index of the photo of each.

    Each photo gives ``per_photo`` crops, cycling through ``regions``; photo i's offsets and
    mirroring come from (seed, "texture-crop", file name)."""
    files = split.files[:limit] if limit else split.files
    out, owner = [], []
    for i, rel in enumerate(files):
        arr = _read(Path(split.root) / rel)
        H, W = arr.shape[:2]
        g = make_generator(seed, "texture-crop", rel)
        for j in range(per_photo):
            x0, y0 = REGIONS[regions[j % len(regions)]]
            x0 = x0 * W // CELEBA_SIZE[0]
            y0 = y0 * H // CELEBA_SIZE[1]
            dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
            x = min(max(0, x0 + dx), W - size)
            y = min(max(0, y0 + dy), H - size)
            crop = arr[y:y + size, x:x + size]
            if bool(torch.rand(1, generator=g) < 0.5):
                crop = crop[:, ::-1]
            out.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255)
            owner.append(i)
    return torch.stack(out), owner


def band_crops(split: TextureSplit, *, height: int = 64, width: int = 128, seed: int = 0,
               limit: int | None = None) -> torch.Tensor:
    """One (3, height, width) crop of the top band of each photo, at a seeded column."""
    files = split.files[:limit] if limit else split.files
    out = []
    for rel in files:
        arr = _read(Path(split.root) / rel)
        H, W = arr.shape[:2]
        g = make_generator(seed, "band-crop", rel)
        x = int(torch.randint(0, W - width + 1, (1,), generator=g))
        y = int(torch.randint(0, 9, (1,), generator=g))
        crop = arr[y:y + height, x:x + width]
        out.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


__all__ = ["REGIONS", "TextureSplit", "band_crops", "split_celeba_id", "texture_crops"]
