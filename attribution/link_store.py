"""Links in Redis (`og:links`), written by the CLI and the admin API alike.

Every write goes through save_link.lua: the hash and the `og:links:changed`
message change together, so no worker can miss a change it should apply.
Pause and resume are compare-and-swap (the link read, changed, and saved
only if nobody changed it meanwhile; retried), so two admins at once can
each lose the race but never undo the other's change. `LinkOps` decides;
the sync (CLI) and async (worker) stores only run its Redis calls.
"""

from __future__ import annotations

from pathlib import Path

import redis
import redis.asyncio as aioredis

from attribution import keys
from attribution.links import Link, LinkError

SAVE_LINK_LUA = (Path(__file__).parent / "save_link.lua").read_text()
SWAP_TRIES = 5


class LinkExists(LinkError):
    def __init__(self, code: str) -> None:
        super().__init__("code", f"a link {code!r} exists already")


class UnknownLink(LinkError):
    def __init__(self, code: str) -> None:
        super().__init__("code", f"no link {code!r}")


class LinkConflict(RuntimeError):
    """The link kept changing under a pause or resume (SWAP_TRIES times)."""


def parse_all(raw: dict) -> tuple[dict[str, Link], list[str]]:
    """HGETALL og:links as links by code, and the codes whose stored JSON is not a link."""
    links: dict[str, Link] = {}
    bad: list[str] = []
    for code, value in raw.items():
        name = code.decode() if isinstance(code, bytes) else code
        try:
            links[name] = Link.from_json(value)
        except LinkError:
            bad.append(name)
    return links, bad


def _save_args(link: Link, previous: bytes | None) -> list:
    if previous is None:
        return [link.code, link.to_json(), keys.LINKS_CHANGED, "new", ""]
    return [link.code, link.to_json(), keys.LINKS_CHANGED, "swap", previous]


class LinkStore:
    """Synchronous, for the CLI."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._save = client.register_script(SAVE_LINK_LUA)

    def add(self, link: Link) -> None:
        if not self._save(keys=[keys.LINKS], args=_save_args(link, None)):
            raise LinkExists(link.code)

    def set_active(self, code: str, active: bool) -> Link:
        for _ in range(SWAP_TRIES):
            raw = self.client.hget(keys.LINKS, code)
            if raw is None:
                raise UnknownLink(code)
            link = Link.from_json(raw).with_active(active)
            if self._save(keys=[keys.LINKS], args=_save_args(link, raw)):
                return link
        raise LinkConflict(f"link {code!r} kept changing; try again")

    def all(self) -> dict[str, Link]:
        return parse_all(self.client.hgetall(keys.LINKS))[0]


class AsyncLinkStore:
    """The same for a worker's admin API."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._save = client.register_script(SAVE_LINK_LUA)

    async def add(self, link: Link) -> None:
        if not await self._save(keys=[keys.LINKS], args=_save_args(link, None)):
            raise LinkExists(link.code)

    async def set_active(self, code: str, active: bool) -> Link:
        for _ in range(SWAP_TRIES):
            raw = await self.client.hget(keys.LINKS, code)
            if raw is None:
                raise UnknownLink(code)
            link = Link.from_json(raw).with_active(active)
            if await self._save(keys=[keys.LINKS], args=_save_args(link, raw)):
                return link
        raise LinkConflict(f"link {code!r} kept changing; try again")

    async def all(self) -> dict[str, Link]:
        return parse_all(await self.client.hgetall(keys.LINKS))[0]
