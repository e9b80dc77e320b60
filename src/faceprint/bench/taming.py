"""`python -m faceprint.bench taming`: forgetting, rebalancing and minority coverage, measured
(papers/002; papers/004 ch. 7).

--part forget (the protocol):
  training set = celeba-10k files 1-``--base`` (photos of the celeba-id people below left out,
  since some are the same pictures at another size) + ``--train-per-person`` photos of each of
  ``--forget`` + ``--others`` celeba-id people (first files in name order). Each person is
  enrolled in the identity recogniser with their remaining photos (never trained on);
  ``--unseen`` more celeba-id people who are not in the training set give the baseline rate.
  For each forgotten person: the rate of generated faces the recogniser accepts as them, as
  each of the other people, as the unseen people, before and after; FID/precision/recall
  against celeba-10k 5,001-10,000; log-likelihood of their latents; time against the fit;
  and a check that no generated latent pixel comes from their photos.
--part forget-time: the forget edit's time against the fit's on the same protocol, alone (no
  generation), with each thread count of ``--time-threads``, ``--repeats`` edits per person.
--part rebalance: Male = 0.5 and Eyeglasses = 0.3 on celeba-10k, race uniform on utkface,
  measured with faceprint's attribute classifiers (corrected for their error rates).
--part coverage: subgroups under 6% of the photos, before and after `include`.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from .machine import describe, print_table

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "datasets"


def add_arguments(p) -> None:
    p.add_argument("--part", default="all",
                   help="forget, forget-time, rebalance, coverage, a comma-separated list of them, or all "
                        "(default: forget, rebalance, coverage)")
    p.add_argument("--datasets", type=Path, default=None, help="folder holding celeba-10k, celeba-id, utkface "
                                                                "(default ../shared/datasets)")
    p.add_argument("-n", type=int, default=2000, help="faces generated per model (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", type=int, default=1000, help="celeba-10k photos in the forget protocol's training set")
    p.add_argument("--train-per-person", type=int, default=25)
    p.add_argument("--forget", type=int, default=3, help="people forgotten, one at a time (default 3)")
    p.add_argument("--others", type=int, default=10, help="other trained people whose rate must not move")
    p.add_argument("--unseen", type=int, default=5, help="people never trained on (baseline rate)")
    p.add_argument("--reference-n", type=int, default=5000, help="reference photos for FID (celeba-10k 5,001-...)")
    p.add_argument("--train-n", type=int, default=2000, help="training photos of the rebalance/coverage models")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--repeats", type=int, default=5, help="forget-time: forgets timed per person (default 5)")
    p.add_argument("--time-threads", default="1,2",
                   help="forget-time: comma-separated torch thread counts to time the fit and forget with (default 1,2)")
    p.add_argument("--flow-n", type=int, default=1000,
                   help="faces per flow-prior model in the mixture-vs-flow forgetting comparison (0: skip it)")


def _datasets(args) -> Path:
    d = args.datasets or DATA
    if not (d / "celeba-10k").is_dir():
        raise SystemExit(f"datasets not found at {d}; pass --datasets")
    return d


class _Photos:
    """A training set from explicit files: what Generator.fit needs (latents, names, hashes)."""

    def __init__(self, files, root, ae, batch=64):
        from ..data.folder import load_image
        from ..io import sha256_file

        self.relpaths = [str(Path(f).relative_to(root)) for f in files]
        self.root = str(root)
        self.image_size = 128
        self.content_hashes = [sha256_file(f) for f in files]
        self.hashes = self.content_hashes
        self.data_hash = ""
        lat = []
        for s in range(0, len(files), batch):
            lat.append(ae.encode(torch.stack([load_image(f, 128) for f in files[s:s + batch]])))
        self.latents = torch.cat(lat)


def _images(files, size: int = 128):
    from ..data.folder import load_image

    return torch.stack([load_image(f, size) for f in files])


def _generate(gen, n, seed, batch, inc=None, rec=None):
    """Decode n faces; return (Inception features or None, identity descriptors or None, provenance, latents)."""
    feats, descs, provs, lats = [], [], [], []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        smp = gen.sample_latents(m, seed=seed, start=s)
        imgs = gen.autoencoder.decode(smp.latents)
        if inc is not None:
            feats.append(inc.features(imgs))
        if rec is not None:
            descs.append(rec.describe(imgs))
        provs.append(smp.provenance)
        lats.append(smp.latents.to(torch.float16))
    return (np.concatenate(feats) if feats else None, torch.cat(descs) if descs else None, torch.cat(provs),
            torch.cat(lats))


def _quality(F, ref):
    from ..metrics import fid, precision_recall

    pr = precision_recall(ref, F, k=3)
    return {"fid": float(fid(F, ref)), "precision": float(pr.precision), "recall": float(pr.recall)}


def cached_features(files, inc, batch, size: int = 128):
    """Inception features of photo files loaded at ``size`` px, kept in the user's feature cache
    (outside the repository: they derive from the photos) under the files' content key."""
    from ..metrics.inception import FeatureCache, files_key

    cache = FeatureCache()
    key = files_key(files, recipe=f"load_image-{size}")
    hit = cache.get(key, inc.id)
    if hit is not None:
        return hit.astype(np.float64)
    out = []
    for s in range(0, len(files), batch):
        out.append(inc.features(_images(files[s:s + batch], size)))
    feats = np.concatenate(out)
    cache.put(key, inc.id, feats)
    return feats


def _reference_features(ds, inc, n, batch):
    files = sorted((ds / "celeba-10k" / "images").iterdir())[5000:5000 + n]
    return cached_features(files, inc, batch)


# ------------------------------------------------------------------------------------------ forget
def _forget_protocol(args, ds):
    """The forget protocol's training files and people (see the module docstring)."""
    id_rows = list(csv.DictReader(open(ds / "celeba-id" / "identities.csv")))
    people: dict[str, list[Path]] = {}
    for r in id_rows:
        people.setdefault(r["identity"], []).append(ds / "celeba-id" / r["file"])
    names = sorted(people, key=int)
    k = args.train_per_person
    chosen = [p for p in names if len(people[p]) >= k + 3][: args.forget + args.others + args.unseen]
    trained, unseen = chosen[: args.forget + args.others], chosen[args.forget + args.others:]
    attr_rows = list(csv.DictReader(open(ds / "celeba-10k" / "attributes.csv")))
    celeb_ids = set(people)
    base = [ds / "celeba-10k" / "images" / r["file"] for r in attr_rows[: args.base] if r["identity"] not in celeb_ids]
    person_train = {p: sorted(people[p])[:k] for p in trained}
    person_enrol = {p: sorted(people[p])[k:] for p in chosen}
    files = base + [f for p in trained for f in person_train[p]]
    print(f"  forget protocol: {len(base)} celeba-10k photos + {len(trained)} people x {k} photos = {len(files)}",
          flush=True)
    return files, chosen, trained, unseen, person_train, person_enrol


def run_forget_time(args, ds, ae) -> dict:
    """Time of the forget edit against the fit, alone (no generation, no recogniser): the fit
    timed once per thread count in ``--time-threads``, each person's forget ``--repeats`` times."""
    from ..latent.generator import Generator, GeneratorConfig
    from ..taming import forget

    files, _, trained, _, person_train, _ = _forget_protocol(args, ds)
    ls = _Photos(files, ds, ae)
    rows = []
    threads0 = torch.get_num_threads()
    for threads in args.time_threads:
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            gen = Generator(GeneratorConfig(), autoencoder=ae).fit(ls, seed=args.seed)
            fit_total = time.perf_counter() - t0
            fit_s = gen.provenance_["fit_seconds"]
            fit = fit_s["projector"] + fit_s["mixture"]
            for p in trained[: args.forget]:
                gone = {str(f.relative_to(ds)) for f in person_train[p]}
                idx = [i for i, r in enumerate(ls.relpaths) if r in gone]
                times, rep = [], None
                for _ in range(args.repeats):
                    _, rep = forget(gen, idx, name=f"celeba-id person {p}")
                    times.append(rep.seconds)
                rows.append({"threads": threads, "person": p, "photos_forgotten": len(idx), "fit_seconds": fit,
                             "fit_wall_seconds": fit_total, "forget_seconds": times,
                             "components": [rep.components_before, len(rep.updated_components)]})
                print(f"  {threads} thread(s), person {p}: forget median {1000 * float(np.median(times)):.0f} ms "
                      f"= {100 * float(np.median(times)) / fit:.2f}% of the {fit:.1f} s fit", flush=True)
        finally:
            torch.set_num_threads(threads0)
    return {"train_photos": len(files), "repeats": args.repeats, "rows": rows}


def _forget_time_table(res):
    rows = []
    for r in res["rows"]:
        t = np.asarray(r["forget_seconds"])
        med = float(np.median(t))
        rows.append([r["threads"], r["person"], r["photos_forgotten"], f"{r['fit_seconds']:.2f} s",
                     f"{1000 * med:.0f} ms", f"{1000 * t.min():.0f} ms", f"{100 * med / r['fit_seconds']:.2f}%",
                     f"{r['components'][1]} of {r['components'][0]}"])
    print_table(f"Forget edit vs fit ({res['train_photos']} training photos, {res['repeats']} repeats; the edit "
                "includes projecting the photos, copying the model and down-dating the mixture, not the log p "
                "diagnostics)",
                ["threads", "person", "photos", "fit (P0 + mixture)", "forget (median)", "forget (min)",
                 "median share of fit", "components updated"], rows)


def run_forget(args, ds, ae, inc, ref) -> dict:
    from ..latent.generator import Generator, GeneratorConfig
    from ..recognition.identity import IdentityRecogniser
    from ..taming import forget

    rec = IdentityRecogniser()
    files, chosen, trained, unseen, person_train, person_enrol = _forget_protocol(args, ds)
    t0 = time.perf_counter()
    ls = _Photos(files, ds, ae)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen = Generator(GeneratorConfig(), autoencoder=ae).fit(ls, seed=args.seed)
    t_fit = time.perf_counter() - t0
    fit_s = gen.provenance_["fit_seconds"]
    print(f"  fitted K = {gen.mixture_.weights_.numel()} in {t_fit:.1f} s (encode {t_encode:.1f} s)", flush=True)
    galleries = {p: rec.enrol(rec.describe(_images(person_enrol[p])), p) for p in chosen}
    enrol_self = {p: float(rec.accepts(rec.describe(_images(person_train[p][:10])), galleries[p]).float().mean())
                  for p in trained}

    def rates(descs):
        return {p: float(rec.accepts(descs, galleries[p]).float().mean()) for p in chosen}

    F0, D0, P0, _ = _generate(gen, args.n, args.seed, args.batch, inc, rec)
    before = rates(D0)
    q0 = _quality(F0, ref)
    print(f"  original model: FID {q0['fid']:.2f}; rates " + ", ".join(f"{p}: {before[p]:.4f}" for p in trained),
          flush=True)
    rows = []
    Ytrain = gen.projector_.transform(gen.bank_.float()).reshape(gen.n_photos, -1)
    d = Ytrain.shape[1]
    for p in trained[: args.forget]:
        idx = [i for i, r in enumerate(ls.relpaths) if r in {str(f.relative_to(ds)) for f in person_train[p]}]
        g2, rep = forget(gen, idx, name=f"celeba-id person {p}")
        F1, D1, P1, L1 = _generate(g2, args.n, args.seed, args.batch, inc, rec)
        after = rates(D1)
        q1 = _quality(F1, ref)
        # provenance check 1: no provenance index names a photo with the person's content hashes
        gone_hashes = {ls.content_hashes[i] for i in idx}
        bad = torch.tensor([h in gone_hashes for h in g2.training_.hashes])
        prov_hits = int(bad[P1[P1 >= 0]].sum())
        # provenance check 2: no generated latent pixel equals one of the person's latent pixels
        pix = 0
        for i in idx:
            pix += int((L1 == gen.bank_[i][None]).all(1).sum())
        held = torch.cat([ae.encode(_images(person_enrol[p]))])
        Yh = gen.projector_.transform(held.to(torch.float16).float()).reshape(len(held), -1)
        others_idx = [i for i in range(gen.n_photos) if i not in set(idx)][:500]
        lp = lambda g, Y: float(g.mixture_.log_prob(Y).mean() / d)  # noqa: E731
        row = {
            "person": p, "photos_forgotten": len(idx),
            "rate_before": before[p], "rate_after": after[p],
            "others_before": [before[o] for o in trained if o != p],
            "others_after": [after[o] for o in trained if o != p],
            "unseen_before": [before[u] for u in unseen], "unseen_after": [after[u] for u in unseen],
            "quality_before": q0, "quality_after": q1,
            "logp_forgotten_before": float(np.mean(rep.log_prob_before)),
            "logp_forgotten_after": float(np.mean(rep.log_prob_after)),
            "logp_person_heldout_before": lp(gen, Yh), "logp_person_heldout_after": lp(g2, Yh),
            "logp_others_before": lp(gen, Ytrain[others_idx]), "logp_others_after": lp(g2, Ytrain[others_idx]),
            "forget_seconds": rep.seconds, "fit_seconds": fit_s["projector"] + fit_s["mixture"],
            "provenance_indices_to_forgotten": prov_hits, "latent_pixels_from_forgotten": pix,
            "components": [rep.components_before, rep.components_after, len(rep.updated_components),
                           len(rep.dropped_components)],
        }
        rows.append(row)
        print(f"  forgot {p}: rate {before[p]:.4f} -> {after[p]:.4f}, FID {q0['fid']:.2f} -> {q1['fid']:.2f}, "
              f"{rep.seconds * 1000:.0f} ms", flush=True)
    flow = _flow_forget(args, ls, ds, ae, inc, ref, rec, galleries, trained, unseen, person_train, person_enrol) \
        if args.flow_n > 0 else None
    return {"train_photos": len(files), "fit_seconds": fit_s, "encode_seconds": t_encode,
            "recogniser": rec.config.to_dict(), "enrolment_self_accept": enrol_self, "people": chosen,
            "trained": trained, "unseen": unseen, "rows": rows, "n": args.n, "flow": flow}


def _flow_forget(args, ls, ds, ae, inc, ref, rec, galleries, trained, unseen, person_train, person_enrol) -> dict:
    """The same forgetting with the normalizing-flow prior (papers/002's fine-tune) instead of
    the mixture's exact down-date; the person's photos leave the refinement memory in both."""
    from ..latent.flowprior import FlowPrior, FlowPriorConfig

    def gen_flow(prior, bank):
        feats, descs = [], []
        for s in range(0, args.flow_n, args.batch):
            m = min(args.batch, args.flow_n - s)
            imgs = ae.decode(prior.sample_latents(m, seed=args.seed, start=s, refine_bank=bank).latents)
            feats.append(inc.features(imgs))
            descs.append(rec.describe(imgs))
        return np.concatenate(feats), torch.cat(descs)

    def rates(descs):
        return {p: float(rec.accepts(descs, galleries[p]).float().mean()) for p in galleries}

    X = ls.latents.float()
    t0 = time.perf_counter()
    prior = FlowPrior(FlowPriorConfig(dims=min(256, int(0.85 * len(X))))).fit(X, seed=args.seed)
    fit_s = time.perf_counter() - t0
    print(f"  flow prior fitted in {fit_s:.1f} s", flush=True)
    F0, D0 = gen_flow(prior, X)
    before, q0 = rates(D0), _quality(F0, ref)
    rows = []
    for p in trained[: args.forget]:
        names = {str(f.relative_to(ds)) for f in person_train[p]}
        idx = [i for i, r in enumerate(ls.relpaths) if r in names]
        keep = torch.tensor([i not in set(idx) for i in range(len(X))])
        held = ae.encode(_images(person_enrol[p]))
        others = X[keep][:500]
        p2, rep = prior.forget(X[idx], retain_latents=X[keep], seed=args.seed, name=f"celeba-id person {p}",
                               evaluate={"held_out_photos": held, "other_training_photos": others})
        F1, D1 = gen_flow(p2, X[keep])
        after, q1 = rates(D1), _quality(F1, ref)
        g = rep.groups
        rows.append({"person": p, "rate_before": before[p], "rate_after": after[p],
                     "others_before": [before[o] for o in trained if o != p],
                     "others_after": [after[o] for o in trained if o != p],
                     "unseen_after": [after[u] for u in unseen], "quality_before": q0, "quality_after": q1,
                     "logp": {k: [v["mean_before"], v["mean_after"]] for k, v in g.items()},
                     "seconds": rep.seconds, "fit_seconds": rep.fit_seconds, "steps": rep.steps_run,
                     "converged": rep.converged})
        print(f"  flow forgot {p}: rate {before[p]:.4f} -> {after[p]:.4f}, {rep.seconds:.2f} s "
              f"({100 * rep.time_ratio:.1f}% of fit), FID {q0['fid']:.2f} -> {q1['fid']:.2f}", flush=True)
    return {"n": args.flow_n, "fit_seconds": fit_s, "rows": rows}


def _forget_tables(res):
    rows = []
    for r in res["rows"]:
        ob, oa = np.mean(r["others_before"]), np.mean(r["others_after"])
        ub = np.mean(r["unseen_before"])
        qb, qa = r["quality_before"], r["quality_after"]
        rows.append([r["person"], r["photos_forgotten"], f"{r['rate_before']:.4f}", f"{r['rate_after']:.4f}",
                     f"{ub:.4f}", f"{ob:.4f} / {oa:.4f}",
                     f"{qb['fid']:.2f} / {qa['fid']:.2f}", f"{qb['precision']:.3f} / {qa['precision']:.3f}",
                     f"{qb['recall']:.3f} / {qa['recall']:.3f}",
                     f"{r['forget_seconds'] * 1000:.0f} ms ({100 * r['forget_seconds'] / r['fit_seconds']:.2f}%)",
                     r["latent_pixels_from_forgotten"]])
    print_table(f"Forgetting a person ({res['n']} faces per model, {res['train_photos']} training photos)",
                ["person", "photos", "accepted as them: before", "after", "unseen people (mean)",
                 f"{len(res['trained']) - 1} others before / after (mean)", "FID before / after", "precision", "recall",
                 "time (share of fit)", "pixels from them after"], rows)
    rows = []
    for r in res["rows"]:
        rows.append([r["person"], f"{r['logp_forgotten_before']:.3f} -> {r['logp_forgotten_after']:.3f}",
                     f"{r['logp_person_heldout_before']:.3f} -> {r['logp_person_heldout_after']:.3f}",
                     f"{r['logp_others_before']:.3f} -> {r['logp_others_after']:.3f}",
                     " / ".join(str(x) for x in r["components"])])
    print_table("Mixture log-likelihood per dimension", ["person", "their training photos", "their other photos",
                                                         "500 other training photos",
                                                         "components before / after / updated / dropped"], rows)
    per = []
    for r in res["rows"]:
        others = [o for o in res["trained"] if o != r["person"]]
        for o, b, a in zip(others, r["others_before"], r["others_after"]):
            per.append([r["person"], o, f"{b:.4f}", f"{a:.4f}"])
    print_table("Other trained people's acceptance rates", ["forgotten", "other person", "before", "after"], per)
    if res.get("flow"):
        fl = res["flow"]
        rows = []
        for r, f in zip(res["rows"], fl["rows"]):
            for kind, x in (("mixture (exact down-date)", r), ("flow (fine-tune, papers/002)", f)):
                if kind.startswith("mixture"):
                    lp_f = f"{x['logp_forgotten_before']:.3f} -> {x['logp_forgotten_after']:.3f} /dim"
                    lp_h = f"{x['logp_person_heldout_before']:.3f} -> {x['logp_person_heldout_after']:.3f} /dim"
                    lp_o = f"{x['logp_others_before']:.3f} -> {x['logp_others_after']:.3f} /dim"
                    secs, fit = x["forget_seconds"], x["fit_seconds"]
                    n = res["n"]
                else:
                    g = x["logp"]
                    lp_f = f"{g['forgotten'][0]:.1f} -> {g['forgotten'][1]:.1f}"
                    lp_h = f"{g['held_out_photos'][0]:.1f} -> {g['held_out_photos'][1]:.1f}"
                    lp_o = f"{g['other_training_photos'][0]:.1f} -> {g['other_training_photos'][1]:.1f}"
                    secs, fit = x["seconds"], x["fit_seconds"]
                    n = fl["n"]
                rows.append([r["person"], kind, n, f"{x['rate_before']:.4f} -> {x['rate_after']:.4f}",
                             f"{np.mean(x['others_before']):.4f} -> {np.mean(x['others_after']):.4f}",
                             lp_f, lp_h, lp_o,
                             f"{x['quality_before']['fid']:.2f} -> {x['quality_after']['fid']:.2f}",
                             f"{secs:.2f} s ({100 * secs / fit:.2f}% of {fit:.1f} s fit)"])
        print_table("Forgetting: mixture vs normalizing flow (same photos, same recogniser; the person's photos "
                    "leave the refinement memory in both; flow log p in its reduced space, mixture's per dimension)",
                    ["person", "prior", "faces", "accepted as them", "others (mean)", "log p: forgotten photos",
                     "their other photos", "other training photos", "FID", "time"], rows)


# ------------------------------------------------------------------------------------------ main
def run(args) -> int:
    from ..autoencoder import TAEF2
    from ..io import atomic_write_text
    from ..metrics import InceptionFeatures

    ds = _datasets(args)
    args.out.mkdir(parents=True, exist_ok=True)
    info = describe({"seed": args.seed, "faces per model": args.n, "part": args.part})
    print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in info.items()])
    parts = ("forget", "rebalance", "coverage") if args.part == "all" else tuple(x.strip() for x in args.part.split(","))
    bad = [x for x in parts if x not in ("forget", "forget-time", "rebalance", "coverage")]
    if bad:
        raise SystemExit(f"--part {args.part!r}: unknown part(s) {', '.join(bad)}; use forget, forget-time, rebalance, "
                         "coverage or all")
    try:
        args.time_threads = [int(x) for x in str(args.time_threads).split(",") if x.strip()]
        if not args.time_threads or min(args.time_threads) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--time-threads must be comma-separated positive ints, got {args.time_threads!r}") from None
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    ae = TAEF2.load()
    inc = ref = None
    if set(parts) - {"forget-time"}:
        inc = InceptionFeatures.load()
        t0 = time.perf_counter()
        ref = _reference_features(ds, inc, args.reference_n, args.batch)
        print(f"  reference features: {len(ref)} photos in {time.perf_counter() - t0:.0f} s", flush=True)
    doc = {"machine": info}
    for part in parts:
        if part == "forget-time":
            doc[part] = run_forget_time(args, ds, ae)
            _forget_time_table(doc[part])
        elif part == "forget":
            doc["forget"] = run_forget(args, ds, ae, inc, ref)
            _forget_tables(doc["forget"])
        elif part == "rebalance":
            from .taming_control import rebalance_tables, run_rebalance

            doc["rebalance"] = run_rebalance(args, ds, ae, inc, ref)
            rebalance_tables(doc["rebalance"])
        else:
            from .taming_control import coverage_tables, run_coverage

            doc["coverage"] = run_coverage(args, ds, ae, inc, ref)
            coverage_tables(doc["coverage"])
        path = args.out / f"taming-{part}.json"
        atomic_write_text(path, json.dumps({"machine": info, part: doc[part]}, indent=1, default=float))
        print(f"wrote {path}", flush=True)
    return 0
