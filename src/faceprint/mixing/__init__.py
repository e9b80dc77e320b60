"""Mixing faces and textures in latent space: the Texture Mixer of papers/004, ch. 3, on TAEF2.

- :mod:`.operations`: tiling, multi-scale shuffling (Eq. 3.1), blending (Eqs. 3.2-3.3), alpha maps.
- :mod:`.networks`: harmoniser H, global encoder E^g, latent critics, decoder feature taps.
- :mod:`.losses`: Gram, L1, WGAN-GP (Eqs. 3.4-3.9).
- :mod:`.model`: :class:`TextureMixer` (canvas, dissolve, brush, hybrid; save/load).
- :mod:`.train`: :func:`train_mixer` (Eq. 3.10, resumable checkpoints).
- :mod:`.textures`: hair/background texture crops from face photos, split by person.
- :mod:`.evaluation`: SSIM, sliced Wasserstein, Gram distances, seam/repetition classifiers (Sec. 3.4.2).
- :mod:`.sources`: reading mix sources (files, model + seed), provenance, the forgotten-person check.
"""

from .model import MAX_PIXELS, MixerConfig, TextureMixer, pixel_blend
from .train import TrainConfig, train_mixer

__all__ = ["MAX_PIXELS", "MixerConfig", "TextureMixer", "TrainConfig", "pixel_blend", "train_mixer"]
