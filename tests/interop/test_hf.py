"""HF export/import: live parity with transformers (logits, greedy decode, tokenizer) and exact round trips."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402

from lmforge.checkpoint import load_model, read_state, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.interop.hf import (
    add_export_arguments,
    add_import_arguments,
    export_command,
    export_hf,
    import_command,
    import_hf,
)
from lmforge.models import ModelConfig, build_model
from lmforge.serve.generate import generate_tokens
from lmforge.tokenizer import Tokenizer

SMALL = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=128)
CONFIGS = {
    # GQA, and eps/theta away from the defaults so a dropped field shows up in the logits
    "llama": dict(SMALL, n_kv_heads=2, norm_eps=1e-6, rope_theta=500.0),
    "gpt2": dict(SMALL, n_kv_heads=4, pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama-tied": dict(SMALL, n_kv_heads=1, tie_embeddings=True),
}
CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def make_run(path: Path, tokenizer: Tokenizer, **overrides) -> Path:
    """A run whose every weight is random: fresh init leaves norms at 1 and biases at 0, which hides swapped names."""
    model = build_model(ModelConfig(**overrides), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tokenizer.save(path)
    save_checkpoint(path, 0, model, state={})
    return path


def export_family(family, tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp(f"hf_{family}")
    run = make_run(root / "run", tiny_tokenizer, **CONFIGS[family])
    out = export_hf(run, root / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return family, run, out, hf


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory, tiny_tokenizer):
    return export_family(request.param, tmp_path_factory, tiny_tokenizer)


def test_logits_match_transformers(exported):
    family, run, out, hf = exported
    assert type(hf).__name__ == CLASSES[family]
    model = load_model(run).eval()
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, f"{family}: max abs logit diff {diff:.2e}"


def test_greedy_generation_matches_transformers(exported):
    family, run, out, hf = exported
    model = load_model(run).eval()
    prompt = torch.randint(7, 512, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = list(generate_tokens(model, prompt, max_new_tokens=20))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)[0, len(prompt) :].tolist()
    eos = hf.generation_config.eos_token_id  # EOS and the end-of-turn token
    stop = next((i for i, t in enumerate(ours) if t in eos), None)
    if stop is not None:  # transformers stops at them, ours (without stop_ids) runs on: compare up to it
        ours = ours[: stop + 1]
    assert theirs[: len(ours)] == ours


def test_autotokenizer_encodes_like_ours(exported, tiny_tokenizer):
    _, _, out, hf = exported
    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x  # héllo 世界 <|user|>hi<|end|>"
    assert auto.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (0, 1, 2)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-tied"])
def test_round_trip_is_bit_identical(family, tmp_path, tiny_tokenizer):
    run = make_run(tmp_path / "run", tiny_tokenizer, **CONFIGS[family])
    back = import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "back")
    assert load_model(back).cfg == load_model(run).cfg
    assert_same_state(load_model(back), load_model(run))
    assert Tokenizer.load(back / "tokenizer.json").sha256 == tiny_tokenizer.sha256
    assert read_state(back / "checkpoints" / "step_000000")["source"] == str(tmp_path / "hf")


def test_import_of_sharded_transformers_save(exported, tmp_path):
    family, run, _, hf = exported
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # transformers' own writer, several shards
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    back = import_hf(tmp_path / "sharded", tmp_path / "back")
    assert not (back / "tokenizer.json").exists()
    assert_same_state(load_model(back), load_model(run))


def test_unsupported_combination_names_the_fields(tmp_path, tiny_tokenizer):
    run = make_run(tmp_path / "run", tiny_tokenizer, **dict(CONFIGS["llama"], pos="alibi"))
    with pytest.raises(LmforgeError, match=r"model\.pos='alibi'.*LlamaForCausalLM.*model\.pos='rope'"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_non_empty_folder(exported, tmp_path):
    _, run, _, _ = exported
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(LmforgeError, match="exists and is not empty"):
        export_hf(run, tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp folder left behind
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def test_export_without_transformers_says_how_to_install(exported, tmp_path, monkeypatch):
    _, run, _, _ = exported
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(LmforgeError, match=r"pip install 'lmforge\[hf\]'"):
        export_hf(run, tmp_path / "hf")


def test_import_errors(exported, tmp_path):
    _, _, out, _ = exported
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="config.json is missing"):
        import_hf(tmp_path / "empty", tmp_path / "run")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"architectures": ["BertForMaskedLM"]}')
    with pytest.raises(LmforgeError, match="BertForMaskedLM.*LlamaForCausalLM and GPT2LMHeadModel"):
        import_hf(bert, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_rejects_llama_variants_it_cannot_express(tmp_path_factory, tiny_tokenizer, tmp_path):
    family, _, out, hf = export_family("llama", tmp_path_factory, tiny_tokenizer)
    for field, value, message in [
        ("attention_bias", True, "no biases"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}, "RoPE scaling 'llama3'"),
    ]:
        folder = tmp_path / field
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(json.loads((out / "config.json").read_text()) | {field: value}))
        with pytest.raises(LmforgeError, match=message):
            import_hf(folder, tmp_path / "run")


def test_tanh_gelu_gpt2_round_trips_and_matches_transformers(tmp_path_factory, tiny_tokenizer, tmp_path):
    root = tmp_path_factory.mktemp("hf_gpt2_tanh")
    run = make_run(root / "run", tiny_tokenizer, **{**CONFIGS["gpt2"], "mlp": "gelu_tanh"})
    out = export_hf(run, root / "hf")
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu_new"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back = load_model(import_hf(out, tmp_path / "run")).eval()
    assert back.cfg.mlp == "gelu_tanh"
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - back(ids)).abs().max().item() <= 1e-4
        exact = load_model(run).eval()
        exact.layers[0].mlp.approximate = "none"  # the variant matters: the erf GELU gives other logits
        assert (hf(ids).logits - exact(ids)).abs().max().item() > 1e-5
    folder = tmp_path / "relu"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(json.loads((out / "config.json").read_text()) | {"activation_function": "relu"})
    )
    with pytest.raises(LmforgeError, match="activation_function='relu'"):
        import_hf(folder, tmp_path / "relu-run")


def test_cli(exported, tmp_path):
    _, run, _, _ = exported
    export_parser, import_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_export_arguments(export_parser)
    add_import_arguments(import_parser)
    with pytest.raises(SystemExit):
        export_parser.parse_args(["onnx", str(run), str(tmp_path / "x")])
    out = export_command(export_parser.parse_args(["hf", str(run), str(tmp_path / "mymodel")]))
    back = import_command(import_parser.parse_args(["hf", str(out), "--root", str(tmp_path / "runs")]))
    assert back == tmp_path / "runs" / "mymodel"
    assert_same_state(load_model(back), load_model(run))
    named = import_command(import_parser.parse_args(["hf", str(out), "--name", "other", "--root", str(tmp_path)]))
    assert named == tmp_path / "other" and (named / "tokenizer.json").exists()


def test_transformers_pipeline_continues_like_lmforge_generate(tiny_run, tiny_tokenizer, tmp_path, capsys):
    """A new user's check: the exported run through transformers' own default path gives `lmforge generate`'s
    greedy text, because the exported tokenizer puts BOS first as lmforge does."""
    from lmforge.cli import main

    out = export_hf(tiny_run, tmp_path / "hf")
    prompt = "def parse(text):\n    return"
    main(["generate", str(tiny_run), "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0"])
    ours = capsys.readouterr().out.removesuffix("\n")
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    theirs = pipe(prompt, do_sample=False, max_new_tokens=24, return_full_text=False)[0]["generated_text"]
    assert len(ours) > 5 and theirs == ours
    # the ids each path feeds the model: plain text, a chat, and `tokenizers` alone
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto(prompt).input_ids == tiny_tokenizer.encode(prompt, bos=True)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    chat = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat == tiny_tokenizer.encode(tiny_tokenizer.render_chat(messages, add_generation_prompt=True), bos=True)
    raw = Tokenizer.load(out).inner  # tokenizer.json's own post-processor, as tokenizers and transformers 4 apply it
    assert raw.encode(prompt).ids == tiny_tokenizer.encode(prompt, bos=True)
    # importing the export back gives the run's own tokenizer file: lmforge adds BOS itself
    back = import_hf(out, tmp_path / "back")
    assert Tokenizer.load(back).sha256 == tiny_tokenizer.sha256
