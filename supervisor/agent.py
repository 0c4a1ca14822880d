"""Answers HAProxy's agent checks from the supervisor's view of each worker.

HAProxy connects to the agent port every `agent-inter`, sends the server's
`agent-send` string (`w<index>\\n`, haproxy/render.py) and reads one line
back. The supervisor is the only owner of each server's admin state: it
answers `ready` or `drain` (and `up`/`down` for the operational state), so
nobody sets a drain through HAProxy's own socket that an agent `ready` would
undo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable

log = logging.getLogger("oddsgate.agent")

_AGENT_REQUEST = re.compile(rb"^w(\d{1,6})\r?\n?$")


def agent_request_index(data: bytes) -> int | None:
    """The worker index in an agent check request (`b"w3\\n"` -> 3); None if it is not one."""
    match = _AGENT_REQUEST.match(data.strip(b" \t") or b"-")
    return int(match.group(1)) if match else None


class AgentServer:
    """One TCP port for every server's agent check; `answer(index)` decides the reply.

    A request that names no worker, or a worker `answer` does not know
    (KeyError, IndexError), is answered `down`: HAProxy then sends that server
    no player, which is the safe side of a misconfiguration.
    """

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
        """The reply line (without its newline) to one agent check request."""
        index = agent_request_index(line)
        if index is not None:
            try:
                return self._answer(index)
            except (KeyError, IndexError):
                pass
        log.warning("agent check for an unknown server %r", line[:40])
        return "down"
