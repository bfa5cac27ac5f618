"""Settings of Kubernetes discovery and publishing (the ``kubernetes:`` section of the config file).

Environment variables are ``VLM_OPTIMIZER_KUBE_<KEY>``; ``node_name`` also falls back to ``NODE_NAME``
(set from ``spec.nodeName`` through the Downward API in the shipped DaemonSet).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optimizer import fields
from optimizer.fields import FieldError

#: Prefix of every annotation and label the optimizer reads or writes.
PREFIX = "vlm-gpu-optimizer/"

_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


#: A Kubernetes setting is invalid; ``key`` names it (``kubernetes.<name>``). The one "bad field" error,
#: :class:`optimizer.fields.FieldError` (``optimizer.config.ConfigError`` too).
KubeSettingError = FieldError


@dataclass(frozen=True)
class KubeSettings:
    """Discovery of the VLM pods on this node and publishing into their annotations.

    Durations are seconds.
    """

    discovery: bool = False  # list and watch the pods on this node
    kubeconfig: str | None = None  # a kubeconfig file (development); None: the in-cluster service account
    node_name: str | None = None  # the node whose pods are watched (default: $NODE_NAME)
    namespaces: tuple[str, ...] = ()  # namespaces watched; empty: all namespaces
    label_selector: str = PREFIX + "client=true"  # which pods are VLM services (the label the NetworkPolicy admits)
    service_label: str = "app.kubernetes.io/name"  # the label naming a pod's service (annotation
    # vlm-gpu-optimizer/service, when present, wins)
    publish: bool = False  # write batch size and cleanup epoch into each pod's annotations
    publish_interval: float = 15.0  # at least this long between two patches of one pod
    watch_timeout: float = 300.0  # a watch request ends (normally) after this long and is renewed
    request_timeout: float = 10.0  # any one API call longer than this fails
    backoff_max: float = 60.0  # the longest wait before retrying after API errors (doubling from 0.5 s, jittered)
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"  # the kubelet's pod-resources
    # API (which devices each pod was given); "" turns it off. Not there: annotations and reports decide
    pod_resources_interval: float = 10.0  # seconds between two List calls (each with request_timeout, at most this)

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces


KUBE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(KubeSettings))


def _seconds(key: str, value: Any, lo: float, hi: float) -> float:
    return fields.as_float(key, value, lo, hi)


def coerce_kube(name: str, value: Any) -> Any:
    """Check one setting as read from a file, the environment or a flag; raises :class:`KubeSettingError`."""
    key = f"kubernetes.{name}"
    if name in ("discovery", "publish"):
        return fields.as_bool(key, value)
    if name == "pod_resources_socket":
        if not isinstance(value, str) or (value and not value.startswith("/")) or "\0" in value:
            raise KubeSettingError(key, f"must be an absolute path to a unix socket, or \"\" (off), got {value!r}")
        return value
    if name == "pod_resources_interval":
        return _seconds(key, value, 1.0, 3600.0)
    if name in ("kubeconfig", "node_name"):
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise KubeSettingError(key, "must be a non-empty string")
        if name == "node_name" and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", value):
            raise KubeSettingError(key, f"must be a node name (lower-case DNS subdomain), got {value!r}")
        return value
    if name == "namespaces":
        return fields.as_names(key, value, _DNS1123, "lower-case letters, digits, '-'", what="namespace")
    if name == "label_selector":
        if not isinstance(value, str):
            raise KubeSettingError(key, f"must be a label selector string, got {value!r}")
        return value.strip()
    if name == "service_label":
        if not isinstance(value, str) or not _LABEL_KEY.fullmatch(value):
            raise KubeSettingError(key, f"must be a label key such as app.kubernetes.io/name, got {value!r}")
        return value
    if name == "publish_interval":
        return _seconds(key, value, 1.0, 86400.0)
    if name == "watch_timeout":
        return _seconds(key, value, 10.0, 3600.0)
    if name == "request_timeout":
        return _seconds(key, value, 0.1, 300.0)
    if name == "backoff_max":
        return _seconds(key, value, 1.0, 3600.0)
    raise fields.unknown_key(key, KUBE_KEYS)


def apply_kube(base: KubeSettings, updates: Mapping[str, Any]) -> KubeSettings:
    """``base`` with ``updates`` applied, all-or-nothing."""
    coerced = {k: coerce_kube(k, v) for k, v in updates.items()}
    return dataclasses.replace(base, **coerced)


def kube_env(environ: Mapping[str, str], env_prefix: str) -> dict[str, Any]:
    """``<env_prefix>KUBE_<KEY>`` for every key, and ``NODE_NAME`` for ``node_name``."""
    out: dict[str, Any] = {}
    if environ.get("NODE_NAME"):
        out["node_name"] = environ["NODE_NAME"]
    for k in KUBE_KEYS:
        v = environ.get(f"{env_prefix}KUBE_{k.upper()}")
        if v is not None:
            out[k] = v
    return out


def finish(settings: KubeSettings) -> KubeSettings:
    """Relations between settings, checked on the merged result."""
    if settings.discovery and not settings.node_name:
        raise KubeSettingError("kubernetes.node_name", "is required with discovery (set NODE_NAME from "
                               "spec.nodeName through the Downward API, or --node-name)")
    if settings.publish and not settings.discovery:
        raise KubeSettingError("kubernetes.publish", "needs kubernetes.discovery: true")
    return settings
