"""New faces of one person from one photo, with chosen attributes (papers/003, Face2Diffusion,
on faceprint's LR-GMM-NN generator; docs/SEED-SYSTEMS.md Sec. 2).

    pers = Personalizer(Generator.load("model.safetensors"), PersonalizeMapping.load("map.safetensors"))
    person = pers.encode("ref.jpg")                      # checks, aligns, encodes: S*
    images, record = pers.generate(person, {"Smiling": 1}, n=16, seed=0)

Sampling (the inference of Fig. 3b, with the CGDR analog as a sampling rule):

1. the prompt's class model (:func:`.prompt.prompt_model`: the mixture split by the prompt's
   cell) draws a class sample, exactly the one ``generate`` would draw for this prompt, seed
   and index (so rows of a benchmark compare the same class samples);
2. its identity coordinates inside the face mask are set to S* = f_map([v_id, ṽ_exp])
   (:meth:`PersonalizeMapping.apply`); the background and the within-person variation
   (expression, accessories, hair) stay the class sample's: this is the refinement target;
3. NN refinement with the class model's bank (the cell's photos): every latent pixel is copied
   from a training photo, so a fingerprinted instance's mark is carried;
4. (the method's default, ``reference_discount`` 0.5) inside the face mask, a latent pixel is
   taken from the reference's own latent where half its 5x5 patch distance to the target beats
   the bank collage's, except where the prompt's attributes live (the attribute map of the
   prompt's labels >= ``prompt_cut``, 0.4): the face follows the person, the prompt's region
   and the background follow the class model. Measured on 8 held-out people with a mapping
   trained on 40 (``python -m faceprint.bench personalize`` is the full measurement): the
   identity coordinates alone moved the dlib distance to the reference from 0.84 (class model)
   to 0.74; reference pixels everywhere in the mask to 0.34 but halved the Smiling probability
   (0.98 -> 0.51); outside the prompt's region 0.61-0.69 at 0.80-0.89;
5. ``reimpose`` (off by default, on for the identity-coordinates-only variant) sets the identity
   coordinates again after the refinement, scaled by ``strength``;
6. the copy guard redraws faces over the share rule or the distance rule (as ``generate``);
7. the instance's own decoder turns the latent into a 128 px face.

Consent and accountability:

- a reference that *is* a photo a model forgot (sha256), or that the identity recogniser
  accepts as a forgotten person (distance to the mean descriptor of their forgotten photos at
  most :data:`REFUSE_THRESHOLD`), is refused (ForgottenPersonError);
- the faces of a fingerprinted instance are decoded by its decoder from its marked bank;
- the record names the reference by its sha256 only (never the photo, never its file name),
  the prompt, the model, the mapping's digest, the seed, and every identity decision with the
  recogniser's measured error rates (:data:`ERROR_RATES`);
- the descriptor is kept in memory; :func:`save_descriptor` writes it mode 0600 only when
  asked.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import __version__
from ..errors import ForgottenPersonError, InputError
from ..io import now_iso
from .mapping import PersonalizeMapping, expression_features
from .prompt import Prompt, PromptModel, make_prompt, prompt_model, training_labels
from .reference import FaceFinder, Reference, find_reference

#: identity distance (mean-descriptor gallery rule) at or below which a reference is taken to
#: be a forgotten person and refused
REFUSE_THRESHOLD = 0.55
#: the method's defaults (bench personalize): a face-region latent pixel comes from the reference
#: when half its patch distance to the personalised target beats the bank's, except where the
#: prompt's attributes live (attribute map >= 0.4)
REFERENCE_DISCOUNT = 0.5
PROMPT_CUT = 0.4
#: the measured error rates printed with every identity decision (docs/results/recognisers.md,
#: celeba-id, 128 px, 5 enrolment photos per person; bench personalize measures the refusal)
ERROR_RATES = {
    "accept@0.50": "dlib mean-descriptor gallery rule at distance 0.50: 94.4% of a person's photos accepted, "
                   "0.068% of other people's (celeba-id, 5 enrolment photos; 93.4% / 0.10% after a TAEF2 round trip)",
    "refuse@0.55": "refusal at distance 0.55: 98.0% of a person's photos and 0.48% of other people's fall under it "
                   "(celeba-id, 5 enrolment photos; more forgotten photos make the gallery sharper)",
}


@dataclass
class Identity:
    """An encoded person: S* (1, r) and what it was computed from (kept in memory only)."""

    S: torch.Tensor
    descriptor: torch.Tensor
    latent: torch.Tensor
    expression: torch.Tensor
    reference: Reference
    seconds: dict = field(default_factory=dict)
    consent: dict = field(default_factory=dict)

    def descriptor_sha256(self) -> str:
        return hashlib.sha256(self.descriptor.float().contiguous().numpy().tobytes()).hexdigest()


def save_descriptor(identity: Identity, path) -> None:
    """Write the person's dlib descriptor (biometric data) as an IdentityGallery, mode 0600 like
    the owner's key."""
    from ..io import save_artifact
    from ..recognition.identity import MODEL_FILES, RECOGNITION_MODEL

    save_artifact(path, {"descriptors": identity.descriptor.float()},
                  {"class": "IdentityGallery", "name": f"reference {identity.reference.sha256[:12]}",
                   "created": now_iso(), "model": MODEL_FILES[RECOGNITION_MODEL]}, mode=0o600)


class Personalizer:
    """Personalised generation with a fitted (possibly fingerprinted) Generator and a mapping.

    Parameters
    ----------
    generator : Generator
    mapping : PersonalizeMapping
    forgotten : list of (label, Generator)
        Further (tamed) models whose forgotten people must be refused; ``generator`` itself is
        always checked.
    galleries : list of IdentityGallery
        People who must not be personalised, given directly.
    labels : dict or None
        {attribute: values in bank order} for the prompt split; None: classifier predictions.
    """

    def __init__(self, generator, mapping: PersonalizeMapping, *, forgotten=(), galleries=(), labels=None,
                 recogniser=None, finder=None, classifier=None, refuse_threshold: float = REFUSE_THRESHOLD):
        from ..recognition import IdentityRecogniser, load_classifier

        generator._check_fitted()
        mapping._check()
        if generator.autoencoder is None:
            raise InputError("the generator has no autoencoder; load it with Generator.load(path)")
        self.gen = generator
        self.mapping = mapping
        self.recogniser = recogniser or IdentityRecogniser()
        self.finder = finder or FaceFinder()
        self.classifier = classifier or load_classifier("celeba")
        self.refuse_threshold = float(refuse_threshold)
        self._labels, self._label_source = training_labels(generator, self.classifier, labels)
        self._prompts: dict = {}
        self._forgotten_models = [("the model", generator)] + list(forgotten)
        self._galleries = list(galleries)
        self._hashes, self._model_galleries = None, None

    # ------------------------------------------------------------------ consent
    def _forgotten(self):
        if self._hashes is None:
            from ..mixing.sources import forgotten_hashes, galleries_from_model

            hashes, gals = set(), []
            for label, g in self._forgotten_models:
                hs = forgotten_hashes(g.provenance_)
                hashes.update(hs)
                if hs:
                    gals.extend(galleries_from_model(g, g.provenance_, self.recogniser, label=label))
            self._hashes, self._model_galleries = hashes, gals
        return self._hashes, self._model_galleries + self._galleries

    def check_consent(self, reference: Reference, descriptor: torch.Tensor) -> dict:
        """Refuse (ForgottenPersonError) a reference that is, or looks like, a forgotten person;
        returns the record of the check."""
        hashes, gals = self._forgotten()
        if reference.sha256 in hashes:
            raise ForgottenPersonError(f"the reference photo is one a model forgot (same sha256 "
                                       f"{reference.sha256[:12]}...); personalising a forgotten person is refused")
        rec = {"forgotten_photos_known": len(hashes), "galleries": len(gals), "threshold": self.refuse_threshold,
               "error_rates": ERROR_RATES["refuse@0.55"], "nearest": None}
        if gals:
            dist = [(float(self.recogniser.gallery_distance(descriptor, g)[0]), g.name) for g in gals]
            d, name = min(dist)
            rec["nearest"] = {"gallery": name, "distance": round(d, 4)}
            if d <= self.refuse_threshold:
                raise ForgottenPersonError(
                    f"the reference shows a person a model forgot ({name!r}: identity distance {d:.3f} <= "
                    f"{self.refuse_threshold}; {ERROR_RATES['refuse@0.55']}); personalising a forgotten person is "
                    "refused")
        return rec

    # ------------------------------------------------------------------ encoding
    def encode(self, photo, *, check: bool = True) -> Identity:
        """Check, align and encode a reference photo (path or (H, W, 3) uint8 array)."""
        t0 = time.perf_counter()
        ref = find_reference(photo, self.finder)
        desc = self.recogniser.describe(ref.image[None])
        t_desc = time.perf_counter() - t0
        consent = self.check_consent(ref, desc) if check else {"skipped": True}
        person = self.encode_aligned(ref, desc)
        person.seconds["descriptor"] = round(t_desc, 4)
        person.consent = consent
        return person

    def encode_aligned(self, ref: Reference, descriptor: torch.Tensor, latent: torch.Tensor | None = None) -> Identity:
        """Encode an already checked reference whose descriptor (and optionally TAEF2 latent
        (1, 32, 16, 16)) is known. Timed apart: "latent" (the TAEF2 encoding of the aligned face)
        and "mapping" (identity features and f_map: what the 0.1 s budget is about)."""
        from ..recognition.identity import DEFAULT_BOX

        t0 = time.perf_counter()
        if latent is None:
            ae = getattr(self.gen.autoencoder, "base", self.gen.autoencoder)
            latent = ae.encode(ref.image[None])  # (1, 32, 16, 16)
        t1, c1 = time.perf_counter(), time.thread_time()
        S = self.mapping.encode(latent, descriptor)  # inference: the learned null replaces v_exp (Eq. 4)
        t2, c2 = time.perf_counter(), time.thread_time()
        u8 = (ref.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        lm = self.finder.box_landmarks(u8, DEFAULT_BOX)[None]
        v_exp = expression_features(latent, lm, self.classifier)  # kept for expression-conditioned use
        return Identity(S=S, descriptor=descriptor, latent=latent, expression=v_exp, reference=ref,
                        seconds={"latent": round(t1 - t0, 4), "mapping": round(t2 - t1, 4),
                                 "mapping_cpu": round(c2 - c1, 4)})

    # ------------------------------------------------------------------ prompts
    def prompt(self, targets, *, allow_unmeasured: bool = False, min_members: int = 8) -> tuple[Prompt, PromptModel]:
        """The validated prompt and its class model (cached per prompt)."""
        p = make_prompt(targets or {}, self.classifier, allow_unmeasured=allow_unmeasured)
        key = (tuple(sorted(p.targets.items())), min_members)
        if key not in self._prompts:
            self._prompts[key] = prompt_model(self.gen, p, self._labels, source=self._label_source,
                                              min_members=min_members)
        return p, self._prompts[key]

    # ------------------------------------------------------------------ sampling
    def sample_latents(self, person: Identity | None, pm: PromptModel, n: int, *, seed: int, start: int = 0,
                       strength: float = 1.0, reimpose: bool = True, reference_discount: float | None = None,
                       prompt_cut: float = 0.5, guard=None, rank_temperature=None):
        """Latents (n, 32, 16, 16), provenance (n, 16, 16) (-1 where the identity was set, -2
        where the reference's own latent pixel was taken), redraws (n,). ``person`` None: the
        class model alone (the same class samples).

        ``reference_discount`` (d in (0, 1], None: off): inside the face mask, a latent pixel
        is taken from the reference's own latent instead of the bank when d times the 5x5 patch
        distance of the reference to the personalised target is below the bank collage's
        (docs/SEED-SYSTEMS.md 2.3 step 5: the identity-vs-editability knob; smaller d = more of
        the reference). Those pixels carry no fingerprint and copy the photo's appearance."""
        from ..errors import CopyGuardError
        from ..latent.generator import DEFAULT_GUARD
        from ..latent.refine import gather
        from ..seeding import check_seed

        check_seed(seed)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"n must be a positive int, got {n!r}")
        if not (isinstance(strength, (int, float)) and 0 <= strength <= 4):
            raise InputError(f"strength must be a number in [0, 4], got {strength!r}")
        guard = DEFAULT_GUARD if guard is None else guard
        gen = pm.generator
        lam = rank_temperature or gen.config.rank_temperature
        sampler = gen._sampler(lam)
        refiner = gen._refiner()
        C, h, w = gen.latent_shape
        q = gen.config.channels
        thr = gen.guard_threshold(guard.quantile) if guard is not False else 0.0
        out = torch.empty(n, C, h, w)
        prov_out = torch.empty(n, h, w, dtype=torch.int64)
        redraws = torch.zeros(n, dtype=torch.int64)
        todo = list(range(n))
        region = self.mapping.space_.mask_ > 0.5
        while todo:
            zs, cs = [], []
            for j in todo:
                zf, c = sampler.draw_at([start + j], seed, attempt=int(redraws[j]))
                zs.append(zf)
                cs.append(c)
            z0 = torch.cat(zs).reshape(len(todo), q, h, w)
            comp = torch.cat(cs)
            raw = gen.projector_.inverse(z0)
            if person is not None:
                raw = self.mapping.apply(raw, person.S, strength)
            target = gen.projector_.transform(raw)
            _, prov = refiner.refine(target, comp)
            z = gather(gen.bank_, prov).float()
            if person is not None and reference_discount is not None:
                z, prov = self._reference_pixels(z, prov, target, person, reference_discount,
                                                 None if pm.where is None else pm.where < prompt_cut)
            if person is not None and reimpose:
                z = self.mapping.apply(z, person.S, strength)
            bad = gen._copies(z, prov, thr, guard) if guard is not False else torch.zeros(len(todo), dtype=torch.bool)
            keep = []
            for k, j in enumerate(todo):
                if bad[k]:
                    redraws[j] += 1
                    if int(redraws[j]) >= guard.max_attempts:
                        raise CopyGuardError(f"face {start + j} of seed {seed} was a near-copy of a training photo in "
                                             f"{guard.max_attempts} draws; use another seed")
                    keep.append(j)
                    continue
                out[j] = z[k]
                p = prov[k].clone()
                if person is not None and reimpose:
                    p[region & (p >= 0)] = -1
                prov_out[j] = p
            todo = keep
        return out, prov_out, redraws

    def _reference_pixels(self, z, prov, target, person: Identity, discount: float, allowed=None):
        import torch.nn.functional as F

        if not (isinstance(discount, (int, float)) and 0 < discount <= 1):
            raise InputError(f"reference_discount must be in (0, 1], got {discount!r}")
        P = self.gen.projector_
        rho = self.gen.config.patch_radius
        zb = P.transform(z)
        zr = P.transform(person.latent.float())
        db = ((target - zb) ** 2).sum(1, keepdim=True)
        dr = ((target - zr) ** 2).sum(1, keepdim=True)
        if rho > 0:
            db = F.avg_pool2d(db, 2 * rho + 1, stride=1, padding=rho)
            dr = F.avg_pool2d(dr, 2 * rho + 1, stride=1, padding=rho)
        use = ((discount * dr < db)[:, 0]) & (self.mapping.space_.mask_ > 0.5)  # (m, h, w)
        if allowed is not None:  # not where the prompt's attributes live
            use &= allowed
        z = torch.where(use[:, None], person.latent.float().expand_as(z), z)
        prov = prov.clone()
        prov[use] = -2
        return z, prov

    def realised(self, latents: torch.Tensor, prompt: Prompt) -> dict:
        """Per requested attribute: the classifier's mean probability of the requested value and
        the share of faces predicted to show it (unmeasured attributes: None)."""
        probs = self.classifier.predict_proba_latents(latents)
        out = {}
        for a, v in prompt.targets.items():
            if a in prompt.unmeasured:
                out[a] = None
                continue
            p = probs[a][:, v]
            out[a] = {"mean_probability": round(float(p.mean()), 4), "share": round(float((p > 0.5).float().mean()), 4)}
        return out

    def generate(self, person: Identity, targets=None, *, n: int = 16, seed: int = 0, start: int = 0,
                 strength: float = 1.0, reference_discount: float | None = REFERENCE_DISCOUNT,
                 prompt_cut: float = PROMPT_CUT, reimpose: bool = False, allow_unmeasured: bool = False,
                 batch: int = 64, progress: bool = False):
        """Personalised faces: (images (n, 3, 128, 128) in [0, 1], provenance record). The
        defaults are the method of ``bench personalize`` (see :meth:`sample_latents`)."""
        t0 = time.perf_counter()
        p, pm = self.prompt(targets, allow_unmeasured=allow_unmeasured)
        imgs, lats, redraw, provs = [], [], [], []
        for s in range(0, n, batch):
            m = min(batch, n - s)
            z, pv, r = self.sample_latents(person, pm, m, seed=seed, start=start + s, strength=strength,
                                           reference_discount=reference_discount, prompt_cut=prompt_cut,
                                           reimpose=reimpose)
            provs.append(pv)
            imgs.append(self.gen.autoencoder.decode(z, progress=progress))
            lats.append(z)
            redraw.append(r)
        images = torch.cat(imgs)
        latents = torch.cat(lats)
        prov = torch.cat(provs)
        rec = self.record(person, p, pm, n=n, seed=seed, start=start, strength=strength,
                          realised=self.realised(latents, p), redraws=torch.cat(redraw),
                          seconds=time.perf_counter() - t0)
        rec["sampling"] = {"reference_discount": reference_discount, "prompt_cut": prompt_cut, "reimpose": reimpose,
                           "latent_pixels": {"copied_from_training_photos": round(float((prov >= 0).float().mean()), 4),
                                             "from_the_reference": round(float((prov == -2).float().mean()), 4),
                                             "identity_set": round(float((prov == -1).float().mean()), 4)}}
        return images, rec

    def record(self, person: Identity, p: Prompt, pm: PromptModel, *, n, seed, start, strength, realised, redraws,
               seconds) -> dict:
        gen = self.gen
        return {
            "faceprint": "personalize", "faceprint_version": __version__, "created": now_iso(),
            "method": "papers/003 Face2Diffusion adapted to LR-GMM-NN (identity coordinates in the face mask)",
            "reference": {**person.reference.record(), "descriptor_sha256": person.descriptor_sha256(),
                          "note": "the photo, its name and its descriptor are not stored; only their sha256"},
            "prompt": p.record(), "prompt_model": pm.record(), "realised": realised,
            "model": {"data_hash": gen.training_.data_hash, "n_photos": gen.n_photos,
                      "fingerprint_instance": (gen.fingerprint_ or {}).get("instance"),
                      "decoder": getattr(gen.autoencoder, "id", None)},
            "mapping": {"digest": self.mapping.digest(), "config": {k: getattr(self.mapping.config, k) for k in
                                                                    ("features", "expression", "region", "rank")},
                        "provenance": self.mapping.provenance_},
            "n": n, "seed": seed, "start": start, "strength": strength,
            "identity_check": person.consent,
            "copy_guard": {"redrawn_faces": int((redraws > 0).sum())},
            "seconds": {**person.seconds, "generate": round(seconds, 3)},
            "identity_error_rates": ERROR_RATES,
        }


__all__ = ["PROMPT_CUT", "REFERENCE_DISCOUNT", "ERROR_RATES", "REFUSE_THRESHOLD", "Identity", "Personalizer", "save_descriptor"]
