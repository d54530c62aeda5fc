"""lmforge: a language model's whole life (data, tokenizer, pre-training, generation, interop) in one package."""

__version__ = "0.1.0"
