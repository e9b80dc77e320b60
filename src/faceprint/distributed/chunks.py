"""map_chunks: one function over the chunks of a list, on Dask workers or in this process.

The job is cut into contiguous chunks of ``chunk_size`` items. Each chunk is one Dask task,
``fn(chunk, *shared)``; the objects in ``shared`` (an autoencoder, a fingerprint key) are sent
to every worker once (``scatter(broadcast=True)``), not with every task. Results come back in
the order of the chunks, whatever order the workers finish in.

Failures: a chunk whose worker died (killed, out of memory, lost connection) is submitted again,
up to ``retries`` times, on the workers that are left (Dask's own rescheduling comes first; the
resubmission covers ``distributed.scheduler.allowed-failures`` being reached). An exception
raised by ``fn`` itself (a bad input, a bug) is not retried: it would fail again; the job
stops with that error and its other chunks are cancelled.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

from ..errors import FaceprintError, InputError

DEFAULT_RETRIES = 3


def chunked(items: Sequence, chunk_size: int) -> list[Sequence]:
    """Contiguous chunks of ``chunk_size`` items (the last may be shorter)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return [items[s:s + chunk_size] for s in range(0, len(items), chunk_size)]


def _retriable(exc: BaseException) -> bool:
    """Worker loss, not an error of the chunk's own code."""
    if isinstance(exc, FaceprintError):
        return False
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:  # pragma: no cover - map_chunks with a client implies distributed
        KilledWorker = ()
    try:
        from distributed.comm.core import CommClosedError
    except ImportError:  # pragma: no cover
        CommClosedError = ()
    return isinstance(exc, (KilledWorker, CommClosedError, ConnectionError, TimeoutError))


def _small(x) -> bool:
    """Sent with each task as it is (no scatter): None, numbers, text, functions, configs."""
    import dataclasses
    import inspect

    return (x is None or isinstance(x, (bool, int, float, str)) or inspect.isfunction(x) or inspect.isclass(x)
            or (dataclasses.is_dataclass(x) and not isinstance(x, type)))


def map_chunks(fn: Callable, items: Sequence, *, chunk_size: int, client=None, shared: tuple = (),
               retries: int = DEFAULT_RETRIES, progress: Callable[[int, int], None] | None = None,
               bar: bool = False, desc: str = "chunks", name: str = "faceprint") -> list:
    """``[fn(chunk, *shared) for chunk in chunked(items, chunk_size)]``, on ``client``'s workers.

    Parameters
    ----------
    fn : callable
        A module-level function (workers import it by name), ``fn(chunk, *shared) -> result``.
    items : sequence
        Anything sliceable: a list of paths, a tensor of latents (chunks along dim 0).
    chunk_size : int
        Items per task.
    client : distributed.Client or None
        None runs every chunk here, in order (the one-process reference).
    shared : tuple
        Extra arguments of every call, sent once to every worker.
    retries : int
        How many times one chunk is resubmitted after losing its worker.
    progress : callable(done_items, total_items), optional
        Called after each finished chunk (in the order they finish).
    bar : bool
        Also show a progress bar over all items (only on a terminal).

    Returns
    -------
    list
        One result per chunk, in chunk order.
    """
    from tqdm.auto import tqdm

    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InputError(f"retries must be a non-negative int, got {retries!r}")
    chunks = chunked(items, chunk_size)
    total = len(items)
    results: list = [None] * len(chunks)
    done = 0
    pbar = tqdm(total=total, desc=desc, unit="item", disable=None if bar else True)
    try:
        if client is None:
            for i, c in enumerate(chunks):
                results[i] = fn(c, *shared)
                done += len(c)
                pbar.update(len(c))
                if progress is not None:
                    progress(done, total)
            return results
        from distributed import as_completed

        token = secrets.token_hex(4)
        shared_f = [s if _small(s) else client.scatter(s, broadcast=True, hash=False) for s in shared]
        attempts = [0] * len(chunks)

        def submit(i: int):
            return client.submit(fn, chunks[i], *shared_f, key=f"{name}-{token}-{i}-{attempts[i]}", pure=False)

        pending = {submit(i): i for i in range(len(chunks))}
        queue = as_completed(list(pending))
        try:
            for fut in queue:
                i = pending.pop(fut)
                if fut.status == "finished":
                    results[i] = fut.result()
                    fut.release()
                    done += len(chunks[i])
                    pbar.update(len(chunks[i]))
                    if progress is not None:
                        progress(done, total)
                    continue
                exc = fut.exception()
                if _retriable(exc) and attempts[i] < retries:
                    attempts[i] += 1
                    nf = submit(i)
                    pending[nf] = i
                    queue.add(nf)
                    continue
                if _retriable(exc):
                    raise FaceprintError(
                        f"{name}: chunk {i + 1} of {len(chunks)} lost its worker {attempts[i] + 1} times "
                        f"({exc.__class__.__name__}: {exc}); check the workers' memory and logs, or run without --dask"
                    ) from None
                raise exc
        finally:
            if pending:
                client.cancel(list(pending))
            for f in shared_f:
                if not _small(f):
                    f.release()
        return results
    finally:
        pbar.close()
