"""`python -m faceprint.bench scale`: fit time, memory, model size, synthesis speed and
log-likelihood of the generator from 32 to 28,000 photos, exact EM against the scale path.

Data (latents from the cache; the first run encodes the photos): celeba-10k (10,000 photos),
then utkface (9,780), then celeba-10k mirrored (the flipped latent of each celeba photo stands
for the encoding of its mirror image), in that order; a row with N photos takes the first N.
Each (N, EM) row runs in a fresh process, so its peak memory (max RSS) is its own.

Columns: fit time split into projector, mixture (k-means + EM) and copy-guard statistics; the
peak RSS of the process (the latents of all N photos are in memory: they count); the model
file's size; per-face time of low-rank sampling + refinement (batch of 250) with the copy guard
off and on; mean log-likelihood per dimension of the training photos and of 1,000 held-out
celeba photos (files 9,001-10,000, never in a training set below N = 9,001) under the fitted
mixture, in the mixture's whitened space. The exponent is the least-squares slope of log fit
time against log N over the rows of one EM setting.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .machine import describe, print_table

SIZES = (32, 128, 1024, 4096, 10000, 28000)
HELD_FIRST, HELD_LAST = 9001, 10000


def add_arguments(p) -> None:
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated N (default %(default)s)")
    p.add_argument("--exact-max", type=int, default=10000, help="run the exact EM up to this N (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faces", type=int, default=1000, help="faces drawn for the synthesis timing (default 1000)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for scale.json and scale.md")
    p.add_argument("--resume", action="store_true", help="keep rows an earlier run finished (OUT/partial-scale/)")
    p.add_argument("--one", default=None, help=_suppress())
    p.add_argument("--weights", type=Path, default=None)


def _suppress():
    import argparse

    return argparse.SUPPRESS


def _shared() -> Path:
    from ..cli.main import _default_demo_data

    celeba = _default_demo_data()
    if celeba is None:
        raise SystemExit("no data: ../shared/datasets/celeba-10k/images not found beside the repository")
    return celeba.parent.parent


def load_pool(weights=None, n: int | None = None):
    """The latents of the scale protocol, in order (the first ``n`` at least, all by default),
    and the held-out latents: ((M, c, h, w), (H, c, h, w))."""
    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder

    ds = _shared()
    ae = TAEF2.load(weights)
    cache = LatentCache()
    celeba = encode_folder(FaceFolder(ds / "celeba-10k" / "images", size=128), ae, cache=cache)
    names = [int(Path(r).stem) for r in celeba.relpaths]
    held = torch.tensor([i for i, k in enumerate(names) if HELD_FIRST <= k <= HELD_LAST])
    if n is not None and n <= celeba.latents.shape[0]:
        return celeba.latents, celeba.latents[held]
    utk = encode_folder(FaceFolder(ds / "utkface" / "images", size=128), ae, cache=cache)
    pool = torch.cat([celeba.latents, utk.latents, celeba.latents.flip(-1)])
    return pool, celeba.latents[held]


def _one(spec: str, args) -> dict:
    """Fit one (N, em) row in this process and return its measurements."""
    import resource

    from ..latent.generator import Generator, GeneratorConfig

    n_text, em = spec.split(":")
    N = int(n_text)
    pool, held = load_pool(args.weights, N)
    if N > pool.shape[0]:
        raise SystemExit(f"N = {N} is more than the {pool.shape[0]} latents the shared data gives")

    class _Set:
        latents = pool[:N].contiguous()
        relpaths = [str(i) for i in range(N)]

    del pool
    gen = Generator(GeneratorConfig(em=em))
    t0 = time.perf_counter()
    gen.fit(_Set, seed=args.seed)
    t_fit = time.perf_counter() - t0
    fs = gen.provenance_["fit_seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        gen.save(path)
        size = path.stat().st_size
    d0 = gen.mixture_.n_features

    def loglik(lat):
        Y = gen.projector_.transform(lat.float()).reshape(lat.shape[0], -1)
        return float(gen.mixture_.log_prob(Y.float()).mean()) / d0

    ll_train = loglik(_Set.latents[: min(N, 4096)])
    ll_held = loglik(held) if N < HELD_FIRST else None
    B = 250
    times = {}
    from ..latent.generator import DEFAULT_GUARD

    for label, guard in (("guard off", None), ("guard on", DEFAULT_GUARD)):
        kw = {"guard": guard}
        gen.sample_latents(B, seed=args.seed, start=10**6, **kw)  # warm-up (caches)
        t = time.perf_counter()
        done = 0
        for s in range(0, args.faces, B):
            m = min(B, args.faces - s)
            smp = gen.sample_latents(m, seed=args.seed, start=s, **kw)
            done += m
        times[label] = (time.perf_counter() - t) / done * 1000
        redraws = int((smp.redraws > 0).sum()) if guard else 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"N": N, "em": em, "K": int(gen.mixture_.weights_.numel()), "fit_s": t_fit,
            "projector_s": fs["projector"], "mixture_s": fs["mixture"], "guard_s": fs.get("copy_guard"),
            "em_iterations": gen.mixture_.history_.n_iter, "peak_rss_bytes": peak, "model_bytes": size,
            "bank_bytes": gen.bank_.numel() * gen.bank_.element_size(),
            "ms_per_face_guard_off": times["guard off"], "ms_per_face_guard_on": times["guard on"],
            "redrawn_in_last_batch": redraws, "loglik_train_per_dim": ll_train, "loglik_heldout_per_dim": ll_held,
            "stored_rank": int(sum(e.numel() for e in gen.mixture_.eigvals_)),
            "threads": torch.get_num_threads()}


def run(args) -> int:
    if args.one:
        print(json.dumps(_one(args.one, args)))
        return 0
    sizes = [int(x) for x in args.sizes.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "partial-scale"
    partial.mkdir(exist_ok=True)
    info = describe({"seed": args.seed, "faces timed": args.faces,
                     "data": "celeba-10k, utkface, celeba-10k mirrored (latent flip), first N"})
    load_pool(args.weights, max(sizes))  # encode (or read the cache) once, outside the timed rows
    rows = []
    for N in sizes:
        for em in ("exact", "fast"):
            if em == "exact" and N > args.exact_max:
                continue
            done = partial / f"{N}-{em}-{args.seed}-{args.faces}.json"
            if args.resume and done.exists():
                rows.append(json.loads(done.read_text()))
                print(f"  N = {N} {em}: resumed", flush=True)
                continue
            cmd = [sys.executable, "-m", "faceprint.bench", "scale", "--one", f"{N}:{em}", "--seed", str(args.seed),
                   "--faces", str(args.faces)] + (["--weights", str(args.weights)] if args.weights else [])
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"row N = {N} {em} failed")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            from ..io import atomic_write_text

            atomic_write_text(done, json.dumps(row))
            rows.append(row)
            print(f"  N = {N} {em}: fit {row['fit_s']:.1f} s, {row['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"{row['ms_per_face_guard_on']:.2f} ms/face", flush=True)
    doc = {"machine": info, "rows": rows, "exponents": _exponents(rows)}
    from ..io import atomic_write_text

    atomic_write_text(args.out / "scale.json", json.dumps(doc, indent=1))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print("# bench scale\n")
        print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in info.items()])
        _table(rows, doc["exponents"])
    atomic_write_text(args.out / "scale.md", buf.getvalue())
    print(buf.getvalue())
    return 0


def _exponents(rows) -> dict:
    out = {}
    for em in ("exact", "fast"):
        pts = [(math.log(r["N"]), math.log(r["fit_s"])) for r in rows if r["em"] == em and r["N"] >= 1024]
        if len(pts) >= 2:
            mx = sum(p[0] for p in pts) / len(pts)
            my = sum(p[1] for p in pts) / len(pts)
            out[em] = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return out


def _table(rows, exps) -> None:
    header = ["N", "EM", "K", "fit s", "projector s", "mixture s", "guard stats s", "EM iters", "peak RSS GiB",
              "model MiB", "bank MiB", "ms/face guard off", "ms/face guard on", "loglik/dim train",
              "loglik/dim held-out"]
    body = []
    for r in rows:
        body.append([r["N"], r["em"], r["K"], f"{r['fit_s']:.2f}", f"{r['projector_s']:.2f}", f"{r['mixture_s']:.2f}",
                     f"{r['guard_s']:.2f}", r["em_iterations"], f"{r['peak_rss_bytes'] / 2**30:.2f}",
                     f"{r['model_bytes'] / 2**20:.1f}", f"{r['bank_bytes'] / 2**20:.1f}",
                     f"{r['ms_per_face_guard_off']:.2f}", f"{r['ms_per_face_guard_on']:.2f}",
                     f"{r['loglik_train_per_dim']:.4f}",
                     "-" if r["loglik_heldout_per_dim"] is None else f"{r['loglik_heldout_per_dim']:.4f}"])
    print_table("Fit and synthesis from 32 to 28,000 photos", header, body)
    print_table("Fitted exponent of fit time against N (N >= 1,024)", ["EM", "exponent"],
                [[k, f"{v:.2f}"] for k, v in exps.items()])
