"""`python -m attribution.migrate_keys` against a real Redis: every key of the old names
moves to its cluster name with its TTL and its consumer groups, a taken name is reported
and left alone, and a second run moves nothing. (The same on a cluster:
tests/test_cluster_attribution.py.)"""

from __future__ import annotations

import redis

from aggregator.inputlog import input_key
from attribution import keys
from attribution.migrate_keys import main, migrate
from webhooks import keys as hook_keys

OLD_TO_NEW = {
    "og:click:ck_1": keys.click_index("ck_1"),
    "og:dedupe:spring-24:abc": f"{keys.DEDUPE_PREFIX}spring-24:abc",
    "og:conv:op-1": keys.conversion_idempotency("op-1"),
    "og:keys:added": keys.OPERATOR_KEYS_ADDED,
    "og:hooks:due": hook_keys.DUE,
    "og:hooks:seq:acme": hook_keys.partner_seq("acme"),
    "og:hooks:stats:ep_1": hook_keys.endpoint_stats("ep_1"),
    "og:in:atlas": input_key("atlas"),
}
UNCHANGED = ("og:clicks", "og:conversions", "og:keys", "og:links", "og:in:origin")


def populate_old(client: redis.Redis | redis.RedisCluster) -> None:
    """What a deployment from before the cluster holds."""
    client.hset("og:click:ck_1", mapping={"partner": "p42", "ts": "1"})
    client.pexpire("og:click:ck_1", 600_000)
    client.set("og:dedupe:spring-24:abc", "1", px=600_000)
    client.set("og:conv:op-1", b'{"conversion_id":"cv_1"}')
    client.hset("og:keys:added", "backoffice", "1764000000")
    client.zadd("og:hooks:due", {"msg_1": 5})
    client.set("og:hooks:seq:acme", 7)
    client.hset("og:hooks:stats:ep_1", "delivered", 3)
    client.xadd("og:in:atlas", {"m": b"x"}, id="1-0")
    client.xgroup_create("og:in:atlas", "readers", id="0")
    client.set("og:in:origin", 123)
    client.xadd("og:clicks", {"c": b"{}"})
    client.xadd("og:conversions", {"c": b"{}"})
    client.hset("og:keys", "backoffice", "ab" * 32)
    client.hset("og:links", "spring-24", "{}")


def check_moved(client: redis.Redis | redis.RedisCluster) -> None:
    for old, new in OLD_TO_NEW.items():
        assert not client.exists(old) and client.exists(new), (old, new)
    assert 590_000 < client.pttl(keys.click_index("ck_1")) <= 600_000
    assert client.get(hook_keys.partner_seq("acme")) == b"7"
    assert client.zscore(hook_keys.DUE, "msg_1") == 5
    assert client.xinfo_groups(input_key("atlas"))[0]["name"] == b"readers"
    for key in UNCHANGED:
        assert client.exists(key), key


def test_every_old_key_moves_once_and_a_taken_name_is_reported(redis_url, capsys) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        populate_old(client)
        client.set("og:conv:op-2", b"old answer")
        client.set(keys.conversion_idempotency("op-2"), b"new answer")  # taken since
        assert main(["--redis-url", redis_url, "--dry-run"]) == 0
        assert client.exists("og:click:ck_1")  # a dry run moves nothing
        assert main(["--redis-url", redis_url]) == 1
        out = capsys.readouterr().out
        assert "og:conv:*: 1 moved" in out and "not moved: og:conv:op-2" in out, out
        check_moved(client)
        assert client.get(keys.conversion_idempotency("op-2")) == b"new answer"
        again = migrate(client)
        assert sum(again.moved.values()) == 0 and [old for old, _ in again.taken] == \
            ["og:conv:op-2"]
    finally:
        client.close()


def test_unreachable_is_exit_1_without_the_password(capsys) -> None:
    assert main(["--redis-url", "redis://:pw-secret@127.0.0.1:1/0"]) == 1
    assert "pw-secret" not in capsys.readouterr().err

