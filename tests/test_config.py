"""Worker settings (gateway/config.py): defaults, OG_* parsing, checks, describe()."""

from __future__ import annotations

import socket
from dataclasses import fields

import pytest

from gateway.config import ConfigError, Settings, describe

SECRET_ENV = {"OG_JWT_SECRET": "s3cret"}
FIELDS = {f.name: f for f in fields(Settings)}
MINIMUMS = [(f.name, f.metadata["env"], f.metadata["min"]) for f in fields(Settings)
            if f.metadata["min"] is not None]


def from_env(**env: str) -> Settings:
    return Settings.from_env({**SECRET_ENV, **env})


def refused(env: dict[str, str], words: str, **overrides: object) -> ConfigError:
    with pytest.raises(ConfigError, match=words) as info:
        Settings.from_env(env, **overrides)
    return info.value


# -- defaults ------------------------------------------------------------------------


def test_defaults() -> None:
    settings = from_env()
    assert settings == Settings(jwt_secret="s3cret")
    assert (settings.host, settings.port, settings.redis_url) == ("127.0.0.1", 8001, "")
    assert (settings.worker_index, settings.jwt_leeway_s, settings.allow_anonymous) == (0, 5.0,
                                                                                        False)
    assert (settings.history_s, settings.max_frame_bytes, settings.max_topics) == (60.0, 65_536,
                                                                                   200)
    assert (settings.rate_limit_rps, settings.rate_limit_burst) == (20.0, 40.0)
    assert (settings.rate_limit_close_after, settings.max_bad_requests) == (20, 10)
    assert (settings.handshake_timeout_s, settings.heartbeat_ms) == (5.0, 20_000)
    assert (settings.recent_events, settings.replay_max) == (512, 10_000)
    assert (settings.compression, settings.redis_reconnect_s) == (False, 0.5)
    assert (settings.partition_map, settings.node, settings.runtime_dir) == ("", "", "")


def test_every_default_passes_its_own_minimum() -> None:
    for name, _, minimum in MINIMUMS:
        assert FIELDS[name].default >= minimum, name


def test_empty_env_values_keep_the_default() -> None:
    assert from_env(OG_PORT="", OG_HOST="", OG_ALLOW_ANONYMOUS="").port == 8001


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OG_JWT_SECRET", "from-os")
    monkeypatch.setenv("OG_MAX_TOPICS", "7")
    settings = Settings.from_env()
    assert (settings.jwt_secret, settings.max_topics) == ("from-os", 7)


# -- parsing every type ----------------------------------------------------------------


def test_strings_are_taken_as_they_are() -> None:
    settings = from_env(OG_HOST="0.0.0.0", OG_REDIS_URL="redis://r:6379/2", OG_NODE="node-a")
    assert (settings.host, settings.redis_url, settings.node) == ("0.0.0.0", "redis://r:6379/2",
                                                                 "node-a")


def test_integers_and_floats_are_parsed() -> None:
    settings = from_env(OG_PORT="9000", OG_MAX_TOPICS="12", OG_JWT_LEEWAY_S="2.5",
                        OG_HISTORY_S="45", OG_RATE_LIMIT_RPS="0.5")
    assert settings.port == 9000 and isinstance(settings.port, int)
    assert settings.max_topics == 12
    assert settings.jwt_leeway_s == 2.5
    assert settings.history_s == 45.0 and isinstance(settings.history_s, float)
    assert settings.rate_limit_rps == 0.5


@pytest.mark.parametrize("word", ["1", "true", "TRUE", "True", "yes", "Yes", "on", "ON",
                                  " true "])
def test_bool_words_for_true(word: str) -> None:
    assert from_env(OG_ALLOW_ANONYMOUS=word, OG_COMPRESSION=word).allow_anonymous is True
    assert from_env(OG_COMPRESSION=word).compression is True


@pytest.mark.parametrize("word", ["0", "false", "FALSE", "no", "No", "off", "Off", " off "])
def test_bool_words_for_false(word: str) -> None:
    assert from_env(OG_COMPRESSION=word).compression is False
    assert from_env(OG_ALLOW_ANONYMOUS=word).allow_anonymous is False


@pytest.mark.parametrize("word", ["maybe", "2", "y", "n", "enabled", "truee", "-1"])
def test_other_bool_words_are_refused_naming_the_variable(word: str) -> None:
    error = refused({**SECRET_ENV, "OG_COMPRESSION": word}, "OG_COMPRESSION")
    assert repr(word) in str(error)


@pytest.mark.parametrize(
    "env, value",
    [
        ("OG_PORT", "http"),
        ("OG_PORT", "80.5"),
        ("OG_PORT", "8e3"),
        ("OG_MAX_TOPICS", "ten"),
        ("OG_WORKER_INDEX", "0x1"),
        ("OG_HEARTBEAT_MS", "20s"),
        ("OG_HISTORY_S", "60s"),
        ("OG_RATE_LIMIT_RPS", "fast"),
        ("OG_JWT_LEEWAY_S", "5,0"),
    ],
)
def test_bad_numbers_are_refused_naming_the_variable(env: str, value: str) -> None:
    error = refused({**SECRET_ENV, env: value}, env)
    assert repr(value) in str(error)


# -- checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, env, minimum", MINIMUMS, ids=[m[1] for m in MINIMUMS])
def test_minimum_is_enforced_naming_the_variable(name: str, env: str, minimum: float) -> None:
    below = minimum - 1 if isinstance(FIELDS[name].default, int) else minimum - 0.001
    refused({**SECRET_ENV, env: str(below)}, f"{env}=.*at least")
    partner = PAIRED_LOWER_BOUNDS.get(env, {})  # settings that must stay under this one
    assert getattr(from_env(**{env: str(minimum)}, **partner), name) == minimum


# A setting checked against another: its minimum is valid only with the other low too.
PAIRED_LOWER_BOUNDS = {
    "OG_HIGH_WATERMARK_BYTES": {"OG_LOW_WATERMARK_BYTES": "0"},
    "OG_BREAKER_TRIP_SHARE": {"OG_BREAKER_RECOVER_SHARE": "0"},
}


def test_watermarks_and_breaker_shares_must_be_ordered() -> None:
    refused({**SECRET_ENV, "OG_LOW_WATERMARK_BYTES": "70000"}, "OG_LOW_WATERMARK_BYTES")
    refused({**SECRET_ENV, "OG_BREAKER_RECOVER_SHARE": "0.5"}, "OG_BREAKER_RECOVER_SHARE")


def test_minimums_cover_the_limits_that_must_be_positive() -> None:
    names = {name for name, _, _ in MINIMUMS}
    assert {"history_s", "max_topics", "rate_limit_rps", "rate_limit_burst",
            "rate_limit_close_after", "max_bad_requests", "max_frame_bytes",
            "heartbeat_ms", "replay_max"} <= names
    assert FIELDS["history_s"].metadata["min"] >= 30  # PROTOCOL.md §1: at least 30 s


@pytest.mark.parametrize("port", ["65536", "99999"])
def test_port_above_65535_is_refused(port: str) -> None:
    refused({**SECRET_ENV, "OG_PORT": port}, "OG_PORT")


@pytest.mark.parametrize("name", [f.name for f in fields(Settings) if type(f.default) is float])
def test_nan_is_refused_for_every_float_setting(name: str) -> None:
    refused({**SECRET_ENV, FIELDS[name].metadata["env"]: "nan"}, FIELDS[name].metadata["env"])


def test_overrides_win_over_env() -> None:
    env = {**SECRET_ENV, "OG_PORT": "9000", "OG_HOST": "10.0.0.1"}
    settings = Settings.from_env(env, port=9100, allow_anonymous=True)
    assert (settings.port, settings.host, settings.allow_anonymous) == (9100, "10.0.0.1", True)


def test_override_of_none_leaves_the_env_value() -> None:
    settings = Settings.from_env({**SECRET_ENV, "OG_PORT": "9000"}, port=None)
    assert settings.port == 9000


def test_overrides_are_checked_too() -> None:
    refused(SECRET_ENV, "OG_MAX_TOPICS", max_topics=0)


def test_no_secret_and_no_anonymous_is_refused() -> None:
    error = refused({}, "OG_JWT_SECRET")
    assert "OG_ALLOW_ANONYMOUS" in str(error)


def test_anonymous_without_secret_is_allowed() -> None:
    settings = Settings.from_env({"OG_ALLOW_ANONYMOUS": "yes"})
    assert (settings.jwt_secret, settings.allow_anonymous) == ("", True)


def test_shell_connect_src_takes_ws_origins_only() -> None:
    settings = from_env(OG_SHELL_CONNECT_SRC="wss://eu.example.com, ws://127.0.0.1:8000/ "
                                             "wss://*.example.net wss://eu.example.com")
    assert settings.shell_connect_origins == (
        "wss://eu.example.com", "ws://127.0.0.1:8000", "wss://*.example.net")
    assert from_env().shell_connect_origins == ()
    # Each entry goes into the page's CSP as it is: nothing but an origin may pass.
    for bad in ("https://eu.example.com", "wss://eu.example.com/ws", "wss://a;script-src *",
                "wss://a 'unsafe-inline'", "*", "wss://"):
        error = refused({**SECRET_ENV, "OG_SHELL_CONNECT_SRC": bad}, "OG_SHELL_CONNECT_SRC")
        assert "origin" in str(error)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- derived values and describe() -----------------------------------------------------


def test_node_name_is_the_node_or_the_host_name() -> None:
    assert from_env(OG_NODE="node-a").node_name == "node-a"
    assert from_env().node_name == socket.gethostname()


def test_history_ms() -> None:
    assert from_env(OG_HISTORY_S="45.5").history_ms == 45_500


def test_describe_lists_every_field_with_its_env_default_and_doc() -> None:
    rows = describe()
    assert len(rows) == len(FIELDS)
    assert [env for env, _, _ in rows] == [f.metadata["env"] for f in fields(Settings)]
    for (env, default, doc), f in zip(rows, fields(Settings), strict=True):
        assert env.startswith("OG_")
        assert default == repr(f.default)
        assert doc.strip()


def test_env_names_are_unique_and_named_after_the_field() -> None:
    envs = [f.metadata["env"] for f in fields(Settings)]
    assert len(set(envs)) == len(envs)
    for f in fields(Settings):
        assert f.metadata["env"] == "OG_" + f.name.upper()
