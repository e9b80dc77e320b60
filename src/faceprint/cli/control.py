"""`faceprint tame forget|rebalance|include`: change what a fitted model may produce."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError

POSITIVE = {"1", "true", "yes", "y", "t"}
BINARY_SETS = ({"-1", "1"}, {"0", "1"}, {"false", "true"}, {"no", "yes"}, {"n", "y"}, {"f", "t"})


def register(sub, *, common) -> None:
    from .main import _number, _positive_float

    _members = _number(float, 0.0, True, "a positive number of photos (at most 1e9)", highest=1e9)

    p = sub.add_parser("tame", help="forget a person, set attribute shares, include subgroups (writes a new model)")
    tsub = p.add_subparsers(dest="tame_command", metavar="OPERATION")
    tsub.required = True

    f = tsub.add_parser("forget", help="remove a person's training photos from the model and its memory")
    f.add_argument("model", type=Path)
    f.add_argument("--photos", type=Path, required=True,
                   help="folder of the person's photos; training photos among them (same file content) are forgotten")
    f.add_argument("-o", "--output", type=Path, required=True, help="model file to write")
    f.add_argument("--name", default=None, help="what is forgotten, for the model's provenance (e.g. 'person 2880')")
    common(f)
    f.set_defaults(handler=cmd_forget)

    r = tsub.add_parser("rebalance", help="set how often attribute values appear")
    r.add_argument("model", type=Path)
    r.add_argument("--attribute", action="append", required=True, metavar="ATTR=SHARE",
                   help="e.g. Male=0.5 (binary attribute: share of the positive value), race:white=0.2, "
                        "race=uniform; repeat for several")
    r.add_argument("--labels", type=Path, required=True,
                   help="CSV with a row per training photo (file column + attribute columns), e.g. celeba's attributes.csv")
    r.add_argument("--min-members", type=_members, default=8.0,
                   help="fewest photos a split-off component may be fitted on (default 8)")
    r.add_argument("-o", "--output", type=Path, required=True)
    common(r)
    r.set_defaults(handler=cmd_rebalance)

    i = tsub.add_parser("include", help="give subgroups their own components and a guaranteed share")
    i.add_argument("model", type=Path)
    i.add_argument("--include", action="append", required=True, metavar="ATTR[:VALUE]",
                   help="e.g. Bald, Eyeglasses, race:black; repeat for several")
    i.add_argument("--labels", type=Path, required=True, help="CSV with a row per training photo")
    i.add_argument("--share", type=_positive_float, default=None,
                   help="minimum share of the output for each subgroup (default: twice its share of the photos, at least 0.05)")
    i.add_argument("--min-members", type=_members, default=8.0)
    i.add_argument("-o", "--output", type=Path, required=True)
    common(i)
    i.set_defaults(handler=cmd_include)


def _load(args):
    from ..latent.generator import Generator

    return Generator.load(args.model, autoencoder=None)


def _check_output(args):
    """-o is not an input (model, label table, a photo of --photos), can be written, and every
    input that must be a regular file is one; checked before any work."""
    from .safety import Plan, check_parent_exists, regular_input

    check_parent_exists("-o", args.output)
    plan = Plan().input_file("model", args.model).input_file("--labels", getattr(args, "labels", None))
    plan.input_folder("--photos", getattr(args, "photos", None))
    plan.output_file("-o", args.output).check()
    if getattr(args, "labels", None) is not None:
        regular_input("--labels", args.labels, "label table")


def _say(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def cmd_forget(args) -> int:
    from ..taming import forget, match_training_photos

    _check_output(args)
    gen = _load(args)
    idx, unmatched = match_training_photos(gen, args.photos)
    if not idx:
        raise InputError(f"--photos {str(args.photos)!r}: none of its {len(unmatched)} files is a training photo of "
                         "the model (matched by content); nothing to forget")
    out, rep = forget(gen, idx, name=args.name)
    out.save(args.output)
    up, down = sum(rep.log_prob_before) / len(idx), sum(rep.log_prob_after) / len(idx)
    print(f"forgot {len(idx)} training photos ({len(unmatched)} given photos were not training photos) in "
          f"{rep.seconds * 1000:.0f} ms; components {rep.components_before} -> {rep.components_after} "
          f"({len(rep.updated_components)} updated, {len(rep.dropped_components)} dropped); mean log p per dimension "
          f"of the forgotten photos {up:.3f} -> {down:.3f}; wrote {args.output}")
    return 0


def _labels_for(gen, csv_path: Path, columns: list[str]) -> dict[str, list[str]]:
    from ..data import read_labels

    table = read_labels(csv_path)
    rows = table.match(gen.training_.relpaths, root=gen.training_.root)
    return {c: [v.strip() for v in table.values_at(rows, [c])[c]] for c in columns}


def _positive_value(attr: str, values: set[str]) -> str:
    low = {v.lower() for v in values}
    for s in BINARY_SETS:
        if low <= s:
            present = [v for v in values if v.lower() in POSITIVE]
            return present[0] if present else sorted(s & POSITIVE)[0]
    raise InputError(f"attribute {attr!r} is not binary (values: {', '.join(sorted(values))}); "
                     f"name the value, e.g. {attr}:{sorted(values)[0]}=0.2 or {attr}=uniform")


def parse_requests(specs: list[str]) -> dict[str, list[tuple[str | None, str]]]:
    """'Male=0.5', 'race:white=0.2', 'race=uniform' -> {attr: [(value or None, share text)]}."""
    out: dict[str, list] = {}
    for spec in specs:
        if "=" not in spec:
            raise InputError(f"--attribute {spec!r}: expected ATTR=SHARE, ATTR:VALUE=SHARE or ATTR=uniform")
        left, share = spec.rsplit("=", 1)
        attr, _, value = left.partition(":")
        if not attr:
            raise InputError(f"--attribute {spec!r}: the attribute name is empty")
        out.setdefault(attr, []).append((value or None, share.strip()))
    return out


def cmd_rebalance(args) -> int:
    from ..taming import rebalance

    _check_output(args)
    gen = _load(args)
    parsed = parse_requests(args.attribute)
    labels = _labels_for(gen, args.labels, list(parsed))
    requests = {}
    for attr, items in parsed.items():
        values = set(labels[attr])
        if any(s == "uniform" for _, s in items):
            if len(items) > 1:
                raise InputError(f"--attribute {attr}=uniform cannot be combined with other shares of {attr}")
            requests[attr] = "uniform"
            continue
        req = {}
        for value, share in items:
            try:
                x = float(share)
            except ValueError:
                raise InputError(f"--attribute {attr}: share {share!r} is not a number in [0, 1] or 'uniform'") from None
            req[value if value is not None else _positive_value(attr, values)] = x
        requests[attr] = req
    out, rep = rebalance(gen, labels, requests, min_members=args.min_members, source=f"labels:{args.labels.name}")
    out.save(args.output)
    for a in rep.targets:
        for v, t in rep.targets[a].items():
            print(f"{a}={v}: {rep.shares_before[a][v]:.3f} -> {rep.shares_after[a][v]:.3f} (requested {t:.3f})")
    print(f"components {rep.components_before} -> {rep.components_after}, KL(new || old weights) {rep.kl:.3f}, "
          f"{rep.seconds * 1000:.0f} ms; wrote {args.output}")
    return 0


def cmd_include(args) -> int:
    from ..taming import include

    _check_output(args)
    gen = _load(args)
    attrs = sorted({s.partition(":")[0] for s in args.include})
    labels = _labels_for(gen, args.labels, attrs)
    members = {}
    for spec in args.include:
        attr, _, value = spec.partition(":")
        vals = labels[attr]
        value = value or _positive_value(attr, set(vals))
        if value not in set(vals):
            raise InputError(f"--include {spec!r}: no training photo has {attr} = {value!r}")
        members[f"{attr}={value}"] = [v == value for v in vals]
    if args.share is not None and not (0 < args.share < 1):
        raise InputError(f"--share must be in (0, 1), got {args.share}")
    out, rep = include(gen, members, share=args.share, min_members=args.min_members,
                       source=f"labels:{args.labels.name}")
    out.save(args.output)
    for s in rep.subgroups:
        print(f"{s}: {rep.data_share[s]:.3f} of the photos; share of output {rep.share_before[s]:.3f} -> "
              f"{rep.share_after[s]:.3f}")
    print(f"components {rep.components_before} -> {rep.components_after}; wrote {args.output}")
    return 0
