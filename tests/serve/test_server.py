"""The OpenAI-compatible server via the real openai client: answers equal direct generation; errors keep it up."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lmforge.checkpoint import load_run
from lmforge.interop.hf import export_hf
from lmforge.sampling import stream_text
from lmforge.serve.engine import Engine, EngineConfig
from lmforge.serve.generate import generate, generate_tokens, prepare_for_decode
from lmforge.serve.server import build_app

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tiny_run, live_server):
    """(model, tokenizer, base url) of a live server."""
    model, tokenizer = load_run(tiny_run)
    prepare_for_decode(model)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, max_waiting=64))
    with live_server(build_app(engine, NAME)) as url:
        yield model, tokenizer, url


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
        (lambda c: c.completions.create(model=NAME, prompt="hi", n=17), openai.BadRequestError, "n: "),
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
    before = scrape(base)
    out = client.completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0)
    after = scrape(base)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("lmforge_requests_total", path="/v1/completions", code="200") == 1
    assert grew("lmforge_generated_tokens_total") == out.usage.completion_tokens
    assert grew("lmforge_time_to_first_token_seconds_count") == 1
    assert grew("lmforge_inter_token_latency_seconds_count") == out.usage.completion_tokens - 1
    assert after[("lmforge_running_sequences", ())] == 0 and after[("lmforge_kv_blocks_used", ())] == 0


@contextlib.contextmanager
def serve_command(*args: str):
    """`lmforge serve ARGS` in a subprocess on a free loopback port; yields the base URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import argparse, sys; from lmforge.serve import server; p = argparse.ArgumentParser(); "
        "server.add_arguments(p); server.command(p.parse_args(sys.argv[1:]))"
    )
    with subprocess.Popen([sys.executable, "-c", code, *args, "--port", str(port)], stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()
                try:
                    httpx.get(f"http://127.0.0.1:{port}/health")
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, "server did not start"
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_command_serves_a_run(tiny_run):
    with serve_command(str(tiny_run), "--name", "cli-model") as url:
        models = httpx.get(f"{url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["cli-model"]


def scrape(base: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the server's /metrics by (name, sorted labels), read with prometheus_client's own parser."""
    response = httpx.get(base + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def metric(base: str, name: str) -> float:
    return scrape(base)[name, ()]


def test_concurrent_requests_equal_one_by_one(served, client):
    model, tokenizer, _ = served
    prompts = ["import os", "def f(x):", "class A:", "The", "for i in range(10):", "x = [", "# a comment", "if a:"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(
            pool.map(lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0), prompts)
        )
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.choices[0].text == "".join(generate(model, tokenizer, prompt, 10, temperature=0))


def test_n_choices_and_batched_prompts(served, client):
    model, tokenizer, _ = served
    greedy = client.completions.create(model=NAME, prompt="def", max_tokens=6, temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.prompt_tokens == len(tokenizer.encode("def", bos=True))  # the prompt counts once
    sampled = client.completions.create(model=NAME, prompt="def", max_tokens=12, temperature=1.0, n=3, seed=1)
    assert len({c.text for c in sampled.choices}) > 1  # each choice draws its own tokens
    two = client.completions.create(model=NAME, prompt=["import", "class"], max_tokens=5, temperature=0)
    assert [c.text for c in two.choices] == [
        "".join(generate(model, tokenizer, p, 5, temperature=0)) for p in ("import", "class")
    ]
    ids = tokenizer.encode("import")
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == two.choices[0].text


def test_echo_logprobs_equal_a_forward_pass(served, client):
    model, tokenizer, _ = served
    context, continuation = "def parse(", "args):"
    out = client.completions.create(
        model=NAME, prompt=context + continuation, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    ids = tokenizer.encode(context + continuation, bos=True)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == context + continuation
    assert "".join(lp.tokens) == context + continuation
    expected = [float(full[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    gen = client.completions.create(model=NAME, prompt=context, max_tokens=4, logprobs=3, temperature=0)
    glp = gen.choices[0].logprobs
    assert len(glp.token_logprobs) == gen.usage.completion_tokens and all(lp <= 0 for lp in glp.token_logprobs)
    assert all(
        max(top.values()) == pytest.approx(lp) for top, lp in zip(glp.top_logprobs, glp.token_logprobs, strict=True)
    )
    chat = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy picks the top one


def test_disconnect_mid_stream_frees_the_sequences(served):
    base = served[2]
    # 16 choices decode as one packed batch, which keeps them running well past the disconnect (a lone sequence of
    # this tiny model decodes 100 tokens in numpy in ~30 ms, before the server could notice the client left)
    body = {"model": NAME, "prompt": "def", "max_tokens": 120, "temperature": 0, "stream": True, "n": 16}
    finished_before = metric(base, "lmforge_finished_requests_total")
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first event arrived: the sequence is running
    deadline = time.monotonic() + 10
    while metric(base, "lmforge_running_sequences") or metric(base, "lmforge_kv_blocks_used"):
        assert time.monotonic() < deadline, "the aborted sequences still hold blocks"
        time.sleep(0.05)
    assert metric(base, "lmforge_finished_requests_total") == finished_before  # aborted, not run to the end


def test_full_engine_answers_429_and_api_key_is_required(tiny_run, live_server):
    model, tokenizer = load_run(tiny_run)
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=1, max_waiting=1))
    with live_server(build_app(engine, NAME, api_key="secret")) as url:
        anonymous = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        assert httpx.get(url + "/health").status_code == 200  # /v1 and /metrics need the key, /health does not
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer secreT"}).status_code == 401
        assert scrape(url, Authorization="Bearer secret")[
            "lmforge_requests_total", (("code", "401"), ("path", "/metrics"))
        ]
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0, timeout=60)

        def call(_):
            try:
                return client.completions.create(model=NAME, prompt="x", max_tokens=60, temperature=0).usage
            except openai.RateLimitError as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, range(8)))
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert refused and len(refused) < 8
        assert refused[0].body["code"] == "engine_full"
        assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices  # still serving


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, ""),
        (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, ""),
        (b'{"model": "tiny", "prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": ""}', 400, "empty"),
        (b'{"model": "tiny", "prompt": [99999]}', 400, "token ids"),
        (b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}', 413, "body"),
    ],
)
def test_malformed_bodies_get_4xx(served, body, status, words):
    response = httpx.post(
        served[2] + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


def test_chat_page_is_served(served):
    page = httpx.get(served[2] + "/").text
    assert "/v1/chat/completions" in page and f'"{NAME}"' in page


def test_command_serves_a_transformers_folder_with_a_draft_and_rejects_bad_flags(tiny_run, tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "lmforge", "serve", str(tiny_run), "--max-num-seqs", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--max-num-seqs 0 must be >= 1" in bad.stderr
    hf_dir = export_hf(tiny_run, tmp_path / "hf")  # served straight from a transformers folder
    args = [str(hf_dir), "--draft", str(tiny_run), "--spec-tokens", "3", "--name", NAME]
    with serve_command(*args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        out = client.completions.create(model=NAME, prompt="def", max_tokens=12, temperature=0)
        model, tokenizer = load_run(tiny_run)
        assert out.choices[0].text == "".join(generate(model, tokenizer, "def", 12, temperature=0))
        assert metric(url, "lmforge_spec_acceptance_ratio") == 1.0  # the draft is the target itself
