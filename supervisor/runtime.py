"""Where a node keeps its private files, and the Redis it runs when none is given."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from gateway.config import Settings
from supervisor.embedded_redis import EmbeddedRedis


def runtime_dir(settings: Settings) -> Path:
    """OG_RUNTIME_DIR, else $XDG_RUNTIME_DIR/oddsgate, else /tmp/oddsgate-$UID (0700)."""
    if settings.runtime_dir:
        path = Path(settings.runtime_dir)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "oddsgate"
    else:
        path = Path(f"/tmp/oddsgate-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """The Redis URL to use: the configured one, or an embedded server's for the block."""
    if settings.redis_url:
        yield settings.redis_url
        return
    with EmbeddedRedis(runtime_dir(settings) / "redis") as embedded:
        yield embedded.url
