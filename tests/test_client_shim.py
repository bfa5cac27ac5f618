"""optimizer.client: the deprecated re-export of vlm_optimizer_client, kept for one release, and the server's
independence of it (the server imports neither)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib

import vlm_optimizer_client

from tests.policy_helpers import ROOT


def test_the_old_import_lines_work_and_warn_naming_the_new_import() -> None:
    """Each of today's import lines (docs/client.md before the split) in a fresh interpreter: the same objects
    as the new package's, and one DeprecationWarning that names vlm_optimizer_client."""
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from optimizer.client.follow import BatchSizeClient, AsyncBatchSizeClient, parse_decision, default_cleanup
            from optimizer.client.telemetry import Reporter, AsyncReporter, measure, gpu_identity, DecisionSink
            from optimizer.client.oom import recover_oom, oom_attempts, is_oom_error, loaded_torch
            from optimizer.client.admission import (InsufficientVRAMError, VRAMProfiles, VRAMGuard, vram_middleware,
                worker_count, plan_workers, hw_summary, hw_summary_from_decision, ConcurrencyLimits, MIB, WORKERS_ENV)
            from optimizer.client.identity import pod_from_env
        import vlm_optimizer_client as new
        assert BatchSizeClient is new.BatchSizeClient and Reporter is new.Reporter and measure is new.measure
        assert recover_oom is new.recover_oom and plan_workers is new.plan_workers and VRAMGuard is new.VRAMGuard
        deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        assert len(deprecations) == 1, deprecations
        assert "import vlm_optimizer_client" in deprecations[0], deprecations
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_no_server_module_imports_the_client() -> None:
    """Neither optimizer.client (the shim) nor vlm_optimizer_client is imported by any module of the server
    outside the shim itself (GET /workers has its own optimizer/workers.py)."""
    for path in sorted((ROOT / "optimizer").rglob("*.py")):
        if path.is_relative_to(ROOT / "optimizer/client"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert not (name == "optimizer.client" or name.startswith(("optimizer.client.", "vlm_optimizer_client"))), \
                    (str(path.relative_to(ROOT)), name)


def test_the_server_pins_the_client_of_its_own_version() -> None:
    """They are released together: the same version, the server's dependency pinned to it, and the package's
    ``__version__`` saying it."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        server = tomllib.load(f)["project"]
    with (ROOT / "client/pyproject.toml").open("rb") as f:
        client = tomllib.load(f)["project"]
    assert client["name"] == "vlm-gpu-optimizer-client" and client["version"] == server["version"]
    assert f"vlm-gpu-optimizer-client=={client['version']}" in server["dependencies"]
    assert vlm_optimizer_client.__version__ == client["version"]
