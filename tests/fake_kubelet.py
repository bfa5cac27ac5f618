"""A fake kubelet: a real gRPC server on a unix socket serving ``v1.PodResourcesLister/List``.

It speaks the proto in ``optimizer/kube/podresources/api.proto`` (the kubelet's v1 messages and
field numbers) over grpcio's real HTTP/2 transport, as the kubelet does on
``/var/lib/kubelet/pod-resources/kubelet.sock``. A test sets what ``List`` answers, makes it hang
until released (a slow kubelet), or answer bytes that are no ``ListPodResourcesResponse``.
:class:`GarbageSocket` is a unix socket that speaks no HTTP/2 at all.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from optimizer.kube.podresources import api_pb2

#: container devices of one pod: (resource name, device IDs) per container
Devices = Sequence[tuple[str, Sequence[str]]]


def short_dir() -> Path:
    """A fresh directory with a short path: a unix socket's path has at most 107 bytes."""
    return Path(tempfile.mkdtemp(prefix="kl-", dir="/tmp"))


def answer(pods: Mapping[str, Devices]) -> api_pb2.ListPodResourcesResponse:
    """A List answer: ``{"namespace/name": [(resource, [ids]), ...]}``, one container per entry."""
    out = api_pb2.ListPodResourcesResponse()
    for key, containers in pods.items():
        ns, name = key.split("/", 1)
        pod = out.pod_resources.add(name=name, namespace=ns)
        for i, (resource, ids) in enumerate(containers):
            c = pod.containers.add(name=f"c{i}")
            c.devices.add(resource_name=resource, device_ids=list(ids))
    return out


class FakeKubelet:
    """``with FakeKubelet() as k:`` serves at ``k.socket``; set ``k.response``, ``k.raw`` or ``k.hang``."""

    def __init__(self) -> None:
        self.dir = short_dir()
        self.socket = str(self.dir / "kubelet.sock")
        self.response = api_pb2.ListPodResourcesResponse()
        self.raw: bytes | None = None  # answer these bytes instead of a serialized response
        self.hang = False  # block each List until ``release`` is set (or the client gives up)
        self.entered = threading.Event()  # a List has reached the server
        self.release = threading.Event()
        self.calls = 0
        self._server: grpc.Server | None = None

    def _list(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        api_pb2.ListPodResourcesRequest.FromString(request)  # what the client sent must parse
        self.calls += 1
        self.entered.set()
        if self.hang:
            self.release.wait(10.0)
        if self.raw is not None:
            return self.raw
        return bytes(self.response.SerializeToString())

    def __enter__(self) -> FakeKubelet:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-kubelet"))
        handler = grpc.method_handlers_generic_handler("v1.PodResourcesLister", {
            "List": grpc.unary_unary_rpc_method_handler(self._list),  # raw bytes in and out
        })
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        if self._server is not None:
            self._server.stop(grace=None).wait(5.0)
        shutil.rmtree(self.dir, ignore_errors=True)


class GarbageSocket:
    """A unix socket that answers every connection with ``data`` and hangs up: not HTTP/2, not gRPC."""

    def __init__(self, data: bytes = b"\x00\xffnot http/2\r\n\r\n" * 8) -> None:
        self.dir = short_dir()
        self.socket = str(self.dir / "kubelet.sock")
        self.data = data
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.socket)
        self._sock.listen(8)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="fake-garbage", daemon=True)

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    conn.sendall(self.data)
                except OSError:
                    pass

    def __enter__(self) -> GarbageSocket:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5.0)
        shutil.rmtree(self.dir, ignore_errors=True)

