"""Passive accountability: which model made an image, without a code in it (papers/004, Ch. 4).

- :mod:`.network`: the attribution network (image fingerprint = its 512-d last feature, model
  fingerprints = its last layer's rows) and the component-analysis variants (Sec. 4.3.1).
- :mod:`.classifier`: :class:`Attributor` (training on crops, immunisation by fine-tuning under
  attacks, open-set threshold, measured error rates, safetensors file) and :func:`train_network`.
- :mod:`.baselines`: kNN on pixels, Eigenface, PRNU, features + logistic regression, and the
  owner-side provenance match.
- :mod:`.evaluation`: accuracy, FD ratio, rates with Clopper-Pearson bounds.
- :mod:`.sources`: the sources (real photos raw and through TAEF2, faceprint's latent models)
  and a resumable cache of their faces outside the repository.
- :mod:`.images`: reading an image to attribute, refusing conversions unless allowed.

The benchmark is ``python -m faceprint.bench attribute``; the command ``faceprint attribute``.
"""

from .classifier import UNKNOWN, Attribution, Attributor, TrainConfig, predict, train_network
from .images import read_image
from .network import RECEPTIVE_FIELDS, AttributionNet, NetConfig

__all__ = ["UNKNOWN", "Attribution", "AttributionNet", "Attributor", "NetConfig", "RECEPTIVE_FIELDS", "TrainConfig",
           "predict", "read_image", "train_network"]
