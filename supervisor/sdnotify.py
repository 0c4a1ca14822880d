"""systemd's readiness protocol (sd_notify(3)), for `Type=notify` units.

deploy/systemd/oddsgate.service runs `oddsgate run` as Type=notify: systemd
counts the node started once the supervisor says `READY=1`, which it does
when every worker has come up (or been given up on) and HAProxy listens, so
`systemctl start` returns when players can connect, and a unit ordered
after oddsgate starts against a node that serves. `STATUS=` lines show in
`systemctl status`; `STOPPING=1` marks the drain that SIGTERM starts.

The protocol is one datagram per message to the AF_UNIX socket named by
$NOTIFY_SOCKET (a leading `@` is the abstract namespace). The variable is
taken out of the environment when read, as sd_notify's `unset_environment`
does: the workers, HAProxy and Redis inherit the supervisor's environment,
and none of them is the service's main process. Without the variable (not
under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("oddsgate.sdnotify")

ENV = "NOTIFY_SOCKET"


class Notifier:
    """Messages to systemd's notification socket, if this process was given one."""

    def __init__(self, address: str | None, status_interval_s: float = 1.0) -> None:
        self.address = address
        self.status_interval_s = status_interval_s
        self._last_status = ""
        self._status_at = -math.inf

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        """The socket in $NOTIFY_SOCKET, which is removed so children do not inherit it."""
        env = os.environ if env is None else env
        return cls(env.pop(ENV, None) or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `READY=1`, `STATUS=...` and the like in one datagram; whether it went."""
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(assignments).encode())
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def status(self, text: str) -> None:
        """`STATUS=text` when it changed, at most once per `status_interval_s`."""
        now = time.monotonic()
        if text == self._last_status or now - self._status_at < self.status_interval_s:
            return
        if self.send(f"STATUS={text}"):
            self._last_status, self._status_at = text, now
