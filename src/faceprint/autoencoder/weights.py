"""Locate, verify and load the pretrained TAEF2 weights (docs/TAEF2.md).

The weights are two plain state_dict files, ``taef2_encoder.pth`` and ``taef2_decoder.pth``,
from the TAESD family of tiny autoencoders by madebyollin (MIT licence). faceprint never trains
them; it pins their sha256 here and loads them with ``torch.load(..., weights_only=True)``, so a
replaced or damaged file is refused instead of silently changing every latent.

Lookup order (the first that applies wins):

1. the explicit ``weights`` folder (``--weights DIR`` on the command line);
2. the folder named by the environment variable ``FACEPRINT_WEIGHTS``;
3. ``../shared/weights/taef2`` beside the repository (found from this source file by walking
   up to the folder holding ``pyproject.toml``), then ``../shared/weights/taef2`` from the
   current working directory;
4. the user cache, ``$XDG_CACHE_HOME/faceprint/weights/taef2`` (default ``~/.cache/...``).

An explicit folder (1 or 2) is authoritative: if it does not hold intact files, loading fails
and says so, rather than quietly falling back to another copy the user did not ask for.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import WeightsError
from ..io import sha256_file

ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
WEIGHT_FILES = (ENCODER_FILE, DECODER_FILE)

#: sha256 of the files faceprint was built and tested with (../shared/weights/taef2/SHA256SUMS).
SHA256 = {
    ENCODER_FILE: "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    DECODER_FILE: "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}

ENV_VAR = "FACEPRINT_WEIGHTS"

UPSTREAM = (
    "The weights come from the TAESD family of tiny autoencoders by madebyollin "
    "(https://github.com/madebyollin/taesd, files taef2_encoder.pth and taef2_decoder.pth, MIT licence)."
)

HOW_TO_FIX = (
    f"Put intact copies of {ENCODER_FILE} and {DECODER_FILE} in one of these folders, "
    f"or pass --weights DIR (weights=DIR in Python) or set {ENV_VAR}=DIR to a folder holding them."
)


def weights_id() -> str:
    """Short identifier of the pinned weights: ``"taef2-"`` + 16 hex digits.

    The digits are the start of the sha256 of ``"<encoder sha256>:<decoder sha256>"``; they change
    whenever either pinned file changes, so cache keys and artifacts built on them change too.
    """
    both = f"{SHA256[ENCODER_FILE]}:{SHA256[DECODER_FILE]}".encode()
    return "taef2-" + hashlib.sha256(both).hexdigest()[:16]


def _repo_root() -> Path | None:
    """The folder holding pyproject.toml above this source file, if any (source checkouts)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "faceprint" / "weights" / "taef2"


def search_path(weights=None) -> list[tuple[str, Path]]:
    """The folders :func:`find_weights` would look in, in order, each with where it came from.

    With an explicit ``weights`` folder, or with ``FACEPRINT_WEIGHTS`` set, that folder alone is
    returned (it is authoritative). Otherwise the shared folder beside the repository, the one
    relative to the working directory and the user cache, without duplicates.
    """
    if weights is not None:
        return [("argument weights / --weights", Path(weights).expanduser())]
    env = os.environ.get(ENV_VAR)
    if env:
        return [(f"environment variable {ENV_VAR}", Path(env).expanduser())]
    places: list[tuple[str, Path]] = []
    root = _repo_root()
    if root is not None:
        places.append(("beside the repository", root.parent / "shared" / "weights" / "taef2"))
    places.append(("beside the working directory", Path.cwd().parent / "shared" / "weights" / "taef2"))
    places.append(("user cache", _cache_dir()))
    seen: set[str] = set()
    unique = []
    for label, path in places:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            unique.append((label, path))
    return unique


def _describe(path: Path) -> str:
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder (pass the folder that holds the two .pth files)"
    missing = [f for f in WEIGHT_FILES if not (path / f).is_file()]
    if len(missing) == len(WEIGHT_FILES):
        return "holds neither file"
    if missing:
        return f"has no {missing[0]}"
    return "holds both files"


def _places_text(places) -> str:
    return "\n".join(f"  {i}. {path} ({label}): {_describe(path)}" for i, (label, path) in enumerate(places, 1))


def find_weights(weights=None) -> Path:
    """Return the folder holding intact ``taef2_encoder.pth`` and ``taef2_decoder.pth``.

    Parameters
    ----------
    weights : str or os.PathLike, optional
        A folder to use instead of the default lookup (see the module docstring for the order).

    Returns
    -------
    pathlib.Path
        The folder; both files in it match their pinned sha256.

    Raises
    ------
    WeightsError
        If no place holds both files, or a file fails its checksum. The message lists every
        place looked, names the failing file (with expected and actual sha256 when corrupted)
        and says where the upstream weights come from.
    """
    places = search_path(weights)
    explicit = weights is not None or bool(os.environ.get(ENV_VAR))
    found = next(
        (path for _, path in places if path.is_dir() and all((path / f).is_file() for f in WEIGHT_FILES)),
        None,
    )
    if found is None:
        note = (
            "\n(An explicit folder was given, so no other place was searched.)" if explicit else ""
        )
        raise WeightsError(
            f"TAEF2 weights not found: no folder holds both {ENCODER_FILE} and {DECODER_FILE}. "
            f"Places looked, in order:\n{_places_text(places)}{note}\n{UPSTREAM}\n{HOW_TO_FIX}"
        )
    for name in WEIGHT_FILES:
        file = found / name
        actual = sha256_file(file)
        if actual != SHA256[name]:
            raise WeightsError(
                f"TAEF2 weights file {file} is corrupted or not the expected version: "
                f"sha256 {actual}, expected {SHA256[name]}. Places looked, in order:\n{_places_text(places)}\n"
                f"{UPSTREAM} Replace the file with an intact copy (or delete it and use another folder).\n{HOW_TO_FIX}"
            )
    return found


def load_state_dicts(weights=None) -> tuple[Path, dict, dict]:
    """Find and verify the weights, then load them.

    Returns
    -------
    folder, encoder_state_dict, decoder_state_dict
        The state dicts hold the stored tensors (float16) on the CPU.
    """
    import pickle

    import torch

    folder = find_weights(weights)
    dicts = []
    for name in WEIGHT_FILES:
        try:
            sd = torch.load(folder / name, weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
            raise WeightsError(
                f"TAEF2 weights file {folder / name} passed its checksum but could not be loaded "
                f"({e.__class__.__name__}: {e}). {UPSTREAM}"
            ) from None
        if not isinstance(sd, dict):
            raise WeightsError(f"TAEF2 weights file {folder / name} holds a {type(sd).__name__}, not a state_dict")
        dicts.append(sd)
    return folder, dicts[0], dicts[1]
