"""Byte-level BPE tokenizer: training, exact round trips and transformers-compatible files."""

from lmforge.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer, TokenizerConfig

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "TokenizerConfig"]
