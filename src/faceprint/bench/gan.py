"""`python -m faceprint.bench gan`: the latent GAN of papers/004, Ch. 2 (faceprint.gan) against
the non-parametric models: each of the chapter's contributions as a switch, at an equal
iteration budget, on the quality protocol of docs/results/quality-celeba-1k.md.

Rows (``--variants``):
  ns            the default non-saturating loss (Table 2.1's baseline)
  contrastive   + the dual contrastive loss (Eqs. 2.1-2.3) after an NS warm-up of 20%
  gattn         + SAN self-attention in G (Eqs. 2.4-2.7; patch --patch)
  drefattn      + reference attention in D (Eq. 2.8)
  all           contrastive + gattn + drefattn
  gattn-s3, gattn-s7   the patch-size ablation of G's attention (optional rows)
``--seed-variants`` (default ns,contrastive) are trained again with ``--extra-seeds`` so their
seed standard deviation is known. A difference is called one only when it exceeds twice that.

Protocols (``--protocols``; reference = celeba-10k files 5,001-10,000 as in bench quality):
  celeba-1k    train files 1-1,024; held-out (memorisation) files 1,025-5,000
  celeba-5k    train files 1-5,000; no held-out files left: the reference serves
  celeba-10k   train all 10,000 files. The reference is then *inside* the training set, so FID
               and memorisation on this row measure fit to the training photos (flagged in
               the table). The issue asks for this row (the chapter's 1k-30k regime).

Every configuration trains the same number of iterations (``--iterations``), from its own
checkpoint (OUT/ckpt, resumable). Training stops at ``--curve-every`` iteration marks to
measure FID on ``--curve-n`` faces (the training curve). At the end the configuration is scored
on ``-n`` faces: FID, KID, precision/recall, density/coverage, and memorisation (Inception and
latent space) as in bench quality. Baseline rows (LR-GMM, LR-GMM-NN) are recomputed on the same
n for an equal-n comparison; the quality table's 5,000-face numbers are quoted beside them.

Outputs: docs/results/gan.md and gan.json (``--results``) and the curves PNG. Sample sheets (8 x 8
faces per configuration) go to OUT/sheets, outside the repository: they are not committed.
``--minutes`` bounds one invocation; run again with ``--resume`` to continue.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .machine import describe, print_table

VARIANTS = {
    "ns": ("NS (default loss)", {}),
    "contrastive": ("+ dual contrastive loss", {"loss": "contrastive"}),
    "gattn": ("+ G self-attention", {"g_attention": True}),
    "drefattn": ("+ D reference attention", {"d_reference_attention": True}),
    "all": ("all three", {"loss": "contrastive", "g_attention": True, "d_reference_attention": True}),
    "gattn-s3": ("+ G self-attention, patch 3", {"g_attention": True, "attn_patch": 3}),
    "gattn-s7": ("+ G self-attention, patch 7", {"g_attention": True, "attn_patch": 7}),
}
TRAIN_LAST = {"celeba-1k": 1024, "celeba-5k": 5000, "celeba-10k": 10000}
BASELINES = ("lrgmm", "lrgmm-nn")
PAPER = {"contrastive": ("FFHQ", 4.86, 3.98), "gattn": ("CelebA-128", 9.84, 8.60),
         "drefattn": ("CelebA-128", 9.84, 7.48)}


def add_arguments(p) -> None:
    p.add_argument("--protocols", default="celeba-10k,celeba-1k", help="comma-separated of " + ",".join(TRAIN_LAST))
    p.add_argument("--variants", default="ns,contrastive,gattn,drefattn,all",
                   help="comma-separated of " + ",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-variants", default="ns,contrastive", help="variants trained with --extra-seeds too")
    p.add_argument("--extra-seeds", default="1,2", help="further training seeds of --seed-variants ('' for none)")
    p.add_argument("--preset", choices=("small", "tiny"), default="small")
    p.add_argument("--iterations", type=int, default=3000, help="iterations per configuration (equal for all)")
    p.add_argument("--patch", type=int, default=5, help="attention patch size of gattn/drefattn/all")
    p.add_argument("-n", type=int, default=5000, help="faces per configuration for the final scores")
    p.add_argument("--curve-every", type=int, default=None, help="iterations between curve points (default: 1/4)")
    p.add_argument("--curve-n", type=int, default=500, help="faces per curve point")
    p.add_argument("--baselines", default="lrgmm,lrgmm-nn", help="baseline rows recomputed at -n ('' for none)")
    p.add_argument("--data", type=Path, default=None, help="celeba-10k images folder (default ../shared/...)")
    p.add_argument("--out", type=Path, default=Path("bench-results/gan"),
                   help="folder for checkpoints, partial rows and sample sheets (outside the repository)")
    p.add_argument("--results", type=Path, default=None, help="folder for gan.md/gan.json/curves (default docs/results)")
    p.add_argument("--resume", action="store_true", help="reuse finished rows and checkpoints of the same settings")
    p.add_argument("--minutes", type=float, default=None, help="stop this invocation after about this long")
    p.add_argument("--batch", type=int, default=250, help="faces decoded/featurised per chunk")
    p.add_argument("--reference-n", type=int, default=None, help="use only the first N reference photos")
    p.add_argument("--held-n", type=int, default=None, help="held-out photos for memorisation (default up to -n)")
    p.add_argument("--preface", type=Path, default=None,
                   help="a markdown file (what a person read off the run: sheets, shortfalls) put under the title")


def _results_dir(args) -> Path:
    if args.results is not None:
        return args.results
    return Path(__file__).resolve().parents[3] / "docs" / "results"


def run(args) -> int:
    from .. import render
    from ..autoencoder import TAEF2
    from ..data import FaceFolder
    from ..gan.model import PRESETS, LatentGAN
    from ..io import atomic_write_text
    from ..metrics import InceptionFeatures
    from .quality import REF_FIRST, REF_LAST, _data_dir, _encode_range, _jsonable, _resumed, pos_to_folder
    from .taming import cached_features

    t_start = time.perf_counter()
    deadline = None if args.minutes is None else t_start + 60 * args.minutes
    preface = None
    if args.preface is not None:  # read first: a bad file fails now, not after hours of training
        try:
            preface = args.preface.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"--preface {str(args.preface)!r}: cannot read it as UTF-8 text ({e})") from None
    protocols = [p for p in args.protocols.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    for p in protocols:
        if p not in TRAIN_LAST:
            raise SystemExit(f"unknown protocol {p!r}; choose from {', '.join(TRAIN_LAST)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    extra = [int(s) for s in args.extra_seeds.split(",") if s.strip()]
    seed_variants = {v for v in args.seed_variants.split(",") if v}
    curve_every = args.curve_every or max(1, args.iterations // 4)
    base_cfg = replace(PRESETS[args.preset], iterations=args.iterations, checkpoint_every=curve_every)
    out = args.out
    for sub in ("ckpt", "partial", "sheets"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    info = describe({"seed": args.seed, "extra seeds (of " + ",".join(sorted(seed_variants)) + ")":
                     ",".join(map(str, extra)) or "none", "preset": args.preset, "iterations per configuration":
                     args.iterations, "faces per configuration": args.n, "faces per curve point": args.curve_n,
                     "reference photos": f"{REF_FIRST:06d}-{REF_LAST:06d}", "attention patch": args.patch})
    ae = TAEF2.load()
    inc = InceptionFeatures.load()
    data = _data_dir(args)
    all_ls, _ = _encode_range(data, 1, REF_LAST, ae)
    lat_all = all_ls.latents
    names = [int(Path(r).stem) for r in all_ls.relpaths]
    pos = {n: i for i, n in enumerate(names)}
    folder = FaceFolder(data, size=128, limit=REF_LAST)
    ref_idx = [pos[i] for i in range(REF_FIRST, REF_LAST + 1) if i in pos][: args.reference_n]
    ref_feat = cached_features([folder.paths[pos_to_folder(folder, all_ls, i)] for i in ref_idx], inc, args.batch)
    print(f"reference: {len(ref_idx)} photos", flush=True)

    results: dict = {}
    curves: dict = {}
    baselines: dict = {}
    stopped_early = False
    for proto in protocols:
        train_idx = [pos[i] for i in range(1, TRAIN_LAST[proto] + 1) if i in pos]
        held_idx = [pos[i] for i in range(TRAIN_LAST[proto] + 1, REF_FIRST) if i in pos][: args.held_n or args.n]
        held_is_ref = not held_idx
        if held_is_ref:
            held_idx = ref_idx
        X = lat_all[train_idx].float()
        feats_of = lambda idx: cached_features([folder.paths[pos_to_folder(folder, all_ls, i)] for i in idx], inc,  # noqa: E731
                                               args.batch)
        train_feat = feats_of(train_idx)
        held_feat = ref_feat if held_is_ref else feats_of(held_idx)
        train_flat = X.reshape(len(train_idx), -1).numpy()
        held_flat = lat_all[held_idx].reshape(len(held_idx), -1).float().numpy()
        overlap = proto == "celeba-10k"
        t0 = time.perf_counter()
        gen = _fit_lrgmm(X, all_ls, train_idx, ae, args.seed)  # baselines, and the copy guard's bound
        print(f"  {proto}: LR-GMM-NN fitted in {time.perf_counter() - t0:.1f} s", flush=True)
        ctx = {"gen": gen, "ae": ae, "inc": inc, "ref_feat": ref_feat, "train_feat": train_feat, "held_feat": held_feat,
               "train_flat": train_flat, "held_flat": held_flat, "batch": args.batch, "seed": args.seed}
        configs = [(v, args.seed) for v in variants] + [(v, s) for v in variants if v in seed_variants for s in extra]
        for variant, seed in configs:
            key = f"{proto}-{variant}-s{seed}"
            cfg = replace(base_cfg, **{"attn_patch": args.patch, **VARIANTS[variant][1]})
            run_key = {"protocol": proto, "variant": variant, "seed": seed, "config": cfg.to_dict(), "n": args.n,
                       "curve_n": args.curve_n, "reference_n": len(ref_idx), "held_n": len(held_idx)}
            done = out / "partial" / f"{key}.json"
            saved = _resumed_row(done, run_key) if args.resume else None
            if saved is not None:
                results[key], curves[key] = saved["row"], saved["curve"]
                print(f"  {key}: FID {saved['row']['fid']:.2f} (resumed)", flush=True)
                continue
            ckpt = out / "ckpt" / f"{key}.safetensors"
            curve_file = out / "partial" / f"{key}-curve.json"
            if deadline is not None and time.perf_counter() > deadline:
                stopped_early = True  # keep collecting the rows other invocations finished
                unfinished = _resumed(curve_file, run_key) if ckpt.is_file() else None
                if unfinished:
                    curves[f"{key} (unfinished)"] = unfinished
                continue
            curve = _resumed(curve_file, run_key) if (args.resume and ckpt.is_file()) else None
            curve = list(curve or [])
            if not args.resume and ckpt.exists():
                ckpt.unlink()
            gan = LatentGAN(cfg)
            marks = list(range(curve_every, args.iterations + 1, curve_every))
            if not marks or marks[-1] != args.iterations:
                marks.append(args.iterations)
            done_marks = {c["iteration"] for c in curve}
            for mark in marks:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gan.fit(X, seed=seed, iterations=args.iterations, until=mark, checkpoint=ckpt, resume=True)
                it = gan.provenance_["iterations"]
                if it in done_marks:
                    continue
                F, _, _ = _faces_features(gan, args.curve_n, ctx)
                from ..metrics import fid

                curve.append({"iteration": it, "fid": fid(F, ref_feat), "train_seconds": gan.provenance_["train_seconds"]})
                done_marks.add(it)
                atomic_write_text(curve_file, json.dumps({"run": run_key, "row": curve}))
                print(f"  {key}: iteration {it}, FID@{args.curve_n} {curve[-1]['fid']:.2f}, "
                      f"{gan.provenance_['train_seconds']:.0f} s training", flush=True)
                if gan.provenance_.get("stopped"):
                    break
                if deadline is not None and time.perf_counter() > deadline and it < args.iterations:
                    break
            if gan.provenance_["iterations"] < args.iterations and not gan.provenance_.get("stopped"):
                stopped_early = True
                curves[f"{key} (unfinished)"] = curve
                print(f"  {key}: stopped at iteration {gan.provenance_['iterations']} (time); run again with --resume",
                      flush=True)
                continue
            row = _score(gan, args.n, ctx)
            pv = gan.provenance_
            row.update({"label": VARIANTS[variant][0], "variant": variant, "protocol": proto, "seed": seed,
                        "iterations": pv["iterations"], "warmup_iterations": pv["warmup_iterations"],
                        "train_seconds": pv["train_seconds"], "stopped": pv.get("stopped"),
                        "g_parameters": pv["g_parameters"], "d_parameters": pv["d_parameters"],
                        "g_macs_per_sample": pv["g_macs_per_sample"], "history": gan.history_,
                        "reference_in_training": overlap, "held_out_is_reference": held_is_ref})
            sheet = _sheet(gan, ae, seed=args.seed)
            render.save_png(render.grid(sheet, cols=8), out / "sheets" / f"{key}.png")
            results[key], curves[key] = _jsonable(row), curve
            atomic_write_text(done, json.dumps({"run": run_key, "row": results[key], "curve": curve}, default=float))
            print(f"  {key}: FID@{args.n} {row['fid']:.2f}  ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
        # baselines at the same n on this protocol
        for b in [b for b in args.baselines.split(",") if b]:
            key = f"{proto}-{b}"
            run_key = {"protocol": proto, "baseline": b, "n": args.n, "seed": args.seed, "reference_n": len(ref_idx),
                       "held_n": len(held_idx)}
            done = out / "partial" / f"{key}.json"
            saved = _resumed(done, run_key) if args.resume else None
            if saved is not None:
                baselines[key] = saved
                continue
            if deadline is not None and time.perf_counter() > deadline:
                stopped_early = True
                continue
            baselines[key] = _jsonable(_baseline(b, proto, X, all_ls, train_idx, args, ctx))
            atomic_write_text(done, json.dumps({"run": run_key, "row": baselines[key]}, default=float))
            print(f"  {key}: FID@{args.n} {baselines[key]['fid']:.2f}", flush=True)

    quoted = _quoted_quality()
    doc = {"machine": info, "results": results, "curves": curves, "baselines": baselines, "quoted": quoted,
           "protocols": protocols, "variants": variants, "complete": not stopped_early,
           "total_seconds": time.perf_counter() - t_start,
           "paper": {k: {"dataset": d, "baseline_fid": a, "fid": b, "relative": b / a - 1} for k, (d, a, b) in PAPER.items()}}
    doc["comparisons"] = _comparisons(doc, protocols, args.seed, extra, seed_variants)
    doc["preface"] = preface
    res = _results_dir(args)
    res.mkdir(parents=True, exist_ok=True)
    md = _markdown(doc, args)
    print(md)
    atomic_write_text(res / "gan.json", json.dumps(doc, indent=1, default=float))
    atomic_write_text(res / "gan.md", md)
    _plot_curves(doc, res / "gan-curves.png")
    print(f"\nwrote {res / 'gan.md'}, gan.json, gan-curves.png; sample sheets in {out / 'sheets'} (not for the repository)")
    if stopped_early:
        print("this invocation stopped early (--minutes): run the same command with --resume to finish")
    return 0


def _resumed_row(path, run_key: dict):
    """{"row", "curve"} of a finished configuration saved with the same settings, or None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return {"row": saved["row"], "curve": saved.get("curve", [])} if saved.get("run") == run_key else None


def _faces_features(gan, n: int, ctx, seed: int | None = None):
    """Inception features (n, 2048), flat latents (n, d), and seconds (sampling, decoding) of n GAN faces."""
    ae, inc, B = ctx["ae"], ctx["inc"], ctx["batch"]
    seed = ctx["seed"] if seed is None else seed
    feats, lats = [], []
    t_lat = t_dec = 0.0
    for s in range(0, n, B):
        m = min(B, n - s)
        t0 = time.perf_counter()
        z = gan.sample_latents(m, seed=seed, start=s).latents
        t1 = time.perf_counter()
        imgs = ae.decode(z)
        t2 = time.perf_counter()
        feats.append(inc.features(imgs))
        lats.append(z.reshape(m, -1))
        t_lat, t_dec = t_lat + t1 - t0, t_dec + t2 - t1
    return np.concatenate(feats), torch.cat(lats).numpy(), (t_lat, t_dec)


def _metrics(F, L, ctx, n) -> dict:
    from ..metrics import density_coverage, fid, kid, memorization_report, precision_recall
    from .quality import _jsonable

    ref = ctx["ref_feat"]
    row = {"n": n, "fid": fid(F, ref)}
    k = kid(F, ref, seed=ctx["seed"], subset_size=min(1000, len(F), len(ref)))
    row["kid"], row["kid_std"] = float(k[0]), float(k[1])
    pr = precision_recall(ref, F, k=3)
    dc = density_coverage(ref, F, k=5)
    row.update({"precision": float(pr[0]), "recall": float(pr[1]), "density": float(dc[0]), "coverage": float(dc[1])})
    row["memorization_inception"] = _jsonable(memorization_report(F, ctx["train_feat"], ctx["held_feat"]))
    row["memorization_latent"] = _jsonable(memorization_report(L, ctx["train_flat"], ctx["held_flat"]))
    return row


def _score(gan, n: int, ctx) -> dict:
    F, L, (t_lat, t_dec) = _faces_features(gan, n, ctx)
    row = _metrics(F, L, ctx, n)
    # faces the copy guard of `generate` (on by default) would redraw: nearer a training latent than
    # the 5% quantile of held-out photos (GAN faces have no provenance, so only the distance rule)
    from ..latent.generator import DEFAULT_GUARD

    gen = ctx["gen"]
    thr = gen.guard_threshold(DEFAULT_GUARD.quantile)
    Z = torch.from_numpy(L).reshape(n, *gen.latent_shape)
    none = torch.full((n, *gen.latent_shape[1:]), -1, dtype=torch.int64)
    row["over_guard"] = int(sum(int(gen._copies(Z[s:s + 250], none[s:s + 250], thr, DEFAULT_GUARD).sum())
                                for s in range(0, n, 250)))
    row["ms_per_image_latent"] = t_lat / n * 1000
    row["ms_per_image_decode"] = t_dec / n * 1000
    # one face at a time (what a single request costs), mean of 16
    t0 = time.perf_counter()
    for i in range(16):
        gan.draw([10_000 + i * 16], ctx["seed"])  # a block of 16 is computed per call (reproducibility)
    row["ms_per_image_latent_single"] = (time.perf_counter() - t0) / 16 * 1000
    return row


def _fit_lrgmm(X, all_ls, train_idx, ae, seed: int):
    from ..latent.generator import Generator, GeneratorConfig

    class _Sub:
        latents = X
        relpaths = [all_ls.relpaths[i] for i in train_idx]
        content_hashes = [all_ls.content_hashes[i] for i in train_idx]
        data_hash = ""
        image_size = 128
        root = ""

    return Generator(GeneratorConfig(), autoencoder=ae).fit(_Sub, seed=seed)


def _baseline(method: str, proto: str, X, all_ls, train_idx, args, ctx) -> dict:
    from ..latent.generator import DEFAULT_GUARD

    gen = ctx["gen"]
    feats, lats = [], []
    t_lat = t_dec = 0.0
    for s in range(0, args.n, args.batch):
        m = min(args.batch, args.n - s)
        t0 = time.perf_counter()
        z = gen.sample_latents(m, seed=args.seed, start=s, method=method,
                               guard=DEFAULT_GUARD if method == "lrgmm-nn" else None).latents
        t1 = time.perf_counter()
        imgs = ctx["ae"].decode(z)
        t2 = time.perf_counter()
        feats.append(ctx["inc"].features(imgs))
        lats.append(z.reshape(m, -1))
        t_lat, t_dec = t_lat + t1 - t0, t_dec + t2 - t1
    row = _metrics(np.concatenate(feats), torch.cat(lats).numpy(), ctx, args.n)
    row.update({"label": {"lrgmm": "LR-GMM", "lrgmm-nn": "LR-GMM-NN (default, copy guard)"}[method],
                "protocol": proto, "ms_per_image_latent": t_lat / args.n * 1000,
                "ms_per_image_decode": t_dec / args.n * 1000, "fit_seconds": sum(gen.provenance_["fit_seconds"].values())})
    return row


def _sheet(gan, ae, *, seed: int) -> np.ndarray:
    from .. import render

    return render.to_uint8(ae.decode(gan.sample_latents(64, seed=seed).latents))


def _quoted_quality() -> dict:
    """The rows of docs/results/quality-celeba-1k.json the issue compares with (5,000 faces)."""
    path = Path(__file__).resolve().parents[3] / "docs" / "results" / "quality-celeba-1k.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    return {k: {"fid": r["fid"], "n": r["n"], "precision": r["precision"], "recall": r["recall"]}
            for k, r in doc["results"].items() if k in ("lrgmm", "lrgmm-nn", "latentpatch")}


def _comparisons(doc, protocols, seed, extra, seed_variants) -> list[dict]:
    """Relative FID change of each variant against NS, with the seed noise of NS and contrastive."""
    out = []
    res = doc["results"]
    for proto in protocols:
        def fids(v):
            return [res[k]["fid"] for k in (f"{proto}-{v}-s{s}" for s in [seed, *extra]) if k in res]

        base = fids("ns")
        if not base:
            continue
        sd_pool = [np.std(fids(v), ddof=1) for v in ("ns", "contrastive") if len(fids(v)) >= 2]
        sd = float(np.sqrt(np.mean(np.square(sd_pool)))) if sd_pool else None
        b = float(np.mean(base))
        for v in ("contrastive", "gattn", "drefattn", "all", "gattn-s3", "gattn-s7"):
            f = fids(v)
            if not f:
                continue
            m = float(np.mean(f))
            diff = m - b
            claim = None if sd is None else ("better" if diff < -2 * sd else "worse" if diff > 2 * sd else "no difference")
            out.append({"protocol": proto, "variant": v, "fid": m, "fid_ns": b, "n_seeds": len(f), "n_seeds_ns": len(base),
                        "relative": m / b - 1, "seed_std": sd, "claim": claim,
                        "paper": doc["paper"].get(v)})
    return out


def _fmt(v, d=3):
    from .quality import _fmt as fmt  # the quality table's cell format, shared

    return fmt(v, d)


HEADER = ["protocol", "configuration", "seed", "iterations (warm-up)", "train s", "n", "FID", "KID x1e3", "precision",
          "recall", "density", "coverage", "closer than any held-out", "closer than 5% held-out",
          "latent closer than any held-out", "over copy-guard bound", "latent ms/face (batch)", "latent ms/face (one)", "decode ms/face"]


def _row_cells(r, *, gan: bool):
    mi = r.get("memorization_inception") or {}
    ml = r.get("memorization_latent") or {}
    proto = r["protocol"] + (" (ref. in training)" if r.get("reference_in_training") else "")
    if gan:
        name, seed = r["label"] + (" [DIVERGED]" if (r.get("stopped") or {}).get("reason") == "diverged" else ""), r["seed"]
        its, secs = f"{r['iterations']} ({r['warmup_iterations']})", f"{r['train_seconds']:.0f}"
    else:
        name, seed, its, secs = r["label"] + " (recomputed)", "-", "-", f"{r.get('fit_seconds', 0):.1f} (fit)"
    return [proto, name, seed, its, secs, r["n"], f"{r['fid']:.2f}", f"{r['kid'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}",
            f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['density']:.3f}", f"{r['coverage']:.3f}",
            _fmt(mi.get("share_below_min")), _fmt(mi.get("share_below_quantile")), _fmt(ml.get("share_below_min")),
            _fmt(r.get("over_guard"), 0),
            _fmt(r.get("ms_per_image_latent"), 2), _fmt(r.get("ms_per_image_latent_single"), 2),
            _fmt(r.get("ms_per_image_decode"), 2)]


def _markdown(doc, args) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print("# bench gan: a latent GAN with the dual contrastive loss and attention (papers/004, Ch. 2)\n")
        if doc.get("preface"):
            print(doc["preface"].strip() + "\n")
        print("Command: `python -m faceprint.bench gan " + " ".join(_cli_args(args)) + "`"
              + ("" if doc["complete"] else " (INCOMPLETE: stopped by --minutes; resumable)") + ".")
        print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in doc["machine"].items()])
        rows = [_row_cells(r, gan=True) for r in doc["results"].values()]
        rows += [_row_cells(r, gan=False) for r in doc["baselines"].values()]
        print_table("Quality (reference: celeba-10k files 5001-10000)", HEADER, rows)
        if doc["quoted"]:
            print_table("Quoted from docs/results/quality-celeba-1k.md (celeba-1k, 5,000 faces)",
                        ["method", "n", "FID", "precision", "recall"],
                        [[k, q["n"], f"{q['fid']:.2f}", f"{q['precision']:.3f}", f"{q['recall']:.3f}"]
                         for k, q in doc["quoted"].items()])
        comp = doc["comparisons"]
        if comp:
            print_table("Relative FID change against NS (a difference is claimed only beyond 2 seed std)",
                        ["protocol", "variant", "seeds", "FID", "NS FID (seeds)", "relative", "seed std", "verdict",
                         "paper (dataset: baseline -> variant)"],
                        [[c["protocol"], c["variant"], c["n_seeds"], f"{c['fid']:.2f}", f"{c['fid_ns']:.2f} ({c['n_seeds_ns']})",
                          f"{100 * c['relative']:+.1f}%", _fmt(c["seed_std"], 2), c["claim"] or "no seed std: no claim",
                          (f"{c['paper']['dataset']}: {c['paper']['baseline_fid']} -> {c['paper']['fid']} "
                           f"({100 * c['paper']['relative']:+.1f}%)") if c.get("paper") else "-"] for c in comp])
        checks = []
        for r in doc["results"].values():
            lr = doc["baselines"].get(f"{r['protocol']}-lrgmm")
            nn = doc["baselines"].get(f"{r['protocol']}-lrgmm-nn")
            cell = lambda b: "-" if b is None else f"{'yes' if r['fid'] < b['fid'] else 'NO'} ({b['fid']:.2f})"  # noqa: E731
            checks.append([r["protocol"], r["label"], r["seed"], f"{r['fid']:.2f}", cell(lr), cell(nn),
                           f"{r['train_seconds'] / 60:.1f}", _fmt((r.get("memorization_inception") or {}).get(
                               "share_below_quantile"))])
        if checks:
            print_table("Acceptance: each GAN against LR-GMM and LR-GMM-NN recomputed at the same n and protocol",
                        ["protocol", "configuration", "seed", "FID", "beats LR-GMM (its FID)",
                         "beats LR-GMM-NN (its FID)", "training minutes (<= 60)", "copy rate (> 0.10 flagged)"], checks)
        cur = doc["curves"]
        if cur:
            print_table("Training curves: FID on the curve faces at checkpoints", ["configuration", "iteration: FID"],
                        [[k, ", ".join(f"{c['iteration']}: {c['fid']:.1f}" for c in v)] for k, v in cur.items()])
        sizes = {}
        for r in doc["results"].values():
            sizes.setdefault(r["variant"], [r["g_parameters"], r["d_parameters"], r["g_macs_per_sample"]])
        if sizes:
            print_table("Network sizes", ["variant", "G parameters", "D parameters", "G MMAC per face"],
                        [[v, a, b, f"{c / 1e6:.1f}"] for v, (a, b, c) in sizes.items()])
    return buf.getvalue()


def _cli_args(args) -> list[str]:
    out = [f"--protocols {args.protocols}", f"--variants {args.variants}", f"--seed {args.seed}",
           f"--seed-variants {args.seed_variants}", f"--extra-seeds '{args.extra_seeds}'", f"--preset {args.preset}",
           f"--iterations {args.iterations}", f"--patch {args.patch}", f"-n {args.n}", f"--curve-n {args.curve_n}"]
    if args.curve_every:
        out.append(f"--curve-every {args.curve_every}")
    if args.reference_n:
        out.append(f"--reference-n {args.reference_n}")
    out.append(f"--baselines '{args.baselines}'")
    return out


def _plot_curves(doc, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    if not doc["results"] and not doc["curves"]:
        return
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for key, r in doc["results"].items():
        h = r.get("history") or []
        if h:
            its = [e["iteration"] for e in h]
            ax[0].plot(its, [e["loss_d"] for e in h], lw=0.8, label=key)
            ax[1].plot(its, [e["loss_g"] for e in h], lw=0.8, label=key)
    for key, c in doc["curves"].items():
        if c:
            ax[2].plot([e["iteration"] for e in c], [e["fid"] for e in c], "o-", label=key)
    for b in doc["baselines"].values():
        ax[2].axhline(b["fid"], ls="--", lw=0.8, color="grey")
        ax[2].annotate(f"{b['label']} {b['fid']:.1f} (n={b['n']})", (0, b["fid"]), fontsize=7)
    ax[0].set_title("discriminator loss (mean over 10 iterations)")
    ax[1].set_title("generator loss")
    ax[2].set_title("FID at checkpoints (curve faces)")
    for a in ax:
        a.set_xlabel("iteration")
        a.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
