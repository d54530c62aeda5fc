"""The modules a compressed model is built from, and how a compression spec installs them in a Decoder.

A compressed checkpoint is the base model's model.json plus `compression.json`, whose "modules" map module names
to specs ({"kind": "int", "bits": 4, "group_size": 128}); `install` swaps those modules for empty ones of the kind,
so the saved tensors load into them by name. `densify` turns them back into plain nn.Linear (export, fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.finetune.nf4 import NF4Linear


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """(out, in) codes in [0, 2^bits) -> (out, in * bits / 8) uint8: 8-bit codes as they are; 4-bit codes two to a
    byte, column 2j in the low nibble of byte j and column 2j + 1 in its high nibble."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """The (out, in) uint8 codes of pack_codes' bytes."""
    if bits == 8:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class QuantLinear(nn.Module):
    """A linear layer whose weight is `bits`-bit integer codes, with a float scale and zero point for each group of
    `group_size` input columns of a row: w = (code - zero) * scale. Its forward pass dequantizes the weight (the
    torch reference the CPU kernels are checked against)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        group_size = group_size or in_features
        if bits not in (4, 8) or in_features % group_size or (bits == 4 and in_features % 2):
            raise LmforgeError(
                f"a {bits}-bit layer with {in_features} inputs cannot have groups of {group_size}; "
                "choose quant.group_size dividing every layer's input width (or 0 for one scale per row)"
            )
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_codes(
        cls, codes: Tensor, scales: Tensor, zeros: Tensor, bits: int, bias: Tensor | None = None
    ) -> QuantLinear:
        """codes (out, in) integers in [0, 2^bits); scales and zeros (out, groups)."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, in_features // scales.shape[1], bias is not None)
        layer.qweight.copy_(pack_codes(codes, bits))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def spec(self) -> dict[str, Any]:
        return {"kind": "int", "bits": self.bits, "group_size": self.group_size}

    def codes(self) -> Tensor:
        return unpack_codes(self.qweight, self.bits)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in), float32."""
        codes = self.codes().reshape(self.out_features, -1, self.group_size).float()
        return ((codes - self.zeros[..., None]) * self.scales[..., None]).reshape(self.out_features, -1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _int(old: nn.Linear, spec: dict[str, Any]) -> nn.Module:
    return QuantLinear(old.in_features, old.out_features, spec["bits"], spec["group_size"], old.bias is not None)


def _nf4(old: nn.Linear, spec: dict[str, Any]) -> nn.Module:
    return NF4Linear.empty(
        old.in_features, old.out_features, spec["blocksize"], spec["double_quant"], old.bias is not None
    )


# spec kind -> (the module being replaced, its spec) -> an empty module of that kind, filled by loading the weights
BUILDERS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {"int": _int, "nf4": _nf4}


def install(model: nn.Module, modules: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace each named module of `model` by an empty one of its spec's kind (on the current default device)."""
    for name, spec in modules.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
        except AttributeError:
            raise LmforgeError(f"compression.json names a module {name} the model lacks; use an intact run") from None
        build = BUILDERS.get(spec.get("kind", ""))
        if build is None:
            raise LmforgeError(f"compression.json gives {name} an unknown kind {spec.get('kind')!r}; use an intact run")
        setattr(parent, attr, build(old, spec))
    return model


def specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Name -> spec of every compressed module of `model` (what install rebuilds)."""
    return {name: m.spec() for name, m in model.named_modules() if hasattr(m, "spec") and name}


def densify(model: nn.Module) -> nn.Module:
    """Replace every compressed linear module by a plain nn.Linear holding its dequantized weight, in place."""
    for name, module in list(model.named_modules()):
        if name and hasattr(module, "spec") and hasattr(module, "weight") and not isinstance(module, nn.Linear):
            weight = module.weight.detach()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, linear)
    return model


def linear_names(model: nn.Module, head: bool = False) -> list[str]:
    """The plain nn.Linear layers of the blocks (and the LM head with head=True), in model order."""
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and (name.startswith("layers.") or (head and name == "lm_head"))
    ]
