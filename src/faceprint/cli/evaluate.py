"""`faceprint evaluate MODEL --real FOLDER [-n N]`: the quality table for a user's own model."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub, *, common) -> None:
    from .main import _bounded_int, _seed

    p = sub.add_parser("evaluate", help="FID/KID/precision/recall/coverage/memorization of a model against real photos")
    p.add_argument("model", type=Path, help="model file written by `faceprint fit`")
    p.add_argument("--real", type=Path, required=True,
                   help="folder of real face photos to compare with (its training photos are left out)")
    p.add_argument("-n", type=_bounded_int(1, 1_000_000, "a number of faces"), default=2000,
                   help="faces to generate (default 2000; FID wants thousands)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--real-limit", type=_bounded_int(1, 10_000_000, "a number of photos"), default=5000,
                   help="use at most this many real photos (default 5000)")
    p.add_argument("--batch", type=_bounded_int(1, 4096, "a batch size"), default=250, help="faces per chunk (default 250)")
    p.add_argument("--json", type=Path, default=None, help="also write every number as JSON to this file")
    from .main import add_dask_option

    add_dask_option(p, "decode the faces and take the Inception features")
    common(p)
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from ..bench.machine import print_table
    from ..errors import InputError
    from ..io import atomic_write_text
    from ..latent.generator import Generator
    from ..metrics.evaluate import evaluate_generator

    from .safety import Plan, check_parent_exists

    if not args.real.is_dir():
        raise InputError(f"--real {str(args.real)!r} is not a folder; pass a folder of face photos")
    plan = Plan().input_file("model", args.model).input_folder("--real photo", args.real)
    if args.json is not None:
        check_parent_exists("--json", args.json)
        plan.output_file("--json", args.json)
    plan.check()
    if args.n < 2:
        raise InputError(f"-n must be at least 2 to compute FID, got {args.n}")
    gen = Generator.load(args.model, weights=args.weights)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    from ..distributed.cluster import open_client

    with open_client(args.dask) as client:
        ev = evaluate_generator(gen, args.real, n=args.n, seed=args.seed, real_limit=args.real_limit, batch=args.batch,
                                progress=say, client=client)
    mi, ml = ev.memorization_inception, ev.memorization_latent
    rows = [
        ["generated faces", ev.n_generated],
        ["real photos compared", ev.n_real],
        ["real photos left out (training photos)", ev.n_real_in_training],
        ["FID", f"{ev.fid:.2f}"],
        ["KID x 1e3", f"{ev.kid * 1e3:.2f} ± {ev.kid_std * 1e3:.2f}"],
        ["precision (k=3)", f"{ev.precision:.3f}"],
        ["recall (k=3)", f"{ev.recall:.3f}"],
        ["density (k=5)", f"{ev.density:.3f}"],
        ["coverage (k=5)", f"{ev.coverage:.3f}"],
        [f"closer to a training {ev.training_reference[:-1]} than any held-out photo is (Inception)",
         f"{mi['share_below_min']:.3f}"],
        ["closer than 5% of held-out photos (Inception)", f"{mi['share_below_quantile']:.3f}"],
        ["closer to a training latent than any held-out latent is", f"{ml['share_below_min']:.3f}"],
        ["nearest training / nearest held-out distance, median (Inception)",
         f"{mi['gen_to_train_median']:.2f} / {mi['gen_to_heldout_median']:.2f}"],
    ]
    if ev.provenance:
        rows += [["training photos per face (mean)", f"{ev.provenance['mean_distinct']:.1f}"],
                 ["largest share from one photo (mean)", f"{ev.provenance['mean_largest_share']:.3f}"]]
    rows += [[k, f"{v:.2f}"] for k, v in ev.seconds.items()]
    print_table(f"faceprint evaluate {args.model.name} (seed {args.seed})", ["metric", "value"], rows)
    if ev.training_reference == "reconstructions":
        print("note: the training photos were not found where the model was fitted; memorization is measured "
              "against the autoencoder's reconstructions of the stored training latents")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(ev.as_dict(), indent=1))
    return 0
