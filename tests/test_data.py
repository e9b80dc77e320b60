"""Data stage: image decoding edge cases, folders, label tables, the latent cache, LatentSet.

Bad files are generated into tmp_path; real photos are read from ../shared/datasets at run time
(and copied only into tmp_path when a test has to modify one). Nothing derived from the real
photos is written into the repository.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceprint.data import (
    CacheKey,
    CacheWarning,
    FaceFolder,
    LatentCache,
    LatentSet,
    default_cache_dir,
    encode_files,
    encode_folder,
    load_image,
    preprocessing_id,
    read_labels,
    to_numeric,
)
from faceprint.errors import BadImageError, DataError, InputError, SkippedImageWarning

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if not DATASETS.is_dir():
    DATASETS = Path("/work/shared/datasets")
CELEBA = DATASETS / "celeba-10k"
UTK = DATASETS / "utkface"
CELEBA_ID = DATASETS / "celeba-id"
needs_celeba = pytest.mark.skipif(not (CELEBA / "images").is_dir(), reason="../shared/datasets/celeba-10k not present")
needs_utk = pytest.mark.skipif(not (UTK / "labels.csv").is_file(), reason="../shared/datasets/utkface not present")
needs_celeba_id = pytest.mark.skipif(not (CELEBA_ID / "identities.csv").is_file(), reason="../shared/datasets/celeba-id not present")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test may touch the user's real cache folder."""
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "default-cache"))


# ---------------------------------------------------------------------------------------------
# file makers


def _png_bytes(w, h, bit_depth, colour_type, raw=b"", extra_chunks=b"") -> bytes:
    """A PNG built by hand (header only is fine: the header is all a size check may read)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra_chunks + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _smooth(h=64, w=64, seed=0) -> np.ndarray:
    """(h, w, 3) uint8 smooth colour image with no two equal rows/columns."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 40 + 170 * x / (w - 1)
    g = 30 + 180 * y / (h - 1)
    b = 128 + 60 * np.sin((x + 2 * y) / 9.0 + seed)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)


def _reason(path, **kw) -> str:
    with pytest.raises(BadImageError) as ei:
        load_image(path, 64, **kw)
    assert ei.value.path == str(path)
    assert str(path) in str(ei.value)
    return ei.value.reason


# ---------------------------------------------------------------------------------------------
# load_image: real photos and arguments


@needs_celeba
@pytest.mark.parametrize("size", [64, 128, 256])
def test_real_celeba_photo_loads_at_each_size(size):
    x = load_image(CELEBA / "images" / "000001.jpg", size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x.std() > 0.05  # a photo, not a flat colour
    # 89x109 -> centre 89x89 square: rows 10..98; the crop is taken before resizing.
    with Image.open(CELEBA / "images" / "000001.jpg") as im:
        assert im.size == (89, 109)
        ref = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, box=(0, 10, 89, 99)))
    assert torch.allclose(x, _as_tensor(ref), atol=1e-6)


@pytest.mark.parametrize("bad", [100, 0, "128", 128.0, True, None])
def test_size_must_be_64_128_or_256(tmp_path, bad):
    p = tmp_path / "a.png"
    Image.fromarray(_smooth()).save(p)
    with pytest.raises(InputError, match="size must be one of 64, 128, 256"):
        load_image(p, bad)


def test_limits_must_be_positive_ints(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(_smooth()).save(p)
    with pytest.raises(InputError, match="max_pixels"):
        load_image(p, 64, max_pixels=0)
    with pytest.raises(InputError, match="min_side"):
        load_image(p, 64, min_side=-1)


# ---------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize(
    "ext,kw",
    [(".png", {}), (".bmp", {}), (".tif", {}), (".tiff", {"compression": "tiff_lzw"}), (".webp", {"lossless": True})],
)
def test_lossless_formats_come_back_exactly(tmp_path, ext, kw):
    arr = _smooth()
    p = tmp_path / f"a{ext}"
    Image.fromarray(arr).save(p, **kw)
    x = load_image(p, 64)  # 64x64 at size 64: no resampling
    assert torch.equal(x, _as_tensor(arr))


def test_jpeg_and_webp_lossy_are_close(tmp_path):
    arr = _smooth()
    for name, kw in [("a.jpg", {"quality": 95}), ("a.webp", {"quality": 95})]:
        Image.fromarray(arr).save(tmp_path / name, **kw)
        x = load_image(tmp_path / name, 64)
        assert (x - _as_tensor(arr)).abs().mean() < 0.02, name


def test_extension_does_not_decide_the_format(tmp_path):
    arr = _smooth()
    p = tmp_path / "really_a_png.jpg"
    Image.fromarray(arr).save(p, format="PNG")
    assert torch.equal(load_image(p, 64), _as_tensor(arr))


def test_gif_and_animated_files_give_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for name, kw in [("anim.gif", {}), ("anim.webp", {"lossless": True})]:
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
        with Image.open(tmp_path / name) as im:
            assert im.n_frames == 3
        x = load_image(tmp_path / name, 64)
        assert torch.allclose(x, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 64, 64), atol=2 / 255), name


def test_multipage_tiff_gives_the_first_page(tmp_path):
    pages = [Image.new("RGB", (32, 32), c) for c in [(0, 0, 255), (255, 255, 0)]]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    x = load_image(tmp_path / "pages.tif", 64)
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# broken files


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert "empty file (0 bytes)" in _reason(p)


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is a shopping list, not a face\n")
    r = _reason(p)
    assert "not an image" in r and "text" in r


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.png"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "not an image in a supported format" in _reason(p)


def test_unsupported_format_is_refused_even_if_pillow_reads_it(tmp_path):
    p = tmp_path / "face.jpg"
    Image.fromarray(_smooth()).save(p, format="PPM")  # Pillow opens PPM; we do not
    assert "not an image" in _reason(p)


@pytest.mark.parametrize("fmt,ext", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_files_are_reported_not_padded(tmp_path, fmt, ext):
    full = tmp_path / f"full{ext}"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(full, format=fmt)
    data = full.read_bytes()
    half = tmp_path / f"half{ext}"
    half.write_bytes(data[: len(data) // 2])
    assert "truncated" in _reason(half)
    head = tmp_path / f"head{ext}"
    head.write_bytes(data[:20])
    assert f"truncated or corrupt {fmt} header" in _reason(head)
    assert not getattr(__import__("PIL.ImageFile").ImageFile, "LOAD_TRUNCATED_IMAGES")


def test_corrupt_bytes_inside_a_png(tmp_path):
    p = tmp_path / "c.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(p)
    data = bytearray(p.read_bytes())
    data[500:900] = bytes(400)
    p.write_bytes(bytes(data))
    r = _reason(p)
    assert "corrupt" in r or "truncated" in r


def test_corrupt_jpeg_header(tmp_path):
    p = tmp_path / "c.jpg"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(p)
    data = bytearray(p.read_bytes())
    data[500:900] = bytes(400)
    p.write_bytes(bytes(data))
    with pytest.raises(BadImageError):
        load_image(p, 64)


def test_directory_named_like_an_image(tmp_path):
    d = tmp_path / "folder.jpg"
    d.mkdir()
    assert "not a regular file" in _reason(d)


# ---------------------------------------------------------------------------------------------
# size limits (checked on the header, before decoding)


def test_huge_header_is_refused_without_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_bytes(100_000, 100_000, 8, 2, b"\x00" * 16))  # 10 gigapixels declared, 100 bytes
    before = Image.MAX_IMAGE_PIXELS
    r = _reason(p)
    assert "too large" in r and "10,000,000,000" in r
    assert Image.MAX_IMAGE_PIXELS == before


def test_own_pixel_limit_applies_below_pillows(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(_png_bytes(10_000, 5_000, 8, 2, b"\x00" * 16))  # 50 MP: Pillow alone would try
    r = _reason(p)
    assert "too large" in r and "10000x5000" in r and "max_pixels=40,000,000" in r
    # With a higher limit the header passes, and the (missing) pixel data is then reported.
    assert "truncated" in _reason(p, max_pixels=60_000_000)
    assert "too large" in _reason(p, max_pixels=10_000_000)


@pytest.mark.parametrize("w,h", [(10, 10), (15, 300), (300, 8)])
def test_tiny_images_are_refused(tmp_path, w, h):
    p = tmp_path / "tiny.png"
    Image.new("RGB", (w, h), (9, 9, 9)).save(p)
    r = _reason(p)
    assert "too small" in r and f"{w}x{h}" in r and "16 px" in r


def test_smallest_allowed_image(tmp_path):
    p = tmp_path / "ok.png"
    Image.new("RGB", (16, 40), (200, 100, 50)).save(p)
    assert load_image(p, 64).shape == (3, 64, 64)


# ---------------------------------------------------------------------------------------------
# colour modes


def test_grayscale_is_replicated(tmp_path):
    g = _smooth()[..., 1]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", 64)
    ref = torch.from_numpy(g.astype(np.float32) / 255)
    for c in range(3):
        assert torch.equal(x[c], ref)


def test_bilevel_image(tmp_path):
    a = np.zeros((32, 32), bool)
    a[:, 16:] = True
    Image.fromarray(a).save(tmp_path / "b.png")
    x = load_image(tmp_path / "b.png", 64)
    assert x[:, :, 0].max() == 0 and x[:, :, -1].min() == 1


def test_la_composites_over_white(tmp_path):
    la = np.zeros((32, 32, 2), np.uint8)
    la[..., 0] = 40
    la[:, :16, 1] = 255  # left opaque, right fully transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    x = load_image(tmp_path / "la.png", 64)
    assert torch.allclose(x[:, :, :8], torch.full((3, 64, 8), 40 / 255), atol=1e-6)
    assert torch.allclose(x[:, :, -8:], torch.ones(3, 64, 8))


def test_rgba_composites_over_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:16, :, 3] = 255  # top: opaque red
    rgba[16:, :, 3] = 128  # bottom: half-transparent red over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png", 64)
    assert torch.allclose(x[:, 2, 32], torch.tensor([1.0, 0.0, 0.0]))
    half = (255 * 127 + 127) // 255 / 255  # 255 * (1 - 128/255), rounded
    assert torch.allclose(x[:, -2, 32], torch.tensor([1.0, half, half]), atol=1e-6)


def test_palette_with_transparent_index(tmp_path):
    p = Image.new("P", (32, 32), 0)
    p.putpalette([10, 20, 30, 200, 100, 50])
    p.paste(1, (16, 0, 32, 32))
    p.save(tmp_path / "p.png", transparency=0)
    p.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        x = load_image(tmp_path / name, 64)
        assert torch.allclose(x[:, 5, 5], torch.ones(3)), name  # transparent index -> white
        assert torch.allclose(x[:, 5, -5], torch.tensor([200, 100, 50]) / 255.0), name


def test_palette_with_alpha_palette_and_colour_keys(tmp_path):
    p = Image.new("P", (32, 32), 0)
    p.putpalette([255, 0, 0, 128], "RGBA")
    p.save(tmp_path / "pa.png")
    x = load_image(tmp_path / "pa.png", 64)
    half = (255 * 127 + 127) // 255 / 255
    assert torch.allclose(x[:, 3, 3], torch.tensor([1.0, half, half]), atol=1e-6)
    # RGB and L with a tRNS colour key: that colour is transparent
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "key.png", transparency=(1, 2, 3))
    assert torch.equal(load_image(tmp_path / "key.png", 64), torch.ones(3, 64, 64))
    Image.new("L", (32, 32), 50).save(tmp_path / "lkey.png", transparency=50)
    assert torch.equal(load_image(tmp_path / "lkey.png", 64), torch.ones(3, 64, 64))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    c = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # pure cyan ink
    c.paste((0, 0, 0, 255), (16, 0, 32, 32))  # pure black ink
    c.save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    x = load_image(tmp_path / "cmyk.jpg", 64)
    assert torch.allclose(x[:, 32, 4], torch.tensor([0.0, 1.0, 1.0]), atol=0.03)
    assert torch.allclose(x[:, 32, -4], torch.zeros(3), atol=0.03)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    g16 = np.tile(ramp, (256, 1))
    Image.fromarray(g16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I;16")
    x = load_image(tmp_path / "g16.png", 256)  # same size: no resampling
    want = torch.from_numpy(ramp.astype(np.float32) / 65535)
    for c in range(3):
        assert torch.allclose(x[c, 100], want, atol=1e-6)
    assert 0.49 < x[0, 0, 128] < 0.51  # Pillow's convert("RGB") would give 1.0 here
    g16t = g16.copy()
    g16t[:, :128] = 777
    Image.fromarray(g16t).save(tmp_path / "g16t.png", transparency=777)  # tRNS grey key -> white
    xt = load_image(tmp_path / "g16t.png", 256)
    assert torch.equal(xt[:, :, :128], torch.ones(3, 256, 128)) and torch.allclose(xt[0, 5, 128:], want[128:], atol=1e-6)
    small = load_image(tmp_path / "g16.png", 64)
    row = small[0, 32]
    assert row[0] < 0.02 and row[-1] > 0.98 and bool((row[1:] >= row[:-1] - 1e-6).all())


def test_16bit_big_endian_grey_png_written_by_hand(tmp_path):
    w, h = 64, 32
    vals = (np.arange(w) * 1031).astype(">u2")  # up to 64953, big-endian as PNG stores it
    raw = b"".join(b"\x00" + vals.tobytes() for _ in range(h))
    (tmp_path / "be16.png").write_bytes(_png_bytes(w, h, 16, 0, raw))
    x = load_image(tmp_path / "be16.png", 64)
    # centre 32x32 square = columns 16..47, upsampled 2x; check its mean against the source
    assert abs(x[0].mean().item() - (np.arange(16, 48) * 1031).mean() / 65535) < 2e-3


def test_16bit_rgb_png_keeps_8bit_precision(tmp_path):
    # Pillow 13 opens 16-bit RGB PNGs as 8-bit RGB (high byte); values must still be right.
    w, h = 64, 64
    arr = np.zeros((h, w, 3), np.uint16)
    arr[..., 0] = np.linspace(0, 65535, w).round().astype(np.uint16)
    arr[..., 1] = 1000
    arr[..., 2] = 65535
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    (tmp_path / "rgb16.png").write_bytes(_png_bytes(w, h, 16, 2, raw))
    x = load_image(tmp_path / "rgb16.png", 64)
    want = torch.from_numpy(arr[0].astype(np.float32) / 65535).T  # (3, w)
    assert (x[:, 0, :] - want).abs().max() <= 1 / 255 + 1e-6


def test_32bit_int_and_float_modes(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.int32), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "i32.tif")
    with Image.open(tmp_path / "i32.tif") as im:
        assert im.mode == "I"
    x = load_image(tmp_path / "i32.tif", 64)
    assert torch.allclose(x[1, 7], torch.from_numpy(ramp[0] / 65535).float(), atol=1e-6)
    Image.fromarray(ramp * 10).save(tmp_path / "i32big.tif")
    assert "no known intensity scale" in _reason(tmp_path / "i32big.tif")

    f = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert torch.allclose(load_image(tmp_path / "f.tif", 64)[2, 3], torch.from_numpy(f[0]), atol=1e-6)
    Image.fromarray(f * 255).save(tmp_path / "f255.tif")
    assert "no known intensity scale" in _reason(tmp_path / "f255.tif")
    bad = f.copy()
    bad[0, 0] = np.nan
    Image.fromarray(bad).save(tmp_path / "fnan.tif")
    assert "NaN" in _reason(tmp_path / "fnan.tif")


# ---------------------------------------------------------------------------------------------
# EXIF orientation


def _upright() -> np.ndarray:
    """A tall 40x80 image: top half red, bottom half blue (what a viewer should show)."""
    a = np.zeros((80, 40, 3), np.uint8)
    a[:40] = (255, 0, 0)
    a[40:] = (0, 0, 255)
    return a


@pytest.mark.parametrize(
    "orientation,stored",
    [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180)],
)
def test_exif_orientation_makes_the_photo_upright(tmp_path, orientation, stored):
    sensor = Image.fromarray(_upright()).transpose(stored)  # how the camera wrote the pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    sensor.save(p, exif=exif, quality=95)
    x = load_image(p, 64)
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    # centre square of the upright image: top half red, bottom half blue
    assert torch.allclose(x[:, 8, 32], red, atol=0.05) and torch.allclose(x[:, 56, 32], blue, atol=0.05)
    assert torch.allclose(x[:, 8, 4], red, atol=0.05) and torch.allclose(x[:, 8, 60], red, atol=0.05)


def test_corrupt_exif_is_reported(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "badexif.jpg"
    Image.fromarray(_upright()).save(p, exif=exif)
    data = bytearray(p.read_bytes())
    i = data.find(b"Exif")
    data[i + 10 : i + 30] = b"\xff" * 20
    p.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks from Pillow
        assert "corrupt EXIF" in _reason(p)


# ---------------------------------------------------------------------------------------------
# FaceFolder


def _good(path: Path, seed=0, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_smooth(size[1], size[0], seed)).save(path)


def _mixed_folder(root: Path) -> Path:
    _good(root / "a.png", 0)
    _good(root / "B.JPG", 1)  # extension case does not matter
    _good(root / "sub" / "c.webp", 2)
    _good(root / "z.tiff", 3)
    (root / "bad_text.jpg").write_text("hello")
    (root / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(root / "sub" / "tiny.png")
    (root / ".hidden.jpg").write_text("ignored, hidden")
    (root / ".thumbs").mkdir()
    _good(root / ".thumbs" / "t.png")
    (root / "notes.txt").write_text("not a photo")
    return root


def test_folder_finds_sorts_and_skips_with_reasons(tmp_path):
    root = _mixed_folder(tmp_path / "photos")
    f = FaceFolder(root, size=64)
    assert f.relpaths == ["B.JPG", "a.png", "bad_text.jpg", "empty.png", "sub/c.webp", "sub/tiny.png", "z.tiff"]
    assert [p.name for p in f.paths] == ["B.JPG", "a.png", "bad_text.jpg", "empty.png", "c.webp", "tiny.png", "z.tiff"]
    with pytest.warns(SkippedImageWarning) as rec:
        images, kept, skipped = f.load()
    assert kept == ["B.JPG", "a.png", "sub/c.webp", "z.tiff"]
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
    assert [r for r, _ in skipped] == ["bad_text.jpg", "empty.png", "sub/tiny.png"]
    reasons = dict(skipped)
    assert "not an image" in reasons["bad_text.jpg"]
    assert "empty file" in reasons["empty.png"]
    assert "too small" in reasons["sub/tiny.png"]
    msgs = [str(w.message) for w in rec if issubclass(w.category, SkippedImageWarning)]
    assert len(msgs) == 3 and all(any(name in m for m in msgs) for name in ("bad_text.jpg", "empty.png", "sub/tiny.png"))
    for k, rel in enumerate(kept):
        assert torch.equal(images[k], load_image(root / rel, 64))


def test_strict_folder_raises_on_the_first_bad_file(tmp_path):
    root = _mixed_folder(tmp_path / "photos")
    with pytest.raises(BadImageError) as ei:
        FaceFolder(root, size=64, strict=True).load()
    assert ei.value.path == str((root / "bad_text.jpg").resolve())
    assert "bad_text.jpg" in str(ei.value)


def test_iter_batches_streams_and_reports_each_skip_once(tmp_path):
    root = _mixed_folder(tmp_path / "photos")
    f = FaceFolder(root, size=64)
    with pytest.warns(SkippedImageWarning):
        batches = list(f.iter_batches(batch_size=3, dtype=torch.uint8))
    assert [len(b.relpaths) for b in batches] == [3, 1]
    assert all(b.images.dtype == torch.uint8 for b in batches)
    assert sum((b.skipped for b in batches), []) == [
        ("bad_text.jpg", "not an image: the file holds text (starts with 'hello')"),
        ("empty.png", "empty file (0 bytes)"),
        ("sub/tiny.png", "too small: 8x8; the short side must be at least 16 px"),
    ]
    with pytest.warns(SkippedImageWarning):
        full, kept, _ = f.load()
    assert torch.equal(torch.cat([b.images for b in batches]), (full * 255).round().to(torch.uint8))
    assert [r for b in batches for r in b.relpaths] == kept


def test_limit_takes_the_first_files_in_name_order(tmp_path):
    root = tmp_path / "p"
    for name in ["010.png", "002.png", "1.png", "sub/000.png", "001.png"]:
        _good(root / name)
    f = FaceFolder(root, limit=3, size=64)
    assert f.relpaths == ["001.png", "002.png", "010.png"] and len(f) == 3 and f.n_found == 5
    assert FaceFolder(root, size=64).relpaths == ["001.png", "002.png", "010.png", "1.png", "sub/000.png"]
    with pytest.raises(InputError, match="limit"):
        FaceFolder(root, limit=0)


@needs_celeba
def test_celeba_first_files_in_name_order():
    f = FaceFolder(CELEBA / "images", limit=6, size=64)
    assert f.relpaths == [f"{i:06d}.jpg" for i in range(1, 7)]
    images, kept, skipped = f.load()
    assert images.shape == (6, 3, 64, 64) and kept == f.relpaths and skipped == []
    assert 0 <= images.min() and images.max() <= 1


def test_empty_missing_and_file_roots(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files") as ei:
        FaceFolder(tmp_path / "empty")
    assert str((tmp_path / "empty").resolve()) in str(ei.value)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    _good(tmp_path / "docs" / ".hidden" / "x.png")
    with pytest.raises(DataError, match=r"holds no image files \(1 other files seen"):
        FaceFolder(tmp_path / "docs")
    with pytest.raises(DataError, match="does not exist"):
        FaceFolder(tmp_path / "nope")
    _good(tmp_path / "one.png")
    with pytest.raises(DataError, match="is a file, not a folder"):
        FaceFolder(tmp_path / "one.png")


def test_folder_of_only_bad_files(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_text("text")
    (root / "b.png").write_bytes(b"")
    (root / "c.gif").write_bytes(b"GIF89a")
    f = FaceFolder(root)
    with pytest.warns(SkippedImageWarning), pytest.raises(DataError) as ei:
        f.load()
    msg = str(ei.value)
    assert "none of the 3 image files" in msg and "3 skipped" in msg and str(root.resolve()) in msg
    assert "load_image" in msg  # what to do


# ---------------------------------------------------------------------------------------------
# labels


@needs_celeba
def test_celeba_attributes_join_by_file_name():
    t = read_labels(CELEBA / "attributes.csv")
    assert t.key_column == "file" and len(t) == 10_000
    assert len(t.columns) == 41 and t.columns[0] == "identity" and "Smiling" in t.columns
    smiling = t.numeric("Smiling")
    assert set(np.unique(smiling)) == {-1.0, 1.0}
    f = FaceFolder(CELEBA / "images", limit=5, labels=t, size=64)
    lab = f.labels
    assert lab["Smiling"] == [t.row(r)["Smiling"] for r in f.relpaths]
    assert all(isinstance(v, str) for v in lab["identity"])
    np.testing.assert_array_equal(t.numeric("Male", f.relpaths), to_numeric(lab["Male"]))
    # the CSV path works too
    assert FaceFolder(CELEBA / "images", limit=5, labels=CELEBA / "attributes.csv", size=64).labels == lab


@needs_utk
def test_utkface_labels_with_blanks():
    t = read_labels(UTK / "labels.csv")
    assert t.key_column == "file" and t.columns == ("age", "gender", "race") and len(t) == 9780
    assert t.column("race").count("white") == 5265
    with pytest.raises(DataError, match="blank"):
        t.numeric("age")
    age = t.numeric("age", allow_missing=True)
    assert np.isnan(age).sum() == 2 and np.nanmin(age) >= 1
    with pytest.raises(DataError, match="not a number"):
        t.numeric("gender")
    f = FaceFolder(UTK / "images", limit=3, labels=t, size=64)
    assert set(f.labels["gender"]) <= {"male", "female"}


@needs_celeba_id
def test_csv_paths_relative_to_a_parent_folder():
    # identities.csv says images/<identity>/<file>; the folder is .../images
    f = FaceFolder(CELEBA_ID / "images", limit=4, labels=CELEBA_ID / "identities.csv", size=64)
    assert f.labels["identity"] == [r.split("/")[0] for r in f.relpaths]


def _csv(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_label_table_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"more than once: 'a.jpg \(lines 2 and 4\)'"):
        read_labels(_csv(tmp_path / "dup.csv", "file,age\na.jpg,1\nb.jpg,2\na.jpg,3\n"))
    with pytest.raises(DataError, match="no column naming the photos"):
        read_labels(_csv(tmp_path / "nokey.csv", "name,age\na.jpg,1\n"))
    with pytest.raises(DataError, match="is it comma-separated"):
        read_labels(_csv(tmp_path / "tabs.csv", "file\tage\na.jpg\t1\n"))
    with pytest.raises(DataError, match="no column 'photo'"):
        read_labels(_csv(tmp_path / "k.csv", "file,age\na.jpg,1\n"), key_column="photo")
    with pytest.raises(DataError, match="several columns"):
        read_labels(_csv(tmp_path / "two.csv", "file,path,age\na.jpg,x/a.jpg,1\n"))
    with pytest.raises(DataError, match="line 3 has 3 cells"):
        read_labels(_csv(tmp_path / "ragged.csv", "file,age\na.jpg,1\nb.jpg,2,3\n"))
    with pytest.raises(DataError, match="blank 'file'"):
        read_labels(_csv(tmp_path / "blank.csv", "file,age\n,1\n"))
    with pytest.raises(DataError, match="empty"):
        read_labels(_csv(tmp_path / "e.csv", "\n"))
    with pytest.raises(DataError, match="no rows"):
        read_labels(_csv(tmp_path / "h.csv", "file,age\n"))
    t = read_labels(_csv(tmp_path / "ok.csv", "\ufeffImage , age\n./a.jpg,1\nsub\\b.jpg, 2\n"))
    assert t.key_column == "Image" and t.keys == ("a.jpg", "sub/b.jpg") and t.column("age") == ["1", " 2"]
    with pytest.raises(DataError, match="no column 'height'"):
        t.column("height")


def test_photos_without_labels_and_ambiguous_joins(tmp_path):
    root = tmp_path / "p"
    for name in ["a.png", "b.png", "c.png"]:
        _good(root / name)
    csv = _csv(tmp_path / "l.csv", "file,age\na.png,1\nb.png,2\nother.png,3\n")
    with pytest.raises(DataError) as ei:
        FaceFolder(root, labels=csv)
    msg = str(ei.value)
    assert "1 of 3 photos" in msg and "'c.png'" in msg and "l.csv" in msg and "limit=" in msg
    assert FaceFolder(root, labels=csv, limit=2).labels == {"age": ["1", "2"]}

    nested = tmp_path / "n"
    _good(nested / "x" / "same.png")
    _good(nested / "y" / "same.png")
    with pytest.raises(DataError, match="match the same row"):
        FaceFolder(nested, labels=_csv(tmp_path / "base.csv", "file,age\nsame.png,1\n"))
    ok = FaceFolder(nested, labels=_csv(tmp_path / "full.csv", "file,age\nx/same.png,1\ny/same.png,2\n"))
    assert ok.labels == {"age": ["1", "2"]}
    t = read_labels(_csv(tmp_path / "deep.csv", "file,age\nA/x/same.png,1\nB/x/same.png,2\n"))
    with pytest.raises(DataError, match="more than once"):
        t.match(["x/same.png"])
    with pytest.raises(DataError, match="several photos share"):
        read_labels(tmp_path / "base.csv").match(["x/same.png", "y/same.png"], how="basename")


def test_to_numeric():
    np.testing.assert_array_equal(to_numeric(["-1", "1", " 2.5 "]), [-1.0, 1.0, 2.5])
    assert np.isnan(to_numeric(["1", ""], allow_missing=True)[1])
    with pytest.raises(DataError, match="position 1"):
        to_numeric(["1", "x"])
    with pytest.raises(DataError, match="finite"):
        to_numeric(["inf"])


# ---------------------------------------------------------------------------------------------
# latent cache


def _keys(n, prep="prep", ae="ae"):
    return [CacheKey(f"{i:064x}", prep, ae) for i in range(n)]


def test_cache_roundtrip_float32_and_float16(tmp_path):
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(5, 32, 4, 4, generator=g)
    c = LatentCache(tmp_path / "c32")
    assert c.get_many(_keys(5)) == {}
    assert c.put_many(dict(zip(_keys(5), vals))) == 5
    got = c.get_many(_keys(7))
    assert set(got) == set(_keys(5))
    for k, v in zip(_keys(5), vals):
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v)
    assert c.get_many(_keys(5, ae="other")) == {} and c.get_many(_keys(5, prep="p2")) == {}
    st = c.stats()
    assert st["entries"] == 5 and st["data_bytes"] == 5 * 32 * 16 * 4 and st["hits"] == 5 and st["misses"] == 5 + 2 + 10
    assert c.clear() == 5 and c.stats()["entries"] == 0

    h = LatentCache(tmp_path / "c16", dtype="float16")
    h.put_many(zip(_keys(5), vals))
    got16 = h.get_many(_keys(5))
    assert torch.equal(got16[_keys(5)[2]], vals[2].half().float())
    assert h.stats()["data_bytes"] == 5 * 32 * 16 * 2
    with pytest.raises(InputError):
        LatentCache(tmp_path, dtype="float64")


def test_cache_folder_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FACEPRINT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "faceprint" / "latents"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == Path.home() / ".cache" / "faceprint" / "latents"
    monkeypatch.setenv("FACEPRINT_CACHE", str(tmp_path / "fc"))
    assert default_cache_dir() == tmp_path / "fc" and LatentCache().dir == tmp_path / "fc"
    assert LatentCache(tmp_path / "explicit").dir == tmp_path / "explicit"  # the argument wins
    monkeypatch.setenv("FACEPRINT_CACHE", "off")
    c = LatentCache()
    assert default_cache_dir() is None and not c.enabled
    assert c.put_many(dict(zip(_keys(1), [torch.zeros(2)]))) == 0 and c.get_many(_keys(1)) == {}
    assert not LatentCache(tmp_path / "x", enabled=False).enabled


def test_corrupted_cache_file_warns_and_rebuilds(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    (d / "latents.sqlite3").write_bytes(b"this is not sqlite " * 500)
    c = LatentCache(d)
    with pytest.warns(CacheWarning, match="corrupted"):
        assert c.get_many(_keys(3)) == {}
    assert c.put_many(dict(zip(_keys(3), torch.ones(3, 2)))) == 3
    assert len(LatentCache(d).get_many(_keys(3))) == 3


def test_damaged_rows_are_ignored(tmp_path):
    c = LatentCache(tmp_path)
    c.put_many(dict(zip(_keys(2), torch.ones(2, 4))))
    c.close()
    with sqlite3.connect(tmp_path / "latents.sqlite3") as con:
        con.execute("UPDATE latents SET data = X'0102' WHERE content = ?", (_keys(2)[0].content,))
    with pytest.warns(CacheWarning, match="1 damaged"):
        got = LatentCache(tmp_path).get_many(_keys(2))
    assert list(got) == [_keys(2)[1]]


def test_unwritable_cache_does_not_stop_the_job(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    c = LatentCache(blocker / "cache")
    with pytest.warns(CacheWarning, match="continuing without the cache"):
        assert c.put_many(dict(zip(_keys(1), [torch.zeros(2)]))) == 0
    assert not c.enabled and c.get_many(_keys(1)) == {}


_WRITER = """
import sys, torch
from faceprint.data import CacheKey, LatentCache
d, who = sys.argv[1], int(sys.argv[2])
c = LatentCache(d, timeout=30)
for step in range(20):
    items = {CacheKey(f"{who}-{step}-{i}", "prep", "ae"): torch.full((8,), float(who)) for i in range(10)}
    assert c.put_many(items) == 10
    c.get_many(list(items))
"""


def test_two_processes_write_one_cache(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(w)], env=env, stderr=subprocess.PIPE)
        for w in (1, 2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert b"Warning" not in err, err.decode()
    c = LatentCache(tmp_path)
    assert c.stats()["entries"] == 400
    keys = [CacheKey(f"{w}-{s}-{i}", "prep", "ae") for w in (1, 2) for s in range(20) for i in range(10)]
    got = c.get_many(keys)
    assert len(got) == 400 and all(float(got[k][0]) == float(k.content[0]) for k in keys)


# ---------------------------------------------------------------------------------------------
# LatentSet


def test_latentset_validation_and_data_hash():
    z = torch.zeros(3, 32, 2, 2)
    ls = LatentSet(z, ["a", "b", "c"], ["1" * 64, "2" * 64, "3" * 64], None, "/r", 128)
    assert ls.preprocess_id == preprocessing_id(128) and len(ls) == 3 and ls.latent_shape == (32, 2, 2)
    perm = LatentSet(z, ["c", "a", "b"], ["3" * 64, "1" * 64, "2" * 64], None, "/elsewhere", 128)
    assert perm.data_hash == ls.data_hash  # order, names and location do not matter
    assert LatentSet(z, ["a", "b", "c"], ["1" * 64, "2" * 64, "4" * 64], None, "/r", 128).data_hash != ls.data_hash
    assert LatentSet(z, ["a", "b", "c"], ["1" * 64, "2" * 64, "3" * 64], None, "/r", 64).data_hash != ls.data_hash
    with pytest.raises(InputError, match="must match"):
        LatentSet(z, ["a"], ["1" * 64], None, "/r", 128)
    with pytest.raises(InputError, match="float32"):
        LatentSet(z.double(), ["a", "b", "c"], ["1" * 64] * 3, None, "/r", 128)
    with pytest.raises(InputError, match="label columns"):
        LatentSet(z, ["a", "b", "c"], ["1" * 64] * 3, {"age": ["1"]}, "/r", 128)


# ---------------------------------------------------------------------------------------------
# encode_folder with the real TAEF2 (no stand-ins)


@pytest.fixture(scope="module")
def taef2():
    try:
        from faceprint.autoencoder import TAEF2
    except ImportError as e:
        pytest.skip(f"faceprint.autoencoder.TAEF2 is not available yet ({e})")
    return TAEF2.load()


class CountingEncoder:
    """The real autoencoder, with its encode() calls counted (delegates everything)."""

    def __init__(self, ae):
        self.ae = ae
        self.id = ae.id
        self.images = 0
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        self.images += images.shape[0]
        return self.ae.encode(images)


def _celeba_photos(root: Path, n: int) -> Path:
    """A new folder holding copies of celeba photos 000001..n under their own names."""
    root.mkdir()
    for i in range(1, n + 1):
        shutil.copy(CELEBA / "images" / f"{i:06d}.jpg", root / f"{i:06d}.jpg")
    return root


@needs_celeba
def test_encode_folder_encodes_each_photo_once(tmp_path, taef2):
    root = _celeba_photos(tmp_path / "photos", 5)
    shutil.copy(CELEBA / "images" / "000002.jpg", root / "copy_of_2.jpg")  # same content
    (root / "broken.jpg").write_text("not a photo")
    csv = _csv(tmp_path / "l.csv", "file,n\n" + "".join(f"{i:06d}.jpg,{i}\n" for i in range(1, 6)) + "copy_of_2.jpg,2\nbroken.jpg,0\n")
    cache = LatentCache(tmp_path / "cache")
    enc = CountingEncoder(taef2)
    folder = FaceFolder(root, size=128, labels=csv)

    with pytest.warns(SkippedImageWarning, match="broken.jpg"):
        first = encode_folder(folder, enc, cache=cache, batch_size=2)
    assert enc.images == 5  # five distinct good contents
    assert first.relpaths == [f"{i:06d}.jpg" for i in range(1, 6)] + ["copy_of_2.jpg"]
    assert first.latents.shape == (6, 32, 16, 16) and first.latents.dtype == torch.float32
    assert torch.equal(first.latents[1], first.latents[5])
    assert first.skipped[0][0] == "broken.jpg" and first.labels["n"] == ["1", "2", "3", "4", "5", "2"]
    assert first.autoencoder_id == taef2.id and first.image_size == 128

    enc.images = enc.calls = 0
    with pytest.warns(SkippedImageWarning):
        second = encode_folder(folder, enc, cache=cache)
    assert enc.calls == 0 and enc.images == 0
    assert torch.equal(second.latents, first.latents) and second.data_hash == first.data_hash

    # changing one file's content re-encodes that photo only
    Image.open(root / "000003.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "000003.jpg")
    with pytest.warns(SkippedImageWarning):
        third = encode_folder(folder, enc, cache=cache)
    assert enc.images == 1 and third.data_hash != first.data_hash
    assert not torch.equal(third.latents[2], first.latents[2]) and torch.equal(third.latents[0], first.latents[0])

    # another image size is another preprocessing: everything is encoded again
    enc.images = 0
    with pytest.warns(SkippedImageWarning):
        small = encode_folder(FaceFolder(root, size=64), enc, cache=cache)
    assert enc.images == 5 and small.latents.shape == (6, 32, 8, 8)

    # without a cache, the same latents come out
    enc.images = 0
    with pytest.warns(SkippedImageWarning):
        nocache = encode_folder(folder, enc, cache=False)
    assert enc.images == 5 and torch.allclose(nocache.latents, third.latents, atol=1e-5)


@needs_celeba
def test_encode_files_shares_the_folder_cache_and_keeps_the_given_order(tmp_path, taef2):
    root = _celeba_photos(tmp_path / "photos", 3)
    cache = LatentCache(tmp_path / "cache")
    enc = CountingEncoder(taef2)
    folder_latents = encode_folder(FaceFolder(root, size=128), enc, cache=cache).latents
    assert enc.images == 3

    # files the folder encoded come from the cache, in the order given, duplicates included
    enc.images = 0
    order = [root / "000003.jpg", root / "000001.jpg", root / "000003.jpg"]
    z = encode_files(order, enc, cache=cache)
    assert enc.images == 0
    assert torch.equal(z, folder_latents[[2, 0, 2]])

    # a new file is encoded once and cached; a second call encodes nothing
    shutil.copy(CELEBA / "images" / "000004.jpg", root / "new.jpg")
    calls = []
    z2 = encode_files([root / "new.jpg", root / "000002.jpg"], enc, cache=cache, check_time=lambda: calls.append(1))
    assert enc.images == 1 and calls == [1] and torch.equal(z2[1], folder_latents[1])
    enc.images = 0
    assert torch.equal(encode_files([root / "new.jpg"], enc, cache=cache), z2[:1]) and enc.images == 0

    # a deadline raised from check_time stops before any encoding; bad input names the file
    shutil.copy(CELEBA / "images" / "000005.jpg", root / "later.jpg")

    def stop():
        raise TimeoutError("out of time")

    with pytest.raises(TimeoutError):
        encode_files([root / "later.jpg"], enc, cache=cache, check_time=stop)
    assert enc.images == 0
    (root / "broken.jpg").write_text("not a photo")
    with pytest.raises(BadImageError, match="broken.jpg"):
        encode_files([root / "broken.jpg"], enc, cache=cache)
    with pytest.raises(BadImageError, match="missing.jpg"):
        encode_files([root / "missing.jpg"], enc, cache=cache)
    with pytest.raises(InputError, match="at least one"):
        encode_files([], enc, cache=cache)
