"""Fixtures of the client's tests (client/tests): fakes only; the one real optimizer runs as a subprocess
(test_install.py). ``upstream`` and ``transport`` are defined in client_fakes (the server's tests of the
client use them too) and offered here to every test of this directory."""

from __future__ import annotations

import pytest
from client_fakes import FakeCuda, install_fake_cuda, transport, upstream

__all__ = ["cuda", "transport", "upstream"]


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """A stand-in ``torch.cuda`` (a device, its UUID, allocator figures) as ``sys.modules["torch"].cuda``."""
    return install_fake_cuda(monkeypatch)
