"""The model owner's side of fingerprinting: secrets, base models, registry, calibration; issue and verify.

A model owner fits one faceprint model and hands a separate copy (an *instance*) to each user.
Every instance carries its own fingerprint in the latent memory its refinement step copies
from. Two mechanisms (``issue --mechanism``):

- ``keyed-bank`` (default; :mod:`faceprint.fingerprint.keyed`): a secret of each instance's
  own (HMAC of the owner's master secret and the instance's registry code) expands into a
  Gaussian pattern added to the bank; verification is non-blind against the owner's copy of the
  unfingerprinted base model, and its false-accusation rate is exact (a standard normal tail).
  It holds against the recipient (threat model in that module and the README).
- ``datalevel-bank`` (:mod:`faceprint.fingerprint.datalevel`): one owner key shared by every
  instance, a blind 128-bit code read back by lattice decoding. A recipient can recover that key
  from their own instance (``python -m faceprint.bench redteam``), strip their code and forge
  anyone's: keep it only where recipients are trusted and blind decoding is needed.

The owner keeps, by default together in one folder (:func:`default_owner_dir`, mode 0700):

  secret.safetensors       keyed-bank: the 256-bit master secret and the public carrier
                           directions (file mode 0600). Made on the first keyed ``issue``.
                           Without it nobody can verify: back it up.
  bases/<sha256>.safetensors
                           keyed-bank: the unfingerprinted model each instance was issued from
                           (verification subtracts its clean bank).
  key.safetensors          datalevel-bank: the shared embedding key (slot assignment, spreading
                           vectors, dithers; 0600).
  registry.sqlite          the issued codes (faceprint.fingerprint.registry); PostgreSQL via a
                           URL instead, if several people issue.
  calibration.safetensors  datalevel-bank: the measured distribution of matching bits of
                           negatives, which sets the decision threshold.

Calibration compares each negative with ``CALIBRATION_CODES`` random codes (not only the
issued ones), so one calibration serves every registry of up to that many instances without
a union-bound penalty: a registry's codes are random draws too, and the best match among
fewer codes is stochastically smaller.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..seeding import generator as make_generator
from .datalevel import MECHANISM, BankFingerprintConfig, BankFingerprinter, fingerprint_bank_instance
from .keyed import KEYED_MECHANISM, OwnerSecret, fingerprint_keyed_instance

__all__ = ["CALIBRATION_CODES", "MECHANISMS", "KeyedVerifier", "Owner", "default_owner_dir", "issue_instance",
           "decode_images", "verify_keyed"]

#: what ``issue`` can embed; the first is the default
MECHANISMS = (KEYED_MECHANISM, MECHANISM)
SECRET_FILE = "secret.safetensors"
BASES_DIR = "bases"

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

    @property
    def secret_path(self) -> Path:
        return self.folder / SECRET_FILE

    def base_path(self, model_hash: str) -> Path:
        """Where the owner keeps the unfingerprinted model a keyed instance was issued from (its
        clean bank is what verification subtracts)."""
        return self.folder / BASES_DIR / f"{model_hash}.safetensors"

    def load_secret(self) -> OwnerSecret:
        if not self.secret_path.is_file():
            raise InputError(f"no owner secret at {str(self.secret_path)!r}: issue an instance first "
                             "(`faceprint fingerprint issue`), or pass the --owner folder that holds secret.safetensors")
        return OwnerSecret.load(self.secret_path)

    def prepare_secret(self, gen) -> tuple[OwnerSecret, bool]:
        """(the owner's master secret with its carrier directions, whether it is new); nothing is written."""
        if self.secret_path.is_file():
            sec = OwnerSecret.load(self.secret_path)
            if tuple(sec.shape_) != tuple(gen.bank_.shape[1:]):
                raise ConfigError(f"the owner secret {str(self.secret_path)!r} is for latents of shape {tuple(sec.shape_)}, "
                                  f"this model's are {tuple(gen.bank_.shape[1:])} (another image size): use another --owner folder")
            return sec, False
        if self.secret_path.exists() or self.secret_path.is_symlink():
            raise InputError(f"owner secret path {str(self.secret_path)!r} exists but is not a regular file; move it away")
        return OwnerSecret().fit(gen.bank_.float(), gen.autoencoder), True

    def load_calibration(self):
        from .verification import Calibration

        if not self.calibration.is_file():
            raise InputError(f"no calibration at {str(self.calibration)!r}: measure the false-positive rate first with "
                             "`faceprint fingerprint calibrate MODEL --negatives PHOTOS/`")
        return Calibration.load(self.calibration)


def issue_instance(gen, model_hash: str, owner: Owner, recipient: str, instance: str, *,
                   seed: int | None = None, key_seed: int | None = None, note: str | None = None,
                   output=None, mechanism: str = KEYED_MECHANISM):
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

    if mechanism not in MECHANISMS:
        raise ConfigError(f"mechanism must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
    keyed = mechanism == KEYED_MECHANISM
    check_entry_fields(recipient, instance, model_hash, mechanism, note)
    if seed is not None:
        check_seed(seed)
    folder_existed = owner.folder.exists()
    local = owner._local_registry()
    registry_existed = local is None or local.exists()
    key_saved = committed = False
    box = {}
    key = None

    def build(entry, path=None):
        info = {"instance": instance, "recipient": recipient, "issued_at": entry.issued_at}
        if keyed:
            inst = fingerprint_keyed_instance(gen, key, entry.code, info)
        else:
            inst = fingerprint_bank_instance(gen, key, entry.bits, info)
        inst.record_operation({"operation": "fingerprint", "mechanism": mechanism, "instance": instance,
                               "recipient": recipient, "base_model_sha256": model_hash})
        if path is not None:
            inst.save(path)
        box["inst"] = inst

    try:
        with owner.open_registry() as reg:  # an external registry is reached before anything is created
            if reg.instance_taken(instance):
                raise InputError(f"instance {instance!r} already has a code in registry {reg.url!r}; "
                                 "choose a new instance name (one code per model instance)")
            if keyed:
                key, new_key = owner.prepare_secret(gen)  # writes nothing
                key_file = owner.secret_path
            else:
                key, new_key = owner.prepare_key(gen, key_seed=key_seed)  # writes nothing
                key_file = owner.key_path
            if new_key:
                owner._ensure_folder()
                key.save(key_file)
                key_saved = True
            if keyed and not owner.base_path(model_hash).is_file():
                owner._ensure_folder()
                owner.base_path(model_hash).parent.mkdir(mode=0o700, exist_ok=True)
                gen.save(owner.base_path(model_hash))  # atomic; verification needs the clean bank
            code_seed = secrets.randbits(62) if seed is None else seed
            if output is None:
                entry = reg.issue(recipient, instance, model_hash, mechanism, seed=code_seed, note=note,
                                  before_commit=build)
                committed = True
            else:
                with atomic_path(output) as tmp:
                    entry = reg.issue(recipient, instance, model_hash, mechanism, seed=code_seed, note=note,
                                      before_commit=lambda e: build(e, tmp))
                    committed = True
    except BaseException as e:
        if committed:  # the rename after the commit failed: say what is where
            from ..errors import OutputError

            raise OutputError(f"the code for instance {instance!r} is recorded in the registry but {str(output)!r} "
                              f"was not written ({e}); issue again under another --instance name") from None
        if key_saved:
            with contextlib.suppress(OSError):
                key_file.unlink()
        discard_new_owner_files(owner, local, registry_existed=registry_existed, folder_existed=folder_existed)
        raise
    return entry, box["inst"]


def discard_new_owner_files(owner: Owner, local: Path | None, *, registry_existed: bool, folder_existed: bool) -> None:
    """After a failed issue: remove the SQLite registry file (``local``, with its journals) and
    the owner folder, each only if the failed call created it (an emptied folder only)."""
    import contextlib

    if not registry_existed and local is not None and local.exists():
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                Path(str(local) + suffix).unlink()
    if not folder_existed:  # then its base-model folder is new too (empty: the base copy is written atomically)
        for d in (owner.folder / BASES_DIR, owner.folder):
            with contextlib.suppress(OSError):
                d.rmdir()


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


@dataclass
class KeyedVerdict:
    """The outcome of verifying one image against the keyed instances of a registry."""

    match: bool
    instance: str | None  # the accused instance (None: not ours)
    recipient: str | None
    score: float  # the best instance's T (standard normal for an image it did not make)
    nearest_instance: str | None
    threshold: float
    p_value: float  # P(N(0,1) >= score), one recipient
    fpr_bound: float  # Sidak over the registry: P(any innocent recipient scores >= threshold)
    registry_size: int
    match_distance: float  # mean latent distance of the image's pixels to the base rows they matched
    edit: str = "none"  # the edit the reference was given to match the image (BaseIndex: blur, resize)
    crop: float = 1.0  # the centre-crop fraction the image was read as (BaseIndex; 1.0: the full frame)
    prefilter: str = "none"  # the filter the image was read through (BaseIndex; "none": as it is)


class KeyedVerifier:
    """What verifying images against the keyed instances of a registry needs, loaded once: the
    owner's secret, one :class:`BaseIndex` per base model the instances were issued from, and the
    threshold. Calling it on images (N, 3, H, W) in [0, 1] gives their verdicts. It pickles (Dask
    sends it to the workers of ``verify --dask``): it holds the owner's secret, so send it only
    to machines the owner trusts.

    The threshold is the score whose Sidak-corrected normal tail over the ``len(entries)``
    recipients is ``target_fpr`` (default :data:`keyed.DEFAULT_TARGET_FPR`): that is the
    probability, for any image, that some recipient who did not make it is accused (exact given
    the keys' pseudo-randomness; measured by ``python -m faceprint.bench redteam`` and
    ``calibrate``)."""

    def __init__(self, owner: Owner, entries, autoencoder, *, target_fpr: float | None = None,
                 crops: tuple[float, ...] | None = None, weighting: str | None = None,
                 prefilters: tuple[str, ...] | None = None):
        from ..latent.generator import Generator
        from .keyed import (DEFAULT_CROPS, DEFAULT_PREFILTERS, DEFAULT_TARGET_FPR, DEFAULT_WEIGHTING, BaseIndex,
                            normal_tail, sidak, threshold_for)

        if target_fpr is None:
            target_fpr = DEFAULT_TARGET_FPR
        entries = [e for e in entries if e.mechanism == KEYED_MECHANISM]
        if not entries:
            raise InputError("the registry holds no keyed-bank instances; issue one first")
        self.secret = owner.load_secret()
        self.registry_size = len(entries)
        self.threshold = threshold_for(target_fpr, self.registry_size)
        self.fpr_bound = sidak(normal_tail(self.threshold), self.registry_size)
        by_base: dict[str, list] = {}
        for e in entries:
            by_base.setdefault(e.model_hash, []).append(e)
        self.groups = []
        for model_hash, group in by_base.items():
            path = owner.base_path(model_hash)
            if not path.is_file():
                raise InputError(f"the base model {model_hash[:12]}... of {len(group)} issued instance(s) is missing "
                                 f"from {str(path.parent)!r}: restore the owner folder from its backup")
            base = Generator.load(path, autoencoder=autoencoder)
            self.groups.append((BaseIndex(base.bank_, base.autoencoder, self.secret,
                                          crops=DEFAULT_CROPS if crops is None else crops,
                                          weighting=DEFAULT_WEIGHTING if weighting is None else weighting,
                                          prefilters=DEFAULT_PREFILTERS if prefilters is None else prefilters),
                                group))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, batch: int = 64) -> list[KeyedVerdict]:
        from .keyed import normal_tail

        n = images.shape[0]
        best = torch.full((n,), -math.inf)
        best_e: list = [None] * n
        dist = torch.zeros(n)
        edit = ["none"] * n
        crop = [1.0] * n
        pref = ["none"] * n
        for index, group in self.groups:
            res = index.residuals(images, batch=batch)
            sc = res.scores(self.secret, [e.code for e in group])  # (n, k)
            v, j = sc.max(1)
            for i in range(n):
                if float(v[i]) > float(best[i]):
                    best[i] = v[i]
                    best_e[i] = group[int(j[i])]
                    dist[i] = res.match_distance[i]
                    edit[i] = res.edit[i] if res.edit else "none"
                    crop[i] = res.crop[i] if res.crop else 1.0
                    pref[i] = res.prefilter[i] if res.prefilter else "none"
        out = []
        for i in range(n):
            t, e = float(best[i]), best_e[i]
            ok = t >= self.threshold
            out.append(KeyedVerdict(match=ok, instance=e.instance if ok else None,
                                    recipient=e.recipient if ok else None, score=t, nearest_instance=e.instance,
                                    threshold=self.threshold, p_value=normal_tail(t), fpr_bound=self.fpr_bound,
                                    registry_size=self.registry_size, match_distance=float(dist[i]),
                                    edit=edit[i], crop=crop[i], prefilter=pref[i]))
        return out


def verify_keyed(images: torch.Tensor, owner: Owner, entries, autoencoder, *, target_fpr: float | None = None,
                 batch: int = 64) -> list[KeyedVerdict]:
    """Verify images (N, 3, H, W) in [0, 1] against the keyed registry ``entries``
    (:class:`KeyedVerifier`, loaded for this call)."""
    return KeyedVerifier(owner, entries, autoencoder, target_fpr=target_fpr)(images, batch=batch)
