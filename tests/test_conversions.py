"""Conversions without Redis or sockets (attribution/conversions.py, operator_keys.py):
every validation error by field, the attribution decisions, the answer and the record."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest
from ulid import ULID

from attribution.clickid import _mac, mint
from attribution.conversions import (
    Attribution,
    Conversion,
    ConversionError,
    Reason,
    attribute,
    check_click_id,
    outcome,
    reference_ns,
)
from attribution.operator_keys import (
    MISS_REFRESH_S,
    REFRESH_S,
    KeyCache,
    bearer_key,
    check_name,
    key_hash,
    new_key,
)
from attribution.settings import ClickKeys

KEYS = ClickKeys.parse("k1:click-secret-of-the-suite-0001")
NOW_NS = 1_763_800_000_123_456_789
DAY_NS = 86_400 * 10**9
WINDOW_S = 30 * 86_400

GOOD = {"id": "op-77812", "click_id": "c", "type": "ftd", "player": "p-991",
        "amount": "25.00", "currency": "EUR", "ts": NOW_NS}


def body(**changes: object) -> bytes:
    data = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in data.items() if v is not DROP})


DROP = object()


def refused(raw: bytes) -> tuple[str, str]:
    with pytest.raises(ConversionError) as caught:
        Conversion.parse(raw)
    return caught.value.field, caught.value.message


def test_a_good_conversion_parses() -> None:
    conv = Conversion.parse(body())
    assert conv == Conversion("op-77812", "c", "ftd", "p-991", "25.00", "EUR", NOW_NS)


def test_a_registration_needs_no_amount() -> None:
    conv = Conversion.parse(body(type="registration", amount=DROP, currency=DROP))
    assert (conv.type, conv.amount, conv.currency) == ("registration", None, None)
    conv = Conversion.parse(body(type="registration", amount=None, currency=None))
    assert conv.amount is None


@pytest.mark.parametrize(("raw", "field"), [
    (b"", "body"),
    (b"{", "body"),
    (b"\xff\xfe", "body"),
    (b"[1,2]", "body"),
    (b'"text"', "body"),
])
def test_a_body_that_is_no_json_object_names_body(raw: bytes, field: str) -> None:
    assert refused(raw)[0] == field


@pytest.mark.parametrize("name", ["id", "click_id", "type", "player", "ts"])
def test_each_required_field_is_named_when_missing(name: str) -> None:
    assert refused(body(**{name: DROP})) == (name, "required")


def test_unknown_fields_are_refused_by_name() -> None:
    assert refused(body(curency="EUR")) == ("curency", "unknown field")
    assert refused(body(partner="x", zz=1)) == ("partner", "unknown field")


@pytest.mark.parametrize(("changes", "field"), [
    ({"id": ""}, "id"),
    ({"id": "x" * 129}, "id"),
    ({"id": 77812}, "id"),
    ({"id": "a\nb"}, "id"),
    ({"click_id": ""}, "click_id"),
    ({"click_id": None}, "click_id"),
    ({"click_id": "c" * 129}, "click_id"),
    ({"type": "purchase"}, "type"),
    ({"type": "FTD"}, "type"),
    ({"type": None}, "type"),
    ({"player": ""}, "player"),
    ({"player": "p" * 129}, "player"),
    ({"player": ["p"]}, "player"),
    ({"ts": "1763800000123456789"}, "ts"),
    ({"ts": 1.7638e18}, "ts"),
    ({"ts": True}, "ts"),
    ({"ts": 1_763_800_000}, "ts"),  # seconds by mistake
    ({"ts": 1_763_800_000_123}, "ts"),  # milliseconds
    ({"ts": -1}, "ts"),
    ({"ts": 2**63}, "ts"),
    ({"amount": DROP}, "amount"),
    ({"amount": None}, "amount"),
    ({"amount": 25.0}, "amount"),
    ({"amount": "25,00"}, "amount"),
    ({"amount": "-5"}, "amount"),
    ({"amount": "1e3"}, "amount"),
    ({"amount": "025"}, "amount"),
    ({"amount": "1.123456789"}, "amount"),
    ({"amount": ""}, "amount"),
    ({"currency": DROP}, "currency"),
    ({"currency": "eur"}, "currency"),
    ({"currency": "EURO"}, "currency"),
    ({"currency": "€"}, "currency"),
    ({"currency": 978}, "currency"),
])
def test_every_bad_field_is_named(changes: dict, field: str) -> None:
    assert refused(body(**changes))[0] == field


def test_deposits_need_both_amount_and_currency_and_registrations_both_or_neither() -> None:
    assert refused(body(type="deposit", currency=DROP)) == ("currency", "required for deposit")
    assert refused(body(type="registration", currency=DROP))[0] == "currency"
    assert refused(body(type="registration", amount=DROP))[0] == "amount"


@pytest.mark.parametrize("amount", ["0", "25", "25.5", "25.00", "0.00000001",
                                    "123456789012345678.12345678"])
def test_decimal_strings(amount: str) -> None:
    assert Conversion.parse(body(amount=amount)).amount == amount


def test_the_message_names_the_field_too() -> None:
    with pytest.raises(ConversionError, match=r"^currency: must be an ISO 4217 code"):
        Conversion.parse(body(currency="eur"))


# -- attribution ---------------------------------------------------------------------------


def old_click_id(age_ns: int) -> str:
    """A genuine click id minted `age_ns` before NOW_NS (clickid's own MAC)."""
    ulid = str(ULID.from_timestamp((NOW_NS - age_ns) / 1e9))
    return f"{ulid}.k1.{_mac(KEYS.by_kid['k1'], ulid, 'k1')}"


CLICK = {"click_id": "x", "code": "spring", "partner": "p42", "campaign": "c7",
         "creative": "banner-a", "ts": str(NOW_NS - DAY_NS), "subs": "{}", "ip_hash": "h",
         "ua": "ua", "referer": "", "verdict": "ok"}


def test_a_genuine_fresh_id_goes_on_to_the_index() -> None:
    click_id = old_click_id(DAY_NS)
    info = check_click_id(click_id, KEYS, NOW_NS, WINDOW_S)
    assert not isinstance(info, Attribution)
    assert info.kid == "k1"


def altered(click_id: str) -> str:
    """`click_id` with one character of its MAC changed (never to itself)."""
    return click_id[:-2] + ("x" if click_id[-2] != "x" else "y") + click_id[-1]


@pytest.mark.parametrize("click_id", ["", "c", "not-a-click-id" * 3, altered(mint(KEYS)),
                                      mint(ClickKeys.parse("k1:another-secret-entirely-1"))],
                         ids=["empty", "short", "no-shape", "altered", "other-secret"])
def test_forged_ids_are_decided_without_redis(click_id: str) -> None:
    assert check_click_id(click_id, KEYS, NOW_NS, WINDOW_S) == \
        Attribution(None, Reason.FORGED_CLICK)


def test_an_id_older_than_the_window_is_expired_from_its_own_time() -> None:
    click_id = old_click_id(31 * DAY_NS)
    assert check_click_id(click_id, KEYS, NOW_NS, WINDOW_S) == \
        Attribution(None, Reason.EXPIRED_CLICK)
    assert not isinstance(check_click_id(old_click_id(29 * DAY_NS), KEYS, NOW_NS, WINDOW_S),
                          Attribution)


def test_the_index_credits_its_partner_campaign_and_creative() -> None:
    assert attribute(CLICK, NOW_NS, WINDOW_S) == Attribution(
        {"partner": "p42", "campaign": "c7", "creative": "banner-a"})


def test_bots_and_duplicates_are_credited_like_anyone() -> None:
    for verdict in ("bot", "duplicate"):
        assert attribute({**CLICK, "verdict": verdict}, NOW_NS, WINDOW_S).credited is not None


@pytest.mark.parametrize("click", [None, {}, {"ts": "1"}, {**CLICK, "ts": "soon"}])
def test_no_index_or_a_foreign_one_is_unknown(click: dict | None) -> None:
    assert attribute(click, NOW_NS, WINDOW_S) == Attribution(None, Reason.UNKNOWN_CLICK)


def test_a_recorded_click_older_than_the_window_is_expired() -> None:
    click = {**CLICK, "ts": str(NOW_NS - WINDOW_S * 10**9 - 1)}
    assert attribute(click, NOW_NS, WINDOW_S) == Attribution(None, Reason.EXPIRED_CLICK)
    click = {**CLICK, "ts": str(NOW_NS - WINDOW_S * 10**9)}
    assert attribute(click, NOW_NS, WINDOW_S).credited is not None  # the window's last ns


def test_the_window_runs_to_the_conversion_never_past_the_post() -> None:
    conv = Conversion.parse(body(ts=NOW_NS - DAY_NS))
    assert reference_ns(conv, NOW_NS) == NOW_NS - DAY_NS  # reported a day late
    conv = Conversion.parse(body(ts=NOW_NS + DAY_NS))
    assert reference_ns(conv, NOW_NS) == NOW_NS  # a clock ahead cannot stretch the window


# -- the answer and the record --------------------------------------------------------------


def test_an_attributed_answer_and_its_record_in_contract_order() -> None:
    conv = Conversion.parse(body())
    credited = {"partner": "p42", "campaign": "c7", "creative": "banner-a"}
    result = outcome(conv, Attribution(credited), "01JDCONV", NOW_NS + 5)
    assert json.loads(result.answer) == {"conversion_id": "01JDCONV", "attributed": credited}
    record = json.loads(result.record)
    assert list(record) == ["conversion_id", "id", "click_id", "type", "player", "amount",
                            "currency", "ts", "received_ts", "attributed", "reason"]
    assert record == {"conversion_id": "01JDCONV", "id": "op-77812", "click_id": "c",
                      "type": "ftd", "player": "p-991", "amount": "25.00", "currency": "EUR",
                      "ts": NOW_NS, "received_ts": NOW_NS + 5, "attributed": credited,
                      "reason": None}


def test_an_unattributed_answer_says_why() -> None:
    conv = Conversion.parse(body(type="registration", amount=DROP, currency=DROP))
    result = outcome(conv, Attribution(None, Reason.FORGED_CLICK), "01JD", NOW_NS)
    assert result.answer == b'{"conversion_id":"01JD","attributed":null,"reason":"forged_click"}'
    record = json.loads(result.record)
    assert (record["amount"], record["currency"], record["attributed"], record["reason"]) == \
        (None, None, None, "forged_click")


# -- operator keys ---------------------------------------------------------------------------


def test_a_new_key_is_32_random_url_safe_bytes_stored_as_its_sha256() -> None:
    key = new_key()
    assert len(key) == 43 and key != new_key()
    assert key_hash(key) == hashlib.sha256(key.encode()).hexdigest()


@pytest.mark.parametrize(("value", "key"), [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"),
    (None, None), ("", None), ("Bearer", None), ("Bearer ", None), ("Basic abc", None),
    ("Bearer a b", None), ("abc", None), ("Bearer " + "a" * 600, None),
])
def test_bearer_key(value: str | None, key: str | None) -> None:
    assert bearer_key(value) == key


def test_key_names() -> None:
    assert check_name("back-office_1.eu") == "back-office_1.eu"
    for bad in ("", "a b", "x" * 65, "é"):
        with pytest.raises(ValueError, match="is not a key name"):
            check_name(bad)


def test_the_cache_matches_by_hash_and_says_when_to_read_again() -> None:
    cache = KeyCache()
    assert cache.needs_reading(0.0, matched=False)  # never read
    key = new_key()
    cache.replace({b"ops": key_hash(key).encode(), b"other": key_hash("x").encode()}, 100.0)
    assert cache.match(key) == "ops"
    assert cache.match("wrong") is None
    assert cache.match(key_hash(key)) is None  # the stored hash is not a key
    assert not cache.needs_reading(100.0 + REFRESH_S / 2, matched=True)
    assert cache.needs_reading(100.0 + REFRESH_S, matched=True)  # revocations show
    assert not cache.needs_reading(100.0 + MISS_REFRESH_S / 2, matched=False)
    assert cache.needs_reading(100.0 + MISS_REFRESH_S, matched=False)  # new keys show
