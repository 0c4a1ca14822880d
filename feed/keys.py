"""Redis key layout of the publish contract (PROTOCOL.md §7).

Every key of a topic carries the topic in a hash tag, so the three keys one
publish touches live in one slot (Redis Cluster) and one Lua script may use
them. The pub/sub channel is the topic name itself.

- `og:{T}:meta`   hash: `epoch` (created once), `seq` (incremented per publish)
- `og:{T}:hist`   stream: one entry per event (`s` = seq, `e` = event JSON),
                  trimmed by time, so its entries are contiguous in seq
- `og:{T}:latest` hash: market -> newest event JSON of that market
"""

from __future__ import annotations


def meta_key(topic: str) -> str:
    return f"og:{{{topic}}}:meta"


def history_key(topic: str) -> str:
    return f"og:{{{topic}}}:hist"


def latest_key(topic: str) -> str:
    return f"og:{{{topic}}}:latest"


def topic_keys(topic: str) -> list[str]:
    """In the order every script of the contract takes them."""
    return [meta_key(topic), history_key(topic), latest_key(topic)]
