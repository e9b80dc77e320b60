"""`faceprint fingerprint issue|calibrate|list` and `faceprint verify`: the owner's side of
accountable release (papers/004, Ch. 5-6). The work is in faceprint.fingerprint.owner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError


def register(sub, *, common) -> None:
    from .main import _bounded_int, _fraction, _number, _positive_int, _seed, add_dask_option

    fpr = _number(float, 0.0, True, "a false-positive rate in (0, 1)", highest=0.999999)

    def owner_options(p):
        p.add_argument("--owner", type=Path, default=None,
                       help="folder of the owner's key, registry and calibration "
                            "(default $FACEPRINT_OWNER_DIR or ~/.local/share/faceprint/owner)")
        p.add_argument("--registry", default=None,
                       help="registry URL (sqlite:///file.db, postgresql+psycopg://user@host/db) or SQLite file "
                            "(default OWNER/registry.sqlite)")

    p = sub.add_parser("fingerprint", help="issue fingerprinted model instances, calibrate verification, list issued codes")
    fsub = p.add_subparsers(dest="fingerprint_command", metavar="OPERATION")
    fsub.required = True

    i = fsub.add_parser("issue", help="write a copy of MODEL whose faces all carry a new fingerprint, recorded in the registry")
    i.add_argument("model", type=Path)
    i.add_argument("--mechanism", choices=("keyed-bank", "datalevel-bank"), default="keyed-bank",
                   help="keyed-bank (default): a secret of this instance's own, verified against the owner's copy of "
                        "MODEL, safe against the recipient (see README, threat model); datalevel-bank: the earlier "
                        "blind 128-bit code under one owner key, which a recipient can read, strip and forge")
    i.add_argument("--to", required=True, metavar="NAME", help="who receives this instance")
    i.add_argument("-o", "--output", type=Path, required=True, help="instance model file to write")
    i.add_argument("--instance", default=None, help="instance name (default: the output file's name without suffix)")
    i.add_argument("--note", default=None, help="free text kept in the registry")
    i.add_argument("--seed", type=_seed, default=None,
                   help="draw the code reproducibly from this seed (default: the system's randomness)")
    owner_options(i)
    common(i)
    i.set_defaults(handler=cmd_issue)

    c = fsub.add_parser("calibrate", help="measure matching bits of negatives and set the decision threshold")
    c.add_argument("model", type=Path, help="the unfingerprinted model the instances were issued from")
    c.add_argument("--negatives", type=Path, action="append", required=True, metavar="FOLDER",
                   help="folder of images that carry none of the codes (e.g. real photos); repeat for several")
    c.add_argument("--faces", type=_bounded_int(0, 10_000_000, "a number of faces"), default=None,
                   help="also read this many faces of MODEL itself (default 2000 for datalevel-bank; 500 for "
                        "keyed-bank, whose read-out costs a decode and an encode per image)")
    c.add_argument("--instances", type=_bounded_int(0, 1000, "a number of instances"), default=None,
                   help="and faces of this many unregistered instances with random codes (default 4 for "
                        "datalevel-bank, 2 for keyed-bank)")
    c.add_argument("--faces-per-instance", type=_bounded_int(1, 1_000_000, "a number of faces"), default=250)
    c.add_argument("--target-fpr", type=fpr, default=None,
                   help="largest false-positive rate accepted per verified image (default 1e-3 for datalevel-bank, "
                        "whose threshold its negatives set; 1e-5 for keyed-bank, whose threshold is exact)")
    c.add_argument("--min-negatives", type=_positive_int, default=None,
                   help="refuse to calibrate on fewer negatives (default 10000 for datalevel-bank, whose threshold "
                        "rests on them; 1000 for keyed-bank, where they check an exact bound; lower it only knowingly)")
    c.add_argument("--seed", type=_seed, default=0)
    add_dask_option(c, "read the negative photos")
    owner_options(c)
    common(c)
    c.set_defaults(handler=cmd_calibrate)

    ls = fsub.add_parser("list", help="list the issued codes")
    ls.add_argument("--json", action="store_true")
    owner_options(ls)
    ls.set_defaults(handler=cmd_list, quiet=True)

    v = sub.add_parser("verify", help="say whether images come from one of the owner's instances, which one, "
                                      "and with what false-positive rate")
    v.add_argument("images", type=Path, nargs="+", help="image files (or folders of images)")
    v.add_argument("--json", action="store_true", help="one JSON object per image")
    v.add_argument("--target-fpr", type=fpr, default=None,
                   help="keyed-bank: largest probability, per image, that any innocent recipient is accused "
                        "(default 1e-5); datalevel-bank: set by its calibration")
    v.add_argument("--crop-search", type=_fraction, default=None, metavar="MIN_FRACTION",
                   help="also undo a centre crop keeping at least this fraction of the side, e.g. 0.75 "
                        "(one TAEF2 encode per candidate crop size: 33 at 0.75)")
    add_dask_option(v, "read the images")
    owner_options(v)
    common(v)
    v.set_defaults(handler=cmd_verify)


def _say(args, msg):
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _owner(args):
    from ..fingerprint.owner import Owner

    return Owner(args.owner, registry=args.registry)


def cmd_issue(args) -> int:
    from ..autoencoder import TAEF2
    from ..fingerprint.owner import issue_instance
    from ..fingerprint.registry import check_entry_fields
    from ..io import sha256_file
    from ..latent.generator import Generator
    from .safety import Plan, check_parent_exists

    # every refusal comes before anything is written (no owner folder, key or registry)
    instance = args.instance or args.output.stem
    check_entry_fields(args.to, instance, "0" * 64, args.mechanism, args.note)
    check_parent_exists("-o", args.output)
    owner = _owner(args)
    Plan().input_file("model", args.model).input_file("owner key", owner.key_path) \
        .input_file("owner secret", owner.secret_path) \
        .input_file("registry", owner._local_registry()).input_file("calibration", owner.calibration) \
        .output_file("-o", args.output).check()
    gen = Generator.load(args.model, autoencoder=TAEF2.load(args.weights))
    if getattr(gen, "fingerprint_", None):
        raise InputError(f"{str(args.model)!r} is already a fingerprinted instance "
                         f"({gen.fingerprint_.get('instance')!r}); issue instances from the unfingerprinted model")
    if getattr(gen, "latent_model_", None) is not None:  # a GAN copies no bank pixel: mark its decoder
        from ..gan.fingerprint import MECHANISM as GAN_MECHANISM, issue_gan_instance

        _say(args, f"a GAN model: its instance carries a model-level fingerprint ({GAN_MECHANISM}), not "
                   f"{args.mechanism} (GAN faces copy no bank pixel)")
        entry, inst = issue_gan_instance(gen, sha256_file(args.model), owner, args.to, instance, seed=args.seed,
                                         note=args.note, output=args.output)
    else:
        entry, inst = issue_instance(gen, sha256_file(args.model), owner, args.to, instance, seed=args.seed,
                                     note=args.note, output=args.output, mechanism=args.mechanism)
    _say(args, f"issued instance {instance!r} to {args.to!r} (code {entry.code[:8]}..., registry {owner.registry}); "
               f"wrote {args.output}")
    return 0


def _image_files(paths, say=None):
    """Image files of the arguments (folders searched like photo folders). Files a folder skips
    (special files) are reported through ``say`` once every folder was read: a refusal stays
    one line."""
    import warnings

    from ..data.folder import FaceFolder
    from ..errors import SkippedImageWarning
    from .safety import regular_input

    files, skipped = [], []
    for p in paths:
        if p.is_dir():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SkippedImageWarning)
                ff = FaceFolder(p)
            skipped += [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
            files.extend(ff.root / r for r in ff.relpaths)
        else:
            files.append(regular_input("image", p, "image file"))
    for m in skipped:
        if say is not None:
            say(m)
    return files


def _decode_files(files, key, ae, batch=64, crop_search=None, sizes=None):
    """Decoded bits of image files; with ``crop_search``, the chosen crop size of each is
    appended to ``sizes`` (a list) when given."""
    import torch

    from ..data.folder import load_image
    from ..fingerprint.owner import decode_images

    out = []
    for s in range(0, len(files), batch):
        x = torch.stack([load_image(f, 128) for f in files[s:s + batch]])
        if crop_search is not None and sizes is not None:
            p, size, _ = key.decode_bits_searched(x, ae, min_fraction=crop_search)
            out.append(p > 0.5)
            sizes.extend(int(v) for v in size)
        else:
            out.append(decode_images(x, key, ae, crop_search=crop_search))
    return torch.cat(out)


def _calibration_faces(args, gen, ae, read, make_instance, parts, verb: str) -> None:
    """Negatives made by the model itself: ``args.faces`` faces of the unfingerprinted model and
    ``args.faces_per_instance`` of each of ``args.instances`` unregistered instances
    (``make_instance(j)``), 8-bit as saved, each batch passed through ``read`` (images -> rows)."""
    import torch

    def faces(g, n, seed):
        out = []
        for s in range(0, n, 64):
            imgs = ae.decode(g.sample_latents(min(64, n - s), seed=seed, start=s).latents.float())
            out.append(read((imgs.clamp(0, 1) * 255).round() / 255))  # as saved to an 8-bit file, which verify reads
        return torch.cat(out) if out else None

    if args.faces:
        _say(args, f"{verb} {args.faces} faces of the unfingerprinted model")
        parts["unfingerprinted faces"] = faces(gen, args.faces, args.seed)
    if args.instances:
        parts["other instances' faces"] = torch.cat([faces(make_instance(j), args.faces_per_instance, args.seed + 1 + j)
                                                     for j in range(args.instances)])


def cmd_calibrate(args) -> int:
    import torch

    from ..autoencoder import TAEF2
    from ..fingerprint.datalevel import fingerprint_bank_instance
    from ..fingerprint.owner import calibrate, decode_images
    from ..fingerprint.registry import random_code
    from ..fingerprint.verification import CalibrationConfig
    from ..latent.generator import Generator
    from ..seeding import generator as make_generator

    from .safety import Plan

    owner = _owner(args)
    keyed = owner.secret_path.is_file() and not owner.key_path.is_file()
    if args.faces is None:
        args.faces = 500 if keyed else 2000
    if args.instances is None:
        args.instances = 2 if keyed else 4
    if keyed:
        return _calibrate_keyed(args, owner)
    plan = Plan().input_file("model", args.model).input_file("owner key", owner.key_path)
    for n in args.negatives:
        plan.input_folder("--negatives", n)
    plan.output_file("calibration", owner.calibration).check()
    key = owner.load_key()
    ae = TAEF2.load(args.weights)
    gen = Generator.load(args.model, autoencoder=ae)
    files = _image_files(args.negatives, say=lambda m: _say(args, m))
    _say(args, f"decoding {len(files)} negative photos")
    parts = {}
    if files:
        from ..distributed.cluster import open_client
        from ..distributed.stages import decode_image_files

        with open_client(args.dask) as client:
            parts["photos"] = decode_image_files(files, key, ae, client=client, bar=not getattr(args, "quiet", False))

    g = make_generator(args.seed, "calibration-instances")
    _calibration_faces(args, gen, ae, lambda x: decode_images(x, key, ae),
                       lambda j: fingerprint_bank_instance(gen, key, random_code(generator=g)), parts, "decoding")
    decoded = torch.cat(list(parts.values()))
    desc = ", ".join(f"{len(v)} {k}" for k, v in parts.items())
    cal = calibrate(decoded, seed=args.seed, description=desc, config=CalibrationConfig(target_fpr=args.target_fpr or 1e-3, min_negatives=args.min_negatives or 10000))
    owner.folder.mkdir(parents=True, exist_ok=True)
    cal.save(owner.calibration)
    h = cal.histogram
    top = int(torch.nonzero(h).max())
    print(f"negatives: {cal.n_negatives} ({desc}), each against {cal.codes_compared} random codes")
    print(f"best matching bits: max {top} of {cal.n_bits}; threshold {cal.threshold} "
          f"(false-positive rate {cal.operating_fpr:.2g}, 95% upper bound {cal.operating_fpr_upper_bound:.2g}, "
          f"target {args.target_fpr or 1e-3:g}); wrote {owner.calibration}")
    return 0


KEYED_CALIBRATION = "calibration-keyed.json"


def _calibrate_keyed(args, owner) -> int:
    """keyed-bank: measure the scores of negatives against random instance codes, to check (not
    assume) that an innocent recipient's score is standard normal; written to the owner folder."""
    import math

    import torch

    from ..autoencoder import TAEF2
    from ..fingerprint.keyed import DEFAULT_TARGET_FPR, BaseIndex, fingerprint_keyed_instance, normal_tail, threshold_for
    from ..fingerprint.registry import code_to_hex, random_code
    from ..fingerprint.verification import clopper_pearson_upper
    from ..io import atomic_write_text, now_iso, sha256_file
    from ..latent.generator import Generator
    from ..seeding import generator as make_generator
    from .safety import Plan

    plan = Plan().input_file("model", args.model).input_file("owner secret", owner.secret_path)
    for n in args.negatives:
        plan.input_folder("--negatives", n)
    plan.output_file("calibration", owner.folder / KEYED_CALIBRATION).check()
    secret = owner.load_secret()
    ae = TAEF2.load(args.weights)
    gen = Generator.load(args.model, autoencoder=ae)
    if getattr(gen, "fingerprint_", None):
        raise InputError(f"{str(args.model)!r} is a fingerprinted instance; calibrate with the model the instances were issued from")
    files = _image_files(args.negatives, say=lambda m: _say(args, m))
    total = len(files) + args.faces + args.instances * args.faces_per_instance
    minimum = args.min_negatives or 1000
    if total < minimum:
        raise InputError(f"{total} negatives ({len(files)} photos + {args.faces} faces + {args.instances} x "
                         f"{args.faces_per_instance} instance faces) is fewer than --min-negatives {minimum}; "
                         "add photos or faces, or lower --min-negatives knowingly")
    index = BaseIndex(gen.bank_, gen.autoencoder, secret)
    g = make_generator(args.seed, "keyed-calibration-codes")
    codes = [code_to_hex(random_code(generator=g)) for _ in range(64)]
    parts: dict[str, torch.Tensor] = {}
    _say(args, f"scoring {len(files)} negative photos against {len(codes)} random codes")
    if files:
        from ..distributed.cluster import open_client
        from ..distributed.stages import keyed_scores_of_files

        with open_client(args.dask) as client:
            parts["photos"] = keyed_scores_of_files(files, index, secret, codes, client=client,
                                                    bar=not getattr(args, "quiet", False))

    gi = make_generator(args.seed, "keyed-calibration-instances")
    _calibration_faces(args, gen, ae, lambda x: index.residuals(x).scores(secret, codes),
                       lambda j: fingerprint_keyed_instance(gen, secret, code_to_hex(random_code(generator=gi))),
                       parts, "scoring")
    allv = torch.cat(list(parts.values())).flatten()
    n_pairs = allv.numel()
    grid = [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    doc = {"mechanism": "keyed-bank", "created": now_iso(), "model_sha256": sha256_file(args.model),
           "negatives": {k: int(v.shape[0]) for k, v in parts.items()}, "codes": len(codes), "pairs": n_pairs,
           "mean": float(allv.mean()), "std": float(allv.std()), "max": float(allv.max()),
           "exceedances": {str(t): {"count": int((allv >= t).sum()), "normal_expected": n_pairs * normal_tail(t),
                                    "upper_95": clopper_pearson_upper(int((allv >= t).sum()), n_pairs)} for t in grid},
           "seed": args.seed}
    owner.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(owner.folder / KEYED_CALIBRATION, json.dumps(doc, indent=1))
    target = args.target_fpr or DEFAULT_TARGET_FPR
    thr = threshold_for(target, 1)
    print(f"negatives: {', '.join(f'{v} {k}' for k, v in doc['negatives'].items())}; {n_pairs} (image, code) pairs")
    print(f"scores: mean {doc['mean']:.3f}, std {doc['std']:.3f} (standard normal: 0, 1), max {doc['max']:.2f}; "
          f"T >= 3: {doc['exceedances']['3.0']['count']} (normal: {doc['exceedances']['3.0']['normal_expected']:.1f}); "
          f"one recipient's threshold at {target:g} is {thr:.2f}; wrote {owner.folder / KEYED_CALIBRATION}")
    if not math.isfinite(doc["std"]) or abs(doc["std"] - 1) > 0.1 or abs(doc["mean"]) > 0.1:
        print("warning: the scores of negatives are not standard normal: the stated false-accusation bounds do not "
              "hold for images like these; report this", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    from dataclasses import asdict

    with _owner(args).open_registry(create=False) as reg:
        entries = reg.all()
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=1))
        return 0
    for e in entries:
        print(f"{e.issued_at}  {e.code}  {e.instance:24s} {e.recipient}")
    print(f"{len(entries)} issued", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    with _owner(args).open_registry(create=False) as reg:
        entries = reg.all()
    if any(e.mechanism == "keyed-bank" for e in entries):
        return _verify_keyed(args, entries)
    return _verify_codes(args)


def _verify_keyed(args, entries) -> int:
    from dataclasses import asdict

    from ..autoencoder import TAEF2
    from ..fingerprint.owner import KeyedVerifier

    owner = _owner(args)
    if args.crop_search is not None:
        from ..fingerprint.keyed import DEFAULT_CROPS

        raise InputError("--crop-search sets the datalevel-bank code's search only; keyed-bank instances are always "
                         f"read with centre crops of {', '.join(f'{f:g}' for f in DEFAULT_CROPS)} of the side tried "
                         "(drop --crop-search)")
    files = _image_files(args.images, say=lambda m: _say(args, m))
    ae = TAEF2.load(args.weights)
    olds = [e for e in entries if e.mechanism != "keyed-bank"]
    if olds:
        _say(args, f"note: {len(olds)} datalevel-bank instance(s) in the registry are not checked when keyed-bank "
                   "instances exist (verify them with a registry of their own)")
    cal_path = owner.folder / KEYED_CALIBRATION
    measured = json.loads(cal_path.read_text()) if cal_path.is_file() else None
    if measured is None:
        _say(args, f"note: no measured calibration in {str(owner.folder)!r}; the bound below is the exact normal tail "
                   "(check it on your negatives with `faceprint fingerprint calibrate MODEL --negatives PHOTOS/`)")
    else:
        _say(args, f"calibration: {measured['pairs']} negative (image, code) pairs scored mean {measured['mean']:.3f}, "
                   f"std {measured['std']:.3f} (standard normal: 0, 1)")
    from ..distributed.cluster import open_client
    from ..distributed.stages import keyed_verdicts_of_files

    verifier = KeyedVerifier(owner, entries, ae, target_fpr=args.target_fpr)
    with open_client(args.dask) as client:
        verdicts = keyed_verdicts_of_files(files, verifier, client=client, bar=not getattr(args, "quiet", False))
    for f, v in zip(files, verdicts):
        how = ([f"an edited image: {v.edit}"] if v.edit != "none" else []) + \
            ([f"a centre crop of {v.crop:.0%} of the side"] if v.crop < 1 else []) + \
            ([f"through a light {v.prefilter} denoising filter"] if v.prefilter != "none" else [])
        edited = f" [read as {'; '.join(how)}]" if v.match and how else ""
        if args.json:
            print(json.dumps({"image": str(f), **asdict(v)}), flush=True)
        elif v.match:
            print(f"{f}: MATCH instance {v.instance!r} (recipient {v.recipient!r}); score {v.score:.1f} "
                  f"(a match needs {v.threshold:.2f}); an image this recipient did not make scores this high with "
                  f"probability {v.p_value:.2g}; false accusation of anyone among {v.registry_size} recipients "
                  f"<= {v.fpr_bound:.2g} per image{edited}", flush=True)
        else:
            print(f"{f}: not ours (best: instance {v.nearest_instance!r} with score {v.score:.1f}, a match needs "
                  f"{v.threshold:.2f})", flush=True)
    return 0


def _verify_codes(args) -> int:
    from dataclasses import asdict

    from ..autoencoder import TAEF2
    from ..fingerprint.verification import verify

    owner = _owner(args)
    key = owner.load_key()
    cal = owner.load_calibration()
    files = _image_files(args.images, say=lambda m: _say(args, m))
    ae = TAEF2.load(args.weights)
    sizes: list[int] = []
    if args.crop_search is None:
        from ..distributed.cluster import open_client
        from ..distributed.stages import decode_image_files

        with open_client(args.dask) as client:
            decoded = decode_image_files(files, key, ae, client=client, bar=not getattr(args, "quiet", False))
    elif args.dask is not None:
        raise InputError("--crop-search runs in this process only; drop --dask or --crop-search")
    else:
        decoded = _decode_files(files, key, ae, crop_search=args.crop_search, sizes=sizes)
    with owner.open_registry(create=False) as reg:
        verdicts = verify(decoded, cal, registry=reg)
    full = key.shape_[-1] * 8
    for i, (f, v) in enumerate(zip(files, verdicts)):
        crop = {"crop_size": sizes[i], "full_size": full} if sizes else {}
        where = f" [read as a centre crop of {sizes[i]}/{full} px]" if sizes and sizes[i] != full else ""
        if args.json:
            print(json.dumps({"image": str(f), **asdict(v), **crop}))
        elif v.match:
            print(f"{f}: MATCH instance {v.instance!r} (recipient {v.recipient!r}); {v.matching_bits}/{v.n_bits} bits "
                  f"(bit accuracy {v.bit_accuracy:.3f}), p-value {v.p_value:.2g}, false-positive rate "
                  f"<= {v.fpr_upper_bound:.2g} (threshold {v.threshold}){where}")
        else:
            print(f"{f}: not ours (nearest instance {v.nearest_instance!r}: {v.matching_bits}/{v.n_bits} bits, "
                  f"a match needs {v.threshold}){where}")
    return 0
