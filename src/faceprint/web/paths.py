"""Paths from requests: resolved inside a served folder, or refused.

A request names a file or folder *relative* to one of the served folders (the models folder,
a data folder, a job's output folder). :func:`inside` refuses absolute paths, drive letters,
backslashes, ``..`` and hidden components before touching the disk, then resolves every
symbolic link and refuses a result outside the folder (a link inside a data folder that points
elsewhere is refused, not followed). Nothing inside the owner's folder (the fingerprint key) is
ever returned, whatever folder it sits in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,79}$")
SECRET_NAMES = {"key.safetensors", "secret.safetensors"}  # the owner's key files (datalevel, keyed)


class WebError(Exception):
    """A refusal with its HTTP status and one-line message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _within(p: Path, root: Path) -> bool:
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def inside(root: Path, rel: str, what: str, *, owner: Path | None = None, allow_empty: bool = False) -> Path:
    """``root / rel`` resolved, if it stays inside ``root`` (and outside ``owner``); else WebError 400/403."""
    if not isinstance(rel, str):
        raise WebError(400, f"{what}: expected a path relative to the served folder, got {type(rel).__name__}")
    if rel in ("", ".") and allow_empty:
        parts: tuple[str, ...] = ()
    else:
        if not rel or "\x00" in rel or "\\" in rel or len(rel) > 1024:
            raise WebError(400, f"{what} {rel!r}: not a valid relative path; use forward slashes, e.g. photos/person1")
        pp = PurePosixPath(rel)
        if pp.is_absolute() or re.match(r"^[A-Za-z]:", rel):
            raise WebError(403, f"{what} {rel!r}: absolute paths are refused; name a folder relative to the served "
                                "folder, e.g. celeba/images")
        parts = pp.parts
        if any(p in ("..", ".") for p in parts):
            raise WebError(403, f"{what} {rel!r}: '..' is refused; name a folder inside the served folder")
        if any(p.startswith(".") for p in parts):
            raise WebError(403, f"{what} {rel!r}: hidden files and folders are not served")
    root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root.joinpath(*parts)))
    if not _within(target, root):
        raise WebError(403, f"{what} {rel!r}: leads outside the served folder (through a symbolic link); refused")
    if owner is not None and (_within(target, Path(os.path.realpath(owner))) or target.name in SECRET_NAMES):
        raise WebError(403, f"{what} {rel!r}: the owner's fingerprint files are never served")
    return target


def check_name(name: str, what: str = "name") -> str:
    """A file name chosen by the user (model, instance): letters, digits, . _ - and spaces."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name.endswith(".") or ".." in name:
        raise WebError(400, f"{what} {name!r}: use 1-80 letters, digits, '.', '_', '-' or spaces, starting with a "
                            "letter or digit, e.g. my-model")
    return name.strip()
