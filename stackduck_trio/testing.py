"""Helpers for tests (ours and our users'): start real Stackduck servers.

* :func:`open_test_server` runs a server inside the current trio run (fast;
  lets a test inject a clock or a backend) and yields its port;
* :class:`ServerProcess` runs ``stackduck-trio serve`` in a subprocess on a
  free port -- for tests that SIGKILL or SIGTERM it, or talk to it from
  blocking clients such as grpcio.

Both bind 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import trio

from ._config import ServerConfig, load_config
from ._server import serve
from ._store import Backend
from ._tier import QueueTier


@contextlib.asynccontextmanager
async def open_test_server(
    data_dir: str | os.PathLike[str] = ":memory:",
    *,
    backend: Backend | None = None,
    tier: QueueTier | None = None,
    **overrides: object,
) -> AsyncIterator[tuple[int, ServerConfig]]:
    """Run a server on 127.0.0.1 and a free port for the duration of the block.

    Yields ``(port, config)``. Leaving the block shuts the server down
    gracefully (drain, flush) unless the test cancelled it first. Servers
    given one ``tier`` (and backends on one database) form a cluster.
    """
    config = load_config(
        environ={},
        overrides={"host": "127.0.0.1", "port": 0, "data_dir": str(data_dir), **overrides},
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve(
                config, shutdown=shutdown, backend=backend, tier=tier, task_status=task_status
            )
        )
        try:
            yield port, config
        finally:
            shutdown.set()


class ServerProcess:
    """``stackduck-trio serve`` in a subprocess, on 127.0.0.1 and a free port.

    Args:
        data_dir: the server's data directory (SQLite lives there).
        args: extra CLI flags.
        env: extra environment variables.
        log_path: where the server's stderr goes (default: data_dir/server.log).
    """

    def __init__(
        self,
        data_dir: pathlib.Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        log_path: pathlib.Path | None = None,
    ) -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.args: Sequence[str] = args
        self.env = dict(env or {})
        self.log_path = log_path or self.data_dir / "server.log"
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        assert self.port is not None, "server not started"
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, port: int | None = None) -> ServerProcess:
        """Start and wait until the server accepts calls (reuses the port on restart)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ready = self.data_dir / "ready.port"
        ready.unlink(missing_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "SERVER_ADDR", "GRPC_PORT")
        }
        env.update(self.env)
        use_port = port if port is not None else (self.port or 0)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stackduck_trio",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(use_port),
                "--data-dir",
                str(self.data_dir),
                "--env-file",
                str(self.data_dir / "no.env"),
                "--ready-file",
                str(ready),
                *self.args,
            ],
            stdout=log,
            stderr=log,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"server not ready in {timeout} s:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        self.port = int(ready.read_text())
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
