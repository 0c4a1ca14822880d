"""The attribution edge (PROTOCOL.md §9-12): tracking links and clicks, conversions,
partner statistics.

Decisions live in plain objects that never await (links.py, verdicts.py,
clickid.py, conversions.py, stats.py, ...); the asyncio shells only move
records to and from Redis (recorder.py, linkcache.py, intake.py,
stats_service.py). Records cross between services only as the streams and
keys named in `attribution.keys`.
"""
