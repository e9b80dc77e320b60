"""``--dask SCHEDULER|local[:WORKERS]``: which Dask cluster a command runs its chunks on.

``local`` starts a ``distributed.LocalCluster`` of worker processes (one thread each) on
127.0.0.1, without the dashboard, for the duration of the command; ``local:4`` asks for four
workers (default: one per core). Anything else is the address of a running scheduler
(``tcp://host:8786``, started with ``dask scheduler``, workers with ``dask worker ADDRESS``),
which every worker must reach with the same faceprint installed and the same photo paths
readable (a shared or identical file system).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

from ..errors import ConfigError, InputError

MAX_LOCAL_WORKERS = 256
CONNECT_TIMEOUT = "10s"
_LOCAL = re.compile(r"^local(?::(\d+))?$")
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://[^\s/]+$|^[A-Za-z0-9.\-\[\]:]+:\d+$")


@dataclass(frozen=True)
class DaskSpec:
    """A parsed ``--dask`` value: ``local`` with ``workers`` processes, or a scheduler ``address``."""

    address: str | None = None
    workers: int | None = None

    @property
    def local(self) -> bool:
        return self.address is None

    def __str__(self) -> str:
        if self.local:
            return "local" + (f":{self.workers}" if self.workers else "")
        return self.address


def parse_dask(text: str) -> DaskSpec:
    """``local``, ``local:WORKERS`` or a scheduler address (``tcp://host:8786`` or ``host:8786``).

    Raises InputError naming the value and the accepted forms."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"--dask: expected local, local:WORKERS or a scheduler address such as "
                         f"tcp://10.0.0.5:8786, got {text!r}")
    text = text.strip()
    m = _LOCAL.match(text)
    if m:
        workers = int(m.group(1)) if m.group(1) else None
        if workers is not None and not 1 <= workers <= MAX_LOCAL_WORKERS:
            raise InputError(f"--dask {text!r}: the number of local workers must be in [1, {MAX_LOCAL_WORKERS}]")
        return DaskSpec(workers=workers)
    if _ADDRESS.match(text):
        return DaskSpec(address=text if "://" in text else f"tcp://{text}")
    raise InputError(f"--dask {text!r}: expected local, local:WORKERS (e.g. local:2) or a scheduler address such as "
                     "tcp://10.0.0.5:8786 (start one with `dask scheduler`)")


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ConfigError("--dask needs Dask's distributed scheduler: pip install 'dask[distributed]' "
                          "(it is a dependency of faceprint; reinstall with pip install -e .)") from None
    return distributed


@contextlib.contextmanager
def open_client(spec: DaskSpec | str | None, *, quiet: bool = True):
    """Yield a ``distributed.Client`` for ``spec`` (None: yield None, one process), closed after.

    A local cluster listens on 127.0.0.1 only, without dashboard, and is shut down on exit.
    Its workers are processes with one thread each (Dask sets OMP_NUM_THREADS=1 in them)."""
    if spec is None:
        yield None
        return
    if isinstance(spec, str):
        spec = parse_dask(spec)
    distributed = _import_distributed()
    import logging

    if quiet:  # the scheduler's INFO lines would drown the command's own output
        for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker",
                     "distributed.core", "distributed.http.proxy"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if spec.local:
        workers = spec.workers or max(1, os.cpu_count() or 1)
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
        try:
            client = distributed.Client(cluster)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
        return
    try:
        client = distributed.Client(spec.address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise InputError(f"--dask {spec.address!r}: no Dask scheduler answered within {CONNECT_TIMEOUT} "
                         f"({e.__class__.__name__}); start one with `dask scheduler` and workers with "
                         f"`dask worker {spec.address}`, or use --dask local") from None
    try:
        yield client
    finally:
        client.close()
