"""The reference photo of a personalisation: one face, found, checked and aligned (papers/003,
Sec. 4.2 "we align and crop images", here to the CelebA frame faceprint works in).

A reference is refused, with one message naming the photo, the problem and the fix, when

- it is not a readable image (the photo checks of :mod:`faceprint.data.folder`);
- dlib's frontal face detector finds no face, or more than one;
- the face is too small (detector box side below ``min_face`` px in the photo, default 64);
- the face is too far from frontal: the nose base is off the eyes' midpoint by more than
  ``max_yaw`` of the eye distance (a yaw proxy from the 5-point landmarks, default 0.35), or the
  eye line is tilted by more than ``max_roll`` degrees (default 30).

The accepted face is warped by the similarity transform that puts its 5 landmarks on
:data:`faceprint.recognition.identity.MEAN_LANDMARKS` (the mean landmarks of 128 px centre
crops of CelebA-aligned photos), so the result is framed like the photos the generator, the
attribute classifiers and the recogniser were fitted on. The photo itself is never stored: a
:class:`Reference` keeps its sha256 for provenance and the aligned 128 px pixels in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

WORK_SIZE = 128
MIN_FACE = 64
MAX_YAW = 0.35
MAX_ROLL = 30.0
MAX_PIXELS = 40_000_000


@dataclass
class Reference:
    """One checked reference face.

    image : (3, 128, 128) float32 in [0, 1], aligned to the CelebA frame.
    sha256 : of the photo file's bytes (or of the array given), for provenance.
    name : base name of the photo (provenance), never its folder.
    face_px : detector box side in the photo, px.
    yaw, roll : the frontality measures (fraction of the eye distance; degrees).
    landmarks : (5, 2) landmarks in the aligned 128 px image.
    """

    image: torch.Tensor
    sha256: str
    name: str
    face_px: float
    yaw: float
    roll: float
    landmarks: np.ndarray = field(repr=False)

    def record(self) -> dict:
        """For provenance: the photo's sha256 and the checks, never the photo or its file name."""
        return {"sha256": self.sha256, "face_px": round(self.face_px, 1),
                "yaw": round(self.yaw, 3), "roll_degrees": round(self.roll, 2)}


class FaceFinder:
    """dlib's HOG frontal face detector and 5-point landmark model (the recogniser's files,
    checked by sha256)."""

    def __init__(self, *, models_dir=None, upsample: int = 1):
        from ..recognition.identity import LANDMARK_MODEL, _import_dlib, find_dlib_models

        dlib = _import_dlib()
        files = find_dlib_models(models_dir)
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(files[LANDMARK_MODEL]))
        self.upsample = int(upsample)

    def detect(self, arr: np.ndarray) -> list:
        """Face boxes in an (H, W, 3) uint8 image (dlib rectangles, best first)."""
        rects, scores, _ = self._detector.run(np.ascontiguousarray(arr), self.upsample, 0.0)
        order = np.argsort(-np.asarray(scores, dtype=float)) if len(scores) else []
        return [rects[int(i)] for i in order]

    def landmarks(self, arr: np.ndarray, rect) -> np.ndarray:
        """(5, 2) float landmarks (x, y) of the face in ``rect``."""
        s = self._shape(np.ascontiguousarray(arr), rect)
        return np.array([[s.part(i).x, s.part(i).y] for i in range(5)], dtype=np.float64)

    def box_landmarks(self, arr: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """Landmarks inside a fixed box (fractions of the side), as the recogniser finds them."""
        s = arr.shape[0]
        l, t, r, b = (int(round(v * s)) for v in box)
        return self.landmarks(arr, self._dlib.rectangle(l, t, r, b))


def pose_of(landmarks: np.ndarray) -> tuple[float, float]:
    """(yaw proxy, roll in degrees) from dlib's 5 points: right eye outer/inner, left eye
    outer/inner, nose base. Yaw: signed offset of the nose base from the eyes' midpoint along
    the eye line, in eye distances (0 for a frontal face)."""
    re = landmarks[0:2].mean(0)
    le = landmarks[2:4].mean(0)
    axis = re - le
    dist = float(np.linalg.norm(axis))
    if dist < 1e-6:
        return float("inf"), 0.0
    mid = (re + le) / 2
    yaw = float(np.dot(landmarks[4] - mid, axis / dist) / dist)
    roll = math.degrees(math.atan2(axis[1], axis[0]))
    return yaw, roll


def similarity_to(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform (rotation, uniform scale, shift) that maps src points onto
    dst points in the least-squares sense (Umeyama without reflection)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[1, 1] = -1
    R = U @ D @ Vt
    scale = float(np.trace(np.diag(S) @ D) / max((s ** 2).sum() / len(src), 1e-12))
    t = mu_d - scale * R @ mu_s
    return np.hstack([scale * R, t[:, None]])


def align(arr: np.ndarray, landmarks: np.ndarray, size: int = WORK_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """Warp (H, W, 3) uint8 so the landmarks land on MEAN_LANDMARKS * size; returns
    ((3, size, size) float in [0, 1], the landmarks in the output)."""
    from PIL import Image

    from ..recognition.identity import MEAN_LANDMARKS

    dst = np.asarray(MEAN_LANDMARKS, dtype=np.float64) * size
    A = similarity_to(landmarks, dst)  # photo -> output
    M = np.vstack([A, [0, 0, 1]])
    inv = np.linalg.inv(M)[:2]  # output -> photo, what PIL wants
    img = Image.fromarray(arr)
    # supersample when shrinking a lot, so the warp does not alias
    scale = math.sqrt(abs(np.linalg.det(A[:, :2])))
    out = img.transform((size, size), Image.Transform.AFFINE, tuple(inv.reshape(-1)), resample=Image.Resampling.BICUBIC,
                        fillcolor=(255, 255, 255)) if scale >= 0.5 else _supersampled(img, inv, size)
    x = torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    moved = (A[:, :2] @ landmarks.T).T + A[:, 2]
    return x.clamp(0, 1), moved


def _supersampled(img, inv, size):
    from PIL import Image

    big = 4 * size
    S = np.diag([0.25, 0.25, 1.0])
    inv_big = (np.vstack([inv, [0, 0, 1]]) @ S)[:2]
    out = img.transform((big, big), Image.Transform.AFFINE, tuple(inv_big.reshape(-1)),
                        resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    return out.resize((size, size), Image.Resampling.BOX)


def read_photo(path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file, with faceprint's photo checks (size guard before
    decoding, EXIF orientation, grey / CMYK / alpha to RGB)."""
    from ..data.folder import _decode_upright
    from ..errors import BadImageError

    path = Path(path)
    if not path.exists():
        raise InputError(f"--photo {str(path)!r} does not exist; give the path of a photo of the person")
    if not path.is_file():
        raise InputError(f"--photo {str(path)!r} is not a regular file; give the path of a photo (JPEG, PNG, WebP)")
    try:
        arr = _decode_upright(path, MAX_PIXELS, 16)
    except BadImageError as e:
        raise InputError(f"--photo {str(path)!r}: {e.reason}; give a readable photo (JPEG, PNG, WebP)") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, dtype=np.float64) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def find_reference(photo, finder: FaceFinder, *, min_face: int = MIN_FACE, max_yaw: float = MAX_YAW,
                   max_roll: float = MAX_ROLL, name: str | None = None) -> Reference:
    """Check and align one reference photo (a path, or an (H, W, 3) uint8 array).

    Raises InputError naming the photo, what is wrong with it and what to do instead."""
    from ..io import sha256_bytes, sha256_file

    if isinstance(photo, np.ndarray):
        arr = np.ascontiguousarray(photo[..., :3].astype(np.uint8))
        label = name or "reference image"
        digest = sha256_bytes(arr.tobytes())
        shown = label
    else:
        path = Path(photo)
        arr = read_photo(path)
        digest = sha256_file(path)
        label = name or path.name
        shown = f"--photo {str(path)!r}"
    rects = finder.detect(arr)
    if not rects:
        raise InputError(f"{shown}: no face found (dlib's frontal face detector); give a photo with one frontal, "
                         f"well-lit face at least {min_face} px wide")
    if len(rects) > 1:
        sizes = ", ".join(f"{r.width()} px" for r in rects)
        raise InputError(f"{shown}: {len(rects)} faces found ({sizes}); personalisation needs a photo of one person "
                         "alone: crop the photo to that person's face")
    r = rects[0]
    side = float(max(r.width(), r.height()))
    if side < min_face:
        raise InputError(f"{shown}: the face is {side:.0f} px wide, below the {min_face} px minimum; give a larger or "
                         "closer photo of the face")
    lm = finder.landmarks(arr, r)
    yaw, roll = pose_of(lm)
    if not abs(yaw) <= max_yaw:
        raise InputError(f"{shown}: the face is turned too far from frontal (nose offset {yaw:+.2f} eye distances, "
                         f"limit {max_yaw}); give a photo facing the camera")
    if abs(roll) > max_roll:
        raise InputError(f"{shown}: the head is tilted by {roll:.0f} degrees (limit {max_roll:.0f}); give an upright "
                         "photo")
    image, moved = align(arr, lm)
    return Reference(image=image, sha256=digest, name=label, face_px=side, yaw=yaw, roll=roll, landmarks=moved)


__all__ = ["FaceFinder", "Reference", "align", "find_reference", "pose_of", "read_photo", "similarity_to"]
