"""Reading a folder of face photos for a generator: decode, centre square crop, resize.

Every photo goes through one fixed recipe, named by :func:`preprocessing_id` so that cached
latents and artifact provenance can refer to it:

1. refuse empty files, non-images, and images whose *header* declares fewer than ``min_side``
   pixels on the short side or more than ``max_pixels`` pixels in all (checked before any pixel
   is decoded, so a decompression bomb costs nothing);
2. decode the first frame (animated GIF/WebP, multi-page TIFF); a truncated or corrupt file is
   refused (Pillow's ``LOAD_TRUNCATED_IMAGES`` is never enabled);
3. apply the EXIF orientation, so a rotated phone photo comes out upright;
4. convert to RGB: grey levels are replicated, CMYK goes through its embedded ICC profile when
   it has a usable one (else Pillow's ink formula), 16-bit grey is scaled from 0..65535 exactly,
   and transparent pixels are composited over **white**;
5. take the centred square of side min(W, H), resize it to ``size`` x ``size`` with Pillow's
   bicubic filter (which widens its support when shrinking, i.e. it is antialiased);
6. return float32 values in [0, 1], shape (3, size, size).

No mode is "fixed" silently: a mode without a known intensity scale (32-bit integers outside
0..65535, floats outside [0, 1], CIE Lab) is refused with its reason.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import BadImageError, DataError, InputError, SkippedImageWarning

__all__ = [
    "ALLOWED_SIZES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "IMAGE_EXTENSIONS",
    "LOADER_VERSION",
    "FaceBatch",
    "FaceFolder",
    "load_image",
    "preprocessing_id",
]

#: Bumped whenever the recipe above changes the pixels it produces (invalidates cached latents).
LOADER_VERSION = 1
ALLOWED_SIZES = (64, 128, 256)
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 16
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# Pillow plugins we let parse the files. Phones' multi-picture JPEGs (MPO) come through the JPEG
# opener ("MPO" itself is not an opener name: Image.open(formats=[..., "MPO"]) raises KeyError).
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF")
_RESAMPLE = Image.Resampling.BICUBIC
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def preprocessing_id(size: int) -> str:
    """The name of the preprocessing recipe at ``size`` (part of cache keys and data hashes)."""
    _check_size(size)
    return f"faceprint.load/v{LOADER_VERSION}:size={size}:crop=center-square:resample=bicubic:alpha=white"


# --------------------------------------------------------------------------------------------
# argument checks


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size not in ALLOWED_SIZES:
        raise InputError(
            f"size must be one of {', '.join(map(str, ALLOWED_SIZES))}, got {size!r}; "
            "128 is the working resolution (32x16x16 latents)"
        )
    return size


def _check_positive_int(value, name: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}; pass e.g. {name}={example}")
    return value


# --------------------------------------------------------------------------------------------
# one image

_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(path: Path) -> str:
    """A reason for a file Pillow could not identify, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"cannot read file ({e.strerror or e})"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "truncated or corrupt WebP header"
    for sig, fmt in _SIGNATURES:
        if head.startswith(sig):
            return f"truncated or corrupt {fmt} header"
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        return (
            f"unsupported format (ISO media, brand {brand!r}: HEIC/AVIF?); "
            "convert it to JPEG or PNG"
        )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
        snippet = text.strip().splitlines()[0][:30]
        return f"not an image: the file holds text (starts with {snippet!r})"
    return (
        "not an image in a supported format (JPEG, PNG, WebP, BMP, TIFF, GIF); "
        f"first bytes {head[:8].hex(' ')}"
    )


def _open_checked(path: Path, max_pixels: int, min_side: int) -> Image.Image:
    """Open lazily (header only), check size limits, then decode the first frame."""
    try:
        st = path.stat()
    except OSError as e:
        raise BadImageError(path, f"cannot read file ({e.strerror or e})") from None
    if not path.is_file():
        raise BadImageError(path, "not a regular file")
    if st.st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        im = Image.open(path, formats=_FORMATS)
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = int(m.group(1)) if m else None
        if n is not None and n > max_pixels:
            limit = f"max_pixels={max_pixels:,}"
        else:  # the caller allowed more than Pillow ever opens (2 * PIL.Image.MAX_IMAGE_PIXELS)
            limit = f"Pillow's hard limit (2 * PIL.Image.MAX_IMAGE_PIXELS = {2 * (Image.MAX_IMAGE_PIXELS or 0):,})"
        declared = f"{n:,} pixels" if n is not None else "too many pixels"
        raise BadImageError(
            path,
            f"too large: the header declares {declared}, above {limit} "
            "(decompression-bomb guard; checked before decoding); downscale the photo first",
        ) from None
    except UnidentifiedImageError:
        raise BadImageError(path, _sniff(path)) from None
    except Exception as e:  # noqa: BLE001 - Pillow's header parsers raise many types
        raise BadImageError(path, f"{_sniff(path)} ({type(e).__name__}: {e})") from None
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise BadImageError(
                path,
                f"too large: {w}x{h} = {w * h:,} pixels, above max_pixels={max_pixels:,} "
                "(decompression-bomb guard; checked before decoding); downscale the photo or raise max_pixels",
            )
        if min(w, h) < min_side:
            raise BadImageError(path, f"too small: {w}x{h}; the short side must be at least {min_side} px")
        try:
            im.load()  # the first frame only
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
            msg = str(e)
            if "truncated" in msg.lower():
                reason = f"truncated file ({msg})"
            else:
                reason = f"corrupt image data ({type(e).__name__}: {msg})"
            raise BadImageError(path, reason) from None
    except BaseException:
        im.close()
        raise
    return im


def _decode_upright(path: Path, max_pixels: int, min_side: int) -> np.ndarray:
    """Open, check, decode, apply the EXIF orientation and convert (see :func:`_to_array`).

    Pillow's warnings meanwhile are caught: a corrupt-EXIF warning (Pillow emits it at open or
    at getexif) makes the photo refused, since its orientation is then unknown; Pillow's
    DecompressionBombWarning is dropped (our ``max_pixels`` check is the one that applies);
    any other warning is passed on. ``warnings.catch_warnings`` is process-wide state: decode
    from one thread at a time (processes are fine).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = _open_checked(path, max_pixels, min_side)
        try:
            try:
                up = ImageOps.exif_transpose(im)
            except Exception as e:  # noqa: BLE001
                raise BadImageError(
                    path, f"corrupt EXIF metadata ({type(e).__name__}: {e}); its orientation is unknown"
                ) from None
            exif_bad = [str(w.message).strip() for w in caught if "exif" in str(w.message).lower()]
            if exif_bad:
                raise BadImageError(
                    path,
                    f"corrupt EXIF metadata ({exif_bad[0]}); its orientation is unknown: strip or repair the EXIF block",
                )
            arr = _to_array(path, up if up is not None else im)
        finally:
            im.close()
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return arr


def _composite_white_u8(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8, straight alpha over a white background, rounded."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(
                im, src, dst, renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB"
            )
            if out is not None and out.mode == "RGB":
                return out
        except Exception:  # noqa: BLE001 - unusable profile: documented fallback below
            pass
    return im.convert("RGB")


def _to_array(path: Path, im: Image.Image) -> np.ndarray:
    """Decoded image -> (H, W, 3) uint8, or (H, W) / (H, W, 3) float32 in [0, 1] for >8-bit data."""
    mode = im.mode
    if mode in _MODES_16 or mode == "I":
        raw = np.asarray(im)
        if mode == "I":
            lo, hi = int(raw.min()), int(raw.max())
            if lo < 0 or hi > 65535:
                raise BadImageError(
                    path,
                    f"32-bit integer image with values {lo}..{hi}: no known intensity scale "
                    "(0..65535 is read as 16-bit); save it as 8- or 16-bit",
                )
        grey = raw.astype(np.float32) / 65535.0
        trns = im.info.get("transparency")
        if isinstance(trns, int):
            grey = np.where(raw == trns, np.float32(1.0), grey)  # transparent -> white
        return grey
    if mode == "F":
        raw = np.asarray(im, dtype=np.float32)
        if not np.isfinite(raw).all():
            raise BadImageError(path, "floating-point image holds NaN or infinite values")
        lo, hi = float(raw.min()), float(raw.max())
        if lo < 0.0 or hi > 1.0:
            raise BadImageError(
                path,
                f"floating-point image with values {lo:g}..{hi:g}: no known intensity scale "
                "(only [0, 1] is accepted); save it as 8- or 16-bit",
            )
        return raw.copy()
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(im))
    if mode in ("LAB", "HSV") or mode not in Image.MODES:
        raise BadImageError(path, f"colour mode {mode} is not supported; save the photo as sRGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        try:
            rgba = im.convert("RGBA")
        except ValueError as e:
            raise BadImageError(path, f"cannot convert mode {mode} to RGB ({e})") from None
        return _composite_white_u8(np.asarray(rgba))
    try:
        return np.asarray(im.convert("RGB"))
    except ValueError as e:
        raise BadImageError(path, f"cannot convert mode {mode} to RGB ({e})") from None


def _crop_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, resize to (size, size); -> (3, size, size) float32 in [0, 1].

    Numpy only: per-image torch ops are slow when torch's thread pool is busy.
    """
    h, w = arr.shape[:2]
    s = min(h, w)
    left, top = (w - s) // 2, (h - s) // 2
    box = (left, top, left + s, top + s)
    if arr.dtype == np.uint8:
        out = np.asarray(Image.fromarray(arr, "RGB").resize((size, size), _RESAMPLE, box=box))
        chw = out.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    else:
        planes = [arr] if arr.ndim == 2 else [arr[..., c] for c in range(arr.shape[2])]
        res = [
            np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32), "F").resize((size, size), _RESAMPLE, box=box))
            for p in planes
        ]
        chw = np.clip(np.stack(res * 3 if len(res) == 1 else res, axis=0), 0.0, 1.0)
    return np.ascontiguousarray(chw, dtype=np.float32)


def _load(path: Path, size: int, max_pixels: int, min_side: int) -> np.ndarray:
    return _crop_resize(_decode_upright(path, max_pixels, min_side), size)


def load_image(
    path, size: int = 128, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> torch.Tensor:
    """Read one photo as a (3, size, size) float32 tensor in [0, 1].

    Parameters
    ----------
    path : str or Path
        A JPEG, PNG, WebP, BMP, TIFF or GIF file (the format is read from the content, not the
        extension). Animated or multi-page files give their first frame.
    size : {64, 128, 256}
        Output side. The centred square of side min(W, H) is resized to it with Pillow's
        bicubic filter (antialiased when shrinking).
    max_pixels : int
        Refuse images whose header declares more than this many pixels (W * H), before
        decoding them. Pillow's own hard limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``) still
        applies above this; it is read, never changed.
    min_side : int
        Refuse images whose short side is below this many pixels.

    Returns
    -------
    torch.Tensor
        (3, size, size) float32 in [0, 1], RGB.

    Notes
    -----
    EXIF orientation is applied. Grey (1, L, I;16) is replicated to RGB; 16-bit grey is scaled
    0..65535 -> 0..1 in numpy (Pillow's convert would clip it). Pillow opens 16-bit RGB(A)
    PNGs as 8-bit RGB(A) (high byte), so those come out with 8-bit precision. Mode ``I`` is
    read as 16-bit when its values lie in 0..65535, mode ``F`` when they lie in [0, 1];
    otherwise the file is refused. Transparency (alpha channels, palette or tRNS colour keys)
    is composited over **white**. CMYK uses its embedded ICC profile if usable, else Pillow's
    CMYK -> RGB formula (the same as having no profile). ICC profiles of RGB images are
    ignored: RGB values are taken as sRGB.

    Raises
    ------
    BadImageError
        With ``.path`` and ``.reason`` (empty, not an image, truncated, corrupt, too large, too
        small, corrupt EXIF, unsupported mode).
    InputError
        For an invalid ``size``, ``max_pixels`` or ``min_side``.
    """
    _check_size(size)
    _check_positive_int(max_pixels, "max_pixels", "40_000_000")
    _check_positive_int(min_side, "min_side", "16")
    return torch.from_numpy(_load(Path(path), size, max_pixels, min_side))


# --------------------------------------------------------------------------------------------
# a folder


@dataclass
class FaceBatch:
    """One batch from :meth:`FaceFolder.iter_batches`.

    ``images`` is (B, 3, S, S); ``relpaths`` and ``indices`` (positions in the folder's file
    list) name its B photos; ``skipped`` lists the (relpath, reason) of files refused since the
    previous batch (files refused after the last good one are reported with the last batch).
    """

    images: torch.Tensor
    relpaths: list[str]
    indices: list[int]
    skipped: list[tuple[str, str]]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _not_regular(path: str) -> str | None:
    """None for a regular file (or a symlink to one); else why it is not read."""
    import stat

    try:
        st = os.stat(path)  # follows symlinks; never blocks, even on a FIFO
    except OSError as e:
        return f"cannot read file ({e.strerror or e})" + (" (dangling symlink)" if os.path.islink(path) else "")
    if stat.S_ISREG(st.st_mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
            else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file")
    return f"special file: {kind}, not a photo (never opened, reading it could block or never end)"


class FaceFolder:
    """A folder of face photos, found recursively and sorted by relative path.

    Parameters
    ----------
    root : str or Path
        The folder. Files with extensions .jpg .jpeg .png .webp .bmp .tif .tiff .gif (any case)
        are found in it and its sub-folders; names starting with "." (hidden files and folders)
        are ignored; symbolic links to folders are not followed.
    size : {64, 128, 256}
        Output side of every photo (see :func:`load_image`).
    labels : LabelTable, str, Path or None
        A label table (or the path of its CSV) joined to the photos by relative path or file
        name (see :meth:`LabelTable.match`); every photo must have a row.
    strict : bool
        If True, the first unreadable photo raises :class:`BadImageError`; otherwise it is
        skipped with a :class:`SkippedImageWarning` and reported.
    limit : int or None
        Keep only the first ``limit`` files in relative-path order (before any is decoded, so a
        bad file among them leaves fewer photos; the choice never depends on file contents).
    max_pixels, min_side : int
        Size limits per photo (see :func:`load_image`).

    Raises
    ------
    DataError
        If the folder does not exist, is a file, or holds no image files.
    """

    def __init__(
        self,
        root,
        *,
        size: int = 128,
        labels=None,
        strict: bool = False,
        limit: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ):
        self.size = _check_size(size)
        self.max_pixels = _check_positive_int(max_pixels, "max_pixels", "40_000_000")
        self.min_side = _check_positive_int(min_side, "min_side", "16")
        if not isinstance(strict, bool):
            raise InputError(f"strict must be True or False, got {strict!r}")
        if limit is not None:
            _check_positive_int(limit, "limit", "1024")
        self.strict = strict
        self.limit = limit
        if not isinstance(root, (str, os.PathLike)):
            raise InputError(f"root must be a folder path (str or Path), got {type(root).__name__} {root!r}")
        given = Path(root).expanduser()
        if not given.exists():
            raise DataError(f"photo folder {str(given)!r} does not exist; check the path (it is read recursively)")
        if not given.is_dir():
            raise DataError(
                f"photo folder {str(given)!r} is a file, not a folder; pass the folder that holds the photos "
                "(use faceprint.data.load_image for one photo)"
            )
        self.root = given.resolve()
        relpaths, n_other = self._discover()
        if not relpaths:
            special = f", of which {len(self.special)} special files skipped" if self.special else ""
            raise DataError(
                f"photo folder {str(self.root)!r} holds no image files ({n_other} other files seen{special}; looked "
                f"recursively for {' '.join(sorted(IMAGE_EXTENSIONS))}, ignoring hidden files and folders); "
                "point to the folder that contains the photos"
            )
        self.n_found = len(relpaths)
        if limit is not None:
            relpaths = relpaths[:limit]
        self.relpaths: list[str] = relpaths
        self.paths: list[Path] = [self.root.joinpath(*r.split("/")) for r in relpaths]
        self.label_table = None
        self._label_rows = None
        if labels is not None:
            from .labels import LabelTable, read_labels

            table = labels if isinstance(labels, LabelTable) else read_labels(labels)
            self._label_rows = table.match(self.relpaths, root=str(self.root))
            self.label_table = table

    def _discover(self) -> tuple[list[str], int]:
        """Image files under the root, sorted. Special files with an image extension (FIFOs,
        devices, sockets, also behind a symlink) and dangling symlinks are never opened (a
        FIFO would block the read forever, /dev/zero never ends): they are listed in
        :attr:`special` with the reason and reported as skipped (an error if ``strict``)."""
        found: list[str] = []
        special: list[tuple[str, str]] = []
        n_other = 0

        def fail(err: OSError):
            raise DataError(
                f"cannot list folder {err.filename!r} inside {str(self.root)!r} ({err.strerror or err}); "
                "fix its permissions or move it out"
            )

        for dirpath, dirnames, filenames in os.walk(self.root, onerror=fail, followlinks=False):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            rel_dir = PurePath(os.path.relpath(dirpath, self.root))
            for name in filenames:
                if _is_hidden(name):
                    continue
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    rel = (rel_dir / name).as_posix() if str(rel_dir) != "." else name
                    reason = _not_regular(os.path.join(dirpath, name))
                    if reason is None:
                        found.append(rel)
                    else:
                        special.append((rel, reason))
                else:
                    n_other += 1
        found.sort()
        special.sort()
        self.special = special
        for rel, reason in special:
            if self.strict:
                raise BadImageError(self.root / rel, reason)
            warnings.warn(SkippedImageWarning(f"skipped photo {rel!r} in {str(self.root)!r}: {reason}"), stacklevel=3)
        return found, n_other + len(special)

    # ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.relpaths)

    def __repr__(self) -> str:
        return f"FaceFolder({str(self.root)!r}, size={self.size}, files={len(self)}, strict={self.strict})"

    @property
    def preprocessing_id(self) -> str:
        return preprocessing_id(self.size)

    @property
    def labels(self) -> dict[str, list[str]] | None:
        """column -> values (strings) for every file in :attr:`relpaths`, or None without labels."""
        return None if self.label_table is None else self.labels_for(self.relpaths)

    def labels_for(self, relpaths: Sequence[str]) -> dict[str, list[str]] | None:
        """column -> values (strings) for the given relpaths of this folder, or None without labels."""
        if self.label_table is None:
            return None
        pos = {r: i for i, r in enumerate(self.relpaths)}
        try:
            rows = [self._label_rows[pos[r]] for r in relpaths]
        except KeyError as e:
            raise InputError(f"{e.args[0]!r} is not a file of {self!r}") from None
        return self.label_table.values_at(rows)

    def load_one(self, index: int) -> torch.Tensor:
        """The photo at position ``index`` of :attr:`paths`, as (3, S, S) float32 (may raise BadImageError)."""
        return torch.from_numpy(self._load_np(index))

    def _load_np(self, index: int) -> np.ndarray:
        return _load(self.paths[index], self.size, self.max_pixels, self.min_side)

    # ----------------------------------------------------------------------------------------
    def _decode_iter(
        self, indices: Sequence[int], batch_size: int, progress: bool, dtype: torch.dtype
    ) -> Iterator[FaceBatch]:
        """Decode ``indices`` in order and group the good ones in batches (no all-bad check)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), unit="img", desc="loading photos", disable=None if progress else True)
        imgs: list[np.ndarray] = []
        rels: list[str] = []
        idx: list[int] = []
        skipped: list[tuple[str, str]] = []
        try:
            for i in indices:
                try:
                    img = self._load_np(i)
                except BadImageError as e:
                    if self.strict:
                        raise
                    rel = self.relpaths[i]
                    skipped.append((rel, e.reason))
                    warnings.warn(
                        SkippedImageWarning(f"skipped photo {rel!r} in {str(self.root)!r}: {e.reason}"),
                        stacklevel=2,
                    )
                    bar.update(1)
                    continue
                bar.update(1)
                if len(imgs) == batch_size:
                    yield FaceBatch(_stack(imgs, dtype), rels, idx, skipped)
                    imgs, rels, idx, skipped = [], [], [], []
                imgs.append(img)
                rels.append(self.relpaths[i])
                idx.append(i)
            if imgs:
                yield FaceBatch(_stack(imgs, dtype), rels, idx, skipped)
            elif skipped:
                yield FaceBatch(torch.empty((0, 3, self.size, self.size), dtype=dtype), [], [], skipped)
        finally:
            bar.close()

    def _all_bad_error(self, seen: int, skipped: list[tuple[str, str]]) -> DataError:
        examples = "; ".join(f"{r}: {why}" for r, why in skipped[:3])
        return DataError(
            f"none of the {seen} image files in photo folder {str(self.root)!r} could be loaded "
            f"({len(skipped)} skipped; e.g. {examples}); check that they are JPEG/PNG/WebP/BMP/TIFF/GIF "
            f"photos with a short side of at least {self.min_side} px, or call "
            "faceprint.data.load_image on one to see its error"
        )

    def iter_batches(
        self, batch_size: int = 64, *, progress: bool = False, dtype: torch.dtype = torch.float32
    ) -> Iterator[FaceBatch]:
        """Yield :class:`FaceBatch` es of up to ``batch_size`` photos, in file order.

        Only one batch is in memory at a time. ``dtype`` torch.uint8 stores round(255 * x)
        (4x less memory; exact for 8-bit sources). Raises DataError at the end if no file at
        all could be loaded, BadImageError at the first bad file if ``strict``.
        """
        _check_positive_int(batch_size, "batch_size", "64")
        _check_dtype(dtype)
        n_good = 0
        all_skipped: list[tuple[str, str]] = []
        for batch in self._decode_iter(range(len(self)), batch_size, progress, dtype):
            n_good += len(batch.relpaths)
            all_skipped.extend(batch.skipped)
            if batch.relpaths:  # an empty batch only comes when every file was bad
                yield batch
        if n_good == 0:
            raise self._all_bad_error(len(self), all_skipped)

    def load(
        self, progress: bool = False, *, dtype: torch.dtype = torch.float32, batch_size: int = 256
    ) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
        """Decode every photo; return (images (N, 3, S, S), kept relpaths, skipped (relpath, reason)).

        ``images[k]`` equals ``load_image(root / kept[k], size)`` (times 255, rounded, for uint8).
        For large folders prefer :meth:`iter_batches` (30,000 photos at 128 px take 5.9 GB as
        float32, 1.5 GB as uint8).
        """
        imgs: list[torch.Tensor] = []
        kept: list[str] = []
        skipped: list[tuple[str, str]] = []
        for batch in self.iter_batches(batch_size, progress=progress, dtype=dtype):
            if batch.relpaths:
                imgs.append(batch.images)
            kept.extend(batch.relpaths)
            skipped.extend(batch.skipped)
        return torch.cat(imgs, 0), kept, skipped


def _check_dtype(dtype) -> None:
    if dtype not in (torch.float32, torch.uint8):
        raise InputError(f"dtype must be torch.float32 or torch.uint8, got {dtype!r}")


def _stack(imgs: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    x = np.stack(imgs, 0)  # (B, 3, S, S) float32
    if dtype == torch.uint8:
        x = np.rint(x * np.float32(255.0)).astype(np.uint8)
    return torch.from_numpy(x)
