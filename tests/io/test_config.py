"""Configuration: defaults < .env < environment < flags, and precise errors."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from stackduck_trio._config import SETTINGS, ConfigError, ServerConfig, load_config, read_env_file
from stackduck_trio._server import make_backend
from stackduck_trio._store import MemoryBackend, SqliteBackend


def test_defaults_are_the_embedded_server() -> None:
    config = load_config(environ={})
    assert config == ServerConfig()
    assert (config.host, config.port) == ("127.0.0.1", 50051)
    assert isinstance(make_backend(config), SqliteBackend)
    assert isinstance(
        make_backend(load_config(environ={}, overrides={"data_dir": ":memory:"})), MemoryBackend
    )


def test_precedence(tmp_path: pathlib.Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nexport GRPC_PORT=6000\nSTACKDUCK_LEASE_SECONDS='90'\nSTACKDUCK_TOKENS=a, b\n"
    )
    config = load_config(environ={"GRPC_PORT": "7000"}, env_file=env_file)
    assert config.port == 7000  # environment beats .env
    assert config.lease_seconds == 90.0 and config.tokens == ("a", "b")
    config = load_config(environ={"GRPC_PORT": "7000"}, env_file=env_file, overrides={"port": 8000})
    assert config.port == 8000  # flags beat everything


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [("127.0.0.1:50052", "127.0.0.1", 50052), ("50053", "127.0.0.1", 50053), ("[::1]:9", "::1", 9)],
)
def test_server_addr_of_the_seed(value: str, host: str, port: int) -> None:
    config = load_config(environ={"SERVER_ADDR": value, "GRPC_PORT": "1"})
    assert (config.host, config.port) == (host, port)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"GRPC_PORT": "70000"}, "GRPC_PORT='70000': must be between 0 and 65535"),
        ({"GRPC_PORT": "x"}, "GRPC_PORT='x'"),
        ({"STACKDUCK_LEASE_SECONDS": "0"}, "greater than 0"),
        ({"STACKDUCK_GRACE_PERIOD": "inf"}, "must be a finite number"),
        ({"STACKDUCK_LOG_FORMAT": "xml"}, "must be one of human, json"),
        ({"SERVER_ADDR": "nohost:"}, "SERVER_ADDR"),
        ({"STACKDUCK_TLS_CERT": "c.pem"}, "TLS needs both"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(environ=environ)


def test_env_file_syntax_error(tmp_path: pathlib.Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("JUSTAWORD\n")
    with pytest.raises(ConfigError, match=r"\.env:1: expected KEY=VALUE"):
        read_env_file(env_file)


def test_backend_and_queue_combinations_are_checked() -> None:
    # DATABASE_URL selects the PostgreSQL record store (no I/O until it is opened)...
    backend = make_backend(load_config(environ={"DATABASE_URL": "postgresql://x"}))
    assert backend.kind == "postgres"
    with pytest.raises(ConfigError, match="not a valid PostgreSQL URL"):
        make_backend(load_config(environ={"DATABASE_URL": "postgresql://x:notaport/db"}))
    # A shared queue tier needs a shared record store.
    with pytest.raises(ConfigError, match="redis queue tier needs DATABASE_URL"):
        make_backend(load_config(environ={"REDIS_URL": "redis://x"}))
    with pytest.raises(ConfigError, match="postgres queue tier needs DATABASE_URL"):
        make_backend(load_config(environ={"STACKDUCK_QUEUE": "postgres"}))
    with pytest.raises(ConfigError, match="needs REDIS_URL"):
        make_backend(load_config(environ={"STACKDUCK_QUEUE": "redis"}))
    for queue in ("memory", "postgres"):
        environ = {"DATABASE_URL": "postgresql://x", "REDIS_URL": "redis://x"}
        with pytest.raises(ConfigError, match=f"REDIS_URL is set but STACKDUCK_QUEUE={queue}"):
            make_backend(load_config(environ={**environ, "STACKDUCK_QUEUE": queue}))
    both = {"DATABASE_URL": "postgresql://x", "REDIS_URL": "redis://x"}
    assert make_backend(load_config(environ=both)).kind == "postgres"


def test_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stackduck_trio", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for setting in SETTINGS:
        assert setting.env in out and f"--{setting.field.replace('_', '-')}" in out


def test_bad_flag_exits_2_with_a_message(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stackduck_trio",
            "serve",
            "--port",
            "-5",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--port='-5': must be between 0 and 65535" in result.stderr


def test_readme_configuration_table_matches_settings() -> None:
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in readme, f"{setting.env} missing from the README table"
