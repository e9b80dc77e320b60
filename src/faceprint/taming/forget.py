"""Forget a person: no generated pixel may come from their photos, and the mixture no longer
stands for them (papers/002's "remove a specific person", done as an exact edit).

Two parts, both exact and both far cheaper than the fit:

1. The refinement memory: the person's training latents are deleted from the bank, so the
   provenance map of every later face points only at other photos.
2. The mixture: :meth:`GaussianMixture.remove_points` down-dates each component the photos
   contributed to, in closed form, to the M-step without them (the other photos keep their
   responsibilities). Components that only stood for the person disappear. papers/002 has to
   fine-tune a flow because a flow has no such closed form; a mixture fitted by EM does.

The channel projector P0 (a 32 x 32 rotation/whitening at the default q = 32) is kept: it
holds second-order channel statistics of all photos, not anything one person could be
recognised from.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError


@dataclass
class ForgetReport:
    removed: list[int]  # bank indices (before the edit) of the photos taken out
    removed_relpaths: list[str]
    components_before: int
    components_after: int
    dropped_components: list[int]
    updated_components: list[int]
    log_prob_before: list[float]  # mean log p of the removed photos' projected latents (per dimension)
    log_prob_after: list[float]
    seconds: float


def match_training_photos(gen, photos, *, size: int | None = None) -> tuple[list[int], list[str]]:
    """Bank indices of the model's training photos that are among ``photos`` (a folder or a
    list of files), matched by file content (sha256), so renamed copies match too.

    Returns (indices, files of ``photos`` that matched no training photo)."""
    from ..io import sha256_file

    if isinstance(photos, (str, Path)):
        folder = Path(photos)
        if not folder.is_dir():
            raise InputError(f"photos {str(folder)!r} is not a folder; pass the folder of the person's photos")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = [Path(p) for p in photos]
    if not files:
        raise InputError(f"no photo files in {photos!r}")
    if not gen.training_.hashes:
        raise InputError("the model does not record its training photos' content hashes; re-fit it with `faceprint fit`")
    where = {}
    for i, h in enumerate(gen.training_.hashes):
        where.setdefault(h, []).append(i)
    idx, unmatched = [], []
    for f in files:
        hit = where.get(sha256_file(f))
        if hit:
            idx.extend(hit)
        else:
            unmatched.append(str(f))
    return sorted(set(idx)), unmatched


def forget(gen, indices, *, name: str | None = None):
    """A copy of ``gen`` without the training photos at bank ``indices``.

    Parameters
    ----------
    gen : Generator (fitted)
    indices : sequence of int
        Positions in ``gen.bank_`` / ``gen.training_.relpaths`` of the photos to forget
        (see :func:`match_training_photos`).
    name : str, optional
        What is forgotten, for the provenance record (e.g. "person 2880").

    Returns
    -------
    (Generator, ForgetReport)
    """
    gen._check_fitted()
    N = gen.n_photos
    idx = sorted(set(int(i) for i in indices))
    if not idx:
        raise InputError("nothing to forget: no training photo matched; check the photos are the ones the model was "
                         "fitted on (matched by file content)")
    if idx[0] < 0 or idx[-1] >= N:
        raise InputError(f"indices must be in [0, {N}), got {idx[0]}..{idx[-1]}")
    if len(idx) >= N - 1:
        raise InputError(f"forgetting {len(idx)} of {N} photos leaves fewer than 2; fit a new model instead")
    # timed: the edit; not timed: the diagnostics (log p of the forgotten photos before and after)
    t0 = time.perf_counter()
    # the mixture was fitted on the memory's keys (the bank itself unless a bank rewrite stored
    # keys beside edited values): the forgotten photos' points are their keys
    keys = gen.memory_keys
    Y = gen.projector_.transform(keys[idx].float()).reshape(len(idx), -1).double()
    seconds = time.perf_counter() - t0
    d = Y.shape[1]
    lp_before = (gen.mixture_.log_prob(Y) / d).tolist()
    t0 = time.perf_counter()
    # the bank is replaced below and the mixture's edit assigns new parameters (the tensors of
    # components it does not touch are shared, never written): no deep copy of either
    out = gen.copy(share=("bank_", "bank_keys_", "mixture_"))
    out.mixture_ = mix = copy.copy(gen.mixture_)
    K0 = mix.weights_.numel()
    info = mix.remove_points(Y, N)
    keep = torch.tensor(sorted(set(range(N)) - set(idx)))
    labels = mix.labels_[keep]
    remap = torch.full((K0,), -1, dtype=torch.int64)
    remap[torch.tensor(info["kept_components"])] = torch.arange(len(info["kept_components"]))
    new_labels = remap[labels]
    orphans = torch.nonzero(new_labels < 0).squeeze(1)
    if orphans.numel():  # photos whose component disappeared join their most likely remaining one
        Yo = out.projector_.transform(keys[keep[orphans]].float()).reshape(len(orphans), -1)
        new_labels[orphans] = mix.predict(Yo)
    mix.labels_ = new_labels
    out.bank_ = out.bank_[keep].contiguous()
    if getattr(out, "bank_keys_", None) is not None:  # keys and values stay row-aligned
        out.bank_keys_ = out.bank_keys_[keep].contiguous()
    tr = out.training_
    removed_rel = [tr.relpaths[i] for i in idx] if tr.relpaths else []
    removed_hashes = [tr.hashes[i] for i in idx] if tr.hashes else []
    kept_list = keep.tolist()
    tr.relpaths = [tr.relpaths[i] for i in kept_list] if tr.relpaths else []
    tr.hashes = [tr.hashes[i] for i in kept_list] if tr.hashes else []
    out._cache = {}
    seconds += time.perf_counter() - t0
    lp_after = (mix.log_prob(Y) / d).tolist()
    out.provenance_["n_photos"] = out.n_photos
    out.provenance_["components"] = mix.weights_.numel()
    out.record_operation({
        "operation": "forget", "name": name, "photos_removed": len(idx),
        "removed_content_sha256": removed_hashes,
        "components_dropped": len(info["dropped"]), "components_updated": len(info["updated"]),
        "seconds": round(seconds, 4),
    })
    rep = ForgetReport(removed=idx, removed_relpaths=removed_rel, components_before=K0,
                       components_after=mix.weights_.numel(), dropped_components=info["dropped"],
                       updated_components=info["updated"], log_prob_before=lp_before, log_prob_after=lp_after,
                       seconds=seconds)
    return out, rep
