"""`python -m faceprint.bench personalize`: personalisation from one photo (papers/003,
Face2Diffusion, on LR-GMM-NN; issue 16 acceptance; docs/SEED-SYSTEMS.md Sec. 2.4).

Protocol
--------
- Test people: the first ``--people`` celeba-id identities (sorted by identity number) whose
  photos give a reference (the first photo in file order that passes the reference checks:
  one frontal face >= 64 px). Per person: the reference; 5 gallery photos (the next ones, for
  the gallery rule); 5 refit photos (the next ones, for the subject-driven baseline); the rest
  (up to 20) stand for the person's photos in a model that later forgot them.
- Every celeba-10k photo of a test identity is excluded, by identity number, from the base
  model's and the mapping's training photos (celeba-10k and celeba-id share 277 pictures).
- Base model: LR-GMM-NN (defaults, seed) on the first ``--base-photos`` remaining celeba-10k
  photos in file order. Mapping: trained on up to ``--map-photos`` remaining celeba-10k photos
  (identity labels from attributes.csv). Prompt splits use celeba-10k's attribute labels (not
  the classifier that scores the faces).
- Prompts: ``--prompts`` (default 12 prompts of reliable attributes); ``--faces`` faces each
  (default 4), seeds derived from (--seed, person, prompt), the same for every row.

Rows (one run): class model (no identity); copy (TAEF2 round trip of the reference); refit
(LR-GMM-NN fitted on the 5 refit photos: the subject-driven baseline, prompt ignored); latent
arithmetic (reference latent + the mean attribute directions of the base photos); the method
(faceprint.personalize defaults, identity-projected multi-scale features) and its ablations:
features = dlib only / raw multi-scale (Table 3), no expression guidance (Table 4), no face
mask (the whole latent) and no prompt region (Table 5's face-vs-background rule), identity
coordinates only (no reference pixels).

Metrics per face (one recogniser, dlib; one attribute classifier, faceprint's celeba heads on
the TAEF2 encoding of the decoded face): ID_cos = max(cos(dlib(ref), dlib(face)), 0);
ID_accept = the gallery rule (mean descriptor of the 5 gallery photos, threshold 0.5); Prompt = mean classifier
probability of the requested values; Dir = mean over the prompt's attributes of max(0, that
probability minus the reference's own); hMean and gMean of the row means of [ID_cos, Prompt,
Dir]; FID of up to ``--fid-faces`` faces per row against celeba-10k 005001-010000. Paired
bootstrap over identities (per-identity hMean/gMean, method minus each row). Best-of-N
(N = 1, 2, 4, 8, 16) of the per-face hMean for ``--best-of-people`` people. Forgotten people:
for ``--forget-people`` people, the refusal rule of faceprint.personalize against a gallery of
their forget photos: share of their other photos refused, and of other people's references.

Resumable: every stage's result lives in ``--out`` (outside the repository; it holds latents,
descriptors, a fitted model and faces of real people: never commit it); ``--resume`` reuses
what a run with the same settings finished; ``--minutes`` stops cleanly (run again with
--resume). Results: OUT/personalize.md and .json; ``--publish DIR`` copies them (no photo).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .machine import describe, print_table

DEFAULT_PROMPTS = ("Smiling=1", "Smiling=0", "Eyeglasses=1", "Wearing_Hat=1", "Bangs=1", "Blond_Hair=1",
                   "Gray_Hair=1", "Heavy_Makeup=1", "No_Beard=0", "Wearing_Lipstick=1", "Mouth_Slightly_Open=1",
                   "Smiling=1+Eyeglasses=1")
MAP_VARIANTS = {
    "msid": {},
    "dlib": {"features": "dlib"},
    "multiscale": {"features": "multiscale"},
    "noexp": {"expression": "none"},
    "full": {"region": "full"},
}
#: row -> (label, kind, mapping variant, sampling keywords)
ROWS = {
    "class": ("class model, no identity", "class", None, {}),
    "copy": ("copy of the reference (TAEF2 round trip)", "copy", None, {}),
    "refit": ("refit: LR-GMM-NN on 5 photos of the person (prompt ignored)", "refit", None, {}),
    "arithmetic": ("latent arithmetic: reference + attribute directions", "arithmetic", None, {}),
    "method": ("the method (identity-projected multi-scale features)", "method", "msid", {}),
    "abl_dlib": ("ablation: dlib descriptor only", "method", "dlib", {}),
    "abl_multiscale": ("ablation: raw multi-scale features", "method", "multiscale", {}),
    "abl_noexp": ("ablation: no expression guidance", "method", "noexp", {}),
    "abl_full": ("ablation: no face mask (whole latent)", "method", "full", {}),
    "abl_noprompt": ("ablation: reference pixels also where the prompt lives", "method", "msid", {"prompt_cut": 1.01}),
    "abl_coords": ("ablation: identity coordinates only (no reference pixels)", "method", "msid",
                   {"reference_discount": None, "reimpose": True}),
}


def add_arguments(p) -> None:
    p.add_argument("--data", type=Path, default=None, help="datasets folder (default ../shared/datasets)")
    p.add_argument("--out", type=Path, default=Path("bench-results/personalize"),
                   help="state and outputs (outside the repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--people", type=int, default=100, help="test identities (celeba-id; default 100)")
    p.add_argument("--prompts", default=",".join(DEFAULT_PROMPTS),
                   help="comma-separated prompts, attributes joined by '+' (default: 12 prompts)")
    p.add_argument("--faces", type=int, default=4, help="faces per (person, prompt) (default 4)")
    p.add_argument("--base-photos", type=int, default=1024, help="base model photos (default 1024)")
    p.add_argument("--map-photos", type=int, default=10000, help="mapping training photos at most (default all)")
    p.add_argument("--steps", type=int, default=4000, help="mapping training steps (default 4000)")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to evaluate (default all)")
    p.add_argument("--best-of-people", type=int, default=20, help="people for the best-of-N curve (N up to 16)")
    p.add_argument("--forget-people", type=int, default=50, help="people for the forgotten-person refusal rates")
    p.add_argument("--fid-faces", type=int, default=2000, help="faces per row for FID (0: no FID)")
    p.add_argument("--fid-rows", default="class,copy,method", help="rows that get an FID")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes (resume later)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--train-only", action="store_true", help="prepare the data and train the mappings only")
    p.add_argument("--resume", action="store_true", help="reuse what a run with the same settings finished")
    p.add_argument("--publish", type=Path, default=None, help="copy personalize.md/json here (e.g. docs/results)")
    p.add_argument("--write-mapping", type=Path, default=None,
                   help="copy the trained method mapping here (e.g. src/faceprint/personalize/weights/mapping.safetensors)")
    p.add_argument("--contended", action="store_true", help="mark timings as measured while other jobs ran")
    p.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                   help="evaluate only people K, K+N, K+2N, ... (1-based K) and stop before the report: run N shards "
                        "in parallel on one --out (after --train-only), then once without --shard and with --resume "
                        "to assemble; shard 1 also computes the AUC table and the refusal rates")
    p.add_argument("--weights", type=Path, default=None)


def _shard(text: str) -> tuple[int, int]:
    import argparse

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like K/N (e.g. 1/2), got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


class OutOfTime(Exception):
    pass


class Ctx:
    """Shared state of one run: settings, deadline, loaded parts."""

    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
        self.prompts = [_parse_prompt(p) for p in args.prompts.split(",") if p.strip()]
        self.rows = [r for r in args.rows.split(",") if r.strip()]
        for r in self.rows:
            if r not in ROWS:
                raise SystemExit(f"--rows: unknown row {r!r}; rows: {', '.join(ROWS)}")
        self.settings = {"seed": args.seed, "people": args.people, "prompts": [dict(p) for p in self.prompts],
                         "faces": args.faces, "base_photos": args.base_photos, "map_photos": args.map_photos,
                         "steps": args.steps}

    def check_time(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime(what)

    def path(self, *parts) -> Path:
        p = self.out.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def _parse_prompt(text: str) -> dict:
    from ..personalize.prompt import parse_attribute

    return dict(parse_attribute(t) for t in text.strip().split("+"))


def _prompt_text(p: dict) -> str:
    return " + ".join(f"{a}={v}" for a, v in p.items())


def _save_json(path: Path, obj) -> None:
    from ..io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_jsonable))


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------ data
def _datasets(args) -> Path:
    from .machine import datasets_dir

    return datasets_dir(args.data, needs="celeba-10k/ and celeba-id")


def split(ctx, parts) -> dict:
    """Test people and their photos; the excluded identities (stage file split.json)."""
    f = ctx.path("split.json")
    doc = _load_json(f)
    if doc is not None and doc.get("settings") == {"people": ctx.args.people, "seed": ctx.args.seed}:
        return doc
    from ..personalize.reference import find_reference

    base = _datasets(ctx.args)
    idroot = base / "celeba-id" / "images"
    people = sorted((p.name for p in idroot.iterdir() if p.is_dir()), key=lambda s: int(s) if s.isdigit() else s)
    finder = parts["finder"]
    test, skipped = [], []
    for person in people:
        if len(test) >= ctx.args.people:
            break
        files = sorted((idroot / person).iterdir())
        ref = None
        for i, fp in enumerate(files):
            try:
                find_reference(fp, finder)
            except Exception as e:  # noqa: BLE001 - recorded: why this photo cannot be a reference
                skipped.append({"person": person, "file": fp.name, "reason": str(e).split(": ", 1)[-1][:80]})
                continue
            ref = i
            break
        others = [fp for j, fp in enumerate(files) if j != ref] if ref is not None else []
        if ref is None or len(others) < 11:
            continue
        test.append({"person": person, "reference": f"{person}/{files[ref].name}",
                     "gallery": [f"{person}/{x.name}" for x in others[:5]],
                     "refit": [f"{person}/{x.name}" for x in others[5:10]],
                     "forget": [f"{person}/{x.name}" for x in others[10:30]]})
    if len(test) < ctx.args.people:
        print(f"warning: only {len(test)} celeba-id people have a usable reference", flush=True)
    ids = {t["person"] for t in test}
    from ..data import read_labels

    table = read_labels(base / "celeba-10k" / "attributes.csv")
    col = table.values_at(range(len(table.keys)), ["identity"])["identity"]
    keys = list(table.keys)
    kept = [k for k, i in zip(keys, col) if i not in ids]
    doc = {"settings": {"people": ctx.args.people, "seed": ctx.args.seed}, "test": test,
           "celeba10k_kept": sorted(kept), "celeba10k_excluded": len(keys) - len(kept),
           "excluded_identities_present": len({i for i in col if i in ids}), "skipped_references": skipped[:200]}
    _save_json(f, doc)
    return doc


def latents_of(ctx, paths: list[Path], name: str, ae) -> torch.Tensor:
    """TAEF2 latents of 128 px centre crops (stage file, image content: never commit)."""
    from safetensors.torch import load_file, save_file

    f = ctx.path("latents", f"{name}.safetensors")
    keys = [str(p) for p in paths]
    if f.is_file():
        t = load_file(str(f))
        meta = json.loads((f.with_suffix(".json")).read_text()) if f.with_suffix(".json").is_file() else {}
        if meta.get("keys") == keys:
            return t["latents"]
    from ..data import encode_files

    # through the shared latent cache: photos another bench encoded are not encoded again
    z = encode_files(paths, ae, size=128, check_time=lambda: ctx.check_time(f"encoding {name}")) if paths \
        else torch.zeros(0, 32, 16, 16)
    save_file({"latents": z.contiguous()}, str(f))
    _save_json(f.with_suffix(".json"), {"keys": keys, "note": "latents of shared photos: never commit"})
    return z


def descriptors_of(ctx, paths, parts):
    from ..personalize.training import describe_photos

    d, lm, done = describe_photos(paths, parts["rec"], parts["finder"], cache=ctx.path("descriptors.safetensors"),
                                  save_every=200, deadline=ctx.deadline, progress=True)
    if not all(done):
        raise OutOfTime(f"dlib descriptors ({sum(done)}/{len(done)})")
    return d, lm


# ------------------------------------------------------------------------------------ models
def base_model(ctx, sp, ae):
    from ..data import LatentSet, read_labels
    from ..latent.generator import Generator, GeneratorConfig

    base = _datasets(ctx.args) / "celeba-10k"
    names = sp["celeba10k_kept"][:ctx.args.base_photos]
    f = ctx.path(f"base-{ctx.args.base_photos}-seed{ctx.args.seed}.safetensors")
    table = read_labels(base / "attributes.csv")
    rows = table.match(names)
    labels = table.values_at(rows, [c for c in table.columns if c != "identity"])
    if f.is_file():
        return Generator.load(f, autoencoder=ae), labels
    paths = [base / "images" / n for n in names]
    z = latents_of(ctx, paths, f"base-{ctx.args.base_photos}", ae)
    from ..io import sha256_file

    ls = LatentSet(z.float(), names, [sha256_file(p) for p in paths], None, str(base / "images"), 128)
    gen = Generator(GeneratorConfig(), autoencoder=ae).fit(ls, seed=ctx.args.seed)
    gen.save(f)
    return gen, labels


def train_variants(ctx, sp, ae, parts) -> dict:
    from ..data import read_labels
    from ..personalize import MappingConfig, PersonalizeMapping, train_mapping
    from ..personalize.training import training_data

    base = _datasets(ctx.args) / "celeba-10k"
    names = sp["celeba10k_kept"][:ctx.args.map_photos]
    table = read_labels(base / "attributes.csv")
    ids = table.values_at(table.match(names), ["identity"])["identity"]
    mappings = {}
    need = [v for v in MAP_VARIANTS if any(ROWS[r][2] == v for r in ctx.rows)] or ["msid"]
    done = {v: ctx.path("mappings", f"map-{v}.safetensors") for v in need}
    data = None
    for v in need:
        f = done[v]
        if f.is_file():
            m = PersonalizeMapping.load(f)
            if m.provenance_.get("complete") and m.provenance_.get("settings") == ctx.settings:
                mappings[v] = m
                continue
        if data is None:
            paths = [base / "images" / n for n in names]
            z = latents_of(ctx, paths, f"map-{ctx.args.map_photos}", ae)
            d, lm = descriptors_of(ctx, paths, parts)
            data = training_data(z, d, lm, ids, parts["clf"])
        import dataclasses

        cfg = dataclasses.replace(MappingConfig(steps=ctx.args.steps), **MAP_VARIANTS[v])
        minutes = None if ctx.deadline is None else max(0.0, (ctx.deadline - time.monotonic()) / 60)
        t0 = time.perf_counter()
        m, rep = train_mapping(data, cfg, seed=ctx.args.seed, checkpoint=ctx.path("mappings", f"ckpt-{v}.safetensors"),
                               minutes=minutes, progress=True,
                               provenance={"command": _command(ctx.args), "settings": ctx.settings,
                                           "data": f"celeba-10k, {len(names)} photos of {len(set(ids))} people, "
                                                   f"test identities excluded ({sp['celeba10k_excluded']} photos)"})
        m.provenance_["complete"] = rep["complete"]
        m.provenance_["report"] = rep
        m.save(f)
        print(f"  mapping {v}: {rep['steps']}/{cfg.steps} steps ({time.perf_counter() - t0:.0f} s), train mse "
              f"{rep['train_mse_null_expression']:.3f} with the null expression", flush=True)
        if not rep["complete"]:
            raise OutOfTime(f"training mapping {v}")
        mappings[v] = m
    return mappings


def _command(args) -> str:
    keep = ["--seed", str(args.seed), "--people", str(args.people), "--faces", str(args.faces),
            "--base-photos", str(args.base_photos), "--map-photos", str(args.map_photos), "--steps", str(args.steps)]
    if args.prompts != ",".join(DEFAULT_PROMPTS):
        keep += ["--prompts", args.prompts]
    return "python -m faceprint.bench personalize " + " ".join(keep)


# ------------------------------------------------------------------------------------ evaluation
def _seed(ctx, person_i: int, prompt_i: int) -> int:
    from ..seeding import derive_seed

    return derive_seed(ctx.args.seed, "personalize-bench", person_i, prompt_i)


def _directions(gen, labels) -> dict:
    """Mean latent difference (with - without) of every labelled attribute over the base photos."""
    z = gen.bank_.float()
    out = {}
    for a, col in labels.items():
        lab = torch.tensor([str(v).strip() == "1" for v in col])
        if lab.any() and not lab.all():
            out[a] = z[lab].mean(0) - z[~lab].mean(0)
    return out


class Scorer:
    """dlib identity and attribute probabilities of faces of one test person."""

    def __init__(self, parts, ref_desc, gallery, ref_latent, ae):
        self.rec, self.clf, self.ae = parts["rec"], parts["clf"], ae
        self.ref_desc = ref_desc
        self.gallery = gallery
        self.ref_probs = self.clf.predict_proba_latents(ref_latent)

    def score(self, latents: torch.Tensor, prompt: dict, images: torch.Tensor | None = None) -> dict:
        if images is None:
            images = self.ae.decode(latents)
        d = self.rec.describe(images)
        cos = torch.nn.functional.cosine_similarity(d.double(), self.ref_desc.double().expand_as(d), dim=1)
        dist = self.rec.gallery_distance(d, self.gallery)
        # the prompt is read off the face itself (decoded, then encoded again, as
        # AttributeClassifier.classify sees an image), not off the latent the row produced: a
        # linear edit of the latent (latent arithmetic) would otherwise score by construction
        probs = self.clf.predict_proba_latents(self.ae.encode(images))
        pr = torch.stack([probs[a][:, v] for a, v in prompt.items()], 1)  # (n, attrs)
        ref = torch.stack([self.ref_probs[a][:, v] for a, v in prompt.items()], 1)
        return {"id_cos": cos.clamp_min(0).tolist(), "gallery_distance": dist.tolist(),
                "accepted": (dist <= self.rec.config.resolved_gallery_threshold).tolist(),
                "prompt": pr.mean(1).tolist(), "dir": (pr - ref).clamp_min(0).mean(1).tolist(),
                "ref_prompt": ref.mean(1).tolist()}, images


def evaluate_person(ctx, pi: int, t: dict, row: str, env: dict, n_faces: int, tag: str = "") -> dict:
    """Faces and scores of one row for one person over every prompt (stage file per person)."""
    f = ctx.path("rows", row + tag, f"{t['person']}.json")
    doc = _load_json(f)
    key = {"settings": ctx.settings, "faces": n_faces}
    if ctx.args.resume and doc is not None and doc.get("key") == key:
        return doc
    ctx.check_time(f"row {row}{tag}")
    from ..latent.generator import Generator, GeneratorConfig

    label, kind, variant, kw = ROWS[row]
    ae = env["ae"]
    person = env["person"]
    scorer = env["scorer"]
    pers = env["pers"][variant or "msid"]
    results, feats = [], []
    t0 = time.perf_counter()
    refit = None
    for qi, prompt in enumerate(ctx.prompts):
        seed = _seed(ctx, pi, qi)
        images = None
        if kind == "copy":
            z = person.latent.expand(1, -1, -1, -1).float()
        elif kind == "arithmetic":
            z = person.latent.float().clone()
            for a, v in prompt.items():
                z = z + (1 if v else -1) * env["directions"][a]
        elif kind == "refit":
            if refit is None:
                from ..data import LatentSet

                zr = env["refit_latents"]
                ls = LatentSet(zr.float(), [f"r{i}" for i in range(len(zr))], [f"r{i}" for i in range(len(zr))], None,
                               "", 128)
                refit = Generator(GeneratorConfig(components=1, em="exact"), autoencoder=ae).fit(ls, seed=ctx.args.seed)
            z = refit.sample_latents(n_faces, seed=seed, guard=None).latents
        else:
            _, pm = pers.prompt(prompt)
            who = None if kind == "class" else env["identity"][variant]
            z, refused = _sample(pers, who, pm, n_faces, seed, {} if kind == "class" else {
                "reference_discount": 0.5, "prompt_cut": 0.4, "reimpose": False, **kw})
            if z is None:
                results.append({"prompt": qi, "seed": seed, "weight": 1, "guard_refused": refused,
                                **{k: [] for k in ("id_cos", "gallery_distance", "accepted", "prompt", "dir",
                                                   "ref_prompt")}})
                continue
        sc, images = scorer.score(z, prompt)
        weight = n_faces if z.shape[0] == 1 and kind in ("copy", "arithmetic") else 1  # one face stands for n
        results.append({"prompt": qi, "seed": seed, "weight": weight, **sc,
                        **({"guard_refused": refused} if kind in ("class", "method") else {})})
        if env.get("inception") is not None and env.get("fid_per_person", 0) > len(feats) \
                and not (kind == "copy" and qi > 0):  # the copy is one image per person
            feats.extend(list(env["inception"].features(images)))
    doc = {"key": key, "row": row, "person": t["person"], "results": results,
           "seconds": round(time.perf_counter() - t0, 3)}
    if feats:
        np.save(ctx.path("fid", row, f"{t['person']}.npy"), np.stack(feats[:env["fid_per_person"]]).astype(np.float32))
    _save_json(f, doc)
    return doc


def _sample(pers, who, pm, n, seed, kw):
    """The faces of one (person, prompt); a face the copy guard refuses 50 times (a small prompt
    cell) is left out and counted. Returns (latents or None, refused count)."""
    from ..errors import CopyGuardError

    try:
        z, _, _ = pers.sample_latents(who, pm, n, seed=seed, **kw)
        return z, 0
    except CopyGuardError:
        kept = []
        for i in range(n):
            try:
                kept.append(pers.sample_latents(who, pm, 1, seed=seed, start=i, **kw)[0])
            except CopyGuardError:
                pass
        return (torch.cat(kept) if kept else None), n - len(kept)


def person_env(ctx, pi, t, parts, ae, gen, mappings, labels, directions) -> dict:
    """Everything one person's rows need (references, galleries, encodings), cached per call."""
    from ..data import load_image
    from ..personalize import Personalizer
    from ..personalize.reference import find_reference

    idroot = _datasets(ctx.args) / "celeba-id" / "images"
    ref = find_reference(idroot / t["reference"], parts["finder"])
    t0 = time.perf_counter()
    ref_desc = parts["rec"].describe(ref.image[None])
    t_desc = time.perf_counter() - t0
    gal = torch.stack([load_image(idroot / g, 128) for g in t["gallery"]])
    gallery = parts["rec"].enrol(parts["rec"].describe(gal), name=t["person"])
    pers, identity = {}, {}
    seconds = {}
    for v, m in mappings.items():
        p = ctx.pers_cache.get(v)
        if p is None:
            p = Personalizer(gen, m, recogniser=parts["rec"], finder=parts["finder"], classifier=parts["clf"],
                             labels=labels)
            p._prompts = ctx.prompt_cache  # one class model per prompt, shared by every mapping
            ctx.pers_cache[v] = p
        pers[v] = p
        who = p.encode_aligned(ref, ref_desc)
        identity[v] = who
        seconds[v] = who.seconds
    person = identity.get("msid") or next(iter(identity.values()))
    refit = latents_of(ctx, [idroot / r for r in t["refit"]], f"refit-{t['person']}", ae)
    scorer = Scorer(parts, ref_desc, gallery, person.latent, ae)
    return {"ae": ae, "gen": gen, "pers": pers, "identity": identity, "person": person, "scorer": scorer,
            "refit_latents": refit, "directions": directions,
            "timing": {"descriptor_s": t_desc, **{f"{v}_{k}": s for v, d in seconds.items() for k, s in d.items()}}}


# ------------------------------------------------------------------------------------ statistics
def _row_stats(docs: list[dict]) -> dict:
    """Row means over faces, and per-person means, of the metrics. A deterministic row (copy,
    arithmetic) scores one face per prompt, which stands for its ``weight`` identical faces."""
    keys = ("id_cos", "accepted", "prompt", "dir")
    tot = {k: 0.0 for k in keys}
    n_all = 0.0
    per_person = []
    for d in docs:
        pp = {k: 0.0 for k in keys}
        n_p = 0.0
        for r in d["results"]:
            w = float(r["weight"])
            for k in keys:
                pp[k] += w * float(np.sum(np.asarray(r[k], dtype=float)))
            n_p += w * len(r["id_cos"])
        for k in keys:
            tot[k] += pp[k]
        n_all += n_p
        per_person.append({k: pp[k] / max(n_p, 1e-12) for k in keys})
    means = {k: tot[k] / max(n_all, 1e-12) for k in keys}
    means.update(_hg(means))
    for p in per_person:
        p.update(_hg(p))
    return {"means": means, "per_person": per_person, "faces": int(round(n_all))}


def _hg(m: dict) -> dict:
    vals = [max(m["id_cos"], 0.0), max(m["prompt"], 0.0), max(m["dir"], 0.0)]
    h = 0.0 if min(vals) <= 0 else len(vals) / sum(1 / v for v in vals)
    g = float(np.prod(vals) ** (1 / len(vals)))
    return {"hmean": h, "gmean": g}


def paired_bootstrap(a: list[float], b: list[float], *, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over identities and its 95% percentile interval (identities resampled)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a - b
    g = np.random.default_rng(seed)
    idx = g.integers(0, len(diff), size=(draws, len(diff)))
    boots = diff[idx].mean(1)
    return float(diff.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def best_of_n(docs: list[dict], ns=(1, 2, 4, 8, 16)) -> dict:
    """Mean over (person, prompt) of the best per-face hMean among the first N faces."""
    out = {}
    for n in ns:
        vals = []
        for d in docs:
            for r in d["results"]:
                k = len(r["id_cos"])
                if k < n:
                    continue
                per = [_hg({"id_cos": r["id_cos"][i], "prompt": r["prompt"][i], "dir": r["dir"][i]})["hmean"]
                       for i in range(n)]
                vals.append(max(per))
        if vals:
            out[n] = float(np.mean(vals))
    return out


def refusal_rates(ctx, sp, parts) -> dict:
    """Forgotten-person refusal: each of --forget-people people is 'forgotten' (a gallery of their
    forget photos, as a tamed model's forgotten photos are enrolled); their other photos and
    other people's references are put through Personalizer.check_consent's rule."""
    f = ctx.path("refusal.json")
    doc = _load_json(f)
    key = {"settings": ctx.settings, "people": ctx.args.forget_people}
    if ctx.args.resume and doc is not None and doc.get("key") == key:
        return doc
    from ..personalize.personalizer import REFUSE_THRESHOLD

    idroot = _datasets(ctx.args) / "celeba-id" / "images"
    people = sp["test"][:ctx.args.forget_people]
    paths = []
    for t in people:
        paths += [idroot / x for x in [t["reference"], *t["gallery"], *t["refit"], *t["forget"]]]
    d, _ = descriptors_of(ctx, paths, parts)
    rec = parts["rec"]
    pos = 0
    per = []
    for t in people:
        k = 1 + len(t["gallery"]) + len(t["refit"]) + len(t["forget"])
        per.append(d[pos:pos + k])
        pos += k
    genuine, impostor = [], []
    refs = torch.stack([p[0] for p in per])
    for i, t in enumerate(people):
        nf = len(t["forget"])
        gal = rec.enrol(per[i][-nf:], name=t["person"])
        probes = per[i][:-nf]  # the reference, gallery and refit photos: the person, not forgotten files
        genuine += (rec.gallery_distance(probes, gal) <= REFUSE_THRESHOLD).tolist()
        others = torch.cat([refs[:i], refs[i + 1:]])
        impostor += (rec.gallery_distance(others, gal) <= REFUSE_THRESHOLD).tolist()
    doc = {"key": key, "threshold": REFUSE_THRESHOLD, "people": len(people),
           "forgotten_photos_per_person": int(np.mean([len(t["forget"]) for t in people])),
           "genuine_refused": float(np.mean(genuine)), "genuine_trials": len(genuine),
           "impostor_refused": float(np.mean(impostor)), "impostor_trials": len(impostor),
           "hash_refused": 1.0, "note": "a forgotten photo itself is refused by its sha256 before any recognition"}
    _save_json(f, doc)
    return doc


def auc_table(ctx, sp, parts, mapping, ae) -> list[dict]:
    f = ctx.path("auc.json")
    doc = _load_json(f)
    if ctx.args.resume and doc is not None and doc.get("settings") == ctx.settings:
        return doc["rows"]
    from ..personalize.features import identity_auc_table

    idroot = _datasets(ctx.args) / "celeba-id" / "images"
    people = sp["test"]
    paths, ids = [], []
    for t in people:
        for x in [*t["gallery"], *t["refit"]]:
            paths.append(idroot / x)
            ids.append(t["person"])
    z = latents_of(ctx, paths, "auc-test-photos", ae)
    d, _ = descriptors_of(ctx, paths, parts)
    rows = identity_auc_table(mapping.features_, z, d, ids)
    _save_json(f, {"settings": ctx.settings, "rows": rows, "photos": len(paths), "people": len(people)})
    return rows


def fid_of(ctx, row: str, ref_feats) -> float | None:
    from ..metrics import fid

    folder = ctx.out / "fid" / row
    if not folder.is_dir():
        return None
    feats = [np.load(p) for p in sorted(folder.glob("*.npy"))]
    if not feats:
        return None
    x = np.concatenate(feats)[:ctx.args.fid_faces]
    return {"fid": fid(x, ref_feats), "faces": int(x.shape[0]), "reference": int(ref_feats.shape[0])}


def reference_features(ctx, inc) -> np.ndarray:
    f = ctx.path("fid", "reference-005001-010000.npy")
    if f.is_file():
        return np.load(f)
    from ..data import FaceFolder

    folder = FaceFolder(_datasets(ctx.args) / "celeba-10k" / "images", size=128)
    files = [p for p, r in zip(folder.paths, folder.relpaths) if "005001.jpg" <= r.rsplit("/", 1)[-1] <= "010000.jpg"]
    from ..data import load_image

    feats = []
    for s in range(0, len(files), 100):
        ctx.check_time("FID reference features")
        feats.append(inc.features(torch.stack([load_image(p, 128) for p in files[s:s + 100]])))
    x = np.concatenate(feats)
    np.save(f, x)
    return x


# ------------------------------------------------------------------------------------ run
def run(args) -> int:
    torch.set_num_threads(max(1, args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args)
    ctx.pers_cache = {}
    ctx.prompt_cache = {}
    t_all = time.perf_counter()
    try:
        return _run(ctx, t_all)
    except OutOfTime as e:
        print(f"stopped after --minutes {args.minutes} during {e}; run the same command with --resume to go on",
              flush=True)
        return 3


def _run(ctx, t_all) -> int:
    args = ctx.args
    from ..autoencoder import TAEF2
    from ..personalize import FaceFinder, make_prompt
    from ..recognition import IdentityRecogniser, load_classifier

    ae = TAEF2.load(args.weights)
    parts = {"rec": IdentityRecogniser(), "finder": FaceFinder(), "clf": load_classifier("celeba")}
    for p in ctx.prompts:
        make_prompt(p, parts["clf"])  # refuse an unreliable or contradictory prompt before any work
    prev = _load_json(ctx.path("settings.json"))
    if args.resume and prev is not None and prev != ctx.settings:
        raise SystemExit(f"--resume: {ctx.out} holds a run with other settings ({prev}); use another --out")
    _save_json(ctx.path("settings.json"), ctx.settings)
    sp = split(ctx, parts)
    print(f"split: {len(sp['test'])} test people; {sp['celeba10k_excluded']} celeba-10k photos of "
          f"{sp['excluded_identities_present']} test identities excluded", flush=True)
    gen, labels = base_model(ctx, sp, ae)
    print(f"base model: {gen.n_photos} photos, {gen.mixture_.weights_.numel()} components", flush=True)
    mappings = train_variants(ctx, sp, ae, parts)
    if args.write_mapping is not None:
        mappings["msid"].save(args.write_mapping)
        print(f"wrote the method's mapping to {args.write_mapping}", flush=True)
    if args.train_only:
        return 0
    print(f"mappings ready, {time.perf_counter() - t_all:.0f} s", flush=True)
    shard_k, shard_n = args.shard or (1, 1)
    if shard_k == 1:
        aucs = auc_table(ctx, sp, parts, mappings["msid"], ae)
        print(f"identity AUC table, {time.perf_counter() - t_all:.0f} s", flush=True)
        refusal = refusal_rates(ctx, sp, parts)
        print(f"refusal rates: {refusal['genuine_refused']:.3f} of forgotten people's photos, "
              f"{refusal['impostor_refused']:.4f} of others', {time.perf_counter() - t_all:.0f} s", flush=True)
    inc = None
    fid_rows = [r for r in args.fid_rows.split(",") if r in ctx.rows] if args.fid_faces > 0 else []
    if fid_rows:
        from ..metrics import InceptionFeatures

        inc = InceptionFeatures.load()
    directions = _directions(gen, labels)
    docs = {r: [] for r in ctx.rows}
    best_docs = {"class": [], "method": []}
    timing = []
    fid_per_person = math.ceil(args.fid_faces / max(len(sp["test"]), 1))
    for pi, t in enumerate(sp["test"]):
        if pi % shard_n != shard_k - 1:
            continue  # another shard's person
        ctx.check_time(f"person {pi}")
        todo = [r for r in ctx.rows if not (args.resume and _done(ctx, r, t, args.faces))]
        best = pi < args.best_of_people
        if best:
            todo_b = [r for r in best_docs if not (args.resume and _done(ctx, r, t, 16, "@16"))]
        else:
            todo_b = []
        env = person_env(ctx, pi, t, parts, ae, gen, mappings, labels, directions) if (todo or todo_b) else None
        tf = ctx.path("timing", f"{t['person']}.json")  # per person, so a shard's timings reach the report
        if env is not None:
            _save_json(tf, {"settings": ctx.settings, "timing": env["timing"]})
        saved_t = _load_json(tf)
        if saved_t is not None and saved_t.get("settings") == ctx.settings:
            timing.append(saved_t["timing"])
        for r in ctx.rows:
            if env is not None:
                env["inception"] = inc if r in fid_rows else None
                env["fid_per_person"] = fid_per_person
            docs[r].append(evaluate_person(ctx, pi, t, r, env, args.faces) if r in todo else
                           _load_json(ctx.path("rows", r, f"{t['person']}.json")))
        if best:
            for r in best_docs:
                if env is not None:
                    env["inception"] = None
                best_docs[r].append(evaluate_person(ctx, pi, t, r, env, 16, "@16") if r in todo_b else
                                    _load_json(ctx.path("rows", r + "@16", f"{t['person']}.json")))
        print(f"person {pi + 1}/{len(sp['test'])} ({t['person']}) done, {time.perf_counter() - t_all:.0f} s", flush=True)
    if args.shard is not None:
        print(f"shard {shard_k}/{shard_n} done, {time.perf_counter() - t_all:.0f} s; when every shard is done, run "
              "again without --shard and with --resume to assemble the report", flush=True)
        return 0
    sheet_path = sheet(ctx, sp, parts, ae, gen, mappings, labels, directions)
    print(f"sheet of references and their personalised faces (real people: never commit): {sheet_path}", flush=True)
    fids = {}
    if fid_rows:
        ref = reference_features(ctx, inc)
        for r in fid_rows:
            fids[r] = fid_of(ctx, r, ref)
    report(ctx, sp, gen, mappings, aucs, refusal, docs, best_docs, fids, timing, time.perf_counter() - t_all)
    return 0


def sheet(ctx, sp, parts, ae, gen, mappings, labels, directions, people: int = 8, prompts: int = 4) -> Path:
    """OUT/sheet.png: per row a test person's aligned reference, then the class model's face and
    the method's face for the first prompts (face 0 of each seed). Real people: never commit."""
    from .. import render
    from ..cli.main import save_png

    f = ctx.path("sheet.png")
    if ctx.args.resume and f.is_file():
        return f
    tiles = []
    for pi, t in enumerate(sp["test"][:people]):
        env = person_env(ctx, pi, t, parts, ae, gen, {"msid": mappings["msid"]}, labels, directions)
        pers, who = env["pers"]["msid"], env["identity"]["msid"]
        row = [who.reference.image]
        for qi, prompt in enumerate(ctx.prompts[:prompts]):
            _, pm = pers.prompt(prompt)
            for person in (None, who):
                z, _ = _sample(pers, person, pm, 1, _seed(ctx, pi, qi), {} if person is None else {
                    "reference_discount": 0.5, "prompt_cut": 0.4, "reimpose": False})
                row.append(ae.decode(z)[0] if z is not None else torch.ones(3, 128, 128))
        tiles.extend(row)
    cols = 1 + 2 * min(prompts, len(ctx.prompts))
    save_png(render.grid(render.to_uint8(torch.stack(tiles)), cols=cols), f)
    return f


def _done(ctx, row, t, faces, tag="") -> bool:
    doc = _load_json(ctx.out / "rows" / (row + tag) / f"{t['person']}.json")
    return doc is not None and doc.get("key") == {"settings": ctx.settings, "faces": faces}


def report(ctx, sp, gen, mappings, aucs, refusal, docs, best_docs, fids, timing, seconds) -> None:
    args = ctx.args
    stats = {r: _row_stats(d) for r, d in docs.items() if d}
    boot = {}
    if "method" in stats:
        m = stats["method"]["per_person"]
        for r, s in stats.items():
            if r == "method":
                continue
            boot[r] = {k: paired_bootstrap([p[k] for p in m], [p[k] for p in s["per_person"]], seed=args.seed)
                       for k in ("hmean", "gmean")}
    curve = {r: best_of_n(d) for r, d in best_docs.items() if d}
    tim = {k: float(np.median([t[k] for t in timing if k in t])) for k in (timing[0] if timing else {})}
    info = describe({"seed": args.seed, "dlib": _dlib_version()})
    checks = _acceptance(stats, boot, refusal, tim, ctx)
    doc = {"command": _command(args), "machine": info, "settings": ctx.settings, "contended": args.contended,
           "split": {"people": len(sp["test"]), "celeba10k_excluded": sp["celeba10k_excluded"],
                     "excluded_identities_present": sp["excluded_identities_present"]},
           "base_model": {"photos": gen.n_photos, "components": int(gen.mixture_.weights_.numel())},
           "mappings": {v: {"digest": m.digest(), "report": m.provenance_.get("report"),
                            "config": {k: getattr(m.config, k) for k in ("features", "expression", "region", "rank")}}
                        for v, m in mappings.items()},
           "identity_auc": aucs, "rows": {r: {"label": ROWS[r][0], **s["means"], "faces": s["faces"],
                                               "fid": fids.get(r)} for r, s in stats.items()},
           "bootstrap_method_minus_row": boot, "best_of_n": curve, "refusal": refusal, "encode_seconds_median": tim,
           "acceptance": checks, "seconds": round(seconds, 1)}
    _save_json(ctx.path("personalize.json"), doc)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _markdown(doc, ctx)
    text = buf.getvalue()
    ctx.path("personalize.md").write_text(text)
    print(text)
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        shutil.copy(ctx.path("personalize.md"), args.publish / "personalize.md")
        shutil.copy(ctx.path("personalize.json"), args.publish / "personalize.json")


def _dlib_version() -> str:
    try:
        import dlib

        return dlib.__version__
    except Exception:  # noqa: BLE001
        return "?"


def _acceptance(stats, boot, refusal, tim, ctx) -> list[dict]:
    out = []
    if "method" not in stats:
        return out
    m = stats["method"]["means"]
    for k in ("hmean", "gmean"):
        best_other = max((s["means"][k], r) for r, s in stats.items() if r != "method") if len(stats) > 1 else (0, "-")
        lo = boot.get(best_other[1], {}).get(k, (0, 0, 0))[1]
        out.append({"check": f"method has the best {k} (vs {best_other[1]}: {best_other[0]:.4f}); bootstrap lower bound "
                             f"of the difference > 0", "value": f"{m[k]:.4f}, lower bound {lo:+.4f}",
                    "met": bool(m[k] > best_other[0] and lo > 0)})
    if "class" in stats:
        c = stats["class"]["means"]
        out.append({"check": "identity acceptance >= 10x the class model's and >= 0.20",
                    "value": f"{m['accepted']:.4f} vs class {c['accepted']:.4f}",
                    "met": bool(m["accepted"] >= 0.20 and m["accepted"] >= 10 * c["accepted"])})
        out.append({"check": "prompt score >= 0.8x the class model's", "value": f"{m['prompt']:.4f} vs {c['prompt']:.4f}",
                    "met": bool(m["prompt"] >= 0.8 * c["prompt"])})
    out.append({"check": "forgotten person's photos refused >= 99%, others' <= 1%",
                "value": f"{refusal['genuine_refused']:.4f} / {refusal['impostor_refused']:.4f}",
                "met": bool(refusal["genuine_refused"] >= 0.99 and refusal["impostor_refused"] <= 0.01)})
    if "msid_mapping" in tim:
        out.append({"check": "encoding a person <= 0.1 s besides the face descriptor (features + f_map; the TAEF2 "
                             "latent of the face is timed apart)",
                    "value": f"{tim['msid_mapping'] * 1000:.1f} ms (+ TAEF2 encode {tim.get('msid_latent', 0):.3f} s)",
                    "met": bool(tim["msid_mapping"] <= 0.1)})
    out.append({"check": ">= 100 identities, >= 10 prompts, 4 faces each",
                "value": f"{len(stats['method']['per_person'])} identities, {len(ctx.prompts)} prompts, "
                         f"{ctx.args.faces} faces", "met": bool(len(stats["method"]["per_person"]) >= 100
                                                                and len(ctx.prompts) >= 10 and ctx.args.faces >= 4)})
    return out


def _markdown(doc, ctx) -> None:
    print("# bench personalize: new faces of one person from one photo (papers/003 on LR-GMM-NN)\n")
    print(f"Command: `{doc['command']}`" + (" (timings contended: other jobs ran)" if doc["contended"] else ""))
    print("\nSheet (OUT/sheet.png, not committed: real people): per row the aligned reference, then for each of "
          "the first 4 prompts the class model's face and the method's face from the same seed.")
    print("\nOne recogniser (dlib) and one attribute classifier (faceprint's celeba heads, on the TAEF2 encoding "
          "of each decoded face) stand for F2D's three face recognisers and CLIP/SigLIP; hMean and gMean are over "
          "[ID_cos, Prompt, Dir]. No photo of a person is in this file; the sheet of references and faces stays "
          "in the bench's --out folder.")
    print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in doc["machine"].items()] +
                [["people / prompts / faces", f"{doc['split']['people']} / {len(ctx.prompts)} / {ctx.args.faces}"],
                 ["celeba-10k photos excluded (test identities)",
                  f"{doc['split']['celeba10k_excluded']} ({doc['split']['excluded_identities_present']} identities)"],
                 ["base model", f"{doc['base_model']['photos']} photos, {doc['base_model']['components']} components"],
                 ["prompts", "; ".join(_prompt_text(p) for p in ctx.prompts)]])
    print_table("Identity features: verification AUC on the test people's photos (cosine similarity; Fig. 4 analog)",
                ["feature", "raw", "identity-projected (MSID analog)"],
                [[r["scale"], f"{r['raw']:.4f}", "-" if r["msid"] is None else f"{r['msid']:.4f}"]
                 for r in doc["identity_auc"]])
    rows = []
    for r, s in doc["rows"].items():
        fid = s.get("fid")
        rows.append([s["label"], f"{s['id_cos']:.4f}", f"{s['accepted']:.4f}", f"{s['prompt']:.4f}", f"{s['dir']:.4f}",
                     f"{s['hmean']:.4f}", f"{s['gmean']:.4f}", "-" if not fid else f"{fid['fid']:.1f} ({fid['faces']})",
                     s["faces"]])
    print_table("Identity x prompt (row means over faces)",
                ["row", "ID_cos", "ID_accept", "Prompt", "Dir", "hMean", "gMean", "FID (faces)", "faces"], rows)
    if doc["bootstrap_method_minus_row"]:
        print_table("Paired bootstrap over identities: method minus row (mean [95% interval])",
                    ["row", "hMean", "gMean"],
                    [[doc["rows"][r]["label"]] + [f"{v[k][0]:+.4f} [{v[k][1]:+.4f}, {v[k][2]:+.4f}]" for k in
                                                  ("hmean", "gmean")] for r, v in doc["bootstrap_method_minus_row"].items()])
    if doc["best_of_n"]:
        ns = sorted({int(n) for c in doc["best_of_n"].values() for n in c})
        print_table(f"Best-of-N: mean over (person, prompt) of the best per-face hMean among N faces "
                    f"(first {ctx.args.best_of_people} people)", ["row"] + [f"N={n}" for n in ns],
                    [[r] + [f"{c.get(n, c.get(str(n), float('nan'))):.4f}" for n in ns] for r, c in doc["best_of_n"].items()])
    rf = doc["refusal"]
    print_table("Forgotten people (refusal rule: distance to the mean descriptor of the forgotten photos <= "
                f"{rf['threshold']})", ["probe", "refused", "trials"],
                [["the person's other photos", f"{rf['genuine_refused']:.4f}", rf["genuine_trials"]],
                 ["other people's references", f"{rf['impostor_refused']:.4f}", rf["impostor_trials"]],
                 ["a forgotten photo itself (sha256)", "1.0000", "-"]])
    if doc["encode_seconds_median"]:
        print_table("Encoding a person (median seconds)", ["part", "seconds"],
                    [[k, f"{v:.4f}"] for k, v in doc["encode_seconds_median"].items()])
    print_table("Acceptance (issue 16)", ["check", "value", "met"],
                [[c["check"], c["value"], "yes" if c["met"] else "NO"] for c in doc["acceptance"]])
