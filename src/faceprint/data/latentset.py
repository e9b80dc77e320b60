"""LatentSet: the latents of a photo folder, with their sources, labels and a data hash.

:func:`encode_folder` hashes every file, takes the latents it finds in the cache
(:mod:`faceprint.data.cache`), decodes and encodes only the photos that are missing (each
distinct file content once), stores them, and returns the latents in the folder's file order.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadImageError, DataError, InputError, SkippedImageWarning
from ..io import sha256_file
from .cache import CacheKey, LatentCache
from .folder import FaceFolder, preprocessing_id

__all__ = ["LatentSet", "encode_folder", "encode_files"]


@dataclass
class LatentSet:
    """Latents of N photos plus where they came from.

    Attributes
    ----------
    latents : torch.Tensor
        (N, C, h, w) float32.
    relpaths : list of str
        POSIX path of each photo relative to ``root``.
    content_hashes : list of str
        sha256 hex of each photo file's bytes.
    labels : dict of str -> list of str, or None
        Label columns aligned with ``relpaths`` (strings, as in the CSV).
    root : str
        The photo folder.
    image_size : int
        Side of the square images that were encoded.
    preprocess_id : str
        The preprocessing recipe (default: ``preprocessing_id(image_size)``).
    autoencoder_id : str
        ``autoencoder.id`` of the encoder.
    skipped : list of (relpath, reason)
        Files of the folder that could not be used.
    """

    latents: torch.Tensor
    relpaths: list[str]
    content_hashes: list[str]
    labels: dict[str, list[str]] | None
    root: str
    image_size: int
    preprocess_id: str = ""
    autoencoder_id: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.latents, torch.Tensor) or self.latents.ndim != 4:
            got = tuple(self.latents.shape) if isinstance(self.latents, torch.Tensor) else type(self.latents).__name__
            raise InputError(f"latents must be a (N, C, h, w) tensor, got {got}")
        if self.latents.dtype != torch.float32:
            raise InputError(f"latents must be float32, got {self.latents.dtype}")
        n = self.latents.shape[0]
        if len(self.relpaths) != n or len(self.content_hashes) != n:
            raise InputError(
                f"latents has {n} rows but relpaths has {len(self.relpaths)} and content_hashes "
                f"{len(self.content_hashes)}; they must match"
            )
        if self.labels is not None:
            bad = {c: len(v) for c, v in self.labels.items() if len(v) != n}
            if bad:
                raise InputError(f"label columns must have {n} values each, got {bad}")
        if not self.preprocess_id:
            self.preprocess_id = preprocessing_id(self.image_size)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w)."""
        return tuple(self.latents.shape[1:])  # type: ignore[return-value]

    @property
    def data_hash(self) -> str:
        """sha256 hex of UTF-8 text: preprocess_id, then the sorted content hashes, one per line.

        It names the training data (which files, under which preprocessing) independently of
        their order, names and location; duplicates count.
        """
        h = hashlib.sha256()
        h.update(self.preprocess_id.encode("utf-8"))
        for c in sorted(self.content_hashes):
            h.update(b"\n")
            h.update(c.encode("ascii"))
        return h.hexdigest()


def _resolve_cache(cache) -> LatentCache | None:
    if cache is None:
        c = LatentCache()
        return c if c.enabled else None
    if cache is False:
        return None
    if isinstance(cache, LatentCache):
        return cache if cache.enabled else None
    if isinstance(cache, (str, Path)):
        return LatentCache(cache)
    raise InputError(
        f"cache must be None (default folder), False (no cache), a LatentCache or a folder path, got {cache!r}"
    )


def encode_folder(
    folder: FaceFolder, autoencoder, *, cache=None, batch_size: int | None = None, progress: bool = False,
    client=None, on_progress=None,
) -> LatentSet:
    """Encode every usable photo of ``folder`` once, reusing cached latents.

    Parameters
    ----------
    folder : FaceFolder
    autoencoder
        Has ``id`` (str) and ``encode(images)``: (B, 3, S, S) float32 in [0, 1] -> (B, C, h, w).
    cache : None, False, LatentCache or path
        None: the default cache folder (see :func:`faceprint.data.cache.default_cache_dir`);
        False: no cache; a path: a cache in that folder.
    batch_size : int or None
        Photos per ``encode`` call; None: 16 at 128 px (64 at 64 px, 4 at 256 px).
    progress : bool
        Show a progress bar (only on a terminal).
    client : distributed.Client, optional
        Decode and encode the photos that are not cached on this Dask cluster's workers, in
        chunks (:mod:`faceprint.distributed`); the latents are identical to a run without it.
        The workers must read the photos at the same paths.
    on_progress : callable(done, total), optional
        Called as photos to encode are done (not cached ones only; for a progress display).

    Returns
    -------
    LatentSet
        In the folder's file order, without the skipped files (listed in ``.skipped``, each
        with a :class:`SkippedImageWarning`). Latents that went through a float16 cache are
        returned as stored, so a first and a second call give identical values.

    Raises
    ------
    DataError
        If no photo could be used. BadImageError at the first bad photo if ``folder.strict``.
    """
    if not isinstance(folder, FaceFolder):
        raise InputError(f"folder must be a FaceFolder, got {type(folder).__name__}")
    ae_id = getattr(autoencoder, "id", None)
    if not isinstance(ae_id, str) or not ae_id or not callable(getattr(autoencoder, "encode", None)):
        raise InputError(
            f"autoencoder must have a non-empty str .id and an .encode(images) method, got {type(autoencoder).__name__}"
        )
    # the cache key names how the latents were computed, not only the weights (bf16 and fp32
    # encodes of one photo differ by about 1%)
    enc_key = getattr(autoencoder, "encode_id", None) or ae_id
    size = folder.size
    if batch_size is None:
        batch_size = max(1, (16 * 128 * 128) // (size * size))
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int or None, got {batch_size!r}")
    store = _resolve_cache(cache)
    prep = folder.preprocessing_id
    n = len(folder)

    # 1. content hashes
    hashes: list[str | None] = []
    bad: dict[int, str] = {}
    for i, p in enumerate(folder.paths):
        try:
            hashes.append(sha256_file(p))
        except OSError as e:
            reason = f"cannot read file ({e.strerror or e})"
            if folder.strict:
                raise BadImageError(p, reason) from None
            hashes.append(None)
            bad[i] = reason
            warnings.warn(SkippedImageWarning(f"skipped photo {folder.relpaths[i]!r} in {str(folder.root)!r}: {reason}"), stacklevel=2)

    # 2. cached latents
    unique: dict[str, int] = {}  # content hash -> first index with it
    for i, h in enumerate(hashes):
        if h is not None and h not in unique:
            unique[h] = i
    latent_of: dict[str, torch.Tensor] = {}
    if store is not None:
        got = store.get_many(CacheKey(h, prep, enc_key) for h in unique)
        latent_of = {k.content: v for k, v in got.items()}

    # 3. decode + encode what is missing, each distinct content once
    todo = [i for h, i in unique.items() if h not in latent_of]
    bad_content: dict[str, str] = {}
    if todo and client is not None:
        _encode_distributed(folder, autoencoder, todo, batch_size, client, progress, on_progress, hashes,
                            bad_content, store, prep, enc_key, latent_of, ae_id)
    elif todo:
        pos = {r: i for i, r in enumerate(folder.relpaths)}
        done = 0
        for batch in folder._decode_iter(todo, batch_size, progress, torch.float32):
            for rel, reason in batch.skipped:
                bad_content[hashes[pos[rel]]] = reason  # type: ignore[index]
            done += len(batch.skipped) + len(batch.indices)
            if on_progress is not None:
                on_progress(done, len(todo))
            if not batch.indices:
                continue
            with torch.no_grad():
                z = autoencoder.encode(batch.images)
            z = _check_latents(z, len(batch.indices), ae_id)
            _keep(z, [hashes[i] for i in batch.indices], store, prep, enc_key, latent_of)

    # 4. assemble in file order
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    first_reason_index = {unique[h]: r for h, r in bad_content.items()}
    for i, h in enumerate(hashes):
        if i in bad:
            skipped.append((folder.relpaths[i], bad[i]))
        elif h in bad_content:
            reason = bad_content[h]
            skipped.append((folder.relpaths[i], reason))
            if i not in first_reason_index:  # a duplicate of a bad file: warned here
                warnings.warn(
                    SkippedImageWarning(f"skipped photo {folder.relpaths[i]!r} in {str(folder.root)!r}: {reason}"),
                    stacklevel=2,
                )
        else:
            kept.append(i)
    if not kept:
        raise folder._all_bad_error(n, skipped)
    shapes = {tuple(latent_of[hashes[i]].shape) for i in kept}
    if len(shapes) != 1:
        raise DataError(
            f"the latents of {str(folder.root)!r} under autoencoder {ae_id!r} have several shapes {sorted(shapes)}; "
            "the cache holds entries of another model under the same id: clear it (LatentCache().clear())"
        )
    latents = torch.stack([latent_of[hashes[i]] for i in kept], 0)  # (N, C, h, w)
    rel_kept = [folder.relpaths[i] for i in kept]
    return LatentSet(
        latents=latents,
        relpaths=rel_kept,
        content_hashes=[hashes[i] for i in kept],  # type: ignore[misc]
        labels=folder.labels_for(rel_kept),
        root=str(folder.root),
        image_size=size,
        preprocess_id=prep,
        autoencoder_id=ae_id,
        skipped=skipped,
    )


def encode_files(paths, autoencoder, *, size: int = 128, cache=None, batch_size: int | None = None,
                 check_time=None) -> torch.Tensor:
    """Latents (N, C, h, w) of an explicit list of photo files, in that order, through the same
    latent cache as :func:`encode_folder` (a photo encoded once by either is not encoded again).

    Every file must be usable: a bad one raises :class:`BadImageError` naming it (a list picked
    by hand has no "skip" to fall back on). ``check_time``: called before each encoder batch
    (e.g. to stop a benchmark at its deadline); what was encoded before is already cached.
    Latents that went through a float16 cache are returned as stored, like encode_folder's."""
    from .folder import load_image

    ae_id = getattr(autoencoder, "id", None)
    if not isinstance(ae_id, str) or not ae_id or not callable(getattr(autoencoder, "encode", None)):
        raise InputError(
            f"autoencoder must have a non-empty str .id and an .encode(images) method, got {type(autoencoder).__name__}"
        )
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("encode_files needs at least one photo file")
    enc_key = getattr(autoencoder, "encode_id", None) or ae_id
    prep = preprocessing_id(size)
    if batch_size is None:
        batch_size = max(1, (16 * 128 * 128) // (size * size))
    store = _resolve_cache(cache)
    hashes = []
    for p in paths:
        try:
            hashes.append(sha256_file(p))
        except OSError as e:
            raise BadImageError(p, f"cannot read file ({e.strerror or e})") from None
    latent_of: dict[str, torch.Tensor] = {}
    if store is not None:
        got = store.get_many(CacheKey(h, prep, enc_key) for h in dict.fromkeys(hashes))
        latent_of = {k.content: v for k, v in got.items()}
    todo = list(dict.fromkeys(h for h in hashes if h not in latent_of))
    first = {}
    for p, h in zip(paths, hashes):
        first.setdefault(h, p)
    for s in range(0, len(todo), batch_size):
        if check_time is not None:
            check_time()
        hs = todo[s:s + batch_size]
        with torch.no_grad():
            z = autoencoder.encode(torch.stack([load_image(first[h], size) for h in hs]))
        _keep(_check_latents(z, len(hs), ae_id), hs, store, prep, enc_key, latent_of)
    return torch.stack([latent_of[h] for h in hashes])


def _keep(z: torch.Tensor, hs: list, store, prep: str, enc_key: str, latent_of: dict) -> None:
    """Store freshly encoded latents z (B, C, h, w) of contents hs in the cache and in latent_of."""
    if store is not None:
        store.put_many((CacheKey(h, prep, enc_key), z[j]) for j, h in enumerate(hs))
        if store.enabled and store.dtype == "float16":
            z = z.to(torch.float16).to(torch.float32)  # what the cache returns next time
    for j, h in enumerate(hs):
        latent_of[h] = z[j].clone()


# photos per Dask task: a few encoder batches, so each task's work outweighs its overhead
DISTRIBUTED_BATCHES_PER_CHUNK = 4


def _encode_distributed(folder, autoencoder, todo, batch_size, client, progress, on_progress, hashes, bad_content,
                        store, prep, enc_key, latent_of, ae_id) -> None:
    """Step 3 of encode_folder on Dask workers (faceprint.distributed): chunks of photo files are
    decoded and encoded there, exactly as in one process (TAEF2 gives a photo the same latent in
    any batch); skipped files are reported here, in file order."""
    from ..distributed.chunks import map_chunks
    from ..distributed.stages import encode_file_chunk

    paths = [str(folder.paths[i]) for i in todo]
    results = map_chunks(encode_file_chunk, paths, chunk_size=batch_size * DISTRIBUTED_BATCHES_PER_CHUNK,
                         client=client, shared=(autoencoder, folder.size, folder.max_pixels, folder.min_side,
                                                batch_size),
                         progress=on_progress, bar=progress, desc="encoding photos", name="encode")
    chunk = batch_size * DISTRIBUTED_BATCHES_PER_CHUNK
    for c, (kept, z, skipped) in enumerate(results):
        base = c * chunk
        for j, reason in skipped:
            i = todo[base + j]
            if folder.strict:
                raise BadImageError(folder.paths[i], reason)
            bad_content[hashes[i]] = reason  # type: ignore[index]
            warnings.warn(SkippedImageWarning(f"skipped photo {folder.relpaths[i]!r} in {str(folder.root)!r}: {reason}"),
                          stacklevel=3)
        if z is None:
            continue
        z = _check_latents(z, len(kept), ae_id)
        _keep(z, [hashes[todo[base + j]] for j in kept], store, prep, enc_key, latent_of)


def _check_latents(z, b: int, ae_id: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[0] != b:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InputError(f"autoencoder {ae_id!r}: encode() of {b} images must return a (B={b}, C, h, w) tensor, got {got}")
    z = z.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(z).all():
        raise InputError(f"autoencoder {ae_id!r}: encode() returned NaN or infinite latents")
    return z
