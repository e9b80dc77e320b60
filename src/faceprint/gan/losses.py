"""GAN losses on discriminator logits (papers/004, Sec. 2.3.1, Eqs. (2.1)-(2.3); Table 2.1's
non-saturating default and hinge).

Every function takes the logits D(x) of a batch of reals (B_r,) and D(G(z)) of a batch of
fakes (B_f,) and returns a scalar to *minimise*: the discriminator's loss ``*_d`` and the
generator's ``*_g``.

Dual contrastive loss (Eqs. 2.1-2.3), in logsumexp form (no exp overflow for large logits):

    Case I,  each real x_i against the batch of fakes:
        L_real = mean_i [ D(x_i) - logsumexp(D(x_i), D(G(z_1)), ..., D(G(z_Bf))) ]
    Case II, each fake z_j against the batch of reals:
        L_fake = mean_j [ -D(G(z_j)) - logsumexp(-D(G(z_j)), -D(x_1), ..., -D(x_Br)) ]

D maximises L_real + L_fake (Eq. 2.3), so ``contrastive_d = -(L_real + L_fake)``. With one real
and one fake each case is -softplus(D(G(z)) - D(x)): the logistic loss of the non-saturating
baseline, which the contrastive loss generalises to a one-against-a-batch softmax.

Eq. 2.3 writes the generator's side as min_G of the same objective. Like the non-saturating
loss against the saturating one (Table 2.1), that form stops giving the generator gradients once
D separates the two batches, so the generator here minimises the *dual* of D's loss with the
roles of reals and fakes swapped (each fake against the batch of reals as the positive, and
dually), ``contrastive_g = contrastive_d(real=fake_logits, fake=real_logits)``; this is the
choice of the public implementations of the chapter (and of lightweight-gan's
``dual_contrastive_loss``). The literal minimax form is available as ``contrastive_g_minimax``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

LOSSES = ("ns", "contrastive", "hinge")


def _check(real: torch.Tensor, fake: torch.Tensor, *, contrastive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("real logits", real), ("fake logits", fake)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    real, fake = real.reshape(-1), fake.reshape(-1)
    if real.numel() < 1 or fake.numel() < 1:
        raise InputError(f"the loss needs at least one real and one fake logit, got {real.numel()} and {fake.numel()}")
    if contrastive and (real.numel() < 2 or fake.numel() < 2):
        raise InputError(f"the dual contrastive loss contrasts each sample against a batch of the other kind and "
                         f"needs batches of at least 2, got {real.numel()} reals and {fake.numel()} fakes; "
                         "use batch_size >= 2 (e.g. 32) or loss='ns'")
    return real, fake


def contrastive_terms(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_real, L_fake) of Eqs. 2.1 and 2.2 (means over the batch; each <= 0), in logsumexp form.

    The batch sizes may differ; this function itself accepts batches of one (the reduction to
    the logistic loss); :func:`contrastive_d` / :func:`contrastive_g` refuse them."""
    real, fake = _check(real, fake, contrastive=False)
    br, bf = real.numel(), fake.numel()
    # Case I: row i = [D(x_i), D(G(z_1)), ..., D(G(z_bf))]
    rows_r = torch.cat([real[:, None], fake[None, :].expand(br, bf)], dim=1)  # (br, 1 + bf)
    l_real = (real - torch.logsumexp(rows_r, dim=1)).mean()
    # Case II: row j = [-D(G(z_j)), -D(x_1), ..., -D(x_br)]
    rows_f = torch.cat([-fake[:, None], -real[None, :].expand(bf, br)], dim=1)  # (bf, 1 + br)
    l_fake = (-fake - torch.logsumexp(rows_f, dim=1)).mean()
    return l_real, l_fake


def contrastive_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss -(L_real + L_fake) (Eq. 2.3, D ascends the objective)."""
    _check(real, fake, contrastive=True)
    l_real, l_fake = contrastive_terms(real, fake)
    return -(l_real + l_fake)


def contrastive_g(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss: the dual of D's with reals and fakes swapped (see the module docstring)."""
    _check(real, fake, contrastive=True)
    l_real, l_fake = contrastive_terms(fake, real)
    return -(l_real + l_fake)


def contrastive_g_minimax(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss of Eq. 2.3 taken literally: min_G (L_real + L_fake) (saturates)."""
    _check(real, fake, contrastive=True)
    l_real, l_fake = contrastive_terms(real, fake)
    return l_real + l_fake


def ns_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (logistic) discriminator loss: softplus(-D(x)) + softplus(D(G(z)))."""
    real, fake = _check(real, fake, contrastive=False)
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def ns_g(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(G(z))) (``real`` is unused)."""
    _, fake = _check(real, fake, contrastive=False)
    return F.softplus(-fake).mean()


def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss relu(1 - D(x)) + relu(1 + D(G(z)))."""
    real, fake = _check(real, fake, contrastive=False)
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss -D(G(z)) (``real`` is unused)."""
    _, fake = _check(real, fake, contrastive=False)
    return -fake.mean()


def losses_for(name: str):
    """(d_loss, g_loss) functions of a loss name in LOSSES."""
    table = {"ns": (ns_d, ns_g), "contrastive": (contrastive_d, contrastive_g), "hinge": (hinge_d, hinge_g)}
    if name not in table:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return table[name]
