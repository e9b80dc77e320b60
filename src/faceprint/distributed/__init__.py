"""Distributed stage: Dask execution of the embarrassingly parallel stages (encode, decode,
Inception features, fingerprint read-out).

  cluster   ``--dask local[:WORKERS]`` or ``--dask tcp://SCHEDULER:8786``: parse the option, open a
            client (a LocalCluster on loopback, or a running scheduler) and close it after
  chunks    :func:`map_chunks`: split a list into chunks, run a function on each chunk on the
            workers, keep the input order, resubmit the chunk of a killed worker, report
            progress over the whole job
  stages    the chunk functions of faceprint's stages (encode photo files, decode latents and
            take Inception features, run any function on image files) and the per-worker
            cache of the networks they load

Results are identical to one process: every stage runs the same code on the same inputs, and
the networks (TAEF2 in fixed zero-padded chunks, the Inception plan) give an image the same
output whatever the batch it is in. Dask is imported where used (``pip install
'dask[distributed]'``), never at package import.
"""

from __future__ import annotations

from .cluster import DaskSpec, open_client, parse_dask
from .chunks import map_chunks

__all__ = ["DaskSpec", "open_client", "parse_dask", "map_chunks"]
