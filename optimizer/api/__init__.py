"""The read API (aiohttp, port 8080): batch sizes, reports, status, history, health, metrics."""

from optimizer.api.app import build_app

__all__ = ["build_app"]
