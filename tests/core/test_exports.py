"""The package's public names: each defined once, in a private module, re-exported once.

In the style of trio's ``test_exports.py``: ``stackduck_core/__init__.py``
re-exports with ``from ._mod import X as X``; the private modules declare
what is public with ``__all__``. These tests keep the two in agreement.
"""

from __future__ import annotations
import __future__

import ast
import collections
import importlib
import pathlib
import types

import pytest

import stackduck_core

CORE = pathlib.Path(stackduck_core.__file__).parent
PRIVATE = sorted(p.stem for p in CORE.glob("_*.py") if p.stem != "__init__")
#: private modules allowed to have no __all__ (then every public definition counts)
NO_ALL_OK = {"_errors"}


def reexports() -> list[tuple[str, str, str | None]]:
    """``(module, name, asname)`` of every ``from ._module import ...`` in __init__."""
    tree = ast.parse((CORE / "__init__.py").read_text(encoding="utf-8"))
    found: list[tuple[str, str, str | None]] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            assert node.module is not None
            found.extend((node.module, alias.name, alias.asname) for alias in node.names)
    return found


def definitions(module: str) -> set[str]:
    """Names bound at the top level of a private module by def/class/assignment."""
    tree = ast.parse((CORE / f"{module}.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(f"stackduck_core.{name}")


def public_names(module: str) -> list[str]:
    """A private module's ``__all__``, or its public definitions if it has none."""
    mod = _module(module)
    declared = getattr(mod, "__all__", None)
    if declared is None:
        assert module in NO_ALL_OK, f"stackduck_core.{module} has no __all__"
        return sorted(n for n in definitions(module) if not n.startswith("_"))
    return list(declared)


def test_private_modules_exist() -> None:
    assert {"_backoff", "_errors", "_job", "_ordering", "_states"} <= set(PRIVATE)


def test_reexports_are_explicit_and_unique() -> None:
    entries = reexports()
    assert entries
    for module, name, asname in entries:
        assert module.startswith("_"), module
        assert asname == name, f"use 'from .{module} import {name} as {name}'"
    counts = collections.Counter(name for _, name, _ in entries)
    assert [name for name, n in counts.items() if n > 1] == []


def test_namespace_holds_exactly_the_reexports() -> None:
    exported = {name for _, name, _ in reexports()}
    public = {
        name
        for name, value in vars(stackduck_core).items()
        if not name.startswith("_") and not isinstance(value, __future__._Feature)
    }
    assert public == exported
    declared = getattr(stackduck_core, "__all__", None)
    if declared is not None:
        assert sorted(declared) == sorted(exported)


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, n, _ in reexports()])
def test_each_export_is_defined_once_in_its_module(module: str, name: str) -> None:
    assert name in definitions(module), f"{name} is not defined in {module}"
    # another module may have a private helper of the same name, not a public one
    declaring = [m for m in PRIVATE if name in getattr(_module(m), "__all__", ())]
    assert declaring in ([], [module])
    value = getattr(stackduck_core, name)
    assert value is getattr(_module(module), name)
    if isinstance(value, type | types.FunctionType):
        assert value.__module__ == f"stackduck_core.{module}"


@pytest.mark.parametrize("module", PRIVATE)
def test_module_public_names_are_all_reexported(module: str) -> None:
    names = public_names(module)
    assert len(names) == len(set(names)), f"duplicates in {module}.__all__"
    assert set(names) <= definitions(module), f"{module}.__all__ names something undefined"
    exported = {name for m, name, _ in reexports() if m == module}
    # both ways: nothing public is forgotten, nothing private is exported
    assert set(names) == exported


def test_checks_can_fail() -> None:
    """The helpers see what they must (guards against vacuous passes)."""
    assert "apply" in definitions("_states")
    assert "Job" not in definitions("_states")  # imported there, not defined
    assert "StackduckError" in public_names("_errors")
    assert ("_job", "Job", "Job") in reexports()
