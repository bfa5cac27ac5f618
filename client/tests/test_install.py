"""The client distribution alone: built from client/, installed into a fresh venv with no other package,
it is small, imports, and follows a real optimizer (``python -m optimizer serve --backend simulated``,
a subprocess of the suite's interpreter on free ports); a service directory with its own
``optimizer.py`` uses it too.

Offline: the wheel is built by the suite's interpreter without build isolation (setuptools >= 70.1
from the dev extras, which builds wheels itself) and without an index, and the fresh venv's pip
installs it with ``--no-index``, so a required dependency would fail the install. Nothing of the
server is imported here: it runs as a subprocess only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from client_fakes import wait_until_ready

pytestmark = pytest.mark.integration

CLIENT_DIR = Path(__file__).resolve().parent.parent
ROOT = CLIENT_DIR.parent
MAX_INSTALLED_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class Venv:
    python: Path
    site_packages: Path
    installed_bytes: int  # what installing the client added to site-packages


def _tree_sizes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done  # type: ignore[no-any-return]


def _clean_env() -> dict[str, str]:
    """The environment for the fresh venv: nothing that would put the repository or another venv on its path."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP") and not k.startswith("VLM_OPTIMIZER_")}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    work = tmp_path_factory.mktemp("client-install")
    src = work / "src"  # a copy: building in client/ would leave build/ and *.egg-info there
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CLIENT_DIR / name, src / name)
    shutil.copytree(CLIENT_DIR / "vlm_optimizer_client", src / "vlm_optimizer_client",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = work / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(wheels), str(src)])
    [wheel] = wheels.glob("vlm_gpu_optimizer_client-*.whl")

    env_dir = work / "venv"
    _run([sys.executable, "-m", "venv", str(env_dir)], env=_clean_env())
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=_clean_env()).stdout.strip())
    before = _tree_sizes(site)
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-cache-dir", str(wheel)], env=_clean_env())
    after = _tree_sizes(site)
    added = sum(size for path, size in after.items() if before.get(path) != size)
    return Venv(python, site, added)


def test_the_installed_client_is_under_5_mib_and_the_venv_has_no_third_party_package(venv: Venv) -> None:
    assert 0 < venv.installed_bytes < MAX_INSTALLED_BYTES, venv.installed_bytes
    script = textwrap.dedent("""
        import importlib.metadata, importlib.util, json
        names = sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions())
        print(json.dumps({"names": names, "aiohttp": importlib.util.find_spec("aiohttp") is not None,
                          "torch": importlib.util.find_spec("torch") is not None}))
    """)
    seen = json.loads(_run([str(venv.python), "-I", "-c", script], env=_clean_env()).stdout)
    # what python -m venv puts in (pip; setuptools on 3.11), and the client: nothing else
    assert set(seen["names"]) - {"pip", "setuptools"} == {"vlm-gpu-optimizer-client"}, seen
    assert not seen["aiohttp"] and not seen["torch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def optimizer_url() -> Iterator[str]:
    """``python -m optimizer serve --backend simulated`` from the suite's interpreter, on free ports."""
    port = _free_port()
    admin = _free_port()
    while admin == port:
        admin = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    proc = subprocess.Popen([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host", "127.0.0.1",
                             "--port", str(port), "--admin-port", str(admin), "--monitoring-interval", "0.5",
                             "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# Run by the fresh venv's interpreter: follow, report an OOM (the reply lowers the batch at once), the async
# face without aiohttp, and one bad argument.
FOLLOW_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    import vlm_optimizer_client as c
    from vlm_optimizer_client import AsyncBatchSizeClient, BatchSizeClient, InvalidArgument, Reporter

    url, service = sys.argv[1], sys.argv[2]
    follower = BatchSizeClient(service, url=url, interval=3600, safe_batch_size=1)
    follower.poll_once()
    first = follower.batch_size
    with Reporter(service, url=url, gpu=0, interval=3600, sink=follower) as reporter:
        reporter.report(first, oom=True)
        reporter.flush()
        sent = reporter.stats.sent
    after_oom = follower.batch_size

    async def main():
        a = AsyncBatchSizeClient(service, url=url, interval=3600)
        await a.poll_once()
        return a.last_status, a.batch_size
    async_status, async_batch = asyncio.run(main())
    try:
        BatchSizeClient(service, url=url, interval=0)
        bad = None
    except InvalidArgument as exc:
        bad = [exc.name, str(exc)]
    import optimizer_probe
    print(json.dumps({"status": follower.last_status, "first": first, "sent": sent, "after_oom": after_oom,
                      "async_status": async_status, "async_batch": async_batch, "bad": bad,
                      "client_file": c.__file__, "probe": optimizer_probe.result(),
                      "third_party": sorted(m for m in sys.modules if m.split(".")[0] in ("aiohttp", "torch"))}))
""")


def _follow(venv: Venv, optimizer_url: str, service_dir: Path, service: str) -> dict[str, object]:
    service_dir.mkdir(parents=True, exist_ok=True)
    (service_dir / "follow_script.py").write_text(FOLLOW_SCRIPT, encoding="utf-8")
    # What `import optimizer` finds from the service's directory: its own module when it has one.
    (service_dir / "optimizer_probe.py").write_text(textwrap.dedent("""
        def result():
            try:
                import optimizer
            except ImportError:
                return None
            return getattr(optimizer, "SERVICE_OWN", "not the service's")
    """), encoding="utf-8")
    # -E -s: no PYTHON* variables, no user site; the script's directory (the service's) comes first on sys.path
    done = _run([str(venv.python), "-E", "-s", "follow_script.py", optimizer_url, service], cwd=service_dir,
                env=_clean_env())
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_fresh_venv_follows_and_reports_to_a_running_optimizer(venv: Venv, optimizer_url: str,
                                                                    tmp_path: Path) -> None:
    seen = _follow(venv, optimizer_url, tmp_path / "service", "fresh-venv")
    assert seen["status"] == 200 and seen["first"] == 4  # the optimizer's batch for a new service, not the safe 1
    assert seen["sent"] == 1
    after = seen["after_oom"]
    assert isinstance(after, int) and 1 <= after < 4  # the OOM report's reply lowered the batch at once
    assert seen["async_status"] == 200 and seen["async_batch"] == after  # urllib in a thread: no aiohttp here
    bad = seen["bad"]
    assert isinstance(bad, list) and bad[0] == "interval" and "seconds > 0" in bad[1]
    assert str(venv.site_packages) in str(seen["client_file"])  # the installed copy, not the repository's
    assert seen["probe"] is None  # no module called optimizer anywhere on this path
    assert seen["third_party"] == []
    with urllib.request.urlopen(f"{optimizer_url}/batch-size?service=fresh-venv", timeout=5) as r:
        assert json.loads(r.read())["batch_size"] == after  # what the optimizer itself now says


def test_a_service_with_its_own_optimizer_module_uses_the_client(venv: Venv, optimizer_url: str,
                                                                 tmp_path: Path) -> None:
    """The import name that collided before (``optimizer``) is the service's own again."""
    service_dir = tmp_path / "captioner"
    service_dir.mkdir()
    (service_dir / "optimizer.py").write_text('"""The service\'s own optimizer (an ML training helper)."""\n'
                                              'SERVICE_OWN = "the service\'s optimizer.py"\n', encoding="utf-8")
    seen = _follow(venv, optimizer_url, service_dir, "own-optimizer")
    assert seen["probe"] == "the service's optimizer.py"
    assert seen["status"] == 200 and seen["first"] == 4 and seen["sent"] == 1
