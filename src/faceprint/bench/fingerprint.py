"""`python -m faceprint.bench fingerprint`: the fingerprint mechanisms side by side.

Protocol ("celeba-1k", ../shared/datasets/README.md): one generator fitted on the first 1,024
photos of celeba-10k; generated faces at 128 px with a fixed seed. For each mechanism:

- modulated (papers/004, Ch. 6): ``--codes`` instances of that generator with random 128-bit
  codes (folded decoder weights, :func:`faceprint.fingerprint.modulated.fingerprint_generator`),
  ``--images`` faces split among them;
- datalevel-bank (papers/004, Ch. 5): the training latents fingerprinted with one code
  (:mod:`faceprint.fingerprint.datalevel`), a generator fitted on them with the unchanged
  protocol, ``--images`` faces; decoded by TAEF2 encoding and the STDM lattices. The refitted
  model draws other faces for a seed than the plain model, so its PSNR compares each face with
  its "clean twin": the same generated latent with every pixel taken from the clean latent of
  the photo it was copied from (the provenance map).

Every face is rounded to 8 bits (as saved), then decoded clean and after each attack of the
shared harness (:mod:`faceprint.fingerprint.attacks`): JPEG 50, Gaussian blur kernel 5, noise
sigma 0.05, centre crop keeping 86 % (resized back), resize down to 50 % and back, and one
TAEF2 encode/decode round trip (regeneration). Reported: mean bit accuracy against the
instance's code, PSNR between fingerprinted and unfingerprinted faces (same seed; clean twin for data-level), decode
time per image; controls: the faces of an instance read against another code, unfingerprinted
faces read against the code (both ~0.5 when the bits are not leaking). ``--fid N`` adds FID of
N faces of the unfingerprinted model, one instance, and the data-level model, against the
reference set (the last 5,000 photos).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .machine import describe, print_table

#: (column, attack name in faceprint.fingerprint.attacks.ATTACKS, strength)
ATTACK_COLUMNS = (
    ("clean", None, None),
    ("JPEG 50", "jpeg", 50),
    ("blur k5", "gaussian_blur", 5),
    ("noise 0.05", "gaussian_noise", 0.05),
    ("crop 86%", "crop_resize", 0.86),
    ("resize 0.5", "resize_down_up", 0.5),
    ("TAEF2 round trip", "autoencoder_roundtrip", 1),
)


def add_arguments(p) -> None:
    p.add_argument("--data", type=Path, default=None, help="photo folder (default ../shared/datasets/celeba-10k/images)")
    p.add_argument("--photos", type=int, default=1024, help="generator training set: the first N photos (default 1024)")
    p.add_argument("--images", type=int, default=64, help="generated faces per mechanism (default 64)")
    p.add_argument("--codes", type=int, default=4, help="modulated instances (codes) the faces are split among")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mechanisms", default="modulated,datalevel", help="comma-separated: modulated, datalevel")
    p.add_argument("--fp-weights", type=Path, default=None, help="modulated fingerprint weights folder (default: shipped)")
    p.add_argument("--bank-step", type=float, default=None, help="data-level STDM step (default: the config's, 9)")
    p.add_argument("--fid", type=int, default=0, help="also FID of this many faces per model (0: skip; e.g. 2000)")
    p.add_argument("--fid-real", type=int, default=5000, help="reference photos for FID: the last N (default 5000)")
    p.add_argument("--crop-search", type=float, default=None, metavar="MIN_FRACTION",
                   help="also measure the data-level crop-search decoder down to this kept fraction (e.g. 0.75)")
    p.add_argument("--crop-search-images", type=int, default=32, help="faces for the crop-search table (default 32)")
    p.add_argument("--crop-search-negatives", type=int, default=200,
                   help="real photos (after the training set) decoded both ways against 1,024 random codes (default 200)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--png", type=Path, default=None, help="write a grid of the first 6 faces here: unfingerprinted, "
                   "modulated, its difference x 10, the data-level clean twins, data-level, its difference x 10")
    p.add_argument("--weights", type=Path, default=None, help="TAEF2 weights folder")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _q8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def _attack(images: torch.Tensor, name, strength, seed: int, autoencoder) -> torch.Tensor:
    if name is None:
        return images
    from ..fingerprint import attacks  # the shared harness (faceprint.fingerprint.attacks)
    from ..seeding import generator as make_generator

    if name == "autoencoder_roundtrip":
        return attacks.autoencoder_roundtrip(images, int(strength), autoencoder=autoencoder)
    spec = attacks.ATTACKS[name]
    g = make_generator(seed, "bench-fingerprint", name, repr(strength)) if spec.random else None
    return spec.apply(images, strength, generator=g)


def _accuracy_row(images, codes, decode, seed, autoencoder) -> tuple[list[float], float]:
    """Mean bit accuracy per attack column, and decode ms/image (clean)."""
    accs = []
    ms = 0.0
    for col, name, strength in ATTACK_COLUMNS:
        x = _attack(images, name, strength, seed, autoencoder)
        t = time.perf_counter()
        p = decode(x)
        if name is None:
            ms = (time.perf_counter() - t) / images.shape[0] * 1000
        accs.append(float(((p > 0.5).float() == codes).float().mean()))
    return accs, ms


def run(args) -> int:
    from ..autoencoder import TAEF2
    from ..cli.main import _default_demo_data
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..latent.generator import Generator, GeneratorConfig

    data = args.data or _default_demo_data()
    if data is None:
        print("no data: pass --data FOLDER (default ../shared/datasets/celeba-10k/images)")
        return 2
    mechanisms = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    bad = [m for m in mechanisms if m not in ("modulated", "datalevel")]
    if bad:
        print(f"unknown mechanism(s) {bad}; choose among modulated, datalevel")
        return 2
    results: dict = {"machine": describe({"seed": args.seed, "photos": args.photos, "images": args.images,
                                          "codes": args.codes, "data": str(data)})}
    print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in results["machine"].items()])

    ae = TAEF2.load(args.weights)
    t0 = time.perf_counter()
    train_set = encode_folder(FaceFolder(data, size=128, limit=args.photos), ae, cache=LatentCache())
    gen = Generator(GeneratorConfig(), autoencoder=ae).fit(train_set, seed=args.seed)
    n = args.images
    plain, _ = gen.generate(n, seed=args.seed)
    plain = _q8(plain)
    results["setup_seconds"] = time.perf_counter() - t0
    rows, controls, fid_models = [], [], {"unfingerprinted": gen}
    grid = {"unfingerprinted": (plain[:6], None)}

    if "modulated" in mechanisms:
        from ..fingerprint.modulated import ModulatedFingerprinter, fingerprint_generator, random_code

        fp = ModulatedFingerprinter.load(args.fp_weights, autoencoder=ae)
        k = max(1, min(args.codes, n))
        per = [n // k + (1 if i < n % k else 0) for i in range(k)]
        imgs, codes, t_fold = [], [], 0.0
        first = None
        for i in range(k):
            code = random_code(args.seed * 1000 + i)
            t = time.perf_counter()
            inst = fingerprint_generator(gen, code, {"instance": f"bench-{i}"}, fingerprinter=fp)
            t_fold += time.perf_counter() - t
            start = sum(per[:i])
            x, _ = inst.generate(per[i], seed=args.seed, start=start)
            imgs.append(_q8(x))
            codes.append(code.expand(per[i], -1))
            first = first or inst
        imgs, codes = torch.cat(imgs), torch.cat(codes)
        if fp.extractor is None:  # owner-side detection, with the fitted model as the reference
            def mdec(images):
                return fp.decode_bits(images, reference=gen)
        else:
            mdec = fp.decode_bits
        accs, ms = _accuracy_row(imgs, codes, mdec, args.seed, ae)
        p = _psnr(imgs, plain)
        label = "modulated (Ch. 6)" + (", owner-side detector" if fp.extractor is None else ", blind extractor")
        rows.append([label, *[f"{a:.4f}" for a in accs], f"{p:.2f}", f"{ms:.2f}"])
        other = torch.stack([random_code(args.seed * 1000 + 999)] * n)
        wrong = float(((mdec(imgs) > 0.5).float() == other).float().mean())
        unf = float(((mdec(plain) > 0.5).float() == codes).float().mean())
        controls.append(["modulated", f"{wrong:.4f}", f"{unf:.4f}", f"{t_fold / k * 1000:.1f} ms to fold an instance"])
        results["modulated"] = {"bit_accuracy": dict(zip([c[0] for c in ATTACK_COLUMNS], accs)), "psnr_db": p,
                                "decode_ms_per_image": ms, "other_code_accuracy": wrong,
                                "unfingerprinted_accuracy": unf, "fold_ms": t_fold / k * 1000, "codes": k,
                                "weights": fp.weights_id(), "training": fp.meta}
        grid["modulated"] = (imgs[:6], plain[:6])
        fid_models["modulated instance"] = first

    if "datalevel" in mechanisms:
        import dataclasses

        from ..fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter, fingerprint_latent_set
        from ..fingerprint.modulated import random_code

        cfg = BankFingerprintConfig()
        if args.bank_step is not None:
            cfg = dataclasses.replace(cfg, step=args.bank_step)
        t = time.perf_counter()
        bank_fp = BankFingerprinter(cfg).fit(train_set.latents, ae)
        t_key = time.perf_counter() - t
        code = random_code(args.seed * 1000 + 500)
        t = time.perf_counter()
        fgen = Generator(GeneratorConfig(), autoencoder=ae).fit(fingerprint_latent_set(train_set, bank_fp, code),
                                                                seed=args.seed)
        fgen.fingerprint_ = bank_fp.info(code)
        t_fit = time.perf_counter() - t
        smp_plain = gen.sample_latents(n, seed=args.seed)
        x, smp = fgen.generate(n, seed=args.seed)
        x = _q8(x)
        same_prov = float((smp.provenance == smp_plain.provenance).float().mean())
        # the transfer at the latent level: bits read straight from the generated latents
        # The refitted model draws other faces for the same seed (its mixture was fitted on other
        # numbers), so its fidelity is measured face by face: the same generated latent with every
        # pixel taken from the *clean* latent of the photo it was copied from.
        from ..latent.refine import gather

        clean_twin = _q8(ae.decode(gather(train_set.latents.to(fgen.bank_.dtype), smp.provenance).float()))
        lat_p = bank_fp.bits_from_latents(smp.latents)
        lat_acc = float(((lat_p > 0.5).float() == code).float().mean())

        def dec(images):
            return bank_fp.decode_bits(images, ae)

        codes = code.expand(n, -1)
        accs, ms = _accuracy_row(x, codes, dec, args.seed, ae)
        p = _psnr(x, clean_twin)
        rows.append(["data-level bank (Ch. 5)", *[f"{a:.4f}" for a in accs], f"{p:.2f}", f"{ms:.2f}"])
        other = random_code(args.seed * 1000 + 999).expand(n, -1)
        wrong = float(((dec(x) > 0.5).float() == other).float().mean())
        unf = float(((dec(clean_twin) > 0.5).float() == codes).float().mean())
        controls.append(["data-level bank", f"{wrong:.4f}", f"{unf:.4f}",
                         f"refit {t_fit:.1f} s per code (key {t_key:.1f} s); bits in the generated latents "
                         f"{lat_acc:.4f}; same provenance as the plain model {same_prov:.3f}"])
        results["datalevel"] = {"bit_accuracy": dict(zip([c[0] for c in ATTACK_COLUMNS], accs)), "psnr_db": p,
                                "decode_ms_per_image": ms, "other_code_accuracy": wrong, "unfingerprinted_accuracy": unf,
                                "refit_seconds": t_fit, "latent_bit_accuracy": lat_acc,
                                "same_provenance_share": same_prov, "channels": [int(c) for c in bank_fp.channels_],
                                "config": dataclasses.asdict(cfg)}
        # the same embedding applied to the bank of the already fitted plain model (no refit)
        from ..fingerprint.datalevel import fingerprint_bank_instance

        code2 = random_code(args.seed * 1000 + 501)
        t = time.perf_counter()
        binst = fingerprint_bank_instance(gen, bank_fp, code2, {"instance": "bench"})
        t_inst = time.perf_counter() - t
        x2, smp2 = binst.generate(n, seed=args.seed)
        x2 = _q8(x2)
        twin2 = _q8(ae.decode(gather(train_set.latents.to(gen.bank_.dtype), smp2.provenance).float()))
        same2 = float((smp2.provenance == smp_plain.provenance).float().mean())
        codes2 = code2.expand(n, -1)
        accs2, ms2 = _accuracy_row(x2, codes2, dec, args.seed, ae)
        p2 = _psnr(x2, twin2)
        rows.append(["data-level, bank of the fitted model", *[f"{a:.4f}" for a in accs2], f"{p2:.2f}", f"{ms2:.2f}"])
        controls.append(["data-level, bank of the fitted model", f"{float(((dec(x2) > 0.5).float() == other).float().mean()):.4f}",
                         f"{float(((dec(twin2) > 0.5).float() == codes2).float().mean()):.4f}",
                         f"{t_inst * 1000:.0f} ms per instance (no refit); same provenance as the plain model {same2:.3f}; "
                         f"PSNR vs the plain model's face of the same seed {_psnr(x2, plain):.2f} dB"])
        results["datalevel_bank_instance"] = {"bit_accuracy": dict(zip([c[0] for c in ATTACK_COLUMNS], accs2)),
                                              "psnr_db": p2, "psnr_vs_plain_same_seed": _psnr(x2, plain),
                                              "instance_ms": t_inst * 1000, "same_provenance_share": same2}
        if args.crop_search:
            results["crop_search"] = _crop_search(args, data, bank_fp, x2[: args.crop_search_images], code2, ae)
        grid["data-level clean twin"] = (clean_twin[:6], None)
        grid["data-level"] = (x[:6], clean_twin[:6])
        fid_models["data-level model"] = fgen

    header = ["mechanism", *[c[0] for c in ATTACK_COLUMNS], "PSNR vs plain (dB)", "decode ms/img"]
    print_table(f"Bit accuracy of {n} generated faces (128 bits, 8-bit images, attacks from "
                "faceprint.fingerprint.attacks)", header, rows)
    print_table("Controls (expected ~0.5)", ["mechanism", "faces vs another code", "unfingerprinted faces vs code",
                                             "cost"], controls)

    if args.fid > 0:
        import numpy as np

        from ..metrics import InceptionFeatures, fid

        inc = InceptionFeatures.load()
        ff = FaceFolder(data, size=128)
        ref_folder = FaceFolder(data, size=128)
        ref_folder.relpaths = ff.relpaths[-args.fid_real:]
        ref_folder.paths = ff.paths[-args.fid_real:]
        real, _kept, _skipped = ref_folder.load()
        real_feat = np.concatenate([inc.features(real[s:s + 250]) for s in range(0, len(real), 250)])
        fid_rows = []
        results["fid"] = {}
        for name, model in fid_models.items():
            feats = []
            for s in range(0, args.fid, 250):
                m = min(250, args.fid - s)
                im, _ = model.generate(m, seed=args.seed + 1, start=s)
                feats.append(inc.features(_q8(im)))
            v = float(fid(np.concatenate(feats), real_feat))
            results["fid"][name] = v
            fid_rows.append([name, f"{v:.2f}"])
        base = results["fid"]["unfingerprinted"]
        for r in fid_rows:
            r.append(f"{float(r[1]) - base:+.2f}")
        print_table(f"FID of {args.fid} faces vs the last {len(real)} photos", ["model", "FID", "vs unfingerprinted"],
                    fid_rows)

    if args.png is not None:
        _save_grid(grid, args.png)
        print(f"\nwrote {args.png}")
    if args.json:
        from ..io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1, default=str))
    return 0


def _crop_search(args, data, key, faces, code, ae) -> dict:
    """Aligned vs crop-search read-out of the data-level fingerprint under centre crops, and the
    matching bits of real photos against 1,024 random codes read both ways."""
    from ..data import FaceFolder
    from ..fingerprint import attacks
    from ..fingerprint.owner import CALIBRATION_CODES
    from ..fingerprint.registry import random_code
    from ..seeding import generator as make_generator

    lo = args.crop_search
    cols = [("clean", None, None), *[(f"crop {f:g}", "crop_resize", f) for f in (0.95, 0.9, 0.86, 0.8, 0.75) if f >= lo],
            ("JPEG 50", "jpeg", 50), ("blur k5", "gaussian_blur", 5)]
    n = faces.shape[0]
    rows, out = [], {"min_fraction": lo, "faces": n, "rows": []}
    for col, name, strength in cols:
        x = faces if name is None else _q8(attacks.ATTACKS[name].apply(faces, strength, generator=None))
        a = float(((key.decode_bits(x, ae) > 0.5).float() == code).float().mean())
        t = time.perf_counter()
        p, size, score = key.decode_bits_searched(x, ae, min_fraction=lo)
        ms = (time.perf_counter() - t) / n * 1000
        b = float(((p > 0.5).float() == code).float().mean())
        want = 128 if strength is None or name != "crop_resize" else round(strength * 128)
        right = float((size == want).float().mean())
        rows.append([col, f"{a:.4f}", f"{b:.4f}", f"{right:.2f} (at {want} px)", f"{float(score.mean()):.3f}", f"{ms:.0f}"])
        out["rows"].append({"attack": col, "aligned": a, "searched": b, "right_size_share": right,
                            "score": float(score.mean()), "ms_per_image": ms})
    print_table(f"Crop search decoder (data-level bank instance, {n} faces; candidate crop sizes "
                f"{round(lo * 128)}-128 px)", ["attack", "aligned read-out", "crop search", "size found",
                                               "alignment score", "search ms/img"], rows)
    m = args.crop_search_negatives
    if m > 0:
        ff = FaceFolder(data, size=128)
        ff.relpaths, ff.paths = ff.relpaths[args.photos:args.photos + m], ff.paths[args.photos:args.photos + m]
        real, _kept, _skipped = ff.load()
        g = make_generator(args.seed, "fingerprint-calibration-codes")
        codes = torch.stack([random_code(generator=g) for _ in range(CALIBRATION_CODES)]).float()
        neg_rows = []
        for label, bits in (("aligned", key.decode_bits(real, ae) > 0.5),
                            ("crop search", key.decode_bits_searched(real, ae, min_fraction=lo)[0] > 0.5)):
            b = bits.float()
            match = b @ codes.T + (1 - b) @ (1 - codes.T)  # (m, codes) matching bits
            best = match.max(1).values
            neg_rows.append([label, len(real), f"{float(match.mean()):.2f}", f"{float(match.std()):.2f}",
                             f"{float(best.mean()):.1f}", f"{int(best.max())}"])
            out[f"negatives_{label.replace(' ', '_')}"] = {"n": len(real), "mean": float(match.mean()),
                                                           "std": float(match.std()), "best_mean": float(best.mean()),
                                                           "best_max": int(best.max())}
        print_table(f"Real photos (held out) against {CALIBRATION_CODES} random codes: matching bits of 128 "
                    "(Binomial(128, 1/2): mean 64, std 5.66)",
                    ["read-out", "photos", "mean", "std", "best code (mean)", "best code (max)"], neg_rows)
    return out


def _save_grid(grid: dict, path: Path) -> None:
    """Rows of 6 faces: each entry of ``grid`` (name -> (faces, reference or None)); an entry with
    a reference is followed by its difference to it, x 10 around grey."""
    import numpy as np
    from PIL import Image

    from ..io import atomic_path

    rows = []
    for _name, (x, ref) in grid.items():
        rows.append(x)
        if ref is not None:
            rows.append((0.5 + 10 * (x - ref)).clamp(0, 1))
    strip = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, 6*W)
    arr = (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
