"""Prometheus metrics of the server (prometheus_client, one registry per app): requests by route and status, engine
queue and KV-cache gauges, generated tokens, and histograms of time to first token and inter-token latency."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from lmforge.serve.engine import Engine, Output

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED = "unmatched"
"""The path label of every request that matches no route: unknown paths add no series."""


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmforge_requests",
            "HTTP requests by route template and status code.",
            ["path", "code"],
            registry=self.registry,
        )
        self.tokens = Counter("lmforge_generated_tokens", "Tokens generated.", registry=self.registry)
        self.finished = Counter("lmforge_finished_requests", "Sequences run to their end.", registry=self.registry)
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "lmforge_inter_token_latency_seconds",
            "Time between a request's successive tokens.",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineGauges(engine, self))
        self.last_token_at: dict[str, float] = {}  # request id -> arrival, then time of its latest token
        self.has_token: set[str] = set()
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
                self.finished.inc()
                self.forget(out.request_id)
        self.tokens.inc(step_tokens)
        self.recent = [(t, n) for t, n in self.recent if now - t < 10.0] + [(now, step_tokens)]

    def tokens_per_second(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1][0] - self.recent[0][0]
        return sum(n for _, n in self.recent[1:]) / span if span > 0 else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineGauges:
    """The engine's state, read when /metrics is scraped."""

    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        kv = engine.kv_usage()  # read without the engine's lock: a scrape may see a step half done
        gauges = {
            "lmforge_tokens_per_second": (
                "Tokens generated per second over the last 10 s.",
                self.metrics.tokens_per_second(),
            ),
            "lmforge_waiting_requests": ("Requests queued.", len(engine.waiting)),
            "lmforge_running_sequences": ("Sequences in the running batch.", len(engine.running)),
            "lmforge_kv_blocks_used": ("KV-cache blocks held by sequences.", kv["blocks_used"]),
            "lmforge_kv_blocks_free": ("KV-cache blocks free.", kv["blocks_free"]),
            "lmforge_kv_cache_usage_ratio": ("Share of KV-cache blocks in use.", kv["usage"]),
            "lmforge_kv_cache_waste_ratio": ("Reserved KV slots holding no token.", kv["waste"]),
            "lmforge_prefix_cache_hit_ratio": ("Prefix-cache lookups that hit.", kv["prefix_hit_rate"]),
            "lmforge_preemptions_total": ("Sequences preempted so far.", engine.preemptions),
        }
        if proposed := getattr(engine, "proposed", 0):  # speculative decoding
            gauges["lmforge_spec_acceptance_ratio"] = ("Drafted tokens accepted.", engine.accepted / proposed)
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
