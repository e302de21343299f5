"""The tree shows the design: imports point down only, the math imports only torch, files stay small.

cli -> orchestrator -> services/common, rl, quartet.v1. Services never import the orchestrator, the
CLI or the demo tooling; the orchestrator never imports the CLI or the demo; `rl` imports nothing
of ours but itself.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ("rl", "services", "orchestrator", "cli", "demo")

# package -> the first-party top-level packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "rl": {"services", "orchestrator", "cli", "demo", "quartet"},
    "services": {"orchestrator", "cli", "demo"},
    "orchestrator": {"cli", "demo"},
    "demo": {"cli"},
}


def _imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in the file (lazy imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_only(package: str) -> None:
    bad = {
        f"{p.relative_to(ROOT)} imports {name}"
        for p in _sources(package)
        for name in _imports(p) & FORBIDDEN[package]
    }
    assert not bad, "\n".join(sorted(bad))


def test_rl_imports_only_torch_and_the_standard_library() -> None:
    allowed = {"torch", "rl", "__future__"} | set(sys.stdlib_module_names)
    bad = {f"{p.relative_to(ROOT)} imports {n}" for p in _sources("rl") for n in _imports(p) - allowed}
    assert not bad, "\n".join(sorted(bad))


def test_runtime_files_stay_under_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for pkg in RUNTIME for p in _sources(pkg)
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these files (over 400 lines): {long}"



def _long_functions(source: str, most: int) -> dict[str, int]:
    """'line name' -> length (def line to last line, docstring included) of the functions and
    methods, nested ones too, over ``most`` lines."""
    return {
        f"{node.lineno} {node.name}": length
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := node.end_lineno - node.lineno + 1) > most
    }


def test_runtime_functions_stay_under_60_lines() -> None:
    long = {
        f"{p.relative_to(ROOT)}:{name}": n
        for pkg in RUNTIME
        for p in _sources(pkg)
        for name, n in _long_functions(p.read_text(), 60).items()
    }
    assert not long, f"split these functions (over 60 lines): {long}"


def test_long_function_check_counts_def_to_last_line() -> None:
    lines = [f"x{i} = {i}" for i in range(59)]
    fits = "def fits():\n" + "".join(f"    {x}\n" for x in lines)  # 60 lines
    over = "class C:\n    async def over(self):\n" + "".join(f"        {x}\n" for x in [*lines, "return x0"])
    assert _long_functions(fits + "\n\n" + over, 60) == {"64 over": 61}
