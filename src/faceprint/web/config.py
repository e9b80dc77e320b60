"""ServeConfig: what ``faceprint serve`` serves, where it writes, and its limits."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

LOOPBACK_NAMES = ("localhost",)
DEFAULT_MAX_UPLOAD_MB = 256     # one request (a zip of photos, a person's photos)
DEFAULT_MAX_IMAGE_MB = 20       # one image (verify, one photo of a person)
MAX_FACES = 64                  # faces per generate request (one page grid)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    """Parameters
    ----------
    models : path
        Folder of model files (*.safetensors): listed, loaded, and where new models are written.
    data : tuple of paths
        Folders of photos on the server that fits, forgetting and thumbnails may read (a request
        names a folder inside one of them, never an arbitrary path).
    work : path or None
        Where jobs write their outputs (one sub-folder per job); default MODELS/.faceprint-web.
    owner : path or None
        The fingerprint owner's folder (key, registry, calibration); default the library's.
        Nothing inside it is ever served.
    host, port : the address uvicorn binds.
    token : str or None
        Required from every request when set; generated when the host is not loopback and none
        is given (see :attr:`needs_token`).
    max_upload_mb, max_image_mb : request and single-image size limits.
    weights : path or None
        TAEF2 weights folder (default lookup otherwise).
    """

    models: Path
    data: tuple[Path, ...] = ()
    work: Path | None = None
    owner: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB
    weights: Path | None = None
    job_threads: int = 2

    def __post_init__(self):
        models = Path(self.models).expanduser()
        if models.exists() and not models.is_dir():
            raise ConfigError(f"--models {str(models)!r} is a file; pass a folder for the model files")
        object.__setattr__(self, "models", models.resolve())
        data = []
        for d in self.data:
            d = Path(d).expanduser()
            if not d.is_dir():
                raise ConfigError(f"--data {str(d)!r} is not a folder; pass a folder of photos (or leave it out)")
            data.append(d.resolve())
        object.__setattr__(self, "data", tuple(data))
        work = Path(self.work).expanduser() if self.work is not None else models / ".faceprint-web"
        object.__setattr__(self, "work", work.resolve())
        if self.owner is not None:
            object.__setattr__(self, "owner", Path(self.owner).expanduser().resolve())
        for name, v in (("max_upload_mb", self.max_upload_mb), ("max_image_mb", self.max_image_mb)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{name} must be a positive number of megabytes, got {v!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], got {self.port!r}")
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 16):
            raise ConfigError("--token must be at least 16 characters (or leave it out to have one made)")
        if self.token is None and not is_loopback(self.host):
            object.__setattr__(self, "token", secrets.token_urlsafe(24))

    @property
    def needs_token(self) -> bool:
        return self.token is not None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    @property
    def outputs(self) -> Path:
        return self.work / "outputs"

    def owner_folder(self) -> Path:
        from ..fingerprint.owner import default_owner_dir

        return (self.owner or default_owner_dir().resolve())
