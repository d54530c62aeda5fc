"""ModelConfig: one flat, validated dataclass for every decoder variant, plus named presets of overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lmforge.config import check
from lmforge.errors import LmforgeError

# GPT-2 style: learned positions, LayerNorm, GELU, biases, tied embeddings (Radford et al., 2019).
_GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
# LLaMA style: RoPE, RMSNorm, SwiGLU, no biases, untied embeddings (Touvron et al., 2023).
_LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
_LLAMA2 = dict(vocab_size=32000, max_seq_len=4096)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny sizes that train on a laptop CPU
    "gpt2-tiny": dict(_GPT2, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=512, max_seq_len=256),
    "llama-tiny": dict(_LLAMA, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seq_len=256),
    "llama-small": dict(_LLAMA, dim=384, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=1024, max_seq_len=256),
    # the real shapes, for planning and interop
    "gpt2-124m": dict(
        _GPT2, vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=3072, max_seq_len=1024
    ),
    "llama-1b": dict(
        _LLAMA,
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=8192,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    # Llama 2 (Touvron et al., 2023b, table 1 and the released config.json files)
    "llama-7b": dict(_LLAMA, **_LLAMA2, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "llama-13b": dict(_LLAMA, **_LLAMA2, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "llama-70b": dict(_LLAMA, **_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
}


@dataclass
class ModelConfig:
    preset: str = ""
    """Named starting point (see PRESETS); keys given beside it override the preset's."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (the BPE trainer targets exactly this)."""
    dim: int = 64
    """Residual stream width."""
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    """Key/value heads: n_heads for MHA, fewer for GQA, 1 for MQA."""
    hidden_dim: int = 256
    """Feed-forward inner width."""
    head_size: int = 0
    """Width of each attention head (0: dim // n_heads); structured pruning keeps it when it removes heads."""
    max_seq_len: int = 128
    """Context length (training window and the largest KV cache)."""
    pos: Literal["learned", "sinusoidal", "rope", "alibi"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "swiglu"
    bias: bool = False
    """Biases in linear layers and LayerNorm."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @classmethod
    def expand(cls, values: dict[str, Any], where: str = "") -> dict[str, Any]:
        """Apply the named preset under the explicitly given keys."""
        preset = values.get("preset", "")
        if not preset:
            return values
        if preset not in PRESETS:
            raise LmforgeError(f"{where}preset={preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
        return {**PRESETS[preset], **values}

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be positive")
        check(self.head_size >= 0, f"model.head_size={self.head_size} must be >= 0 (0: dim // n_heads)")
        check(
            self.head_size or self.dim % self.n_heads == 0,
            f"model.n_heads={self.n_heads} must divide model.dim={self.dim} (or give model.head_size)",
        )
        check(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} (1 = MQA, n_heads = MHA)",
        )
        check(
            self.pos != "rope" or self.head_dim % 2 == 0, f"model.pos=rope needs an even head_dim, got {self.head_dim}"
        )
        check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        check(self.norm_eps > 0 and self.init_std > 0, "model.norm_eps and model.init_std must be positive")

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (equals the built model's)."""
        C, H = self.dim, self.hidden_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        b = 1 if self.bias else 0
        attn = C * (q + 2 * kv) + q * C + b * (q + 2 * kv + C)
        mlp = (3 * C * H) if self.mlp == "swiglu" else (2 * C * H + b * (H + C))
        norm = C * (2 if self.norm == "layernorm" and self.bias else 1)
        total = self.n_layers * (attn + mlp + 2 * norm) + norm
        if embeddings:
            total += self.vocab_size * C * (1 if self.tie_embeddings else 2)
            total += self.max_seq_len * C if self.pos == "learned" else 0
        else:
            total += 0 if self.tie_embeddings else self.vocab_size * C
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention's 12*L*T*C
        (Kaplan et al., 2020; PaLM appendix B)."""
        T = seq_len or self.max_seq_len
        C, H = self.dim, self.hidden_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        matmul = self.n_layers * (2 * C * q + 2 * C * kv + (3 if self.mlp == "swiglu" else 2) * C * H)
        matmul += self.vocab_size * C
        return 6 * matmul + 12 * self.n_layers * T * q
