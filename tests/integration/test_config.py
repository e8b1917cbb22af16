"""Settings: sources and their precedence, validation, per-workflow sections, masking."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from adapters.cli import main
from adapters.config import SettingsError, load_settings, masked, workflow_config
from adapters.runner import check_bind
from kernel.config import WorkflowConfig


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_is_toml_then_dotenv_then_environment_then_flags(tmp_path: Path) -> None:
    """Each source overrides the weaker ones, key by key."""
    toml = write(tmp_path / "multiflow.toml", "port = 1000\nconcurrency = 2\nhost = '127.0.0.2'\n")
    dotenv = write(tmp_path / ".env", "MULTIFLOW_PORT=2000\nMULTIFLOW_CONCURRENCY=3\n")
    settings = load_settings(toml, env={"MULTIFLOW_PORT": "3000"}, env_file=dotenv,
                             overrides={"port": None})
    assert (settings.host, settings.concurrency, settings.port) == ("127.0.0.2", 3, 3000)
    flagged = load_settings(toml, env={"MULTIFLOW_PORT": "3000"}, env_file=dotenv,
                            overrides={"port": 4000})
    assert flagged.port == 4000


def test_lists_come_comma_separated_from_the_environment(tmp_path: Path) -> None:
    """MULTIFLOW_API_TOKENS holds several name:secret tokens."""
    settings = load_settings(None, env={"MULTIFLOW_API_TOKENS": "ci:abc, ops:def"},
                             env_file=None)
    assert settings.api_tokens == ["ci:abc", "ops:def"]
    assert masked(settings)["api_tokens"] == ["ci:****", "ops:****"]


@pytest.mark.parametrize(("env", "key"), [
    ({"MULTIFLOW_PORT": "not-a-port"}, "port"),
    ({"MULTIFLOW_PORT": "70000"}, "port"),
    ({"MULTIFLOW_CONCURRENCY": "0"}, "concurrency"),
    ({"MULTIFLOW_AUTH": "maybe"}, "auth"),
])
def test_an_invalid_setting_names_its_key(env: dict[str, str], key: str) -> None:
    """A bad global setting stops start-up with a message naming the key."""
    with pytest.raises(SettingsError, match=key):
        load_settings(None, env=env, env_file=None)


def test_unknown_keys_in_the_toml_are_refused(tmp_path: Path) -> None:
    """A typo in multiflow.toml is an error, not a silently ignored key."""
    toml = write(tmp_path / "m.toml", "prot = 8000\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(toml, env={}, env_file=None)


def test_a_workflow_section_overrides_its_config_or_is_reported(tmp_path: Path) -> None:
    """[workflows.NAME] overrides the workflow's own config; a bad one names the workflow."""
    toml = write(tmp_path / "m.toml", "[workflows.thumbs]\nconcurrency = 4\n"
                                      "[workflows.broken]\nmax_attempts = 'many'\n")
    settings = load_settings(toml, env={}, env_file=None)
    base = WorkflowConfig(timeout_s=10)
    assert workflow_config(settings, "thumbs", base) == WorkflowConfig(timeout_s=10, concurrency=4)
    assert workflow_config(settings, "other", base) is base
    with pytest.raises(SettingsError, match=r"\[workflows.broken\]"):
        workflow_config(settings, "broken", base)


def test_auth_off_is_refused_unless_bound_to_loopback() -> None:
    """auth = off on 0.0.0.0 stops start-up; on 127.0.0.1 it is allowed."""
    check_bind(load_settings(None, env={"MULTIFLOW_AUTH": "off"}, env_file=None))
    exposed = load_settings(None, env={"MULTIFLOW_AUTH": "off", "MULTIFLOW_HOST": "0.0.0.0"},
                            env_file=None)
    with pytest.raises(SettingsError, match="refused"):
        check_bind(exposed)


def test_run_exits_2_on_a_bad_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`multiflow run` with an invalid setting prints why and exits with code 2."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--port", "0"])
    assert result.exit_code == 2 and "port" in result.output


def test_config_command_masks_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`multiflow config` shows the effective settings without the tokens' secrets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MULTIFLOW_API_TOKENS", "ci:supersecret")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0
    assert "ci:****" in result.output and "supersecret" not in result.output
