"""Test aids shipped with the worker: a Session-Buddy stand-in, valid items, free ports.

`memory-worker demo` runs against the stand-in, so it lives in the installed package;
`python -m worker.testing` serves it on its own.
"""

from worker.testing.config import OnStore, StandInConfig, StandInStats, StoreCall
from worker.testing.items import item_body, valid_item
from worker.testing.ports import free_port
from worker.testing.server import StandIn

__all__ = [
    "OnStore",
    "StandIn",
    "StandInConfig",
    "StandInStats",
    "StoreCall",
    "free_port",
    "item_body",
    "valid_item",
]
