"""Prometheus metrics of the server: requests by path and status, engine queue and KV-cache gauges, generated
tokens, and histograms of time to first token and inter-token latency."""

from __future__ import annotations

import bisect
import time
from collections import Counter

from lmforge.serve.engine import Engine, Output

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]


class ServerMetrics:
    def __init__(self):
        self.requests: Counter = Counter()  # (path, status code) -> count
        self.tokens = 0
        self.finished = 0
        self.last_token_at: dict[str, float] = {}  # request id -> arrival, then time of its latest token
        self.has_token: set[str] = set()
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Arrival to first generated token.")
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "Time between a request's successive tokens.")
        self.recent: list[tuple[float, int]] = []  # (time, tokens) of recent steps, for tokens/s

    def arrived(self, request_id: str) -> None:
        self.last_token_at[request_id] = time.perf_counter()

    def forget(self, request_id: str) -> None:
        self.last_token_at.pop(request_id, None)
        self.has_token.discard(request_id)

    def stepped(self, outputs: list[Output]) -> None:
        now = time.perf_counter()
        step_tokens = 0
        for out in outputs:
            if out.token_ids and out.request_id in self.last_token_at:
                gap = now - self.last_token_at[out.request_id]
                (self.itl if out.request_id in self.has_token else self.ttft).observe(gap)
                for _ in out.token_ids[1:]:
                    self.itl.observe(0.0)  # tokens that arrive in the same step (speculative decoding)
                self.has_token.add(out.request_id)
                self.last_token_at[out.request_id] = now
            step_tokens += len(out.token_ids)
            if out.finished:
                self.finished += 1
                self.forget(out.request_id)
        self.tokens += step_tokens
        self.recent = [(t, n) for t, n in self.recent if now - t < 10.0] + [(now, step_tokens)]

    def tokens_per_second(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1][0] - self.recent[0][0]
        return sum(n for _, n in self.recent[1:]) / span if span > 0 else 0.0

    def render(self, engine: Engine) -> str:
        lines = ["# TYPE lmforge_requests_total counter"]
        for (path, code), count in sorted(self.requests.items()):
            lines.append(f'lmforge_requests_total{{path="{path}",code="{code}"}} {count}')
        lines += ["# TYPE lmforge_generated_tokens_total counter", f"lmforge_generated_tokens_total {self.tokens}"]
        lines += ["# TYPE lmforge_finished_requests_total counter", f"lmforge_finished_requests_total {self.finished}"]
        lines += ["# TYPE lmforge_tokens_per_second gauge", f"lmforge_tokens_per_second {self.tokens_per_second()}"]
        kv = engine.kv_usage()  # read without the engine's lock: a scrape may see a step half done
        gauges = {
            "lmforge_waiting_requests": len(engine.waiting),
            "lmforge_running_sequences": len(engine.running),
            "lmforge_kv_blocks_used": kv["blocks_used"],
            "lmforge_kv_blocks_free": kv["blocks_free"],
            "lmforge_kv_cache_usage_ratio": kv["usage"],
            "lmforge_kv_cache_waste_ratio": kv["waste"],
            "lmforge_prefix_cache_hit_ratio": kv["prefix_hit_rate"],
            "lmforge_preemptions_total": engine.preemptions,
        }
        if proposed := getattr(engine, "proposed", 0):  # speculative decoding
            gauges["lmforge_spec_acceptance_ratio"] = engine.accepted / proposed
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines + self.ttft.render() + self.itl.render()) + "\n"
