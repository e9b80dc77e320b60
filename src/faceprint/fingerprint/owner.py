"""The model owner's side of fingerprinting: key, registry, calibration; issue and verify.

A model owner fits one faceprint model and hands a separate copy (an *instance*) to each user.
Every instance carries its own 128-bit code in the latent memory its refinement step copies
from (the data-level mechanism of :mod:`faceprint.fingerprint.datalevel`, the default: it is
the only one of the three mechanisms that is blind, survives fit -> generate exactly, and costs
nothing at generation time; see ``python -m faceprint.bench fingerprint``). The owner keeps
three things, by default together in one folder (:func:`default_owner_dir`):

  key.safetensors          the secret embedding key (slot assignment, spreading vectors,
                           dithers; file mode 0600). Made on the first ``issue`` from the
                           model's memory and a random key seed. Without it nobody can read
                           or forge a code, and neither can the owner: back it up.
  registry.sqlite          the issued codes (faceprint.fingerprint.registry); PostgreSQL via a
                           URL instead, if several people issue.
  calibration.safetensors  the measured distribution of matching bits of negatives (images
                           that carry none of the codes), which sets the decision threshold and
                           the false-positive rate a verdict reports.

Calibration compares each negative with ``CALIBRATION_CODES`` random codes (not only the
issued ones), so one calibration serves every registry of up to that many instances without
a union-bound penalty: a registry's codes are random draws too, and the best match among
fewer codes is stochastically smaller.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..seeding import generator as make_generator
from .datalevel import MECHANISM, BankFingerprintConfig, BankFingerprinter, fingerprint_bank_instance

__all__ = ["CALIBRATION_CODES", "Owner", "default_owner_dir", "issue_instance", "decode_images"]

CALIBRATION_CODES = 1024
KEY_FILE = "key.safetensors"
REGISTRY_FILE = "registry.sqlite"
CALIBRATION_FILE = "calibration.safetensors"


def default_owner_dir() -> Path:
    """``$FACEPRINT_OWNER_DIR``, else ``$XDG_DATA_HOME/faceprint/owner`` (``~/.local/share/...``)."""
    env = os.environ.get("FACEPRINT_OWNER_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "faceprint" / "owner"


@dataclass
class Owner:
    """Where an owner's key, registry and calibration live.

    Parameters
    ----------
    folder : path, optional
        Default :func:`default_owner_dir`.
    registry : str or path, optional
        A registry URL (``sqlite:///...``, ``postgresql+psycopg://...``) or SQLite file; default
        ``folder/registry.sqlite``.
    calibration : path, optional
        Default ``folder/calibration.safetensors``.
    """

    folder: Path | None = None
    registry: str | Path | None = None
    calibration: Path | None = None

    def __post_init__(self):
        self.folder = Path(self.folder).expanduser() if self.folder is not None else default_owner_dir()
        if self.registry is None:
            self.registry = self.folder / REGISTRY_FILE
        self.calibration = Path(self.calibration).expanduser() if self.calibration is not None \
            else self.folder / CALIBRATION_FILE

    @property
    def key_path(self) -> Path:
        return self.folder / KEY_FILE

    def _ensure_folder(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.chmod(self.folder, 0o700)
        except OSError as e:
            raise InputError(f"owner folder {str(self.folder)!r} cannot be created ({e}); pass --owner DIR") from None

    def _local_registry(self) -> Path | None:
        """The SQLite file of the registry when it is a path (not a URL), else None."""
        if isinstance(self.registry, Path) or "://" not in str(self.registry):
            return Path(self.registry).expanduser()
        return None

    def registry_in_folder(self) -> bool:
        p = self._local_registry()
        return p is not None and os.path.abspath(p.parent) == os.path.abspath(self.folder)

    def open_registry(self, *, create: bool = True):
        """The Registry. ``create=False`` (reading commands: list, verify) never creates the
        owner folder or the SQLite file: a missing one is an error."""
        from .registry import Registry

        path = self._local_registry()
        if path is not None:
            if not path.parent.exists():
                if self.registry_in_folder() and create:
                    self._ensure_folder()
                elif self.registry_in_folder():
                    raise InputError(f"no registry at {str(path)!r}: the owner folder {str(self.folder)!r} does not exist; "
                                     "issue an instance first or pass the --owner folder that holds registry.sqlite")
                else:
                    raise InputError(f"registry folder {str(path.parent)!r} does not exist; create it or pass another --registry")
            elif not create and not path.exists():
                raise InputError(f"no registry at {str(path)!r}: issue an instance first, or pass the --owner folder or "
                                 "--registry that holds it")
        return Registry(self.registry)

    def load_key(self) -> BankFingerprinter:
        if not self.key_path.is_file():
            raise InputError(f"no fingerprint key at {str(self.key_path)!r}: issue an instance first "
                             "(`faceprint fingerprint issue`), or pass the --owner folder that holds key.safetensors")
        return BankFingerprinter.load(self.key_path)

    def prepare_key(self, gen, *, key_seed: int | None = None) -> tuple[BankFingerprinter, bool]:
        """(the owner's key, whether it is new). A new key is made from ``gen``'s memory but
        not saved: nothing is written (see :meth:`key_for`)."""
        if self.key_path.is_file():
            key = BankFingerprinter.load(self.key_path)
            shape = tuple(gen.bank_.shape[1:])
            if tuple(key.shape_) != shape:
                raise ConfigError(f"the owner key {str(self.key_path)!r} is for latents of shape {tuple(key.shape_)}, "
                                  f"this model's are {shape} (another image size): use another --owner folder")
            if key_seed is not None and key.config.key_seed != key_seed:
                raise ConfigError(f"the owner key {str(self.key_path)!r} was made with another key seed than the "
                                  f"{key_seed} asked for: drop the key seed to use the existing key, or pass another "
                                  "--owner folder for a new one")
            return key, False
        if self.key_path.exists() or self.key_path.is_symlink():
            raise InputError(f"owner key path {str(self.key_path)!r} exists but is not a regular file; move it away")
        seed = secrets.randbits(62) if key_seed is None else key_seed
        key = BankFingerprinter(BankFingerprintConfig(key_seed=seed)).fit(gen.bank_.float(), gen.autoencoder)
        return key, True

    def key_for(self, gen, *, key_seed: int | None = None) -> BankFingerprinter:
        """The owner's key, made from ``gen``'s memory on first use (a random secret key seed
        unless ``key_seed`` is given, for reproducible experiments). An existing key is reused;
        asking for a ``key_seed`` it was not made with is an error, not a silent substitution."""
        key, new = self.prepare_key(gen, key_seed=key_seed)
        if new:
            self._ensure_folder()
            key.save(self.key_path)
        return key

    def load_calibration(self):
        from .verification import Calibration

        if not self.calibration.is_file():
            raise InputError(f"no calibration at {str(self.calibration)!r}: measure the false-positive rate first with "
                             "`faceprint fingerprint calibrate MODEL --negatives PHOTOS/`")
        return Calibration.load(self.calibration)


def issue_instance(gen, model_hash: str, owner: Owner, recipient: str, instance: str, *,
                   seed: int | None = None, key_seed: int | None = None, note: str | None = None,
                   output=None):
    """Draw a new code in the owner's registry and return (entry, fingerprinted copy of ``gen``).

    ``seed`` draws the code reproducibly (default: from the operating system's randomness).
    With ``output`` (a path) the instance is also written there, inside the registry's write
    transaction: the code is recorded only if the file was written completely.

    A refusal (a bad field or seed, an instance name already issued, an unreachable registry,
    a missing registry folder, an output that cannot be written) leaves nothing behind: no
    owner folder, key, registry file or output is created by a call that fails."""
    import contextlib

    from ..io import atomic_path
    from ..seeding import check_seed
    from .registry import check_entry_fields

    check_entry_fields(recipient, instance, model_hash, MECHANISM, note)
    if seed is not None:
        check_seed(seed)
    folder_existed = owner.folder.exists()
    local = owner._local_registry()
    registry_existed = local is None or local.exists()
    key_saved = committed = False
    box = {}
    key = None

    def build(entry, path=None):
        inst = fingerprint_bank_instance(gen, key, entry.bits, {"instance": instance, "recipient": recipient,
                                                                "issued_at": entry.issued_at})
        inst.record_operation({"operation": "fingerprint", "mechanism": MECHANISM, "instance": instance,
                               "recipient": recipient, "base_model_sha256": model_hash})
        if path is not None:
            inst.save(path)
        box["inst"] = inst

    try:
        with owner.open_registry() as reg:  # an external registry is reached before anything is created
            if reg.instance_taken(instance):
                raise InputError(f"instance {instance!r} already has a code in registry {reg.url!r}; "
                                 "choose a new instance name (one code per model instance)")
            key, new_key = owner.prepare_key(gen, key_seed=key_seed)  # writes nothing
            if new_key:
                owner._ensure_folder()
                key.save(owner.key_path)
                key_saved = True
            code_seed = secrets.randbits(62) if seed is None else seed
            if output is None:
                entry = reg.issue(recipient, instance, model_hash, MECHANISM, seed=code_seed, note=note,
                                  before_commit=build)
                committed = True
            else:
                with atomic_path(output) as tmp:
                    entry = reg.issue(recipient, instance, model_hash, MECHANISM, seed=code_seed, note=note,
                                      before_commit=lambda e: build(e, tmp))
                    committed = True
    except BaseException as e:
        if committed:  # the rename after the commit failed: say what is where
            from ..errors import OutputError

            raise OutputError(f"the code for instance {instance!r} is recorded in the registry but {str(output)!r} "
                              f"was not written ({e}); issue again under another --instance name") from None
        if key_saved:
            with contextlib.suppress(OSError):
                owner.key_path.unlink()
        if not registry_existed and local is not None and local.exists():
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(str(local) + suffix).unlink()
        if not folder_existed:
            with contextlib.suppress(OSError):
                owner.folder.rmdir()
        raise
    return entry, box["inst"]


@torch.no_grad()
def decode_images(images: torch.Tensor | Iterable[torch.Tensor], key: BankFingerprinter, autoencoder, *,
                  crop_search: float | None = None) -> torch.Tensor:
    """Decoded bits (N, 128) bool of images (N, 3, H, W) in [0, 1], or of an iterable of such batches.

    ``crop_search``: also undo centre crops keeping at least this fraction of the side
    (:meth:`BankFingerprinter.decode_bits_searched`, one encode per candidate size); None: the
    aligned read-out only."""
    batches = [images] if isinstance(images, torch.Tensor) else images
    if crop_search is None:
        out = [key.decode_bits(b, autoencoder) > 0.5 for b in batches]
    else:
        out = [key.decode_bits_searched(b, autoencoder, min_fraction=crop_search)[0] > 0.5 for b in batches]
    if not out:
        raise InputError("no images to decode")
    return torch.cat(out)


def calibrate(decoded_negatives: torch.Tensor, *, codes: int = CALIBRATION_CODES, seed: int = 0,
              description: str = "", config=None):
    """A Calibration from decoded negatives against ``codes`` random codes (seeded)."""
    from .registry import random_code
    from .verification import Calibration

    g = make_generator(seed, "fingerprint-calibration-codes")
    c = torch.stack([random_code(generator=g) for _ in range(codes)])
    return Calibration.from_negatives(decoded_negatives, c, config=config, description=description)
