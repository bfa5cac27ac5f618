"""Our own errors for everything that goes wrong talking to the Kubernetes API.

The official client raises ``kubernetes.client.ApiException`` (an HTTP error status, or status 0
for a TLS failure), urllib3 errors (no connection, time-outs, a broken stream), ``ConfigException``
(kubeconfig / service account) and, since the pydantic-based client, ``pydantic.ValidationError``
for arguments of the wrong type. :func:`wrap` turns each into one of the classes below, which the
callers raise ``from`` the original, so that nothing outside :mod:`optimizer.kube` sees the client's
types. Every error has a ``reason``: a short, fixed word used as a metric label.

============================ ========================================= ===================
class                        when                                      ``reason``
============================ ========================================= ===================
:class:`KubeApiError`        the API server answered with an error     ``http_<status>``
:class:`KubeForbidden`       403: RBAC does not allow the request      ``forbidden``
:class:`KubeUnauthorized`    401: the credentials were refused         ``unauthorized``
:class:`KubeNotFound`        404                                       ``not_found``
:class:`KubeGone`            410: the resource version is too old      ``expired``
:class:`KubeUnavailable`     no answer: refused, reset, TLS failure    ``unavailable``
:class:`KubeTimeout`         no answer within the request timeout      ``timeout``
:class:`KubeProtocolError`   an answer we cannot read (bad JSON, ...)  ``invalid_response``
:class:`KubeConfigError`     no usable kubeconfig / service account    ``config``
============================ ========================================= ===================
"""

from __future__ import annotations

import json
from typing import Any


class KubeError(Exception):
    """Base of every error of :mod:`optimizer.kube`."""

    reason: str = "error"


class KubeApiError(KubeError):
    """The API server answered with an error status.

    ``status`` is the HTTP status, ``status_reason`` the Kubernetes ``Status.reason`` (``Forbidden``,
    ``NotFound``, ``Expired``, ...) or the HTTP reason phrase, ``message`` the ``Status.message``.
    """

    label: str = ""  # the fixed ``reason`` of a subclass; empty: ``http_<status>``

    def __init__(self, status: int, status_reason: str = "", message: str = "") -> None:
        super().__init__(f"HTTP {status} {status_reason}: {message}".rstrip(": "))
        self.status = status
        self.status_reason = status_reason
        self.message = message
        self.reason = self.label or f"http_{status}"


class KubeUnauthorized(KubeApiError):
    label = "unauthorized"


class KubeForbidden(KubeApiError):
    label = "forbidden"


class KubeNotFound(KubeApiError):
    label = "not_found"


class KubeGone(KubeApiError):
    """410: the resource version asked for is older than the server's history (relist)."""

    label = "expired"


class KubeUnavailable(KubeError):
    """No answer from the API server (connection refused or reset, TLS failure, stream cut)."""

    reason = "unavailable"


class KubeTimeout(KubeUnavailable):
    """No answer within the request timeout."""

    reason = "timeout"


class KubeProtocolError(KubeError):
    """An answer that is not what the API promises (not JSON, no resourceVersion, ...)."""

    reason = "invalid_response"


class KubeConfigError(KubeError):
    """No usable client configuration (kubeconfig file, in-cluster service account)."""

    reason = "config"


_BY_STATUS: dict[int, type[KubeApiError]] = {
    401: KubeUnauthorized,
    403: KubeForbidden,
    404: KubeNotFound,
    410: KubeGone,
}


def api_error(status: int, status_reason: str = "", message: str = "") -> KubeApiError:
    """The :class:`KubeApiError` subclass for an HTTP status (or a watch ERROR event's ``code``)."""
    return _BY_STATUS.get(status, KubeApiError)(status, status_reason, message)


def from_status(obj: Any) -> KubeApiError:
    """The error a ``Status`` object describes (the body of an error response, or a watch ERROR event)."""
    if not isinstance(obj, dict):
        return KubeApiError(500, "InternalError", f"watch ERROR event without a Status: {obj!r:.200}")
    code = obj.get("code")
    status = code if isinstance(code, int) and not isinstance(code, bool) else 500
    return api_error(status, str(obj.get("reason") or ""), str(obj.get("message") or ""))


def _from_api_exception(exc: Any) -> KubeError:
    status = getattr(exc, "status", None)
    if not isinstance(status, int) or status == 0:
        # status 0: the client's wrapping of a TLS failure (rest.py), or a request it could not build
        return KubeUnavailable(f"no usable answer from the API server: {getattr(exc, 'reason', exc)}")
    body = getattr(exc, "body", None)
    try:
        parsed = json.loads(body) if body else None
    except (TypeError, ValueError):
        parsed = None
    if isinstance(parsed, dict) and parsed.get("kind") == "Status":
        parsed.setdefault("code", status)
        return from_status(parsed)
    return api_error(status, str(getattr(exc, "reason", "") or ""), str(body or "")[:200])


def wrap(exc: BaseException) -> KubeError:
    """Our error for one the client (or urllib3, or the client's argument checks) raised.

    Callers ``raise wrap(e) from e``. A :class:`KubeError` is returned unchanged; anything not
    recognised becomes a plain :class:`KubeError` naming the original type.
    """
    if isinstance(exc, KubeError):
        return exc
    import urllib3.exceptions as u3  # the client's transport
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    if isinstance(exc, ApiException):
        return _from_api_exception(exc)
    if isinstance(exc, ConfigException):
        return KubeConfigError(str(exc))
    if isinstance(exc, u3.MaxRetryError) and exc.reason is not None:
        return wrap(exc.reason)
    # NewConnectionError subclasses ConnectTimeoutError in urllib3 2.x: test it before time-outs
    if isinstance(exc, (u3.NewConnectionError, u3.NameResolutionError)):
        return KubeUnavailable(f"cannot connect to the API server: {exc}")
    if isinstance(exc, (u3.TimeoutError, TimeoutError)):
        return KubeTimeout(f"the API server did not answer in time: {exc}")
    if isinstance(exc, (u3.HTTPError, ConnectionError, OSError)):
        return KubeUnavailable(f"{type(exc).__name__}: {exc}")
    from pydantic import ValidationError  # the client checks its arguments with pydantic

    if isinstance(exc, ValidationError):
        return KubeError(f"the client refused the request's arguments: {exc}")
    if isinstance(exc, (ValueError, json.JSONDecodeError)):
        return KubeProtocolError(f"{type(exc).__name__}: {exc}")
    return KubeError(f"{type(exc).__name__}: {exc}")
