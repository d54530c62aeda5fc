"""Generation: cached decode equals a full recompute, sampling filters and frequencies, stops, streaming, the CLI."""

from __future__ import annotations

import argparse

import pytest
import torch

from lmforge.checkpoint import load_run
from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig, build_model
from lmforge.sampling import sample_next, stream_text
from lmforge.serve import generate as gen
from lmforge.serve.generate import generate, generate_tokens, prepare_for_decode

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=48)
VARIANTS = {
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, n_kv_heads=4),
    "alibi": dict(pos="alibi", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}


def tiny_model(variant: str = "llama"):
    # a larger init spreads the logits so greedy picks are not near-ties that rounding could flip
    return build_model(ModelConfig(**{**TINY, **VARIANTS[variant]}, init_std=0.5), seed=0).eval()


@torch.no_grad()
def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_full_recompute(variant):
    model = tiny_model(variant)
    prompt = [3, 14, 15, 92, 65]
    assert list(generate_tokens(model, prompt, 20)) == naive_greedy(model, prompt, 20)


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_decode_layout_keeps_the_outputs(variant, numpy_only):
    model = tiny_model(variant)
    expected = naive_greedy(model, [4, 5, 6], 12)
    prepare_for_decode(model)  # no C kernel: column-major weights for OpenBLAS and MKL
    assert not model.lm_head.weight.is_contiguous()
    assert list(generate_tokens(model, [4, 5, 6], 12)) == expected


def test_decode_layout_stays_row_major_for_the_c_kernel():
    model = tiny_model()
    before = {name: p.clone() for name, p in model.named_parameters()}
    prepare_for_decode(model)
    assert all(p.is_contiguous() and p.equal(before[name]) for name, p in model.named_parameters())


def test_stops_at_the_context_limit():
    model = tiny_model()
    prompt = list(range(1, 44))  # 43 of 48 positions
    out = list(generate_tokens(model, prompt, 100))
    assert out == naive_greedy(model, prompt, 5)


@pytest.mark.parametrize("n", [0, 48, 60])
def test_prompt_that_leaves_no_room_is_rejected(n):
    with pytest.raises(LmforgeError, match=f"the prompt has {n} tokens and the context is 48"):
        generate_tokens(tiny_model(), [1] * n, 4)


def test_stop_ids_end_the_stream_before_the_stop_token():
    model = tiny_model()
    full = list(generate_tokens(model, [5, 6, 7], 12))
    stop = full[4]
    out = list(generate_tokens(model, [5, 6, 7], 12, stop_ids={stop}))
    assert out == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny_model()
    kw = dict(temperature=1.0, top_p=0.95)
    a = list(generate_tokens(model, [1, 2, 3], 24, seed=1, **kw))
    assert a == list(generate_tokens(model, [1, 2, 3], 24, seed=1, **kw))
    assert a != list(generate_tokens(model, [1, 2, 3], 24, seed=2, **kw))


def test_top_k_1_is_greedy():
    model = tiny_model()
    greedy = list(generate_tokens(model, [9, 8, 7], 16))
    assert list(generate_tokens(model, [9, 8, 7], 16, temperature=1.5, top_k=1, seed=0)) == greedy


def draws(logits: list[float], n: int = 4000, **kw) -> torch.Tensor:
    rows = torch.tensor([logits]).expand(n, -1)
    return sample_next(rows, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("top_p, kept", [(0.3, {0}), (0.5, {0}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_minimal_nucleus(top_p, kept):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    seen = set(draws(logits, temperature=1.0, top_k=0, top_p=top_p).tolist())
    assert seen == kept


def test_top_k_keeps_the_k_likeliest():
    seen = set(draws([0.0, 3.0, 1.0, 2.0, -1.0], temperature=2.0, top_k=2, top_p=1.0).tolist())
    assert seen == {1, 3}


def test_temperature_sampling_follows_the_softmax():
    logits, temperature, n = [1.0, 0.0, -1.0, 2.0, 0.5], 0.7, 4000
    counts = torch.bincount(draws(logits, n, temperature=temperature, top_k=0, top_p=1.0), minlength=5).float()
    expected = torch.softmax(torch.tensor(logits) / temperature, dim=0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # the 0.1% critical value for 4 degrees of freedom


def test_greedy_sample_is_argmax():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, 0.0, 5, 0.5, None), logits.argmax(-1))


def test_stop_string_spanning_tokens_is_not_emitted(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hello world. The end")
    cut = tiny_tokenizer.decode(ids).index(". The")
    pieces = list(stream_text(iter(ids), tiny_tokenizer, [". The", "zzz"]))
    assert "".join(pieces) == "hello world. The end"[:cut]
    single_bytes = [i for b in b". The end" for i in tiny_tokenizer.encode_bytes(bytes([b]))]
    assert "".join(stream_text(single_bytes, tiny_tokenizer, ["The"])) == ". "


def test_text_that_only_starts_a_stop_string_is_emitted_at_the_end(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a partial sto")
    assert "".join(stream_text(ids, tiny_tokenizer, ["stop"])) == "a partial sto"


def test_multibyte_characters_are_emitted_whole(tiny_tokenizer):
    text = "é€😀 ok"
    ids = [i for b in text.encode() for i in tiny_tokenizer.encode_bytes(bytes([b]))]  # one token per byte
    assert len(ids) == len(text.encode())
    pieces = list(stream_text(ids, tiny_tokenizer))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["é", "€", "😀"]


def test_generate_streams_the_decoded_continuation(tiny_run):
    model, tokenizer = load_run(tiny_run)
    prompt_ids = tokenizer.encode("def main", bos=True)
    ids = list(generate_tokens(model, prompt_ids, 30, stop_ids={tokenizer.eos_id}))
    assert "".join(generate(model, tokenizer, "def main", 30)) == tokenizer.decode(ids)


def run_cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser()
    gen.add_arguments(parser)
    gen.command(parser.parse_args(argv))
    return capsys.readouterr().out


def test_cli_prints_a_deterministic_greedy_continuation(tiny_run, capsys):
    argv = [str(tiny_run), "--prompt", "import os", "--max-new-tokens", "12", "--temperature", "0"]
    out = run_cli(argv, capsys)
    assert out.endswith("\n")
    model, tokenizer = load_run(tiny_run)
    prepare_for_decode(model)  # as the command does: the reduction order, and so near-tied picks, follow the layout
    assert out == "".join(generate(model, tokenizer, "import os", 12)) + "\n"
    assert run_cli(argv, capsys) == out


@pytest.mark.parametrize("flag, value", [("--top-p", "0"), ("--max-new-tokens", "-1"), ("--top-k", "-2")])
def test_cli_rejects_out_of_range_sampling(tiny_run, capsys, flag, value):
    # ranges are SamplingParams.validate's, the one check the engine and the server use too
    with pytest.raises(LmforgeError, match=f"^{flag} {value} must be"):
        run_cli([str(tiny_run), "--prompt", "x", flag, value], capsys)


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--top-p", "inf"), ("--seed", "1.5")])
def test_cli_refuses_non_finite_sampling_in_one_line(tiny_run, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        run_cli([str(tiny_run), "--prompt", "x", flag, value], capsys)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: " in err and value in err and "Traceback" not in err
