"""Generator and discriminator networks of the latent GAN (papers/004, Sec. 2.3 and 2.4, on
TAEF2 latents instead of pixels).

The chapter builds on StyleGAN2 config E at 128-256 px. On this project's CPU budget
(2 cores, minutes per model) the networks are a small DCGAN-style pair on 16 x 16 latents.
They keep what the chapter's three changes plug into:

Generator (latent channels c, default 32):
    z (z_dim) -> linear -> 4x4 x c4 -> conv3x3 c4
      -> upsample x2 -> 8x8: conv3x3 c4->c8, conv3x3 c8->c8  [or SAN self-attention, Eq. 2.7]
      -> upsample x2 -> 16x16: conv3x3 c8->c16, conv3x3 c16->c16
      -> 1x1 conv -> c channels (whitened latents)
    leaky ReLU and pixel normalisation (ProGAN) after every layer; with ``noise`` (the default of
    GANConfig), StyleGAN's noise inputs: per-pixel Gaussian noise added after each of the four 8x8
    and 16x16 convolutions, scaled by a learned per-channel strength that starts at zero. TAEF2
    latents are rough (on celeba-1k the mean squared difference of neighbouring whitened latent
    pixels is 2.1, i.e. neighbours correlate at about 0.5); without noise the generator made latents
    ten times smoother (0.20 after 600 iterations), which the decoder turns into blurred, colour-cast
    faces, and the discriminator separated them at once. Bilinear upsampling (nearest
    upsampling left a checkerboard in the latents that the decoder turns into a visible mesh, seen
    on celeba-1k sample sheets after 600 iterations). There is no batch
    normalisation, so each sample depends on its own z only.

Discriminator:
    latent -> 1x1 conv -> d; 16x16: conv3x3 d->d; avg-pool -> 8x8: conv3x3 d->2d
      [reference attention, Eq. 2.8: K, Q from a real reference run through the same layers
      (Siamese), V and the residual from the primary]
      -> avg-pool -> 4x4: minibatch std (+1 channel), conv3x3 -> 4d -> linear -> 1 logit

Attention sits at 8 x 8, the middle resolution of the 4 -> 16 generator. The chapter put it at
32 x 32 in a 4 -> 128 generator. See faceprint.gan.attention for the patch size.

Deviations from the chapter, stated: the backbone (DCGAN-style, not StyleGAN2), the resolution
(16 x 16 latents, not 128-256 px images), and no style mapping or modulation (the noise inputs
are StyleGAN's).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import SLOPE, PatchAttention


def _pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class LatentG(nn.Module):
    """z (B, z_dim) [+ noise (B, n_noise, 16, 16)] -> whitened latents (B, c, 16, 16).

    ``n_noise`` is 4 with noise inputs (layers conv8a, conv8b, conv16a, conv16b; an 8 x 8 layer
    reads the top-left 8 x 8 of its plane) and 0 without. ``noise=None`` in forward means no noise
    (used to count operations); training and sampling always pass it, drawn from seeded generators."""

    NOISE_LAYERS = 4

    def __init__(self, z_dim: int, channels: tuple[int, int, int], out_channels: int, attention: dict | None,
                 noise: bool = False):
        super().__init__()
        c4, c8, c16 = channels
        self.n_noise = self.NOISE_LAYERS if noise else 0
        if noise:
            self.noise_strength = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in (c8, c8, c16, c16)])
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, c4 * 16)
        self.c4 = c4
        self.conv4 = nn.Conv2d(c4, c4, 3, padding=1)
        self.conv8a = nn.Conv2d(c4, c8, 3, padding=1)
        # the layer the chapter's self-attention replaces (Sec. 2.3.2)
        self.conv8b = PatchAttention(c8, **attention) if attention else nn.Conv2d(c8, c8, 3, padding=1)
        self.conv16a = nn.Conv2d(c8, c16, 3, padding=1)
        self.conv16b = nn.Conv2d(c16, c16, 3, padding=1)
        self.out = nn.Conv2d(c16, out_channels, 1)

    def forward(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        act = lambda t: _pixel_norm(F.leaky_relu(t, SLOPE))  # noqa: E731
        if noise is not None and self.n_noise and tuple(noise.shape) != (z.shape[0], self.n_noise, 16, 16):
            raise ValueError(f"noise must have shape {(z.shape[0], self.n_noise, 16, 16)}, got {tuple(noise.shape)}")

        def noisy(x, k):
            if noise is None or not self.n_noise:
                return x
            H, W = x.shape[2:]
            return x + self.noise_strength[k][None, :, None, None] * noise[:, k:k + 1, :H, :W]

        x = act(self.fc(_pixel_norm(z)).view(z.shape[0], self.c4, 4, 4))
        x = act(self.conv4(x))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = act(noisy(self.conv8a(x), 0))
        x = act(noisy(self.conv8b(x), 1))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = act(noisy(self.conv16a(x), 2))
        x = act(noisy(self.conv16b(x), 3))
        return self.out(x)


class LatentD(nn.Module):
    """Whitened latents (B, c, 16, 16) [+ real references] -> logits (B,)."""

    def __init__(self, in_channels: int, width: int, reference_attention: dict | None):
        super().__init__()
        d = width
        self.inp = nn.Conv2d(in_channels, d, 1)
        self.conv16 = nn.Conv2d(d, d, 3, padding=1)
        self.conv8 = nn.Conv2d(d, 2 * d, 3, padding=1)
        self.ref_attn = PatchAttention(2 * d, **reference_attention) if reference_attention else None
        self.conv4 = nn.Conv2d(2 * d + 1, 4 * d, 3, padding=1)
        self.fc = nn.Linear(4 * d * 16, 1)

    @property
    def uses_reference(self) -> bool:
        return self.ref_attn is not None

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The layers before the fusion, shared by the primary and the reference (Siamese): (B, 2d, 8, 8)."""
        x = F.leaky_relu(self.inp(x), SLOPE)
        x = F.leaky_relu(self.conv16(x), SLOPE)
        x = F.avg_pool2d(x, 2)
        return F.leaky_relu(self.conv8(x), SLOPE)

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        h = self.trunk(x)
        if self.ref_attn is not None:
            if reference is None:
                raise ValueError("this discriminator has reference attention: pass reference= (real latents)")
            h = self.ref_attn(h, self.trunk(reference))  # Eq. 2.8
        h = F.avg_pool2d(h, 2)  # (B, 2d, 4, 4)
        std = h.std(dim=0, unbiased=False).mean() if h.shape[0] > 1 else h.new_zeros(())
        h = torch.cat([h, std.expand(h.shape[0], 1, *h.shape[2:])], dim=1)  # minibatch std
        h = F.leaky_relu(self.conv4(h), SLOPE)
        return self.fc(h.flatten(1)).squeeze(1)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def macs_per_sample(m: nn.Module, *inputs) -> int:
    """Multiply-adds of one forward pass per sample (conv, linear and the attention aggregation),
    counted with forward hooks on a batch of one."""
    total = [0]

    def conv_hook(mod, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total[0] += out.numel() * (mod.in_channels // mod.groups) * k

    def lin_hook(mod, inp, out):
        total[0] += out.numel() * mod.in_features

    def attn_hook(mod, inp, out):
        B, C, H, W = out.shape
        total[0] += B * C * H * W * mod.patch * mod.patch  # Eq. 2.6 aggregation

    hooks = []
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(lin_hook))
        elif isinstance(mod, PatchAttention):
            hooks.append(mod.register_forward_hook(attn_hook))
    try:
        with torch.no_grad():
            m(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return int(total[0] / inputs[0].shape[0])
