"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "anchorkv_requests", "Requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("anchorkv_prompt_tokens", "Prompt tokens received", registry=r)
        self.prefilled_tokens = Counter("anchorkv_prefilled_tokens", "Prompt tokens computed by prefill", registry=r)
        self.cached_tokens = Counter(
            "anchorkv_cached_tokens", "Prompt tokens restored from the prefix cache", registry=r
        )
        self.generated_tokens = Counter("anchorkv_generated_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter(
            "anchorkv_cancelled_generations", "Generations stopped because the client left", registry=r
        )
        self.queue_depth = Gauge("anchorkv_queue_depth", "Requests waiting for the engine", registry=r)
        self.ttft = Histogram(
            "anchorkv_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
