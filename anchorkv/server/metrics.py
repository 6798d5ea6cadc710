"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations


from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from anchorkv.cache.prefix_cache import CacheUse


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
        self.cache_hits = Counter(
            "anchorkv_cache_hits", "Requests that restored a prefix, by kind and tier", ["kind", "tier"], registry=r
        )
        self.cache_bytes_written = Gauge(
            "anchorkv_cache_disk_written_bytes", "Bytes written to the disk tier since start", registry=r
        )
        self.cache_bytes_evicted = Gauge(
            "anchorkv_cache_evicted_bytes", "Bytes evicted since start, by tier", ["tier"], registry=r
        )
        self.cache_bytes = Gauge("anchorkv_cache_bytes", "Bytes held, by tier", ["tier"], registry=r)
        self.cache_corrupt = Gauge(
            "anchorkv_cache_corrupt_files_dropped", "Disk cache files dropped as corrupt since start", registry=r
        )
        self.redis_up = Gauge(
            "anchorkv_cache_redis_up", "1 while the Redis tier answers, 0 while it is off", registry=r
        )
        self.redis_errors = Gauge("anchorkv_cache_redis_errors", "Failed Redis calls since start", registry=r)
        self.redis_written = Gauge(
            "anchorkv_cache_redis_written_bytes", "Bytes written to Redis since start", registry=r
        )
        self.queue_depth = Gauge("anchorkv_queue_depth", "Requests waiting for the engine", registry=r)
        self.ttft = Histogram(
            "anchorkv_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )

    def observe_cache(self, use: CacheUse) -> None:
        """Copy the cache's running totals into gauges (called at scrape time)."""
        self.cache_bytes.labels("ram").set(use.ram.bytes)
        self.cache_bytes_evicted.labels("ram").set(use.ram.evicted_bytes)
        if (disk := use.disk) is not None:
            self.cache_bytes.labels("disk").set(disk.bytes)
            self.cache_bytes_evicted.labels("disk").set(disk.evicted_bytes)
            self.cache_bytes_written.set(disk.written_bytes)
            self.cache_corrupt.set(disk.corrupt_dropped)
        if (redis := use.redis) is not None:
            self.redis_up.set(1 if redis.up else 0)
            self.redis_errors.set(redis.errors)
            self.redis_written.set(redis.written_bytes)
