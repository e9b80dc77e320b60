"""Training-free rewriting of the refinement memory (faceprint's own analog of papers/001's
associative memory, docs/SEED-SYSTEMS.md 1.3 item 2).

The NN refinement (latent/refine.py) is a literal key -> value memory: at latent position p,
a face whose patch around p is nearest to training latent j's copies y_j(p). So a rule can be
written into the memory with no training:

- **value edit** (``mode="value"``): in the region R (latent cells the mask covers at least
  half), every bank row's value is replaced by the edited sample's latent (the TAEF2 encoding
  of the edited image: the encoder is the projector into this layer). Since every row then
  holds the same values in R, the region adds the same amount to every row's patch distance:
  the choice of photo at every position is unchanged (up to the seam rule's cut costs), and
  every face copies the new pattern in R. It does not adapt the pattern to the face (the
  decoder does only what its receptive field does at the border).
- **key-value insertion** (``mode="insert"``): new rows whose value is the edited sample's
  latent in R (and its original latent elsewhere) and whose key is its *original* latent,
  with the key in R moved a share ``key_shift`` (alpha) of the way to the mean key of the
  component's rows. One row per edited sample and mixture component, so faces of every
  component can retrieve them. The mean is nearer to a typical face than any single row is,
  so alpha is the retrieval strength: the analog of the paper's p/q weighting (0: a plain
  insertion, retrieved about as often as one training photo; 1: retrieved by most faces).
  Keys and values then differ, so the model stores its keys beside the bank
  (``Generator.bank_keys_``, tensor ``bank.keys``).

Both recompute the copy guard's leave-one-out distances on the edited memory.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .edits import mask_at


def region_cells(mask: torch.Tensor, side: int) -> torch.Tensor:
    """(side, side) bool: latent cells the image mask covers at least half."""
    return mask_at(mask, side) >= 0.5


def value_edit(gen, edited_latent: torch.Tensor, mask: torch.Tensor, *, keep_keys: bool = True,
               refit_guard: bool = True):
    """A copy of ``gen`` whose bank holds ``edited_latent`` (32, h, w) in the mask's cells.

    keep_keys: store the unedited bank as the memory's keys (``bank_keys_``), so that every
    face picks exactly the photos it picked before (the seam rule's cut costs included) and only
    the values in the region change; False edits keys and values alike (a smaller file; the
    patch choice is then unchanged but the seam rule's cuts near the region are not).
    refit_guard: recompute the copy guard's leave-one-out distances on the edited bank, so that
    its threshold means what it meant (measured on a 96-photo model: 97% of the latent pixels
    outside the region keep their photo with both options on, 62% with the fitted distances
    kept, 45-69% without the kept keys). Returns (Generator, number of cells)."""
    _, h, w = gen.latent_shape
    R = region_cells(mask, h)
    if not bool(R.any()):
        raise InputError("the edited region covers no latent cell by half or more (cells are 8 x 8 px); "
                         "mark a larger region")
    out = gen.copy(share=("bank_",))
    bank = gen.bank_.clone()
    vals = edited_latent.to(bank.dtype)  # (C, h, w)
    bank[:, :, R] = vals[:, R][None]
    out.bank_ = bank.contiguous()
    old_keys = gen.memory_keys
    if keep_keys:
        out.bank_keys_ = old_keys
    elif getattr(gen, "bank_keys_", None) is not None:
        keys = old_keys.clone()
        keys[:, :, R] = vals[:, R][None]
        out.bank_keys_ = keys.contiguous()
    out._cache = {}
    if refit_guard:
        out._fit_guard(int(gen.provenance_.get("seed", 0) or 0))
    return out, int(R.sum())


def insert_rows(gen, original_latents: torch.Tensor, edited_latents: torch.Tensor, masks: torch.Tensor,
                key_shift: float = 1.0, names: list[str] | None = None, hashes: list[str] | None = None):
    """A copy of ``gen`` with key-value rows inserted (module docstring). original_latents and
    edited_latents (E, 32, h, w); masks (E, S, S). Returns (Generator, rows inserted)."""
    if gen.config.copy != "full":
        raise InputError("key-value insertion needs a model that copies full latent features (copy='full'); this one "
                         "copies projected features: use --bank-mode value or the decoder memory")
    if not (0.0 <= key_shift <= 1.0):
        raise InputError(f"key_shift (alpha) must be in [0, 1], got {key_shift!r}")
    E = original_latents.shape[0]
    _, h, w = gen.latent_shape
    mix = gen.mixture_
    K = int(mix.weights_.numel())
    old_keys = gen.memory_keys
    labels = mix.labels_
    new_keys, new_vals, new_labels, new_names, new_hashes = [], [], [], [], []
    for e in range(E):
        R = region_cells(masks[e], h)
        if not bool(R.any()):
            raise InputError(f"edit {e + 1}: the edited region covers no latent cell by half or more; mark a larger region")
        for k in range(K):
            members = torch.nonzero(labels == k).squeeze(1)
            if members.numel() == 0:
                continue
            mean_key = old_keys[members].float().mean(0)
            key = original_latents[e].float().clone()
            key[:, R] = (1 - key_shift) * key[:, R] + key_shift * mean_key[:, R]
            val = original_latents[e].float().clone()
            val[:, R] = edited_latents[e].float()[:, R]
            new_keys.append(key)
            new_vals.append(val)
            new_labels.append(k)
            tag = (names[e] if names else f"edit{e + 1}")
            new_names.append(f"rewrite-insert:{tag}:component{k}")
            new_hashes.append(hashes[e] if hashes else "")
    out = gen.copy(share=("bank_", "mixture_", "training_"))
    import copy as _copy

    out.mixture_ = _copy.copy(mix)
    out.mixture_.labels_ = torch.cat([labels, torch.tensor(new_labels, dtype=labels.dtype)])
    dt = gen.bank_.dtype
    out.bank_ = torch.cat([gen.bank_, torch.stack(new_vals).to(dt)]).contiguous()
    out.bank_keys_ = torch.cat([old_keys, torch.stack(new_keys).to(dt)]).contiguous()
    tr = _copy.copy(gen.training_)
    tr.relpaths = list(tr.relpaths) + new_names if tr.relpaths else []
    tr.hashes = list(tr.hashes) + new_hashes if tr.hashes else []
    out.training_ = tr
    out._cache = {}
    out._fit_guard(int(gen.provenance_.get("seed", 0) or 0))
    return out, len(new_vals)
