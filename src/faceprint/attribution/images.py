"""Reading an image for attribution, refusing what would make the answer meaningless.

The traces a source leaves are fine pixel statistics (papers/004, Sec. 4.4.3); any conversion
(grey, CMYK, compositing transparency, resampling) changes them. So :func:`read_image` never
converts silently: each case is refused with the file, the problem and what to do, unless the
caller allows it (``resize=True`` / ``convert=True``), in which case the image is converted and
a note says that the measured error rates do not hold for it (papers/004 Sec. 5.5 of the seed
notes: "resize with a warning and report lower confidence, never silently").
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

SIZE = 128
MIN_SIDE = 32  # below this there is too little of the image to read any trace
MAX_PIXELS = 40_000_000
LOWER_CONFIDENCE = "the classifier's measured error rates do not hold for it: treat the answer as weaker evidence"


def _bad(path, problem: str, todo: str) -> InputError:
    return InputError(f"image {str(path)!r}: {problem}; {todo}")


def read_image(path, *, resize: bool = False, convert: bool = False) -> tuple[torch.Tensor, list[str]]:
    """One image file -> ((3, 128, 128) float32 in [0, 1], notes).

    Parameters
    ----------
    path : str or Path
        PNG, JPEG, WebP, ... (read by Pillow from its content).
    resize : bool
        Accept an image that is not 128 x 128: centre square crop, bicubic resize to 128, and
        a note. Otherwise such an image is refused.
    convert : bool
        Accept grey, CMYK, palette or partly transparent images: convert to RGB (transparency
        over white) with a note. Otherwise they are refused. A fully opaque alpha channel is
        dropped without a refusal (no pixel changes), with a note.

    Raises
    ------
    InputError
        Unreadable, not an image, special file, too small, too large, or a refused mode/size.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..io import open_regular

    notes: list[str] = []
    try:
        fd = open_regular(path, "image")
    except OSError as e:
        raise _bad(path, f"cannot be read ({e})", "check the path and that it is a regular image file") from None
    import os

    try:
        with os.fdopen(fd, "rb") as f:
            try:
                im = Image.open(f)
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise _bad(path, f"is {w}x{h} px, over {MAX_PIXELS:,} pixels", "pass the 128x128 image a model produced")
                im.load()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise _bad(path, f"is not a readable image ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                           "pass a PNG or JPEG file (a truncated or corrupt file cannot be attributed)") from None
    except InputError:
        raise
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"{im.n_frames} frames: the first is read")
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"EXIF orientation {orientation} applied (a lossless rotation/flip)")
    w, h = im.size
    if min(w, h) < MIN_SIDE:
        raise _bad(path, f"is {w}x{h} px, too small to carry a source's traces (at least {MIN_SIDE} px a side; "
                         f"the classifier reads {SIZE}x{SIZE} faces)", "pass the full-size image")
    mode = im.mode
    transparent = mode in ("RGBA", "LA", "PA") or (mode in ("P", "RGB", "L") and "transparency" in im.info)
    rgba = im.convert("RGBA") if transparent else None
    alpha = np.asarray(rgba)[..., 3] if transparent else None
    if transparent and alpha.min() == 255:
        transparent = False
        if mode == "RGBA" or mode == "RGB":
            im = rgba.convert("RGB")
            mode = "RGB"
            notes.append("alpha channel fully opaque: dropped (no pixel changed)")
        else:
            im = im.convert({"LA": "L", "PA": "P"}.get(mode, mode)) if mode in ("LA", "PA") else im
            mode = im.mode
    if transparent:
        if not convert:
            raise _bad(path, f"has transparency (mode {mode}, {int((alpha < 255).sum())} pixels not opaque); "
                             "faceprint faces are opaque RGB, so it was edited after generation",
                       "pass the original image, or allow conversion (--allow-convert: composited over white, "
                       "answer marked as weaker evidence)")
        else:
            a = alpha[..., None].astype(np.float32) / 255.0
            rgb = np.asarray(rgba)[..., :3].astype(np.float32)
            im = Image.fromarray(np.round(rgb * a + 255.0 * (1 - a)).astype(np.uint8), "RGB")
            notes.append(f"transparency (mode {mode}) composited over white; " + LOWER_CONFIDENCE)
    elif mode != "RGB":
        kinds = {"L": "greyscale", "1": "black and white", "I": "32-bit greyscale", "I;16": "16-bit greyscale",
                 "F": "floating-point greyscale", "CMYK": "CMYK", "P": "palette (at most 256 colours)",
                 "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}
        what = kinds.get(mode, f"mode {mode}")
        if not convert:
            raise _bad(path, f"is {what}, not RGB; faceprint faces are RGB, so it was converted after generation "
                             "and the colour traces the classifier reads are gone",
                       "pass the original RGB image, or allow conversion (--allow-convert: answer marked as weaker "
                       "evidence)")
        if mode.startswith("I") or mode == "F":
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if arr.max() > 255 else 255.0
            im = Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), "L")
        im = im.convert("RGB")
        notes.append(f"{what} converted to RGB; " + LOWER_CONFIDENCE)
    if (w, h) != (SIZE, SIZE):
        if not resize:
            raise _bad(path, f"is {w}x{h} px, not {SIZE}x{SIZE}; resizing changes the high-frequency traces the "
                             "classifier reads", f"pass the {SIZE}x{SIZE} image as generated, or allow resizing "
                                                 "(--allow-resize: centre crop and resize, answer marked as weaker "
                                                 "evidence)")
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        notes.append(f"resized from {w}x{h} (centre square, bicubic); " + LOWER_CONFIDENCE)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0), notes
