"""A latent cache on disk, so that each photo is encoded once per preprocessing and autoencoder.

One SQLite file (``latents.sqlite3``) in a cache folder, in WAL mode with a busy timeout, so
several processes may read and write it at once. An entry is keyed by

    (sha256 of the file's bytes, preprocessing id, autoencoder id)

so renaming or moving a photo keeps its entry, and changing its content, the image size or the
loader recipe, or the autoencoder, misses. Values are raw little-endian float32 (default) or
float16 bytes with their shape and dtype in their own columns; nothing is pickled.

The folder is, in order: the ``path`` argument; ``$FACEPRINT_CACHE`` (``off``, ``0``, ``none``
or ``false`` disables the default cache); ``$XDG_CACHE_HOME/faceprint/latents``;
``~/.cache/faceprint/latents``.

A cache never stops a job: a corrupted file is reported with a :class:`CacheWarning` and
rebuilt empty; other database errors (read-only folder, full disk, a lock held too long) warn
once and turn the cache off for the rest of the run. Cached latents hold image content: keep
the cache folder out of repositories.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import FaceprintWarning, InputError

__all__ = ["CACHE_FILENAME", "CacheKey", "CacheWarning", "LatentCache", "default_cache_dir"]

CACHE_FILENAME = "latents.sqlite3"
SCHEMA_VERSION = 1
_OFF = ("0", "off", "none", "false", "no", "disable", "disabled")
_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2")}
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_CHUNK = 400  # keys per SELECT ... IN (...)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS latents (
    content TEXT NOT NULL,
    preprocess TEXT NOT NULL,
    autoencoder TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (content, preprocess, autoencoder)
) WITHOUT ROWID;
"""


class CacheWarning(FaceprintWarning):
    """The latent cache could not be used as asked (corrupted, read-only, locked); the job goes on."""


class CacheKey(NamedTuple):
    """(sha256 hex of the file bytes, preprocessing id, autoencoder id)."""

    content: str
    preprocess: str
    autoencoder: str


def default_cache_dir() -> Path | None:
    """The default cache folder from the environment, or None if ``FACEPRINT_CACHE`` disables it."""
    env = os.environ.get("FACEPRINT_CACHE")
    if env is not None and env.strip():
        if env.strip().lower() in _OFF:
            return None
        return Path(env.strip()).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # relative XDG is ignored
    return base / "faceprint" / "latents"


def _is_corruption(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    msg = str(e).lower()
    return "not a database" in msg or "malformed" in msg


class LatentCache:
    """Latents on disk keyed by :class:`CacheKey`.

    Parameters
    ----------
    path : str, Path or None
        The cache **folder** (created if missing); the database is ``path / latents.sqlite3``.
        None: :func:`default_cache_dir`.
    enabled : bool
        False gives a cache that stores nothing and finds nothing.
    dtype : {"float32", "float16"}
        Storage precision of new entries. Entries are always returned as float32.
    timeout : float
        Seconds to wait for another process's write lock before giving up (then: warn, go on).
    """

    def __init__(self, path=None, *, enabled: bool = True, dtype: str = "float32", timeout: float = 60.0):
        if dtype not in _DTYPES:
            raise InputError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        if not isinstance(enabled, bool):
            raise InputError(f"enabled must be True or False, got {enabled!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise InputError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path must be a folder path or None, got {type(path).__name__} {path!r}")
        self.dir: Path | None = Path(path).expanduser() if path is not None else default_cache_dir()
        self.dtype = dtype
        self.timeout = float(timeout)
        self._enabled = enabled and self.dir is not None
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self.hits = 0
        self.misses = 0
        self.writes = 0

    # ----------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def db_path(self) -> Path | None:
        return None if self.dir is None else self.dir / CACHE_FILENAME

    def __repr__(self) -> str:
        state = str(self.db_path) if self._enabled else "disabled"
        return f"LatentCache({state!r}, dtype={self.dtype!r})"

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_conn"] = None
        d["_pid"] = None
        return d

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
        self._conn = None
        self._pid = None

    def _disable(self, what: str, e: BaseException) -> None:
        warnings.warn(
            CacheWarning(
                f"latent cache {str(self.db_path)!r} cannot {what} ({type(e).__name__}: {e}); "
                "continuing without the cache (latents are recomputed). Set FACEPRINT_CACHE to another "
                "folder, or pass cache=False"
            ),
            stacklevel=3,
        )
        self.close()
        self._enabled = False

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self._conn = None  # a connection inherited through fork is not reused (nor closed)
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.db_path), timeout=self.timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"cache schema version {row[0]}, this faceprint uses {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _rebuild(self, e: sqlite3.Error) -> None:
        warnings.warn(
            CacheWarning(
                f"latent cache {str(self.db_path)!r} is corrupted ({e}); it is deleted and rebuilt empty "
                "(latents are recomputed)"
            ),
            stacklevel=4,
        )
        self.close()
        assert self.db_path is not None
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.db_path) + suffix)

    def _run(self, what: str, fn, default):
        """Run fn(conn); on corruption rebuild once and retry; on other errors warn and disable."""
        if not self._enabled:
            return default
        for attempt in (0, 1):
            try:
                return fn(self._connect())
            except sqlite3.Error as e:
                if _is_corruption(e) and attempt == 0:
                    try:
                        self._rebuild(e)
                    except OSError as e2:
                        self._disable("be rebuilt", e2)
                        return default
                    continue
                self._disable(what, e)
                return default
            except OSError as e:  # cache folder cannot be created
                self._disable(what, e)
                return default
        return default

    # ----------------------------------------------------------------------------------------
    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, torch.Tensor]:
        """The cached latents (float32 tensors) for those of ``keys`` that are present."""
        wanted = [CacheKey(*k) for k in keys]
        groups: dict[tuple[str, str], list[str]] = {}
        for k in wanted:
            groups.setdefault((k.preprocess, k.autoencoder), []).append(k.content)

        def fetch(conn):
            out: dict[CacheKey, torch.Tensor] = {}
            bad = 0
            for (prep, ae), contents in groups.items():
                uniq = list(dict.fromkeys(contents))
                for s in range(0, len(uniq), _CHUNK):
                    part = uniq[s : s + _CHUNK]
                    q = (
                        "SELECT content, dtype, shape, data FROM latents WHERE preprocess = ? AND autoencoder = ? "
                        f"AND content IN ({','.join('?' * len(part))})"
                    )
                    for content, dt, shape, blob in conn.execute(q, (prep, ae, *part)):
                        t = _decode(dt, shape, blob)
                        if t is None:
                            bad += 1
                            continue
                        out[CacheKey(content, prep, ae)] = t
            if bad:
                warnings.warn(
                    CacheWarning(f"latent cache {str(self.db_path)!r}: {bad} damaged entries ignored (recomputed)"),
                    stacklevel=4,
                )
            return out

        found = self._run("be read", fetch, {})
        self.hits += sum(1 for k in wanted if k in found)
        self.misses += sum(1 for k in wanted if k not in found)
        return found

    def put_many(self, items: Mapping[CacheKey, torch.Tensor] | Iterable[tuple[CacheKey, torch.Tensor]]) -> int:
        """Store latents (any float tensors; kept at this cache's dtype). Returns how many were written."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        torch_dt, np_dt = _DTYPES[self.dtype]
        rows = []
        now = time.time()
        for key, t in pairs:
            k = CacheKey(*key)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise InputError(f"cache values must be float tensors, got {type(t).__name__} for {k.content[:12]}")
            a = t.detach().to("cpu", torch_dt).contiguous().numpy().astype(np_dt, copy=False)
            rows.append((k.content, k.preprocess, k.autoencoder, self.dtype, ",".join(map(str, a.shape)), a.tobytes(), now))
        if not rows or not self._enabled:
            return 0

        def write(conn):
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO latents VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return len(rows)

        n = self._run("be written", write, 0)
        self.writes += n
        return n

    def clear(self, *, autoencoder: str | None = None) -> int:
        """Delete every entry (or those of one autoencoder id). Returns how many were deleted."""

        def wipe(conn):
            if autoencoder is None:
                n = conn.execute("DELETE FROM latents").rowcount
            else:
                n = conn.execute("DELETE FROM latents WHERE autoencoder = ?", (autoencoder,)).rowcount
            with contextlib.suppress(sqlite3.OperationalError):  # another process may be reading
                conn.execute("VACUUM")
            return n

        return self._run("be cleared", wipe, 0)

    def stats(self) -> dict:
        """entries, bytes of latent data, file size, per-autoencoder/preprocessing counts, session hits/misses."""
        base = {
            "path": None if self.db_path is None else str(self.db_path),
            "enabled": self._enabled,
            "dtype": self.dtype,
            "hits": self.hits,
            "misses": self.misses,
            "writes": self.writes,
        }

        def count(conn):
            n, nbytes = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM latents").fetchone()
            groups = conn.execute(
                "SELECT autoencoder, preprocess, COUNT(*) FROM latents GROUP BY autoencoder, preprocess"
            ).fetchall()
            return {"entries": n, "data_bytes": nbytes, "groups": [{"autoencoder": a, "preprocess": p, "entries": c} for a, p, c in groups]}

        info = self._run("be read", count, {"entries": 0, "data_bytes": 0, "groups": []})
        base.update(info)
        base["enabled"] = self._enabled
        size = 0
        if self.db_path is not None:
            for suffix in ("", "-wal"):
                with contextlib.suppress(OSError):
                    size += os.path.getsize(str(self.db_path) + suffix)
        base["file_bytes"] = size
        return base


def _decode(dt: str, shape: str, blob) -> torch.Tensor | None:
    """One stored value -> float32 tensor, or None if the row is damaged."""
    if dt not in _DTYPES or not isinstance(blob, bytes):
        return None
    try:
        dims = tuple(int(x) for x in shape.split(",")) if shape else ()
    except ValueError:
        return None
    if any(d < 0 for d in dims):
        return None
    np_dt = np.dtype(_DTYPES[dt][1])
    if len(blob) != math.prod(dims) * np_dt.itemsize:
        return None
    a = np.frombuffer(blob, dtype=np_dt).reshape(dims).astype(np.float32)  # copies: writable
    return torch.from_numpy(a)
