"""The `faceprint` command: argument parsing and printing only (the work is in the library).

A user error (FaceprintError) ends with one line on stderr and exit code 2, like argparse's
own usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .. import __version__
from ..errors import FaceprintError, InputError, SkippedImageWarning

DEMO_PHOTOS = 1024
DEMO_FACES = 64


def _number(kind, lowest, strict: bool, what: str, highest=None):
    """An argparse type: kind(text) that must be > lowest (strict) or >= lowest, finite, and at
    most ``highest`` if given."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")) or (v <= lowest if strict else v < lowest) \
                or (highest is not None and v > highest):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_nonneg_int = _number(int, 0, False, "a non-negative integer")
_positive_float = _number(float, 0.0, True, "a positive number")
_fraction = _number(float, 0.0, True, "a fraction in (0, 1], e.g. 0.75", highest=1.0)


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--size", type=int, choices=(64, 128, 256), default=128, help="working image size in pixels (default 128)")
    g.add_argument("--components", type=_positive_int, default=None,
                   help="mixture components K (default: round(N/128) clipped to [1, 64])")
    g.add_argument("--channels", type=_positive_int, default=32,
                   help="PCA channels q kept per latent pixel (default 32: with TAEF2, q = 16 loses 7 dB, q = 8 13 dB)")
    g.add_argument("--rank-temperature", type=_positive_float, default=0.12,
                   help="lambda in d_k = floor(lambda pi_k d0): lower = cleaner, higher = more diverse (default 0.12)")
    g.add_argument("--patch-radius", type=_nonneg_int, default=2, help="NN patch radius rho, patch side 2 rho + 1 (default 2)")
    g.add_argument("--iterations", type=_nonneg_int, default=1, help="NN projection iterations (default 1)")
    g.add_argument("--copy", choices=("full", "projected"), default="full",
                   help="refinement copies the full latent feature or its PCA projection (default full)")
    g.add_argument("--refinement", choices=("seam", "paper"), default="seam",
                   help="seam: neighbouring latent pixels are chosen jointly so the collage has no visible seams "
                        "(default); paper: each pixel independently (papers/000 Eq. 5)")
    g.add_argument("--seam-weight", type=_number(float, 0.0, False, "a non-negative number"), default=None,
                   help="weight of the seam cost against the patch cost (default: the model's)")
    g.add_argument("--em", choices=("auto", "exact", "fast"), default="auto",
                   help="exact EM, or the fast scale path (subsample, truncated E-step, rank cap); auto: exact "
                        "up to 4,096 photos (default)")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the EM initialisation (default 0)")
    d = p.add_argument_group("data")
    d.add_argument("--labels", type=Path, default=None, help="CSV label table joined by file name (optional)")
    d.add_argument("--limit", type=_positive_int, default=None, help="use only the first N photos in file-name order")
    d.add_argument("--strict", action="store_true", help="stop at the first unreadable photo instead of skipping it")
    d.add_argument("--cache-dir", type=Path, default=None, help="latent cache folder (default ~/.cache/faceprint)")
    d.add_argument("--no-cache", action="store_true", help="do not read or write the latent cache")


def _add_guard_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("copy guard (on by default: no face ships as a near-copy of a training photo)")
    g.add_argument("--no-copy-guard", action="store_true", help="turn the copy guard off (faces may copy training photos)")
    g.add_argument("--max-share", type=_fraction, default=0.5,
                   help="redraw a face taking more than this share of its latent pixels from one photo (default 0.5)")
    g.add_argument("--guard-quantile", type=_number(float, 0.0, False, "a number in [0, 1)", highest=0.999), default=0.05,
                   help="redraw a face closer to a training photo than this quantile of held-out photos' "
                        "nearest-photo distances (default 0.05)")


def _guard(args):
    from ..latent.generator import CopyGuard

    if getattr(args, "no_copy_guard", False):
        return None
    return CopyGuard(quantile=getattr(args, "guard_quantile", 0.05), max_share=getattr(args, "max_share", 0.5))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, default=None,
                   help="folder with taef2_encoder.pth and taef2_decoder.pth (default: $FACEPRINT_WEIGHTS, "
                        "../shared/weights/taef2, ~/.cache/faceprint/weights/taef2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or chatter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceprint", description="Frugal, accountable face generation (LR-GMM-NN).")
    parser.add_argument("--version", action="version", version=f"faceprint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("fit", help="fit a generator on a folder of face photos")
    p.add_argument("folder", type=Path, help="folder of aligned face photos (JPEG/PNG/WebP, searched recursively)")
    p.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.safetensors)")
    _add_fit_options(p)
    _add_common(p)

    p = sub.add_parser("generate", help="generate faces with a fitted model")
    p.add_argument("model", type=Path, help="model file written by `faceprint fit`")
    p.add_argument("-n", type=_positive_int, default=16, help="number of faces (default 16)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for face_<index>.png files (created)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed: face i of seed s is always the same (default 0)")
    p.add_argument("--start", type=_nonneg_int, default=0, help="index of the first face (default 0)")
    p.add_argument("--grid", type=Path, default=None, help="also write all faces as one grid image")
    p.add_argument("--provenance", action="store_true",
                   help="also write each face's colour-coded latent map and provenance.json")
    p.add_argument("--method", choices=("lrgmm-nn", "lrgmm", "nn", "gaussian"), default=None,
                   help="sampling method (default: the model's, lrgmm-nn); the others are the paper's ablations")
    p.add_argument("--rank-temperature", type=_positive_float, default=None, help="override lambda at sampling time")
    _add_guard_options(p)
    _add_common(p)

    p = sub.add_parser("inspect", help="print a model's config, provenance and sizes")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="fit on the first 1,024 photos of celeba-10k and write 64 faces")
    p.add_argument("--data", type=Path, default=None, help="folder of face photos (default ../shared/datasets/celeba-10k/images)")
    p.add_argument("-o", "--output", type=Path, default=Path("faceprint-demo"), help="output folder (default ./faceprint-demo)")
    p.add_argument("--limit", type=_positive_int, default=DEMO_PHOTOS, help=f"photos to fit on (default {DEMO_PHOTOS})")
    p.add_argument("-n", type=_positive_int, default=DEMO_FACES, help=f"faces to generate (default {DEMO_FACES})")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--no-cache", action="store_true")
    _add_common(p)

    # Command groups of later stages live in their own modules (cli/<group>.py); each
    # registers its subcommands with set_defaults(handler=...) and shares the common options.
    import importlib
    import importlib.util

    for name in EXTENSIONS:
        modname = f"{__package__}.{name}"
        if importlib.util.find_spec(modname) is not None:
            importlib.import_module(modname).register(sub, common=_add_common)
    return parser


EXTENSIONS = ("evaluate", "protect", "control")


# ---------------------------------------------------------------------------- commands
def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _fit(args, folder: Path, output: Path, *, limit, size=128, labels=None, strict=False, config=None, seed=0):
    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..latent.generator import Generator, GeneratorConfig

    if output.suffix != ".safetensors":
        raise InputError(f"-o {str(output)!r}: the model file name must end in .safetensors")
    if not output.parent.exists():
        raise InputError(f"-o {str(output)!r}: folder {str(output.parent)!r} does not exist; create it first")
    t0 = time.perf_counter()
    ae = TAEF2.load(args.weights)
    folder_obj = FaceFolder(folder, size=size, labels=labels, strict=strict, limit=limit)
    cache = False if args.no_cache else LatentCache(args.cache_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImageWarning)
        latent_set = encode_folder(folder_obj, ae, cache=cache, progress=_progress(args))
    skipped = [w for w in caught if issubclass(w.category, SkippedImageWarning)]
    for w in skipped[:20]:
        _say(args, f"skipped {w.message}")
    if len(skipped) > 20:
        _say(args, f"... and {len(skipped) - 20} more skipped photos")
    t1 = time.perf_counter()
    gen = Generator(config or GeneratorConfig(), autoencoder=ae).fit(latent_set, seed=seed)
    t2 = time.perf_counter()
    gen.save(output)
    _say(args, f"fitted on {gen.n_photos} photos ({len(skipped)} skipped): encode {t1 - t0:.1f} s, "
               f"fit {t2 - t1:.2f} s, K = {gen.mixture_.weights_.numel()}, "
               f"EM {gen.mixture_.history_.n_iter} iterations; wrote {output}")
    return gen


def cmd_fit(args) -> int:
    from ..latent.generator import GeneratorConfig

    extra = {} if args.seam_weight is None else {"seam_weight": args.seam_weight}
    cfg = GeneratorConfig(components=args.components, channels=args.channels, rank_temperature=args.rank_temperature,
                          patch_radius=args.patch_radius, iterations=args.iterations, copy=args.copy,
                          refinement=args.refinement, em=args.em, **extra)
    _fit(args, args.folder, args.output, limit=args.limit, size=args.size, labels=args.labels, strict=args.strict,
         config=cfg, seed=args.seed)
    return 0


def _write_outputs(gen, images, samples, out_dir: Path, grid_path: Path | None, provenance: bool, seed: int,
                   method: str) -> None:
    from .. import render
    from ..io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    render.write_faces(images, out_dir, samples.indices.tolist(), samples.provenance if provenance else None)
    if grid_path is not None:
        render.save_png(render.grid(render.to_uint8(images)), grid_path)
    if provenance:
        size = images.shape[-1]
        if grid_path is not None:
            maps = render.provenance_images(samples.provenance, size)
            render.save_png(render.grid(maps), grid_path.with_name(grid_path.stem + "_provenance.png"))
        summary = gen.provenance_summary(samples.provenance)
        faces = []
        for j, i in enumerate(samples.indices.tolist()):
            faces.append({"file": f"face_{i:06d}.png", "map": f"face_{i:06d}_map.png", "index": i,
                          "component": int(samples.components[j]), **summary[j],
                          "latent_map": samples.provenance[j].tolist()})
        for j, f in enumerate(faces):
            f["redraws"] = int(samples.redraws[j]) if samples.redraws is not None else 0
        doc = {"seed": seed, "method": method, "copy_guard": _guard_record(samples),
               "training_photos": gen.training_.relpaths,
               "training_root": gen.training_.root, "faces": faces,
               "note": "latent_map[y][x] is the index into training_photos of the photo that latent pixel was "
                       "copied from (-1: not copied); each latent pixel covers 8x8 image pixels"}
        atomic_write_text(out_dir / "provenance.json", json.dumps(doc, indent=1))


def _guard_record(samples) -> dict:
    """The copy guard's settings and counts, for provenance.json and the command's summary."""
    if samples.guard is None:
        return {"enabled": False}
    r = samples.redraws
    return {"enabled": True, **samples.guard, "faces_redrawn": int((r > 0).sum()), "redraws": int(r.sum())}


def cmd_generate(args) -> int:
    from ..latent.generator import Generator

    gen = Generator.load(args.model, weights=args.weights)
    if args.output.exists() and not args.output.is_dir():
        raise InputError(f"-o {str(args.output)!r} exists and is not a folder; choose a folder path")
    if args.grid is not None and not args.grid.parent.exists():
        raise InputError(f"--grid {str(args.grid)!r}: folder {str(args.grid.parent)!r} does not exist")
    method = args.method or gen.config.method
    if args.provenance and method in ("lrgmm", "gaussian"):
        raise InputError(f"--provenance needs a method that copies training latents (lrgmm-nn or nn), not {method!r}")
    t0 = time.perf_counter()
    images, samples = gen.generate(args.n, seed=args.seed, start=args.start, method=method,
                                   rank_temperature=args.rank_temperature, progress=_progress(args), guard=_guard(args))
    t1 = time.perf_counter()
    _write_outputs(gen, images, samples, args.output, args.grid, args.provenance, args.seed, method)
    _say(args, f"generated {args.n} faces in {t1 - t0:.2f} s ({(t1 - t0) / args.n * 1000:.0f} ms/face); wrote {args.output}"
               + (f" and {args.grid}" if args.grid else "") + "; " + _guard_words(samples))
    return 0


def _guard_words(samples) -> str:
    g = _guard_record(samples)
    if not g["enabled"]:
        return "copy guard OFF"
    return f"copy guard redrew {g['faces_redrawn']} of {len(samples.indices)} faces as near-copies"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def cmd_inspect(args) -> int:
    from ..io import load_artifact

    tensors, meta = load_artifact(args.model)
    sizes = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "bytes": v.numel() * v.element_size()}
             for k, v in sorted(tensors.items())}
    info = {"file": str(args.model), "file_bytes": args.model.stat().st_size, **meta, "tensors": sizes}
    training = info.get("training", {})
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{args.model}  ({_human_bytes(info['file_bytes'])}, {meta.get('class')}, format {meta.get('format_version')}, "
          f"faceprint {meta.get('faceprint_version')})")
    print("config:")
    for k, v in (meta.get("config") or {}).items():
        print(f"  {k:18s} {v}")
    print("provenance:")
    for k, v in (meta.get("provenance") or {}).items():
        if k != "operations":
            print(f"  {k:18s} {v}")
    ops = (meta.get("provenance") or {}).get("operations") or []
    print(f"  operations         {len(ops)}" + "".join(f"\n    - {json.dumps(o)}" for o in ops))
    if training:
        paths = training.get("relpaths", [])
        print(f"training: {len(paths)} photos at {training.get('image_size')} px from {training.get('root')!r}; "
              f"data hash {str(training.get('data_hash'))[:16]}")
    print(f"autoencoder: {(meta.get('autoencoder') or {}).get('id')}")
    fp = meta.get("fingerprint")
    if fp:
        print(f"fingerprint: {fp.get('mechanism')}, {fp.get('bits')} bits, instance {fp.get('instance')!r}"
              + (f" for {fp['recipient']!r}" if fp.get("recipient") else ""))
    print("tensors:")
    total = 0
    for k, v in sizes.items():
        total += v["bytes"]
        print(f"  {k:34s} {str(tuple(v['shape'])):22s} {v['dtype']:8s} {_human_bytes(v['bytes'])}")
    print(f"  {'total':34s} {'':22s} {'':8s} {_human_bytes(total)}")
    return 0


def _default_demo_data() -> Path | None:
    here = Path(__file__).resolve()
    candidates = []
    for parent in here.parents:
        if (parent / "pyproject.toml").exists():
            candidates.append(parent.parent / "shared" / "datasets" / "celeba-10k" / "images")
            break
    candidates.append(Path.cwd().parent / "shared" / "datasets" / "celeba-10k" / "images")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def cmd_demo(args) -> int:
    from ..latent.generator import GeneratorConfig

    data = args.data or _default_demo_data()
    if data is None:
        raise InputError("demo: no photos found at ../shared/datasets/celeba-10k/images; pass --data FOLDER "
                         "with at least 32 aligned face photos (JPEG/PNG/WebP)")
    out = args.output
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args.weights = args.weights
    gen = _fit(args, data, out / "model.safetensors", limit=args.limit, config=GeneratorConfig(), seed=args.seed)
    t1 = time.perf_counter()
    images, samples = gen.generate(args.n, seed=args.seed, progress=_progress(args))
    _write_outputs(gen, images, samples, out / "faces", out / "grid.png", True, args.seed, gen.config.method)
    t2 = time.perf_counter()
    _say(args, f"demo: {args.n} faces from {gen.n_photos} photos in {t2 - t0:.1f} s "
               f"(fit {t1 - t0:.1f} s, generate {t2 - t1:.1f} s); {_guard_words(samples)}")
    print(out / "grid.png")
    print(out / "grid_provenance.png")
    return 0


COMMANDS = {"fit": cmd_fit, "generate": cmd_generate, "inspect": cmd_inspect, "demo": cmd_demo}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except FaceprintError as e:
        msg = str(e).replace("\n", " ")
        print(f"faceprint {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceprint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
