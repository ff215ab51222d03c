"""Private, throw-away servers for fault tests: a Redis the tests may kill and restart.

:class:`PrivateRedis` runs ``redis-server`` on 127.0.0.1 and a free port, keeping nothing on
disk (``--save "" --appendonly no``), with its own working directory and log file. Tests
SIGKILL it (:meth:`PrivateRedis.kill`), restart it EMPTY on the same port
(:meth:`PrivateRedis.restart`), or freeze it (:meth:`PrivateRedis.freeze`, SIGSTOP). The
shared Redis on 6379 is never touched, nor is the shared PostgreSQL's lifecycle.

Use the ``private_redis`` fixture (import :func:`private_redis_fixture` into a test module:
it registers under the name ``private_redis``), or the class as a context manager. A missing
``redis-server`` binary FAILS the test, never skips it: CI must run these tests.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .test_backends import free_port

__all__ = ["PrivateRedis", "private_redis_fixture", "redis_server_binary"]

#: The shared Redis of the machine: a private one must never use its port.
SHARED_REDIS_PORT = 6379


def redis_server_binary() -> str:
    """The ``redis-server`` binary on PATH, or a clear test failure."""
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail(
            "redis-server not found on PATH: the Redis queue-tier tests start private Redis "
            "servers (Debian/Ubuntu: apt-get install redis-server)",
            pytrace=False,
        )
    return found


class PrivateRedis:
    """A throw-away ``redis-server`` on 127.0.0.1:<free port>; nothing is kept on disk.

    The port is chosen once: :meth:`restart` comes back on the same one (empty), as a
    crashed and restarted Redis would, so clients configured with :attr:`url` reconnect.
    """

    def __init__(self, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="sdredis-"))
        self.log = self.root / "redis.log"
        self.port = port if port is not None else free_port()
        while self.port == SHARED_REDIS_PORT:  # pragma: no cover - a free port is never 6379
            self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        """Start the server and wait until it answers PING (at most ``timeout`` s)."""
        assert not self.running, "this Redis is already running"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.root),
                "--logfile", str(self.log),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with {self.proc.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"redis-server on port {self.port} did not answer PING within {timeout} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)
        return self

    def ping(self, timeout: float = 0.5) -> bool:
        """Whether the server answers PING now (within ``timeout`` s)."""
        try:
            with self.client(timeout) as client:
                return bool(client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    @contextlib.contextmanager
    def client(self, timeout: float = 2.0) -> Iterator[redis.Redis]:
        """A synchronous client (answers decoded as text), closed at the end of the block."""
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=0,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),  # one attempt: a down server must answer fast
        )
        try:
            yield client
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL (a crash: whatever it held is gone) and reap the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen process dies as well, but tidily
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, timeout: float = 10.0) -> PrivateRedis:
        """Start again, EMPTY, on the same port (kills the running server first)."""
        self.kill()
        return self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self.running, "this Redis is not running"
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def cleanup(self) -> None:
        """Kill the server and delete its directory; safe to call more than once."""
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        try:
            return self.start() if not self.running else self
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


@pytest.fixture(name="private_redis")
def private_redis_fixture() -> Iterator[PrivateRedis]:
    """A started :class:`PrivateRedis`, killed and deleted at the end whatever happens."""
    with PrivateRedis() as server:
        yield server
