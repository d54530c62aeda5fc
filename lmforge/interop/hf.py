"""Hugging Face transformers folders: export a run as LlamaForCausalLM or GPT2LMHeadModel, and import one as a run.

Run: lmforge export hf RUN DIR  /  lmforge import hf DIR --name NAME  (GGUF: interop/gguf.py, interop/gguf_import.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import tokenizers
import torch
from tokenizers import processors
from torch import Tensor

from lmforge import cli_args
from lmforge.checkpoint import check_config_fits, load_run, save_checkpoint
from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.models import Decoder, ModelConfig, build_model
from lmforge.run import atomic_write
from lmforge.tokenizer import Tokenizer

# The variant fields each HF class fixes; every other ModelConfig field maps to a number in its config.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
PREFIXES = {"llama": "model.", "gpt2": "transformer."}
# Tensors HF checkpoints may carry that are not weights: GPT-2's causal-mask buffers, old LLaMA's RoPE frequencies.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LmforgeError("HF export needs transformers: pip install 'lmforge[hf]'") from None
    return transformers


def hf_family(cfg: ModelConfig) -> str:
    """The family ("llama" or "gpt2") whose HF class this config maps to exactly, else an error naming the fix."""
    wrong = {f: {k: v for k, v in want.items() if getattr(cfg, k) != v} for f, want in FAMILIES.items()}
    if cfg.n_kv_heads != cfg.n_heads:  # GPT-2 attention has no grouped keys and values
        wrong["gpt2"]["n_kv_heads"] = cfg.n_heads
    if cfg.n_heads * cfg.head_dim != cfg.dim:  # GPT-2's heads always split the width
        wrong["gpt2"]["head_size"] = 0
    if cfg.mlp == "gelu_tanh":  # GPT-2's own activation, "gelu_new" in its config
        wrong["gpt2"].pop("mlp")
    family = min(wrong, key=lambda f: len(wrong[f]))
    if wrong[family]:
        have = ", ".join(f"model.{k}={getattr(cfg, k)!r}" for k in wrong[family])
        need = ", ".join(f"model.{k}={v!r}" for k, v in wrong[family].items())
        raise LmforgeError(
            f"no Hugging Face class fits {have}: the nearest, {ARCHITECTURES[family]}, needs {need}; "
            "train with those settings (presets llama-* and gpt2-* have them) to export"
        )
    return family


# ---- weights: our state dict <-> HF names (q/k/v and gate/up are fused in ours; GPT-2's Conv1D stores W^T) ----


def _llama_to_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[a + "attn.qkv.weight"].split([q, kv, kv])
        gate, up = sd[a + "mlp.gate_up.weight"].chunk(2)
        out |= {
            b + "input_layernorm.weight": sd[a + "attn_norm.weight"],
            b + "self_attn.q_proj.weight": wq,
            b + "self_attn.k_proj.weight": wk,
            b + "self_attn.v_proj.weight": wv,
            b + "self_attn.o_proj.weight": sd[a + "attn.proj.weight"],
            b + "post_attention_layernorm.weight": sd[a + "mlp_norm.weight"],
            b + "mlp.gate_proj.weight": gate,
            b + "mlp.up_proj.weight": up,
            b + "mlp.down_proj.weight": sd[a + "mlp.down.weight"],
        }
    return out


def _llama_from_hf(cfg: ModelConfig, t: dict[str, Tensor]) -> dict[str, Tensor]:
    sd = {"embed.weight": t.pop("model.embed_tokens.weight"), "norm.weight": t.pop("model.norm.weight")}
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.", f"model.layers.{i}."
        qkv = [t.pop(b + f"self_attn.{n}_proj.weight") for n in "qkv"]
        sd |= {
            a + "attn_norm.weight": t.pop(b + "input_layernorm.weight"),
            a + "attn.qkv.weight": torch.cat(qkv),
            a + "attn.proj.weight": t.pop(b + "self_attn.o_proj.weight"),
            a + "mlp_norm.weight": t.pop(b + "post_attention_layernorm.weight"),
            a + "mlp.gate_up.weight": torch.cat([t.pop(b + "mlp.gate_proj.weight"), t.pop(b + "mlp.up_proj.weight")]),
            a + "mlp.down.weight": t.pop(b + "mlp.down_proj.weight"),
        }
    return sd


def _gpt2_to_hf(cfg: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {
        "transformer.wte.weight": sd["embed.weight"],
        "transformer.wpe.weight": sd["positions.wpe.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
    }
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT2_LAYER.items():
            weight = sd[a + ours + ".weight"]
            out[b + theirs + ".weight"] = weight.t() if theirs in _CONV1D else weight
            out[b + theirs + ".bias"] = sd[a + ours + ".bias"]
    return out


def _gpt2_from_hf(cfg: ModelConfig, t: dict[str, Tensor]) -> dict[str, Tensor]:
    sd = {
        "embed.weight": t.pop("transformer.wte.weight"),
        "positions.wpe.weight": t.pop("transformer.wpe.weight"),
        "norm.weight": t.pop("transformer.ln_f.weight"),
        "norm.bias": t.pop("transformer.ln_f.bias"),
    }
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT2_LAYER.items():
            weight = t.pop(b + theirs + ".weight")
            sd[a + ours + ".weight"] = weight.t() if theirs in _CONV1D else weight
            sd[a + ours + ".bias"] = t.pop(b + theirs + ".bias")
    return sd


_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.up": "mlp.c_fc",
    "mlp.down": "mlp.c_proj",
}
_CONV1D = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
TO_HF: dict[str, Callable[[ModelConfig, dict[str, Tensor]], dict[str, Tensor]]] = {
    "llama": _llama_to_hf,
    "gpt2": _gpt2_to_hf,
}
FROM_HF: dict[str, Callable[[ModelConfig, dict[str, Tensor]], dict[str, Tensor]]] = {
    "llama": _llama_from_hf,
    "gpt2": _gpt2_from_hf,
}


# ---- configs: ModelConfig <-> config.json ----


def _hf_config(cfg: ModelConfig, family: str, tokenizer: Tokenizer | None, dtype: torch.dtype):
    transformers = _transformers()
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if tokenizer else (0, 1, 2)  # SPECIAL_TOKENS
    common = dict(
        architectures=[ARCHITECTURES[family]],
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=special[0],
        eos_token_id=special[1],
        pad_token_id=special[2],
        torch_dtype=str(dtype).removeprefix("torch."),  # transformers 5 stores it as `dtype`, 4.x as `torch_dtype`
    )
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=cfg.dim,
            intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            hidden_act="silu",
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,  # transformers 5 moves it into rope_parameters
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=cfg.dropout,
            **common,
        )
    return transformers.GPT2Config(
        n_embd=cfg.dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.hidden_dim,
        n_positions=cfg.max_seq_len,
        activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",  # the tanh fit, or exact erf GELU
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        **common,
    )


def _need(c: dict[str, Any], key: str, where: Path) -> Any:
    if key not in c:
        raise LmforgeError(f"{where} lacks {key!r}; use the config.json that transformers' save_pretrained wrote")
    return c[key]


def _llama_model_config(c: dict[str, Any], where: Path) -> dict[str, Any]:
    dim, heads = _need(c, "hidden_size", where), _need(c, "num_attention_heads", where)
    head_dim = c.get("head_dim") or dim // heads
    if not head_dim:
        raise LmforgeError(f"{where}: num_attention_heads={heads} exceeds hidden_size={dim} and no head_dim is given")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise LmforgeError(
            f"{where}: attention_bias/mlp_bias are set, but lmforge's llama-style layers have no biases; "
            "only bias-free LLaMA checkpoints can be imported"
        )
    if c.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{where}: hidden_act={c['hidden_act']!r}; lmforge's SwiGLU needs 'silu'")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 / 4.x
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise LmforgeError(
            f"{where}: RoPE scaling {kind!r} has no lmforge counterpart (only plain RoPE); "
            "import a checkpoint without rope scaling"
        )
    return dict(
        FAMILIES["llama"],
        vocab_size=_need(c, "vocab_size", where),
        dim=dim,
        n_layers=_need(c, "num_hidden_layers", where),
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads,
        hidden_dim=_need(c, "intermediate_size", where),
        head_size=0 if head_dim * heads == dim else head_dim,  # pruned heads keep their width
        max_seq_len=c.get("max_position_embeddings", 2048),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        tie_embeddings=c.get("tie_word_embeddings", False),
        dropout=float(c.get("attention_dropout", 0.0)),
        init_std=c.get("initializer_range", 0.02),
    )


def _gpt2_model_config(c: dict[str, Any], where: Path) -> dict[str, Any]:
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if c.get(key, want) != want:
            raise LmforgeError(f"{where}: {key}={c[key]} has no lmforge counterpart; import a model with {want}")
    if c.get("add_cross_attention"):
        raise LmforgeError(f"{where}: add_cross_attention is set; lmforge imports decoder-only GPT-2 models")
    act = c.get("activation_function", "gelu_new")
    mlp = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if mlp is None:
        raise LmforgeError(
            f"{where}: activation_function={act!r} has no lmforge counterpart; GPT-2 needs 'gelu' or 'gelu_new'"
        )
    dim = _need(c, "n_embd", where)
    heads = _need(c, "n_head", where)
    return dict(
        FAMILIES["gpt2"],
        mlp=mlp,
        vocab_size=_need(c, "vocab_size", where),
        dim=dim,
        n_layers=_need(c, "n_layer", where),
        n_heads=heads,
        n_kv_heads=heads,
        hidden_dim=c.get("n_inner") or 4 * dim,
        max_seq_len=c.get("n_positions", 1024),
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=c.get("tie_word_embeddings", True),
        dropout=float(c.get("resid_pdrop", 0.1)),
        init_std=c.get("initializer_range", 0.02),
    )


MODEL_CONFIGS = {"llama": _llama_model_config, "gpt2": _gpt2_model_config}


# ---- export and import ----


def _hf_tensors(model: Decoder) -> dict[str, Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = TO_HF[hf_family(model.cfg)](model.cfg, sd)
    if not model.cfg.tie_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    return tensors


def to_transformers(model: Decoder, tokenizer: Tokenizer | None = None):
    """The same network as a transformers model in memory (LlamaForCausalLM or GPT2LMHeadModel), our weights."""
    transformers = _transformers()
    family = hf_family(model.cfg)
    config = _hf_config(model.cfg, family, tokenizer, model.lm_head.weight.dtype)
    config._attn_implementation = "sdpa"
    hf = getattr(transformers, ARCHITECTURES[family])(config)
    missing, unexpected = hf.load_state_dict(_hf_tensors(model), strict=False)
    assert not unexpected and all(k == "lm_head.weight" or ".attn.bias" in k for k in missing), (missing, unexpected)
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def export_hf(run: str | Path, out_dir: str | Path) -> Path:
    """Write the run's newest checkpoint and tokenizer as a folder that transformers' Auto classes load."""
    out = Path(out_dir)
    _check_new(out)
    transformers = _transformers()
    model, tokenizer = load_run(run, dense=True)
    tensors = _hf_tensors(model)
    config = _hf_config(model.cfg, hf_family(model.cfg), tokenizer, model.lm_head.weight.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        config.save_pretrained(tmp)
        generation = transformers.GenerationConfig.from_model_config(config)
        # a chat answer ends at the end-of-turn token, where lmforge's chat and serve stop too (a fine-tuned run's)
        generation.eos_token_id = sorted({tokenizer.eos_id, tokenizer.end_of_turn_id})
        generation.save_pretrained(tmp)
        # q/k/v and gate/up are views of one fused tensor; safetensors before 0.5 refuses tensors that share storage
        tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_hf_tokenizer(tokenizer, tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_hf_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """The tokenizer files of an export: lmforge's own, set to put BOS first as `lmforge generate`, chat and serve do,
    so transformers' pipeline, lm-eval's `hf` model and lmforge see the same ids. That takes a TemplateProcessing
    post-processor in tokenizer.json (what `tokenizers` and transformers 4 apply), add_bos_token in
    tokenizer_config.json (transformers 5 rebuilds the post-processor from it), and a chat template that opens with
    BOS (apply_chat_template encodes its text without special tokens). The run folder's own files keep none of it:
    the server adds BOS to the token ids lm-eval's local-completions sends. A tokenizer whose model takes no BOS
    (SmolLM2's, imported) is saved as it is."""
    tokenizer.save(out)
    if not tokenizer.add_bos:
        return
    inner = tokenizers.Tokenizer.from_str(tokenizer.inner.to_str())
    bos = tokenizer.inner.id_to_token(tokenizer.bos_id)
    inner.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)]
    )
    atomic_write(out / "tokenizer.json", inner.to_str(pretty=True))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config |= {"add_bos_token": True, "chat_template": "{{- bos_token -}}" + config["chat_template"]}
    atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Turn a local LlamaForCausalLM or GPT2LMHeadModel folder into a run folder with a step-0 checkpoint."""
    src, run = Path(hf_dir), Path(run_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise LmforgeError(f"{config_path} is missing; point at a folder written by transformers' save_pretrained")
    _check_new(run)
    try:
        c = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{config_path} is not valid JSON ({e}); re-save the model with save_pretrained") from None
    arch = (c.get("architectures") or [None])[0]
    family = {v: k for k, v in ARCHITECTURES.items()}.get(arch)
    if family is None:
        raise LmforgeError(
            f"{config_path} describes {arch or c.get('model_type') or 'an unnamed architecture'}; "
            f"lmforge imports {' and '.join(ARCHITECTURES.values())} only"
        )
    cfg = from_dict(ModelConfig, MODEL_CONFIGS[family](c, config_path), "model.")
    tokenizer = _read_tokenizer(src, cfg)
    tensors = _read_weights(src)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    prefix = PREFIXES[family]  # checkpoints saved from the base model (e.g. OpenAI's GPT-2) lack the prefix
    tensors = {k if k.startswith((prefix, "lm_head.")) else prefix + k: v for k, v in tensors.items()}
    lm_head = tensors.pop("lm_head.weight", None)
    try:
        sd = FROM_HF[family](cfg, tensors)
    except KeyError as e:
        raise LmforgeError(f"{src} has no tensor {e.args[0]}; the weights do not match its config.json") from None
    if tensors:
        raise LmforgeError(
            f"{src} holds tensors a plain {arch} does not have ({', '.join(sorted(tensors)[:3])}); "
            "lmforge cannot import this variant"
        )
    if not cfg.tie_embeddings and lm_head is None:
        raise LmforgeError(f"{src} has no lm_head.weight but tie_word_embeddings is false; re-save the model")
    sd["lm_head.weight"] = sd["embed.weight"] if cfg.tie_embeddings else lm_head
    check_config_fits(cfg, {k: tuple(v.shape) for k, v in sd.items()}, config_path)  # before allocating the model
    model = build_model(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise LmforgeError(f"{src}: the weights do not fit its config.json ({e}); re-save the model") from None

    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run.parent, prefix=f".{run.name}.", suffix=".tmp"))
    try:
        if tokenizer is not None:  # lmforge adds BOS itself: an export's post-processor is dropped (save_hf_tokenizer)
            tokenizer.inner.post_processor = None
            atomic_write(tmp / "tokenizer.json", tokenizer.inner.to_str(pretty=True))
            if tokenizer.config is not None:  # a foreign byte-level BPE: its specials and chat template come along
                atomic_write(tmp / "tokenizer_config.json", json.dumps(tokenizer.config, indent=2) + "\n")
        save_checkpoint(tmp, 0, model, state={"source": str(hf_dir)})
        _publish(tmp, run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run


def _check_new(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LmforgeError(f"{path} exists and is not empty; choose a new folder or delete it")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place; `final` may only be absent or an empty folder."""
    if final.is_dir():
        final.rmdir()  # fails, leaving everything as it was, if something wrote into it meanwhile
    tmp.rename(final)


def _read_tokenizer(src: Path, cfg: ModelConfig) -> Tokenizer | None:
    if not (src / "tokenizer.json").is_file():
        return None
    try:
        tokenizer = Tokenizer.load(src / "tokenizer.json")
    except LmforgeError as e:
        raise LmforgeError(
            f"{src}/tokenizer.json is not an lmforge tokenizer ({e}); move it out of the folder to import the "
            "weights alone, then put a tokenizer.json with the same vocabulary into the run"
        ) from None
    if tokenizer.vocab_size != cfg.vocab_size:
        raise LmforgeError(
            f"{src}/tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
            f"{cfg.vocab_size}; lmforge needs them equal (pad the tokenizer or resize the embeddings first)"
        )
    return tokenizer


def _read_weights(src: Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors or of the shards its index names (never pickle files: they can run code)."""
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        files = [src / "model.safetensors"]
    elif index.is_file():
        try:
            files = [src / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise LmforgeError(f"{index} is corrupt ({e!r}); re-save the model with save_pretrained") from None
    else:
        pickled = " (it has only pickle weights, which lmforge does not load)" if any(src.glob("*.bin")) else ""
        raise LmforgeError(
            f"{src} has no model.safetensors or model.safetensors.index.json{pickled}; "
            "re-save it with model.save_pretrained(dir, safe_serialization=True)"
        )
    tensors: dict[str, Tensor] = {}
    for path in files:
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                tensors |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (safetensors.SafetensorError, OSError) as e:
            raise LmforgeError(f"{path} is missing or corrupt ({e}); download or re-save the model") from None
    return tensors


# ---- CLI ----


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "format", choices=["hf", "gguf"], help="hf: a Hugging Face transformers folder; gguf: a llama.cpp file"
    )
    parser.add_argument("run", help="run folder, or its name under runs/")
    parser.add_argument("dir", metavar="out", help="hf: folder to create (absent or empty); gguf: file to create")
    parser.add_argument(
        "--type",
        choices=["f32", "f16", "q8_0", "q4_0"],
        help="gguf: the weights' type (default f32; norms stay f32; q4_0 keeps the head at q8_0)",
    )


def export_command(args: argparse.Namespace) -> Path:
    if args.format == "gguf":
        from lmforge.interop.gguf import export_gguf  # imports this module

        out = export_gguf(args.run, args.dir, args.type or "f32")
        print(f"wrote {out}: load it with llama.cpp, e.g. llama_cpp.Llama(model_path={str(out)!r})")
        return out
    if args.type:
        raise LmforgeError("--type sets a GGUF file's weight type; drop it for `export hf` (it writes the run's dtype)")
    out = export_hf(args.run, args.dir)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return out


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "format", choices=["hf", "gguf"], help="hf: a local Hugging Face transformers folder; gguf: a llama.cpp file"
    )
    parser.add_argument("dir", metavar="source", help="hf: folder with config.json and model.safetensors; gguf: file")
    parser.add_argument("--name", default=None, type=cli_args.name, help="run name (default: the source's name)")
    parser.add_argument("--root", default="runs", help="folder that holds the run folders")


def import_command(args: argparse.Namespace) -> Path:
    source = Path(args.dir)
    if args.format == "gguf":
        from lmforge.interop.gguf_import import import_gguf  # imports this module

        run = import_gguf(source, Path(args.root) / (args.name or source.stem))
    else:
        run = import_hf(source, Path(args.root) / (args.name or source.resolve().name))
    print(f"wrote {run}: a step-0 checkpoint of {args.dir}")
    return run
