"""What one small write over loopback costs this machine: the floor under every server.

A delivery leaves a server as (at least) one `send()` of a small WebSocket
frame, and over loopback the sender's system call also runs the receiver's
TCP input and wakes the process waiting on it. This measures that cost with
no server at all: one process sends 250-byte messages round-robin over
`SOCKETS` connections, in bursts, to another process that waits in epoll and
reads them, and reports the sender's CPU time per send. Its inverse is the
most frames per CPU-second any server (in any language) can write here; a
figure of deliveries per CPU-second above it needs several events per frame.
"""

from __future__ import annotations

import multiprocessing
import selectors
import socket
import time

SOCKETS = 200
BURSTS = 40
MESSAGE = b"x" * 250


def _reader(conns: list[socket.socket], expected: int) -> None:
    sel = selectors.DefaultSelector()
    for conn in conns:
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
    got = 0
    while got < expected:
        for key, _ in sel.select(5):
            data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            if not data:
                return
            got += len(data)


def loopback_send_cost_us() -> float | None:
    """CPU microseconds the sender spends per small send to an epoll-waiting reader."""
    try:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(SOCKETS)
        senders, receivers = [], []
        for _ in range(SOCKETS):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            senders.append(server)
            receivers.append(client)
        ctx = multiprocessing.get_context("fork")
        proc = ctx.Process(target=_reader, args=(receivers, SOCKETS * BURSTS * len(MESSAGE)),
                           daemon=True)
        proc.start()
        for conn in receivers:
            conn.close()
        time.sleep(0.2)
        cpu = time.process_time()
        for _ in range(BURSTS):
            for conn in senders:
                conn.send(MESSAGE)
            time.sleep(0.005)  # let the reader go back to waiting, as players do
        spent = time.process_time() - cpu
        proc.join(10)
        for conn in senders:
            conn.close()
        listener.close()
        return round(spent / (SOCKETS * BURSTS) * 1e6, 2)
    except OSError:
        return None
