"""The web page in a real headless Chromium (Debian's chromium-headless-shell, driven by
Playwright) against a real uvicorn server: fit a tiny model, generate, click a face, issue a
copy, verify images, forget, rebalance, and see an error. A screenshot of each page state is
saved outside the repository ($FACEPRINT_SCREENSHOTS, default <tmp>/faceprint-web-screenshots).

Without the browser the test is skipped, except in CI (FACEPRINT_REQUIRE_BROWSER=1), where it
fails: `.ci/run` installs chromium-headless-shell with apt.
"""

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from web_helpers import calibrate_owner, make_env

BROWSER_CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser")
REQUIRED = os.environ.get("FACEPRINT_REQUIRE_BROWSER") == "1"
SHOTS = Path(os.environ.get("FACEPRINT_SCREENSHOTS") or Path(tempfile.gettempdir()) / "faceprint-web-screenshots")


def _missing(why: str):
    if REQUIRED:
        pytest.fail(f"{why} (FACEPRINT_REQUIRE_BROWSER=1: the browser tests must run here)")
    pytest.skip(why)


def _browser_path() -> str:
    env = os.environ.get("FACEPRINT_CHROMIUM")
    if env:
        return env
    for name in BROWSER_CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    _missing("no headless Chromium found (apt-get install chromium-headless-shell, or set FACEPRINT_CHROMIUM)")


@pytest.fixture(scope="module")
def server(celeba_dir, tmp_path_factory):
    try:
        import uvicorn
    except ImportError:
        _missing("uvicorn is not installed")
    from faceprint.web import ServeConfig, create_app

    mp = pytest.MonkeyPatch()
    mp.setenv("FACEPRINT_CACHE", str(tmp_path_factory.mktemp("latent-cache")))  # not the user's cache
    env = make_env(tmp_path_factory.mktemp("webui"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cfg = ServeConfig(models=env["models"], data=(env["data"],), owner=env["owner"], port=port)
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    env["url"] = f"http://127.0.0.1:{port}/"
    yield env
    srv.should_exit = True
    t.join(10)
    mp.undo()


@pytest.fixture(scope="module")
def page(server):
    exe = _browser_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install playwright)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1200, "height": 900})
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.set_default_timeout(90_000)
        yield pg
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _loaded(page, selector: str) -> int:
    """How many images matching ``selector`` have decoded pixels."""
    return page.eval_on_selector_all(selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).length")


def _verdict(page, expected: str) -> None:
    """Wait for the verify section to answer (a verdict or an error), then check it is the expected
    verdict; a failure shows what the page said instead of a bare timeout."""
    page.wait_for_function("document.getElementById('verify-words').textContent.length > 0 || "
                           "document.getElementById('verify-error').textContent.length > 0")
    words, error = page.inner_text("#verify-words"), page.inner_text("#verify-error")
    assert expected in words, {"verdict": words, "error": error, "numbers": page.inner_text("#verify-numbers")}


def test_the_page_end_to_end(page, server, taef2):
    from conftest import CELEBA

    page.goto(server["url"])
    page.wait_for_selector("#model-select option", state="attached")
    assert "no model yet" in page.inner_text("#model-select"), page.inner_text("#model-select")
    for idle in ("#fit-job", "#gen-job", "#fp-job", "#forget-job", "#rb-job", "#face-detail", "#verify-numbers"):
        assert not page.is_visible(idle), (idle, page.eval_on_selector(idle, "e => e.outerHTML.slice(0, 300)"))  # no progress bar or empty panel before anything runs
    shot(page, "01-first-visit")

    # ---- fit from a folder on the server, browsing to it
    page.click("#browse")
    page.click("#folder-list a:text('photos/')")
    page.wait_for_selector("#folder-list span:text('40 photos here')")  # the listing of photos/ arrived
    assert page.input_value("#fit-path") == "photos"
    page.fill("#fit-limit", "40")
    page.fill("#fit-name", "tiny")
    page.click("#fit-go")
    page.wait_for_selector("#fit-job:not([hidden])", timeout=10_000)
    shot(page, "02-fitting-progress")
    page.wait_for_selector("#fit-result:text('Fitted tiny.safetensors on 40 photos')")
    assert not page.is_visible("#fit-job")  # the bar goes away when the job is done
    assert page.input_value("#model-select") == "tiny.safetensors"
    shot(page, "03-fitted")

    # ---- generate, then click a face
    page.fill("#gen-n", "8")
    page.click("#gen-go")
    page.wait_for_function("document.querySelectorAll('#faces img').length == 8")
    page.wait_for_function("[...document.querySelectorAll('#faces img')].every(i => i.complete && i.naturalWidth == 128)")
    shot(page, "04-faces")
    page.click("#faces img >> nth=2")
    page.wait_for_selector("#face-detail:not([hidden])")
    page.wait_for_function("document.getElementById('face-map').naturalWidth > 0")
    page.wait_for_function("[...document.querySelectorAll('#face-sources img')].every(i => i.complete && i.naturalWidth > 0)")
    assert "Passed the copy guard" in page.inner_text("#face-guard")
    assert _loaded(page, "#face-sources img") >= 1  # thumbnails of the training photos it copies
    assert ".jpg" in page.inner_text("#face-sources")
    shot(page, "05-face-details")

    # ---- issue a fingerprinted copy, see it in the registry
    page.fill("#fp-recipient", "Alice")
    page.fill("#fp-instance", "alice-copy")
    page.click("#fp-go")
    page.wait_for_selector("#registry tbody tr")
    assert "alice-copy" in page.inner_text("#registry") and "Alice" in page.inner_text("#registry")
    assert "Issued alice-copy to Alice" in page.inner_text("#fp-result")
    shot(page, "06-issued")

    # ---- verify before any calibration: a real photo is not recognised, the bound not yet checked
    photo = sorted(CELEBA.iterdir())[700]
    page.set_input_files("#verify-file", str(photo))
    _verdict(page, "Not recognised")
    assert "not yet checked" in page.inner_text("#verify-numbers")
    shot(page, "07-verify-not-calibrated")

    # ---- calibrate (library, small), then verify a face of Alice's copy and a real photo
    calibrate_owner(server["owner"], server["models"] / "tiny.safetensors", server["files"], taef2)
    page.reload()
    page.wait_for_selector("#model-select option[value='alice-copy.safetensors']", state="attached")
    page.select_option("#model-select", "alice-copy.safetensors")
    page.fill("#gen-n", "2")
    page.fill("#gen-seed", "5")
    page.click("#gen-go")
    page.wait_for_function("document.querySelectorAll('#faces img').length == 2")
    src = page.get_attribute("#faces img >> nth=0", "src")
    face = SHOTS / "alice-face.png"
    face.write_bytes(page.request.get(server["url"].rstrip("/") + src).body())
    page.set_input_files("#verify-file", str(face))
    _verdict(page, "made by the copy")
    words = page.inner_text("#verify-words")
    assert "'alice-copy'" in words and "'Alice'" in words and "a match needs" in words
    assert "score" in page.inner_text("#verify-numbers") and "checked on" in page.inner_text("#verify-numbers")
    shot(page, "08-verified-alice")
    page.set_input_files("#verify-file", str(photo))
    _verdict(page, "Not recognised")
    shot(page, "09-verified-not-ours")

    # ---- forget a person (three of the training photos), before / after
    page.select_option("#model-select", "tiny.safetensors")
    page.set_input_files("#forget-files", [str(p) for p in server["files"][:3]])
    page.fill("#forget-name", "forgot3")
    page.click("#forget-go")
    page.wait_for_selector("#forget-result:text('Forgot 3 training photos')")
    page.wait_for_function("[...document.querySelectorAll('#forget-ba img')].every(i => i.complete && i.naturalWidth > 0)")
    shot(page, "10-forget")

    # ---- rebalance an attribute
    page.select_option("#model-select", "tiny.safetensors")
    page.fill("#rb-labels", "attributes.csv")
    page.click("#rb-load")
    page.wait_for_selector("#rb-attr option[value='Male']", state="attached")
    page.select_option("#rb-attr", "Male")
    page.fill("#rb-share", "0.5")
    page.click("#rb-go")
    page.wait_for_selector("#rb-result:text('Male: share of faces')")
    page.wait_for_function("[...document.querySelectorAll('#rb-ba img')].every(i => i.complete && i.naturalWidth > 0)")
    shot(page, "11-rebalance")

    # ---- a refused request shows one line, not a traceback
    if not page.eval_on_selector("#fit-panel", "d => d.open"):
        page.click("#fit-panel summary")
    page.fill("#fit-path", "../outside")
    page.fill("#fit-name", "evil")
    page.click("#fit-go")
    page.wait_for_selector("#fit-error:text(\"'..' is refused\")")
    assert "Traceback" not in page.content()
    shot(page, "12-error")
    assert page.errors == [], page.errors
