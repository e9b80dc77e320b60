"""`faceprint personalize`: new faces of one person from one photo, with chosen attributes
(papers/003, Face2Diffusion, on faceprint's generator; the work is in faceprint.personalize)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError

PACKAGED_MAPPING = Path(__file__).resolve().parents[1] / "personalize" / "weights" / "mapping.safetensors"
MAX_FACES = 4096


def register(sub, *, common) -> None:
    from .main import _number, _seed

    strength = _number(float, 0.0, False, "a number in [0, 4]", highest=4.0)
    faces = _number(int, 0, True, f"a number of faces in [1, {MAX_FACES}]", highest=MAX_FACES)
    p = sub.add_parser("personalize", help="new faces of one person from one photo, with chosen attributes",
                       description="Encode the one face of --photo (no per-person training), then draw -n faces of "
                                   "that person from MODEL's class model for the prompt (--attribute NAME=0|1, "
                                   "checked by faceprint's attribute classifiers). A person a model forgot is refused. "
                                   "Writes OUT/face_NNNNNN.png and OUT/provenance.json (the photo's sha256, never the "
                                   "photo).")
    p.add_argument("model", type=Path, help="a faceprint model (.safetensors), e.g. a fingerprinted instance")
    p.add_argument("--photo", type=Path, required=True, help="the reference photo: one frontal face, >= 64 px wide")
    p.add_argument("--attribute", action="append", default=[], metavar="NAME=0|1",
                   help="a prompt target, e.g. Smiling=1 or Eyeglasses=1 (repeatable)")
    p.add_argument("-n", type=faces, default=16, help="faces to draw (default 16)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the faces and provenance.json")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--strength", type=strength, default=1.0,
                   help="how far the identity coordinates move to the person's (0: class model, 1: set; default 1)")
    p.add_argument("--reference-discount", type=_number(float, 0.0, True, "a number in (0, 1]", highest=1.0),
                   default=0.5, help="inside the face mask, take the reference's own latent pixel where this times its "
                                     "patch distance beats the training photos' (smaller: more of the reference, less "
                                     "of the prompt; default 0.5)")
    p.add_argument("--no-reference-pixels", action="store_true",
                   help="never copy the reference's pixels: only its identity coordinates (every pixel from the bank)")
    p.add_argument("--mapping", type=Path, default=None,
                   help="trained mapping (.safetensors; default: the packaged one, made by "
                        "`python -m faceprint.bench personalize --train-only`)")
    p.add_argument("--labels", type=Path, default=None,
                   help="attribute CSV of the model's training photos (default: the attribute classifier's predictions)")
    p.add_argument("--allow-unmeasured", action="store_true",
                   help="accept attributes whose classifier is unreliable; they are realised but marked unmeasured")
    p.add_argument("--forgotten", type=Path, action="append", default=[], metavar="MODEL",
                   help="also refuse the people this (tamed) model forgot; MODEL itself is always checked")
    p.add_argument("--gallery", type=Path, action="append", default=[], metavar="GALLERY",
                   help="IdentityGallery file of a person who must not be personalised (repeatable)")
    p.add_argument("--save-descriptor", type=Path, default=None, metavar="FILE",
                   help="also write the reference's dlib descriptor (biometric data) to FILE, mode 0600")
    common(p)
    p.set_defaults(handler=cmd_personalize)


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _check_args(args) -> Path:
    from .safety import Plan, check_parent_exists

    mapping = args.mapping or PACKAGED_MAPPING
    if not Path(mapping).is_file():
        raise InputError(f"no trained mapping at {str(mapping)!r}; pass --mapping FILE (train one with "
                         "`python -m faceprint.bench personalize --train-only --out DIR`)")
    plan = Plan()
    plan.input_file("MODEL", args.model).input_file("--photo", args.photo).input_file("--mapping", mapping)
    plan.input_file("--labels", args.labels)
    for f in args.forgotten:
        plan.input_file("--forgotten", f)
    for g in args.gallery:
        plan.input_file("--gallery", g)
    check_parent_exists("-o", args.output)
    plan.output_folder("-o", args.output)
    plan.output_file("-o (provenance)", args.output / "provenance.json", named=False)
    if args.save_descriptor is not None:
        check_parent_exists("--save-descriptor", args.save_descriptor)
        plan.output_file("--save-descriptor", args.save_descriptor)
    plan.check()
    return Path(mapping)


def _labels(path: Path | None, gen) -> dict | None:
    if path is None:
        return None
    from ..data import read_labels

    table = read_labels(path)
    rows = table.match(gen.training_.relpaths, root=gen.training_.root or None)
    return table.values_at(rows, [c for c in table.columns if c != "identity"])


def cmd_personalize(args) -> int:
    import contextlib
    import warnings

    from .. import render
    from ..io import atomic_write_text
    from ..latent.generator import Generator
    from ..personalize import PersonalizeMapping, Personalizer, PromptWarning, save_descriptor
    from ..recognition import IdentityGallery
    from .main import save_png

    mapping_path = _check_args(args)
    for a in args.attribute:  # the prompt's syntax, before anything is loaded
        from ..personalize.prompt import parse_attribute

        parse_attribute(a)
    gen = Generator.load(args.model, weights=args.weights)
    mapping = PersonalizeMapping.load(mapping_path)
    forgotten = [(f"--forgotten {f.name!r}", Generator.load(f, autoencoder=None)) for f in args.forgotten]
    galleries = [IdentityGallery.load(g) for g in args.gallery]
    pers = Personalizer(gen, mapping, forgotten=forgotten, galleries=galleries, labels=_labels(args.labels, gen))
    prompt, _ = pers.prompt(args.attribute, allow_unmeasured=args.allow_unmeasured)  # refuse a bad prompt early
    person = pers.encode(args.photo)
    check = person.consent
    near = check.get("nearest")
    if check.get("galleries"):
        _say(args, f"identity check: not a forgotten person (nearest of {check['galleries']} galleries at distance "
                   f"{near['distance']:.3f} > {check['threshold']}; {check['error_rates']})")
    else:
        _say(args, "identity check: no forgotten person is recorded for this model (nothing to refuse)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptWarning)
        disc = None if args.no_reference_pixels else args.reference_discount
        images, record = pers.generate(person, prompt.targets, n=args.n, seed=args.seed, strength=args.strength,
                                       reference_discount=disc, reimpose=disc is None,
                                       allow_unmeasured=args.allow_unmeasured, progress=not args.quiet)
    for w in caught:
        if issubclass(w.category, PromptWarning):
            _say(args, f"warning: {w.message}")
    args.output.mkdir(exist_ok=True)
    arr = render.to_uint8(images)
    for i in range(args.n):
        save_png(arr[i], args.output / f"face_{i:06d}.png")
    record["files"] = [f"face_{i:06d}.png" for i in range(args.n)]
    record["mapping"]["file"] = mapping_path.name
    atomic_write_text(args.output / "provenance.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    if args.save_descriptor is not None:
        save_descriptor(person, args.save_descriptor)
        _say(args, f"wrote the reference's descriptor to {args.save_descriptor} (mode 0600: biometric data)")
    real = record["realised"]
    parts = [f"{a}: {v['share']:.0%} of faces" if v else f"{a}: unmeasured" for a, v in real.items()]
    inst = record["model"]["fingerprint_instance"]
    _say(args, f"wrote {args.n} faces of the reference person ({prompt.text()}) to {args.output}"
               + (f"; realised: {', '.join(parts)}" if parts else "")
               + (f"; fingerprinted instance {inst!r}" if inst else ""))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
