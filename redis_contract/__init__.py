"""The Redis contract of a topic (PROTOCOL.md §7): its keys, scripts and lifetime.

The one owner of what a topic looks like in Redis, a package of its own so
that publishers (feed/, any aggregator) and workers (gateway/broker.py) take
it from the same place without either importing the other.

Keys. Every key of a topic carries the topic in a hash tag, so the three keys
one publish touches live in one slot (Redis Cluster) and one Lua script may
use them. The pub/sub channel is the topic name itself.

- `og:{T}:meta`   hash: `epoch` (created by the first publish), `seq`
                  (incremented per publish)
- `og:{T}:hist`   stream: one entry per event (`s` = seq, `e` = event JSON),
                  trimmed by time, so its entries are contiguous in seq
- `og:{T}:latest` hash: market -> newest event JSON of that market

Writes. Only `publish.lua` writes, and it writes all three keys in one
atomic step. Reads (`load_state.lua`, `read_since.lua`) never write: a
worker can be asked about any of the 10^36 grammatical topics by anyone, and
a read that created keys let one client fill Redis (Hardening, point 6).

Lifetime, one policy for all three keys: every publish sets their expiry to
`topic_ttl_ms` after it (0: never expire, and any older expiry is removed).
A live topic therefore never loses its seq space; one nobody published to
for that long is forgotten whole, and its next publish starts a new epoch,
which followers see as `reset` and a fresh snapshot. (Reads used to give a
never-published topic's meta a 24 h expiry that no publish cleared, so a live
topic lost its history and state a day after its first subscriber.)

A topic with no seq space (never published, or expired) reads as epoch
`UNPUBLISHED_EPOCH`, seq 0, no markets: a snapshot that names a seq space a
client can hold and resume from, and that holds nothing. The first publish
moves the topic to its real epoch; players following it get `reset`
(reason `epoch`) and the snapshot of the new epoch, as for any epoch change.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

PUBLISH_LUA = (_HERE / "publish.lua").read_text()
LOAD_STATE_LUA = (_HERE / "load_state.lua").read_text()
READ_SINCE_LUA = (_HERE / "read_since.lua").read_text()

# The epoch of a topic with no seq space: seq 0 and no markets. Never made by
# `feed.publisher.new_epoch`, whose names start with "r".
UNPUBLISHED_EPOCH = "0"

DEFAULT_TOPIC_TTL_MS = 7 * 86_400_000  # a week without a publish forgets a topic

# The region's aggregator sets this key, with an expiry of the region's
# `stale_after_ms`, each time its input advances; workers watch it for
# `/healthz` (PROTOCOL.md §8). It exists exactly while the region publishes.
REGION_ALIVE_KEY = "og:region:alive"


def meta_key(topic: str) -> str:
    return f"og:{{{topic}}}:meta"


def history_key(topic: str) -> str:
    return f"og:{{{topic}}}:hist"


def latest_key(topic: str) -> str:
    return f"og:{{{topic}}}:latest"


def topic_keys(topic: str) -> list[str]:
    """In the order `publish.lua` takes them."""
    return [meta_key(topic), history_key(topic), latest_key(topic)]
