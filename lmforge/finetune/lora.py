"""LoRA (Hu et al., 2021): a frozen linear plus a trained low-rank update scale * B A on chosen slices of its output
rows (q, k, v of the fused qkv; gate, up of SwiGLU's gate_up), with the variants DoRA (Liu et al., 2024), rsLoRA
scaling alpha / sqrt(r) (Kalajdzievski, 2023) and LoRA+ learning rates (Hayou et al., 2024); QLoRA (Dettmers et al.,
2023) puts it on NF4 weights (nf4.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.finetune.nf4 import NF4Linear
from lmforge.finetune.tuned import Tuned
from lmforge.models import Decoder

if TYPE_CHECKING:
    from lmforge.finetune.methods import PeftConfig


def target_slices(model: Decoder) -> dict[str, dict[str, tuple[int, int]]]:
    """Module path -> {target name: (first, end) output rows} for every linear LoRA can wrap."""
    cfg = model.cfg
    q, kv, h = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for i, block in enumerate(model.layers):
        a = f"layers.{i}."
        out[a + "attn.qkv"] = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
        out[a + "attn.proj"] = {"proj": (0, cfg.dim)}
        if hasattr(block.mlp, "gate_up"):
            out[a + "mlp.gate_up"] = {"gate": (0, h), "up": (h, 2 * h)}
        else:
            out[a + "mlp.up"] = {"up": (0, h)}
        out[a + "mlp.down"] = {"down": (0, cfg.dim)}
    out["lm_head"] = {"lm_head": (0, cfg.vocab_size)}
    return out


class LoraLinear(nn.Module):
    """base(x) plus scale * B_s A_s dropout(x) on each slice s of the output rows; with DoRA each slice's rows are
    renormalised to a trained magnitude m: m * (W + scale B A) / ||W + scale B A|| row by row, the norm held
    constant in the backward pass as the DoRA paper (section 4.3) and peft do."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]], cfg: PeftConfig):
        super().__init__()
        self.base, self.slices = base, slices
        self.scale = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
        self.drop = nn.Dropout(cfg.dropout)
        w = base.weight.detach()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (s, e) in slices.items():
            self.lora_A[name] = nn.Parameter(torch.empty(cfg.rank, w.shape[1], device=w.device))
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))  # peft's (and nn.Linear's) init for A
            self.lora_B[name] = nn.Parameter(torch.zeros(e - s, cfg.rank, device=w.device))  # zero: starts as base
        self.magnitude = nn.ParameterDict(
            {n: nn.Parameter(w[s:e].norm(dim=1).float()) for n, (s, e) in slices.items()} if cfg.dora else {}
        )
        self.merged_norms: dict[str, Tensor] | None = None  # set while merged (DoRA needs them to unmerge)

    def delta(self, name: str) -> Tensor:
        """scale * B A for one slice: (rows, in)."""
        return self.scale * self.lora_B[name] @ self.lora_A[name]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        if self.merged_norms is not None:
            return y
        h = self.drop(x)
        W = self.base.weight if self.magnitude else None
        pieces, at = [], 0
        for name, (s, e) in sorted(self.slices.items(), key=lambda kv: kv[1]):
            d = F.linear(F.linear(h, self.lora_A[name].to(h.dtype)), self.lora_B[name].to(h.dtype)) * self.scale
            if self.magnitude:
                Ws = W[s:e].to(h.dtype)
                norm = (Ws + self.delta(name).detach().to(h.dtype)).norm(dim=1).detach()
                m = self.magnitude[name].to(h.dtype) / norm
                d = (m - 1) * F.linear(h, Ws) + m * d
            pieces += [y[..., at:s], y[..., s:e] + d]
            at = e
        pieces.append(y[..., at:])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight in place (a float nn.Linear); forward then runs the base alone."""
        assert isinstance(self.base, nn.Linear) and self.merged_norms is None
        self.merged_norms = {}
        for name, (s, e) in self.slices.items():
            W = self.base.weight[s:e]
            W += self.delta(name).to(W.dtype)
            if self.magnitude:
                self.merged_norms[name] = W.norm(dim=1, keepdim=True)
                W *= self.magnitude[name][:, None].to(W.dtype) / self.merged_norms[name]

    @torch.no_grad()
    def unmerge(self) -> None:
        assert self.merged_norms is not None
        for name, (s, e) in self.slices.items():
            W = self.base.weight[s:e]
            if self.magnitude:
                W *= self.merged_norms[name] / self.magnitude[name][:, None].to(W.dtype)
            W -= self.delta(name).to(W.dtype)
        self.merged_norms = None

    @torch.no_grad()
    def plain(self) -> nn.Linear:
        """A float nn.Linear computing this layer (NF4 bases dequantised)."""
        W = self.base.weight.detach().clone().float()
        if self.merged_norms is None:
            for name, (s, e) in self.slices.items():
                W[s:e] += self.delta(name)
                if self.magnitude:
                    W[s:e] *= self.magnitude[name][:, None] / W[s:e].norm(dim=1, keepdim=True)
        bias = self.base.bias
        linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device)
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear


class LoraTuned(Tuned):
    def param_groups(self, lr: float) -> list[dict]:
        """LoRA+: the B matrices (and DoRA's magnitudes, as peft's create_loraplus_optimizer) at lr * ratio."""
        ratio = self.cfg.loraplus_ratio
        fast = [p for n, p in self.named_parameters() if p.requires_grad and (".lora_B." in n or p.ndim == 1)]
        slow = [p for n, p in self.named_parameters() if p.requires_grad and not (".lora_B." in n or p.ndim == 1)]
        if ratio == 1.0:
            return [{"params": slow + fast, "lr": lr}]
        return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}]


def wrap(model: Decoder, cfg: PeftConfig) -> dict[str, LoraLinear]:
    """Wrap every module that holds one of cfg.targets in a LoraLinear, in place; returns them by path."""
    slices = target_slices(model)
    offered = sorted({t for names in slices.values() for t in names}, key=list(_ORDER).index)
    unknown = [t for t in cfg.targets if t not in offered]
    if unknown:
        raise LmforgeError(
            f"peft.targets names {unknown}, which this model does not have; choose among {', '.join(offered)}"
        )
    if "lm_head" in cfg.targets and model.cfg.tie_embeddings:
        raise LmforgeError("peft.targets has lm_head but the model ties it to the embedding; drop lm_head")
    wrapped = {}
    for path, names in slices.items():
        chosen = {n: r for n, r in names.items() if n in cfg.targets}
        if chosen:
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            wrapped[path] = LoraLinear(getattr(owner, leaf), chosen, cfg)
            setattr(owner, leaf, wrapped[path])
    return wrapped


_ORDER = {"q": 0, "k": 1, "v": 2, "proj": 3, "gate": 4, "up": 5, "down": 6, "lm_head": 7}


def tune_lora(model: Decoder, cfg: PeftConfig) -> Tuned:
    model.requires_grad_(False)
    wrap(model, cfg)
    return LoraTuned(model, cfg)


def tune_qlora(model: Decoder, cfg: PeftConfig) -> Tuned:
    """Every linear of the blocks held in NF4 (block size 64; the head stays in float, as bitsandbytes' recipe),
    LoRA on top."""
    model.requires_grad_(False)
    for path in target_slices(model):
        if path != "lm_head":
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, leaf, NF4Linear(getattr(owner, leaf), double_quant=cfg.double_quant))
    wrap(model, cfg)
    return LoraTuned(model, cfg)
