"""Kubernetes: discover the VLM pods on this node, and optionally publish decisions into their annotations.

Only this package talks to the Kubernetes API (through the official ``kubernetes`` client, imported
lazily by :mod:`optimizer.kube.watcher` and :mod:`optimizer.kube.publisher`). The rest of the service
sees :class:`~optimizer.pods.PodInfo` values.
"""
