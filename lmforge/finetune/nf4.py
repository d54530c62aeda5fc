"""4-bit NormalFloat weights for QLoRA (Dettmers et al., 2023): blockwise absmax scaling onto the 16 NF4 levels,
two codes to a byte, with optional double quantisation of the absmax values to 8 bits.

The arithmetic follows bitsandbytes 0.50's CPU path step for step (tests/finetune/test_nf4.py checks the packed
bytes and the scales bit for bit), so weights quantised here and there are interchangeable.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# The NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (bitsandbytes' get_4bit_type("nf4")).
NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic-exponent code (Dettmers, 2016), sorted: what double quantisation uses."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()  # float32 products
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _blockwise(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """x flat -> (x scaled into [-1, 1] per block, each block's absmax), with a short last block as bitsandbytes."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
    return scaled, absmax


def quantize_nf4(w: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """w (any shape) -> (packed (ceil(n/2), 1) uint8, first code in the high nibble; absmax (blocks,) float32)."""
    scaled, absmax = _blockwise(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, (NF4[:-1] + NF4[1:]) / 2, out_int32=True).to(torch.uint8)  # nearest level
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


def dequantize_nf4(packed: Tensor, absmax: Tensor, shape: torch.Size, blocksize: int = 64) -> Tensor:
    """The float32 weights of `shape` that `packed` codes."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()  # (2 * bytes,)
    n = shape.numel()
    values = NF4.to(packed.device)[codes[:n]]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).reshape(shape)


def quantize_absmax(absmax: Tensor, blocksize: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantisation: absmax minus its mean, to the 8-bit dynamic code in blocks of 256 ->
    (codes uint8, their absmax float32, the mean)."""
    offset = absmax.mean()
    x = absmax - offset
    n = x.numel()
    absmax2 = F.pad(x, (0, -n % blocksize)).reshape(-1, blocksize).abs().amax(dim=1)
    absmax2[-1] = x[(len(absmax2) - 1) * blocksize :].abs().max()  # a short last block: its own values only
    x = x / absmax2.repeat_interleave(blocksize)[:n]
    # bitsandbytes' CPU kernel reads the nearest code from a 65536-entry table over [-1, 1]; so do we, for equal bytes
    j = (((x.clamp(-1, 1) + 1) * 0.5) * 65535 + 0.5).long()
    idx = _dynamic_table()[j]
    return idx.to(torch.uint8), absmax2, offset


@functools.cache
def _dynamic_table() -> Tensor:
    grid = torch.arange(65536, dtype=torch.float64) / 65535 * 2 - 1
    code = dynamic_map().double()
    return torch.searchsorted((code[:-1] + code[1:]) / 2, grid, side="left")  # (65536,) nearest, ties to the lower


def dequantize_absmax(q: Tensor, absmax2: Tensor, offset: Tensor, blocksize: int = 256) -> Tensor:
    n = q.numel()
    return dynamic_map().to(q.device)[q.long()] * absmax2.repeat_interleave(blocksize)[:n] + offset


class _NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantised again in the backward pass rather than saved: the frozen weights stay 4-bit
    between the passes (bitsandbytes' MatMul4Bit does the same)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: NF4Linear) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.layer.weight.to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is held in NF4 and dequantised for each matmul (in the input's dtype)."""

    def __init__(self, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        w = linear.weight.detach()
        self.shape, self.blocksize, self.double_quant = w.shape, blocksize, double_quant
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, absmax = quantize_nf4(w, blocksize)
        self.register_buffer("packed", packed)
        if double_quant:
            q, absmax2, offset = quantize_absmax(absmax)
            self.register_buffer("absmax_q", q)
            self.register_buffer("absmax2", absmax2)
            self.register_buffer("offset", offset)
        else:
            self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, blocksize: int = 64, double_quant: bool = True, bias: bool = False
    ) -> NF4Linear:
        """An NF4Linear of zeros in the shapes an (out, in) weight quantizes to: what a saved one loads into (built
        on any device, the meta device included, without quantizing anything)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        n, blocks = in_features * out_features, -(-in_features * out_features // blocksize)
        layer.shape, layer.blocksize, layer.double_quant = (
            torch.Size([out_features, in_features]),
            blocksize,
            double_quant,
        )
        layer.in_features, layer.out_features = in_features, out_features
        layer.register_buffer("packed", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8))
        if double_quant:
            layer.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.uint8))
            layer.register_buffer("absmax2", torch.zeros(-(-blocks // 256)))
            layer.register_buffer("offset", torch.zeros(()))
        else:
            layer.register_buffer("absmax", torch.zeros(blocks))
        layer.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        return layer

    def spec(self) -> dict:
        """What a compressed checkpoint's compression.json records to rebuild this layer (lmforge.compress)."""
        return {"kind": "nf4", "blocksize": self.blocksize, "double_quant": self.double_quant}

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (out, in), float32."""
        absmax = dequantize_absmax(self.absmax_q, self.absmax2, self.offset) if self.double_quant else self.absmax
        return dequantize_nf4(self.packed, absmax, self.shape, self.blocksize)

    def forward(self, x: Tensor) -> Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def plain(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear
