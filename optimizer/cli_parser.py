"""The command line's parser: ``serve``, ``simulate``, ``benchmark`` and the management commands' flags and
help texts (:func:`build_parser`); :mod:`optimizer.cli` runs what it parses."""

from __future__ import annotations

import argparse
from typing import Any

from optimizer import __version__, manage
from optimizer.config import RUNTIME_KEYS, BackendName, Strategy
from optimizer.simulation.run import MEASURES


def _policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("policy (override the config file and VLM_OPTIMIZER_* variables)")
    g.add_argument("--strategy", choices=[s.value for s in Strategy], help="batch-size strategy (default: balanced)")
    g.add_argument("--monitoring-interval", type=float, metavar="SECONDS", help="sampling interval (default: 5)")
    g.add_argument("--optimization-interval", type=float, metavar="SECONDS",
                   help="periodic optimization interval (default: 60)")
    g.add_argument("--max-batch-size", type=int, metavar="N", help="largest batch published (default: 16)")
    g.add_argument("--min-batch-size", type=int, metavar="N", help="smallest batch published (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-gpu-optimizer",
        description="Samples every GPU, applies a batch-size strategy, and publishes a safe batch size per "
                    "VLM service over HTTP (GET /batch-size).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the optimizer service (read API and metrics on --port)",
                           description="Run the sampling loop and the read API (GET /batch-size, POST /reports, "
                                       "/status, /history, /health, /ready, /metrics).")
    serve.add_argument("--config", metavar="FILE", help="YAML configuration (seed MemoryConfig keys at top level)")
    serve.add_argument("--backend", choices=[b.value for b in BackendName],
                       help="GPU backend: nvml (a GPU node; exit 2 if NVML does not start), simulated (needs no "
                            "GPU), none (CPU-only host: the maximum batch size), or auto (the default): nvml when "
                            "NVML starts, none only where no NVIDIA driver is present; with a driver present and "
                            "NVML failing, not ready (/ready 503 says why) and NVML retried every sample")
    serve.add_argument("--scenario", metavar="FILE",
                       help="scenario for --backend simulated (default: one simulated H100 80GB with one service)")
    serve.add_argument("--host", help="address to listen on (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port of the read API and /metrics (default: 8080)")
    serve.add_argument("--log-format", choices=["auto", "json", "console"],
                       help="log format (default: auto: console on a terminal, else JSON)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: info")
    serve.add_argument("--admin-host", help="address of the admin API (default: 0.0.0.0 with a configured token; "
                                            "always 127.0.0.1 with a generated one)")
    serve.add_argument("--admin-port", type=int, help="port of the admin API (default: 8081)")
    serve.add_argument("--admin-token-file", metavar="FILE",
                       help="file holding the admin bearer token (else VLM_OPTIMIZER_ADMIN_TOKEN). Without "
                            "either, or when FILE does not exist, a random token is generated and written, "
                            "readable by this user only, to admin-token-PORT next to --state-path, else in "
                            "$XDG_RUNTIME_DIR/vlm-gpu-optimizer/, else in ${TMPDIR:-/tmp}/vlm-gpu-optimizer-UID/ "
                            "(where the management commands find it), and the admin API listens on 127.0.0.1 "
                            "only")
    serve.add_argument("--admin-allowed-host", dest="admin_allowed_hosts", action="append", metavar="NAME",
                       help="a Host name the admin API answers for besides its address and localhost, e.g. a "
                            "DNS name it is reached by (repeatable; default: none)")
    serve.add_argument("--state-path", metavar="FILE",
                       help="durable state (overrides, runtime settings, what the policy learned); "
                            "default: none, nothing survives a restart")
    kube = serve.add_argument_group(
        "Kubernetes discovery", "list and watch the VLM pods on this node, share each GPU among them by weight, and "
                                "optionally publish decisions into their annotations (see docs/kubernetes.md)")
    kube.add_argument("--kube-discovery", dest="kube_discovery", action="store_const", const=True,
                      help="turn discovery on (default: off; needs a node name)")
    kube.add_argument("--kubeconfig", dest="kube_kubeconfig", metavar="FILE",
                      help="kubeconfig file (development); default: the in-cluster service account")
    kube.add_argument("--node-name", dest="kube_node_name", metavar="NODE",
                      help="the node whose pods are watched (default: $NODE_NAME)")
    kube.add_argument("--kube-namespace", dest="kube_namespaces", action="append", metavar="NAMESPACE",
                      help="a namespace to watch (repeatable; default: all namespaces)")
    kube.add_argument("--kube-selector", dest="kube_label_selector", metavar="SELECTOR",
                      help="label selector of the VLM pods (default: vlm-gpu-optimizer/client=true)")
    kube.add_argument("--kube-publish", dest="kube_publish", action="store_const", const=True,
                      help="write each pod's batch size and cleanup epoch into its annotations (needs RBAC "
                           "permission to patch pods; default: off)")
    _policy_flags(serve)

    sim = sub.add_parser("simulate", help="replay a scenario in virtual time and print per-service measures",
                         description="Replay a scenario through the same policy as serve, in virtual time, and "
                                     "print per service: " + ", ".join(MEASURES) + ".")
    sim.add_argument("--scenario", metavar="FILE", required=True, help="scenario YAML (see docs/scenarios.md)")
    sim.add_argument("--config", metavar="FILE", help="YAML configuration")
    sim.add_argument("--duration", type=float, metavar="SECONDS", help="override the scenario's duration_s")
    sim.add_argument("--json", action="store_true", help="print JSON: per GPU index its measures and, per service name, the service's")
    _policy_flags(sim)
    sim.add_argument("--interval", dest="monitoring_interval", type=float, metavar="SECONDS",
                     help="the services' polling and the optimizer's sampling interval "
                          "(the same as --monitoring-interval)")
    from optimizer.benchmark import command as benchmark  # no matplotlib: plot.py is imported only to plot

    benchmark.add_parser(sub)
    _admin_commands(sub)
    return parser


def _positive_seconds(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {value!r}") from None
    if not f > 0 or f == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value!r}")
    return f


def _admin_parent() -> argparse.ArgumentParser:
    """The connection options every management command takes."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("admin API connection")
    g.add_argument("--url", metavar="URL",
                   help=f"base URL of the service's admin API (default: ${manage.URL_ENV}, else "
                        f"{manage.DEFAULT_URL}); reached directly: no proxy is used (http_proxy and the like "
                        "are ignored) and no redirect is followed")
    g.add_argument("--token", metavar="TOKEN",
                   help=f"admin bearer token (default: ${manage.TOKEN_ENV}, else, for a loopback --url, the "
                        "token a serve on this machine generated: admin-token-PORT next to "
                        f"${manage.STATE_PATH_ENV}, else in $XDG_RUNTIME_DIR/vlm-gpu-optimizer/, else in "
                        "${TMPDIR:-/tmp}/vlm-gpu-optimizer-UID/; prefer --token-file: a token on the command "
                        "line is visible to other users of the host)")
    g.add_argument("--token-file", metavar="FILE",
                   help="file holding the admin bearer token (instead of --token)")
    g.add_argument("--timeout", type=_positive_seconds, default=manage.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long to wait for each answer (default: {manage.DEFAULT_TIMEOUT_S:g})")
    return p


def _admin_commands(sub: Any) -> None:
    """The seed's management commands (manage_vlm_gpu_memory.py), over the admin API (optimizer.manage)."""
    parent = [_admin_parent()]
    epilog = manage.EXIT_CODES_HELP

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description, epilog=epilog,
                                                    parents=parent)
        return p

    p = add("status", "show every GPU and service of a running optimizer",
            "Show a running optimizer's GPUs (memory used/total and %, pressure, temperature, utilisation, "
            "cleanup epoch) and services (batch size in force, optimum, reason). GET /admin/status.")
    p.add_argument("--json", action="store_true", help="print the status document as JSON")

    p = add("monitor", "watch GPUs and services, polling the status",
            "Poll /admin/status every --interval seconds for --duration seconds. On a terminal the view is "
            "redrawn in place; otherwise one timestamped line per GPU per poll (for logs and pipes).")
    p.add_argument("--duration", type=_positive_seconds, default=300.0, metavar="SECONDS",
                   help="how long to watch (default: 300)")
    p.add_argument("--interval", type=_positive_seconds, default=5.0, metavar="SECONDS",
                   help="time between polls (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON status object per poll, one per line")

    p = add("optimize", "run the batch-size optimization now",
            "Run the periodic optimization on every GPU now and print the batch sizes it changed, and "
            "the services whose optimization waits (a GPU whose last batch change its samples do not show "
            "yet), until when and why. POST /admin/optimize.")
    p.add_argument("--json", action="store_true", help="print the service's answer as JSON")

    p = add("set-batch-size", "fix a service's batch size by hand (or --clear it)",
            "Fix the batch size published to a service (a manual override, kept within the memory safety "
            "bound; cleared by critical memory pressure or an OOM), or hand it back to the policy with "
            "--clear. PUT / DELETE /admin/batch-size.")
    p.add_argument("batch_size", nargs="?", type=int, metavar="N", help="the batch size to publish (1-4096)")
    p.add_argument("--clear", action="store_true", help="drop the manual batch size; the policy decides again")
    p.add_argument("--service", default=manage.DEFAULT_SERVICE, metavar="NAME",
                   help=f"the service (default: {manage.DEFAULT_SERVICE})")
    p.add_argument("--gpu", metavar="INDEX|UUID|PARENT:INSTANCE",
                   help="the GPU, by index or UUID, or a MIG device by UUID or parent:instance (e.g. 0:1) "
                        "(default: the GPU the service is known on, else the first)")
    p.add_argument("--ttl", type=_positive_seconds, metavar="SECONDS",
                   help="expire the manual batch size after this long (default: until --clear)")

    add("enable", "enable batch-size optimization",
        "Let the policy adjust batch sizes again, optimizing at once; print the batch sizes that moved "
        "and what waits for a settled sample, until when. POST /admin/enable.")
    add("disable", "disable batch-size optimization",
        "Stop adjusting batch sizes: services get the default batch size. POST /admin/disable.")
    add("start-monitoring", "resume GPU sampling",
        "Resume sampling the GPUs. POST /admin/monitoring/start.")
    add("stop-monitoring", "pause GPU sampling",
        "Pause sampling the GPUs (the last decisions stay published; /health answers 200 with status "
        "paused and paused_since; an alert fires after 30 minutes paused). POST /admin/monitoring/stop.")

    p = add("configure", "change settings of a running optimizer, or unpin them",
            "Change the given settings at runtime, validated like the config file and all-or-nothing: a bad "
            "value changes nothing and its setting is named. PATCH /admin/config. A setting whose value "
            "differs from the running one is pinned: it wins over the config file, environment and flags, "
            "also after a restart, until unpinned; one given at its running value is left as it is, not "
            "pinned. Settings not given keep their values. --reset KEY and --reset-all unpin instead: the "
            "setting takes its config file, environment or flag value again at once. POST /admin/config/reset. "
            "Profiles are set only in the config file. `status` shows what is pinned.")
    r = p.add_argument_group("unpin (instead of setting)")
    r.add_argument("--reset", action="append", choices=RUNTIME_KEYS, metavar="KEY",
                   help="unpin the setting KEY, by its name as `status` shows it (repeatable): "
                        f"{', '.join(RUNTIME_KEYS)}")
    r.add_argument("--reset-all", action="store_true", help="unpin every setting pinned at runtime")
    g = p.add_argument_group("settings (at least one, unless --reset or --reset-all)")
    g.add_argument("--strategy", choices=[s.value for s in Strategy], help="batch-size strategy")
    for flag, key, typ, metavar in (
            ("--warning-threshold", "memory_threshold_warning", float, "FRACTION"),
            ("--critical-threshold", "memory_threshold_critical", float, "FRACTION"),
            ("--oom-threshold", "memory_threshold_oom", float, "FRACTION"),
            ("--max-batch-size", "max_batch_size", int, "N"),
            ("--min-batch-size", "min_batch_size", int, "N"),
            ("--monitoring-interval", "monitoring_interval", float, "SECONDS"),
            ("--optimization-interval", "optimization_interval", float, "SECONDS"),
            ("--cleanup-interval", "cleanup_interval", float, "SECONDS"),
            ("--temperature-threshold", "temperature_threshold", float, "CELSIUS"),
            ("--gc-threshold", "gc_threshold", float, "FRACTION"),
            ("--fragmentation-threshold", "fragmentation_threshold", float, "FRACTION"),
            ("--memory-reserve-mb", "memory_reserve_mb", int, "MIB"),
            ("--target-memory-utilization", "target_memory_utilization", float, "FRACTION"),
            ("--oom-cost-s", "oom_cost_s", float, "SECONDS")):
        g.add_argument(flag, type=typ, metavar=metavar, help=f"sets {key}")

    p = add("export-config", "save the running configuration to a file",
            "Write the running configuration ({format, version, settings, pinned}: the effective settings, "
            "and which of them are pinned at runtime) as JSON, or as YAML when the file ends in .yaml or "
            ".yml. GET /admin/config/export.")
    p.add_argument("--output", "-o", metavar="FILE", help="where to write it (default or '-': stdout, as JSON)")

    p = add("import-config", "replace the settings pinned at runtime with a file's",
            "Replace the settings pinned at runtime with a file's, all-or-nothing: an invalid file changes "
            "nothing. A plain mapping of settings pins exactly its keys; every setting it leaves out follows "
            "the config file, environment and flags again (not the built-in defaults). An export-config "
            "document pins the settings it lists as pinned and those whose value differs from this "
            "service's config file, environment and flags. Profiles are set only in the config file: a file "
            "whose profiles differ from the service's is refused. JSON or YAML. POST /admin/config/import.")
    p.add_argument("file", metavar="FILE", help="JSON (.json) or YAML file; '-' reads stdin")
