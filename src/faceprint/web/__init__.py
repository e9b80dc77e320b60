"""The web app: ``faceprint serve``, a FastAPI server and one plain HTML/JS page (no build step).

A thin client of the same library as the command line:

  config               ServeConfig: the served folders, the bind address, limits, the token
  paths                every path a request names is resolved inside a served folder (no
                       absolute paths, no "..", no symbolic link leading out) or refused
  jobs                 long work (fit, generate, forget, rebalance, issue) runs in background
                       threads; the page polls its progress
  actions              fit / generate / face details / forget / rebalance
  fingerprint_actions  issue a fingerprinted copy, list the registry, verify an image (the one
                       module that calls faceprint.fingerprint)
  app                  the routes, the guard (host, token, upload size) and the error handlers:
                       every error is one JSON line {"error": "..."}, never a traceback

FastAPI and uvicorn are imported here only, never at ``import faceprint``.
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(config: ServeConfig):
    """The FastAPI application serving ``config``'s folders."""
    from .app import create_app as _create

    return _create(config)
