"""The named scenarios of issue 5.

`steady`, `spike` and `saturation` are fan-out sessions, each on its own
population (bench.scenarios.session.SESSIONS); `connect`, `subscribe`,
`drain`, `shell`, `failover` and `clicks` (tracking links) each
`run(harness, system)`. All return Results.
"""

from bench.scenarios import clicks, connect, drain, failover, shell, stats, subscribe, webhooks
from bench.scenarios.session import SESSIONS

SCENARIOS = ["steady", "saturation", "spike", "connect", "subscribe", "drain", "shell",
             "failover", "clicks", "webhooks", "stats"]
STANDALONE = {module.NAME: module.run for module in (connect, subscribe, drain, shell, failover,
                                                    clicks, webhooks, stats)}

__all__ = ["SCENARIOS", "SESSIONS", "STANDALONE"]
