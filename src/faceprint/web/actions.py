"""What the page's buttons do: fit, generate, a face's details, forget, rebalance.

Each job function takes the Job (for progress and its own output folder) and returns a JSON-ready
dict; files it writes are named relative to the job folder and served by the app's /files route.
Model files are written atomically into the models folder under a name the job reserved.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .. import render
from ..io import atomic_write_text
from .jobs import Job
from .paths import SECRET_NAMES, WebError, inside

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_ZIP_ENTRIES = 50_000
BEFORE_AFTER_FACES = 8


class Models:
    """The models folder: listing, and loaded generators shared by requests (a few, by file
    identity, so a replaced file is loaded again)."""

    def __init__(self, config, keep: int = 4):
        self.config = config
        self._ae = None
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.keep = keep

    def autoencoder(self):
        with self._lock:
            if self._ae is None:
                from ..autoencoder import TAEF2

                self._ae = TAEF2.load(self.config.weights)
            return self._ae

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            raise WebError(400, f"model {name!r}: pick one of the models listed (a .safetensors file)")
        p = inside(self.config.models, name, "model", owner=self.config.owner_folder())
        if not p.is_file():
            raise WebError(404, f"model {name!r} is not in the models folder; pick one of the models listed")
        return p

    def load(self, name: str):
        from ..latent.generator import Generator

        p = self.path(name)
        st = p.stat()
        key = (str(p), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        gen = Generator.load(p, autoencoder=self.autoencoder())
        with self._lock:
            self._cache[key] = gen
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return gen

    def listing(self) -> list[dict]:
        from ..io import load_artifact

        out = []
        owner = os.path.realpath(self.config.owner_folder())
        root = self.config.models
        if not root.is_dir():
            return out
        for p in sorted(root.glob("*.safetensors")):
            if p.name.startswith(".") or os.path.realpath(p).startswith(owner + os.sep) or p.name in SECRET_NAMES:
                continue
            try:
                inside(root, p.name, "model", owner=self.config.owner_folder())
                _, meta = load_artifact(p, validate=False)
            except Exception:  # noqa: BLE001 - a file that is not a model is not listed
                continue
            if not str(meta.get("class", "")).endswith("Generator"):
                continue
            fp = meta.get("fingerprint") or {}
            ops = (meta.get("provenance") or {}).get("operations") or []
            out.append({"name": p.name, "bytes": p.stat().st_size,
                        "photos": len((meta.get("training") or {}).get("relpaths") or []),
                        "created": (meta.get("provenance") or {}).get("created"),
                        "instance": fp.get("instance"), "recipient": fp.get("recipient"),
                        "operations": [o.get("operation") for o in ops if isinstance(o, dict)]})
        return out


# ------------------------------------------------------------------------------- fit
def data_folder(config, root: int, rel: str) -> Path:
    if not config.data:
        raise WebError(400, "this server serves no photo folders (start it with --data FOLDER); upload a zip instead")
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < len(config.data):
        raise WebError(400, f"data folder number {root!r} does not exist; pick one of the {len(config.data)} listed")
    return inside(config.data[root], rel, "folder", allow_empty=True)


def list_folder(config, root: int, rel: str) -> dict:
    d = data_folder(config, root, rel)
    if not d.is_dir():
        raise WebError(404, f"folder {rel!r} does not exist in data folder {root}")
    subs, images = [], 0
    with os.scandir(d) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                subs.append(e.name)
            elif e.is_file(follow_symlinks=False) and Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                images += 1
    return {"root": root, "path": rel, "folders": sorted(subs)[:500], "images": images,
            "csv": sorted(n for n in os.listdir(d) if n.lower().endswith(".csv") and not n.startswith("."))[:50]}


def extract_zip(zip_path: Path, dest: Path, max_bytes: int) -> int:
    """Extract the image files of an uploaded zip into ``dest`` (flat, numbered names kept in
    order). Refuses symbolic links, absolute or '..' names and archives that inflate past
    ``max_bytes``; other files are ignored. Returns the number of images."""
    if not zipfile.is_zipfile(zip_path):
        raise WebError(415, "the upload is not a zip archive; zip the folder of photos (JPEG, PNG, WebP) and upload that")
    dest.mkdir(parents=True, exist_ok=True)
    total = n = 0
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise WebError(413, f"the zip holds {len(infos)} entries; at most {MAX_ZIP_ENTRIES} are accepted")
        for info in infos:
            name = info.filename
            if name.startswith("/") or "\\" in name or any(p == ".." for p in name.split("/")) or ":" in name:
                raise WebError(400, f"the zip entry {name!r} has an absolute or '..' path; refused")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise WebError(400, f"the zip entry {name!r} is a symbolic link; refused")
            if info.is_dir() or Path(name).suffix.lower() not in IMAGE_SUFFIXES or \
                    any(p.startswith(".") or p == "__MACOSX" for p in name.split("/")):
                continue
            total += info.file_size
            if total > max_bytes:
                raise WebError(413, f"the zip's photos inflate to more than {max_bytes // (1024 * 1024)} MB; "
                                    "upload fewer photos")
            n += 1
            target = dest / f"{n:06d}_{Path(name).name}"
            written = 0
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > info.file_size:  # a lying header
                        raise WebError(400, f"the zip entry {name!r} is larger than its header says; refused")
                    out.write(chunk)
    if n == 0:
        raise WebError(415, "the zip holds no photos (JPEG, PNG, WebP, BMP, TIFF or GIF files)")
    return n


def fit_job(models: Models, folder: Path, output: Path, *, limit: int | None, components: int | None, seed: int):
    def run(job: Job) -> dict:
        import warnings

        from ..data import FaceFolder, LatentCache, encode_folder
        from ..errors import SkippedImageWarning
        from ..latent.generator import Generator, GeneratorConfig

        ae = models.autoencoder()
        job.report("reading the photo folder", 0, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedImageWarning)
            ff = FaceFolder(folder, size=128, limit=limit)
            job.report("encoding photos", 0, len(ff))
            ls = encode_folder(ff, ae, cache=LatentCache(),
                               on_progress=lambda d, t: job.report("encoding photos", d, t))
        skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
        job.report("fitting the model (mixture by EM)", 0, 0)
        gen = Generator(GeneratorConfig(components=components), autoencoder=ae).fit(ls, seed=seed)
        job.report("writing the model file", 0, 0)
        gen.save(output)
        return {"model": output.name, "photos": gen.n_photos, "skipped": len(skipped), "skipped_examples": skipped[:5],
                "components": int(gen.mixture_.weights_.numel()),
                "download": f"/files/models/{output.name}"}

    return run


# ------------------------------------------------------------------------------- generate
def _save_png(array, path: Path) -> None:
    from ..cli.main import save_png

    save_png(array, path, durable=False)


def write_faces(gen, n: int, seed: int, folder: Path, prefix: str = "", progress=None) -> dict:
    """Generate faces 0..n-1 of ``seed`` with the copy guard, write PNGs, maps, a grid and
    provenance.json into ``folder``; return their names and per-face summaries."""
    from ..latent.generator import DEFAULT_GUARD

    images, samples = gen.generate(n, seed=seed, guard=DEFAULT_GUARD)
    method = gen.default_method
    learned = method == "gan"  # a learned generator copies no latent pixel: no map, no sources
    arrays = render.to_uint8(images)
    maps = None if learned else render.provenance_images(samples.provenance, images.shape[-1])
    summary = gen.provenance_summary(samples.provenance)
    faces = []
    for j, i in enumerate(samples.indices.tolist()):
        face, mp = f"{prefix}face_{i:06d}.png", (None if learned else f"{prefix}face_{i:06d}_map.png")
        _save_png(arrays[j], folder / face)
        if mp is not None:
            _save_png(maps[j], folder / mp)
        entry = {"index": i, "file": face, "map": mp, "component": int(samples.components[j]), **summary[j],
                 "redraws": int(samples.redraws[j]) if samples.redraws is not None else 0}
        if not learned:
            entry["latent_map"] = samples.provenance[j].tolist()
        faces.append(entry)
        if progress is not None:
            progress(j + 1, n)
    grid = f"{prefix}grid.png"
    _save_png(render.grid(arrays), folder / grid)
    guard = dict(samples.guard or {})
    note = ("made by a learned latent generator (GAN): no latent pixel is copied from a training photo, so there is "
            "no provenance map; the copy guard still checks each face's distance to the training photos"
            if learned else
            "latent_map[y][x] is the index into training_photos of the photo that latent pixel was copied "
            "from (-1: not copied); each latent pixel covers 8x8 image pixels")
    doc = {"seed": seed, "method": method, "training_photos": gen.training_.relpaths, "note": note,
           "faces": faces, "copy_guard": {"enabled": True, **guard}}
    prov = f"{prefix}provenance.json"
    atomic_write_text(folder / prov, json.dumps(doc))
    return {"grid": grid, "provenance": prov, "faces": [{k: f[k] for k in ("index", "file", "map")} for f in faces]}


def generate_job(models: Models, name: str, n: int, seed: int):
    def run(job: Job) -> dict:
        job.report("loading the model", 0, 0)
        gen = models.load(name)
        job.report("generating faces", 0, n)
        out = write_faces(gen, n, seed, job.folder, progress=lambda d, t: job.report("writing faces", d, t))
        return {"model": name, "seed": seed, "job": job.id, **out}

    return run


def face_details(config, models: Models, job, index: int) -> dict:
    """A generated face: its files, where it was copied from, the copy guard's verdict in words."""
    prov_file = job.folder / "provenance.json"
    if job.kind != "generate" or job.state != "done" or not prov_file.is_file():
        raise WebError(404, f"job {job.id} has no generated faces (still running, failed, or not a generate job)")
    doc = json.loads(prov_file.read_text())
    face = next((f for f in doc["faces"] if f["index"] == index), None)
    if face is None:
        raise WebError(404, f"face {index} is not among the faces of job {job.id}")
    if face.get("latent_map") is None:  # a learned generator's face: nothing copied
        guard = doc.get("copy_guard") or {}
        words = (f"Made by a learned generator (method {doc.get('method')}): no part of it is copied from a training "
                 f"photo, so it has no provenance map. The copy guard checked that it is not closer to any training "
                 f"photo than {1 - guard.get('quantile', 0.05):.0%} of new photos come to the training set.")
        if face.get("redraws"):
            words += f" The guard redrew it {face['redraws']} time(s) before it passed."
        return {"index": index, "image": f"/files/outputs/{job.id}/{face['file']}", "map": None,
                "method": doc.get("method"), "distinct_photos": 0, "max_share": 0.0, "sources": [],
                "copy_guard": words, "redraws": face.get("redraws", 0),
                "provenance": f"/files/outputs/{job.id}/provenance.json"}
    lm = np.asarray(face["latent_map"]).ravel()
    copied = lm[lm >= 0]
    counts = np.bincount(copied) if copied.size else np.zeros(0, dtype=int)
    top = np.argsort(-counts, kind="stable")[:8] if counts.size else []
    gen = models.load(job.result["model"])
    sources = []
    for i in top:
        if counts[i] == 0:
            break
        sources.append({"photo": int(i), "name": doc["training_photos"][int(i)],
                        "share": float(counts[i]) / lm.size,
                        "thumbnail": f"/api/thumb?model={job.result['model']}&photo={int(i)}"
                        if training_photo(config, gen, int(i)) is not None else None})
    guard = doc.get("copy_guard") or {}
    max_share = guard.get("max_share", 0.5)
    words = (f"Passed the copy guard: at most {face['max_share']:.0%} of this face comes from one training photo "
             f"(the limit is {max_share:.0%}), and outside the pixels it copies it is not closer to any training "
             f"photo than {1 - guard.get('quantile', 0.05):.0%} of new photos come to the training set.")
    if face.get("redraws"):
        words += f" The guard redrew it {face['redraws']} time(s) before it passed."
    return {"index": index, "image": f"/files/outputs/{job.id}/{face['file']}", "method": doc.get("method"),
            "map": f"/files/outputs/{job.id}/{face['map']}", "distinct_photos": face["distinct_photos"],
            "max_share": face["max_share"], "sources": sources, "copy_guard": words, "redraws": face.get("redraws", 0),
            "provenance": f"/files/outputs/{job.id}/provenance.json"}


def training_photo(config, gen, index: int) -> Path | None:
    """The training photo's file, if it is inside a served data folder (else None: names only)."""
    if not 0 <= index < len(gen.training_.relpaths) or not gen.training_.root:
        return None
    full = os.path.realpath(os.path.join(gen.training_.root, gen.training_.relpaths[index]))
    for d in config.data:
        rel = os.path.relpath(full, d)
        if rel.startswith("..") or os.path.isabs(rel):
            continue
        try:
            p = inside(d, rel.replace(os.sep, "/"), "training photo", owner=config.owner_folder())
        except WebError:
            continue
        if p.is_file():
            return p
    return None


def thumbnail_png(path: Path) -> bytes:
    import io

    from PIL import Image

    from ..data.folder import load_image

    x = load_image(path, 128)
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------- control
def _before_after(gen_before, gen_after, job: Job, seed: int) -> dict:
    job.report("faces before and after, same seeds", 0, 2)
    before = write_faces(gen_before, BEFORE_AFTER_FACES, seed, job.folder, prefix="before_")
    job.report("faces before and after, same seeds", 1, 2)
    after = write_faces(gen_after, BEFORE_AFTER_FACES, seed, job.folder, prefix="after_")
    job.report("faces before and after, same seeds", 2, 2)
    return {"before": before, "after": after, "seed": seed}


def forget_job(models: Models, name: str, photos: list[Path], output: Path, seed: int):
    def run(job: Job) -> dict:
        from ..taming import forget, match_training_photos

        gen = models.load(name)
        job.report("matching the photos with the training photos", 0, 0)
        idx, unmatched = match_training_photos(gen, photos)
        if not idx:
            raise WebError(400, f"none of the {len(photos)} uploaded photos is a training photo of {name} (matched "
                                "by file content); nothing to forget")
        job.report("removing them from the model", 0, 0)
        out, rep = forget(gen, idx)
        out.save(output)
        return {"model": output.name, "forgotten": len(idx), "not_training_photos": len(unmatched),
                "components": [rep.components_before, rep.components_after], "job": job.id,
                "download": f"/files/models/{output.name}", **_before_after(gen, out, job, seed)}

    return run


def label_columns(path: Path) -> list[str]:
    from ..data import read_labels

    table = read_labels(path)
    return [c for c in table.columns if c.lower() not in ("file", "filename", "path")]


def rebalance_job(models: Models, name: str, labels: Path, attribute: str, share: float, output: Path, seed: int):
    def run(job: Job) -> dict:
        from ..data import read_labels
        from ..taming import rebalance

        gen = models.load(name)
        job.report("reading the labels", 0, 0)
        table = read_labels(labels)
        if attribute not in table.columns:
            raise WebError(400, f"attribute {attribute!r} is not a column of {labels.name}; pick one of the listed")
        rows = table.match(gen.training_.relpaths, root=gen.training_.root)
        values = [v.strip() for v in table.values_at(rows, [attribute])[attribute]]
        present = sorted(set(values))
        positive = next((v for v in present if v.lower() in ("1", "true", "yes")), None)
        if positive is None or len(present) > 2:
            raise WebError(400, f"attribute {attribute!r} is not yes/no (values: {', '.join(present[:6])}); pick a "
                                "binary attribute such as Male or Eyeglasses")
        job.report("reweighting the model", 0, 0)
        out, rep = rebalance(gen, {attribute: values}, {attribute: {positive: share}},
                             source=f"labels:{labels.name}")
        out.save(output)
        return {"model": output.name, "attribute": attribute, "value": positive,
                "share_before": rep.shares_before[attribute][positive],
                "share_after": rep.shares_after[attribute][positive], "requested": share, "job": job.id,
                "download": f"/files/models/{output.name}", **_before_after(gen, out, job, seed)}

    return run
