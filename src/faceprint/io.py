"""Artifact save/load (safetensors + JSON metadata), atomic writes, sha256.

An artifact is one .safetensors file. Its tensors hold the learned state; its metadata (a
str -> str map in the safetensors header) holds JSON strings: the format version, the class,
the config and the provenance (faceprint version, data hash, seed, creation time). Nothing is
ever pickled, so loading an artifact from an untrusted source cannot run code, and every
artifact is validated (:mod:`faceprint.validation`) before a class builds an object from it.

Writes go to a temporary file beside the target (``.<name>.<pid>.<random>.tmp``), which is
flushed to disk and renamed over the target only when complete: a crash or ``kill -9`` leaves
the previous file intact. Temporary files of writers that died are removed by the next
successful write to the same path.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path

import torch

from . import __version__
from .errors import ArtifactError, FaceprintError, InputError, OutputError, SpecialFileError

FORMAT_VERSION = 1

#: Largest file sha256_file reads unless told otherwise (a photo folder's file, a model).
DEFAULT_MAX_READ = 1 << 36  # 64 GiB: only a bound against endless files
#: Seconds a single file may take to hash before it is given up as "not making progress".
DEFAULT_READ_SECONDS = 600.0


def _err(cls, code, message: str):
    """An OSError subclass whose str() is ``message`` alone, with ``errno`` set."""
    e = cls(message)
    e.errno = code
    return e


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path, what: str = "file") -> int:
    """Open ``path`` for reading without ever blocking on it: a FIFO, device or socket (also
    behind a symlink) is refused before or right after opening (O_NONBLOCK), never read.
    Returns a file descriptor of a regular file (the caller closes it)."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise _err(SpecialFileError, e.errno, f"{what} {path!r} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _err(SpecialFileError, errno.EINVAL, f"{what} {path!r} is {_kind_of(st.st_mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _err(SpecialFileError, e.errno, f"{what} {path!r} cannot be read ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # swapped between stat and open
        os.close(fd)
        raise _err(SpecialFileError, errno.EINVAL, f"{what} {path!r} is {_kind_of(st.st_mode)}, not a regular file")
    return fd


def sha256_file(path, chunk: int = 1 << 20, *, max_bytes: int | None = DEFAULT_MAX_READ,
                max_seconds: float | None = DEFAULT_READ_SECONDS) -> str:
    """Hex sha256 of a regular file's bytes.

    Raises SpecialFileError (an OSError) for a FIFO, device, socket or folder, for a file that
    reads past ``max_bytes`` (e.g. a /proc file that never ends) or that takes more than
    ``max_seconds`` (a read that makes no progress). Whatever ``max_bytes``, no more than the
    file's size at open plus 64 MiB is read (a file that keeps growing, or a /proc file that
    never ends, is refused rather than read forever)."""
    fd = open_regular(path)
    size = os.fstat(fd).st_size
    bound = size + (64 << 20)
    max_bytes = bound if max_bytes is None else min(max_bytes, bound)
    h = hashlib.sha256()
    total = 0
    t0 = time.monotonic()
    try:
        with os.fdopen(fd, "rb", closefd=True) as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
                total += len(block)
                if max_bytes is not None and total > max_bytes:
                    raise _err(SpecialFileError, errno.EFBIG, f"file {str(path)!r} reads past {max_bytes} bytes "
                                                        f"(its size is {size}: it grows or does not end); not read further")
                if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                    raise _err(SpecialFileError, errno.ETIMEDOUT, f"file {str(path)!r} was not read within "
                                                            f"{max_seconds:.0f} s; not read further")
    except SpecialFileError:
        raise
    except OSError as e:
        raise _err(SpecialFileError, e.errno, f"file {str(path)!r} cannot be read ({e.strerror or e})") from None
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]{8})\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(folder), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _output_error(path, e: OSError) -> OutputError:
    return _err(OutputError, e.errno, f"cannot write {str(path)!r}: {e.strerror or e}")


def remove_stale_temporaries(folder, name: str | None = None) -> int:
    """Remove the temporary files (of the target ``name``, or of any target) that writers which
    died left in ``folder``; returns how many were removed."""
    n = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        m = _TMP_RE.match(e.name)
        if not m:
            continue
        target = m.group("name")
        while (inner := _TMP_RE.match(target)) is not None:  # a temporary of a temporary (nested atomic writes)
            target = inner.group("name")
        if (name is None or target == name) and not _pid_alive(int(m.group("pid"))):
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                n += 1
    return n


@contextlib.contextmanager
def atomic_path(path, mode: int | None = None, *, durable: bool = True, cleanup: bool = True):
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The file gets ``mode`` (default: what a plain ``open`` would give under the umask, not the
    0600 of the temporary file); pass 0o600 for secrets such as an owner's fingerprint key.
    The temporary file is flushed to disk before the rename, so the target holds either the
    previous content or the complete new one. An OSError (read-only folder, disk full,
    permission denied) becomes an OutputError naming ``path``. ``durable=False`` skips the
    fsyncs (still atomic against a crash of the process, not of the machine); ``cleanup=False``
    leaves the removal of dead writers' temporary files to the caller
    (:func:`remove_stale_temporaries`), e.g. when writing thousands of files to one folder."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output folder {str(parent)!r} does not exist; create it first or choose another -o path")
    if not parent.is_dir():
        raise _err(OutputError, errno.ENOTDIR, f"cannot write {str(path)!r}: {str(parent)!r} is not a folder")
    if path.is_dir():
        raise _err(OutputError, errno.EISDIR, f"cannot write {str(path)!r}: it is a folder; choose a file name")
    tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.close(fd)
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        try:
            yield tmp
            os.chmod(tmp, _FILE_MODE if mode is None else mode)
            if durable:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except FaceprintError:
            raise
        except OSError as e:
            raise _output_error(path, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(parent)
    if cleanup:
        remove_stale_temporaries(parent, path.name)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def optimizer_tensors(prefix: str, state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer's ``state_dict()`` in a form :func:`save_artifact` can hold without pickle:
    its per-parameter state as tensors named ``PREFIX.PARAM_ID.KEY`` (numbers as 0-d tensors),
    and its ``param_groups`` (plain JSON) to put in the metadata. :func:`optimizer_state` inverts it."""
    tensors = {}
    for pid, st in state_dict["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{pid}.{k}"] = (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().contiguous()
    return tensors, state_dict["param_groups"]


def optimizer_state(prefix: str, tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    """The ``state_dict`` for ``Optimizer.load_state_dict`` from :func:`optimizer_tensors`' tensors
    (others in ``tensors`` are ignored) and the saved ``param_groups``."""
    state: dict = {}
    head = prefix + "."
    for name, v in tensors.items():
        if name.startswith(head):
            pid, key = name[len(head):].split(".", 1)
            state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": param_groups}


def save_artifact(path, tensors: dict[str, torch.Tensor], meta: dict, *, mode: int | None = None) -> None:
    """Write tensors and JSON-serialisable metadata to one .safetensors file, atomically.

    ``meta`` keys become header entries whose values are JSON strings. ``format_version`` and
    ``faceprint_version`` are added.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    header = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
    header["format_version"] = json.dumps(FORMAT_VERSION)
    header["faceprint_version"] = json.dumps(__version__)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, mode) as tmp:
        try:
            save_file(clean, str(tmp), metadata=header)
        except SafetensorError as e:  # the I/O errors of the Rust writer (disk full, file too large)
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            raise _err(OutputError, errno.EIO, f"cannot write {str(path)!r}: {msg}") from None


def load_artifact(path, expected_class: str | None = None, *, validate: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an artifact written by save_artifact; return (tensors, metadata with JSON decoded).

    The metadata's schema and the tensors are validated for the artifact's class
    (:func:`faceprint.validation.validate_artifact`) unless ``validate`` is False; a failed
    check is an ArtifactError naming the file, the field and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ArtifactError(f"model file {str(path)!r} does not exist; pass the path written by `faceprint fit`") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"model file {str(path)!r} is {_kind_of(st.st_mode)}, not a model file; "
                            "pass the path written by `faceprint fit`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
        raise ArtifactError(
            f"model file {str(path)!r} is not a readable faceprint artifact ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); "
            "it may be truncated or of another format: re-create it with `faceprint fit`"
        ) from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except (json.JSONDecodeError, TypeError, RecursionError) as e:
        raise ArtifactError(f"model file {str(path)!r} has corrupted metadata ({e}); re-create it with `faceprint fit`") from None
    from .validation import validate_artifact, validate_header

    validate_header(path, meta, max_version=FORMAT_VERSION)
    if expected_class is not None and meta.get("class") != expected_class:
        raise ArtifactError(
            f"model file {str(path)!r} holds a {meta.get('class')!r}, expected a {expected_class!r}"
        )
    if validate:
        validate_artifact(path, tensors, meta)
    return tensors, meta
