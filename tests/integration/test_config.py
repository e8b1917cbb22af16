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
    ({"MULTIFLOW_STORE": "mysql://db/x"}, "store"),
    ({"MULTIFLOW_STORE": "sqlite://data/x.db"}, "store"),  # two slashes: not a path
    ({"MULTIFLOW_UPLOAD_MAX_BYTES": "-1"}, "upload_max_bytes"),
    ({"MULTIFLOW_DISK_FREE_MIN_BYTES": "-5"}, "disk_free_min_bytes"),
    ({"MULTIFLOW_LOG_FILE_MAX_BYTES": "-1"}, "log_file_max_bytes"),
    ({"MULTIFLOW_LOG_FILE_BACKUPS": "0"}, "log_file_backups"),
    ({"MULTIFLOW_ARCHIVE_RETENTION_DAYS": "1000000"}, "archive_retention_days"),
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


def test_an_empty_store_in_a_dotenv_file_means_the_default(tmp_path: Path) -> None:
    """`MULTIFLOW_STORE=` (left empty in .env) is the default store, not a broken URL."""
    dotenv = write(tmp_path / ".env", "MULTIFLOW_STORE=\n")
    assert load_settings(None, env={}, env_file=dotenv).store is None


def test_config_masks_the_database_password_and_webhook_tokens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store URL's password and a webhook URL's token show as ****."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "multiflow.toml",
          'store = "postgresql://mf:hunter2@db:5432/jobs?schema=prod"\n'
          '[[webhooks]]\nname = "crm"\nsecret = "s"\n'
          'url = "https://crm.example/hook?token=t0ps3cret"\n')
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "t0ps3cret" not in result.output
    assert "postgresql://mf:****@db:5432/jobs?schema=prod" in result.output


def test_a_scanner_connection_from_the_environment_keeps_the_tomls_limits(
        tmp_path: Path) -> None:
    """MULTIFLOW_SCANNER_SOCKET replaces the scanner's connection, not its other settings
    (the toml's stream_max_bytes went back to its default, and bigger files were refused)."""
    toml = write(tmp_path / "m.toml", '[scanner]\nhost = "10.0.0.5"\nport = 3310\n'
                                      "stream_max_bytes = 104857600\n")
    settings = load_settings(toml, env={"MULTIFLOW_SCANNER_SOCKET": "/run/clamd.ctl"},
                             env_file=None)
    assert settings.scanner is not None
    assert settings.scanner.socket_path == "/run/clamd.ctl"
    assert settings.scanner.stream_max_bytes == 104857600


def test_offline_commands_find_the_data_dir_of_the_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rebuild, audit verify and replay use multiflow.toml's data_dir, as `multiflow run`
    does (they made an empty ./data/multiflow.db and reported 0 events)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTIFLOW_DATA_DIR", raising=False)
    write(tmp_path / "multiflow.toml", 'data_dir = "srv-data"\n')
    import anyio

    from adapters import Kernel

    async def one_job() -> None:
        async with Kernel.open(data_dir=tmp_path / "srv-data") as kernel:
            await kernel.store.append("j1", [created_event()], 0)

    anyio.run(one_job)
    for command in (["audit", "verify"], ["rebuild"], ["replay", "--at", "1"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 0, (command, result.output)
    assert "1 events" in CliRunner().invoke(main, ["rebuild"]).output
    assert not (tmp_path / "data").exists()


def created_event() -> object:
    from datetime import UTC, datetime

    from kernel.events import JobCreated

    return JobCreated(job_id="j1", at=datetime.now(UTC), workflow_name="wf",
                      file_path="wf/input/a.txt")


def test_new_workflow_uses_the_workflows_dir_setting_and_refuses_module_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`multiflow new-workflow` writes where `multiflow run` looks (workflows_dir), and
    refuses a name whose own test would import another module (csv, kernel ...)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MULTIFLOW_WORKFLOWS_DIR", raising=False)
    write(tmp_path / "multiflow.toml", 'workflows_dir = "flows"\n')
    made = CliRunner().invoke(main, ["new-workflow", "ocr"])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "flows/ocr/processor.py").is_file()
    for name in ("csv", "json", "kernel", "adapters"):
        refused = CliRunner().invoke(main, ["new-workflow", name])
        assert refused.exit_code == 2 and "module" in refused.output, (name, refused.output)
        assert not (tmp_path / "flows" / name).exists()
