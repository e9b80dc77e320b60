"""Fingerprints through a mix: are the faces `faceprint mix` makes from fingerprinted faces still read?

``python -m faceprint.bench mix-marks [--photos 64] [--pairs 12] [--seed 0] [--out RUN] [--publish DIR]``

One small model is fitted on the first ``--photos`` celeba-10k photos; for each fingerprint mechanism
(the default keyed mark and the data-level bank mark) an owner with a key fixed by ``--seed`` issues
two instances (Alice, Bob) and calibrates verification at ``--target-fpr`` on held-out photos. Then,
for ``--pairs`` pairs of generated faces (distinct seeds), every mix the CLI offers between two faces
is made with the trained mixer and with the plain latent blend: a hybrid (32 px band) and 50/50 and
25/75 dissolves, of two faces of one instance (Alice + Alice) and of two recipients (Alice + Bob);
unmixed faces are the reference row. Each image is verified with ``faceprint verify`` and the table
gives how often it is read as a source's recipient, as someone else, or as no one, with the median
score. Everything here runs through the CLI, the path a user takes.

The run folder holds the model fitted on photos and generated faces: never commit it; only the
tables are published.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import statistics
import time
from contextlib import redirect_stdout
from pathlib import Path

from .machine import datasets_dir, describe, print_table
from .machine import write_results as save

MECHANISMS = ("keyed-bank", "datalevel-bank")
MARKER = "mix-marks.run"
MIXES = (("hybrid", ["--mode", "hybrid", "--band", "32"]),
         ("dissolve 0.5", ["--mode", "dissolve", "--alpha", "0.5"]),
         ("dissolve 0.25 (75% A)", ["--mode", "dissolve", "--alpha", "0.25"]))


def add_arguments(p) -> None:
    p.add_argument("--photos", type=int, default=64, help="training photos of the small model (first N of celeba-10k)")
    p.add_argument("--negatives", type=int, default=200, help="held-out photos for the calibration")
    p.add_argument("--pairs", type=int, default=12, help="pairs of generated faces per row")
    p.add_argument("--target-fpr", type=float, default=0.02, help="verification's calibrated false-positive target")
    p.add_argument("--seed", type=int, default=0, help="owner keys, issued codes and face seeds derive from it")
    p.add_argument("--data", type=Path, default=None, help="the datasets folder holding celeba-10k/ (default: ../shared/datasets)")
    p.add_argument("--out", type=Path, default=Path("bench-results/mix-marks"), help="run folder (holds photo-derived files)")
    p.add_argument("--publish", type=Path, default=None, help="copy mix-marks.md/json here (e.g. docs/results)")


def _cli(argv: list[str]) -> str:
    from ..cli.main import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"faceprint {' '.join(argv[:2])} failed with exit code {rc}")
    return buf.getvalue()


def _owner(model: Path, folder: Path, mechanism: str, seed: int) -> None:
    """An owner folder whose key is fixed by ``seed`` (the CLI would draw a secret one)."""
    from ..autoencoder import TAEF2
    from ..fingerprint.keyed import OwnerSecret
    from ..fingerprint.owner import Owner
    from ..latent.generator import Generator

    gen = Generator.load(model, autoencoder=TAEF2.load())
    owner = Owner(folder)
    if mechanism == "keyed-bank":
        owner._ensure_folder()
        master = hashlib.sha256(f"faceprint bench mix-marks owner {seed}".encode()).digest()
        OwnerSecret(master=master).fit(gen.bank_.float(), gen.autoencoder).save(owner.secret_path)
    else:
        owner.key_for(gen, key_seed=seed + 12345)


def _statistic(v: dict) -> float:
    return float(v["score"]) if v.get("score") is not None else float(v.get("matching_bits") or 0)


def run(args) -> int:
    t_all = time.perf_counter()
    photos_dir = datasets_dir(args.data) / "celeba-10k" / "images"
    if not photos_dir.is_dir():
        raise SystemExit(f"mix-marks: no photos at {photos_dir} (pass --data, the folder holding celeba-10k/)")
    files = sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    if len(files) < args.photos + args.negatives:
        raise SystemExit(f"mix-marks: {len(files)} photos, need {args.photos + args.negatives}")
    out = args.out
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SystemExit(f"mix-marks: --out {out} exists and is not a mix-marks run folder; pass an empty or new folder")
        shutil.rmtree(out)  # a previous run of this benchmark: start afresh (the run takes minutes)
    train, neg = out / "photos", out / "negatives"
    train.mkdir(parents=True)
    (out / MARKER).write_text("a run folder of python -m faceprint.bench mix-marks; holds photo-derived files\n")
    neg.mkdir()
    for p in files[:args.photos]:
        (train / p.name).symlink_to(p.resolve())
    for p in files[args.photos:args.photos + args.negatives]:
        (neg / p.name).symlink_to(p.resolve())
    model = out / "model.safetensors"
    _cli(["fit", str(train), "-o", str(model), "--components", "2", "--seed", str(args.seed), "-q"])
    rows, raw = [], {}
    for mech in MECHANISMS:
        t0 = time.perf_counter()
        owner = out / f"owner-{mech}"
        ow = ["--owner", str(owner)]
        _owner(model, owner, mech, args.seed)
        inst = {}
        for k, name in enumerate(("alice", "bob")):
            inst[name] = out / f"{mech}-{name}.safetensors"
            _cli(["fingerprint", "issue", str(model), "--to", name.title(), "--mechanism", mech, "-o", str(inst[name]),
                  "--seed", str(args.seed * 10 + k + 1), "-q", *ow])
        _cli(["fingerprint", "calibrate", str(model), "--negatives", str(neg), "--faces", "60", "--instances", "1",
              "--faces-per-instance", "60", "--min-negatives", str(min(300, args.negatives)),
              "--target-fpr", str(args.target_fpr), "-q", *ow])
        cases: dict[tuple, list[Path]] = {}
        faces = out / f"{mech}-faces"
        faces.mkdir()
        for i in range(args.pairs):
            s1, s2 = 1000 * args.seed + 2 * i + 1, 1000 * args.seed + 2 * i + 2
            src = f"{inst['alice']}:seed={s1}"
            o = faces / f"plain-{i}.png"
            _cli(["generate", str(inst["alice"]), "-n", "1", "--seed", str(s1), "-o", str(faces / f"g{i}"), "-q"])
            shutil.move(next((faces / f"g{i}").glob("*.png")), o)
            cases.setdefault(("unmixed face", "-", "Alice"), []).append(o)
            for mix, flags in MIXES:
                for method in ("ours", "latent"):
                    for pairing, second in (("Alice + Alice", "alice"), ("Alice + Bob", "bob")):
                        o = faces / f"{mix.replace(' ', '')}-{method}-{second}-{i}.png"
                        _cli(["mix", src, f"{inst[second]}:seed={s2}", *flags, "--method", method, "-o", str(o), "-q"])
                        cases.setdefault((mix, method, pairing), []).append(o)
        for (mix, method, pairing), imgs in cases.items():
            got = [json.loads(line) for line in _cli(["verify", "--json", *map(str, imgs), "-q", *ow]).splitlines()
                   if line.startswith("{")]
            sources = {"Alice"} | ({"Bob"} if pairing == "Alice + Bob" else set())
            read = [v["recipient"] for v in got if v["match"]]
            stats = [_statistic(v) for v in got]
            r = {"mechanism": mech, "mix": mix, "method": method, "pairing": pairing, "n": len(got),
                 "read_as_a_source": sum(x in sources for x in read),
                 "read_as_alice": read.count("Alice"), "read_as_bob": read.count("Bob"),
                 "read_as_another": sum(x not in sources for x in read), "read_as_no_one": len(got) - len(read),
                 "median_statistic": statistics.median(stats), "min_statistic": min(stats), "max_statistic": max(stats),
                 "statistic": "score (N(0,1) on innocent images)" if mech == "keyed-bank" else "matching bits"}
            rows.append(r)
            raw[f"{mech}|{mix}|{method}|{pairing}"] = [{k: v.get(k) for k in ("instance", "recipient", "match", "score", "matching_bits",
                                                                               "threshold", "bit_accuracy")} for v in got]
        print(f"mix-marks: {mech} done in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {"machine": describe({"seed": args.seed}),
               "settings": {"photos": args.photos, "negatives": args.negatives, "pairs": args.pairs,
                            "target_fpr": args.target_fpr, "mixer": "packaged (3,000 steps) for 'ours'; TAEF2 only for 'latent'"},
               "rows": rows, "verdicts": raw, "seconds": time.perf_counter() - t_all}
    write_results(args, results)
    return 0


def write_results(args, results) -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        print("# Fingerprints through a mix - `python -m faceprint.bench mix-marks`\n")
        print(f"Command: `python -m faceprint.bench mix-marks --photos {args.photos} --negatives {args.negatives} "
              f"--pairs {args.pairs} --target-fpr {args.target_fpr} --seed {args.seed}`. Every figure is in mix-marks.json. "
              "A small model fitted on the first photos of celeba-10k, two instances per mechanism (Alice, Bob), "
              "verification calibrated on held-out photos; each row is one kind of mix of generated faces, "
              "made and verified through the CLI.")
        print_table("Machine and settings", ["item", "value"],
                    [[k, v] for k, v in results["machine"].items()] + [[k, v] for k, v in results["settings"].items()])
        for mech in MECHANISMS:
            rs = [r for r in results["rows"] if r["mechanism"] == mech]
            th = sorted({v["threshold"] for k, vs in results["verdicts"].items() if k.startswith(mech + "|") for v in vs})
            print_table(f"{mech} mark ({rs[0]['statistic']}; match threshold {', '.join(f'{t:.2f}' for t in th)})",
                        ["mix", "method", "sources", "n", "read as a source", "as Alice", "as Bob", "as another",
                         "as no one", "median statistic", "range"],
                        [[r["mix"], r["method"], r["pairing"], r["n"], r["read_as_a_source"], r["read_as_alice"],
                          r["read_as_bob"], r["read_as_another"], r["read_as_no_one"], f"{r['median_statistic']:.2f}",
                          f"{r['min_statistic']:.2f} to {r['max_statistic']:.2f}"] for r in rs])
        print(f"\nTotal {results['seconds']:.0f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    save(args.out, "mix-marks", buf.getvalue(), results, args.publish)
