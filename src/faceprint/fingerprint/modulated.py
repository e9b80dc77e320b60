"""Model-level fingerprints by weight modulation of the TAEF2 decoder (papers/004, Ch. 6:
Sec. 6.3.3 and Eq. (6.6) filter modulation, Sec. 6.3.2 losses, Sec. 6.4.5 immunization;
Ch. 5, Sec. 5.4 soft matching).

A code c (128 bits) modulates convolutions of the decoder; for a given code the modulation is
*folded* into plain convolution weights (:meth:`ModulatedFingerprinter.instance_decoder_state`),
so an instance's decoder is an ordinary TAEF2Decoder state_dict, shipped with the model by
``Generator.with_decoder`` (:func:`fingerprint_generator`): no extra generation cost, and the
owner's key and detector never leave the owner. Two kinds (:class:`ModulationConfig`):

- "scale" (the paper's design): a code embedding E and per-convolution affine maps give a
  scale per *input* channel (Eq. (6.6): W~[o, i] = phi_l(E(c))_i W[o, i]) and a bias shift, on
  the decoder tail from ``modulate_from`` on; a bit extractor F (small CNN, 128 logits, global
  pooling) is trained jointly (``python -m faceprint.fingerprint.train``), with fidelity to the
  frozen decoder in place of the GAN losses and differentiable perturbations (augment.py).
  On this project's shared 2-core CPU the joint training ran ~150-200 steps per attempt (2-6 s
  per step of 12 crops) and the extractor stayed at chance (bit accuracy 0.50): it needs far
  more steps than were available. The code is complete (checkpoints, resume, final check).
- "kernel" (the shipped weights, ``weights/modulated_tail.safetensors``): the output
  convolution's centre tap gets W + strength * sum_k (2 c_k - 1) A_k, with A_1..A_128
  orthonormal keyed directions (no training). Its detector is *owner-side* (non-blind): given
  the fitted model the instances were made from, :meth:`ModulatedFingerprinter.decode_bits`
  (``reference=gen``) encodes the face, recovers per latent pixel the bank pixel the generator
  copied (the host), renders the unfingerprinted face and the output conv's input features,
  and estimates the kernel change by least squares from the residual. It reads clean faces
  (about 0.85 bit accuracy at 31-36 dB) but not perturbed ones (about 0.55 after JPEG 50 or
  blur k5): the source recovery and the high-resolution residual are what perturbations break.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ArtifactError, ConfigError, InputError, WeightsError
from ..io import load_artifact, save_artifact
from .attacks import uncrop

__all__ = [
    "BitExtractor",
    "CodeEmbedding",
    "ModulatedFingerprinter",
    "ModulatedTail",
    "ModulationConfig",
    "bit_accuracy",
    "bits_from_hex",
    "bits_to_hex",
    "fingerprint_generator",
    "random_code",
    "WEIGHTS_DIR",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TAIL_FILE = "modulated_tail.safetensors"
EXTRACTOR_FILE = "modulated_extractor.safetensors"
TAIL_CLASS = "faceprint.fingerprint.ModulatedTail"
EXTRACTOR_CLASS = "faceprint.fingerprint.BitExtractor"
MECHANISM = "modulated"

#: Decoder module indices where a tail may start: the three nearest-upsampling layers
#: (32 px, 64 px and 128 px stages of a 128 px image) and the output convolution.
TAIL_STARTS = (6, 11, 16, 19)

#: Centre-crop fractions the owner-side detector tries (1.0 first: no crop).
CROP_SEARCH = (1.0, 0.93, 0.86, 0.8)


# ----------------------------------------------------------------------------------------------
# codes


def _as_bits(code_bits, n_bits: int, name: str = "code_bits") -> torch.Tensor:
    """Validate one code: n_bits values in {0, 1} (tensor, array, list or hex string) -> float32."""
    if isinstance(code_bits, str):
        return bits_from_hex(code_bits, n_bits)
    try:
        t = torch.as_tensor(code_bits)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name} must be {n_bits} bits (0/1 values or a hex string), got {type(code_bits).__name__}") from None
    if t.dim() != 1 or t.numel() != n_bits:
        raise InputError(f"{name} must hold {n_bits} bits in one dimension, got shape {tuple(t.shape)}; "
                         "draw one with random_code(seed)")
    t = t.float()
    if not bool(((t == 0) | (t == 1)).all()):
        raise InputError(f"{name} must hold only 0 and 1, got values {sorted(set(t.unique().tolist()))[:6]}")
    return t


def bits_from_hex(text: str, n_bits: int = 128) -> torch.Tensor:
    """A hex string (most significant bit first) -> (n_bits,) float32 of 0/1."""
    s = text.strip().lower().removeprefix("0x")
    if len(s) * 4 != n_bits or any(ch not in "0123456789abcdef" for ch in s):
        raise InputError(f"a {n_bits}-bit code in hex has {n_bits // 4} hex digits, got {text!r}")
    v = int(s, 16)
    return torch.tensor([(v >> (n_bits - 1 - i)) & 1 for i in range(n_bits)], dtype=torch.float32)


def bits_to_hex(bits) -> str:
    """(n_bits,) 0/1 -> hex string, most significant bit first."""
    b = [int(x) for x in torch.as_tensor(bits).round().long().tolist()]
    v = 0
    for x in b:
        v = (v << 1) | x
    return f"{v:0{len(b) // 4}x}"


def random_code(seed: int, n_bits: int = 128) -> torch.Tensor:
    """A uniformly random code from an explicit seed: (n_bits,) float32 of 0/1."""
    from ..seeding import generator

    return torch.randint(0, 2, (n_bits,), generator=generator(seed, "fingerprint-code")).float()


def bit_accuracy(probs_or_bits: torch.Tensor, code_bits) -> torch.Tensor:
    """Fraction of bits matching the code, per image: (N, n) probabilities -> (N,)."""
    p = torch.as_tensor(probs_or_bits)
    code = _as_bits(code_bits, p.shape[-1]) if not (isinstance(code_bits, torch.Tensor) and code_bits.dim() == 2) else code_bits
    return ((p > 0.5).float() == code.float()).float().mean(-1)


# ----------------------------------------------------------------------------------------------
# networks


@dataclass(frozen=True)
class ModulationConfig:
    """Architecture of the modulation and the extractor.

    Parameters
    ----------
    bits : int
        Code length (the paper's operating point, Sec. 6.4.3: 128).
    embed_dim : int
        Width of the code embedding E(c).
    embed_layers : int
        1: E is linear in the bits (+-1); 2: one hidden LeakyReLU layer as in the paper.
    modulate_from : {6, 11, 16, 19}
        Decoder module index where the modulated (and fine-tuned) tail starts: 11 modulates the
        64 px and 128 px stages of a 128 px face (15 convolutions); 19 is the output convolution
        alone (kind "kernel").
    bias_shift : bool
        Also add a code-dependent shift to the biases (folds like the scales).
    extractor_width : int
        Channels of the extractor's first stage (doubled twice).
    kind : {"scale", "kernel"}
        "scale": Eq. (6.6), a learned per-input-channel scale (and bias shift) per convolution,
        from a learned embedding; needs the joint training of train.py. "kernel": the output
        convolution's kernel gets a keyed additive modulation W + strength * sum_k (2 c_k - 1)
        A_k, with A_1..A_128 orthonormal directions drawn from ``key_seed`` (no training), read
        back by the owner-side detector (ModulatedFingerprinter.decode_bits with reference=).
    strength : float
        "kernel": norm of each bit's kernel direction (sets the fingerprint's PSNR).
    key_seed : int
        "kernel": seed of the directions (the owner's secret).
    """

    bits: int = 128
    embed_dim: int = 256
    embed_layers: int = 1
    modulate_from: int = 11
    bias_shift: bool = True
    extractor_width: int = 32
    kind: str = "scale"
    strength: float = 0.02
    key_seed: int = 0

    def __post_init__(self):
        for name, lo in (("bits", 1), ("embed_dim", 1), ("embed_layers", 1), ("extractor_width", 4)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.embed_layers > 2:
            raise ConfigError(f"embed_layers must be 1 or 2, got {self.embed_layers}")
        if self.kind not in ("scale", "kernel"):
            raise ConfigError(f"kind must be 'scale' or 'kernel', got {self.kind!r}")
        if self.kind == "kernel" and self.modulate_from != 19:
            raise ConfigError(f"kind 'kernel' modulates the output convolution: modulate_from must be 19, got {self.modulate_from}")
        if not (isinstance(self.strength, (int, float)) and self.strength > 0 and math.isfinite(self.strength)):
            raise ConfigError(f"strength must be a positive number, got {self.strength!r}")
        if self.modulate_from not in TAIL_STARTS:
            raise ConfigError(f"modulate_from must be one of {TAIL_STARTS} (an upsampling layer), got {self.modulate_from!r}")
        if self.bits % 4:
            raise ConfigError(f"bits must be a multiple of 4 (codes print as hex), got {self.bits}")


class CodeEmbedding(nn.Module):
    """E: bits (N, n) in {0, 1} -> (N, embed_dim), on the centred code 2c - 1."""

    def __init__(self, bits: int, dim: int, layers: int = 1):
        super().__init__()
        self.inp = nn.Linear(bits, dim)
        self.hidden = nn.Linear(dim, dim) if layers == 2 else None
        nn.init.normal_(self.inp.weight, std=1.0 / bits**0.5)
        nn.init.zeros_(self.inp.bias)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        e = self.inp(bits * 2 - 1)
        if self.hidden is not None:
            e = self.hidden(F.leaky_relu(e, 0.2))
        return e


def _tail_convs(tail: nn.Sequential) -> list[tuple[str, nn.Conv2d]]:
    """(name relative to the tail, conv) for every Conv2d of the tail, in forward order."""
    return [(n, m) for n, m in tail.named_modules() if isinstance(m, nn.Conv2d)]


class ModulatedTail(nn.Module):
    """The decoder from ``modulate_from`` on, every convolution modulated by a code.

    forward(h, bits) runs the tail with per-image modulation, by scaling each convolution's
    *input* channels (identical to scaling the weights' input channels, Eq. (6.6)) and shifting
    its output; ``folded(bits)`` gives the weights with one code's modulation folded in.
    """

    def __init__(self, config: ModulationConfig, decoder: nn.Sequential):
        super().__init__()
        self.config = config
        self.start = config.modulate_from
        self.tail = copy.deepcopy(nn.Sequential(*list(decoder)[self.start:]))
        self.embed = CodeEmbedding(config.bits, config.embed_dim, config.embed_layers)
        convs = _tail_convs(self.tail)
        self.conv_names = [n for n, _ in convs]
        self.scale_heads = nn.ModuleList(nn.Linear(config.embed_dim, c.in_channels) for _, c in convs)
        self.shift_heads = nn.ModuleList(
            nn.Linear(config.embed_dim, c.out_channels) if (config.bias_shift and c.bias is not None) else nn.Identity()
            for _, c in convs
        )
        for h in list(self.scale_heads) + [h for h in self.shift_heads if isinstance(h, nn.Linear)]:
            nn.init.normal_(h.weight, std=0.01 / config.embed_dim**0.5)
            nn.init.zeros_(h.bias)
        if config.kind == "kernel":
            (_, out_conv), = convs
            from ..seeding import generator as make_generator

            g = make_generator(config.key_seed, "kernel-directions")
            o, i, kh, kw = out_conv.weight.shape
            a = torch.randn(o * i, config.bits, generator=g, dtype=torch.float64)
            q, _ = torch.linalg.qr(a)  # orthonormal columns
            # only the centre tap is modulated: a per-pixel remix of the output conv's input
            # features, with the spatial frequencies of the features themselves (a 3 x 3 change
            # would add high frequencies, the first thing JPEG and blur remove)
            d = torch.zeros(config.bits, o, i, kh, kw)
            d[:, :, :, kh // 2, kw // 2] = q.T.float().view(config.bits, o, i)
            self.register_buffer("directions", d.reshape(config.bits, -1).contiguous())  # (bits, C_out C_in k k)
        else:
            self.directions = None

    def kernel_delta(self, bits: torch.Tensor) -> torch.Tensor:
        """kind "kernel": the additive kernel of each code, (N, C_out, C_in, k, k)."""
        (_, conv), = _tail_convs(self.tail)
        d = self.config.strength * ((bits * 2 - 1) @ self.directions)
        return d.view(bits.shape[0], *conv.weight.shape)

    def decoder_key(self, tail_name: str) -> str:
        """Name of a tail parameter's owner in TAEF2Decoder (tail "0.conv.2" -> "11.conv.2" ...)."""
        first, _, rest = tail_name.partition(".")
        return f"{int(first) + self.start}" + (f".{rest}" if rest else "")

    def modulation(self, bits: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per convolution: (scale (N, C_in), shift (N, C_out) or None)."""
        e = self.embed(bits)
        out = []
        for sh, bh in zip(self.scale_heads, self.shift_heads):
            out.append((1 + sh(e), bh(e) if isinstance(bh, nn.Linear) else None))
        return out

    def forward(self, h: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
        """h: decoder features entering module ``modulate_from``; bits (N, n) or None (the
        unmodulated tail). Returns the decoder output (N, 3, H, W), not clamped."""
        if self.config.kind == "kernel":
            (_, m), = _tail_convs(self.tail)
            y = m(h)
            if bits is None:
                return y
            n, c = h.shape[:2]
            dw = self.kernel_delta(bits).to(h.dtype)  # (N, O, I, k, k)
            delta = F.conv2d(h.reshape(1, n * c, *h.shape[2:]), dw.reshape(-1, *dw.shape[2:]), padding=m.padding, groups=n)
            return y + delta.view(n, -1, *delta.shape[2:])
        mods = iter(self.modulation(bits)) if bits is not None else None

        def conv(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
            if mods is None:
                return m(x)
            s, b = next(mods)
            y = F.conv2d(x * s[:, :, None, None].to(x.dtype), m.weight, m.bias, stride=m.stride, padding=m.padding)
            return y if b is None else y + b[:, :, None, None].to(y.dtype)

        x = h
        for m in self.tail:
            if isinstance(m, nn.Conv2d):
                x = conv(m, x)
            elif isinstance(m, nn.Upsample):
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            elif isinstance(m, nn.ReLU):
                x = F.relu(x)
            elif hasattr(m, "conv") and hasattr(m, "fuse"):  # TAEF2 Block (no group-norm pre-mix in the tail)
                if m.pool is not None:
                    raise ConfigError("modulated tails cannot hold group-norm blocks; use modulate_from >= 6")
                y = F.relu(conv(m.conv[0], x))
                y = F.relu(conv(m.conv[2], y))
                x = F.relu(conv(m.conv[4], y) + x)
            else:
                x = m(x)
        return x

    @torch.no_grad()
    def folded(self, bits: torch.Tensor) -> dict[str, torch.Tensor]:
        """One code's decoder weights for the tail: TAEF2Decoder key -> float32 tensor."""
        if self.config.kind == "kernel":
            (name, m), = _tail_convs(self.tail)
            w = m.weight.detach().float() + self.kernel_delta(bits.reshape(1, -1).float())[0]
            out = {self.decoder_key(f"{name}.weight"): w.contiguous()}
            if m.bias is not None:
                out[self.decoder_key(f"{name}.bias")] = m.bias.detach().float().contiguous()
            return out
        mods = self.modulation(bits.reshape(1, -1).float())
        out = {}
        for (name, m), (s, b) in zip(_tail_convs(self.tail), mods):
            w = m.weight.detach().float() * s[0].float()[None, :, None, None]
            out[self.decoder_key(f"{name}.weight")] = w.contiguous()
            if m.bias is not None:
                bias = m.bias.detach().float() + (b[0].float() if b is not None else 0)
                out[self.decoder_key(f"{name}.bias")] = bias.contiguous()
        return out


class BitExtractor(nn.Module):
    """F: images (N, 3, H, W) in [0, 1], H, W >= 32, any size -> (N, bits) logits.

    Conv / GroupNorm / ReLU stages (strides 1, 2, 1, 2, 1, 2, 1), then a global average pool and
    a linear layer: every image region votes for every bit, so a crop still decodes."""

    def __init__(self, bits: int = 128, width: int = 32):
        super().__init__()
        w = width
        spec = [(3, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 8 * w, 2),
                (8 * w, 8 * w, 1)]
        layers = []
        for cin, cout, stride in spec:
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8 * w, bits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images * 2 - 1)
        return self.head(x.mean((2, 3)))


# ----------------------------------------------------------------------------------------------
# the owner's object


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be a (N, 3, H, W) float tensor in [0, 1], got {got}; "
                         "add a batch dimension with images.unsqueeze(0) for one image")
    if not images.is_floating_point():
        raise InputError(f"images must be floating point in [0, 1], got {images.dtype}; use images.float() / 255")
    if min(images.shape[-2:]) < 32:
        raise InputError(f"images must be at least 32 x 32 pixels, got {tuple(images.shape[-2:])}")


class ModulatedFingerprinter:
    """The owner's side of the model-level fingerprint: embedding, modulated tail, extractor.

    Build with :meth:`load` (the weights shipped in ``faceprint/fingerprint/weights``). Then
    :meth:`instance_decoder_state` gives the decoder of an instance for a 128-bit code,
    :func:`fingerprint_generator` wraps a fitted Generator with it, and :meth:`decode_bits`
    reads the bits back from images.

    Attributes
    ----------
    config : ModulationConfig
    tail : ModulatedTail
    extractor : BitExtractor
    base_state : dict
        The pretrained TAEF2 decoder state the tail was trained on (the rest of an instance).
    meta : dict
        Training record read from the weight files (command, data, seed, steps, time, metrics).
    """

    def __init__(self, config: ModulationConfig, tail: ModulatedTail, extractor: BitExtractor | None,
                 base_state: dict[str, torch.Tensor], *, autoencoder_id: str | None = None, meta: dict | None = None):
        self.config = config
        self.tail = tail.eval()
        self.extractor = extractor.eval() if extractor is not None else None
        self.base_state = {k: v.detach().float() for k, v in base_state.items()}
        self.autoencoder_id = autoencoder_id
        self.meta = meta or {}

    @property
    def n_bits(self) -> int:
        return self.config.bits

    # ------------------------------------------------------------------ persistence
    def save(self, folder) -> None:
        """Two artifacts in ``folder``: the embedding + modulated tail and the extractor, each
        with the training record in its metadata."""
        folder = Path(folder)
        common = {"config": asdict(self.config), "autoencoder": self.autoencoder_id, "training": self.meta}
        save_artifact(folder / TAIL_FILE, dict(self.tail.state_dict()), {"class": TAIL_CLASS, **common})
        if self.extractor is not None:
            save_artifact(folder / EXTRACTOR_FILE, dict(self.extractor.state_dict()), {"class": EXTRACTOR_CLASS, **common})

    @classmethod
    def load(cls, folder=None, *, autoencoder=None) -> "ModulatedFingerprinter":
        """Load the trained weights (default: the ones shipped with faceprint).

        Parameters
        ----------
        folder : str or Path, optional
            Folder holding modulated_tail.safetensors and modulated_extractor.safetensors.
        autoencoder : TAEF2, optional
            Supplies the pretrained decoder the tail was trained on (default: ``TAEF2.load()``).

        Raises
        ------
        WeightsError
            Weight files missing, or trained for other TAEF2 weights.
        """
        folder = Path(folder) if folder is not None else WEIGHTS_DIR
        if not (folder / TAIL_FILE).is_file():
            raise WeightsError(f"fingerprint weights {str(folder / TAIL_FILE)!r} not found; make them with "
                               "`python -m faceprint.fingerprint.train` or pass the folder that holds them")
        t_tensors, t_meta = load_artifact(folder / TAIL_FILE, expected_class=TAIL_CLASS)
        e_tensors = None
        if (folder / EXTRACTOR_FILE).is_file():  # the learned blind extractor is optional
            e_tensors, _ = load_artifact(folder / EXTRACTOR_FILE, expected_class=EXTRACTOR_CLASS)
        if autoencoder is None:
            from ..autoencoder import TAEF2

            autoencoder = TAEF2.load()
        base = getattr(autoencoder, "base", autoencoder)
        want = t_meta.get("autoencoder")
        if want and getattr(base, "id", None) != want:
            raise WeightsError(f"fingerprint weights were trained on autoencoder {want}, got {getattr(base, 'id', None)}; "
                               "load the pinned TAEF2 weights")
        try:
            config = ModulationConfig(**t_meta["config"])
            tail = ModulatedTail(config, base.decoder)
            tail.load_state_dict(t_tensors, strict=True)
            extractor = None
            if e_tensors is not None:
                extractor = BitExtractor(config.bits, config.extractor_width)
                extractor.load_state_dict(e_tensors, strict=True)
        except (KeyError, TypeError, RuntimeError, ConfigError) as e:
            raise ArtifactError(f"fingerprint weights in {str(folder)!r} are inconsistent ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}); retrain them") from None
        state = base.decoder.state_dict()
        return cls(config, tail, extractor, state, autoencoder_id=want, meta=t_meta.get("training") or {})

    # ------------------------------------------------------------------ instances
    def instance_decoder_state(self, code_bits) -> dict[str, torch.Tensor]:
        """The TAEF2Decoder state_dict of the instance for ``code_bits`` (modulation folded in).

        Parameters
        ----------
        code_bits : (128,) 0/1 tensor, array, list, or a 32-digit hex string

        Returns
        -------
        dict of str -> torch.Tensor
            Every key of the TAEF2 decoder, float32; loads into ``TAEF2Decoder`` with strict=True
            and ships with ``Generator.with_decoder``.
        """
        bits = _as_bits(code_bits, self.n_bits)
        state = {k: v.clone() for k, v in self.base_state.items()}
        folded = self.tail.folded(bits)
        missing = set(folded) - set(state)
        if missing:
            raise ArtifactError(f"modulated weights name decoder keys {sorted(missing)[:3]} the decoder lacks")
        state.update(folded)
        return state

    @torch.no_grad()
    def modulated_decode(self, latents: torch.Tensor, code_bits) -> torch.Tensor:
        """Reference path: decode latents (N, 32, h, w) with the *unfolded* modulated forward in
        float32 -> images (N, 3, 8h, 8w) in [0, 1]. (Instances decode the same up to rounding.)"""
        bits = _as_bits(code_bits, self.n_bits)
        dec = nn.Sequential(*[m for m in _decoder_from_state(self.base_state)][: self.config.modulate_from])
        h = dec(latents.float())
        x = self.tail(h, bits.expand(latents.shape[0], -1))
        return x.clamp(0, 1)

    # ------------------------------------------------------------------ detection
    @torch.no_grad()
    def decode_logits(self, images: torch.Tensor, *, reference=None, batch_size: int = 16,
                      crop_search: tuple[float, ...] = CROP_SEARCH) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> bit scores (N, bits) float32 (> 0: a 1).

        With ``reference`` (the fitted Generator the instances were made from; the owner has it)
        the owner-side detector is used (:meth:`_reference_scores`); without it, the learned blind
        extractor, if the weights include one."""
        _check_images(images)
        if reference is not None:
            outs = [self._reference_scores(images[i:i + batch_size], reference, crop_search)
                    for i in range(0, images.shape[0], batch_size)]
        elif self.extractor is not None:
            outs = [self.extractor(images[i:i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
        else:
            raise InputError("these fingerprint weights have no blind extractor; pass reference=<the fitted "
                             "Generator the instances were made from> (owner-side detection)")
        return torch.cat(outs) if outs else torch.zeros(0, self.n_bits)

    def decode_bits(self, images: torch.Tensor, *, reference=None, batch_size: int = 16,
                    crop_search: tuple[float, ...] = CROP_SEARCH) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> per-bit probability of a 1, (N, bits) float32.

        Parameters
        ----------
        images : torch.Tensor
            Faces from an instance (resized to the model's size if needed).
        reference : Generator, optional
            The fitted model the instances were made from (plain or any instance: only its
            bank, projector and the plain decoder are used). Required unless the weights
            include a trained blind extractor.
        crop_search : tuple of float
            Centre-crop fractions tried to undo a crop and resize (1.0 = none); the one whose
            reconstruction fits the image best is used.
        """
        logits = self.decode_logits(images, reference=reference, batch_size=batch_size, crop_search=crop_search)
        if reference is not None:
            if self.config.kind == "kernel":  # scores estimate 2 c - 1
                logits = 4 * logits
            else:  # correlation scores: put them on a comparable scale per image
                logits = 4 * logits / logits.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        return torch.sigmoid(logits)

    def _reference_scores(self, images: torch.Tensor, gen, crop_search) -> torch.Tensor:
        """Owner-side (non-blind) detection of a batch, with the host face recovered from the
        model (the soft matching of Sec. 5.4 needs only the decoded bits).

        1. Undo a possible centre crop + resize for each fraction f of ``crop_search`` (resample
           the image into the original geometry; the uncovered border is masked out).
        2. Encode with TAEF2 and recover, per latent pixel, the bank pixel it was copied from
           (:meth:`_source_finder`) -> z0; render it with the plain decoder and keep the f whose
           rendering fits the image best (lowest masked MSE).
        3. kind "kernel": the decoder features h entering the output convolution for z0 are
           known, and the fingerprint is conv(h, dW) with dW linear in the code, so dW is
           estimated by weighted least squares from the residual image - conv(h, W) (pixels with
           large residuals, where the source was missed or an attack changed much, and
           saturated pixels are down-weighted), and projected on the 128 key directions:
           score_k ~ 2 c_k - 1.
           kind "scale": the residual is correlated with the derivative of the modulated
           rendering with respect to each bit (a matched filter; weak, see the module docs).
        """
        from ..latent.refine import gather

        n = images.shape[0]
        size = gen.training_.image_size if getattr(gen, "training_", None) else 128
        x = images.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        ae = getattr(gen.autoencoder, "base", gen.autoencoder)
        finder, weight = self._source_finder(gen, ae)
        best = None
        for f in crop_search:
            y, mask = uncrop(x, f)
            _, prov = finder.refine(ae.encode(y) * weight)
            z0 = gather(gen.bank_, prov).float()
            err = ((y - ae.decode(z0)) ** 2 * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1) / 3
            if best is None:
                best = [y, mask, z0, err]
            else:
                better = err < best[3]
                for i, t in enumerate((y, mask, z0, err)):
                    best[i][better] = t[better]
        y, mask, z0, _ = best
        h = decoder_features(ae, z0, self.config.modulate_from).float()
        x0 = self.tail(h, None).clamp(0, 1)
        r = y - x0
        r2 = (r**2).mean(1, keepdim=True)
        tau2 = (r2 * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1)
        w = mask / (1 + r2 / tau2.clamp_min(1e-8))
        w = w * ((x0 > 0.002) & (x0 < 0.998)).all(1, keepdim=True).float()
        if self.config.kind == "kernel":
            return self._kernel_scores(h, r, w)
        ct = torch.zeros(n, self.n_bits, requires_grad=True)
        with torch.enable_grad():
            out = self.tail(h, (ct + 1) / 2).clamp(0, 1)
            score = torch.autograd.grad((out * r * w).sum(), ct)[0]
        return score.detach()

    def _kernel_scores(self, h: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Weighted least squares of the output-conv kernel change from the residual, projected
        on the key directions: (N, bits) ~ 2 c - 1 (see _reference_scores)."""
        (_, conv), = _tail_convs(self.tail.tail)
        k = conv.kernel_size[0]
        n, c = h.shape[:2]
        phi = h.reshape(n, c, -1)  # (N, C, HW): the centre tap's regressors
        ww = w.reshape(n, 1, -1)
        rr = r.reshape(n, r.shape[1], -1)  # (N, O, HW)
        out = []
        for i in range(n):
            pw = phi[i] * ww[i]
            gram = pw @ phi[i].T  # (C, C)
            rhs = pw @ rr[i].T  # (C, O)
            lam = 1e-4 * float(gram.diagonal().mean()) + 1e-12
            dw = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), rhs)  # (C, O)
            dirs = self.tail.directions.view(self.n_bits, -1, c, k, k)[:, :, :, k // 2, k // 2]  # (bits, O, C)
            out.append(dirs.reshape(self.n_bits, -1) @ dw.T.reshape(-1) / self.config.strength)
        return torch.stack(out)

    def _source_finder(self, gen, ae):
        """A per-pixel nearest-neighbour search over the model's bank, channels weighted by
        1 / their TAEF2 round-trip error (so the search trusts what survives an encode), and
        those weights (1, C, 1, 1). Matching each latent pixel alone recovers the pixel a
        generated face copied about 92 % of the time on clean faces, against 64 % for the
        generator's own 5 x 5 patch search (neighbouring pixels of a generated latent come
        from different photos). Cached per model."""
        from ..latent.refine import NNRefiner, RefineConfig

        key = (id(gen), id(gen.bank_))
        cache = getattr(self, "_finder_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        probe = gen.bank_[:48].float()
        err = (ae.encode(ae.decode(probe)) - probe).std(dim=(0, 2, 3)).clamp_min(1e-3)
        weight = (1 / err).view(1, -1, 1, 1)
        finder = NNRefiner(RefineConfig(patch_radius=0)).fit(gen.bank_.float() * weight)
        self._finder_cache = (key, finder, weight)
        return finder, weight

    def _prefix(self) -> nn.Sequential:
        """The frozen decoder layers before the modulated tail (float32 reference modules)."""
        if getattr(self, "_prefix_cache", None) is None:
            dec = _decoder_from_state(self.base_state)
            self._prefix_cache = nn.Sequential(*list(dec)[: self.config.modulate_from]).eval()
        return self._prefix_cache

    def info(self, code_bits, extra: dict | None = None) -> dict:
        """The fingerprint record a fingerprinted Generator carries (JSON-serialisable)."""
        bits = _as_bits(code_bits, self.n_bits)
        d = {"mechanism": MECHANISM, "bits": self.n_bits, "code": bits_to_hex(bits),
             "weights": self.weights_id(), "config": asdict(self.config)}
        d.update(extra or {})
        return d

    def weights_id(self) -> str:
        """A digest of the tail and extractor weights (names the fingerprinting model)."""
        import hashlib

        h = hashlib.sha256()
        for sd in (self.tail.state_dict(), self.extractor.state_dict() if self.extractor is not None else {}):
            for k in sorted(sd):
                h.update(k.encode())
                h.update(sd[k].detach().float().contiguous().numpy().tobytes())
        return "modulated-" + h.hexdigest()[:16]


def _plan_steps_before(decoder, start: int) -> int:
    """How many steps of TAEF2's fast decoder plan compute decoder modules [0, start)."""
    from ..autoencoder.taef2 import SoftClamp

    mods, i, steps = list(decoder), 0, 0
    while i < start:
        m = mods[i]
        if isinstance(m, SoftClamp):
            i += 1
            continue
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.ReLU):
            i += 1
        elif isinstance(m, nn.Upsample) and isinstance(nxt, nn.Conv2d):
            i += 1
        steps += 1
        i += 1
    return steps


@torch.no_grad()
def decoder_features(autoencoder, latents: torch.Tensor, start: int, *, batch: int = 16) -> torch.Tensor:
    """The frozen decoder layers [0, start) on latents (N, 32, h, w) -> float16 features, run by
    TAEF2's fast inference plan (its precision): the input of the modulated tail."""
    base = getattr(autoencoder, "base", autoencoder)
    plan = base._dec
    k = _plan_steps_before(base.decoder, start)
    out = []
    for i in range(0, latents.shape[0], batch):
        x = latents[i:i + batch].float()
        with torch.inference_mode():
            for m in plan.prologue:
                x = m(x)
            x = x.contiguous(memory_format=plan.memory_format)
            for step in plan.steps[:k]:
                x = step(x.to(step.dtype))
            out.append(x.float().contiguous().to(torch.float16))
    return torch.cat(out)


def _decoder_from_state(state: dict[str, torch.Tensor]) -> nn.Sequential:
    from ..autoencoder.taef2 import TAEF2Decoder

    d = TAEF2Decoder()
    d.load_state_dict(state, strict=True)
    return d.eval()


def fingerprint_generator(gen, code_bits, info: dict | None = None, *, fingerprinter: ModulatedFingerprinter | None = None):
    """A copy of a fitted Generator whose faces all carry ``code_bits`` (papers/004, Sec. 6.3.1).

    Parameters
    ----------
    gen : faceprint.latent.generator.Generator
        A fitted model (its own state is not changed).
    code_bits : (128,) 0/1 or a 32-digit hex string
        The instance's code (keep it in the owner's registry).
    info : dict, optional
        Extra JSON-serialisable fields saved with the model (e.g. the user it is for).
    fingerprinter : ModulatedFingerprinter, optional
        Default: ``ModulatedFingerprinter.load(autoencoder=gen.autoencoder)``.

    Returns
    -------
    Generator
        ``gen.with_decoder(instance_decoder_state(code_bits), info)``: same fitted state, the
        instance's decoder weights (saved in the model artifact), no extra generation cost.
    """
    if not callable(getattr(gen, "with_decoder", None)):
        raise InputError(f"gen must be a faceprint Generator, got {type(gen).__name__}")
    if info is not None and not isinstance(info, dict):
        raise InputError(f"info must be a dict or None, got {type(info).__name__}")
    if info is not None:
        try:
            json.dumps(info)
        except TypeError as e:
            raise InputError(f"info must be JSON-serialisable ({e})") from None
    fp = fingerprinter or ModulatedFingerprinter.load(autoencoder=getattr(gen, "autoencoder", None))
    state = fp.instance_decoder_state(code_bits)
    return gen.with_decoder(state, fp.info(code_bits, info))
