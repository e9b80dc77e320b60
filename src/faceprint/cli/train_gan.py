"""`faceprint train-gan PHOTOS -o MODEL [--minutes M] [--iterations N]`: fit a latent GAN
(papers/004, Ch. 2; the work is in faceprint.gan) into the usual model file.

A command of its own rather than `fit --method gan`: `fit --iterations` already means the NN
refinement's iterations, and the GAN has options of its own (loss, attention, time budget,
checkpoint and resume)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path


def register(sub, *, common) -> None:
    from .main import _bounded_int, _positive_float, _positive_int, _seed

    p = sub.add_parser("train-gan", help="train a latent GAN (dual contrastive loss, attention) on a folder of photos")
    p.add_argument("folder", type=Path, help="folder of aligned face photos (JPEG/PNG/WebP, searched recursively)")
    p.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.safetensors)")
    g = p.add_argument_group("training")
    g.add_argument("--minutes", type=_positive_float, default=None,
                   help="time budget: with no --iterations, as many iterations as fit in it (timed on the first 10); "
                        "with --iterations, a cap (a stopped run resumes with --resume)")
    g.add_argument("--iterations", type=_bounded_int(1, 10_000_000, "a number of iterations"), default=None,
                   help="planned iterations (default: the preset's, 3000); the warm-up is 20%% of them")
    g.add_argument("--preset", choices=("small", "tiny"), default="small",
                   help="network size: small (~0.8M G parameters), tiny (half the channels, ~4x cheaper)")
    g.add_argument("--augment", default=None, metavar="POLICIES",
                   help="DiffAugment of D's inputs, comma-separated of flip, translation, cutout, '' for none "
                        "(default: the preset's: none for small, translation,cutout for tiny)")
    g.add_argument("--loss", choices=("ns", "contrastive", "hinge"), default="ns",
                   help="ns: non-saturating (default); contrastive: dual contrastive (papers/004 Eq. 2.1-2.3) after "
                        "an NS warm-up; hinge")
    g.add_argument("--g-attention", action="store_true", help="SAN self-attention in the generator (Sec. 2.3.2)")
    g.add_argument("--d-reference-attention", action="store_true",
                   help="reference attention in the discriminator (Sec. 2.3.3, Eq. 2.8)")
    g.add_argument("--patch", type=_bounded_int(1, 15, "an odd patch size"), default=5,
                   help="attention patch size s (odd; default 5)")
    g.add_argument("--batch-size", type=_bounded_int(2, 4096, "a batch size"), default=None,
                   help="mini-batch size (default: the preset's)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of the initialisation and of every draw (default 0)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file (default: MODEL with .ckpt.safetensors; removed after a finished run)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    g.add_argument("--components", type=_positive_int, default=None,
                   help="components of the LR-GMM kept beside the GAN (--method lrgmm-nn of generate; default auto)")
    d = p.add_argument_group("data")
    d.add_argument("--size", type=int, choices=(64, 128, 256), default=128,
                   help="working image size in pixels (the GAN is built for 128)")
    d.add_argument("--limit", type=_positive_int, default=None, help="use only the first N photos in file-name order")
    d.add_argument("--cache-dir", type=Path, default=None, help="latent cache folder (default ~/.cache/faceprint)")
    d.add_argument("--no-cache", action="store_true", help="do not read or write the latent cache")
    common(p)
    p.set_defaults(handler=cmd_train_gan)


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def cmd_train_gan(args) -> int:
    from dataclasses import replace

    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..errors import FaceprintWarning, InputError, SkippedImageWarning
    from ..gan.model import PRESETS, fit_gan_generator
    from ..latent.generator import GeneratorConfig
    from .main import _progress
    from .safety import Plan, check_parent_exists

    if args.output.suffix != ".safetensors":
        raise InputError(f"-o {str(args.output)!r}: the model file name must end in .safetensors")
    if args.patch % 2 == 0:
        raise InputError(f"--patch must be odd (a patch centred on each position), got {args.patch}; try 5")
    check_parent_exists("-o", args.output)
    ckpt = args.checkpoint or args.output.with_name(args.output.stem + ".ckpt.safetensors")
    check_parent_exists("--checkpoint", ckpt)
    if args.resume and not ckpt.is_file():
        raise InputError(f"--resume: no checkpoint at {str(ckpt)!r}; run without --resume to start, or pass the "
                         "--checkpoint of the interrupted run")
    Plan().input_folder("photo", args.folder).output_file("-o", args.output).check()
    over = {"loss": args.loss, "g_attention": args.g_attention, "d_reference_attention": args.d_reference_attention,
            "attn_patch": args.patch}
    if args.augment is not None:
        over["augment"] = args.augment
    if args.batch_size is not None:
        over["batch_size"] = args.batch_size
    cfg = replace(PRESETS[args.preset], **over)

    t0 = time.perf_counter()
    ae = TAEF2.load(args.weights)
    cache = False if args.no_cache else LatentCache(args.cache_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImageWarning)
        warnings.simplefilter("always", FaceprintWarning)
        folder = FaceFolder(args.folder, size=args.size, limit=args.limit)
        latent_set = encode_folder(folder, ae, cache=cache, progress=_progress(args))
        t_encode = time.perf_counter() - t0
        gen = fit_gan_generator(latent_set, ae, config=cfg, generator_config=GeneratorConfig(components=args.components),
                                seed=args.seed, iterations=args.iterations,
                                max_seconds=None if args.minutes is None else 60 * args.minutes,
                                checkpoint=ckpt, resume=args.resume, progress=_progress(args))
    for w in caught[:20]:
        _say(args, str(w.message))
    gen.save(args.output)
    gan = gen.latent_model_
    pv = gan.provenance_
    stop = pv.get("stopped") or {}
    note = ""
    if stop.get("reason") == "time":
        note = (f"; stopped by the time budget at iteration {pv['iterations']} of {pv['planned_iterations']} "
                f"(continue with --resume --iterations {pv['planned_iterations']})")
    elif stop.get("reason") == "diverged":
        note = f"; training DIVERGED at iteration {stop['iteration']}: the model is the last good checkpoint"
    _say(args, f"trained a {cfg.loss} GAN (G attention {'on' if cfg.g_attention else 'off'}, D reference attention "
               f"{'on' if cfg.d_reference_attention else 'off'}) on {gen.n_photos} photos: {pv['iterations']} "
               f"iterations (warm-up {pv['warmup_iterations']}) in {pv['train_seconds']:.0f} s, encode "
               f"{t_encode:.1f} s{note}; wrote {args.output}")
    if args.checkpoint is None and not stop and ckpt.is_file():
        ckpt.unlink()
    elif ckpt.is_file():
        _say(args, f"checkpoint kept at {ckpt}")
    return 0
