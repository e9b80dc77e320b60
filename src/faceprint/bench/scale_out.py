"""`python -m faceprint.bench scale-out`: each parallel stage in one process, then on a Dask
LocalCluster of 1 and of 2 worker processes (one thread each) on this machine.

Jobs (the stages ``--dask`` distributes):

  fit-encode           ``fit``'s photo encoding: decode + TAEF2-encode ``--photos`` celeba-10k
                       photos (no latent cache)
  evaluate             ``evaluate``: features of ``--real`` real photos and of the training
                       photos, ``--faces`` faces decoded and featurised, all metrics
  quality-features     ``bench quality``'s inner loop: decode ``--faces`` faces and take their
                       Inception features
  fingerprint-readout  ``fingerprint calibrate`` / ``verify`` on a folder: read the code out of
                       ``--photos`` image files (faceprint.distributed.decode_image_files)

Every row states its wall time (the cluster's start-up is timed apart and not included), its
throughput, the speed-up over the one-process row, and whether its output is bit-identical to
the one-process output (sha256 of the result arrays). The one-process rows run with the
process's torch threads (``torch threads`` in the header), the Dask rows with one thread per
worker, as ``--dask local:N`` runs them.

Resumable: each finished row is kept in OUT/partial-scale-out/ with the settings it ran with;
``--resume`` keeps the rows of an interrupted run with the same settings, and ``--minutes M``
starts no new row after M minutes (the tables then list the missing rows; run again with
--resume to finish).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .machine import describe, print_table

JOBS = ("fit-encode", "evaluate", "quality-features", "fingerprint-readout")


def add_arguments(p) -> None:
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ",".join(JOBS))
    p.add_argument("--workers", default="1,2", help="Dask worker counts to compare with one process (default 1,2)")
    p.add_argument("--photos", type=int, default=2000, help="photos encoded / read out (default 2000)")
    p.add_argument("--faces", type=int, default=1000, help="faces decoded and featurised (default 1000)")
    p.add_argument("--real", type=int, default=500, help="real photos of the evaluate job (default 500)")
    p.add_argument("--train", type=int, default=256, help="training photos of the model the jobs use (default 256)")
    p.add_argument("--batch", type=int, default=250, help="faces / images per chunk (default 250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="celeba-10k images folder (default ../shared/...)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for scale-out.json and scale-out.md (the published table: docs/results)")
    p.add_argument("--resume", action="store_true", help="keep the rows an earlier run with these settings finished")
    p.add_argument("--minutes", type=float, default=None, help="start no new row after this many minutes")


def _digest(x) -> str:
    h = hashlib.sha256()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous().numpy()
    if isinstance(x, np.ndarray):
        h.update(str(x.dtype).encode() + str(x.shape).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        h.update(json.dumps(x, sort_keys=True, default=float).encode())
    return h.hexdigest()


class _Setup:
    """What every job needs, built once (not timed): the autoencoder, Inception, a model fitted on
    the first --train photos, a fingerprint key and the file lists."""

    def __init__(self, args, data: Path):
        from ..autoencoder import TAEF2
        from ..data import FaceFolder, encode_folder
        from ..fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter
        from ..latent.generator import Generator, GeneratorConfig
        from ..metrics import InceptionFeatures

        self.args = args
        self.data = data
        self.ae = TAEF2.load()
        self.inc = InceptionFeatures.load()
        train = encode_folder(FaceFolder(data, size=128, limit=args.train), self.ae, cache=False)
        self.gen = Generator(GeneratorConfig(), autoencoder=self.ae).fit(train, seed=args.seed)
        self.key = BankFingerprinter(BankFingerprintConfig(key_seed=args.seed)).fit(self.gen.bank_.float(), self.ae)
        folder = FaceFolder(data, size=128, limit=args.photos)
        self.files = [str(p) for p in folder.paths]
        # real photos of the evaluate job: the ones after the training photos (a folder of links)
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="faceprint-scale-out-")
        self.real = Path(self._tmp.name)
        every = FaceFolder(data, size=128, limit=args.train + args.real)
        for p in every.paths[args.train:]:
            (self.real / p.name).symlink_to(p)
        self.latents = self.gen.sample_latents(args.faces, seed=args.seed).latents


def _warm_worker(inception_config) -> None:
    from ..distributed.stages import _inception

    _inception(inception_config)


def _run_job(job: str, s: _Setup, client):
    """(result to compare, items done) of one job."""
    from ..data import FaceFolder, encode_folder
    from ..distributed.stages import decode_image_files, features
    from ..metrics.evaluate import evaluate_generator

    a = s.args
    if job == "fit-encode":
        ls = encode_folder(FaceFolder(s.data, size=128, limit=a.photos), s.ae, cache=False, client=client)
        return ls.latents, len(ls)
    if job == "evaluate":
        ev = evaluate_generator(s.gen, s.real, n=a.faces, seed=a.seed, real_limit=a.real, inception=s.inc,
                                batch=a.batch, client=client)
        d = ev.as_dict()
        d.pop("seconds")
        return d, a.faces + ev.n_real + s.gen.n_photos
    if job == "quality-features":
        return features(s.latents, autoencoder=s.ae, inception=s.inc, client=client, chunk_size=a.batch), a.faces
    if job == "fingerprint-readout":
        return decode_image_files(s.files, s.key, s.ae, client=client), len(s.files)
    raise SystemExit(f"unknown job {job!r}; choose from {', '.join(JOBS)}")


def run(args) -> int:
    from ..cli.main import _default_demo_data
    from ..distributed.cluster import DaskSpec, open_client
    from ..io import atomic_write_text

    jobs = [j for j in args.jobs.split(",") if j]
    for j in jobs:
        if j not in JOBS:
            raise SystemExit(f"unknown job {j!r}; choose from {', '.join(JOBS)}")
    workers = [int(w) for w in args.workers.split(",") if w]
    data = args.data or _default_demo_data()
    if data is None:
        raise SystemExit("no data: pass --data (the celeba-10k images folder)")
    t_start = time.perf_counter()
    budget = None if args.minutes is None else args.minutes * 60
    import dask
    import distributed

    settings = {"photos": args.photos, "faces": args.faces, "real": args.real, "train": args.train,
                "batch": args.batch, "seed": args.seed, "workers": workers}
    info = describe({**settings, "dask": dask.__version__, "distributed": distributed.__version__,
                     "data": "celeba-10k (first photos in file order)", "threads per Dask worker": 1})
    run_key = {**settings, "faceprint": info["faceprint"], "torch": info["torch"], "cpu": info["cpu"],
               "cores": info["cores"]}
    partial = args.out / "partial-scale-out"
    partial.mkdir(parents=True, exist_ok=True)
    setup = None
    rows: dict[str, dict] = {}
    modes = ["one process"] + [f"dask local:{w}" for w in workers]
    stopped = False
    for job in jobs:
        for mode in modes:
            done = partial / f"{job}-{mode.replace(' ', '_').replace(':', '')}.json"
            if args.resume and done.exists():
                saved = json.loads(done.read_text())
                if saved.get("run") == run_key:
                    rows[f"{job}/{mode}"] = saved["row"]
                    print(f"  {job} / {mode}: resumed ({saved['row']['seconds']:.1f} s)", flush=True)
                    continue
            if budget is not None and time.perf_counter() - t_start > budget:
                stopped = True
                continue
            if setup is None:
                print("setting up (not timed): model, key, file lists", flush=True)
                setup = _Setup(args, Path(data))
            spec = None if mode == "one process" else DaskSpec(workers=int(mode.rsplit(":", 1)[1]))
            t0 = time.perf_counter()
            with open_client(spec) as client:
                if client is not None:
                    client.wait_for_workers(spec.workers, timeout=120)
                    # the workers import faceprint and load Inception before the clock starts, as
                    # the one-process rows have them loaded
                    client.run(_warm_worker, setup.inc.config)
                t1 = time.perf_counter()
                result, items = _run_job(job, setup, client)
                t2 = time.perf_counter()
            row = {"job": job, "mode": mode, "seconds": t2 - t1, "items": items, "items_per_s": items / (t2 - t1),
                   "cluster_start_s": (t1 - t0) if spec else 0.0, "digest": _digest(result)}
            rows[f"{job}/{mode}"] = row
            atomic_write_text(done, json.dumps({"run": run_key, "row": row}, default=float))
            print(f"  {job} / {mode}: {row['seconds']:.1f} s ({row['items_per_s']:.1f} items/s)", flush=True)
    table = []
    for job in jobs:
        base = rows.get(f"{job}/one process")
        for mode in modes:
            r = rows.get(f"{job}/{mode}")
            if r is None:
                table.append([job, mode, "not run", "", "", "", ""])
                continue
            speed = f"{base['seconds'] / r['seconds']:.2f}x" if base else ""
            same = ("yes" if r["digest"] == base["digest"] else "NO") if base else ""
            table.append([job, mode, f"{r['seconds']:.1f}", f"{r['items_per_s']:.1f}", speed, same,
                          f"{r['cluster_start_s']:.1f}" if r["cluster_start_s"] else "-"])
    header = ["job", "run", "seconds", "items/s", "speed-up vs one process", "identical to one process",
              "cluster start (s, not included)"]
    print_table("Scale-out on Dask (LocalCluster on 127.0.0.1)", header, table)
    doc = {"machine": info, "settings": settings, "rows": rows, "complete": not stopped,
           "command": "python -m faceprint.bench scale-out " + " ".join(
               f"--{k} {v}" for k, v in (("photos", args.photos), ("faces", args.faces), ("real", args.real),
                                          ("train", args.train), ("batch", args.batch), ("seed", args.seed),
                                          ("workers", args.workers)))}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table("Scale-out on Dask (LocalCluster on 127.0.0.1)", header, table)
    md = ["# Scale-out on Dask", "", f"`{doc['command']}`", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
          "Each job in one process, then on `--dask local:N` (N worker processes, one thread each). Wall time "
          "of the job only; the cluster's start-up is in the last column. `identical` compares the sha256 of "
          "the job's output arrays with the one-process run.", buf.getvalue()]
    if stopped:
        md.append("\nIncomplete: the --minutes budget ran out; rerun with --resume to add the missing rows.")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "scale-out.json", json.dumps(doc, indent=1, default=float))
    atomic_write_text(args.out / "scale-out.md", "\n".join(md) + "\n")
    print(f"\nwrote {args.out / 'scale-out.json'} and {args.out / 'scale-out.md'}"
          + (" (incomplete: rerun with --resume)" if stopped else ""))
    return 0
