"""Links, click ids, verdicts and the link cache as plain objects; the links CLI against
a real Redis (PROTOCOL.md §9)."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import redis
from websockets.datastructures import Headers

from attribution import clickid, keys
from attribution.clickid import ForgedClickId
from attribution.clicks import Click
from attribution.link_store import LinkStore
from attribution.linkcache import LinkCache
from attribution.links import Link, LinkError
from attribution.settings import AttributionSettings, ClickKeys
from attribution.verdicts import client_hash, is_bot
from gateway.config import ConfigError
from tests.conftest import ROOT

OLD = "old1:0123456789abcdef-old-secret"
NEW = "new2:fedcba9876543210-new-secret"
BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/124.0 Safari/537.36")


def link(**changes: object) -> Link:
    fields: dict = {"code": "spring-24", "partner": "p42", "campaign": "c7", "creative": "banner1",
                    "url": "https://casino.example/welcome?lang=en"}
    fields.update(changes)
    return Link.create(**fields)


# -- links ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("url", "ftp://casino.example/"),
    ("url", "javascript:alert(1)"),
    ("url", "https:///no-host"),
    ("url", "https://user:pw@casino.example/"),
    ("url", "https://casino.example/#frag"),
    ("url", "https://casino.example/a b"),
    ("url", "https://casino.example:99999/"),
    ("url", "/relative"),
    ("code", "has space"),
    ("code", "x" * 65),
    ("partner", ""),
    ("campaign", "c/7"),
    ("click_param", "sub1"),
    ("click_param", "a&b"),
    ("subids", "yes"),
])
def test_a_bad_field_is_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(LinkError) as refused:
        link(**{field: value})
    assert refused.value.field == field


def test_from_dict_names_missing_and_unknown_fields() -> None:
    with pytest.raises(LinkError) as missing:
        Link.from_dict({"code": "a", "partner": "p", "campaign": "c", "creative": "r"})
    assert missing.value.field == "url"
    with pytest.raises(LinkError) as unknown:
        Link.from_dict({**link().to_dict(), "evil": 1})
    assert unknown.value.field == "evil"


def test_canonical_json_round_trips() -> None:
    made = link(subids=True, click_param="cid")
    assert Link.from_json(made.to_json()) == made
    assert made.to_json() == orjson.dumps(made.to_dict(), option=orjson.OPT_SORT_KEYS)


def test_destination_carries_the_click_id_and_only_allowed_sub_ids() -> None:
    query = {"sub1": ["aff 1"], "sub5": ["z"], "utm_source": ["x"], "ogclid": ["smuggled"]}
    allowed = urlsplit(link(subids=True).destination("CID", query))
    assert parse_qs(allowed.query) == {"lang": ["en"], "ogclid": ["CID"], "sub1": ["aff 1"],
                                       "sub5": ["z"]}
    dropped = urlsplit(link().destination("CID", query))
    assert parse_qs(dropped.query) == {"lang": ["en"], "ogclid": ["CID"]}
    own_param = urlsplit(link(click_param="cid").destination("CID", {}))
    assert parse_qs(own_param.query) == {"lang": ["en"], "cid": ["CID"]}


def test_a_destination_parameter_named_like_the_click_id_is_replaced() -> None:
    made = link(url="https://casino.example/?ogclid=stale&x=%20kept")
    assert made.destination("CID", {}) == "https://casino.example/?x=%20kept&ogclid=CID"


# -- click ids -------------------------------------------------------------------------------

def test_a_click_id_is_url_safe_short_and_verifies() -> None:
    ring = ClickKeys.parse(NEW)
    made = clickid.mint(ring)
    assert len(made) <= 64
    assert all(ch.isalnum() or ch in "-_." for ch in made)
    info = clickid.verify(made, ring)
    assert info.kid == "new2" and made.startswith(info.ulid) and info.ts_ms > 0


def test_forged_and_altered_click_ids_are_refused() -> None:
    ring = ClickKeys.parse(NEW)
    made = clickid.mint(ring)
    ulid, kid, mac = made.split(".")
    flip = "A" if ulid[-1] != "A" else "B"
    forged = [
        ulid[:-1] + flip + "." + kid + "." + mac,  # altered time or randomness
        ulid + "." + kid + "." + ("A" if mac[0] != "A" else "B") + mac[1:],  # altered MAC
        clickid.mint(ClickKeys.parse("new2:another-secret-of-enough-len")),  # wrong secret
        clickid.mint(ClickKeys.parse("zz9:0123456789abcdef0123")),  # unknown key id
        "not-a-click-id", "", made + "x", "8" + made[1:],
    ]
    for bad in forged:
        with pytest.raises(ForgedClickId):
            clickid.verify(bad, ring)


def test_an_id_signed_by_the_old_key_verifies_while_it_is_listed() -> None:
    old_id = clickid.mint(ClickKeys.parse(OLD))
    rotated = ClickKeys.parse(f"{NEW},{OLD}")
    assert clickid.verify(old_id, rotated).kid == "old1"
    assert clickid.verify(clickid.mint(rotated), rotated).kid == "new2"  # the first signs
    with pytest.raises(ForgedClickId):
        clickid.verify(old_id, ClickKeys.parse(NEW))


@pytest.mark.parametrize("raw", ["k1", "k1:short", "bad kid:0123456789abcdef", ",",
                                 "k1:0123456789abcdef,k1:0123456789abcdef"])
def test_bad_click_keys_stop_the_worker_naming_the_setting(raw: str) -> None:
    with pytest.raises(ConfigError, match="OG_CLICK_KEYS"):
        AttributionSettings.from_env({"OG_CLICK_KEYS": raw})


def test_click_keys_may_be_empty_and_then_sign_nothing() -> None:
    settings = AttributionSettings.from_env({})
    assert settings.keys is None and settings.client_hash_secret() is None


# -- verdicts --------------------------------------------------------------------------------

def headers(**values: str) -> Headers:
    return Headers([(name.replace("_", "-"), value) for name, value in values.items()])


@pytest.mark.parametrize(("method", "ua", "extra", "bot"), [
    ("GET", BROWSER, {}, False),
    ("GET", "Googlebot/2.1 (+http://www.google.com/bot.html)", {}, True),
    ("GET", "facebookexternalhit/1.1", {}, True),
    ("GET", "", {}, True),
    ("HEAD", BROWSER, {}, True),
    ("GET", BROWSER, {"Purpose": "prefetch"}, True),
    ("GET", BROWSER, {"Sec-Purpose": "prefetch;prerender"}, True),
    ("GET", BROWSER, {"X-Moz": "prefetch"}, True),
])
def test_bot_verdicts(method: str, ua: str, extra: dict[str, str], bot: bool) -> None:
    assert is_bot(method, ua, Headers(list(extra.items())).get) is bot


def test_the_client_hash_takes_haproxys_address_only_from_loopback() -> None:
    secret = b"k" * 32
    direct = client_hash(secret, "203.0.113.9", [])
    assert client_hash(secret, "127.0.0.1", ["10.0.0.1, 203.0.113.9"]) == direct
    assert client_hash(secret, "198.51.100.7", ["203.0.113.9"]) != direct  # not believed
    assert client_hash(b"other" * 8, "203.0.113.9", []) != direct
    assert "203" not in direct


def test_the_click_record_is_canonical_json_in_contract_order() -> None:
    click = Click("cid", "spring-24", "p42", "c7", "banner1", 17, {"sub1": "a"}, "h", "ua",
                  "ref", bot=False)
    record = click.record_prefix() + b'"verdict":"ok"}'
    assert list(orjson.loads(record)) == ["click_id", "code", "partner", "campaign", "creative",
                                          "ts", "subs", "ip_hash", "ua", "referer", "verdict"]
    assert record == orjson.dumps(orjson.loads(record))


# -- the cache -------------------------------------------------------------------------------

def test_the_cache_applies_changes_and_a_change_during_a_reload_wins() -> None:
    cache = LinkCache()
    assert not cache.loaded
    cache.begin_reload()
    paused = link().with_active(False)
    cache.apply(paused.to_json())  # arrives before the (older) reload's read
    cache.finish_reload({b"spring-24": link().to_json(), b"junk": b"{"})
    assert cache.loaded and cache.get("spring-24") == paused and cache.get("junk") is None
    cache.apply(b"not a link")
    assert cache.bad_messages == 1 and cache.get("spring-24") == paused


# -- the CLI ---------------------------------------------------------------------------------

def oddsgate(*args: str, redis_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", "links", "--redis-url",
                           redis_url, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def test_the_cli_adds_pauses_resumes_and_lists(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.LINKS_CHANGED)
    added = oddsgate("add", "spring-24", "--partner", "p42", "--campaign", "c7", "--creative",
                     "banner1", "--url", "https://casino.example/w", "--subids",
                     "--click-param", "cid", redis_url=redis_url)
    assert added.returncode == 0, added.stderr
    stored = Link.from_json(client.hget(keys.LINKS, "spring-24"))
    assert stored == Link.create("spring-24", "p42", "c7", "banner1", "https://casino.example/w",
                                 "cid", True, True)
    assert oddsgate("pause", "spring-24", redis_url=redis_url).returncode == 0
    listed = oddsgate("list", "--json", redis_url=redis_url)
    assert orjson.loads(listed.stdout) == [stored.with_active(False).to_dict()]
    assert oddsgate("resume", "spring-24", redis_url=redis_url).returncode == 0
    assert "spring-24" in oddsgate("list", redis_url=redis_url).stdout
    messages = []
    for _ in range(10):  # the subscribe confirmation reads as None
        if len(messages) == 3:
            break
        message = pubsub.get_message(timeout=1)
        if message is not None:
            messages.append(Link.from_json(message["data"]).active)
    assert messages == [True, False, True]  # every change told to the workers
    pubsub.close()
    client.close()


@pytest.mark.parametrize(("args", "words"), [
    (["add", "x", "--partner", "p", "--campaign", "c", "--creative", "r", "--url", "ftp://x/"],
     "url:"),
    (["add", "bad code", "--partner", "p", "--campaign", "c", "--creative", "r",
      "--url", "https://x/"], "code:"),
    (["pause", "missing"], "no link 'missing'"),
])
def test_the_cli_refuses_bad_input_with_one_line_and_exit_2(redis_url: str, args: list[str],
                                                             words: str) -> None:
    done = oddsgate(*args, redis_url=redis_url)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and words in done.stderr


def test_the_cli_refuses_a_code_taken(redis_url: str) -> None:
    LinkStore(redis.Redis.from_url(redis_url)).add(link())
    done = oddsgate("add", "spring-24", "--partner", "p", "--campaign", "c", "--creative", "r",
                    "--url", "https://x/", redis_url=redis_url)
    assert done.returncode == 2 and "exists" in done.stderr


def test_the_cli_exits_1_when_redis_is_unreachable(tmp_path) -> None:
    done = oddsgate("list", redis_url=f"unix://{tmp_path}/none.sock")
    assert done.returncode == 1 and "unreachable" in done.stderr


async def test_an_admin_change_is_answered_once_this_workers_cache_holds_it() -> None:
    """LinkSync.caught_up: the admin API waits for its own change to come back over
    og:links:changed (read-your-writes on the worker that made it), at most a timeout."""
    import asyncio

    from attribution.linksync import LinkSync

    sync = LinkSync("redis://127.0.0.1:1/0", LinkCache())  # not running: messages by hand
    link = Link.create("spring-24", "p42", "c7", "banner1", "https://casino.example/")
    waiting = asyncio.create_task(sync.caught_up(link, timeout_s=5.0))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # the change has not come back yet
    sync.cache.apply(link.with_active(False).to_json())  # another change: not ours
    sync._wake()
    await asyncio.sleep(0.01)
    assert not waiting.done()
    sync.cache.apply(link.to_json())
    sync._wake()
    await asyncio.wait_for(waiting, 1.0)
    assert sync._waiting == {}
    await sync.caught_up(link)  # already held: at once
    lost = link.with_active(False)  # a message lost with the connection: the timeout ends it
    await asyncio.wait_for(sync.caught_up(lost, timeout_s=0.05), 1.0)
