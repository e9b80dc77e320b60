"""Background jobs: long work runs in a pool of threads, the page polls its state.

A job has its own output folder (``WORK/outputs/<job id>/``), so two users' jobs never write
the same file, and a model name is reserved by the job that writes it until it is written.
Torch releases the interpreter lock in its kernels, so the server keeps answering while a fit
runs. A job's error is kept as one line (the FaceprintError's message, or the exception's class
and message for an unexpected one); the traceback goes to the server's log only.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FaceprintError
from .paths import WebError

log = logging.getLogger("faceprint.web")
KEEP_JOBS = 500


@dataclass
class Job:
    id: str
    kind: str
    folder: Path
    state: str = "queued"          # queued, running, done, failed
    stage: str = "waiting for a free worker"
    done: int = 0
    total: int = 0
    error: str | None = None
    result: dict | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def report(self, stage: str | None = None, done: int | None = None, total: int | None = None) -> None:
        """Progress for the page: a stage in words, and done/total of its items (0/0: no bar)."""
        with self._lock:
            if stage is not None:
                self.stage = stage
            if total is not None:
                self.total = int(total)
            if done is not None:
                self.done = int(done)

    def view(self) -> dict:
        with self._lock:
            return {"id": self.id, "kind": self.kind, "state": self.state, "stage": self.stage, "done": self.done,
                    "total": self.total, "error": self.error, "result": self.result,
                    "seconds": round((self.finished or time.time()) - self.created, 1)}


def one_line(e: BaseException) -> str:
    """What the page shows of an error: one line, never a traceback."""
    if isinstance(e, WebError):
        return e.message
    if isinstance(e, FaceprintError):
        return str(e).replace("\n", " ")
    if isinstance(e, MemoryError):
        return "out of memory: use fewer photos or faces"
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename!r}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return f"internal error ({e.__class__.__name__}); the server's log has the details"


class JobManager:
    def __init__(self, outputs: Path, threads: int = 2):
        self.outputs = outputs
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="faceprint-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._names: set[str] = set()

    def submit(self, kind: str, fn: Callable[[Job], dict]) -> Job:
        job_id = secrets.token_hex(6)
        folder = self.outputs / job_id
        folder.mkdir(parents=True, exist_ok=False)
        job = Job(job_id, kind, folder)
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > KEEP_JOBS:
                self._jobs.popitem(last=False)
        self._pool.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn) -> None:
        with job._lock:
            job.state, job.stage = "running", "starting"
        try:
            result = fn(job)
            with job._lock:
                job.result, job.state, job.stage = result, "done", "done"
        except BaseException as e:  # noqa: BLE001 - a job's failure is reported, never raised in the pool
            if not isinstance(e, (FaceprintError, WebError)):
                log.exception("job %s (%s) failed", job.id, job.kind)
            with job._lock:
                job.error, job.state = one_line(e), "failed"
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise WebError(404, f"no job {job_id!r} on this server (jobs are forgotten when the server restarts)")
        return job

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def reserve(self, path: Path) -> None:
        """Claim an output model path for one job; refuse one that exists or another job writes."""
        with self._lock:
            if str(path) in self._names or path.exists():
                raise WebError(409, f"a model named {path.name!r} exists or is being written; choose another name")
            self._names.add(str(path))

    def release(self, path: Path) -> None:
        with self._lock:
            self._names.discard(str(path))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
