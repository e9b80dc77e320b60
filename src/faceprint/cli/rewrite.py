"""`faceprint rewrite MODEL ... -o NEW_MODEL`: change what every face of a model shows, from one to
three edited faces (papers/001, Re-Generator; the work is in faceprint.rewrite)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError


def register(sub, *, common) -> None:
    from .main import _bounded_int, _number, _seed

    _nonneg = _number(float, 0.0, False, "a non-negative number", highest=1e6)
    _unit = _number(float, 0.0, False, "a number in [0, 1]", highest=1.0)
    p = sub.add_parser(
        "rewrite", help="rewrite a model's rules from 1-3 edited faces (e.g. every face gets eyeglasses)",
        description="Give the edits either as image files (--edit EDITED.png --original ORIGINAL.png [--mask "
                    "MASK.png], repeatable, in pairs) or as a paste of a rectangle of any image onto faces of the "
                    "model (--paste SOURCE.png:x,y,w,h --onto SEED:INDEX [--at x,y,w,h], --onto repeatable). The "
                    "new model records the rewrite; `faceprint inspect` shows it.")
    p.add_argument("model", type=Path, help="model file (.safetensors) to rewrite; not a fingerprinted instance")
    p.add_argument("-o", "--output", type=Path, required=True, help="new model file to write (.safetensors)")
    e = p.add_argument_group("the edit")
    e.add_argument("--edit", type=Path, action="append", default=[], metavar="EDITED.png",
                   help="an edited face (the model's image size); repeat for up to 3 (with as many --original)")
    e.add_argument("--original", type=Path, action="append", default=[], metavar="ORIGINAL.png",
                   help="the face before the edit (pairs with --edit in order)")
    e.add_argument("--mask", type=Path, action="append", default=[], metavar="MASK.png",
                   help="white where the edit is (default: where the edit differs from the original); one per "
                        "edit, or one for all")
    e.add_argument("--paste", default=None, metavar="SOURCE.png:x,y,w,h",
                   help="make the edit: paste this rectangle of SOURCE (any image) onto faces of the model")
    e.add_argument("--onto", action="append", default=[], metavar="SEED:INDEX",
                   help="with --paste: the face (INDEX of SEED) to paste onto; repeat for up to 3 faces")
    e.add_argument("--at", default=None, metavar="x,y,w,h",
                   help="with --paste: where in the face (default: the same rectangle); the source is resized to it")
    e.add_argument("--max-mask-fraction", type=_unit, default=0.4,
                   help="refuse an edited region larger than this share of the image (default 0.4)")
    r = p.add_argument_group("the rewrite")
    r.add_argument("--memory", choices=("decoder", "bank"), default="decoder",
                   help="decoder: fine-tune the decoder's value layer (papers/001, default); bank: edit the "
                        "refinement memory (no training)")
    r.add_argument("--layer", choices=("16x16", "32x32"), default="16x16",
                   help="decoder: value layer (16x16: block 5, the paper's 1/8 resolution; 32x32: block 10)")
    r.add_argument("--conv-layers", type=int, choices=(1, 2, 3), default=2,
                   help="decoder: memory depth L (2: conv-ReLU-conv, the paper's; 1: one conv, RDGM's)")
    r.add_argument("--weighting", choices=("weighted", "unweighted"), default="weighted",
                   help="decoder: p*new + q*old with each term a mean over its own cells (default), or one mean "
                        "over every cell")
    r.add_argument("--p", type=_nonneg, default=1.0, help="decoder: weight of the new rule (default 1; 0 = no-op)")
    r.add_argument("--q", type=_nonneg, default=4.0, help="decoder: weight of the old rules (default 4)")
    r.add_argument("--steps", type=_bounded_int(0, 100_000, "a number of steps"), default=300,
                   help="decoder: fine-tuning steps (default 300)")
    r.add_argument("--lr", type=_number(float, 0.0, True, "a positive learning rate", highest=1.0), default=1e-3)
    r.add_argument("--ordinary", type=_bounded_int(0, 100_000, "a number of samples"), default=200,
                   help="decoder: faces of the model that hold the old rules (default 200)")
    r.add_argument("--paste-samples", type=_bounded_int(0, 100_000, "a number of samples"), default=32,
                   help="decoder: further faces of the model that get the exemplars' region pasted into their "
                        "value maps, as training data of the new rule (papers/001 Sec. 5.1; default 32)")
    r.add_argument("--projector", default="auto", metavar="auto|free|trained|FILE",
                   help="decoder: backward projector: free = TAEF2 encoder + decoder head (no training); trained = "
                        "the shipped weights; auto = trained if shipped for this decoder, else free")
    r.add_argument("--bank-mode", choices=("value", "insert"), default="value",
                   help="bank: value edit in the region (default) or key-value row insertion")
    r.add_argument("--key-shift", type=_unit, default=1.0,
                   help="bank insert: share alpha of the way each inserted key moves to its component's mean key "
                        "in the region (retrieval strength; default 1)")
    r.add_argument("--seed", type=_seed, default=0, help="seed of the ordinary samples and batches (default 0)")
    common(p)
    p.set_defaults(handler=cmd_rewrite)


def _say(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _plan(args) -> None:
    from ..rewrite.edits import parse_paste
    from .safety import Plan, check_parent_exists

    if args.output.suffix != ".safetensors":
        raise InputError(f"-o {str(args.output)!r}: the model file name must end in .safetensors")
    check_parent_exists("-o", args.output)
    plan = Plan().input_file("model", args.model)
    if args.paste is not None:
        if args.edit or args.original:
            raise InputError("--paste makes the edit itself: drop --edit/--original, or drop --paste")
        if not args.onto:
            raise InputError("--paste needs --onto SEED:INDEX (the face of the model to paste onto), e.g. --onto 0:3")
        src, _ = parse_paste(args.paste)
        plan.input_file("--paste source", src)
    else:
        if args.onto or args.at:
            raise InputError("--onto and --at go with --paste SOURCE.png:x,y,w,h")
        if not args.edit:
            raise InputError("no edit given: pass --edit EDITED.png --original ORIGINAL.png, or --paste "
                             "SOURCE.png:x,y,w,h --onto SEED:INDEX")
        if len(args.edit) != len(args.original):
            raise InputError(f"{len(args.edit)} --edit but {len(args.original)} --original: give one original per "
                             "edited face, in the same order")
        if args.mask and len(args.mask) not in (1, len(args.edit)):
            raise InputError(f"{len(args.mask)} --mask for {len(args.edit)} edits: give one mask per edit, or one for all")
        for f in args.edit:
            plan.input_file("--edit", f)
        for f in args.original:
            plan.input_file("--original", f)
    for f in args.mask:
        plan.input_file("--mask", f)
    plan.output_file("-o", args.output).check()


def _edits(args, gen) -> list:
    from ..rewrite.edits import edit_from_files, parse_onto, parse_paste, parse_rect, paste_edit, read_mask, read_source

    _, h, _ = gen.latent_shape
    size = 8 * h
    if args.paste is not None:
        src_path, rect = parse_paste(args.paste)
        source, sha = read_source(src_path)
        at = parse_rect(args.at, "--at") if args.at else None
        out = []
        for spec in args.onto:
            seed, index = parse_onto(spec)
            ed = paste_edit(gen, source, rect, seed, index, at, source_sha256=sha, source_name=src_path.name)
            if args.mask:
                ed.mask, hm = read_mask(args.mask[0], size=size)
                ed.record["mask_file_sha256"] = hm
            out.append(ed)
        return out
    masks = args.mask * len(args.edit) if len(args.mask) == 1 else (args.mask or [None] * len(args.edit))
    return [edit_from_files(o, e, m, size=size) for e, o, m in zip(args.edit, args.original, masks)]


def cmd_rewrite(args) -> int:
    import time

    from ..io import atomic_write_bytes
    from ..latent.generator import Generator
    from ..rewrite import RewriteConfig, check_not_fingerprinted, rewrite
    from .safety import regular_input

    _plan(args)
    regular_input("model", args.model, "model file")
    t0 = time.perf_counter()
    cfg = RewriteConfig(memory=args.memory, layer=args.layer, conv_layers=args.conv_layers, weighting=args.weighting,
                        p=args.p, q=args.q, steps=args.steps, lr=args.lr, ordinary=args.ordinary,
                        paste_samples=args.paste_samples,
                        projector=args.projector, bank_mode=args.bank_mode, key_shift=args.key_shift,
                        max_mask_fraction=args.max_mask_fraction, seed=args.seed)
    gen = Generator.load(args.model, weights=args.weights)
    check_not_fingerprinted(gen, f"{str(args.model)!r}")
    edits = _edits(args, gen)

    def progress(step, rec):
        if not args.quiet and sys.stderr.isatty():
            print(f"\r  step {step + 1}/{cfg.steps}: loss {rec['loss']:.5f} (new rule {rec['new_rule']:.5f}, "
                  f"old rules {rec['old_rules']:.5f})", end="", file=sys.stderr, flush=True)

    out, rep = rewrite(gen, edits, cfg, progress=progress)
    if not args.quiet and sys.stderr.isatty() and cfg.memory == "decoder":
        print(file=sys.stderr)
    if rep.noop:
        # nothing to learn: the new file is the old one, byte for byte
        atomic_write_bytes(args.output, args.model.read_bytes())
        _say(args, f"no-op edit ({rep.reason}): wrote an unchanged copy of the model to {args.output}")
        return 0
    out.save(args.output)
    rec = rep.record
    if rep.memory == "decoder":
        b, a = rep.loss_before, rep.loss_after
        _say(args, f"rewrote the decoder at {rec['layer']} (L = {rec['conv_layers']}, {rec['weighting']}, projector "
                   f"{rec['projector']['variant']}) from {len(edits)} edited face(s) in {time.perf_counter() - t0:.1f} s: "
                   f"new-rule loss {b['new_rule']:.5f} -> {a['new_rule']:.5f}, old-rule loss {b['old_rules']:.5f} -> "
                   f"{a['old_rules']:.5f}; wrote {args.output}")
    else:
        what = f"{rec['region_cells']} latent cells of every memory row" if cfg.bank_mode == "value" \
            else f"{rec['rows_inserted']} key-value rows"
        _say(args, f"rewrote the refinement memory ({cfg.bank_mode}: {what}) from {len(edits)} edited face(s) in "
                   f"{time.perf_counter() - t0:.1f} s; wrote {args.output}")
    return 0
