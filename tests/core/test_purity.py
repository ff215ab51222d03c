"""The core does no I/O: no module of stackduck_core imports an I/O library.

Checking ``sys.modules`` cannot work (pytest itself imported ``os`` and
``time``), so the check reads the source: every ``import`` statement,
including those nested in functions or ``if`` blocks, and every literal
``__import__("x")`` / ``importlib.import_module("x")`` call.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import stackduck_core

FORBIDDEN = frozenset(
    {
        "trio",
        "trio_asyncio",
        "purerpc",
        "redis",
        "psycopg",
        "psycopg_pool",
        "sqlite3",
        "time",
        "random",
        "os",
        "socket",
        "asyncio",
        "anyio",
        "grpc",
        "threading",
        "subprocess",
    }
)

CORE = pathlib.Path(stackduck_core.__file__).parent
CORE_FILES = sorted(CORE.rglob("*.py"))


def forbidden_imports(source: str, filename: str = "<snippet>") -> list[str]:
    """``"line: module"`` for every forbidden import in ``source``."""
    found: list[str] = []

    def note(node: ast.AST, module: str) -> None:
        top = module.split(".")[0]
        if top in FORBIDDEN:
            found.append(f"{getattr(node, 'lineno', 0)}: {module}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                note(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module is not None:
                note(node, node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if (
                name in ("__import__", "import_module")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                note(node, first.value)
    return found


def test_the_core_has_modules() -> None:
    names = {path.name for path in CORE_FILES}
    assert {"__init__.py", "_job.py", "_states.py", "_backoff.py", "_ordering.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=[p.name for p in CORE_FILES])
def test_core_module_is_pure(path: pathlib.Path) -> None:
    assert forbidden_imports(path.read_text(encoding="utf-8"), str(path)) == []


# -- the checker itself must be able to fail ---------------------------------


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("import time", ["1: time"]),
        ("import os.path", ["1: os.path"]),
        ("import json, socket as s", ["1: socket"]),
        ("from random import Random", ["1: random"]),
        ("from trio.lowlevel import checkpoint", ["1: trio.lowlevel"]),
        ("import trio_asyncio", ["1: trio_asyncio"]),
        ("from psycopg_pool import AsyncConnectionPool", ["1: psycopg_pool"]),
        ("import grpc.aio", ["1: grpc.aio"]),
        (
            "def now():\n    import time\n    return time.time()",
            ["2: time"],
        ),
        (
            "class C:\n    def m(self):\n        if True:\n            from asyncio import sleep",
            ["4: asyncio"],
        ),
        ("try:\n    import anyio\nexcept ImportError:\n    pass", ["2: anyio"]),
        ("mod = __import__('subprocess')", ["1: subprocess"]),
        ("import importlib\nm = importlib.import_module('threading')", ["2: threading"]),
        ("import sqlite3\nimport redis", ["1: sqlite3", "2: redis"]),
    ],
)
def test_checker_catches_violations(snippet: str, expected: list[str]) -> None:
    assert forbidden_imports(snippet) == expected


@pytest.mark.parametrize(
    "snippet",
    [
        "import json, math, datetime, heapq",
        "import attrs",
        "from . import _job",
        "from .time import something",  # a sibling module, not the stdlib
        "from ._ordering import SequenceClock",
        "import timeit",  # shares a prefix only
        "import randomness",
        "from typing import TYPE_CHECKING",
        "x = 'import os'",
        "getattr(obj, 'import_module')",
    ],
)
def test_checker_allows_pure_imports(snippet: str) -> None:
    assert forbidden_imports(snippet) == []
