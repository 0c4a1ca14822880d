"""Session tokens (PROTOCOL.md §2): HS256 JWTs with `sub`, `sid` and `exp`.

PyJWT does the verification (signature, algorithm pinning, expiry with
leeway, required claims), which is where hand-written token code usually
goes wrong. A token may also carry `topics`, a list of topic prefixes the
player may follow; without it, every odds topic is allowed. A partner's
token carries `partner` (PROTOCOL.md §12): its session may follow its own
`stats:{partner}` topic, and odds topics only where `topics` names them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from gateway.topics import STATS_PREFIX, is_partner_id

COOKIE_NAME = "og_session"
QUERY_PARAM = "token"


class AuthError(Exception):
    """Why a token was refused, in words safe to show the client."""


@dataclass(frozen=True, slots=True)
class Claims:
    player: str
    session_id: str
    expires_at: float | None  # Unix seconds; None for anonymous players
    topic_prefixes: tuple[str, ...] | None
    partner: str | None = None  # a partner's session (PROTOCOL.md §12)

    @property
    def anonymous(self) -> bool:
        return self.expires_at is None

    def allows(self, topic: str) -> bool:
        return topic_granted(self.topic_prefixes, topic, self.partner)


def topic_granted(grants: tuple[str, ...] | None, topic: str,
                  partner: str | None = None) -> bool:
    """Whether a token's grants cover `topic`: the one rule of every transport.

    A `stats:` topic is granted to exactly the session of its partner
    (`stats:{partner}`), whatever `topics` says: a partner's figures are its
    own, and a grant like `stats:` must not open every partner's. A partner's
    session gets odds topics only where its `topics` claim names them (its
    token is for statistics, not a player's session with every market).

    A grant covers the topic it names and the topics under it, matched by
    whole ids: `odds:1:39` covers `odds:1:39` and `odds:1:39:7`, never
    `odds:1:390`; `odds:1:` covers every topic of sport 1. An empty grant
    covers nothing (a plain string prefix would make `""` cover everything).
    No `topics` claim (None) allows every odds topic to a player's session.
    """
    if topic.startswith(STATS_PREFIX):
        return partner is not None and topic == STATS_PREFIX + partner
    if grants is None:
        return partner is None
    for grant in grants:
        if not grant:
            continue
        if topic == grant or topic.startswith(grant if grant.endswith(":") else grant + ":"):
            return True
    return False


ANONYMOUS = Claims("anonymous", "", None, None)


class TokenVerifier:
    def __init__(self, secret: str, *, leeway_s: float = 5.0, allow_anonymous: bool = False):
        self._secret = secret
        self._leeway = leeway_s
        self.allow_anonymous = allow_anonymous

    def verify(self, token: str | None) -> Claims:
        """Claims of a valid token; anonymous claims when allowed and no token came."""
        if not token:
            if self.allow_anonymous:
                return ANONYMOUS
            raise AuthError("missing session token")
        if not self._secret:
            raise AuthError("tokens are not accepted on this server")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                leeway=self._leeway,
                options={"require": ["exp", "sub", "sid"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("session token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid session token: {exc}") from None
        prefixes = claims.get("topics")
        if prefixes is not None and (
            not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes)
        ):
            raise AuthError("invalid session token: `topics` must be a list of strings")
        partner = claims.get("partner")
        if partner is not None and not is_partner_id(partner):
            raise AuthError("invalid session token: `partner` must be 1-32 of [A-Za-z0-9_-]")
        return Claims(
            str(claims["sub"]),
            str(claims["sid"]),
            float(claims["exp"]),
            tuple(prefixes) if prefixes is not None else None,
            partner,
        )


def issue_token(secret: str, player: str, session_id: str, ttl_s: float = 3600.0,
                topics: list[str] | None = None, partner: str | None = None) -> str:
    """A token as the sportsbook's login service would mint it (demo, tests, bench).

    `partner` makes it a partner session (PROTOCOL.md §12): the claim names the
    partner whose `stats:{partner}` topic the session may follow.
    """
    claims: dict = {"sub": player, "sid": session_id, "exp": int(time.time() + ttl_s)}
    if topics is not None:
        claims["topics"] = topics
    if partner is not None:
        if not is_partner_id(partner):
            raise ValueError(f"partner id {partner!r}: expected 1-32 of [A-Za-z0-9_-]")
        claims["partner"] = partner
    return jwt.encode(claims, secret, algorithm="HS256")


def token_from_request(cookie_headers: list[str], query: dict[str, list[str]]) -> str | None:
    """The `og_session` cookie, else the `token` query parameter."""
    for header in cookie_headers:
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name == COOKIE_NAME and value:
                return value.strip('"')
    values = query.get(QUERY_PARAM)
    return values[0] if values else None
