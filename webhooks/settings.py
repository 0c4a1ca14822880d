"""Settings of the webhook dispatcher (`oddsgate webhooks run`), from `OG_WEBHOOKS_*`.

The defaults are the production schedule (retries for 25 hours, the first
within 2 s); tests shorten them through the same variables.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ConfigError, EnvSettings, setting


@dataclass
class WebhookSettings(EnvSettings):
    metrics_port: int = setting(
        "OG_WEBHOOKS_METRICS_PORT", 9102, "port of the dispatcher's GET /metrics; 0: off",
        minimum=0)
    metrics_host: str = setting("OG_WEBHOOKS_METRICS_HOST", "127.0.0.1",
                                "address of the dispatcher's GET /metrics")
    timeout_s: float = setting("OG_WEBHOOKS_TIMEOUT_S", 10.0,
                               "an attempt with no answer after this is a failure", minimum=0.01)
    retry_base_s: float = setting(
        "OG_WEBHOOKS_RETRY_BASE_S", 2.0,
        "first retry within this; each next one waits twice as long, jittered", minimum=0.001)
    retry_cap_s: float = setting(
        "OG_WEBHOOKS_RETRY_CAP_S", 3600.0,
        "longest wait between two attempts (a Retry-After may ask for more)", minimum=0.001)
    give_up_after_s: float = setting(
        "OG_WEBHOOKS_GIVE_UP_AFTER_S", 90000.0,
        "a delivery still failing this long after its first attempt becomes a dead letter",
        minimum=0)
    lease_s: float = setting(
        "OG_WEBHOOKS_LEASE_S", 30.0,
        "a claimed delivery is due again after this unless finished (a dispatcher killed "
        "mid-attempt loses nothing); must exceed OG_WEBHOOKS_TIMEOUT_S", minimum=0.01)
    concurrency: int = setting("OG_WEBHOOKS_CONCURRENCY", 4,
                               "attempts in flight per endpoint at most", minimum=1)
    rate_per_s: float = setting("OG_WEBHOOKS_RATE_PER_S", 50.0,
                                "attempts a second per endpoint at most; 0: no limit", minimum=0)
    breaker_failures: int = setting(
        "OG_WEBHOOKS_BREAKER_FAILURES", 5,
        "failed attempts in a row that open an endpoint's circuit breaker", minimum=1)
    breaker_open_s: float = setting(
        "OG_WEBHOOKS_BREAKER_OPEN_S", 30.0,
        "an open breaker lets one probe through after this", minimum=0.001)
    rotation_overlap_s: float = setting(
        "OG_WEBHOOKS_ROTATION_OVERLAP_S", 86400.0,
        "after rotate-secret the old secret still signs (beside the new one) for this long",
        minimum=0)
    consumer: str = setting(
        "OG_WEBHOOKS_CONSUMER", "dispatcher",
        "the dispatcher's name in the og:conversions consumer group; a restart under the "
        "same name takes back what it had read and not yet enqueued")
    poll_s: float = setting("OG_WEBHOOKS_POLL_S", 0.05,
                            "how often due retries are looked for", minimum=0.001)

    def check(self) -> None:
        super().check()
        if self.lease_s <= self.timeout_s:
            raise ConfigError(f"OG_WEBHOOKS_LEASE_S={self.lease_s}: must exceed "
                              f"OG_WEBHOOKS_TIMEOUT_S={self.timeout_s}")
