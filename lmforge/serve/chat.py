"""Interactive chat with a run's model: one user line in, one streamed reply out, the history kept in the context.

Run: lmforge chat RUN --system "You are terse." --temperature 0.7   (/reset clears the history, /exit or EOF ends)
"""

from __future__ import annotations

import argparse
import sys

from lmforge import cli_args
from lmforge.sampling import stream_text
from lmforge.serve.generate import add_sampling_arguments, check_sampling, generate_tokens, prepare_for_decode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder, or a run name under runs/")
    parser.add_argument(
        "--system",
        default="",
        type=cli_args.text,
        help="system message that opens every conversation (default none)",
    )
    add_sampling_arguments(parser, max_new_tokens=256)


def fit_context(tokenizer, system: list[dict], history: list[dict], context: int, room: int) -> tuple[list[int], int]:
    """Token ids of the conversation, dropping the oldest turns until `room` tokens are left for the reply.

    Returns the ids and how many messages were dropped from the front of `history` (which is trimmed in place).
    The system message and the newest user message are always kept.
    """
    dropped = 0
    while True:
        ids = tokenizer.encode_chat(system + history, add_generation_prompt=True, bos=True)
        if len(ids) + room <= context or len(history) <= 1:
            return ids, dropped
        # a turn is a user message and the assistant's reply: drop both so the history still opens with the user
        del history[:2]
        dropped += 2


def command(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_run
    from lmforge.run import resolve_run

    check_sampling(args)
    model, tokenizer = load_run(resolve_run(args.run))
    prepare_for_decode(model)
    context = model.cfg.max_seq_len
    # room kept free for the reply; at most half the context, so a large --max-new-tokens cannot push out all history
    room = max(1, min(args.max_new_tokens, context // 2))
    stop_ids = {tokenizer.eos_id, tokenizer.end_of_turn_id}
    system = [{"role": "system", "content": args.system}] if args.system else []
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history.clear()
            print("[history cleared]", file=sys.stderr, flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids, dropped = fit_context(tokenizer, system, history, context, room)
        if dropped:
            print(f"[dropped the {dropped} oldest messages to fit the context of {context} tokens]", file=sys.stderr)
        if len(ids) >= context:
            history.clear()
            print(
                f"[that message makes the prompt {len(ids)} tokens, the context is {context}; send a shorter one]",
                file=sys.stderr,
            )
            continue
        reply = []
        for piece in stream_text(
            generate_tokens(model, ids, args.max_new_tokens, stop_ids=stop_ids, **sampling), tokenizer
        ):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
