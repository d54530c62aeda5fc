"""GGUF export for llama.cpp: a LLaMA-style run's weights under llama.cpp's tensor names and rotary layout, and its
byte-level BPE tokenizer as a "gpt2" vocabulary, in one file of float32, float16, Q8_0 or Q4_0 weights (the format of
ggml's GGUF spec; the quantized blocks are gguf_quants.py's).

Run: lmforge export gguf RUN FILE [--type f32|f16|q8_0|q4_0]
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from torch import Tensor

from lmforge.checkpoint import load_run
from lmforge.errors import LmforgeError
from lmforge.interop.gguf_quants import TYPES, encode, tensor_type
from lmforge.interop.hf import FAMILIES, TO_HF
from lmforge.models import Decoder, ModelConfig
from lmforge.tokenizer import Tokenizer

# transformers' LlamaForCausalLM names (what interop/hf.py splits our fused tensors into) -> llama.cpp's names
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmforgeError("GGUF export needs the gguf package: pip install 'lmforge[hf]'") from None
    return gguf


def check_llama(cfg: ModelConfig) -> None:
    """llama.cpp's "llama" architecture is RoPE + RMSNorm + SwiGLU without biases; anything else is an error."""
    wrong = {k: v for k, v in FAMILIES["llama"].items() if getattr(cfg, k) != v}
    if wrong:
        have = ", ".join(f"model.{k}={getattr(cfg, k)!r}" for k in wrong)
        need = ", ".join(f"model.{k}={v!r}" for k, v in wrong.items())
        raise LmforgeError(
            f"GGUF export writes llama.cpp's llama architecture, which needs {need}, but this run has {have}; "
            "export a model trained from a llama-* preset (or use `lmforge export hf` for GPT-2 style models)"
        )


def rope_permute(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a q or k projection (H*D, C) from the half-split RoPE layout (ours and HF's: dims i and i + D/2 are
    rotated together) to llama.cpp's interleaved one (dims 2i and 2i+1), per head; as convert_hf_to_gguf.py does."""
    rows, C = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, C).transpose(1, 2).reshape(rows, C)


def rope_unpermute(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of rope_permute."""
    rows, C = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, C).transpose(1, 2).reshape(rows, C)


def gguf_tensors(model: Decoder) -> dict[str, Tensor]:
    """The model's weights as float32 tensors under GGUF names; q and k rows permuted to the interleaved layout.
    A tied model has no `output.weight`: llama.cpp then uses `token_embd.weight` for the head."""
    cfg = model.cfg
    check_llama(cfg)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    hf = TO_HF["llama"](cfg, sd)
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = sd["lm_head.weight"]
    out = {}
    for name, tensor in hf.items():
        parts = name.removesuffix(".weight").split(".")
        if parts[:2] == ["model", "layers"]:  # model.layers.N.<module> -> blk.N.<gguf name>
            module = GGUF_NAMES[".".join(parts[3:])]
            key = f"blk.{parts[2]}.{module}.weight"
            if module == "attn_q":
                tensor = rope_permute(tensor, cfg.n_heads)
            elif module == "attn_k":
                tensor = rope_permute(tensor, cfg.n_kv_heads)
        else:
            key = GGUF_NAMES[".".join(parts)] + ".weight"
        out[key] = tensor.contiguous()
    return out


def tokenizer_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, GGUF token types, merges as "a b") of our byte-level BPE: llama.cpp's "gpt2" model uses
    the same byte-to-character table, so the token strings go over unchanged; added tokens are control tokens."""
    gguf = _gguf()
    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids are not contiguous"
    added = {t.content for t in tokenizer.inner.get_added_tokens_decoder().values()}
    types = [int(gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL) for t in tokens]
    merges = json.loads(tokenizer.inner.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # tokenizers >= 0.20 stores pairs
    return tokens, types, merges


def write_gguf(
    model: Decoder, tokenizer: Tokenizer, path: str | Path, name: str = "lmforge", file_type: str = "f32"
) -> Path:
    """Write model and tokenizer as one GGUF file, atomically (a temp file beside it, renamed when complete); its
    matrices in `file_type` (f32, f16, q8_0 or q4_0; gguf_quants.tensor_type says which stay f32)."""
    gguf = _gguf()
    if file_type not in TYPES:
        raise LmforgeError(f"GGUF type {file_type!r} is not one lmforge writes; choose one of {', '.join(TYPES)}")
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    cfg, path = model.cfg, Path(path)
    tensors = gguf_tensors(model)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise LmforgeError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.vocab_size}")
    tokens, types, merges = tokenizer_vocab(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # not mkstemp: its 0600 mode would stay on the file
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType[file_types[file_type]])
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)  # llama.cpp assumes dim / n_heads without them (pruned heads keep their width)
        w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # ByteLevel(use_regex=True) splits text with GPT-2's regex
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if tokenizer.bos_id is not None:
            w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_pad_token_id(tokenizer.pad_id)
        w.add_eot_token_id(tokenizer.end_of_turn_id)
        w.add_add_bos_token(tokenizer.add_bos)  # whether prompts start with BOS (lmforge's own: yes)
        w.add_add_eos_token(False)
        w.add_chat_template(tokenizer.chat_template)
        for key, tensor in tensors.items():
            kind = tensor_type(key, tuple(tensor.shape), file_type, cfg.tie_embeddings)
            raw = gguf.GGMLQuantizationType[kind.upper()] if kind.startswith("q") else None  # shape read from bytes
            w.add_tensor(key, encode(tensor.numpy(), kind), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def export_gguf(run: str | Path, out: str | Path, file_type: str = "f32") -> Path:
    """Write the run's newest checkpoint and tokenizer as a GGUF file that llama.cpp loads; a compressed run's
    weights are dequantized first (llama.cpp has its own types; --type q8_0/q4_0 quantizes them again)."""
    path = Path(out)
    if path.exists():
        raise LmforgeError(f"{path} exists; choose a new file name or delete it")
    model, tokenizer = load_run(run)
    if getattr(model, "compression", None):
        from lmforge.compress.modules import densify

        densify(model)
    return write_gguf(model, tokenizer, path, name=Path(run).name, file_type=file_type)
