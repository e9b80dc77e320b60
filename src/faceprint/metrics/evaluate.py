"""One model against one folder of real photos: the quality table of papers/000 Sec. 4 (Table 1
form) for a user's own model and data.

``evaluate_generator`` generates ``n`` faces and compares them with the real photos on
InceptionV3 pool features: FID, KID, improved precision/recall (k = 3), density/coverage
(k = 5). Real photos that are also training photos of the model (same file content, by
sha256) are left out of the comparison and reported, so the reference and the held-out set are
photos the model never saw. Memorization is measured against the model's training photos, read
from the folder recorded at fit time when it is still there; otherwise against the
autoencoder's reconstructions of the training latents the model stores (marked in the result).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, InputError


@dataclass
class Evaluation:
    """The numbers of :func:`evaluate_generator` (JSON-ready via :meth:`as_dict`)."""

    n_generated: int
    n_real: int
    n_real_in_training: int
    fid: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    density: float
    coverage: float
    memorization_inception: dict
    memorization_latent: dict
    provenance: dict | None
    training_reference: str  # "photos" or "reconstructions"
    seconds: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _real_photos(folder: Path, size: int, limit: int | None, skip_hashes: set[str]):
    """(images (M, 3, S, S) float32, relpaths, number dropped as training photos)."""
    from ..data import FaceFolder
    from ..io import sha256_file

    ff = FaceFolder(folder, size=size)
    keep, dropped = [], 0
    for i, rel in enumerate(ff.relpaths):
        if skip_hashes and sha256_file(Path(folder) / rel) in skip_hashes:
            dropped += 1
            continue
        keep.append(i)
        if limit is not None and len(keep) >= limit:
            break
    images, kept = [], []
    for i in keep:
        try:
            images.append(ff.load_one(i))
            kept.append(ff.relpaths[i])
        except (InputError, DataError):  # unreadable photos are skipped, as everywhere else
            continue
    if not images:
        raise DataError(f"--real {str(folder)!r}: no readable photo that is not a training photo of the model "
                        f"({dropped} were training photos); pass a folder of held-out face photos")
    return torch.stack(images), kept, dropped


def _training_photos(gen, size: int):
    """Training photos from the folder recorded at fit time, when all of them are still there."""
    from ..data.folder import load_image

    root = Path(gen.training_.root) if gen.training_.root else None
    if root is None or not root.is_dir():
        return None
    paths = [root / r for r in gen.training_.relpaths]
    if not all(p.is_file() for p in paths):
        return None
    try:
        return torch.stack([load_image(p, size) for p in paths])
    except (InputError, DataError):
        return None


def _features(x, autoencoder, inc, client, batch: int, desc: str) -> np.ndarray:
    from ..distributed.stages import features

    return features(x, autoencoder=autoencoder, inception=inc, client=client, chunk_size=batch, desc=desc)


def evaluate_generator(gen, real_folder, *, n: int = 2000, seed: int = 0, real_limit: int | None = 5000,
                       inception=None, batch: int = 250, progress=None, client=None) -> Evaluation:
    """Generate ``n`` faces with ``gen`` and measure them against the photos in ``real_folder``.

    Parameters
    ----------
    gen : faceprint.latent.generator.Generator
        A fitted model with its autoencoder loaded.
    real_folder : path
        Real face photos of the distribution the model should produce; training photos in it
        are recognised by content and excluded.
    n : int
        Faces to generate (FID needs thousands to be stable: its bias falls like 1/n).
    seed : int
        Seed of the generated faces (face i of seed s is always the same).
    real_limit : int or None
        Use at most this many real photos (in file order).
    inception : InceptionFeatures, optional
        Loaded feature extractor (default: ``InceptionFeatures.load()``).
    batch : int
        Faces generated, decoded and featurised per chunk.
    progress : callable(str), optional
        Called with a short message after each stage.
    client : distributed.Client, optional
        Decode the faces and take every Inception feature on this Dask cluster's workers, in
        chunks of ``batch`` (:mod:`faceprint.distributed`); the numbers are identical to a run
        without it. Decoding and features then count as one stage in ``seconds``.
    """
    from . import density_coverage, fid, kid, memorization_report, precision_recall, provenance_stats
    from .inception import InceptionFeatures

    for name, v, lo in (("n", n, 2), ("batch", batch, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}")
    if real_limit is not None and (isinstance(real_limit, bool) or not isinstance(real_limit, int) or real_limit < 2):
        raise InputError(f"real_limit must be an int >= 2 or None, got {real_limit!r}")
    if gen.autoencoder is None:
        raise InputError("the model was loaded without an autoencoder; load it with autoencoder='auto'")
    say = progress or (lambda msg: None)
    inc = inception or InceptionFeatures.load()
    size = int(gen.training_.image_size)
    secs = {}

    t0 = time.perf_counter()
    train_hashes = set(gen.training_.hashes or [])
    real, _, dropped = _real_photos(Path(real_folder), size, real_limit, train_hashes)
    if client is None:
        real_feat = np.concatenate([inc.features(real[s:s + batch]) for s in range(0, len(real), batch)])
    else:
        real_feat = _features(real, None, inc, client, batch, "real photo features")
    real_lat = gen.autoencoder.encode(real).reshape(len(real), -1)
    secs["real photos (load, features, encode)"] = time.perf_counter() - t0
    say(f"features of {len(real)} real photos ({dropped} training photos left out)")

    t0 = time.perf_counter()
    train_imgs = _training_photos(gen, size)
    reference = "photos"
    if train_imgs is None:
        reference = "reconstructions"
        train_imgs = torch.cat([gen.autoencoder.decode(gen.bank_[s:s + batch].float())
                                for s in range(0, gen.n_photos, batch)])
    if client is None:
        train_feat = np.concatenate([inc.features(train_imgs[s:s + batch]) for s in range(0, len(train_imgs), batch)])
    else:
        train_feat = _features(train_imgs, None, inc, client, batch, "training photo features")
    train_lat = gen.bank_.float().reshape(gen.n_photos, -1)
    secs["training photos (features)"] = time.perf_counter() - t0
    say(f"features of {len(train_imgs)} training {reference}")

    feats, lats, provs = [], [], []
    t_gen = t_dec = 0.0
    for s in (range(0, n, batch) if client is None else ()):
        m = min(batch, n - s)
        t0 = time.perf_counter()
        smp = gen.sample_latents(m, seed=seed, start=s)
        t1 = time.perf_counter()
        imgs = gen.autoencoder.decode(smp.latents)
        t2 = time.perf_counter()
        t_gen, t_dec = t_gen + t1 - t0, t_dec + t2 - t1
        feats.append(inc.features(imgs))
        lats.append(smp.latents.reshape(m, -1))
        if bool((smp.provenance >= 0).any()):
            provs.append(smp.provenance)
    if client is not None:  # sample here, decode and featurise on the workers
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            smp = gen.sample_latents(min(batch, n - s), seed=seed, start=s)
            lats.append(smp.latents)
            if bool((smp.provenance >= 0).any()):
                provs.append(smp.provenance)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = [_features(torch.cat(lats), gen.autoencoder, inc, client, batch, "generated face features")]
        lats = [z.reshape(len(z), -1) for z in lats]
        secs["decoding and features on the Dask cluster (ms/face)"] = (time.perf_counter() - t0) / n * 1000
    say(f"generated and featurised {n} faces")
    secs["latent sampling (ms/face)"] = t_gen / n * 1000
    if client is None:
        secs["decoding (ms/face)"] = t_dec / n * 1000
    F = np.concatenate(feats)
    L = torch.cat(lats).numpy()
    k = kid(F, real_feat, seed=seed, subset_size=min(1000, len(F), len(real_feat)))
    pr = precision_recall(real_feat, F, k=3)
    dc = density_coverage(real_feat, F, k=5)
    mem_i = memorization_report(F, train_feat, real_feat)
    mem_l = memorization_report(L, train_lat.numpy(), real_lat.numpy())
    prov = provenance_stats(torch.cat(provs).numpy()).summary() if provs else None
    return Evaluation(
        n_generated=n, n_real=len(real), n_real_in_training=dropped,
        fid=float(fid(F, real_feat)), kid=float(k[0]), kid_std=float(k[1]),
        precision=float(pr[0]), recall=float(pr[1]), density=float(dc[0]), coverage=float(dc[1]),
        memorization_inception=mem_i.summary(), memorization_latent=mem_l.summary(), provenance=prov,
        training_reference=reference, seconds=secs,
        settings={"seed": seed, "method": getattr(gen, "default_method", gen.config.method), "rank_temperature": gen.config.rank_temperature,
                  "real_folder": str(real_folder), "real_limit": real_limit, "image_size": size},
    )

