"""The chapter's interpolation metrics on this machine (papers/004, ch. 3, Sec. 3.4.2), with the
substitutions docs/SEED-SYSTEMS.md Sec. 4.3 names:

- side fidelity: 1 - SSIM of each side of the canvas against its source texture (in place of
  LPIPS, which has no offline weights), :func:`ssim`;
- CGD / CCD: centre Gram distance and centre cosine distance on the Gram matrices of the frozen
  TAEF2 **encoder**'s activations at 1, 1/2, 1/4 and 1/8 resolution ("TAEF2-encoder Gram", in
  place of VGG-19; the training losses use the decoder's, so the metric is not the loss),
  :class:`EncoderGram`;
- CSS / CRS: a seam classifier and a repetition classifier trained by the chapter's recipe
  (:func:`seam_examples`, :func:`repetition_examples`, :func:`train_classifier`): real crops are
  negatives; positives are two real crops cut at a random column and joined (seam), or one
  64 px crop tiled twice side by side (repetition); the score is the mean predicted probability
  of "seam" / "repetition" on the canvas's centre crop (64 x 64 / 64 x 128);
- CSWD: sliced Wasserstein distance of 7 x 7 patch descriptors on a 3-level pyramid
  (Karras et al.'s recipe, simplified: average-pool pyramid, per-channel normalisation by the
  reference set), x 1e3, :func:`sliced_wasserstein`;
- centre KID on Inception pool3 features (faceprint.metrics.kid), in the benchmark.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..seeding import derive_seed
from ..seeding import generator as make_generator
from .losses import gram
from .networks import PatchClassifier


# ------------------------------------------------------------------------------------------------
# SSIM


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image of a, b (N, 3, H, W) in [0, 1]: Gaussian window 11, sigma 1.5,
    C1 = 0.01^2, C2 = 0.03^2, valid region, averaged over channels. -> (N,)."""
    if a.shape != b.shape or a.ndim != 4:
        raise InputError(f"ssim needs two (N, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    c = a.shape[1]
    g = _gauss()
    w = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()
    a, b = a.float(), b.float()

    def f(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = f(a), f(b)
    saa = f(a * a) - mu_a ** 2
    sbb = f(b * b) - mu_b ** 2
    sab = f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------
# Gram distances on the frozen TAEF2 encoder

#: Encoder Sequential indices whose outputs are read: after the first block (1x), and after
#: the last block of each downsampled stage (1/2, 1/4, 1/8).
ENCODER_TAPS = (1, 5, 9, 13)


class EncoderGram:
    """Gram matrices of TAEF2 encoder activations: images (N, 3, H, W) -> (N, 4 * 64 * 64)."""

    def __init__(self, encoder: torch.nn.Sequential):
        self.encoder = encoder.eval()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            h = images.float()
            for i, layer in enumerate(self.encoder):
                h = layer(h)
                if i in ENCODER_TAPS:
                    out.append(gram(h).flatten(1))
                if i >= ENCODER_TAPS[-1]:
                    break
        return torch.cat(out, 1)


def centre_gram_distance(g_centre, g_left, g_right) -> torch.Tensor:
    """CGD: (||G_c - G_L||^2 + ||G_c - G_R||^2) / ||G_L - G_R||^2 per canvas (N,)."""
    d = lambda x, y: (x - y).pow(2).sum(1)  # noqa: E731
    return (d(g_centre, g_left) + d(g_centre, g_right)) / d(g_left, g_right).clamp_min(1e-12)


def centre_cosine_distance(g_centre, g_left, g_right) -> torch.Tensor:
    """CCD: 1 - cos(G_c - G_L, G_R - G_c) per canvas (N,): 0 when the centre lies on the straight
    path from left to right."""
    return 1 - F.cosine_similarity(g_centre - g_left, g_right - g_centre, dim=1)


# ------------------------------------------------------------------------------------------------
# sliced Wasserstein distance


def _patches(images: torch.Tensor, per_image: int, g: torch.Generator, size: int = 7) -> torch.Tensor:
    n, c, h, w = images.shape
    ys = torch.randint(0, h - size + 1, (n, per_image), generator=g)
    xs = torch.randint(0, w - size + 1, (n, per_image), generator=g)
    out = []
    for i in range(n):
        for y, x in zip(ys[i].tolist(), xs[i].tolist()):
            out.append(images[i, :, y:y + size, x:x + size].reshape(-1))
    return torch.stack(out)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, levels: int = 3, per_image: int = 64,
                       directions: int = 128, repeats: int = 4, seed: int = 0) -> float:
    """SWD (x 1e3) between image sets a (N, 3, H, W) and b (M, 3, H, W), averaged over pyramid levels.

    At each level (full, 1/2, 1/4 resolution by 2x2 average pooling) ``per_image`` 7 x 7 patches
    per image are drawn, normalised per channel by b's patch mean and std, and projected on
    random unit directions; the distance is the mean absolute difference of the sorted
    projections (equal sample counts: the larger set is subsampled)."""
    g = make_generator(seed, "swd")
    res = []
    xa, xb = a.float(), b.float()
    for lvl in range(levels):
        if min(xa.shape[-2:]) < 7 or min(xb.shape[-2:]) < 7:
            break
        pa, pb = _patches(xa, per_image, g), _patches(xb, per_image, g)
        n = min(pa.shape[0], pb.shape[0])
        pa = pa[torch.randperm(pa.shape[0], generator=g)[:n]]
        pb = pb[torch.randperm(pb.shape[0], generator=g)[:n]]
        mu, sd = pb.mean(0), pb.std(0).clamp_min(1e-6)
        pa, pb = (pa - mu) / sd, (pb - mu) / sd
        vals = []
        for _ in range(repeats):
            d = torch.randn(pa.shape[1], directions, generator=g)
            d = d / d.norm(dim=0, keepdim=True)
            sa, _ = (pa @ d).sort(0)
            sb, _ = (pb @ d).sort(0)
            vals.append((sa - sb).abs().mean())
        res.append(float(torch.stack(vals).mean()))
        xa, xb = F.avg_pool2d(xa, 2), F.avg_pool2d(xb, 2)
    return 1e3 * sum(res) / max(1, len(res))


# ------------------------------------------------------------------------------------------------
# seam and repetition classifiers (Sec. 3.4.2)


def seam_examples(crops: torch.Tensor, n: int, *, seed: int, min_col: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples (half real crops, half synthetic seams) and labels (1 = seam).

    A seam joins crop i's left part with crop j's right part (i != j) at a random column in
    [min_col, W - min_col]."""
    g = make_generator(seed, "seam-examples")
    N, _, H, W = crops.shape
    half = n // 2
    neg = crops[torch.randint(N, (n - half,), generator=g)]
    i = torch.randint(N, (half,), generator=g)
    j = (i + torch.randint(1, N, (half,), generator=g)) % N
    cols = torch.randint(min_col, W - min_col + 1, (half,), generator=g)
    pos = crops[i].clone()
    for k in range(half):
        c = int(cols[k])
        pos[k, :, :, c:] = crops[j[k], :, :, c:]
    x = torch.cat([neg, pos])
    y = torch.cat([torch.zeros(n - half), torch.ones(half)])
    return x, y


def repetition_examples(bands: torch.Tensor, n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples (half real H x 2H bands, half an H x H crop of a band tiled twice) and labels
    (1 = repetition)."""
    g = make_generator(seed, "repetition-examples")
    N, _, H, W = bands.shape
    half = n // 2
    neg = bands[torch.randint(N, (n - half,), generator=g)]
    idx = torch.randint(N, (half,), generator=g)
    offs = torch.randint(0, W - W // 2 + 1, (half,), generator=g)
    pos = torch.stack([bands[int(i), :, :, int(o):int(o) + W // 2].repeat(1, 1, 2) for i, o in zip(idx, offs)])
    return torch.cat([neg, pos]), torch.cat([torch.zeros(n - half), torch.ones(half)])


def train_classifier(make_batch, *, steps: int = 400, lr: float = 1e-3, seed: int = 0, width: int = 16,
                     progress=None, cosine: bool = True, mirror: bool = True) -> PatchClassifier:
    """Train a :class:`PatchClassifier` with Adam on batches ``make_batch(step) -> (x, y)`` (BCE).

    ``cosine``: the learning rate decays to 0 along a half cosine over ``steps`` (the last steps
    settle instead of bouncing at lr); ``mirror``: every other batch is flipped left-right (a seam
    or a repeat is one whichever way round; doubles the examples at no cost)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "classifier-init"))
        net = PatchClassifier(width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        if cosine:
            for grp in opt.param_groups:
                grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        x, y = make_batch(step)
        if mirror and step % 2:
            x = x.flip(-1)
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    return net.eval()


def scores(net: PatchClassifier, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Predicted probabilities (N,) of the positive class."""
    out = []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch):
            out.append(torch.sigmoid(net(images[s:s + batch].float())))
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(net: PatchClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct decisions at probability 0.5."""
    return float(((scores(net, x) >= 0.5).float() == y).float().mean())


__all__ = ["EncoderGram", "accuracy", "centre_cosine_distance", "centre_gram_distance", "repetition_examples",
           "scores", "seam_examples", "sliced_wasserstein", "ssim", "train_classifier"]

