"""The import contracts (pyproject.toml [tool.importlinter], docs/architecture.md "Layers") stay complete and run.

``make test`` runs ``lint-imports`` itself; these tests keep the contracts honest: every module of the server
is covered, and a new arrow running back up the data flow fails them.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import optimizer
from tests.tools import require

ROOT = Path(__file__).resolve().parent.parent


def contracts() -> dict[str, dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def top_level_modules() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(optimizer.__path__)}


def test_the_client_contract_covers_every_server_module() -> None:
    # A forbidden contract's sources are listed by name: a new top-level module must be added to them.
    sources = set(contracts()["client"]["source_modules"])
    assert sources == {f"optimizer.{m}" for m in top_level_modules() - {"client"}}


def test_every_module_is_in_a_layer() -> None:
    layers = contracts()["layers"]
    assert layers["exhaustive"] is True and layers["exhaustive_ignores"] == ["client"]
    named = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    assert named == top_level_modules() - {"client"}


def test_no_ignore_is_a_wildcard() -> None:
    for contract in contracts().values():
        for ignored in contract.get("ignore_imports", []):
            assert "*" not in ignored, (contract["id"], ignored)


def test_make_test_runs_the_contracts_before_the_suite() -> None:
    recipe = (ROOT / "Makefile").read_text(encoding="utf-8").split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("$(BIN)/lint-imports") < recipe.index("pytest")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` (the dev extras'; under CI a missing one fails) on the copy of the package in ``tree``."""
    return subprocess.run([require("lint-imports"), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, timeout=300, check=False)


def test_an_arrow_back_up_breaks_the_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "optimizer", tmp_path / "optimizer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    with (tmp_path / "optimizer" / "values.py").open("a", encoding="utf-8") as f:
        f.write("\nimport optimizer.engine  # noqa: the arrow under test\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "optimizer.values -> optimizer.engine" in broken.stdout
