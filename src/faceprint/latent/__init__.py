"""Latent models: PCA projector, Gaussian mixture (EM), low-rank sampler, NN refinement,
baselines, and the Generator that composes them with the autoencoder (papers/000, Sec. 3)."""
