"""faceprint serve, through FastAPI's test client on the real app (real model, real photos,
real fingerprint key and registry): fit, generate, a face's provenance, issue, registry,
verify, forget, rebalance, downloads; and the security list (traversal, symbolic links,
absolute paths, token, upload size and type, the owner's key, one-line errors)."""

import io
import time
import zipfile

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from faceprint.web import ServeConfig, create_app  # noqa: E402
from web_helpers import calibrate_owner, make_env, wait_job  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(celeba_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the server's latent cache: a temporary one
        mp.setenv("FACEPRINT_CACHE", str(tmp_path_factory.mktemp("latent-cache")))
        yield make_env(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def client(env):
    cfg = ServeConfig(models=env["models"], data=(env["data"],), owner=env["owner"], max_upload_mb=8, max_image_mb=1)
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def fitted(client):
    r = client.post("/api/fit", json={"root": 0, "path": "photos", "name": "tiny", "seed": 0})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json())
    assert job["state"] == "done", job["error"]
    return job


@pytest.fixture(scope="module")
def generated(client, fitted):
    r = client.post("/api/generate", json={"model": "tiny.safetensors", "seed": 3, "n": 6})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json())
    assert job["state"] == "done", job["error"]
    return job


def _one_line_error(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    msg = r.json()["error"]
    assert "\n" not in msg and "Traceback" not in msg and msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------ the page
def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>faceprint</title>" in r.text and "/static/app.js" in r.text
    assert client.get("/static/app.js").status_code == 200
    _one_line_error(client.get("/nope"), 404, "/nope")


# ------------------------------------------------------------------------------ fit
def test_fit_reports_progress_and_lists_the_model(client, fitted, env):
    res = fitted["result"]
    assert res["model"] == "tiny.safetensors" and res["photos"] == 40 and res["skipped"] == 0
    stages = {s for s, _, _ in fitted["seen"]}
    assert "fitting the model (mixture by EM)" in stages or "writing the model file" in stages or \
        any(s.startswith("encoding") for s in stages)
    models = client.get("/api/info").json()["models"]
    assert [m["name"] for m in models] == ["tiny.safetensors"] and models[0]["photos"] == 40
    r = client.get("/files/models/tiny.safetensors")
    assert r.status_code == 200 and r.content == (env["models"] / "tiny.safetensors").read_bytes()


def test_fit_progress_bar_counts_photos(client, env):
    r = client.post("/api/fit", json={"root": 0, "path": "photos", "name": "progress", "limit": 24, "seed": 1})
    job = wait_job(client, r.json())
    assert job["state"] == "done", job["error"]
    # the latents come from the cache (the first fit stored them), so the bar may be short,
    # but every reported count stays within its total
    assert all(0 <= d <= t for _, d, t in job["seen"] if t)


def test_server_answers_while_a_fit_runs(client, env, monkeypatch):
    monkeypatch.setenv("FACEPRINT_CACHE", "off")  # the photos are really decoded and encoded: a long job
    r = client.post("/api/fit-upload", files={"file": ("p.zip", _zip(env["files"][:32]), "application/zip")},
                    data={"name": "uploaded"})
    assert r.status_code == 202, r.text
    job = r.json()
    worst = 0.0
    while job["state"] in ("queued", "running"):
        t = time.perf_counter()
        job = client.get(f"/api/jobs/{job['id']}").json()
        assert client.get("/api/info").status_code == 200
        worst = max(worst, time.perf_counter() - t)
    assert job["state"] == "done", job["error"]
    assert job["result"]["photos"] == 32
    # a server blocked by the fit would answer one poll only after the whole job
    assert worst < min(2.0, job["seconds"] / 2), f"the server took {worst:.2f} s to answer during a " \
                                                  f"{job['seconds']} s fit"


def test_same_model_name_twice_is_refused(client, fitted):
    r = client.post("/api/fit", json={"root": 0, "path": "photos", "name": "tiny"})
    _one_line_error(r, 409, "tiny.safetensors", "choose another name")


def _zip(files, extra=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in files:
            z.write(p, f"person/{p.name}")
        for name, data in extra:
            z.writestr(name, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------ generate
def test_generate_faces_details_and_downloads(client, generated, env):
    res = generated["result"]
    assert len(res["faces"]) == 6 and res["seed"] == 3
    jid = res["job"]
    for name in (res["grid"], res["provenance"], res["faces"][0]["file"], res["faces"][0]["map"]):
        r = client.get(f"/files/outputs/{jid}/{name}")
        assert r.status_code == 200 and len(r.content) > 100
    prov = client.get(f"/files/outputs/{jid}/{res['provenance']}").json()
    assert len(prov["faces"]) == 6 and prov["copy_guard"]["enabled"]
    d = client.get(f"/api/faces/{jid}/{res['faces'][2]['index']}").json()
    assert d["image"].endswith(res["faces"][2]["file"])
    assert d["sources"] and abs(sum(s["share"] for s in d["sources"]) - 1) < 0.5
    assert all(s["name"] in prov["training_photos"] for s in d["sources"])
    assert "copy guard" in d["copy_guard"] and "%" in d["copy_guard"]
    assert prov["method"] == d["method"] != "gan" and d["map"].endswith(res["faces"][2]["map"])
    top = d["sources"][0]
    assert top["thumbnail"]  # the training folder is served: thumbnails
    t = client.get(top["thumbnail"])
    assert t.status_code == 200 and t.content[:8] == b"\x89PNG\r\n\x1a\n"
    _one_line_error(client.get(f"/api/faces/{jid}/999"), 404, "999")


def test_gan_faces_say_they_copy_nothing_and_have_no_map(client, fitted, env):
    """A model with a learned generator (faceprint.gan): its faces get no provenance map, no
    sources, and a sentence that says why, instead of an empty map and "0% from one photo"."""
    import warnings
    from dataclasses import replace

    from faceprint.gan.model import PRESETS, LatentGAN, SmallDataWarning
    from faceprint.latent.generator import Generator

    gen = Generator.load(env["models"] / "tiny.safetensors")
    cfg = replace(PRESETS["tiny"], z_dim=16, g_channels=(16, 16, 8), d_width=8, batch_size=8, iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallDataWarning)
        gen.latent_model_ = LatentGAN(cfg).fit(gen.bank_.float(), seed=0)
    # two iterations leave G drawing near the mean latent, which the copy guard rightly refuses
    # (closer to the training photos than new photos come); spread wider, its faces pass
    gen.latent_model_.std_ = gen.latent_model_.std_ * 4
    gen.save(env["models"] / "tiny-gan.safetensors")
    r = client.post("/api/generate", json={"model": "tiny-gan.safetensors", "seed": 1, "n": 3})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json())
    assert job["state"] == "done", job["error"]
    res = job["result"]
    assert [f["map"] for f in res["faces"]] == [None] * 3
    prov = client.get(f"/files/outputs/{res['job']}/{res['provenance']}").json()
    assert prov["method"] == "gan" and "no provenance map" in prov["note"]
    assert all("latent_map" not in f for f in prov["faces"])
    d = client.get(f"/api/faces/{res['job']}/{res['faces'][0]['index']}").json()
    assert d["map"] is None and d["sources"] == [] and d["method"] == "gan"
    assert "learned generator" in d["copy_guard"] and "copy guard" in d["copy_guard"]


def test_same_seed_same_faces_also_when_two_jobs_run_at_once(client, generated):
    ids = [client.post("/api/generate", json={"model": "tiny.safetensors", "seed": s, "n": 6}).json()
           for s in (3, 4)]
    jobs = [wait_job(client, j) for j in ids]
    assert all(j["state"] == "done" for j in jobs)
    a, b = (client.get(f"/files/outputs/{j['id']}/{j['result']['faces'][0]['file']}").content for j in jobs)
    ref = client.get(f"/files/outputs/{generated['result']['job']}/{generated['result']['faces'][0]['file']}").content
    assert a == ref and b != ref  # each job wrote its own files, and seed 3 gives the same faces


def test_thumbnail_names_only_outside_served_folders(env, fitted, tmp_path):
    cfg = ServeConfig(models=env["models"], data=(), owner=env["owner"], work=tmp_path / "w")
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        job = wait_job(c, c.post("/api/generate", json={"model": "tiny.safetensors", "n": 2}).json())
        d = c.get(f"/api/faces/{job['id']}/0").json()
        assert d["sources"] and all(s["thumbnail"] is None and s["name"] for s in d["sources"])
        _one_line_error(c.get("/api/thumb?model=tiny.safetensors&photo=0"), 404, "not in a served data folder")


# ------------------------------------------------------------------------------ fingerprint
@pytest.fixture(scope="module")
def issued(client, fitted):
    r = client.post("/api/issue", json={"model": "tiny.safetensors", "recipient": "Alice", "instance": "alice-copy"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json())
    assert job["state"] == "done", job["error"]
    return job


def test_issue_and_registry(client, issued, env):
    res = issued["result"]
    assert res["instance"] == "alice-copy" and res["recipient"] == "Alice" and len(res["code_prefix"]) == 8
    assert (env["models"] / "alice-copy.safetensors").is_file()
    reg = client.get("/api/registry").json()
    assert [(e["instance"], e["recipient"]) for e in reg] == [("alice-copy", "Alice")]
    info = client.get("/api/info").json()
    assert info["owner"] == {"has_key": True, "mechanism": "keyed-bank", "has_calibration": False, "instances": 1}
    copy = [m for m in info["models"] if m["name"] == "alice-copy.safetensors"][0]
    assert copy["instance"] == "alice-copy" and copy["recipient"] == "Alice"


def test_owner_key_is_never_served(client, issued, env):
    key = (env["owner"] / "secret.safetensors").read_bytes()
    for url in ("/api/info", "/api/registry", "/api/jobs"):
        body = client.get(url).content
        assert b"secret.safetensors" not in body and str(env["owner"]).encode() not in body
    # even with the owner's folder as the models folder, and a key file of the datalevel-bank mechanism
    (env["owner"] / "key.safetensors").write_bytes(key)
    cfg = ServeConfig(models=env["owner"], owner=env["owner"], work=env["root"] / "w2")
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        assert c.get("/api/info").json()["models"] == []
        for url in ("/files/models/key.safetensors", "/files/models/secret.safetensors", "/files/models/registry.sqlite",
                    "/files/models/calibration.safetensors"):
            r = c.get(url)
            assert r.status_code in (400, 403, 404) and r.content != key, url
    (env["owner"] / "key.safetensors").unlink()
    # a key-named file in a served models folder outside the owner's folder is not served either
    (env["models"] / "secret.safetensors").write_bytes(key)
    _one_line_error(client.get("/files/models/secret.safetensors"), 403, "never served")
    (env["models"] / "secret.safetensors").unlink()


def test_verify_before_calibration_says_the_bound_is_not_yet_checked(client, issued, env):
    r = client.post("/api/verify", files={"file": ("a.jpg", env["files"][0].read_bytes(), "image/jpeg")})
    v = r.json()
    assert r.status_code == 200 and not v["match"] and v["words"].startswith("Not recognised"), v
    assert "not yet checked" in dict(v["details"])["bound checked"]


def test_verify_finds_the_copy_and_refuses_a_real_photo(client, issued, env, taef2):
    calibrate_owner(env["owner"], env["models"] / "tiny.safetensors", env["files"][:40], taef2)
    job = wait_job(client, client.post("/api/generate", json={"model": "alice-copy.safetensors", "seed": 11,
                                                               "n": 2}).json())
    face = client.get(f"/files/outputs/{job['id']}/{job['result']['faces'][0]['file']}").content
    v = client.post("/api/verify", files={"file": ("face.png", face, "image/png")}).json()
    assert v["match"] and v["instance"] == "alice-copy" and v["recipient"] == "Alice", v
    assert v["score"] > v["threshold"] and 0 < v["fpr_upper_bound"] <= 1e-3
    assert "alice-copy" in v["words"] and "Alice" in v["words"] and "a match needs" in v["words"]
    details = dict(v["details"])  # what the page's table shows
    assert details["verdict"] == "match" and details["copy"] == "alice-copy" and "a match needs" in details["score"]
    assert "checked on" in details["bound checked"]
    from conftest import CELEBA

    real = sorted(CELEBA.iterdir())[500].read_bytes()  # a photo the model never saw
    v = client.post("/api/verify", files={"file": ("real.jpg", real, "image/jpeg")}).json()
    assert not v["match"] and v["words"].startswith("Not recognised")


# ------------------------------------------------------------------------------ control
def test_forget_uploaded_person(client, fitted, env):
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in env["files"][:3]]
    r = client.post("/api/forget", data={"model": "tiny.safetensors", "name": "forgot3"}, files=files)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json())
    assert job["state"] == "done", job["error"]
    res = job["result"]
    assert res["forgotten"] == 3 and res["not_training_photos"] == 0
    for side in ("before", "after"):
        assert client.get(f"/files/outputs/{res['job']}/{res[side]['grid']}").status_code == 200
    from faceprint.latent.generator import Generator

    g = Generator.load(env["models"] / "forgot3.safetensors", autoencoder=None)
    assert g.n_photos == 37 and not {p.name for p in env["files"][:3]} & set(g.training_.relpaths)


def test_forget_photos_that_are_not_training_photos(client, fitted):
    from conftest import CELEBA

    p = sorted(CELEBA.iterdir())[600]
    r = client.post("/api/forget", data={"model": "tiny.safetensors", "name": "nothing"},
                    files=[("files", (p.name, p.read_bytes(), "image/jpeg"))])
    job = wait_job(client, r.json())
    assert job["state"] == "failed" and "none of the 1 uploaded photos is a training photo" in job["error"]


def test_rebalance_an_attribute(client, fitted):
    assert "Male" in client.get("/api/labels?root=0&path=attributes.csv").json()["columns"]
    r = client.post("/api/rebalance", json={"model": "tiny.safetensors", "name": "balanced", "root": 0,
                                            "labels": "attributes.csv", "attribute": "Male", "share": 0.5})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json())
    assert job["state"] == "done", job["error"]
    res = job["result"]
    assert abs(res["share_after"] - 0.5) < 0.05 and res["value"] == "1"
    assert len(res["before"]["faces"]) == len(res["after"]["faces"]) == 8


# ------------------------------------------------------------------------------ security
@pytest.mark.parametrize("path", ["../outside", "/etc", "photos/../../outside", "outside-link", "outside-link/",
                                  "C:/Windows", "photos\\..\\..", ".hidden", "%2e%2e"])
def test_fit_folder_cannot_leave_the_served_folder(client, path):
    r = client.post("/api/fit", json={"root": 0, "path": path, "name": "evil"})
    assert r.status_code in (400, 403, 404), r.text
    assert "Traceback" not in r.text and r.json()["error"]
    r = client.get("/api/folders", params={"root": 0, "path": path})
    assert r.status_code in (400, 403, 404) and r.json()["error"]


def test_symlink_and_absolute_and_dotdot_messages(client):
    _one_line_error(client.get("/api/folders", params={"root": 0, "path": "outside-link"}), 403, "symbolic link")
    _one_line_error(client.get("/api/folders", params={"root": 0, "path": "/etc"}), 403, "absolute")
    _one_line_error(client.get("/api/folders", params={"root": 0, "path": "../outside"}), 403, "'..'")
    _one_line_error(client.get("/api/folders", params={"root": 7, "path": ""}), 400, "data folder number")


@pytest.mark.parametrize("url", ["/files/models/..%2F..%2Fetc%2Fpasswd", "/files/models/%2Fetc%2Fpasswd",
                                 "/files/outputs/nojob/..%2F..%2Fetc%2Fpasswd", "/files/models/../owner/key.safetensors",
                                 "/api/thumb?model=..%2Fowner%2Fkey.safetensors&photo=0"])
def test_downloads_cannot_leave_the_served_folders(client, issued, url):
    r = client.get(url)
    assert r.status_code in (400, 403, 404), (url, r.status_code)
    assert b"root:" not in r.content and r.json()["error"]


def test_output_file_traversal_inside_a_job(client, generated):
    jid = generated["result"]["job"]
    for name in ("..%2F..%2Ftiny.safetensors", "%2Fetc%2Fpasswd", ".hidden"):
        r = client.get(f"/files/outputs/{jid}/{name}")
        assert r.status_code in (400, 403, 404), name


def test_oversize_uploads_are_refused(client, fitted):
    big = b"\xff\xd8\xff" + b"0" * (2 * 1024 * 1024)  # 2 MB: over the 1 MB image limit
    _one_line_error(client.post("/api/verify", files={"file": ("big.jpg", big, "image/jpeg")}), 413, "1 MB")
    huge = b"PK" + b"0" * (9 * 1024 * 1024)  # 9 MB: over the 8 MB request limit (Content-Length)
    _one_line_error(client.post("/api/fit-upload", files={"file": ("h.zip", huge, "application/zip")},
                                data={"name": "huge"}), 413, "8 MB")

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(10):
            yield b"0" * (1024 * 1024)

    r = client.post("/api/verify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    _one_line_error(r, 413, "8 MB")


def test_wrong_types_are_refused(client, fitted, env):
    _one_line_error(client.post("/api/verify", files={"file": ("a.jpg", b"hello, not an image", "image/jpeg")}),
                    415, "not an image")
    _one_line_error(client.post("/api/fit-upload", files={"file": ("p.zip", b"not a zip at all", "application/zip")},
                                data={"name": "z1"}), 415, "not a zip")
    evil = _zip(env["files"][:2], extra=[("../../escape.jpg", b"\xff\xd8\xff")])
    _one_line_error(client.post("/api/fit-upload", files={"file": ("e.zip", evil, "application/zip")},
                                data={"name": "z2"}), 400, "'..'")
    assert not (env["root"] / "escape.jpg").exists()
    _one_line_error(client.post("/api/fit-upload", files={"file": ("t.zip", _zip([], extra=[("a.txt", b"x")]),
                                                                   "application/zip")}, data={"name": "z3"}),
                    415, "no photos")
    _one_line_error(client.post("/api/forget", data={"model": "tiny.safetensors", "name": "x"},
                                files=[("files", ("a.png", b"MZ\x90\x00 an exe", "image/png"))]), 415, "not an image")


def test_bad_requests_are_one_line(client, fitted, env):
    _one_line_error(client.post("/api/generate", json={"model": "tiny.safetensors", "n": 1000}), 422, "n")
    _one_line_error(client.post("/api/generate", json={"model": "missing.safetensors"}), 404, "missing.safetensors")
    _one_line_error(client.post("/api/generate", json={"model": "../x.safetensors"}), 403, "'..'")
    _one_line_error(client.post("/api/fit", json={"root": 0, "path": "photos", "name": "bad/name"}), 400, "name")
    _one_line_error(client.post("/api/generate", content=b"{nope", headers={"content-type": "application/json"}),
                    422)
    (env["models"] / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    r = client.post("/api/generate", json={"model": "broken.safetensors"})
    job = wait_job(client, r.json())
    assert job["state"] == "failed" and "broken.safetensors" in job["error"] and "\n" not in job["error"]
    assert "broken.safetensors" not in [m["name"] for m in client.get("/api/info").json()["models"]]
    (env["models"] / "broken.safetensors").unlink()


def test_loopback_server_refuses_foreign_host_names(env):
    cfg = ServeConfig(models=env["models"], owner=env["owner"], work=env["root"] / "w3")
    with TestClient(create_app(cfg), base_url="http://evil.example") as c:
        _one_line_error(c.get("/api/info"), 421, "localhost")
    with TestClient(create_app(cfg), base_url="http://localhost:8000") as c:
        assert c.get("/api/info").status_code == 200


def test_token_required_off_loopback(env):
    cfg = ServeConfig(models=env["models"], owner=env["owner"], work=env["root"] / "w4", host="0.0.0.0")
    assert cfg.needs_token and len(cfg.token) >= 16  # made at start when none is given
    with TestClient(create_app(cfg), base_url="http://192.0.2.7:8000") as c:
        _one_line_error(c.get("/api/info"), 401, "token")
        _one_line_error(c.get("/"), 401, "token")
        _one_line_error(c.get("/api/info", headers={"Authorization": "Bearer " + "x" * 32}), 401, "token")
        _one_line_error(c.get("/files/models/tiny.safetensors"), 401)
        assert c.get("/api/info", headers={"Authorization": f"Bearer {cfg.token}"}).status_code == 200
        r = c.get(f"/?token={cfg.token}", follow_redirects=False)
        assert r.status_code == 303 and "faceprint_token" in r.headers["set-cookie"]
        assert "httponly" in r.headers["set-cookie"].lower()
        assert c.get("/api/info").status_code == 200  # the cookie now carries it
    with TestClient(create_app(cfg), base_url="http://192.0.2.7:8000") as c:
        _one_line_error(c.get("/?token=wrong-token-wrong-token"), 401, "token")


def test_config_refusals():
    from faceprint.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 16"):
        ServeConfig(models="/tmp/x-models", token="short")
    with pytest.raises(ConfigError, match="--data"):
        ServeConfig(models="/tmp/x-models", data=("/no/such/folder",))


def test_cross_site_posts_are_refused(client, fitted):
    body = {"model": "tiny.safetensors", "n": 1}
    _one_line_error(client.post("/api/generate", json=body, headers={"Origin": "http://evil.example"}), 403,
                    "cross-site")
    _one_line_error(client.post("/api/generate", json=body, headers={"Sec-Fetch-Site": "cross-site"}), 403,
                    "cross-site")
    r = client.post("/api/generate", json=body, headers={"Origin": "http://127.0.0.1"})
    assert r.status_code == 202  # the page's own origin
    wait_job(client, r.json())
