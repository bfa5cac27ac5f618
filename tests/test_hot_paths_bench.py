"""bench/hot_paths.py's parts against a real optimizer: the bare app's bytes, the generator's counting, the client load.

Correctness only (the bench measures speed; docs/benchmarks.md, "The hot paths"): the bare app must
answer exactly what the optimizer answered, the load generator must count every answer once and
follow ETags as a client does, and the production-shaped load must reach the server through the
client library without failures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

from tests.policy_helpers import ROOT

SCRIPT = ROOT / "bench" / "hot_paths.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hot_paths", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


hot = _load()
PATH = f"/batch-size?service={hot.POLLED}"


@pytest.fixture(scope="module")
def optimizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``serve --backend simulated`` on random ports, one GPU and the polled service (as the bench runs it)."""
    directory = str(tmp_path_factory.mktemp("hot-paths"))
    server = hot.start_optimizer(hot.write_scenario(directory, hot.scenario(1, 1, "smoke")), None)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bare(optimizer: Any, tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    """The bare app serving the optimizer's /batch-size (200 and 304) and /metrics, and those answers."""
    expected: list[Any] = []
    metrics = hot.http(optimizer.base, "/metrics")
    assert metrics.status == 200
    spec = {"polls": {hot.POLLED: hot.poll_answers(optimizer.base, PATH, expected)},
            "metrics": {"body": metrics.body.decode(), "headers": metrics.served()}}
    expected.append(("/metrics", {}, None, metrics))
    server = hot.start_bare(spec, str(tmp_path), None, PATH)
    try:
        yield server, expected
    finally:
        server.stop()


def test_the_bare_app_answers_the_optimizers_bytes_and_headers(bare: tuple[Any, list[Any]]) -> None:
    server, expected = bare
    assert hot.check_same(server, expected) == 3  # the 200, the 304 and /metrics
    ok, not_modified = expected[0][3], expected[1][3]
    assert dict(ok.headers)["Content-Type"] == "application/json; charset=utf-8" and ok.body.startswith(b"{")
    assert not_modified.body == b"" and "ETag" in dict(not_modified.headers)
    # and the comparison is not vacuous: one byte off, or one header missing, is a difference
    path, headers, body, answer = expected[0]
    with pytest.raises(RuntimeError, match="does not answer"):
        hot.check_same(server, [(path, headers, body, hot.Answer(answer.status, answer.headers, answer.body + b" "))])
    with pytest.raises(RuntimeError, match="does not answer"):
        hot.check_same(server, [(path, headers, body, hot.Answer(answer.status, answer.headers[1:], answer.body))])


async def test_the_generator_counts_each_answer_once_and_follows_etags() -> None:
    """Against a server that counts what it answers: the same totals; a stale tag costs one 200 per connection."""
    served = {"200": 0, "304": 0}

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == 'W/"current"':
            served["304"] += 1
            return web.Response(status=304, headers={"ETag": 'W/"current"'})
        served["200"] += 1
        return web.Response(body=b'{"batch_size":4}', headers={"ETag": 'W/"current"'},
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/batch-size", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        plain = await hot.Generator("127.0.0.1", port, "/batch-size", 4, 0.5).run()
        assert plain["errors"] == 0 and plain["requests"] > 4
        assert plain["statuses"] == {"200": plain["requests"]} == {"200": served["200"]}
        served.update({"200": 0, "304": 0})
        following = await hot.Generator("127.0.0.1", port, "/batch-size", 4, 0.5, 'W/"stale"', True).run()
        assert following["errors"] == 0
        assert following["statuses"] == {"200": 4, "304": following["requests"] - 4} == served
        served.update({"200": 0, "304": 0})
        fixed = await hot.Generator("127.0.0.1", port, "/batch-size", 3, 0.3, 'W/"stale"', False).run()
        assert fixed["statuses"] == {"200": fixed["requests"]} == {"200": served["200"]}  # not following: all 200
    finally:
        await runner.cleanup()


def test_the_generator_against_the_optimizer_and_the_bare_app(optimizer: Any, bare: tuple[Any, list[Any]]) -> None:
    server, expected = bare
    etag = dict(expected[0][3].headers)["ETag"]
    for target in (optimizer, server):
        full = hot.generate("127.0.0.1", target.port, PATH, 4, 0.5)
        assert full["errors"] == 0 and full["requests"] > 0 and full["statuses"] == {"200": full["requests"]}
        follow = hot.generate("127.0.0.1", target.port, PATH, 4, 0.5, etag, True)
        assert follow["errors"] == 0 and follow["statuses"].get("304", 0) > 0
        assert set(follow["statuses"]) <= {"200", "304"}
        assert follow["statuses"].get("200", 0) <= 4 * 2  # at most a changed decision or two per connection
    scrape = hot.generate("127.0.0.1", server.port, "/metrics", 2, 0.3)
    assert scrape["errors"] == 0 and scrape["statuses"] == {"200": scrape["requests"]}


def test_the_client_load_reaches_the_optimizer_through_the_client_library(optimizer: Any) -> None:
    args = argparse.Namespace(services=1, report_interval=0.3, load_warmup=0.3, load_duration=1.5)
    run = hot.load_run(optimizer, args, None)
    assert run["server"] == "optimizer" and "failed" not in run["polls"]
    assert set(run["polls"]) <= {"200", "304"} and sum(run["polls"].values()) >= 1
    assert run["reports"]["sent"] >= 1 and run["reports"]["failed"] == run["reports"]["rejected"] == 0
    assert run["requests"] == sum(run["polls"].values()) + run["reports"]["sent"]
    assert run["rss_start_mib"] > 0 and run["cpu_s"] >= 0
    json.dumps(run)  # what --json prints
