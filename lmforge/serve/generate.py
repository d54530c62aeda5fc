"""`lmforge generate`: stream a continuation of a prompt from a run's model, batch 1, with the CPU runner's numpy
steps after the prompt where the model allows (lmforge/cpu), else the model's own forward pass.

Run: lmforge generate RUN --prompt "Once upon a time" --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import Literal

from lmforge import cli_args, sampling
from lmforge.cpu.allowlist import unsupported_reason
from lmforge.cpu.runner import numpy_step, prepare_for_decode
from lmforge.errors import LmforgeError
from lmforge.models import Decoder

__all__ = ["add_arguments", "command", "generate", "generate_tokens", "prepare_for_decode"]

Backend = Literal["auto", "numpy", "torch"]


def generate_tokens(
    model: Decoder,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    backend: Backend = "auto",
) -> Iterator[int]:
    """sampling.generate_tokens with `backend` picking what runs the one-token steps after the prompt: "numpy" (the
    CPU runner, an allowlisted fp32 Decoder on the CPU only), "torch" (the model's own forward), or "auto": numpy
    where it can run, else torch."""
    step = _decode_step(model, backend)
    return sampling.generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, stop_ids, seed, step)


def generate(
    model: Decoder,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: Iterable[str] = (),
    seed: int | None = None,
    backend: Backend = "auto",
) -> Iterator[str]:
    """sampling.generate (text pieces, ending at EOS or a stop string) with generate_tokens' backend."""
    step = _decode_step(model, backend)
    return sampling.generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, step)


def _decode_step(model: Decoder, backend: str) -> sampling.DecodeStep:
    if backend not in ("auto", "numpy", "torch"):
        raise LmforgeError(f"backend={backend!r} is not one of auto, numpy, torch")
    if backend == "torch":
        return sampling.torch_step
    reason = unsupported_reason(model)
    if reason and backend == "numpy":
        raise LmforgeError(
            f"backend='numpy' cannot decode this model: {reason}; use backend='auto' or 'torch', "
            "or for a plain Decoder move it to the CPU in fp32 (model.float().cpu())"
        )
    return sampling.torch_step if reason else numpy_step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder, or a run name under runs/")
    parser.add_argument("--prompt", required=True, type=cli_args.text, help="text to continue")
    parser.add_argument(
        "--stop", nargs="*", default=[], type=cli_args.text, help="strings that end the text (not printed)"
    )
    add_sampling_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """Flags shared by `lmforge generate` and `lmforge chat`. Their types only read numbers; the ranges are checked
    once, by SamplingParams.validate (check_sampling), as for the engine and the server."""
    parser.add_argument(
        "--max-new-tokens",
        type=cli_args.integer,
        default=max_new_tokens,
        help=f"most tokens to generate (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature", type=cli_args.finite_float, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)"
    )
    parser.add_argument(
        "--top-k", type=cli_args.integer, default=0, help="sample from the k likeliest tokens; 0 is off (default)"
    )
    parser.add_argument(
        "--top-p",
        type=cli_args.finite_float,
        default=0.95,
        help="smallest token set of this much probability mass to sample from; 1 is off (default 0.95)",
    )
    parser.add_argument(
        "--seed", type=cli_args.integer, default=None, help="seed for reproducible sampling (default: random)"
    )


def check_sampling(args: argparse.Namespace) -> None:
    """Reject sampling flags outside their ranges (SamplingParams.validate), naming the flag."""
    params = sampling.SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    try:
        params.validate()
    except sampling.SamplingError as e:
        flag = "--max-new-tokens" if e.param == "max_tokens" else f"--{e.param.replace('_', '-')}"
        raise LmforgeError(
            f"{flag} {e.value:g} {e.rule}" if isinstance(e.value, float) else f"{flag} {e.value} {e.rule}"
        ) from None


def command(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_run
    from lmforge.run import resolve_run

    check_sampling(args)
    model, tokenizer = load_run(resolve_run(args.run))
    prepare_for_decode(model)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for piece in generate(model, tokenizer, args.prompt, args.max_new_tokens, stop=args.stop, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
