"""protocol/ is sans-I/O: it imports no networking, async, threading-heavy or ML code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[1] / "protocol"
FORBIDDEN = ("websockets", "anyio", "asyncio", "socket", "torch", "diffusers")


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_protocol_sources_import_no_io_or_ml_module() -> None:
    for path in sorted(PROTOCOL.glob("*.py")):
        assert not _imported_roots(path) & set(FORBIDDEN), path.name


def test_importing_protocol_loads_none_of_them_even_indirectly() -> None:
    code = (
        "import importlib, pkgutil, sys, protocol\n"
        "for m in pkgutil.iter_modules(protocol.__path__):\n"
        "    importlib.import_module('protocol.' + m.name)\n"
        f"print(sorted(n for n in {FORBIDDEN!r} if n in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROTOCOL.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
