"""The named scenarios of issue 5.

`steady`, `spike` and `saturation` are fan-out sessions, each on its own
population (bench.scenarios.session.SESSIONS); `connect`, `subscribe`,
`drain` and `shell` each `run(harness, system)`. All return Results.
"""

from bench.scenarios import connect, drain, shell, subscribe
from bench.scenarios.session import SESSIONS

SCENARIOS = ["steady", "saturation", "spike", "connect", "subscribe", "drain", "shell"]
STANDALONE = {module.NAME: module.run for module in (connect, subscribe, drain, shell)}

__all__ = ["SCENARIOS", "SESSIONS", "STANDALONE"]
