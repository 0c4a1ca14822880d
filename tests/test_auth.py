"""Session tokens (gateway/auth.py, PROTOCOL.md §2): HS256 JWTs with sub, sid, exp."""

from __future__ import annotations

import time

import jwt
import pytest

from gateway.auth import (
    ANONYMOUS,
    COOKIE_NAME,
    QUERY_PARAM,
    AuthError,
    Claims,
    TokenVerifier,
    issue_token,
    token_from_request,
)

SECRET = "unit-test-secret-of-oddsgate-at-least-64-bytes-long-for-hs512-xx"
OTHER_SECRET = "another-secret-nobody-at-oddsgate-has-ever-used-anywhere-at-all!"


def signed(claims: dict, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def good_claims(**changes: object) -> dict:
    claims: dict = {"sub": "p1", "sid": "s1", "exp": int(time.time()) + 3600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def refused(verifier: TokenVerifier, token: str | None, words: str | None = None) -> AuthError:
    with pytest.raises(AuthError, match=words) as info:
        verifier.verify(token)
    return info.value


VERIFIER = TokenVerifier(SECRET)


# -- valid tokens ------------------------------------------------------------------


def test_valid_token_gives_its_claims() -> None:
    before = time.time()
    claims = VERIFIER.verify(issue_token(SECRET, "player-7", "sess-9", ttl_s=600))
    assert (claims.player, claims.session_id, claims.topic_prefixes) == ("player-7", "sess-9",
                                                                         None)
    assert claims.expires_at is not None
    assert before + 598 <= claims.expires_at <= time.time() + 601
    assert claims.anonymous is False


def test_topics_claim_becomes_the_prefixes() -> None:
    token = issue_token(SECRET, "p1", "s1", topics=["odds:1:", "odds:2:12:"])
    assert VERIFIER.verify(token).topic_prefixes == ("odds:1:", "odds:2:12:")


def test_empty_topics_claim_allows_nothing_rather_than_everything() -> None:
    assert VERIFIER.verify(signed(good_claims(topics=[]))).topic_prefixes == ()


def test_token_within_the_leeway_is_accepted() -> None:
    verifier = TokenVerifier(SECRET, leeway_s=30)
    claims = verifier.verify(signed(good_claims(exp=int(time.time()) - 10)))
    assert claims.player == "p1"


# -- refused tokens ------------------------------------------------------------------


def test_token_expired_beyond_the_leeway_is_refused() -> None:
    verifier = TokenVerifier(SECRET, leeway_s=5)
    refused(verifier, signed(good_claims(exp=int(time.time()) - 60)), "expired")


def test_token_signed_with_another_secret_is_refused() -> None:
    refused(VERIFIER, signed(good_claims(), secret=OTHER_SECRET), "invalid")


def test_token_with_a_tampered_payload_is_refused() -> None:
    head, _, sig = signed(good_claims(sub="p1")).split(".")
    other_payload = signed(good_claims(sub="admin")).split(".")[1]
    refused(VERIFIER, f"{head}.{other_payload}.{sig}", "invalid")


def test_unsigned_alg_none_token_is_refused() -> None:
    token = jwt.encode(good_claims(), None, algorithm="none")
    refused(VERIFIER, token, "invalid")


def test_hs512_token_is_refused_even_with_the_right_secret() -> None:
    refused(VERIFIER, signed(good_claims(), algorithm="HS512"), "invalid")


@pytest.mark.parametrize("claim", ["exp", "sub", "sid"])
def test_token_missing_a_required_claim_is_refused(claim: str) -> None:
    claims = good_claims()
    del claims[claim]
    error = refused(VERIFIER, signed(claims), "invalid")
    assert claim in str(error)


@pytest.mark.parametrize("topics", ["odds:1:", {"odds:1:": True}, 5, ["odds:1:", 5], [None]])
def test_topics_claim_that_is_not_a_list_of_strings_is_refused(topics: object) -> None:
    refused(VERIFIER, signed(good_claims(topics=topics)), "topics")


def test_partner_claim_becomes_the_sessions_partner() -> None:
    claims = VERIFIER.verify(issue_token(SECRET, "u1", "s1", partner="aff_42-x"))
    assert claims.partner == "aff_42-x"
    assert claims.allows("stats:aff_42-x") and not claims.allows("stats:aff_43")
    assert not claims.allows("odds:1:39:1")  # a partner's session is not a player's
    assert VERIFIER.verify(issue_token(SECRET, "u1", "s1")).partner is None


@pytest.mark.parametrize("partner", ["", "a b", "x" * 33, 42, ["p"], "p:1"])
def test_partner_claim_that_is_not_a_partner_id_is_refused(partner: object) -> None:
    refused(VERIFIER, signed(good_claims(partner=partner)), "partner")


def test_issue_token_refuses_a_bad_partner_id() -> None:
    with pytest.raises(ValueError, match="partner"):
        issue_token(SECRET, "u1", "s1", partner="no/slash")


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "e30.e30.", "...."])
def test_malformed_token_is_refused(token: str) -> None:
    refused(VERIFIER, token, "invalid")


def test_refusal_message_does_not_leak_the_secret() -> None:
    error = refused(VERIFIER, signed(good_claims(), secret=OTHER_SECRET))
    assert SECRET not in str(error) and OTHER_SECRET not in str(error)


# -- anonymous players -------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_no_token_is_anonymous_when_allowed(token: str | None) -> None:
    claims = TokenVerifier(SECRET, allow_anonymous=True).verify(token)
    assert claims is ANONYMOUS
    assert claims.anonymous is True
    assert claims.topic_prefixes is None


@pytest.mark.parametrize("token", [None, ""])
def test_no_token_is_refused_when_anonymous_is_not_allowed(token: str | None) -> None:
    refused(TokenVerifier(SECRET), token, "missing")


def test_a_bad_token_is_refused_even_when_anonymous_is_allowed() -> None:
    verifier = TokenVerifier(SECRET, allow_anonymous=True)
    refused(verifier, signed(good_claims(), secret=OTHER_SECRET), "invalid")


def test_server_without_a_secret_refuses_every_token() -> None:
    verifier = TokenVerifier("", allow_anonymous=True)
    refused(verifier, issue_token(SECRET, "p1", "s1"), "not accepted")
    assert verifier.verify(None) is ANONYMOUS


def test_claims_anonymous_follows_expiry() -> None:
    assert Claims("p", "s", None, None).anonymous
    assert not Claims("p", "s", 1.0, None).anonymous


# -- token_from_request -----------------------------------------------------------


def test_names_are_the_protocol_ones() -> None:
    assert (COOKIE_NAME, QUERY_PARAM) == ("og_session", "token")


def test_token_from_the_cookie() -> None:
    assert token_from_request(["og_session=abc"], {}) == "abc"


def test_token_from_the_cookie_among_other_cookies() -> None:
    assert token_from_request(["lang=en; og_session=abc; theme=dark"], {}) == "abc"
    assert token_from_request(["lang=en", "og_session=abc"], {}) == "abc"


def test_token_from_a_quoted_cookie() -> None:
    assert token_from_request(['og_session="abc"'], {}) == "abc"


def test_cookie_value_keeps_equal_signs() -> None:
    assert token_from_request(["og_session=ab=="], {}) == "ab=="


def test_cookies_with_similar_names_are_not_the_token() -> None:
    headers = ["xog_session=nope; og_session_old=nope; og_sessions=nope"]
    assert token_from_request(headers, {}) is None


def test_empty_cookie_falls_back_to_the_query() -> None:
    assert token_from_request(["og_session="], {"token": ["q"]}) == "q"


def test_token_from_the_query() -> None:
    assert token_from_request([], {"token": ["t1", "t2"]}) == "t1"
    assert token_from_request(["lang=en"], {"token": ["t1"]}) == "t1"


def test_cookie_is_preferred_over_the_query() -> None:
    assert token_from_request(["og_session=from-cookie"], {"token": ["from-query"]}) == (
        "from-cookie"
    )


def test_no_token_anywhere_is_none() -> None:
    assert token_from_request([], {}) is None
    assert token_from_request([""], {"token": []}) is None


def test_a_token_from_the_cookie_verifies() -> None:
    token = issue_token(SECRET, "p1", "s1")
    assert VERIFIER.verify(token_from_request([f"a=b; og_session={token}"], {})).player == "p1"


def test_issue_token_partner_claim() -> None:
    """A partner session (PROTOCOL.md §12) carries `partner`; a player's carries none."""
    partner = jwt.decode(issue_token(SECRET, "p1", "s1", partner="acme_7"), SECRET,
                         algorithms=["HS256"])
    assert partner["partner"] == "acme_7"
    player = jwt.decode(issue_token(SECRET, "p1", "s1"), SECRET, algorithms=["HS256"])
    assert "partner" not in player
