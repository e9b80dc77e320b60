"""The FastAPI application of ``faceprint serve``: routes, the guard, the error handlers."""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import shutil
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import FaceprintError
from . import actions, fingerprint_actions
from .config import MAX_FACES, ServeConfig, is_loopback
from .jobs import JobManager, one_line
from .paths import WebError, check_name, inside

log = logging.getLogger("faceprint.web")
STATIC = Path(__file__).parent / "static"
COOKIE = "faceprint_token"
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """Pure ASGI middleware in front of every route.

    - Host header: when bound to loopback, only localhost / 127.x / [::1] names are answered
      (a web page elsewhere cannot reach the server through DNS rebinding).
    - Origin: a POST from a page of another origin is refused (no cross-site request forgery).
    - Token: when the server has one, every request carries it (header ``Authorization: Bearer``
      or the cookie set by opening ``/?token=...``), compared in constant time.
    - Size: a request body larger than the upload limit is refused (413), from its
      Content-Length or, without one, while it streams in.
    """

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cfg = self.config
        if is_loopback(cfg.host):
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if not is_loopback(name.strip("[]")):
                return await _error(421, f"this server answers only to localhost addresses, not {host!r}")(
                    scope, receive, send)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            # a page of another site must not drive this server through the user's browser (CSRF):
            # browsers name the page's origin on every cross-origin POST
            origin = headers.get("origin")
            if origin is not None:
                from urllib.parse import urlsplit

                if urlsplit(origin).netloc != headers.get("host", ""):
                    return await _error(403, f"cross-site request from {origin!r} refused; use the page this "
                                             "server serves")(scope, receive, send)
            if headers.get("sec-fetch-site") == "cross-site":
                return await _error(403, "cross-site request refused; use the page this server serves")(
                    scope, receive, send)
        if cfg.needs_token:
            from urllib.parse import parse_qs

            given = None
            auth = headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if given is None:
                for part in headers.get("cookie", "").split(";"):
                    k, _, v = part.strip().partition("=")
                    if k == COOKIE:
                        given = v
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if given is None and "token" in query and scope["method"] == "GET" and scope["path"] == "/":
                if hmac.compare_digest(query["token"][0].encode(), cfg.token.encode()):
                    r = RedirectResponse("/", status_code=303)
                    r.set_cookie(COOKIE, cfg.token, httponly=True, samesite="strict")
                    return await r(scope, receive, send)
            if given is None or not hmac.compare_digest(given.encode(), cfg.token.encode()):
                return await _error(401, "this server needs its access token: open the address `faceprint serve` "
                                         "printed (it ends in ?token=...)")(scope, receive, send)
        limit = cfg.max_upload_bytes
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _error(400, "bad Content-Length header")(scope, receive, send)
            if too_big:
                return await _error(413, f"the upload is {int(length) / 2**20:.1f} MB; this server accepts at most "
                                         f"{limit / 2**20:.0f} MB per request")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise WebError(413, f"the upload exceeds {limit / 2**20:.0f} MB; this server accepts at most "
                                        "that per request")
            return message

        return await self.app(scope, counted, send)


# ------------------------------------------------------------------------------- request bodies
class FitRequest(BaseModel):
    root: int = 0
    path: str
    name: str
    limit: int | None = Field(default=None, ge=2, le=1_000_000)
    components: int | None = Field(default=None, ge=1, le=1024)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)


class GenerateRequest(BaseModel):
    model: str
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    n: int = Field(default=16, ge=1, le=MAX_FACES)


class IssueRequest(BaseModel):
    model: str
    recipient: str = Field(min_length=1, max_length=200)
    instance: str


class RebalanceRequest(BaseModel):
    model: str
    name: str
    root: int = 0
    labels: str
    attribute: str = Field(min_length=1, max_length=200)
    share: float = Field(gt=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)


def _model_file(config: ServeConfig, name: str) -> Path:
    name = check_name(name, "model name")
    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    return config.models / f"{check_name(stem, 'model name')}.safetensors"


async def _save_upload(upload, folder: Path, limit: int, *, image: bool) -> Path:
    """An uploaded file written into ``folder`` under a safe name, size-checked and, for
    images, type-checked by its first bytes."""
    from pathlib import PurePath

    raw = PurePath((upload.filename or "upload").replace("\\", "/")).name or "upload"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in raw).lstrip(".")[:80] or "upload"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{secrets.token_hex(3)}_{safe}"
    size = 0
    head = b""
    with open(target, "wb") as out:
        while chunk := await upload.read(1 << 20):
            if not head:
                head = chunk[:16]
            size += len(chunk)
            if size > limit:
                out.close()
                target.unlink()
                raise WebError(413, f"{raw!r} is larger than {limit / 2**20:.0f} MB; upload a smaller file")
            out.write(chunk)
    if image and not (head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        target.unlink()
        raise WebError(415, f"{raw!r} is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF); upload a photo")
    return target


# ------------------------------------------------------------------------------- the app
def create_app(config: ServeConfig) -> FastAPI:
    config.outputs.mkdir(parents=True, exist_ok=True)
    config.models.mkdir(parents=True, exist_ok=True)
    jobs = JobManager(config.outputs, threads=config.job_threads)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        jobs.shutdown()

    app = FastAPI(title="faceprint", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_middleware(Guard, config=config)
    models = actions.Models(config)
    uploads = config.work / "uploads"
    app.state.config, app.state.jobs, app.state.models = config, jobs, models

    # ---------------------------------------------------------------- errors: one line each
    @app.exception_handler(WebError)
    async def _web_error(request, e: WebError):
        return _error(e.status, e.message)

    @app.exception_handler(FaceprintError)
    async def _faceprint_error(request, e: FaceprintError):
        return _error(400, one_line(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errs = e.errors()
        if errs:
            first = errs[0]
            where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
            return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid value')}")
        return _error(422, "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _error(404, f"no page or API route {request.url.path!r}")
        if e.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path!r}")
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error(500, one_line(e))

    # ---------------------------------------------------------------- page
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---------------------------------------------------------------- reading
    @app.get("/api/info")
    def info():
        return {"version": __version__, "models": models.listing(),
                "data": [{"root": i, "name": d.name} for i, d in enumerate(config.data)],
                "owner": fingerprint_actions.status(config), "max_faces": MAX_FACES,
                "max_upload_mb": config.max_upload_mb, "max_image_mb": config.max_image_mb}

    @app.get("/api/folders")
    def folders(root: int = 0, path: str = ""):
        return actions.list_folder(config, root, path)

    @app.get("/api/labels")
    def labels(root: int = 0, path: str = ""):
        p = actions.data_folder(config, root, path)
        if not p.is_file() or p.suffix.lower() != ".csv":
            raise WebError(404, f"{path!r} is not a CSV file in data folder {root}")
        return {"columns": actions.label_columns(p)}

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        return jobs.get(job_id).view()

    @app.get("/api/jobs")
    def job_list():
        return [j.view() for j in jobs.all()][-50:]

    @app.get("/api/faces/{job_id}/{index}")
    def face(job_id: str, index: int):
        return actions.face_details(config, models, jobs.get(job_id), index)

    @app.get("/api/thumb")
    def thumb(model: str, photo: int):
        gen = models.load(model)
        p = actions.training_photo(config, gen, photo)
        if p is None:
            raise WebError(404, f"training photo {photo} of {model} is not in a served data folder (only its name "
                                "is shown)")
        return Response(actions.thumbnail_png(p), media_type="image/png")

    @app.get("/api/registry")
    def registry():
        return fingerprint_actions.registry(config)

    # ---------------------------------------------------------------- jobs
    def _start(kind, fn, output: Path | None = None):
        if output is not None:
            jobs.reserve(output)
            inner = fn

            def fn(job):  # noqa: F811 - the reservation ends with the job
                try:
                    return inner(job)
                finally:
                    jobs.release(output)
        try:
            j = jobs.submit(kind, fn)
        except BaseException:
            if output is not None:
                jobs.release(output)
            raise
        return JSONResponse(j.view(), status_code=202)

    @app.post("/api/fit")
    def fit(req: FitRequest):
        folder = actions.data_folder(config, req.root, req.path)
        if not folder.is_dir():
            raise WebError(404, f"folder {req.path!r} does not exist in data folder {req.root}")
        out = _model_file(config, req.name)
        return _start("fit", actions.fit_job(models, folder, out, limit=req.limit, components=req.components,
                                             seed=req.seed), out)

    @app.post("/api/fit-upload")
    async def fit_upload(request: Request):
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise WebError(400, "attach a zip of photos as 'file'")
        out = _model_file(config, str(form.get("name") or ""))
        limit = _int_field(form.get("limit"), "limit", 2, 1_000_000)
        seed = _int_field(form.get("seed"), "seed", 0, 2**63 - 1) or 0
        tmp = uploads / secrets.token_hex(6)
        try:
            z = await _save_upload(upload, tmp, config.max_upload_bytes, image=False)
            actions.extract_zip(z, tmp / "photos", config.max_upload_bytes * 4)
            z.unlink()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        def run(job):
            # the photos stay beside the job's outputs, so thumbnails and forgetting keep working
            dest = job.folder / "photos"
            shutil.move(str(tmp / "photos"), dest)
            shutil.rmtree(tmp, ignore_errors=True)
            return actions.fit_job(models, dest, out, limit=limit, components=None, seed=seed)(job)

        return _start("fit", run, out)

    @app.post("/api/generate")
    def generate(req: GenerateRequest):
        models.path(req.model)
        return _start("generate", actions.generate_job(models, req.model, req.n, req.seed))

    @app.post("/api/issue")
    def issue(req: IssueRequest):
        models.path(req.model)
        instance = check_name(req.instance, "instance name")
        out = _model_file(config, instance)
        return _start("issue", fingerprint_actions.issue_job(models, config, req.model, req.recipient.strip(),
                                                             instance, out), out)

    @app.post("/api/verify")
    async def verify(request: Request):
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise WebError(400, "attach the image to verify as 'file'")
        tmp = uploads / secrets.token_hex(6)
        try:
            p = await _save_upload(upload, tmp, config.max_image_bytes, image=True)
            # the verification is CPU work: off the event loop, so the server keeps answering meanwhile
            return await run_in_threadpool(fingerprint_actions.verify_image, models, config, p)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @app.post("/api/forget")
    async def forget(request: Request):
        form = await request.form(max_files=1000, max_fields=10)
        model = str(form.get("model") or "")
        models.path(model)
        out = _model_file(config, str(form.get("name") or ""))
        seed = _int_field(form.get("seed"), "seed", 0, 2**63 - 1) or 0
        files = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not files:
            raise WebError(400, "attach the person's photos as 'files'")
        tmp = uploads / secrets.token_hex(6)
        try:
            paths = [await _save_upload(f, tmp, config.max_image_bytes, image=True) for f in files]
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        inner = actions.forget_job(models, model, paths, out, seed)

        def run(job):
            try:
                return inner(job)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return _start("forget", run, out)

    @app.post("/api/rebalance")
    def rebalance(req: RebalanceRequest):
        models.path(req.model)
        csv = actions.data_folder(config, req.root, req.labels)
        if not csv.is_file() or csv.suffix.lower() != ".csv":
            raise WebError(404, f"{req.labels!r} is not a CSV file in data folder {req.root}")
        out = _model_file(config, req.name)
        return _start("rebalance", actions.rebalance_job(models, req.model, csv, req.attribute, req.share, out,
                                                         req.seed), out)

    # ---------------------------------------------------------------- downloads
    @app.get("/files/models/{name}")
    def model_file(name: str):
        p = models.path(name)
        return FileResponse(p, media_type="application/octet-stream", filename=p.name)

    @app.get("/files/outputs/{job_id}/{name}")
    def output_file(job_id: str, name: str):
        j = jobs.get(job_id)
        p = inside(j.folder, name, "file", owner=config.owner_folder())
        if not p.is_file():
            raise WebError(404, f"job {job_id} wrote no file {name!r}")
        media = {".png": "image/png", ".json": "application/json"}.get(p.suffix.lower(), "application/octet-stream")
        return FileResponse(p, media_type=media, filename=p.name if media != "image/png" else None,
                            headers={"X-Content-Type-Options": "nosniff"})

    return app


def _int_field(value, name: str, lo: int, hi: int) -> int | None:
    if value in (None, ""):
        return None
    try:
        v = int(str(value))
    except ValueError:
        raise WebError(422, f"{name}: expected a whole number, got {str(value)[:30]!r}") from None
    if not lo <= v <= hi:
        raise WebError(422, f"{name}: must be in [{lo}, {hi}], got {v}")
    return v


