"""The control socket deploy scripts talk to, and the client side of it.

A unix stream socket (mode 0600) in the node's runtime dir; one JSON object
per line each way. Requests: `{"cmd":"status"}`, `{"cmd":"drain",
"worker":N|"all","wait":bool,"timeout":S}`, `{"cmd":"undrain","worker":..}`,
`{"cmd":"reload","timeout":S}`. Replies: `{"ok":true,...}` or
`{"ok":false,"error":"..."}`. A `wait` request holds its reply until the
work is done or its timeout passed (`"ok":false,"timed_out":true`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

log = logging.getLogger("oddsgate.control")

Handler = Callable[[dict], Awaitable[dict]]
MAX_REQUEST_BYTES = 64 * 1024


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600, never briefly wider
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                request = orjson.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                reply = await self._handler(request)
            except (orjson.JSONDecodeError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            except Exception as exc:  # a failing command must not kill the supervisor
                log.exception("control command failed")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            writer.write(orjson.dumps(reply) + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()


class ControlUnavailable(ConnectionError):
    """No supervisor answers on the socket (not running, or another runtime dir)."""


def request(path: Path, command: dict, timeout: float = 30.0) -> dict:
    """Send one command and wait for its reply (blocking; the CLI's side)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(f"no supervisor on {path} ({exc.strerror})") from None
        sock.sendall(orjson.dumps(command) + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        if not chunks:
            raise ControlUnavailable(f"the supervisor on {path} closed without a reply")
        return orjson.loads(b"".join(chunks))
    finally:
        sock.close()
