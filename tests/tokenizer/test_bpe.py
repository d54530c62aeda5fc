import hashlib
import json
import random
from pathlib import Path

import pytest
import tokenizers

from lmforge.checkpoint import load_run
from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

HANDMADE = [
    "",
    " ",
    "hello world",
    "  leading and trailing  ",
    "\t\ttabs\n\n\nnewlines\r\n",
    "\x00\x01\x02\x1b[0m\x7f",
    "emoji 🙂👩‍👩‍👧 flags 🇩🇪",
    "中文 日本語 한국어",
    "e\u0301 combining a\u0308\u0323",
    "Ünïcödé Straße ß ﬁ",
    "\u200b\u200d\ufeff zero widths",
    "def f(x):\n    return x ** 2  # squared\n",
    " " * 50 + "x" + "\n" * 20,
    "<|bos|>text<|eos|><|pad|>",
    "<|user|>hi<|end|><|assistant|>",
    "<|user",
    "\U0010ffff\ue000 private use",
    "ÿþý" * 10,
]


def random_text(rng: random.Random) -> str:
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF), (0x1F300, 0x1F6FF)]
    chars = []
    for _ in range(rng.randint(0, 60)):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


@pytest.mark.parametrize("text", HANDMADE)
def test_round_trip_handmade(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode_bytes(ids) == text.encode()


def test_round_trip_random_strings(tiny_tokenizer):
    rng = random.Random(0)
    texts = [random_text(rng) for _ in range(500)]
    for text, ids in zip(texts, tiny_tokenizer.encode_batch(texts), strict=True):
        assert ids == tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text
        assert tiny_tokenizer.decode_bytes(ids) == text.encode()


@pytest.mark.parametrize("name", ["address.txt", "german.txt"])
def test_round_trip_fixture_files(tiny_tokenizer, name):
    text = (FIXTURES / name).read_text(encoding="utf-8")
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())


def test_encode_bytes_round_trips_arbitrary_bytes(tiny_tokenizer):
    rng = random.Random(1)
    cases = [b"", b"\xff", b"\xc3", b"ok\xc3(\xa0\xa1", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", "héllo".encode()]
    cases += [rng.randbytes(rng.randint(0, 80)) for _ in range(300)]
    cases += [random_text(rng).encode()[: rng.randint(0, 40)] for _ in range(100)]
    for data in cases:
        ids = tiny_tokenizer.encode_bytes(data)
        assert tiny_tokenizer.decode_bytes(ids) == data
        assert all(0 <= i < tiny_tokenizer.vocab_size for i in ids)
    assert tiny_tokenizer.encode_bytes(b"hello world") == tiny_tokenizer.encode("hello world")


def test_decode_bytes_of_pieces_concatenates(tiny_tokenizer):
    text = "naïve 🙂 中文"
    ids = tiny_tokenizer.encode(text)
    pieces = [tiny_tokenizer.decode_bytes([i]) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert any(not _is_utf8(p) for p in pieces)  # some ids cut a character; the bytes are still exact


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_specials_first_and_never_split(tiny_tokenizer):
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tiny_tokenizer.token_id(token) == i
        assert tiny_tokenizer.encode(token) == [i]
    assert (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id) == (0, 1, 2)
    ids = tiny_tokenizer.encode("a<|user|>b<|end|>")
    assert 4 in ids and 6 in ids
    assert tiny_tokenizer.decode(ids, skip_special=True) == "ab"
    assert tiny_tokenizer.encode("hi", bos=True) == [0, *tiny_tokenizer.encode("hi")]
    assert tiny_tokenizer.encode_batch(["hi"], bos=True) == [tiny_tokenizer.encode("hi", bos=True)]
    with pytest.raises(LmforgeError, match="not in the vocabulary"):
        tiny_tokenizer.token_id("<|nope|>")


@pytest.mark.parametrize("vocab_size", [263, 300, 1000])
def test_vocab_size_is_exact(tiny_text, vocab_size):
    tok = Tokenizer.train([tiny_text[:50_000]], vocab_size)
    assert tok.vocab_size == vocab_size
    assert len(tok.inner.get_vocab(with_added_tokens=True)) == vocab_size


def test_too_little_text_pads_with_reserved_tokens():
    tok = Tokenizer.train(["abab abab"], 400)
    assert tok.vocab_size == 400
    assert tok.token_id("<|reserved_399|>") == 399
    assert tok.decode(tok.encode("abab x")) == "abab x"


def test_max_train_bytes_limits_the_training_text(tiny_text):
    tok = Tokenizer.train([tiny_text], 2000, TokenizerConfig(max_train_bytes=2000))
    assert tok.vocab_size == 2000
    assert tok.inner.token_to_id("<|reserved_1999|>") == 1999


def test_training_is_deterministic(tiny_text, tiny_tokenizer):
    again = Tokenizer.train([tiny_text[i : i + 2000] for i in range(0, len(tiny_text), 2000)], vocab_size=512)
    assert again.sha256 == tiny_tokenizer.sha256


def test_vocab_too_small_for_bpe():
    with pytest.raises(LmforgeError, match="model.vocab_size=100"):
        Tokenizer.train(["hello"], 100)


def test_byte_kind():
    tok = Tokenizer.train([], 263, TokenizerConfig(kind="byte"))
    assert tok.vocab_size == 263
    assert tok.encode("é") == [7 + 0xC3, 7 + 0xA9]
    assert tok.encode("<|eos|>A") == [1, 7 + ord("A")]
    for text in HANDMADE:
        assert tok.decode(tok.encode(text)) == text
        assert len(tok.encode(text)) == len(text.encode()) or "<|" in text
    data = random.Random(2).randbytes(500)
    assert tok.encode_bytes(data) == [7 + b for b in data]
    assert tok.decode_bytes(tok.encode_bytes(data)) == data
    with pytest.raises(LmforgeError, match=r"model.vocab_size=512.*263"):
        Tokenizer.train([], 512, TokenizerConfig(kind="byte"))


def test_config_validation():
    assert from_dict(TokenizerConfig, {"kind": "byte"}).kind == "byte"
    with pytest.raises(LmforgeError, match="min_frequency"):
        from_dict(TokenizerConfig, {"min_frequency": 0})
    with pytest.raises(LmforgeError, match="kind"):
        from_dict(TokenizerConfig, {"kind": "wordpiece"})


def test_save_load(tiny_tokenizer, tmp_path):
    path = tiny_tokenizer.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tiny_tokenizer.sha256
    for loaded in (Tokenizer.load(path), Tokenizer.load(tmp_path)):
        assert loaded.sha256 == tiny_tokenizer.sha256
        assert loaded.encode(HANDMADE[6]) == tiny_tokenizer.encode(HANDMADE[6])
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<|eos|>"


def test_load_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"nothing\.json.*train one first"):
        Tokenizer.load(tmp_path / "nothing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ')
    with pytest.raises(LmforgeError, match=r"tokenizer\.json is corrupt.*retrain"):
        Tokenizer.load(bad)
    foreign = tokenizers.Tokenizer(tokenizers.models.BPE())
    foreign.add_special_tokens(["<s>"])
    foreign.save(str(bad))
    with pytest.raises(LmforgeError, match="expected 0"):
        Tokenizer.load(bad)


TEXTS = ["hello world", HANDMADE[6], HANDMADE[7], HANDMADE[11], "<|user|>hi<|end|>", "  spaces\n\tand tabs "]


def test_tokenizers_and_transformers_agree(tiny_tokenizer, tmp_path):
    import transformers

    tiny_tokenizer.save(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tiny_tokenizer.encode(text)
        assert raw.encode(text).ids == ids
        assert fast.encode(text, add_special_tokens=False) == ids
        assert auto(text)["input_ids"] == ids
        assert auto.decode(ids) == fast.decode(ids) == tiny_tokenizer.decode(ids) == text
        assert auto.decode(ids, skip_special_tokens=True) == tiny_tokenizer.decode(ids, skip_special=True)


def test_chat_template_matches_render_chat(tiny_tokenizer, tmp_path):
    import transformers

    tiny_tokenizer.save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chats = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief.\n"},
            {"role": "user", "content": "  what is 2+2?  "},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "中文 🙂"},
        ],
    ]
    for messages in chats:
        for gen in (False, True):
            ours = tiny_tokenizer.render_chat(messages, add_generation_prompt=gen)
            assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == ours
    assert tiny_tokenizer.render_chat(chats[0], True) == "<|user|>hi<|end|><|assistant|>"
    with pytest.raises(LmforgeError, match="unknown chat role 'tool'"):
        tiny_tokenizer.render_chat([{"role": "tool", "content": "x"}])


def test_tiny_run_loads(tiny_run):
    model, tok = load_run(tiny_run)
    assert model.cfg.vocab_size == tok.vocab_size == 512
    assert model.cfg.n_kv_heads == 2
