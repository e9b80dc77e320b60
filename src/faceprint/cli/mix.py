"""`faceprint mix`: interpolate, dissolve, brush and hybridise faces and textures in latent space
(the Texture Mixer of papers/004 ch. 3 on TAEF2; the work is in faceprint.mixing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError

MODES = ("interpolate", "dissolve", "brush", "hybrid")
METHODS = ("ours", "latent", "pixel")
PACKAGED_MIXER = Path(__file__).resolve().parents[1] / "mixing" / "weights" / "mixer.safetensors"
PROVENANCE_KEY = "faceprint-provenance"


def register(sub, *, common) -> None:
    from .main import _number, _seed

    _alpha = _number(float, 0.0, False, "a number in [0, 1]", highest=1.0)
    _px = _number(int, 0, False, "a non-negative number of pixels (multiple of 8)", highest=1 << 16)
    p = sub.add_parser("mix", help="mix faces or textures in latent space (interpolate, dissolve, brush, hybrid)",
                       description="Sources are image files or generated faces MODEL.safetensors:seed=N[:index=K]. "
                                   "interpolate: a horizontal canvas through two or more textures (or, with --mask, "
                                   "a per-pixel blend of two same-size images); dissolve: B over A with weight "
                                   "--alpha; brush: B painted onto A where --mask is white (strength --alpha); "
                                   "hybrid: left of A, right of B with a --band px transition.")
    p.add_argument("sources", nargs="+", help="image files and/or MODEL.safetensors:seed=N[:index=K] (at least two)")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG to write (provenance in a text chunk)")
    p.add_argument("--mask", type=Path, default=None, help="grey image, same size as the sources: weight of B (white = 1)")
    p.add_argument("--alpha", type=_alpha, default=None, help="dissolve: weight of B (default 0.5); brush: strength (default 1)")
    p.add_argument("--band", type=_px, default=32, help="hybrid: transition band in px, a multiple of 8 (default 32)")
    p.add_argument("--width", type=_px, default=None, help="interpolate: canvas width in px (default 8 x the source width, "
                                                            "at least the sources side by side)")
    p.add_argument("--method", choices=METHODS, default="ours",
                   help="ours: trained harmoniser (default); latent: plain TAEF2 latent blend; pixel: naive pixel blend")
    p.add_argument("--no-postprocess", action="store_true",
                   help="interpolate with --method ours: keep the decoded canvas as it is instead of putting the "
                        "sources back with a seam and a Poisson blend")
    p.add_argument("--mixer", type=Path, default=None, help="mixer weights (.safetensors; default: the packaged ones)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the latent shuffling of a canvas (default 0)")
    p.add_argument("--snap", action="store_true", help="centre-crop sources off the 8-px grid (reported) instead of refusing")
    p.add_argument("--forgotten", type=Path, action="append", default=[], metavar="MODEL",
                   help="also refuse the people this (tamed) model forgot; models given as sources are always checked")
    p.add_argument("--gallery", type=Path, action="append", default=[], metavar="GALLERY",
                   help="IdentityGallery file of a person who must not be mixed (repeatable)")
    p.add_argument("--provenance", type=Path, default=None, help="also write the provenance record as JSON")
    common(p)
    p.set_defaults(handler=cmd_mix)


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _check_args(args) -> None:
    from .safety import Plan, check_parent_exists

    if args.output.suffix.lower() != ".png":
        raise InputError(f"-o {str(args.output)!r}: the output must be a .png file (it carries the provenance)")
    check_parent_exists("-o", args.output)
    if args.provenance is not None:
        check_parent_exists("--provenance", args.provenance)
    if len(args.sources) < 2:
        raise InputError(f"mix needs at least two sources, got {len(args.sources)}: {args.sources}; one source alone is "
                         "a reconstruction, not a mix")
    if args.mode != "interpolate" and len(args.sources) != 2:
        raise InputError(f"--mode {args.mode} takes exactly two sources (A then B), got {len(args.sources)}")
    if args.mode == "brush" and args.mask is None:
        raise InputError("--mode brush needs --mask M.png (white where B is painted onto A)")
    if args.mask is not None and args.mode not in ("brush", "interpolate"):
        raise InputError(f"--mask is used by --mode brush and interpolate, not {args.mode}")
    if args.mask is not None and args.mode == "interpolate" and len(args.sources) != 2:
        raise InputError("--mode interpolate with --mask blends exactly two sources")
    if args.band % 8:
        raise InputError(f"--band must be a multiple of 8 px (the latent grid), got {args.band}")
    if args.width is not None and (args.width % 8 or args.width < 32):
        raise InputError(f"--width must be a multiple of 8 px and at least 32, got {args.width}")
    plan = Plan()
    from ..mixing.sources import parse_source

    for s in args.sources:
        _, path, _, _ = parse_source(s)
        plan.input_file("source", path)
    for flag in ("mask", "mixer"):
        plan.input_file(f"--{flag}", getattr(args, flag))
    for f in args.forgotten:
        plan.input_file("--forgotten", f)
    for g in args.gallery:
        plan.input_file("--gallery", g)
    plan.output_file("-o", args.output).output_file("--provenance", args.provenance).check()


def _load_mask(path: Path, shape) -> "torch.Tensor":  # noqa: F821
    from ..mixing.sources import read_image

    x, _ = read_image(path, name="--mask")
    m = x.mean(0)  # grey levels (an RGB mask is averaged over its channels)
    if tuple(m.shape) != tuple(shape):
        raise InputError(f"--mask {str(path)!r} is {m.shape[0]}x{m.shape[1]} px but the sources are "
                         f"{shape[0]}x{shape[1]}; give a mask of the sources' size")
    return m


def _save_png(x, path: Path, record: dict) -> None:
    from PIL import Image, PngImagePlugin

    from .. import render
    from ..io import atomic_path
    from .safety import SOFTWARE

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    info.add_text(PROVENANCE_KEY, json.dumps(record, sort_keys=True))
    arr = render.to_uint8(x)[0]
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG", pnginfo=info)


def _identity_check(args, sources) -> tuple[dict, list, object]:
    """Hash and gallery checks against forgotten people (see faceprint.mixing.sources)."""
    from ..latent.generator import Generator
    from ..mixing.sources import (ForgottenPersonError, check_not_forgotten, forgotten_hashes,
                                  galleries_from_model)

    models = [(f"source model {s.path.name!r}", s.generator, s.model_meta.get("provenance") or {})
              for s in sources if s.generator is not None]
    for f in args.forgotten:
        g = Generator.load(f, autoencoder=None)
        models.append((f"--forgotten {f.name!r}", g, g.provenance_))
    hashes = set()
    for _, _, prov in models:
        hashes.update(forgotten_hashes(prov))
    for s in sources:
        if s.is_file and s.record["sha256"] in hashes:
            raise ForgottenPersonError(f"source {str(s.path)!r} is a photo a model forgot (same sha256); mixing a "
                                       "forgotten person is refused")
    record = {"forgotten_photos_known": len(hashes), "galleries": 0, "checked": []}
    if not hashes and not args.gallery:
        return record, [], None
    from ..recognition import IdentityGallery, IdentityRecogniser

    rec = IdentityRecogniser()
    galleries = [IdentityGallery.load(g) for g in args.gallery]
    for label, gen, prov in models:
        if forgotten_hashes(prov):
            galleries.extend(galleries_from_model(gen, prov, rec, label=label))
    record["galleries"] = len(galleries)
    what = [f"source {s.spec!r}" for s in sources]
    record["checked"] = check_not_forgotten([s.image for s in sources], galleries, rec, what=what)
    return record, galleries, rec


def cmd_mix(args) -> int:
    import time

    import torch

    from .. import __version__
    from ..io import atomic_write_text, now_iso, sha256_file
    from ..mixing import TextureMixer, pixel_blend
    from ..mixing import operations as ops
    from ..mixing.sources import load_source

    _check_args(args)
    t0 = time.perf_counter()
    sources = [load_source(s, weights=args.weights, snap=args.snap) for s in args.sources]
    shapes = {tuple(s.image.shape) for s in sources}
    if len(shapes) != 1:
        raise InputError("all sources must have the same size, got " + ", ".join(
            f"{s.spec} {s.image.shape[1]}x{s.image.shape[2]}" for s in sources) + "; crop or resize them to one size")
    _, H, W = sources[0].image.shape
    # check the identities of the sources before any mixing work
    ident, galleries, recogniser = _identity_check(args, sources)
    # the decoder: a generated source's own (possibly fingerprinted) instance decoder, else TAEF2
    ae = next((s.generator.autoencoder for s in sources if s.generator is not None), None)
    if ae is None:
        from ..autoencoder import TAEF2

        ae = TAEF2.load(args.weights)
    mixer_rec = None
    if args.method == "ours":
        path = args.mixer or PACKAGED_MIXER
        if not Path(path).is_file():
            raise InputError(f"no mixer weights at {str(path)!r}; pass --mixer FILE (train one with "
                             "`python -m faceprint.bench mix --train-only`) or use --method latent")
        mixer = TextureMixer.load(path, autoencoder=ae)
        mixer_rec = {"file": Path(path).name, "weights_sha256_16": mixer.weights_digest(),
                     "trained_steps": mixer.provenance_.get("trained_steps"), "seed": mixer.provenance_.get("seed")}
    else:
        mixer = TextureMixer.initial(autoencoder=ae)  # H = identity: the plain latent blend
    harmonise = args.method == "ours"
    x = torch.stack([s.image for s in sources])  # (K, 3, H, W)
    mask = _load_mask(args.mask, (H, W)) if args.mask is not None else None
    settings = {"mode": args.mode, "method": args.method}
    if args.mode == "interpolate" and mask is None:
        K = len(sources)
        width = args.width or max(8 * W, K * W)
        width = max(width, K * W)
        post = harmonise and not args.no_postprocess
        settings.update(width=width, seed=args.seed, postprocess=post)
        if args.method == "pixel":
            wts = ops.canvas_weights(K, width, W).view(K, 1, 1, width).expand(K, 1, H, width)
            out = pixel_blend(x, wts, H, width, ops.placements(K, width, W))
        else:
            out = mixer.canvas(x, width, shuffle=harmonise, harmonise=harmonise, seed=args.seed, postprocess=post)
    else:
        if args.mode == "dissolve":
            alpha = 0.5 if args.alpha is None else args.alpha
            wb = torch.full((1, 1, H, W), float(alpha))
            settings["alpha"] = alpha
        elif args.mode == "hybrid":
            if args.band > W:
                raise InputError(f"--band {args.band} is wider than the sources ({W} px)")
            wb = 1 - ops.band_alpha(H, W, args.band)
            settings["band"] = args.band
        else:  # brush, or interpolate with a mask
            strength = 1.0 if args.alpha is None else args.alpha
            wb = (mask * strength)[None, None]
            settings.update(mask={"name": args.mask.name, "sha256": sha256_file(args.mask)}, strength=strength)
        if args.method == "pixel":
            out = (x[0:1] * (1 - wb) + x[1:2] * wb).clamp(0, 1)
        else:
            out = mixer.mix(x[0:1], x[1:2], wb, harmonise=harmonise)
    seconds = time.perf_counter() - t0
    if galleries:  # the output itself must not show a forgotten person either
        from ..mixing.sources import check_not_forgotten

        ident["checked"] += check_not_forgotten([out[0]], galleries, recogniser, what=["the mixed output"])
    record = {
        "faceprint": "mix", "faceprint_version": __version__, "created": now_iso(),
        "operation": "edit" if any(s.is_file for s in sources) else "generated",
        "note": "file sources are treated as real photos: this output is an edit of them" if any(
            s.is_file for s in sources) else "all sources are faces generated by faceprint models",
        **settings, "sources": [s.record for s in sources], "mixer": mixer_rec,
        "autoencoder": getattr(ae, "id", None), "identity_check": ident,
        "size": [int(out.shape[2]), int(out.shape[3])],
    }
    _save_png(out, args.output, record)
    if args.provenance is not None:
        atomic_write_text(args.provenance, json.dumps(record, indent=1, sort_keys=True) + "\n")
    adjusted = [s.spec for s in sources if "adjusted" in s.record]
    if adjusted:
        _say(args, "cropped to the 8-px grid: " + ", ".join(
            f"{s.spec} {s.record['adjusted']['cropped_from']} -> {s.record['adjusted']['to']}"
            for s in sources if "adjusted" in s.record))
    _say(args, f"mixed {len(sources)} sources ({args.mode}, {args.method}) into {out.shape[2]}x{out.shape[3]} in "
               f"{seconds:.2f} s; {record['operation']}; wrote {args.output}")
    return 0
