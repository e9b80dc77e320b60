"""`python -m faceprint.bench core`: the core generator's speed and the PCA loss, in one table.

On the first N photos of celeba-10k (default 1,024; latents from the cache after the first
run): encode and decode time per image, the PCA reconstruction PSNR per q, the fit time of our
EM and of scikit-learn's GaussianMixture on the same data, settings and initialisation, and the
per-image time of low-rank sampling and NN refinement.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .machine import describe, print_table


def add_arguments(p) -> None:
    p.add_argument("--data", type=Path, default=None, help="photo folder (default ../shared/datasets/celeba-10k/images)")
    p.add_argument("--photos", type=int, default=1024, help="first N photos (default 1024)")
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--channels", type=int, default=32, help="q for the fit/sampling rows (default 32, the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1024, help="latents drawn for the sampling/refinement timing")
    p.add_argument("--decode-images", type=int, default=64, help="images for the encode/decode timing")
    p.add_argument("--sklearn-channels", type=int, default=16,
                   help="q of the scikit-learn comparison (default 16, d0 = 4096; at q = 32 it needs ~16 GB and ~30 min)")
    p.add_argument("--skip-sklearn", action="store_true", help="do not run scikit-learn (it takes minutes)")
    p.add_argument("--sklearn-max-iter", type=int, default=None,
                   help="cap scikit-learn's EM iterations (default: same as ours)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--weights", type=Path, default=None)


def _fit_rows(latents, q, K, seed, with_sklearn, sklearn_max_iter, rows) -> dict:
    """Fit P0, k-means and EM at one q; with_sklearn: also scikit-learn's EM from the same start."""
    import numpy as np

    from ..latent.mixture import GaussianMixture, MixtureConfig, kmeans
    from ..latent.projector import PCAProjector, ProjectorConfig
    from ..seeding import generator as make_generator

    N = latents.shape[0]
    t_proj, proj = _time(lambda: PCAProjector(ProjectorConfig(q)).fit(latents))
    X = proj.transform(latents).reshape(N, -1).double()
    d0 = X.shape[1]
    cfg = MixtureConfig(n_components=K)
    t_km, labels = _time(lambda: kmeans(X, K, generator=make_generator(seed, "kmeans")))
    t_em, gm = _time(lambda: GaussianMixture(cfg).fit(X, init_labels=labels))
    ours_total = t_proj + t_km + t_em
    rows.append(["faceprint (torch, member space)", q, d0, f"{t_proj:.3f}", f"{t_km:.3f}", f"{t_em:.3f}",
                 f"{ours_total:.2f}", gm.history_.n_iter, f"{gm.score(X):.2f}"])
    out = {"N": N, "d0": d0, "K": K, "q": q, "reg_covar": cfg.reg_covar, "tol": cfg.tol,
           "ours": {"projector_s": t_proj, "kmeans_s": t_km, "em_s": t_em, "total_s": ours_total,
                    "iterations": gm.history_.n_iter, "mean_loglik": gm.score(X)}}
    if not with_sklearn:
        return out
    from sklearn.mixture import GaussianMixture as SKGaussianMixture

    # scikit-learn's own k-means would start elsewhere; give it the same initial responsibilities
    # through the equivalent weights, means and precision matrices (not timed: set-up only).
    resp = torch.zeros(N, K, dtype=torch.float64)
    resp[torch.arange(N), labels] = 1
    nk = resp.sum(0) + 10 * torch.finfo(torch.float64).eps
    means = (resp.T @ X) / nk[:, None]
    precs = []
    for k in range(K):
        diff = X - means[k]
        cov = (resp[:, k] * diff.T) @ diff / nk[k] + cfg.reg_covar * torch.eye(d0, dtype=torch.float64)
        precs.append(torch.linalg.inv(cov).numpy())
    sk = SKGaussianMixture(K, covariance_type="full", reg_covar=cfg.reg_covar, tol=cfg.tol,
                           max_iter=sklearn_max_iter or cfg.max_iter, weights_init=(nk / N).numpy(),
                           means_init=means.numpy(), precisions_init=np.array(precs))
    del precs
    Xn = X.numpy()
    t_sk, _ = _time(lambda: sk.fit(Xn))
    sk_total = t_proj + t_km + t_sk
    rows.append(["scikit-learn GaussianMixture(full)", q, d0, f"{t_proj:.3f}", f"{t_km:.3f}", f"{t_sk:.3f}",
                 f"{sk_total:.2f}", sk.n_iter_, f"{sk.score(Xn):.2f}"])
    out["sklearn"] = {"em_s": t_sk, "total_s": sk_total, "iterations": int(sk.n_iter_), "mean_loglik": float(sk.score(Xn))}
    out["speedup_em"] = t_sk / t_em
    out["speedup_total"] = sk_total / ours_total
    return out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _time(fn, repeat: int = 1):
    best = math.inf
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run(args) -> int:
    from ..autoencoder import TAEF2
    from ..cli.main import _default_demo_data
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..latent.generator import Generator, GeneratorConfig
    from ..latent.lowrank import LowRankSampler
    from ..latent.projector import PCAProjector, ProjectorConfig

    data = args.data or _default_demo_data()
    if data is None:
        print("no data: pass --data FOLDER (default ../shared/datasets/celeba-10k/images)")
        return 2
    results: dict = {"machine": describe({"seed": args.seed, "photos": args.photos, "data": str(data)})}
    print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in results["machine"].items()])

    ae = TAEF2.load(args.weights)
    folder = FaceFolder(data, size=128, limit=args.photos)
    t_enc_total, latent_set = _time(lambda: encode_folder(folder, ae, cache=LatentCache(), progress=False))
    latents = latent_set.latents
    N = latents.shape[0]
    # the same folder with no cache: hashing, decoding the photos and encoding them (a fresh demo run)
    t_fresh, _ = _time(lambda: encode_folder(folder, ae, cache=False, progress=False))

    # ---------------------------------------------------------------- encode / decode speed
    n_img = min(args.decode_images, N)
    images, _kept, _skipped = FaceFolder(data, size=128, limit=n_img).load()
    rows = []
    enc_t, lat = _time(lambda: ae.encode(images), repeat=2)
    dec_t, rec = _time(lambda: ae.decode(lat), repeat=2)
    rows.append(["encode (default settings)", f"{n_img}", f"{enc_t / n_img * 1000:.1f}"])
    rows.append(["decode (default settings)", f"{n_img}", f"{dec_t / n_img * 1000:.1f}"])
    dec1 = _time(lambda: ae.decode(lat[:1]), repeat=3)[0]
    rows.append(["decode one image alone", "1", f"{dec1 * 1000:.1f}"])
    rows.append(["read + encode the folder, no cache", f"{N}", f"{t_fresh / N * 1000:.1f}"])
    rows.append(["read the folder's latents from the cache", f"{N}", f"{t_enc_total / N * 1000:.2f}"])
    results["autoencoder"] = {"encode_ms": enc_t / n_img * 1000, "fresh_folder_ms": t_fresh / N * 1000, "decode_ms": dec_t / n_img * 1000,
                              "decode_one_ms": dec1 * 1000, "roundtrip_psnr": _psnr(rec, images),
                              "config": str(getattr(ae, "config", ""))}
    print_table(f"Autoencoder speed (128 px, {getattr(ae, 'config', '')})", ["operation", "images", "ms / image"], rows)

    # ---------------------------------------------------------------- PCA loss per q
    rows = []
    results["pca"] = {}
    full_psnr = _psnr(rec, images)
    rows.append(["32 (no PCA, autoencoder round trip)", "1.0000", f"{full_psnr:.2f}", "-"])
    for q in (8, 16, 32):
        proj = PCAProjector(ProjectorConfig(q)).fit(latents)
        lat_q = proj.inverse(proj.transform(lat))
        rec_q = ae.decode(lat_q)
        ev = float(proj.explained_variance_ratio_[:q].sum())
        p_img, p_rec = _psnr(rec_q, images), _psnr(rec_q, rec)
        results["pca"][q] = {"explained_variance": ev, "psnr_vs_photo": p_img, "psnr_vs_roundtrip": p_rec}
        rows.append([str(q), f"{ev:.4f}", f"{p_img:.2f}", "lossless" if p_rec >= 100 else f"{p_rec:.2f}"])
    print_table(f"PCA projector P0: reconstruction of {n_img} photos (projector fitted on {N})",
                ["q", "explained variance", "PSNR vs photo (dB)", "PSNR vs AE round trip (dB)"], rows)

    # ---------------------------------------------------------------- fit: ours vs scikit-learn
    K = args.components
    rows = []
    results["fit"] = {}
    for q in sorted({args.sklearn_channels, args.channels}):
        with_sk = q == args.sklearn_channels and not args.skip_sklearn
        results["fit"][q] = _fit_rows(latents, q, K, args.seed, with_sk, args.sklearn_max_iter, rows)
    print_table(f"Fit: N = {N}, K = {K}, reg_covar = 1e-3, tol = 1e-3, both EMs from the same k-means "
                "initialisation", ["EM", "q", "d0", "P0 (s)", "k-means (s)", "EM (s)", "total (s)", "iterations",
                                   "mean log-lik"], rows)
    for q, r in results["fit"].items():
        if "speedup_em" in r:
            print(f"\nq = {q}: our EM is {r['speedup_em']:.0f}x faster than scikit-learn's (EM alone), "
                  f"{r['speedup_total']:.0f}x with P0 and k-means; same mean log-likelihood within "
                  f"{abs(r['ours']['mean_loglik'] - r['sklearn']['mean_loglik']):.2e}")
    q = args.channels

    # ---------------------------------------------------------------- sampling and refinement
    gen = Generator(GeneratorConfig(components=K, channels=q), autoencoder=ae)
    t_fit, _ = _time(lambda: gen.fit(latent_set, seed=args.seed))
    S = args.samples
    sampler = LowRankSampler(gen.mixture_, gen.config.rank_temperature)
    t_samp, (z, comps) = _time(lambda: sampler.draw(S, args.seed), repeat=2)
    refiner = gen._refiner()
    zq = z.reshape(S, q, *latents.shape[2:])
    t_ref, (_r, prov) = _time(lambda: refiner.refine(zq, comps), repeat=2)
    t_one = _time(lambda: refiner.refine(zq[:1], comps[:1]), repeat=5)[0]
    t_gen, (imgs, _s) = _time(lambda: gen.generate(64, seed=args.seed))
    rows = [
        ["Generator.fit (P0 + k-means + EM + bank)", "-", f"{t_fit:.2f} s"],
        ["low-rank sampling", S, f"{t_samp / S * 1000:.3f} ms"],
        ["NN refinement (rho = 2, one iteration)", S, f"{t_ref / S * 1000:.3f} ms"],
        ["sampling + refinement", S, f"{(t_samp + t_ref) / S * 1000:.3f} ms"],
        ["NN refinement of one latent alone", 1, f"{t_one * 1000:.2f} ms"],
        ["generate 64 faces end to end (incl. decode)", 64, f"{t_gen / 64 * 1000:.1f} ms"],
    ]
    results["generation"] = {"fit_s": t_fit, "sampling_ms": t_samp / S * 1000, "refine_ms": t_ref / S * 1000,
                             "refine_one_ms": t_one * 1000, "generate_ms": t_gen / 64 * 1000,
                             "ranks": sampler.ranks, "weights": gen.mixture_.weights_.tolist()}
    print_table(f"Generation (K = {K}, q = {q}, lambda = {gen.config.rank_temperature}, d_k = {sampler.ranks})",
                ["step", "latents", "time per latent"], rows)
    if args.json:
        from ..io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1, default=str))
    return 0
