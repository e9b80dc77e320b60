"""Attribute prompts: what a personalised face should show, realised by the frozen class model
(papers/003's text prompt, without text: no text model exists offline, so a prompt is a set of
attribute targets that faceprint's own classifiers can check; docs/SEED-SYSTEMS.md Sec. 2.3).

A prompt is ``{"Smiling": 1, "Eyeglasses": 1}``: CelebA attribute names of faceprint's
``celeba`` attribute classifier, each 0 or 1. It is refused (InputError, one line naming the
attribute, the problem and the fix) when

- an attribute is unknown, or its value is not 0 or 1;
- two targets contradict each other (:data:`CONTRADICTIONS`: Bald with Bangs or any hair
  colour, two hair colours, No_Beard with Goatee or Mustache, ...);
- the classifier that would check the attribute is unreliable: its held-out balanced accuracy
  after a TAEF2 round trip is below :data:`RELIABLE` (0.84; e.g. Big_Lips 0.62, Oval_Face
  0.65). ``allow_unmeasured=True`` accepts it anyway and marks it "unmeasured": it is still
  realised by the class model, but no score is reported for it.

Realisation (:func:`prompt_model`): the model's mixture is split by the joint cell of the
prompt's attributes (:meth:`faceprint.latent.mixture.GaussianMixture.split`, the split behind
``faceprint tame rebalance``: no part mixes cells, and the NN refinement of a part copies only
from photos of its cell), then every part outside the requested cell gets weight 0. The
labels of the training photos come from a label table (e.g. celeba's attributes.csv) or, by
default, from the classifier's prediction on the model's own latents (recorded either way).
A cell with fewer than ``min_members`` training photos is realised anyway, with a
:class:`PromptWarning` saying how few; the realised rate (the classifier's share of faces that
show the value) is reported with the faces.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..errors import FaceprintWarning, InputError

#: smallest held-out balanced accuracy (after a TAEF2 round trip) of a classifier whose
#: attribute a prompt may use without being marked unmeasured
RELIABLE = 0.84
MIN_MEMBERS = 8
HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
#: pairs of (attribute, value) that cannot hold together
CONTRADICTIONS = (
    [(("Bald", 1), ("Bangs", 1))]
    + [(("Bald", 1), (h, 1)) for h in HAIR]
    + [((a, 1), (b, 1)) for i, a in enumerate(HAIR) for b in HAIR[i + 1:]]
    + [(("No_Beard", 1), ("Goatee", 1)), (("No_Beard", 1), ("Mustache", 1)), (("No_Beard", 1), ("Sideburns", 1)),
       (("No_Beard", 1), ("5_o_Clock_Shadow", 1)),
       (("Bald", 1), ("Wavy_Hair", 1)), (("Bald", 1), ("Straight_Hair", 1)),
       (("Wavy_Hair", 1), ("Straight_Hair", 1)), (("Receding_Hairline", 1), ("Bangs", 1))]
)


class PromptWarning(FaceprintWarning):
    """A prompt cell has too few training photos to be realised reliably."""


@dataclass
class Prompt:
    """Validated attribute targets; ``unmeasured`` lists attributes whose classifier is too
    unreliable to score (accepted only with allow_unmeasured)."""

    targets: dict[str, int]
    unmeasured: list[str] = field(default_factory=list)
    reliability: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        return ", ".join(f"{a}={v}" for a, v in self.targets.items()) or "(class model)"

    def record(self) -> dict:
        return {"targets": dict(self.targets), "unmeasured": list(self.unmeasured),
                "classifier_balanced_accuracy_roundtrip": {a: round(v, 3) for a, v in self.reliability.items()}}

    @property
    def measured(self) -> list[str]:
        return [a for a in self.targets if a not in self.unmeasured]


def classifier_reliability(classifier) -> dict[str, float]:
    """attribute -> held-out balanced accuracy after a TAEF2 round trip (photo figure if absent)."""
    out = {}
    for t in classifier.tasks:
        m = classifier.metrics_roundtrip_.get(t.name) or classifier.metrics_.get(t.name) or {}
        if "balanced_accuracy" in m:
            out[t.name] = float(m["balanced_accuracy"])
    return out


def parse_attribute(text: str) -> tuple[str, int]:
    """"Smiling=1" -> ("Smiling", 1)."""
    if not isinstance(text, str) or text.count("=") != 1:
        raise InputError(f"--attribute {text!r}: write NAME=VALUE, e.g. --attribute Smiling=1")
    name, value = (s.strip() for s in text.split("="))
    v = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0, "-1": 0}.get(value.lower())
    if not name or v is None:
        raise InputError(f"--attribute {text!r}: the value must be 1 (show it) or 0 (do not show it), e.g. "
                         f"--attribute {name or 'Smiling'}=1")
    return name, v


def make_prompt(targets, classifier, *, allow_unmeasured: bool = False, reliable: float = RELIABLE) -> Prompt:
    """Validate targets ({name: 0/1}, or a list of "NAME=VALUE" strings) against the classifier."""
    if isinstance(targets, (list, tuple)):
        pairs = [parse_attribute(t) for t in targets]
    elif isinstance(targets, dict):
        pairs = list(targets.items())
    else:
        raise InputError(f"prompt must be a dict {{attribute: 0 or 1}} or a list of 'NAME=VALUE', got {targets!r}")
    rel = classifier_reliability(classifier)
    known = [t.name for t in classifier.tasks]
    out: dict[str, int] = {}
    for name, v in pairs:
        if name not in known:
            close = [k for k in known if k.lower() == str(name).lower()]
            hint = f"did you mean {close[0]}?" if close else f"known attributes: {', '.join(known)}"
            raise InputError(f"--attribute {name}: unknown attribute; {hint}")
        if isinstance(v, bool) or v not in (0, 1):
            raise InputError(f"--attribute {name}={v!r}: the value must be 0 or 1")
        if name in out and out[name] != v:
            raise InputError(f"--attribute {name} is given twice with different values ({out[name]} and {v}); keep one")
        out[name] = int(v)
    for (a, va), (b, vb) in CONTRADICTIONS:
        if out.get(a) == va and out.get(b) == vb:
            raise InputError(f"--attribute {a}={va} and --attribute {b}={vb} contradict each other (a face cannot show "
                             "both); drop one of them")
    unmeasured = []
    for name in out:
        acc = rel.get(name)
        if acc is None or acc < reliable:
            if not allow_unmeasured:
                shown = "no held-out measurement" if acc is None else f"balanced accuracy {acc:.3f}"
                raise InputError(f"--attribute {name}: its classifier is unreliable ({shown} after a TAEF2 round trip, "
                                 f"below {reliable}), so the result could not be checked; drop it, or pass "
                                 "--allow-unmeasured to realise it unscored")
            unmeasured.append(name)
    return Prompt(out, unmeasured, {a: rel[a] for a in out if a in rel})


def training_labels(gen, classifier, labels: dict | None = None) -> tuple[dict[str, list[int]], str]:
    """0/1 value of every classifier attribute for each training photo of ``gen`` (bank order),
    from ``labels`` ({attribute: list of "1"/"-1"/"0" strings in bank order}) where given, else
    the classifier's prediction on the bank latents. Returns (labels, source)."""
    n = gen.n_photos
    if labels is not None:
        out = {}
        for a, col in labels.items():
            if len(col) != n:
                raise InputError(f"labels[{a!r}] has {len(col)} values for the model's {n} training photos")
            out[a] = [1 if str(v).strip() in ("1", "1.0", "yes", "true") else 0 for v in col]
        return out, "labels"
    pred = classifier.predict_latents(gen.bank_.float())
    return {a: p.tolist() for a, p in pred.items()}, "classifier"


@dataclass
class PromptModel:
    """The class model of a prompt: a split, re-weighted copy of the generator, and what it took."""

    generator: object
    cell_photos: int
    parts: int
    label_source: str
    warning: str | None = None
    where: torch.Tensor | None = None  # (16, 16) in [0, 1]: where the prompt's attributes live

    def record(self) -> dict:
        return {"cell_training_photos": self.cell_photos, "mixture_parts": self.parts,
                "label_source": self.label_source, "warning": self.warning}


def prompt_model(gen, prompt: Prompt, labels: dict[str, list[int]], *, source: str = "classifier",
                 min_members: int = MIN_MEMBERS) -> PromptModel:
    """A copy of ``gen`` that draws only from the prompt's cell (module docstring)."""
    if not prompt.targets:
        return PromptModel(gen, gen.n_photos, int(gen.mixture_.weights_.numel()), source)
    n = gen.n_photos
    inside = torch.ones(n, dtype=torch.bool)
    for a, v in prompt.targets.items():
        if a not in labels:
            raise InputError(f"no training labels for {a!r}; give a label table with that column or use the classifier")
        inside &= torch.tensor([int(x) == v for x in labels[a]], dtype=torch.bool)
    count = int(inside.sum())
    if count == 0:
        raise InputError(f"prompt {prompt.text()}: none of the model's {n} training photos shows this combination, so "
                         "the model cannot draw it; drop an attribute or use a model fitted on photos that show it")
    warning = None
    if count < min_members:
        warning = (f"prompt {prompt.text()}: only {count} of the model's {n} training photos show this combination "
                   f"(fewer than {min_members}); the faces will repeat those photos' features. The realised rate is "
                   "reported with the faces")
        warnings.warn(warning, PromptWarning, stacklevel=2)
    where = attribute_map(gen.bank_, labels, prompt.targets)
    out = gen.copy()
    mix = out.mixture_
    Y = out.projector_.transform(out.bank_.float()).reshape(n, -1)
    groups = inside.long()  # cell 1: the prompt's combination, cell 0: every other
    info = mix.split(Y, groups, min_members=min(float(min_members), float(count)))
    keep = torch.tensor([c == 1 for c in info["cells"]], dtype=torch.bool)
    w = mix.weights_.clone()
    w[~keep] = 0
    mix.weights_ = (w / w.sum()).to(mix.means_.dtype)
    out._cache = {}
    out.record_operation({"operation": "prompt", "targets": dict(prompt.targets), "label_source": source,
                          "cell_training_photos": count})
    return PromptModel(out, count, int(keep.sum()), source, warning, where)


def attribute_map(bank: torch.Tensor, labels: dict[str, list[int]], targets: dict[str, int]) -> torch.Tensor:
    """(16, 16) in [0, 1]: for each latent pixel, how much the prompt's attributes change it in
    the training photos (the largest over the attributes of the squared norm of the difference
    between the mean latent of photos with and without the attribute, scaled to a maximum of 1).
    Measured from the labels and the bank, not from any classifier's weights."""
    z = bank.float()
    out = torch.zeros(z.shape[2:], dtype=torch.float32)
    for a in targets:
        lab = torch.tensor([int(x) for x in labels[a]], dtype=torch.bool)
        if lab.all() or not lab.any():
            continue
        diff = z[lab].mean(0) - z[~lab].mean(0)  # (C, h, w)
        e = (diff ** 2).sum(0)
        out = torch.maximum(out, e / e.max().clamp_min(1e-12))
    return out


__all__ = ["attribute_map", "CONTRADICTIONS", "MIN_MEMBERS", "RELIABLE", "Prompt", "PromptModel", "PromptWarning",
           "classifier_reliability", "make_prompt", "parse_attribute", "prompt_model", "training_labels"]
