"""Typed application keys, in one place."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from optimizer.api.encoded import EncodedDecisions
from optimizer.engine import Engine
from optimizer.persistence import Persister
from optimizer.sampler import Sampler

ENGINE = web.AppKey("engine", Engine)
SAMPLER = web.AppKey("sampler", Sampler)
REGISTRY = web.AppKey("registry", CollectorRegistry)
PERSISTER: web.AppKey[Persister | None] = web.AppKey("persister")
ADMIN_TOKEN: web.AppKey[bytes | None] = web.AppKey("admin_token")
ENCODED = web.AppKey("encoded_decisions", EncodedDecisions)
