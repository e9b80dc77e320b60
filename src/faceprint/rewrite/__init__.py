"""Rewrite a fitted model's rules from one to three edited faces (papers/001, Re-Generator).

``rewrite(gen, edits, config)`` returns a new Generator whose every face follows the edit
("every face gets eyeglasses"), and a report. Two memories (docs/SEED-SYSTEMS.md 1.3):

- ``memory="decoder"`` (the paper's method): the TAEF2 decoder's block at the value layer is an
  associative memory; a backward projector (projector.py: the free B0 = TAEF2 encoder + the
  decoder's first modules, or the paper's trained projector) maps the edited images into the
  value layer; the memory (last L convolutions of the block, L = 2 by default) is fine-tuned on
  the weighted rewriting loss (decoder.py). The rewritten decoder is saved in the model file.
- ``memory="bank"`` (training-free, faceprint's own): the refinement memory's values are
  edited in the region, or key-value rows are inserted (bank.py).

A rewrite placed upstream of the NN refinement (the mixture) would be erased by it, so these are
the two places a rule can live. Every rewrite is recorded in the model's provenance (exemplar
hashes, mask, layer, weights, losses before and after) and shown by `faceprint inspect`.

Refused, with the reason: a fingerprinted instance (rewriting it would alter or strip the
instance's fingerprint; rewrite the base model, then issue instances from it); bad edits
(edits.py). A no-op edit (the edited pixels equal the original ones, or p = 0) returns the model
itself, unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError, InputError
from ..seeding import check_seed, derive_seed
from .edits import MAX_MASK_FRACTION, Edit, diff_mask, dilate, edit_from_files, mask_at, paste, paste_edit
from .layers import VALUE_LAYERS, check_conv_layers, layer_name, resolve_layer

MEMORIES = ("decoder", "bank")
WEIGHTINGS = ("weighted", "unweighted")
BANK_MODES = ("value", "insert")
MAX_EDITS = 10


class FingerprintedInstanceError(InputError):
    """A rewrite of a fingerprinted model instance was asked for."""


@dataclass(frozen=True)
class RewriteConfig:
    """How to rewrite.

    memory: "decoder" (papers/001) or "bank" (training-free).
    layer: value layer of the decoder rewrite, "16x16" (block 5, the paper's 1/8 resolution) or
        "32x32" (block 10), or a block index in (3, 4, 5, 8, 9, 10).
    conv_layers: L, the memory's depth (2: the paper's nonlinear memory; 1: RDGM's linear one).
    weighting: "weighted" (p N + q O, Eq. (11)) or "unweighted" (every cell alike).
    p, q: weights of the new rule and of the old rules (weighted only).
    steps, lr, batch: fine-tuning; ordinary: samples of the model holding the old rules.
    projector: "auto" (shipped trained weights if present for this decoder, else B0), "free",
        "trained" or a file.
    bank_mode: "value" (value edit) or "insert" (key-value insertion); key_shift: alpha.
    max_mask_fraction: refuse masks covering more of the image.
    seed: draws the ordinary samples and the fine-tuning's batches.
    """

    memory: str = "decoder"
    layer: str | int = "16x16"
    conv_layers: int = 2
    weighting: str = "weighted"
    p: float = 1.0
    q: float = 1.0
    steps: int = 300
    lr: float = 1e-3
    batch: int = 16
    ordinary: int = 200
    projector: str = "auto"
    bank_mode: str = "value"
    key_shift: float = 1.0
    max_mask_fraction: float = MAX_MASK_FRACTION
    seed: int = 0

    def __post_init__(self):
        if self.memory not in MEMORIES:
            raise ConfigError(f"memory must be one of {MEMORIES}, got {self.memory!r}")
        resolve_layer(self.layer)
        check_conv_layers(self.conv_layers)
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.bank_mode not in BANK_MODES:
            raise ConfigError(f"bank_mode must be one of {BANK_MODES}, got {self.bank_mode!r}")
        for name, lo, hi in (("p", 0, 1e6), ("q", 0, 1e6), ("lr", 0, 1.0), ("key_shift", 0, 1),
                             ("max_mask_fraction", 0, 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if self.lr == 0:
            raise ConfigError("lr must be positive")
        for name, lo in (("steps", 0), ("batch", 1), ("ordinary", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        check_seed(self.seed)

    @property
    def module(self) -> int:
        return resolve_layer(self.layer)

    def summary(self) -> dict:
        d = asdict(self)
        if self.memory == "bank":
            for k in ("layer", "conv_layers", "weighting", "p", "q", "steps", "lr", "batch", "ordinary", "projector"):
                d.pop(k)
            if self.bank_mode == "value":
                d.pop("key_shift")
        else:
            d.pop("bank_mode"), d.pop("key_shift")
            d["layer"] = layer_name(self.module)
            d["value_layer_module"] = self.module
            if self.weighting == "unweighted":
                d.pop("p"), d.pop("q")
        return d


@dataclass
class RewriteReport:
    noop: bool
    reason: str = ""
    memory: str = ""
    loss_before: dict = field(default_factory=dict)
    loss_after: dict = field(default_factory=dict)
    seconds: float = 0.0
    record: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def check_not_fingerprinted(gen, what: str = "the model") -> None:
    fp = getattr(gen, "fingerprint_", None)
    if fp:
        raise FingerprintedInstanceError(
            f"{what} is a fingerprinted instance ({fp.get('mechanism')}, instance {fp.get('instance')!r}); "
            "rewriting it would alter the code its faces carry (a model edit that could also strip it): rewrite "
            "the base model, then issue instances from the rewritten base")


def _edit_latents(gen, edits: list[Edit]) -> tuple[torch.Tensor, torch.Tensor]:
    """(original latents, edited latents), each (E, 32, h, w)."""
    ae = gen.autoencoder
    orig = []
    need = [i for i, e in enumerate(edits) if e.latent is None]
    enc = ae.encode(torch.stack([edits[i].original for i in need])) if need else None
    for i, e in enumerate(edits):
        orig.append(e.latent.float() if e.latent is not None else enc[need.index(i)])
    edited = ae.encode(torch.stack([e.edited for e in edits]))
    return torch.stack(orig), edited


def rewrite(gen, edits, config: RewriteConfig | None = None, *, projector=None, progress=None):
    """Rewrite ``gen``'s rules from ``edits`` (a list of 1-10 Edit). Returns (Generator, RewriteReport).

    ``projector`` (a BackwardProjector) overrides config.projector for the decoder memory."""
    config = config or RewriteConfig()
    gen._check_fitted()
    check_not_fingerprinted(gen)
    if gen.autoencoder is None:
        raise InputError("the model has no autoencoder loaded; load it with Generator.load(path) (not autoencoder=None)")
    edits = list(edits) if isinstance(edits, (list, tuple)) else [edits]
    if not edits:
        raise InputError("no edited sample: give 1 to 3 (--edit/--original, or --paste ... --onto SEED:INDEX)")
    if len(edits) > MAX_EDITS:
        raise InputError(f"{len(edits)} edited samples: the method learns a rule from 1-3 (at most {MAX_EDITS}); "
                         "give fewer")
    _, h, _ = gen.latent_shape
    size = 8 * h
    for i, e in enumerate(edits):
        e.check(size, max_fraction=config.max_mask_fraction, name=f"edit {i + 1}")
    records = [e.summary() for e in edits]
    if all(e.is_noop for e in edits) or (config.memory == "decoder" and config.p == 0
                                         and config.weighting == "weighted"):
        why = "p = 0" if config.p == 0 and config.memory == "decoder" and config.weighting == "weighted" \
            else "the edited images equal the originals inside the mask"
        return gen, RewriteReport(noop=True, reason=why, memory=config.memory)
    t0 = time.perf_counter()
    orig_lat, edit_lat = _edit_latents(gen, edits)
    op = {"operation": "rewrite", "method": "papers/001 Re-Generator" if config.memory == "decoder"
          else "refinement-memory rewrite (training-free)", **config.summary(), "exemplars": records}
    if config.memory == "bank":
        from . import bank

        if config.bank_mode == "value":
            out, cells = bank.value_edit(gen, edit_lat[0], edits[0].mask)
            op.update(region_cells=cells, value_from="edit 1 (TAEF2 encoding of the edited image)")
        else:
            out, rows = bank.insert_rows(gen, orig_lat, edit_lat, torch.stack([e.mask for e in edits]),
                                         key_shift=config.key_shift,
                                         hashes=[r["edited_sha256"] for r in records])
            op.update(rows_inserted=rows)
        seconds = time.perf_counter() - t0
        op["seconds"] = round(seconds, 3)
        out.record_operation(op)
        return out, RewriteReport(noop=False, memory="bank", seconds=seconds, record=op)
    from .decoder import rewrite_decoder
    from .projector import load_projector

    m = config.module
    proj = projector or load_projector(config.projector, gen.autoencoder, m)
    if proj.m != m:
        raise InputError(f"the projector maps to layer {layer_name(proj.m)}, the rewrite is at {layer_name(m)}")
    values = proj.features(torch.stack([e.edited for e in edits]))
    ordinary = gen.sample_latents(config.ordinary, seed=derive_seed(config.seed, "rewrite-ordinary")).latents \
        if config.ordinary else torch.zeros(0, *gen.latent_shape)
    res = rewrite_decoder(gen.autoencoder.decoder, m, config.conv_layers, edit_latents=orig_lat, edit_values=values,
                          edit_masks=torch.stack([e.mask for e in edits]), ordinary_latents=ordinary,
                          weighting=config.weighting, p=float(config.p), q=float(config.q), steps=config.steps,
                          lr=float(config.lr), batch=config.batch, seed=config.seed, progress=progress)
    seconds = time.perf_counter() - t0
    op.update(projector={"variant": proj.name, **({k: proj.provenance_.get(k) for k in ("trained_steps", "seed")}
                                                  if proj.alignment is not None else {})},
              rewritten_tensors=sorted(res.changed), loss_before=res.loss_before, loss_after=res.loss_after,
              seconds=round(seconds, 3))
    out = gen.with_decoder(res.state, fingerprint=None)
    out.record_operation(op)
    return out, RewriteReport(noop=False, memory="decoder", loss_before=res.loss_before, loss_after=res.loss_after,
                              seconds=seconds, record=op, history=res.history)


__all__ = ["BANK_MODES", "Edit", "FingerprintedInstanceError", "MEMORIES", "RewriteConfig", "RewriteReport",
           "VALUE_LAYERS", "check_not_fingerprinted", "diff_mask", "dilate", "edit_from_files", "mask_at", "paste",
           "paste_edit", "rewrite"]
