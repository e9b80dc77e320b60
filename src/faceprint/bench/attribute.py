"""`python -m faceprint.bench attribute`: learned attribution of images to their source without a
fingerprint (papers/004, Ch. 4; issue 17 part 1) on faceprint's own models.

Every source goes through the same TAEF2 decoder, real photos do not: the real class is
measured as TAEF2 round trips of real photos (the hard task: only the latent models' traces
remain) and, for setup A, also as raw photos (the chapter's setting).

Stages (each cached in ``--out``, outside the repository, keyed by its settings, so an
interrupted run continues with ``--resume``; trainings checkpoint every epoch; every draw is
seeded by ``--seed``):

1. sources: faces of every source, per split (train / cal / test), cached as uint8 chunks
   (faceprint.attribution.sources). Models are fitted on celeba-10k files 000001-001024
   (celeba-1k); setup B swaps the last i of them for files 001025-...; real photos are files
   002049-... (train, then cal, then test: disjoint, and disjoint from every model's photos).
   Test faces use seeds disjoint from training faces.
2. setups (Table 4.1-4.3 analogs): A-rt {real round trip, LR-GMM-NN, LR-GMM, NN, LatentPatch,
   FlowPrior (+NN), [GAN]}, A-raw (raw real instead), B {real rt, LR-GMM-NN with 0, 1, 10,
   100, 1000 photos swapped}, C {real rt, LR-GMM-NN EM seeds 0..S-1}, sanity {LR-GMM-NN seed 0
   twice, disjoint sampling seeds}. Per setup: the learned classifier, kNN on pixels,
   Eigenface, PRNU, Inception pool3 + logistic regression, the owner-side provenance match
   (A, B, C), FD ratios of the learned fingerprint and of Inception features.
3. components (Tables 4.4, 4.5 analogs, on A-rt): low-/high-frequency inputs at factors,
   post-pooling patch sizes, and the full network trained as long.
4. immunisation (Table 4.7 analog, on A-rt): per attack (noise std U[5, 20]/255 and the
   variance reading, blur k in {1..9}, crop 80-95 % at a random offset, JPEG q U{10..75}, the
   random combination), accuracy of the clean classifier on attacked test faces (Atk) and of a
   copy fine-tuned on attacked training faces (Dfs); PRNU likewise (fingerprints re-estimated
   on attacked training faces).
5. open set: A-rt without ``--held-out`` trained as in 2, threshold calibrated on the cal split
   of the known sources (coverage 0.95), false attribution on the held-out source, on a
   Gaussian-prior decoder and on raw utkface photos, with Clopper-Pearson 95 % bounds; the
   fingerprinted instance's faces and utkface round trips are reported as shares attributed
   to LR-GMM-NN and to real.
6. the shipped-format classifier: A-rt's classifier with its threshold and every measured
   error rate, written to ``OUT/attribute-classifier.safetensors`` (the file
   ``faceprint attribute --classifier`` reads; not committed).

Results: ``OUT/attribute.md`` and ``OUT/attribute.json`` (machine, versions, seed, every
number; no machine paths); ``--publish DIR`` copies them (docs/results). ``--reduced`` is the
profile that fits well under an hour on 2 cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .machine import describe, print_table

# epochs: a first reduced run at 6 epochs ended at 60% crop accuracy and 72% test accuracy on setup A,
# still climbing; an epoch of 3,500 crops takes about 10 s on 2 cores, so 30 fit in 5 minutes (the full
# profile's 20 epochs of 28,000 crops in about 27)
PROFILES = {
    "full": {"train": 4000, "cal": 400, "test": 1000, "epochs": 20, "component_epochs": 10, "immunise_epochs": 4,
             "seeds": 10, "swaps": [1, 10, 100, 1000], "factors": [2, 4, 8, 16], "pools": [1, 3, 4, 5, 6],
             "inception_train": 500, "inception_test": 300, "baseline_train": 1000, "provenance_train": 300,
             "provenance_test": 300, "flow_epochs": 300},
    "reduced": {"train": 500, "cal": 100, "test": 200, "epochs": 30, "component_epochs": 15, "immunise_epochs": 6,
                "seeds": 4, "swaps": [1, 10, 100, 1000], "factors": [2, 8], "pools": [3, 5],
                "inception_train": 60, "inception_test": 100, "baseline_train": 500, "provenance_train": 60,
                "provenance_test": 100, "flow_epochs": 60},
}
REAL_FIRST = 2048  # 0-based index of celeba-10k file 002049
HELD_OUT_DEFAULT = "FlowPrior (+NN)"


def add_arguments(p) -> None:
    p.add_argument("--data", type=Path, default=None, help="datasets folder holding celeba-10k/ and utkface/ "
                                                           "(default ../shared/datasets)")
    p.add_argument("--out", type=Path, default=Path("bench-results/attribute"),
                   help="state, cached faces and classifiers (outside the repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reduced", action="store_true", help="the reduced profile (well under an hour on 2 cores)")
    for k in ("train", "cal", "test", "epochs", "component_epochs", "immunise_epochs", "seeds", "inception_train",
              "inception_test", "baseline_train", "provenance_train", "provenance_test", "flow_epochs"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"override the profile's {k}")
    p.add_argument("--held-out", default=HELD_OUT_DEFAULT, help="setup A source left out of the open-set classifier")
    p.add_argument("--gan", type=Path, default=None, help="a latent-GAN model file (faceprint train-gan): adds it to setup A")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out: raw,B,C,sanity,components,"
                                              "immunise,openset,inception,provenance")
    p.add_argument("--minutes", type=float, default=None,
                   help="stop after the stage (or training epoch) that ends past this many minutes; continue with --resume")
    p.add_argument("--resume", action="store_true", help="reuse the stages an earlier run with the same settings finished")
    p.add_argument("--publish", type=Path, default=None, help="copy attribute.md and attribute.json here")
    p.add_argument("--contended", action="store_true", help="mark the timings as measured while other jobs ran")
    p.add_argument("--weights", type=Path, default=None)


class _Budget(Exception):
    pass


def _log(msg: str) -> None:
    print(msg, flush=True)


# -------------------------------------------------------------------------------- settings
def _profile(args) -> dict:
    prof = dict(PROFILES["reduced" if args.reduced else "full"])
    for k in list(prof):
        v = getattr(args, k, None)
        if v is not None:
            prof[k] = v
    prof["profile"] = "reduced" if args.reduced else "full"
    return prof


def _datasets(args) -> Path:
    from .machine import datasets_dir

    return datasets_dir(args.data, needs="celeba-10k/ and utkface")


def sources(args, prof) -> dict:
    """Every SourceSpec of the run, by role."""
    from ..attribution.sources import SourceSpec

    spans = (prof["train"], prof["cal"])
    fe = prof["flow_epochs"]
    rt = SourceSpec("real (TAEF2 round trip)", "real-roundtrip", first=REAL_FIRST, spans=spans)
    raw = SourceSpec("real (raw)", "real-raw", first=REAL_FIRST, spans=spans)
    base = SourceSpec("LR-GMM-NN", "lrgmm-nn")
    A = [rt, base, SourceSpec("LR-GMM", "lrgmm"), SourceSpec("NN", "nn"), SourceSpec("LatentPatch", "latentpatch"),
         SourceSpec("FlowPrior (+NN)", "flowprior", flow_epochs=fe)]
    if args.gan is not None:
        A.append(SourceSpec("latent GAN", "gan", checkpoint=str(args.gan)))
    B = [rt, SourceSpec("LR-GMM-NN, 0 swapped", "lrgmm-nn")] + [
        SourceSpec(f"LR-GMM-NN, {i} swapped", "lrgmm-nn", swap=i) for i in prof["swaps"]]
    C = [rt] + [SourceSpec(f"LR-GMM-NN, EM seed {s}", "lrgmm-nn", fit_seed=s) for s in range(prof["seeds"])]
    sanity = [SourceSpec("LR-GMM-NN seed 0, run 1", "lrgmm-nn"),
              SourceSpec("LR-GMM-NN seed 0, run 2", "lrgmm-nn", stream="same-seed-twice")]
    unseen = [SourceSpec("Gaussian-prior decoder (unseen)", "gaussian"),
              SourceSpec("utkface raw photos (unseen)", "real-raw", dataset="utkface")]
    extra = [SourceSpec("utkface round trips", "real-roundtrip", dataset="utkface"),
             SourceSpec("LR-GMM-NN fingerprinted instance (datalevel-bank)", "fingerprinted")]
    return {"A": A, "A-raw": [raw] + A[1:], "B": B, "C": C, "sanity": sanity, "unseen": unseen, "extra": extra}


# -------------------------------------------------------------------------------- stage cache
def _stage(args, name: str, key: dict, fn):
    from ..io import atomic_write_text

    f = args.out / f"stage-{name}.json"
    if args.resume and f.is_file():
        doc = json.loads(f.read_text())
        if doc.get("key") == key:
            _log(f"[{name}] from an earlier run")
            return doc["result"]
    t0 = time.perf_counter()
    res = fn()
    _log(f"[{name}] {time.perf_counter() - t0:.0f} s")
    atomic_write_text(f, json.dumps({"key": key, "result": res}, indent=1, default=float))
    _check_budget(args, name)
    return res


def _check_budget(args, after: str) -> None:
    if args.minutes is not None and time.perf_counter() - _T0[0] > 60 * args.minutes:
        raise _Budget(after)


def _remaining(args) -> float | None:
    if args.minutes is None:
        return None
    return max(1.0, 60 * args.minutes - (time.perf_counter() - _T0[0]))


_T0 = [time.perf_counter()]


class Data:
    """Images and labels of a setup's splits."""

    def __init__(self, cache, specs, prof, splits=("train", "cal", "test")):
        self.specs = specs
        self.names = [s.name for s in specs]
        for split in splits:
            xs, ys = [], []
            for c, s in enumerate(specs):
                x = cache.images(s, split, prof[split])
                xs.append(x)
                ys.append(torch.full((x.shape[0],), c, dtype=torch.int64))
            setattr(self, split, (torch.cat(xs), torch.cat(ys)))

    @staticmethod
    def cap(x, y, n: int):
        keep = torch.cat([torch.nonzero(y == c).squeeze(1)[:n] for c in range(int(y.max()) + 1)])
        return x[keep], y[keep]


# -------------------------------------------------------------------------------- the learned classifier
def train_classifier(args, ae, name: str, data: Data, epochs: int, net_config=None, *, tag=None):
    from ..attribution import Attributor, NetConfig, TrainConfig

    (args.out / "classifiers").mkdir(parents=True, exist_ok=True)
    att = Attributor(data.names, ae.id, net_config or NetConfig(), seed=args.seed)
    cfg = TrainConfig(epochs=epochs, max_seconds=_remaining(args))
    x, y = data.train
    tag = tag or name
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in tag)
    att.fit(x, y, cfg, seed=args.seed, checkpoint=args.out / "classifiers" / f"ckpt-{safe}.safetensors",
            tag=tag, progress=_log)
    if not att.training_["complete"]:
        raise _Budget(f"training {name} (epoch {att.training_['epochs_done']})")
    return att


def _acc(pred, y) -> float:
    from ..attribution.evaluation import accuracy

    return accuracy(pred, y)


def learned_rows(att, data: Data, seed: int) -> dict:
    from ..attribution.evaluation import confusion, fd_ratio

    from ..attribution import predict

    x, y = data.test
    probs, feats = predict(att.net, x)
    pred = probs.argmax(1)
    k = len(data.names)
    per = {n: _acc(pred[y == c], y[y == c]) for c, n in enumerate(data.names)}
    return {"accuracy": _acc(pred, y), "per_source": per, "confusion": confusion(pred, y, k),
            "fd_ratio": fd_ratio(feats, y, seed=seed), "train_seconds": att.training_["seconds"],
            "epochs": att.training_["epochs_done"], "n_train": int(data.train[0].shape[0]), "n_test": int(x.shape[0])}


# -------------------------------------------------------------------------------- baselines
def _inception(cache_dir: Path):
    from ..metrics import InceptionFeatures

    if "inc" not in _INC:
        _INC["inc"] = InceptionFeatures.load()
    return _INC["inc"]


_INC: dict = {}


def inception_features(args, cache, spec, split: str, n: int):
    """Inception pool3 features of a source's first n images of a split (cached in OUT/features)."""
    import numpy as np

    f = args.out / "features" / f"{spec.kind}-{spec.digest()}-{split}-{n}.npy"
    if f.is_file():
        return torch.from_numpy(np.load(f))
    inc = _inception(args.out)
    x = cache.images(spec, split, n)
    feats = inc.features(x.float() / 255.0, batch_size=50)
    f.parent.mkdir(parents=True, exist_ok=True)
    from ..io import atomic_path

    with atomic_path(f) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, feats)
    return torch.from_numpy(feats)


def baseline_rows(args, prof, cache, ae, data: Data, *, provenance: bool, skip: set) -> dict:
    from ..attribution.baselines import PRNU, Eigenface, LogisticRegression, PixelKNN, ProvenanceMatch
    from ..attribution.evaluation import fd_ratio

    out = {}
    xtr, ytr = Data.cap(*data.train, prof["baseline_train"])
    xte, yte = data.test
    for b in (PixelKNN(), Eigenface(seed=args.seed), PRNU()):
        t0 = time.perf_counter()
        b.fit(xtr, ytr)
        out[b.name] = {"accuracy": _acc(b.predict(xte), yte), "seconds": time.perf_counter() - t0,
                       "n_train": int(xtr.shape[0]), "n_test": int(xte.shape[0])}
    if "inception" not in skip:
        t0 = time.perf_counter()
        ftr = torch.cat([inception_features(args, cache, s, "train", prof["inception_train"]) for s in data.specs])
        ytr_i = torch.cat([torch.full((prof["inception_train"],), c) for c in range(len(data.specs))])
        fte = torch.cat([inception_features(args, cache, s, "test", prof["inception_test"]) for s in data.specs])
        yte_i = torch.cat([torch.full((prof["inception_test"],), c) for c in range(len(data.specs))])
        lr = LogisticRegression(1e-2).fit(ftr, ytr_i)
        out["Inception pool3 + logistic regression"] = {
            "accuracy": _acc(lr.predict(fte), yte_i), "seconds": time.perf_counter() - t0,
            "n_train": int(ftr.shape[0]), "n_test": int(fte.shape[0]), "fd_ratio": fd_ratio(fte, yte_i, seed=args.seed)}
    if provenance and "provenance" not in skip:
        banks = {s.name: cache.bank(s) for s in data.specs if cache.bank(s) is not None}
        if banks:
            t0 = time.perf_counter()
            pm = ProvenanceMatch(banks, ae)
            ptr, pytr = Data.cap(*data.train, prof["provenance_train"])
            pte, pyte = Data.cap(*data.test, prof["provenance_test"])
            pm.fit(ptr, pytr)
            out[pm.name] = {"accuracy": _acc(pm.predict(pte), pyte), "seconds": time.perf_counter() - t0,
                            "n_train": int(ptr.shape[0]), "n_test": int(pte.shape[0]), "banks": len(pm.banks)}
    return out


def _pk(prof, *keep) -> dict:
    """The profile entries a stage depends on (so changing another one does not redo it)."""
    base = ("train", "cal", "test", "epochs")
    return {k: prof[k] for k in base + keep}


def run_setup(args, prof, cache, ae, name: str, specs, *, provenance: bool, skip: set, baselines: bool = True) -> dict:
    key = {"setup": name, "sources": [s.key() for s in specs], "names": [s.name for s in specs],
           "prof": _pk(prof, "baseline_train", "inception_train", "inception_test", "provenance_train",
                       "provenance_test"), "seed": args.seed, "skip": sorted(skip)}

    def work():
        t0 = time.perf_counter()
        data = Data(cache, specs, prof)
        res = {"sources": data.names, "cache_seconds": {s.name: cache.seconds(s) for s in specs},
               "load_seconds": time.perf_counter() - t0}
        att = train_classifier(args, ae, name, data, prof["epochs"])
        res["learned"] = learned_rows(att, data, args.seed)
        if baselines:
            res["baselines"] = baseline_rows(args, prof, cache, ae, data, provenance=provenance, skip=skip)
        return res

    return _stage(args, f"setup-{name}", key, work)


# -------------------------------------------------------------------------------- attacks
def _per_image(fn):
    def apply(x, g):
        return torch.cat([fn(x[i:i + 1], g) for i in range(x.shape[0])]) if x.shape[0] else x
    return apply


def attacks() -> dict:
    """name -> (float images (B, 3, S, S), generator) -> attacked images, at the chapter's ranges."""
    from ..fingerprint import attacks as A
    from ..fingerprint import augment as G

    def noise(reading):
        def f(x, g):
            u = torch.rand(x.shape[0], generator=g)
            s = (5 + 15 * u) / 255 if reading == "std" else torch.sqrt(5 + 15 * u) / 255
            return G.gaussian_noise(x, s, generator=g)
        return f

    def blur(x, g):
        k = int(torch.randint(5, (), generator=g))
        return A.gaussian_blur(x, (1, 3, 5, 7, 9)[k])

    def crop(x, g):
        f = 0.80 + 0.15 * float(torch.rand((), generator=g))
        return A.crop_resize(x, f, generator=g)

    def jpeg(x, g):
        return A.jpeg(x, int(torch.randint(10, 76, (), generator=g)))

    return {
        "noise (std 5-20/255)": noise("std"),
        "noise (variance 5-20, 8-bit scale)": noise("variance"),
        "blur (k 1-9)": _per_image(blur),
        "crop (80-95 %, random offset)": _per_image(crop),
        "JPEG (q 10-75)": _per_image(jpeg),
        "combination (each p = 0.5)": lambda x, g: A.random_combination(x, 0.5, generator=g),
    }


# which immunised model answers each attack (the noise readings share the std model, the stronger one)
DEFENCE_OF = {"noise (std 5-20/255)": "noise (std 5-20/255)", "noise (variance 5-20, 8-bit scale)": "noise (std 5-20/255)",
              "blur (k 1-9)": "blur (k 1-9)", "crop (80-95 %, random offset)": "crop (80-95 %, random offset)",
              "JPEG (q 10-75)": "JPEG (q 10-75)", "combination (each p = 0.5)": "combination (each p = 0.5)"}


def _attacked(x: torch.Tensor, attack, seed: int, key: str) -> torch.Tensor:
    from ..seeding import generator

    g = generator(seed, "attribution-attack", key)
    out = []
    for s in range(0, x.shape[0], 64):
        out.append((attack(x[s:s + 64].float() / 255.0, g).clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def immunisation(args, prof, cache, ae, specs, skip) -> dict:
    key = {"sources": [s.key() for s in specs], "prof": _pk(prof, "immunise_epochs", "baseline_train"), "seed": args.seed}

    def work():
        from ..attribution import Attributor, TrainConfig
        from ..attribution.baselines import PRNU

        data = Data(cache, specs, prof)
        clean = train_classifier(args, ae, "A", data, prof["epochs"])
        xte, yte = data.test
        xtr, ytr = data.train
        atk = attacks()
        attacked = {n: _attacked(xte, f, args.seed, n) for n, f in atk.items()}
        res = {"clean_accuracy": _acc(clean.scores(xte)[1], yte), "attacks": {}}
        prnu = PRNU().fit(*Data.cap(xtr, ytr, prof["baseline_train"]))
        res["prnu_clean"] = _acc(prnu.predict(xte), yte)
        defended = {}
        for n in dict.fromkeys(DEFENCE_OF.values()):
            imm = Attributor(data.names, ae.id, clean.net.config)
            imm.net.load_state_dict(clean.net.state_dict())
            cfg = TrainConfig(epochs=prof["immunise_epochs"], lr=3e-4, max_seconds=_remaining(args))
            tag = "immunise-" + "".join(ch for ch in n if ch.isalnum())
            imm.fit(xtr, ytr, cfg, seed=args.seed, attack=atk[n],
                    checkpoint=args.out / "classifiers" / f"ckpt-{tag}.safetensors", tag=tag, progress=_log)
            if not imm.training_["complete"]:
                raise _Budget(f"immunisation {n}")
            defended[n] = imm
        from ..seeding import generator

        for n, f in atk.items():
            d = defended[DEFENCE_OF[n]]
            p_imm = PRNU(transform=f).fit(*Data.cap(xtr, ytr, prof["baseline_train"]),
                                          generator=generator(args.seed, "prnu-immunise", n))
            res["attacks"][n] = {
                "atk": _acc(clean.scores(attacked[n])[1], yte), "dfs": _acc(d.scores(attacked[n])[1], yte),
                "dfs_clean": _acc(d.scores(xte)[1], yte), "prnu_atk": _acc(prnu.predict(attacked[n]), yte),
                "prnu_dfs": _acc(p_imm.predict(attacked[n]), yte), "defence": DEFENCE_OF[n],
                "fine_tune_seconds": d.training_["seconds"]}
        return res

    return _stage(args, "immunise", key, work)


# -------------------------------------------------------------------------------- components
def components(args, prof, cache, ae, specs) -> dict:
    from ..attribution import NetConfig

    variants = [NetConfig()] + [NetConfig(band=b, factor=f) for f in prof["factors"] for b in ("low", "high")] + [
        NetConfig(pool_after=k) for k in prof["pools"]]
    key = {"sources": [s.key() for s in specs], "prof": _pk(prof, "component_epochs", "factors", "pools"),
           "seed": args.seed}

    def work():
        data = Data(cache, specs, prof)
        out = []
        for v in variants:
            tag = "component-" + v.label().replace(" ", "")
            att = train_classifier(args, ae, tag, data, prof["component_epochs"], v, tag=tag)
            x, y = data.test
            out.append({"variant": v.label(), "band": v.band, "factor": v.factor, "patch": v.patch,
                        "resolution": 128 // v.factor, "accuracy": _acc(att.scores(x)[1], y),
                        "train_seconds": att.training_["seconds"]})
        return out

    return _stage(args, "components", key, work)


# -------------------------------------------------------------------------------- open set
def open_set(args, prof, cache, ae, specs, roles) -> dict:
    from ..attribution.evaluation import rate_with_bound

    held = [s for s in specs if s.name == args.held_out]
    if not held:
        raise SystemExit(f"--held-out {args.held_out!r} is not a setup A source: {[s.name for s in specs]}")
    known = [s for s in specs if s.name != args.held_out]
    unseen = held + roles["unseen"]
    key = {"known": [s.key() for s in known], "unseen": [s.key() for s in unseen], "prof": _pk(prof), "seed": args.seed}

    def work():
        data = Data(cache, known, prof)
        att = train_classifier(args, ae, "openset", data, prof["epochs"], tag="openset-" + args.held_out)
        xte, yte = data.test
        xcal, ycal = data.cal
        out = {"known": data.names, "held_out": args.held_out, "scores": {}}
        for score in ("centroid", "softmax"):
            att.score = score
            thr = att.calibrate(xcal, ycal, coverage=0.95)
            _, pred, s = att.scores(xte)
            acc_mask = s >= thr
            row = {"threshold": thr, "coverage_known_test": float(acc_mask.double().mean()),
                   "accuracy_accepted": _acc(pred[acc_mask], yte[acc_mask]) if acc_mask.any() else None,
                   "unseen": {}}
            kk = nn = 0
            for u in unseen:
                xu = cache.images(u, "test", prof["test"])
                _, _, su = att.scores(xu)
                k = int((su >= thr).sum())
                row["unseen"][u.name] = rate_with_bound(k, int(xu.shape[0]))
                kk, nn = kk + k, nn + int(xu.shape[0])
            row["pooled"] = rate_with_bound(kk, nn)
            out["scores"][score] = row
        best = min(out["scores"], key=lambda sc: (out["scores"][sc]["pooled"]["upper95"], sc))
        out["chosen_score"] = best
        return out

    return _stage(args, "openset", key, work)


def shipped_classifier(args, prof, cache, ae, specs, roles, results) -> dict:
    """A-rt's classifier, calibrated, with its measured error rates, written to OUT."""
    from ..attribution.evaluation import rate_with_bound

    key = {"sources": [s.key() for s in specs], "prof": _pk(prof), "seed": args.seed,
           "score": (results.get("openset") or {}).get("chosen_score", "centroid"),
           "unseen": [s.key() for s in roles["unseen"] + roles["extra"]], "openset": results.get("openset"),
           "immunise": results.get("immunise")}

    def work():
        data = Data(cache, specs, prof)
        att = train_classifier(args, ae, "A", data, prof["epochs"])
        att.score = key["score"]
        xcal, ycal = data.cal
        thr = att.calibrate(xcal, ycal, coverage=0.95)
        xte, yte = data.test
        _, pred, s = att.scores(xte)
        ok = s >= thr
        rates = {"setup": "A (architectures, real = TAEF2 round trips)", "test_accuracy": _acc(pred, yte),
                 "n_test": int(xte.shape[0]), "coverage_known": float(ok.double().mean()),
                 "accuracy_when_answered": _acc(pred[ok], yte[ok]) if ok.any() else None,
                 "per_source_accuracy": {n: _acc(pred[yte == c], yte[yte == c]) for c, n in enumerate(data.names)},
                 "unseen": {}, "extra": {}}
        for u in roles["unseen"]:
            xu = cache.images(u, "test", prof["test"])
            _, _, su = att.scores(xu)
            rates["unseen"][u.name] = rate_with_bound(int((su >= thr).sum()), int(xu.shape[0]))
        for u in roles["extra"]:
            try:
                xu = cache.images(u, "test", prof["test"])
            except Exception as e:  # an optional source that cannot be made here
                rates["extra"][u.name] = {"error": f"{e.__class__.__name__}: {e}"}
                continue
            out = att.attribute(xu)
            counts = {}
            for a in out:
                counts[a.source] = counts.get(a.source, 0) + 1
            rates["extra"][u.name] = {"n": len(out), "answers": counts}
        op = results.get("openset")
        if op:
            rates["open_set_held_out"] = {"held_out": op["held_out"], **op["scores"][op["chosen_score"]]["pooled"]}
        imm = results.get("immunise")
        if imm:
            rates["robustness_clean_model"] = {n: v["atk"] for n, v in imm["attacks"].items()}
        rates["note"] = ("measured by python -m faceprint.bench attribute on faces of faceprint's models fitted on "
                         "celeba-1k; other models, photos or edits are outside what was measured")
        att.error_rates_ = rates
        path = args.out / "attribute-classifier.safetensors"
        att.save(path)
        # inference cost on one thread
        torch.set_num_threads(1)
        x1 = xte[:64]
        att.scores(x1[:4])
        t0 = time.perf_counter()
        for i in range(32):
            att.scores(x1[i:i + 1])
        one = (time.perf_counter() - t0) / 32 * 1000
        t0 = time.perf_counter()
        att.scores(x1)
        batch = (time.perf_counter() - t0) / x1.shape[0] * 1000
        torch.set_num_threads(max(1, args.threads))
        return {"error_rates": rates, "threshold": thr, "score": att.score, "file": path.name,
                "ms_per_face_batch1_1thread": one, "ms_per_face_batch64_1thread": batch}

    return _stage(args, "classifier", key, work)


# -------------------------------------------------------------------------------- report
def _p(v, d=2) -> str:
    return "-" if v is None else f"{100 * v:.{d}f}"


def _bound(r) -> str:
    if not r or r.get("n", 0) == 0:
        return "-"
    return f"{r['k']}/{r['n']} = {_p(r['rate'])} % (95 % bound {_p(r['upper95'])} %)"


def write_results(args, results) -> None:
    import io
    from contextlib import redirect_stdout

    from ..attribution.evaluation import chance_band

    buf = io.StringIO()
    st = results["settings"]
    with redirect_stdout(buf):
        print("# Learned attribution without a fingerprint (papers/004 ch. 4) - `python -m faceprint.bench attribute`\n")
        print("Generated by `python -m faceprint.bench attribute`; every figure is in attribute.json. Accuracies in %.")
        if st["profile"] != "full" or results["machine"].get("timings", "").startswith("contended"):
            print(f"\n**{st['profile'].capitalize()} profile** ({st['train']} train / {st['cal']} cal / {st['test']} test "
                  f"faces per source, {st['epochs']} epochs). " + (
                      "Timings contended (other jobs on the 2 cores). " if results["machine"].get("timings", "")
                      .startswith("contended") else "") + "The full run: `python -m faceprint.bench attribute --resume "
                  "--publish docs/results`.")
        if results.get("incomplete"):
            print(f"\n**Incomplete**: stopped after {results['incomplete']} (--minutes); run again with --resume.")
        print_table("Machine and settings", ["item", "value"],
                    [[k, v] for k, v in results["machine"].items()] + [[k, v] for k, v in st.items()])
        titles = {"A": "Table 4.1 analog: architectures, real = TAEF2 round trips",
                  "A-raw": "Table 4.1 analog: architectures, real = raw photos (the chapter's setting)",
                  "B": "Table 4.2 analog: training sets (LR-GMM-NN on celeba-1k with i photos swapped)",
                  "C": "Table 4.3 analog: EM seeds of LR-GMM-NN",
                  "sanity": "Sanity: the same model (EM seed 0) twice, disjoint sampling seeds"}
        for name, title in titles.items():
            r = results.get("setups", {}).get(name)
            if not r:
                continue
            L = r["learned"]
            k = len(r["sources"])
            rows = [["learned classifier (ours)", _p(L["accuracy"]), f"{L['fd_ratio']['ratio']:.2f}",
                     f"{L['n_train']} / {L['n_test']}", f"{L['train_seconds'] / 60:.1f} min"]]
            for bn, b in (r.get("baselines") or {}).items():
                rows.append([bn, _p(b["accuracy"]), f"{b['fd_ratio']['ratio']:.2f}" if "fd_ratio" in b else "-",
                             f"{b['n_train']} / {b['n_test']}", f"{b['seconds']:.0f} s"])
            lo, hi = chance_band(k, L["n_test"])
            print_table(f"{title} ({k} sources; chance {100 / k:.1f} %, 3-sigma band {100 * lo:.1f}-{100 * hi:.1f} %)",
                        ["method", "test accuracy", "FD ratio", "train / test images", "time"], rows)
            print("\nPer source (learned): " + "; ".join(f"{n} {_p(v, 1)}" for n, v in L["per_source"].items()))
        comp = results.get("components")
        if comp:
            rows = [[c["variant"], c["resolution"] if c["band"] != "full" else 128, c["patch"] or "-",
                     _p(c["accuracy"]), f"{c['train_seconds'] / 60:.1f} min"] for c in comp]
            print_table("Tables 4.4 / 4.5 analogs on setup A (round trip), each trained "
                        f"{st['component_epochs']} epochs; L-f = below 128/f px, H-f = the octave between 128/(f/2) "
                        "and 128/f px", ["variant", "resolution", "patch px", "test accuracy", "time"], rows)
            verdict = results.get("frequency_verdict")
            if verdict:
                print("\n" + verdict)
        imm = results.get("immunise")
        if imm:
            rows = [[n, _p(v["atk"]), _p(v["dfs"]), _p(v["dfs_clean"]), _p(v["prnu_atk"]), _p(v["prnu_dfs"]),
                     f"{v['dfs'] / imm['clean_accuracy']:.2f}"] for n, v in imm["attacks"].items()]
            print_table(f"Table 4.7 analog on setup A (round trip): clean accuracy {_p(imm['clean_accuracy'])}, PRNU "
                        f"{_p(imm['prnu_clean'])}; Atk = clean classifier on attacked test faces, Dfs = fine-tuned "
                        f"{st['immunise_epochs']} epochs on attacked training faces", ["attack", "ours Atk", "ours Dfs",
                                                                                       "Dfs model on clean", "PRNU Atk",
                                                                                       "PRNU Dfs", "Dfs / clean"], rows)
        op = results.get("openset")
        if op:
            rows = []
            for sc, r in op["scores"].items():
                rows.append([sc + (" (chosen)" if sc == op["chosen_score"] else ""), f"{r['threshold']:.4f}",
                             _p(r["coverage_known_test"]), _p(r["accuracy_accepted"])] +
                            [_bound(v) for v in r["unseen"].values()] + [_bound(r["pooled"])])
            unseen_names = list(next(iter(op["scores"].values()))["unseen"])
            print_table(f"Open set: classifier trained without {op['held_out']!r}, threshold at 95 % coverage of the "
                        "known sources' held-out cal split; false attribution = unseen images answered with a known "
                        "source", ["score", "threshold", "coverage (known test)", "accuracy when answered"] +
                        [f"false attribution: {n}" for n in unseen_names] + ["pooled"], rows)
        cl = results.get("classifier")
        if cl:
            er = cl["error_rates"]
            rows = [["test accuracy (all answered)", _p(er["test_accuracy"])],
                    ["coverage of known sources at the threshold", _p(er["coverage_known"])],
                    ["accuracy when answered", _p(er["accuracy_when_answered"])]]
            rows += [[f"false attribution, {n}", _bound(v)] for n, v in er["unseen"].items()]
            rows += [[f"answers for {n}", json.dumps(v.get("answers", v))] for n, v in er["extra"].items()]
            rows += [["inference, 1 thread, batch 1", f"{cl['ms_per_face_batch1_1thread']:.1f} ms/face"],
                     ["inference, 1 thread, batch 64", f"{cl['ms_per_face_batch64_1thread']:.1f} ms/face"]]
            print_table(f"The classifier `faceprint attribute` reads (OUT/{cl['file']}, setup A round trip, score "
                        f"{cl['score']}, threshold {cl['threshold']:.4f})", ["measure", "value"], rows)
        costs = results.get("costs")
        if costs:
            print_table("Costs", ["item", "value"], [[k, v] for k, v in costs.items()])
        print_table("Acceptance of issue 17 part 1 (computed from the numbers above)", ["criterion", "value", "met"],
                    acceptance(results))
    from .machine import write_results as _write

    _write(args.out, "attribute", buf.getvalue(), results, args.publish)


def acceptance(results) -> list[list]:
    from ..attribution.evaluation import chance_band

    rows = []

    def add(name, value, ok):
        rows.append([name, value, "-" if ok is None else ("yes" if ok else "NO")])

    A = results.get("setups", {}).get("A")
    if A:
        acc = A["learned"]["accuracy"]
        add("setup A (round trip) test accuracy >= 95 %", _p(acc), acc >= 0.95)
        best = max(((n, b["accuracy"]) for n, b in (A.get("baselines") or {}).items()), key=lambda t: t[1], default=None)
        if best:
            add("above every baseline", f"{_p(acc)} vs {best[0]} {_p(best[1])}", acc > best[1])
        inc = (A.get("baselines") or {}).get("Inception pool3 + logistic regression")
        if inc:
            add("FD ratio of the learned fingerprint > Inception's",
                f"{A['learned']['fd_ratio']['ratio']:.2f} vs {inc['fd_ratio']['ratio']:.2f}",
                A["learned"]["fd_ratio"]["ratio"] > inc["fd_ratio"]["ratio"])
        t = A["learned"]["train_seconds"]
        add("training <= 30 min per setup (setup A)", f"{t / 60:.1f} min", t <= 1800)
    S = results.get("setups", {}).get("sanity")
    if S:
        lo, hi = chance_band(2, S["learned"]["n_test"])
        a = S["learned"]["accuracy"]
        add("same-seed sanity within chance +- 3 sigma", f"{_p(a)} (band {_p(lo, 1)}-{_p(hi, 1)})", lo <= a <= hi)
    imm = results.get("immunise")
    if imm:
        c = imm["clean_accuracy"]
        for n, v in imm["attacks"].items():
            need = 0.9 if n.startswith(("blur", "crop")) else 0.8 if n.startswith(("JPEG", "noise")) else None
            if need is None:
                add(f"after immunisation, {n} (reported)", _p(v["dfs"]), None)
            else:
                add(f"after immunisation, {n} >= {need} x clean", f"{v['dfs'] / c:.3f} x", v["dfs"] >= need * c)
    op = results.get("openset")
    if op:
        r = op["scores"][op["chosen_score"]]["pooled"]
        add("open set: false attribution <= 1 % (95 % bound)", _bound(r), r["upper95"] is not None and r["upper95"] <= 0.01)
    cl = results.get("classifier")
    if cl:
        add("<= 20 ms per image (1 thread, batch 1)", f"{cl['ms_per_face_batch1_1thread']:.1f} ms",
            cl["ms_per_face_batch1_1thread"] <= 20)
    return rows


def frequency_verdict(comp) -> str | None:
    by = {(c["band"], c["factor"]): c["accuracy"] for c in comp}
    pairs = [(f, by[("low", f)], by[("high", f)]) for (b, f) in by if b == "low" and ("high", f) in by]
    if not pairs:
        return None
    pairs.sort()
    hi_wins = [f for f, lo, hi in pairs if hi > lo]
    words = "; ".join(f"x{f}: L-f {_p(lo)} vs H-f {_p(hi)}" for f, lo, hi in pairs)
    if len(hi_wins) == len(pairs):
        v = "holds here: at every factor the high band carried more"
    elif not hi_wins:
        v = ("inverts here: at every factor the low band carried more (the decoder, shared by every source, makes "
             "the high frequencies; the models differ in latent space, at 8 px and coarser)")
    else:
        v = f"is mixed here: the high band carried more at factors {hi_wins} only"
    return f"The chapter's finding (at the same resolution, high frequencies carry more) {v}. ({words})"


# -------------------------------------------------------------------------------- main
def run(args) -> int:
    from ..attribution.sources import SourceCache
    from ..autoencoder import TAEF2

    _T0[0] = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    prof = _profile(args)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    ae = TAEF2.load(args.weights)
    roles = sources(args, prof)
    cache = SourceCache(args.out / "sources", _datasets(args), ae, seed=args.seed, log=_log)
    settings = {**prof, "seed": args.seed, "held_out": args.held_out, "skip": sorted(skip),
                "gan": args.gan.name if args.gan else None}
    machine = describe({"timings": "contended (other jobs ran)" if args.contended else "as measured"})
    results = {"machine": machine, "settings": settings, "setups": {}}
    try:
        results["setups"]["A"] = run_setup(args, prof, cache, ae, "A", roles["A"], provenance=True, skip=skip)
        if "raw" not in skip:
            results["setups"]["A-raw"] = run_setup(args, prof, cache, ae, "A-raw", roles["A-raw"], provenance=False,
                                                   skip=skip | {"inception"})
        if "B" not in skip:
            results["setups"]["B"] = run_setup(args, prof, cache, ae, "B", roles["B"], provenance=True, skip=skip)
        if "C" not in skip:
            results["setups"]["C"] = run_setup(args, prof, cache, ae, "C", roles["C"], provenance=True, skip=skip)
        if "sanity" not in skip:
            results["setups"]["sanity"] = run_setup(args, prof, cache, ae, "sanity", roles["sanity"], provenance=False,
                                                    skip=skip, baselines=False)
        if "components" not in skip:
            results["components"] = components(args, prof, cache, ae, roles["A"])
            results["frequency_verdict"] = frequency_verdict(results["components"])
        if "immunise" not in skip:
            results["immunise"] = immunisation(args, prof, cache, ae, roles["A"], skip)
        if "openset" not in skip:
            results["openset"] = open_set(args, prof, cache, ae, roles["A"], roles)
        results["classifier"] = shipped_classifier(args, prof, cache, ae, roles["A"], roles, results)
    except _Budget as b:
        results["incomplete"] = str(b)
        _log(f"--minutes {args.minutes:g} spent after {b}: writing what is done; run again with --resume to continue")
    costs = {}
    A = results["setups"].get("A")
    if A:
        costs["source caching, setup A (all runs, s)"] = f"{sum(A['cache_seconds'].values()):.0f}"
        for n, s in A["cache_seconds"].items():
            costs[f"  {n}"] = f"{s:.0f} s"
    for n, r in results["setups"].items():
        costs[f"training, setup {n}"] = f"{r['learned']['train_seconds'] / 60:.1f} min ({r['learned']['epochs']} epochs)"
    from ..attribution.network import NetConfig, multiply_adds

    costs["network"] = f"{multiply_adds(NetConfig()) / 1e6:.0f} M multiply-adds per 128 px face"
    costs["wall time of this call (s)"] = f"{time.perf_counter() - _T0[0]:.0f}"
    results["costs"] = costs
    write_results(args, results)
    return 0
