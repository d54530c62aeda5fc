"""The OpenAI-compatible server via the real openai client: answers equal direct generation; errors keep it up."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from lmforge.checkpoint import load_run
from lmforge.serve.generate import generate, generate_tokens, prepare_for_decode, stream_text
from lmforge.serve.server import build_app

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tiny_run):
    """(model, tokenizer, base url) of a live server on a free local port."""
    model, tokenizer = load_run(tiny_run)
    prepare_for_decode(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(build_app(model, tokenizer, NAME), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield model, tokenizer, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[2] + "/v1", api_key="x", max_retries=0, timeout=30)


def chat_reference(model, tokenizer, messages, max_tokens: int) -> tuple[str, list[int], list[int]]:
    prompt = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True), bos=True)
    stop = {tokenizer.eos_id, tokenizer.token_id("<|end|>")}
    ids = list(generate_tokens(model, prompt, max_tokens, stop_ids=stop))
    return "".join(stream_text(ids, tokenizer)), prompt, ids


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_greedy_completion_equals_generate_with_usage(served, client):
    model, tokenizer, _ = served
    prompt = "The quick brown"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == "".join(generate(model, tokenizer, prompt, 12, temperature=0))
    ids = list(generate_tokens(model, tokenizer.encode(prompt, bos=True), 12, stop_ids={tokenizer.eos_id}))
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt, bos=True))
    assert out.usage.completion_tokens == len(ids)
    assert out.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == out.choices[0].text


def test_chat_and_its_stream_equal_generation_over_render_chat(served, client):
    model, tokenizer, _ = served
    text, prompt, ids = chat_reference(model, tokenizer, MESSAGES, 10)
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(ids))
    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_length_and_stop_strings(served, client):
    model, tokenizer, _ = served
    prompt = "def main():"
    full = "".join(generate(model, tokenizer, prompt, 30, temperature=0))
    # a random tiny model never emits EOS within a few tokens, so one token of budget always ends by length
    one = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    expected = "".join(generate(model, tokenizer, prompt, 30, temperature=0, stop=[stop]))
    for given in (stop, [stop, "\x00never"]):
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stop=given)
        assert out.choices[0].text == expected == full[: full.index(stop)]
        assert out.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    args = dict(model=NAME, prompt="Once", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda c: c.completions.create(model="gpt-4", prompt="hi"), openai.NotFoundError, "not found"),
        (lambda c: c.completions.create(model=NAME, prompt="a " * 400), openai.BadRequestError, "context is 128"),
        (lambda c: c.completions.create(model=NAME, prompt="hi", temperature=-1), openai.BadRequestError, "temp"),
        (lambda c: c.completions.create(model=NAME, prompt="hi", top_p=1.5), openai.BadRequestError, "top_p"),
        (lambda c: c.completions.create(model=NAME, prompt="hi", max_tokens=0), openai.BadRequestError, "max_tokens"),
        (lambda c: c.completions.create(model=NAME, prompt="hi", n=2), openai.BadRequestError, "n: "),
        (
            lambda c: c.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "hi"}]),
            openai.BadRequestError,
            "unknown chat role",
        ),
        (lambda c: c.chat.completions.create(model=NAME, messages=[]), openai.BadRequestError, "empty"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, call, error, words):
    with pytest.raises(error) as caught:
        call(client)
    body = caught.value.body
    assert words in body["message"] and {"message", "type", "param", "code"} <= body.keys()
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0).choices


def test_health_and_metrics_count_requests(served, client):
    base = served[2]
    assert httpx.get(base + "/health").json() == {"status": "ok"}

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = httpx.get(base + "/metrics").text
    key = 'lmforge_requests_total{path="/v1/completions",code="200"}'
    out = client.completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0)
    after = httpx.get(base + "/metrics").text
    assert value(after, key) == value(before, key) + 1
    tokens = "lmforge_generated_tokens_total"
    assert value(after, tokens) == value(before, tokens) + out.usage.completion_tokens
    count = "lmforge_request_latency_seconds_count"
    assert value(after, count) == value(before, count) + 1


def test_command_serves_a_run(tiny_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import argparse, sys; from lmforge.serve import server; p = argparse.ArgumentParser(); "
        "server.add_arguments(p); server.command(p.parse_args(sys.argv[1:]))"
    )
    args = [str(tiny_run), "--port", str(port), "--name", "cli-model"]
    with subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, "server did not start"
                    time.sleep(0.1)
            assert [m["id"] for m in models["data"]] == ["cli-model"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
