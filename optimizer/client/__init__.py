"""Deprecated: the client library is the distribution ``vlm-gpu-optimizer-client``, package ``vlm_optimizer_client``.

``optimizer.client`` and its modules stay for one release as thin re-exports of it, and warn
(:class:`DeprecationWarning`) when imported. Import ``vlm_optimizer_client`` instead
(``from vlm_optimizer_client import BatchSizeClient, Reporter``): docs/client.md. The server itself
imports nothing from here.
"""

from __future__ import annotations

import warnings

from vlm_optimizer_client import *  # noqa: F403 - the re-export
from vlm_optimizer_client import __all__ as __all__

warnings.warn("optimizer.client is deprecated and will be removed in the next release: import vlm_optimizer_client "
              "instead (pip install vlm-gpu-optimizer-client; docs/client.md)", DeprecationWarning, stacklevel=2)
