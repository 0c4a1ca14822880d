"""Child processes a module started, stopped when this process exits.

The embedded Redis and HAProxy are children of whoever started them; an
exit that forgets them leaves an orphan holding a port. Each launcher keeps
its running children in one `ChildRegistry`: `stop_all` runs at exit, in the
process that started them only. A forked process inherits the registry but
not the children, so it starts with an empty one (and a fresh lock, which
another thread may have held at fork time).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ChildRegistry(Generic[T]):
    def __init__(self, stop: Callable[[T], None]) -> None:
        self._stop = stop
        self._running: dict[T, int] = {}  # child -> pid of the process that started it
        self._lock = threading.Lock()
        atexit.register(self.stop_all)
        os.register_at_fork(after_in_child=self._forget)

    def add(self, child: T) -> None:
        with self._lock:
            self._running[child] = os.getpid()

    def discard(self, child: T) -> None:
        with self._lock:
            self._running.pop(child, None)

    def stop_all(self) -> None:
        """Stop every child this process started (never a parent's)."""
        with self._lock:
            mine = [c for c, pid in self._running.items() if pid == os.getpid()]
        for child in mine:
            with contextlib.suppress(Exception):
                self._stop(child)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._running.clear()
