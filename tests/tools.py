"""Real binaries the ops tests need (promtool, prometheus, kubectl, hadolint).

Outside CI a missing binary skips the test; under CI (``CI`` set, as .ci/run is run) it fails,
because .ci/run installs them and a skip would hide a broken install step.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def require(name: str, *, optional_in_ci: bool = False) -> str:
    """The path of ``name``: the virtualenv's bin directory first, then PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI") and not optional_in_ci:
        pytest.fail(f"{name} is not installed; .ci/run installs it")
    pytest.skip(f"{name} is not installed")
