"""Prometheus metrics. The only module that touches prometheus_client.

A custom collector builds every family afresh from the engine's latest snapshot and counters, so
series of GPUs or services that went away disappear with them. The registry is passed in; nothing
is registered on the global one.

``GET /metrics`` serves :meth:`MetricsRegistry.exposition`: the text rendered once and kept as bytes,
rendered again only at the first scrape after something it shows changed (the collector's
:meth:`OptimizerCollector.change_key`: a handful of identities and counts, no walk over the GPUs or
services). A burst of changes costs one render; scrapes with nothing changed in between cost none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from optimizer.engine import OOM_OUTCOMES, REFUSAL_REASONS, Engine, GpuCounters
from optimizer.gpu.types import HEAT_THROTTLE_REASONS, THROTTLE_REASONS, GpuSample
from optimizer.sampler import DURATION_BUCKETS, Sampler

if TYPE_CHECKING:
    from optimizer.persistence import Persister


#: Every GPU series' identity. On a MIG device (as dcgm-exporter and nvidia_gpu_exporter label them)
#: ``uuid`` is the parent's UUID and ``mig_uuid``, ``gpu_instance_id``, ``profile`` name the instance;
#: on a whole GPU those three are empty. ``gpu`` is the entry's index (docs/architecture.md, "MIG").
MIG_LABELS = ["mig_uuid", "gpu_instance_id", "profile"]
GPU = ["gpu", "uuid", *MIG_LABELS]
GPU_SERVICE = [*GPU, "service"]
GPU_TRIGGER = [*GPU, "trigger"]
#: What can start a memory optimization or raise a cleanup (see docs/policy.md).
TRIGGERS = ("gc_threshold", "fragmentation", "critical", "oom", "oom_report")

#: The 15 metrics of seed 004, by name (counters carry their ``_total`` suffix in the exposition).
SEED_METRICS = (
    "vlm_memory_usage_percent",
    "vlm_memory_total_bytes",
    "vlm_memory_used_bytes",
    "vlm_memory_free_bytes",
    "vlm_gpu_utilization_percent",
    "vlm_gpu_temperature_celsius",
    "vlm_gpu_power_usage_watts",
    "vlm_memory_fragmentation_percent",
    "vlm_current_batch_size",
    "vlm_optimal_batch_size",
    "vlm_memory_optimizations_total",
    "vlm_memory_optimizations_success_total",
    "vlm_memory_cleanups_total",
    "vlm_batch_size_optimizations_total",
    "vlm_memory_freed_bytes_total",
)


#: Pod states of Kubernetes discovery (``PodInfo.state``), each exported even at 0.
POD_STATES = ("ready", "starting", "unready", "terminating", "finished")


@dataclass(frozen=True)
class KubeCounts:
    """What Kubernetes discovery counted (its watcher's and publisher's totals)."""

    synced: bool
    watch_restarts: Mapping[str, int]  # by reason
    api_errors: Mapping[str, int]  # by reason
    patches: int


@dataclass(frozen=True)
class TaskCounts:
    """One supervised background task's totals (see optimizer/tasks.py)."""

    task: str
    failures: int
    restarts: int
    failing: bool


def gpu_labels(g: GpuSample) -> list[str]:
    """The values of :data:`GPU` for one entry (MIG labels empty on a whole GPU)."""
    if not g.is_mig:
        return [str(g.index), g.uuid, "", "", ""]
    gi = "" if g.gpu_instance_id is None else str(g.gpu_instance_id)
    return [str(g.index), g.parent_uuid or "", g.uuid, gi, g.mig_profile or ""]


class OptimizerCollector(Collector):
    def __init__(self, engine: Engine, sampler: Sampler | None = None,
                 kube: Callable[[], KubeCounts] | None = None, *, persister: Persister | None = None,
                 tasks: Callable[[], Iterable[TaskCounts]] | None = None) -> None:
        self.engine = engine
        self.sampler = sampler
        self.kube = kube
        self.persister = persister
        self.tasks = tasks

    def change_key(self) -> ChangeKey:
        """What :meth:`collect` depends on, cheaply: equal keys, equal output (see :class:`MetricsRegistry`).

        The engine's :attr:`~Engine.changes` stands for its snapshot, state, settings and pods (it rises when
        any of them is replaced, but not when a poll only notes a service's ``last_seen``, which no series
        shows: polls between two scrapes cost no render); its revision covers what moves with them (the
        totals, counted as the policy's events are applied). Refusals and OOM outcomes
        (counted without a revision), the sampler's counts, discovery's, the state file's save errors
        and the tasks' are read as they are: a few numbers each, nothing per GPU or service.
        """
        e = self.engine
        values: list[object] = [e.changes, e.revision, tuple(e.refused.items()), tuple(e.oom_reports.items())]
        if self.sampler is not None:
            st = self.sampler.stats
            values += [st.attempts, st.samples, st.errors, self.sampler.running, self.sampler.interval]
        if self.kube is not None:
            values.append(self.kube())
        values.append(self.persister.errors if self.persister is not None else 0)
        if self.tasks is not None:
            values.append(tuple(self.tasks()))
        return ChangeKey((e.snapshot,), tuple(values))

    def collect(self) -> Iterator[Metric]:
        yield from self._gpu_gauges()
        yield from self._gpu_health()
        yield from self._decisions()
        yield from self._counters()
        yield from self._trust()
        if self.sampler is not None:
            yield from self._self_health(self.sampler)
        if self.kube is not None:
            yield from self._discovery(self.kube())
        yield from self._saves()
        if self.tasks is not None:
            yield from self._tasks(list(self.tasks()))

    def _tasks(self, counts: list[TaskCounts]) -> Iterator[Metric]:
        failures = CounterMetricFamily("vlm_optimizer_task_failures", "Background tasks that died (raised or "
                                       "returned), by task", labels=["task"])
        restarts = CounterMetricFamily("vlm_optimizer_task_restarts", "Background tasks restarted after dying, "
                                       "by task", labels=["task"])
        failing = GaugeMetricFamily("vlm_optimizer_task_failing", "1 while a task dies too often (/health "
                                    "answers 503 naming it), by task", labels=["task"])
        for c in counts:
            failures.add_metric([c.task], float(c.failures))
            restarts.add_metric([c.task], float(c.restarts))
            failing.add_metric([c.task], float(c.failing))
        yield from (failures, restarts, failing)

    def _saves(self) -> Iterator[Metric]:
        errors = CounterMetricFamily("vlm_optimizer_state_save_errors", "Saves of the state file that failed "
                                     "(0 when no state file is configured)")
        errors.add_metric([], float(self.persister.errors if self.persister is not None else 0))
        yield errors

    def _discovery(self, k: KubeCounts) -> Iterator[Metric]:
        pods = GaugeMetricFamily("vlm_optimizer_discovered_pods", "VLM pods on this node matching the selector, "
                                 "by state", labels=["state"])
        counts = {state: 0 for state in POD_STATES}
        for pod in self.engine.pods.values():
            counts[pod.state] = counts.get(pod.state, 0) + 1
        for state, n in counts.items():
            pods.add_metric([state], float(n))
        yield pods
        yield GaugeMetricFamily("vlm_optimizer_kube_synced", "1 while the pod list is current (listed, watch "
                                "running), 0 while retrying after errors", value=1.0 if k.synced else 0.0)
        restarts = CounterMetricFamily("vlm_optimizer_kube_watch_restarts", "Pod watches renewed, by reason "
                                       "(timeout is normal; expired: 410 Gone, listed again)", labels=["reason"])
        for reason in sorted({"timeout", "expired", "error"} | set(k.watch_restarts)):
            restarts.add_metric([reason], float(k.watch_restarts.get(reason, 0)))
        yield restarts
        errors = CounterMetricFamily("vlm_optimizer_kube_api_errors", "Failed Kubernetes API calls, by reason",
                                     labels=["reason"])
        for reason in sorted(set(k.api_errors) | {"forbidden", "unavailable", "timeout"}):
            errors.add_metric([reason], float(k.api_errors.get(reason, 0)))
        yield errors
        patches = CounterMetricFamily("vlm_optimizer_kube_annotation_patches", "Pods patched with their batch size "
                                      "and cleanup epoch")
        patches.add_metric([], float(k.patches))
        yield patches

    def _gpu_gauges(self) -> Iterator[Metric]:
        e = self.engine
        fam = {
            "usage": GaugeMetricFamily("vlm_memory_usage_percent", "GPU memory in use, percent of total", labels=GPU),
            "total": GaugeMetricFamily("vlm_memory_total_bytes", "Total GPU memory in bytes", labels=GPU),
            "used": GaugeMetricFamily("vlm_memory_used_bytes",
                                      "GPU memory no process can allocate (NVML used + reserved), bytes", labels=GPU),
            "free": GaugeMetricFamily("vlm_memory_free_bytes", "Free GPU memory in bytes", labels=GPU),
            "util": GaugeMetricFamily("vlm_gpu_utilization_percent", "GPU utilisation, percent", labels=GPU),
            "temp": GaugeMetricFamily("vlm_gpu_temperature_celsius", "GPU temperature, Celsius", labels=GPU),
            "power": GaugeMetricFamily("vlm_gpu_power_usage_watts", "GPU power draw, watts", labels=GPU),
            "frag": GaugeMetricFamily("vlm_memory_fragmentation_percent",
                                      "Allocator fragmentation reported by the services on the GPU, percent "
                                      "(absent while unknown)", labels=GPU),
            "pressure": GaugeMetricFamily("vlm_memory_pressure_level",
                                          "Memory pressure: 0 normal, 1 warning, 2 critical, 3 oom", labels=GPU),
            "epoch": GaugeMetricFamily("vlm_cleanup_epoch", "Cleanups raised for the GPU so far (services act on a rise)",
                                       labels=GPU),
            "up": GaugeMetricFamily("vlm_gpu_up", "1 if the GPU answered the last sample, 0 if it failed", labels=GPU),
        }
        for g in e.snapshot.gpus if e.snapshot else ():
            labels = gpu_labels(g)
            fam["up"].add_metric(labels, 0.0 if g.failed else 1.0)
            if g.failed:
                continue
            usage = g.usage_fraction
            for key, value in (("usage", None if usage is None else usage * 100), ("total", g.memory_total_bytes),
                               ("used", g.memory_used_bytes), ("free", g.memory_free_bytes),
                               ("util", g.utilization_percent), ("temp", g.temperature_celsius),
                               ("power", g.power_usage_watts)):
                if value is not None:
                    fam[key].add_metric(labels, float(value))
            gs = e.state.gpus.get(g.index)
            if gs is not None:
                if gs.fragmentation is not None:
                    fam["frag"].add_metric(labels, gs.fragmentation * 100)
                fam["pressure"].add_metric(labels, float(gs.pressure.level))
                fam["epoch"].add_metric(labels, float(gs.cleanup_epoch))
        yield from fam.values()

    # -- GPU health (Xid, ECC, retired pages / row remapping, clock throttling); see docs/metrics.md

    def _gpu_health(self) -> Iterator[Metric]:
        fam: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "xid": CounterMetricFamily("vlm_gpu_xid_errors", "Xid critical errors NVML reported for the GPU since the "
                                       "optimizer started, by Xid code", labels=[*GPU, "xid"]),
            "ecc": CounterMetricFamily("vlm_gpu_ecc_errors", "ECC errors since the driver loaded (NVML volatile "
                                       "counters), by type", labels=[*GPU, "type"]),
            "ecc_life": GaugeMetricFamily("vlm_gpu_ecc_errors_aggregate", "ECC errors over the board's lifetime "
                                          "(NVML aggregate counters), by type", labels=[*GPU, "type"]),
            "retired": GaugeMetricFamily("vlm_gpu_retired_pages", "Memory pages retired, by cause", labels=[*GPU, "cause"]),
            "retired_pending": GaugeMetricFamily("vlm_gpu_retired_pages_pending",
                                                 "1 if a page retirement waits for the next GPU reset", labels=GPU),
            "rows": GaugeMetricFamily("vlm_gpu_remapped_rows", "Memory rows remapped, by the error that caused it",
                                      labels=[*GPU, "type"]),
            "rows_pending": GaugeMetricFamily("vlm_gpu_remapped_rows_pending",
                                              "1 if a row remap waits for the next GPU reset", labels=GPU),
            "rows_failure": GaugeMetricFamily("vlm_gpu_remapped_rows_failure",
                                              "1 if a row remap failed (the GPU needs service)", labels=GPU),
            "reasons": GaugeMetricFamily("vlm_gpu_clock_throttle_reasons", "1 for each clock-throttle reason NVML "
                                         "reports active, 0 for the others", labels=[*GPU, "reason"]),
            "throttled": GaugeMetricFamily("vlm_gpu_throttled", "1 if the clocks are slowed by heat or by a hardware "
                                           "slowdown (what the heat rule acts on)", labels=GPU),
        }
        for g in self.engine.snapshot.gpus if self.engine.snapshot else ():
            _add_health(fam, gpu_labels(g), g)
        yield from fam.values()

    def _labels(self, index: int) -> list[str]:
        """The GPU labels of an entry: from its latest sample, else (gone from it) the UUID the state keeps."""
        g = self.engine.gpu_sample(index)
        if g is not None:
            return gpu_labels(g)
        gs = self.engine.state.gpus.get(index)
        return [str(index), gs.uuid if gs is not None else "", "", "", ""]

    def _decisions(self) -> Iterator[Metric]:
        cur = GaugeMetricFamily("vlm_current_batch_size", "Batch size published to the service", labels=GPU_SERVICE)
        opt = GaugeMetricFamily("vlm_optimal_batch_size", "Computed optimal batch size before the strategy factor",
                                labels=GPU_SERVICE)
        for (index, service), svc in sorted(self.engine.state.services.items()):
            labels = [*self._labels(index), service]
            cur.add_metric(labels, float(svc.batch_size))
            opt.add_metric(labels, float(svc.optimal))
        yield cur
        yield opt

    def _counters(self) -> Iterator[Metric]:
        fams = {
            "optimizations": CounterMetricFamily("vlm_memory_optimizations", "Pressure-triggered optimizations started",
                                                 labels=GPU_TRIGGER),
            "successes": CounterMetricFamily("vlm_memory_optimizations_success",
                                             "Optimizations whose trigger cleared within 3 samples", labels=GPU_TRIGGER),
            "failures": CounterMetricFamily("vlm_memory_optimizations_failed",
                                            "Optimizations whose trigger had not cleared after 3 samples",
                                            labels=GPU_TRIGGER),
            "cleanups": CounterMetricFamily("vlm_memory_cleanups", "Cleanups raised (cleanup_epoch increments)",
                                            labels=GPU_TRIGGER),
        }
        changes = CounterMetricFamily("vlm_batch_size_optimizations", "Changes of a service's published batch size",
                                      labels=GPU_SERVICE)
        freed = CounterMetricFamily("vlm_memory_freed_bytes", "Memory freed after cleanups, measured from the samples "
                                    "that followed, bytes", labels=GPU)
        present = sorted({g.index for g in self.engine.snapshot.gpus}) if self.engine.snapshot else []
        counters = self.engine.counters
        for index in present:
            c = counters.get(index) or GpuCounters()  # a GPU with no event yet: every total at zero
            labels = self._labels(index)
            for key in fams:
                counts = getattr(c, key)
                # every known trigger from zero, so rates and ratios have series before the first event
                for trigger in sorted(set(TRIGGERS) | set(counts)):
                    fams[key].add_metric([*labels, trigger], float(counts.get(trigger, 0)))
            # every current service from 0, so that increase() sees its first change
            services = sorted(name for gi, name in self.engine.state.services if gi == index)
            for service in services:
                changes.add_metric([*labels, service], float(c.batch_changes.get(service, 0)))
            freed.add_metric(labels, float(c.freed_bytes))
        yield from fams.values()
        yield changes
        yield freed

    def _trust(self) -> Iterator[Metric]:
        """The read API's trust model (docs/api.md): refused requests, and what OOM reports counted for."""
        refused = CounterMetricFamily("vlm_optimizer_requests_refused", "Polls and reports of the read API refused by "
                                      "the trust model, by reason (403: unknown_service, not_pod_ip; 429: "
                                      "max_services_per_gpu, max_services)", labels=["reason"])
        for reason in sorted(set(REFUSAL_REASONS) | set(self.engine.refused)):
            refused.add_metric([reason], float(self.engine.refused.get(reason, 0)))
        yield refused
        ooms = CounterMetricFamily("vlm_optimizer_oom_reports", "OOM reports, by outcome: counted, contradicted "
                                   "(the GPU's latest sample, with the failed batch on top, is far below the bound: "
                                   "lowered once, nothing barred), rate_limited (acknowledged, no effect)",
                                   labels=["outcome"])
        for outcome in OOM_OUTCOMES:
            ooms.add_metric([outcome], float(self.engine.oom_reports.get(outcome, 0)))
        yield ooms

    def _self_health(self, sampler: Sampler) -> Iterator[Metric]:
        st = sampler.stats
        hist = HistogramMetricFamily("vlm_optimizer_sample_duration_seconds", "Time to read every GPU once")
        cumulative = []
        running = 0
        for bound, n in zip(DURATION_BUCKETS, st.duration_buckets):
            running += n
            cumulative.append((str(bound), float(running)))
        cumulative.append(("+Inf", float(st.samples)))
        hist.add_metric([], cumulative, st.duration_sum)
        yield hist
        attempts = CounterMetricFamily("vlm_optimizer_samples", "Ticks that tried to sample every GPU "
                                       "(the denominator of the error ratio)")
        attempts.add_metric([], float(st.attempts))
        yield attempts
        errors = CounterMetricFamily("vlm_optimizer_sample_errors", "Samples that failed: the whole backend call "
                                     "(gpu=\"all\") or one GPU", labels=["gpu"])
        errors.add_metric(["all"], float(st.errors))
        present = {g.index for g in self.engine.snapshot.gpus} if self.engine.snapshot else set()
        for index in sorted(present | set(st.gpu_errors)):  # every present GPU from 0
            errors.add_metric([str(index)], float(st.gpu_errors.get(index, 0)))
        yield errors
        yield GaugeMetricFamily("vlm_optimizer_monitoring_enabled",
                                "1 while the sampling loop runs, 0 while an operator paused it",
                                value=1.0 if sampler.running else 0.0)
        last = GaugeMetricFamily("vlm_optimizer_last_sample_timestamp_seconds",
                                 "Unix time of the last successful sample (0 before the first)")
        last.add_metric([], st.last_sample_at or 0.0)
        yield last
        yield GaugeMetricFamily("vlm_optimizer_monitoring_interval_seconds", "The sampling interval in force",
                                value=sampler.interval)


@dataclass(frozen=True, eq=False)
class ChangeKey:
    """A collector's inputs: ``objects`` compared by identity (frozen values replaced when they change;
    comparing them by value would walk them), ``values`` by equality."""

    objects: tuple[object, ...]
    values: tuple[object, ...]

    def same(self, other: ChangeKey | None) -> bool:
        return (other is not None and len(self.objects) == len(other.objects)
                and all(a is b for a, b in zip(self.objects, other.objects)) and self.values == other.values)


class MetricsRegistry(CollectorRegistry):
    """A registry that keeps its last text exposition and renders again only when an input changed.

    Every collector with a ``change_key()`` (:class:`OptimizerCollector`) says what it depends on; one
    without makes every exposition a fresh render. ``collect()`` and ``get_sample_value()`` still walk
    the collectors each call (what the tests read); only :meth:`exposition` is cached. Rendering is
    synchronous, on the event loop like every change of the engine, so concurrent scrapes share one
    render and none sees a half-updated engine.
    """

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self._collectors: list[Collector] = []
        self._key: tuple[ChangeKey | None, ...] | None = None
        self._payload = b""
        self.renders = 0  # how many times the exposition was rendered (for tests and benchmarks)

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self._collectors.append(collector)
        self._key = None

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self._collectors.remove(collector)
        self._key = None

    def _change_key(self) -> tuple[ChangeKey | None, ...]:
        keys: list[ChangeKey | None] = []
        for c in self._collectors:
            change_key = getattr(c, "change_key", None)
            keys.append(change_key() if callable(change_key) else None)
        return tuple(keys)

    def _unchanged(self, key: tuple[ChangeKey | None, ...]) -> bool:
        old = self._key
        return (old is not None and len(old) == len(key)
                and all(a is not None and a.same(b) for a, b in zip(key, old)))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type, as :func:`render` gives them: rendered again only
        when a collector's inputs changed since the last one."""
        key = self._change_key()
        if not self._unchanged(key):
            self._payload = generate_latest(self)
            self.renders += 1
            self._key = key
        return self._payload, CONTENT_TYPE_LATEST


#: The registry's type, for a module that holds one (``optimizer.api.keys``) without importing
#: prometheus_client itself: only this module does (the "prometheus" import contract).
Registry = MetricsRegistry


def build_registry(engine: Engine, sampler: Sampler | None = None,
                   kube: Callable[[], KubeCounts] | None = None, *,
                   persister: Persister | None = None,
                   tasks: Callable[[], Iterable[TaskCounts]] | None = None) -> MetricsRegistry:
    registry = MetricsRegistry()
    registry.register(OptimizerCollector(engine, sampler, kube, persister=persister, tasks=tasks))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _add_health(fam: dict[str, CounterMetricFamily | GaugeMetricFamily], labels: list[str], g: GpuSample) -> None:
    """One GPU's health series; a field the board cannot tell has no series."""
    for code, n in g.xid_errors or ():
        fam["xid"].add_metric([*labels, str(code)], float(n))
    for key, kind, value in (("ecc", "corrected", g.ecc_corrected_volatile),
                             ("ecc", "uncorrected", g.ecc_uncorrected_volatile),
                             ("ecc_life", "corrected", g.ecc_corrected_aggregate),
                             ("ecc_life", "uncorrected", g.ecc_uncorrected_aggregate),
                             ("retired", "single_bit_ecc", g.retired_pages_sbe),
                             ("retired", "double_bit_ecc", g.retired_pages_dbe),
                             ("rows", "correctable", g.remapped_rows_correctable),
                             ("rows", "uncorrectable", g.remapped_rows_uncorrectable)):
        if value is not None:
            fam[key].add_metric([*labels, kind], float(value))
    for key, flag in (("retired_pending", g.retired_pages_pending), ("rows_pending", g.remapped_rows_pending),
                      ("rows_failure", g.remapped_rows_failure)):
        if flag is not None:
            fam[key].add_metric(labels, 1.0 if flag else 0.0)
    if g.throttle_reasons is not None:
        for reason in THROTTLE_REASONS:
            fam["reasons"].add_metric([*labels, reason], 1.0 if reason in g.throttle_reasons else 0.0)
        fam["throttled"].add_metric(labels, 1.0 if g.throttle_reasons & HEAT_THROTTLE_REASONS else 0.0)
