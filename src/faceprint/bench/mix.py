"""`python -m faceprint.bench mix`: the Texture Mixer's evaluation (papers/004, ch. 3, Sec. 3.4,
Table 3.1) and the face uses of issue 15, on this machine.

Stages (each cached in ``--out``, outside the repository, so an interrupted run resumes with
``--resume``; every stage is seeded by ``--seed``):

1. data: celeba-id split by person (32 test people); 64 x 64 hair/background crops (3 per photo)
   and 64 x 128 top-band crops (1 per photo) of each side; TAEF2 latents of the training crops.
2. train: the mixer and its three ablations (no z^g, no blending, no shuffling), each
   ``--steps`` steps (resumable checkpoints; ``--minutes`` bounds one call), one torch thread
   each unless told otherwise. ``--train-only --model NAME`` runs one of them (for background
   runs in parallel).
3. classifiers: the seam and repetition classifiers by the chapter's recipe (Sec. 3.4.2) on the
   training crops; held-out accuracy on the test crops.
4. canvas: ``--pairs`` random pairs of test crops at both ends of a 64 x 512 canvas, filled by
   each row: naive pixel alpha blend, plain TAEF2 latent blend, patch-based fill from the two
   sources (faceprint's NN refiner, seam rule, restricted to the two tiled sources: the Image
   Melding analog), ours and the three ablations. Metrics (faceprint.mixing.evaluation): side
   fidelity 1 - SSIM (and the TAEF2 round trip's, the ceiling), CGD and CCD (TAEF2-encoder
   Gram), CSS and CRS, CSWD, centre KID (Inception pool3), seconds per canvas.
5. faces: ``--face-pairs`` pairs of test-person photos at 128 px, hybrid (left A, right B,
   32 px band): seam score on the band, KID against real test photos, SSIM outside the band to
   each source's TAEF2 round trip; rows pixel / latent / ours.
6. speed: a 64 x 512 canvas and a 128 px face mix, median of repeated runs.

Results: ``OUT/mix.md`` and ``OUT/mix.json`` (machine, versions, seed, every figure, no machine
paths); ``--publish DIR`` copies them there (docs/results). Grids of real crops and faces are
written to OUT only (never commit them); a canvas grid of scikit-image's textures (no photo
content) is written with the results when scikit-image is installed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .machine import describe, print_table

MODELS = {
    "ours": ({}, {}),
    "no_zg": ({"global_dim": 0}, {}),
    "no_blend": ({}, {"blend": False}),
    "no_shuffle": ({}, {"shuffle": False}),
}
ROW_LABELS = {
    "roundtrip": "TAEF2 round trip of the sides (ceiling)",
    "pixel": "naive pixel alpha-blend",
    "latent": "plain latent alpha-blend (TAEF2, no training)",
    "patch": "patch-based fill from the two sources (NN refiner)",
    "ours": "ours",
    "ours_raw": "ours without the boundary post-processing (seam + Poisson)",
    "no_zg": "ours without global latent z^g",
    "no_blend": "ours without blending",
    "no_shuffle": "ours without shuffling",
}
CANVAS_ROWS = ("pixel", "latent", "patch", "ours", "no_zg", "no_blend", "no_shuffle")
#: rows of the result tables (ours_raw is ours before the boundary post-processing)
TABLE_ROWS = ("pixel", "latent", "patch", "ours", "ours_raw", "no_zg", "no_blend", "no_shuffle")


def add_arguments(p) -> None:
    p.add_argument("--data", type=Path, default=None, help="celeba-id folder (default ../shared/datasets/celeba-id)")
    p.add_argument("--out", type=Path, default=Path("bench-results/mix"),
                   help="state and outputs (outside the repository)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000, help="training steps per model (default 2000)")
    p.add_argument("--batch", type=int, default=8, help="training batch (source pairs per step)")
    p.add_argument("--gram-weight", type=float, default=None,
                   help="lambda2 = lambda4 (default: Eq. 3.10's 0.001 rescaled, see the module docstring of train)")
    p.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes (resumable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave the machine usable)")
    p.add_argument("--train-only", action="store_true", help="only prepare the data and train --model")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="with --train-only: which model")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the mixers trained so far as they are (no further training; incomplete ones are marked)")
    p.add_argument("--pairs", type=int, default=500, help="canvas pairs (default 500)")
    p.add_argument("--face-pairs", type=int, default=500, help="face hybrid pairs (default 500)")
    p.add_argument("--classifier-steps", type=int, default=600, help="training steps of the repetition classifier")
    p.add_argument("--seam-steps", type=int, default=2000, help="training steps of the seam classifier")
    p.add_argument("--resume", action="store_true", help="reuse the stages an earlier run with the same settings finished")
    p.add_argument("--publish", type=Path, default=None, help="copy mix.md and mix.json (and the texture grid) here")
    p.add_argument("--contended", action="store_true", help="mark the timings as measured while other jobs ran")
    p.add_argument("--weights", type=Path, default=None)


def _data_dir(args) -> Path:
    """The celeba-id folder (--data names it)."""
    from .machine import datasets_dir

    return args.data if args.data is not None else datasets_dir(needs="celeba-id") / "celeba-id"


def _stage_file(out: Path, name: str) -> Path:
    return out / f"stage-{name}.json"


def _load_stage(args, name: str, key: dict):
    f = _stage_file(args.out, name)
    if args.resume and f.is_file():
        doc = json.loads(f.read_text())
        if doc.get("key") == key:
            return doc["result"]
    return None


def _save_stage(args, name: str, key: dict, result) -> None:
    from ..io import atomic_write_text

    atomic_write_text(_stage_file(args.out, name), json.dumps({"key": key, "result": result}, indent=1))


# -------------------------------------------------------------------------------- data
def prepare_data(args, ae) -> dict:
    """Crops and latents, cached in OUT/data.safetensors (image content: never commit it)."""
    from safetensors.torch import load_file

    from ..io import save_artifact
    from ..mixing.textures import band_crops, split_celeba_id, texture_crops

    path = args.out / f"data-seed{args.seed}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return {k: v for k, v in t.items()}
    root = _data_dir(args)
    train, test = split_celeba_id(root, seed=args.seed)
    t0 = time.perf_counter()
    tr, tr_owner = texture_crops(train, seed=args.seed)
    te, te_owner = texture_crops(test, seed=args.seed + 1)
    btr = band_crops(train, seed=args.seed)
    bte = band_crops(test, seed=args.seed + 1)
    lat = ae.encode(tr)
    from ..data import load_image

    faces = torch.stack([load_image(Path(test.root) / f, 128) for f in test.files])
    data = {"train_crops": tr, "test_crops": te, "train_bands": btr, "test_bands": bte, "train_latents": lat,
            "train_owner": torch.tensor(tr_owner), "test_owner": torch.tensor(te_owner), "test_faces": faces,
            "test_person": torch.tensor([int(p) for p in test.identities])}
    save_artifact(path, data, {"class": "faceprint.bench.MixData", "note": "crops of shared photos: never commit",
                               "train_photos": len(train.files), "test_photos": len(test.files),
                               "seconds": time.perf_counter() - t0})
    return data


def _mixer_path(args, name: str) -> Path:
    return args.out / f"mixer-{name}-seed{args.seed}-steps{args.steps}.safetensors"


def train_model(args, name: str, data, ae):
    from ..mixing import MixerConfig, TrainConfig, TextureMixer, train_mixer

    final = _mixer_path(args, name)
    if final.is_file():
        m = TextureMixer.load(final, autoencoder=ae)
        if m.provenance_.get("complete") or getattr(args, "eval_only", False):
            return m
    if getattr(args, "eval_only", False):
        raise SystemExit(f"--eval-only: no trained mixer {final.name}; train it first (--train-only --model {name})")
    mc, tc = MODELS[name]
    gw = args.gram_weight if args.gram_weight is not None else DEFAULT_GRAM_WEIGHT
    cfg = MixerConfig(**mc)
    train = TrainConfig(steps=args.steps, batch_size=args.batch, gram_rec=gw, gram_itp=gw, **tc)
    ckpt = args.out / f"ckpt-{name}-seed{args.seed}.safetensors"
    info = {"dataset": "celeba-id top-band crops (hair, top-left, top-right), 64 px", "split": "by person, 32 test people",
            "n_train_crops": int(data["train_latents"].shape[0])}
    t0 = time.perf_counter()
    m = train_mixer(data["train_latents"], autoencoder=ae, config=cfg, train=train, seed=args.seed, checkpoint=ckpt,
                    resume=True, max_seconds=None if args.minutes is None else 60 * args.minutes, progress=True,
                    data_info=info)
    m.save(final)
    print(f"  {name}: {m.provenance_['trained_steps']}/{args.steps} steps ({time.perf_counter() - t0:.0f} s in this call, "
          f"{m.provenance_['train_seconds']:.0f} s of training in all)", flush=True)
    return m


#: lambda2 = lambda4. Eq. 3.10's 0.001 balances Gram losses of VGG-19 activations (~10^3-10^5);
#: the Gram losses of TAEF2 decoder activations are ~10^-2 at the start, so 0.001 would switch
#: them off: the weight is scaled by 10^4 to give them the share of the objective they have in
#: the chapter (train.py's docstring).
DEFAULT_GRAM_WEIGHT = 10.0


# -------------------------------------------------------------------------------- classifiers
#: Channels of the seam classifier's first convolution. Width 16 with a constant learning rate
#: plateaued at 0.92 held-out accuracy in 2,000 steps (the published reduced run); width 32 with
#: the cosine schedule and mirrored batches reached 0.966 (held-out, 2,000 steps, seed 0).
SEAM_WIDTH = 32


def train_classifiers(args, data) -> tuple:
    from ..mixing import evaluation as ev
    from ..mixing.networks import PatchClassifier
    from safetensors.torch import load_file, save_file

    seam_steps = getattr(args, "seam_steps", None) or args.classifier_steps
    path = args.out / (f"classifiers-v2-seed{args.seed}-steps{args.classifier_steps}-seam{seam_steps}"
                       f"-w{SEAM_WIDTH}.safetensors")
    res_path = path.with_suffix(".json")
    seam, rep = PatchClassifier(SEAM_WIDTH), PatchClassifier()
    if path.is_file() and res_path.is_file():
        t = load_file(str(path))
        seam.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("seam.")})
        rep.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("rep.")})
        return seam.eval(), rep.eval(), json.loads(res_path.read_text())
    t0 = time.perf_counter()
    tr, te = data["train_crops"], data["test_crops"]
    btr, bte = data["train_bands"], data["test_bands"]
    bs = 64
    seam = ev.train_classifier(lambda s: ev.seam_examples(tr, bs, seed=args.seed * 100003 + s),
                               steps=seam_steps, seed=args.seed, width=SEAM_WIDTH)
    t_seam = time.perf_counter() - t0
    rep = ev.train_classifier(lambda s: ev.repetition_examples(btr, bs, seed=args.seed * 100003 + s),
                              steps=args.classifier_steps, seed=args.seed + 1)
    xs, ys = ev.seam_examples(te, 2000, seed=10 ** 6 + args.seed)
    xr, yr = ev.repetition_examples(bte, 2000, seed=10 ** 6 + args.seed)
    xs_tr, ys_tr = ev.seam_examples(tr, 2000, seed=2 * 10 ** 6 + args.seed)
    res = {"seam_heldout_accuracy": ev.accuracy(seam, xs, ys), "repetition_heldout_accuracy": ev.accuracy(rep, xr, yr),
           "seam_train_accuracy": ev.accuracy(seam, xs_tr, ys_tr), "heldout_examples": 2000,
           "steps": args.classifier_steps, "seam_steps": seam_steps, "batch": bs, "seconds": round(time.perf_counter() - t0, 1),
           "seam_seconds": round(t_seam, 1), "seam_width": SEAM_WIDTH, "repetition_width": 16,
           "schedule": "Adam lr 1e-3, half-cosine decay, every other batch mirrored",
           "seam_score_real_test_crops": float(ev.scores(seam, te).mean()),
           "repetition_score_real_test_bands": float(ev.scores(rep, bte).mean())}
    t = {"seam." + k: v for k, v in seam.state_dict().items()}
    t.update({"rep." + k: v for k, v in rep.state_dict().items()})
    save_file(t, str(path))
    res_path.write_text(json.dumps(res))
    return seam, rep, res


# -------------------------------------------------------------------------------- canvas
def _pairs(n: int, owner: torch.Tensor, seed: int) -> list[tuple[int, int]]:
    from ..seeding import generator as make_generator

    g = make_generator(seed, "mix-pairs")
    out = []
    N = owner.numel()
    if N < 2 or bool((owner == owner[0]).all()):
        raise SystemExit("pairs need sources of at least two different photos / people")
    while len(out) < n:
        i, j = (int(v) for v in torch.randint(N, (2,), generator=g))
        if owner[i] != owner[j]:
            out.append((i, j))
    return out


def _patch_fill(mixer, zl, weights, size, anchors):
    """The latent blend refined onto the two tiled sources by the NN refiner (seam rule)."""
    from ..latent.refine import NNRefiner, RefineConfig
    from ..mixing.model import _tile_anchored

    H, W = size
    base = mixer.mix_latents(zl, weights, size=size, anchors=anchors, shuffle=False, harmonise=False)
    bank = torch.cat([_tile_anchored(zl[k:k + 1], H, W, anchors[k]) for k in range(zl.shape[0])])
    ref = NNRefiner(RefineConfig(patch_radius=2, mode="seam")).fit(bank)
    out, _ = ref.refine(base)
    return out


def canvas_rows(args, mixers, ae, crops, pairs, width: int = 512):
    """Canvases (N, 3, 64, width) per row, and the per-canvas seconds."""
    from ..mixing import operations as ops
    from ..mixing.model import TextureMixer, pixel_blend

    base = TextureMixer.initial(autoencoder=ae)
    h = crops.shape[-1]
    LW, lw = width // 8, h // 8
    wts = ops.canvas_weights(2, LW, lw).view(2, 1, 1, LW).expand(2, 1, h // 8, LW).contiguous()
    anchors = ops.placements(2, LW, lw)
    keep = torch.zeros(2, 1, h // 8, LW, dtype=torch.bool)
    for k, a in enumerate(anchors):
        keep[k, :, :, a:a + lw] = True
    pw = ops.canvas_weights(2, width, h).view(2, 1, 1, width).expand(2, 1, h, width)
    p_anchors = ops.placements(2, width, h)
    out = {r: [] for r in CANVAS_ROWS}
    secs = {r: 0.0 for r in CANVAS_ROWS}
    t = time.perf_counter()
    L = torch.stack([crops[i] for i, _ in pairs])
    R = torch.stack([crops[j] for _, j in pairs])
    zL, zR = ae.encode(L), ae.encode(R)  # all sources at once (full chunks)
    t_enc = time.perf_counter() - t
    for n, (i, j) in enumerate(pairs):
        src = torch.stack([crops[i], crops[j]])
        t = time.perf_counter()
        out["pixel"].append(pixel_blend(src, pw, h, width, p_anchors))
        secs["pixel"] += time.perf_counter() - t
        zl = torch.stack([zL[n], zR[n]])
        t = time.perf_counter()
        out["latent"].append(base.mix_latents(zl, wts, size=(h // 8, LW), anchors=anchors, harmonise=False,
                                              shuffle=False))
        secs["latent"] += time.perf_counter() - t
        t = time.perf_counter()
        out["patch"].append(_patch_fill(base, zl, wts, (h // 8, LW), anchors))
        secs["patch"] += time.perf_counter() - t
        for name, m in mixers.items():
            t = time.perf_counter()
            shuffle = bool(m.train_config_.get("shuffle", True))  # the no-shuffling ablation never shuffles
            out[name].append(m.mix_latents(zl, wts, size=(h // 8, LW), anchors=anchors, keep=keep, shuffle=shuffle,
                                           harmonise=True, seed=args.seed * 1000003 + n))
            secs[name] += time.perf_counter() - t
    for r in list(out):
        if r == "pixel" or not out[r]:
            continue
        t = time.perf_counter()
        out[r] = [ae.decode(torch.cat(out[r]))]  # decoded in the autoencoder's full chunks
        secs[r] += time.perf_counter() - t + t_enc
    # the chapter's boundary post-processing (sources put back, seam, Poisson) on the trained rows;
    # "ours" is also kept without it
    from ..mixing.postprocess import paste_sources

    if "ours" in mixers:
        out["ours_raw"], secs["ours_raw"] = list(out["ours"]), secs["ours"]
    for name in mixers:
        t = time.perf_counter()
        decoded = out[name][0]
        done = [paste_sources(decoded[n:n + 1], torch.stack([crops[i], crops[j]]), [a * 8 for a in anchors])[0]
                for n, (i, j) in enumerate(pairs)]
        out[name] = [torch.cat(done)]
        secs[name] += time.perf_counter() - t
    return {r: torch.cat(v) for r, v in out.items() if v}, {r: s / len(pairs) for r, s in secs.items()}


def canvas_metrics(canvases, crops, pairs, seam, rep, inc, enc_gram, ae, real_centres, real_feats, seed):
    from ..metrics import kid
    from ..mixing import evaluation as ev

    h = crops.shape[-1]
    L = torch.stack([crops[i] for i, _ in pairs])
    R = torch.stack([crops[j] for _, j in pairs])
    rt = ae.decode(ae.encode(torch.cat([L, R])))
    res = {"roundtrip": {"side_1-ssim": float(1 - 0.5 * (ev.ssim(rt[:len(L)], L) + ev.ssim(rt[len(L):], R)).mean())}}
    gL, gR = enc_gram(L), enc_gram(R)
    for name, c in canvases.items():
        W = c.shape[-1]
        mid = W // 2
        centre = c[..., mid - h // 2: mid + h // 2]
        centre2 = c[..., mid - h: mid + h]
        side = 1 - 0.5 * (ev.ssim(c[..., :h], L) + ev.ssim(c[..., W - h:], R))
        gc = enc_gram(centre)
        feats = inc.features(centre, batch_size=50)
        k = kid(feats, real_feats, subsets=50, subset_size=min(len(feats), len(real_feats), 250), seed=seed)
        res[name] = {
            "side_1-ssim": float(side.mean()),
            "cgd": float(ev.centre_gram_distance(gc, gL, gR).mean()),
            "ccd": float(ev.centre_cosine_distance(gc, gL, gR).mean()),
            "css": float(ev.scores(seam, centre).mean()),
            "crs": float(ev.scores(rep, centre2).mean()),
            "cswd": ev.sliced_wasserstein(centre, real_centres, seed=seed),
            "centre_kid": k.mean, "centre_kid_std": k.std,
        }
    return res


# -------------------------------------------------------------------------------- faces
def face_rows(args, mixer, ae, faces, pairs, band: int = 32):
    from ..mixing import operations as ops

    S = faces.shape[-1]
    wb_px = 1 - ops.band_alpha(S, S, band)
    out = {"pixel": [], "latent": [], "ours": [], "ours_postprocessed": []}
    for i, j in pairs:
        a, b = faces[i:i + 1], faces[j:j + 1]
        out["pixel"].append((a * (1 - wb_px) + b * wb_px).clamp(0, 1))
        out["latent"].append(mixer.mix(a, b, wb_px, harmonise=False))
        out["ours"].append(mixer.hybrid(a, b, band=band, harmonise=True))
        # the chapter's hybridisation finish: A's and B's own pixels outside the band, seams, Poisson
        out["ours_postprocessed"].append(mixer.hybrid(a, b, band=band, harmonise=True, postprocess=True))
    return {k: torch.cat(v) for k, v in out.items()}


def face_metrics(rows, faces, pairs, seam, inc, real_feats, ae, seed, band: int = 32):
    from ..metrics import kid
    from ..mixing import evaluation as ev

    S = faces.shape[-1]
    A = torch.stack([faces[i] for i, _ in pairs])
    B = torch.stack([faces[j] for _, j in pairs])
    rtA, rtB = ae.decode(ae.encode(A)), ae.decode(ae.encode(B))
    lo, hi = S // 2 - band // 2, S // 2 + band // 2
    res = {}
    for name, x in rows.items():
        wins = [x[..., y:y + 64, S // 2 - 32:S // 2 + 32] for y in range(0, S - 63, 32)]
        css = torch.stack([ev.scores(seam, w) for w in wins]).mean(0)
        feats = inc.features(x, batch_size=50)
        k = kid(feats, real_feats, subsets=50, subset_size=min(len(feats), len(real_feats), 250), seed=seed)
        res[name] = {"band_seam_score": float(css.mean()), "kid": k.mean, "kid_std": k.std,
                     "ssim_left_vs_A_roundtrip": float(ev.ssim(x[..., :lo], rtA[..., :lo]).mean()),
                     "ssim_right_vs_B_roundtrip": float(ev.ssim(x[..., hi:], rtB[..., hi:]).mean())}
    return res


# -------------------------------------------------------------------------------- grids
def _grid_rows(canvases: dict, order, count: int):
    from .. import render

    import numpy as np

    rows = []
    for i in range(count):
        for r in order:
            rows.append(render.to_uint8(canvases[r][i:i + 1]))
    arr = np.concatenate(rows)
    return render.grid(arr, cols=1)


def _skimage_canvas(mixers, ae, seed):
    """Canvases of scikit-image's textures (public domain / freely licensed, no face content)."""
    try:
        from skimage import data as skd
    except ImportError:
        return None
    import numpy as np

    texs = []
    for name in ("brick", "grass", "gravel"):
        a = getattr(skd, name)()[128:192, 128:192]  # a 64 x 64 crop of the 512 x 512 grey texture
        texs.append(torch.from_numpy(np.ascontiguousarray(a)).float().div(255)[None].expand(3, -1, -1))
    pairs = [(0, 1), (1, 2), (2, 0)]
    crops = torch.stack(texs)

    class _A:
        pass

    args = _A()
    args.seed = seed
    canv, _ = canvas_rows(args, mixers, ae, crops, pairs)
    return canv, pairs


def _feature_cache(args):
    """Inception features of the real reference sets, kept in OUT (outside the repository)."""
    from ..metrics import FeatureCache

    return FeatureCache(args.out / "features")


def real_centres(crops: torch.Tensor, pairs: int, seed: int) -> torch.Tensor:
    """The real test crops the centre KID and SWD compare with (a seeded subset, >= 250)."""
    idx = torch.randperm(crops.shape[0], generator=torch.Generator().manual_seed(seed))[:max(pairs, 250)]
    return crops[idx]


def real_faces(faces: torch.Tensor, seed: int, n: int = 400) -> torch.Tensor:
    """The real test-person photos the hybrids' KID compares with (a seeded subset)."""
    idx = torch.randperm(faces.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:n]
    return faces[idx]


# -------------------------------------------------------------------------------- run
def run(args) -> int:
    torch.set_num_threads(max(1, args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    from ..autoencoder import TAEF2

    ae = TAEF2.load(args.weights)
    t_all = time.perf_counter()
    data = prepare_data(args, ae)
    print(f"data: {data['train_crops'].shape[0]} train crops, {data['test_crops'].shape[0]} test crops, "
          f"{data['test_faces'].shape[0]} test faces", flush=True)
    if args.train_only:
        names = [args.model] if args.model else list(MODELS)
        for n in names:
            train_model(args, n, data, ae)
        return 0
    mixers = {n: train_model(args, n, data, ae) for n in MODELS}
    incomplete = [n for n, m in mixers.items() if not m.provenance_.get("complete")]
    seam, rep, cls_res = train_classifiers(args, data)
    print(f"classifiers: seam held-out accuracy {cls_res['seam_heldout_accuracy']:.4f}, repetition "
          f"{cls_res['repetition_heldout_accuracy']:.4f}", flush=True)
    from ..metrics import InceptionFeatures
    from ..mixing.evaluation import EncoderGram

    inc = InceptionFeatures.load()
    enc_gram = EncoderGram(ae.encoder)
    te = data["test_crops"]
    pairs = _pairs(args.pairs, data["test_owner"], args.seed)
    key = {"seed": args.seed, "steps": args.steps, "pairs": args.pairs, "gram": args.gram_weight,
           "cls": args.classifier_steps, "seam": args.seam_steps, "batch": args.batch, "version": 2}
    canvas = _load_stage(args, "canvas", key)
    if canvas is None:
        t0 = time.perf_counter()
        canv, secs = canvas_rows(args, mixers, ae, te, pairs)
        real_c = real_centres(te, args.pairs, args.seed)
        real_feats = inc.features(real_c, batch_size=50, cache=_feature_cache(args))
        metrics = canvas_metrics(canv, te, pairs, seam, rep, inc, enc_gram, ae, real_c, real_feats, args.seed)
        for r, s in secs.items():
            metrics[r]["seconds_per_canvas_in_batch_run"] = s
        canvas = {"metrics": metrics, "seconds": time.perf_counter() - t0}
        from .. import render

        render.save_png(_grid_rows(canv, [r for r in TABLE_ROWS if r in canv], 6), args.out / "canvas-grid-REAL-CROPS-do-not-commit.png")
        _save_stage(args, "canvas", key, canvas)
    faces_res = _load_stage(args, "faces", key | {"face_pairs": args.face_pairs})
    if faces_res is None:
        t0 = time.perf_counter()
        faces = data["test_faces"]
        fpairs = _pairs(args.face_pairs, data["test_person"], args.seed + 7)
        rows = face_rows(args, mixers["ours"], ae, faces, fpairs)
        real = real_faces(faces, args.seed)
        real_feats = inc.features(real, batch_size=50, cache=_feature_cache(args))
        faces_res = {"metrics": face_metrics(rows, faces, fpairs, seam, inc, real_feats, ae, args.seed),
                     "seconds": time.perf_counter() - t0, "real_faces": int(real.shape[0])}
        from .. import render

        # columns: A, B, pixel blend, latent blend, ours, ours post-processed
        tiles = torch.cat([torch.stack([faces[i], faces[j], rows["pixel"][n], rows["latent"][n], rows["ours"][n],
                                        rows["ours_postprocessed"][n]])
                           for n, (i, j) in enumerate(fpairs[:6])])
        render.save_png(render.grid(render.to_uint8(tiles), cols=6), args.out / "face-hybrids-REAL-FACES-do-not-commit.png")
        _save_stage(args, "faces", key | {"face_pairs": args.face_pairs}, faces_res)
    speed = measure_speed(mixers["ours"], ae, te, data["test_faces"])
    results = {
        "machine": describe({"seed": args.seed, "torch threads (this invocation)": args.threads,
                             "timings": "contended (other jobs on the 2 cores)" if args.contended else "uncontended"}),
        "settings": {"steps": args.steps, "batch": args.batch, "gram_weight": args.gram_weight or DEFAULT_GRAM_WEIGHT,
                     "pairs": args.pairs, "face_pairs": args.face_pairs, "classifier_steps": args.classifier_steps,
                     "canvas": "64 x 512 (8 x 64 latents), sources 64 x 64 at both ends",
                     "incomplete_training": incomplete},
        "training": {n: {k: m.provenance_.get(k) for k in ("trained_steps", "train_seconds", "threads", "complete", "n_textures",
                                                             "data_hash", "seed")} | {"last_losses": (m.provenance_.get("history") or [{}])[-1]}
                     for n, m in mixers.items()},
        "classifiers": cls_res, "canvas": canvas, "faces": faces_res, "speed": speed,
        "total_seconds": time.perf_counter() - t_all,
    }
    sk = _skimage_canvas(mixers, ae, args.seed)
    if sk is not None:
        from .. import render

        render.save_png(_grid_rows(sk[0], ("pixel", "latent", "patch", "ours_raw", "ours", "no_shuffle"), 3),
                        args.out / "mix-skimage-canvas.png")
        results["skimage_grid"] = "mix-skimage-canvas.png: rows per pair (brick-grass, grass-gravel, gravel-brick): " \
                                  "pixel, latent, patch, ours before post-processing, ours, no shuffling"
    write_results(args, results)
    return 0


def measure_speed(mixer, ae, crops, faces, repeats: int = 5, threads: int = 2) -> dict:
    """Median seconds of a 64 x 512 canvas and a 128 px face hybrid on ``threads`` torch threads
    (the issue's "2 cores"), after one warm-up call each."""
    import statistics

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mixer.canvas(crops[:2], 512)
        mixer.hybrid(faces[0:1], faces[1:2], band=32)
        return _speed(mixer, crops, faces, repeats, statistics)
    finally:
        torch.set_num_threads(before)


def _speed(mixer, crops, faces, repeats, statistics) -> dict:
    src = crops[:2]
    t_canvas = []
    for _ in range(repeats):
        t = time.perf_counter()
        mixer.canvas(src, 512)
        t_canvas.append(time.perf_counter() - t)
    t_face = []
    for _ in range(repeats):
        t = time.perf_counter()
        mixer.hybrid(faces[0:1], faces[1:2], band=32)
        t_face.append(time.perf_counter() - t)
    return {"canvas_64x512_s": statistics.median(t_canvas), "face_hybrid_128_s": statistics.median(t_face),
            "repeats": repeats, "threads": torch.get_num_threads(),
            "note": "encode + shuffle/blend + harmonise + decode, median"}


def acceptance(results) -> list[list]:
    """Issue 15's acceptance criteria, each with the measured value and whether it holds."""
    m, f, c, s = results["canvas"]["metrics"], results["faces"]["metrics"], results["classifiers"], results["speed"]
    o = m["ours"]
    rows = []

    def add(name, value, ok):
        rows.append([name, value, "yes" if ok else "NO"])

    add("CSS ours <= 0.2 x naive pixel blend", f"{o['css']:.4f} vs 0.2 x {m['pixel']['css']:.4f}",
        o["css"] <= 0.2 * m["pixel"]["css"])
    add("CSS ours <= plain latent blend", f"{o['css']:.4f} vs {m['latent']['css']:.4f}", o["css"] <= m["latent"]["css"])
    add("CRS ours <= 0.05", f"{o['crs']:.4f}", o["crs"] <= 0.05)
    add("CRS ours < no-shuffling ablation", f"{o['crs']:.4f} vs {m['no_shuffle']['crs']:.4f}",
        o["crs"] < m["no_shuffle"]["crs"])
    rt = m["roundtrip"]["side_1-ssim"]
    add("side 1-SSIM ours <= TAEF2 round trip + 0.02", f"{o['side_1-ssim']:.4f} vs {rt:.4f} + 0.02",
        o["side_1-ssim"] <= rt + 0.02)
    add("CSWD ours <= latent blend", f"{o['cswd']:.2f} vs {m['latent']['cswd']:.2f}", o["cswd"] <= m["latent"]["cswd"])
    add("centre KID ours <= latent blend", f"{o['centre_kid']:.4f} vs {m['latent']['centre_kid']:.4f}",
        o["centre_kid"] <= m["latent"]["centre_kid"])
    add("seam classifier held-out accuracy >= 0.95", f"{c['seam_heldout_accuracy']:.4f}", c["seam_heldout_accuracy"] >= 0.95)
    add("repetition classifier held-out accuracy >= 0.95", f"{c['repetition_heldout_accuracy']:.4f}",
        c["repetition_heldout_accuracy"] >= 0.95)
    add("faces: band seam score ours < pixel and < latent",
        f"{f['ours']['band_seam_score']:.4f} vs {f['pixel']['band_seam_score']:.4f}, {f['latent']['band_seam_score']:.4f}",
        f["ours"]["band_seam_score"] < min(f["pixel"]["band_seam_score"], f["latent"]["band_seam_score"]))
    add("faces: KID ours <= latent blend", f"{f['ours']['kid']:.4f} vs {f['latent']['kid']:.4f}",
        f["ours"]["kid"] <= f["latent"]["kid"])
    lo = min(f["ours"]["ssim_left_vs_A_roundtrip"], f["ours"]["ssim_right_vs_B_roundtrip"])
    add("faces: SSIM outside the band to each round trip >= 0.9", f"{lo:.4f}", lo >= 0.9)
    add("speed: 64 x 512 canvas <= 2 s", f"{s['canvas_64x512_s']:.3f} s", s["canvas_64x512_s"] <= 2)
    add("speed: face mix <= 0.2 s", f"{s['face_hybrid_128_s']:.3f} s", s["face_hybrid_128_s"] <= 0.2)
    return rows


def _f(v, d=4):
    return "-" if v is None else f"{v:.{d}f}"


def write_results(args, results) -> None:
    import io
    from contextlib import redirect_stdout

    from ..io import atomic_write_text

    buf = io.StringIO()
    with redirect_stdout(buf):
        print("# Mix: the Texture Mixer on TAEF2 (papers/004 ch. 3) - `python -m faceprint.bench mix`\n")
        print("Generated by `python -m faceprint.bench mix`; every figure below is in mix.json. The hand-written "
              "reading of a published run is kept apart, in mix-reading.md.")
        print_table("Machine and settings", ["item", "value"],
                    [[k, v] for k, v in results["machine"].items()] + [[k, v] for k, v in results["settings"].items()])
        rows = [[n, t["trained_steps"], t["train_seconds"], t.get("threads"), t["complete"],
                 ", ".join(f"{k} {v}" for k, v in t["last_losses"].items() if k != "step")]
                for n, t in results["training"].items()]
        print_table("Training", ["model", "steps", "seconds", "torch threads", "complete", "last logged losses"], rows)
        c = results["classifiers"]
        print_table("Metric networks (Sec. 3.4.2 recipe)", ["classifier", "held-out accuracy", "score on real test crops"],
                    [["seam (64 x 64)", _f(c["seam_heldout_accuracy"]), _f(c["seam_score_real_test_crops"])],
                     ["repetition (64 x 128)", _f(c["repetition_heldout_accuracy"]),
                      _f(c["repetition_score_real_test_bands"])]])
        m = results["canvas"]["metrics"]
        rows = [[ROW_LABELS["roundtrip"], _f(m["roundtrip"]["side_1-ssim"]), "-", "-", "-", "-", "-", "-", "-"]]
        for r in TABLE_ROWS:
            if r not in m:
                continue
            x = m[r]
            rows.append([ROW_LABELS[r], _f(x["side_1-ssim"]), _f(x["cgd"], 3), _f(x["ccd"], 3), _f(x["css"]),
                         _f(x["crs"]), _f(x["cswd"], 2), _f(x["centre_kid"], 4),
                         _f(x["seconds_per_canvas_in_batch_run"], 3)])
        print_table(f"Horizontal interpolation, 64 x 512 canvas, {results['settings']['pairs']} held-out pairs "
                    "(Table 3.1 analog)",
                    ["method", "side 1-SSIM", "CGD", "CCD", "CSS", "CRS", "CSWD", "centre KID", "s / canvas"], rows)
        f = results["faces"]["metrics"]
        print_table(f"Face hybrids, {results['settings']['face_pairs']} pairs, 32 px band, 128 px",
                    ["method", "band seam score", "KID vs real", "SSIM left vs A round trip",
                     "SSIM right vs B round trip"],
                    [[r, _f(x["band_seam_score"]), _f(x["kid"]), _f(x["ssim_left_vs_A_roundtrip"]),
                      _f(x["ssim_right_vs_B_roundtrip"])] for r, x in f.items()])
        print_table("Acceptance of issue 15 (computed from the numbers above)", ["criterion", "value", "met"],
                    acceptance(results))
        s = results["speed"]
        print_table("Speed (" + results["machine"]["timings"] + ")", ["operation", "seconds"],
                    [["64 x 512 canvas (ours)", _f(s["canvas_64x512_s"], 3)],
                     ["128 px face hybrid (ours)", _f(s["face_hybrid_128_s"], 3)]])
    md = buf.getvalue()
    atomic_write_text(args.out / "mix.md", md)
    atomic_write_text(args.out / "mix.json", json.dumps(results, indent=1, default=str))
    print(md)
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("mix.md", "mix.json", "mix-skimage-canvas.png"):
            if (args.out / name).is_file():
                shutil.copyfile(args.out / name, args.publish / name)
