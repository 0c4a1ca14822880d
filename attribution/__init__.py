"""Attribution: tracking links, clicks, conversions (issue 12).

Decisions live in plain objects that never await (links.py, verdicts.py,
clickid.py, ...); the worker's asyncio shell only moves them to and from
Redis (recorder.py, linkcache.py).
"""
