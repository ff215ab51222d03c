"""Processes of the benchmark, seen from the orchestrator: the server, children, /proc.

* :class:`BenchServer` runs ``python -m stackduck_trio serve`` on 127.0.0.1 and a
  free port (``--port 0 --ready-file``), like ``stackduck_trio.testing.ServerProcess``,
  with the backend chosen by ``--backend`` and an optional py-spy sampler attached
  during the measured windows;
* :class:`Child` runs one ``bench.procs`` role and speaks its line protocol;
* :func:`proc_cpu_seconds`, :func:`proc_rss_mb`, :func:`machine_cpu` read /proc.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Environment the server must not inherit from the shell running the benchmark.
_SCRUB = ("DATABASE_URL", "REDIS_URL", "SERVER_ADDR", "GRPC_PORT")


class BenchError(RuntimeError):
    """A scenario could not run (a process failed or timed out)."""


class NotApplicable(Exception):
    """The scenario does not apply to this backend: the table shows ``n/a (reason)``,
    and it does not count as a failure."""


# ---------------------------------------------------------------------------------------
# /proc
# ---------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, live and exited), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_mb(pid: int) -> dict[str, float]:
    """Current and peak resident set size, MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_mb" if key == "VmRSS" else "rss_peak_mb"] = int(value.split()[0]) / 1024
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


class Meter:
    """CPU of a process (or the sum over several: the servers of a cluster) and of the
    machine over a window: ``start()`` ... ``stop()``."""

    def __init__(self, pid: int, *more_pids: int) -> None:
        self.pids = (pid, *more_pids)
        self.t0 = 0.0
        self.cpu0: list[float] = []
        self.machine0 = (0.0, 0.0)

    def start(self) -> Meter:
        self.t0 = time.time()
        self.cpu0 = [proc_cpu_seconds(pid) for pid in self.pids]
        self.machine0 = machine_cpu()
        return self

    def stop(self) -> dict[str, Any]:
        each = [proc_cpu_seconds(pid) - c0 for pid, c0 in zip(self.pids, self.cpu0, strict=True)]
        busy, total = machine_cpu()
        d_total = total - self.machine0[1]
        out: dict[str, Any] = {
            "wall_s": time.time() - self.t0,
            "server_cpu_s": sum(each),
            "machine_busy_pct": 100.0 * (busy - self.machine0[0]) / d_total if d_total else 0.0,
        }
        if len(each) > 1:
            out["server_cpu_s_each"] = each
        return out


# ---------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------


class Child:
    """One ``python -m bench.procs ROLE CONFIG`` process and its line protocol."""

    def __init__(self, role: str, config: dict[str, Any], log_path: pathlib.Path) -> None:
        self.role = role
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the process
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.procs", role, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=REPO,
            env=env,
        )
        log.close()
        self._buffer = b""

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        """Wait for the line ``TAG {json}`` and return its JSON."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                got, _, data = line.decode().partition(" ")
                if got == tag:
                    return json.loads(data or "{}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise BenchError(f"{self.role}: no {tag} within {timeout:.0f} s\n{self._tail()}")
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(
                        f"{self.role} exited ({self.proc.returncode}) before {tag}\n{self._tail()}"
                    )
                self._buffer += chunk

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def finish(self, timeout: float = 30.0) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------


class Profiler:
    """py-spy attached to the server for one measured window (raw collapsed stacks)."""

    def __init__(self, pid: int, out: pathlib.Path, rate: int = 250, native: bool = True) -> None:
        exe = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
        if not os.path.exists(exe):
            raise BenchError("--profile needs py-spy: pip install py-spy (into the venv)")
        self.out = out
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                str(rate),
                "--output",
                str(out),
                *(["--native"] if native else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)  # let it attach

    def stop(self) -> pathlib.Path | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        return self.out if self.out.exists() else None


class BenchServer:
    """``python -m stackduck_trio serve`` for one scenario run.

    Args:
        backend: ``sqlite`` (a fresh data directory), ``memory`` (``--data-dir :memory:``)
            or ``postgres`` (``DATABASE_URL`` from the environment, with ``?schema=`` set
            to a fresh schema of this server's own, dropped by :meth:`cleanup`), or
            ``redis``: the production setup, that PostgreSQL schema plus ``REDIS_URL``
            from the environment under a key prefix of the server's own (deleted by
            :meth:`cleanup`).
        workdir: where the data directory, ready file and log live.
        extra_args: more ``serve`` flags (``--server-arg``).
        share_with: another server (``postgres`` or ``redis``) whose schema and Redis
            prefix this one uses too, so that they form a cluster; start it after that
            one. Only the owner (the server created without ``share_with``) drops the
            schema and deletes the keys in :meth:`cleanup`: stop every sharer first.
    """

    def __init__(
        self,
        backend: str,
        workdir: pathlib.Path,
        extra_args: list[str],
        *,
        share_with: BenchServer | None = None,
    ) -> None:
        if share_with is not None and (
            share_with.backend != backend or backend not in ("postgres", "redis")
        ):
            raise ValueError(f"a {backend} server cannot share a {share_with.backend} store")
        self.backend = backend
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.log_path = workdir / "server.log"
        self.data_dir = workdir / "data"
        self.owner = share_with is None
        self.schema = (
            f"stackduck_bench_{os.urandom(6).hex()}" if share_with is None else share_with.schema
        )
        self._schema_used = False

    def _database_url(self, with_schema: bool = True) -> str:
        url = os.environ.get("DATABASE_URL")
        if not url:
            raise BenchError("--backend postgres needs DATABASE_URL in the environment")
        parts = urllib.parse.urlsplit(url)
        query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "schema"]
        if with_schema:
            query.append(("schema", self.schema))
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))

    def cleanup(self) -> None:
        """Drop the PostgreSQL schema (and Redis keys) of this server (after :meth:`stop`);
        a server sharing another's leaves them to that owner."""
        if self.backend not in ("postgres", "redis") or not self._schema_used or not self.owner:
            return
        if self.backend == "redis":
            import redis

            with redis.Redis.from_url(os.environ["REDIS_URL"]) as client:
                keys = list(client.scan_iter(match=f"{self.schema}:*"))
                if keys:
                    client.delete(*keys)
        import psycopg

        with psycopg.connect(
            self._database_url(with_schema=False), autocommit=True, connect_timeout=10
        ) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    @property
    def address(self) -> str:
        assert self.port is not None
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until it accepts calls; returns the start-up time in seconds."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "ready.port"
        ready.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        if self.backend in ("postgres", "redis"):
            env["DATABASE_URL"] = self._database_url()
            self._schema_used = True
        if self.backend == "redis":
            url = os.environ.get("REDIS_URL")
            if not url:
                raise BenchError("--backend redis needs REDIS_URL (and DATABASE_URL)")
            env["REDIS_URL"] = url
            env["STACKDUCK_REDIS_PREFIX"] = self.schema
        data_dir = ":memory:" if self.backend == "memory" else str(self.data_dir)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stackduck_trio",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port or 0),
                "--data-dir",
                data_dir,
                "--env-file",
                str(self.workdir / "no.env"),
                "--ready-file",
                str(ready),
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
            env=env,
            cwd=REPO,
        )
        log.close()
        deadline = t0 + timeout
        while not ready.exists() or not ready.read_text().strip():
            if self.proc.poll() is not None:
                raise BenchError(
                    f"server exited with {self.proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"server not ready in {timeout:.0f} s")
            time.sleep(0.01)
        self.port = int(ready.read_text())
        return time.monotonic() - t0

    def stop(self, timeout: float = 120.0) -> float:
        """SIGTERM and wait for the graceful exit; returns the shutdown time."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory(self) -> dict[str, float]:
        return proc_rss_mb(self.pid)
