"""Recognisers the control stage can trust offline, with their own accuracy measured.

- identity.py: dlib's 128-d face descriptor (ResNet, ``face-recognition-models``), aligned with
  the 5-point landmark model at the working resolution; verification ROC helpers and the
  gallery rule "is this face person P" (distance to P's mean descriptor).
- attributes.py: faceprint's attribute classifiers on TAEF2 latents (celeba-10k's 40
  attributes; UTKFace gender, race, age band), shipped in ``weights/``, with held-out TPR/FPR
  and confusion rates and the correction of measured rates for classifier error.

Measured by ``python -m faceprint.bench recognisers``. dlib is imported only when an
:class:`IdentityRecogniser` is built.
"""

from .attributes import (
    AttributeClassifier,
    AttributeConfig,
    Task,
    correct_proportions,
    correct_rate,
    load_classifier,
)
from .identity import IdentityConfig, IdentityGallery, IdentityRecogniser

__all__ = [
    "AttributeClassifier",
    "AttributeConfig",
    "IdentityConfig",
    "IdentityGallery",
    "IdentityRecogniser",
    "Task",
    "correct_proportions",
    "correct_rate",
    "load_classifier",
]
