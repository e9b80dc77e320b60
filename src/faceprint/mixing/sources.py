"""What goes into a mix and what comes out of it: reading sources, provenance, and the refusal
to mix a person a model was made to forget (docs/SEED-SYSTEMS.md Sec. 4.5).

Sources
-------
``parse_source("A.png")`` is an image file (any format faceprint reads; decoded with the same
checks as training photos: decompression-bomb guard before decoding, EXIF orientation, grey /
CMYK / alpha converted to RGB, see :mod:`faceprint.data.folder`), read at its own size.
``parse_source("model.safetensors:seed=3")`` (optionally ``:index=K``, default 0) is face K of
seed 3 of a fitted faceprint model, generated on the spot (decoded by the model's own, possibly
fingerprinted, decoder).

Sizes must be on the 8-px latent grid. With ``snap=True`` a source is centre-cropped to the
largest multiple of 8 in each side instead, and the crop is recorded in its provenance entry
("adjusted"); nothing is resized or changed silently.

Provenance
----------
Every source is recorded by content: a file by its sha256 (and base name), a generated face by
its model file's sha256, seed and index. A file source is treated as a real photo (there is no
way to prove otherwise), so a mix with any file source is marked ``"operation": "edit"``
("editing a real photo is image editing, not generation"); a mix of generated faces only is
``"generated"``.

Forgotten people
----------------
A model edited by ``faceprint tame forget`` records the sha256 of every photo it forgot. A mix
is refused (:class:`ForgottenPersonError`) when

1. a file source *is* one of those photos (same sha256), or
2. the identity gallery check accepts a source or the output as a forgotten person: the
   forgotten photos are found again under the model's training folder by their sha256,
   enrolled with the identity recogniser (:mod:`faceprint.recognition.identity`, mean-descriptor
   rule, threshold 0.5 calibrated on celeba-id), and every source (centre square, 128 px) is
   checked against that gallery. Galleries can also be given directly (``IdentityGallery``
   files). A model with forgotten photos whose files cannot be found is refused unless a
   gallery for them is given: the check is never skipped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ForgottenPersonError, InputError  # noqa: F401 - ForgottenPersonError is raised here
from ..io import sha256_file
from .model import DOWNSCALE, MAX_PIXELS, MIN_SIDE

_MODEL_RE = re.compile(r"^(?P<path>.+\.safetensors):seed=(?P<seed>\d+)(?::index=(?P<index>\d+))?$")


@dataclass
class Source:
    """One input of a mix: its pixels (3, H, W) in [0, 1] and its provenance entry."""

    image: torch.Tensor
    record: dict
    spec: str
    path: Path | None = None
    generator: object | None = None  # the faceprint Generator a generated face came from
    model_meta: dict = field(default_factory=dict)

    @property
    def is_file(self) -> bool:
        return self.record.get("kind") == "file"


def parse_source(spec: str) -> tuple[str, Path, int | None, int]:
    """("file" | "model", path, seed, index) of a source argument."""
    if not isinstance(spec, str) or not spec:
        raise InputError(f"source must be a file name or MODEL.safetensors:seed=N[:index=K], got {spec!r}")
    m = _MODEL_RE.match(spec)
    if m:
        seed = int(m.group("seed"))
        if seed >= 2 ** 63:
            raise InputError(f"source {spec!r}: the seed must be below 2**63")
        index = int(m.group("index") or 0)
        if index >= 2 ** 62:
            raise InputError(f"source {spec!r}: the index must be below 2**62")
        return "model", Path(m.group("path")), seed, index
    if ":seed=" in spec or ":index=" in spec:
        raise InputError(f"source {spec!r} looks like a generated face but is not MODEL.safetensors:seed=N[:index=K]")
    return "file", Path(spec), None, 0


def _to_rgb_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    t = torch.from_numpy(np.array(arr, copy=True))
    if t.dtype == torch.uint8:
        t = t.float() / 255
    return t.permute(2, 0, 1).float().clamp(0, 1).contiguous()


def read_image(path, *, name: str = "source", max_pixels: int = MAX_PIXELS, snap: bool = False) -> tuple[torch.Tensor, dict]:
    """An image file at its own size -> ((3, H, W) float in [0, 1], adjustments made)."""
    from ..data.folder import _decode_upright
    from ..errors import BadImageError

    path = Path(path)
    try:
        arr = _decode_upright(path, max_pixels, MIN_SIDE)
    except BadImageError as e:
        raise InputError(f"{name} {str(path)!r}: {e.reason}") from None
    x = _to_rgb_tensor(arr)
    return snap_to_grid(x, name=f"{name} {str(path)!r}", snap=snap)


def snap_to_grid(x: torch.Tensor, *, name: str, snap: bool) -> tuple[torch.Tensor, dict]:
    """Refuse (or, with snap, centre-crop) an image whose sides are not multiples of 8."""
    _, h, w = x.shape
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{name} is {h}x{w} px; sides must be at least {MIN_SIDE} px")
    if h % DOWNSCALE == 0 and w % DOWNSCALE == 0:
        return x, {}
    nh, nw = h // DOWNSCALE * DOWNSCALE, w // DOWNSCALE * DOWNSCALE
    if not snap:
        raise InputError(f"{name} is {h}x{w} px (H x W), not on the {DOWNSCALE}-px latent grid; crop it to "
                         f"{nh}x{nw} or pass --snap to centre-crop it (the crop is reported)")
    top, left = (h - nh) // 2, (w - nw) // 2
    return x[:, top:top + nh, left:left + nw].contiguous(), {"cropped_from": [h, w], "to": [nh, nw],
                                                            "offset": [top, left]}


def load_source(spec: str, *, weights=None, snap: bool = False, max_pixels: int = MAX_PIXELS) -> Source:
    """Read or generate one source (see the module docstring)."""
    kind, path, seed, index = parse_source(spec)
    if kind == "file":
        from ..cli.safety import regular_input

        regular_input("source", path, "image file")
        x, adj = read_image(path, max_pixels=max_pixels, snap=snap)
        rec = {"kind": "file", "name": path.name, "sha256": sha256_file(path), "size": list(x.shape[1:]),
               "real_photo": True}
        if adj:
            rec["adjusted"] = adj
        return Source(x, rec, spec, path=path)
    from ..io import load_artifact
    from ..latent.generator import Generator

    from ..cli.safety import regular_input

    regular_input("source model", path, "model file")
    gen = Generator.load(path, weights=weights)
    _, meta = load_artifact(path, validate=False)
    images, samples = gen.generate(1, seed=seed, start=index)
    rec = {"kind": "generated", "model": path.name, "model_sha256": sha256_file(path), "seed": seed, "index": index,
           "size": list(images.shape[2:]), "real_photo": False,
           "decoder": getattr(gen.autoencoder, "id", None)}
    if gen.fingerprint_:
        rec["fingerprint_instance"] = gen.fingerprint_.get("instance")
    return Source(images[0], rec, spec, path=path, generator=gen, model_meta=meta)


# ------------------------------------------------------------------------------------------------
# forgotten people


def forgotten_hashes(provenance: dict) -> list[str]:
    """sha256 of every photo the model's forget operations removed."""
    out = []
    for op in (provenance or {}).get("operations", []) or []:
        if isinstance(op, dict) and op.get("operation") == "forget":
            out.extend(str(h) for h in op.get("removed_content_sha256", []) or [])
    return sorted(set(out))


def find_files_by_hash(root, hashes, *, max_files: int = 200_000) -> list[Path]:
    """Files under ``root`` whose sha256 is among ``hashes`` (the photos a model forgot)."""
    from ..data.folder import IMAGE_EXTENSIONS

    want = set(hashes)
    found = []
    root = Path(root)
    if not want or not root.is_dir():
        return found
    n = 0
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        n += 1
        if n > max_files:
            break
        if sha256_file(p) in want:
            found.append(p)
    return found


def faces_for_recogniser(images, size: int = 128) -> torch.Tensor:
    """Centre square of each (3, H, W) image, resized to size x size (area): (N, 3, size, size)."""
    out = []
    for x in images:
        _, h, w = x.shape
        s = min(h, w)
        t, l = (h - s) // 2, (w - s) // 2
        sq = x[None, :, t:t + s, l:l + s]
        out.append(F.interpolate(sq, size=(size, size), mode="area" if s > size else "bilinear",
                                 align_corners=None if s > size else False).clamp(0, 1)[0])
    return torch.stack(out)


def galleries_from_model(generator, provenance: dict, recogniser, *, label: str) -> list:
    """Identity galleries of the people a model forgot (one gallery of all its forgotten photos
    per forget operation); raises ForgottenPersonError-free InputError when photos are missing."""
    from ..data import load_image

    galleries = []
    for op in (provenance or {}).get("operations", []) or []:
        if not (isinstance(op, dict) and op.get("operation") == "forget"):
            continue
        hashes = op.get("removed_content_sha256") or []
        root = getattr(getattr(generator, "training_", None), "root", None)
        files = find_files_by_hash(root, hashes) if root else []
        if not files:
            raise InputError(f"{label} forgot {len(hashes)} photos ({op.get('name') or 'unnamed'}) whose files are not "
                             f"found under its training folder {root!r}, so the identity check cannot be made; pass "
                             "--gallery with an IdentityGallery of that person")
        faces = torch.stack([load_image(f, 128) for f in files])
        galleries.append(recogniser.enrol(recogniser.describe(faces), name=str(op.get("name") or label)))
    return galleries


def check_not_forgotten(images, galleries, recogniser, *, what: list[str]) -> list[dict]:
    """Refuse (ForgottenPersonError) if any image is accepted as a gallery's person; returns the
    distances checked (for the provenance record)."""
    if not galleries:
        return []
    faces = faces_for_recogniser(images)
    d = recogniser.describe(faces)
    rows = []
    thr = recogniser.config.resolved_gallery_threshold
    for gal in galleries:
        dist = recogniser.gallery_distance(d, gal)
        for i, v in enumerate(dist.tolist()):
            rows.append({"input": what[i], "gallery": gal.name, "distance": round(v, 4), "threshold": thr})
            if v <= thr:
                raise ForgottenPersonError(
                    f"{what[i]} shows a person the model forgot ({gal.name!r}: identity distance {v:.3f} <= {thr}); "
                    "mixing a forgotten person is refused")
    return rows


__all__ = ["ForgottenPersonError", "Source", "check_not_forgotten", "faces_for_recogniser", "find_files_by_hash",
           "forgotten_hashes", "galleries_from_model", "load_source", "parse_source", "read_image", "snap_to_grid"]
