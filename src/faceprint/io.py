"""Artifact save/load (safetensors + JSON metadata), atomic writes, sha256.

An artifact is one .safetensors file. Its tensors hold the learned state; its metadata (a
str -> str map in the safetensors header) holds JSON strings: the format version, the class,
the config and the provenance (faceprint version, data hash, seed, creation time). Nothing is
ever pickled, so loading an artifact from an untrusted source cannot run code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from . import __version__
from .errors import ArtifactError, InputError

FORMAT_VERSION = 1


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(path, mode: int | None = None):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The file gets ``mode`` (default: what a plain ``open`` would give under the umask, not the
    0600 of the temporary file); pass 0o600 for secrets such as an owner's fingerprint key."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output folder {str(parent)!r} does not exist; create it first or choose another -o path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def save_artifact(path, tensors: dict[str, torch.Tensor], meta: dict, *, mode: int | None = None) -> None:
    """Write tensors and JSON-serialisable metadata to one .safetensors file, atomically.

    ``meta`` keys become header entries whose values are JSON strings. ``format_version`` and
    ``faceprint_version`` are added.
    """
    from safetensors.torch import save_file

    header = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
    header["format_version"] = json.dumps(FORMAT_VERSION)
    header["faceprint_version"] = json.dumps(__version__)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, mode) as tmp:
        save_file(clean, str(tmp), metadata=header)


def load_artifact(path, expected_class: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an artifact written by save_artifact; return (tensors, metadata with JSON decoded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model file {str(path)!r} does not exist; pass the path written by `faceprint fit -o`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(
            f"model file {str(path)!r} is not a readable faceprint artifact ({e.__class__.__name__}: {e}); "
            "it may be truncated or of another format: re-create it with `faceprint fit`"
        ) from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ArtifactError(f"model file {str(path)!r} has corrupted metadata ({e}); re-create it with `faceprint fit`") from None
    version = meta.get("format_version")
    if version is None:
        raise ArtifactError(f"model file {str(path)!r} has no faceprint metadata; is it a faceprint model?")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"model file {str(path)!r} has format version {version}, this faceprint reads up to {FORMAT_VERSION}; "
            "upgrade faceprint"
        )
    if expected_class is not None and meta.get("class") != expected_class:
        raise ArtifactError(
            f"model file {str(path)!r} holds a {meta.get('class')!r}, expected a {expected_class!r}"
        )
    return tensors, meta
