"""The core layer: the daemon's pure rules.

Owns the sandbox record and its labels (``records``), every status transition
(``status``), the settings a decision needs (``settings``), what a caller may
ask for (``policy``), per-uid quotas (``quotas``) and bounded output capture
(``output``). It must not use asyncio or do I/O (no sockets, files, engine or
database), and imports nothing of sandboxd but ``wire``.
"""
