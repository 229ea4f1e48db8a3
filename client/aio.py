"""The asyncio client under its earlier import path (``sandboxd_client.aio``).

This module only re-exports: ``SandboxClient`` is ``_async.client.AsyncClient``
and ``Sandbox`` is its sandbox handle. It must not define anything; the API
lives in ``_async`` and the connection in ``connection``.
"""

from ._async.client import AsyncClient, AsyncSandbox
from .protocol import NotificationHandler

SandboxClient = AsyncClient
Sandbox = AsyncSandbox

__all__ = ["NotificationHandler", "Sandbox", "SandboxClient"]
