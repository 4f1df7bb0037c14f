"""llm-serve's ``GET /metrics``: Prometheus text format through ``prometheus-client``.

One registry per server (no global state). Counted when a row finishes (the scheduler's
``on_done``): requests by finish reason, prompt and completion tokens, time to first token
and time per output token (histograms). Read at scrape time: live rows, waiting requests,
and the prefix cache's lookups, hits, reused tokens, held tokens and evictions. Refused
requests are counted by HTTP status.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "tritonlm_"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """The server's metrics; :meth:`on_done` is the scheduler's callback, :meth:`watch`
    adds the scheduler's own figures, :meth:`render` is the /metrics body."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}requests", "Finished answers (rows) by finish "
                                "reason", ["finish"], registry=r)  # fmt: skip
        self.refused = Counter(f"{PREFIX}requests_refused", "Requests answered with an "
                               "error status", ["status"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens read",
                                     registry=r)  # fmt: skip
        self.completion_tokens = Counter(f"{PREFIX}completion_tokens", "Tokens generated",
                                         registry=r)  # fmt: skip
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "From submission "
                              "to the first sampled token", buckets=TTFT_BUCKETS,
                              registry=r)  # fmt: skip
        self.tpot = Histogram(f"{PREFIX}time_per_output_token_seconds", "Decode time per "
                              "token after the first", buckets=TPOT_BUCKETS,
                              registry=r)  # fmt: skip

    def on_done(self, handle, result) -> None:
        self.requests.labels(result.stop_reason or "unknown").inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.new_tokens)
        if result.new_tokens:
            self.ttft.observe(result.time_to_first_token_s)
        if result.decode_tokens_per_s > 0:
            self.tpot.observe(1.0 / result.decode_tokens_per_s)

    def watch(self, scheduler) -> None:
        self.registry.register(_SchedulerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector:
    """Queue, rows and prefix-cache figures, read from the scheduler at scrape time."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def describe(self):
        return []

    def collect(self):
        load = self.scheduler.load()
        yield GaugeMetricFamily(f"{PREFIX}queue_waiting", "Requests waiting for a row",
                                value=load["waiting"])  # fmt: skip
        yield GaugeMetricFamily(f"{PREFIX}rows_active", "Rows decoding now",
                                value=load["active"])  # fmt: skip
        cache = self.scheduler.prefix_cache
        if cache is None:
            return
        st = cache.stats
        for name, doc, value in (
            ("prefix_cache_lookups", "Prompts looked up in the prefix cache", st.lookups),
            ("prefix_cache_hits", "Prompts that reused a cached prefix", st.hits),
            ("prefix_cache_hit_tokens", "Prompt tokens reused, not recomputed", st.hit_tokens),
            ("prefix_cache_evictions", "Entries evicted (least recently used)", st.evictions),
        ):
            yield CounterMetricFamily(f"{PREFIX}{name}", doc, value=value)
        yield GaugeMetricFamily(f"{PREFIX}prefix_cache_tokens", "Tokens held in the prefix "
                                "cache", value=cache.tokens)  # fmt: skip
