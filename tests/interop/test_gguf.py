"""GGUF export: read back with gguf's own reader, metadata and tokenizer are llama.cpp's llama keys, every tensor is
the source weight after undoing the documented q/k permutation, and that permutation turns our half-split RoPE into
llama.cpp's interleaved one without changing attention scores."""

from __future__ import annotations

import gguf
import pytest
import torch

from lmforge.checkpoint import load_run, save_checkpoint
from lmforge.cli import main as cli
from lmforge.interop.gguf import rope_permute, rope_unpermute
from lmforge.models import ModelConfig, build_model


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    return fields, tensors


def ours_from_gguf(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict rebuilt from GGUF tensors: un-permute q and k, fuse qkv and gate_up again."""
    sd = {"embed.weight": t["token_embd.weight"], "norm.weight": t["output_norm.weight"]}
    sd["lm_head.weight"] = t["token_embd.weight"] if cfg.tie_embeddings else t["output.weight"]
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        q = rope_unpermute(t[b + "attn_q.weight"], cfg.n_heads)
        k = rope_unpermute(t[b + "attn_k.weight"], cfg.n_kv_heads)
        sd |= {
            f"layers.{i}.attn_norm.weight": t[b + "attn_norm.weight"],
            f"layers.{i}.attn.qkv.weight": torch.cat([q, k, t[b + "attn_v.weight"]]),
            f"layers.{i}.attn.proj.weight": t[b + "attn_output.weight"],
            f"layers.{i}.mlp_norm.weight": t[b + "ffn_norm.weight"],
            f"layers.{i}.mlp.gate_up.weight": torch.cat([t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]]),
            f"layers.{i}.mlp.down.weight": t[b + "ffn_down.weight"],
        }
    return sd


def tied_run(tmp_path, tokenizer):
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, tie_embeddings=True)
    run = tmp_path / "tied"
    tokenizer.save(run)
    save_checkpoint(run, 0, build_model(cfg, seed=1), state={})
    return run


@pytest.mark.parametrize("tied", [False, True])
def test_export_reads_back_with_llama_metadata_and_the_source_weights(tiny_run, tiny_tokenizer, tmp_path, tied):
    run = tied_run(tmp_path, tiny_tokenizer) if tied else tiny_run
    out = tmp_path / "model.gguf"
    cli(["export", "gguf", str(run), str(out)])
    model, tokenizer = load_run(run)
    cfg = model.cfg
    fields, tensors = read(out)

    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    expected = {
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.max_seq_len,
        "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layers,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads,
        "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.dimension_count": cfg.head_dim,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)

    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert [vocab[t] for t in fields["tokenizer.ggml.tokens"]] == list(range(tokenizer.vocab_size))
    added = sorted(vocab[t.content] for t in tokenizer.inner.get_added_tokens_decoder().values())
    control = [i for i, kind in enumerate(fields["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL]
    assert control == added and added[:7] == list(range(7))  # the specials, then any reserved padding tokens
    # every merge joins two tokens into a third one of the vocabulary
    merges = fields["tokenizer.ggml.merges"]
    assert merges and all(a + b in vocab for a, b in (m.split(" ") for m in merges))
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.token_id("<|end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is True

    assert ("output.weight" in tensors) != tied  # llama.cpp reuses token_embd for a tied head
    assert len(tensors) == 2 + (not tied) + 9 * cfg.n_layers
    sd = model.state_dict()
    rebuilt = ours_from_gguf(cfg, tensors)
    assert rebuilt.keys() == sd.keys()
    for key, tensor in rebuilt.items():
        assert torch.equal(tensor, sd[key].float()), key


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's rope for the llama architecture (the original Meta code's): dims (2i, 2i+1) rotate by pos * f_i."""
    T, D = x.shape[-2:]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * freqs  # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def test_permuted_weights_with_interleaved_rope_give_our_attention_scores(tiny_run):
    model, _ = load_run(tiny_run)
    cfg = model.cfg
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    wq, wk, _ = model.layers[0].attn.qkv.weight.detach().split([H * D, Hkv * D, Hkv * D])
    x = torch.randn(10, cfg.dim, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(10)

    def heads(w, n):
        return (x @ w.T).view(10, n, D).transpose(0, 1)  # (n, T, D)

    q, k = model.positions.rotate(heads(wq, H), heads(wk, Hkv), pos)
    q2 = interleaved_rope(heads(rope_permute(wq, H), H), cfg.rope_theta)
    k2 = interleaved_rope(heads(rope_permute(wk, Hkv), Hkv), cfg.rope_theta)
    group = H // Hkv
    ours = q @ k.repeat_interleave(group, 0).transpose(1, 2)  # (H, T, T) attention scores
    theirs = q2 @ k2.repeat_interleave(group, 0).transpose(1, 2)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(interleaved_rope(heads(wq, H), cfg.rope_theta), q, atol=1e-3)  # the permutation matters


def test_gpt2_style_runs_get_one_clear_error(tiny_tokenizer, tmp_path, capsys):
    cfg = ModelConfig(**ModelConfig.expand({"preset": "gpt2-tiny", "vocab_size": 512, "dim": 32, "n_layers": 1}))
    run = tmp_path / "gpt2"
    tiny_tokenizer.save(run)
    save_checkpoint(run, 0, build_model(cfg, seed=0), state={})
    with pytest.raises(SystemExit) as exit:
        cli(["export", "gguf", str(run), str(tmp_path / "gpt2.gguf")])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.pos='rope'" in lines[0] and "llama-*" in lines[0], lines
    assert not list(tmp_path.glob("*.gguf*"))
