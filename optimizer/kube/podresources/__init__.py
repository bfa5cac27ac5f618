"""The kubelet's pod-resources API (v1): which devices each pod's containers were given.

``api.proto`` is our copy of the part of the kubelet's ``v1`` API that the optimizer calls
(``v1.PodResourcesLister/List``, same package, service, messages and field numbers); the
``api_pb2*`` modules are generated from it by ``make podresources-stubs`` and committed.
:mod:`optimizer.kube.podresources.client` is the client discovery uses.
"""
