"""chatnode.config: Settings from CHATNODE_* variables (PROTOCOL.md, "Operating a node")."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import Any

import pytest

from chatnode.config import ConfigError, Settings

SECRET = "s3cr3t-jwt-key-do-not-print"
REDIS_URL = "redis://admin:redis-pass-xyz@cache.internal:6380/2"
DATABASE_URL = "postgresql://chat:pg-pass-xyz@db.internal:5433/chatprod"


def test_defaults_are_those_of_the_protocol_table() -> None:
    s = Settings.from_env({})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.database_url == "postgresql://127.0.0.1:5432/chatnode"
    assert s.jwt_secret == ""
    assert s.heartbeat_s == 30
    assert s.bcrypt_rounds == 12
    assert s.token_ttl_s == 86400
    assert s.redelivery_s == 30
    assert s.inbox_limit == 10000
    assert s.http_port == 8080
    assert s.ws_port == 8765


def test_default_node_id_is_host_name_and_pid() -> None:
    assert Settings.from_env({}).node_id == f"{socket.gethostname()}-{os.getpid()}"


def test_from_env_reads_every_variable_of_the_table() -> None:
    env = {
        "CHATNODE_REDIS_URL": REDIS_URL,
        "CHATNODE_DATABASE_URL": DATABASE_URL,
        "CHATNODE_JWT_SECRET": SECRET,
        "CHATNODE_NODE_ID": "node-7",
        "CHATNODE_HEARTBEAT_S": "2.5",
        "CHATNODE_BCRYPT_ROUNDS": "4",
        "CHATNODE_TOKEN_TTL_S": "600",
        "CHATNODE_REDELIVERY_S": "7",
        "CHATNODE_INBOX_LIMIT": "50",
    }
    s = Settings.from_env(env)
    assert s.redis_url == REDIS_URL
    assert s.database_url == DATABASE_URL
    assert s.jwt_secret == SECRET
    assert s.node_id == "node-7"
    assert s.heartbeat_s == 2.5
    assert s.bcrypt_rounds == 4
    assert s.token_ttl_s == 600
    assert s.redelivery_s == 7.0
    assert s.inbox_limit == 50


def test_numbers_get_their_field_types() -> None:
    s = Settings.from_env(
        {"CHATNODE_HEARTBEAT_S": "10", "CHATNODE_INBOX_LIMIT": "5", "CHATNODE_TOKEN_TTL_S": "60"}
    )
    assert isinstance(s.heartbeat_s, float)
    assert isinstance(s.inbox_limit, int)
    assert isinstance(s.token_ttl_s, int)


def test_other_variables_are_ignored() -> None:
    s = Settings.from_env(
        {"REDIS_URL": "redis://other:1/0", "chatnode_inbox_limit": "3", "CHATNODE_X": "y"}
    )
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.inbox_limit == 10000


def test_empty_variable_means_default() -> None:
    s = Settings.from_env({"CHATNODE_INBOX_LIMIT": "", "CHATNODE_REDIS_URL": ""})
    assert s.inbox_limit == 10000
    assert s.redis_url == "redis://127.0.0.1:6379/0"


def test_none_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATNODE_INBOX_LIMIT", "77")
    assert Settings.from_env().inbox_limit == 77


def test_overrides_win_over_the_environment() -> None:
    env = {"CHATNODE_NODE_ID": "from-env", "CHATNODE_INBOX_LIMIT": "5"}
    s = Settings.from_env(env, node_id="from-cli", http_port=9000, ws_port=9001)
    assert s.node_id == "from-cli"
    assert s.http_port == 9000
    assert s.ws_port == 9001
    assert s.inbox_limit == 5


def test_none_overrides_are_ignored() -> None:
    s = Settings.from_env({"CHATNODE_NODE_ID": "from-env"}, node_id=None, http_port=None)
    assert s.node_id == "from-env"
    assert s.http_port == 8080


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("CHATNODE_HEARTBEAT_S", "thirty"),
        ("CHATNODE_HEARTBEAT_S", "30s"),
        ("CHATNODE_BCRYPT_ROUNDS", "12.5"),
        ("CHATNODE_BCRYPT_ROUNDS", "twelve"),
        ("CHATNODE_TOKEN_TTL_S", "1d"),
        ("CHATNODE_TOKEN_TTL_S", "8.64e4"),
        ("CHATNODE_REDELIVERY_S", "--1"),
        ("CHATNODE_INBOX_LIMIT", "10k"),
        ("CHATNODE_INBOX_LIMIT", "0x10"),
    ],
)
def test_malformed_numbers_raise_config_error_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: raw})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("CHATNODE_HEARTBEAT_S", "0"),
        ("CHATNODE_HEARTBEAT_S", "-1"),
        ("CHATNODE_REDELIVERY_S", "0"),
        ("CHATNODE_REDELIVERY_S", "-0.5"),
        ("CHATNODE_BCRYPT_ROUNDS", "3"),
        ("CHATNODE_BCRYPT_ROUNDS", "32"),
        ("CHATNODE_TOKEN_TTL_S", "0"),
        ("CHATNODE_INBOX_LIMIT", "0"),
        ("CHATNODE_INBOX_LIMIT", "-5"),
        ("CHATNODE_DEDUPE_WINDOW_S", "0"),
        ("CHATNODE_DEDUPE_WINDOW_S", "601"),
    ],
)
def test_out_of_range_numbers_raise_config_error(name: str, raw: str) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({name: raw})


@pytest.mark.parametrize("value", [1, 600])
def test_the_dedupe_window_is_at_most_ten_minutes(value: int) -> None:
    assert Settings.from_env({}).dedupe_window_s == 600
    window = Settings.from_env({"CHATNODE_DEDUPE_WINDOW_S": str(value)}).dedupe_window_s
    assert window == value


def test_a_dedupe_window_out_of_range_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CHATNODE_DEDUPE_WINDOW_S"):
        Settings.from_env({"CHATNODE_DEDUPE_WINDOW_S": "3600"})


@pytest.mark.parametrize("value", [4, 31])
def test_bcrypt_rounds_bounds_are_inclusive(value: int) -> None:
    assert Settings.from_env({"CHATNODE_BCRYPT_ROUNDS": str(value)}).bcrypt_rounds == value


@pytest.mark.parametrize("node_id", ["a|b", "|"])
def test_node_id_with_a_bar_is_refused(node_id: str) -> None:
    # '|' separates node and session in the route value
    with pytest.raises(ConfigError):
        Settings.from_env({"CHATNODE_NODE_ID": node_id})


def test_empty_node_id_override_is_refused() -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({}, node_id="")


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({}, heartbeat_s=0)


@pytest.mark.parametrize("name", ["CHATNODE_HEARTBEAT_S", "CHATNODE_REDELIVERY_S"])
def test_nan_interval_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env({name: "nan"})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.inbox_limit = 1  # type: ignore[misc]


# --- secrets never shown -----------------------------------------------------------


def _secret_settings(**overrides: Any) -> Settings:
    env = {
        "CHATNODE_REDIS_URL": REDIS_URL,
        "CHATNODE_DATABASE_URL": DATABASE_URL,
        "CHATNODE_JWT_SECRET": SECRET,
        "CHATNODE_NODE_ID": "node-7",
    }
    return Settings.from_env(env, **overrides)


@pytest.mark.parametrize("render", [repr, str, "{}".format, "{!r}".format], ids=repr)
def test_repr_and_str_never_show_secrets_or_urls(render: Any) -> None:
    text = render(_secret_settings())
    for hidden in (
        SECRET,
        "redis-pass-xyz",
        "pg-pass-xyz",
        "cache.internal",
        "db.internal",
        "chatprod",
        "admin",
    ):
        assert hidden not in text
    assert "node-7" in text  # the rest is still shown
    assert "jwt_secret=" in text


def test_repr_hides_secrets_given_as_overrides() -> None:
    text = repr(_secret_settings(jwt_secret="override-secret-123"))
    assert "override-secret-123" not in text


def test_repr_hides_secrets_after_replace() -> None:
    text = repr(replace(_secret_settings(), jwt_secret="changed-secret-456"))
    assert "changed-secret-456" not in text


def test_bad_number_error_does_not_echo_secrets() -> None:
    env = {"CHATNODE_JWT_SECRET": SECRET, "CHATNODE_INBOX_LIMIT": "lots"}
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert SECRET not in str(info.value)


def test_the_web_folder_needs_an_index_and_its_sockets_are_websocket_urls(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="CHATNODE_WEB_DIR"):
        Settings.from_env({"CHATNODE_WEB_DIR": str(tmp_path)})
    (tmp_path / "index.html").write_text("<!doctype html>")
    sockets = " ws://127.0.0.1:8765/ws, wss://chat.example/ws "
    s = Settings.from_env({"CHATNODE_WEB_DIR": str(tmp_path), "CHATNODE_WEB_SOCKETS": sockets})
    assert s.web_socket_urls == ["ws://127.0.0.1:8765/ws", "wss://chat.example/ws"]
    with pytest.raises(ConfigError, match="CHATNODE_WEB_SOCKETS"):
        Settings.from_env({"CHATNODE_WEB_SOCKETS": "http://127.0.0.1:8765/ws"})


def test_web_apis_and_cors_origins_are_origins() -> None:
    apis = "http://127.0.0.1:8080/, https://chat.example.com, http://[::1]:8081"
    s = Settings.from_env({"CHATNODE_WEB_APIS": apis, "CHATNODE_CORS_ORIGINS": apis})
    assert (
        s.web_api_urls
        == s.cors_origin_list
        == [
            "http://127.0.0.1:8080",
            "https://chat.example.com",
            "http://[::1]:8081",
        ]
    )
    bad_origins = (
        "ws://127.0.0.1:8080",
        "http://127.0.0.1:8080/api",
        "http://h:99999",
        "http://",
        "h:80",
        "http://x;script-src *",  # would widen the page's policy
        "http://a\nb",
        "HTTPS://H",  # a browser's Origin is lower case
        "https://h:443",  # ... and has no default port
        "http://h:0",
    )
    for bad in bad_origins:
        with pytest.raises(ConfigError, match="CHATNODE_WEB_APIS"):
            Settings.from_env({"CHATNODE_WEB_APIS": bad})
        with pytest.raises(ConfigError, match="CHATNODE_CORS_ORIGINS"):
            Settings.from_env({"CHATNODE_CORS_ORIGINS": bad})
