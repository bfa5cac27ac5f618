"""Our error hierarchy over the official client's errors, and the default client factory."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from optimizer.kube import errors
from optimizer.kube.client import core_v1, default_api_factory
from optimizer.kube.errors import KubeConfigError, KubeError
from optimizer.config.kube import KubeSettings


def status(code: int, reason: str, message: str) -> dict[str, object]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def api_exception(code: int, body: str | None) -> ApiException:
    e = ApiException(status=code, reason="Whatever")
    e.body = body
    return e


@pytest.mark.parametrize(("code", "reason", "cls", "label"), [
    (403, "Forbidden", errors.KubeForbidden, "forbidden"),
    (401, "Unauthorized", errors.KubeUnauthorized, "unauthorized"),
    (404, "NotFound", errors.KubeNotFound, "not_found"),
    (410, "Expired", errors.KubeGone, "expired"),
    (503, "ServiceUnavailable", errors.KubeApiError, "http_503"),
])
def test_a_status_body_names_the_error(code: int, reason: str, cls: type[errors.KubeApiError], label: str) -> None:
    err = errors.wrap(api_exception(code, json.dumps(status(code, reason, "told so"))))
    assert type(err) is cls and err.reason == label
    assert isinstance(err, errors.KubeApiError)
    assert (err.status, err.status_reason, err.message) == (code, reason, "told so")


def test_an_error_without_a_status_body() -> None:
    err = errors.wrap(api_exception(502, "<html>bad gateway</html>"))
    assert type(err) is errors.KubeApiError and err.reason == "http_502" and "bad gateway" in str(err)
    assert errors.wrap(ApiException(status=0, reason="SSLError")).reason == "unavailable"


def test_transport_errors() -> None:
    refused = urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]
    gave_up = urllib3.exceptions.MaxRetryError(None, "/", refused)  # type: ignore[arg-type]
    assert errors.wrap(gave_up).reason == "unavailable"
    slow = urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")  # type: ignore[arg-type]
    assert isinstance(errors.wrap(slow), errors.KubeTimeout)
    assert errors.wrap(urllib3.exceptions.ProtocolError("cut")).reason == "unavailable"
    assert errors.wrap(ValueError("not json")).reason == "invalid_response"
    mine = errors.KubeGone(410)
    assert errors.wrap(mine) is mine


def test_a_watch_error_event_status() -> None:
    assert isinstance(errors.from_status(status(410, "Expired", "too old resource version")), errors.KubeGone)
    assert errors.from_status("garbage").status == 500


def test_the_default_factory_reads_the_kubeconfig_with_the_token(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "s3cret"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    api = default_api_factory(KubeSettings(kubeconfig=str(path)))
    try:
        assert api.configuration.host == f"http://127.0.0.1:{port}"
        assert api.configuration.auth_settings()["BearerToken"]["value"] == "Bearer s3cret"
        assert api.configuration.retries.read == 0
        with pytest.raises(KubeError) as caught:
            try:
                core_v1(api).list_pod_for_all_namespaces(_request_timeout=2)
            except Exception as e:
                raise errors.wrap(e) from e
        assert caught.value.reason == "unavailable"  # refused, not "timeout" (a urllib3 subclassing quirk)
    finally:
        api.close()
    with pytest.raises(KubeConfigError):
        default_api_factory(KubeSettings(kubeconfig=str(tmp_path / "missing")))
