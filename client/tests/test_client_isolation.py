"""vlm_optimizer_client runs inside VLM services: it imports nothing but the standard library (aiohttp and
torch only when present), and nothing of the optimizer's server."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parent.parent
PACKAGE = CLIENT_DIR / "vlm_optimizer_client"
OPTIONAL = {"aiohttp", "torch"}  # aiohttp: the [async] extra, imported lazily; torch: only sys.modules["torch"]


def modules() -> list[str]:
    return sorted("vlm_optimizer_client" if p.stem == "__init__" else f"vlm_optimizer_client.{p.stem}"
                  for p in PACKAGE.glob("*.py"))


def test_every_module_imports_with_every_third_party_package_and_the_server_blocked() -> None:
    """In a fresh interpreter where anything outside the standard library and the client fails to
    import (aiohttp, torch, the server's packages), every client module still imports."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        STDLIB = sys.stdlib_module_names
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                if top not in STDLIB and top != "vlm_optimizer_client":
                    raise ImportError(f"blocked in this test: {{name}}")
                return None
        before = set(sys.modules)  # what site loaded at start-up (.pth hooks), before the client
        sys.meta_path.insert(0, Block())
        for m in {modules()!r}:
            __import__(m)
        print("ok", sorted(k for k in set(sys.modules) - before if k.split(".")[0] not in STDLIB
                           and not k.startswith("vlm_optimizer_client")))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=CLIENT_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"


def test_the_sources_import_only_the_standard_library_and_the_client_itself() -> None:
    assert {Path(m.split(".")[-1]).name for m in modules()} >= {
        "vlm_optimizer_client", "follow", "telemetry", "oom", "admission", "workers", "hardware", "limits", "validate"}
    stdlib = sys.stdlib_module_names
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top == "vlm_optimizer_client" or top in OPTIONAL, (path.name, name)
                if top == "torch":
                    raise AssertionError(f"{path.name} imports torch: use loaded_torch()")


def test_aiohttp_is_imported_lazily_only() -> None:
    """aiohttp (the [async] extra) appears only inside functions or under TYPE_CHECKING."""
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "aiohttp" for n in names), f"{path.name}: aiohttp at module level"


def test_the_distribution_is_typed_and_requires_nothing() -> None:
    with (CLIENT_DIR / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["vlm_optimizer_client"]
    assert project["project"]["dependencies"] == []
    assert [r.split(">")[0] for r in project["project"]["optional-dependencies"]["async"]] == ["aiohttp"]
