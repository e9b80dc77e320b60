"""`python -m faceprint.bench recognisers`: how far the offline recognisers can be trusted.

Identity (faceprint.recognition.identity, dlib's face descriptor) on celeba-id: the
verification ROC on all pairs of the chosen photos (true and false accept rates at a few
thresholds, the thresholds at false accept rates 1e-2 and 1e-3) for several ways of presenting
the face: the native 178 px centre square, the 128 px working resolution (landmark alignment,
fixed alignment, no alignment) and 128 px photos after a TAEF2 round trip (what generated faces
go through); then the gallery decision rule ("is this face person P": distance to the mean
descriptor of P's k enrolment photos) with its genuine and impostor accept rates, its threshold
calibrated on half of the people and measured on the other half.

Attributes (faceprint.recognition.attributes): held-out accuracy, balanced accuracy, TPR and
FPR of the shipped classifiers (celeba-10k's 40 attributes; utkface gender, race, age band) on
their held-out split, the comparison of inputs that chose the classifier (``--compare-inputs``),
and the cross-dataset check of gender. ``--train-attributes`` retrains the classifiers and
writes their artifacts (default into the package's weights folder).

Descriptors and latents of the photos are computed at run time (latents through the latent
cache, outside the repository); nothing derived from the photos is written into the repository.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .machine import describe, print_table

VARIANTS = {
    "native": "178 px centre square of the original, 5-point landmarks -> 150 px chip",
    "128": "128 px working resolution (load_image), 5-point landmarks -> chip upsampled to 150 px",
    "128-fixed": "128 px, fixed mean landmarks (no landmark model) -> 150 px chip",
    "128-resize": "128 px resized to 150 px as a whole, no alignment",
    "128-ae": "128 px after a TAEF2 encode/decode round trip, 5-point landmarks -> 150 px chip",
}
ROC_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
GALLERY_THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6)
KEY_ATTRIBUTES = ("Male", "Eyeglasses", "Bald", "Young", "Smiling", "Blond_Hair")


def _shared() -> Path:
    from ..autoencoder.weights import _repo_root

    root = _repo_root()
    base = root.parent if root is not None else Path.cwd().parent
    return base / "shared" / "datasets"


def add_arguments(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the attribute splits and training (default 0)")
    p.add_argument("--skip-identity", action="store_true", help="do not run the identity part")
    p.add_argument("--skip-attributes", action="store_true", help="do not run the attribute part")
    p.add_argument("--identity-data", type=Path, default=None, help="celeba-id folder (default ../shared/datasets/celeba-id)")
    p.add_argument("--people", type=int, default=160, help="people of celeba-id, in identity order (default 160 = all)")
    p.add_argument("--per-person", type=int, default=10, help="photos per person, first in file order (default 10 of 30)")
    p.add_argument("--variants", default="native,128,128-fixed,128-resize,128-ae",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--enrol", type=int, default=5, help="enrolment photos per person for the gallery rule (default 5)")
    p.add_argument("--attributes-data", type=Path, default=None, help="folder holding celeba-10k and utkface (default ../shared/datasets)")
    p.add_argument("--train-attributes", action="store_true", help="(re)train the attribute classifiers and write their artifacts")
    p.add_argument("--weights-out", type=Path, default=None,
                   help="folder for the trained artifacts (default: the package's recognition/weights)")
    p.add_argument("--compare-inputs", action="store_true",
                   help="also compare classifier inputs (raw/pooled latents, linear/conv) on celeba-10k (minutes)")
    p.add_argument("--skip-roundtrip", action="store_true",
                   help="do not re-measure the classifiers on held-out photos after a TAEF2 round trip (minutes); "
                        "report the round-trip rates stored in the artifacts instead")
    p.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")


# ------------------------------------------------------------------------------------------------
# identity


def _celeba_id_files(root: Path, people: int, per_person: int):
    from ..data import read_labels

    table = read_labels(root / "identities.csv")
    ids = table.column("identity")
    by_person: dict[str, list[str]] = {}
    for key, pid in zip(table.keys, ids):
        by_person.setdefault(pid, []).append(key)
    chosen = sorted(by_person, key=lambda s: (len(s), s))[:people]
    files, labels = [], []
    for pid in chosen:
        for key in sorted(by_person[pid])[:per_person]:
            files.append(root / key)
            labels.append(pid)
    return files, labels


def _native_square(path: Path) -> torch.Tensor:
    """(3, S, S) float in [0, 1]: the centre square of the photo at its own resolution."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top : top + s, left : left + s]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / 255.0


def _descriptors(variant: str, files, ae) -> torch.Tensor:
    from PIL import Image

    from ..data import load_image
    from ..recognition.identity import IdentityConfig, IdentityRecogniser

    align = {"128-fixed": "fixed", "128-resize": "chip"}.get(variant, "landmarks")
    rec = IdentityRecogniser(IdentityConfig(align=align))
    out = []
    batch = 16
    for s in range(0, len(files), batch):
        part = files[s : s + batch]
        if variant == "native":
            for f in part:
                out.append(rec.describe(_native_square(f)[None]))
            continue
        x = torch.stack([load_image(f, 128) for f in part])  # (B, 3, 128, 128)
        if variant == "128-ae":
            x = ae.decode(ae.encode(x))
        elif variant == "128-resize":
            u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            x = torch.stack([torch.from_numpy(np.array(Image.fromarray(a).resize((150, 150), Image.Resampling.BICUBIC)))
                             for a in u8]).permute(0, 3, 1, 2).float() / 255.0
        out.append(rec.describe(x))
    return torch.cat(out)


def _fmt(x: float, nd: int = 4) -> str:
    return f"{x:.{nd}f}"


def _run_identity(args, results: dict) -> None:
    from ..recognition.identity import gallery_rates, pair_distances, roc_points, threshold_at_far

    root = args.identity_data or (_shared() / "celeba-id")
    files, labels = _celeba_id_files(root, args.people, args.per_person)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    ae = None
    if "128-ae" in variants:
        from ..autoencoder import TAEF2

        ae = TAEF2.load()
    n_people = len(set(labels))
    print(f"\nidentity: {len(files)} photos of {n_people} people of {root} ({args.per_person} per person, first in file order)")
    desc, timing = {}, {}
    for v in variants:
        t = time.perf_counter()
        desc[v] = _descriptors(v, files, ae)
        timing[v] = (time.perf_counter() - t) / len(files)
        print(f"  {v}: {timing[v] * 1000:.0f} ms per face", flush=True)

    rows = []
    res = results.setdefault("identity", {"data": str(root), "photos": len(files), "people": n_people,
                                          "per_person": args.per_person, "variants": {}})
    for v in variants:
        gen, imp = pair_distances(desc[v], labels)
        pts = roc_points(gen, imp, ROC_THRESHOLDS)
        t2, t3 = threshold_at_far(imp, 1e-2), threshold_at_far(imp, 1e-3)
        at = roc_points(gen, imp, [t2, t3])
        res["variants"][v] = {"description": VARIANTS[v], "roc": pts, "threshold_far_1e-2": t2, "threshold_far_1e-3": t3,
                              "tar_far_1e-2": at[0]["tar"], "tar_far_1e-3": at[1]["tar"],
                              "genuine_pairs": int(gen.size), "impostor_pairs": int(imp.size), "ms_per_face": timing[v] * 1000}
        for p in pts:
            rows.append([v, _fmt(p["threshold"], 2), _fmt(p["tar"]), _fmt(p["far"], 5)])
        rows.append([v, f"{t2:.3f} (FAR 1e-2)", _fmt(at[0]["tar"]), _fmt(at[0]["far"], 5)])
        rows.append([v, f"{t3:.3f} (FAR 1e-3)", _fmt(at[1]["tar"]), _fmt(at[1]["far"], 5)])
    g0, i0 = pair_distances(desc[variants[0]], labels)
    print_table(f"Identity verification ROC on celeba-id: all pairs of {len(files)} photos "
                f"({g0.size} genuine, {i0.size} impostor); accept when distance < threshold",
                ["input", "threshold", "true accept rate", "false accept rate"], rows)
    print("\n" + "\n".join(f"- {v}: {VARIANTS[v]}" for v in variants))

    # ---------------------------------------------------------------- gallery rule
    gal_variants = [v for v in ("128", "128-ae", "native") if v in desc]
    if not gal_variants or args.per_person <= args.enrol:
        return
    people = list(dict.fromkeys(labels))
    half_a = set(people[0::2])
    lab = np.asarray(labels)
    in_a = np.array([x in half_a for x in labels])
    rows, cal_rows = [], []
    res["gallery"] = {"enrol": args.enrol, "rules": {}}
    for v in gal_variants:
        for rule in ("mean", "any"):
            pts = gallery_rates(desc[v], labels, enrol=args.enrol, thresholds=GALLERY_THRESHOLDS, rule=rule)
            res["gallery"]["rules"][f"{v}/{rule}"] = pts
            for p in pts:
                rows.append([v, rule, _fmt(p["threshold"], 2), _fmt(p["genuine_accept"]), _fmt(p["impostor_accept"], 5)])
            # calibrate on half A at impostor accept <= 1e-3, measure on half B
            fine = np.round(np.arange(0.30, 0.70, 0.005), 3)
            cal = gallery_rates(desc[v][torch.from_numpy(in_a)], lab[in_a], enrol=args.enrol, thresholds=fine, rule=rule)
            ok = [p["threshold"] for p in cal if p["impostor_accept"] <= 1e-3]
            thr = max(ok) if ok else float(fine[0])
            ev = gallery_rates(desc[v][torch.from_numpy(~in_a)], lab[~in_a], enrol=args.enrol, thresholds=[thr], rule=rule)[0]
            res["gallery"]["rules"][f"{v}/{rule}/calibrated"] = {"threshold": thr, **ev}
            cal_rows.append([v, rule, f"{thr:.3f}", _fmt(ev["genuine_accept"]), _fmt(ev["impostor_accept"], 5),
                             ev["genuine_trials"], ev["impostor_trials"]])
    print_table(f"Gallery rule on celeba-id: each person enrolled with their first {args.enrol} photos, the other "
                f"{args.per_person - args.enrol} are probes against every person (accept when distance <= threshold)",
                ["input", "rule", "threshold", "genuine accept", "impostor accept"], rows)
    print_table("Gallery threshold calibrated on the even-indexed half of the people (largest threshold with impostor "
                "accept <= 1e-3), measured on the odd-indexed half",
                ["input", "rule", "threshold", "genuine accept", "impostor accept", "genuine trials", "impostor trials"],
                cal_rows)


# ------------------------------------------------------------------------------------------------
# attributes


def _run_attributes(args, results: dict) -> None:
    from ..recognition import attributes as A

    base = args.attributes_data or _shared()
    command = "python -m faceprint.bench recognisers " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    res = results.setdefault("attributes", {})
    if args.compare_inputs:
        rows, cmp = A.compare_inputs(base / "celeba-10k", seed=args.seed)
        res["compare_inputs"] = cmp
        print_table("celeba-10k: classifier input and model chosen by held-out accuracy (mean over the 40 attributes)",
                    ["input", "model", "params", "train (s)", "mean accuracy", "mean balanced accuracy"], rows)
    models = {}
    for name in A.DATASETS:
        if args.train_attributes:
            out_dir = args.weights_out or A.weights_dir()
            out_dir.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            clf = A.train_dataset(name, base, seed=args.seed, command=command)
            dt = time.perf_counter() - t
            path = out_dir / f"{name}.safetensors"
            clf.save(path)
            print(f"\ntrained {name} in {dt:.1f} s -> {path} ({path.stat().st_size / 1024:.0f} KB)")
            res.setdefault("training", {})[name] = {"seconds": dt, "path": str(path), "bytes": path.stat().st_size}
        else:
            clf = A.load_classifier(name) if args.weights_out is None else A.AttributeClassifier.load(args.weights_out / f"{name}.safetensors")
        models[name] = clf
    for name, clf in models.items():
        ev = A.evaluate_dataset(clf, name, base)
        res[name] = {"provenance": clf.provenance, "metrics": ev}
        rows = []
        for task, m in ev.items():
            if m["kind"] == "binary":
                rows.append([task, m["n"], _fmt(m["prevalence"], 3), _fmt(m["majority"], 3), _fmt(m["accuracy"], 3),
                             _fmt(m["balanced_accuracy"], 3), _fmt(m["tpr"], 3), _fmt(m["fpr"], 3)])
            else:
                rows.append([task, m["n"], "-", _fmt(m["majority"], 3), _fmt(m["accuracy"], 3),
                             _fmt(m["balanced_accuracy"], 3), "-", "-"])
        prov = clf.provenance
        print_table(f"{name}: held-out accuracy ({prov.get('split', {}).get('rule', '')}; seed {prov.get('seed')})",
                    ["attribute", "held-out n", "prevalence", "majority rate", "accuracy", "balanced accuracy", "TPR", "FPR"],
                    rows)
        for task, m in ev.items():
            if m["kind"] == "multiclass":
                classes = m["classes"]
                crow = [[c, *[_fmt(x, 3) for x in r], m["support"][i]] for i, (c, r) in enumerate(zip(classes, m["confusion"]))]
                print_table(f"{name} {task}: confusion rates P(predicted | true) on held-out photos, per-class recall on the diagonal",
                            ["true \\ predicted", *classes, "n"], crow)
    rows = []
    for name, clf in models.items():
        t = time.perf_counter()
        if args.train_attributes or args.skip_roundtrip:  # measured when the artifact was trained
            ev = clf.metrics_roundtrip_
        else:
            ev = A.evaluate_dataset(clf, name, base, roundtrip=True)
        res[name]["metrics_roundtrip"] = ev
        res[name]["roundtrip_seconds"] = time.perf_counter() - t
        for task in (KEY_ATTRIBUTES if name == "celeba" else [t.name for t in clf.tasks]):
            m, m0 = ev[task], res[name]["metrics"][task]
            rows.append([name, task, m["n"], _fmt(m0["accuracy"], 3), _fmt(m["accuracy"], 3),
                         _fmt(m0["balanced_accuracy"], 3), _fmt(m["balanced_accuracy"], 3),
                         _fmt(m["tpr"], 3) if "tpr" in m else "-", _fmt(m["fpr"], 3) if "fpr" in m else "-"])
    where = ("stored in the artifacts when they were trained (--skip-roundtrip)"
             if args.skip_roundtrip and not args.train_attributes else "measured now")
    print_table("Held-out photos after a TAEF2 decode -> encode round trip (what classify() sees of a generated "
                f"face; round-trip figures {where})",
                ["classifier", "attribute", "n", "accuracy (photo)", "accuracy (round trip)",
                 "balanced (photo)", "balanced (round trip)", "TPR (round trip)", "FPR (round trip)"], rows)
    if "celeba" in models and "utkface" in models:
        cross = A.cross_gender(models, base)
        res["cross_gender"] = cross
        print_table("Gender across datasets (each classifier on the other dataset's held-out photos)",
                    ["classifier", "photos", "n", "accuracy", "balanced accuracy"],
                    [[r["classifier"], r["photos"], r["n"], _fmt(r["accuracy"], 3), _fmt(r["balanced_accuracy"], 3)] for r in cross])


def run(args) -> int:
    torch.set_num_threads(max(1, args.threads))
    results: dict = {"machine": describe({"seed": args.seed, "dlib": _dlib_version()})}
    print_table("Machine and settings", ["item", "value"], [[k, v] for k, v in results["machine"].items()])
    if not args.skip_identity:
        _run_identity(args, results)
    if not args.skip_attributes:
        _run_attributes(args, results)
    if args.json:
        from ..io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1, default=str))
    return 0


def _dlib_version() -> str:
    try:
        import dlib

        return dlib.__version__
    except ImportError:
        return "not installed"
