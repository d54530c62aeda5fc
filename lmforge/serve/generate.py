"""Sampling and streaming generation with a KV cache (nucleus sampling: Holtzman et al., 2020).

Run: lmforge generate RUN --prompt "Once upon a time" --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from lmforge import cli_args
from lmforge.errors import LmforgeError
from lmforge.models import Decoder, KVCache
from lmforge.serve import native
from lmforge.serve.cpu_decode import CacheKV, NumpyDecoder, unsupported_reason


def prepare_for_decode(model: Decoder) -> Decoder:
    """Lay the linear weights out for the fastest batch-1 decode on the CPU (same values and shapes).

    Where the C kernel (serve/native.py) decodes the model, that is nn.Linear's row-major layout, left as it is.
    Otherwise every weight is stored column-major: numpy's OpenBLAS reads W^T as a C-contiguous (in, out) matrix, and
    torch's MKL reads it at ~16 GB/s against ~10 GB/s row-major (2-core AMD EPYC, benchmarks/bench_decode.py).
    For inference only: training is slower this way and safetensors refuses to save non-contiguous weights.
    """
    if model.lm_head.weight.device.type != "cpu" or (native.available() and unsupported_reason(model) is None):
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()  # (out, in) shape, strides (1, out)
    return model


def sample_next(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None = None
) -> Tensor:
    """logits: (B, V) -> next ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
    if temperature <= 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """(B, V) logits -> the (B, V) distribution sample_next draws from (one-hot on the argmax when greedy)."""
    if temperature <= 0.0 or top_k == 1:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep a token while the mass before it is short of top_p: the smallest set reaching top_p, never empty
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[:, 0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def generate_tokens(
    model: Decoder,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    backend: Literal["auto", "numpy", "torch"] = "auto",
) -> Iterator[int]:
    """Stream up to max_new_tokens ids after the prompt (batch 1), stopping before a stop id or at the context end.

    backend picks what runs the one-token steps after the prompt: "numpy" (serve/cpu_decode.py, a CPU fp32 Decoder
    only), "torch" (the model's own forward), or "auto": numpy where it can run, else torch."""
    context = model.cfg.max_seq_len
    if not prompt_ids or len(prompt_ids) >= context:
        raise LmforgeError(
            f"the prompt has {len(prompt_ids)} tokens and the context is {context}, which leaves no room to generate; "
            "give a non-empty prompt shorter than the context, or use fewer tokens of it"
        )
    if max_new_tokens < 0:
        raise LmforgeError(f"max_new_tokens={max_new_tokens} must be zero or positive")
    budget = min(max_new_tokens, context - len(prompt_ids))
    use_numpy = _use_numpy(model, backend)
    return _decode(model, prompt_ids, budget, temperature, top_k, top_p, frozenset(stop_ids), seed, use_numpy)


def _use_numpy(model: Decoder, backend: str) -> bool:
    if backend not in ("auto", "numpy", "torch"):
        raise LmforgeError(f"backend={backend!r} is not one of auto, numpy, torch")
    if backend == "torch":
        return False
    reason = unsupported_reason(model)
    if reason and backend == "numpy":
        raise LmforgeError(
            f"backend='numpy' cannot decode this model: {reason}; use backend='auto' or 'torch', "
            "or for a plain Decoder move it to the CPU in fp32 (model.float().cpu())"
        )
    return reason is None


@torch.inference_mode()
def _decode(model, prompt_ids, budget, temperature, top_k, top_p, stop_ids, seed, use_numpy) -> Iterator[int]:
    if budget == 0:
        return
    weight = model.lm_head.weight
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(weight.device).manual_seed(seed)
    # one cache for the whole stream, sized to what it will hold: no growth or copies per step
    cache = KVCache(model.cfg, 1, len(prompt_ids) + budget - 1, device=weight.device, dtype=weight.dtype)
    logits = model(torch.tensor([prompt_ids], device=weight.device), cache=cache, last_only=True)[:, -1]  # (1, V)
    decode_step = _numpy_step(model, cache) if use_numpy else _torch_step(model, cache)
    greedy = temperature <= 0.0 or top_k == 1
    for step in range(budget):
        if greedy:  # argmax of the numpy step's logits: ~30 us a token less than a torch op on them
            token = int(logits.argmax())
        else:
            token = int(sample_next(torch.as_tensor(logits).view(1, -1), temperature, top_k, top_p, generator))
        if token in stop_ids:
            return
        yield token
        if step + 1 < budget:
            logits = decode_step(token)  # (1, V) tensor or (V,) numpy array


def _torch_step(model: Decoder, cache: KVCache) -> Callable[[int], Tensor]:
    device = model.lm_head.weight.device
    return lambda token: model(torch.tensor([[token]], device=device), cache=cache)[:, -1]  # (1, V)


def _numpy_step(model: Decoder, cache: KVCache) -> Callable[[int], np.ndarray]:
    decoder, kv = NumpyDecoder(model), CacheKV(cache)  # reads and extends the cache the torch prefill filled

    def step(token: int) -> np.ndarray:
        logits = decoder.step(token, cache.pos, kv)  # (V,)
        cache.advance(1)
        return logits

    return step


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
) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces, ending at EOS, at a stop string (not emitted) or the limit.

    Pieces are whole UTF-8 characters: bytes of a character split across tokens wait for the rest. Text that could
    be the start of a stop string is held back until it is clearly not one.
    """
    ids = generate_tokens(
        model, tokenizer.encode(prompt, bos=True), max_new_tokens, temperature, top_k, top_p, {tokenizer.eos_id}, seed
    )
    return stream_text(ids, tokenizer, stop)


def stream_text(ids: Iterable[int], tokenizer, stops: Iterable[str] = ()) -> Iterator[str]:
    """Turn a stream of ids into text pieces of whole characters, ending before the first stop string."""
    text = TextStream(tokenizer, stops)
    for token in ids:
        if piece := text.push(token):
            yield piece
        if text.stopped:
            return
    if tail := text.flush():
        yield tail


class TextStream:
    """Incremental detokenizer: ids in, text out in whole UTF-8 characters, stopping at the first stop string.

    Text that could be the start of a stop string is held back until it is clearly not one.
    """

    def __init__(self, tokenizer, stops: Iterable[str] = ()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.pending = b""  # bytes of an incomplete UTF-8 character
        self.held = ""  # decoded text not yet released because it may begin a stop string
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that `token` releases ("" while held back); after a stop string, `stopped` is set."""
        self.pending += self.tokenizer.decode_bytes([token])
        text, self.pending = _split_utf8(self.pending)
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.held, self.pending = self.held[:cut], "", b""
            return out
        keep = max((_prefix_overlap(self.held, s) for s in self.stops), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        """Everything still held at the end of the stream."""
        out = self.held + self.pending.decode("utf-8", errors="replace")
        self.held, self.pending = "", b""
        return out


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the complete characters of `data`; return them and the trailing bytes of an unfinished one."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead >> 6 == 0b10:  # a continuation byte: the character starts further back
            continue
        need = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        if need > back:
            return data[:-back].decode("utf-8", errors="replace"), data[-back:]
        break
    return data.decode("utf-8", errors="replace"), b""


def _prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder, or a run name under runs/")
    parser.add_argument("--prompt", required=True, type=cli_args.text, help="text to continue")
    parser.add_argument(
        "--stop", nargs="*", default=[], type=cli_args.text, help="strings that end the text (not printed)"
    )
    add_sampling_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """Flags shared by `lmforge generate` and `lmforge chat`."""
    parser.add_argument(
        "--max-new-tokens",
        type=cli_args.non_negative_int,
        default=max_new_tokens,
        help=f"most tokens to generate (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=cli_args.non_negative_float,
        default=0.8,
        help="softmax temperature; 0 is greedy (default 0.8)",
    )
    parser.add_argument(
        "--top-k",
        type=cli_args.non_negative_int,
        default=0,
        help="sample from the k likeliest tokens; 0 is off (default)",
    )
    parser.add_argument(
        "--top-p",
        type=cli_args.probability,
        default=0.95,
        help="smallest token set of this much probability mass to sample from; 1 is off (default 0.95)",
    )
    parser.add_argument(
        "--seed", type=cli_args.seed, default=None, help="seed for reproducible sampling (default: random)"
    )


def check_sampling(args: argparse.Namespace) -> None:
    """Reject sampling settings outside their ranges, naming the flag."""
    if args.temperature < 0:
        raise LmforgeError(f"--temperature {args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise LmforgeError(f"--top-k {args.top_k} must be >= 0 (0 switches it off)")
    if not 0.0 < args.top_p <= 1.0:
        raise LmforgeError(f"--top-p {args.top_p} must be in (0, 1] (1 switches it off)")
    if args.max_new_tokens < 0:
        raise LmforgeError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")


def command(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_run
    from lmforge.run import resolve_run

    check_sampling(args)
    model, tokenizer = load_run(resolve_run(args.run))
    prepare_for_decode(model)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for piece in generate(model, tokenizer, args.prompt, args.max_new_tokens, stop=args.stop, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
