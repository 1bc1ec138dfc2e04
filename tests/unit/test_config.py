"""The typed settings: defaults, environment, TOML file, masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.config import load_settings, parse_listen
from mailgate.errors import ConfigError


def test_defaults_match_the_documented_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATA_DIR", "DATABASE_URL", "HTTP_LISTEN", "SMTP_LISTEN", "AGENT_DOMAIN"):
        monkeypatch.delenv(f"MAILGATE_{name}", raising=False)
    settings = load_settings()
    assert settings.data_dir == Path(".mailgate")
    assert settings.http_listen == "127.0.0.1:8025"
    assert settings.smtp_listen == "127.0.0.1:2525"
    assert settings.agent_domain == "agents.localhost"
    assert settings.effective_database_url == f"sqlite:///{Path('.mailgate/mailgate.db').resolve()}"


def test_environment_beats_the_toml_file_and_overrides_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text('agent_domain = "file.example"\nsmtp_listen = "127.0.0.1:2600"\n')
    assert load_settings(config).agent_domain == "file.example"
    monkeypatch.setenv("MAILGATE_AGENT_DOMAIN", "env.example")
    settings = load_settings(config, smtp_listen="127.0.0.1:2700")
    assert settings.agent_domain == "env.example"
    assert settings.smtp_listen == "127.0.0.1:2700"


def test_passwords_are_masked_when_shown() -> None:
    settings = load_settings(database_url="postgresql+psycopg://mail:hunter2@db.internal/mailgate")
    shown = settings.masked()
    assert "hunter2" not in str(shown)
    assert shown["database_url"] == "postgresql+psycopg://mail:***@db.internal/mailgate"


@pytest.mark.parametrize("bad", ["8025", "host:", "host:99999", ":x"])
def test_listen_addresses_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_listen(bad)
    with pytest.raises(ConfigError) as info:
        load_settings(http_listen=bad)
    assert info.value.code == "invalid_config"


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(tmp_path / "nope.toml")


def test_ipv6_listen_addresses_are_understood() -> None:
    assert parse_listen("[::1]:2525") == ("::1", 2525)
