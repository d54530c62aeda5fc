"""An OpenAI-compatible server as an evaluation backend, over /v1/completions: log-likelihoods from the prompt's
log-probabilities (echo with logprobs, which `lmforge serve` and vLLM return), and generations. A request the server
refuses or that times out is counted as a skip reason for its items; a server that cannot be reached, or that returns
no prompt log-probabilities, stops the evaluation with one line."""

from __future__ import annotations

import httpx

from lmforge.errors import LmforgeError

Scores = list[tuple[float, bool]]


class Endpoint:
    def __init__(self, url: str, model: str = "", timeout: float = 120.0, api_key: str = ""):
        self.base = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.truncated = 0
        try:
            listed = self.client.get(f"{self.base}/v1/models")
            listed.raise_for_status()
            self.model = model or listed.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise LmforgeError(
                f"cannot list the models of {self.base}/v1/models ({e}); start the server (lmforge serve RUN) "
                "or fix the URL"
            ) from None

    def _complete(self, body: dict) -> dict | str:
        """The server's JSON answer, or the reason it gave none."""
        try:
            response = self.client.post(f"{self.base}/v1/completions", json={"model": self.model, **body})
        except httpx.TimeoutException:
            return "endpoint timed out"
        except httpx.HTTPError as e:
            return f"endpoint error ({type(e).__name__})"
        if response.status_code != 200:
            return f"endpoint refused (HTTP {response.status_code})"
        return response.json()

    def loglikelihood(self, requests: list[tuple[str, list[str]]]) -> list[Scores | str]:
        out: list[Scores | str] = []
        for context, continuations in requests:
            spaces = len(context) - len(context.rstrip())
            context, prefix = context[: len(context) - spaces], context[len(context) - spaces :]
            texts = [context + prefix + c for c in continuations]
            # max_tokens=1 (not 0) as lm-eval sends: servers that reject 0 accept it; the generated token is dropped
            answer = self._complete({"prompt": texts, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
            if isinstance(answer, str):
                out.append(answer)
                continue
            scores = []
            for choice, text in zip(answer["choices"], texts, strict=True):
                lp = choice.get("logprobs") or {}
                if not lp.get("token_logprobs"):
                    raise LmforgeError(
                        f"{self.base} returns no prompt log-probabilities (echo with logprobs); it can run only "
                        "generate and code tasks"
                    )
                total, greedy = 0.0, True
                for offset, value, top in zip(lp["text_offset"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
                    if len(context) <= offset < len(text):
                        total += value
                        greedy &= top is None or value >= max(top.values()) - 1e-6
                scores.append((total, greedy))
            out.append(scores)
        return out

    def rolling_nll(self, text: str, stride: int = 0) -> tuple[float, int]:
        raise LmforgeError("perplexity needs the model's windows; give a run folder instead of a server URL")

    def generate(
        self, prompts: list[str], until: list[str], max_tokens: int, n: int = 1, temperature: float = 0.0, seed=0
    ) -> list[list[str] | str]:
        out: list[list[str] | str] = []
        for prompt in prompts:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "n": n, "seed": seed}
            answer = self._complete({**body, "stop": until[:4]} if until else body)  # OpenAI takes up to 4 stops
            if isinstance(answer, str):
                out.append(answer)
                continue
            texts = [c["text"] for c in answer["choices"]]
            out.append([min((t.split(s)[0] for s in until), key=len) if until else t for t in texts])
        return out
