"""Prometheus metrics, defined once so every module records into the same registry.

Recording is plain arithmetic on small objects: prometheus-client is imported only when someone
looks (a /metrics scrape, a test reading a sample), and then renders the exposition format from
these values through a custom collector. Why not its metric classes directly: importing it costs
3.5 MB of RSS in every gateway, scraped or not, and each of its updates takes a lock (patched:
a gevent lock) on the message path. What it is kept for: the text and OpenMetrics formats,
which hand-writing would only get wrong. A private registry keeps tests that build several
gateways in one process from colliding with the default one.
"""
from __future__ import annotations

from typing import Any, Iterator


class _Child:
    """One label combination's value (a counter or gauge), or a histogram's counts."""
    __slots__ = ("value", "counts", "sum", "_buckets")

    def __init__(self, buckets: tuple[float, ...] | None) -> None:
        self.value = 0.0
        self._buckets = buckets
        self.counts = [0] * (len(buckets) + 1) if buckets is not None else None
        self.sum = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def observe(self, value: float) -> None:
        buckets = self._buckets
        i = 0
        while i < len(buckets) and value > buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value

    @property
    def _value(self) -> "_Child":  # prometheus-client's spelling, for tests that read it
        return self

    def get(self) -> float:
        return self.value


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames=(), *, registry=None,
                 buckets: tuple[float, ...] | None = None) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self._buckets = tuple(sorted(buckets)) if buckets is not None else None
        self._children: dict[tuple[str, ...], _Child] = {}
        if not self.labelnames:
            self._children[()] = _Child(self._buckets)
        if registry is not None:
            registry.register(self)

    def labels(self, *values: Any, **by_name: Any) -> _Child:
        if by_name:
            values = tuple(by_name[n] for n in self.labelnames)
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected")
            child = self._children[key] = _Child(self._buckets)
        return child

    # a metric without labels is its own child
    def inc(self, amount: float = 1.0) -> None:
        self._children[()].inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._children[()].dec(amount)

    def set(self, value: float) -> None:
        self._children[()].set(value)

    def observe(self, value: float) -> None:
        self._children[()].observe(value)

    @property
    def _value(self) -> _Child:
        return self._children[()]

    def family(self):
        """This metric as prometheus-client's metric family (imports it: only on a scrape)."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        from prometheus_client.utils import floatToGoString
        if self.kind == "counter":
            name = self.name[:-6] if self.name.endswith("_total") else self.name
            fam = CounterMetricFamily(name, self.documentation, labels=self.labelnames)
            for key, child in list(self._children.items()):
                fam.add_metric(key, child.value)
        elif self.kind == "gauge":
            fam = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for key, child in list(self._children.items()):
                fam.add_metric(key, child.value)
        else:
            fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for key, child in list(self._children.items()):
                total, buckets = 0, []
                for le, n in zip((*self._buckets, float("inf")), child.counts):
                    total += n
                    buckets.append((floatToGoString(le), float(total)))
                fam.add_metric(key, buckets, child.sum)
        return fam


class Counter(_Metric):
    kind = "counter"


class Gauge(_Metric):
    kind = "gauge"


class Histogram(_Metric):
    kind = "histogram"
    DEFAULT_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0)

    def __init__(self, name: str, documentation: str, labelnames=(), *, registry=None,
                 buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, documentation, labelnames, registry=registry, buckets=buckets)


class CollectorRegistry:
    """What prometheus-client's encoders read (`collect()`), and its `get_sample_value`."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> None:
        self._metrics.append(metric)

    def collect(self) -> Iterator:
        for metric in self._metrics:
            yield metric.family()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        labels = labels or {}
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None


REGISTRY = CollectorRegistry()

_LATENESS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

platform_up = Gauge("hermes_green_platform_up", "1 when the bot's connection is ready",
                    ["platform", "bot"], registry=REGISTRY)
reconnects_total = Counter("hermes_green_reconnects_total", "Reconnects by reason",
                           ["platform", "bot", "reason"], registry=REGISTRY)
heartbeat_lateness = Histogram("hermes_green_heartbeat_lateness_seconds",
                               "How late each keepalive (or long poll) left against its timetable",
                               ["platform", "bot"], buckets=_LATENESS_BUCKETS, registry=REGISTRY)
inbound_journal_failures = Counter("hermes_green_inbound_journal_failures_total",
                                   "Inbound messages the store could not journal, by what the "
                                   "adapter did instead (not acked, resumed, held in memory)",
                                   ["platform", "bot", "policy"], registry=REGISTRY)
inbound_held = Gauge("hermes_green_inbound_held", "Inbound messages held in memory until the "
                     "store takes them (platforms that neither redeliver nor replay)",
                     ["platform", "bot"], registry=REGISTRY)
undeliverable_total = Counter("hermes_green_undeliverable_replies_total",
                              "Replies the platform refused for good (the outbox gave up)",
                              ["platform", "bot"], registry=REGISTRY)
hub_lateness = Histogram("hermes_green_hub_lateness_seconds",
                         "How late the hub probe woke (GIL contention and hub blocking)",
                         buckets=_LATENESS_BUCKETS, registry=REGISTRY)
hub_blocked_total = Counter("hermes_green_hub_blocked_total",
                            "Times gevent's monitor saw a greenlet hold the hub too long",
                            registry=REGISTRY)
messages_total = Counter("hermes_green_messages_total", "Messages by direction (in/out)",
                         ["platform", "bot", "direction"], registry=REGISTRY)
duplicates_total = Counter("hermes_green_inbound_duplicates_total",
                           "Redelivered inbound messages recognized and skipped",
                           ["platform", "bot"], registry=REGISTRY)
outbox_pending = Gauge("hermes_green_outbox_pending", "Replies written but not yet accepted",
                       registry=REGISTRY)
turn_seconds = Histogram("hermes_green_turn_seconds", "Agent turn duration",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                         registry=REGISTRY)
tool_seconds = Histogram("hermes_green_tool_seconds", "Tool call duration",
                         ["tool", "executor"],
                         buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
                         registry=REGISTRY)
turns_in_flight = Gauge("hermes_green_turns_in_flight", "Agent turns running now",
                        registry=REGISTRY)
refused_total = Counter("hermes_green_inbound_refused_total",
                        "Inbound messages not answered, by reason: rate_limit, queue_cap, "
                        "stopped (dropped by /stop or /new), pairing, allow_from, dm_policy, "
                        "group_policy, mention", ["platform", "bot", "reason"], registry=REGISTRY)
notices_total = Counter("hermes_green_notices_total",
                        "Short notices sent instead of an answer (rate_limit, queue_cap, "
                        "pairing): one per rate-limit bite or queue overflow",
                        ["platform", "bot", "kind"], registry=REGISTRY)
commands_total = Counter("hermes_green_commands_total", "Chat commands run",
                         ["platform", "bot", "command"], registry=REGISTRY)
reloads_total = Counter("hermes_green_reloads_total", "Config reloads by outcome",
                        ["result"], registry=REGISTRY)
