"""Patch-wise attention of SAN, as the generator's self-attention and the discriminator's
reference attention (papers/004, Sec. 2.3.2, Eqs. (2.4)-(2.7); Sec. 2.3.3, Eq. (2.8)).

For an input T (B, c, h, w):

- K, Q, V are 1x1 convolutions followed by bias and leaky ReLU (Sec. 2.3.2). K and Q have
  ``c // reduction`` channels, V has c.
- At every position (i, j), the s x s patch of K around (i, j) is flattened and concatenated
  with the query q = Q(i, j) (Eq. 2.4). Two fully connected layers with bias and leaky ReLU
  between them map it to the attention weights w (Eq. 2.5).
- The output is o(i, j) = sum_(m, n) w(m, n) * v(m, n) over the s x s patch of V (Eq. 2.6),
  plus the residual T (Eq. 2.7).

Self-attention takes K, Q and V from T. Reference attention takes K and Q from a reference
tensor T_ref (a real sample's features), and V and the residual from the primary T_pri
(Eq. 2.8).

Two choices the text leaves open, made here:

- **Size of the weight MLP.** Eq. 2.5 as written has M_w2 in R^(s^2 c x s^2 c), about 10^8
  parameters at s = 5, c = 128. That is infeasible, and Table 2.4 shows SAN costing no more
  than the convolution it replaces. As in SAN and the chapter's "fewer convolution channels and
  the multi-head trick", K and Q are reduced to c / ``reduction`` channels. The MLP has a hidden
  width of ``hidden`` and outputs s^2 x ``groups`` weights, one weight map shared by the
  c / groups channels of each group. At c = 128, s = 5, reduction 8, groups 8 and hidden 64 the
  MLP has 39k parameters, against 147k for the 3x3 convolution it replaces.
- **Patch size s** (not given in the text): 5 by default, in :class:`GANConfig.attn_patch`
  (ablate it there). The layers sit at the 8 x 8 resolution. A 5 x 5 patch there spans 5/8 of
  the latent grid, about 80 of the 128 image pixels: eyes to mouth, or one eye and the other.
  That is the long range the attention is for, and a 3 x 3 convolution at 8 x 8 does not
  reach it. s = 7 covers nearly the whole grid from the centre, at twice the cost. s = 3 sees
  no further than the convolution it replaces.

Positions of a patch outside the grid are masked: V is zero-padded after its 1x1 convolution,
and the weights there are multiplied by 0, so they contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError

SLOPE = 0.2


class PatchAttention(nn.Module):
    """SAN patch-wise attention with a residual (Eqs. 2.4-2.8).

    Parameters
    ----------
    channels : int
        c, channels of the input and of the output.
    patch : int
        s, odd side of the attention patch.
    reduction : int
        K and Q have ``max(1, channels // reduction)`` channels.
    groups : int
        Channel groups sharing one weight map (must divide ``channels``).
    hidden : int
        Width of the hidden layer of the weight MLP.
    """

    def __init__(self, channels: int, patch: int = 5, reduction: int = 8, groups: int = 8, hidden: int = 64):
        super().__init__()
        if patch < 1 or patch % 2 == 0:
            raise ConfigError(f"attention patch size must be an odd int >= 1, got {patch!r}; try 5")
        if channels % groups:
            raise ConfigError(f"attention groups = {groups} must divide the {channels} channels")
        self.channels, self.patch, self.groups = channels, patch, groups
        self.reduced = max(1, channels // reduction)
        self.key = nn.Conv2d(channels, self.reduced, 1)
        self.query = nn.Conv2d(channels, self.reduced, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        s2 = patch * patch
        self.fc1 = nn.Linear(s2 * self.reduced + self.reduced, hidden)
        self.fc2 = nn.Linear(hidden, s2 * groups)
        with torch.no_grad():  # start close to the identity (the residual) for a stable warm start
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.zero_()

    def weights(self, source: torch.Tensor) -> torch.Tensor:
        """Attention weights w (B, h*w, groups, s*s) computed from ``source`` (B, c, h, w) (Eqs. 2.4-2.5)."""
        B, C, H, W = source.shape
        s = self.patch
        k = F.leaky_relu(self.key(source), SLOPE)  # (B, r, h, w)
        q = F.leaky_relu(self.query(source), SLOPE)  # (B, r, h, w)
        kp = F.unfold(k, s, padding=s // 2)  # (B, r*s*s, h*w): each column the flattened K patch
        p = torch.cat([kp, q.flatten(2)], dim=1).transpose(1, 2)  # (B, h*w, r*s*s + r)
        w = self.fc2(F.leaky_relu(self.fc1(p), SLOPE))  # (B, h*w, s*s*groups)
        w = w.view(B, H * W, self.groups, s * s)
        valid = F.unfold(torch.ones(1, 1, H, W, dtype=source.dtype), s, padding=s // 2)  # (1, s*s, h*w)
        return w * valid.transpose(1, 2)[:, :, None, :]  # positions outside the grid get weight 0

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention (reference None) or reference attention: (B, c, h, w) -> (B, c, h, w).

        K and Q come from ``reference`` when it is given (Eq. 2.8), from ``x`` otherwise
        (Eq. 2.7). V and the residual always come from ``x``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise InputError(f"attention input must be (B, {self.channels}, h, w), got {tuple(x.shape)}")
        if reference is not None and reference.shape != x.shape:
            raise InputError(f"reference must have the primary's shape {tuple(x.shape)}, got {tuple(reference.shape)}")
        B, C, H, W = x.shape
        s = self.patch
        w = self.weights(x if reference is None else reference)  # (B, hw, g, ss)
        v = F.leaky_relu(self.value(x), SLOPE)
        vp = F.unfold(v, s, padding=s // 2).view(B, self.groups, C // self.groups, s * s, H * W)
        o = torch.einsum("bngm,bgcmn->bgcn", w, vp).reshape(B, C, H, W)  # Eq. 2.6
        return o + x  # Eq. 2.7 / 2.8: the residual from the primary

    def extra_repr(self) -> str:
        return f"channels={self.channels}, patch={self.patch}, reduced={self.reduced}, groups={self.groups}"
