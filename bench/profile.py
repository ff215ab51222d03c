"""Summaries of py-spy profiles (``--format raw``: collapsed stacks, one ``stack count`` a line).

``python -m bench.profile FILE.raw [...]`` prints, for the merged files:

* where the time goes, by the *category* of the innermost Python frame (h2/hpack
  framing, purerpc, protobuf, our RPC layer, service, broker, core, store/SQLite,
  trio's scheduler and I/O, ...);
* the functions with the most *self* time (innermost frame; time in C code, e.g.
  protobuf's or sqlite3's, counts for the Python line that called it);
* the functions with the most *inclusive* time (anywhere on the stack).

py-spy's own idle filter lets many waiting samples through, so ``bench.run``
records with ``--native`` and this module sorts samples itself: a stack with a
native frame that blocks (``epoll_wait``/``select_epoll_poll``, GIL and lock waits
under ``pthread_cond_*``/``sem_*wait``/futex, ``fsync``/``fdatasync``, sleeps) is
a *wait* sample (reported apart, as a share of all samples); every other sample
is *CPU*, attributed to its innermost Python frame (so time in C code, e.g.
sqlite3's or protobuf's, counts for the Python line that called it). CPU shares
are of the CPU samples: shares of the server's CPU time in the window (the main
trio thread and the SQLite writer thread together).
"""

from __future__ import annotations

import collections
import re
import sys
from collections.abc import Iterable
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: (substring of the shortened file path, category); first match wins.
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("stackduck_trio/_rpc.py", "stackduck _rpc (our gRPC layer)"),
    ("stackduck_trio/_service.py", "stackduck _service (pb <-> core)"),
    ("stackduck_trio/_broker.py", "stackduck _broker"),
    ("stackduck_trio/_store.py", "stackduck _store (SQLite / group commit)"),
    ("stackduck_trio/", "stackduck_trio (other)"),
    ("stackduck_core/", "stackduck_core (rules)"),
    ("sqlite3", "stackduck _store (SQLite / group commit)"),
    ("h2/", "h2 (HTTP/2 state machine)"),
    ("hpack/", "hpack (header compression)"),
    ("hyperframe/", "hyperframe (HTTP/2 frames)"),
    ("purerpc/", "purerpc (gRPC framing)"),
    ("google/protobuf", "protobuf"),
    ("trio/_core/_io", "trio I/O (epoll)"),
    ("trio/_core/", "trio scheduler"),
    ("trio/_socket.py", "trio socket"),
    ("trio/", "trio (other)"),
    ("anyio/", "anyio"),
    ("attr/", "attrs"),
    ("attrs/", "attrs"),
    ("<attrs generated", "attrs"),
    ("json/", "json"),
    ("uuid.py", "uuid"),
    ("logging/", "logging"),
    ("threading.py", "threads"),
    ("queue.py", "threads"),
    ("concurrent/", "threads"),
    ("enum.py", "enum"),
)
#: Frames on (nearly) every stack: left out of the inclusive list.
_ROOTS = frozenset(
    {
        "_run_module_as_main",
        "_run_code",
        "<module>",
        "main",
        "run",
        "_run_serve",
        "unrolled_run",
        "_bootstrap",
        "_bootstrap_inner",
    }
)


def category(file: str) -> str:
    for needle, name in _CATEGORIES:
        if needle in file:
            return name
    return "other: " + file.rsplit("/", 1)[-1]


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


#: (substring of a native frame's function name, wait class); first match wins.
_WAITS: tuple[tuple[str, str], ...] = (
    ("epoll_wait", "idle: epoll (waiting for I/O)"),
    ("select_epoll_poll", "idle: epoll (waiting for I/O)"),
    ("fdatasync", "wait: fsync/fdatasync (disk)"),
    ("fsync", "wait: fsync/fdatasync (disk)"),
    ("take_gil", "wait: GIL (the other thread runs Python)"),
    ("pthread_cond_timedwait", "wait: GIL or lock"),
    ("pthread_cond_wait", "wait: GIL or lock"),
    ("PyThread_acquire_lock", "wait: lock (idle thread)"),
    ("sem_wait", "wait: lock (idle thread)"),
    ("sem_timedwait", "wait: lock (idle thread)"),
    ("sem_clockwait", "wait: lock (idle thread)"),
    ("futex_wait", "wait: lock (idle thread)"),
    ("nanosleep", "idle: sleep"),
    ("poll", "idle: poll"),
)


def is_python(file: str) -> bool:
    return file.endswith(".py") or file.startswith("<")


def wait_class(frames: list[tuple[str, str]]) -> str | None:
    if frames and frames[-1][0] == "read" and not is_python(frames[-1][1]):
        # a blocking read(2) (sockets are read with recv, non-blocking): a pipe, idle
        return "idle: blocking read (pipe)"
    for func, file in reversed(frames):
        if is_python(file):
            continue
        for needle, name in _WAITS:
            if needle in func:
                return name
    return None


def parse(lines: Iterable[str]) -> list[tuple[list[tuple[str, str]], int]]:
    """Stacks as lists of (function, file), outermost first, with their sample counts."""
    stacks = []
    for raw in lines:
        raw = raw.rstrip("\n")
        if not raw:
            continue
        stack_text, _, count_text = raw.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = []
        for frame in stack_text.split(";"):
            m = _FRAME.match(frame)
            if m:
                frames.append((m["func"], _short(m["file"])))
            else:
                frames.append((frame, ""))
        stacks.append((frames, count))
    return stacks


def summarize(paths: Iterable[str], top: int = 20, rate: int | None = None) -> dict[str, Any]:
    stacks: list[tuple[list[tuple[str, str]], int]] = []
    for path in paths:
        with open(path) as f:
            stacks.extend(parse(f))
    total = sum(c for _, c in stacks)
    waits: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        waiting = wait_class(frames)
        if waiting is not None:
            waits[waiting] += count
            continue
        py = [f for f in frames if is_python(f[1])] or frames
        if not py:
            continue
        func, file = py[-1]
        self_time[f"{func} ({file})"] += count
        categories[category(file)] += count
        for key in {f"{fn} ({fl})" for fn, fl in py if fn not in _ROOTS}:
            inclusive[key] += count
    cpu = total - sum(waits.values())

    def share(counter: collections.Counter[str], n: int, of: int) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / of) for k, v in counter.most_common(n)] if of else []

    out: dict[str, Any] = {
        "samples": total,
        "cpu_samples": cpu,
        "waits": share(waits, 10, total),
        "categories": share(categories, 30, cpu),
        "self": share(self_time, top, cpu),
        "inclusive": share(inclusive, top, cpu),
    }
    if rate:
        out["cpu_seconds_sampled"] = cpu / rate
    return out


def format_summary(summary: dict[str, Any], title: str = "", limit: int = 15) -> str:
    sampled = summary.get("cpu_seconds_sampled")
    out = [
        f"== profile {title}: {summary['samples']} samples, {summary.get('cpu_samples', '?')} on CPU"
        + (f" (~{sampled:.2f} CPU-s)" if sampled is not None else "")
        + " =="
    ]
    for heading, key in (
        ("waiting (share of all samples; not CPU)", "waits"),
        ("CPU by category (innermost Python frame)", "categories"),
        ("CPU: top functions, self (incl. C code they call)", "self"),
        ("CPU: top functions, inclusive", "inclusive"),
    ):
        out.append(f"-- {heading}")
        for name, share in summary.get(key, [])[:limit]:
            out.append(f"  {share:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m bench.profile FILE.raw [FILE.raw ...]")
    print(format_summary(summarize(argv, top=30), ", ".join(argv), limit=30))


if __name__ == "__main__":
    main(sys.argv[1:])
