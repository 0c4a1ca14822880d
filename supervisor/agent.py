"""Answers HAProxy's agent checks from the supervisor's view of each worker.

HAProxy connects to the agent port every `agent-inter`, sends the server's
`agent-send` string (`w<index>\\n`) and reads one line back. The supervisor
is the only owner of each server's admin state: it answers `ready` or `drain`
(and `up`/`down` for the operational state), so nobody sets a drain through
HAProxy's own socket that an agent `ready` would undo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("oddsgate.agent")


class AgentServer:
    def __init__(self, host: str, port: int, answer: Callable[[int], str]) -> None:
        self.host = host
        self.port = port
        self._answer = answer  # worker index -> reply line (without newline)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 2)
            writer.write((self.reply_for(line) + "\n").encode())
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def reply_for(self, line: bytes) -> str:
        name = line.strip().decode("ascii", "replace")
        if len(name) > 1 and name[0] == "w" and name[1:].isdigit():
            try:
                return self._answer(int(name[1:]))
            except (KeyError, IndexError):
                pass
        log.warning("agent check for an unknown server %r", name[:40])
        return "down"
