"""The read API's trust model (docs/api.md, "Trust model"): who may take a share of a GPU, and from where.

Pure: the engine keeps the inputs (the settings, the pods discovery sees, the registered services) and
counts the refusals; these functions decide. A refusal is a :class:`Refused` (nothing was changed).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optimizer.config import Settings
from optimizer.pods import PodInfo


class Refused(Exception):
    """The trust model refuses a poll or report (docs/api.md, "Trust model"); nothing was changed.

    ``status`` is the HTTP status (403: not allowed from this client; 429: a cap on registered services
    is reached), ``reason`` the label of ``vlm_optimizer_requests_refused_total``, ``body`` the answer.
    """

    def __init__(self, status: int, reason: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.body: dict[str, Any] = {"error": message, "field": "service", "reason": reason, **extra}


#: Why the trust model refused a request: the ``reason`` label of ``vlm_optimizer_requests_refused_total``.
REFUSAL_REASONS = ("unknown_service", "not_pod_ip", "max_services_per_gpu", "max_services")


def normalize_ip(text: str) -> str:
    """An address in one spelling: IPv4-mapped IPv6 (``::ffff:10.0.0.5``) as IPv4; anything unparsable as is."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(frozen=True)
class Known:
    """Who may take a share of a GPU, from the settings and the pods (rebuilt when either changes).

    ``declared``: the services with a profile (configured or declared by their pods); ``pod_ips``: the
    services with pods on this node, and the IP addresses of those pods that have not finished.
    """

    declared: frozenset[str]
    pod_ips: dict[str, frozenset[str]]


def known_of(pods: Iterable[PodInfo], declared: Iterable[str]) -> Known:
    """:class:`Known` from the pods on this node and the names of the services with a profile."""
    ips: dict[str, set[str]] = {}
    for p in pods:
        if p.service is not None:  # a finished pod's address may already be another pod's
            ips.setdefault(p.service, set()).update(() if p.terminal else (normalize_ip(a) for a in p.ips))
    return Known(declared=frozenset(declared), pod_ips={k: frozenset(v) for k, v in ips.items()})


def sent_by(pods: Iterable[PodInfo], peer: str | None) -> bool:
    """Did a request from ``peer`` (``None``: in-process, trusted) come from one of ``pods``?"""
    pods = list(pods)
    if not pods:
        return False
    return peer is None or any(normalize_ip(peer) in {normalize_ip(a) for a in p.ips} for p in pods)


def check_peer(service: str, peer: str | None, known: Known, discovery: bool) -> None:
    """With discovery on, a service that has pods on this node is heard only from their IPs (403 else)."""
    ips = known.pod_ips.get(service) if discovery else None
    if ips is None or peer is None or normalize_ip(peer) in ips:
        return
    raise Refused(403, "not_pod_ip", f"service: {service!r} has pods on this node, and {peer} is the "
                  "address of none of them: only its own pods may register it or report for it", peer=peer)


def admit(service: str, index: int, peer: str | None, *, known: Known, discovery: bool, settings: Settings,
          registered: Collection[tuple[int, str]]) -> str | None:
    """May ``service`` register on GPU ``index`` now? ``None``: yes. A text: it is not known, and why.

    ``registered``: the (GPU, service) pairs registered now. Raises :class:`Refused`: 403 from a client
    that is not one of the service's pods (discovery on), 429 when a cap on registered services is
    reached (an unknown name; declared and discovered services are bounded by the configuration and the
    node, and are never locked out by a flood).
    """
    check_peer(service, peer, known, discovery)
    if service in known.declared or service in known.pod_ips:
        return None
    s = settings
    if not s.register_unknown:
        return ("not a declared profile" + (" nor a discovered pod on this node" if discovery else "")
                + ", and register_unknown is off")
    on_gpu = sum(1 for gi, _ in registered if gi == index)
    if on_gpu >= s.max_services_per_gpu:
        raise Refused(429, "max_services_per_gpu", f"service: cannot register {service!r} on GPU {index}: "
                      f"{on_gpu} services are registered there, the limit (setting max_services_per_gpu)",
                      limit=s.max_services_per_gpu, setting="max_services_per_gpu", gpu=index)
    if len(registered) >= s.max_services:
        raise Refused(429, "max_services", f"service: cannot register {service!r}: {len(registered)}"
                      " services are registered, the limit (setting max_services)",
                      limit=s.max_services, setting="max_services")
    return None


def pods_named(pods: Mapping[str, PodInfo], pod: str) -> list[PodInfo]:
    """The pods a poll's or report's ``pod`` names: by ``namespace/name`` or by name alone."""
    return [p for p in pods.values() if pod in (p.key, p.name)]
