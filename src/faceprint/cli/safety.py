"""What every command checks before it does any work: that no output is, overwrites or lands
inside one of its inputs; that every output can be written (its folder exists, is a folder and
is writable; the path is not a folder; the disk has room); and that inputs which must be
regular files are not FIFOs, devices or sockets (which would block the command forever).

Outputs a command names itself (a face file in the ``-o`` folder, ``provenance.json``, the
``<grid>_provenance.png`` beside a grid) replace an existing file only when that file was
written by faceprint (PNG text chunk ``Software: faceprint``, or a faceprint provenance JSON):
a user's own file of the same name is never overwritten. Outputs the user names (``-o``,
``--grid``, ``--json``) are replaced, atomically, unless they are an input.

Nothing here writes; a refusal is an InputError/OutputError (one line, exit 2) raised before
the command has created anything.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

from ..errors import InputError, OutputError, SpecialFileError

SOFTWARE = "faceprint"
PROVENANCE_SIGNATURE = '{"faceprint": "provenance"'


def _err(cls, code, message):
    e = cls(message)
    e.errno = code
    return e


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return _resolve(a) == _resolve(b)


def _resolve(p: Path) -> Path:
    try:
        return Path(os.path.realpath(p))
    except (OSError, RuntimeError):
        return Path(os.path.abspath(p))


def _inside(p: Path, folder: Path) -> bool:
    rp, rf = _resolve(p), _resolve(folder)
    return rp == rf or rf in rp.parents


def _location(p: Path) -> Path:
    """Where a write to ``p`` lands: a write replaces a symlink itself, so its folder is
    resolved but not its last component."""
    return _resolve(p.parent if str(p.parent) else Path(".")) / p.name


def _written_inside(p: Path, folder: Path) -> bool:
    loc, rf = _location(p), _resolve(folder)
    return loc == rf or rf in loc.parents or _inside(p, folder)


class Plan:
    """The inputs and outputs of one command, checked together by :meth:`check`.

    ``input_file(flag, path)``: a file the command reads (model, labels, key, ...).
    ``input_folder(flag, path)``: a folder whose files the command reads (photos).
    ``output_file(flag, path, named=True)``: a file the command writes; named=False for
    names the command chose (replaced only if faceprint wrote them).
    ``output_folder(flag, path)``: a folder the command creates if missing and writes into.
    """

    def __init__(self):
        self.inputs: list[tuple[str, Path]] = []
        self.input_dirs: list[tuple[str, Path]] = []
        self.outputs: list[tuple[str, Path, bool]] = []
        self.output_dirs: list[tuple[str, Path]] = []

    def input_file(self, flag: str, path) -> "Plan":
        if path is not None:
            self.inputs.append((flag, Path(path)))
        return self

    def input_folder(self, flag: str, path) -> "Plan":
        if path is not None:
            self.input_dirs.append((flag, Path(path)))
        return self

    def output_file(self, flag: str, path, *, named: bool = True) -> "Plan":
        if path is not None:
            self.outputs.append((flag, Path(path), named))
        return self

    def output_folder(self, flag: str, path) -> "Plan":
        if path is not None:
            self.output_dirs.append((flag, Path(path)))
        return self

    # ------------------------------------------------------------------------------------
    def check(self) -> None:
        for flag, d in self.output_dirs:
            _check_output_dir(flag, d)
            for what, i in self.inputs:
                if _same(d, i):
                    raise InputError(f"{flag} {str(d)!r} is the {what} input; choose another folder")
            for what, i in self.input_dirs:
                if _written_inside(d, i):
                    raise InputError(f"{flag} {str(d)!r} is inside the {what} folder {str(i)!r}, which the command "
                                     "reads; write the outputs elsewhere")
        seen: dict[Path, str] = {}
        for flag, p, named in self.outputs:
            rp = _location(p)
            if rp in seen:
                raise InputError(f"{flag} {str(p)!r} is also the output of {seen[rp]}; give each output its own path")
            seen[rp] = flag
            for what, i in self.inputs:
                if _same(p, i):
                    raise InputError(f"{flag} {str(p)!r} is the {what} input; an output never replaces an input: "
                                     "choose a new file name")
            for what, i in self.input_dirs:
                if _written_inside(p, i) and (p.exists() or p.is_symlink()):
                    raise InputError(f"{flag} {str(p)!r} is a file inside the {what} folder {str(i)!r}, which the "
                                     "command reads; write the output elsewhere")
            _check_output_file(flag, p, named)


def _check_output_dir(flag: str, d: Path) -> None:
    if d.exists() and not d.is_dir():
        raise _err(OutputError, errno.ENOTDIR, f"{flag} {str(d)!r} exists and is not a folder; choose a folder path")
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise _err(OutputError, errno.ENOTDIR, f"{flag} {str(d)!r}: {str(probe)!r} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _err(OutputError, errno.EACCES, f"{flag} {str(d)!r}: folder {str(probe)!r} is not writable "
                                              "(read-only or permission denied); choose another place")


def _check_output_file(flag: str, p: Path, named: bool) -> None:
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise _err(OutputError, errno.EISDIR, f"{flag} {str(p)!r} is a folder; give a file name")
    if parent.exists():
        if not parent.is_dir():
            raise _err(OutputError, errno.ENOTDIR, f"{flag} {str(p)!r}: {str(parent)!r} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise _err(OutputError, errno.EACCES, f"{flag} {str(p)!r}: folder {str(parent)!r} is not writable "
                                                  "(read-only or permission denied); choose another place")
    if not named and (p.exists() or p.is_symlink()) and not written_by_faceprint(p):
        raise InputError(f"{flag}: {str(p)!r} already exists and was not written by faceprint; it is not "
                         "overwritten: move it away or choose another output path")


def check_parent_exists(flag: str, p: Path) -> None:
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{flag} {str(p)!r}: folder {str(parent)!r} does not exist; create it first")


def written_by_faceprint(p: Path) -> bool:
    """True if ``p`` is a regular file faceprint wrote as an output (see the module docstring)."""
    try:
        st = os.lstat(p)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        # tEXt chunks written by PIL's PngInfo come before the image data
        return b"tEXtSoftware\x00" + SOFTWARE.encode() in head
    if p.suffix == ".safetensors" and len(head) >= 8:
        # a safetensors header (8-byte little-endian length, then JSON) with faceprint metadata
        n = int.from_bytes(head[:8], "little")
        if n <= 100 << 20:
            try:
                with open(p, "rb") as f:
                    f.seek(8)
                    header = json.loads(f.read(n))
            except (OSError, ValueError):
                return False
            meta = header.get("__metadata__") if isinstance(header, dict) else None
            return isinstance(meta, dict) and "faceprint_version" in meta and "format_version" in meta
        return False
    if p.suffix == ".json":
        if head.startswith(PROVENANCE_SIGNATURE.encode()):
            return True
        # provenance.json of faceprint before this signature: the same four keys
        if st.st_size <= 64 << 20:
            try:
                doc = json.loads(Path(p).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            return isinstance(doc, dict) and {"seed", "method", "faces", "note"} <= set(doc)
    return False


def regular_input(flag: str, path: Path, what: str = "file") -> Path:
    """Refuse an input that must be a regular file but is missing, a folder, a FIFO, a device
    or a socket (reading a FIFO or /dev/zero would block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{flag} {str(path)!r}: {what} does not exist") from None
    except OSError as e:
        raise _err(SpecialFileError, e.errno, f"{flag} {str(path)!r}: cannot read the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        from ..io import _kind_of

        raise _err(SpecialFileError, errno.EINVAL,
                   f"{flag} {str(path)!r} is {_kind_of(st.st_mode)}, not a regular {what}")
    return path


# ----------------------------------------------------------------------------------------
# disk space


def free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return -1


def face_bytes(size: int, latent: int, provenance: bool) -> int:
    """An upper bound of the bytes written per generated face: the PNG (at most the raw pixels
    plus headers), with --provenance its map PNG and its provenance.json entry."""
    b = size * size * 3 + 1024
    if provenance:
        b += size * size * 3 // 16 + 1024 + latent * latent * 8 + 512
    return b


def check_disk(flag: str, folder: Path, n: int, per_face: int, extra: int = 0, *, reserve: int = 64 << 20) -> None:
    """Refuse, before anything is written, n faces whose output would not fit on the disk."""
    need = n * per_face + extra
    free = free_bytes(folder)
    if free >= 0 and need + reserve > free:
        raise _err(OutputError, errno.ENOSPC,
                   f"{flag} {str(folder)!r}: {n} faces need up to {_human(need)} but the disk has {_human(free)} free "
                   f"(keeping {_human(reserve)} spare); generate fewer faces (-n) or free space")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"


# ----------------------------------------------------------------------------------------
# the face files a generate run writes

FACE_RE = re.compile(r"^face_(\d{6,})(_map)?\.png$")


def check_face_files(flag: str, out_dir: Path, start: int, n: int, provenance: bool) -> None:
    """Refuse when a face file this run writes (face_<i>.png, face_<i>_map.png,
    provenance.json in ``out_dir``) exists and was not written by faceprint. One listing of the
    folder, so it costs nothing for a large n."""
    if not out_dir.is_dir():
        return
    try:
        names = os.listdir(out_dir)
    except OSError as e:
        raise _err(OutputError, e.errno, f"{flag} {str(out_dir)!r} cannot be listed ({e.strerror or e})") from None
    for name in names:
        m = FACE_RE.match(name)
        hit = False
        if m:
            i = int(m.group(1))
            hit = start <= i < start + n and (provenance or not m.group(2)) and f"{i:06d}" == m.group(1)
        elif name == "provenance.json" and provenance:
            hit = True
        if hit:
            p = out_dir / name
            if not written_by_faceprint(p):
                raise InputError(f"{flag}: {str(p)!r} already exists and was not written by faceprint; it is not "
                                 "overwritten: move it away or choose another -o folder")
