"""GGUF import: a llama.cpp file of the "llama" architecture (weights in any common quantisation, a byte-level BPE
vocabulary, a chat template) as a run folder: a float32 step-0 checkpoint and the tokenizer rebuilt for `tokenizers`.

Run: lmforge import gguf FILE --name NAME
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from torch import Tensor

from lmforge.checkpoint import check_config_fits, save_checkpoint
from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.interop.gguf import _gguf, rope_unpermute
from lmforge.interop.hf import FAMILIES, _check_new, _publish
from lmforge.models import ModelConfig, build_model
from lmforge.tokenizer import Tokenizer

QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split regex
# tokenizer.ggml.pre -> how text is split before BPE, as llama.cpp's llama-vocab.cpp splits it for that name: "smollm"
# and "starcoder" isolate every digit first (transformers' GGUF loader ignores this key and uses GPT-2's regex alone)
PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL]),
    "starcoder": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL]),
}
# spellings of the token that ends a chat turn in common templates, for files without tokenizer.ggml.eot_token_id
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def read_gguf(path: Path):
    """(metadata by key, tensors by name) of a GGUF file; tensors stay memory-mapped until dequantised."""
    gguf = _gguf()
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; give the path of a .gguf file (make models fetches SmolLM2)")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise LmforgeError(f"{path} is not a GGUF file (it does not start with b'GGUF'); give a llama.cpp model")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError or struct errors for files that are not GGUF
        raise LmforgeError(
            f"{path} is a damaged GGUF file ({type(e).__name__}: {e}); download or convert it again"
        ) from None
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def model_config(f: dict[str, Any], has_head: bool, path: Path) -> dict[str, Any]:
    arch = f.get("general.architecture")
    if arch != "llama":
        raise LmforgeError(f"{path} holds a {arch!r} model; lmforge imports GGUF files of the 'llama' architecture")

    def need(key: str) -> Any:
        if f"llama.{key}" not in f:
            raise LmforgeError(f"{path} lacks llama.{key}; re-convert the model with llama.cpp's convert_hf_to_gguf")
        return f[f"llama.{key}"]

    dim, heads = need("embedding_length"), need("attention.head_count")
    unsupported = {
        "experts (a mixture of experts)": f.get("llama.expert_count", 0) > 0,
        f"RoPE scaling {f.get('llama.rope.scaling.type')!r}": f.get("llama.rope.scaling.type", "none") != "none",
        "RoPE on part of each head": f.get("llama.rope.dimension_count", dim // heads) != dim // heads,
        "a head size other than dim / n_heads": f.get("llama.attention.key_length", dim // heads) != dim // heads,
    }
    for what, present in unsupported.items():
        if present:
            raise LmforgeError(f"{path} uses {what}, which lmforge's llama layers lack; import a plain llama model")
    return dict(
        FAMILIES["llama"],
        vocab_size=f.get("llama.vocab_size") or len(f["tokenizer.ggml.tokens"]),
        dim=dim,
        n_layers=need("block_count"),
        n_heads=heads,
        n_kv_heads=f.get("llama.attention.head_count_kv") or heads,
        hidden_dim=need("feed_forward_length"),
        max_seq_len=need("context_length"),
        norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
        tie_embeddings=not has_head,  # llama.cpp reuses token_embd when output.weight is absent
    )


def dequantize(tensor) -> Tensor:
    """A GGUF tensor as float32, in torch's (rows, columns) order (GGUF lists the fastest dimension first)."""
    gguf = _gguf()
    kind = tensor.tensor_type.name
    if kind not in QUANTS:
        raise LmforgeError(f"tensor {tensor.name} is {kind}; lmforge dequantises {', '.join(QUANTS)}")
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(data.reshape([int(n) for n in reversed(tensor.shape)]).copy())


def state_dict(cfg: ModelConfig, tensors: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """Our state dict from llama.cpp's tensors: q and k rows back to the half-split RoPE layout, q/k/v and gate/up
    fused; the embedding doubles as the head when the file has no output.weight (tied)."""
    left = dict(tensors)

    def take(name: str) -> Tensor:
        if name not in left:
            raise LmforgeError(f"{path} has no tensor {name}; the file is incomplete or not a plain llama model")
        return dequantize(left.pop(name))

    sd = {"embed.weight": take("token_embd.weight"), "norm.weight": take("output_norm.weight")}
    sd["lm_head.weight"] = take("output.weight") if "output.weight" in left else sd["embed.weight"]
    for i in range(cfg.n_layers):
        b, a = f"blk.{i}.", f"layers.{i}."
        q = rope_unpermute(take(b + "attn_q.weight"), cfg.n_heads)
        k = rope_unpermute(take(b + "attn_k.weight"), cfg.n_kv_heads)
        sd |= {
            a + "attn_norm.weight": take(b + "attn_norm.weight"),
            a + "attn.qkv.weight": torch.cat([q, k, take(b + "attn_v.weight")]),
            a + "attn.proj.weight": take(b + "attn_output.weight"),
            a + "mlp_norm.weight": take(b + "ffn_norm.weight"),
            a + "mlp.gate_up.weight": torch.cat([take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")]),
            a + "mlp.down.weight": take(b + "ffn_down.weight"),
        }
    if left:
        raise LmforgeError(
            f"{path} holds tensors a plain llama model does not have ({', '.join(sorted(left)[:3])}); "
            "lmforge cannot import this variant"
        )
    return sd


def tokenizer(f: dict[str, Any], path: Path) -> Tokenizer:
    """The file's byte-level BPE as a `tokenizers` pipeline, with a tokenizer_config.json naming its special tokens,
    end-of-turn token, whether prompts open with BOS, and its chat template."""
    kind, pre = f.get("tokenizer.ggml.model"), f.get("tokenizer.ggml.pre", "gpt-2")  # files before the key: GPT-2
    if kind != "gpt2":
        raise LmforgeError(f"{path} has a {kind!r} vocabulary; lmforge imports byte-level BPE ('gpt2') ones only")
    if pre not in PRE_TOKENIZERS:
        raise LmforgeError(f"{path} splits text as {pre!r}; lmforge knows {', '.join(PRE_TOKENIZERS)}")
    tokens = f["tokenizer.ggml.tokens"]
    types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in f.get("tokenizer.ggml.merges", [])]
    inner = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    inner.pre_tokenizer = PRE_TOKENIZERS[pre]
    inner.decoder = decoders.ByteLevel()
    by_type = {CONTROL: [], USER_DEFINED: []}
    for t, k in zip(tokens, types, strict=True):
        by_type.get(k, []).append(t)
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in by_type[CONTROL]])
    inner.add_tokens([AddedToken(t, special=False, normalized=False) for t in by_type[USER_DEFINED]])

    def token(key: str) -> str | None:
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    template = f.get("tokenizer.chat_template", "")
    eot = token("eot") or next((t for t in END_OF_TURN if t in template and t in tokens), None) or token("eos")
    specials = {"bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding")}
    specials["unk_token"] = token("unknown")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in specials.items() if v is not None},
        "eot_token": eot,
        "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": f.get("llama.context_length"),
        "chat_template": template,
    }
    return Tokenizer(inner, config)


def import_gguf(file: str | Path, run_dir: str | Path) -> Path:
    """Turn a llama-architecture GGUF file into a run folder with a float32 step-0 checkpoint and its tokenizer."""
    path, run = Path(file), Path(run_dir)
    _check_new(run)
    fields, tensors = read_gguf(path)
    cfg = from_dict(ModelConfig, model_config(fields, "output.weight" in tensors, path), "model.")
    tok = tokenizer(fields, path)
    if tok.vocab_size != cfg.vocab_size:
        raise LmforgeError(f"{path} has {tok.vocab_size} tokens but llama.vocab_size={cfg.vocab_size}; re-convert it")
    sd = state_dict(cfg, tensors, path)
    check_config_fits(cfg, {k: tuple(v.shape) for k, v in sd.items()}, path)  # before allocating the model
    model = build_model(cfg)
    model.load_state_dict(sd, strict=True)

    run.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run.parent, prefix=f".{run.name}.", suffix=".tmp"))
    try:
        tok.save(tmp)
        meta = {k.removeprefix("general."): fields[k] for k in ("general.name", "general.file_type") if k in fields}
        save_checkpoint(tmp, 0, model, state={"source": str(path), **meta})
        _publish(tmp, run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run
