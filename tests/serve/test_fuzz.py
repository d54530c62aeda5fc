"""Property-based fuzzing of the two generation endpoints on a live loopback server: whatever JSON arrives (wrong
types, extremes, unicode and lone surrogates, token-id lists, stops, n, seeds, penalties, logprobs), the answer is
a 2xx or a 4xx with an OpenAI error object, never a 5xx or a dropped connection, no sequence ends in error, and the
engine is left idle with every KV block free. A longer run: python benchmarks/fuzz_server.py --examples 2000."""

from __future__ import annotations

import json
import time

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer.bpe import SPECIAL_TOKENS

JSON_HEADERS = {"content-type": "application/json"}
VOCAB = 512  # the tiny run's
COMPLETIONS, CHAT_COMPLETIONS = "/v1/completions", "/v1/chat/completions"

# any JSON value a careless client might put in a field
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, 2**1000]),
    st.floats(),  # NaN and infinities too: Python's json writes them and the server's reader takes them
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def mostly(usual: st.SearchStrategy, rare: st.SearchStrategy = JUNK) -> st.SearchStrategy:
    """`usual`, and `rare` one time in ten, so that about half the requests get past validation to the engine."""
    return st.integers(0, 9).flatmap(lambda i: rare if i == 9 else usual)  # shrinks towards usual


TEXT = mostly(
    st.one_of(
        st.text(min_size=1, max_size=30),
        st.lists(st.sampled_from([*SPECIAL_TOKENS, "<|", "|>", "\x00", "\n", "é", "世界", "🦊", " "]), min_size=1).map(
            "".join
        ),
    ),
    st.one_of(st.just(""), st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)),  # lone surrogates
)
IDS = mostly(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12), st.lists(st.integers(), max_size=4))
SEED_EDGES = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([2**64, 10**30, -(2**63) - 1]))


def edges(*values) -> st.SearchStrategy:
    return st.one_of(JUNK, st.sampled_from(values))


SAMPLING = {
    "max_tokens": mostly(st.integers(1, 8), edges(-1, 0, None, 40, 2**20, 2**20 + 1)),
    "temperature": mostly(st.floats(0.0, 2.0), edges(1e-40, 1e-300, 5e-324, -0.0, 2.0000001)),
    "top_p": mostly(st.floats(0.01, 1.0), edges(0.0, 1e-300, 1.0000001)),
    "top_k": mostly(st.integers(0, VOCAB + 2), edges(-1, 2**40)),
    "presence_penalty": mostly(st.floats(-2.0, 2.0), edges(-2.5, 2.5)),
    "frequency_penalty": mostly(st.floats(-2.0, 2.0), edges(-2.5, 2.5)),
    "repetition_penalty": mostly(st.floats(0.01, 10.0), edges(0.0, 1e-320, 10.5)),
    "stop": mostly(st.one_of(st.none(), TEXT, st.lists(TEXT, max_size=4))),
    "stop_token_ids": mostly(st.lists(st.integers(0, VOCAB - 1), max_size=4), st.lists(st.integers(), max_size=3)),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "seed": mostly(st.one_of(st.none(), st.integers(0, 2**32)), st.one_of(JUNK, SEED_EDGES)),
    "n": mostly(st.integers(1, 4), edges(0, 16, 17)),
}
MODEL = mostly(st.just("tiny"))
PROMPT = mostly(st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3), IDS, st.lists(IDS, min_size=1, max_size=3)))
COMPLETION = st.fixed_dictionaries(
    {"model": MODEL, "prompt": PROMPT},
    optional={
        **SAMPLING,
        "echo": mostly(st.booleans()),
        "logprobs": mostly(st.one_of(st.none(), st.integers(0, 5)), edges(-1, 20, 21)),
    },
)
ROLE = mostly(st.sampled_from(["system", "user", "assistant"]), st.one_of(JUNK, st.sampled_from(["tool", "", "USER"])))
MESSAGE = mostly(
    st.fixed_dictionaries({"role": ROLE, "content": TEXT}),
    st.fixed_dictionaries({}, optional={"role": JUNK, "content": JUNK}),
)
CHAT = st.fixed_dictionaries(
    {"model": MODEL, "messages": mostly(st.lists(MESSAGE, min_size=1, max_size=4))},
    optional={
        **SAMPLING,
        "logprobs": mostly(st.booleans()),
        "top_logprobs": mostly(st.one_of(st.none(), st.integers(0, 5)), edges(-1, 20, 21)),
    },
)


BOUNDED = settings(
    max_examples=100,
    derandomize=True,  # the same examples every run: make test stays reproducible
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def exchange(client: httpx.Client, path: str, body: dict) -> int:
    """Send one body and return the status; fail on a 5xx, a malformed answer, a sequence ended in error or a dropped
    connection (which httpx raises)."""
    with client.stream("POST", path, content=json.dumps(body).encode(), headers=JSON_HEADERS) as response:
        data = response.read()
    assert response.status_code < 500, (response.status_code, data[:500], body)
    if response.status_code >= 400:
        assert {"message", "type", "param", "code"} <= json.loads(data)["error"].keys(), data
        return response.status_code
    assert response.status_code == 200, (response.status_code, data[:500])
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
    else:
        chunks = [json.loads(data)]
    reasons = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    assert reasons and "error" not in reasons, (reasons, body)
    return response.status_code


def wait_idle(served, timeout: float = 10.0) -> None:
    """The engine ends with no sequence, every block free and unreferenced, and no request left in its thread."""
    engine, worker = served.engine, served.app.state.worker
    deadline = time.monotonic() + timeout
    while engine.has_work() or worker.queues or engine.blocks.num_free < engine.blocks.num_blocks:
        assert time.monotonic() < deadline, (len(engine.running), len(engine.waiting), engine.blocks.num_free)
        time.sleep(0.01)
    assert not any(engine.blocks.refs)


def test_completions_survive_any_json(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:

        @BOUNDED
        @given(body=COMPLETION)
        @example(body={"model": "tiny", "prompt": "\ud800"})  # each a 500 and a reset connection before issue 14
        @example(body={"model": "tiny", "prompt": ["ok", "a\udfff"], "stream": True, "n": 2})
        def completions(body):
            exchange(client, COMPLETIONS, body)
            wait_idle(tiny_server)

        completions()


def test_chat_completions_survive_any_json(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:

        @BOUNDED
        @given(body=CHAT)
        @example(body={"model": "tiny", "messages": [{"role": "user", "content": "hi \udc80"}]})
        def chat(body):
            exchange(client, CHAT_COMPLETIONS, body)
            wait_idle(tiny_server)

        chat()
