"""`python -m faceprint.bench attribution`: attribution, false positives and fidelity of the
owner's fingerprint (papers/004, Ch. 5-6). ``--mechanism keyed-bank`` (the default, what
``faceprint fingerprint issue`` makes) is measured by :func:`_run_keyed` (its docstring gives the
protocol; resumable); ``--mechanism datalevel-bank`` (the shared-key lattice code) as follows, through the owner's own code path
(:mod:`faceprint.fingerprint.owner`, the flow of ``faceprint fingerprint issue|calibrate`` and
``faceprint verify``).

Protocol (every size is an option; the defaults are the paper's):

1. One generator (default GeneratorConfig) fitted on celeba-10k files 000001-001024, saved and
   reloaded as the CLI does; its file hash is the registry's model hash.
2. An owner (key made from the model's memory with key seed = ``--seed``; SQLite registry) in
   a temporary folder issues ``--instances`` (100) instances, each with a reproducibly drawn
   code; instance i draws ``--faces`` (20) faces with seed ``seed + 1000 + i``.
3. Calibration negatives (only to set the threshold): every utkface photo, 1,000 faces of the
   unfingerprinted model, 4 x 250 faces of unregistered instances with random codes
   (>= 10,000 in all), each matched against 1,024 random codes; target false-positive rate
   1e-3 (Clopper-Pearson, 95 %), never looser than the corrected binomial test of Eq. 5.5.
4. Test negatives, disjoint from those (only to count false matches): celeba-10k files after
   the training set (001025-010000), every celeba-id photo, 1,000 faces of the unfingerprinted
   model with another seed, verified against the registry of issued instances.
5. Attribution: every instance face verified against the registry (right instance, "not
   ours", wrong instance), clean and after each attack of the shared harness
   (:mod:`faceprint.fingerprint.attacks`) at the edge of papers/004's working range.
6. The distribution of matching bits per negative source and of the positives, the threshold
   and what it guarantees.
7. Fidelity: FID of one instance and of the unfingerprinted model (``--fid-n`` faces each, the
   same seed) against celeba-10k files 005001-010000, and the PSNR between their faces.
8. ``--steps``: the robustness/visibility trade-off of the STDM lattice step (few instances,
   four attack columns, threshold from real photos + unfingerprinted faces only).

Every generated face is rounded to 8 bits first (as saved). Decoding = TAEF2 encode + the key's
lattice read-out (``BankFingerprinter.bits_from_latents``); the encode of a real photo is the
one :func:`faceprint.data.encode_folder` keeps in the user's latent cache (never in the
repository), so photos are encoded once across runs; a self-check compares that path with
:func:`faceprint.fingerprint.owner.decode_images` on a few photos.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .fingerprint import ATTACK_COLUMNS as FINGERPRINT_ATTACK_COLUMNS
from .machine import describe, print_table

#: (column, attack name in faceprint.fingerprint.attacks.ATTACKS, strength): papers/004's working range
ATTACK_COLUMNS = FINGERPRINT_ATTACK_COLUMNS + (("random combination p=0.5", "random_combination", 0.5),)
STEP_COLUMNS = ATTACK_COLUMNS[:4]  # clean, JPEG 50, blur 5, noise 0.05
REF_FIRST, REF_LAST = 5001, 10000  # the celeba-1k protocol's FID reference files


def add_arguments(p) -> None:
    from ..cli.main import _nonneg_int, _positive_float, _positive_int

    p.add_argument("--datasets", type=Path, default=None,
                   help="folder holding celeba-10k, celeba-id, utkface (default ../shared/datasets)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="fit, key, codes and faces (default 0)")
    p.add_argument("--train", type=_positive_int, default=1024, help="training photos: celeba-10k files 1..N (default 1024)")
    p.add_argument("--instances", type=_positive_int, default=100, help="issued instances (default 100)")
    p.add_argument("--faces", type=_positive_int, default=20, help="faces per issued instance (default 20)")
    p.add_argument("--attack-faces", type=_positive_int, default=None,
                   help="of those, how many per instance are also attacked (default: all)")
    g = p.add_argument_group("calibration negatives (set the threshold only)")
    g.add_argument("--calibration-photos", type=_nonneg_int, default=None,
                   help="use only the first N utkface photos (default all, ~9,780)")
    g.add_argument("--calibration-faces", type=_nonneg_int, default=1000,
                   help="faces of the unfingerprinted model (default 1000)")
    g.add_argument("--calibration-instances", type=_nonneg_int, default=4,
                   help="unregistered instances with random codes (default 4)")
    g.add_argument("--calibration-instance-faces", type=_positive_int, default=250,
                   help="faces per unregistered instance (default 250)")
    g.add_argument("--target-fpr", type=_positive_float, default=None,
                   help="target false-positive rate (default: the mechanism's own, 1e-5 per image for keyed-bank, "
                        "1e-3 for datalevel-bank)")
    g.add_argument("--min-negatives", type=_positive_int, default=None,
                   help="CalibrationConfig.min_negatives (default 10,000; lower it for smoke runs only)")
    t = p.add_argument_group("test negatives (count false matches only)")
    t.add_argument("--test-photos", type=_nonneg_int, default=None,
                   help="use only the first N photos of each real source: celeba-10k after the training set, "
                        "celeba-id (default all)")
    t.add_argument("--test-faces", type=_nonneg_int, default=1000,
                   help="faces of the unfingerprinted model, another seed (default 1000)")
    f = p.add_argument_group("fidelity")
    f.add_argument("--fid-n", type=_nonneg_int, default=5000, help="faces per model for FID (default 5000; 0 skips)")
    f.add_argument("--fid-reference", type=_positive_int, default=5000,
                   help="reference photos: celeba-10k files 005001.. (default 5000, i.e. up to 010000)")
    s = p.add_argument_group("STDM step trade-off")
    s.add_argument("--steps", default=None,
                   help="comma-separated lattice steps, e.g. 9,12 (default: the key's step, 9; '' skips)")
    s.add_argument("--step-instances", type=_positive_int, default=10, help="instances per step (default 10)")
    s.add_argument("--step-faces", type=_positive_int, default=20, help="faces per instance per step (default 20)")
    p.add_argument("--batch", type=_positive_int, default=250, help="faces generated / decoded per chunk (default 250)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for attribution-<mechanism>.json and .md")
    p.add_argument("--weights", type=Path, default=None, help="TAEF2 weights folder")
    p.add_argument("--crops", type=_crops, default=None, metavar="F,F,...",
                   help="keyed-bank: centre-crop fractions the read-out tries, the first 1 (default: the verifier's, "
                        "1,0.93,0.86,0.8; '1' reads the full frame only, as runs before the crop search did)")
    p.add_argument("--prefilters", type=_prefilters, default=None, metavar="F,F,...",
                   help="keyed-bank: filters the read-out tries on every image, the first none (default: the "
                        "verifier's, none,blur3,blur5; 'none' reads images as they are, as runs before them did)")
    p.add_argument("--weighting", choices=("pixel", "none"), default=None,
                   help="keyed-bank: per-pixel weighting of the residual (default: the verifier's, pixel; 'none' as "
                        "runs before it)")
    p.add_argument("--mechanism", choices=("keyed-bank", "datalevel-bank"), default="keyed-bank",
                   help="the fingerprint measured (default keyed-bank, what `fingerprint issue` makes; datalevel-bank: "
                        "the shared-key lattice mechanism with its calibration and step table)")
    p.add_argument("--resume", action="store_true",
                   help="keyed-bank: keep the chunks an interrupted run with the same settings finished in OUT")
    p.add_argument("--minutes", type=_positive_float, default=None,
                   help="keyed-bank: start no new chunk after this many minutes (then rerun with --resume)")


# ----------------------------------------------------------------------------------- helpers
def _q8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def _psnr_each(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def _stats(values, *, low: bool = False) -> dict:
    """mean, 1st/50th/99th percentile and max (min if ``low``) of a 1-D array of counts."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    p1, p50, p99 = np.percentile(v, [1, 50, 99])
    d = {"n": int(v.size), "mean": float(v.mean()), "p1": float(p1), "p50": float(p50), "p99": float(p99)}
    d["min" if low else "max"] = float(v.min() if low else v.max())
    return d


def _fmt_stats(d: dict, low: bool = False) -> list[str]:
    if not d.get("n"):
        return ["-"] * 5
    return [f"{d['mean']:.1f}", f"{d['p1']:.0f}", f"{d['p50']:.0f}", f"{d['p99']:.0f}",
            f"{d['min']:.0f} (min)" if low else f"{d['max']:.0f}"]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _attack_spec(name, strength, ae):
    from ..fingerprint import attacks

    spec = attacks.ATTACKS[name]
    if strength not in spec.strengths:
        raise SystemExit(f"attack {name} strength {strength!r} is not on the harness's grid {spec.strengths}")
    if name == "autoencoder_roundtrip":  # the same attack with the already loaded TAEF2
        spec = attacks.autoencoder_attack(ae, spec.strengths)
    return spec


def _attack(images, name, strength, seed: int, tag, ae) -> torch.Tensor:
    """``images`` after one attack of the shared harness; random attacks get their own seeded
    generator per (attack, strength, tag), so a result never depends on what ran before."""
    if name is None:
        return images
    from ..seeding import generator as make_generator

    spec = _attack_spec(name, strength, ae)
    g = make_generator(seed, "bench-attribution", name, repr(strength), tag) if spec.random else None
    return spec.apply(images, strength, generator=g)


def _faces(gen, n: int, seed: int, batch: int, *, provenance: bool = False):
    """Yield 8-bit-rounded faces of ``gen`` (image indices 0..n-1 of the run ``seed``) in chunks
    (with each chunk's provenance map if asked)."""
    for s in range(0, n, batch):
        smp = gen.sample_latents(min(batch, n - s), seed=seed, start=s)
        x = _q8(gen.autoencoder.decode(smp.latents))
        yield (x, smp.provenance) if provenance else x


def _faces_prov(gen, n: int, seed: int, batch: int):
    xs, ps = zip(*_faces(gen, n, seed, batch, provenance=True))
    return torch.cat(xs), torch.cat(ps)


def _clean_twin(gen, provenance: torch.Tensor) -> torch.Tensor:
    """The faces whose every latent pixel is taken from the *unfingerprinted* bank at the same
    provenance: what the instance's faces would be without the embedding (8-bit)."""
    from ..latent.refine import gather

    return _q8(gen.autoencoder.decode(gather(gen.bank_, provenance).float()))


def _expand(carriers: torch.Tensor, channels: torch.Tensor, shape) -> torch.Tensor:
    z = torch.zeros((carriers.shape[0], *shape), dtype=torch.float32)
    z[:, channels] = carriers
    return z


def _bits_of_carriers(key, carriers: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    """Decoded bits (N, 128) bool from the key's carrier channels of encoded images; the same
    numbers :func:`decode_images` gets, without encoding again (other channels do not enter)."""
    out = [key.bits_from_latents(_expand(carriers[s:s + chunk], key.channels_, key.shape_)) > 0.5
           for s in range(0, carriers.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, key.config.bits, dtype=torch.bool)


class _Tables:
    """Print Markdown tables and keep a copy for attribution.md."""

    def __init__(self):
        self.md: list[str] = []

    def __call__(self, title, header, rows, note: str | None = None):
        print_table(title, header, rows)
        buf = io.StringIO()
        print_table(title, header, rows, file=buf)
        self.md.append(buf.getvalue())
        if note:
            print(f"\n{note}", flush=True)
            self.md.append(f"\n{note}\n")

    def text(self, line: str):
        print(line, flush=True)
        self.md.append(line + "\n")


def _say(msg: str) -> None:
    print(f"  {msg}", flush=True)


# ------------------------------------------------------------------------------ real photos
def _photo_carriers(root: Path, paths: list[Path], ae, channels, tag: str, chunk: int = 1000):
    """Carrier channels (N, c, h, w) of photos encoded through the latent cache, plus relpaths
    kept and the number of files skipped."""
    from ..data import FaceFolder, LatentCache, encode_folder

    if not paths:
        return torch.zeros(0), [], 0
    folder = FaceFolder(root, size=128)
    cache = LatentCache()
    out, kept, skipped = [], [], 0
    t0 = time.perf_counter()
    for s in range(0, len(paths), chunk):
        sub = copy.copy(folder)
        sub.paths = list(paths[s:s + chunk])
        sub.relpaths = [p.relative_to(folder.root).as_posix() for p in sub.paths]
        ls = encode_folder(sub, ae, cache=cache)
        out.append(ls.latents[:, channels].clone())
        kept.extend(ls.relpaths)
        skipped += len(ls.skipped)
        done = min(s + chunk, len(paths))
        if len(paths) > chunk:
            _say(f"{tag}: {done}/{len(paths)} photos encoded ({time.perf_counter() - t0:.0f} s)")
    return torch.cat(out), kept, skipped


def _face_carriers(gen, n: int, seed: int, batch: int, channels, tag: str):
    """Carrier channels of n 8-bit faces of ``gen`` after one TAEF2 encode."""
    out = []
    t0 = time.perf_counter()
    for x in _faces(gen, n, seed, batch):
        with torch.no_grad():
            out.append(gen.autoencoder.encode(x)[:, channels].clone())
    if n:
        _say(f"{tag}: {n} faces generated and encoded ({time.perf_counter() - t0:.0f} s)")
    return torch.cat(out) if out else torch.zeros(0)


def _calibration_codes(seed: int, k: int) -> torch.Tensor:
    """The random codes :func:`faceprint.fingerprint.owner.calibrate` compares negatives with
    (same recipe; checked against the calibration's histogram)."""
    from ..fingerprint.registry import random_code
    from ..seeding import generator as make_generator

    g = make_generator(seed, "fingerprint-calibration-codes")
    return torch.stack([random_code(generator=g) for _ in range(k)])


def _best(bits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    from ..fingerprint.registry import hamming_distances

    if bits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return bits.shape[1] - hamming_distances(bits, codes).min(1).values


def _outcomes(verdicts, expected: list[str]) -> dict:
    n = len(verdicts)
    right = sum(1 for v, e in zip(verdicts, expected) if v.match and v.instance == e)
    ours = sum(1 for v in verdicts if v.match)
    return {"n": n, "right": right / n, "not_ours": (n - ours) / n, "wrong": (ours - right) / n}


# ------------------------------------------------------------------------------------- main
def run(args) -> int:
    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..data.folder import load_image
    from ..fingerprint.datalevel import MECHANISM, fingerprint_bank_instance
    from ..fingerprint.owner import Owner, calibrate, decode_images, issue_instance
    from ..fingerprint.registry import Registry, random_code
    from ..fingerprint.verification import MIN_NEGATIVES, CalibrationConfig, clopper_pearson_upper, verify
    from ..io import atomic_write_text, sha256_file
    from ..latent.generator import Generator, GeneratorConfig
    from ..seeding import derive_seed
    from ..seeding import generator as make_generator
    from .taming import DATA

    if getattr(args, "mechanism", "datalevel-bank") == "keyed-bank":
        if args.target_fpr is None:
            from ..fingerprint.keyed import DEFAULT_TARGET_FPR

            args.target_fpr = DEFAULT_TARGET_FPR
        return _run_keyed(args)
    if args.target_fpr is None:
        args.target_fpr = 1e-3
    if args.resume or args.minutes is not None:
        print("--resume and --minutes work with --mechanism keyed-bank only", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    ds = args.datasets or DATA
    for sub in ("celeba-10k", "celeba-id", "utkface"):
        if not (ds / sub / "images").is_dir():
            print(f"datasets not found: {ds / sub / 'images'} is missing; pass --datasets", file=sys.stderr)
            return 2
    steps_arg = args.steps
    try:
        steps = None if steps_arg is None else [float(s) for s in steps_arg.split(",") if s.strip()]
    except ValueError:
        print(f"--steps must be comma-separated numbers, got {steps_arg!r}", file=sys.stderr)
        return 2
    if steps is not None and any(not (math.isfinite(s) and s > 0) for s in steps):
        print(f"--steps must be positive numbers, got {steps_arg!r}", file=sys.stderr)
        return 2
    for _col, name, strength in ATTACK_COLUMNS[1:]:
        _attack_spec(name, strength, None)  # the harness's grid holds every strength (fail early)
    min_neg = args.min_negatives or MIN_NEGATIVES
    cal_config = CalibrationConfig(target_fpr=args.target_fpr, min_negatives=min_neg)
    args.out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    T = _Tables()
    settings = {
        "seed": seed, "train photos": f"celeba-10k 1-{args.train}", "instances": args.instances,
        "faces per instance": args.faces, "target FPR": args.target_fpr, "min negatives": min_neg,
        "calibration": f"utkface {'all' if args.calibration_photos is None else args.calibration_photos} photos + "
                       f"{args.calibration_faces} unfingerprinted faces + {args.calibration_instances} x "
                       f"{args.calibration_instance_faces} unregistered-instance faces",
        "test": f"celeba-10k {args.train + 1:06d}-010000 + celeba-id "
                f"({'all' if args.test_photos is None else f'first {args.test_photos} each'}) + "
                f"{args.test_faces} unfingerprinted faces",
        "read-out crops": "full frame only" if tuple(args.crops) == (1.0,) else
                          "centre crops tried: " + ", ".join(f"{f:g}" for f in args.crops),
        "FID": f"{args.fid_n} faces per model vs celeba-10k {REF_FIRST:06d}-{REF_FIRST + args.fid_reference - 1:06d}"
               if args.fid_n else "skipped",
        "datasets": str(ds),
    }
    info = describe(settings)
    T("Machine and settings", ["item", "value"], [[k, v] for k, v in info.items()])
    doc: dict = {"machine": info, "seed": seed, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items() if k != "handler"}}
    timing: dict[str, float] = {}

    # ------------------------------------------------------------------ 1. the generator
    t0 = time.perf_counter()
    ae = TAEF2.load(args.weights)
    celeba = ds / "celeba-10k" / "images"
    train_set = encode_folder(FaceFolder(celeba, size=128, limit=args.train), ae, cache=LatentCache())
    fitted = Generator(GeneratorConfig(), autoencoder=ae).fit(train_set, seed=seed)
    del train_set
    timing["fit generator (s)"] = time.perf_counter() - t0
    _say(f"generator fitted on {fitted.n_photos} photos (K = {fitted.mixture_.weights_.numel()}) "
         f"in {timing['fit generator (s)']:.0f} s")

    with tempfile.TemporaryDirectory(prefix="faceprint-attribution-") as tmp:
        tmp = Path(tmp)
        model_path = tmp / "model.safetensors"
        fitted.save(model_path)
        model_hash = sha256_file(model_path)
        gen = Generator.load(model_path, autoencoder=ae)  # what `faceprint fingerprint issue` reads
        del fitted
        owner = Owner(tmp / "owner")

        # -------------------------------------------------------------- 2-3. issue, generate, decode
        t0 = time.perf_counter()
        names: list[str] = []
        entries = []
        pos_bits = {col: [] for col, _, _ in ATTACK_COLUMNS}
        col_names = {col: [] for col, _, _ in ATTACK_COLUMNS}
        n_att = min(args.faces, args.attack_faces or args.faces)
        kept_faces: dict[int, tuple] = {}  # the first --step-instances instances, for the step table
        first_instance = None
        key = None
        t_gen = t_dec = 0.0
        every = max(1, args.instances // 10)
        for i in range(args.instances):
            name = f"instance-{i:03d}"
            entry, inst = issue_instance(gen, model_hash, owner, f"recipient-{i:03d}", name,
                                         seed=derive_seed(seed, "attribution-code", i), key_seed=seed,
                                         mechanism=MECHANISM)
            if key is None:
                key = owner.load_key()
            ta = time.perf_counter()
            x, prov = _faces_prov(inst, args.faces, seed + 1000 + i, args.batch)
            tb = time.perf_counter()
            for col, aname, strength in ATTACK_COLUMNS:
                xa = x if aname is None else x[:n_att]
                pos_bits[col].append(decode_images(_attack(xa, aname, strength, seed, i, ae), key, ae))
                col_names[col].extend([name] * len(xa))
            t_gen += tb - ta
            t_dec += time.perf_counter() - tb
            names.extend([name] * args.faces)
            entries.append(entry)
            if i < args.step_instances:
                kept_faces[i] = (x[: args.step_faces], prov[: args.step_faces])
            if i == 0:
                first_instance = inst
            if (i + 1) % every == 0 or i + 1 == args.instances:
                el = time.perf_counter() - t0
                _say(f"instances: {i + 1}/{args.instances} issued, {(i + 1) * args.faces} faces decoded clean and "
                     f"under {len(ATTACK_COLUMNS) - 1} attacks ({el:.0f} s, about "
                     f"{el / (i + 1) * (args.instances - i - 1):.0f} s left)")
        pos_bits = {c: torch.cat(v) for c, v in pos_bits.items()}
        codes_of = {e.instance: e.bits for e in entries}
        own_codes = torch.stack([codes_of[n] for n in names])
        n_pos = len(names)
        timing["issue + generate instance faces (s)"] = t_gen
        timing["attack + decode instance faces (s)"] = t_dec
        timing["ms per face generated (sample + decode, 8-bit)"] = t_gen / n_pos * 1000
        timing["ms per face attacked + decoded (mean over columns)"] = t_dec / n_pos / len(ATTACK_COLUMNS) * 1000
        channels = key.channels_.clone()

        # -------------------------------------------------------------- 4. calibration negatives
        t0 = time.perf_counter()
        utk = sorted(p for p in (ds / "utkface" / "images").iterdir() if not p.name.startswith("."))
        if args.calibration_photos is not None:
            utk = utk[: args.calibration_photos]
        cal_car: dict[str, torch.Tensor] = {}
        cal_bits: dict[str, torch.Tensor] = {}
        car, kept, skipped = _photo_carriers(ds / "utkface" / "images", utk, ae, channels, "calibration photos (utkface)")
        cal_car["utkface photos"] = car
        # self-check: the cached-latent path gives the bits decode_images gives on the files
        chk = [ds / "utkface" / "images" / r for r in kept[:16]]
        agree = None
        if chk:
            direct = decode_images(torch.stack([load_image(f, 128) for f in chk]), key, ae)
            agree = float((direct == _bits_of_carriers(key, car[: len(chk)])).float().mean())
            _say(f"self-check: decode_images vs cached latents on {len(chk)} photos: {agree:.4f} of bits equal")
        cal_car["unfingerprinted faces"] = _face_carriers(gen, args.calibration_faces, seed + 1, args.batch, channels,
                                                          "calibration: unfingerprinted model")
        cal_bits = {k: _bits_of_carriers(key, v) for k, v in cal_car.items() if v.numel()}
        if args.calibration_instances:
            g = make_generator(seed, "calibration-instances")
            other = []
            for j in range(args.calibration_instances):
                ig = fingerprint_bank_instance(gen, key, random_code(generator=g))
                other.append(decode_images(_faces(ig, args.calibration_instance_faces, seed + 100 + j, args.batch),
                                           key, ae))
            cal_bits["unregistered instances' faces"] = torch.cat(other)
            _say(f"calibration: {args.calibration_instances} x {args.calibration_instance_faces} faces of unregistered "
                 "instances decoded")
        cal_bits = {k: v for k, v in cal_bits.items() if v.shape[0]}
        decoded = torch.cat(list(cal_bits.values()))
        desc = ", ".join(f"{len(v)} {k}" for k, v in cal_bits.items())
        try:
            cal = calibrate(decoded, seed=seed, description=desc, config=cal_config)
        except Exception as e:  # noqa: BLE001 - tell what to change, then stop
            print(f"calibration failed with {decoded.shape[0]} negatives: {e}", file=sys.stderr)
            return 2
        cal.save(owner.calibration)
        cal = owner.load_calibration()  # what `faceprint verify` reads
        timing["calibration negatives (s)"] = time.perf_counter() - t0
        _say(f"calibrated on {cal.n_negatives} negatives ({desc}): threshold {cal.threshold} of {cal.n_bits} bits "
             f"against {cal.codes_compared} codes")

        # -------------------------------------------------------------- 5. test negatives
        t0 = time.perf_counter()
        test_car: dict[str, torch.Tensor] = {}
        ids = sorted(p for p in (ds / "celeba-10k" / "images").iterdir() if p.stem.isdigit())
        test10k = [p for p in ids if args.train < int(p.stem) <= 10000]
        idp = sorted(p for p in (ds / "celeba-id" / "images").rglob("*") if p.is_file() and not p.name.startswith("."))
        if args.test_photos is not None:
            test10k, idp = test10k[: args.test_photos], idp[: args.test_photos]
        real_skipped = skipped
        k10 = f"celeba-10k {args.train + 1:06d}-010000 photos"
        car, _, sk = _photo_carriers(celeba, test10k, ae, channels, f"test photos (celeba-10k {args.train + 1:06d}-010000)")
        test_car[k10] = car
        real_skipped += sk
        car, _, sk = _photo_carriers(ds / "celeba-id" / "images", idp, ae, channels, "test photos (celeba-id)")
        test_car["celeba-id photos"] = car
        real_skipped += sk
        test_car["unfingerprinted faces (other seed)"] = _face_carriers(gen, args.test_faces, seed + 2, args.batch,
                                                                        channels, "test: unfingerprinted model")
        test_bits = {k: _bits_of_carriers(key, v) for k, v in test_car.items() if v.numel()}
        n_test = sum(v.shape[0] for v in test_bits.values())
        timing["test negatives (s)"] = time.perf_counter() - t0

        # -------------------------------------------------------------- verification
        t0 = time.perf_counter()
        with owner.open_registry() as reg:
            k_reg = len(reg)
            reg_entries, reg_codes = reg.codes()
            pos_out, pos_acc = {}, {}
            for col, _, _ in ATTACK_COLUMNS:
                pos_out[col] = _outcomes(verify(pos_bits[col], cal, registry=reg), col_names[col])
                own = torch.stack([codes_of[n] for n in col_names[col]])
                pos_acc[col] = float((pos_bits[col] == own).float().mean())
            test_verdicts = {k: verify(v, cal, registry=reg) for k, v in test_bits.items()}
        timing["verify (s)"] = time.perf_counter() - t0
        thr = cal.threshold_for(k_reg)
        st = cal.stats(thr, k_reg)
        false = {k: sum(1 for v in vs if v.match) for k, vs in test_verdicts.items()}
        n_false = sum(false.values())

        # -------------------------------------------------------------- tables: attribution
        rows = [[col, f"{pos_acc[col]:.4f}", _pct(pos_out[col]["right"]), _pct(pos_out[col]["not_ours"]),
                 _pct(pos_out[col]["wrong"])] for col, _, _ in ATTACK_COLUMNS]
        T(f"Attribution of {args.instances} issued instances x {args.faces} faces ({n_pos} faces, 8-bit; "
          f"{n_att} per instance under each attack), "
          f"verified against the registry of {k_reg} (threshold {thr} of {cal.n_bits} matching bits)",
          ["attack", "mean bit accuracy", "right instance", '"not ours"', "wrong instance"], rows,
          note="Attacks: faceprint.fingerprint.attacks at papers/004's working range (JPEG quality 50, Gaussian blur "
               "kernel 5, noise sigma 0.05, centre crop keeping 86 % resized back, resize to 50 % and back, one TAEF2 "
               "encode/decode, the Sec. 4.4.4 random combination with probability 0.5 each).")
        rows = []
        test_doc = {}
        for k, vs in test_verdicts.items():
            n = len(vs)
            mx = max(v.matching_bits for v in vs)
            rows.append([k, n, false[k], _pct((n - false[k]) / n), mx])
            test_doc[k] = {"n": n, "false_matches": false[k], "not_ours_share": (n - false[k]) / n,
                           "max_matching_bits": mx}
        real = [k for k in (k10, "celeba-id photos") if k in test_verdicts]
        n_real = sum(len(test_verdicts[k]) for k in real)
        false_real = sum(false[k] for k in real)
        rows.append(["all test negatives", n_test, n_false, _pct((n_test - n_false) / max(n_test, 1)), "-"])
        ub_test = clopper_pearson_upper(n_false, n_test) if n_test else 1.0
        met = n_false == 0 and n_test >= 10_000
        T(f"Test negatives verified against the registry of {k_reg} (disjoint from the calibration negatives)",
          ["source", "images", "false matches", '"not ours"', "max matching bits"], rows,
          note=f"Real photos verified as \"not ours\": {n_real - false_real} of {n_real} "
               f"({_pct((n_real - false_real) / max(n_real, 1))}). False matches: {n_false} among {n_test} test "
               f"negatives (95 % upper bound on the rate {ub_test:.2g}). Criterion \"zero false matches among >= 10,000 "
               f"negatives\": {'met' if met else 'NOT met'}"
               f"{'' if n_test >= 10_000 else f' (only {n_test} test negatives: a smoke run?)'}.")

        # -------------------------------------------------------------- distribution of matching bits
        cal_codes = _calibration_codes(seed, cal.codes_compared)
        dist_rows, dist_doc = [], {}
        hist_check = torch.zeros_like(cal.histogram)
        for role, parts in (("calibration", cal_bits), ("test", test_bits)):
            for k, b in parts.items():
                vs_reg, vs_cal = _best(b, reg_codes), _best(b, cal_codes)
                if role == "calibration":
                    hist_check += torch.bincount(vs_cal, minlength=cal.n_bits + 1)
                a, c = _stats(vs_reg.numpy()), _stats(vs_cal.numpy())
                dist_doc[f"{role}: {k}"] = {"vs_registry": a, "vs_calibration_codes": c,
                                            "histogram_vs_registry": torch.bincount(vs_reg, minlength=cal.n_bits + 1).tolist()}
                dist_rows.append([k, role, a["n"], *_fmt_stats(a), *_fmt_stats(c)])
        hist_ok = bool(torch.equal(hist_check, cal.histogram))
        own = (pos_bits["clean"] == own_codes).sum(1)
        a = _stats(own.numpy(), low=True)
        c = _stats(_best(pos_bits["clean"], cal_codes).numpy())
        dist_doc["positives (clean), own code"] = {"own_code": a, "vs_calibration_codes": c,
                                                   "histogram": torch.bincount(own, minlength=cal.n_bits + 1).tolist()}
        dist_rows.append(["issued instances' faces (clean), own code", "positive", a["n"], *_fmt_stats(a, low=True),
                          *["-"] * 5])
        T(f"Matching bits of 128: best over the registry ({k_reg} codes) and over the {cal.codes_compared} "
          "calibration codes",
          ["source", "role", "images", "registry: mean", "p1", "p50", "p99", "max",
           f"{cal.codes_compared} codes: mean", "p1", "p50", "p99", "max"], dist_rows,
          note=None if hist_ok else "WARNING: the per-source counts against the calibration codes do not add up to "
                                    "the calibration's histogram (owner.calibrate changed its code recipe?).")

        g_rows = [
            ["calibration negatives", f"{cal.n_negatives} ({desc})"],
            ["decision threshold (registry of %d)" % k_reg, f"{thr} of {cal.n_bits} matching bits "
                                                          f"(bit accuracy {thr / cal.n_bits:.3f})"],
            [f"threshold calibrated against {cal.codes_compared} codes", f"{cal.threshold}"],
            ["calibration negatives at or above it", f"{round(cal.fpr(thr) * cal.n_negatives)} of {cal.n_negatives}"],
            ["operating false-positive rate (measured)", f"{st.false_positive_rate:.3g}"],
            ["its 95 % upper bound (Clopper-Pearson)", f"{st.fpr_upper_bound:.3g} (target {args.target_fpr:g})"],
            ["binomial p-value at the threshold, one code (Eq. 5.5)", f"{st.p_value:.3g}"],
            [f"binomial p-value corrected for {k_reg} codes (Sidak)", f"{st.p_value_corrected:.3g}"],
            ["test negatives at or above it", f"{n_false} of {n_test} (95 % upper bound {ub_test:.2g})"],
            ["clean positives below it", f"{int((own < thr).sum())} of {n_pos}"],
        ]
        guarantee = (f"An image that carries none of the {k_reg} codes is attributed to an instance with probability at "
                     f"most {st.fpr_upper_bound:.2g} (95 % one-sided Clopper-Pearson bound from {cal.n_negatives} measured "
                     f"negatives, each compared with {cal.codes_compared} random codes, which covers any registry of up "
                     f"to {cal.codes_compared} random codes); Eq. 5.5's independent-fair-bits model would put the "
                     f"same rule at {st.p_value_corrected:.2g}.")
        T("Threshold and what it guarantees", ["item", "value"], g_rows, note=guarantee)
        doc["attribution"] = {
            "issued_instances": k_reg, "faces_per_instance": args.faces, "positives": n_pos,
            "columns": {col: {"attack": a_, "strength": s_, "mean_bit_accuracy": pos_acc[col], **pos_out[col]}
                        for col, a_, s_ in ATTACK_COLUMNS},
        }
        doc["calibration"] = {"n_negatives": cal.n_negatives, "description": desc, "codes_compared": cal.codes_compared,
                              "config": {"target_fpr": args.target_fpr, "min_negatives": min_neg,
                                         "confidence": cal.config.confidence,
                                         "require_binomial": cal.config.require_binomial},
                              "threshold_calibrated": cal.threshold, "threshold_registry": thr,
                              "stats_at_threshold": {k: getattr(st, k) for k in st.__dataclass_fields__},
                              "operating_fpr_calibrated": cal.operating_fpr,
                              "operating_fpr_upper_bound_calibrated": cal.operating_fpr_upper_bound,
                              "histogram": cal.histogram.tolist(), "per_source_histograms_add_up": hist_ok,
                              "cached_latent_self_check_bit_agreement": agree,
                              "sources": {k: int(v.shape[0]) for k, v in cal_bits.items()},
                              "guarantee": guarantee}
        doc["test_negatives"] = {"n": n_test, "false_matches": n_false, "false_match_rate_upper_bound": ub_test,
                                 "zero_false_matches_among_10000": met, "real_photos": n_real,
                                 "real_photos_not_ours_share": (n_real - false_real) / max(n_real, 1),
                                 "photos_skipped_unreadable": real_skipped, "sources": test_doc}
        doc["matching_bits"] = dist_doc

        # -------------------------------------------------------------- 9. the STDM step trade-off
        steps = [float(key.config.step)] if steps is None else steps
        if steps:
            t0 = time.perf_counter()
            from ..fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter

            n_si = min(args.step_instances, args.instances)
            plain = {i: _faces_prov(gen, args.step_faces, seed + 1000 + i, args.batch) for i in range(n_si)}
            step_rows, step_doc = [], {}
            base_car = torch.cat([v for v in cal_car.values() if v.numel()])
            for s in steps:
                if s == key.config.step:
                    key_s = key
                else:
                    key_s = BankFingerprinter(BankFingerprintConfig(step=s, key_seed=seed)).fit(gen.bank_.float(), ae)
                    if not torch.equal(key_s.channels_, channels):
                        raise SystemExit(f"step {s:g}: the key chose other carrier channels; cannot reuse the encoded "
                                         "negatives")
                reg_s = Registry(tmp / f"step-{s:g}.sqlite")
                bits = {col: [] for col, _, _ in STEP_COLUMNS}
                psnr, psnr_twin, same, snames = [], [], [], []
                for i in range(n_si):
                    e = entries[i]
                    reg_s.register(e.code, e.recipient, e.instance, model_hash, MECHANISM)
                    if key_s is key and args.step_faces <= n_att:
                        x, prov = kept_faces[i]
                        for col, aname, _ in STEP_COLUMNS:
                            stride = args.faces if aname is None else n_att  # attacked: n_att faces per instance
                            bits[col].append(pos_bits[col][i * stride: i * stride + args.step_faces])
                    else:
                        inst = fingerprint_bank_instance(gen, key_s, e.bits, {"instance": e.instance})
                        x, prov = _faces_prov(inst, args.step_faces, seed + 1000 + i, args.batch)
                        for col, aname, strength in STEP_COLUMNS:
                            bits[col].append(decode_images(_attack(x, aname, strength, seed, i, ae), key_s, ae))
                    psnr.append(_psnr_each(x, plain[i][0]))
                    psnr_twin.append(_psnr_each(x, _clean_twin(gen, prov)))
                    same.append((prov == plain[i][1]).double().flatten(1).mean(1))
                    snames.extend([e.instance] * x.shape[0])
                cal_s = calibrate(_bits_of_carriers(key_s, base_car), seed=seed, config=cal_config,
                                  description=f"{base_car.shape[0]} real photos and unfingerprinted faces, step {s:g}")
                codes_s = torch.stack([codes_of[n] for n in snames])
                row = {"step": s, "psnr_db": float(torch.cat(psnr).mean()),
                       "psnr_db_clean_twin": float(torch.cat(psnr_twin).mean()),
                       "same_provenance_share": float(torch.cat(same).mean()), "threshold": cal_s.threshold_for(n_si),
                       "instances": n_si, "faces": len(snames), "calibration_negatives": cal_s.n_negatives,
                       "columns": {}}
                cells = []
                for col, _, _ in STEP_COLUMNS:
                    b = torch.cat(bits[col])
                    o = _outcomes(verify(b, cal_s, registry=reg_s), snames)
                    acc = float((b == codes_s).float().mean())
                    row["columns"][col] = {"mean_bit_accuracy": acc, **o}
                    cells.append(f"{acc:.3f} / {_pct(o['right'])} / {_pct(o['wrong'])}")
                reg_s.close()
                step_doc[f"{s:g}"] = row
                step_rows.append([f"{s:g}" + (" (key default)" if key_s is key else ""), f"{row['psnr_db']:.2f}",
                                  f"{row['psnr_db_clean_twin']:.2f}", f"{row['same_provenance_share']:.3f}",
                                  row["threshold"], *cells])
                _say(f"step {s:g}: PSNR {row['psnr_db']:.2f} dB (clean twin {row['psnr_db_clean_twin']:.2f} dB), "
                     f"threshold {row['threshold']}")
            timing["step trade-off (s)"] = time.perf_counter() - t0
            T(f"STDM lattice step: visibility vs robustness ({n_si} instances x {args.step_faces} faces; cells: "
              "mean bit accuracy / right instance / wrong instance)",
              ["step", "PSNR vs unfingerprinted, same seed (dB)", "PSNR vs clean twin (dB)", "same provenance",
               "threshold", *[c for c, _, _ in STEP_COLUMNS]], step_rows,
              note=f"Each step has its own key (same key seed) and a registry of the same {n_si} codes; its threshold "
                   f"comes from {base_car.shape[0]} negatives (the calibration photos and unfingerprinted faces, "
                   "without the unregistered-instance faces), against the calibration codes. \"Same seed\" compares "
                   "with the unfingerprinted model's face of the same seed: the instance searches its own (fingerprinted) "
                   "memory, so its refinement may copy other photos' pixels (\"same provenance\": share of latent "
                   "pixels copied from the same photo). \"Clean twin\": the instance's face against the same latent "
                   "pixels taken from the unfingerprinted memory, i.e. the embedding alone.")
            doc["steps"] = step_doc

        # -------------------------------------------------------------- 8. fidelity
        if args.fid_n:
            t0 = time.perf_counter()
            from ..metrics import InceptionFeatures, fid
            from .taming import cached_features

            inc = InceptionFeatures.load()
            ref_files = [p for p in ids if REF_FIRST <= int(p.stem) <= REF_LAST][: args.fid_reference]
            ref = cached_features(ref_files, inc, args.batch)
            _say(f"reference features: {len(ref)} photos ({time.perf_counter() - t0:.0f} s)")
            feats = {"unfingerprinted": [], "instance-000": []}
            psnr, same = [], []
            for (xa, pa), (xb, pb) in zip(_faces(gen, args.fid_n, seed, args.batch, provenance=True),
                                          _faces(first_instance, args.fid_n, seed, args.batch, provenance=True)):
                feats["unfingerprinted"].append(inc.features(xa))
                feats["instance-000"].append(inc.features(xb))
                psnr.append(_psnr_each(xb, xa))
                same.append((pa == pb).double().flatten(1).mean(1))
            fids = {k: float(fid(np.concatenate(v), ref)) for k, v in feats.items()}
            p = torch.cat(psnr)
            same_share = float(torch.cat(same).mean())
            d_fid = fids["instance-000"] - fids["unfingerprinted"]
            timing["FID (s)"] = time.perf_counter() - t0
            T(f"Fidelity: FID of {args.fid_n} faces (seed {seed}) vs {len(ref)} celeba-10k photos "
              f"{REF_FIRST:06d}-{REF_FIRST + len(ref) - 1:06d}",
              ["model", "FID", "vs unfingerprinted", "PSNR vs unfingerprinted, same seed (dB)", "same provenance"],
              [["unfingerprinted", f"{fids['unfingerprinted']:.2f}", "-", "-", "-"],
               ["instance-000 (step %g)" % key.config.step, f"{fids['instance-000']:.2f}", f"{d_fid:+.2f}",
                f"{float(p.mean()):.2f} (median {float(p.median()):.2f}, min {float(p.min()):.2f})",
                f"{same_share:.3f}"]],
              note=f"Criterion \"FID within +2 of the unfingerprinted model\": {'met' if d_fid <= 2 else 'NOT met'}.")
            doc["fidelity"] = {"n": args.fid_n, "reference": len(ref), "fid": fids, "fid_difference": d_fid,
                               "psnr_db_mean": float(p.mean()), "psnr_db_min": float(p.min()),
                               "psnr_db_median": float(p.median()), "same_provenance_share": same_share}

    timing["total (s)"] = time.perf_counter() - t_start
    T("Time", ["stage", "value"], [[k, f"{v:.1f}"] for k, v in timing.items()])
    doc["timing"] = timing
    json_path, md_path = args.out / "attribution-datalevel.json", args.out / "attribution-datalevel.md"
    atomic_write_text(json_path, json.dumps(doc, indent=1, default=float) + "\n")
    atomic_write_text(md_path, "# Attribution, false positives and fidelity: datalevel-bank "
                      "(`python -m faceprint.bench attribution --mechanism datalevel-bank`)\n"
                      + "".join(T.md))
    print(f"\nwrote {json_path} and {md_path}", flush=True)
    return 0


# =================================================================================== keyed-bank
KEYED_PARTS = "attribution-keyed-work"  # OUT/<this>: base model, owner folder, finished chunks
KEYED_CHUNK = 500  # negative images per resumable chunk
KEYED_INSTANCE_CHUNK = 10  # issued instances per resumable chunk of positives


def _crops(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--crops takes comma-separated fractions such as 1,0.93,0.86, got {text!r}")
    if not out or out[0] != 1.0 or any(not 0.5 <= f <= 1.0 for f in out):
        raise argparse.ArgumentTypeError(f"--crops must start with 1 and hold fractions in [0.5, 1], got {text!r}")
    return out


def _prefilters(text: str) -> tuple[str, ...]:
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    if not out or out[0] != "none" or len(set(out)) != len(out) or not all(
            t == "none" or (t.startswith("blur") and t[4:].isdigit() and int(t[4:]) % 2 == 1) for t in out):
        raise argparse.ArgumentTypeError(f"--prefilters takes none first, then distinct blurK (odd K), e.g. "
                                         f"none,blur3,blur5; got {text!r}")
    return out


#: settings that change only how images are read: a resumed run reads its positives and negatives again
#: under new ones but keeps its model, instances and FID chunks
READOUT_SETTINGS = ("crops", "weighting", "prefilters")


def _keyed_settings(args) -> dict:
    return {"seed": args.seed, "train": args.train, "instances": args.instances, "faces": args.faces,
            "attack_faces": args.attack_faces, "test_photos": args.test_photos, "test_faces": args.test_faces,
            "fid_n": args.fid_n, "fid_reference": args.fid_reference, "target_fpr": args.target_fpr,
            "batch": args.batch, "attacks": [[c, a, s] for c, a, s in ATTACK_COLUMNS], "crops": list(args.crops),
            "weighting": args.weighting, "prefilters": list(args.prefilters)}


def _run_keyed(args) -> int:
    """The keyed-bank mechanism (:mod:`faceprint.fingerprint.keyed`), the one ``fingerprint issue``
    makes: per-instance secrets, no calibration needed (the null is N(0, 1) by construction;
    the threshold is the normal tail at ``--target-fpr`` with Sidak's correction over the registry).

    1. The base generator (celeba-10k 1..--train) saved in OUT/attribution-keyed-work/ (it holds
       the training photos' latents: the folder is a work folder, never commit it), an owner
       folder there, ``--instances`` instances issued through :func:`owner.issue_instance`.
    2. Positives: instance i draws ``--faces`` faces (seed + 1000 + i), verified clean and the
       first ``--attack-faces`` of them under each attack column, against every issued code.
    3. Test negatives: celeba-10k files after the training set, celeba-id, ``--test-faces`` faces
       of the unfingerprinted model (seed + 2), each verified against every issued code.
    4. Fidelity: FID of the unfingerprinted model and of instance-000, ``--fid-n`` faces each.

    Every chunk (10 instances, 500 negatives, 250 FID faces) is kept in the work folder as it
    finishes; ``--resume`` keeps them, ``--minutes`` stops before a new chunk."""
    import shutil

    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..data.folder import load_image
    from ..fingerprint.keyed import CodePatterns, fingerprint_keyed_instance, threshold_for
    from ..fingerprint.owner import KEYED_MECHANISM, KeyedVerifier, Owner, issue_instance
    from ..fingerprint.verification import clopper_pearson_upper
    from ..io import atomic_write_text, sha256_file
    from ..latent.generator import Generator, GeneratorConfig
    from ..seeding import derive_seed
    from .taming import DATA

    t_start = time.perf_counter()
    ds = args.datasets or DATA
    for sub in ("celeba-10k", "celeba-id"):
        if not (ds / sub / "images").is_dir():
            print(f"datasets not found: {ds / sub / 'images'} is missing; pass --datasets", file=sys.stderr)
            return 2
    for _col, name, strength in ATTACK_COLUMNS[1:]:
        _attack_spec(name, strength, None)
    seed = args.seed
    if args.crops is None:
        from ..fingerprint.keyed import DEFAULT_CROPS

        args.crops = DEFAULT_CROPS
    if args.weighting is None:
        from ..fingerprint.keyed import DEFAULT_WEIGHTING

        args.weighting = DEFAULT_WEIGHTING
    if args.prefilters is None:
        from ..fingerprint.keyed import DEFAULT_PREFILTERS

        args.prefilters = DEFAULT_PREFILTERS
    work = args.out / KEYED_PARTS
    settings = _keyed_settings(args)
    sig_path = work / "settings.json"
    if args.resume and sig_path.is_file():
        old = json.loads(sig_path.read_text())
        old.setdefault("crops", [1.0])  # runs from before the crop search read the full frame only
        old.setdefault("weighting", "none")  # and without the per-pixel weighting
        old.setdefault("prefilters", ["none"])  # and without pre-filters
        new = json.loads(json.dumps(settings))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff and set(diff) <= set(READOUT_SETTINGS):
            stale = sorted((work / "parts").glob("positives-*.json")) + sorted((work / "parts").glob("negatives-*.json"))
            for f in stale:
                f.unlink()
            _say(f"--resume: the read-out changed ({', '.join(diff)}): {len(stale)} positive and negative chunks "
                 "are read again; the model, instances and FID chunks are kept")
        elif diff:
            print(f"--resume: the run in {work} used other settings ({', '.join(diff)}); rerun with them, or without "
                  "--resume to start over", file=sys.stderr)
            return 2
    elif work.exists():
        shutil.rmtree(work)
    (work / "parts").mkdir(parents=True, exist_ok=True)
    atomic_write_text(sig_path, json.dumps(settings, indent=1) + "\n")
    deadline = None if args.minutes is None else t_start + 60 * args.minutes
    stopped = []

    def budget_left(what: str) -> bool:
        if deadline is not None and time.perf_counter() > deadline:
            if not stopped:
                _say(f"--minutes {args.minutes:g} used up before {what}: rerun with --resume to go on")
            stopped.append(what)
            return False
        return True

    def part(name: str, make):
        """The JSON result of chunk ``name``: kept from an earlier run, or made now and kept."""
        f = work / "parts" / f"{name}.json"
        if f.is_file():
            return json.loads(f.read_text())
        if not budget_left(name):
            return None
        t = time.perf_counter()
        d = make()
        d["seconds"] = time.perf_counter() - t
        atomic_write_text(f, json.dumps(d) + "\n")
        return d

    T = _Tables()
    info = describe({
        "seed": seed, "mechanism": "keyed-bank", "train photos": f"celeba-10k 1-{args.train}",
        "instances": args.instances, "faces per instance": args.faces,
        "target false-accusation rate per image": args.target_fpr,
        "test": f"celeba-10k {args.train + 1:06d}-010000 + celeba-id "
                f"({'all' if args.test_photos is None else f'first {args.test_photos} each'}) + "
                f"{args.test_faces} unfingerprinted faces",
        "read-out crops": "full frame only" if tuple(args.crops) == (1.0,) else
                          "centre crops tried: " + ", ".join(f"{f:g}" for f in args.crops),
        "read-out weighting": {"pixel": "per-pixel inverse energy (floored)", "none": "none"}[args.weighting],
        "read-out pre-filters": ", ".join(args.prefilters),
        "FID": f"{args.fid_n} faces per model vs celeba-10k {REF_FIRST:06d}-{REF_FIRST + args.fid_reference - 1:06d}"
               if args.fid_n else "skipped"})
    T("Machine and settings", ["item", "value"], [[k, v] for k, v in info.items()])
    doc: dict = {"machine": info, "seed": seed, "mechanism": "keyed-bank", "settings": settings}

    # ------------------------------------------------------------------ 1. base model, owner, instances
    ae = TAEF2.load(args.weights)
    model_path = work / "model.safetensors"
    if not model_path.is_file():
        t0 = time.perf_counter()
        ts = encode_folder(FaceFolder(ds / "celeba-10k" / "images", size=128, limit=args.train), ae, cache=LatentCache())
        Generator(GeneratorConfig(), autoencoder=ae).fit(ts, seed=seed).save(model_path)
        _say(f"generator fitted on {len(ts)} photos ({time.perf_counter() - t0:.0f} s)")
        del ts
    model_hash = sha256_file(model_path)
    gen = Generator.load(model_path, autoencoder=ae)
    owner = Owner(work / "owner")
    with owner.open_registry() as reg:
        have = {e.instance for e in reg.all()} if owner.secret_path.is_file() else set()
    for i in range(args.instances):
        name = f"instance-{i:03d}"
        if name not in have:
            issue_instance(gen, model_hash, owner, f"recipient-{i:03d}", name,
                           seed=derive_seed(seed, "attribution-code", i), mechanism=KEYED_MECHANISM)
    with owner.open_registry(create=False) as reg:
        entries = sorted((e for e in reg.all() if e.mechanism == KEYED_MECHANISM), key=lambda e: e.instance)
    entries = entries[: args.instances]
    verifier = KeyedVerifier(owner, entries, ae, target_fpr=args.target_fpr, crops=tuple(args.crops),
                             weighting=args.weighting, prefilters=tuple(args.prefilters))
    secret = verifier.secret
    (index, group), = verifier.groups
    codes = [e.code for e in group]
    k_reg = len(codes)
    thr = verifier.threshold
    lax = threshold_for(1e-3, k_reg)
    doc["threshold"], doc["lax_threshold"], doc["sigma"] = thr, lax, secret.config.sigma
    _say(f"{k_reg} keyed instances issued; accuse at T >= {thr:.2f} (Sidak over {k_reg} at {args.target_fpr:g} per "
         f"image; at 1e-3: {lax:.2f})")

    t0 = time.perf_counter()
    patterns = CodePatterns(secret, codes, gen.bank_.shape[0])  # every code's pattern, expanded once
    _say(f"patterns of {k_reg} codes expanded ({patterns.nbytes / 2**30:.1f} GiB, {time.perf_counter() - t0:.0f} s)")

    def score_matrix(x):  # (n, k_reg): KeyedVerifier's computation, keeping every instance's score
        return index.residuals(x, batch=64).scores(secret, codes, patterns=patterns)

    # ------------------------------------------------------------------ 2. positives
    n_att = min(args.faces, args.attack_faces or args.faces)
    pos_parts = []
    for c0 in range(0, k_reg, KEYED_INSTANCE_CHUNK):
        def make(c0=c0):
            cols = {col: {"own": [], "best": [], "best_is_own": []} for col, _, _ in ATTACK_COLUMNS}
            for i in range(c0, min(c0 + KEYED_INSTANCE_CHUNK, k_reg)):
                e = group[i]
                inst = fingerprint_keyed_instance(gen, secret, e.code, {"instance": e.instance})
                x = torch.cat(list(_faces(inst, args.faces, seed + 1000 + i, args.batch)))
                for col, aname, strength in ATTACK_COLUMNS:
                    xa = x if aname is None else _attack(x[:n_att], aname, strength, seed, i, ae)
                    sc = score_matrix(xa)
                    v, j = sc.max(1)
                    cols[col]["own"] += sc[:, i].tolist()
                    cols[col]["best"] += v.tolist()
                    cols[col]["best_is_own"] += (j == i).tolist()
            return cols
        d = part(f"positives-{c0:03d}", make)
        if d is None:
            break
        pos_parts.append(d)
        _say(f"positives: instances {c0}-{min(c0 + KEYED_INSTANCE_CHUNK, k_reg) - 1} ({d['seconds']:.0f} s)")
    pos_done = min(k_reg, len(pos_parts) * KEYED_INSTANCE_CHUNK)
    rows, pos_doc = [], {}
    if pos_parts:
        for col, _, _ in ATTACK_COLUMNS:
            own = np.array([s for p in pos_parts for s in p[col]["own"]])
            best = np.array([s for p in pos_parts for s in p[col]["best"]])
            is_own = np.array([b for p in pos_parts for b in p[col]["best_is_own"]], dtype=bool)
            match = best >= thr
            right, wrong = float((match & is_own).mean()), float((match & ~is_own).mean())
            lax_right = float(((best >= lax) & is_own).mean())
            pos_doc[col] = {"n": int(own.size), "right": right, "not_ours": float((~match).mean()), "wrong": wrong,
                            "right_at_1e-3": lax_right, "own_score_median": float(np.median(own)),
                            "own_score_p5": float(np.percentile(own, 5)), "own_scores": own.round(3).tolist()}
            rows.append([col, int(own.size), f"{np.median(own):.1f}", f"{np.percentile(own, 5):.1f}", _pct(right),
                         _pct(float((~match).mean())), _pct(wrong), _pct(lax_right)])
        T(f"Attribution of {pos_done} keyed instances x {args.faces} faces (8-bit; {n_att} per instance under each "
          f"attack), verified against the registry of {k_reg} (accuse at T >= {thr:.2f})",
          ["attack", "faces", "own score: median", "p5", "right instance", '"not ours"', "wrong instance",
           "right at 1e-3"], rows,
          note="Score T: the normalised correlation of the image's residual (image latent minus its rendered, "
               "pattern-free reference) with the instance's keyed pattern; N(0, 1) for any image the instance did "
               "not make. Attacks: faceprint.fingerprint.attacks at papers/004's working range (as the datalevel "
               "table). \"Wrong instance\": the best-scoring code above the threshold is another recipient's.")
    doc["attribution"] = {"instances_measured": pos_done, "faces_per_instance": args.faces, "attacked_per_instance": n_att,
                          "columns": pos_doc}

    # ------------------------------------------------------------------ 3. test negatives
    ids = sorted(p for p in (ds / "celeba-10k" / "images").iterdir() if p.stem.isdigit())
    test10k = [p for p in ids if args.train < int(p.stem) <= 10000]
    idp = sorted(p for p in (ds / "celeba-id" / "images").rglob("*") if p.is_file() and not p.name.startswith("."))
    if args.test_photos is not None:
        test10k, idp = test10k[: args.test_photos], idp[: args.test_photos]
    sources = [(f"celeba-10k {args.train + 1:06d}-010000 photos", test10k), ("celeba-id photos", idp),
               ("unfingerprinted faces", args.test_faces)]
    neg: dict[str, list] = {}
    for label, src in sources:
        n_src = src if isinstance(src, int) else len(src)
        neg[label] = []
        for c0 in range(0, n_src, KEYED_CHUNK):
            def make(src=src, c0=c0, n_src=n_src):
                if isinstance(src, int):
                    m = min(KEYED_CHUNK, n_src - c0)
                    smp = gen.sample_latents(m, seed=seed + 2, start=c0, guard=None)
                    x = _q8(ae.decode(smp.latents.float()))
                else:
                    x = torch.stack([load_image(f, 128) for f in src[c0:c0 + KEYED_CHUNK]])
                sc = score_matrix(x)
                return {"best": sc.max(1).values.tolist(), "all_mean": float(sc.mean()), "all_sq": float(sc.pow(2).mean()),
                        "all_n": int(sc.numel())}
            d = part(f"negatives-{label.split()[0]}-{'faces' if isinstance(src, int) else 'photos'}-{c0:05d}", make)
            if d is None:
                break
            neg[label].append(d)
        if neg[label]:
            _say(f"negatives: {label}: {sum(len(d['best']) for d in neg[label])} of {n_src}")
    rows, neg_doc = [], {}
    all_best = []
    for label, parts in neg.items():
        if not parts:
            continue
        best = np.array([s for d in parts for s in d["best"]])
        n_all = sum(d["all_n"] for d in parts)
        mean = sum(d["all_mean"] * d["all_n"] for d in parts) / n_all
        std = math.sqrt(max(sum(d["all_sq"] * d["all_n"] for d in parts) / n_all - mean ** 2, 0))
        f1, f3 = int((best >= thr).sum()), int((best >= lax).sum())
        exp3 = best.size * 1e-3
        neg_doc[label] = {"n": int(best.size), "false_matches": f1, "false_matches_at_1e-3": f3,
                          "expected_at_1e-3": exp3, "max_best_score": float(best.max()),
                          "score_mean_all_codes": mean, "score_std_all_codes": std}
        rows.append([label, int(best.size), f1, f"{f3} ({exp3:.1f} expected)", f"{best.max():.2f}",
                     f"{mean:+.3f} / {std:.3f}"])
        all_best.append(best)
    n_test = int(sum(b.size for b in all_best))
    n_false = int(sum((b >= thr).sum() for b in all_best))
    ub = clopper_pearson_upper(n_false, n_test) if n_test else 1.0
    met_neg = n_false == 0 and n_test >= 10_000
    if rows:
        rows.append(["all test negatives", n_test, n_false, int(sum((b >= lax).sum() for b in all_best)),
                     f"{max(float(b.max()) for b in all_best):.2f}", "-"])
        T(f"Test negatives verified against the registry of {k_reg} (no calibration set: the threshold comes from the "
          "score's known null)",
          ["source", "images", f"false matches (T >= {thr:.2f})", f"at 1e-3 (T >= {lax:.2f})", "highest score",
           f"score mean / std over all {k_reg} codes"], rows,
          note=f"False matches: {n_false} among {n_test} test negatives (95 % upper bound on the rate {ub:.2g}; the "
               f"bound the threshold promises: {args.target_fpr:g} per image). The score of an image against a code that "
               f"did not make it should be N(0, 1): the last column checks it. Criterion \"zero false matches among "
               f">= 10,000 negatives\": {'met' if met_neg else 'NOT met'}"
               f"{'' if n_test >= 10_000 else f' (only {n_test} test negatives so far)'}.")
    doc["test_negatives"] = {"n": n_test, "false_matches": n_false, "false_match_rate_upper_bound": ub,
                             "zero_false_matches_among_10000": met_neg, "sources": neg_doc}

    # ------------------------------------------------------------------ 4. fidelity
    if args.fid_n:
        from ..metrics import InceptionFeatures, fid
        from .taming import cached_features

        inc = InceptionFeatures.load()
        ref_files = [p for p in ids if REF_FIRST <= int(p.stem) <= REF_LAST][: args.fid_reference]
        inst0 = fingerprint_keyed_instance(gen, secret, group[0].code, {"instance": group[0].instance})
        chunks = []
        for s0 in range(0, args.fid_n, args.batch):
            def make(s0=s0):
                m = min(args.batch, args.fid_n - s0)
                a = gen.sample_latents(m, seed=seed, start=s0)
                b = inst0.sample_latents(m, seed=seed, start=s0)
                xa, xb = _q8(ae.decode(a.latents.float())), _q8(ae.decode(b.latents.float()))
                return {"base": inc.features(xa).tolist(), "instance": inc.features(xb).tolist(),
                        "psnr": _psnr_each(xb, xa).tolist(),
                        "same": (a.provenance == b.provenance).double().flatten(1).mean(1).tolist()}
            d = part(f"fid-{s0:05d}", make)
            if d is None:
                break
            chunks.append(d)
        n_f = sum(len(d["psnr"]) for d in chunks)
        if n_f == args.fid_n:
            ref = cached_features(ref_files, inc, args.batch)
            fb = float(fid(np.array([f for d in chunks for f in d["base"]]), ref))
            fi = float(fid(np.array([f for d in chunks for f in d["instance"]]), ref))
            p = np.array([v for d in chunks for v in d["psnr"]])
            same = float(np.mean([v for d in chunks for v in d["same"]]))
            T(f"Fidelity: FID of {args.fid_n} faces (seed {seed}) vs {len(ref)} celeba-10k photos "
              f"{REF_FIRST:06d}-{REF_FIRST + len(ref) - 1:06d}",
              ["model", "FID", "vs unfingerprinted", "PSNR vs unfingerprinted, same seed (dB)", "same provenance"],
              [["unfingerprinted", f"{fb:.2f}", "-", "-", "-"],
               [f"instance-000 (sigma {secret.config.sigma:g})", f"{fi:.2f}", f"{fi - fb:+.2f}",
                f"{p.mean():.2f} (median {np.median(p):.2f}, min {p.min():.2f})", f"{same:.3f}"]],
              note=f"Criterion \"FID within +2 of the unfingerprinted model\": {'met' if fi - fb <= 2 else 'NOT met'}. "
                   "A keyed instance re-estimates its mixture on the marked bank (so the released mixture does not "
                   "reveal the mark), so the same seed draws another face: the PSNR column compares different faces, "
                   "not the mark's visibility (that is measured by `bench redteam` on the same latent pixels).")
            doc["fidelity"] = {"n": args.fid_n, "reference": len(ref), "fid": {"unfingerprinted": fb, "instance-000": fi},
                               "fid_difference": fi - fb, "psnr_db_mean": float(p.mean()), "psnr_db_min": float(p.min()),
                               "same_provenance_share": same}
        else:
            doc["fidelity"] = {"faces_done": n_f, "of": args.fid_n}

    seconds = {f.stem: json.loads(f.read_text())["seconds"] for f in sorted((work / "parts").glob("*.json"))}
    timing = {"positives (s, all chunks)": sum(v for k, v in seconds.items() if k.startswith("positives")),
              "negatives (s, all chunks)": sum(v for k, v in seconds.items() if k.startswith("negatives")),
              "FID faces + features (s, all chunks)": sum(v for k, v in seconds.items() if k.startswith("fid")),
              "this invocation (s)": time.perf_counter() - t_start}
    T("Time (sums of the chunks' own times, over every run that made them)", ["stage", "value"],
      [[k, f"{v:.1f}"] for k, v in timing.items()])
    doc["timing"] = timing
    doc["complete"] = not stopped
    json_path, md_path = args.out / "attribution-keyed.json", args.out / "attribution-keyed.md"
    atomic_write_text(json_path, json.dumps(doc, indent=1, default=float) + "\n")
    atomic_write_text(md_path, "# Attribution, false positives and fidelity: keyed-bank "
                      "(`python -m faceprint.bench attribution --mechanism keyed-bank`)\n"
                      + ("\nIncomplete: the --minutes budget ran out; rerun with --resume to add the missing chunks.\n"
                         if stopped else "") + "".join(T.md))
    print(f"\nwrote {json_path} and {md_path}" + (" (incomplete: rerun with --resume)" if stopped else ""), flush=True)
    return 0
