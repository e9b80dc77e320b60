"""`faceprint serve`: the web app (faceprint.web) on uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub, *, common) -> None:
    p = sub.add_parser("serve", help="start the web app: fit, generate, inspect, fingerprint and verify in a browser")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only); any other address requires "
                        "the access token printed at start")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--models", type=Path, default=Path("faceprint-models"),
                   help="folder of model files: listed in the page, and where new models are written "
                        "(default ./faceprint-models, created)")
    p.add_argument("--data", type=Path, action="append", default=[], metavar="FOLDER",
                   help="a folder of photos the page may fit on and show thumbnails from (repeat for several; "
                        "nothing outside them is read)")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the jobs' outputs (default MODELS/.faceprint-web)")
    p.add_argument("--owner", type=Path, default=None,
                   help="fingerprint owner's folder (default $FACEPRINT_OWNER_DIR or ~/.local/share/faceprint/owner); "
                        "never served")
    p.add_argument("--token", default=None,
                   help="access token (at least 16 characters; default: $FACEPRINT_WEB_TOKEN, or made at start "
                        "when --host is not loopback)")
    p.add_argument("--max-upload-mb", type=float, default=256, help="largest request (a zip of photos), MB (default 256)")
    p.add_argument("--max-image-mb", type=float, default=20, help="largest single image, MB (default 20)")
    common(p)
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args) -> int:
    import os

    from ..errors import ConfigError
    from ..web import ServeConfig, create_app

    try:
        import uvicorn
    except ImportError:
        raise ConfigError("faceprint serve needs fastapi and uvicorn: pip install -e . (they are dependencies)") \
            from None
    token = args.token or os.environ.get("FACEPRINT_WEB_TOKEN") or None
    cfg = ServeConfig(models=args.models, data=tuple(args.data), work=args.work, owner=args.owner, host=args.host,
                      port=args.port, token=token, max_upload_mb=args.max_upload_mb, max_image_mb=args.max_image_mb,
                      weights=args.weights)
    app = create_app(cfg)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else shown}:{cfg.port}/"
    if cfg.needs_token:
        url += f"?token={cfg.token}"
    print(f"faceprint serve: models in {cfg.models}, {len(cfg.data)} photo folder(s); open {url}", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning" if args.quiet else "info")
    return 0
