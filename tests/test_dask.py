"""faceprint.distributed: chunks on a real Dask LocalCluster (two worker processes on
127.0.0.1) give the same results as one process, keep order, report progress, resubmit the
chunk of a killed worker, and do not retry a chunk's own error."""

import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")
import cloudpickle  # noqa: E402  (comes with dask)

from faceprint.distributed import map_chunks, parse_dask  # noqa: E402
from faceprint.distributed.cluster import DaskSpec  # noqa: E402
from faceprint.errors import InputError, SkippedImageWarning  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# the helper chunk functions below live in this test module, which the workers cannot import
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client():
    import dask

    # allowed-failures 0: a killed worker's task fails at once with KilledWorker, so the test of
    # the kill exercises map_chunks' own resubmission, not only Dask's rescheduling
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                           dashboard_address=None)
        c = distributed.Client(cluster)
        yield c
        c.close()
        cluster.close()


# ------------------------------------------------------------------------ the --dask option
def test_parse_dask_forms():
    assert parse_dask("local") == DaskSpec()
    assert parse_dask("local:3") == DaskSpec(workers=3)
    assert parse_dask("tcp://10.0.0.5:8786") == DaskSpec(address="tcp://10.0.0.5:8786")
    assert parse_dask("10.0.0.5:8786") == DaskSpec(address="tcp://10.0.0.5:8786")
    for bad in ("", "local:0", "local:x", "remote", "http://a b"):
        with pytest.raises(InputError, match="--dask"):
            parse_dask(bad)


def test_cli_refuses_a_bad_dask_value(capsys):
    from faceprint.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "somewhere", "-o", "m.safetensors", "--dask", "local:0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dask" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unreachable_scheduler_is_one_clear_error():
    from faceprint.distributed import open_client

    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    with pytest.raises(InputError, match="no Dask scheduler answered"):
        with open_client(f"tcp://127.0.0.1:{port}"):
            pass


# ------------------------------------------------------------------------ map_chunks
def _square_sum(chunk, offset):
    return [x * x + offset for x in chunk]


def test_map_chunks_order_and_progress_match_one_process(client):
    items = list(range(37))
    seen = []
    here = map_chunks(_square_sum, items, chunk_size=5, shared=(3,))
    there = map_chunks(_square_sum, items, chunk_size=5, shared=(3,), client=client,
                       progress=lambda d, t: seen.append((d, t)))
    assert there == here == [[x * x + 3 for x in items[s:s + 5]] for s in range(0, 37, 5)]
    assert [t for _, t in seen] == [37] * 8 and sorted(d for d, _ in seen) == [d for d, _ in seen]
    assert seen[-1] == (37, 37)


def _slow_marked(chunk, folder):
    Path(folder, f"{chunk[0]}-{os.getpid()}").touch()
    time.sleep(1.5)
    return [x + 1000 for x in chunk]


def test_killed_worker_chunk_is_resubmitted(client, tmp_path):
    items = list(range(8))
    out = {}

    def run():
        try:
            out["result"] = map_chunks(_slow_marked, items, chunk_size=2, client=client, shared=(str(tmp_path),))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 60
    while not any(tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    victim = next(tmp_path.iterdir())
    pid = int(victim.name.split("-")[1])
    os.kill(pid, signal.SIGKILL)  # the worker dies in the middle of its chunk
    t.join(180)
    assert not t.is_alive()
    assert "error" not in out, out.get("error")
    assert out["result"] == [[x + 1000 for x in items[s:s + 2]] for s in range(0, 8, 2)]
    starts = [p.name.split("-")[0] for p in tmp_path.iterdir()]
    killed_chunk = victim.name.split("-")[0]
    assert starts.count(killed_chunk) == 2  # run again, on another (or the restarted) worker
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the dead worker


def _fails(chunk, folder):
    Path(folder, f"{chunk[0]}-{time.time_ns()}").touch()
    if 4 in chunk:
        raise InputError(f"item {chunk} is bad")
    return chunk


def test_chunk_error_is_raised_not_retried(client, tmp_path):
    with pytest.raises(InputError, match=r"item \[4, 5\] is bad"):
        map_chunks(_fails, list(range(8)), chunk_size=2, client=client, shared=(str(tmp_path),))
    assert sum(p.name.startswith("4-") for p in tmp_path.iterdir()) == 1


# ------------------------------------------------------------------------ faceprint's stages
@pytest.fixture(scope="module")
def photo_folder(celeba_dir, tmp_path_factory):
    """24 real photos and one corrupt file (a copy outside the repository, deleted after)."""
    d = tmp_path_factory.mktemp("photos")
    for p in sorted(celeba_dir.iterdir())[:24]:
        shutil.copy(p, d / p.name)
    (d / "000013b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def _encode(folder, ae, client, strict=False):
    from faceprint.data import FaceFolder, encode_folder

    progress = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedImageWarning)
        ls = encode_folder(FaceFolder(folder, size=128, strict=strict), ae, cache=False, client=client,
                           on_progress=lambda d, t: progress.append((d, t)))
    return ls, [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)], progress


def test_encode_folder_on_dask_is_identical(client, photo_folder, taef2):
    ref, ref_warn, ref_prog = _encode(photo_folder, taef2, None)
    got, got_warn, got_prog = _encode(photo_folder, taef2, client)
    assert len(ref) == 24 and got.relpaths == ref.relpaths
    assert torch.equal(got.latents, ref.latents)  # bit for bit
    assert got.skipped == ref.skipped and [r for r, _ in got.skipped] == ["000013b.jpg"]
    assert got_warn == ref_warn and len(got_warn) == 1
    assert ref_prog[-1] == got_prog[-1] == (25, 25)
    assert got.data_hash == ref.data_hash


def test_encode_folder_on_dask_strict_raises_the_bad_photo(client, photo_folder, taef2):
    from faceprint.errors import BadImageError

    with pytest.raises(BadImageError, match="000013b.jpg"):
        _encode(photo_folder, taef2, client, strict=True)


def test_fit_cli_with_dask_address_writes_the_same_model(client, photo_folder, tmp_path):
    from faceprint.cli.main import main
    from faceprint.latent.generator import Generator

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["--no-cache", "-q", "--components", "1", "--seed", "0"]
    assert main(["fit", str(photo_folder), "-o", str(a), *common]) == 0
    assert main(["fit", str(photo_folder), "-o", str(b), *common, "--dask", client.scheduler.address]) == 0
    ga, gb = Generator.load(a, autoencoder=None), Generator.load(b, autoencoder=None)
    assert torch.equal(ga.bank_, gb.bank_)
    assert torch.equal(ga.mixture_.means_, gb.mixture_.means_)


def test_features_and_evaluate_on_dask_are_identical(client, photo_folder, taef2, tmp_path):
    from faceprint.distributed.stages import features
    from faceprint.latent.generator import Generator, GeneratorConfig
    from faceprint.metrics import InceptionFeatures
    from faceprint.metrics.evaluate import evaluate_generator

    ls, _, _ = _encode(photo_folder, taef2, None)
    gen = Generator(GeneratorConfig(components=1), autoencoder=taef2).fit(ls, seed=0)
    inc = InceptionFeatures.load()
    z = gen.sample_latents(6, seed=1).latents
    here = features(z, autoencoder=taef2, inception=inc, chunk_size=4)
    there = features(z, autoencoder=taef2, inception=inc, chunk_size=4, client=client)
    assert np.array_equal(here, there) and here.shape == (6, 2048)
    assert np.array_equal(here, inc.features(taef2.decode(z)))
    real = tmp_path / "real"
    real.mkdir()
    from conftest import CELEBA

    for p in sorted(CELEBA.iterdir())[20:30]:  # 4 training photos (left out) and 6 held-out ones
        shutil.copy(p, real / p.name)
    kw = dict(n=6, seed=0, real_limit=6, inception=inc, batch=4)
    a = evaluate_generator(gen, real, **kw)
    b = evaluate_generator(gen, real, client=client, **kw)
    assert a.n_real == b.n_real == 6 and a.n_real_in_training == 4
    for k in ("fid", "kid", "precision", "recall", "density", "coverage"):
        assert getattr(a, k) == getattr(b, k), k
    assert a.memorization_inception == b.memorization_inception


def test_fingerprint_readout_of_files_on_dask_is_identical(client, photo_folder, taef2):
    """decode_image_files: what `fingerprint calibrate` (negatives) and `verify` (folders) read."""
    from faceprint.data.folder import load_image
    from faceprint.distributed.stages import decode_image_files
    from faceprint.fingerprint.datalevel import BankFingerprintConfig, BankFingerprinter
    from faceprint.fingerprint.owner import decode_images

    ls, _, _ = _encode(photo_folder, taef2, None)
    key = BankFingerprinter(BankFingerprintConfig(key_seed=1)).fit(ls.latents, taef2)
    files = sorted(p for p in photo_folder.iterdir() if p.name != "000013b.jpg")[:10]
    ref = decode_images(torch.stack([load_image(f, 128) for f in files]), key, taef2)
    here = decode_image_files(files, key, taef2, batch=4)
    there = decode_image_files(files, key, taef2, batch=4, client=client)
    assert ref.shape == (10, 128) and ref.dtype == torch.bool
    assert torch.equal(here, ref) and torch.equal(there, ref)
