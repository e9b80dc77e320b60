"""Hostile and broken input: a corpus of cases for every command, run and counted by kind.

python -m faceprint.bench reliability [--quick] [--kill-trials 50] [--json FILE] [--md FILE]

Every case is made at run time in a scratch folder (broken photos, special files, tampered
model files, extreme arguments, read-only and full disks, outputs that are inputs); nothing
binary is stored in the repository. A case passes when

* a refusal is exit code 2 with exactly one line on stderr (``expect="refuse"``), or the
  command succeeds where it should (``expect="ok"``: e.g. special files skipped, a model with
  unknown extra tensors accepted), or a closed stdout ends it quietly (``expect="pipe"``);
* no traceback is printed and no exception escapes ``faceprint.cli.main.main``;
* it ends within 60 s (in process: SIGALRM; subprocesses: a timeout);
* none of its inputs changed (sha256 of every input file, recursively for folders, before and
  after), and a refused case left none of the paths it must not create.

``kill -9`` trials start a command that writes a model over an existing one, kill it at a
random moment, check the file at that path is the old or a complete new model that loads
(validated), then run the command once more and check no temporary file is left.

The tests (tests/test_reliability.py) run a representative subset of the same cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CASE_SECONDS = 60
REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared"
CELEBA = SHARED / "datasets" / "celeba-10k" / "images"

KINDS = {
    "hang": "special files and endless inputs (FIFO, /dev/zero, sockets, devices, unreachable registry, huge n)",
    "data-loss": "an output that is, overwrites or lands in an input; implicit outputs over a user's files",
    "side-effect": "a refused command must leave nothing (no owner folder, key, registry, output folder)",
    "tampered": "tampered or damaged artifacts (metadata types, versions, classes, shapes, NaN/inf, invariants)",
    "os-error": "read-only folder, full disk, output path that is a folder or under a file, file size limit",
    "extreme-args": "extreme numbers and malformed arguments",
    "broken-pipe": "stdout closed by the reader (piped to `head -1`)",
    "bad-photos": "ordinary broken photos and label tables",
    "control": "hostile-looking but valid input that must still work",
}


# --------------------------------------------------------------------------------------------
# the context: small real models, an owner folder, photos


@dataclasses.dataclass
class Context:
    root: Path
    photos: Path          # 40 celeba photos by symlink
    model: Path           # a 64 px model fitted on them (2 components)
    labels: Path          # a label table (Male, Bald) for the 40 photos
    owner: Path           # an owner folder: a (synthetic) key for 128 px, a registry with one entry, a calibration
    cache: Path
    model128: Path | None = None
    mounts: list = dataclasses.field(default_factory=list)

    def case_dir(self, name: str) -> Path:
        d = self.root / "cases" / name.replace("/", "_")
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d


def make_context(root: Path, *, n_photos: int = 40, with_128: bool = False, progress=print) -> Context:
    """Fit the models and make the owner folder (a few seconds with a warm latent cache)."""
    from ..autoencoder import TAEF2
    from ..data import FaceFolder, LatentCache, encode_folder
    from ..latent.generator import Generator, GeneratorConfig

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    photos = root / "photos"
    photos.mkdir(exist_ok=True)
    files = sorted(p for p in CELEBA.iterdir() if p.suffix == ".jpg")[:n_photos]
    for p in files:
        if not (photos / p.name).exists():
            (photos / p.name).symlink_to(p)
    cache = root / "cache"
    ae = TAEF2.load()
    model = root / "model.safetensors"
    if not model.exists():
        ls = encode_folder(FaceFolder(photos, size=64), ae, cache=LatentCache(cache))
        Generator(GeneratorConfig(components=2), autoencoder=ae).fit(ls, seed=0).save(model)
    model128 = None
    if with_128:
        model128 = root / "model128.safetensors"
        if not model128.exists():
            ls = encode_folder(FaceFolder(photos, size=128), ae, cache=LatentCache(cache))
            Generator(GeneratorConfig(components=2), autoencoder=ae).fit(ls, seed=0).save(model128)
    labels = root / "labels.csv"
    rows = ["file,Male,Bald"] + [f"{p.name},{1 if i % 2 else -1},{1 if i % 7 == 0 else -1}" for i, p in enumerate(files)]
    labels.write_text("\n".join(rows) + "\n")
    owner = root / "owner"
    if not owner.exists():
        make_owner(owner)
    return Context(root=root, photos=photos, model=model, labels=labels, owner=owner, cache=cache, model128=model128)


def synthetic_key(shape=(32, 16, 16), seed: int = 7):
    """A structurally valid owner key without the autoencoder round trip fit() measures
    (enough to exercise loading, validation and refusals; not for real fingerprints)."""
    import torch

    from ..fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter

    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    key = BankFingerprinter(BankFingerprintConfig(key_seed=seed))
    key.channels_ = torch.tensor([3, 8, 15, 19])
    key.scale_ = torch.full((4,), 0.2)
    key.assign_ = torch.randperm(h * w, generator=g) % 128
    key.spread_ = (torch.randint(0, 2, (4, h, w), generator=g).float() * 2 - 1) / 2
    key.dither_ = torch.rand(h, w, generator=g) * 9.0
    key.shape_ = shape
    key.round_trip_std_ = [0.2] * c
    key.provenance_ = {"synthetic": True}
    return key


def make_owner(owner: Path) -> None:
    import torch

    from ..fingerprint.registry import Registry
    from ..fingerprint.verification import Calibration, CalibrationConfig

    owner.mkdir(parents=True)
    synthetic_key().save(owner / "key.safetensors")
    with Registry(owner / "registry.sqlite") as reg:
        reg.issue("Alice", "alice", "0" * 64, "datalevel-bank", seed=1)
    hist = torch.zeros(129, dtype=torch.long)
    hist[60:70] = 1000
    Calibration(hist, codes_compared=1024, config=CalibrationConfig()).save(owner / "calibration.safetensors")


# --------------------------------------------------------------------------------------------
# tampering with an artifact (safetensors header + tensors)


def read_raw(path: Path):
    from safetensors.torch import load_file, safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


def write_raw(path: Path, tensors, meta_raw: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta_raw)


def tamper(src: Path, dst: Path, fn: Callable) -> Path:
    """dst = src with fn(tensors, meta) applied; meta values are JSON-decoded, fn may set a
    value to Raw("...") to write a string that is not JSON."""
    tensors, raw = read_raw(src)
    meta = {k: json.loads(v) for k, v in raw.items()}
    fn(tensors, meta)
    out = {k: (v.text if isinstance(v, Raw) else json.dumps(v)) for k, v in meta.items()}
    write_raw(dst, tensors, out)
    return dst


@dataclasses.dataclass
class Raw:
    text: str


def _tampers() -> dict[str, Callable]:
    """name -> fn(tensors, meta) for the Generator artifact."""
    import torch

    def setcfg(key, value, section="config"):
        def f(t, m):
            m[section] = dict(m[section], **{key: value})
        return f

    def mul(name, factor):
        def f(t, m):
            t[name] = t[name] * factor
        return f

    def put(name, fn):
        def f(t, m):
            t[name] = fn(t[name])
        return f

    def nan_at(name, value=float("nan")):
        def f(t, m):
            x = t[name].clone()
            x.view(-1)[0] = value
            t[name] = x
        return f

    def drop(name):
        def f(t, m):
            del t[name]
        return f

    def meta_set(key, value):
        def f(t, m):
            m[key] = value
        return f

    return {
        "format-version-string": meta_set("format_version", "1"),
        "format-version-future": meta_set("format_version", 99),
        "format-version-zero": meta_set("format_version", 0),
        "format-version-missing": lambda t, m: m.pop("format_version"),
        "class-flowprior": meta_set("class", "faceprint.FlowPrior"),
        "class-number": meta_set("class", 7),
        "metadata-not-json": meta_set("config", Raw("{channels: 32")),
        "config-missing": lambda t, m: m.pop("config"),
        "config-list": meta_set("config", [1, 2]),
        "config-channels-mismatch": setcfg("channels", 16),
        "config-channels-string": setcfg("channels", "32"),
        "config-channels-float": setcfg("channels", 32.0),
        "config-rank-temperature-huge": setcfg("rank_temperature", 1e308),
        "config-rank-temperature-string": setcfg("rank_temperature", "0.12"),
        "config-rank-temperature-negative": setcfg("rank_temperature", -1.0),
        "config-patch-radius-huge": setcfg("patch_radius", 10**9),
        "config-iterations-huge": setcfg("iterations", 10**9),
        "config-method-unknown": setcfg("method", "diffusion"),
        "config-copy-bool": setcfg("copy", True),
        "config-components-zero": setcfg("components", 0),
        "mixture-config-dtype": setcfg("dtype", "float16", "mixture_config"),
        "mixture-config-reg-string": setcfg("reg_covar", "1e-3", "mixture_config"),
        "converged-string": meta_set("mixture_converged", "yes"),
        "training-not-object": meta_set("training", "photos"),
        "training-relpaths-short": lambda t, m: m["training"].update(relpaths=m["training"]["relpaths"][:3]),
        "training-relpaths-ints": lambda t, m: m["training"].update(relpaths=list(range(len(m["training"]["relpaths"])))),
        "training-image-size-wrong": lambda t, m: m["training"].update(image_size=1024),
        "bank-int8": put("bank", lambda x: x.to(torch.int8)),
        "bank-wrong-rank": put("bank", lambda x: x.reshape(x.shape[0], -1)),
        "bank-nan": nan_at("bank"),
        "bank-inf": nan_at("bank", float("inf")),
        "bank-one-photo": put("bank", lambda x: x[:1]),
        "bank-missing": drop("bank"),
        "means-nan": nan_at("mixture.means"),
        "means-inf": nan_at("mixture.means", float("-inf")),
        "means-wrong-shape": put("mixture.means", lambda x: x[:, :-1]),
        "means-transposed": put("mixture.means", lambda x: x.T.contiguous()),
        "projector-nan": nan_at("projector.components"),
        "projector-inf-mean": nan_at("projector.mean", float("inf")),
        "projector-not-orthonormal": mul("projector.components", 1.5),
        "projector-rows-swapped-shape": put("projector.components", lambda x: x[:-1]),
        "projector-variances-zero": put("projector.variances", lambda x: torch.zeros_like(x)),
        "eigvals-negative": put("mixture.eigvals", lambda x: -x),
        "eigvals-nan": nan_at("mixture.eigvals"),
        "eigvecs-scaled": mul("mixture.eigvecs", 2.0),
        "eigvecs-wrong-shape": put("mixture.eigvecs", lambda x: x[:-5]),
        "ranks-inconsistent": put("mixture.ranks", lambda x: x + 1),
        "ranks-negative": put("mixture.ranks", lambda x: torch.tensor([-1] + [int(x.sum()) + 1] + [0] * (len(x) - 2))),
        "ranks-float": put("mixture.ranks", lambda x: x.float()),
        "weights-negative": put("mixture.weights", lambda x: torch.tensor([-0.5] + [1.5 / (len(x) - 1)] * (len(x) - 1))),
        "weights-all-zero": put("mixture.weights", lambda x: torch.zeros_like(x)),
        "weights-not-normalised": mul("mixture.weights", 3.0),
        "weights-nan": nan_at("mixture.weights"),
        "weights-empty": put("mixture.weights", lambda x: x[:0]),
        "labels-out-of-range": put("mixture.labels", lambda x: x + 5),
        "labels-negative": put("mixture.labels", lambda x: x - 3),
        "labels-wrong-length": put("mixture.labels", lambda x: x[:-1]),
        "labels-float": put("mixture.labels", lambda x: x.float()),
        "labels-orphan-component": put("mixture.labels", lambda x: torch.zeros_like(x)),
        "decoder-nan": lambda t, m: t.update({"decoder.0.weight": torch.full((3, 3), float("nan"))}),
        "decoder-wrong-shape": lambda t, m: t.update({"decoder.0.weight": torch.ones(3, 3)}),
    }


# --------------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass
class Case:
    kind: str
    command: str
    name: str
    argv: Callable           # (ctx, d) -> list[str]; may create files in d
    expect: str = "refuse"   # refuse | ok | pipe
    inputs: Callable | None = None        # (ctx, d) -> list of paths whose content must not change
    must_not_exist: Callable | None = None  # (ctx, d) -> paths a refusal must not create
    check: Callable | None = None          # (ctx, d, result) -> None or a failure reason
    subprocess: bool = False
    needs: str | None = None   # "mount" | "model128" | "unix-sockets" ...
    quick: bool = False        # part of the test-suite subset
    env: dict | None = None
    pipe_lines: int = 1


@dataclasses.dataclass
class Result:
    kind: str
    command: str
    name: str
    passed: bool
    reason: str
    code: int | None
    seconds: float
    traceback: bool
    hang: bool
    inputs_changed: bool
    stderr: str


def _m(ctx, d):
    return str(ctx.model)


def _copy_model(ctx, d, name="m.safetensors"):
    p = d / name
    if not p.exists():
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ctx.model, p)
    return p


def _tampered(name, fn):
    def make(ctx, d):
        p = d / f"{name}.safetensors"
        if not p.exists():
            tamper(ctx.model, p, fn)
        return p
    return make


def _photos_with(*extras):
    """A photo folder: 34 photo symlinks plus special/broken entries made by ``extras``."""
    def make(ctx, d):
        f = d / "photos"
        if not f.exists():
            f.mkdir()
            for p in sorted(ctx.photos.iterdir())[:34]:
                (f / p.name).symlink_to(os.readlink(p) if p.is_symlink() else p)
            for e in extras:
                e(f)
        return f
    return make


def _fifo(name):
    return lambda f: os.mkfifo(f / name)


def _link(name, target):
    return lambda f: (f / name).symlink_to(target)


def _sock(name):
    def make(f):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(f / name))
        s.close()
    return make


def _bytes(name, data: bytes):
    return lambda f: (f / name).write_bytes(data)


def _png_bomb(f):
    import struct
    import zlib

    def chunk(t, b):
        return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    (f / "zz_bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def build_cases(full: bool = True) -> list[Case]:
    """The corpus. ``full=False``: only the cases marked quick (the test-suite subset)."""
    cases: list[Case] = []

    def add(kind, command, name, argv, **kw):
        cases.append(Case(kind, command, name, argv, **kw))

    Q = True  # readability: quick=Q marks a test-suite case

    # ---------------------------------------------------------------- hang
    for nm, extra, quick in (("fifo", _fifo("fifo.jpg"), Q), ("dev-zero-symlink", _link("zero.jpg", "/dev/zero"), Q),
                             ("dev-urandom-symlink", _link("rand.png", "/dev/urandom"), False),
                             ("socket", _sock("sock.jpg"), False), ("dev-null-symlink", _link("null.jpg", "/dev/null"), False),
                             ("dangling-symlink", _link("gone.jpg", "/nonexistent/x.jpg"), False),
                             ("folder-named-jpg", lambda f: (f / "dir.jpg").mkdir(), False)):
        add("hang", "fit", f"photo folder holds {nm}",
            lambda ctx, d, e=extra: ["fit", str(_photos_with(e)(ctx, d)), "-o", str(d / "o.safetensors"),
                                     "--size", "64", "--components", "1", "-q", "--cache-dir", str(ctx.cache)],
            expect="ok", inputs=lambda ctx, d: [d / "photos"],
            check=lambda ctx, d, r: None if (d / "o.safetensors").is_file() else "no model written", quick=quick)
    add("hang", "fit", "photo folder holds a FIFO, --strict",
        lambda ctx, d: ["fit", str(_photos_with(_fifo("fifo.jpg"))(ctx, d)), "-o", str(d / "o.safetensors"), "--strict",
                        "--size", "64", "-q", "--cache-dir", str(ctx.cache)],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("hang", "fit", "photo folder holds only FIFOs",
        lambda ctx, d: ["fit", str(_only(d, _fifo("a.jpg"), _fifo("b.png"))), "-o", str(d / "o.safetensors"), "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"], quick=Q)
    add("hang", "demo", "photo folder holds only special files",
        lambda ctx, d: ["demo", "--data", str(_only(d, _fifo("a.jpg"), _link("z.jpg", "/dev/zero"))), "-o", str(d / "demo"), "-q"],
        must_not_exist=lambda ctx, d: [d / "demo"])
    add("hang", "fit", "--labels is a FIFO",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(d / "o.safetensors"), "--labels", str(_mkfifo(d / "l.csv")), "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"], quick=Q)
    add("hang", "fit", "--labels is /dev/zero",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(d / "o.safetensors"), "--labels", "/dev/zero", "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    for cmd in ("generate", "inspect", "tame forget", "fingerprint issue", "evaluate"):
        add("hang", cmd, "model is a FIFO", lambda ctx, d, c=cmd: _model_cmd(c, str(_mkfifo(d / "m.safetensors")), ctx, d),
            must_not_exist=lambda ctx, d: [d / "out", d / "o.safetensors", d / "newowner"], quick=cmd in ("generate", "inspect"))
    for cmd in ("generate", "inspect"):
        add("hang", cmd, "model is /dev/zero", lambda ctx, d, c=cmd: _model_cmd(c, "/dev/zero", ctx, d),
            must_not_exist=lambda ctx, d: [d / "out"])
        add("hang", cmd, "model is a symlink to /dev/urandom",
            lambda ctx, d, c=cmd: _model_cmd(c, str(_symlink(d / "m.safetensors", "/dev/urandom")), ctx, d),
            must_not_exist=lambda ctx, d: [d / "out"])
    add("hang", "tame forget", "--photos holds a FIFO and /dev/zero",
        lambda ctx, d: ["tame", "forget", str(_copy_model(ctx, d)), "--photos",
                        str(_only(d, _fifo("f.jpg"), _link("z.jpg", "/dev/zero"))), "-o", str(d / "o.safetensors"), "-q"],
        inputs=lambda ctx, d: [d / "m.safetensors"], must_not_exist=lambda ctx, d: [d / "o.safetensors"], quick=Q)
    add("hang", "tame rebalance", "--labels is a FIFO",
        lambda ctx, d: ["tame", "rebalance", str(_copy_model(ctx, d)), "--labels", str(_mkfifo(d / "l.csv")),
                        "--attribute", "Male=0.5", "-o", str(d / "o.safetensors"), "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("hang", "tame include", "--labels is /dev/zero",
        lambda ctx, d: ["tame", "include", str(_copy_model(ctx, d)), "--labels", "/dev/zero",
                        "--include", "Bald", "-o", str(d / "o.safetensors"), "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("hang", "verify", "image is a FIFO",
        lambda ctx, d: ["verify", str(_mkfifo(d / "x.png")), "--owner", str(ctx.owner), "-q"], quick=Q,
        inputs=lambda ctx, d: [ctx.owner])
    add("hang", "verify", "image is /dev/zero",
        lambda ctx, d: ["verify", "/dev/zero", "--owner", str(ctx.owner), "-q"], inputs=lambda ctx, d: [ctx.owner])
    add("hang", "verify", "image folder holds a FIFO only",
        lambda ctx, d: ["verify", str(_only(d, _fifo("a.png"))), "--owner", str(ctx.owner), "-q"],
        inputs=lambda ctx, d: [ctx.owner])
    add("hang", "fingerprint calibrate", "--negatives holds only special files",
        lambda ctx, d: ["fingerprint", "calibrate", str(_copy_model(ctx, d)), "--negatives",
                        str(_only(d, _fifo("a.png"), _link("b.jpg", "/dev/zero"))), "--owner", str(_owner_copy(ctx, d)), "-q"],
        must_not_exist=lambda ctx, d: [d / "owner" / "calibration.safetensors.new"])
    add("hang", "fingerprint issue", "registry is a FIFO",
        lambda ctx, d: ["fingerprint", "issue", str(_copy_model(ctx, d)), "--to", "X", "-o", str(d / "o.safetensors"),
                        "--registry", str(_mkfifo(d / "r.sqlite")), "--owner", str(d / "newowner"), "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors", d / "newowner"], quick=Q)
    add("hang", "fingerprint list", "registry is a FIFO",
        lambda ctx, d: ["fingerprint", "list", "--registry", str(_mkfifo(d / "r.sqlite")), "--owner", str(d / "newowner")],
        must_not_exist=lambda ctx, d: [d / "newowner"])
    add("hang", "fingerprint issue", "unreachable registry server (connect timeout)",
        lambda ctx, d: ["fingerprint", "issue", str(_copy_model(ctx, d)), "--to", "X", "-o", str(d / "o.safetensors"),
                        "--registry", "postgresql+psycopg://u@10.255.255.1:5432/db", "--owner", str(d / "newowner"), "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors", d / "newowner"])
    add("hang", "fingerprint list", "registry server refuses connections",
        lambda ctx, d: ["fingerprint", "list", "--registry", "postgresql+psycopg://u@127.0.0.1:9/db", "--owner", str(d / "nw")],
        must_not_exist=lambda ctx, d: [d / "nw"], quick=Q)
    add("hang", "generate", "-n 1000000000 (refused before starting: disk)",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "1000000000", "-o", str(d / "out"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"], quick=Q)
    add("hang", "generate", "-n 2**40 with --provenance",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", str(2**40), "-o", str(d / "out"), "--provenance", "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])
    add("hang", "generate", "-n 100000 --grid (grid held in memory: refused)",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "100000", "-o", str(d / "out"), "--grid", str(d / "g.png"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out", d / "g.png"])

    # ---------------------------------------------------------------- data loss
    add("data-loss", "generate", "--grid MODEL",
        lambda ctx, d: ["generate", str(_copy_model(ctx, d)), "-n", "2", "-o", str(d / "out"), "--grid", str(d / "m.safetensors"), "-q"],
        inputs=lambda ctx, d: [d / "m.safetensors"], must_not_exist=lambda ctx, d: [d / "out"], quick=Q)
    add("data-loss", "generate", "--grid is a symlink to MODEL",
        lambda ctx, d: ["generate", str(_copy_model(ctx, d)), "-n", "2", "-o", str(d / "out"),
                        "--grid", str(_symlink(d / "g.png", d / "m.safetensors")), "-q"],
        inputs=lambda ctx, d: [d / "m.safetensors"], must_not_exist=lambda ctx, d: [d / "out"])
    add("data-loss", "generate", "--grid is a hard link to MODEL",
        lambda ctx, d: ["generate", str(_copy_model(ctx, d)), "-n", "2", "-o", str(d / "out"),
                        "--grid", str(_hardlink(d / "g.png", d / "m.safetensors")), "-q"],
        inputs=lambda ctx, d: [d / "m.safetensors"], must_not_exist=lambda ctx, d: [d / "out"])
    add("data-loss", "generate", "-o MODEL (a file)",
        lambda ctx, d: ["generate", str(_copy_model(ctx, d)), "-n", "2", "-o", str(d / "m.safetensors"), "-q"],
        inputs=lambda ctx, d: [d / "m.safetensors"])
    add("data-loss", "generate", "model inside -o named like a face file",
        lambda ctx, d: ["generate", str(_copy_model(ctx, d / "out", "face_000001.png")), "-n", "3", "-o", str(d / "out"), "-q"],
        inputs=lambda ctx, d: [d / "out" / "face_000001.png"])
    add("data-loss", "generate", "--provenance over a user's provenance.json",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(_userfile(d / "out" / "provenance.json")), "--provenance", "-q"],
        inputs=lambda ctx, d: [d / "out" / "provenance.json"], quick=Q)
    add("data-loss", "generate", "--provenance over a user's <grid>_provenance.png",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(d / "out"), "--grid", str(d / "g.png"), "--provenance",
                        "-q"] + [str(_userfile(d / "g_provenance.png"))][:0],
        inputs=lambda ctx, d: [d / "g_provenance.png"], must_not_exist=lambda ctx, d: [d / "out", d / "g.png"], quick=Q)
    add("data-loss", "generate", "a user's face_000000.png in -o",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(_userfile(d / "out" / "face_000000.png", png=True)).rsplit("/", 1)[0], "-q"],
        inputs=lambda ctx, d: [d / "out" / "face_000000.png"])
    add("data-loss", "generate", "--grid is one of the face files",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(d / "out"), "--grid", str(d / "out" / "face_000001.png"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])
    add("data-loss", "generate", "--grid is provenance.json of -o",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(d / "out"), "--provenance",
                        "--grid", str(d / "out" / "provenance.json"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])
    add("data-loss", "evaluate", "--json MODEL",
        lambda ctx, d: ["evaluate", str(_copy_model(ctx, d)), "--real", str(ctx.photos), "-n", "4", "--json", str(d / "m.safetensors"), "-q"],
        inputs=lambda ctx, d: [d / "m.safetensors"], quick=Q)
    add("data-loss", "evaluate", "--json is a photo of --real",
        lambda ctx, d: ["evaluate", _m(ctx, d), "--real", str(_photos_with()(ctx, d)), "-n", "4",
                        "--json", str(sorted((d / "photos").iterdir())[0]), "-q"],
        inputs=lambda ctx, d: [d / "photos"])
    for cmd in ("forget", "rebalance", "include"):
        extra = {"forget": ["--photos", "PHOTOS"], "rebalance": ["--labels", "LABELS", "--attribute", "Male=0.5"],
                 "include": ["--labels", "LABELS", "--include", "Bald"]}[cmd]
        add("data-loss", f"tame {cmd}", "-o MODEL",
            lambda ctx, d, c=cmd, e=extra: ["tame", c, str(_copy_model(ctx, d)), *_fill(e, ctx), "-o", str(d / "m.safetensors"), "-q"],
            inputs=lambda ctx, d: [d / "m.safetensors"], quick=cmd == "forget")
        add("data-loss", f"tame {cmd}", "-o is a symlink to MODEL",
            lambda ctx, d, c=cmd, e=extra: ["tame", c, str(_copy_model(ctx, d)), *_fill(e, ctx), "-o",
                                            str(_symlink(d / "o.safetensors", d / "m.safetensors")), "-q"],
            inputs=lambda ctx, d: [d / "m.safetensors"])
    add("data-loss", "tame rebalance", "-o is the label table",
        lambda ctx, d: ["tame", "rebalance", _m(ctx, d), "--labels", str(_copyfile(ctx.labels, d / "l.csv")),
                        "--attribute", "Male=0.5", "-o", str(d / "l.csv"), "-q"],
        inputs=lambda ctx, d: [d / "l.csv"])
    add("data-loss", "tame forget", "-o is a photo of --photos",
        lambda ctx, d: ["tame", "forget", _m(ctx, d), "--photos", str(_photos_with()(ctx, d)), "-o",
                        str(sorted((d / "photos").iterdir())[0]), "-q"],
        inputs=lambda ctx, d: [d / "photos"])
    add("data-loss", "fingerprint issue", "-o MODEL",
        lambda ctx, d: ["fingerprint", "issue", str(_copy_model(ctx, d)), "--to", "X", "-o", str(d / "m.safetensors"),
                        "--owner", str(d / "newowner"), "-q"],
        inputs=lambda ctx, d: [d / "m.safetensors"], must_not_exist=lambda ctx, d: [d / "newowner"], quick=Q)
    add("data-loss", "fingerprint issue", "-o is the owner's key",
        lambda ctx, d: ["fingerprint", "issue", _m(ctx, d), "--to", "X", "-o", str(_owner_copy(ctx, d) / "key.safetensors"),
                        "--owner", str(d / "owner"), "-q"],
        inputs=lambda ctx, d: [d / "owner"])
    add("data-loss", "fingerprint issue", "-o is the registry",
        lambda ctx, d: ["fingerprint", "issue", _m(ctx, d), "--to", "X", "-o", str(_owner_copy(ctx, d) / "registry.sqlite"),
                        "--owner", str(d / "owner"), "-q"],
        inputs=lambda ctx, d: [d / "owner"])
    add("data-loss", "fit", "-o is the label table renamed .safetensors",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(_copyfile(ctx.labels, d / "l.safetensors")), "--labels",
                        str(d / "l.safetensors"), "-q"],
        inputs=lambda ctx, d: [d / "l.safetensors"])
    add("data-loss", "demo", "-o is the photo folder",
        lambda ctx, d: ["demo", "--data", str(_photos_with()(ctx, d)), "-o", str(d / "photos"), "-q"],
        inputs=lambda ctx, d: [d / "photos"], quick=Q)
    add("data-loss", "demo", "-o inside the photo folder",
        lambda ctx, d: ["demo", "--data", str(_photos_with()(ctx, d)), "-o", str(d / "photos" / "demo"), "-q"],
        inputs=lambda ctx, d: [d / "photos"], must_not_exist=lambda ctx, d: [d / "photos" / "demo"])
    add("data-loss", "demo", "a user's grid.png in -o",
        lambda ctx, d: ["demo", "--data", str(ctx.photos), "-o", str(_userfile(d / "demo" / "grid.png", png=True).parent),
                        "--limit", "34", "-q"],
        inputs=lambda ctx, d: [d / "demo" / "grid.png"])

    # ---------------------------------------------------------------- side effects
    def issue(d, ctx, *extra, owner="newowner", model=None):
        return ["fingerprint", "issue", model or str(_copy_model(ctx, d)), "--to", "X", "-o", str(d / "o.safetensors"),
                "--owner", str(d / owner), *extra, "-q"]

    none_left = (lambda ctx, d: [d / "o.safetensors", d / "newowner"])
    add("side-effect", "fingerprint issue", "seed 2**63", lambda ctx, d: issue(d, ctx, "--seed", str(2**63)),
        must_not_exist=none_left, quick=Q)
    add("side-effect", "fingerprint issue", "seed -1", lambda ctx, d: issue(d, ctx, "--seed", "-1"), must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "seed 'abc'", lambda ctx, d: issue(d, ctx, "--seed", "abc"), must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "empty recipient",
        lambda ctx, d: [*issue(d, ctx)[:3], "--to", "", *issue(d, ctx)[5:]], must_not_exist=none_left, quick=Q)
    add("side-effect", "fingerprint issue", "blank recipient",
        lambda ctx, d: [*issue(d, ctx)[:3], "--to", "   ", *issue(d, ctx)[5:]], must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "recipient of 10,000 characters",
        lambda ctx, d: [*issue(d, ctx)[:3], "--to", "x" * 10000, *issue(d, ctx)[5:]], must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "empty instance name",
        lambda ctx, d: issue(d, ctx, "--instance", ""), must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "unreachable registry",
        lambda ctx, d: issue(d, ctx, "--registry", "postgresql+psycopg://u@127.0.0.1:9/db"), must_not_exist=none_left, quick=Q)
    add("side-effect", "fingerprint issue", "registry URL of an unsupported database",
        lambda ctx, d: issue(d, ctx, "--registry", "mysql://u@localhost/db"), must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "malformed registry URL",
        lambda ctx, d: issue(d, ctx, "--registry", "postgresql+psycopg://u@[::1/db"), must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "missing registry folder",
        lambda ctx, d: issue(d, ctx, "--registry", str(d / "nowhere" / "r.sqlite")),
        must_not_exist=lambda ctx, d: [d / "o.safetensors", d / "newowner", d / "nowhere"], quick=Q)
    add("side-effect", "fingerprint issue", "registry is a folder",
        lambda ctx, d: issue(d, ctx, "--registry", str(_mkdir(d / "regdir"))), must_not_exist=none_left)
    add("side-effect", "fingerprint issue", "registry is a text file",
        lambda ctx, d: issue(d, ctx, "--registry", str(_userfile(d / "r.sqlite"))), must_not_exist=none_left,
        inputs=lambda ctx, d: [d / "r.sqlite"])
    add("side-effect", "fingerprint issue", "64 px model (too small for a datalevel-bank code): nothing created",
        lambda ctx, d: issue(d, ctx, "--mechanism", "datalevel-bank"), must_not_exist=none_left, quick=Q)
    add("side-effect", "fingerprint issue", "instance name already issued: no new key, no file",
        lambda ctx, d: issue(d, ctx, "--instance", "alice", owner="owner") + [str(_owner_copy(ctx, d))][:0],
        inputs=lambda ctx, d: [d / "owner"], must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("side-effect", "fingerprint issue", "-o in a missing folder",
        lambda ctx, d: [*issue(d, ctx)[:5], "-o", str(d / "missing" / "o.safetensors"), *issue(d, ctx)[7:]],
        must_not_exist=lambda ctx, d: [d / "newowner", d / "missing"])
    add("side-effect", "fingerprint list", "fresh owner folder is not created",
        lambda ctx, d: ["fingerprint", "list", "--owner", str(d / "newowner")], must_not_exist=lambda ctx, d: [d / "newowner"], quick=Q)
    add("side-effect", "verify", "fresh owner folder is not created",
        lambda ctx, d: ["verify", str(_userfile(d / "x.png", png=True)), "--owner", str(d / "newowner"), "-q"],
        must_not_exist=lambda ctx, d: [d / "newowner"])
    add("side-effect", "fingerprint calibrate", "without a key: nothing created",
        lambda ctx, d: ["fingerprint", "calibrate", _m(ctx, d), "--negatives", str(ctx.photos), "--owner", str(d / "newowner"), "-q"],
        must_not_exist=lambda ctx, d: [d / "newowner"])
    add("side-effect", "demo", "empty photo folder leaves no output folder",
        lambda ctx, d: ["demo", "--data", str(_mkdir(d / "empty")), "-o", str(d / "demo"), "-q"],
        must_not_exist=lambda ctx, d: [d / "demo"], quick=Q)
    add("side-effect", "demo", "photo folder of broken files leaves no output folder",
        lambda ctx, d: ["demo", "--data", str(_only(d, _bytes("a.jpg", b"not a jpeg"), _bytes("b.png", b""))), "-o", str(d / "demo"), "-q"],
        must_not_exist=lambda ctx, d: [d / "demo"])
    add("side-effect", "demo", "missing photo folder",
        lambda ctx, d: ["demo", "--data", str(d / "nothing"), "-o", str(d / "demo"), "-q"], must_not_exist=lambda ctx, d: [d / "demo"])
    add("side-effect", "generate", "tampered model leaves no output folder",
        lambda ctx, d: ["generate", str(_tampered("w", _tampers()["weights-negative"])(ctx, d)), "-n", "2", "-o", str(d / "out"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])
    add("side-effect", "generate", "--provenance with --method lrgmm leaves no output folder",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(d / "out"), "--provenance", "--method", "lrgmm", "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])
    add("side-effect", "fit", "too few photos: no model file",
        lambda ctx, d: ["fit", str(_photos_with()(ctx, d)), "--limit", "1", "-o", str(d / "o.safetensors"), "-q",
                        "--cache-dir", str(ctx.cache)],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("side-effect", "tame forget", "no training photo among --photos: no file",
        lambda ctx, d: ["tame", "forget", _m(ctx, d), "--photos", str(_only(d, _bytes("x.jpg", b"abc"))), "-o", str(d / "o.safetensors"), "-q"],
        must_not_exist=lambda ctx, d: [d / "o.safetensors"])

    # ---------------------------------------------------------------- tampered artifacts
    tampers = _tampers()
    quick_tampers = {"format-version-string", "class-flowprior", "config-channels-mismatch", "bank-int8", "means-nan",
                     "projector-not-orthonormal", "eigvals-negative", "weights-all-zero", "weights-negative",
                     "labels-out-of-range", "means-wrong-shape", "metadata-not-json", "decoder-nan", "ranks-inconsistent"}
    for tname, fn in tampers.items():
        add("tampered", "generate", tname,
            lambda ctx, d, t=tname, f=fn: ["generate", str(_tampered(t, f)(ctx, d)), "-n", "2", "-o", str(d / "out"), "-q"],
            inputs=lambda ctx, d, t=tname: [d / f"{t}.safetensors"], must_not_exist=lambda ctx, d: [d / "out"],
            quick=tname in quick_tampers)
    for cmd, names in (("inspect", ("format-version-string", "weights-nan", "labels-orphan-component", "eigvecs-scaled")),
                       ("tame forget", ("weights-negative", "bank-int8", "labels-out-of-range", "config-rank-temperature-huge")),
                       ("tame rebalance", ("weights-all-zero", "eigvals-negative")),
                       ("tame include", ("means-inf", "ranks-negative")),
                       ("fingerprint issue", ("projector-nan", "weights-negative", "class-number", "labels-negative")),
                       ("fingerprint calibrate", ("weights-all-zero",)),
                       ("evaluate", ("means-nan", "format-version-future"))):
        for tname in names:
            add("tampered", cmd, tname,
                lambda ctx, d, c=cmd, t=tname: _model_cmd(c, str(_tampered(t, tampers[t])(ctx, d)), ctx, d),
                inputs=lambda ctx, d, t=tname: [d / f"{t}.safetensors"],
                must_not_exist=lambda ctx, d: [d / "o.safetensors", d / "newowner", d / "out"],
                quick=tname in ("weights-negative", "means-nan", "weights-all-zero", "eigvals-negative", "means-inf",
                                "format-version-string"))
    add("tampered", "generate", "truncated model file",
        lambda ctx, d: ["generate", str(_truncated(ctx, d)), "-n", "2", "-o", str(d / "out"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"], quick=Q)
    add("tampered", "generate", "empty model file",
        lambda ctx, d: ["generate", str(_userfile(d / "m.safetensors", data=b"")), "-n", "2", "-o", str(d / "out"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])
    add("tampered", "generate", "random bytes as model",
        lambda ctx, d: ["generate", str(_userfile(d / "m.safetensors", data=random.Random(0).randbytes(5000))), "-n", "2",
                        "-o", str(d / "out"), "-q"], must_not_exist=lambda ctx, d: [d / "out"])
    add("tampered", "generate", "header length of 2**63",
        lambda ctx, d: ["generate", str(_userfile(d / "m.safetensors", data=(2**63).to_bytes(8, "little") + b"{}")), "-n", "2",
                        "-o", str(d / "out"), "-q"], must_not_exist=lambda ctx, d: [d / "out"])
    add("tampered", "generate", "model is a folder",
        lambda ctx, d: ["generate", str(_mkdir(d / "m.safetensors")), "-n", "2", "-o", str(d / "out"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])
    add("tampered", "verify", "owner key: bit indices out of range",
        lambda ctx, d: ["verify", str(_userfile(d / "x.png", png=True)), "--owner", str(_owner_tampered(ctx, d, "assign")), "-q"],
        inputs=lambda ctx, d: [d / "owner"], quick=Q)
    add("tampered", "verify", "owner key: NaN spread",
        lambda ctx, d: ["verify", str(_userfile(d / "x.png", png=True)), "--owner", str(_owner_tampered(ctx, d, "spread")), "-q"],
        inputs=lambda ctx, d: [d / "owner"])
    add("tampered", "verify", "owner key: channel out of range",
        lambda ctx, d: ["verify", str(_userfile(d / "x.png", png=True)), "--owner", str(_owner_tampered(ctx, d, "channels")), "-q"],
        inputs=lambda ctx, d: [d / "owner"])
    add("tampered", "verify", "owner key: config bits a string",
        lambda ctx, d: ["verify", str(_userfile(d / "x.png", png=True)), "--owner", str(_owner_tampered(ctx, d, "bits")), "-q"],
        inputs=lambda ctx, d: [d / "owner"])
    add("tampered", "verify", "calibration: negative counts",
        lambda ctx, d: ["verify", str(_userfile(d / "x.png", png=True)), "--owner", str(_owner_tampered(ctx, d, "histogram")), "-q"],
        inputs=lambda ctx, d: [d / "owner"], quick=Q)
    add("tampered", "fingerprint calibrate", "owner key: NaN scale",
        lambda ctx, d: ["fingerprint", "calibrate", _m(ctx, d), "--negatives", str(ctx.photos), "--owner",
                        str(_owner_tampered(ctx, d, "scale")), "-q"], inputs=lambda ctx, d: [d / "owner"])
    add("tampered", "inspect", "key file given as a model",
        lambda ctx, d: ["inspect", str(_owner_tampered(ctx, d, "assign") / "key.safetensors")], inputs=lambda ctx, d: [d / "owner"])
    add("tampered", "generate", "key file given as a model",
        lambda ctx, d: ["generate", str(ctx.owner / "key.safetensors"), "-n", "1", "-o", str(d / "out"), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"])

    # ---------------------------------------------------------------- OS errors
    add("os-error", "fit", "-o is a folder",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(_mkdir(d / "o.safetensors")), "-q"], quick=Q)
    add("os-error", "fit", "-o under a file",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(_userfile(d / "f.txt") / "o.safetensors"), "-q"])
    add("os-error", "generate", "-o under a file",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(_userfile(d / "f.txt") / "out"), "-q"])
    add("os-error", "generate", "--grid is a folder",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(d / "out"), "--grid", str(_mkdir(d / "g.png")), "-q"],
        must_not_exist=lambda ctx, d: [d / "out"], quick=Q)
    add("os-error", "evaluate", "--json is a folder",
        lambda ctx, d: ["evaluate", _m(ctx, d), "--real", str(ctx.photos), "-n", "4", "--json", str(_mkdir(d / "j.json")), "-q"])
    add("os-error", "tame forget", "-o is a folder",
        lambda ctx, d: ["tame", "forget", _m(ctx, d), "--photos", str(ctx.photos), "-o", str(_mkdir(d / "o.safetensors")), "-q"])
    add("os-error", "fingerprint issue", "-o is a folder: no owner folder",
        lambda ctx, d: [*issue(d, ctx)[:5], "-o", str(_mkdir(d / "o.safetensors")), *issue(d, ctx)[7:]],
        must_not_exist=lambda ctx, d: [d / "newowner"], quick=Q)
    add("os-error", "demo", "-o is a file",
        lambda ctx, d: ["demo", "--data", str(ctx.photos), "-o", str(_userfile(d / "demo")), "-q"], inputs=lambda ctx, d: [d / "demo"])
    for cmd in ("fit", "generate", "tame forget", "tame rebalance", "fingerprint issue", "evaluate", "demo"):
        add("os-error", cmd, "output in a read-only folder", lambda ctx, d, c=cmd: _ro_cmd(c, ctx, d, "ro"), needs="mount",
            must_not_exist=lambda ctx, d: [d / "newowner"], quick=cmd in ("fit", "generate", "fingerprint issue"))
    for cmd in ("fit", "tame forget", "generate"):
        add("os-error", cmd, "full disk", lambda ctx, d, c=cmd: _ro_cmd(c, ctx, d, "full"), needs="mount", quick=cmd == "fit")
    add("os-error", "fit", "file size limit (EFBIG) while writing the model",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(d / "o.safetensors"), "--size", "64", "--components", "1", "-q",
                        "--cache-dir", str(ctx.cache)],
        subprocess=True, env={"FACEPRINT_RLIMIT_FSIZE": str(64 << 10)}, must_not_exist=lambda ctx, d: [d / "o.safetensors"],
        check=_no_temporaries)
    add("os-error", "fingerprint calibrate", "calibration path is a folder",
        lambda ctx, d: ["fingerprint", "calibrate", _m(ctx, d), "--negatives", str(ctx.photos), "--owner",
                        str(_owner_with(ctx, d, lambda o: (o / "calibration.safetensors").unlink() or (o / "calibration.safetensors").mkdir())), "-q"])

    # ---------------------------------------------------------------- extreme arguments
    gen = lambda *a: (lambda ctx, d: ["generate", _m(ctx, d), "-o", str(d / "out"), "-q", *a])  # noqa: E731
    for name, args, quick in (("--rank-temperature 1e308", ("-n", "1", "--rank-temperature", "1e308"), Q),
                              ("--rank-temperature nan", ("-n", "1", "--rank-temperature", "nan"), False),
                              ("--rank-temperature inf", ("-n", "1", "--rank-temperature", "inf"), False),
                              ("--rank-temperature -0.1", ("-n", "1", "--rank-temperature", "-0.1"), False),
                              ("--start 2**70", ("-n", "1", "--start", str(2**70)), Q),
                              ("--start -1", ("-n", "1", "--start", "-1"), False),
                              ("--seed 2**64", ("-n", "1", "--seed", str(2**64)), False),
                              ("-n 0", ("-n", "0"), False), ("-n -5", ("-n", "-5"), False), ("-n 1e3", ("-n", "1e3"), False),
                              ("-n of 5000 digits", ("-n", "9" * 5000), False), ("-n 2**41", ("-n", str(2**41)), False),
                              ("--method unknown", ("-n", "1", "--method", "vae"), False)):
        add("extreme-args", "generate", name, gen(*args), must_not_exist=lambda ctx, d: [d / "out"], quick=quick)
    fit = lambda *a: (lambda ctx, d: ["fit", str(ctx.photos), "-o", str(d / "o.safetensors"), "-q", "--cache-dir", str(ctx.cache), *a])  # noqa: E731
    for name, args, quick in (("--components 10**30", ("--components", str(10**30), "--size", "64"), False),
                              ("--components 0", ("--components", "0"), False),
                              ("--channels 0", ("--channels", "0"), False),
                              ("--channels 100000", ("--channels", "100000", "--size", "64"), Q),
                              ("--patch-radius 10**9", ("--patch-radius", str(10**9)), False),
                              ("--iterations 10**9", ("--iterations", str(10**9)), Q),
                              ("--rank-temperature 1e308", ("--rank-temperature", "1e308"), False),
                              ("--size 100", ("--size", "100"), False), ("--limit 0", ("--limit", "0"), False),
                              ("--seed 2**63", ("--seed", str(2**63)), False)):
        add("extreme-args", "fit", name, fit(*args), must_not_exist=lambda ctx, d: [d / "o.safetensors"], quick=quick)
    add("extreme-args", "fit", "-o without .safetensors",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(d / "o.bin"), "-q"], must_not_exist=lambda ctx, d: [d / "o.bin"])
    add("extreme-args", "evaluate", "-n 1", lambda ctx, d: ["evaluate", _m(ctx, d), "--real", str(ctx.photos), "-n", "1", "-q"], quick=Q)
    add("extreme-args", "evaluate", "-n 10**12", lambda ctx, d: ["evaluate", _m(ctx, d), "--real", str(ctx.photos), "-n", str(10**12), "-q"])
    add("extreme-args", "evaluate", "--batch 10**9", lambda ctx, d: ["evaluate", _m(ctx, d), "--real", str(ctx.photos), "--batch", str(10**9), "-q"])
    add("extreme-args", "tame include", "--share 5",
        lambda ctx, d: ["tame", "include", _m(ctx, d), "--labels", str(ctx.labels), "--include", "Bald", "--share", "5", "-o",
                        str(d / "o.safetensors"), "-q"], must_not_exist=lambda ctx, d: [d / "o.safetensors"], quick=Q)
    add("extreme-args", "tame rebalance", "--min-members 1e308",
        lambda ctx, d: ["tame", "rebalance", _m(ctx, d), "--labels", str(ctx.labels), "--attribute", "Male=0.5",
                        "--min-members", "1e308", "-o", str(d / "o.safetensors"), "-q"], must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("extreme-args", "tame rebalance", "share 1e308",
        lambda ctx, d: ["tame", "rebalance", _m(ctx, d), "--labels", str(ctx.labels), "--attribute", "Male=1e308",
                        "-o", str(d / "o.safetensors"), "-q"], must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("extreme-args", "tame rebalance", "share nan",
        lambda ctx, d: ["tame", "rebalance", _m(ctx, d), "--labels", str(ctx.labels), "--attribute", "Male=nan",
                        "-o", str(d / "o.safetensors"), "-q"], must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("extreme-args", "tame rebalance", "unknown attribute",
        lambda ctx, d: ["tame", "rebalance", _m(ctx, d), "--labels", str(ctx.labels), "--attribute", "Wings=0.5",
                        "-o", str(d / "o.safetensors"), "-q"], must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("extreme-args", "verify", "--crop-search 2",
        lambda ctx, d: ["verify", str(_userfile(d / "x.png", png=True)), "--crop-search", "2", "--owner", str(ctx.owner)])
    add("extreme-args", "fingerprint calibrate", "--target-fpr nan",
        lambda ctx, d: ["fingerprint", "calibrate", _m(ctx, d), "--negatives", str(ctx.photos), "--target-fpr", "nan",
                        "--owner", str(ctx.owner)], inputs=lambda ctx, d: [ctx.owner])
    add("extreme-args", "fingerprint calibrate", "--faces 10**15",
        lambda ctx, d: ["fingerprint", "calibrate", _m(ctx, d), "--negatives", str(ctx.photos), "--faces", str(10**15),
                        "--owner", str(ctx.owner)], inputs=lambda ctx, d: [ctx.owner])
    add("extreme-args", "demo", "-n 10**6 (grid)", lambda ctx, d: ["demo", "-n", str(10**6), "-o", str(d / "demo"), "-q"],
        must_not_exist=lambda ctx, d: [d / "demo"])
    add("extreme-args", "fingerprint", "no operation", lambda ctx, d: ["fingerprint"], quick=Q)
    add("extreme-args", "tame", "unknown operation", lambda ctx, d: ["tame", "erase", _m(ctx, d)])
    add("extreme-args", "inspect", "unknown option", lambda ctx, d: ["inspect", _m(ctx, d), "--yaml"])

    # ---------------------------------------------------------------- broken pipe
    for cmd, name, argv, quick in (
            ("inspect", "inspect | head -1", lambda ctx, d: ["inspect", _m(ctx, d)], Q),
            ("inspect", "inspect --json | head -1", lambda ctx, d: ["inspect", _m(ctx, d), "--json"], False),
            ("fingerprint list", "fingerprint list --json | head -1 (300 entries)",
             lambda ctx, d: ["fingerprint", "list", "--json", "--owner", str(_many_entries(ctx, d))], False),
            ("fingerprint list", "fingerprint list | head -1 (300 entries)",
             lambda ctx, d: ["fingerprint", "list", "--owner", str(_many_entries(ctx, d))], False),
            ("help", "--help | head -1", lambda ctx, d: ["--help"], False),
            ("generate", "generate --help | head -1", lambda ctx, d: ["generate", "--help"], False)):
        add("broken-pipe", cmd, name, argv, expect="pipe", subprocess=True, quick=quick)

    # ---------------------------------------------------------------- ordinary bad photos
    for nm, extra in (("not a JPEG and an empty file", lambda f: (_bytes("bad.jpg", b"this is not a jpeg")(f),
                                                                  _bytes("empty.png", b"")(f))),
                      ("truncated JPEG", lambda f: (f / "trunc.jpg").write_bytes(
                          Path(os.readlink(sorted(f.iterdir())[0])).read_bytes()[:2000])),
                      ("PNG header declaring 10 gigapixels", _png_bomb),
                      ("HTML saved as .png", _bytes("page.png", b"<html><body>404</body></html>"))):
        add("bad-photos", "fit", nm,
            lambda ctx, d, e=extra: ["fit", str(_photos_with(e)(ctx, d)), "-o", str(d / "o.safetensors"), "--size", "64",
                                     "--components", "1", "-q", "--cache-dir", str(ctx.cache)],
            expect="ok", inputs=lambda ctx, d: [d / "photos"], quick=nm.startswith("not a JPEG"))
    add("bad-photos", "fit", "--labels missing rows",
        lambda ctx, d: ["fit", str(ctx.photos), "-o", str(d / "o.safetensors"), "--labels", str(_userfile(d / "l.csv", data=b"image_id,Male\nx.jpg,1\n")),
                        "-q", "--cache-dir", str(ctx.cache)], must_not_exist=lambda ctx, d: [d / "o.safetensors"])
    add("bad-photos", "tame rebalance", "--labels binary garbage",
        lambda ctx, d: ["tame", "rebalance", _m(ctx, d), "--labels", str(_userfile(d / "l.csv", data=bytes(range(256)) * 4)),
                        "--attribute", "Male=0.5", "-o", str(d / "o.safetensors"), "-q"], must_not_exist=lambda ctx, d: [d / "o.safetensors"])

    # ---------------------------------------------------------------- controls (must work)
    add("control", "generate", "unknown extra tensors and metadata are ignored",
        lambda ctx, d: ["generate", str(_tampered("extra", _extra_entries)(ctx, d)), "-n", "2", "-o", str(d / "out"), "-q"],
        expect="ok", inputs=lambda ctx, d: [d / "extra.safetensors"], quick=Q)
    add("control", "generate", "re-run replaces faceprint's own outputs (grid, maps, provenance.json)",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "3", "-o", str(_pre_generated(ctx, d)), "--grid", str(d / "g.png"),
                        "--provenance", "-q"],
        expect="ok", check=_provenance_ok, quick=Q)
    add("control", "generate", "a dead writer's temporary file is removed by the next run",
        lambda ctx, d: ["generate", _m(ctx, d), "-n", "2", "-o", str(_stale_temp(d / "out", "face_000000.png")), "-q"],
        expect="ok", check=_no_temporaries, quick=Q)
    add("control", "tame forget", "a dead writer's temporary model is removed by the next write",
        lambda ctx, d: ["tame", "forget", _m(ctx, d), "--photos", str(_photos_with()(ctx, d)), "-o",
                        str(_stale_temp(d, "o.safetensors") / "o.safetensors"), "-q"],
        expect="ok", check=_no_temporaries, inputs=lambda ctx, d: [d / "photos"], quick=Q)
    add("control", "inspect", "a valid model", lambda ctx, d: ["inspect", _m(ctx, d)], expect="ok")
    add("control", "tame rebalance", "-o over an existing model (not an input) is replaced",
        lambda ctx, d: ["tame", "rebalance", str(_copy_model(ctx, d)), "--labels", str(ctx.labels), "--attribute", "Male=0.5",
                        "-o", str(_copyfile(ctx.model, d / "old.safetensors")), "-q"],
        expect="ok", inputs=lambda ctx, d: [d / "m.safetensors"])
    return cases if full else [c for c in cases if c.quick]


# -- small helpers making the files of a case -------------------------------------------------


def _fill(extra, ctx):
    return [str(ctx.photos) if a == "PHOTOS" else str(ctx.labels) if a == "LABELS" else a for a in extra]


def _model_cmd(cmd: str, model: str, ctx, d: Path) -> list[str]:
    return {
        "generate": ["generate", model, "-n", "2", "-o", str(d / "out"), "-q"],
        "inspect": ["inspect", model],
        "tame forget": ["tame", "forget", model, "--photos", str(ctx.photos), "-o", str(d / "o.safetensors"), "-q"],
        "tame rebalance": ["tame", "rebalance", model, "--labels", str(ctx.labels), "--attribute", "Male=0.5",
                           "-o", str(d / "o.safetensors"), "-q"],
        "tame include": ["tame", "include", model, "--labels", str(ctx.labels), "--include", "Bald",
                         "-o", str(d / "o.safetensors"), "-q"],
        "fingerprint issue": ["fingerprint", "issue", model, "--to", "X", "-o", str(d / "o.safetensors"),
                              "--owner", str(d / "newowner"), "-q"],
        "fingerprint calibrate": ["fingerprint", "calibrate", model, "--negatives", str(ctx.photos),
                                  "--owner", str(ctx.owner), "-q"],
        "evaluate": ["evaluate", model, "--real", str(ctx.photos), "-n", "4", "--json", str(d / "j.json"), "-q"],
    }[cmd]


def _mkfifo(p: Path) -> Path:
    if not p.exists():
        os.mkfifo(p)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _symlink(p: Path, target) -> Path:
    if not p.is_symlink():
        p.symlink_to(target)
    return p


def _hardlink(p: Path, target: Path) -> Path:
    if not p.exists():
        os.link(target, p)
    return p


def _copyfile(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copyfile(src, dst)
    return dst


def _userfile(p: Path, *, data: bytes | None = None, png: bool = False) -> Path:
    """A file of the user's (not written by faceprint)."""
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        if png:
            from PIL import Image

            Image.new("RGB", (128, 128), (200, 120, 90)).save(p, format="PNG")
        else:
            p.write_bytes(b"the user's own notes\n" if data is None else data)
    return p


def _only(d: Path, *extras) -> Path:
    f = d / "only"
    if not f.exists():
        f.mkdir()
        for e in extras:
            e(f)
    return f


def _owner_copy(ctx, d: Path) -> Path:
    o = d / "owner"
    if not o.exists():
        shutil.copytree(ctx.owner, o)
    return o


def _owner_with(ctx, d: Path, fn) -> Path:
    o = d / "owner"
    if not o.exists():
        shutil.copytree(ctx.owner, o)
        fn(o)
    return o


def _owner_tampered(ctx, d: Path, what: str) -> Path:
    import torch

    o = d / "owner"
    if o.exists():
        return o
    shutil.copytree(ctx.owner, o)
    key = o / "key.safetensors"
    fns = {
        "assign": lambda t, m: t.update(assign=t["assign"] + 1000),
        "spread": lambda t, m: t.update(spread=t["spread"] * float("nan")),
        "channels": lambda t, m: t.update(channels=t["channels"] + 100),
        "scale": lambda t, m: t.update(scale=t["scale"] * float("nan")),
        "bits": lambda t, m: m.update(config=dict(m["config"], bits="128")),
    }
    if what == "histogram":
        cal = o / "calibration.safetensors"
        tamper(cal, cal, lambda t, m: t.update(histogram=t["histogram"] - 2000))
    else:
        tamper(key, key, fns[what])
    del torch
    return o


def _many_entries(ctx, d: Path) -> Path:
    from ..fingerprint.registry import Registry

    o = _owner_copy(ctx, d)
    with Registry(o / "registry.sqlite") as reg:
        for i in range(300):
            reg.issue(f"R{i}", f"inst-{i:04d}", "0" * 64, "datalevel-bank", seed=100 + i)
    return o


def _truncated(ctx, d: Path) -> Path:
    p = d / "m.safetensors"
    if not p.exists():
        data = ctx.model.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    return p


def _extra_entries(t, m):
    import torch

    t["guard.directions"] = torch.randn(4, 8)
    t["refine.table"] = torch.arange(10)
    m["guard"] = {"version": 3, "enabled": True}
    m["refine"] = {"mode": "fast"}


def _pre_generated(ctx, d: Path) -> Path:
    from ..cli.main import main

    out = d / "out"
    if not out.exists():
        main(["generate", str(ctx.model), "-n", "3", "-o", str(out), "--grid", str(d / "g.png"), "--provenance", "-q"])
    return out


def _stale_temp(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dead = _dead_pid()
    (folder / f".{name}.{dead}.0badc0de.tmp").write_bytes(b"half a file")
    return folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _no_temporaries(ctx, d: Path, r) -> str | None:
    left = [str(p.relative_to(d)) for p in d.rglob(".*.tmp")]
    return f"temporary files left: {left}" if left else None


def _provenance_ok(ctx, d: Path, r) -> str | None:
    doc = json.loads((d / "out" / "provenance.json").read_text())
    return None if len(doc["faces"]) == 3 else "provenance.json does not list 3 faces"


def _ro_cmd(cmd: str, ctx, d: Path, how: str) -> list[str]:
    """A command whose output goes to a read-only (how="ro") or full (how="full") file system."""
    mnt = d / how
    if not mnt.exists():
        mnt.mkdir()
        _copy_model(ctx, d)
        opts = "ro,size=1m" if how == "ro" else "size=300k"
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], check=True, capture_output=True)
        ctx.mounts.append(mnt)
    out = mnt / "o.safetensors"
    return {
        "fit": ["fit", str(ctx.photos), "-o", str(out), "--size", "64", "--components", "2", "-q", "--cache-dir", str(ctx.cache)],
        "generate": ["generate", str(d / "m.safetensors"), "-n", "4", "-o", str(mnt / "faces"), "-q"],
        "tame forget": ["tame", "forget", str(d / "m.safetensors"), "--photos", str(_forget_set(ctx, d)), "-o", str(out), "-q"],
        "tame rebalance": ["tame", "rebalance", str(d / "m.safetensors"), "--labels", str(ctx.labels), "--attribute",
                           "Male=0.5", "-o", str(out), "-q"],
        "fingerprint issue": ["fingerprint", "issue", str(d / "m.safetensors"), "--to", "X", "-o", str(out),
                              "--owner", str(d / "newowner"), "-q"],
        "evaluate": ["evaluate", str(d / "m.safetensors"), "--real", str(ctx.photos), "-n", "4", "--json", str(mnt / "j.json"), "-q"],
        "demo": ["demo", "--data", str(ctx.photos), "-o", str(mnt / "demo"), "-q"],
    }[cmd]


def mount_available() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    with tempfile.TemporaryDirectory() as t:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", t], capture_output=True)
        if r.returncode != 0:
            return False
        subprocess.run(["umount", t], capture_output=True)
    return True


def unmount_all(ctx: Context) -> None:
    for m in ctx.mounts:
        subprocess.run(["umount", str(m)], capture_output=True)
    ctx.mounts.clear()


# --------------------------------------------------------------------------------------------
# running a case


def hash_tree(paths) -> dict[str, str]:
    """sha256 of every regular file under the given paths (symlinks: their target path; special
    files: their type), keyed by path."""
    out = {}
    for p in paths:
        p = Path(p)
        items = [p] if not p.is_dir() or p.is_symlink() else sorted(p.rglob("*"))
        for q in items:
            try:
                st = os.lstat(q)
            except FileNotFoundError:
                out[str(q)] = "missing"
                continue
            if stat.S_ISLNK(st.st_mode):
                out[str(q)] = "link:" + os.readlink(q)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(q, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        h.update(b)
                out[str(q)] = h.hexdigest()
            elif not stat.S_ISDIR(st.st_mode):
                out[str(q)] = f"special:{stat.S_IFMT(st.st_mode)}"
    return out


class _Alarm(BaseException):
    pass


def _run_inproc(argv: list[str]) -> tuple[int | None, str, str, bool, bool]:
    """(exit code, stdout, stderr, traceback escaped, hang) running main(argv) in this process."""
    from ..cli.main import main

    out, err = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise _Alarm()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(CASE_SECONDS)
    code, tb, hang = None, False, False
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except _Alarm:
        hang = True
    except Exception:  # noqa: BLE001 - what the corpus counts: an exception escaping main
        import traceback

        tb = True
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue(), tb, hang


_CHILD = r"""
import os, resource, signal, sys
lim = os.environ.get("FACEPRINT_RLIMIT_FSIZE")
if lim:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(lim), int(lim)))
from faceprint.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _env(extra=None) -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def _run_subprocess(argv, *, env=None, pipe_lines=None) -> tuple[int | None, str, str, bool, bool]:
    cmd = [sys.executable, "-c", _CHILD, *argv]
    if pipe_lines is None:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_SECONDS, env=_env(env))
        except subprocess.TimeoutExpired as e:
            return None, "", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), False, True
        return r.returncode, r.stdout, r.stderr, "Traceback" in r.stderr, False
    # stdout read by a reader that stops after pipe_lines lines (`| head -n`)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(env))
    got = b""
    for _ in range(pipe_lines):
        got += p.stdout.readline()
    p.stdout.close()
    try:
        _, err = p.communicate(timeout=CASE_SECONDS)
    except subprocess.TimeoutExpired:
        p.kill()
        return None, got.decode(), "", False, True
    err = err.decode()
    return p.returncode, got.decode(), err, "Traceback" in err, False


def run_case(case: Case, ctx: Context) -> Result:
    d = ctx.case_dir(f"{case.kind}-{case.command}-{case.name}"[:120])
    t0 = time.perf_counter()
    try:
        argv = case.argv(ctx, d)
        inputs = case.inputs(ctx, d) if case.inputs else []
        before = hash_tree(inputs)
    except Exception as e:  # noqa: BLE001
        return Result(case.kind, case.command, case.name, False, f"setup failed: {e!r}", None, 0.0, False, False, False, "")
    if case.subprocess or case.expect == "pipe":
        code, out, err, tb, hang = _run_subprocess(argv, env=case.env, pipe_lines=case.pipe_lines if case.expect == "pipe" else None)
    else:
        code, out, err, tb, hang = _run_inproc(argv)
    seconds = time.perf_counter() - t0
    tb = tb or "Traceback (most recent call last)" in err
    changed = hash_tree(inputs) != before
    reasons = []
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if hang:
        reasons.append(f"no end within {CASE_SECONDS} s")
    elif case.expect == "refuse":
        if code != 2:
            reasons.append(f"exit {code}, expected 2")
        if len(lines) != 1:
            reasons.append(f"{len(lines)} stderr lines, expected 1")
    elif case.expect == "ok":
        if code != 0:
            reasons.append(f"exit {code}, expected 0: {lines[-1] if lines else ''}")
    elif case.expect == "pipe":  # a quiet end: exit 0 (all written before the reader left) or 141, no error
        if code not in (0, 141) or any("error" in ln.lower() or "exception" in ln.lower() for ln in lines):
            reasons.append(f"exit {code} with stderr {lines[-1:]}, expected a quiet end")
    if tb:
        reasons.append("traceback")
    if changed:
        reasons.append("an input changed")
    if case.expect == "refuse" and case.must_not_exist:
        left = [str(p) for p in case.must_not_exist(ctx, d) if os.path.lexists(p)]
        if left:
            reasons.append(f"refusal left {left}")
    if case.expect == "refuse":
        tmp = [str(p) for p in d.rglob(".*.tmp")]
        if tmp:
            reasons.append(f"temporary files left {tmp}")
    if case.check and not reasons:
        why = case.check(ctx, d, (code, out, err))
        if why:
            reasons.append(why)
    return Result(case.kind, case.command, case.name, not reasons, "; ".join(reasons), code, round(seconds, 2), tb, hang,
                  changed, err.strip().splitlines()[-1][:300] if err.strip() else "")


def _run_one(case, ctx, can_mount):
    if case.needs == "mount" and not can_mount:
        return None
    try:
        return run_case(case, ctx)
    finally:
        unmount_all(ctx)


# --------------------------------------------------------------------------------------------
# kill -9 trials


def kill_trials(ctx: Context, n: int, *, seed: int = 0, progress=print) -> dict:
    """Kill commands that write a model at random moments; check the file at the output path.

    Commands: fit, tame forget, tame rebalance (64 px model) and, with the 128 px model,
    fingerprint issue; each writes over an existing model file. After a kill the file at the
    path must load (validated) and be the old one or a complete new one; after the next
    successful run of the same command no temporary file may be left in its folder."""
    from ..io import load_artifact, sha256_file

    rng = random.Random(seed)
    d = ctx.root / "kill"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    photos = ctx.photos
    commands = {
        "fit": lambda out: ["fit", str(photos), "-o", str(out), "--size", "64", "--components", "2", "-q", "--cache-dir", str(ctx.cache)],
        "tame forget": lambda out: ["tame", "forget", str(ctx.model), "--photos", str(_forget_set(ctx, d)), "-o", str(out), "-q"],
        "tame rebalance": lambda out: ["tame", "rebalance", str(ctx.model), "--labels", str(ctx.labels), "--attribute",
                                       "Male=0.7", "-o", str(out), "-q"],
    }
    if ctx.model128 is not None:
        commands["fingerprint issue"] = lambda out: ["fingerprint", "issue", str(ctx.model128), "--to", "K", "-o", str(out),
                                                     "--instance", f"k{rng.getrandbits(40):x}", "--owner", str(d / "owner"), "-q"]
    durations = {}
    for name, make in commands.items():  # one full run of each: its duration and the "previous" file
        out = d / f"{name.replace(' ', '_')}.safetensors"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _CHILD, *make(out)], capture_output=True, text=True, env=_env())
        durations[name] = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"kill trials: {name} failed: {r.stderr[-500:]}")
    names = list(commands)
    trials, failures = [], []
    for i in range(n):
        name = names[i % len(names)]
        out = d / f"{name.replace(' ', '_')}.safetensors"
        old = sha256_file(out)
        # half the trials: a random moment of the whole run; the other half: a random moment
        # (0-15 ms) after the temporary file of the model appeared, i.e. during the write
        mode = "during write" if i % 2 else "anytime"
        for _attempt in range(5):  # a trial counts only if the process was still running when killed
            when = rng.uniform(0.05, 0.95) * durations[name]
            delay = rng.uniform(0.0, 0.015)
            p = subprocess.Popen([sys.executable, "-c", _CHILD, *commands[name](out)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=_env())
            t0 = time.perf_counter()
            if mode == "anytime":
                while p.poll() is None and time.perf_counter() - t0 < when:
                    time.sleep(0.005)
            else:
                pattern = f".{out.name}.{p.pid}."
                while p.poll() is None and not any(e.startswith(pattern) for e in os.listdir(out.parent)):
                    time.sleep(0.0005)
                time.sleep(delay)
            killed = p.poll() is None
            if killed:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
            at = time.perf_counter() - t0
            if killed:
                break
            old = sha256_file(out)  # it finished: its output is the new "previous" file
        ok, why = True, ""
        try:
            load_artifact(out)
            now = sha256_file(out)
            state = "old" if now == old else "new"
        except Exception as e:  # noqa: BLE001
            ok, why, state = False, f"file at the path does not load after the kill: {e}", "broken"
        temps_after_kill = len(list(out.parent.glob(f".{out.name}.*.tmp")))
        # the next successful run removes what the killed writer left
        r = subprocess.run([sys.executable, "-c", _CHILD, *commands[name](out)], capture_output=True, text=True, env=_env())
        left = [q.name for q in out.parent.glob(".*.tmp")]
        if r.returncode != 0:
            ok, why = False, f"the next run failed: {r.stderr.strip()[-200:]}"
        elif left:
            ok, why = False, f"temporary files left after the next run: {left}"
        trials.append({"command": name, "mode": mode, "kill_at_s": round(at, 3), "killed": killed, "file": state,
                       "temporaries_after_kill": temps_after_kill, "ok": ok, "why": why})
        if not ok:
            failures.append(trials[-1])
        progress(f"kill trial {i + 1}/{n}: {name}, {mode}, at {at:.3f} s ({'killed' if killed else 'had finished'}), "
                 f"file {state}, {temps_after_kill} temporaries -> {'ok' if ok else 'FAIL ' + why}")
    return {"trials": trials, "n": len(trials), "killed": sum(t["killed"] for t in trials),
            "killed_during_write": sum(t["killed"] and t["temporaries_after_kill"] > 0 for t in trials),
            "failures": len(failures), "durations_s": {k: round(v, 2) for k, v in durations.items()},
            "temporaries_after_kill": sum(t["temporaries_after_kill"] for t in trials)}


def _forget_set(ctx, d: Path) -> Path:
    f = d / "forget"
    if not f.exists():
        f.mkdir()
        for p in sorted(ctx.photos.iterdir())[:3]:
            (f / p.name).symlink_to(os.readlink(p))
    return f


# --------------------------------------------------------------------------------------------
# validation overhead


def validation_overhead(model: Path, n_faces: int = 64, repeats: int = 5) -> dict:
    """Time of validate_artifact on ``model`` against generate's time for ``n_faces`` (load,
    sample, decode), the same work `faceprint generate -n 64` does."""
    from ..io import load_artifact
    from ..latent.generator import Generator
    from ..validation import validate_artifact

    tensors, meta = load_artifact(model, validate=False)
    v = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        validate_artifact(model, tensors, meta)
        v.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    gen = Generator.load(model)
    gen.generate(n_faces, seed=0)
    g = time.perf_counter() - t0
    val = sorted(v)[len(v) // 2]
    return {"model": str(model), "model_bytes": model.stat().st_size, "n_photos": int(tensors["bank"].shape[0]),
            "validation_s": round(val, 4), "generate_s": round(g, 3), "share": round(val / g, 4), "faces": n_faces}


# --------------------------------------------------------------------------------------------
# the benchmark


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="only the test-suite subset of the corpus")
    p.add_argument("--kill-trials", type=int, default=50, help="kill -9 trials (default 50; 0 skips them)")
    p.add_argument("--overhead-photos", type=int, default=1024,
                   help="photos of the model the validation overhead is measured on (default 1024)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--md", type=Path, default=None, help="write the table as Markdown here")


def run(args) -> int:
    from ..bench.machine import print_table

    work = args.workdir or Path(tempfile.mkdtemp(prefix="faceprint-reliability-"))
    os.environ.setdefault("FACEPRINT_CACHE", str(work / "latent-cache"))
    print(f"scratch folder {work}", file=sys.stderr)
    t_start = time.perf_counter()
    ctx = make_context(work, with_128=args.kill_trials > 0)
    can_mount = mount_available()
    cases = build_cases(full=not args.quick)
    results, skipped = [], []
    for i, c in enumerate(cases):
        r = _run_one(c, ctx, can_mount)
        if r is None:
            skipped.append(c)
            continue
        results.append(r)
        print(f"[{i + 1}/{len(cases)}] {'ok  ' if r.passed else 'FAIL'} {r.kind:12s} {r.command:22s} {r.name} "
              f"({r.seconds:.1f} s){'' if r.passed else ': ' + r.reason}", file=sys.stderr, flush=True)
    by_kind = {}
    for r in results:
        k = by_kind.setdefault(r.kind, {"cases": 0, "passed": 0, "tracebacks": 0, "hangs": 0, "inputs_changed": 0,
                                        "commands": set()})
        k["cases"] += 1
        k["passed"] += r.passed
        k["tracebacks"] += r.traceback
        k["hangs"] += r.hang
        k["inputs_changed"] += r.inputs_changed
        k["commands"].add(r.command)
    tampered = [r for r in results if r.kind == "tampered"]
    accepted = [r for r in tampered if r.code == 0]
    kill = kill_trials(ctx, args.kill_trials, progress=lambda m: print(m, file=sys.stderr, flush=True)) \
        if args.kill_trials > 0 else None
    overhead = None
    if args.overhead_photos:
        big = work / f"overhead-{args.overhead_photos}.safetensors"
        if not big.exists():
            from ..autoencoder import TAEF2
            from ..data import FaceFolder, LatentCache, encode_folder
            from ..latent.generator import Generator, GeneratorConfig

            ae = TAEF2.load()
            ls = encode_folder(FaceFolder(CELEBA, size=128, limit=args.overhead_photos), ae, cache=LatentCache())
            Generator(GeneratorConfig(), autoencoder=ae).fit(ls, seed=0).save(big)
        overhead = validation_overhead(big)
    rows = [[k, v["cases"], v["passed"], v["tracebacks"], v["hangs"], v["inputs_changed"], ", ".join(sorted(v["commands"]))]
            for k, v in sorted(by_kind.items(), key=lambda kv: list(KINDS).index(kv[0]))]
    total = [sum(v["cases"] for v in by_kind.values()), sum(v["passed"] for v in by_kind.values()),
             sum(v["tracebacks"] for v in by_kind.values()), sum(v["hangs"] for v in by_kind.values()),
             sum(v["inputs_changed"] for v in by_kind.values())]
    rows.append(["all", *total, f"{len({r.command for r in results})} commands"])
    print_table("faceprint reliability corpus", ["kind", "cases", "passed", "tracebacks", "hangs", "inputs changed", "commands"], rows)
    print(f"tampered artifacts accepted: {len(accepted)} of {len(tampered)}; cases skipped (no tmpfs mount): {len(skipped)}")
    failures = [r for r in results if not r.passed]
    for r in failures:
        print(f"FAIL {r.kind} / {r.command} / {r.name}: {r.reason}")
    if kill:
        print(f"kill -9: {kill['n']} trials ({kill['killed']} killed while running, {kill['killed_during_write']} while "
              f"writing), {kill['failures']} failures; "
              f"{kill['temporaries_after_kill']} temporary files left by killed writers, all removed by the next run"
              if not kill["failures"] else f"kill -9: {kill['failures']} failures of {kill['n']}")
    if overhead:
        print(f"validation: {overhead['validation_s'] * 1000:.1f} ms on a {overhead['n_photos']}-photo model "
              f"({overhead['model_bytes'] / 2**20:.0f} MiB), generate -n {overhead['faces']} {overhead['generate_s']:.1f} s: "
              f"{overhead['share'] * 100:.2f}%")
    doc = {"machine": _machine(), "seconds": round(time.perf_counter() - t_start, 1),
           "by_kind": {k: {**v, "commands": sorted(v["commands"])} for k, v in by_kind.items()},
           "tampered_accepted": len(accepted), "skipped": [f"{c.kind}/{c.command}/{c.name}" for c in skipped],
           "results": [dataclasses.asdict(r) for r in results], "kill": kill, "overhead": overhead}
    if args.json:
        from ..io import atomic_write_text

        # result files name no machine paths: the scratch folder is written as WORK
        text = json.dumps(doc, indent=1, default=str).replace(str(work), "WORK")
        atomic_write_text(args.json, text + "\n")
    if args.md:
        from ..io import atomic_write_text

        atomic_write_text(args.md, _markdown(doc, rows))
    return 0 if not failures and not accepted and not (kill and kill["failures"]) else 1


def _machine() -> dict:
    try:
        from .machine import describe

        return describe()
    except Exception:  # noqa: BLE001
        import platform

        return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def _markdown(doc: dict, rows) -> str:
    lines = ["# Reliability: hostile and broken input (`python -m faceprint.bench reliability`)", ""]
    lines.append(f"Machine: {json.dumps(doc['machine'])}. Total time {doc['seconds']} s.")
    lines.append("")
    lines.append("| kind | what | cases | passed | tracebacks | hangs | inputs changed | commands |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        what = KINDS.get(r[0], "")
        lines.append("| " + " | ".join([str(r[0]), what] + [str(v) for v in r[1:]]) + " |")
    lines.append("")
    lines.append(f"Tampered artifacts accepted: {doc['tampered_accepted']}. Cases skipped: {len(doc['skipped'])}"
                 + (f" ({', '.join(doc['skipped'])})" if doc["skipped"] else "") + ".")
    k = doc.get("kill")
    if k:
        lines += ["", f"kill -9 at random moments: {k['n']} trials of fit, tame forget, tame rebalance and fingerprint "
                      f"issue, each writing over an existing model ({k['killed']} killed while running, "
                      f"{k.get('killed_during_write', 0)} of them while the new model was being written; full-run seconds "
                      f"{k['durations_s']}). Failures: {k['failures']} (after every kill the file at the path loaded, "
                      f"validated, as the old or a complete new model). {k['temporaries_after_kill']} temporary files left "
                      "by killed writers; none left after the next successful run."]
    o = doc.get("overhead")
    if o:
        lines += ["", f"Validation overhead: {o['validation_s'] * 1000:.1f} ms on a {o['n_photos']}-photo model "
                      f"({o['model_bytes'] / 2**20:.0f} MiB) against {o['generate_s']:.2f} s for `generate -n {o['faces']}` "
                      f"(load + sample + decode): {o['share'] * 100:.2f}%."]
    fails = [r for r in doc["results"] if not r["passed"]]
    if fails:
        lines += ["", "Failures:", ""] + [f"- {r['kind']} / {r['command']} / {r['name']}: {r['reason']}" for r in fails]
    lines += ["", "Every case, its exit code and the last stderr line are in the JSON beside this file."]
    return "\n".join(lines) + "\n"
