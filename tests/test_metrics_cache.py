"""``/metrics`` rendered once per change of what it shows: a scrape with nothing changed serves the kept bytes
without walking the engine; any change is in the next scrape; concurrent scrapes share one render."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import cast

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from optimizer.api.keys import REGISTRY
from optimizer.config import Settings
from optimizer.engine import Engine, Refused
from optimizer.metrics import KubeCounts, MetricsRegistry, OptimizerCollector, TaskCounts, build_registry, render
from optimizer.persistence import Persister
from optimizer.pods import PodInfo
from optimizer.sampler import Sampler
from tests.api_harness import Api, MakeApi
from tests.fakes import FakeClock, ScriptedBackend, no_sleep

GIB = 1024**3
INTERVAL = Settings().monitoring_interval


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every call of the collector's ``collect`` (a walk over the engine), counted."""
    calls: list[int] = []
    original = OptimizerCollector.collect

    def counted(self: OptimizerCollector) -> Iterator[Metric]:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(OptimizerCollector, "collect", counted)
    return calls


@dataclass
class Node:
    """An engine and sampler with every optional input of the collector (discovery, state file, tasks)."""

    clock: FakeClock = field(default_factory=FakeClock)
    backend: ScriptedBackend = field(default_factory=lambda: ScriptedBackend(2))
    engine: Engine = field(default_factory=lambda: Engine(Settings(max_services_per_gpu=1)))
    kube: KubeCounts = KubeCounts(synced=True, watch_restarts={}, api_errors={}, patches=0)
    tasks: list[TaskCounts] = field(default_factory=lambda: [TaskCounts("sampler", 0, 0, False)])
    persister: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(errors=0))

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.backend, self.engine, clock=self.clock, sleep=no_sleep)
        self.registry = build_registry(self.engine, self.sampler, lambda: self.kube,
                                       persister=cast(Persister, self.persister), tasks=lambda: self.tasks)

    async def tick(self) -> None:
        if self.sampler.stats.attempts:
            self.clock.advance(INTERVAL)
        await self.sampler.tick()

    def scrape(self) -> bytes:
        return self.registry.exposition()[0]


def pod(name: str, ready: bool) -> PodInfo:
    return PodInfo(namespace="vlm", name=name, uid=f"uid-{name}", node="node-a", service="svc-a",
                   phase="Running", ready=ready, deleting=False, resource_version="1")


def refuse_a_poll(n: Node) -> None:
    """A second service on GPU 0, beyond the cap: refused and counted, nothing else changes."""
    revision = n.engine.revision
    with pytest.raises(Refused):
        n.engine.poll("svc-c", 0, n.clock(), peer="10.0.0.9")
    assert n.engine.revision == revision


#: Each input of the collector, changed in the way the running service changes it.
CHANGES: dict[str, Callable[[Node], object]] = {
    "a sample": lambda n: asyncio.run(n.tick()),
    "a new service's poll": lambda n: n.engine.poll("svc-b", 1, n.clock()),
    "an OOM report": lambda n: n.engine.report("svc-a", 0, n.clock(), batch_size=8, oom=True),
    "a refused poll": refuse_a_poll,
    "an override": lambda n: n.engine.set_override("svc-a", 0, 3, None, n.clock()),
    "a runtime setting": lambda n: n.engine.set_runtime({"monitoring_interval": 2.0}),
    "a pause": lambda n: setattr(n.sampler, "running", False),
    "a discovery count": lambda n: setattr(n, "kube", KubeCounts(True, {"timeout": 1}, {}, 0)),
    "the pods' states": lambda n: n.engine.set_pods({"vlm/p": pod("p", ready=False)}),
    "a failed save": lambda n: setattr(n.persister, "errors", 1),
    "a task's death": lambda n: setattr(n, "tasks", [TaskCounts("sampler", 1, 0, False)]),
}


@pytest.mark.parametrize("change", CHANGES)
def test_every_input_of_the_collector_is_in_the_next_scrape(change: str) -> None:
    n = Node()
    n.engine.attach_discovery()
    asyncio.run(n.tick())
    n.engine.poll("svc-a", 0, n.clock())
    before = n.scrape()
    assert n.scrape() is before  # nothing changed: the very same bytes

    CHANGES[change](n)
    after = n.scrape()
    assert after != before
    assert after == generate_latest(n.registry)  # what a render from scratch gives, byte for byte


def test_a_failed_sample_is_in_the_next_scrape() -> None:
    n = Node()
    asyncio.run(n.tick())
    before = n.scrape()
    n.backend.error = RuntimeError("boom")
    asyncio.run(n.tick())
    assert n.sampler.stats.errors == 1
    after = n.scrape()
    assert after != before and after == generate_latest(n.registry)


def test_a_scrape_with_nothing_changed_does_not_walk_the_engine(walks: list[int]) -> None:
    n = Node()
    asyncio.run(n.tick())
    n.engine.poll("svc-a", 0, n.clock())
    payload, content_type = n.registry.exposition()
    assert (payload, content_type) == render(n.registry)  # the same text and content type as a render
    walks.clear()
    for _ in range(5):
        assert n.registry.exposition() == (payload, content_type)
    assert walks == []
    assert n.registry.renders == 1


def test_a_collector_without_a_change_key_is_rendered_every_time() -> None:
    """Only collectors that say what they depend on are cached; anything else registered is never stale."""
    values = iter(range(10))

    class Counting:
        def collect(self) -> Iterator[Metric]:
            yield GaugeMetricFamily("ticks", "a value that changes every scrape", value=float(next(values)))

    n = Node()
    n.registry.register(Counting())
    first, second = n.scrape(), n.scrape()
    assert b"ticks 0.0" in first and b"ticks 1.0" in second
    assert n.registry.renders == 2


def test_an_empty_registry_renders_once() -> None:
    registry = MetricsRegistry()
    assert registry.exposition()[0] == b""
    registry.exposition()
    assert registry.renders == 1


# -- over the real transport


def gauge(text: str, name: str, **labels: str) -> float:
    [value] = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items()]
    return value


async def scrape(api: Api) -> str:
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return await resp.text()


async def test_scrapes_serve_the_kept_bytes_until_something_changes(make_api: MakeApi, walks: list[int]) -> None:
    api = await make_api()
    await api.tick()
    await api.get("/batch-size?service=svc-a")
    first = await scrape(api)
    walks.clear()
    assert [await scrape(api) for _ in range(3)] == [first] * 3
    assert walks == []  # not one walk over the engine

    api.gpus.used[0] = 70 * GIB  # a sample with other figures
    await api.tick()
    second = await scrape(api)
    assert walks == [1]
    assert gauge(second, "vlm_memory_used_bytes", gpu="0") == 70 * GIB
    assert second == generate_latest(api.client.app[REGISTRY]).decode()


async def test_a_refusal_is_counted_in_the_next_scrape(make_api: MakeApi) -> None:
    api = await make_api(settings=Settings(register_unknown=False))
    await api.tick()
    await scrape(api)
    await api.post({"service": "stranger", "batch_size": 8}, status=403)
    assert 'vlm_optimizer_requests_refused_total{reason="unknown_service"} 1.0' in await scrape(api)


async def test_concurrent_scrapes_share_one_render(make_api: MakeApi, walks: list[int]) -> None:
    api = await make_api(gpus=2)
    await api.tick()
    await scrape(api)
    await api.get("/batch-size?service=svc-b&gpu=1")  # a change: the next scrape renders
    walks.clear()
    texts = await asyncio.gather(*(scrape(api) for _ in range(8)))
    assert len(set(texts)) == 1 and 'service="svc-b"' in texts[0]
    assert walks == [1]


def test_polls_of_known_services_between_scrapes_cost_no_render(walks: list[int]) -> None:
    """A poll's liveness note is in no series: the kept bytes stay, and they are what a render gives."""
    n = Node()
    asyncio.run(n.tick())
    n.engine.poll("svc-a", 0, n.clock())
    before = n.scrape()
    walks.clear()
    for k in range(5):
        n.clock.advance(1.0)
        n.engine.poll("svc-a", 0, n.clock())
        assert n.scrape() is before
    assert walks == [] and n.registry.renders == 1
    assert n.engine.state.services[(0, "svc-a")].last_seen == n.clock()  # noted all the same
    assert before == generate_latest(n.registry)
    n.engine.poll("svc-b", 1, n.clock())  # a new service: a change
    after = n.scrape()
    assert after != before and b'service="svc-b"' in after and n.registry.renders == 2
