"""Tracking links: what one is, how it is checked, and where its redirect goes (§9).

A link is a plain value: checked when made (`Link.create`, `LinkError`
naming the field), stored as canonical JSON (`to_json`: sorted keys, no
spaces, so the same link is the same bytes whoever wrote it), and turned
into a `Location` by `destination()`, which never awaits.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from urllib.parse import unquote_plus, urlencode, urlsplit, urlunsplit

import orjson

CODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PARAM = re.compile(r"[A-Za-z0-9_.-]{1,32}")
# partner ids follow the session-token claim `partner` (stats:{partner} topics)
PARTNER = re.compile(r"[A-Za-z0-9_-]{1,32}")
LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_URL = 2048
SUB_IDS = ("sub1", "sub2", "sub3", "sub4", "sub5")
MAX_SUB_ID = 256  # longer sub-ids are cut, so one click cannot bloat its record
DEFAULT_CLICK_PARAM = "ogclid"


class LinkError(ValueError):
    """A link field with a value no link may have; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Link:
    code: str
    partner: str
    campaign: str
    creative: str
    url: str
    click_param: str = DEFAULT_CLICK_PARAM
    subids: bool = False
    active: bool = True

    @classmethod
    def create(cls, code: object, partner: object, campaign: object, creative: object,
               url: object, click_param: object = DEFAULT_CLICK_PARAM,
               subids: object = False, active: object = True) -> Link:
        """A checked link; LinkError naming the first bad field."""
        _check(CODE, "code", code, "1-64 of A-Z a-z 0-9 _ -")
        _check(PARTNER, "partner", partner, "1-32 of A-Z a-z 0-9 _ -")
        _check(LABEL, "campaign", campaign, "1-64 of A-Z a-z 0-9 _ . : -")
        _check(LABEL, "creative", creative, "1-64 of A-Z a-z 0-9 _ . : -")
        _check(PARAM, "click_param", click_param, "1-32 of A-Z a-z 0-9 _ . -")
        if click_param in SUB_IDS:
            raise LinkError("click_param", f"{click_param} is a sub-id parameter")
        if not isinstance(subids, bool):
            raise LinkError("subids", "must be true or false")
        if not isinstance(active, bool):
            raise LinkError("active", "must be true or false")
        check_url(url)
        return cls(code, partner, campaign, creative, url,  # type: ignore[arg-type]
                   click_param, subids, active)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: object) -> Link:
        if not isinstance(data, dict):
            raise LinkError("link", "must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise LinkError(sorted(unknown)[0], "unknown field")
        for name in ("code", "partner", "campaign", "creative", "url"):
            if name not in data:
                raise LinkError(name, "required")
        return cls.create(**data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Link:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise LinkError("link", "not JSON") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)

    def with_active(self, active: bool) -> Link:
        return replace(self, active=active)

    def destination(self, click_id: str, query: dict[str, list[str]]) -> str:
        """The redirect's Location: the URL with the click id and, if allowed, sub1..sub5.

        Parameters the destination already has stay; one named like the click
        parameter or a passed sub-id is replaced, so a tracking URL cannot
        smuggle a second click id. Other parameters of the tracking URL are
        never passed on.
        """
        parts = urlsplit(self.url)
        ours = {self.click_param}
        added = [(self.click_param, click_id)]
        if self.subids:
            for name in SUB_IDS:
                values = query.get(name)
                if values:
                    added.append((name, values[0][:MAX_SUB_ID]))
                    ours.add(name)
        # the destination's own parameters keep their exact bytes
        kept = [piece for piece in parts.query.split("&")
                if piece and unquote_plus(piece.split("=", 1)[0]) not in ours]
        query_string = "&".join([*kept, urlencode(added)])
        return urlunsplit(parts._replace(query=query_string))

    def subs(self, query: dict[str, list[str]]) -> dict[str, str]:
        """The sub-ids a click records: those passed on (none when the link drops them)."""
        if not self.subids:
            return {}
        return {name: query[name][0][:MAX_SUB_ID] for name in SUB_IDS if query.get(name)}


def check_url(url: object) -> None:
    """An absolute http(s) URL with a host, no credentials, no fragment, no spaces."""
    if not isinstance(url, str) or not url:
        raise LinkError("url", "required, a string")
    if len(url) > MAX_URL:
        raise LinkError("url", f"longer than {MAX_URL} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise LinkError("url", "contains spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise LinkError("url", f"not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise LinkError("url", "must be http:// or https://")
    if not parts.hostname:
        raise LinkError("url", "has no host")
    if parts.username is not None or parts.password is not None:
        raise LinkError("url", "must not carry credentials")
    if parts.fragment:
        raise LinkError("url", "must not have a #fragment (the click id goes in the query)")


def _check(pattern: re.Pattern[str], field: str, value: object, rule: str) -> None:
    if not isinstance(value, str):
        raise LinkError(field, f"required, a string of {rule}")
    if not pattern.fullmatch(value):
        raise LinkError(field, f"{value[:80]!r} is not {rule}")
