"""The import rule of docs/architecture.md: imports go one way, from the floor up.

Every import of the package is read from the source (those inside functions and under
``TYPE_CHECKING`` too), each module is placed on the floor of its room, and an import from a
lower floor to a higher one fails the test with the line that does it. A new room has to be
given a floor here (and in the architecture page) before its first import is accepted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stepdistill"

# Rooms on one floor may import each other (import_cycles.py keeps them free of circles).
FLOORS: dict[str, int] = {
    "__init__": 0, "families": 0,
    "config": 1, "toy": 1,
    "data": 2, "models": 2, "losses": 2, "sampling": 2,
    "methods": 3,
    "runconfig": 4,
    "harness": 5,
    "export": 6, "eval": 6,
    "lifecycle": 7, "bench": 7, "results": 7, "plan": 7,
    "train": 8, "cli": 8,
}


def _imported_modules(tree: ast.AST, package: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package:  # from stepdistill import cli
                yield node.lineno, [f"{package}.{a.name}" for a in node.names]
            elif node.module.startswith(package + "."):
                yield node.lineno, [node.module]
        elif isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names if a.name.startswith(package + ".")]


def upward_imports(root: Path, floors: dict[str, int]) -> list[str]:
    """``"<file>:<line> <room> (floor a) imports <module> (floor b)"`` for each import that runs up."""
    package = root.name
    found = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).with_suffix("")
        room = rel.parts[0]
        if room not in floors:
            found.append(f"{file.relative_to(root)}: room {room!r} has no floor in FLOORS")
            continue
        for lineno, modules in _imported_modules(ast.parse(file.read_text()), package):
            for module in modules:
                target = module.split(".")[1]
                if target == room:
                    continue
                if target not in floors:
                    found.append(f"{file.relative_to(root)}:{lineno} imports {module}: room {target!r} has no floor")
                elif floors[target] > floors[room]:
                    found.append(f"{file.relative_to(root)}:{lineno} {room} (floor {floors[room]}) imports "
                                 f"{module} (floor {floors[target]})")
    return found


def test_no_import_runs_up_a_floor():
    assert upward_imports(PACKAGE, FLOORS) == []


def test_every_room_of_the_package_has_a_floor():
    rooms = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert rooms == set(FLOORS)


@pytest.mark.parametrize(("source", "expected"), [
    ("from pkg.top import x\n", "low (floor 0) imports pkg.top (floor 1)"),
    ("def f():\n    import pkg.top.sub\n", "low (floor 0) imports pkg.top.sub (floor 1)"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n",
     "low (floor 0) imports pkg.top (floor 1)"),
    ("from pkg.nowhere import x\n", "room 'nowhere' has no floor"),
])
def test_the_checker_finds_an_import_that_runs_up(tmp_path, source, expected):
    root = tmp_path / "pkg"
    (root / "low").mkdir(parents=True)
    (root / "top").mkdir()
    (root / "low" / "__init__.py").write_text(source)
    (root / "top" / "__init__.py").write_text("from pkg.low import x\n")  # down: allowed
    found = upward_imports(root, {"low": 0, "top": 1})
    assert len(found) == 1 and expected in found[0], found
