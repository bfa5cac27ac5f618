"""Fixtures of the client's tests (client/tests): fakes only; the one real optimizer runs as a subprocess
(test_install.py)."""

from __future__ import annotations

import pytest
from aiohttp import web
from client_fakes import FakeCuda, Upstream, install_fake_cuda
from pytest_aiohttp import AiohttpServer


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    up = Upstream()
    app = web.Application()
    app.router.add_post("/reports", up.handle)
    up.server = await aiohttp_server(app)
    return up


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """A stand-in ``torch.cuda`` (a device, its UUID, allocator figures) as ``sys.modules["torch"].cuda``."""
    return install_fake_cuda(monkeypatch)
