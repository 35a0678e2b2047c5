"""Prometheus metrics, defined once so every module records into the same registry.

Why prometheus-client: the exposition format, histograms and label handling are exactly what
monitoring systems scrape; hand-writing them would only add bugs. A private registry keeps tests
that build several gateways in one process from colliding with the default one.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

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
