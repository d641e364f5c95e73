"""What Yanray tells an operator about its work: the Prometheus metrics and the figures of /stats.

One `Metrics` object, built by the core and passed to whatever reports to it (the worker, the
tool loop through a callback, the dispatcher, the adapters' reply streams through theirs). It
owns its own `CollectorRegistry`, not prometheus-client's global one, so two cores (two tests)
never share a counter. Names follow Prometheus conventions: a `yanray_` prefix, the unit in
the name, `_total` on counters.

Two kinds of figures:
- events the bot sees are counted as they happen: requests by final status, queue waits,
  time to first token, generated tokens, tool calls, platform errors;
- state is read when scraped (`_StateCollector`): the queue's depth, and what the engine
  counts itself (`engine/stats.py`: warm-cache hits, batch occupancy, out-of-memory errors,
  GPU memory). The engine package does not know this module; an engine without `stats`
  (the OpenAI-compatible one) simply has none of those series.

Generated tokens are a counter: tokens per second is `rate(yanray_generated_tokens_total[1m])`
in Prometheus, which is the Prometheus way (a gauge of "tokens/s now" would be a rate
computed at an arbitrary window and lost between scrapes). /stats, which has no Prometheus
behind it, keeps the last THROUGHPUT_WINDOW_S of answers to say the same in words.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from yanray.bot.queue import RequestQueue

#: seconds of answers /stats averages its tokens per second over
THROUGHPUT_WINDOW_S = 300.0
#: queue waits: from a second to the half hour a busy single-GPU bot may reach
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
#: time to first token: a warm turn on a GPU to a long cold prefill on a CPU
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
#: what a request ends as (storage's statuses)
STATUSES = ("done", "failed", "cancelled")


class Metrics:
    """The registry and every metric Yanray reports; see the README's metrics section."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        registry = self.registry
        self.requests = Counter(
            "yanray_requests", "Requests by the status they ended in", ["status"], registry=registry
        )
        for status in STATUSES:  # a series exists from the start, so rate() sees its first one
            self.requests.labels(status)
        self.queue_wait = Histogram(
            "yanray_queue_wait_seconds",
            "Time a request waited in the queue before the engine took it",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "yanray_time_to_first_token_seconds",
            "Time from the engine taking a request to the first text of its answer",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.generated = Counter(
            "yanray_generated_tokens",
            "Tokens the model generated (rate() is tokens per second)",
            registry=registry,
        )
        self.tool_calls = Counter(
            "yanray_tool_calls",
            "Tool calls the model made, by tool and outcome",
            ["tool", "outcome"],
            registry=registry,
        )
        self.platform_errors = Counter(
            "yanray_platform_errors",
            "Failed platform API calls by platform and kind (rate_limited: a 429)",
            ["platform", "kind"],
            registry=registry,
        )
        self._state = _StateCollector(self)
        registry.register(self._state)
        self.queue: RequestQueue | None = None
        self.engine: Any = None
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic time, tokens) of answer rounds
        self.finished: dict[str, int] = dict.fromkeys(STATUSES, 0)

    def watch(self, *, queue: RequestQueue, engine: Any) -> None:
        """Read the queue's depth and the engine's own counters when scraped."""
        self.queue, self.engine = queue, engine

    # -- events ------------------------------------------------------------------------

    def request_finished(self, status: str) -> None:
        self.requests.labels(status).inc()
        self.finished[status] = self.finished.get(status, 0) + 1

    def waited(self, seconds: float) -> None:
        self.queue_wait.observe(max(0.0, seconds))

    def first_text(self, seconds: float) -> None:
        self.first_token.observe(max(0.0, seconds))

    def tokens_generated(self, count: int) -> None:
        if count <= 0:
            return
        self.generated.inc(count)
        now = time.monotonic()
        self._recent.append((now, count))
        self._forget(now)

    def tool_called(self, tool: str, outcome: str) -> None:
        self.tool_calls.labels(tool, outcome).inc()

    def platform_error(self, platform: str, kind: str) -> None:
        self.platform_errors.labels(platform, kind).inc()

    # -- reading -----------------------------------------------------------------------

    def uptime(self) -> float:
        return time.monotonic() - self._started_monotonic

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last THROUGHPUT_WINDOW_S (or since start)."""
        now = time.monotonic()
        self._forget(now)
        window = min(THROUGHPUT_WINDOW_S, max(now - self._started_monotonic, 1e-9))
        return sum(count for _t, count in self._recent) / window

    def gpu_memory(self) -> Any:
        """The engine's `GpuMemory` (used, peak, total bytes), or None (CPU, remote engine)."""
        memory = getattr(self.engine, "memory", None)
        return memory() if callable(memory) else None

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def _forget(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
            self._recent.popleft()


class _StateCollector(Collector):
    """Gauges and engine counters read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # unknown until the engine is attached; not checked for clashes

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield GaugeMetricFamily(
            "yanray_start_time_seconds", "When this Yanray started (Unix time)", m.started
        )
        queue = m.queue
        if queue is not None:
            yield GaugeMetricFamily("yanray_queue_depth", "Requests waiting for the engine", len(queue))
            yield GaugeMetricFamily(
                "yanray_requests_running", "Requests being answered now", len(queue.active)
            )
            yield GaugeMetricFamily(
                "yanray_batch_slots", "Requests the engine answers at once, at most", queue.slots
            )
        stats = getattr(m.engine, "stats", None)
        if stats is not None:
            yield from _engine_metrics(stats)
        memory = m.gpu_memory()
        if memory is not None:
            yield GaugeMetricFamily(
                "yanray_gpu_memory_used_bytes", "GPU memory held by tensors now", memory.used
            )
            yield GaugeMetricFamily(
                "yanray_gpu_memory_peak_bytes", "The most GPU memory held at once since start", memory.peak
            )
            yield GaugeMetricFamily("yanray_gpu_memory_total_bytes", "The GPU's memory", memory.total)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _engine_metrics(stats: Any) -> Iterator[Metric]:
    yield _counter(
        "yanray_prefilled_tokens",
        "Prompt tokens the engine prefilled (only new ones on a warm turn)",
        stats.prefilled_tokens,
    )
    yield _counter(
        "yanray_warm_cache_hits", "Sessions that started from a kept conversation cache", stats.warm_hits
    )
    yield _counter(
        "yanray_warm_cache_misses", "Sessions that found no kept cache to start from", stats.warm_misses
    )
    yield _counter(
        "yanray_warm_cache_reused_tokens", "Prompt tokens a kept cache spared prefilling", stats.warm_tokens
    )
    yield GaugeMetricFamily(
        "yanray_warm_cache_bytes", "Memory held by kept conversation caches", stats.warm_bytes
    )
    yield _counter("yanray_decode_steps", "Decode steps (one forward pass each)", stats.decode_steps)
    yield _counter(
        "yanray_decoded_rounds",
        "Rounds decoded, summed over steps (divided by decode steps: mean batch occupancy)",
        stats.decoded_rounds,
    )
    yield GaugeMetricFamily("yanray_batch_rounds", "Conversations decoding together now", stats.batch_rounds)
    yield _counter("yanray_out_of_memory", "Out-of-memory errors the engine caught", stats.out_of_memory)
