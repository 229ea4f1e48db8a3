"""The rpc layer: msgpack-RPC over the Unix socket, from bytes to service calls and back.

Owns the listening socket and connections (``server``, ``connection``), the
one place an exception becomes a wire error (``dispatcher``), argument checks
(``params``), event delivery to connections (``delivery``) and the methods by
namespace (``methods``). It must not import a backend or the store: it calls
the services.
"""
