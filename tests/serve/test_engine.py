"""The continuous-batching engine: concurrent requests give the tokens each gives alone (greedy); paged blocks never
leak; prefix-cache hits are real and change nothing; logprobs equal a plain forward pass."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.cpu.runner import CpuRunner
from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig, build_model
from lmforge.serve.engine import Engine, EngineConfig, EngineFull, SamplingParams
from lmforge.serve.generate import generate_tokens
from lmforge.serve.offload import stream_layers
from lmforge.serve.paged import block_hashes
from lmforge.tokenizer import Tokenizer, TokenizerConfig

TINY = dict(vocab_size=263, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
VARIANTS = {
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, n_kv_heads=4),
    "alibi": dict(pos="alibi", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([], 263, TokenizerConfig(kind="byte"))


def tiny_model(variant: str = "llama", **overrides):
    # a larger init spreads the logits so greedy picks are not near-ties that rounding could flip
    return build_model(ModelConfig(**{**TINY, **VARIANTS[variant], **overrides}, init_std=0.5), seed=0).eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(7, 263) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def alone(model, prompt: list[int], params: SamplingParams, eos: int) -> list[int]:
    return list(generate_tokens(model, prompt, params.max_tokens, stop_ids={eos}))


def assert_no_leak(engine: Engine) -> None:
    blocks = engine.blocks
    assert not engine.has_work()
    assert blocks.num_free == blocks.num_blocks
    assert all(r == 0 for r in blocks.refs)
    assert not blocks.claims and not blocks.claimed.any()  # every claim ended with its sequence
    assert blocks.open[:-1].all()  # every free block may be taken where it lies: the engine moves cached prefixes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_concurrent_equals_one_by_one(variant, tokenizer):
    model = tiny_model(variant)
    # a 7-token step budget forces chunked prefill mixed with decodes; 4-token blocks cross many block edges
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_batched_tokens=7, max_num_seqs=5))
    batch = prompts(9)
    outs = engine.generate(batch, GREEDY)
    for prompt, out in zip(batch, outs, strict=True):
        assert out.token_ids == alone(model, prompt, GREEDY, tokenizer.eos_id)
        assert out.finished and out.finish_reason in ("length", "stop")
    assert_no_leak(engine)


def test_preemption_recomputes_exactly(tokenizer):
    model = tiny_model()
    # 14 blocks of 4 tokens cannot hold 6 sequences of up to 50 tokens: sequences are preempted and recomputed
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, kv_blocks=14, max_batched_tokens=64))
    batch = prompts(6, seed=1)
    outs = engine.generate(batch, GREEDY)
    assert engine.preemptions > 0
    for prompt, out in zip(batch, outs, strict=True):
        assert out.token_ids == alone(model, prompt, GREEDY, tokenizer.eos_id)
    assert_no_leak(engine)


def test_prefix_cache_hits_and_equal_outputs(tokenizer):
    model = tiny_model()
    shared = prompts(1, seed=2)[0] + list(range(40, 60))  # > 8 full blocks of 4
    cached = Engine(model, tokenizer, EngineConfig(block_size=4))
    plain = Engine(model, tokenizer, EngineConfig(block_size=4, prefix_caching=False))
    first = cached.generate([shared + [9]], GREEDY)[0]
    assert cached.blocks.prefix_hits == 0
    second = cached.generate([shared + [10, 11]], GREEDY)[0]
    full_blocks = len(shared) // 4
    assert cached.blocks.prefix_hits == full_blocks  # every full block of the shared prefix was reused
    assert second.token_ids == plain.generate([shared + [10, 11]], GREEDY)[0].token_ids
    assert first.token_ids == alone(model, shared + [9], GREEDY, tokenizer.eos_id)
    assert_no_leak(cached)


def test_cached_prefixes_moved_aside_still_hit_and_give_the_same_tokens(tokenizer):
    model = tiny_model()
    shared = prompts(1, seed=6)[0][:9] + list(range(40, 60))  # 7 full blocks of 4
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, kv_blocks=40, max_num_seqs=2))
    first = engine.generate([shared + [9]], GREEDY)[0]
    hashes = block_hashes(shared, 4)
    where = [engine.blocks.by_hash[h] for h in hashes]
    engine.generate(prompts(2, seed=7), GREEDY)  # two sequences claim runs from block 0 on, over the cached blocks
    assert [engine.blocks.by_hash[h] for h in hashes] != where  # moved aside, none evicted
    second = engine.generate([shared + [9]], GREEDY)[0]
    assert engine.blocks.prefix_hits == len(hashes)  # the moved blocks hold the right keys and values:
    assert second.token_ids == first.token_ids == alone(model, shared + [9], GREEDY, tokenizer.eos_id)
    assert_no_leak(engine)


def test_no_block_leaks_under_random_cancellation(tokenizer):
    model = tiny_model(dim=16, n_heads=2, n_kv_heads=1, hidden_dim=32, n_layers=1)
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, kv_blocks=40, max_num_seqs=16, max_waiting=2000))
    rng = random.Random(3)
    live: list[str] = []
    finished = 0
    for i, prompt in enumerate(prompts(1000, seed=4)):
        params = SamplingParams(max_tokens=rng.randrange(0, 6), temperature=rng.choice([0.0, 1.0]), seed=i)
        engine.add(f"r{i}", prompt, params)
        live.append(f"r{i}")
        if rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        if i % 4 == 0:
            for out in engine.step():
                if out.finished:
                    finished += 1
                    live.remove(out.request_id)
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                finished += 1
                live.remove(out.request_id)
    assert not live and finished > 500
    assert engine.abort("r0") is False  # already gone
    assert_no_leak(engine)


def test_concurrent_sequences_keep_their_blocks_in_a_row(tokenizer):
    engine = Engine(tiny_model(), tokenizer, EngineConfig(block_size=4, max_num_seqs=8, prefix_caching=False))
    for i, prompt in enumerate(prompts(8, seed=5)):
        engine.add(str(i), prompt, SamplingParams(max_tokens=30, temperature=0.0))
    while engine.has_work():
        engine.step()  # every running sequence grows a block every 4 decodes, in turn with the others
        for seq in engine.running:
            assert seq.table == list(range(seq.table[0], seq.table[0] + len(seq.table)))
    assert_no_leak(engine)


def test_logprobs_equal_a_forward_pass(tokenizer):
    model = tiny_model()
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_batched_tokens=5))
    prompt = prompts(1, seed=5)[0]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=True)
    out = engine.generate([prompt], params)[0]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + out.token_ids]))[0].float(), dim=-1)
    expected_prompt = [None] + [float(full[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert out.prompt_logprobs[0] is None
    assert [e["logprob"] for e in out.prompt_logprobs[1:]] == pytest.approx(expected_prompt[1:], abs=1e-4)
    assert [list(e["top"]) for e in out.prompt_logprobs[1:]] == full[: len(prompt) - 1].topk(3).indices.tolist()
    for k, entry in enumerate(out.logprobs):
        row = full[len(prompt) - 1 + k]
        assert entry["logprob"] == pytest.approx(float(row[entry["token"]]), abs=1e-4)
        assert list(entry["top"]) == row.topk(3).indices.tolist()
        assert entry["token"] == int(row.argmax())  # greedy: the sampled token is the top one


def test_sampling_seed_and_penalties(tokenizer):
    model = tiny_model()
    engine = Engine(model, tokenizer)
    prompt = prompts(1, seed=6)[0]
    sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=7)
    a, b = engine.generate([prompt, prompt], sampled)
    assert a.token_ids == b.token_ids  # same seed, same tokens
    other = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=1.0, seed=8))[0]
    assert other.token_ids != a.token_ids
    greedy = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0))[0]
    assert len(set(greedy.token_ids)) < len(greedy.token_ids)  # this tiny model repeats itself
    no_repeat = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, frequency_penalty=1e4))[0]
    assert len(set(no_repeat.token_ids)) == len(no_repeat.token_ids)
    assert_no_leak(engine)


def test_stop_strings_and_stop_tokens(tokenizer):
    model = tiny_model()
    engine = Engine(model, tokenizer)
    prompt = prompts(1, seed=6)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0))[0]
    text = tokenizer.decode_bytes(full.token_ids).decode("utf-8", errors="replace")
    stop = text[5:7]
    cut = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    by_token = engine.generate(
        [prompt], SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[full.token_ids[3]])
    )
    assert by_token[0].token_ids == full.token_ids[: full.token_ids.index(full.token_ids[3])]
    stop_id = full.token_ids[3]
    scored = engine.generate(
        [prompt], SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_id], logprobs=0)
    )
    # the stop token is not emitted but keeps its logprob entry: scoring clients read it as the generated token
    assert [e["token"] for e in scored[0].logprobs] == [*scored[0].token_ids, stop_id]
    assert_no_leak(engine)


def test_bad_requests_are_refused(tokenizer):
    engine = Engine(tiny_model(), tokenizer, EngineConfig(max_waiting=2))
    with pytest.raises(LmforgeError, match="empty"):
        engine.add("a", [], GREEDY)
    with pytest.raises(LmforgeError, match="context is 64"):
        engine.add("a", list(range(10, 74)), GREEDY)
    with pytest.raises(LmforgeError, match="temperature"):
        engine.add("a", [1, 2], SamplingParams(temperature=-1))
    with pytest.raises(LmforgeError, match="KV blocks"):
        Engine(tiny_model(), tokenizer, EngineConfig(kv_blocks=2)).add("a", [1, 2], SamplingParams(max_tokens=40))
    with pytest.raises(LmforgeError, match="top_p"):
        engine.add("a", [1, 2], SamplingParams(top_p=0))
    engine.add("a", [1, 2], GREEDY)
    engine.add("b", [1, 2], GREEDY)
    with pytest.raises(EngineFull):
        engine.add("c", [1, 2], GREEDY)
    with pytest.raises(LmforgeError, match="backend='numpy' is not one of auto, torch"):
        Engine(tiny_model(), tokenizer, EngineConfig(backend="numpy"))


@pytest.mark.parametrize("draft_seed", [0, 1])
def test_speculative_greedy_outputs_are_unchanged(tokenizer, draft_seed):
    model = tiny_model()
    # seed 0: the draft is the target itself, so every draft is accepted; seed 1: a different random model
    draft = build_model(ModelConfig(**{**TINY, **VARIANTS["llama"], "n_layers": 1}, init_std=0.5), seed=1)
    draft = model if draft_seed == 0 else draft.eval()
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_batched_tokens=16), draft=draft, spec_tokens=3)
    batch = prompts(6, seed=7)
    outs = engine.generate(batch, GREEDY)
    for prompt, out in zip(batch, outs, strict=True):
        assert out.token_ids == alone(model, prompt, GREEDY, tokenizer.eos_id)
    assert engine.proposed > 0
    if draft_seed == 0:
        assert engine.accepted == engine.proposed
    else:
        assert engine.accepted < engine.proposed
    assert_no_leak(engine)


def test_speculative_sampling_keeps_the_target_distribution(tokenizer):
    vocab = dict(vocab_size=12)  # ids 7..11 are never EOS (1) and decode to bytes
    model = build_model(ModelConfig(**{**TINY, **VARIANTS["llama"], **vocab}, init_std=0.5), seed=0).eval()
    draft = build_model(ModelConfig(**{**TINY, **VARIANTS["llama"], **vocab, "n_layers": 1}, init_std=1.0), seed=5)
    prompt = [0, 8, 9]
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
        seconds = torch.softmax(model(torch.tensor([prompt + [t] for t in range(12)]))[:, -1], dim=-1)
    exact = first @ seconds  # (V,) the target's distribution of the second token
    with torch.no_grad():
        draft_seconds = torch.softmax(draft(torch.tensor([prompt + [t] for t in range(12)]))[:, -1], dim=-1)
    wrong = first @ draft_seconds  # what accepting every draft would give
    assert (exact - wrong).abs().sum() / 2 > 0.15  # the draft is far enough off for the check to mean something
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=64, max_waiting=4000), draft=draft, spec_tokens=2)
    n = 4000
    outs = engine.generate_each([prompt] * n, [SamplingParams(max_tokens=3, temperature=1.0, seed=i) for i in range(n)])
    seconds_drawn = [o.token_ids[1] for o in outs if len(o.token_ids) >= 2]
    counts = torch.bincount(torch.tensor(seconds_drawn), minlength=12).float()
    # tokens that stop the sequence (EOS) never show up as a second token: compare over the others
    keep = torch.ones(12, dtype=torch.bool)
    keep[tokenizer.eos_id] = False
    empirical = counts[keep] / counts.sum()
    target = exact[keep] / exact[keep].sum()
    tv = float((empirical - target).abs().sum() / 2)
    assert tv < 0.04, f"total variation {tv:.3f} from the target's distribution"
    assert engine.accepted < engine.proposed  # rejections happened and were corrected


def test_streamed_layers_give_the_same_tokens(tokenizer):
    model = tiny_model()
    batch = prompts(3, seed=9)
    expected = [alone(model, p, GREEDY, tokenizer.eos_id) for p in batch]
    streamer = stream_layers(model, resident_layers=1)
    block = model.layers[1]
    assert all(p.numel() == 0 for p in block.parameters())  # only the host copy holds layer 1 between passes
    engine = Engine(model, tokenizer, EngineConfig(block_size=4))
    assert [o.token_ids for o in engine.generate(batch, GREEDY)] == expected
    assert all(p.numel() == 0 for p in block.parameters())
    assert streamer.streamed_bytes == streamer.bytes_per_pass * engine.steps  # one copy per forward pass
    with pytest.raises(LmforgeError, match="resident layers 3"):
        stream_layers(tiny_model(), resident_layers=3)


@pytest.mark.parametrize("max_num_seqs", [1, 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_numpy_steps_give_the_torch_paths_tokens_and_logprobs(variant, max_num_seqs, tokenizer):
    # the steps run through the CPU runner (cpu/decode.NumpyDecoder) over the paged blocks (4-token blocks: keys are
    # read across block edges), one sequence at a time or prompt chunks and decodes of three packed together (chunks
    # of 7 tokens); the same engine with backend="torch" runs the packed torch step
    model = tiny_model(variant)
    params = SamplingParams(max_tokens=30, temperature=0.0, logprobs=3)
    runs = {}
    for backend in ("auto", "torch"):
        cfg = EngineConfig(block_size=4, max_num_seqs=max_num_seqs, max_batched_tokens=7, backend=backend)
        engine = Engine(model, tokenizer, cfg)
        assert isinstance(engine.runner, CpuRunner) == (backend == "auto")
        runs[backend] = engine.generate(prompts(3, seed=5), params)
        assert_no_leak(engine)
    for ours, theirs in zip(runs["auto"], runs["torch"], strict=True):
        assert ours.token_ids == theirs.token_ids and len(ours.token_ids) > 1
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
            assert a["top"].keys() == b["top"].keys()
