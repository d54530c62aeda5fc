"""Sampling below every stage: parameters and their validation, the next-token choice, penalties, log-probs, stop
strings and text streaming, and batch-1 generation; training, evaluation and serving import it from here."""

from lmforge.sampling.generate import DecodeStep, generate, generate_tokens, torch_step
from lmforge.sampling.params import SamplingError, SamplingParams, seeded_generator
from lmforge.sampling.sample import logprob_entry, penalized, sample_next, sampling_probs
from lmforge.sampling.text import TextStream, stream_text

__all__ = [
    "DecodeStep",
    "SamplingError",
    "SamplingParams",
    "TextStream",
    "generate",
    "generate_tokens",
    "logprob_entry",
    "penalized",
    "sample_next",
    "sampling_probs",
    "seeded_generator",
    "stream_text",
    "torch_step",
]
