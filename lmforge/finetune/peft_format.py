"""LoRA adapters in peft's folder format (adapter_config.json + adapter_model.safetensors), both ways: ours load into
`PeftModel.from_pretrained(export, dir)` on the model's transformers export, and peft's load onto our model.

Our q, k, v (and gate, up) update slices of a fused projection; in transformers they are separate modules with the
same rows, so each slice's A and B are exactly peft's q_proj (k_proj, ...) A and B. A side file, lmforge_base.json,
records the base model's hash (methods.same_base) and config: loading onto any other base is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.finetune.lora import LoraLinear, target_slices
from lmforge.finetune.methods import PeftConfig, same_base, tune
from lmforge.finetune.tuned import Tuned
from lmforge.models import Decoder
from lmforge.run import atomic_write

HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "proj": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "lm_head": "lm_head",
}
OURS = {hf.rpartition(".")[2]: ours for ours, hf in HF_MODULES.items()}  # "q_proj" -> "q"
BASE_FILE = "lmforge_base.json"


def _check_llama(model: Decoder) -> None:
    from lmforge.interop.hf import hf_family

    if hf_family(model.cfg) != "llama":
        raise LmforgeError(
            "peft's format splits q, k and v only for LLaMA-style models; GPT-2's fused c_attn has one LoRA pair "
            "where ours has three: keep this adapter in lmforge's own format (trainable_state)"
        )


def _peft_name(path: str, name: str) -> str:
    """Our module path and target name -> peft's module name (layers.0.attn.qkv, q -> ...layers.0.self_attn.q_proj)."""
    layer = path.split(".")[1] if path.startswith("layers.") else None
    return "base_model.model." + (HF_MODULES[name] if layer is None else f"model.layers.{layer}.{HF_MODULES[name]}")


def peft_tensors(tuned: Tuned) -> dict[str, Tensor]:
    """Our LoRA weights under the names peft saves them with (adapter name dropped): views, not copies."""
    out = {}
    for path, module in tuned.model.named_modules():
        if isinstance(module, LoraLinear):
            for name in module.slices:
                where = _peft_name(path, name)
                out[f"{where}.lora_A.weight"] = module.lora_A[name].detach()
                out[f"{where}.lora_B.weight"] = module.lora_B[name].detach()
                if module.magnitude:
                    out[f"{where}.lora_magnitude_vector"] = module.magnitude[name].detach()
    return out


def _shapes(model: Decoder, cfg: PeftConfig) -> dict[str, tuple[int, ...]]:
    """peft_tensors' names and shapes for `cfg` on the unwrapped `model`."""
    out = {}
    for path, names in target_slices(model).items():
        for name, (s, e) in names.items():
            if name in cfg.targets:
                where, fan_in = _peft_name(path, name), model.get_submodule(path).weight.shape[1]
                out[f"{where}.lora_A.weight"] = (cfg.rank, fan_in)
                out[f"{where}.lora_B.weight"] = (e - s, cfg.rank)
                if cfg.dora:
                    out[f"{where}.lora_magnitude_vector"] = (e - s,)
    return out


def save_adapter(tuned: Tuned, out_dir: str | Path) -> Path:
    """Write a LoRA `tuned` (method lora) as a peft adapter folder."""
    cfg = tuned.cfg
    if cfg.method != "lora":
        raise LmforgeError(f"peft.method={cfg.method} has no peft LoRA form; save_adapter writes method=lora")
    _check_llama(tuned.model)
    out = Path(out_dir)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(HF_MODULES[t].rpartition(".")[2] for t in cfg.targets),
        "use_dora": cfg.dora,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    tensors = {k: v.contiguous().clone() for k, v in peft_tensors(tuned).items()}
    base = {"hash": tuned.base_hash, "model": dataclasses.asdict(tuned.model.cfg)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"}))
    atomic_write(out / BASE_FILE, json.dumps(base, indent=2) + "\n")
    atomic_write(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")  # last: a folder with it is whole
    return out


def load_adapter(model: Decoder, adapter_dir: str | Path) -> Tuned:
    """tune(model, lora config of the folder) with the folder's weights: a peft LoRA adapter (saved by peft from
    the model's transformers export, or by save_adapter) onto our model."""
    src = Path(adapter_dir)
    _check_llama(model)
    c = _read_json(src / "adapter_config.json")
    if c.get("peft_type") != "LORA":
        raise LmforgeError(f"{src} holds a {c.get('peft_type')} adapter; load_adapter reads LoRA adapters")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save", "layer_replication"):
        if c.get(key):
            raise LmforgeError(f"{src}: {key}={c[key]!r} has no lmforge counterpart; save the adapter without it")
    targets = c.get("target_modules")
    if not isinstance(targets, list) or any(t not in OURS for t in targets):
        raise LmforgeError(f"{src}: target_modules={targets!r}; lmforge reads a list among {', '.join(OURS)}")
    base = src / BASE_FILE
    if base.is_file() and _read_json(base)["hash"] != same_base(model):
        raise LmforgeError(
            f"{src} was trained on another base model (hash {_read_json(base)['hash']}, this one "
            f"{same_base(model)}); load it onto the model it was trained from"
        )
    cfg = PeftConfig(
        method="lora",
        targets=[OURS[t] for t in targets],
        rank=int(c["r"]),
        alpha=float(c["lora_alpha"]),
        dropout=float(c.get("lora_dropout", 0.0)),
        dora=bool(c.get("use_dora")),
        rslora=bool(c.get("use_rslora")),
    )
    tensors = safetensors.torch.load_file(str(src / "adapter_model.safetensors"))
    want = _shapes(model, cfg)
    if set(tensors) != set(want):
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        raise LmforgeError(f"{src}: the weights do not fit its config (missing {missing[:2]}, extra {extra[:2]})")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise LmforgeError(
                f"{src}: {name} is {tuple(tensors[name].shape)} but this model needs {shape}; "
                "the adapter belongs to another base model"
            )
    tuned = tune(model, cfg)
    with torch.no_grad():
        for name, t in peft_tensors(tuned).items():
            t.copy_(tensors[name])
    return tuned


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LmforgeError(f"{path} is missing; point at a folder written by save_pretrained or save_adapter") from None
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); re-save the adapter") from None
