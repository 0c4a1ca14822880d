"""WebSocket ping and pong frames against a real worker (Hardening, point 8).

A raw socket plays the attacker: it completes the upgrade, then speaks only
control frames. Pings are charged to the connection's request budget (the
worker answers each with a pong, so a flood cost it a core and hundreds of MB
of queued pongs); only the pong of the worker's own heartbeat ping keeps a
connection alive.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

import orjson

from tests.conftest import token

PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


def _frame(opcode: int, payload: bytes = b"") -> bytes:
    """A client frame: masked (with a zero key, which leaves the payload as is)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?token={token()} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _read_frames(sock: socket.socket, seconds: float) -> tuple[list[tuple[int, bytes]], bool]:
    """Every frame the worker sends within `seconds`, and whether it closed the connection."""
    buf = b""
    closed = False
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        buf += chunk
    frames = []
    while len(buf) >= 2:
        length, at = buf[1] & 0x7F, 2
        if length == 126:
            length, at = struct.unpack("!H", buf[2:4])[0], 4
        elif length == 127:
            length, at = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < at + length:
            break
        frames.append((buf[0] & 0x0F, buf[at : at + length]))
        buf = buf[at + length :]
    return frames, closed or any(op == CLOSE for op, _ in frames)


def test_a_ping_flood_is_closed_after_its_budget(worker_factory) -> None:
    worker = worker_factory(OG_RATE_LIMIT_RPS="20", OG_RATE_LIMIT_BURST="40",
                            OG_RATE_LIMIT_CLOSE_AFTER="20")
    attacker = _open(worker.port)
    attacker.sendall(_frame(PING, b"x" * 125) * 5000)  # and reads nothing meanwhile
    frames, closed = _read_frames(attacker, 5.0)  # until the worker closes it
    attacker.close()
    pongs = sum(1 for op, _ in frames if op == PONG)
    assert closed
    assert pongs <= 40 + 5, pongs  # the burst, and what refilled meanwhile; then none
    close = [payload for op, payload in frames if op == CLOSE]
    if close:  # the close frame may be lost to the abort that follows it
        assert struct.unpack("!H", close[0][:2])[0] == 4429
    # The worker is unharmed: a player connects and is served at once.
    player = _open(worker.port)
    frames, _ = _read_frames(player, 0.5)
    assert orjson.loads(frames[0][1])["type"] == "welcome"
    player.close()


def test_pings_within_the_budget_are_answered(worker_factory) -> None:
    worker = worker_factory(OG_RATE_LIMIT_RPS="20", OG_RATE_LIMIT_BURST="40")
    player = _open(worker.port)
    for i in range(10):
        player.sendall(_frame(PING, b"p%d" % i))
    frames, closed = _read_frames(player, 1.0)
    player.close()
    assert not closed
    assert [p for op, p in frames if op == PONG] == [b"p%d" % i for i in range(10)]


def test_unsolicited_pongs_do_not_keep_a_dead_peer_alive(worker_factory) -> None:
    """Regression: any pong counted as the answer to the heartbeat's ping."""
    worker = worker_factory(OG_HEARTBEAT_MS="300")
    peer = _open(worker.port)
    deadline = time.monotonic() + 5
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            peer.sendall(_frame(PONG, b"alive"))  # never the ping's own data
        except OSError:
            closed = True
            break
        _, closed = _read_frames(peer, 0.1)
    peer.close()
    assert closed


def test_a_peer_answering_the_heartbeat_stays(worker_factory) -> None:
    worker = worker_factory(OG_HEARTBEAT_MS="300")
    peer = _open(worker.port)
    deadline = time.monotonic() + 2.0
    answered = 0
    while time.monotonic() < deadline:
        frames, closed = _read_frames(peer, 0.1)
        assert not closed
        for op, payload in frames:
            if op == PING:
                peer.sendall(_frame(PONG, payload))
                answered += 1
    peer.close()
    assert answered >= 3
