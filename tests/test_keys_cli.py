"""`oddsgate keys add|list|revoke` against a real Redis (attribution/keys_cli.py)."""

from __future__ import annotations

import hashlib
import time

import pytest
import redis

from attribution.keys import OPERATOR_KEYS, OPERATOR_KEYS_ADDED
from supervisor.cli import main


def keys(redis_url: str, *argv: str) -> int:
    return main(["keys", "--redis-url", redis_url, *argv])


def test_add_prints_the_key_last_and_stores_only_its_hash(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = int(time.time())
    assert keys(redis_url, "add", "backoffice-1") == 0
    key = capsys.readouterr().out.splitlines()[-1]
    assert len(key) == 43  # 32 bytes, URL-safe base64 without padding
    assert all(c.isalnum() or c in "-_" for c in key)
    client = redis.Redis.from_url(redis_url)
    stored = client.hgetall(OPERATOR_KEYS)
    assert stored == {b"backoffice-1": hashlib.sha256(key.encode()).hexdigest().encode()}
    assert before <= int(client.hget(OPERATOR_KEYS_ADDED, "backoffice-1")) <= time.time()
    assert key.encode() not in b"".join(client.dump(k) or b"" for k in client.keys("*"))
    client.close()


def test_add_of_a_taken_name_exits_2_and_keeps_the_old_key(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys(redis_url, "add", "ops") == 0
    client = redis.Redis.from_url(redis_url)
    first = client.hget(OPERATOR_KEYS, "ops")
    capsys.readouterr()
    assert keys(redis_url, "add", "ops") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "oddsgate keys: 'ops' exists; revoke it first to replace its key\n"
    assert client.hget(OPERATOR_KEYS, "ops") == first
    client.close()


def test_list_shows_names_and_dates_never_keys(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys(redis_url, "add", "b-office") == 0
    assert keys(redis_url, "add", "a-office") == 0
    printed = capsys.readouterr().out.splitlines()
    made = {printed[1], printed[3]}
    assert keys(redis_url, "list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "added", "(UTC)"]
    assert [line.split()[0] for line in lines[1:]] == ["a-office", "b-office"]
    assert time.strftime("%Y-%m-%d", time.gmtime()) in lines[1]
    assert not any(key in out for key in made)


def test_revoke_deletes_and_an_unknown_name_exits_2(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys(redis_url, "add", "gone") == 0
    assert keys(redis_url, "revoke", "gone") == 0
    client = redis.Redis.from_url(redis_url)
    assert client.hgetall(OPERATOR_KEYS) == {} and client.hgetall(OPERATOR_KEYS_ADDED) == {}
    client.close()
    capsys.readouterr()
    assert keys(redis_url, "revoke", "gone") == 2
    assert capsys.readouterr().err == "oddsgate keys: no key named 'gone'\n"


@pytest.mark.parametrize("argv", [["add", "has space"], ["add", "x" * 65], ["revoke", ""],
                                  ["add"], ["rotate", "x"], []])
def test_bad_usage_exits_2(redis_url: str, argv: list[str],
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert keys(redis_url, *argv) == 2
    assert "usage: oddsgate keys" in capsys.readouterr().err


def test_unreachable_redis_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    from supervisor.embedded_redis import free_port

    url = f"redis://:secret@127.0.0.1:{free_port()}"
    assert keys(url, "list") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("oddsgate keys: cannot reach Redis at redis://:***@127.0.0.1:")
    assert "secret" not in err


def test_the_redis_url_comes_from_og_redis_url(
        redis_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OG_REDIS_URL", redis_url)
    assert main(["keys", "add", "from-env"]) == 0
    client = redis.Redis.from_url(redis_url)
    assert client.hexists(OPERATOR_KEYS, "from-env")
    client.close()


def test_without_a_node_the_default_socket_is_one_line_and_exit_1(tmp_path) -> None:
    """As a new user runs it: no OG_REDIS_URL, no node, so the embedded socket is absent."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "XDG_RUNTIME_DIR": str(tmp_path), "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-m", "supervisor.cli", "keys", "list"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(
        f"oddsgate keys: cannot reach Redis at unix://{tmp_path}/oddsgate/redis/redis.sock: ")
