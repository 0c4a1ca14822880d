"""Settings of a region's aggregator (`oddsgate aggregate`), from `OG_*` variables.

The stream and its generation name the epoch every region publishes
(`aggregator.engine.epoch_for`): two regions agree on bytes only if they
agree on these, on the providers and on the rules, so they are settings an
operator sets once per deployment and changes only together, in every
region, as a new generation.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ConfigError, EnvSettings, setting


@dataclass
class AggregatorSettings(EnvSettings):
    stream: str = setting("OG_STREAM", "main", "the aggregated stream's name (part of its epoch)")
    generation: int = setting(
        "OG_GENERATION", 1, "the stream's generation: a new one is a new epoch, every "
        "follower resets; change it only in every region together", minimum=1)
    providers: str = setting(
        "OG_PROVIDERS", "", "comma-separated providers the merge waits for; empty: the "
        "synthetic providers' names (aggregator.providers.default_providers)")
    provider_idle_ms: int = setting(
        "OG_PROVIDER_IDLE_MS", 1500, "a provider silent this long (wall clock) stops "
        "holding the merge's watermark until it speaks again", minimum=1)
    stale_after_ms: int = setting(
        "OG_REGION_STALE_AFTER_MS", 0, "the region's liveness mark expires this long after "
        "the aggregator's last progress (workers' /healthz follows it); 0: 3000", minimum=0)
    checkpoint_ms: int = setting(
        "OG_CHECKPOINT_MS", 1000, "how often the aggregator saves its position and state",
        minimum=10)
    history_s: float = setting(
        "OG_HISTORY_S", 60.0, "history kept per topic (>= 30)", minimum=30)

    def check(self) -> None:
        super().check()
        from aggregator.engine import epoch_for

        try:
            epoch_for(self.stream, self.generation)
        except ValueError as exc:
            raise ConfigError(f"OG_STREAM={self.stream!r}: {exc}") from None

    @property
    def alive_ms(self) -> int:
        return self.stale_after_ms or 3000

    def provider_names(self) -> tuple[str, ...]:
        if self.providers.strip():
            return tuple(sorted({p.strip() for p in self.providers.split(",") if p.strip()}))
        from aggregator.providers import default_providers

        return tuple(sorted(c.name for c in default_providers()))
