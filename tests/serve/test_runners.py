"""The engine's runners and its failure handling: a module the CPU path does not know runs through torch with the
torch model's tokens; a sequence whose sampling fails ends alone; every accepted sampling value and seed serves."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

from lmforge import sampling
from lmforge.cpu import decode
from lmforge.cpu.allowlist import VARIANTS, unsupported_reason
from lmforge.cpu.runner import CpuRunner
from lmforge.models import ModelConfig, build_model
from lmforge.models.layers import MLPS, NORMS, POSITIONS
from lmforge.serve.engine import Engine, EngineConfig, SamplingParams
from lmforge.serve.generate import generate_tokens
from lmforge.serve.runners import TorchRunner
from lmforge.tokenizer import Tokenizer, TokenizerConfig

TINY = dict(vocab_size=263, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([], 263, TokenizerConfig(kind="byte"))


def tiny_model():
    return build_model(ModelConfig(**TINY, **LLAMA, init_std=0.5), seed=0).eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(7, 200) for _ in range(rng.randrange(1, 20))] for _ in range(n)]


def torch_greedy(model, prompt: list[int], eos: int) -> list[int]:
    """The model's own forward pass, token by token."""
    return list(sampling.generate_tokens(model, prompt, GREEDY.max_tokens, stop_ids={eos}))


class LoRALinear(nn.Module):
    """A low-rank adapter around a linear layer (Hu et al., 2021), exposing the base weight as peft's layers do."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(torch.randn(rank, base.in_features, generator=g))
        self.b = nn.Parameter(torch.randn(base.out_features, rank, generator=g))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.T @ self.b.T


def test_a_module_the_cpu_path_does_not_know_serves_through_torch(tokenizer):
    model, batch, eos = tiny_model(), prompts(4, seed=1), tokenizer.eos_id
    plain = [torch_greedy(model, p, eos) for p in batch]
    model.layers[1].mlp.down = LoRALinear(model.layers[1].mlp.down)
    assert "LoRALinear" in unsupported_reason(model)
    expected = [torch_greedy(model, p, eos) for p in batch]
    assert expected != plain  # the adapter changes the tokens: ignoring it would show
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_batched_tokens=9))
    assert isinstance(engine.runner, TorchRunner)
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == expected
    assert [list(generate_tokens(model, p, 16, stop_ids={eos})) for p in batch] == expected  # batch-1 "auto"


def test_a_subclass_of_an_allowlisted_module_is_not_taken():
    class QuantizedLinear(nn.Linear):  # computes something else under the same weight
        pass

    model = tiny_model()
    old = model.layers[0].attn.proj
    model.layers[0].attn.proj = QuantizedLinear(old.in_features, old.out_features, bias=False)
    assert "QuantizedLinear" in unsupported_reason(model)
    model.layers[0].mlp = MLPS["gelu"](model.cfg)  # a module of another variant than the config names
    model.layers[0].attn.proj = old
    assert "GeluMLP" in unsupported_reason(model)


def test_bidirectional_attention_serves_through_torch(tokenizer):
    """The kernels attend causally: a decoder whose layer attends both ways (a prefix decoder's) is not taken, and
    the engine's tokens are the model's own."""
    model, batch, eos = tiny_model(), prompts(3, seed=5), tokenizer.eos_id
    model.layers[1].attn.causal = False
    assert "causal self-attention" in unsupported_reason(model)
    engine = Engine(model, tokenizer, EngineConfig(block_size=4))
    assert isinstance(engine.runner, TorchRunner)
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == [torch_greedy(model, p, eos) for p in batch]


def test_allowlisted_variants_are_the_models_with_a_cpu_implementation():
    implemented = {"pos": decode.POSITIONS, "norm": decode.NORMS, "mlp": decode.MLPS}
    built = {"pos": POSITIONS, "norm": NORMS, "mlp": MLPS}
    for kind, types in VARIANTS.items():
        assert set(types) <= set(implemented[kind]) and set(types) <= set(built[kind]), kind


def test_the_cpu_runner_is_picked_for_a_plain_model(tokenizer):
    assert isinstance(Engine(tiny_model(), tokenizer, EngineConfig(kv_blocks=64)).runner, CpuRunner)


@pytest.mark.parametrize("poisoned_first", [True, False])
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_failing_sequence_ends_alone(tokenizer, backend, greedy, poisoned_first):
    model, batch = tiny_model(), prompts(4, seed=2)
    expected = [torch_greedy(model, p, tokenizer.eos_id) for p in batch]
    poison = 250  # a corrupted embedding row: that request's logits are NaN, and neither pick nor draw takes them
    with torch.no_grad():
        model.embed.weight[poison] = float("nan")
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, backend=backend))
    failing = GREEDY if greedy else SamplingParams(max_tokens=16, temperature=1.0, seed=0)
    # first, it takes block 0 and its NaN keys sit in blocks the others later reuse: neither padding nor stale slots
    # may carry them into other requests (NaN + -inf is NaN under SDPA's mask)
    bad, params = [[1, 9, poison, 12]], [failing]
    if poisoned_first:
        outs = engine.generate_each(bad + batch, params + [GREEDY] * len(batch))
        failed, rest = outs[0], outs[1:]
    else:
        outs = engine.generate_each(batch + bad, [GREEDY] * len(batch) + params)
        failed, rest = outs[-1], outs[:-1]
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert [o.token_ids for o in rest] == expected
    assert all(o.finish_reason in ("stop", "length") for o in rest)
    again = engine.generate_each(batch, [GREEDY] * len(batch))  # in the blocks the failed request held
    assert [o.token_ids for o in again] == expected
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work()


def test_extreme_accepted_values_serve_with_the_others(tokenizer):
    model, batch = tiny_model(), prompts(6, seed=4)
    expected = [torch_greedy(model, p, tokenizer.eos_id) for p in batch]
    extreme = [SamplingParams(max_tokens=16, temperature=t, seed=7) for t in (1e-40, 1e-300, 1e-320, 5e-324)] + [
        SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=r) for r in (1e-320, 1e300)
    ]
    outs = Engine(model, tokenizer, EngineConfig(block_size=4)).generate_each(batch, extreme)
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert [o.token_ids for o in outs[:4]] == expected[:4]  # a vanishing temperature is greedy


@pytest.mark.parametrize("seed", [2**64, 10**30, -(2**63) - 1, 2**64 - 1 + 15])
def test_any_integer_seed_samples_reproducibly(tokenizer, seed):
    engine = Engine(tiny_model(), tokenizer, EngineConfig(block_size=4))
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=s) for s in (seed, seed, seed % 2**64)]
    a, b, c = (o.token_ids for o in engine.generate_each([[1, 20, 30]] * 3, params))
    assert a == b == c and len(a) > 0


def test_a_draft_failing_for_one_sequence_leaves_it_to_the_target(tokenizer):
    model, draft, batch = tiny_model(), tiny_model(), prompts(4, seed=5)
    expected = [torch_greedy(model, p, tokenizer.eos_id) for p in batch]
    with torch.no_grad():
        draft.embed.weight[250] = float("nan")  # the draft's logits for the last request are NaN, the target's fine
    engine = Engine(model, tokenizer, EngineConfig(block_size=4), draft=draft, spec_tokens=3)
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=0)
    outs = engine.generate_each(batch + [[1, 9, 250, 12]], [GREEDY] * len(batch) + [sampled])
    assert [o.token_ids for o in outs[:-1]] == expected
    assert outs[-1].finish_reason in ("stop", "length") and outs[-1].token_ids
    assert engine.accepted > 0 and not engine.has_work()
