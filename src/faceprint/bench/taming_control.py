"""The rebalance and coverage parts of `python -m faceprint.bench taming`.

rebalance: one model on celeba-10k files 1-``--train-n``; Male = 0.5, then Eyeglasses = 0.3, each
  from the original model; one model on ``--train-n`` utkface photos (seeded random choice, the rest
  held out as reference), race = uniform. Shares of the generated faces are measured with
  faceprint's attribute classifiers on the decoded faces (encoded again, as any image would be),
  uncorrected and corrected with the classifiers' held-out round-trip error rates.
coverage: the same models; ``include`` of celeba subgroups under 6% of the training photos (Bald,
  Gray_Hair, Wearing_Hat) and of utkface race black; per-subgroup recall, coverage and mean
  distance from each held-out real photo of the subgroup to its nearest generated face
  (Inception features), before and after, like papers/004 Table 7.3.
"""

from __future__ import annotations

import csv
import time

import numpy as np
import torch

from .machine import print_table

CELEBA_SUBGROUPS = ("Bald", "Gray_Hair", "Wearing_Hat")
UTK_SUBGROUPS = (("race", "black"),)
_MODELS: dict = {}


def _generate(gen, n, seed, batch, inc, clf, ae):
    """n faces -> (Inception features, {task: predicted class indices})."""
    feats, preds = [], {}
    for s in range(0, n, batch):
        m = min(batch, n - s)
        smp = gen.sample_latents(m, seed=seed, start=s)
        imgs = gen.autoencoder.decode(smp.latents)
        feats.append(inc.features(imgs))
        for k, v in clf.classify(imgs, autoencoder=ae).items():
            preds.setdefault(k, []).append(v)
    return np.concatenate(feats), {k: torch.cat(v) for k, v in preds.items()}


def _features(files, inc, batch):
    from .taming import cached_features

    return cached_features(files, inc, batch)


def _model(name, args, ds, ae, inc, ref):
    """Fit (once) the dataset's model; return a dict with the generator, labels, reference set."""
    from ..latent.generator import Generator, GeneratorConfig
    from ..recognition.attributes import load_classifier
    from .taming import _Photos

    key = (name, args.train_n, args.seed, args.n)
    if key in _MODELS:
        return _MODELS[key]
    if name == "celeba":
        rows = list(csv.DictReader(open(ds / "celeba-10k" / "attributes.csv")))
        train_rows = rows[: args.train_n]
        ref_rows = rows[5000: 5000 + len(ref)]
        files = [ds / "celeba-10k" / "images" / r["file"] for r in train_rows]
        ref_feats = ref
        clf = load_classifier("celeba")
        labels = {a: ["yes" if r[a] == "1" else "no" for r in train_rows] for a in rows[0] if a not in ("file", "identity")}
        ref_labels = {a: ["yes" if r[a] == "1" else "no" for r in ref_rows] for a in rows[0] if a not in ("file", "identity")}
    else:
        rows = [r for r in csv.DictReader(open(ds / "utkface" / "labels.csv")) if r["race"] and r["gender"]]
        order = np.random.default_rng(args.seed).permutation(len(rows))
        train_rows = [rows[i] for i in order[: args.train_n]]
        ref_rows = [rows[i] for i in order[args.train_n: args.train_n + args.reference_n]]
        files = [ds / "utkface" / "images" / r["file"] for r in train_rows]
        t0 = time.perf_counter()
        ref_feats = _features([ds / "utkface" / "images" / r["file"] for r in ref_rows], inc, args.batch)
        print(f"  utkface reference features: {len(ref_feats)} photos in {time.perf_counter() - t0:.0f} s", flush=True)
        clf = load_classifier("utkface")
        labels = {"race": [r["race"] for r in train_rows], "gender": [r["gender"] for r in train_rows]}
        ref_labels = {"race": [r["race"] for r in ref_rows], "gender": [r["gender"] for r in ref_rows]}
    ls = _Photos(files, ds, ae)
    t0 = time.perf_counter()
    gen = Generator(GeneratorConfig(), autoencoder=ae).fit(ls, seed=args.seed)
    fit = time.perf_counter() - t0
    print(f"  {name}: fitted K = {gen.mixture_.weights_.numel()} on {len(files)} photos in {fit:.1f} s", flush=True)
    F, P = _generate(gen, args.n, args.seed, args.batch, inc, clf, ae)
    out = {"name": name, "gen": gen, "labels": labels, "ref": ref_feats, "ref_labels": ref_labels, "clf": clf,
           "F": F, "P": P, "fit_seconds": fit, "train_n": len(files)}
    _MODELS[key] = out
    return out


def _quality(F, ref):
    from .taming import _quality as q

    return q(F, ref)


def _shares(clf, task, pred):
    """(raw, corrected) share vectors of the classes of ``task`` among predictions."""
    t = clf.task(task)
    raw = np.bincount(pred.numpy(), minlength=len(t.classes)) / len(pred)
    if t.binary:
        cor = np.array([1 - clf.corrected_rate(task, raw[1]), clf.corrected_rate(task, raw[1])])
    else:
        cor = np.asarray(clf.corrected_rate(task, raw))
    return raw, cor


# ------------------------------------------------------------------------------------------ rebalance
def run_rebalance(args, ds, ae, inc, ref) -> dict:
    from ..taming import rebalance

    cases = [("celeba", {"Male": {"yes": 0.5}}), ("celeba", {"Eyeglasses": {"yes": 0.3}}),
             ("utkface", {"race": "uniform"})]
    rows = []
    for name, req in cases:
        m = _model(name, args, ds, ae, inc, ref)
        clf, gen = m["clf"], m["gen"]
        (attr, spec), = req.items()
        t0 = time.perf_counter()
        g2, rep = rebalance(gen, m["labels"], req, source=f"{name} label table")
        secs = time.perf_counter() - t0
        F1, P1 = _generate(g2, args.n, args.seed, args.batch, inc, clf, ae)
        q0, q1 = _quality(m["F"], m["ref"]), _quality(F1, m["ref"])
        classes = list(clf.task(attr).classes)
        raw0, cor0 = _shares(clf, attr, m["P"][attr])
        raw1, cor1 = _shares(clf, attr, P1[attr])
        vals = [v for v in classes if spec == "uniform" or v in spec]
        data = {v: float(np.mean([x == v for x in m["labels"][attr]])) for v in classes}
        for v in vals:
            i = classes.index(v)
            rows.append({
                "dataset": name, "attribute": attr, "value": v, "requested": rep.targets[attr][v],
                "data_share": data[v], "model_before": rep.shares_before[attr][v],
                "model_after": rep.shares_after[attr][v],
                "measured_before": float(raw0[i]), "corrected_before": float(cor0[i]),
                "measured_after": float(raw1[i]), "corrected_after": float(cor1[i]),
                "error_pp": 100 * abs(float(cor1[i]) - rep.targets[attr][v]),
                "quality_before": q0, "quality_after": q1, "seconds": secs, "fit_seconds": m["fit_seconds"],
                "components": [rep.components_before, rep.components_after], "kl": rep.kl,
            })
            print(f"  {name} {attr}={v}: requested {rep.targets[attr][v]:.3f}, measured {raw1[i]:.3f}, corrected "
                  f"{cor1[i]:.3f} (before {cor0[i]:.3f}); FID {q0['fid']:.2f} -> {q1['fid']:.2f}", flush=True)
    return {"n": args.n, "rows": rows,
            "classifier_rates": {"celeba": {a: _model("celeba", args, ds, ae, inc, ref)["clf"].metrics_roundtrip_[a]
                                            for a in ("Male", "Eyeglasses")},
                                 "utkface": {"race": _model("utkface", args, ds, ae, inc, ref)["clf"].metrics_roundtrip_["race"]}}}


def corrected_interval(measured, confusion, support, n: int, *, draws: int = 4000, seed: int = 0):
    """95% interval of classifier-corrected class shares (:func:`correct_proportions`), by a
    parametric bootstrap over both error sources: the n classified faces (multinomial on the
    measured shares) and the held-out photos the confusion rates were measured on (multinomial
    per true class, ``support`` photos each). Returns (low, high), each (C,)."""
    m = np.asarray(measured, dtype=np.float64)
    C = np.asarray(confusion, dtype=np.float64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        mb = rng.multinomial(n, m / m.sum()) / n
        Cb = np.stack([rng.multinomial(int(s), row / row.sum()) / max(int(s), 1) for row, s in zip(C, support)])
        try:
            out.append(np.linalg.solve(Cb.T, mb))
        except np.linalg.LinAlgError:
            continue
    q = np.percentile(np.asarray(out), [2.5, 97.5], axis=0)
    return q[0], q[1]


def _intervals(res) -> dict:
    """(dataset, attribute, value) -> 95% interval of the corrected share after rebalancing."""
    rates = res.get("classifier_rates", {})
    groups: dict = {}
    for r in res["rows"]:
        groups.setdefault((r["dataset"], r["attribute"]), []).append(r)
    out = {}
    for (ds, attr), rs in groups.items():
        cr = rates.get(ds, {}).get(attr)
        if cr is None:
            continue
        classes = list(cr["classes"])
        m = {r["value"]: r["measured_after"] for r in rs}
        if len(classes) == 2 and len(m) == 1:  # binary: the other class has the rest
            (v, x), = m.items()
            m[[c for c in classes if c != v][0]] = 1 - x
        if set(m) != set(classes):
            continue  # not every class's share is known
        lo, hi = corrected_interval([m[c] for c in classes], cr["confusion"], cr["support"], res["n"])
        for i, c in enumerate(classes):
            out[(ds, attr, c)] = (float(lo[i]), float(hi[i]))
    return out


def rebalance_tables(res) -> None:
    rows = []
    ci = _intervals(res)
    for r in res["rows"]:
        lo, hi = ci.get((r["dataset"], r["attribute"], r["value"]), (float("nan"), float("nan")))
        inside = "yes" if lo <= r["requested"] <= hi else ("no" if lo == lo else "?")
        rows.append([r["dataset"], f"{r['attribute']}={r['value']}", f"{r['data_share']:.3f}",
                     f"{r['requested']:.3f}", f"{r['model_before']:.3f} -> {r['model_after']:.3f}",
                     f"{r['measured_before']:.3f} -> {r['measured_after']:.3f}",
                     f"{r['corrected_before']:.3f} -> {r['corrected_after']:.3f}", f"[{lo:.3f}, {hi:.3f}]", inside,
                     f"{r['error_pp']:.1f}",
                     f"{r['quality_before']['fid']:.2f} -> {r['quality_after']['fid']:.2f}",
                     f"{r['quality_before']['recall']:.3f} -> {r['quality_after']['recall']:.3f}",
                     f"{r['seconds'] * 1000:.0f} ms ({100 * r['seconds'] / r['fit_seconds']:.1f}% of fit)"])
    print_table(f"Rebalancing ({res['n']} faces per model; shares measured by the attribute classifier on the "
                "decoded faces, corrected with its round-trip error rates; the interval is a bootstrap over the "
                "faces and the held-out photos behind the rates)",
                ["data", "request", "training photos", "requested", "model's own share before -> after",
                 "measured before -> after", "corrected before -> after", "corrected after, 95% interval",
                 "request inside", "|corrected - requested| (pp)",
                 "FID before -> after", "recall", "time"], rows)


# ------------------------------------------------------------------------------------------ coverage
def _coverage_rows(m, F_before, F_after, groups, clf, P_before, P_after):
    from ..metrics.coverage import subgroup_coverage

    out = []
    for name, (attr, val) in groups.items():
        mask = np.array([x == val for x in m["ref_labels"][attr]])
        real = m["ref"][mask]
        cb = subgroup_coverage(real, F_before)
        ca = subgroup_coverage(real, F_after)
        row = {"subgroup": name, "train_share": float(np.mean([x == val for x in m["labels"][attr]])),
               "reference_photos": int(mask.sum()), "before": cb.as_dict(), "after": ca.as_dict()}
        if attr in P_before:
            i = list(clf.task(attr).classes).index(val)
            row["classified_before"] = float(_shares(clf, attr, P_before[attr])[1][i])
            row["classified_after"] = float(_shares(clf, attr, P_after[attr])[1][i])
        out.append(row)
    return out


def run_coverage(args, ds, ae, inc, ref) -> dict:
    from ..taming import include

    res = {"n": args.n, "datasets": []}
    for name, groups in (("celeba", {g: (g, "yes") for g in CELEBA_SUBGROUPS}),
                         ("utkface", {f"{a}:{v}": (a, v) for a, v in UTK_SUBGROUPS})):
        m = _model(name, args, ds, ae, inc, ref)
        clf, gen = m["clf"], m["gen"]
        members = {g: [x == v for x in m["labels"][a]] for g, (a, v) in groups.items()}
        t0 = time.perf_counter()
        g2, rep = include(gen, members, source=f"{name} label table")
        secs = time.perf_counter() - t0
        F1, P1 = _generate(g2, args.n, args.seed, args.batch, inc, clf, ae)
        q0, q1 = _quality(m["F"], m["ref"]), _quality(F1, m["ref"])
        rows = _coverage_rows(m, m["F"], F1, groups, clf, m["P"], P1)
        for r in rows:
            r["model_share_before"] = rep.share_before[r["subgroup"]]
            r["model_share_after"] = rep.share_after[r["subgroup"]]
        res["datasets"].append({"dataset": name, "train_n": m["train_n"], "quality_before": q0, "quality_after": q1,
                                "seconds": secs, "fit_seconds": m["fit_seconds"], "rows": rows,
                                "components": [rep.components_before, rep.components_after]})
        print(f"  {name}: include {', '.join(groups)} in {secs * 1000:.0f} ms; FID {q0['fid']:.2f} -> {q1['fid']:.2f}",
              flush=True)
    return res


def coverage_tables(res) -> None:
    rows = []
    for d in res["datasets"]:
        for r in d["rows"]:
            b, a = r["before"], r["after"]
            cls = (f"{r['classified_before']:.3f} -> {r['classified_after']:.3f}" if "classified_before" in r else "-")
            rows.append([d["dataset"], r["subgroup"], f"{r['train_share']:.3f}", r["reference_photos"],
                         f"{r['model_share_before']:.3f} -> {r['model_share_after']:.3f}", cls,
                         f"{b['recall']:.3f} -> {a['recall']:.3f}", f"{b['coverage']:.3f} -> {a['coverage']:.3f}",
                         f"{b['nn_distance_mean']:.2f} -> {a['nn_distance_mean']:.2f}"])
        rows.append([d["dataset"], "(all photos)", "1.000", "", "", "",
                     f"{d['quality_before']['recall']:.3f} -> {d['quality_after']['recall']:.3f}",
                     f"FID {d['quality_before']['fid']:.2f} -> {d['quality_after']['fid']:.2f}",
                     f"precision {d['quality_before']['precision']:.3f} -> {d['quality_after']['precision']:.3f}"])
    print_table(f"Minority coverage before -> after include ({res['n']} faces per model; held-out real photos of "
                "each subgroup; Inception features)",
                ["data", "subgroup", "training share", "held-out photos", "model's share", "classified share (corrected)",
                 "recall", "coverage", "mean distance to nearest generated (IvOM analogue)"], rows)
