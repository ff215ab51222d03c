"""Server configuration: defaults < ``.env`` file < environment < CLI flags.

The seed's variables keep their meaning (``DATABASE_URL``, ``REDIS_URL``,
``SERVER_ADDR``, with ``GRPC_PORT`` as an alias for the port); everything else
is ``STACKDUCK_<NAME>``. :data:`SETTINGS` is the single list from which the
CLI flags, the environment names and the README table are derived.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Final

import attrs

from stackduck_core import parse_limits


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message says which."""


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything ``serve()`` needs. See :data:`SETTINGS` for the meaning of each."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: str = "./stackduck-data"
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "stackduck"
    queue: str = "auto"
    http_addr: str = ""
    metrics_addr: str = ""
    tokens: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    max_payload_bytes: int = 1024 * 1024
    lease_seconds: float = 60.0
    heartbeat_interval: float = 2.0
    grace_period: float = 10.0
    write_timeout: float = 10.0
    durability: str = "strict"
    max_lost_leases: int = 5
    sqlite_synchronous: str = "full"
    log_format: str = "human"
    log_level: str = "info"
    log_jobs: str = "off"
    limits: str = ""
    retain_completed: float = 86_400.0
    retain_dead: float = 7 * 86_400.0

    @property
    def sqlite_path(self) -> str:
        """The SQLite file, or ``:memory:`` for a store that keeps nothing."""
        if self.data_dir == ":memory:":
            return ":memory:"
        return str(pathlib.Path(self.data_dir) / "stackduck.db")


@attrs.frozen
class Setting:
    """One configuration knob: its field, flag, environment name, parser, help."""

    field: str
    env: str
    parse: Callable[[str], object]
    help: str
    metavar: str = "VALUE"


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a finite number greater than 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text.lower()

    return parse


def _metrics_addr(text: str) -> str:
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("HOST:PORT, e.g. 127.0.0.1:9090 (port 0 picks a free one)")
    return text


def _key_prefix(text: str) -> str:
    if not text or len(text) > 64 or not all(c.isalnum() or c in "-_.:" for c in text):
        raise ValueError("1 to 64 characters among letters, digits and - _ . :")
    return text


def _limits(text: str) -> str:
    parse_limits(text)  # raises ValueError naming the bad entry
    return text


_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def _retention(text: str) -> float:
    """Seconds, or a number with a unit s/m/h/d (``24h``, ``7d``); 0 keeps forever."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    value = float(text[:-1] if unit else text) * (unit or 1.0)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError("must be 0 (keep forever) or a positive duration like 3600, 24h, 7d")
    return value


def _optional(text: str) -> str | None:
    return text or None


SETTINGS: Final = (
    Setting("host", "STACKDUCK_HOST", str, "address to bind (0.0.0.0 for every interface)", "HOST"),
    Setting("port", "GRPC_PORT", _port, "gRPC port; 0 picks a free one", "PORT"),
    Setting(
        "data_dir",
        "STACKDUCK_DATA_DIR",
        str,
        "directory of the embedded SQLite store; ':memory:' keeps nothing",
        "DIR",
    ),
    Setting(
        "database_url",
        "DATABASE_URL",
        _optional,
        "PostgreSQL record store (instead of SQLite)",
        "URL",
    ),
    Setting(
        "redis_url",
        "REDIS_URL",
        _optional,
        "Redis queue tier shared by several instances (needs DATABASE_URL)",
        "URL",
    ),
    Setting(
        "redis_prefix",
        "STACKDUCK_REDIS_PREFIX",
        _key_prefix,
        "prefix of every Redis key (clusters sharing one Redis need distinct ones)",
        "PREFIX",
    ),
    Setting(
        "durability",
        "STACKDUCK_DURABILITY",
        _choice("strict", "buffered"),
        "while the record store is down: strict refuses new jobs (UNAVAILABLE); buffered "
        "accepts them into the queue and an in-memory outbox written when it is back",
        "MODE",
    ),
    Setting(
        "queue",
        "STACKDUCK_QUEUE",
        _choice("auto", "memory", "redis", "postgres"),
        "queue tier: auto (redis with REDIS_URL, else memory), memory (one instance), "
        "redis, or postgres (instances share the DATABASE_URL store without Redis)",
        "TIER",
    ),
    Setting(
        "http_addr",
        "STACKDUCK_HTTP_ADDR",
        _metrics_addr,
        "serve the web dashboard, its JSON API and Prometheus /metrics on "
        "http://HOST:PORT/ (unset: off)",
        "HOST:PORT",
    ),
    Setting(
        "metrics_addr",
        "STACKDUCK_METRICS_ADDR",
        _metrics_addr,
        "old name of --http-addr / STACKDUCK_HTTP_ADDR (same listener)",
        "HOST:PORT",
    ),
    Setting(
        "tokens",
        "STACKDUCK_TOKENS",
        _tokens,
        "comma-separated bearer tokens; when set every call needs one",
        "T1,T2",
    ),
    Setting("tls_cert", "STACKDUCK_TLS_CERT", _optional, "TLS certificate chain (PEM)", "FILE"),
    Setting("tls_key", "STACKDUCK_TLS_KEY", _optional, "TLS private key (PEM)", "FILE"),
    Setting(
        "max_message_bytes",
        "STACKDUCK_MAX_MESSAGE_BYTES",
        _positive_int,
        "largest gRPC message accepted",
        "BYTES",
    ),
    Setting(
        "max_payload_bytes",
        "STACKDUCK_MAX_PAYLOAD_BYTES",
        _positive_int,
        "largest job payload accepted",
        "BYTES",
    ),
    Setting(
        "lease_seconds",
        "STACKDUCK_LEASE_SECONDS",
        _positive_float,
        "default lease of a delivered job; workers extend it for long jobs",
        "SECONDS",
    ),
    Setting(
        "heartbeat_interval",
        "STACKDUCK_HEARTBEAT_INTERVAL",
        _positive_float,
        "seconds between heartbeats on idle worker streams",
        "SECONDS",
    ),
    Setting(
        "grace_period",
        "STACKDUCK_GRACE_PERIOD",
        _positive_float,
        "on SIGTERM/SIGINT, how long running jobs may finish before requeue",
        "SECONDS",
    ),
    Setting(
        "write_timeout",
        "STACKDUCK_WRITE_TIMEOUT",
        _positive_float,
        "how long a request waits for the record store before UNAVAILABLE",
        "SECONDS",
    ),
    Setting(
        "max_lost_leases",
        "STACKDUCK_MAX_LOST_LEASES",
        _positive_int,
        "poison-pill guard: lost leases before a job is dead-lettered",
        "N",
    ),
    Setting(
        "sqlite_synchronous",
        "STACKDUCK_SQLITE_SYNCHRONOUS",
        _choice("full", "normal"),
        "full survives OS crashes; normal only process crashes (faster)",
        "MODE",
    ),
    Setting("log_format", "STACKDUCK_LOG_FORMAT", _choice("human", "json"), "log format", "FMT"),
    Setting(
        "limits",
        "STACKDUCK_LIMITS",
        _limits,
        "rate and concurrency limits per job type, applied at start (changeable at run time): "
        "'email:rate=50,burst=100;reports:max_running=2'",
        "SPEC",
    ),
    Setting(
        "retain_completed",
        "STACKDUCK_RETAIN_COMPLETED",
        _retention,
        "delete completed and cancelled jobs from the record store this long after they "
        "ended (seconds or 30m/24h/7d; 0 keeps them forever)",
        "AGE",
    ),
    Setting(
        "retain_dead",
        "STACKDUCK_RETAIN_DEAD",
        _retention,
        "delete dead-lettered jobs this long after they died (0 keeps them forever)",
        "AGE",
    ),
    Setting(
        "log_jobs",
        "STACKDUCK_LOG_JOBS",
        _choice("off", "on"),
        "log every job lifecycle event (logger stackduck.jobs: job_id, job_type, status, "
        "attempt, worker_id, lease_id)",
        "on|off",
    ),
    Setting(
        "log_level",
        "STACKDUCK_LOG_LEVEL",
        _choice("debug", "info", "warning", "error"),
        "log level",
        "LEVEL",
    ),
)


def read_env_file(path: pathlib.Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _split_addr(text: str) -> tuple[str | None, str]:
    # SERVER_ADDR is "host:port", "[v6]:port" or a bare port (the seed's docs)
    if text.isdigit():
        return None, text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"SERVER_ADDR={text!r}: expected HOST:PORT or PORT")
    return host.strip("[]"), port


def load_config(
    *,
    environ: Mapping[str, str] | None = None,
    env_file: pathlib.Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> ServerConfig:
    """Build a :class:`ServerConfig`.

    Args:
        environ: the environment (``os.environ`` when ``None``).
        env_file: a ``.env`` file; its values apply where the environment has none.
        overrides: already parsed values (CLI flags), which win over everything.

    Raises:
        ConfigError: naming the variable or flag and what is wrong with it.
    """
    env: dict[str, str] = {}
    if env_file is not None and env_file.exists():
        env.update(read_env_file(env_file))
    env.update(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    if env.get("SERVER_ADDR"):
        host, port = _split_addr(env["SERVER_ADDR"])
        if host is not None:
            values["host"] = host
        env["GRPC_PORT"] = port  # SERVER_ADDR wins over its GRPC_PORT alias
    for setting in SETTINGS:
        text = env.get(setting.env)
        if text is None:
            continue
        try:
            values[setting.field] = setting.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{setting.env}={text!r}: {exc}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = ServerConfig(**values)  # type: ignore[arg-type]
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    if config.metrics_addr and config.http_addr and config.metrics_addr != config.http_addr:
        raise ConfigError(
            f"STACKDUCK_HTTP_ADDR (--http-addr) is {config.http_addr!r} but its old name "
            f"STACKDUCK_METRICS_ADDR (--metrics-addr) is {config.metrics_addr!r}: "
            "one HTTP listener serves both, set only one"
        )
    if config.metrics_addr and not config.http_addr:
        config = attrs.evolve(config, http_addr=config.metrics_addr)
    return config
