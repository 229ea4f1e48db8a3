"""The blocking client under its earlier import path (``sandboxd_client.blocking``).

This module only re-exports: ``Client`` and its sandbox handle ``Sandbox``,
both generated into ``_sync`` from ``_async`` by ``scripts/unasync.py``. It
must not define anything.
"""

from ._sync.client import BlockingSandbox, Client

Sandbox = BlockingSandbox

__all__ = ["Client", "Sandbox"]
