"""Settings: defaults < TOML < environment < explicit overrides; every bad key or value is a
ConfigError naming it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailmesh_common.config import Settings, load_settings, settings_env
from mailmesh_common.errors import ConfigError


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailmesh.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.mailbox_port == 50051
    assert s.resolved_nats_url() == "nats://127.0.0.1:4222"
    assert s.addr("search") == "127.0.0.1:50052"


def test_toml_overrides_defaults_and_env_overrides_toml(tmp_path: Path) -> None:
    conf = write_toml(tmp_path, '[mailmesh]\nmailbox_port = 6001\nsearch_port = 6002\nlog_level = "debug"\n')
    s = load_settings(conf, env={"MAILMESH_SEARCH_PORT": "7002"})
    assert s.mailbox_port == 6001  # TOML
    assert s.search_port == 7002  # env beats TOML
    assert s.send_port == 50053  # default
    assert s.log_level == "DEBUG"


def test_explicit_override_beats_env(tmp_path: Path) -> None:
    s = load_settings(env={"MAILMESH_DATA_DIR": "/from/env"}, data_dir=tmp_path)
    assert s.data_dir == tmp_path
    assert load_settings(env={"MAILMESH_DATA_DIR": "/from/env"}, data_dir=None).data_dir == Path("/from/env")


def test_mailmesh_config_env_names_the_file(tmp_path: Path) -> None:
    conf = write_toml(tmp_path, "nats_port = 5222\n")  # a top-level table works too
    s = load_settings(env={"MAILMESH_CONFIG": str(conf)})
    assert s.nats_port == 5222
    assert s.resolved_nats_url() == "nats://127.0.0.1:5222"


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    conf = write_toml(tmp_path, "[mailmesh]\nmailbox_prot = 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(conf, env={})
    assert "mailbox_prot" in err.value.message
    assert str(conf) in err.value.message


def test_unknown_mailmesh_env_vars_are_not_ours_to_reject() -> None:
    s = load_settings(env={"MAILMESH_NATS_SERVER_BIN": "/x", "MAILMESH_SOME_TEST_KNOB": "1"})
    assert s == Settings()


@pytest.mark.parametrize(("name", "value"), [
    ("MAILMESH_MAILBOX_PORT", "abc"),
    ("MAILMESH_MAILBOX_PORT", "70000"),
    ("MAILMESH_NATS_PORT", "-1"),
    ("MAILMESH_GRPC_DEFAULT_DEADLINE_S", "soon"),
    ("MAILMESH_MAX_MESSAGE_BYTES", "1.5"),
])
def test_bad_env_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(env={name: value})
    assert name in err.value.message
    assert repr(value) in err.value.message


@pytest.mark.parametrize(("line", "key"), [
    ('mailbox_port = "x"', "mailbox_port"),
    ("mailbox_port = true", "mailbox_port"),
    ('host = ["a"]', "host"),
    ("dns_servers = [1, 2]", "dns_servers"),
    ("data_dir = 3", "data_dir"),
])
def test_bad_toml_value_names_the_key(tmp_path: Path, line: str, key: str) -> None:
    conf = write_toml(tmp_path, f"[mailmesh]\n{line}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(conf, env={})
    assert key in err.value.message


def test_bad_log_level_and_format_are_named() -> None:
    with pytest.raises(ConfigError, match="log_level"):
        load_settings(env={"MAILMESH_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(env={"MAILMESH_LOG_FORMAT": "xml"})


def test_postmaster_is_a_valid_address_kept_in_canonical_form() -> None:
    assert load_settings(env={"MAILMESH_POSTMASTER": " Admin@Example.COM "}).postmaster == "admin@example.com"
    with pytest.raises(ConfigError, match="^postmaster: "):
        load_settings(env={"MAILMESH_POSTMASTER": "not an address"})


def test_ingest_nice_is_a_nice_increment() -> None:
    assert load_settings(env={}).ingest_nice == 5
    assert load_settings(env={"MAILMESH_INGEST_NICE": "0"}).ingest_nice == 0
    with pytest.raises(ConfigError, match="^ingest_nice: expected 0..19"):
        load_settings(env={"MAILMESH_INGEST_NICE": "20"})


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", env={})
    conf = write_toml(tmp_path, "[mailmesh\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(conf, env={})


def test_lists_from_env_and_toml(tmp_path: Path) -> None:
    assert load_settings(env={"MAILMESH_DNS_SERVERS": "1.1.1.1, 9.9.9.9"}).dns_servers == ("1.1.1.1", "9.9.9.9")
    conf = write_toml(tmp_path, 'dns_servers = ["8.8.8.8"]\n')
    assert load_settings(conf, env={}).dns_servers == ("8.8.8.8",)


def test_settings_env_reproduces_the_settings_in_a_child(tmp_path: Path) -> None:
    s = load_settings(env={"MAILMESH_SEARCH_PORT": "6100", "MAILMESH_DNS_SERVERS": "1.1.1.1,8.8.8.8",
                           "MAILMESH_LOG_FORMAT": "text"}, data_dir=tmp_path)
    env = settings_env(s)
    assert all(k.startswith("MAILMESH_") for k in env)
    assert load_settings(env=env) == s


def test_token_is_created_once_and_shared_through_the_data_dir(tmp_path: Path) -> None:
    a = load_settings(env={}, data_dir=tmp_path)
    token = a.token()
    assert len(token) >= 32
    assert load_settings(env={}, data_dir=tmp_path).token() == token
    assert stat.S_IMODE(os.stat(tmp_path / "internal.token").st_mode) == 0o600
    assert load_settings(env={"MAILMESH_INTERNAL_TOKEN": "explicit"}, data_dir=tmp_path).token() == "explicit"
