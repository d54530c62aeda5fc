"""Byte-level BPE (GPT-2 style, Sennrich et al. 2016) on Hugging Face `tokenizers`: every byte is a token, so any text
or byte string round-trips exactly, and the saved folder loads unchanged in transformers. lmforge's own have
SPECIAL_TOKENS first; an imported one (a GGUF's) names its special tokens and chat template in tokenizer_config.json."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.config import check
from lmforge.errors import LmforgeError
from lmforge.run import atomic_write
from lmforge.tokenizer import template

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
ROLES = ("system", "user", "assistant")
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Renders exactly what Tokenizer.render_chat renders; transformers runs it with trim_blocks/lstrip_blocks, hence the
# explicit whitespace control on every tag. Encoding its text turns a `<|end|>` typed inside a message into the special
# token too; lmforge itself encodes chats with Tokenizer.encode_chat, which keeps message contents plain text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

_SURROGATES = re.compile("([\udc80-\udcff])")


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "byte"] = "bpe"
    """bpe: byte-level BPE trained to exactly model.vocab_size; byte: the 256 bytes plus the specials, no merges."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    max_train_bytes: int = 20_000_000
    """Train the BPE on at most this many bytes of the training text (training time grows with it)."""

    def validate(self) -> None:
        check(self.min_frequency >= 1, f"tokenizer.min_frequency={self.min_frequency} must be >= 1")
        check(self.max_train_bytes > 0, f"tokenizer.max_train_bytes={self.max_train_bytes} must be > 0")


def _byte_level_pipeline(model: models.Model) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _byte_alphabet() -> list[str]:
    """The 256 characters ByteLevel maps bytes 0..255 to, in byte order (GPT-2's table: printable Latin-1 bytes map
    to themselves, the rest to U+0100 onwards)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in keep else chr(256 + extra))
        extra += b not in keep
    return chars


def _take_bytes(texts: Iterable[str], limit: int) -> Iterator[str]:
    left = limit
    for text in texts:
        if left <= 0:
            return
        data = text.encode()
        if len(data) > left:
            yield data[:left].decode(errors="ignore")
            return
        left -= len(data)
        yield text


def _encode(inner: tokenizers.Tokenizer, text: str) -> list[int]:
    try:
        return inner.encode(text, add_special_tokens=False).ids
    except TypeError:
        # tokenizers takes only valid Unicode; a lone surrogate (JSON's "\ud800") is none, and not worth a traceback
        try:
            text.encode()
        except UnicodeEncodeError as e:
            raise LmforgeError(
                f"the text holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is not Unicode; "
                "send valid UTF-8 text"
            ) from None
        raise


def _is_lmforge(inner: tokenizers.Tokenizer) -> bool:
    return all(inner.token_to_id(token) == i for i, token in enumerate(SPECIAL_TOKENS))


def _token_text(value: str | dict | None) -> str | None:
    return value["content"] if isinstance(value, dict) else value  # transformers also saves AddedToken dicts


class Tokenizer:
    """A byte-level BPE vocabulary; wraps a `tokenizers.Tokenizer` (`inner`). lmforge's own (`config` None) have
    SPECIAL_TOKENS at ids 0..6; an imported one takes its special tokens, whether prompts open with BOS, the
    end-of-turn token and the Jinja chat template from `config`, a transformers tokenizer_config.json."""

    def __init__(self, inner: tokenizers.Tokenizer, config: dict[str, Any] | None = None):
        self.inner = inner
        self.config = config
        if config is None:
            for i, token in enumerate(SPECIAL_TOKENS):
                if inner.token_to_id(token) != i:
                    raise LmforgeError(
                        f"tokenizer has {token} at id {inner.token_to_id(token)}, expected {i}; use a tokenizer "
                        "trained by lmforge, or put the tokenizer_config.json that names its special tokens beside it"
                    )
            self.bos_id, self.eos_id, self.pad_id, self.end_of_turn_id = 0, 1, 2, SPECIAL_TOKENS.index("<|end|>")
            self.add_bos, self.chat_template = True, CHAT_TEMPLATE
            return
        self._check_byte_level()
        self.specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.specials = {k: v for k, v in self.specials.items() if v is not None}
        if "eos_token" not in self.specials:
            raise LmforgeError("tokenizer_config.json names no eos_token; add the token that ends a text")
        eos = self.token_id(self.specials["eos_token"])
        bos = self.specials.get("bos_token")
        self.bos_id = self.token_id(bos) if bos else None
        self.eos_id = eos
        self.pad_id = self.token_id(self.specials["pad_token"]) if "pad_token" in self.specials else eos
        self.end_of_turn_id = self.token_id(_token_text(config["eot_token"])) if config.get("eot_token") else eos
        self.add_bos = bool(config.get("add_bos_token", False))
        if self.add_bos and self.bos_id is None:
            raise LmforgeError("tokenizer_config.json sets add_bos_token but names no bos_token; name it")
        self.chat_template = config.get("chat_template") or ""

    def _check_byte_level(self) -> None:
        alphabet = set(_byte_alphabet())
        added = {t.content for t in self.inner.get_added_tokens_decoder().values()}
        vocab = self.inner.get_vocab(with_added_tokens=True)
        odd = [t for t in vocab if t not in added and not set(t) <= alphabet]
        if odd:  # an imported vocabulary may lack bytes that never occur in UTF-8 text (0xC0, 0xF5..0xFF)
            raise LmforgeError(
                f"the tokenizer is not a byte-level BPE (token {odd[0]!r} is not spelled in bytes); "
                "lmforge runs hold byte-level BPE vocabularies only"
            )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, cfg: TokenizerConfig | None = None) -> Tokenizer:
        """Train on `texts` to exactly `vocab_size` tokens (padded with reserved tokens if merges run out)."""
        cfg = cfg or TokenizerConfig()
        if cfg.kind == "byte":
            if vocab_size != BYTE_VOCAB_SIZE:
                raise LmforgeError(
                    f"model.vocab_size={vocab_size} but tokenizer.kind=byte has exactly {BYTE_VOCAB_SIZE} tokens "
                    f"(256 bytes + {len(SPECIAL_TOKENS)} specials); set model.vocab_size={BYTE_VOCAB_SIZE}"
                )
            vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + _byte_alphabet())}
            inner = _byte_level_pipeline(models.BPE(vocab=vocab, merges=[]))
            inner.add_special_tokens(SPECIAL_TOKENS)
            return cls(inner)
        if vocab_size < BYTE_VOCAB_SIZE:
            raise LmforgeError(
                f"model.vocab_size={vocab_size} is too small for byte-level BPE: the 256 bytes and "
                f"{len(SPECIAL_TOKENS)} specials need {BYTE_VOCAB_SIZE}; set model.vocab_size >= {BYTE_VOCAB_SIZE}"
            )
        inner = _byte_level_pipeline(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        inner.train_from_iterator(_take_bytes(texts, cfg.max_train_bytes), trainer=trainer)
        # Too little text (or min_frequency) can stop the trainer short; reserved tokens keep the vocabulary exactly
        # model.vocab_size so the embedding table and the tokenizer always agree.
        missing = vocab_size - inner.get_vocab_size(with_added_tokens=True)
        assert missing >= 0, "BpeTrainer overshot vocab_size"
        start = inner.get_vocab_size(with_added_tokens=True)
        inner.add_special_tokens([f"<|reserved_{start + i}|>" for i in range(missing)])
        assert inner.get_vocab_size(with_added_tokens=True) == vocab_size
        return cls(inner)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        try:
            text = path.read_text()
        except OSError as e:
            raise LmforgeError(
                f"tokenizer file {path} cannot be read ({e.strerror}); train one first (lmforge tokenizer) "
                "or point to the run folder that holds tokenizer.json"
            ) from None
        try:
            inner = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            raise LmforgeError(f"tokenizer file {path} is corrupt ({e}); delete it and retrain the tokenizer") from None
        config_path = path.parent / "tokenizer_config.json"
        if _is_lmforge(inner) or not config_path.is_file():
            return cls(inner)
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LmforgeError(f"{config_path} is unreadable or corrupt ({e}); restore it from the source") from None
        return cls(inner, config)

    def save(self, dir: str | Path) -> Path:
        """Write tokenizer.json and the transformers files (config, special tokens, chat template)."""
        dir = Path(dir)
        atomic_write(dir / "tokenizer.json", self._json)
        if self.config is not None:
            atomic_write(dir / "tokenizer_config.json", json.dumps(self.config, indent=2) + "\n")
            atomic_write(dir / "special_tokens_map.json", json.dumps(self.specials, indent=2) + "\n")
            return dir / "tokenizer.json"
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[1],
            "pad_token": SPECIAL_TOKENS[2],
            "additional_special_tokens": SPECIAL_TOKENS[3:],
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "chat_template": CHAT_TEMPLATE,
        }
        special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}
        atomic_write(dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        atomic_write(dir / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
        return dir / "tokenizer.json"

    @cached_property
    def _json(self) -> str:
        return self.inner.to_str(pretty=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._json.encode()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.inner.token_to_id(token)
        if i is None:
            raise LmforgeError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def bos(self) -> list[int]:
        """What opens a prompt: [bos_id] where the model was trained so (always for lmforge's own), else nothing."""
        return [self.bos_id] if self.add_bos else []

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text`; the special tokens' spellings (`<|end|>`) in it become the special tokens. bos=True
        opens them as a prompt (`self.bos`)."""
        ids = _encode(self.inner, text)
        return [*self.bos, *ids] if bos else ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with every character plain text: `<|end|>` in it is seven characters, not a token."""
        return _encode(self._plain, text)

    @cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        # a copy, so that the setting never changes what encode() does in another thread
        plain = tokenizers.Tokenizer.from_str(self._json)
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters any one token stands for: a text of more than n * max_token_chars characters has more
        than n tokens, which bounds a prompt before it is tokenised."""
        return max(len(b) for b in self._id_bytes)  # a character is at least one byte

    def encode_batch(self, texts: list[str], bos: bool = False) -> list[list[int]]:
        """Encode many texts at once in the Rust thread pool."""
        out = [e.ids for e in self.inner.encode_batch_fast(texts, add_special_tokens=False)]
        return [[*self.bos, *ids] for ids in out] if bos else out

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special)

    @cached_property
    def _id_bytes(self) -> list[bytes]:
        byte_of = {c: b for b, c in enumerate(_byte_alphabet())}
        table = [b""] * self.vocab_size
        added = {t.content for t in self.inner.get_added_tokens_decoder().values()}
        for token, i in self.inner.get_vocab(with_added_tokens=True).items():
            table[i] = token.encode() if token in added else bytes(byte_of[c] for c in token)
        return table

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The exact bytes of `ids`, also when they end inside a UTF-8 character (for streaming)."""
        table = self._id_bytes
        return b"".join(table[i] for i in ids)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode arbitrary bytes, also invalid UTF-8: valid runs as text, each invalid byte as its byte token."""
        # surrogateescape maps each undecodable byte to one lone surrogate U+DC80..U+DCFF and back, losslessly.
        ids: list[int] = []
        byte_ids = self._byte_ids
        for i, part in enumerate(_SURROGATES.split(data.decode("utf-8", errors="surrogateescape"))):
            if i % 2:
                if byte_ids[ord(part) - 0xDC00] is None:
                    raise LmforgeError(f"byte {ord(part) - 0xDC00:#x} has no token in this vocabulary; send UTF-8")
                ids.append(byte_ids[ord(part) - 0xDC00])
            elif part:
                ids.extend(self.encode(part))
        return ids

    @cached_property
    def _byte_ids(self) -> list[int | None]:
        return [self.inner.token_to_id(c) for c in _byte_alphabet()]

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Chat text as `<|user|>hi<|end|><|assistant|>hello<|end|>`; the saved chat_template renders the same. An
        imported tokenizer renders its own template as transformers' apply_chat_template does."""
        if self.config is not None:
            return template.render(self._template, messages, add_generation_prompt, self.specials)
        parts = []
        for m in messages:
            if m.get("role") not in ROLES:
                raise LmforgeError(f"unknown chat role {m.get('role')!r}; use one of {', '.join(ROLES)}")
            parts.append(f"<|{m['role']}|>{m['content']}<|end|>")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, bos: bool = False
    ) -> list[int]:
        """Token ids of render_chat's text in which only the template's markers are special tokens: a message's
        content is plain text, so a user who types `<|end|><|assistant|>` cannot open a turn of another role.
        An imported template's text is encoded in pieces (template.split), so where a content starts or ends with
        whitespace BPE would merge across the template's text, the ids can differ from encode(render_chat())."""
        ids = list(self.bos) if bos else []
        if self.config is not None:
            pieces = template.split(self._template, messages, add_generation_prompt, self.specials)
            for text, is_content in pieces:
                ids += self.encode_plain(text) if is_content else self.encode(text)
            return ids
        end = self.end_of_turn_id
        for m in messages:
            if m.get("role") not in ROLES:
                raise LmforgeError(f"unknown chat role {m.get('role')!r}; use one of {', '.join(ROLES)}")
            ids += [self.token_id(f"<|{m['role']}|>"), *self.encode_plain(m["content"]), end]
        if add_generation_prompt:
            ids.append(self.token_id("<|assistant|>"))
        return ids

    @property
    def _template(self) -> str:
        if not self.chat_template:
            raise LmforgeError("this tokenizer has no chat template; add chat_template to its tokenizer_config.json")
        return self.chat_template
