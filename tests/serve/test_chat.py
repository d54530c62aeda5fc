"""Chat CLI fed from stdin: replies equal direct generation on the rendered history; /reset, /exit and trimming."""

from __future__ import annotations

import argparse
import io

from lmforge.checkpoint import load_run
from lmforge.sampling import stream_text
from lmforge.serve import chat
from lmforge.serve.generate import generate_tokens, prepare_for_decode


def run_chat(run, lines: str, monkeypatch, capsys, *flags: str) -> tuple[str, str]:
    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    chat.command(parser.parse_args([str(run), "--temperature", "0", *flags]))
    captured = capsys.readouterr()
    return captured.out, captured.err


def reply(run, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    model, tokenizer = load_run(run)
    prepare_for_decode(model)  # as the command does: the reduction order, and so near-tied picks, follow the layout
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True), bos=True)
    stop = {tokenizer.eos_id, tokenizer.token_id("<|end|>")}
    return "".join(stream_text(generate_tokens(model, ids, max_new_tokens, stop_ids=stop), tokenizer))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_replies_follow_the_rendered_history(tiny_run, monkeypatch, capsys):
    out, _ = run_chat(
        tiny_run, "hello\nhow are you\n", monkeypatch, capsys, "--max-new-tokens", "8", "--system", "Be brief."
    )
    system = {"role": "system", "content": "Be brief."}
    first = reply(tiny_run, [system, user("hello")], 8)
    second = reply(tiny_run, [system, user("hello"), {"role": "assistant", "content": first}, user("how are you")], 8)
    assert out == f"{first}\n{second}\n"


def test_reset_clears_the_history_and_exit_ends(tiny_run, monkeypatch, capsys):
    out, err = run_chat(tiny_run, "hi\n/reset\nhi\n/exit\nnever read\n", monkeypatch, capsys, "--max-new-tokens", "6")
    first = reply(tiny_run, [user("hi")], 6)
    assert out == f"{first}\n{first}\n"
    assert "history cleared" in err


def test_long_conversations_drop_the_oldest_turns(tiny_run, monkeypatch, capsys):
    line = "tell me about the argparse module and its parsers " * 2
    out, err = run_chat(tiny_run, f"{line}\n" * 4, monkeypatch, capsys, "--max-new-tokens", "40")
    assert out.startswith(reply(tiny_run, [user(line)], 40) + "\n")
    assert "oldest messages to fit the context of 128 tokens" in err


def test_fit_context_keeps_the_system_message_and_whole_turns(tiny_run):
    _, tokenizer = load_run(tiny_run)
    system = [{"role": "system", "content": "Be brief."}]
    history = []
    for i in range(6):
        history += [user(f"question {i} " * 5), {"role": "assistant", "content": f"answer {i} " * 5}]
    history.append(user("last question"))
    full = list(history)
    ids, dropped = chat.fit_context(tokenizer, system, history, context=128, room=32)

    def n_tokens(messages):
        return len(tokenizer.encode(tokenizer.render_chat(system + messages, add_generation_prompt=True), bos=True))

    assert ids == tokenizer.encode(tokenizer.render_chat(system + history, add_generation_prompt=True), bos=True)
    assert history == full[dropped:] and dropped % 2 == 0 and history[0]["role"] == "user"
    assert len(ids) + 32 <= 128 < n_tokens(full[dropped - 2 :]) + 32  # one more turn would not fit


def test_a_message_longer_than_the_context_is_refused(tiny_run, monkeypatch, capsys):
    out, err = run_chat(tiny_run, "word " * 300 + "\nhi\n", monkeypatch, capsys, "--max-new-tokens", "4")
    assert "send a shorter one" in err
    assert out == reply(tiny_run, [user("hi")], 4) + "\n"
