"""Typed application keys, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from optimizer.api.encoded import EncodedDecisions
from optimizer.engine import Engine
from optimizer.metrics import Registry
from optimizer.persistence import Persister
from optimizer.sampler import Sampler
from optimizer.tasks import Supervisor

if TYPE_CHECKING:
    from optimizer.kube.discovery import Discovery

ENGINE = web.AppKey("engine", Engine)
SAMPLER = web.AppKey("sampler", Sampler)
REGISTRY = web.AppKey("registry", Registry)
PERSISTER: web.AppKey[Persister | None] = web.AppKey("persister")
ADMIN_TOKEN = web.AppKey("admin_token", bytes)
ADMIN_ALLOWED_HOSTS: web.AppKey[tuple[str, ...]] = web.AppKey("admin_allowed_hosts")
DISCOVERY: web.AppKey[Discovery | None] = web.AppKey("discovery")
ENCODED = web.AppKey("encoded_decisions", EncodedDecisions)
BODY_TIMEOUT = web.AppKey("body_timeout", float)  # seconds a request body has to arrive in (read_limited)
TASKS = web.AppKey("tasks", Supervisor)  # the supervised background tasks (sampler, persister, discovery)
