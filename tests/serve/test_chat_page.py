"""The chat page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): type a message, send it, and
the streamed answer in the assistant bubble equals a greedy /v1/chat/completions answer to the same message."""

from __future__ import annotations

import httpx
from playwright.sync_api import sync_playwright

from lmforge.checkpoint import load_run
from lmforge.serve.engine import Engine, EngineConfig
from lmforge.serve.generate import prepare_for_decode
from lmforge.serve.server import build_app

CHROMIUM = "/usr/bin/chromium"  # the distribution's browser: Playwright downloads none
NAME = "tiny"


def test_typed_message_streams_the_greedy_answer(tiny_run, live_server):
    model, tokenizer = load_run(tiny_run)
    prepare_for_decode(model)
    message, max_tokens = "What is a list?", 24
    with live_server(build_app(Engine(model, tokenizer, EngineConfig(block_size=8)), NAME)) as url:
        body = {"model": NAME, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens}
        expected = httpx.post(f"{url}/v1/chat/completions", json=body | {"temperature": 0}, timeout=30).json()
        expected = expected["choices"][0]["message"]["content"]
        assert expected.strip(), "the tiny model's greedy answer is empty; pick another message"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.fill("#temperature", "0")
                page.fill("#max-tokens", str(max_tokens))
                page.fill("#prompt", message)
                with page.expect_request("**/v1/chat/completions") as request:
                    page.press("#prompt", "Enter")
                answer = page.locator('#log .assistant[data-done="true"]')
                answer.wait_for(timeout=30_000)
                assert request.value.post_data_json == body | {"temperature": 0, "stream": True}
                assert page.locator("#log .user").inner_text() == message
                assert answer.evaluate("el => el.textContent") == expected
                assert page.input_value("#prompt") == ""
            finally:
                browser.close()
