"""Routes: 2.5D or 3D, chosen by ``model.dims``; each a :class:`~seg_transfer.routes.base.Route` registry entry.

Entries are imported on first use (the 3D route pulls in the inflation code only when asked for).
"""
from __future__ import annotations

import importlib

from seg_transfer.routes.base import Route

#: route name -> "module:attribute" of its :class:`Route`
ROUTES: dict[str, str] = {
    "2.5d": "seg_transfer.routes.slab:SLAB_ROUTE",
    "3d": "seg_transfer.routes.volume:VOLUME_ROUTE",
}


def route_names() -> list[str]:
    return list(ROUTES)


def get_route(name: str) -> Route:
    """The :class:`Route` registered as ``name``; ``ValueError`` naming the valid routes otherwise."""
    if name not in ROUTES:
        raise ValueError(f"unknown route (model.dims) {name!r}; valid: {', '.join(ROUTES)}")
    module, attribute = ROUTES[name].split(":")
    return getattr(importlib.import_module(module), attribute)
