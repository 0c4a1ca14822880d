"""The aggregator: many providers' odds in, one deterministic event stream out.

Every region runs its own aggregator on its own copy of every provider's
messages (PROTOCOL.md section 8), so each part here is a plain object that
never awaits and never reads a clock: `inputs` the provider message format,
`providers` seeded synthetic providers, `merge` one input order out of the
providers' streams, `consensus` and `margin` the prices published. The asyncio
shell that reads Redis and publishes lives elsewhere and only moves data.
"""
