"""Several LoRA adapters served at once over one base model: each token row of an engine step gets the low-rank
update of the adapter its request named, so requests of different adapters (and of the base) share one batch
(S-LoRA, Sheng et al., 2023; Punica, Chen et al., 2023).

Adapters are read in PEFT's format (adapter_config.json + adapter_model.safetensors, Hugging Face LLaMA module names),
which is what `peft` saves from our transformers export and what lmforge's own LoRA saves. The q, k and v (and gate
and up) adapters of one layer update slices of our fused projections: their A matrices are stacked along the rank and
their B matrices placed in the rows of their slice, so each fused linear does one low-rank product per adapter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models import Decoder

# PEFT (HF LLaMA) module name -> (our module inside a block, which rows of its output it writes)
_SLICES = {
    "q_proj": ("attn.qkv", "q"),
    "k_proj": ("attn.qkv", "k"),
    "v_proj": ("attn.qkv", "v"),
    "o_proj": ("attn.proj", None),
    "gate_proj": ("mlp.gate_up", "gate"),
    "up_proj": ("mlp.gate_up", "up"),
    "down_proj": ("mlp.down", None),
}


def _rows(model: Decoder, part: str | None, out_features: int) -> slice:
    cfg = model.cfg
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    spans = {
        "q": slice(0, q),
        "k": slice(q, q + kv),
        "v": slice(q + kv, q + 2 * kv),
        "gate": slice(0, cfg.hidden_dim),
        "up": slice(cfg.hidden_dim, 2 * cfg.hidden_dim),
        None: slice(0, out_features),
    }
    return spans[part]


class StepRows:
    """Which adapter each token row of the current step uses, shared by every adapted linear of the model."""

    def __init__(self):
        self.groups: list[tuple[int, Tensor]] = []  # (adapter index, rows) for each adapter other than the base

    def set(self, adapter_of_row: list[int], device: torch.device) -> None:
        ids = torch.tensor(adapter_of_row, device=device)
        self.groups = [(a, (ids == a).nonzero().squeeze(1)) for a in sorted(set(adapter_of_row)) if a]


class MultiLoraLinear(nn.Module):
    """A frozen linear plus, per adapter, y[rows] += (x[rows] @ A^T) @ B^T with the LoRA scale folded into B."""

    def __init__(self, base: nn.Linear, step: StepRows):
        super().__init__()
        self.base, self.step = base, step
        self.pairs: dict[int, tuple[Tensor, Tensor]] = {}  # adapter index -> (A (r, in), B (out, r))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (B, T, out)
        if not self.pairs or not self.step.groups:
            return y
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # (B*T, in), (B*T, out)
        for adapter, rows in self.step.groups:
            pair = self.pairs.get(adapter)
            if pair is not None:
                a, b = pair
                flat_y[rows] += (flat_x[rows] @ a.T) @ b.T
        return y


@dataclass
class Adapter:
    name: str
    path: Path
    rank: int
    targets: list[str]


class AdapterSet:
    """Named adapters installed into a model: index 0 is the base model, 1.. the adapters in the order loaded."""

    def __init__(self, model: Decoder):
        self.model, self.step = model, StepRows()
        self.adapters: list[Adapter] = []
        self.wrapped: dict[str, MultiLoraLinear] = {}

    def index(self, name: str) -> int | None:
        for i, adapter in enumerate(self.adapters, start=1):
            if adapter.name == name:
                return i
        return None

    def load(self, name: str, path: str | Path) -> int:
        """Read the PEFT adapter folder `path` as adapter `name`; returns its index."""
        path = Path(path)
        if self.index(name) is not None:
            raise LmforgeError(f"adapter name {name!r} is given twice; name each --lora differently")
        config, tensors = _read_peft(path)
        scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
        index = len(self.adapters) + 1
        updates: dict[str, list[tuple[Tensor, Tensor, slice]]] = {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module_key = key[: -len(".lora_A.weight")]
            b = tensors.get(module_key + ".lora_B.weight")
            if b is None:
                raise LmforgeError(f"{path}: {key} has no lora_B partner; re-save the adapter with peft")
            target, rows = self._target(module_key, path)
            linear = self.model.get_submodule(target)
            linear = linear.base if isinstance(linear, MultiLoraLinear) else linear
            width = rows.stop - rows.start
            if a.shape[1] != linear.in_features or b.shape[0] != width:
                raise LmforgeError(
                    f"{path}: {module_key} maps {a.shape[1]} -> {b.shape[0]} features but the base model's "
                    f"{target} slice maps {linear.in_features} -> {width}; this adapter was trained on another base"
                )
            updates.setdefault(target, []).append((a, b * scale, rows))
        dtype = self.model.lm_head.weight.dtype
        for target, parts in updates.items():
            module = self._wrap(target)
            a = torch.cat([p[0] for p in parts]).to(dtype)  # (sum of ranks, in)
            b = torch.zeros(module.base.out_features, a.shape[0], dtype=dtype)  # (out, sum of ranks)
            col = 0
            for part_a, part_b, rows in parts:
                b[rows, col : col + part_a.shape[0]] = part_b
                col += part_a.shape[0]
            device = module.base.weight.device
            module.pairs[index] = (a.to(device), b.to(device))
        self.adapters.append(Adapter(name, path, config["r"], sorted(config.get("target_modules") or [])))
        return index

    def _target(self, module_key: str, path: Path) -> tuple[str, slice]:
        """PEFT's module key (base_model.model.model.layers.3.self_attn.q_proj) -> our module and its rows."""
        parts = module_key.split(".")
        if parts[-1] == "lm_head":
            return "lm_head", slice(0, self.model.cfg.vocab_size)
        if "layers" in parts and parts[-1] in _SLICES:
            layer = int(parts[parts.index("layers") + 1])
            if not 0 <= layer < self.model.cfg.n_layers:
                raise LmforgeError(
                    f"{path}: {module_key} is in layer {layer} but the base model has {self.model.cfg.n_layers} "
                    "layers; this adapter was trained on another base"
                )
            ours, part = _SLICES[parts[-1]]
            target = f"layers.{layer}.{ours}"
            base = self.model.get_submodule(target)
            base = base.base if isinstance(base, MultiLoraLinear) else base
            return target, _rows(self.model, part, base.out_features)
        raise LmforgeError(
            f"{path}: cannot place an adapter on {module_key}; lmforge serves LoRA on "
            f"{', '.join([*_SLICES, 'lm_head'])} of a LLaMA-family model"
        )

    def _wrap(self, target: str) -> MultiLoraLinear:
        if target not in self.wrapped:
            parent_name, _, child = target.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            self.wrapped[target] = MultiLoraLinear(getattr(parent, child), self.step)
            setattr(parent, child, self.wrapped[target])
        return self.wrapped[target]


def _read_peft(path: Path) -> tuple[dict, dict[str, Tensor]]:
    config_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise LmforgeError(
            f"{path} is not a LoRA adapter folder (it needs adapter_config.json and adapter_model.safetensors, as "
            "peft's save_pretrained and lmforge finetune peft.method=lora write)"
        )
    try:
        config = json.loads(config_path.read_text())
        tensors = safetensors.torch.load_file(str(weights))
    except (json.JSONDecodeError, safetensors.SafetensorError, OSError) as e:
        raise LmforgeError(f"{path}: the adapter files are corrupt ({e}); re-save the adapter") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LmforgeError(
            f"{path} holds a {config.get('peft_type')} adapter; only LoRA adapters are served per request"
        )
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise LmforgeError(
            f"{path} uses {', '.join(unsupported)}, which per-request serving does not apply; merge the adapter "
            "into the base (lmforge finetune exports a merged run) and serve that"
        )
    if config.get("bias", "none") != "none" or any("lora_embedding" in k or k.endswith(".bias") for k in tensors):
        raise LmforgeError(f"{path} trains biases or embeddings; per-request serving applies LoRA on linears only")
    return config, tensors
