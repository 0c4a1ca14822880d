"""Partner webhooks and postbacks (PROTOCOL.md section 11): signing, retries, dead letters.

Plain objects decide (schedule.py, breaker.py, ratelimit.py, signing.py,
events.py, endpoints.py); dispatcher.py is the asyncio shell that moves
events between Redis, those objects and the partners' HTTP servers.
"""
