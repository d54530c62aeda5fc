"""GGUF import: our own exports (F32, and requantised to F16/BF16/Q8_0/Q4_0/Q4_1) come back with the same logits as
the source run and as transformers' own GGUF loader; K-quant blocks dequantise as transformers does; bad files exit 2
with nothing written. With SmolLM2-135M-Instruct fetched (`make models`): logits, greedy tokens, tokenizer and chat
template equal transformers' loading of the same file."""

from __future__ import annotations

import argparse
import io
import time

import gguf
import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_run, save_checkpoint
from lmforge.cli import main as cli
from lmforge.interop.gguf_import import dequantize, import_gguf, read_gguf
from lmforge.interop.models_cache import cached_model
from lmforge.models import ModelConfig, build_model
from lmforge.serve import chat

Q = gguf.GGMLQuantizationType


def requantize(src, dst, qtype=Q.F32, arch="llama", replace=None):
    """A copy of GGUF `src` with every matrix stored as `qtype` (norms stay F32), `arch` as its architecture and the
    string fields in `replace` changed."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, (replace or {}).get(name, field.contents()), field.types[0], sub)
    for t in reader.tensors:
        data = np.array(t.data)
        if data.ndim == 2:
            w.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """A tied 2-layer GQA run and its F32 GGUF export (our exporter: lmforge/interop/gguf.py)."""
    root = tmp_path_factory.mktemp("gguf_import")
    shape = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=96)
    # eps a power of two: GGUF stores it as float32, and the config must read back equal
    cfg = ModelConfig(**shape, tie_embeddings=True, rope_theta=50000.0, norm_eps=2.0**-17)
    run = root / "source"
    tiny_tokenizer.save(run)
    save_checkpoint(run, 0, build_model(cfg, seed=3), state={})
    cli(["export", "gguf", str(run), str(root / "model.gguf")])
    return run, root / "model.gguf"


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_f32_export_imports_back_exactly(exported, tmp_path, tiny_text):
    source, path = exported
    cli(["import", "gguf", str(path), "--name", "back", "--root", str(tmp_path)])
    (model, tok), (want, want_tok) = load_run(tmp_path / "back"), load_run(source)
    assert model.cfg == want.cfg  # theta, eps, context, tied head and GQA all read back from the metadata
    ids = want_tok.encode(tiny_text[:200], bos=True)[:96]
    assert torch.equal(logits(model, ids), logits(want, ids))
    text = tiny_text[:2000] + "<|user|>hi<|end|> 中文 🙂"
    assert tok.encode(text) == want_tok.encode(text) and tok.end_of_turn_id == want_tok.token_id("<|end|>")


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantised_files_import_as_transformers_loads_them(exported, tmp_path, qtype):
    import transformers

    source, path = exported
    file = requantize(path, tmp_path / f"{qtype.name}.gguf", qtype)
    run = import_gguf(file, tmp_path / "run")
    model, tok = load_run(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32)
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", bos=True)
    ours = logits(model, ids)
    assert (ours - hf(torch.tensor([ids])).logits[0]).abs().max() <= 1e-4
    error = (ours - logits(load_run(source)[0], ids)).abs().max().item()
    assert 0 < error < {Q.Q4_0: 0.5, Q.Q4_1: 0.5}.get(qtype, 0.05)  # quantised, and still the same network


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_dequantise_as_transformers_does(tmp_path, qtype):
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * block
    data = np.random.default_rng(0).integers(0, 256, (rows, 2 * size), dtype=np.uint8)
    halves = data.reshape(rows * 2, size)
    scale_at = {Q.Q2_K: [size - 4, size - 2], Q.Q3_K: [size - 2], Q.Q6_K: [size - 2]}.get(qtype, [0, 2])
    for at in scale_at:  # sane fp16 block scales; random bytes elsewhere
        halves[:, at : at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    w.add_tensor("x", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, tensors = read_gguf(tmp_path / "k.gguf")
    ours = dequantize(tensors["x"])
    assert ours.shape == (rows, cols)
    assert torch.equal(ours.flatten(), hf_dequantize(torch.from_numpy(data.flatten()), int(qtype)))


def test_bad_files_exit_2_and_write_nothing(exported, tmp_path, capsys):
    _, path = exported
    (tmp_path / "notes.gguf").write_text("not a model")
    requantize(path, tmp_path / "gpt2.gguf", arch="gpt2")
    requantize(path, tmp_path / "spm.gguf", replace={"tokenizer.ggml.model": "llama"})
    requantize(path, tmp_path / "pre.gguf", replace={"tokenizer.ggml.pre": "llama-bpe"})
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "x").write_text("")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    cases = {
        "missing.gguf": "does not exist",
        "notes.gguf": "is not a GGUF file",
        "gpt2.gguf": "holds a 'gpt2' model; lmforge imports GGUF files of the 'llama' architecture",
        "spm.gguf": "has a 'llama' vocabulary; lmforge imports byte-level BPE",
        "pre.gguf": "splits text as 'llama-bpe'",
        str(path): "exists and is not empty",
    }
    for i, (file, message) in enumerate(cases.items()):
        name = "taken" if file == str(path) else f"run{i}"
        with pytest.raises(SystemExit) as e:
            cli(["import", "gguf", str(tmp_path / file), "--name", name, "--root", str(tmp_path / "runs")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_foreign_vocabulary_chats_and_stops_at_its_end_of_turn(exported, tmp_path, monkeypatch, capsys):
    """ChatML specials in place of ours, end-of-turn apart from EOS: the chat CLI stops at the end-of-turn token."""
    _, path = exported
    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    tokens[:7] = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "<a>", "<b>", "<c>", "<d>"]
    replace = {"tokenizer.ggml.tokens": tokens, "tokenizer.chat_template": CHATML, "tokenizer.ggml.add_bos_token": 0}
    replace |= {"tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.eot_token_id": 0}
    run = import_gguf(requantize(path, tmp_path / "chatml.gguf", replace=replace), tmp_path / "chatml")
    model, tok = load_run(run)
    assert (tok.eos_id, tok.end_of_turn_id, tok.bos, tok.chat_template) == (1, 0, [], CHATML)
    with torch.no_grad():
        model.norm.weight.zero_()  # every logit 0: greedy picks id 0, the end of turn
    save_checkpoint(run, 1, model, state={})
    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    chat.command(parser.parse_args([str(run), "--temperature", "0", "--max-new-tokens", "5"]))
    assert capsys.readouterr().out == "\n"  # an empty reply: the first token ended the turn


# ---- the real SmolLM2-135M-Instruct GGUF (Q4_1 with a Q8_0 embedding), against transformers' GGUF loader ----

SMOLLM2 = cached_model()
smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF not fetched: run `make models`")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Grüße aus Köln 🙂 和 日本語?"},
    ],
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    import transformers

    start = time.perf_counter()
    model, tok = load_run(import_gguf(SMOLLM2, tmp_path_factory.mktemp("smol") / "smol"))
    print(f"import + load: {time.perf_counter() - start:.1f} s")
    kw = dict(gguf_file=SMOLLM2.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, dtype=torch.float32, **kw)
    return model, tok, hf.eval(), hf_tok


@smollm2
def test_smollm2_logits_and_greedy_tokens_equal_transformers(smol):
    model, tok, hf, hf_tok = smol
    ids = tok.encode_chat(CHATS[0], add_generation_prompt=True, bos=True)
    assert ids == hf_tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=True, return_dict=False)
    reply = tok.encode("The capital of France is Paris.<|im_end|>")
    with torch.no_grad():
        want = hf(torch.tensor([ids + reply])).logits[0]
    ours = logits(model, ids + reply)  # one forward each: the argmax at every reply position is the greedy choice
    assert (ours - want).abs().max() <= 1e-4
    assert ours[len(ids) - 1 : -1].argmax(-1).tolist() == want[len(ids) - 1 : -1].argmax(-1).tolist() == reply
    assert reply[-1] == tok.end_of_turn_id  # greedy decoding stops there (chat and serve stop at end_of_turn_id)


@smollm2
def test_smollm2_tokenizer_and_chat_template_equal_transformers(smol, tmp_path):
    from pathlib import Path

    _, tok, _, hf_tok = smol
    text = (Path(__file__).parents[1] / "fixtures" / "german.txt").read_text()
    text += "Im Jahr 2024: 東京都の人口は約1400万人です。我喜欢吃🍣🍜! 👩‍👩‍👧 <|im_start|>user\nhi<|im_end|>\n\t  x"
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    # "smollm" splits digits off before GPT-2's regex (llama.cpp's llama-vocab.cpp, as SmolLM2's own tokenizer.json);
    # transformers' GGUF loader ignores tokenizer.ggml.pre, which shows only where whitespace runs precede a digit
    assert [tok.inner.id_to_token(i) for i in tok.encode("a\n 1")] == ["a", "ĊĠ", "1"]
    assert [hf_tok.convert_ids_to_tokens(i) for i in hf_tok.encode("a\n 1", add_special_tokens=False)] == [
        "a",
        "Ċ",
        "Ġ",
        "1",
    ]
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.end_of_turn_id == tok.eos_id == tok.token_id("<|im_end|>") and not tok.add_bos
    for messages in CHATS:
        for gen in (False, True):
            want = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.render_chat(messages, add_generation_prompt=gen) == want
            assert tok.encode_chat(messages, add_generation_prompt=gen, bos=True) == hf_tok.encode(
                want, add_special_tokens=False
            )
    # a marker typed inside a message stays text: it cannot close the turn
    typed = tok.encode_chat([{"role": "user", "content": "<|im_end|>"}])
    assert typed.count(tok.end_of_turn_id) == 2  # the default system turn's and the user turn's own
