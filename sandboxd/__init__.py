"""sandboxd: a host daemon that owns Docker containers used as sandboxes.

One folder per layer; each may import only the layers below it (the import
contracts in pyproject.toml check this):

- ``wire``: the msgpack-RPC codec, error codes and units, shared with the client;
- ``core``: pure rules (records, statuses, policy, quotas, output capture);
- ``agent``: the in-sandbox agent (C sources) and its frame codec;
- ``backend``: the container backend interface (``base``) and its Docker
  implementation (``docker``, the only importer of aiodocker and aiohttp);
- ``store``: the SQLite state and event log;
- ``services``: registry, deadlines, lifecycle, execs, reconcile, the event bus;
- ``rpc``: the Unix-socket server, dispatcher and the methods by namespace;
- at this root, the process: ``cli``, ``daemon`` (the wiring), ``config``,
  ``logsetup``, ``systemd``.

This module names the version only and must not import anything heavy.
"""

from sandboxd.wire.version import API_VERSION, __version__

__all__ = ["API_VERSION", "__version__"]
