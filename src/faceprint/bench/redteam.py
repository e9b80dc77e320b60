"""Red team: play the recipient against faceprint's fingerprints (issue 20).

``python -m faceprint.bench redteam --out OUT`` fits one base model on celeba-10k photos,
issues a registry of keyed instances (faceprint.fingerprint.keyed) and an instance of the
earlier shared-key mechanism (datalevel-bank), then attacks them as a recipient holding one or
several instance files would:

- key recovery from one instance (the lattice-concentration attack of issue 20, and a
  regression estimate of the pattern in the public carrier directions) and from c = 2..4
  colluders (their banks' differences);
- removal: noise in the carrier directions, the carriers replaced by their prediction from the
  other latent directions, projection on the released mixture's member subspaces, a model
  refitted on the instance's own faces, the decoder's weights perturbed, and image edits;
- collusion: averages, per-row and per-pixel mixes of 2, 3, 4 colluders' banks, averaged faces;
- framing: faces of up to 4 colluders scored against recipients not among them.

Each removal row gives the share of faces whose right recipient is still accused at the
calibrated threshold, the PSNR of the attacked faces to the unattacked ones (same seeds and
provenance), and FID of the attacked model's faces against celeba-10k 005001-010000 (``--fid-n``
faces per row; the issue's protocol is 5,000). Results: OUT/redteam.{md,json}.

Resumable: every FID and every chunk of real-photo scores (the long parts) is kept in
OUT/partial-redteam/ as it finishes, with the settings it ran with; ``--resume`` reuses them
(everything else is recomputed: it is deterministic given the seed), ``--minutes M`` stops before
a new FID or chunk once M minutes have passed (rerun with --resume to go on).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..seeding import generator as make_generator
from .machine import describe

CODES = 16  # registered recipients


def add_arguments(p) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for redteam.md / redteam.json")
    p.add_argument("--datasets", type=Path, default=None, help="default ../shared/datasets")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--train", type=int, default=1024, help="celeba-10k photos of the base model")
    p.add_argument("--faces", type=int, default=96, help="faces per attacked row for detection")
    p.add_argument("--fid-n", type=int, default=500, help="faces per row for FID (0: skip FID)")
    p.add_argument("--framing-faces", type=int, default=640, help="colluders' faces scored against innocents")
    p.add_argument("--target-fpr", type=float, default=1e-5, help="per-image false-accusation target (default 1e-5, "
                   "the verifier's default)")
    p.add_argument("--lax-fpr", type=float, default=1e-3, help="a second, laxer target reported beside it (default 1e-3)")
    p.add_argument("--negatives", type=int, default=10000,
                   help="real photos scored against the registry for false accusations (celeba-10k after the "
                        "training photos, then celeba-id; from the latent cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--resume", action="store_true", help="reuse the FIDs and negative chunks an earlier run with "
                   "these settings kept in OUT/partial-redteam")
    p.add_argument("--minutes", type=float, default=None, help="stop before a new FID or chunk after this many minutes")


class _OutOfTime(Exception):
    pass


class _Memo:
    """JSON results of the long steps, kept in a folder with the settings they were made with."""

    def __init__(self, folder: Path, settings: dict, *, resume: bool, deadline: float | None):
        import shutil

        from ..io import atomic_write_text

        self.folder, self.deadline = folder, deadline
        sig = folder / "settings.json"
        same = resume and sig.is_file() and json.loads(sig.read_text()) == json.loads(json.dumps(settings))
        if resume and sig.is_file() and not same:
            raise SystemExit(f"--resume: {folder} holds a run with other settings; rerun with them or without --resume")
        if not same and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sig, json.dumps(settings) + "\n")
        self.reused = 0

    def get(self, key: str, make):
        import hashlib

        from ..io import atomic_write_text

        f = self.folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        if f.is_file():
            self.reused += 1
            return json.loads(f.read_text())["value"]
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise _OutOfTime(key)
        v = make()
        atomic_write_text(f, json.dumps({"key": key, "value": v}) + "\n")
        return v


def _say(msg):
    print(msg, file=sys.stderr, flush=True)


def _q8(x):
    return (x.clamp(0, 1) * 255).round() / 255


def _psnr(a, b):
    mse = ((a - b) ** 2).mean((1, 2, 3)).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def _table(title, header, rows, md):
    md.append(f"\n### {title}\n")
    md.append("| " + " | ".join(header) + " |")
    md.append("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        md.append("| " + " | ".join(str(v) for v in r) + " |")
    print("\n".join(md[-(len(rows) + 3):]), flush=True)


def lattice_concentration(bank: torch.Tensor, channels: torch.Tensor, scale: torch.Tensor, step: float):
    """Issue 20's key-recovery attack on the shared-key mechanism: for each latent pixel, the
    projections of the bank's rows on each of the 2^(m-1) +-1/sqrt(m) spreading vectors (up to
    sign) of the ``channels`` (in units of ``scale``), and how tightly they sit on a lattice of
    period step/2 (|mean phasor|, 1 = all on it, about 1/sqrt(N) for none). Returns (best, runner-up,
    best vector index) per pixel."""
    m = len(channels)
    w = bank[:, channels].float() / scale.view(1, -1, 1, 1)  # (N, m, h, w)
    import itertools

    vecs = [torch.tensor((1.0,) + s) for s in itertools.product((1.0, -1.0), repeat=m - 1)]
    V = torch.stack(vecs) / math.sqrt(m)  # (2^(m-1), m)
    t = torch.einsum("vm,nmhw->vnhw", V, w)
    ph = torch.exp(2j * math.pi * t / (step / 2))
    conc = ph.mean(1).abs()  # (V, h, w)
    top = conc.topk(2, dim=0)
    return top.values[0], top.values[1], top.indices[0], V


def run(args) -> int:
    from .taming import DATA

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    ds = args.datasets or DATA
    args.out.mkdir(parents=True, exist_ok=True)
    memo = _Memo(args.out / "partial-redteam",
                 {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("handler", "out", "resume", "minutes", "datasets", "weights")},
                 resume=getattr(args, "resume", False),
                 deadline=None if getattr(args, "minutes", None) is None else t_start + 60 * args.minutes)
    try:
        return _run(args, memo, t_start, ds)
    except _OutOfTime as e:
        _say(f"--minutes {args.minutes:g} used up before {e}; the finished steps are kept: rerun with --resume")
        return 0


def _run(args, memo, t_start, ds) -> int:
    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..data.folder import load_image
    from ..fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter, fingerprint_bank_instance
    from ..fingerprint.keyed import (BaseIndex, OwnerSecret, fingerprint_keyed_instance, normal_tail,
                                     pattern_rows, project_on_mixture, threshold_for)
    from ..fingerprint.registry import code_to_hex, random_code
    from ..latent.generator import Generator, GeneratorConfig
    from ..latent.refine import gather

    ae = TAEF2.load(args.weights)
    md: list[str] = []
    doc: dict = {"seed": args.seed}
    settings = {"seed": args.seed, "train photos": f"celeba-10k 1-{args.train}", "registered recipients": CODES,
                "faces per row": args.faces, "FID": f"{args.fid_n} faces per row vs celeba-10k 005001-010000"
                if args.fid_n else "skipped", "target false-accusation rate per image": args.target_fpr,
                "laxer target reported beside it": args.lax_fpr}
    info = describe(settings)
    doc["machine"] = info

    # ------------------------------------------------------------------ base model and instances
    t0 = time.perf_counter()
    ts = encode_folder(FaceFolder(ds / "celeba-10k" / "images", size=128, limit=args.train), ae, cache=LatentCache())
    base = Generator(GeneratorConfig(), autoencoder=ae).fit(ts, seed=args.seed)
    del ts
    secret = OwnerSecret().fit(base.bank_.float(), ae, seed=args.seed,
                               master=bytes(make_generator(args.seed, "redteam-master").initial_seed().to_bytes(8, "little") * 4))
    g = make_generator(args.seed, "redteam-codes")
    codes = [code_to_hex(random_code(generator=g)) for _ in range(CODES)]
    inst = [fingerprint_keyed_instance(base, secret, c) for c in codes[:5]]  # 0-3 colluders, 4 a single leaker
    index = BaseIndex(base.bank_, base.autoencoder, secret)
    thr = threshold_for(args.target_fpr, CODES)
    lax = threshold_for(args.lax_fpr, CODES)
    _say(f"base model, secret and instances ready ({time.perf_counter() - t0:.0f} s); threshold T >= {thr:.2f} "
         f"(Sidak over {CODES} recipients at {args.target_fpr:g} per image; at {args.lax_fpr:g}: {lax:.2f})")
    doc["threshold"] = thr
    doc["lax_threshold"] = lax
    doc["sigma"] = secret.config.sigma
    nF = args.faces
    seed_faces = args.seed + 11

    def faces_of(gen, n=nF, seed=seed_faces, bank=None):
        smp = gen.sample_latents(n, seed=seed, guard=None)
        z = smp.latents.float() if bank is None else gather(bank, smp.provenance).float()
        return _q8(ae.decode(z)), smp.provenance

    last: dict = {}

    def scores(x):
        r = index.residuals(x, batch=args.batch)
        last["edit"] = r.edit
        return r.scores(secret, codes)

    inception = None
    ref_feat = None
    if args.fid_n:
        from ..metrics import InceptionFeatures
        from .taming import _reference_features

        inception = InceptionFeatures.load()
        ref_feat = _reference_features(ds, inception, 5000, args.batch)

    def fid_of(make_faces, key: str) -> float | None:
        """FID of --fid-n faces from make_faces(n, seed) -> images (kept under ``key`` for --resume)."""
        if not args.fid_n:
            return None
        from ..metrics import fid

        def make():
            feats = []
            for s in range(0, args.fid_n, 250):
                feats.append(inception.features(make_faces(min(250, args.fid_n - s), args.seed + 500 + s)))
            return float(fid(np.concatenate(feats), ref_feat))
        return memo.get("fid: " + key, make)

    # ------------------------------------------------------------------ key recovery
    kr_rows = []
    # (a) the shared-key mechanism: one instance, the lattice attack
    old = BankFingerprinter(BankFingerprintConfig(key_seed=args.seed)).fit(base.bank_.float(), ae)
    old_inst = fingerprint_bank_instance(base, old, random_code(generator=g))
    # the attacker picks the 4 most round-trip-stable channels himself (a property of TAEF2)
    z = base.bank_[:48].float()
    rt = (ae.encode(ae.decode(z)) - z).std(dim=(0, 2, 3))
    ch = torch.argsort(rt)[:4].sort().values
    step = old.config.step
    for name, bank in (("shared-key (datalevel-bank) instance", old_inst.bank_), ("keyed-bank instance", inst[4].bank_),
                       ("unfingerprinted base bank", base.bank_)):
        best, second, idx, V = lattice_concentration(bank[:64], ch, rt[ch], step)
        row = [name, f"{float(best.mean()):.3f}", f"{float(second.mean()):.3f}"]
        if name.startswith("shared"):
            true_u = old.spread_ * math.sqrt(old.config.channels)  # (m, h, w) +-1
            same = (ch.sort().values == old.channels_.sort().values).all()
            sign = true_u[0:1].sign()
            canon = true_u * sign  # first element +1
            hit = (V[idx] * math.sqrt(4) - canon.permute(1, 2, 0)).abs().sum(-1) < 1e-4
            row.append(f"{float(hit.float().mean()):.1%} of pixels (chance {1 / 8:.1%})" if same else "channels differ")
        else:
            row.append("no spreading vector exists")
        kr_rows.append(row)
    # (b) keyed: best estimate of the instance's pattern from its bank alone: per pixel, the carrier
    # coordinates minus their linear prediction from the 16 other directions (fitted on the bank)
    C, h, w = secret.shape_
    Vd = secret.directions_
    Q, _ = torch.linalg.qr(torch.cat([Vd, torch.randn(C, C, generator=g)], 1))
    comp = Q[:, Vd.shape[1]:]  # orthonormal complement

    def carrier_estimate(bank):
        b = bank.float()
        a = torch.einsum("nchw,cm->nmhw", b, Vd)
        o = torch.einsum("nchw,cm->nmhw", b, comp)
        est = torch.empty_like(a)
        for y in range(h):
            for x in range(w):
                A = torch.cat([o[:, :, y, x], torch.ones(b.shape[0], 1)], 1)
                coef = torch.linalg.lstsq(A, a[:, :, y, x]).solution
                est[:, :, y, x] = a[:, :, y, x] - A @ coef
        return est, a

    N = base.bank_.shape[0]
    true_g = pattern_rows(secret.key_of(codes[4]), torch.arange(N), Vd.shape[1], h, w)
    fresh_g = pattern_rows(b"\x00" * 32, torch.arange(N), Vd.shape[1], h, w)
    est, _ = carrier_estimate(inst[4].bank_)

    def corr(a, b):
        a, b = a.flatten().double(), b.flatten().double()
        return float((a * b).sum() / (a.norm() * b.norm()))

    agree_true = float(((est > 0) == (true_g > 0)).float().mean())
    agree_fresh = float(((est > 0) == (fresh_g > 0)).float().mean())
    n_el = true_g.numel()
    kr_rows.append(["keyed-bank, pattern estimate (carrier coordinates minus their prediction)",
                    f"corr {corr(est, true_g):.4f} (fresh pattern {corr(est, fresh_g):.4f})", "-",
                    f"sign agreement {agree_true:.2%} vs {agree_fresh:.2%} for a fresh pattern "
                    f"(chance 50% +- {0.5 / math.sqrt(n_el):.3%})"])
    # (c) colluders: own pattern from the banks' differences
    for c in (2, 3, 4):
        mean_bank = sum(i.bank_.float() for i in inst[:c]) / c
        own = torch.einsum("nchw,cm->nmhw", inst[0].bank_.float() - mean_bank, Vd)
        g0 = pattern_rows(secret.key_of(codes[0]), torch.arange(N), Vd.shape[1], h, w)
        gi = pattern_rows(secret.key_of(codes[8]), torch.arange(N), Vd.shape[1], h, w)
        kr_rows.append([f"keyed-bank, {c} colluders: bank minus the colluders' mean",
                        f"corr with own pattern {corr(own, g0):.3f} (theory sqrt(1-1/c) = {math.sqrt(1 - 1 / c):.3f}); "
                        f"with an innocent's {corr(own, gi):.4f}", "-",
                        "reveals each colluder's mark minus their common mean, never the mean itself (below: removal "
                        "by averaging) nor an innocent's pattern"])
    _table("Key recovery", ["attack on", "lattice concentration: best (mean over pixels) / pattern estimate",
                            "runner-up", "recovered"], kr_rows, md)
    doc["key_recovery"] = kr_rows

    # ------------------------------------------------------------------ removal
    x_clean, prov = faces_of(inst[4])
    s_clean = scores(x_clean)
    fid_clean = fid_of(lambda n, s: faces_of(inst[4], n, s)[0], "the instance")
    fid_base = fid_of(lambda n, s: faces_of(base, n, s)[0], "the base model")
    rem_rows = []
    doc["removal"] = []

    def add_row(name, x_att, s_att, fid_v, note="", same_faces=True):
        hit = float((s_att[:, 4] >= thr).float().mean())
        hit_lax = float((s_att[:, 4] >= lax).float().mean())
        wrong = int(((s_att >= lax).sum(1) - (s_att[:, 4] >= lax).long()).sum())
        row = {"attack": name, "right recipient accused": hit, "right recipient accused (lax)": hit_lax,
               "median T": float(s_att[:, 4].median()), "T of the right recipient": s_att[:, 4].tolist(),
               "max T of the others": torch.cat([s_att[:, :4], s_att[:, 5:]], 1).max(1).values.tolist(),
               "psnr_to_unattacked": _psnr(x_att, x_clean) if same_faces else None,
               "fid": fid_v, "fid_change": None if fid_v is None or fid_clean is None else fid_v - fid_clean,
               "other recipients accused": wrong, "note": note}
        doc["removal"].append(row)
        rem_rows.append([name, f"{hit:.1%}", f"{hit_lax:.1%}", f"{row['median T']:.1f}",
                         "-" if row["psnr_to_unattacked"] is None else f"{row['psnr_to_unattacked']:.1f}",
                         "-" if fid_v is None else f"{fid_v:.2f}",
                         "-" if row["fid_change"] is None else f"{row['fid_change']:+.2f}", wrong, note])
        _say(f"  {name}: {hit:.1%} accused, median T {row['median T']:.1f}, FID {fid_v}")

    add_row("none (the instance's own faces)", x_clean, s_clean, fid_clean,
            f"base model FID {fid_base:.2f}" if fid_base is not None else "")

    def bank_attack(name, bank, note=""):
        import copy

        ga = copy.copy(inst[4])
        ga.bank_ = bank.to(inst[4].bank_.dtype).contiguous()
        ga._cache = {}
        xa = _q8(ae.decode(gather(ga.bank_.float(), prov)))
        add_row(name, xa, scores(xa), fid_of(lambda n, s: faces_of(ga, n, s)[0], name), note)

    for tau in (0.15, 0.3, 0.6):
        noise = torch.einsum("cm,nmhw->nchw", Vd, torch.randn(N, Vd.shape[1], h, w, generator=g)) * tau
        bank_attack(f"noise in the carrier directions, std {tau} (mark {secret.config.sigma})",
                    inst[4].bank_.float() + noise)
    est, a = carrier_estimate(inst[4].bank_)
    for lam in (0.25, 0.5):
        bank_attack(f"carriers moved {lam:.0%} of the way to their prediction (the pattern estimate x {lam})",
                    inst[4].bank_.float() - lam * torch.einsum("cm,nmhw->nchw", Vd, est))
    bank_attack("carriers replaced by their prediction from the other directions",
                inst[4].bank_.float() - torch.einsum("cm,nmhw->nchw", Vd, est))

    bank_attack("projection on the released mixture's member subspaces", project_on_mixture(inst[4], inst[4].bank_))
    # the same attack on an instance issued without re-estimating the mixture (the earlier behaviour)
    import copy as _copy

    leaky = _copy.copy(inst[4])
    leaky.mixture_ = base.mixture_
    bank_attack("same, on an instance that kept the base model's mixture (before this issue)",
                project_on_mixture(leaky, inst[4].bank_), "why issue re-estimates the mixture")
    # refit on the instance's own faces
    t1 = time.perf_counter()
    many = []
    for s in range(0, args.train, 256):
        smp = inst[4].sample_latents(min(256, args.train - s), seed=args.seed + 77, start=s)
        many.append(ae.encode(_q8(ae.decode(smp.latents.float()))))
    refit = Generator(GeneratorConfig(), autoencoder=ae).fit(_SimpleSet(torch.cat(many)), seed=args.seed + 1)
    xr, _ = faces_of(refit)
    add_row(f"model refitted on {args.train} of the instance's faces", xr, scores(xr),
            fid_of(lambda n, s: faces_of(refit, n, s)[0], "refit"), f"other faces: no PSNR; refit {time.perf_counter() - t1:.0f} s",
            same_faces=False)
    # decoder weights perturbed (what a fine-tune that keeps the faces can do at most to a latent mark)
    base_ae = getattr(ae, "base", ae)
    noisy = {k: (v + torch.randn(v.shape, generator=g) * 0.02 * v.float().std().clamp_min(1e-8)).to(v.dtype)
             if v.is_floating_point() and v.numel() > 1 else v for k, v in base_ae.decoder.state_dict().items()}
    dec_ae = base_ae.with_decoder_state(noisy)
    xd = _q8(dec_ae.decode(gather(inst[4].bank_.float(), prov)))
    add_row("decoder weights + 2% Gaussian noise (per tensor std)", xd, scores(xd),
            fid_of(lambda n, s: _q8(dec_ae.decode(inst[4].sample_latents(n, seed=s, guard=None).latents.float())),
                   "decoder noise"))
    from ..fingerprint.attacks import ATTACKS

    for aname, strength, label in (("jpeg", 90, "JPEG 90"), ("jpeg", 70, "JPEG 70"), ("jpeg", 50, "JPEG 50"),
                                   ("jpeg", 30, "JPEG 30"), ("gaussian_blur", 3, "blur k3"), ("gaussian_blur", 5, "blur k5"),
                                   ("resize_down_up", 0.5, "resize 0.5"), ("gaussian_noise", 0.02, "noise 0.02"),
                                   ("gaussian_noise", 0.05, "noise 0.05")):
        spec = ATTACKS[aname]
        gg = make_generator(args.seed, "redteam-attack", aname) if spec.random else None
        xa = spec.apply(x_clean, strength, generator=gg)
        sa = scores(xa)
        from collections import Counter

        chosen = ", ".join(f"{e} {k}" for e, k in Counter(last["edit"]).most_common(3))
        add_row(f"image edit: {label}", xa, sa, None, f"on the faces; reference edits chosen: {chosen}")
    _table(f"Removal (one recipient's instance, {nF} faces per row scored against the registry of {CODES}; "
           f"an accusation is T >= {thr:.2f}, at {args.target_fpr:g} per image; the laxer column T >= {lax:.2f}, "
           f"at {args.lax_fpr:g})",
           ["attack", f"right recipient accused (T >= {thr:.2f})", f"same at T >= {lax:.2f}", "median T", "PSNR to unattacked (dB)", "FID", "FID change",
            f"other recipients accused (T >= {lax:.2f})", "note"], rem_rows, md)
    _other_mechanisms(args, base, ae, g, md, doc, faces_of, fid_base)

    # ------------------------------------------------------------------ collusion and framing
    col_rows = []
    doc["collusion"] = []
    innocent = list(range(5, CODES))
    innocent_hits = innocent_total = 0
    framing_scores = []
    for c in (2, 3, 4):
        banks = [i.bank_.float() for i in inst[:c]]
        gr = make_generator(args.seed, "redteam-mix", c)
        pick_row = torch.randint(0, c, (N,), generator=gr)
        pick_pix = torch.randint(0, c, (N, 1, h, w), generator=gr)
        variants = {
            "average of banks": sum(banks) / c,
            "per-row mix": torch.stack(banks)[pick_row, torch.arange(N)],
            "per-pixel mix": torch.stack(banks).gather(0, pick_pix.expand(N, C, h, w).unsqueeze(0)).squeeze(0),
        }
        faces_by = {vname: _q8(ae.decode(gather(bank, prov))) for vname, bank in variants.items()}
        faces_by["average of faces (same seeds)"] = _q8(sum(_q8(ae.decode(gather(b, prov))) for b in banks) / c)
        for vname, xa in faces_by.items():
            s = scores(xa)
            acc = float((s[:, :c].max(1).values >= thr).float().mean())
            acc_lax = float((s[:, :c].max(1).values >= lax).float().mean())
            inn = int((s[:, innocent] >= thr).sum())
            innocent_hits += inn
            innocent_total += s[:, innocent].numel()
            framing_scores.append(s[:, innocent].flatten())
            weakest = float(s[:, :c].median(0).values.min())
            doc["collusion"].append({"colluders": c, "attack": vname, "colluder accused": acc,
                                     "colluder accused (lax)": acc_lax, "best colluder T": s[:, :c].max(1).values.tolist(),
                                     "min colluder median T": weakest, "innocent accusations": inn,
                                     "innocent pairs": s[:, innocent].numel()})
            col_rows.append([c, vname, f"{acc:.1%}", f"{acc_lax:.1%}", f"{weakest:.1f}", f"{inn} of {s[:, innocent].numel()}",
                             f"{_psnr(xa, x_clean):.1f}"])
    _table(f"Collusion (faces of colluders' mixes; an accusation is T >= {thr:.2f}; the laxer column T >= {lax:.2f})",
           ["colluders", "attack", f"a colluder accused (T >= {thr:.2f})", f"same at T >= {lax:.2f}", "weakest colluder's median T", "innocents accused",
            "PSNR to one colluder's faces (dB)"], col_rows, md)

    # framing: 4 colluders' faces (their average bank, and each one's own, at many seeds) against the
    # 11 innocents; plus a forged mark (a random pattern added as an innocent's would be)
    fr = []
    mean4 = sum(i.bank_.float() for i in inst[:4]) / 4
    done = 0
    k = 0
    while done < args.framing_faces:
        n = min(64, args.framing_faces - done)
        src = k % 5
        if src < 4:
            x, _ = faces_of(inst[src], n, args.seed + 900 + k)
        else:
            x, _ = faces_of(base, n, args.seed + 900 + k, bank=mean4)
        fr.append(scores(x)[:, innocent])
        done += n
        k += 1
    fr = torch.cat(fr)
    fr_all = torch.cat([fr.flatten()] + framing_scores)
    attempts = fr_all.numel()
    hits = int((fr_all >= thr).sum())
    hits_lax = int((fr_all >= lax).sum())
    frame_rows = [["faces of 4 colluders' instances and of their averaged bank, and the collusion rows above",
                   attempts, hits, hits_lax, f"{float(fr_all.max()):.2f}", f"{float(fr_all.std()):.3f}",
                   f"{float((fr_all >= 3).float().mean()):.2e} (N(0,1): {normal_tail(3):.2e})"]]
    _table(f"Framing: innocent recipients (not among the colluders) scored on colluders' faces; T >= {thr:.2f} frames",
           ["source", "attempts (face x innocent)", "framed", f"framed at T >= {lax:.2f}", "max T", "std T (N(0,1): 1)", "rate T >= 3"], frame_rows, md)
    doc["framing"] = {"attempts": attempts, "framed": hits, "framed (lax)": hits_lax, "max": float(fr_all.max()),
                      "std": float(fr_all.std())}
    doc["innocent_accusations"] = {"hits": innocent_hits, "pairs": innocent_total}

    # ------------------------------------------------------------------ real-photo negatives
    if args.negatives:
        t1 = time.perf_counter()
        neg_rows = []
        folders = [(ds / "celeba-10k" / "images", args.train, "celeba-10k"), (ds / "celeba-id" / "images", 0, "celeba-id")]
        left = args.negatives
        all_s = []
        for folder, skip, label in folders:
            if left <= 0 or not folder.is_dir():
                continue
            ff = FaceFolder(folder, size=128, limit=skip + left)
            ls = encode_folder(ff, ae, cache=LatentCache())
            lat, rel = ls.latents[skip:], ls.relpaths[skip:]
            s_neg = []
            for b in range(0, len(lat), 512):  # the photos themselves too: verify chooses the edit on them
                def make(b=b):
                    imgs = torch.stack([load_image(folder / r, 128) for r in rel[b:b + 512]])
                    return index.residuals_of_latents(lat[b:b + 512], batch=args.batch, images=imgs) \
                        .scores(secret, codes).tolist()
                s_neg.append(torch.tensor(memo.get(f"negatives: {label} {b} {len(lat[b:b + 512])}", make)))
            s_neg = torch.cat(s_neg)
            all_s.append(s_neg)
            left -= len(lat)
            acc = int((s_neg >= thr).any(1).sum())
            acc_lax = int((s_neg >= lax).any(1).sum())
            neg_rows.append([f"{label} photos", len(lat), acc, acc_lax, f"{float(s_neg.max()):.2f}", f"{float(s_neg.mean()):.3f}",
                             f"{float(s_neg.std()):.3f}", f"{float((s_neg >= 3).float().mean()):.2e}"])
        s_all = torch.cat(all_s)
        n_img = s_all.shape[0]
        fp = int((s_all >= thr).any(1).sum())
        fp_lax = int((s_all >= lax).any(1).sum())
        neg_rows.append(["all", n_img, fp, fp_lax, f"{float(s_all.max()):.2f}", f"{float(s_all.mean()):.3f}",
                         f"{float(s_all.std()):.3f}", f"{float((s_all >= 3).float().mean()):.2e}"])
        _table(f"Real photos (never in the model) against the {CODES} registered recipients; N(0,1) expects mean 0, "
               f"std 1, rate(T >= 3) = {normal_tail(3):.2e}", ["negatives", "images", f"false accusations (T >= {thr:.2f})",
                                                               f"at T >= {lax:.2f}", "max T",
                                                               "mean T", "std T", "rate T >= 3"], neg_rows, md)
        doc["negatives"] = {"images": n_img, "false_accusations": fp, "false_accusations (lax)": fp_lax,
                            "seconds": time.perf_counter() - t1,
                            "expected_false_accusations": n_img * args.target_fpr,
                            "expected_false_accusations (lax)": n_img * args.lax_fpr,
                            "max T per image": s_all.max(1).values.tolist()}

    # ------------------------------------------------------------------ write
    doc["minutes"] = (time.perf_counter() - t_start) / 60
    doc["steps_reused"] = memo.reused
    head = ["# Red team: the recipient against the fingerprint (`python -m faceprint.bench redteam`)", "",
            f"Command: `python -m faceprint.bench redteam --out OUT --train {args.train} --faces {args.faces} "
            f"--fid-n {args.fid_n} --framing-faces {args.framing_faces} --negatives {getattr(args, 'negatives', 0)} "
            f"--target-fpr {args.target_fpr:g} --lax-fpr {args.lax_fpr:g} --seed {args.seed}` ({doc['minutes']:.0f} min"
            f"{f', with {memo.reused} FIDs or chunks kept from an earlier run (--resume)' if memo.reused else ''}; the machine was shared "
            "with other jobs: times are contended).", "", "| item | value |", "|---|---|"]
    head += [f"| {k} | {v} |" for k, v in info.items()]
    text = "\n".join(head + md) + "\n"
    from ..io import atomic_write_text

    atomic_write_text(args.out / "redteam.md", text)
    atomic_write_text(args.out / "redteam.json", json.dumps(doc, indent=1, default=str))
    _say(f"wrote {args.out / 'redteam.md'}")
    return 0


def _other_mechanisms(args, base, ae, g, md, doc, faces_of, fid_base) -> None:
    """The recipient against the two other mechanisms faceprint has: the model-level decoder
    modulation (the recipient holds the modulated decoder, and TAEF2's own decoder is public) and
    the post-hoc watermark (added by the generating code, which the recipient runs)."""
    from ..fingerprint.modulated import ModulatedFingerprinter, random_code as mod_code
    from ..fingerprint.posthoc import PosthocWatermark

    rows = []
    n = min(args.faces, 32)
    smp = base.sample_latents(n, seed=args.seed + 31, guard=None)
    z = smp.latents.float()
    plain = _q8(ae.decode(z))
    fpm = ModulatedFingerprinter.load(autoencoder=ae)
    code = mod_code(args.seed, fpm.n_bits)
    marked = _q8(fpm.modulated_decode(z, code))

    def acc(bits_prob):
        return float(((bits_prob > 0.5) == code.bool()).float().mean())

    a_marked = acc(fpm.decode_bits(marked, reference=base))
    a_swapped = acc(fpm.decode_bits(plain, reference=base))
    rows.append(["model-level decoder modulation (kernel, shipped weights)", "none: the instance's own faces",
                 f"{a_marked:.3f}", "-", "-"])
    rows.append(["model-level decoder modulation (kernel, shipped weights)",
                 "decode with the public TAEF2 decoder instead of the instance's", f"{a_swapped:.3f}",
                 f"{_psnr(plain, marked):.1f}", "0 (the base model's own faces"
                 + (f", FID {fid_base:.2f})" if fid_base is not None else ")")])
    wm = PosthocWatermark()
    bits = code.bool()
    wmk = wm.embed(plain, bits.expand(n, -1))
    a_wm = float((wm.decode(wmk) == bits).float().mean())
    a_skip = float((wm.decode(plain) == bits).float().mean())
    rows.append(["post-hoc watermark (DWT-DCT)", "none: watermarked faces", f"{a_wm:.3f}", "-", "-"])
    rows.append(["post-hoc watermark (DWT-DCT)", "skip the watermarking call in the generating code",
                 f"{a_skip:.3f}", f"{_psnr(plain, wmk):.1f}", "0 (the faces before watermarking)"])
    _table(f"The other mechanisms against their recipient ({n} faces; bit accuracy of the recipient's 128-bit code, "
           "chance 0.5)", ["mechanism", "attack", "bit accuracy", "PSNR to unattacked (dB)", "FID change"], rows, md)
    doc["other_mechanisms"] = rows


class _SimpleSet:
    def __init__(self, latents):
        self.latents = latents
        self.relpaths = [f"face-{i}" for i in range(len(latents))]
        self.hashes = []
        self.data_hash = "redteam"
        self.image_size = latents.shape[-1] * 8
        self.root = ""

