"""`python -m faceprint.bench quality`: the paper's Table 1 on this machine (papers/000, Sec. 4).

Every method runs on the same autoencoder (TAEF2), the same training photos and the same
machine; FID/KID/precision/recall/density/coverage are computed on InceptionV3 pool features
against the same reference photos; memorization is measured against the training photos and
held-out photos; the provenance maps give how many training photos each face draws on.

Protocols (../shared/datasets/README.md):
  celeba-1k   train = celeba-10k files 1-1,024, reference = files 5,001-10,000
  celeba-32   train = files 1-32 (few-shot, K = 1), same reference
  celeba-5k   train = files 1-5,000, same reference
Held-out photos (never trained on, not in the reference) for memorization and for the
autoencoder ceiling: files after the training set up to 5,000 (celeba-1k, celeba-32); for
celeba-5k there are none left, so the reference set itself serves (marked in the output).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .machine import describe, print_table

METHODS = ("gaussian", "nn", "lrgmm", "lrgmm-nn-paper", "lrgmm-nn-seam-noguard", "lrgmm-nn-seam", "lrgmm-nn-noguard",
           "lrgmm-nn", "latentpatch", "ae-recon")
LABELS = {
    "gaussian": "standard Gaussian prior",
    "nn": "NN step alone (paper rule)",
    "lrgmm": "LR-GMM",
    "lrgmm-nn-paper": "LR-GMM-NN, paper rule (Eq. 5), no guard",
    "lrgmm-nn-seam-noguard": "LR-GMM-NN, seam rule, no share cap, no guard",
    "lrgmm-nn-seam": "LR-GMM-NN, seam rule, share cap 0.5, copy guard (the default before the guided rule)",
    "lrgmm-nn-noguard": "LR-GMM-NN, guided rule, share cap 0.35, no guard",
    "lrgmm-nn": "LR-GMM-NN default (guided rule, share cap 0.35, copy guard)",
    "latentpatch": "LatentPatch",
    "ae-recon": "AE reconstructions (ceiling)",
}
# generator rows: (sampling method, config overrides, copy guard on); the paper's ablation rows
# (Fig. 6) run as the paper describes them: its per-pixel rule and no guard
GENERATOR_ROWS = {
    "gaussian": ("gaussian", {"refinement": "paper"}, False),
    "nn": ("nn", {"refinement": "paper"}, False),
    "lrgmm": ("lrgmm", {}, False),
    "lrgmm-nn-paper": ("lrgmm-nn", {"refinement": "paper"}, False),
    "lrgmm-nn-seam-noguard": ("lrgmm-nn", {"refinement": "seam", "share_cap": None}, False),
    "lrgmm-nn-seam": ("lrgmm-nn", {"refinement": "seam", "share_cap": 0.5}, True),
    "lrgmm-nn-noguard": ("lrgmm-nn", {}, False),
    "lrgmm-nn": ("lrgmm-nn", {}, True),
}


@dataclass(frozen=True)
class Protocol:
    """A quality protocol. celeba-10k protocols ("numbered") train on photos 1..train, take the
    held-out photos from train+1..5000 and the reference from 5001..10000 (file numbers).
    Other datasets ("shuffled") split the sorted files by a fixed permutation (split_seed, part
    of the protocol, not of the run's --seed): the first ``train`` files train, the next
    ``held`` are held out, the next ``reference`` are the FID reference. size: the working
    image size (photos are loaded, generated and compared at it)."""

    name: str
    train: int
    components: int | None
    rank_temperature: float
    dataset: str = "celeba-10k"
    size: int = 128
    split: str = "numbered"
    held: int = 0
    reference: int = 0
    split_seed: int = 0


PROTOCOLS = {
    "celeba-1k": Protocol("celeba-1k", 1024, None, 0.12),
    "celeba-32": Protocol("celeba-32", 32, 1, 0.003),
    "celeba-5k": Protocol("celeba-5k", 5000, None, 0.12),
    # celeba-10k photos are 89 x 109, too small for 256 px; utkface's are 200 x 200 (celeba-id's
    # 178 x 218 hold only 160 people). The same split at 128 and 256 px compares the two sizes.
    "utkface-1k": Protocol("utkface-1k", 1024, None, 0.12, dataset="utkface", split="shuffled", held=1000,
                           reference=5000),
    "utkface-1k-256": Protocol("utkface-1k-256", 1024, None, 0.12, dataset="utkface", size=256, split="shuffled",
                               held=1000, reference=5000),
}
REF_FIRST, REF_LAST = 5001, 10000


def add_arguments(p) -> None:
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="celeba-1k")
    p.add_argument("--data", type=Path, default=None, help="celeba-10k images folder (default ../shared/...)")
    p.add_argument("-n", type=int, default=5000, help="generated faces per method (default 5000)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambdas", default="0.01,0.03,0.06,0.12,0.25,0.5,1.0",
                   help="rank temperatures of the trade-off sweep ('' to skip)")
    p.add_argument("--sweep-n", type=int, default=2000, help="faces per lambda in the sweep (default 2000)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON, Markdown and PNGs")
    p.add_argument("--resume", action="store_true",
                   help="reuse the methods an interrupted run with the same settings finished (OUT/partial/)")
    p.add_argument("--reference-n", type=int, default=None, help="use only the first N reference photos (smoke runs)")
    p.add_argument("--held-n", type=int, default=None,
                   help="use only the first N held-out photos for the memorization columns (default: up to -n)")
    p.add_argument("--batch", type=int, default=250, help="faces generated/decoded/featurised per chunk")
    p.add_argument("--carry-over", type=Path, default=None,
                   help="an earlier quality JSON whose rows named by --carry are reused, not recomputed (for rows "
                        "whose code and seed did not change; marked in the table)")
    p.add_argument("--carry", default="", help="comma-separated methods to take from --carry-over")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an extra LR-GMM-NN row with the copy guard on and these GeneratorConfig settings, e.g. "
                        "cap-s1:share_cap=0.5,seam_weight=1.0 (repeatable; name it in --methods or it is added)")
    from ..cli.main import add_dask_option

    add_dask_option(p, "encode the photos, decode the faces and take their Inception features")


def _data_dir(args, proto=None) -> Path:
    from ..cli.main import _default_demo_data

    if args.data is not None:
        return args.data
    if proto is not None and proto.dataset != "celeba-10k":
        from .machine import datasets_dir

        return datasets_dir(None, needs=f"{proto.dataset}/") / proto.dataset / "images"
    data = _default_demo_data()
    if data is None:
        raise SystemExit("no data: pass --data (the celeba-10k images folder)")
    return data


def split_indices(n_files: int, proto) -> tuple[list[int], list[int], list[int]]:
    """A shuffled protocol's (train, held-out, reference) file indices into the sorted files."""
    need = proto.train + proto.held + proto.reference
    if n_files < need:
        raise SystemExit(f"protocol {proto.name} needs {need} photos of {proto.dataset}, the folder has {n_files}")
    perm = torch.randperm(n_files, generator=torch.Generator().manual_seed(proto.split_seed)).tolist()
    t, h = proto.train, proto.train + proto.held
    return perm[:t], perm[t:h], perm[h:need]


def _latent_cache():
    from ..data import LatentCache

    return LatentCache()


def _encode_range(data, first, last, ae, client=None):
    from ..data import FaceFolder, LatentCache, encode_folder

    folder = FaceFolder(data, size=128, limit=last)
    return encode_folder(folder, ae, cache=LatentCache(), client=client), None


def run(args) -> int:
    from ..distributed.cluster import open_client

    with open_client(getattr(args, "dask", None)) as client:
        return _run(args, client)


def _run(args, client) -> int:
    from .. import render
    from ..autoencoder import TAEF2
    from ..latent.generator import Generator, GeneratorConfig
    from ..latent.latentpatch import LatentPatch
    from ..metrics import (InceptionFeatures, density_coverage, fid, kid, memorization_report,
                           precision_recall, provenance_stats)

    proto = PROTOCOLS[args.protocol]
    methods = [m for m in args.methods.split(",") if m]
    # this run's generator rows and labels: the built-in ones plus --variant rows (the module's tables stay as they are)
    gen_rows, labels = dict(GENERATOR_ROWS), dict(LABELS)
    for name, overrides in parse_variants(args.variant).items():
        gen_rows[name] = ("lrgmm-nn", overrides, True)
        labels[name] = "LR-GMM-NN + copy guard, " + ", ".join(f"{k} {v}" for k, v in overrides.items())
        if name not in methods:
            methods.append(name)
    for m in methods:
        if m not in labels:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)} or name a --variant")
    data = _data_dir(args, proto)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    numbered = proto.split == "numbered"
    info = describe({"protocol": proto.name, "seed": args.seed, "generated per method": args.n,
                     "held-out photos (memorization)": args.held_n or "up to -n",
                     "train photos": proto.train,
                     "reference photos": f"{REF_FIRST:06d}-{REF_LAST:06d}" if numbered else
                     f"{proto.reference} of {proto.dataset} (split seed {proto.split_seed})",
                     "image size": proto.size, "dataset": proto.dataset})

    ae = TAEF2.load()
    inc = InceptionFeatures.load()
    timing = {}

    # ---------------------------------------------------------------- data and reference features
    from ..data import FaceFolder

    t0 = time.perf_counter()
    if numbered:
        all_ls, _ = _encode_range(data, 1, REF_LAST, ae, client)
        lat_all = all_ls.latents
        names = [int(Path(r).stem) for r in all_ls.relpaths]
        pos = {n: i for i, n in enumerate(names)}
        train_idx = [pos[i] for i in range(1, proto.train + 1) if i in pos]
        ref_idx = [pos[i] for i in range(REF_FIRST, REF_LAST + 1) if i in pos][: args.reference_n]
        held_idx = [pos[i] for i in range(proto.train + 1, REF_FIRST) if i in pos][: min(args.n, args.held_n or args.n)]
        folder = FaceFolder(data, size=128, limit=REF_LAST)
        folder_of = [pos_to_folder(folder, all_ls, i) for i in range(len(all_ls.relpaths))]
        lat_relpaths, lat_hashes = all_ls.relpaths, all_ls.content_hashes
    else:
        from ..data import encode_files
        from ..io import sha256_file

        folder = FaceFolder(data, size=proto.size)
        f_train, f_held, f_ref = split_indices(len(folder.paths), proto)
        f_held = f_held[: min(args.n, args.held_n or args.n)]
        f_ref = f_ref[: args.reference_n]
        folder_of = f_train + f_held + f_ref  # latent row -> folder index
        lat_all = encode_files([folder.paths[i] for i in f_train + f_held], ae, size=proto.size,
                               cache=_latent_cache())
        train_idx = list(range(len(f_train)))
        held_idx = list(range(len(f_train), len(f_train) + len(f_held)))
        ref_idx = list(range(len(f_train) + len(f_held), len(folder_of)))  # no latents: features only
        lat_relpaths = [folder.relpaths[i] for i in folder_of]
        lat_hashes = [sha256_file(folder.paths[i]) for i in f_train]
    timing["encode all photos (cache)"] = time.perf_counter() - t0
    held_is_ref = not held_idx
    if held_is_ref:
        held_idx = ref_idx

    class _Sub:  # the training LatentSet restricted to the protocol's photos
        latents = lat_all[train_idx]
        relpaths = [lat_relpaths[i] for i in train_idx]
        content_hashes = [lat_hashes[i] for i in train_idx]
        data_hash = ""
        image_size = proto.size
        root = str(data)

    t0 = time.perf_counter()
    gen = Generator(GeneratorConfig(components=proto.components, rank_temperature=proto.rank_temperature),
                    autoencoder=ae).fit(_Sub, seed=args.seed)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    lp = LatentPatch().fit(_Sub.latents)
    t_lp_fit = time.perf_counter() - t0
    speed = _speed(gen, lp, ae, folder, [folder_of[i] for i in held_idx[:64]], args)
    speed["setup"].update({"LR-GMM-NN projector P0 (s)": gen.provenance_["fit_seconds"]["projector"],
                           "LR-GMM-NN mixture (k-means + EM) (s)": gen.provenance_["fit_seconds"]["mixture"],
                           "LR-GMM-NN fit total (s)": t_fit, "LatentPatch fit (s)": t_lp_fit})
    print_table("Setup and generation time", ["stage", "value"], _speed_rows(speed))

    def photo_features(indices, tag):
        # kept in the user's feature cache (outside the repository), keyed by the files' content
        from .taming import cached_features

        t = time.perf_counter()
        feats = cached_features([folder.paths[i] for i in indices], inc, args.batch, size=proto.size)
        print(f"  features of {len(indices)} {tag} photos ({time.perf_counter() - t:.0f} s)", flush=True)
        return feats

    t0 = time.perf_counter()
    ref_feat = photo_features([folder_of[i] for i in ref_idx], "reference")
    train_feat = photo_features([folder_of[i] for i in train_idx], "training")
    held_feat = ref_feat if held_is_ref else photo_features([folder_of[i] for i in held_idx], "held-out")
    timing["inception on real photos"] = time.perf_counter() - t0

    train_lat_flat = _Sub.latents.reshape(len(train_idx), -1).float()
    held_lat_flat = lat_all[held_idx].reshape(len(held_idx), -1).float()

    # ---------------------------------------------------------------- per method
    results = {}
    sheet = []
    from ..io import atomic_path, atomic_write_text

    partial = args.out / "partial"
    run_key = {"protocol": proto.name, "seed": args.seed, "n": args.n, "reference_n": len(ref_idx), "batch": args.batch,
               "faceprint": info.get("faceprint"), "held_n": len(held_idx)}
    carried = json.loads(args.carry_over.read_text()) if args.carry_over else None
    carry = {m for m in args.carry.split(",") if m}
    for method in methods:
        done = partial / f"{method}.json"
        # a generator row's key holds its effective settings, so a row made under other defaults is redone
        row_key = (dict(run_key, config=dataclasses.asdict(_variant(gen, gen_rows[method][1]).config))
                   if method in gen_rows else run_key)
        saved = _resumed(done, row_key) if args.resume else None
        if method in carry and carried is not None and method in carried["results"]:
            row = dict(carried["results"][method])
            row["carried_over_from"] = carried["machine"].get("date")
            results[method] = row
            # the 10-face sample sheet is redrawn (cheap); the scores are the earlier run's
            if method == "latentpatch":
                z, _ = lp.sample(10, seed=args.seed, start=0)
            elif method == "ae-recon":
                z = lat_all[held_idx[:10]].float()
            else:
                g_method, g_over, g_guard = gen_rows[method]
                from ..latent.generator import DEFAULT_GUARD

                z = _variant(gen, g_over).sample_latents(10, seed=args.seed, method=g_method,
                                                         guard=DEFAULT_GUARD if g_guard else None).latents
            sheet.append(render.to_uint8(ae.decode(z)))
            print(f"  {method}: FID {row['fid']:.2f} (carried over from {args.carry_over.name})", flush=True)
            continue
        if saved is not None:
            results[method] = saved
            sheet.append(np.load(partial / f"{method}-sheet.npy", allow_pickle=False))
            print(f"  {method}: FID {saved['fid']:.2f} (resumed from {done})", flush=True)
            continue
        t_samp = t_dec = t_feat = 0.0
        redrawn = over_guard = 0
        feats, lats, provs = [], [], []
        n = args.n if method != "ae-recon" else min(args.n, len(held_idx))
        for s in range(0, n, args.batch):
            m = min(args.batch, n - s)
            t0 = time.perf_counter()
            prov = None
            if method == "latentpatch":
                z, prov = lp.sample(m, seed=args.seed, start=s)
            elif method == "ae-recon":
                z = lat_all[held_idx[s:s + m]].float()
            else:
                g_method, g_over, g_guard = gen_rows[method]
                g = _variant(gen, g_over)
                from ..latent.generator import DEFAULT_GUARD

                smp = g.sample_latents(m, seed=args.seed, start=s, method=g_method,
                                       guard=DEFAULT_GUARD if g_guard else None)
                z = smp.latents
                prov = smp.provenance if g_method in ("nn", "lrgmm-nn") else None
                if smp.redraws is not None:
                    redrawn += int((smp.redraws > 0).sum())
                over_guard += int(_over_guard(gen, z, smp.provenance).sum())
            t1 = time.perf_counter()
            t_samp += t1 - t0
            lats.append(z.reshape(m, -1))
            if prov is not None:
                provs.append(prov)
            if client is not None:  # decoded and featurised on the Dask workers after the loop
                if s == 0:
                    sheet.append(render.to_uint8(ae.decode(z[:10])))
                continue
            imgs = ae.decode(z)
            t2 = time.perf_counter()
            feats.append(inc.features(imgs))
            t3 = time.perf_counter()
            t_dec, t_feat = t_dec + t2 - t1, t_feat + t3 - t2
            if s == 0:
                sheet.append(render.to_uint8(imgs[:10]))
        if client is not None:
            t0 = time.perf_counter()
            feats = [_dask_features(torch.cat(lats).reshape(n, *lat_all.shape[1:]), ae, inc, client, args.batch)]
            t_dec = time.perf_counter() - t0  # decoding and features together, on the cluster
        F = np.concatenate(feats)
        L = torch.cat(lats)
        row = {"n": n, "ms_per_image_latent": t_samp / n * 1000, "ms_per_image_decode": t_dec / n * 1000,
               "ms_per_image_inception": t_feat / n * 1000}
        if method in gen_rows:
            # faces over the copy guard's default bound (shipped by this row), and faces it redrew
            row["over_guard"] = over_guard
            row["redrawn"] = redrawn
        row["fid"] = fid(F, ref_feat)
        k = kid(F, ref_feat, seed=args.seed, subset_size=min(1000, len(F), len(ref_feat)))
        row["kid"], row["kid_std"] = float(k[0]), float(k[1])
        pr = precision_recall(ref_feat, F, k=3)
        dc = density_coverage(ref_feat, F, k=5)
        row.update({"precision": float(pr[0]), "recall": float(pr[1]), "density": float(dc[0]), "coverage": float(dc[1])})
        if method != "ae-recon":
            mem_inc = memorization_report(F, train_feat, held_feat)
            mem_lat = memorization_report(L.numpy(), train_lat_flat.numpy(), held_lat_flat.numpy())
            row["memorization_inception"] = _jsonable(mem_inc)
            row["memorization_latent"] = _jsonable(mem_lat)
        if provs:
            row["provenance"] = _jsonable(provenance_stats(torch.cat(provs).numpy()))
        results[method] = row
        # each finished method is kept (outside the repository) so that --resume can skip it
        partial.mkdir(exist_ok=True)
        with atomic_path(partial / f"{method}-sheet.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, sheet[-1], allow_pickle=False)
        atomic_write_text(done, json.dumps({"run": row_key, "row": _jsonable(row)}, default=float))
        print(f"  {method}: FID {row['fid']:.2f}  ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)

    doc = {"machine": info, "protocol": proto.__dict__, "results": results, "timing": timing, "labels": labels,
           "speed": speed, "held_out_is_reference": held_is_ref}

    # ---------------------------------------------------------------- lambda sweep
    lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
    sweep = []
    for lam in lambdas:
        done = partial / f"sweep-{lam:g}-{args.sweep_n}.json"
        saved = _resumed(done, run_key) if args.resume else None
        if saved is not None:
            sweep.append(saved)
            print(f"  lambda {lam}: FID {saved['fid']:.2f} (resumed from {done})", flush=True)
            continue
        feats = []
        for s in range(0, args.sweep_n, args.batch):
            m = min(args.batch, args.sweep_n - s)
            smp = gen.sample_latents(m, seed=args.seed, start=s, rank_temperature=lam)
            feats.append(smp.latents if client is not None else inc.features(ae.decode(smp.latents)))
        if client is not None:
            feats = [_dask_features(torch.cat(feats), ae, inc, client, args.batch)]
        F = np.concatenate(feats)
        pr = precision_recall(ref_feat, F, k=3)
        sweep.append({"lambda": lam, "fid": fid(F, ref_feat), "precision": float(pr[0]), "recall": float(pr[1]),
                      "n": args.sweep_n})
        partial.mkdir(exist_ok=True)
        atomic_write_text(done, json.dumps({"run": run_key, "row": sweep[-1]}, default=float))
        print(f"  lambda {lam}: FID {sweep[-1]['fid']:.2f}", flush=True)
    doc["lambda_sweep"] = sweep
    doc["total_seconds"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------- outputs
    _print_tables(doc, methods)
    stem = args.out / f"quality-{proto.name}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(doc, indent=1, default=float))
    atomic_write_text(stem.with_suffix(".md"), _markdown(doc, methods))
    render.save_png(render.grid(np.concatenate(sheet), cols=10), stem.parent / f"{stem.name}-samples.png")
    if sweep:
        _plot_sweep(sweep, stem.parent / f"{stem.name}-lambda.png", proto.name)
    _plot_pareto(doc, methods, stem.parent / f"{stem.name}-pareto.png", proto.name)
    print(f"\nwrote {stem}.json, {stem}.md, {stem.name}-samples.png" + (f", {stem.name}-lambda.png" if sweep else ""))
    return 0


def _dask_features(latents, ae, inc, client, batch: int):
    """Decode + Inception features of latents (N, C, h, w) on the Dask workers (identical values)."""
    from ..distributed.stages import features

    return features(latents, autoencoder=ae, inception=inc, client=client, chunk_size=batch, bar=True,
                    desc="decode and features")


def parse_variants(specs) -> dict:
    """--variant NAME:KEY=VALUE,... -> {NAME: {KEY: value}}; values are JSON (numbers, null,
    true/false) or plain strings; the keys must be GeneratorConfig fields."""
    import dataclasses

    from ..latent.generator import GeneratorConfig

    fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
    out = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        if not sep or not name or not rest:
            raise SystemExit(f"--variant {spec!r}: write NAME:KEY=VALUE[,KEY=VALUE], e.g. cap:share_cap=0.5")
        if name in METHODS and name not in out:
            raise SystemExit(f"--variant {spec!r}: {name!r} is a built-in method; choose another name")
        over = {}
        for kv in rest.split(","):
            k, eq, v = kv.partition("=")
            if not eq or k not in fields:
                raise SystemExit(f"--variant {spec!r}: {kv!r} is not KEY=VALUE with KEY one of the GeneratorConfig "
                                 f"fields ({', '.join(sorted(fields))})")
            try:
                over[k] = json.loads(v)
            except ValueError:
                over[k] = v
        try:
            dataclasses.replace(GeneratorConfig(), **over)
        except Exception as e:  # the config's own validation names the bad value
            raise SystemExit(f"--variant {spec!r}: {e}") from None
        out[name] = over
    return out


def _variant(gen, overrides: dict):
    """The fitted generator with other sampling settings (the fitted state is shared)."""
    import dataclasses

    if not overrides:
        return gen
    key = tuple(sorted(overrides.items()))
    cache = gen.__dict__.setdefault("_bench_variants", {})
    if key not in cache:
        g = gen.copy(share=("bank_", "projector_", "mixture_", "training_"))
        g.config = dataclasses.replace(gen.config, **overrides)
        g._cache = {}
        cache[key] = g
    return cache[key]


def _over_guard(gen, z, prov):
    """(B,) bool: faces the default copy guard would refuse (faces without provenance: distance only)."""
    from ..latent.generator import DEFAULT_GUARD

    return gen._copies(z, prov, gen.guard_threshold(DEFAULT_GUARD.quantile), DEFAULT_GUARD)


def _best(fn, repeat):
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _speed(gen, lp, ae, folder, photo_idx, args) -> dict:
    """The appendix's timing table: set-up stages, and per-image generation stages both batched
    (args.batch images at once) and one image at a time. Best of 3 (batched) / mean over 32 (single)."""
    setup = {}
    t0 = time.perf_counter()
    imgs = torch.stack([folder.load_one(i) for i in photo_idx])
    setup["load + preprocess (ms/photo)"] = (time.perf_counter() - t0) / len(photo_idx) * 1000
    t, _ = _best(lambda: ae.encode(imgs), 2)
    setup["TAEF2 encode, fresh (ms/photo)"] = t / len(photo_idx) * 1000

    lam = gen.config.rank_temperature
    sampler, refiner = gen._sampler(lam), gen._refiner()
    q = gen.config.channels
    c, h, w = gen.latent_shape

    def lrgmm_stages(n, start):
        t0 = time.perf_counter()
        zf, comp = sampler.draw(n, args.seed, start, None)
        t1 = time.perf_counter()
        _, prov = refiner.refine(zf.reshape(n, q, h, w), comp)
        from ..latent.refine import gather
        z = gather(gen.bank_, prov).float()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, z

    def lp_stage(n, start):
        t0 = time.perf_counter()
        z, _ = lp.sample(n, seed=args.seed, start=start)
        return time.perf_counter() - t0, z

    per = {}
    B = args.batch
    best = [math.inf, math.inf, math.inf, math.inf]
    for rep in range(3):
        ts, tr, z = lrgmm_stages(B, rep * B)
        tl, _ = lp_stage(B, rep * B)
        td, _ = _best(lambda: ae.decode(z), 1)
        best = [min(best[0], ts), min(best[1], tr), min(best[2], tl), min(best[3], td)]
    per["batched"] = {"LR-GMM sampling": best[0] / B * 1000, "NN refinement": best[1] / B * 1000,
                      "LatentPatch synthesis": best[2] / B * 1000, "TAEF2 decode": best[3] / B * 1000}
    S = 32
    acc = [0.0, 0.0, 0.0, 0.0]
    for i in range(S):
        ts, tr, z = lrgmm_stages(1, 10_000 + i)
        tl, _ = lp_stage(1, 10_000 + i)
        td, _ = _best(lambda: ae.decode(z), 1)
        acc = [acc[0] + ts, acc[1] + tr, acc[2] + tl, acc[3] + td]
    per["single"] = {"LR-GMM sampling": acc[0] / S * 1000, "NN refinement": acc[1] / S * 1000,
                     "LatentPatch synthesis": acc[2] / S * 1000, "TAEF2 decode": acc[3] / S * 1000}
    for mode in per.values():
        ours = mode["LR-GMM sampling"] + mode["NN refinement"]
        mode["LR-GMM-NN latent total"] = ours
        mode["LatentPatch / LR-GMM-NN (excl. decode)"] = mode["LatentPatch synthesis"] / ours
    return {"setup": setup, "per_image_ms": per, "batch": B, "threads": torch.get_num_threads()}


def _speed_rows(speed):
    rows = [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in speed["setup"].items()]
    for mode, vals in speed["per_image_ms"].items():
        label = f"batch of {speed['batch']}" if mode == "batched" else "one image at a time"
        for k, v in vals.items():
            unit = "x" if "/" in k else "ms/img"
            rows.append([f"{k} ({label}, {unit})", f"{v:.3f}"])
    return rows


def pos_to_folder(folder, latent_set, i):
    """Index into the FaceFolder of the latent set's i-th photo."""
    if not hasattr(pos_to_folder, "_map") or pos_to_folder._key is not folder:
        pos_to_folder._map = {r: j for j, r in enumerate(folder.relpaths)}
        pos_to_folder._key = folder
    return pos_to_folder._map[latent_set.relpaths[i]]


def _jsonable(x):
    import dataclasses

    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if hasattr(x, "_asdict"):
        return _jsonable(x._asdict())
    if isinstance(x, np.ndarray):
        return x.tolist() if x.size <= 16 else {"mean": float(x.mean()), "median": float(np.median(x))}
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _mem_cells(row):
    mi = row.get("memorization_inception") or {}
    pv = row.get("provenance") or {}
    cells = []
    cells.append(_fmt(mi.get("share_below_min")))
    cells.append(_fmt(mi.get("share_below_quantile")))
    cells.append(_fmt(pv.get("mean_distinct"), 1))
    cells.append(_fmt(pv.get("mean_largest_share")))
    return cells


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, dict):
        v = v.get("mean")
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def _table_rows(doc, methods):
    rows = []
    for m in methods:
        r = doc["results"].get(m)
        if r is None:
            continue
        rows.append([doc.get("labels", LABELS).get(m, m) + (" (earlier run)" if r.get("carried_over_from") else ""), r["n"], f"{r['fid']:.2f}", f"{r['kid'] * 1000:.2f} ± {r['kid_std'] * 1000:.2f}",
                     f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['density']:.3f}", f"{r['coverage']:.3f}",
                     *_mem_cells(r), _fmt(r.get("over_guard"), 0), _fmt(r.get("redrawn"), 0),
                     f"{r['ms_per_image_latent']:.2f}", f"{r['ms_per_image_decode']:.2f}"])
    return rows


HEADER = ["method", "n", "FID", "KID x1e3", "precision", "recall", "density", "coverage",
          "closer than any held-out", "closer than 5% held-out", "photos per face", "largest share",
          "over guard bound", "redrawn by guard", "latent ms/img", "decode ms/img"]


def _print_tables(doc, methods):
    print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in doc["machine"].items()])
    if doc.get("speed"):
        print_table("Setup and generation time", ["stage", "value"], _speed_rows(doc["speed"]))
    print_table(f"Quality ({doc['protocol']['name']}, reference {REF_FIRST}-{REF_LAST})", HEADER,
                _table_rows(doc, methods))
    if doc.get("lambda_sweep"):
        print_table("Rank temperature sweep (LR-GMM-NN)", ["lambda", "n", "FID", "precision", "recall"],
                    [[s["lambda"], s["n"], f"{s['fid']:.2f}", f"{s['precision']:.3f}", f"{s['recall']:.3f}"]
                     for s in doc["lambda_sweep"]])


def _resumed(path, run_key: dict):
    """The row a run with the same settings saved at ``path`` (OUT/partial/), or None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["row"] if saved.get("run") == run_key else None


def _markdown(doc, methods) -> str:
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _print_tables(doc, methods)
    return buf.getvalue()


def _plot_pareto(doc, methods, path, name):
    """FID against the copy rate (share of faces closer to a training photo than 95% of
    held-out photos, Inception space) for every row that has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for m in methods:
        r = doc["results"].get(m)
        mi = (r or {}).get("memorization_inception") or {}
        if r is None or mi.get("share_below_quantile") is None or r["fid"] > 200:
            continue
        pts.append((mi["share_below_quantile"], r["fid"], doc.get("labels", LABELS).get(m, m)))
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(8, 6))
    # numbers beside the points, names in the legend: close points keep readable labels
    for i, (x, y, label) in enumerate(pts):
        ax.plot(x, y, "o", label=f"{i + 1}: {label} ({y:.1f})")
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4 + 7 * (i % 2), 3 - 9 * (i % 2)),
                    fontsize=8)
    front = sorted(pts)
    best, line = float("inf"), []
    for x, y, _ in front:
        if y < best:
            best = y
            line.append((x, y))
    ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="grey", label="Pareto front")
    ae = doc["results"].get("ae-recon")
    if ae:
        ax.axhline(ae["fid"], color="green", lw=0.8, label=f"AE reconstructions (ceiling) {ae['fid']:.1f}")
    ax.set_xlabel("copy rate: faces closer to a training photo than 95% of held-out photos")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"Quality against copying ({name}, {doc['machine'].get('generated per method')} faces per row)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.14), ncol=1, frameon=False)
    fig.tight_layout()
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_sweep(sweep, path, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [s["lambda"] for s in sweep]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(lam, [s["fid"] for s in sweep], "o-")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("rank temperature lambda")
    ax[0].set_ylabel("FID (lower is better)")
    ax[1].plot(lam, [s["precision"] for s in sweep], "o-", label="precision")
    ax[1].plot(lam, [s["recall"] for s in sweep], "s-", label="recall")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("rank temperature lambda")
    ax[1].legend()
    fig.suptitle(f"LR-GMM-NN quality/diversity trade-off ({name}, {sweep[0]['n']} faces per lambda)")
    fig.tight_layout()
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
