"""The store layer: what must outlive the daemon process, in SQLite under the state directory.

Owns ``state.db`` (one row per sandbox: ``state``) and ``events.db`` (the
retained events and the highest seq: ``eventlog``). It stores and loads; it
must not decide anything, and imports nothing of sandboxd but ``core`` and
``wire``.
"""
