"""Data stage: photo folders, label tables, the latent cache and latent sets.

FaceFolder / load_image decode photos (centre square crop, resize); read_labels joins a CSV of
labels by file name; encode_folder turns a folder into a LatentSet through an autoencoder,
with a LatentCache on disk so each photo is encoded once.
"""

from .cache import CacheKey, CacheWarning, LatentCache, default_cache_dir
from .folder import (
    ALLOWED_SIZES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    LOADER_VERSION,
    FaceBatch,
    FaceFolder,
    load_image,
    preprocessing_id,
)
from .labels import LabelTable, read_labels, to_numeric
from .latentset import LatentSet, encode_files, encode_folder

__all__ = [
    "ALLOWED_SIZES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "IMAGE_EXTENSIONS",
    "LOADER_VERSION",
    "CacheKey",
    "CacheWarning",
    "FaceBatch",
    "FaceFolder",
    "LabelTable",
    "LatentCache",
    "LatentSet",
    "default_cache_dir",
    "encode_files",
    "encode_folder",
    "load_image",
    "preprocessing_id",
    "read_labels",
    "to_numeric",
]
