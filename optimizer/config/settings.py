"""Settings: the seed's ``MemoryConfig`` keys, service profiles and server options.

Settings are layered (``optimizer/config/load.py``): built-in defaults, then a YAML file (``--config``),
then environment variables (``VLM_OPTIMIZER_<KEY>``), then command-line flags. Every value is checked
as it is read (here, with ``optimizer.fields``); the relations between settings (threshold order,
min <= max) are checked once on the merged result. A bad value is rejected with a :class:`ConfigError` that names the key and the
allowed values, and nothing is applied.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from optimizer import fields
from optimizer.admin_access import parse_host_name
from optimizer.config.kube import KubeSettings
from optimizer.fields import FieldError

ENV_PREFIX = "VLM_OPTIMIZER_"
DEFAULT_BATCH_SIZE = 4
PROFILE_CACHE = 4096  # default profiles kept per Settings value, by service name


#: A setting is invalid: ``key`` names it, the message says what is allowed (the one "bad field" error).
ConfigError = FieldError


class Strategy(str, enum.Enum):
    """How far a batch goes towards the computed optimum (seed 004)."""

    CONSERVATIVE = "conservative"
    BALANCED = "balanced"
    AGGRESSIVE = "aggressive"
    ADAPTIVE = "adaptive"


class BackendName(str, enum.Enum):
    AUTO = "auto"
    NVML = "nvml"
    SIMULATED = "simulated"
    NONE = "none"


@dataclass(frozen=True)
class ServiceProfile:
    """What a VLM service declares about itself.

    ``per_item_mb`` is the extra GPU memory one more item in a batch needs (MiB).
    ``weight`` sets the service's share of a GPU's headroom when several services share it.
    Limits left as ``None`` fall back to the global settings.
    """

    name: str
    per_item_mb: float = 512.0
    min_batch_size: int | None = None
    max_batch_size: int | None = None
    default_batch_size: int | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class Settings:
    """Policy settings. Intervals are seconds, thresholds are fractions of total memory."""

    enabled: bool = True
    strategy: Strategy = Strategy.BALANCED
    monitoring_interval: float = 5.0
    memory_threshold_warning: float = 0.8
    memory_threshold_critical: float = 0.9
    memory_threshold_oom: float = 0.95
    temperature_threshold: float = 80.0  # degrees Celsius
    optimization_interval: float = 60.0
    cleanup_interval: float = 300.0
    max_batch_size: int = 16
    min_batch_size: int = 1
    memory_reserve_mb: int = 1024
    gc_threshold: float = 0.85
    fragmentation_threshold: float = 0.3
    # Additions to the seed's MemoryConfig.
    target_memory_utilization: float = 0.75  # what balanced fills a GPU to (seed 003: 75 %)
    default_batch_size: int | None = None  # published when disabled and before the first optimization;
    # None: 4 (seed 003's fixed baseline), clamped into [min_batch_size, max_batch_size]
    history_size: int = 100  # snapshots kept per GPU (seed 003)
    service_expiry: float = 300.0  # a service not heard from for this long is forgotten
    oom_cost_s: float = 10.0  # adaptive: seconds of a service's throughput one OOM costs (the lost batch,
    # recovery, failed requests); set it to the restart time where an OOM kills the process
    # Who may take a share of a GPU (docs/api.md, "Trust model"): declared profiles and discovered pods
    # always; any other name that polls or reports only with register_unknown.
    register_unknown: bool = True
    max_services_per_gpu: int = 64  # registered services on one GPU, at most (beyond: 429)
    max_services: int = 256  # registered services in all, at most (a service on two GPUs counts twice)
    default_profile: ServiceProfile = field(default_factory=lambda: ServiceProfile(name="default"))
    profiles: tuple[ServiceProfile, ...] = ()

    # Profiles by name, built once per Settings value (not fields: the policy asks for a profile several
    # times per service on every sample and poll, and a copy of the default profile is costly to make).
    _by_name: ClassVar[dict[str, ServiceProfile]]
    _defaults: ClassVar[dict[str, ServiceProfile]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {p.name: p for p in reversed(self.profiles)})  # the first one wins
        object.__setattr__(self, "_defaults", {})

    def profile(self, service: str) -> ServiceProfile:
        """The declared profile of ``service``, or the default profile under its name."""
        declared = self._by_name.get(service)
        if declared is not None:
            return declared
        p = self._defaults.get(service)
        if p is None:
            p = dataclasses.replace(self.default_profile, name=service)
            if len(self._defaults) < PROFILE_CACHE:  # bounded: made-up names must not grow it without end
                self._defaults[service] = p
        return p

    def batch_limits(self, profile: ServiceProfile) -> tuple[int, int]:
        lo = profile.min_batch_size if profile.min_batch_size is not None else self.min_batch_size
        hi = profile.max_batch_size if profile.max_batch_size is not None else self.max_batch_size
        return lo, max(lo, hi)

    def default_batch(self, profile: ServiceProfile) -> int:
        lo, hi = self.batch_limits(profile)
        d = profile.default_batch_size if profile.default_batch_size is not None else self.default_batch_size
        return min(hi, max(lo, DEFAULT_BATCH_SIZE if d is None else d))


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    backend: BackendName = BackendName.AUTO
    scenario: str | None = None
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    admin_host: str = "0.0.0.0"  # the admin API's address; forced to 127.0.0.1 when no token is configured
    admin_port: int = 8081
    admin_token_file: str | None = None  # a file holding the bearer token (else VLM_OPTIMIZER_ADMIN_TOKEN)
    admin_allowed_hosts: tuple[str, ...] = ()  # Host names the admin API answers for, besides its address
    state_path: str | None = None  # where durable state is kept (None: nothing survives a restart)
    header_timeout: float = 10.0  # seconds a request's line and headers have to arrive in (both APIs)
    body_timeout: float = 30.0  # seconds a request's body has to arrive in (both APIs)


@dataclass(frozen=True)
class Config:
    settings: Settings = field(default_factory=Settings)
    server: ServerSettings = field(default_factory=ServerSettings)
    kube: KubeSettings = field(default_factory=KubeSettings)


# --------------------------------------------------------------------------- validation

_FRACTION_KEYS = (
    "memory_threshold_warning",
    "memory_threshold_critical",
    "memory_threshold_oom",
    "gc_threshold",
    "target_memory_utilization",
)
_POSITIVE_FLOAT_KEYS = ("monitoring_interval", "optimization_interval", "cleanup_interval", "service_expiry")
_LOG_FORMATS = ("auto", "json", "console")
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _parse_profile(key: str, raw: Any, *, named: bool) -> ServiceProfile:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a mapping, got {type(raw).__name__}")
    allowed = {f.name for f in dataclasses.fields(ServiceProfile)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise fields.unknown_key(f"{key}.{unknown[0]}", sorted(allowed))
    name = raw.get("name") if named else raw.get("name", "default")
    if named and (not isinstance(name, str) or not name.strip()):
        raise ConfigError(f"{key}.name", "must be a non-empty string")
    opt_int = {}
    for k in ("min_batch_size", "max_batch_size", "default_batch_size"):
        opt_int[k] = None if raw.get(k) is None else fields.as_int(f"{key}.{k}", raw[k], 1, 4096)
    profile = ServiceProfile(
        name=str(name),
        per_item_mb=fields.as_float(f"{key}.per_item_mb", raw.get("per_item_mb", 512.0), 0.0, 1e7, lo_open=True),
        weight=fields.as_float(f"{key}.weight", raw.get("weight", 1.0), 0.0, 1e6, lo_open=True),
        **opt_int,
    )
    lo, hi = profile.min_batch_size, profile.max_batch_size
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{key}.min_batch_size", f"must be <= max_batch_size ({hi}), got {lo}")
    return profile


def coerce_setting(key: str, value: Any) -> Any:
    """One policy setting as read from a file, the environment or a flag; raises :class:`ConfigError`."""
    if key in ("enabled", "register_unknown"):
        return fields.as_bool(key, value)
    if key == "strategy":
        return fields.as_enum(key, value, Strategy)
    if key in _FRACTION_KEYS:
        return fields.as_float(key, value, 0.0, 1.0, lo_open=True)
    if key == "fragmentation_threshold":
        return fields.as_float(key, value, 0.0, 1.0)
    if key in _POSITIVE_FLOAT_KEYS:
        return fields.as_float(key, value, 0.0, 86400.0, lo_open=True)
    if key == "temperature_threshold":
        return fields.as_float(key, value, 0.0, 150.0, lo_open=True)
    if key == "oom_cost_s":
        return fields.as_float(key, value, 0.0, 86400.0)
    if key == "default_batch_size" and value is None:
        return None
    if key in ("max_batch_size", "min_batch_size", "default_batch_size"):
        return fields.as_int(key, value, 1, 4096)
    if key == "memory_reserve_mb":
        return fields.as_int(key, value, 0, 1 << 24)
    if key == "history_size":
        return fields.as_int(key, value, 1, 100_000)
    if key in ("max_services_per_gpu", "max_services"):
        return fields.as_int(key, value, 1, 100_000)
    if key == "default_profile":
        return _parse_profile(key, value, named=False)
    if key == "profiles":
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list of service profiles, got {type(value).__name__}")
        profiles = tuple(_parse_profile(f"{key}[{i}]", p, named=True) for i, p in enumerate(value))
        names = [p.name for p in profiles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(key, f"service names must be unique; {dupes[0]!r} appears twice")
        return profiles
    raise fields.unknown_key(key, SETTING_KEYS)


def _coerce_server(key: str, value: Any) -> Any:
    if key in ("host", "admin_host"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"server.{key}", "must be a non-empty string")
        return value
    if key in ("port", "admin_port"):
        return fields.as_int(f"server.{key}", value, 0, 65535)
    if key in ("admin_token_file", "state_path"):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"server.{key}", "must be a file path")
        return value
    if key == "admin_allowed_hosts":
        return _host_names(f"server.{key}", value)
    if key == "backend":
        return fields.as_enum(f"server.{key}", value, BackendName)
    if key == "scenario":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"server.{key}", "must be a file path")
        return value
    if key == "log_format":
        return fields.as_choice(f"server.{key}", value, _LOG_FORMATS)
    if key == "log_level":
        return fields.as_choice(f"server.{key}", value, _LOG_LEVELS)
    if key in ("header_timeout", "body_timeout"):
        return fields.as_float(f"server.{key}", value, 0.0, 3600.0, lo_open=True)
    raise fields.unknown_key(f"server.{key}", SERVER_KEYS)


def _host_names(key: str, value: Any) -> tuple[str, ...]:
    """A list of host names or IP addresses (or one comma-separated string), without ports, normalised."""
    items = value.split(",") if isinstance(value, str) else [] if value is None else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(key, f"must be a list of host names (or comma-separated), got {value!r}")
    names = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name = parse_host_name(item)
        ported = item.count(":") == 1 or (item.startswith("[") and not item.endswith("]"))
        if name is None or ported:
            raise ConfigError(key, f"{item!r} is not a host name or IP address without a port "
                                   "(the port is not compared)")
        names.append(name)
    return tuple(dict.fromkeys(names))


SETTING_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
SERVER_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ServerSettings))
# The declared services: set only in the config file, never at runtime (admin API) nor by env or flags.
FILE_ONLY_KEYS: tuple[str, ...] = ("profiles",)
# What the admin API may set (pin) at runtime, on top of the file, environment and flags.
RUNTIME_KEYS: tuple[str, ...] = tuple(k for k in SETTING_KEYS if k not in FILE_ONLY_KEYS)


def validate_settings(settings: Settings) -> Settings:
    """Check the relations between settings; raise :class:`ConfigError` naming the key."""
    s = settings
    if not s.memory_threshold_warning < s.memory_threshold_critical < s.memory_threshold_oom:
        raise ConfigError(
            "memory_threshold_critical",
            "thresholds must satisfy memory_threshold_warning < memory_threshold_critical < memory_threshold_oom"
            f" (got {s.memory_threshold_warning:g} < {s.memory_threshold_critical:g} < {s.memory_threshold_oom:g})",
        )
    if s.target_memory_utilization >= s.memory_threshold_critical:
        raise ConfigError(
            "target_memory_utilization",
            f"must be below memory_threshold_critical ({s.memory_threshold_critical:g}),"
            f" got {s.target_memory_utilization:g}",
        )
    if s.min_batch_size > s.max_batch_size:
        raise ConfigError("min_batch_size", f"must be <= max_batch_size ({s.max_batch_size}), got {s.min_batch_size}")
    if s.default_batch_size is not None and not s.min_batch_size <= s.default_batch_size <= s.max_batch_size:
        raise ConfigError(
            "default_batch_size",
            f"must be in [min_batch_size, max_batch_size] = [{s.min_batch_size}, {s.max_batch_size}],"
            f" got {s.default_batch_size}",
        )
    if s.max_services_per_gpu > s.max_services:
        raise ConfigError("max_services_per_gpu",
                          f"must be <= max_services ({s.max_services}), got {s.max_services_per_gpu}")
    if s.optimization_interval < s.monitoring_interval:
        raise ConfigError(
            "optimization_interval",
            f"must be >= monitoring_interval ({s.monitoring_interval:g} s), got {s.optimization_interval:g}",
        )
    return s


def apply_settings(base: Settings, updates: Mapping[str, Any]) -> Settings:
    """Return ``base`` with ``updates`` applied, all-or-nothing. Raises :class:`ConfigError`."""
    coerced = {k: coerce_setting(k, v) for k, v in updates.items()}
    return validate_settings(dataclasses.replace(base, **coerced))


def apply_server(base: ServerSettings, updates: Mapping[str, Any]) -> ServerSettings:
    coerced = {k: _coerce_server(k, v) for k, v in updates.items()}
    return dataclasses.replace(base, **coerced)


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """A plain, YAML/JSON-ready view of the settings, under the seed's key names."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, ServiceProfile):
            value = dataclasses.asdict(value)
        elif f.name == "profiles":
            value = [dataclasses.asdict(p) for p in value]
        out[f.name] = value
    return out
