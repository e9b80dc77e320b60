"""Losses of the Texture Mixer (papers/004, ch. 3, Sec. 3.3.2, Eqs. 3.4-3.10).

- :func:`gram`: the Gram matrix of Johnson et al.: G = F F^T / (C H W) for features F (C, H*W).
- :func:`gram_loss`: sum over feature levels of the squared Frobenius distance of Gram matrices
  (Eq. 3.5's L_Gram; per item, so Eqs. 3.8-3.9 can weight items by alpha).
- :func:`gradient_penalty`, :func:`critic_loss`, :func:`generator_adv_loss`: WGAN-GP
  (Gulrajani et al.), L_adv(A, B | D) = D(A) - D(B) + GP(A, B | D) (Eq. 3.7); the critic
  minimises it, the generator minimises -D(A).
- :func:`l1_per_item`: Eq. 3.4's pixel L1, here per item (mean absolute difference).
"""

from __future__ import annotations

import torch


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrices of features f (N, C, H, W) -> (N, C, C), normalised by C * H * W."""
    n, c, h, w = f.shape
    x = f.reshape(n, c, h * w)
    return x @ x.transpose(1, 2) / (c * h * w)


def gram_loss(feats_a, feats_b) -> torch.Tensor:
    """sum_levels ||G(a) - G(b)||_F^2 per item: (N,). ``feats_*`` are lists of (N, C, H, W)
    (the sizes of a and b may differ: Gram matrices do not depend on the spatial size)."""
    total = None
    for fa, fb in zip(feats_a, feats_b):
        d = (gram(fa) - gram(fb)).pow(2).sum((1, 2))
        total = d if total is None else total + d
    return total


def l1_per_item(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per item: (N,)."""
    return (a - b).abs().flatten(1).mean(1)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(||grad D(x_hat)||_2 - 1)^2 per item, x_hat = eps real + (1 - eps) fake, eps ~ U[0, 1]."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator)
    x = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1).pow(2)


def critic_loss(critic, real, fake, generator, *, gp_weight: float = 10.0, drift: float = 1e-3) -> torch.Tensor:
    """WGAN-GP critic objective per item: D(fake) - D(real) + gp_weight GP + drift D(real)^2 (N,)."""
    d_real = critic(real.detach())
    d_fake = critic(fake.detach())
    return d_fake - d_real + gp_weight * gradient_penalty(critic, real, fake, generator) + drift * d_real.pow(2)


def generator_adv_loss(critic, fake) -> torch.Tensor:
    """The generator's side of L_adv: -D(fake) per item (N,)."""
    return -critic(fake)
