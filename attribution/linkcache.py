"""Every worker's copy of the links, so a redirect looks its link up without Redis.

Plain: the worker's shell feeds it `og:links:changed` messages (each the
changed link's JSON) and, at start and after every reconnect to Redis (when
messages may have been missed), the whole hash. A message that arrives
while a reload is in flight may be newer than what the reload read (the
two come over different connections), so it is applied again after the
reload's contents replace the cache.
"""

from __future__ import annotations

import logging

from attribution.link_store import parse_all
from attribution.links import Link, LinkError

log = logging.getLogger("oddsgate.links")


class LinkCache:
    def __init__(self) -> None:
        self.links: dict[str, Link] = {}
        self.loaded = False  # a first reload completed: a missing code is unknown
        self._reloading = 0
        self._during_reload: list[bytes] = []
        self.bad_messages = 0

    def get(self, code: str) -> Link | None:
        return self.links.get(code)

    def apply(self, message: bytes) -> None:
        """One `og:links:changed` message: the changed link's canonical JSON."""
        try:
            link = Link.from_json(message)
        except LinkError as exc:
            self.bad_messages += 1
            log.warning("ignored a link change that is not a link: %s", exc)
            return
        self.links[link.code] = link
        if self._reloading:
            self._during_reload.append(message)

    def begin_reload(self) -> None:
        self._reloading += 1

    def finish_reload(self, raw: dict) -> None:
        """The whole `og:links` hash as read by the reload begun last."""
        links, bad = parse_all(raw)
        if bad:
            log.warning("og:links holds %d entries that are not links: %s", len(bad),
                        ", ".join(bad[:5]))
        self._reloading = max(0, self._reloading - 1)
        later, self._during_reload = self._during_reload, []
        self.links = links
        self.loaded = True
        for message in later:
            self.apply(message)

    def abandon_reload(self) -> None:
        self._reloading = max(0, self._reloading - 1)
        if not self._reloading:
            self._during_reload = []
