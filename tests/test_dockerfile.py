"""The container image (ops/docker/vlm-gpu-memory-optimizer/Dockerfile), checked without a Docker
engine: hadolint (any finding fails), and static checks that fail if the Dockerfile, the
.dockerignore or the documented build command regress. The image itself is not built here."""

from __future__ import annotations

import http.server
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from optimizer.config import ServerSettings
from tests.policy_helpers import ROOT
from tests.tools import require

DOCKERFILE = ROOT / "ops/docker/vlm-gpu-memory-optimizer/Dockerfile"
IMAGE_README = ROOT / "ops/docker/vlm-gpu-memory-optimizer/README.md"
HADOLINT_CONFIG = ROOT / "ops/docker/.hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
BUILD_COMMAND = ("docker build -t medical-kg/vlm-gpu-memory-optimizer:latest "
                 "-f ops/docker/vlm-gpu-memory-optimizer/Dockerfile .")
BUILD_TOOLS = {"gcc", "g++", "cc", "c++", "cpp", "clang", "make", "cmake", "build-essential", "autoconf",
               "automake", "libtool", "pkg-config"}
INSTALL_COMMANDS = (("apt-get", "install"), ("apt", "install"), ("apk", "add"), ("yum", "install"),
                    ("dnf", "install"), ("microdnf", "install"))


# --------------------------------------------------------------------------- Dockerfile parsing

@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined, comments dropped
    line: int  # 1-based line of the keyword


@dataclass
class Stage:
    base: str  # the image, ARG defaults substituted
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_instructions(text: str) -> list[Instruction]:
    """Logical instructions: comment and blank lines skipped (also inside continuations, as Docker
    does), lines ending in a backslash joined to the next."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        continued = stripped.endswith("\\")
        pending.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            logical = " ".join(p for p in pending if p)
            keyword, _, args = logical.partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


def _substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


def parse_stages(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_instructions(text):
        if ins.keyword == "FROM":
            tokens = [t for t in ins.args.split() if not t.startswith("--")]
            name = tokens[2] if len(tokens) >= 3 and tokens[1].lower() == "as" else None
            stages.append(Stage(_substitute(tokens[0], global_args), name, ins.line))
        elif not stages:
            if ins.keyword == "ARG":
                key, _, default = ins.args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    return stages


def key_values(args: str) -> dict[str, str]:
    """ENV / LABEL arguments: ``k=v k2="v 2"``, or the legacy ``ENV k v``."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return {key: value for key, _, value in (t.partition("=") for t in tokens)}


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None
    line: int


def parse_copy(ins: Instruction) -> Copy:
    rest = ins.args
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        key, _, value = flag[2:].partition("=")
        flags[key] = value
        rest = rest.strip()
    parts: list[str] = json.loads(rest) if rest.startswith("[") else rest.split()
    assert len(parts) >= 2, f"line {ins.line}: {ins.keyword} needs a source and a destination"
    return Copy(parts[:-1], parts[-1], flags.get("from"), ins.line)


def exec_form(ins: Instruction) -> list[str]:
    assert ins.args.startswith("["), f"line {ins.line}: {ins.keyword} must use the exec (JSON) form"
    value: list[str] = json.loads(ins.args)
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def shell_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a RUN line, split on ``&&``, ``||``, ``;`` and ``|``."""
    for part in re.split(r"&&|\|\||;|\|", script):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        if words:
            yield words


# --------------------------------------------------------------------------- hadolint

def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # HADOLINT_* variables (HADOLINT_IGNORE, HADOLINT_NOFAIL, ...) would change the verdict.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [require("hadolint"), "--config", str(HADOLINT_CONFIG), "--failure-threshold", "style", "--no-color",
         str(path)],
        capture_output=True, text=True, env=env, timeout=60, check=False)


def test_hadolint_finds_nothing() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The invocation above really lints: the same config flags an unpinned base and apt-get install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3049"):
        assert rule in result.stdout, result.stdout


def _has_reason(lines: list[str], index: int) -> bool:
    """A reason: a comment after the entry on its own line, or a comment line right above it."""
    _, hash_, comment = lines[index].partition("#")
    if hash_ and comment.strip() and "hadolint" not in comment:
        return True
    above = lines[index - 1].strip() if index > 0 else ""
    return above.startswith("#") and above.lstrip("#").strip() != "" and "hadolint" not in above


def test_every_ignored_rule_says_why() -> None:
    text = HADOLINT_CONFIG.read_text(encoding="utf-8")
    config = yaml.safe_load(text) or {}
    lines = text.splitlines()
    for rule in config.get("ignored") or []:
        (index,) = [i for i, line in enumerate(lines) if re.match(rf"\s*-\s*['\"]?{rule}\b", line)]
        assert _has_reason(lines, index), f"{HADOLINT_CONFIG.name}: ignored {rule} without a comment saying why"
    assert str(config.get("failure-threshold", "style")) in ("style", "info"), "every finding must fail"

    dockerfile = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(dockerfile):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore\s*=", line):
            assert _has_reason(dockerfile, index), f"Dockerfile line {index + 1}: an ignore pragma needs a " \
                                                    "comment line right above it saying why"


# --------------------------------------------------------------------------- stages

def test_multi_stage_and_the_final_stage_copies_the_venv_from_the_builder(stages: list[Stage],
                                                                         final: Stage) -> None:
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    earlier = {s.name for s in stages[:-1] if s.name} | {str(i) for i in range(len(stages) - 1)}
    copies = [parse_copy(i) for i in final.all("COPY")]
    from_builder = [c for c in copies if c.from_stage in earlier]
    assert any("/opt/venv" in c.sources for c in from_builder), "the final stage copies /opt/venv from the builder"
    assert not [c for c in copies if c.from_stage is None], "the final stage takes nothing from the build context"
    assert not final.all("ADD")


def test_base_images_are_pinned(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    bases = [s for s in stages if s.base not in names]
    assert bases
    for stage in bases:
        image, _, digest = stage.base.partition("@")
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        assert tag or digest, f"line {stage.line}: {stage.base} has no tag"
        if tag:
            assert tag != "latest" and re.match(r"\d+(\.\d+)+", tag), \
                f"line {stage.line}: {stage.base}: pin a version tag (like 3.11-slim-bookworm), not {tag!r}"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"line {stage.line}: bad digest {digest}"
    # The venv's interpreter symlinks point into the builder's base: the runtime must be the same image.
    assert stages[-1].base == stages[0].base, "builder and runtime must use the same base image"


def test_final_stage_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1].args}: a numeric, non-root UID"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {users[-1].args}: a numeric, non-root GID"
    # The user switch comes after every RUN: nothing after it may need root.
    last_run = max((final.instructions.index(r) for r in final.all("RUN")), default=-1)
    assert final.instructions.index(users[-1]) > last_run


def test_exposes_the_read_and_admin_ports(final: Stage) -> None:
    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.args.split()}
    defaults = ServerSettings()
    assert {defaults.port, defaults.admin_port} <= exposed
    assert {8080, 8081} <= exposed


def test_no_build_tools_in_the_final_stage(final: Stage) -> None:
    for run in final.all("RUN"):
        for words in shell_commands(run.args):
            for manager, verb in INSTALL_COMMANDS:
                if posixpath.basename(words[0]) == manager and verb in words:
                    packages = {w.split("=")[0] for w in words[words.index(verb) + 1:] if not w.startswith("-")}
                    tools = {p for p in packages if p in BUILD_TOOLS or p.endswith("-dev")}
                    assert not tools, f"line {run.line}: build tools in the final stage: {sorted(tools)}"


def test_pip_installs_the_project_without_cache_or_dev_extras(stages: list[Stage]) -> None:
    installs = [(run, words) for stage in stages for run in stage.all("RUN") for words in shell_commands(run.args)
                if posixpath.basename(words[0]).startswith("pip") and "install" in words]
    assert installs
    for run, words in installs:
        assert "--no-cache-dir" in words, f"line {run.line}: pip install without --no-cache-dir"
        assert not any("[dev" in w for w in words), f"line {run.line}: no dev extras in the image"
    assert any("." in words or "/src" in words for _, words in installs), "the builder installs the project"


def test_the_venv_is_byte_compiled_at_build_time(stages: list[Stage], final: Stage) -> None:
    builder_runs = " ".join(r.args for s in stages[:-1] for r in s.all("RUN"))
    assert re.search(r"compileall\b.*\s/opt/venv", builder_runs), "compileall over /opt/venv in the builder"
    assert "unchecked-hash" in builder_runs, ".pyc files that stay valid whatever the copied files' mtimes"


def test_runtime_environment(final: Stage) -> None:
    env: dict[str, str] = {}
    for ins in final.all("ENV"):
        env.update(key_values(ins.args))
    assert env.get("PATH", "").startswith("/opt/venv/bin:")
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "a read-only root filesystem: no .pyc written at runtime"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("VLM_OPTIMIZER_LOG_FORMAT") == "json"


def test_entrypoint_is_the_console_script_and_serve_is_the_default(final: Stage,
                                                                   pyproject: dict[str, Any]) -> None:
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    assert exec_form(entrypoint) == ["vlm-gpu-optimizer"]
    assert "vlm-gpu-optimizer" in pyproject["project"]["scripts"]
    assert exec_form(cmd) == ["serve"]


def test_oci_labels(final: Stage, pyproject: dict[str, Any]) -> None:
    labels: dict[str, str] = {}
    for ins in final.all("LABEL"):
        labels.update(key_values(ins.args))
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.version"] == pyproject["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == pyproject["project"]["license"]["text"]


# --------------------------------------------------------------------------- health check

def healthcheck(final: Stage) -> tuple[list[str], list[str]]:
    """The HEALTHCHECK's options and its exec-form command."""
    (ins,) = final.all("HEALTHCHECK")
    match = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(\[.*\])", ins.args)
    assert match, f"line {ins.line}: HEALTHCHECK [OPTIONS] CMD [exec form] expected, got {ins.args!r}"
    return match.group(1).split(), exec_form(Instruction("CMD", match.group(2), ins.line))


def test_healthcheck_probes_health_with_python(final: Stage) -> None:
    options, command = healthcheck(final)
    assert {o.split("=")[0] for o in options} >= {"--interval", "--timeout", "--start-period", "--retries"}
    assert command[0] == "python", "slim images have no curl or wget"
    assert re.search(r"/health(?![\w/-])", " ".join(command)), "the check probes /health"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_runs(final: Stage, status: int, healthy: bool) -> None:
    """The one-liner, run as the container would (against a stand-in on VLM_OPTIMIZER_PORT): valid Python,
    exit 0 on 200 and non-zero on 503."""
    _, command = healthcheck(final)
    class Handler(_Health):
        pass

    Handler.status = status
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = dict(os.environ, VLM_OPTIMIZER_PORT=str(server.server_address[1]))
        result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True,
                                timeout=30, check=False)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) == healthy, result.stderr


# --------------------------------------------------------------------------- build context

def context_copies(stages: list[Stage]) -> list[Copy]:
    return [c for s in stages for c in map(parse_copy, s.all("COPY")) if c.from_stage is None]


def test_copy_sources_exist_and_are_what_the_build_needs(stages: list[Stage], pyproject: dict[str, Any]) -> None:
    copies = context_copies(stages)
    sources = [src.rstrip("/") for c in copies for src in c.sources]
    for src in sources:
        assert list(ROOT.glob(src)), f"COPY {src}: no such path in the repository"
    # What `pip install .` reads: the metadata, the readme it names, and the packages.
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {p.rstrip("*").rstrip(".") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= set(sources), f"the builder must COPY {sorted(needed - set(sources))}"
    assert not {"tests", "docs", "ops", "examples", ".", "client", "client/tests"} & set(sources), \
        "COPY only what the build needs"


def test_the_client_distribution_is_copied_and_installed_before_the_server(stages: list[Stage]) -> None:
    """The server pins vlm-gpu-optimizer-client, which is not on any index the build reaches: ./client goes
    in first, with its metadata, its readme and its package (not its tests)."""
    with (ROOT / "client/pyproject.toml").open("rb") as f:
        client = tomllib.load(f)
    sources = {src.rstrip("/") for c in context_copies(stages) for src in c.sources}
    assert {"client/pyproject.toml", f"client/{client['project']['readme']}", "client/vlm_optimizer_client"} <= sources
    installs = [words for stage in stages for run in stage.all("RUN") for words in shell_commands(run.args)
                if posixpath.basename(words[0]).startswith("pip") and "install" in words]
    targets = [w for words in installs for w in words if w in (".", "./client", "/src", "/src/client")]
    assert targets[:2] in (["./client", "."], ["/src/client", "/src"]), targets


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception ``!``, regex) per pattern, with Docker's syntax: Go filepath.Match plus ``**``."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        exception = pattern.startswith("!")
        pattern = posixpath.normpath(pattern.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
                continue
            if pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
                continue
            if c == "*":
                regex += "[^/]*"
            elif c == "?":
                regex += "[^/]"
            elif c == "[" and "]" in pattern[i:]:
                end = pattern.index("]", i)
                regex, i = regex + "[" + pattern[i + 1:end].replace("\\", "\\\\") + "]", end + 1
                continue
            elif c == "\\" and i + 1 < len(pattern):
                regex, i = regex + re.escape(pattern[i + 1]), i + 2
                continue
            else:
                regex += re.escape(c)
            i += 1
        rules.append((exception, re.compile(regex)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves ``path`` out: the last matching pattern wins, and a pattern that
    matches a parent directory matches everything under it (Docker's MatchesOrParentMatches)."""
    parts = path.split("/")
    candidates = [path] + ["/".join(parts[:n]) for n in range(1, len(parts))]
    result = False
    for exception, regex in rules:
        if exception != result:
            continue
        if any(regex.fullmatch(c) for c in candidates):
            result = not exception
    return result


def test_dockerignore_matcher() -> None:
    rules = dockerignore_rules("*\n!keep/\n**/__pycache__\n!keep/**/x.pyc\n/abs.txt\n")
    assert excluded("a.txt", rules) and excluded("dir/a.txt", rules)
    assert not excluded("keep", rules) and not excluded("keep/sub/m.py", rules)
    assert excluded("keep/sub/__pycache__/m.pyc", rules)
    assert not excluded("keep/sub/__pycache__/x.pyc", rules)
    assert excluded("abs.txt", dockerignore_rules("/abs.txt"))
    assert not excluded("dir/abs.txt", dockerignore_rules("/abs.txt"))


def test_dockerignore_keeps_every_copied_path(stages: list[Stage]) -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text(encoding="utf-8"))
    for copy in context_copies(stages):
        for src in copy.sources:
            for path in ROOT.glob(src.rstrip("/")):
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    if "__pycache__" in rel.split("/") or rel.endswith((".pyc", ".pyo")):
                        continue  # interpreter leftovers: meant to stay out
                    assert not excluded(rel, rules), f".dockerignore excludes {rel}, which line {copy.line} COPYs"


def test_dockerignore_keeps_clutter_out() -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text(encoding="utf-8"))
    for path in (".git/HEAD", ".venv/bin/python", "tests/test_api.py", "docs/api.md", "ops/k8s/daemonset.yaml",
                 "examples/config.yaml", "bench/results.json", "build/lib/x.py", "dist/x.whl",
                 "vlm_gpu_optimizer.egg-info/PKG-INFO", "optimizer/__pycache__/cli.cpython-311.pyc",
                 "optimizer/gpu/__pycache__/nvml.cpython-311.pyc", ".mypy_cache/3.11/x.json",
                 ".pytest_cache/v/x", "optimizer/vlm_gpu_optimizer.egg-info/PKG-INFO", "client/tests/test_client_oom.py",
                 "client/vlm_optimizer_client/__pycache__/follow.cpython-311.pyc",
                 "client/vlm_gpu_optimizer_client.egg-info/PKG-INFO"):
        assert excluded(path, rules), f".dockerignore lets {path} into the build context"


# --------------------------------------------------------------------------- the documented build command

def docker_build_commands(text: str) -> list[str]:
    """``docker build`` command lines in a document (shell prompts and ``#`` comment prefixes
    removed, backslash continuations joined, whitespace collapsed)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"^\s*(#\s*|\$\s+)?", "", raw).rstrip()
        if pending:
            line = pending + " " + line
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        logical.append(" ".join(line.split()))
    return [line for line in logical if re.match(r"docker build\s", line)]


@pytest.mark.parametrize("path", [IMAGE_README, DOCKERFILE], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_build_command_is_the_documented_one(path: Path) -> None:
    commands = docker_build_commands(path.read_text(encoding="utf-8"))
    assert commands, f"{path.name} shows the build command"
    assert set(commands) == {BUILD_COMMAND}


def test_the_top_level_readme_shows_the_same_build_command() -> None:
    commands = docker_build_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    if not commands:
        pytest.skip("README.md has no docker build command")
    assert set(commands) == {BUILD_COMMAND}


def test_docker_build_commands_are_normalised() -> None:
    text = "```bash\n# Build\ndocker build -t medical-kg/vlm-gpu-memory-optimizer:latest \\\n" \
           "    -f ops/docker/vlm-gpu-memory-optimizer/Dockerfile .\n```\n$ docker build  -t x .\n"
    assert docker_build_commands(text) == [BUILD_COMMAND, "docker build -t x ."]
