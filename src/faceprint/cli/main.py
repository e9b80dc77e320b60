"""The `faceprint` command: argument parsing and printing only (the work is in the library).

A user error (FaceprintError) ends with one line on stderr and exit code 2, like argparse's
own usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

from .. import __version__
from ..errors import FaceprintError, InputError, SkippedImageWarning

DEMO_PHOTOS = 1024
DEMO_FACES = 64
MAX_GRID = 4096      # faces in one --grid image (its pixels are held in memory)
BATCH = 64           # faces generated, decoded and written at a time


def _share_cap(text: str):
    """--share-cap: a share in (0, 1], or "none" (no cap)."""
    if text.strip().lower() == "none":
        return "none"
    return _number(float, 0.0, True, "a share in (0, 1] or none, e.g. 0.35", highest=1.0)(text)


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
# Bounded counterparts for arguments whose extreme values would overflow or never end.
MAX_FACES = 2**40            # -n: the disk check refuses far fewer; this keeps indices in int64
MAX_START = 2**62            # --start: image indices stay in int64 (torch) with room for n
MAX_SEED = 2**63 - 1
MAX_RANK_TEMPERATURE = 1e6   # d_k = floor(lambda pi_k d0) is clipped to the rank anyway
_seed = _number(int, 0, False, f"a seed in [0, 2**63)", highest=MAX_SEED)
_faces = _number(int, 0, True, f"a positive number of faces (at most 2**40)", highest=MAX_FACES)
_start = _number(int, 0, False, "a non-negative face index below 2**62", highest=MAX_START)
_rank_temperature = _number(float, 0.0, True, f"a positive number up to {MAX_RANK_TEMPERATURE:g}",
                            highest=MAX_RANK_TEMPERATURE)


def _bounded_int(lowest: int, highest: int, what: str):
    return _number(int, lowest, False, f"{what} in [{lowest}, {highest}]", highest=highest)


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--size", type=int, choices=(64, 128, 256), default=128, help="working image size in pixels (default 128)")
    g.add_argument("--components", type=_positive_int, default=None,
                   help="mixture components K (default: round(N/128) clipped to [1, 64])")
    g.add_argument("--channels", type=_positive_int, default=32,
                   help="PCA channels q kept per latent pixel (default 32: with TAEF2, q = 16 loses 7 dB, q = 8 13 dB)")
    g.add_argument("--rank-temperature", type=_rank_temperature, default=0.12,
                   help="lambda in d_k = floor(lambda pi_k d0): lower = cleaner, higher = more diverse (default 0.12)")
    g.add_argument("--patch-radius", type=_bounded_int(0, 1000, "a patch radius"), default=2,
                   help="NN patch radius rho, patch side 2 rho + 1 (default 2)")
    g.add_argument("--iterations", type=_bounded_int(0, 100, "a number of iterations"), default=1,
                   help="NN projection iterations (default 1)")
    g.add_argument("--copy", choices=("full", "projected"), default="full",
                   help="refinement copies the full latent feature or its PCA projection (default full)")
    g.add_argument("--refinement", choices=("guided", "seam", "paper"), default="guided",
                   help="guided: blocks copied coarse to fine, guided by the sample (default); seam: each latent "
                        "pixel chosen jointly with its neighbours; paper: each pixel independently (papers/000 Eq. 5)")
    g.add_argument("--share-cap", type=_share_cap, default=None, metavar="F|none",
                   help="at most this share of a face's latent pixels from one photo (guided and seam rules; "
                        "default 0.35; none: no cap)")
    g.add_argument("--seam-weight", type=_number(float, 0.0, False, "a non-negative number"), default=None,
                   help="weight of the seam cost against the patch cost (default: the model's)")
    g.add_argument("--em", choices=("auto", "exact", "fast"), default="auto",
                   help="exact EM, or the fast scale path (subsample, truncated E-step, rank cap); auto: exact "
                        "up to 4,096 photos (default)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of the EM initialisation (default 0)")
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


def _dask_spec(text: str):
    from ..distributed.cluster import parse_dask

    try:
        return parse_dask(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dask ")) from None


def add_dask_option(p: argparse.ArgumentParser, what: str) -> None:
    """--dask SCHEDULER|local[:WORKERS] (faceprint.distributed), for commands with parallel stages."""
    p.add_argument("--dask", type=_dask_spec, default=None, metavar="SCHEDULER|local[:WORKERS]",
                   help=f"{what} on a Dask cluster, in chunks (same result as one process): local[:WORKERS] "
                        "starts worker processes on this machine (127.0.0.1), an address such as "
                        "tcp://10.0.0.5:8786 joins a running `dask scheduler`")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, default=None,
                   help="folder with taef2_encoder.pth and taef2_decoder.pth (default: $FACEPRINT_WEIGHTS, "
                        "../shared/weights/taef2, ~/.cache/faceprint/weights/taef2)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or chatter")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2), like every other refusal of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n".replace("\n", " ").rstrip() + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="faceprint", description="Frugal, accountable face generation (LR-GMM-NN).")
    parser.add_argument("--version", action="version", version=f"faceprint {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("fit", help="fit a generator on a folder of face photos")
    p.add_argument("folder", type=Path, help="folder of aligned face photos (JPEG/PNG/WebP, searched recursively)")
    p.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.safetensors)")
    _add_fit_options(p)
    add_dask_option(p, "encode the photos")
    _add_common(p)

    p = sub.add_parser("generate", help="generate faces with a fitted model")
    p.add_argument("model", type=Path, help="model file written by `faceprint fit`")
    p.add_argument("-n", type=_faces, default=16, help="number of faces (default 16); written in batches, "
                                                        "refused before starting if they would not fit on the disk")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for face_<index>.png files (created)")
    p.add_argument("--seed", type=_seed, default=0, help="seed: face i of seed s is always the same (default 0)")
    p.add_argument("--start", type=_start, default=0, help="index of the first face (default 0)")
    p.add_argument("--grid", type=Path, default=None, help="also write all faces as one grid image")
    p.add_argument("--provenance", action="store_true",
                   help="also write each face's colour-coded latent map and provenance.json")
    p.add_argument("--method", choices=("lrgmm-nn", "lrgmm", "nn", "gaussian", "gan"), default=None,
                   help="sampling method (default: the model's: gan for a model from train-gan, else lrgmm-nn); "
                        "the others are the paper's ablations")
    p.add_argument("--rank-temperature", type=_rank_temperature, default=None, help="override lambda at sampling time")
    _add_guard_options(p)
    _add_common(p)

    p = sub.add_parser("inspect", help="print a model's config, provenance and sizes")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("demo", help="fit on the first 1,024 photos of celeba-10k and write 64 faces")
    p.add_argument("--data", type=Path, default=None, help="folder of face photos (default ../shared/datasets/celeba-10k/images)")
    p.add_argument("-o", "--output", type=Path, default=Path("faceprint-demo"), help="output folder (default ./faceprint-demo)")
    p.add_argument("--limit", type=_positive_int, default=DEMO_PHOTOS, help=f"photos to fit on (default {DEMO_PHOTOS})")
    p.add_argument("-n", type=_bounded_int(1, MAX_GRID, "a number of faces"), default=DEMO_FACES,
                   help=f"faces to generate (default {DEMO_FACES})")
    p.add_argument("--seed", type=_seed, default=0)
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


EXTENSIONS = ("evaluate", "protect", "control", "serve", "train_gan", "mix", "rewrite", "personalize", "attribute")


# ---------------------------------------------------------------------------- commands
def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _fit_model(args, folder: Path, *, limit, size=128, labels=None, strict=False, config=None, seed=0):
    """Encode the photos and fit a generator in memory (nothing written but the latent cache).
    Returns (generator, number of skipped files, encode seconds, fit seconds)."""
    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..latent.generator import Generator, GeneratorConfig

    t0 = time.perf_counter()
    ae = TAEF2.load(args.weights)
    from ..distributed.cluster import open_client

    cache = False if args.no_cache else LatentCache(args.cache_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImageWarning)
        folder_obj = FaceFolder(folder, size=size, labels=labels, strict=strict, limit=limit)
        with open_client(getattr(args, "dask", None)) as client:
            latent_set = encode_folder(folder_obj, ae, cache=cache, progress=_progress(args), client=client)
    skipped = [w for w in caught if issubclass(w.category, SkippedImageWarning)]
    for w in skipped[:20]:
        _say(args, str(w.message))
    if len(skipped) > 20:
        _say(args, f"... and {len(skipped) - 20} more skipped photos")
    t1 = time.perf_counter()
    gen = Generator(config or GeneratorConfig(), autoencoder=ae).fit(latent_set, seed=seed)
    t2 = time.perf_counter()
    return gen, len(skipped), t1 - t0, t2 - t1


def _fit(args, folder: Path, output: Path, *, limit, size=128, labels=None, strict=False, config=None, seed=0):
    gen, n_skipped, t_encode, t_fit = _fit_model(args, folder, limit=limit, size=size, labels=labels, strict=strict,
                                                 config=config, seed=seed)
    gen.save(output)
    _say(args, f"fitted on {gen.n_photos} photos ({n_skipped} skipped): encode {t_encode:.1f} s, "
               f"fit {t_fit:.2f} s, K = {gen.mixture_.weights_.numel()}, "
               f"EM {gen.mixture_.history_.n_iter} iterations; wrote {output}")
    return gen


def cmd_fit(args) -> int:
    from ..latent.generator import GeneratorConfig
    from .safety import Plan, check_parent_exists, regular_input

    if args.output.suffix != ".safetensors":
        raise InputError(f"-o {str(args.output)!r}: the model file name must end in .safetensors")
    check_parent_exists("-o", args.output)
    Plan().input_folder("photo", args.folder).input_file("--labels", args.labels) \
        .output_file("-o", args.output).check()
    if args.labels is not None:
        regular_input("--labels", args.labels, "label table")
    extra = {} if args.seam_weight is None else {"seam_weight": args.seam_weight}
    if args.share_cap is not None:  # "none": no cap
        extra["share_cap"] = None if args.share_cap == "none" else args.share_cap
    cfg = GeneratorConfig(components=args.components, channels=args.channels, rank_temperature=args.rank_temperature,
                          patch_radius=args.patch_radius, iterations=args.iterations, copy=args.copy,
                          refinement=args.refinement, em=args.em, **extra)
    _fit(args, args.folder, args.output, limit=args.limit, size=args.size, labels=args.labels, strict=args.strict,
         config=cfg, seed=args.seed)
    return 0


def save_png(array, path, *, durable: bool = True) -> None:
    """Write an (H, W, 3) uint8 array as PNG, atomically, marked as written by faceprint (a
    tEXt chunk Software=faceprint: later runs may replace it, never a user's own file)."""
    from PIL import Image, PngImagePlugin

    from ..io import atomic_path
    from .safety import SOFTWARE

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    with atomic_path(path, durable=durable, cleanup=durable) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)


def _plan_faces(plan, flag: str, out_dir: Path, grid_path: Path | None, provenance: bool, n: int, start: int,
                grid_named: bool = True) -> None:
    """Add the outputs of a generate run to ``plan`` and check the names it chooses."""
    from .safety import FACE_RE, check_parent_exists

    plan.output_folder(flag, out_dir)
    if grid_path is not None:
        if n > MAX_GRID:
            raise InputError(f"--grid holds at most {MAX_GRID} faces (its pixels are kept in memory), got -n {n}; "
                             "drop --grid for more faces")
        if grid_named:
            check_parent_exists("--grid", grid_path)
        m = FACE_RE.match(grid_path.name)
        if m and _same_dir(grid_path.parent, out_dir) and start <= int(m.group(1)) < start + n:
            raise InputError(f"--grid {str(grid_path)!r} is also one of the face files of -o {str(out_dir)!r}; "
                             "choose another grid name")
        plan.output_file("--grid", grid_path, named=grid_named)
        if provenance:
            plan.output_file("--grid (its provenance map)", grid_path.with_name(grid_path.stem + "_provenance.png"),
                             named=False)
    if provenance:
        plan.output_file("--provenance", out_dir / "provenance.json", named=False)


def _same_dir(a: Path, b: Path) -> bool:
    import os

    return os.path.realpath(a) == os.path.realpath(b)


def _generate_to(args, gen, n: int, seed: int, start: int, method: str, rank_temperature, out_dir: Path,
                 grid_path: Path | None, provenance: bool) -> float:
    """Generate faces start..start+n-1 in batches of BATCH and write each batch before drawing
    the next (memory independent of n). Returns the seconds spent generating."""
    import contextlib

    from tqdm.auto import tqdm

    from .. import render
    from ..io import atomic_path, remove_stale_temporaries
    from .safety import PROVENANCE_SIGNATURE

    out_dir.mkdir(parents=True, exist_ok=True)
    grid_faces, grid_maps = [], []
    t_gen = 0.0
    guard_record = None
    bar = tqdm(total=n, unit="face", desc="generating", disable=None if _progress(args) else True)
    with contextlib.ExitStack() as stack:
        doc = None
        if provenance:
            tmp = stack.enter_context(atomic_path(out_dir / "provenance.json"))
            doc = stack.enter_context(open(tmp, "w", encoding="utf-8"))
            head = {"seed": seed, "method": method, "training_photos": gen.training_.relpaths,
                    "training_root": gen.training_.root,
                    "note": "latent_map[y][x] is the index into training_photos of the photo that latent pixel was "
                            "copied from (-1: not copied); each latent pixel covers 8x8 image pixels"}
            doc.write(PROVENANCE_SIGNATURE + ",\n")
            for k, v in head.items():
                doc.write(f" {json.dumps(k)}: {json.dumps(v)},\n")
            doc.write(' "faces": [')
        first = True
        for s in range(start, start + n, BATCH):
            m = min(BATCH, start + n - s)
            t0 = time.perf_counter()
            images, samples = gen.generate(m, seed=seed, start=s, method=method, rank_temperature=rank_temperature,
                                           guard=_guard(args))
            t_gen += time.perf_counter() - t0
            guard_record = _guard_record(samples, guard_record)
            arrays = render.to_uint8(images)
            size = images.shape[-1]
            maps = render.provenance_images(samples.provenance, size) if provenance else None
            for j, i in enumerate(samples.indices.tolist()):
                save_png(arrays[j], out_dir / f"face_{i:06d}.png", durable=False)
                if maps is not None:
                    save_png(maps[j], out_dir / f"face_{i:06d}_map.png", durable=False)
            if grid_path is not None:
                grid_faces.append(arrays)
                if maps is not None:
                    grid_maps.append(maps)
            if doc is not None:
                summary = gen.provenance_summary(samples.provenance)
                for j, i in enumerate(samples.indices.tolist()):
                    face = {"file": f"face_{i:06d}.png", "map": f"face_{i:06d}_map.png", "index": i,
                            "component": int(samples.components[j]), **summary[j],
                            "redraws": int(samples.redraws[j]) if samples.redraws is not None else 0,
                            "latent_map": samples.provenance[j].tolist()}
                    doc.write(("\n  " if first else ",\n  ") + json.dumps(face))
                    first = False
            bar.update(m)
        if doc is not None:
            doc.write("\n ],\n " + json.dumps("copy_guard") + ": " + json.dumps(guard_record) + "\n}\n")
    bar.close()
    if grid_path is not None:
        import numpy as np

        save_png(render.grid(np.concatenate(grid_faces)), grid_path)
        if grid_maps:
            save_png(render.grid(np.concatenate(grid_maps)), grid_path.with_name(grid_path.stem + "_provenance.png"))
    remove_stale_temporaries(out_dir)
    return t_gen, guard_record


def _check_generate_room(flag: str, out_dir: Path, gen, n: int, provenance: bool, grid: bool) -> None:
    from .safety import check_disk, face_bytes

    _, h, w = gen.latent_shape
    size = 8 * h
    per = face_bytes(size, h, provenance)
    extra = (2 * n * per) if grid else 0
    check_disk(flag, out_dir, n, per, extra)


def _guard_record(samples, record: dict | None = None) -> dict:
    """The copy guard's settings and counts (added to ``record`` of earlier batches), for
    provenance.json and the command's summary."""
    if samples.guard is None:
        return {"enabled": False}
    r = samples.redraws
    record = record or {"enabled": True, **samples.guard, "faces_redrawn": 0, "redraws": 0}
    record["faces_redrawn"] += int((r > 0).sum())
    record["redraws"] += int(r.sum())
    return record


def cmd_generate(args) -> int:
    from ..latent.generator import Generator
    from .safety import Plan, check_face_files

    plan = Plan().input_file("model", args.model)
    _plan_faces(plan, "-o", args.output, args.grid, args.provenance, args.n, args.start)
    plan.check()
    check_face_files("-o", args.output, args.start, args.n, args.provenance)
    gen = Generator.load(args.model, weights=args.weights)
    method = args.method or gen.default_method
    if args.provenance and method == "gan":
        raise InputError("--provenance: a GAN face has no provenance map (the GAN generates every latent pixel; "
                         "none is copied from a training photo); drop --provenance, or add --method lrgmm-nn for "
                         "this model's LR-GMM-NN faces, which have one")
    if args.provenance and method in ("lrgmm", "gaussian"):
        raise InputError(f"--provenance needs a method that copies training latents (lrgmm-nn or nn), not {method!r}")
    _check_generate_room("-o", args.output, gen, args.n, args.provenance, args.grid is not None)
    created = not args.output.exists()
    try:
        seconds, guard_record = _generate_to(args, gen, args.n, args.seed, args.start, method, args.rank_temperature, args.output,
                               args.grid, args.provenance)
    except BaseException:
        if created:
            _remove_if_empty(args.output)
        raise
    _say(args, f"generated {args.n} faces in {seconds:.2f} s ({seconds / args.n * 1000:.0f} ms/face); wrote {args.output}"
               + (f" and {args.grid}" if args.grid else "") + "; " + _guard_words(guard_record, args.n))
    return 0


def _remove_if_empty(folder: Path) -> None:
    import contextlib

    with contextlib.suppress(OSError):
        folder.rmdir()


def _guard_words(record: dict, n: int) -> str:
    if not record["enabled"]:
        return "copy guard OFF"
    return f"copy guard redrew {record['faces_redrawn']} of {n} faces as near-copies"


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
    import shutil

    from ..latent.generator import GeneratorConfig
    from .safety import Plan, check_face_files

    data = args.data or _default_demo_data()
    if data is None:
        raise InputError("demo: no photos found at ../shared/datasets/celeba-10k/images; pass --data FOLDER "
                         "with at least 32 aligned face photos (JPEG/PNG/WebP)")
    out = args.output
    if not Path(data).is_dir():
        raise InputError(f"--data {str(data)!r} is not a folder of photos (it does not exist or is a file); "
                         "pass a folder with at least 32 aligned face photos")
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {str(out)!r} exists and is not a folder")
    plan = Plan().input_folder("--data photo", data).output_folder("-o", out)
    plan.output_file("-o (the model)", out / "model.safetensors", named=False)
    _plan_faces(plan, "-o (the faces)", out / "faces", out / "grid.png", True, args.n, 0, grid_named=False)
    plan.check()
    check_face_files("-o (the faces)", out / "faces", 0, args.n, True)
    t0 = time.perf_counter()
    # nothing is created before the fit succeeded: a refused demo leaves no folder behind
    gen, n_skipped, t_encode, t_fit = _fit_model(args, data, limit=args.limit, config=GeneratorConfig(), seed=args.seed)
    _check_generate_room("-o", out, gen, args.n, True, True)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        gen.save(out / "model.safetensors")
        _say(args, f"fitted on {gen.n_photos} photos ({n_skipped} skipped): encode {t_encode:.1f} s, fit {t_fit:.2f} s; "
                   f"wrote {out / 'model.safetensors'}")
        t1 = time.perf_counter()
        _, guard_record = _generate_to(args, gen, args.n, args.seed, 0, gen.config.method, None, out / "faces",
                                       out / "grid.png", True)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    t2 = time.perf_counter()
    _say(args, f"demo: {args.n} faces from {gen.n_photos} photos in {t2 - t0:.1f} s "
               f"(fit {t1 - t0:.1f} s, generate {t2 - t1:.1f} s); {_guard_words(guard_record, args.n)}")
    print(out / "grid.png")
    print(out / "grid_provenance.png")
    return 0


COMMANDS = {"fit": cmd_fit, "generate": cmd_generate, "inspect": cmd_inspect, "demo": cmd_demo}


def _os_error_line(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        where = repr(str(e.filename)) + (f" -> {str(e.filename2)!r}" if e.filename2 else "")
        return f"{where}: {e.strerror}"
    return str(e) or e.__class__.__name__


def _stdout_closed() -> int:
    """stdout's reader went away (`faceprint inspect MODEL | head`): end quietly, as Unix tools
    do on SIGPIPE. stdout is pointed at /dev/null so the interpreter's final flush is silent."""
    import os

    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a tool ended by a closed pipe


def main(argv=None) -> int:
    command = "?"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = args.command
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except BrokenPipeError:
        return _stdout_closed()
    except FaceprintError as e:
        msg = str(e).replace("\n", " ")
        print(f"faceprint {command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only folder, disk full, permission denied, not a folder ...
        print(f"faceprint {command}: error: {_os_error_line(e)}".replace("\n", " "), file=sys.stderr)
        return 2
    except MemoryError:
        print(f"faceprint {command}: error: out of memory; ask for fewer faces or photos (-n, --limit)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceprint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
