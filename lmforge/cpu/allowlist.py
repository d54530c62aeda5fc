"""Which models the numpy steps and C kernels run: one allowlist of module types and variants. Anything else (a new
MLP kind, a LoRA-wrapped linear, a streamed or sharded model) runs through the torch runner, so a module the CPU path
does not know is never skipped: its forward pass is the model's own. Integer-weight layers (compress.modules'
QuantLinear) run only through the C kernels, which read their codes in place."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.compress.modules import QuantLinear
from lmforge.cpu import native
from lmforge.models import Decoder
from lmforge.models.decoder import Attention, Block
from lmforge.models.layers import (
    ALiBiPositions,
    GeluMLP,
    LearnedPositions,
    RotaryPositions,
    SinusoidalPositions,
    SwiGLU,
)

# per config variant, the module type it builds and the CPU path reproduces (decode.py's POSITIONS, NORMS, MLPS)
VARIANTS: dict[str, dict[str, type[nn.Module]]] = {
    "pos": {
        "learned": LearnedPositions,
        "sinusoidal": SinusoidalPositions,
        "rope": RotaryPositions,
        "alibi": ALiBiPositions,
    },
    "norm": {"rmsnorm": nn.RMSNorm, "layernorm": nn.LayerNorm},
    "mlp": {"gelu": GeluMLP, "gelu_tanh": GeluMLP, "swiglu": SwiGLU},
}
# the modules around them; exact types: a subclass (a quantized or LoRA nn.Linear) may compute something else
STRUCTURE: set[type[nn.Module]] = {
    Decoder,
    Block,
    Attention,
    nn.Linear,
    QuantLinear,
    nn.Embedding,
    nn.Dropout,
    nn.ModuleList,
}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the CPU path cannot run `model` (None when it can): a Decoder of allowlisted modules, fp32 on the CPU."""
    if type(model) is not Decoder:
        return f"it is a {type(model).__name__}, not a whole Decoder (a pipeline stage?)"
    cfg = model.cfg
    for kind, types in VARIANTS.items():
        if getattr(cfg, kind) not in types:
            return f"its {kind} {getattr(cfg, kind)!r} has no CPU implementation"
    norm, mlp = VARIANTS["norm"][cfg.norm], VARIANTS["mlp"][cfg.mlp]
    expected = {"positions": VARIANTS["pos"][cfg.pos], "norm": norm}  # by module name: what the config builds there
    for i in range(len(model.layers)):
        expected |= {f"layers.{i}.attn_norm": norm, f"layers.{i}.mlp_norm": norm, f"layers.{i}.mlp": mlp}
    known = STRUCTURE | {t for types in VARIANTS.values() for t in types.values()}
    for name, module in model.named_modules():
        if type(module) not in known or type(module) is not expected.get(name, type(module)):
            return f"its module {name or 'model'} is a {type(module).__name__}, which the CPU path does not run"
    for name, module in model.named_modules():  # the kernels attend causally over the sequence's own keys
        if isinstance(module, Attention) and not (module.causal and hasattr(module, "qkv")):
            return f"its module {name} is not causal self-attention, which the CPU path does not run"
    codes = {id(m.qweight) for m in model.modules() if type(m) is QuantLinear}  # uint8, the rest fp32
    if codes and not native.available():
        return "its integer-weight layers run only through the C kernels, which are not built here"
    tensors = [*model.parameters(), *model.buffers()]
    if any(type(t.data) is not torch.Tensor for t in tensors):
        return "its weights are distributed tensors (tensor parallel)"
    if any(t.device.type != "cpu" or (t.dtype != torch.float32 and id(t) not in codes) for t in tensors):
        return "its weights are not all fp32 on the CPU"
    if any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()):
        return "its modules have forward hooks (layers streamed by stream_layers?)"
    if model.training and cfg.dropout > 0:
        return "it is in training mode with dropout"
    return None
