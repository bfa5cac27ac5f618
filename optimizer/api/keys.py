"""Typed application keys, in one place."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from optimizer.engine import Engine
from optimizer.sampler import Sampler

ENGINE = web.AppKey("engine", Engine)
SAMPLER = web.AppKey("sampler", Sampler)
REGISTRY = web.AppKey("registry", CollectorRegistry)
