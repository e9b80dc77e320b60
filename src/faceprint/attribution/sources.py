"""The image sources attribution tells apart, and a resumable on-disk cache of their faces.

A :class:`SourceSpec` names one source (papers/004 Ch. 4 trains GANs; faceprint's sources are
its own latent models, all decoded by the same TAEF2 decoder, and real photos):

=================  ===========================================================================
kind               images
=================  ===========================================================================
real-raw           photos of a dataset, centre-cropped and resized to 128 px (8-bit)
real-roundtrip     the same photos encoded and decoded by TAEF2: a real class that shares the
                   generated classes' decoder, so a classifier cannot win by spotting the decoder
lrgmm-nn, lrgmm,   faceprint's Generator (papers/000) with that sampling method, fitted on the
nn, gaussian       first ``photos`` celeba-10k files (the last ``swap`` of them replaced by the
                   next ``swap`` files: setup B), EM seeded by ``fit_seed`` (setup C), faces
                   from ``Generator.generate`` (copy guard on, as shipped)
latentpatch        LatentPatch (papers/000's baseline) on the same bank
flowprior          the flow prior with NN refinement on the same bank
gan                a latent-GAN model file (``checkpoint``), method "gan"
fingerprinted      a data-level fingerprinted instance (datalevel-bank) of the lrgmm-nn model
=================  ===========================================================================

Splits "train", "cal" (held out to calibrate the open-set threshold) and "test": generated
faces of each split come from their own seed (derived from the run seed, the source's
``stream`` and the split), so test seeds are disjoint from training seeds; real photos of the
three splits are disjoint ranges of files (``first``, ``spans``), disjoint from the models'
training photos when the caller places them so. Two specs with equal keys (whatever their
names) are the same source and share their cached faces.

:class:`SourceCache` writes the faces as uint8 safetensors chunks of 250 under a folder
outside the repository (they hold real photos or faces made from them: never commit them);
a chunk is made once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..seeding import derive_seed

KINDS = ("real-raw", "real-roundtrip", "lrgmm-nn", "lrgmm", "nn", "gaussian", "latentpatch", "flowprior", "gan",
         "fingerprinted")
REAL_KINDS = ("real-raw", "real-roundtrip")
SPLITS = ("train", "cal", "test")
CHUNK = 250
CACHE_CLASS = "faceprint.attribution.SourceChunk"


@dataclass(frozen=True)
class SourceSpec:
    """One source (module docstring). ``name`` labels it in tables; ``key()`` is what its faces
    depend on (two specs with equal keys share cached faces)."""

    name: str
    kind: str
    dataset: str = "celeba-10k"
    first: int = 0
    spans: tuple[int, int] = (0, 0)
    photos: int = 1024
    swap: int = 0
    fit_seed: int = 0
    stream: str = ""
    checkpoint: str | None = None
    flow_epochs: int = 300

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"source name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise InputError(f"source {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "gan" and not self.checkpoint:
            raise InputError(f"source {self.name!r}: kind 'gan' needs checkpoint= a latent-GAN model file")
        if not 0 <= self.swap <= self.photos:
            raise InputError(f"source {self.name!r}: swap must be in [0, photos], got {self.swap}")

    def key(self) -> dict:
        d = asdict(self)
        d.pop("name")
        if self.kind in REAL_KINDS:
            for k in ("photos", "swap", "fit_seed", "stream", "checkpoint", "flow_epochs"):
                d.pop(k)
        else:
            for k in ("dataset", "first", "spans"):
                d.pop(k)
            if self.kind != "flowprior":
                d.pop("flow_epochs")
        d["spans"] = list(d["spans"]) if "spans" in d else None
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:10]

    @property
    def is_real(self) -> bool:
        return self.kind in REAL_KINDS

    @property
    def model_key(self) -> tuple:
        """Sources with equal model keys are the same fitted model (and bank)."""
        return (self.photos, self.swap, self.fit_seed)


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


class SourceCache:
    """Faces of sources, made on demand and kept in ``root`` (see module docstring).

    Parameters
    ----------
    root : path
        Cache folder (outside the repository).
    datasets : path
        Folder holding ``celeba-10k/images`` (and ``utkface/images`` if used).
    autoencoder
        TAEF2 (encode/decode).
    seed : int
        Run seed: the sampling seeds derive from it.
    log : callable, optional
        Receives progress lines.
    """

    def __init__(self, root, datasets, autoencoder, *, seed: int = 0, log=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.datasets = Path(datasets)
        self.ae = autoencoder
        self.seed = seed
        self.log = log or (lambda s: None)
        self._models: dict = {}
        self._banks: dict = {}
        self._folders: dict = {}
        self.fit_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ data
    def _folder(self, dataset: str):
        from ..data import FaceFolder

        if dataset not in self._folders:
            d = self.datasets / dataset / "images"
            if not d.is_dir():
                raise InputError(f"dataset folder {str(d)!r} not found; pass the folder holding {dataset}/images")
            self._folders[dataset] = FaceFolder(d, size=128)
        return self._folders[dataset]

    def bank_latents(self, photos: int, swap: int):
        """LatentSet of the model training photos: the first ``photos`` celeba-10k files with the last
        ``swap`` replaced by files photos .. photos + swap - 1 (0-based)."""
        from ..data import FaceFolder, LatentCache, LatentSet, encode_folder

        key = (photos, swap)
        if key not in self._banks:
            root = self.datasets / "celeba-10k" / "images"
            ls = encode_folder(FaceFolder(root, size=128, limit=photos + swap), self.ae, cache=LatentCache())
            if ls.latents.shape[0] != photos + swap:
                raise InputError(f"expected {photos + swap} usable celeba-10k photos, got {ls.latents.shape[0]}")
            rows = list(range(photos - swap)) + list(range(photos, photos + swap))
            self._banks[key] = LatentSet(ls.latents[rows].contiguous(), [ls.relpaths[i] for i in rows],
                                         [ls.content_hashes[i] for i in rows], None, ls.root, 128)
        return self._banks[key]

    def bank(self, spec: SourceSpec) -> torch.Tensor | None:
        """The latents a source's NN step copies from (None for real photos, LR-GMM and GAN)."""
        if spec.is_real or spec.kind in ("lrgmm", "gan", "gaussian"):
            return None
        return self.bank_latents(spec.photos, spec.swap).latents

    def model(self, spec: SourceSpec):
        """The fitted model of a generated source (fitted once per process, deterministic)."""
        from ..latent.generator import Generator, GeneratorConfig

        mk = (spec.kind if spec.kind in ("latentpatch", "flowprior", "gan", "fingerprinted") else "generator",
              spec.model_key, spec.flow_epochs if spec.kind == "flowprior" else None, spec.checkpoint)
        if mk in self._models:
            return self._models[mk]
        t0 = time.perf_counter()
        if spec.kind == "gan":
            model = Generator.load(spec.checkpoint)
        else:
            ls = self.bank_latents(spec.photos, spec.swap)
            if spec.kind == "latentpatch":
                from ..latent.latentpatch import LatentPatch

                model = LatentPatch().fit(ls.latents)
            elif spec.kind == "flowprior":
                from ..latent.flowprior import FlowPrior, FlowPriorConfig

                model = FlowPrior(FlowPriorConfig(max_epochs=spec.flow_epochs)).fit(ls, seed=spec.fit_seed)
            elif spec.kind == "fingerprinted":
                from ..fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter, fingerprint_bank_instance
                from ..fingerprint.modulated import random_code

                base = self.model(SourceSpec("base", "lrgmm-nn", photos=spec.photos, swap=spec.swap,
                                             fit_seed=spec.fit_seed))
                fp = BankFingerprinter(BankFingerprintConfig(key_seed=derive_seed(self.seed, "attribution-key") % 2**31))
                fp.fit(base.bank_.float(), self.ae)
                model = fingerprint_bank_instance(base, fp, random_code(self.seed + 1), {"instance": "attribution-bench"})
            else:
                model = Generator(GeneratorConfig(), autoencoder=self.ae).fit(ls, seed=spec.fit_seed)
        self.fit_seconds[spec.name] = time.perf_counter() - t0
        self._models[mk] = model
        return model

    # ------------------------------------------------------------------ making faces
    def _real_chunk(self, spec: SourceSpec, split: str, start: int, stop: int) -> torch.Tensor:
        folder = self._folder(spec.dataset)
        offset = spec.first + {"train": 0, "cal": spec.spans[0], "test": spec.spans[0] + spec.spans[1]}[split]
        if offset + stop > len(folder):
            raise InputError(f"source {spec.name!r} needs photos up to #{offset + stop} of {spec.dataset}, "
                             f"which has {len(folder)}; ask for fewer images per source")
        x = torch.stack([folder.load_one(offset + i) for i in range(start, stop)])
        x = _to_u8(x)
        if spec.kind == "real-roundtrip":
            with torch.no_grad():
                x = _to_u8(self.ae.decode(self.ae.encode(x.float() / 255.0)))
        return x

    def _model_chunk(self, spec: SourceSpec, split: str, start: int, stop: int) -> torch.Tensor:
        # the faces depend on what the source is (its key, which holds ``stream``), never on its name
        seed = derive_seed(self.seed, "attribution", json.dumps(spec.key(), sort_keys=True), split) % 2**62
        model = self.model(spec)
        n = stop - start
        if spec.kind in ("lrgmm-nn", "lrgmm", "nn", "gaussian"):
            images, _ = model.generate(n, seed=seed, start=start, method=spec.kind)
            return _to_u8(images)
        if spec.kind in ("gan", "fingerprinted"):
            images, _ = model.generate(n, seed=seed, start=start, method="gan" if spec.kind == "gan" else None)
            return _to_u8(images)
        if spec.kind == "latentpatch":
            z, _ = model.sample(n, seed=seed, start=start)
        else:  # flowprior
            bank = self.bank_latents(spec.photos, spec.swap).latents
            z = model.sample_latents(n, seed=seed, start=start, refine_bank=bank).latents
        with torch.no_grad():
            return _to_u8(self.ae.decode(z))

    def _path(self, spec: SourceSpec, split: str, chunk: int) -> Path:
        return self.root / f"{spec.kind}-{spec.digest()}" / f"{split}-{chunk:05d}.safetensors"

    def images(self, spec: SourceSpec, split: str, n: int) -> torch.Tensor:
        """uint8 (n, 3, 128, 128): images 0 .. n-1 of a source's split, made once and cached."""
        from safetensors.torch import load_file

        from ..io import save_artifact

        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        if spec.is_real and n > {"train": spec.spans[0], "cal": spec.spans[1], "test": 10**9}[split] and split != "test":
            raise InputError(f"source {spec.name!r}: {n} {split} photos asked, its span holds {spec.spans}")
        parts = []
        for c in range((n + CHUNK - 1) // CHUNK):
            start, stop = c * CHUNK, min(n, (c + 1) * CHUNK)
            path = self._path(spec, split, c)
            x = None
            if path.is_file():
                try:
                    x = load_file(str(path))["images"]
                except Exception:  # a damaged chunk is made again
                    x = None
                if x is not None and x.shape[0] < stop - start:
                    x = None  # an earlier run asked for fewer: remake this chunk whole
            if x is None:
                full = min((c + 1) * CHUNK, max(n, stop))
                t0 = time.perf_counter()
                make = self._real_chunk if spec.is_real else self._model_chunk
                x = make(spec, split, start, full)
                secs = time.perf_counter() - t0
                path.parent.mkdir(parents=True, exist_ok=True)
                save_artifact(path, {"images": x}, {"class": CACHE_CLASS, "key": spec.key(), "split": split,
                                                    "start": start, "seconds": secs})
                self.log(f"[sources] {spec.name} {split} {start}-{full}: {secs:.0f} s")
            parts.append(x[: stop - start])
        return torch.cat(parts) if parts else torch.zeros(0, 3, 128, 128, dtype=torch.uint8)

    def seconds(self, spec: SourceSpec) -> float:
        """Total seconds spent making this source's cached chunks (over every run)."""
        from safetensors import safe_open

        total = 0.0
        folder = self._path(spec, "train", 0).parent
        for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                with safe_open(str(f), framework="pt") as h:
                    total += float(json.loads((h.metadata() or {}).get("seconds", "0")))
            except Exception:
                pass
        return total + self.fit_seconds.get(spec.name, 0.0)
