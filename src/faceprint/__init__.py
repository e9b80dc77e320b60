"""faceprint: frugal, accountable face generation.

The core model is the low-rank Gaussian-mixture latent generator with nearest-neighbour
refinement of papers/000 (LR-GMM-NN), built on the pretrained TAEF2 autoencoder.
"""

__version__ = "0.1.0"
