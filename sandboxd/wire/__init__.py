"""The wire layer: what the daemon and any client agree on, byte for byte.

Owns the msgpack-RPC codec (``codec``), the error classes with their wire
codes (``errors``), units of size and time (``units``) and the version
(``version``). Standard library and msgpack only: it must not import any other
part of sandboxd, asyncio or anything that does I/O.
"""
