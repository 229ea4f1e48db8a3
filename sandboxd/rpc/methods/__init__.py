"""The RPC methods by namespace: each SPEC §3 name, its argument schema and a thin handler.

One module per namespace (``daemon``, ``sandbox``, ``exec``, ``events``);
each ``build_*`` returns ``dispatcher.Method`` entries bound to the services
it needs. Handlers turn validated arguments into service calls and records
into wire maps; they must not hold state or talk to a backend.
"""
