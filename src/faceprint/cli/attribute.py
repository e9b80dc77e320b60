"""`faceprint attribute`: which known source made an image, without a fingerprint (papers/004
Ch. 4; the work is in faceprint.attribution).

    faceprint attribute IMAGE... [--classifier FILE] [--json] [--allow-resize] [--allow-convert]
    faceprint attribute train NAME=SOURCE... -o FILE [--per-source N] [--epochs E] [--seed S]

``train`` as the first word selects training (an image file literally named "train" is read as
an image: write ./train). A SOURCE is ``photos:FOLDER`` (real photos as they are),
``roundtrip:FOLDER`` (real photos through TAEF2), ``images:FOLDER`` (128 x 128 images someone
else generated, read as they are), or ``MODEL.safetensors[:method=M]`` (faces of a faceprint
model).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import InputError

ENV_CLASSIFIER = "FACEPRINT_ATTRIBUTION_CLASSIFIER"
PACKAGED = Path(__file__).resolve().parents[1] / "attribution" / "weights" / "attribute.safetensors"


def register(sub, *, common) -> None:
    from .main import _number, _positive_int, _seed

    _fraction = _number(float, 0.0, True, "a fraction in (0, 1]", highest=1.0)
    p = sub.add_parser(
        "attribute", help="which known model made an image (learned attribution, no fingerprint needed)",
        description="Answers the most likely source among the classifier's known sources, its probability, or "
                    "'unknown' below the calibrated threshold, with the classifier's measured error rates. "
                    "`faceprint attribute train NAME=SOURCE ... -o FILE` builds a classifier (SOURCE: "
                    "photos:FOLDER, roundtrip:FOLDER, images:FOLDER or MODEL.safetensors[:method=M]).")
    p.add_argument("items", nargs="+", metavar="IMAGE", help="images to attribute (or: train NAME=SOURCE ...)")
    p.add_argument("--classifier", type=Path, default=None,
                   help=f"classifier file (default ${ENV_CLASSIFIER}, then a packaged one if installed)")
    p.add_argument("--json", action="store_true", help="print the answers as JSON")
    p.add_argument("--allow-resize", action="store_true",
                   help="read images that are not 128x128 (centre crop + resize; the answer is marked as weaker evidence)")
    p.add_argument("--allow-convert", action="store_true",
                   help="read grey, CMYK, palette or transparent images (converted to RGB; marked as weaker evidence)")
    p.add_argument("--autoencoder-id", default=None,
                   help="id of the autoencoder whose decoder made the images (default: the installed TAEF2's); "
                        "a classifier trained for another one is refused")
    t = p.add_argument_group("training (faceprint attribute train ...)")
    t.add_argument("-o", "--output", type=Path, default=None, help="classifier file to write (.safetensors)")
    t.add_argument("--per-source", type=_positive_int, default=1000, help="training images per source (default 1000)")
    t.add_argument("--cal", type=_positive_int, default=200, help="held-out images per source for the threshold (default 200)")
    t.add_argument("--test", type=_positive_int, default=200, help="held-out images per source for the error rates (default 200)")
    t.add_argument("--epochs", type=_positive_int, default=10, help="training epochs (default 10)")
    t.add_argument("--coverage", type=_fraction, default=0.95,
                   help="share of held-out known-source images the threshold accepts (default 0.95)")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    common(p)
    p.set_defaults(handler=cmd_attribute)


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def find_classifier(flag_value: Path | None) -> Path:
    if flag_value is not None:
        return flag_value
    env = os.environ.get(ENV_CLASSIFIER)
    if env:
        return Path(env)
    if PACKAGED.is_file():
        return PACKAGED
    raise InputError("no attribution classifier: pass --classifier FILE (written by `faceprint attribute train ... -o "
                     f"FILE` or by `python -m faceprint.bench attribute` as OUT/attribute-classifier.safetensors) or set "
                     f"${ENV_CLASSIFIER}")


def _rates_lines(er: dict) -> list[str]:
    if not er:
        return ["measured error rates: none recorded in this classifier; treat its answers as unmeasured"]
    out = []
    if er.get("test_accuracy") is not None:
        out.append(f"measured on {er.get('n_test', '?')} held-out faces of its sources: accuracy "
                   f"{100 * er['test_accuracy']:.1f} %, coverage at the threshold "
                   f"{100 * er.get('coverage_known', float('nan')):.1f} %, accuracy when answered "
                   f"{100 * (er.get('accuracy_when_answered') or float('nan')):.1f} %")
    for name, r in (er.get("unseen") or {}).items():
        if r.get("n"):
            out.append(f"false attribution on {name}: {r['k']}/{r['n']} ({100 * r['rate']:.2f} %, 95 % bound "
                       f"{100 * r['upper95']:.2f} %)")
    ho = er.get("open_set_held_out")
    if ho and ho.get("n"):
        out.append(f"false attribution with {ho['held_out']!r} held out of training (pooled unseen sources): "
                   f"{ho['k']}/{ho['n']} (95 % bound {100 * ho['upper95']:.2f} %)")
    rob = er.get("robustness_clean_model")
    if rob:
        out.append("accuracy after edits (not immunised): " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in rob.items()))
    out.append("attribution is evidence, not proof: it was measured on the sources above only, and a source's "
               "traces can be imitated")
    return out


def cmd_attribute(args) -> int:
    if args.items and args.items[0] == "train" and not Path("train").is_file():
        return cmd_train(args, args.items[1:])
    if args.output is not None:
        raise InputError("-o/--output is for `faceprint attribute train`; to attribute images, pass only the images")
    import torch

    from ..attribution import Attributor, read_image
    from ..autoencoder import weights_id
    from .safety import regular_input

    if args.threads:
        torch.set_num_threads(args.threads)
    path = find_classifier(args.classifier)
    regular_input("--classifier", path, "classifier file")
    ae_id = args.autoencoder_id or weights_id()
    att = Attributor.load(path, autoencoder_id=ae_id)
    images, notes = [], []
    for item in args.items:
        x, n = read_image(item, resize=args.allow_resize, convert=args.allow_convert)
        images.append(x)
        notes.append(n)
    answers = att.attribute(torch.stack(images), notes=notes)
    if args.json:
        print(json.dumps({"classifier": path.name, "sources": att.sources, "threshold": att.threshold_,
                          "score": att.score, "error_rates": att.error_rates_,
                          "answers": [{"image": str(i), **a.to_dict()} for i, a in zip(args.items, answers)]}, indent=1))
        return 0
    for item, a in zip(args.items, answers):
        if a.source == "unknown":
            line = (f"{item}: unknown (no known source reaches the threshold: nearest {a.nearest!r} with probability "
                    f"{a.probability:.3f}, score {a.score:.3f} < {a.threshold:.3f})")
        else:
            thr = "" if a.threshold is None else f", score {a.score:.3f} >= threshold {a.threshold:.3f}"
            line = f"{item}: {a.source} (probability {a.probability:.3f}{thr})"
        print(line)
        for n in a.notes:
            print(f"  note: {n}")
    print(f"classifier {path.name}: sources {', '.join(att.sources)}")
    for line in _rates_lines(att.error_rates_):
        print("  " + line)
    return 0


# ------------------------------------------------------------------------------------------ training
def _parse_source(text: str):
    if "=" not in text:
        raise InputError(f"source {text!r}: write NAME=SOURCE, e.g. real=roundtrip:photos/ or mine=model.safetensors")
    name, spec = text.split("=", 1)
    if not name or name == "unknown":
        raise InputError(f"source {text!r}: the name before '=' must be non-empty and not 'unknown'")
    for kind in ("photos", "roundtrip", "images"):
        if spec.startswith(kind + ":"):
            folder = Path(spec[len(kind) + 1:])
            if not folder.is_dir():
                raise InputError(f"source {name!r}: {kind} folder {str(folder)!r} does not exist or is not a folder")
            return name, kind, folder, None
    method = None
    if ":method=" in spec:
        spec, method = spec.split(":method=", 1)
    path = Path(spec)
    if path.suffix != ".safetensors":
        raise InputError(f"source {name!r}: {spec!r} is neither photos:FOLDER, roundtrip:FOLDER, images:FOLDER nor a "
                         "faceprint model file (.safetensors)")
    from .safety import regular_input

    regular_input(f"source {name!r}", path, "model file")
    return name, "model", path, method


def _model_images(path, method, n: int, seed: int, split_key: str):
    """n faces of a faceprint model, uint8, from the seed of this (source, split)."""
    import torch

    from ..latent.generator import Generator
    from ..seeding import derive_seed

    gen = Generator.load(path)
    s = derive_seed(seed, "attribute-train", split_key) % 2**62
    out = []
    for start in range(0, n, 64):
        im, _ = gen.generate(min(64, n - start), seed=s, start=start, method=method)
        out.append((im.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def cmd_train(args, specs: list[str]) -> int:
    import torch

    from ..attribution import Attributor, TrainConfig
    from ..attribution.evaluation import accuracy
    from ..attribution.images import read_image
    from ..autoencoder import TAEF2
    from ..data import FaceFolder
    from .safety import check_parent_exists

    if args.output is None or args.output.suffix != ".safetensors":
        raise InputError("faceprint attribute train needs -o FILE.safetensors (the classifier to write)")
    check_parent_exists("-o", args.output)
    parsed = [_parse_source(s) for s in specs]
    if len(parsed) < 2:
        raise InputError(f"faceprint attribute train needs at least 2 sources (NAME=SOURCE), got {len(parsed)}")
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise InputError(f"source names must be distinct, got {names}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ae = TAEF2.load(args.weights)
    need = args.per_source + args.cal + args.test
    splits = {"train": [], "cal": [], "test": []}
    for c, (name, kind, where, method) in enumerate(parsed):
        _say(args, f"source {name}: making {need} images ({kind})")
        if kind == "model":
            parts = {}
            for sp, n in (("train", args.per_source), ("cal", args.cal), ("test", args.test)):
                parts[sp] = _model_images(where, method, n, args.seed, f"{name}/{sp}")
        else:
            folder = FaceFolder(where, size=128)
            if len(folder) < need:
                raise InputError(f"source {name!r}: folder {str(where)!r} has {len(folder)} images, {need} needed "
                                 f"(--per-source {args.per_source} + --cal {args.cal} + --test {args.test}); use fewer")
            xs = []
            for i in range(need):
                if kind == "images":
                    x, _ = read_image(folder.paths[i])
                else:
                    x = folder.load_one(i)
                xs.append(x)
            u8 = (torch.stack(xs) * 255).round().to(torch.uint8)
            if kind == "roundtrip":
                with torch.no_grad():
                    u8 = torch.cat([(ae.decode(ae.encode(u8[s:s + 64].float() / 255)).clamp(0, 1) * 255).round()
                                    .to(torch.uint8) for s in range(0, need, 64)])
            a, b = args.per_source, args.per_source + args.cal
            parts = {"train": u8[:a], "cal": u8[a:b], "test": u8[b:]}
        for sp in splits:
            splits[sp].append((parts[sp], torch.full((parts[sp].shape[0],), c, dtype=torch.int64)))
    data = {sp: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for sp, v in splits.items()}
    att = Attributor(names, ae.id, seed=args.seed)
    prog = None if args.quiet else (lambda m: _say(args, m))
    att.fit(*data["train"], TrainConfig(epochs=args.epochs), seed=args.seed, progress=prog)
    thr = att.calibrate(*data["cal"], coverage=args.coverage)
    xte, yte = data["test"]
    _, pred, s = att.scores(xte)
    ok = s >= thr
    att.error_rates_ = {
        "setup": "faceprint attribute train: " + ", ".join(f"{n} ({k})" for n, k, _, _ in parsed),
        "test_accuracy": accuracy(pred, yte), "n_test": int(xte.shape[0]),
        "coverage_known": float(ok.double().mean()),
        "accuracy_when_answered": accuracy(pred[ok], yte[ok]) if ok.any() else None,
        "per_source_accuracy": {n: accuracy(pred[yte == c], yte[yte == c]) for c, n in enumerate(names)},
        "unseen": {}, "note": "no unseen source was measured: the false-attribution rate on other sources is unknown "
                              "(python -m faceprint.bench attribute measures it for faceprint's models)"}
    att.save(args.output)
    print(f"wrote {args.output}: {len(names)} sources, test accuracy {100 * att.error_rates_['test_accuracy']:.1f} % on "
          f"{int(xte.shape[0])} held-out images, threshold {thr:.4f} ({100 * args.coverage:.0f} % coverage)")
    return 0
