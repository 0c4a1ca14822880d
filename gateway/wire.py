"""WebSocket data frames built once, for writes that bypass per-send overhead.

Server-to-client frames are never masked (RFC 6455 §5.1), so a frame's bytes
depend only on its payload: the gateway builds them itself and writes them
to the transport in one call, with no coroutine and no lock per delivery.
Only used on connections without extensions; a connection that negotiated
compression goes through websockets' own framing.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81  # FIN + opcode 0x1 (RFC 6455 §5.2)


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying `payload` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN_TEXT, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _FIN_TEXT, 126, n) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, n) + payload
