"""The dispatcher's Prometheus series, on its own registry (`OG_WEBHOOKS_METRICS_PORT`).

`og_webhook_deliveries_total{endpoint,outcome}` and `og_webhook_dead_letters`
are the names deploy/grafana/oddsgate.json and deploy/prometheus/alerts.yml
chart. Outcomes: `delivered` (a 2xx), `failed` (an attempt that will be
retried), `dead` (retries exhausted or the endpoint disabled), `gone` (a
410 that disabled the endpoint).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("delivered", "failed", "dead", "gone")


class HookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "og_webhook_deliveries", "webhook and postback attempts by endpoint and outcome",
            ["endpoint", "outcome"], registry=self.registry)
        self.dead_letters = Gauge(
            "og_webhook_dead_letters", "deliveries given up on, kept for replay",
            registry=self.registry)
        self.retrying = Gauge(
            "og_webhook_retrying", "deliveries waiting for a retry, by endpoint", ["endpoint"],
            registry=self.registry)
        self.breaker = Gauge(
            "og_webhook_breaker_state", "circuit breaker: 0 closed, 1 half-open, 2 open",
            ["endpoint"], registry=self.registry)
        self.enabled = Gauge(
            "og_webhook_endpoint_enabled", "1 while the endpoint is enabled; 0 once disabled "
            "(by an operator, or by a 410 Gone)", ["endpoint"], registry=self.registry)
        self.latency = Histogram(
            "og_webhook_delivery_latency_seconds",
            "conversion accepted to 2xx received from the endpoint", ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
            registry=self.registry)

    def know(self, endpoint_id: str, enabled: bool) -> None:
        """Every series of an endpoint exists (at 0) from the moment it is known."""
        for outcome in OUTCOMES:
            self.deliveries.labels(endpoint_id, outcome)
        self.retrying.labels(endpoint_id)
        self.breaker.labels(endpoint_id)
        self.latency.labels(endpoint_id)
        self.enabled.labels(endpoint_id).set(1 if enabled else 0)
