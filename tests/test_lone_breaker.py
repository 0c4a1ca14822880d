"""A worker run alone (`oddsgate worker`, no supervisor, no fleet table) decides its own
breaker on its own players: under a supervisor the node decides (test_backpressure.py)."""

from __future__ import annotations

import asyncio

from client.odds import OddsClient
from tests.conftest import token
from tests.test_backpressure import LEAGUE, SMALL_BUFFERS, _player, _spike, _stall


async def _subscribe_until(probe: OddsClient, topic: str, shed: bool) -> None:
    for _ in range(200):
        result = await probe.subscribe([topic])
        if result.accepted:
            await probe.unsubscribe([topic])  # so the next try is a new subscription
        if bool(result.errors and result.errors[0]["code"] == "shed") == shed:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"subscribe to {topic} never {'shed' if shed else 'accepted'}")


async def test_a_lone_worker_sheds_on_its_own_players(worker_factory, publisher) -> None:
    worker = worker_factory(**SMALL_BUFFERS, OG_BREAKER_MIN_PLAYERS="1",
                            OG_BREAKER_TRIP_SHARE="0.05", OG_BREAKER_RECOVER_SHARE="0.03")
    healthy = await _player(worker.url, [LEAGUE], name="healthy")
    stalled = await _player(worker.url, [LEAGUE], port=worker.port, name="slow")
    _stall(stalled)
    feeding = asyncio.create_task(_spike(publisher, LEAGUE, 40_000))
    probe = OddsClient(worker.url, token=token("probe", "probe"), reconnect=False)
    await probe.connect()
    try:
        await _subscribe_until(probe, "odds:1:39:7", shed=True)
        feeding.cancel()
        stalled._ws.transport.abort()  # the slow player leaves: its worker recovers
        await _subscribe_until(probe, "odds:1:39:7", shed=False)
    finally:
        feeding.cancel()
        await probe.close()
        await healthy.close()
