"""Building the official client's ``ApiClient`` (imported lazily: discovery off costs nothing).

An ``ApiFactory`` is any callable ``(KubeSettings) -> kubernetes.client.ApiClient``; it runs in a
worker thread (it may read files). The default one:

- ``settings.kubeconfig`` set: that file, through ``kubernetes.config.new_client_from_config``;
- otherwise the in-cluster service account (``load_incluster_config``), into a fresh
  ``Configuration``, never the client's process-wide default.

Either way urllib3 is told not to retry reads itself (``Retry(read=0)``): by default it would
re-send a GET whose answer timed out up to three times, so one list could take four request
timeouts, and a cancelled watcher would wait that long for its thread. Our own loop retries,
with back-off. A custom factory should do the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optimizer.kube.errors import KubeConfigError
from optimizer.config.kube import KubeSettings

ApiFactory = Callable[[KubeSettings], Any]  # returns a kubernetes.client.ApiClient

#: The field manager our patches are recorded under (``metadata.managedFields``).
FIELD_MANAGER = "vlm-gpu-optimizer"


def default_api_factory(settings: KubeSettings) -> Any:
    """An ``ApiClient`` from ``settings.kubeconfig``, else in-cluster.

    Raises :class:`~optimizer.kube.errors.KubeConfigError` (from the client's ``ConfigException``)
    when neither works.
    """
    import urllib3
    from kubernetes import client, config

    cfg = client.Configuration()
    cfg.retries = urllib3.Retry(total=2, connect=2, read=0, redirect=0, status=0, other=0)
    try:
        if settings.kubeconfig:
            return config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=settings.kubeconfig, client_configuration=cfg,
                persist_config=False)
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except Exception as e:  # ConfigException, a missing file, a file that is not YAML, ...
        raise KubeConfigError(f"no usable Kubernetes client configuration: {type(e).__name__}: {e}") from e
    return client.ApiClient(configuration=cfg)


def core_v1(api_client: Any) -> Any:
    """``kubernetes.client.CoreV1Api`` over ``api_client``."""
    from kubernetes import client

    return client.CoreV1Api(api_client)
