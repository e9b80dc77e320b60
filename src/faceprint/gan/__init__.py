"""A learned latent generator: a GAN on TAEF2 latents with the dual contrastive loss,
self-attention in G and reference attention in D (papers/004, Ch. 2). See faceprint.gan.model."""

from .losses import LOSSES, contrastive_d, contrastive_g, contrastive_terms, hinge_d, hinge_g, ns_d, ns_g
from .model import (PRESETS, GANConfig, LatentGAN, SmallDataWarning, TrainingDivergedError, TrainingDivergedWarning,
                    fit_gan_generator)

__all__ = ["LOSSES", "PRESETS", "GANConfig", "LatentGAN", "SmallDataWarning", "TrainingDivergedError",
           "TrainingDivergedWarning", "contrastive_d", "contrastive_g", "contrastive_terms", "fit_gan_generator",
           "hinge_d", "hinge_g", "ns_d", "ns_g"]
