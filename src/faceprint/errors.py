"""Every exception and warning class of faceprint.

Messages name the input, the value received, what is allowed and what to try. Classes also
derive from the matching builtin (ValueError, FileNotFoundError, ...) so callers that catch
the builtin keep working. The CLI turns any FaceprintError into one line and exit code 2.
"""

from __future__ import annotations


class FaceprintError(Exception):
    """Base class of every error faceprint raises on purpose."""


class ConfigError(FaceprintError, ValueError):
    """A configuration value is out of range or inconsistent."""


class InputError(FaceprintError, ValueError):
    """An argument passed to a public function has the wrong shape, type or value."""


class DataError(FaceprintError, ValueError):
    """A folder of photos, an image file or a label table cannot be used."""


class BadImageError(DataError):
    """One image file cannot be read; carries the path and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(FaceprintError, FileNotFoundError):
    """Pretrained weights are missing or fail their checksum."""


class ArtifactError(FaceprintError, ValueError):
    """A saved model artifact is missing, corrupted, or of an unknown format/version."""


class CopyGuardError(FaceprintError, RuntimeError):
    """The copy guard could not draw a face that is not a near-copy of a training photo."""


class NotFittedError(FaceprintError, RuntimeError):
    """A model was used before fit() (or load()) gave it its learned state."""


class FaceprintWarning(UserWarning):
    """Base class of faceprint's warnings."""


class SkippedImageWarning(FaceprintWarning):
    """An image was skipped while loading a folder (not in strict mode)."""


class FileAccessError(FaceprintError, OSError):
    """A file or folder cannot be read or written: read-only, not a folder, disk full,
    permission denied, or a special file (FIFO, device, socket) where a regular file belongs."""


class OutputError(FileAccessError):
    """An output cannot be written where asked (the message names the path and the OS reason)."""


class SpecialFileError(FileAccessError):
    """A path that should be a regular file is a FIFO, device, socket or folder, or its read
    does not end (larger than the bound, or no progress)."""


class SmallDataWarning(FaceprintWarning):
    """Fewer training latents than a GAN needs to avoid collapse and memorisation (faceprint.gan)."""


class TrainingDivergedWarning(FaceprintWarning):
    """GAN training stopped on a NaN or exploding loss; the last good checkpoint state was kept."""


class TrainingDivergedError(FaceprintError, RuntimeError):
    """GAN training diverged before any good state was checkpointed."""


class ForgottenPersonError(InputError):
    """A source (or the output) of a mix shows a person a model was made to forget (faceprint.mixing)."""
