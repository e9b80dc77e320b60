"""Shared set-up of the web app tests (API and browser): a served photo folder of real photos
(copied to a temporary folder, never into the repository), its label table, a models folder,
an owner folder, and a fitted tiny model."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

from conftest import CELEBA

N_PHOTOS = 40


def make_env(root: Path, n: int = N_PHOTOS) -> dict:
    """Folders under ``root``: data/photos (n celeba photos), data/attributes.csv (their
    labels), data/outside-link (a symbolic link to a folder outside data), models, owner."""
    data, models, owner, outside = root / "data", root / "models", root / "owner", root / "outside"
    photos = data / "photos"
    for d in (photos, models, outside):
        d.mkdir(parents=True)
    files = sorted(CELEBA.iterdir())[:n]
    for p in files:
        shutil.copy(p, photos / p.name)
    (outside / "secret.jpg").write_bytes(files[0].read_bytes())
    (data / "outside-link").symlink_to(outside, target_is_directory=True)
    names = {p.name for p in files}
    with open(CELEBA.parent / "attributes.csv", newline="") as src, open(data / "attributes.csv", "w", newline="") as dst:
        r, w = csv.reader(src), csv.writer(dst)
        w.writerow(next(r))
        for row in r:
            if row[0] in names:
                w.writerow(row)
    return {"root": root, "data": data, "photos": photos, "models": models, "owner": owner, "outside": outside,
            "files": files}


def wait_job(client, job: dict, timeout: float = 300) -> dict:
    """Poll a job until it ends; return its last view (and the stages seen, under 'seen')."""
    seen = []
    deadline = time.time() + timeout
    while job["state"] in ("queued", "running"):
        assert time.time() < deadline, f"job {job['id']} still {job['state']} after {timeout} s"
        time.sleep(0.2)
        r = client.get(f"/api/jobs/{job['id']}")
        assert r.status_code == 200, r.text
        job = r.json()
        seen.append((job["stage"], job["done"], job["total"]))
    job["seen"] = seen
    return job


def calibrate_owner(owner_dir: Path, model_path: Path, photos: list[Path], taef2) -> None:
    """A small keyed-bank calibration for the tests (a real one uses thousands of negatives): the
    given real photos plus faces of the unfingerprinted model, through the command line."""
    import tempfile

    from faceprint.cli.main import main

    with tempfile.TemporaryDirectory() as tmp:
        neg = Path(tmp)
        for p in photos:
            (neg / p.name).symlink_to(p)
        code = main(["fingerprint", "calibrate", str(model_path), "--negatives", str(neg), "--faces", "16",
                     "--instances", "0", "--min-negatives", "1", "--owner", str(owner_dir), "-q"])
        assert code == 0
