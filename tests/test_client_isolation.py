"""optimizer.client runs inside VLM services: it must import without the server's dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from tests.policy_helpers import ROOT

CLIENT = ROOT / "optimizer/client"
MODULES = ("optimizer.client", "optimizer.client.follow", "optimizer.client.telemetry", "optimizer.client.oom",
           "optimizer.client.admission", "optimizer.client.identity")
FORBIDDEN = ("pynvml", "kubernetes", "prometheus_client", "structlog", "torch")


def test_the_client_imports_without_the_servers_dependencies() -> None:
    """In a fresh interpreter where pynvml, kubernetes, prometheus_client, structlog, torch and every
    server module fail to import, every client module still imports."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        FORBIDDEN = {FORBIDDEN!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                server = name.startswith("optimizer.") and not name.startswith("optimizer.client")
                if top in FORBIDDEN or server:
                    raise ImportError(f"blocked in this test: {{name}}")
                return None
        sys.meta_path.insert(0, Block())
        for m in {MODULES!r}:
            __import__(m)
        print("ok", sorted(k for k in sys.modules if k.split(".")[0] in FORBIDDEN))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"


def test_client_sources_import_only_the_client_package_of_ours() -> None:
    files = sorted(CLIENT.glob("*.py"))
    assert {f.stem for f in files} >= {"__init__", "follow", "telemetry", "oom", "admission"}
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("optimizer"):
                    assert name == "optimizer.client" or name.startswith("optimizer.client."), (path.name, name)
