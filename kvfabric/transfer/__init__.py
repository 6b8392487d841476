"""The data plane: node-to-node block transports (NIXL when usable, TCP otherwise).

Importing this package never imports NIXL; :func:`make_transport` picks and
builds a transport by name.
"""

from __future__ import annotations

from kvfabric.transfer.base import (
    TRANSPORT_NAMES,
    FetchResult,
    Transport,
    TransportProbe,
    make_transport,
)

__all__ = ["TRANSPORT_NAMES", "FetchResult", "Transport", "TransportProbe", "make_transport"]
