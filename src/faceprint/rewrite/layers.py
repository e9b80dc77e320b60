"""Where in the TAEF2 decoder a rewrite lives: the value layer, its keys, the memory, the tail
(papers/001, Sec. 3.1-3.2 and 4.1: image = G_tail(v), v = memory(k), k = G_head(z)).

The decoder is an nn.Sequential (docs/TAEF2.md): 0 clamp; 1 conv 32->64; 2 ReLU; 3-5 GN blocks
at 16x16; 6 up; 7 conv; 8-10 blocks at 32x32; 11 up; 12 conv; 13-15 blocks at 64x64; 16 up;
17 conv; 18 block at 128x128; 19 conv 64->3. A block computes relu(conv4(relu(conv2(relu(conv0(x)))))
+ x) (a GN block first adds a pooled pre-mix to x).

For value layer m (a block index):
  key   k = output of module m - 1 (the block's input), computed by the frozen head;
  value v = output of module m (64 channels at 16x16 for m in 3..5, 32x32 for m in 8..10);
  memory: the last L convolutions of block m with the ReLU between them (L = 2: conv2, ReLU,
        conv4, the paper's "nonlinearity associative memory"; L = 1: conv4 alone, the linear
        memory of RDGM; L = 3: the whole block), everything else frozen;
  tail: modules m + 1 .. 19, then the clamp to [0, 1].
The paper's choice, a value layer at 1/8 of the output resolution (StyleGAN2's 10th layer at
1024 px), is block 5 (16x16, "16x16"); block 10 (32x32, "32x32") gives finer spatial control.
"""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.nn as nn

from ..errors import ConfigError

#: named value layers (decoder block indices)
VALUE_LAYERS = {"16x16": 5, "32x32": 10}
#: every block index a value layer may be (GN blocks 3-5 at 16x16, blocks 8-10 at 32x32)
ALLOWED_LAYERS = (3, 4, 5, 8, 9, 10)
#: the block's convolutions, in order (indices in Block.conv)
BLOCK_CONVS = (0, 2, 4)


def resolve_layer(layer) -> int:
    """'16x16' | '32x32' | a block index in ALLOWED_LAYERS -> the block index."""
    if isinstance(layer, str):
        if layer in VALUE_LAYERS:
            return VALUE_LAYERS[layer]
        if layer.isdigit():
            layer = int(layer)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer not in ALLOWED_LAYERS:
        raise ConfigError(f"value layer must be '16x16', '32x32' or a decoder block index in {ALLOWED_LAYERS}, "
                          f"got {layer!r}; the paper's choice is '16x16'")
    return layer


def layer_name(m: int) -> str:
    for k, v in VALUE_LAYERS.items():
        if v == m:
            return k
    return f"block{m}"


def value_scale(m: int) -> int:
    """Image pixels per value-layer cell: 8 at 16x16 (m <= 5), 4 at 32x32."""
    return 8 if m <= 5 else 4


def check_conv_layers(L) -> int:
    if isinstance(L, bool) or not isinstance(L, int) or L not in (1, 2, 3):
        raise ConfigError(f"conv_layers (L, the memory's depth) must be 1, 2 or 3, got {L!r}; the paper uses 2")
    return L


def head(decoder: nn.Sequential, m: int) -> nn.Sequential:
    """Modules 0..m: latent (N, 32, h, w) -> value (N, 64, s, s)."""
    return nn.Sequential(*list(decoder)[: m + 1])


def key_head(decoder: nn.Sequential, m: int) -> nn.Sequential:
    """Modules 0..m-1: latent -> key (the input of block m)."""
    return nn.Sequential(*list(decoder)[:m])


def tail(decoder: nn.Sequential, m: int) -> nn.Sequential:
    """Modules m+1..end: value -> image (not clamped)."""
    return nn.Sequential(*list(decoder)[m + 1:])


def memory_block(decoder: nn.Sequential, m: int, L: int) -> nn.Module:
    """A copy of block m whose last L convolutions train and everything else is frozen."""
    block = copy.deepcopy(decoder[m]).float()
    for p in block.parameters():
        p.requires_grad_(False)
    for i in BLOCK_CONVS[3 - L:]:
        for p in block.conv[i].parameters():
            p.requires_grad_(True)
    return block


def memory_state(block: nn.Module, m: int, L: int) -> dict[str, torch.Tensor]:
    """The trained convolutions of ``block`` under their decoder state_dict keys."""
    out = {}
    for i in BLOCK_CONVS[3 - L:]:
        for name, t in block.conv[i].state_dict().items():
            out[f"{m}.conv.{i}.{name}"] = t.detach().clone().contiguous()
    return out


def trainable(block: nn.Module) -> list[nn.Parameter]:
    return [p for p in block.parameters() if p.requires_grad]


def modules_digest(decoder: nn.Sequential, upto: int) -> str:
    """16 hex digits of the weights of modules 0..upto (what a projector for layer ``upto`` was
    trained against)."""
    h = hashlib.sha256()
    sd = nn.Sequential(*list(decoder)[: upto + 1]).state_dict()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def run(module: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """module(x) without gradients, in batches (float32)."""
    module = module.eval()
    return torch.cat([module(x[i:i + batch].float()) for i in range(0, x.shape[0], batch)]) if x.shape[0] else x
